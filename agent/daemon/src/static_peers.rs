//! Static peers: `tunnel-agent run --static-peers <file>` takes its peers
//! from a file instead of the TunnelPeer CRDs, for clusters that are not
//! (yet) meshed through the API, or for a mesh managed by other tooling.
//!
//! The file holds the `[Peer]` sections of a `wg setconf` file (what `wg
//! showconf` prints, without `[Interface]`: the key comes from
//! `--key-file`, the port from `--listen-port`):
//!
//! ```text
//! [Peer]
//! PublicKey = <base64>
//! Endpoint = 192.0.2.10:51820
//! AllowedIPs = 10.245.0.0/24, 10.97.0.0/16
//! PersistentKeepalive = 25   # optional; the agent's default otherwise
//! ```
//!
//! Every peer's AllowedIPs are also routed into the tunnel (from the pod and,
//! with a node namespace, from the node), so the file is checked as a
//! routing table, by the rules core applies to a `TunnelPeer`'s pod CIDRs
//! (`sdn_tunnel_core::cidr`): no default route, no loopback, link-local,
//! multicast, unspecified, broadcast or IPv4-mapped range
//! ([`sdn_tunnel_core::cidr::forbidden`]), no prefix of one peer overlapping
//! another's ([`sdn_tunnel_core::cidr::overlapping_pairs`]), no peer twice,
//! not our own key nor our own pod range. A bad file is refused as a whole:
//! at start the agent exits, on reload (SIGHUP) it keeps what it has.

use std::net::SocketAddr;
use std::path::Path;

use ipnet::IpNet;
use sdn_tunnel_core::cidr::{self, Forbidden};
use sdn_tunnel_datapath::keys::PublicKey;

use crate::tunnel::TunnelPeer;
use crate::uapi::{self, PeerOp};
use crate::wgconf::{setconf_to_uapi, ConfError};

/// Why a static peer file was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StaticPeersError {
    #[error("cannot read {path}: {why}")]
    Read { path: String, why: String },
    #[error("{0}")]
    Syntax(#[from] ConfError),
    #[error("[Interface] settings are not taken here ({0}): the key comes from --key-file, the port from --listen-port")]
    InterfaceSetting(&'static str),
    #[error("{0}")]
    Uapi(String),
    #[error("peer {peer}: PresharedKey is not supported by the agent")]
    PresharedKey { peer: String },
    #[error("peer {peer} appears twice")]
    Duplicate { peer: String },
    #[error("peer {peer} is this agent's own key")]
    OwnKey { peer: String },
    #[error("peer {peer}: AllowedIPs {net} contains this agent's own pod IP {pod_ip}: it is a local range, not a remote one")]
    LocalRange {
        peer: String,
        net: IpNet,
        pod_ip: std::net::IpAddr,
    },
    #[error("peer {peer}: AllowedIPs {net} would route everything into the tunnel; list the remote pod and service CIDRs")]
    DefaultRoute { peer: String, net: IpNet },
    #[error("peer {peer}: AllowedIPs {net} covers {}, which a tunnel never carries (a TunnelPeer could not route it either)", .why.describe())]
    ReservedRange {
        peer: String,
        net: IpNet,
        why: Forbidden,
    },
    #[error("peer {peer}: AllowedIPs {net} overlaps {other} of peer {other_peer}")]
    Overlap {
        peer: String,
        net: IpNet,
        other: IpNet,
        other_peer: String,
    },
}

/// Reads and checks a static peer file; `keepalive` is the agent's default
/// for peers that do not set one. (Whether it lists our own key is
/// [`refuse_local`]'s question: the file is checked before the key file
/// is created, so that a bad file changes nothing.)
pub fn load(path: &Path, keepalive: Option<u16>) -> Result<Vec<TunnelPeer>, StaticPeersError> {
    let text = std::fs::read_to_string(path).map_err(|e| StaticPeersError::Read {
        path: path.display().to_string(),
        why: e.to_string(),
    })?;
    parse(&text, keepalive)
}

/// Refuses a peer list that names this agent: its own key, or a prefix
/// holding its own pod IP (the local pod range, whose routing into the
/// tunnel would cut the node off from its own pods).
pub fn refuse_local(
    peers: &[TunnelPeer],
    own: &PublicKey,
    pod_ip: std::net::IpAddr,
) -> Result<(), StaticPeersError> {
    for p in peers {
        let peer = p.public_key.to_base64();
        if p.public_key == *own {
            return Err(StaticPeersError::OwnKey { peer });
        }
        if let Some(net) = p.allowed_ips.iter().find(|n| n.contains(&pod_ip)) {
            return Err(StaticPeersError::LocalRange {
                peer,
                net: *net,
                pod_ip,
            });
        }
    }
    Ok(())
}

/// Parses and checks the text of a static peer file (see [`load`]).
pub fn parse(text: &str, keepalive: Option<u16>) -> Result<Vec<TunnelPeer>, StaticPeersError> {
    let lines = setconf_to_uapi(text)?;
    let req = uapi::parse_set(&lines).map_err(|e| StaticPeersError::Uapi(e.to_string()))?;
    if req.private_key.is_some() {
        return Err(StaticPeersError::InterfaceSetting("PrivateKey"));
    }
    if req.listen_port.is_some() {
        return Err(StaticPeersError::InterfaceSetting("ListenPort"));
    }
    if req.fwmark.is_some() {
        return Err(StaticPeersError::InterfaceSetting("FwMark"));
    }
    let mut peers: Vec<TunnelPeer> = Vec::with_capacity(req.peers.len());
    for block in req.peers {
        let name = block.public_key.to_base64();
        if peers.iter().any(|p| p.public_key == block.public_key) {
            return Err(StaticPeersError::Duplicate { peer: name });
        }
        let mut endpoint: Option<SocketAddr> = None;
        let mut peer_keepalive = keepalive;
        let mut allowed_ips: Vec<IpNet> = Vec::new();
        for op in block.ops {
            match op {
                PeerOp::Endpoint(e) => endpoint = Some(e),
                PeerOp::PersistentKeepalive(s) => peer_keepalive = (s > 0).then_some(s),
                PeerOp::AllowedIp { net, remove: false } => {
                    // `wg` accepts host bits and clears them; so do we.
                    let net = net.trunc();
                    match cidr::forbidden(&net) {
                        None => {}
                        Some(Forbidden::DefaultRoute) => {
                            return Err(StaticPeersError::DefaultRoute { peer: name, net })
                        }
                        Some(why) => {
                            return Err(StaticPeersError::ReservedRange {
                                peer: name,
                                net,
                                why,
                            })
                        }
                    }
                    if !allowed_ips.contains(&net) {
                        allowed_ips.push(net);
                    }
                }
                PeerOp::PresharedKey(Some(_)) => {
                    return Err(StaticPeersError::PresharedKey { peer: name })
                }
                // What `setconf_to_uapi` emits besides: replace markers
                // and an all-zero key.
                PeerOp::ReplaceAllowedIps
                | PeerOp::PresharedKey(None)
                | PeerOp::ProtocolVersion
                | PeerOp::UpdateOnly
                | PeerOp::Remove
                | PeerOp::AllowedIp { remove: true, .. } => {}
            }
        }
        for other in &peers {
            if let Some((net, o)) = cidr::overlapping_pairs(&allowed_ips, &other.allowed_ips).next()
            {
                return Err(StaticPeersError::Overlap {
                    peer: name,
                    net: *net,
                    other: *o,
                    other_peer: other.public_key.to_base64(),
                });
            }
        }
        allowed_ips.sort();
        peers.push(TunnelPeer {
            public_key: block.public_key,
            endpoint,
            allowed_ips,
            persistent_keepalive: peer_keepalive,
        });
    }
    Ok(peers)
}

/// The destinations routed into the tunnel for `peers`, sorted.
pub fn destinations(peers: &[TunnelPeer]) -> Vec<IpNet> {
    let mut out: Vec<IpNet> = peers
        .iter()
        .flat_map(|p| p.allowed_ips.iter().copied())
        .collect();
    out.sort();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use sdn_tunnel_datapath::keys::PrivateKey;

    fn key() -> PublicKey {
        PrivateKey::generate().public_key()
    }

    fn peer(k: &PublicKey, rest: &str) -> String {
        format!("[Peer]\nPublicKey = {}\n{rest}\n", k.to_base64())
    }

    #[test]
    fn a_file_of_peers_becomes_tunnel_peers_and_routes() {
        let (own, a, b) = (key(), key(), key());
        let text = format!(
            "# two remote clusters\n{}{}",
            peer(
                &a,
                "Endpoint = 192.0.2.1:51820\nAllowedIPs = 10.245.0.7/24, 10.97.0.0/16\n"
            ),
            peer(
                &b,
                "Endpoint = 192.0.2.2:51821\nAllowedIPs = 10.246.0.0/24\nPersistentKeepalive = 0"
            ),
        );
        let peers = parse(&text, Some(25)).expect("valid");
        let pod_ip = "10.1.1.2".parse().unwrap();
        assert_eq!(refuse_local(&peers, &own, pod_ip), Ok(()));
        assert_eq!(peers.len(), 2);
        assert_eq!(peers[0].public_key, a);
        assert_eq!(peers[0].endpoint, Some("192.0.2.1:51820".parse().unwrap()));
        assert_eq!(
            peers[0].allowed_ips,
            vec![
                "10.97.0.0/16".parse::<IpNet>().unwrap(),
                "10.245.0.0/24".parse().unwrap()
            ]
        );
        assert_eq!(peers[0].persistent_keepalive, Some(25), "agent default");
        assert_eq!(peers[1].persistent_keepalive, None, "0 turns it off");
        assert_eq!(
            destinations(&peers),
            vec![
                "10.97.0.0/16".parse::<IpNet>().unwrap(),
                "10.245.0.0/24".parse().unwrap(),
                "10.246.0.0/24".parse().unwrap()
            ]
        );
        assert_eq!(parse("# nobody yet\n", None), Ok(Vec::new()));
    }

    #[test]
    fn routing_mistakes_and_interface_settings_are_refused() {
        let (own, a, b) = (key(), key(), key());
        let cases: Vec<(String, &str)> = vec![
            (peer(&a, "AllowedIPs = 0.0.0.0/0"), "would route everything"),
            (peer(&a, "AllowedIPs = ::/0"), "would route everything"),
            (
                format!(
                    "{}{}",
                    peer(&a, "AllowedIPs = 10.245.0.0/16"),
                    peer(&b, "AllowedIPs = 10.245.3.0/24")
                ),
                "overlaps 10.245.0.0/16",
            ),
            (format!("{}{}", peer(&a, ""), peer(&a, "")), "appears twice"),
            (
                format!(
                    "[Interface]\nPrivateKey = {}\n",
                    PrivateKey::generate().to_base64().as_str()
                ),
                "--key-file",
            ),
            ("[Interface]\nListenPort = 51820\n".into(), "--listen-port"),
            (
                peer(
                    &a,
                    &format!(
                        "PresharedKey = {}",
                        PrivateKey::generate().to_base64().as_str()
                    ),
                ),
                "PresharedKey",
            ),
            (peer(&a, "AllowedIPs = 10.0.0.0/33"), "AllowedIPs"),
            ("[Peer]\nPublicKey = nonsense\n".into(), "PublicKey"),
            ("[Peer]\nEndpoint = 192.0.2.1:1\n".into(), "no PublicKey"),
        ];
        for (text, why) in cases {
            let err = parse(&text, Some(25)).expect_err(&text).to_string();
            assert!(err.contains(why), "{text:?}: {err:?} should say {why:?}");
        }
        let pod_ip = "10.1.0.2".parse().unwrap();
        let mine = parse(&peer(&own, "AllowedIPs = 10.9.0.0/24"), None).expect("well formed");
        let err = refuse_local(&mine, &own, pod_ip).unwrap_err().to_string();
        assert!(err.contains("own key"), "{err}");
        let local = parse(&peer(&a, "AllowedIPs = 10.1.0.0/16"), None).expect("well formed");
        let err = refuse_local(&local, &own, pod_ip).unwrap_err().to_string();
        assert!(err.contains("own pod IP 10.1.0.2"), "{err}");
    }

    /// Every range `core::cidr` refuses for a TunnelPeer is refused here
    /// too, with the same reason; a prefix merely overlapping one (a wider
    /// block around it) is refused as well.
    #[test]
    fn every_reserved_range_is_refused_as_for_a_tunnel_peer() {
        let a = key();
        let cases: [(&str, Forbidden); 12] = [
            ("0.0.0.0/8", Forbidden::Unspecified),
            ("127.0.0.0/8", Forbidden::Loopback),
            ("127.0.0.1/32", Forbidden::Loopback),
            ("169.254.0.0/16", Forbidden::LinkLocal),
            ("224.0.0.0/4", Forbidden::Multicast),
            ("255.255.255.255/32", Forbidden::Broadcast),
            ("::/128", Forbidden::Unspecified),
            ("::1/128", Forbidden::Loopback),
            ("fe80::/10", Forbidden::LinkLocal),
            ("ff02::/16", Forbidden::Multicast),
            ("::ffff:0:0/96", Forbidden::Ipv4Mapped),
            // wider than loopback: contains it
            ("64.0.0.0/2", Forbidden::Loopback),
        ];
        for (range, want) in cases {
            let net: IpNet = range.parse().unwrap();
            assert_eq!(
                cidr::forbidden(&net),
                Some(want),
                "core's verdict on {range}"
            );
            let text = peer(&a, &format!("AllowedIPs = 10.245.0.0/24, {range}"));
            let err = parse(&text, None).expect_err(range);
            assert_eq!(
                err,
                StaticPeersError::ReservedRange {
                    peer: a.to_base64(),
                    net,
                    why: want
                },
                "{range}"
            );
            assert!(err.to_string().contains(want.describe()), "{err}");
        }
        // The ranges core allows are still allowed.
        for ok in [
            "10.245.0.0/16",
            "192.0.2.0/24",
            "fd00:245::/48",
            "100.64.0.0/10",
        ] {
            let text = peer(&a, &format!("AllowedIPs = {ok}"));
            assert!(parse(&text, None).is_ok(), "{ok}");
        }
        // core lists ten special ranges; each one is covered above.
        for (range, _) in cidr::special_ranges() {
            let text = peer(&a, &format!("AllowedIPs = {range}"));
            assert!(
                matches!(
                    parse(&text, None),
                    Err(StaticPeersError::ReservedRange { .. })
                ),
                "{range}"
            );
        }
    }

    #[test]
    fn a_missing_file_names_its_path() {
        let err = load(Path::new("/nonexistent/peers.conf"), None).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/peers.conf"), "{err}");
    }
}
