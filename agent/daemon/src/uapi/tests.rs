//! The protocol and `set` semantics against a pure model of a device.

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ipnet::IpNet;
use proptest::prelude::*;
use sdn_tunnel_datapath::device::{PeerConfig, PeerStats};
use sdn_tunnel_datapath::keys::{PrivateKey, PublicKey};

use super::proto::{private_from_bytes, private_to_bytes};
use super::*;

fn key(b: u8) -> PublicKey {
    PublicKey::from_bytes([b; 32])
}

fn lines(text: &str) -> Vec<String> {
    text.lines().map(str::to_owned).collect()
}

fn net(s: &str) -> IpNet {
    s.parse().expect("test prefix")
}

/// A handler over a pure [`Config`], as a device would be.
#[derive(Default)]
struct Model {
    config: Config,
}

impl Handler for Model {
    fn get(&mut self) -> Result<String, UapiError> {
        let state = DeviceState {
            private_key: self.config.private_key.clone(),
            listen_port: self.config.listen_port,
            fwmark: self.config.fwmark,
            peers: self
                .config
                .peers
                .values()
                .map(|p| PeerState {
                    preshared_key: p.preshared_key,
                    stats: PeerStats {
                        public_key: p.public_key,
                        endpoint: p.endpoint,
                        allowed_ips: p.allowed_ips.clone(),
                        persistent_keepalive: p.persistent_keepalive,
                        rx_packets: 0,
                        rx_bytes: 0,
                        tx_packets: 0,
                        tx_bytes: 0,
                        last_handshake_age: None,
                        handshake_rtt: None,
                        last_receive_age: None,
                    },
                })
                .collect(),
        };
        Ok(format_get(&state, SystemTime::now()))
    }
    fn set(&mut self, lines: &[String]) -> Result<(), UapiError> {
        let req = parse_set(lines)?;
        self.config = self.config.apply(&req);
        Ok(())
    }
}

fn talk(input: &[u8], h: &mut impl Handler) -> String {
    let mut io = Duplex {
        input: io::Cursor::new(input.to_vec()),
        output: Vec::new(),
    };
    serve_connection(&mut io, h).expect("in-memory I/O");
    String::from_utf8(io.output).expect("replies are UTF-8")
}

struct Duplex {
    input: io::Cursor<Vec<u8>>,
    output: Vec<u8>,
}
impl io::Read for Duplex {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.input.read(buf)
    }
}
impl Write for Duplex {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.output.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// What `wg` reads back from a get: key=value pairs, per device/peer.
type Pairs = Vec<(String, String)>;

fn parse_get(text: &str) -> (Pairs, Vec<Pairs>) {
    let mut dev = Vec::new();
    let mut peers: Vec<Vec<(String, String)>> = Vec::new();
    for l in text.lines() {
        let (k, v) = l.split_once('=').expect("get lines are key=value");
        if k == "public_key" {
            peers.push(Vec::new());
        }
        match peers.last_mut() {
            Some(p) => p.push((k.into(), v.into())),
            None => dev.push((k.into(), v.into())),
        }
    }
    (dev, peers)
}

#[test]
fn hex_keys_round_trip_and_refuse_garbage() {
    let k = [0xabu8; 32];
    assert_eq!(to_hex(&k), "ab".repeat(32));
    assert_eq!(from_hex(&"AB".repeat(32)), Ok(k));
    assert!(from_hex("ab").is_err());
    assert!(from_hex(&"zz".repeat(32)).is_err());
    assert!(from_hex(&"é".repeat(32)).is_err());
}

#[test]
fn wg_set_lines_parse() {
    let priv_hex = to_hex(&[0x11; 32]);
    let req = parse_set(&lines(&format!(
        "private_key={priv_hex}\nlisten_port=51820\nfwmark=7\nreplace_peers=true\n\
         public_key={pk}\npreshared_key={psk}\nendpoint=[fd00::1]:4242\n\
         persistent_keepalive_interval=25\nreplace_allowed_ips=true\n\
         allowed_ip=10.1.2.3/24\nallowed_ip=-fd00::/64\nprotocol_version=1\n\
         public_key={pk2}\nremove=true\n",
        pk = to_hex(&[2; 32]),
        psk = to_hex(&[3; 32]),
        pk2 = to_hex(&[4; 32]),
    )))
    .expect("valid set");
    assert!(req.private_key.is_some());
    assert_eq!(req.listen_port, Some(51820));
    assert_eq!(req.fwmark, Some(7));
    assert!(req.replace_peers);
    assert_eq!(
        req.peers,
        vec![
            PeerBlock {
                public_key: key(2),
                ops: vec![
                    PeerOp::PresharedKey(Some([3; 32])),
                    PeerOp::Endpoint(SocketAddr::new(
                        IpAddr::V6("fd00::1".parse().expect("v6")),
                        4242
                    )),
                    PeerOp::PersistentKeepalive(25),
                    PeerOp::ReplaceAllowedIps,
                    // Host bits are cleared, as the kernel does.
                    PeerOp::AllowedIp {
                        net: net("10.1.2.0/24"),
                        remove: false
                    },
                    PeerOp::AllowedIp {
                        net: net("fd00::/64"),
                        remove: true
                    },
                    PeerOp::ProtocolVersion,
                ]
            },
            PeerBlock {
                public_key: key(4),
                ops: vec![PeerOp::Remove]
            },
        ]
    );
}

#[test]
fn bad_set_lines_are_refused_with_the_right_errno() {
    let pk = format!("public_key={}", to_hex(&[2; 32]));
    for (text, errno) in [
        ("garbage", errno::EPROTO),
        ("listen_port=65536", errno::EINVAL),
        ("listen_port=-1", errno::EINVAL),
        ("listen_port=+5", errno::EINVAL),
        ("fwmark=4294967296", errno::EINVAL),
        ("replace_peers=false", errno::EINVAL),
        ("bogus=1", errno::EINVAL),
        ("endpoint=1.2.3.4:5", errno::EINVAL), // peer key before any peer
        ("private_key=12", errno::EINVAL),
        ("public_key=xyz", errno::EINVAL),
    ] {
        let e = parse_set(&lines(text)).expect_err(text);
        assert_eq!(e.errno(), errno, "{text}: {e}");
    }
    for line in [
        "endpoint=nohost",
        "endpoint=1.2.3.4",
        "persistent_keepalive_interval=65536",
        "allowed_ip=10.0.0.0/33",
        "allowed_ip=banana",
        "remove=yes",
        "update_only=1",
        "protocol_version=2",
        "listen_port=5",
    ] {
        let e = parse_set(&[pk.clone(), line.to_owned()]).expect_err(line);
        assert_eq!(e.errno(), errno::EINVAL, "{line}: {e}");
    }
}

#[test]
fn set_semantics_follow_wireguard_go() {
    let mut c = Config::default();
    let pk = |b| to_hex(&[b; 32]);
    let set = |c: &Config, text: String| c.apply(&parse_set(&lines(&text)).expect("valid"));
    // New peers have no keepalive unless told.
    c = set(
        &c,
        format!(
            "public_key={}\nallowed_ip=10.0.0.0/24\nendpoint=192.0.2.1:1",
            pk(1)
        ),
    );
    let p1 = &c.peers[&key(1)];
    assert_eq!(p1.persistent_keepalive, None);
    assert_eq!(p1.allowed_ips, vec![net("10.0.0.0/24")]);
    // A prefix moves from peer 1 to peer 2.
    c = set(
        &c,
        format!(
            "public_key={}\nallowed_ip=10.0.0.0/24\nallowed_ip=10.9.0.0/16",
            pk(2)
        ),
    );
    assert!(c.peers[&key(1)].allowed_ips.is_empty());
    assert_eq!(c.peers[&key(2)].allowed_ips.len(), 2);
    // Removing a prefix; replace_allowed_ips drops the earlier ones.
    c = set(&c, format!("public_key={}\nallowed_ip=-10.9.0.0/16", pk(2)));
    assert_eq!(c.peers[&key(2)].allowed_ips, vec![net("10.0.0.0/24")]);
    c = set(
        &c,
        format!(
            "public_key={}\nallowed_ip=10.5.0.0/16\nreplace_allowed_ips=true\nallowed_ip=10.6.0.0/16",
            pk(2)
        ),
    );
    assert_eq!(c.peers[&key(2)].allowed_ips, vec![net("10.6.0.0/16")]);
    // update_only does not create, but updates.
    c = set(
        &c,
        format!(
            "public_key={}\nupdate_only=true\nendpoint=192.0.2.9:9",
            pk(3)
        ),
    );
    assert!(!c.peers.contains_key(&key(3)));
    c = set(
        &c,
        format!(
            "public_key={}\nupdate_only=true\npersistent_keepalive_interval=25",
            pk(1)
        ),
    );
    assert_eq!(c.peers[&key(1)].persistent_keepalive, Some(25));
    c = set(
        &c,
        format!("public_key={}\npersistent_keepalive_interval=0", pk(1)),
    );
    assert_eq!(c.peers[&key(1)].persistent_keepalive, None);
    // remove, and the rest of its block does nothing.
    c = set(
        &c,
        format!("public_key={}\nremove=true\nallowed_ip=10.7.0.0/16", pk(1)),
    );
    assert!(!c.peers.contains_key(&key(1)));
    assert!(c
        .peers
        .values()
        .all(|p| !p.allowed_ips.contains(&net("10.7.0.0/16"))));
    // Our own key is never a peer.
    let own = PrivateKey::generate();
    c = set(
        &c,
        format!("private_key={}", to_hex(&private_to_bytes(&own))),
    );
    c = set(
        &c,
        format!("public_key={}", to_hex(own.public_key().as_bytes())),
    );
    assert!(!c.peers.contains_key(&own.public_key()));
    // replace_peers keeps only what follows.
    c = set(&c, format!("replace_peers=true\npublic_key={}", pk(5)));
    assert_eq!(c.peers.keys().copied().collect::<Vec<_>>(), vec![key(5)]);
}

#[test]
fn get_prints_what_wg_reads() {
    let sk = PrivateKey::generate();
    let now = UNIX_EPOCH + Duration::from_secs(1_000_000) + Duration::from_nanos(500);
    let state = DeviceState {
        private_key: Some(sk.clone()),
        listen_port: 51820,
        fwmark: 0,
        peers: vec![PeerState {
            preshared_key: None,
            stats: PeerStats {
                public_key: key(9),
                endpoint: Some(SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), 7)),
                allowed_ips: vec![net("10.0.0.0/8"), net("fd00::/8")],
                persistent_keepalive: Some(25),
                rx_packets: 3,
                rx_bytes: 300,
                tx_packets: 4,
                tx_bytes: 400,
                last_handshake_age: Some(Duration::from_secs(10)),
                handshake_rtt: None,
                last_receive_age: None,
            },
        }],
    };
    let text = format_get(&state, now);
    let expected = format!(
        "private_key={}\nlisten_port=51820\npublic_key={}\npreshared_key={}\n\
         protocol_version=1\nendpoint=[::1]:7\nlast_handshake_time_sec=999990\n\
         last_handshake_time_nsec=500\ntx_bytes=400\nrx_bytes=300\n\
         persistent_keepalive_interval=25\nallowed_ip=10.0.0.0/8\nallowed_ip=fd00::/8\n",
        to_hex(&private_to_bytes(&sk)),
        to_hex(&[9; 32]),
        "0".repeat(64),
    );
    assert_eq!(text, expected);
    // The private key printed is the one we hold.
    let back =
        private_from_bytes(&from_hex(&to_hex(&private_to_bytes(&sk))).expect("hex")).expect("key");
    assert_eq!(back.public_key(), sk.public_key());
}

#[test]
fn framing_answers_each_operation_and_closes_on_garbage() {
    let mut m = Model::default();
    let pk = to_hex(&[1; 32]);
    let out = talk(
        format!("set=1\npublic_key={pk}\nallowed_ip=10.0.0.0/24\n\nget=1\n\n").as_bytes(),
        &mut m,
    );
    assert_eq!(
        out,
        format!(
            "errno=0\n\npublic_key={pk}\npreshared_key={}\nprotocol_version=1\n\
             last_handshake_time_sec=0\nlast_handshake_time_nsec=0\ntx_bytes=0\nrx_bytes=0\n\
             persistent_keepalive_interval=0\nallowed_ip=10.0.0.0/24\nerrno=0\n\n",
            "0".repeat(64)
        )
    );
    // A bad set changes nothing (validated whole), the next op still runs.
    let out = talk(
        b"set=1\nreplace_peers=true\nlisten_port=x\n\nget=1\n\n",
        &mut m,
    );
    assert!(out.starts_with("errno=-22\n\npublic_key="), "{out}");
    assert_eq!(m.config.peers.len(), 1);
    // Unknown operation: errno, then the connection closes.
    assert_eq!(talk(b"hello\nget=1\n\n", &mut m), "errno=-71\n\n");
    assert_eq!(talk(b"get=1\nx\n", &mut m), "errno=-22\n\n");
    // An overlong line is refused, not buffered.
    let long = format!("set=1\n{}\n\n", "a".repeat(MAX_LINE * 4));
    assert_eq!(talk(long.as_bytes(), &mut m), "errno=-71\n\n");
    assert_eq!(talk(b"", &mut m), "");
}

fn arb_net() -> impl Strategy<Value = IpNet> {
    prop_oneof![
        (any::<[u8; 4]>(), 0u8..=32).prop_map(|(a, l)| IpNet::new(
            IpAddr::V4(Ipv4Addr::from(a)),
            l
        )
        .expect("valid length")
        .trunc()),
        (any::<[u8; 16]>(), 0u8..=128).prop_map(|(a, l)| IpNet::new(
            IpAddr::V6(Ipv6Addr::from(a)),
            l
        )
        .expect("valid length")
        .trunc()),
    ]
}

fn arb_peer() -> impl Strategy<Value = PeerConfig> {
    (
        1u8..8,
        proptest::option::of(any::<[u8; 32]>().prop_filter("zero is none", |k| *k != [0; 32])),
        proptest::option::of((any::<[u8; 4]>(), 1u16..)),
        proptest::collection::vec(arb_net(), 0..4),
        proptest::option::of(1u16..),
    )
        .prop_map(|(k, psk, ep, nets, ka)| {
            let mut p = new_peer(key(k));
            p.preshared_key = psk;
            p.endpoint = ep.map(|(a, port)| SocketAddr::from((a, port)));
            p.allowed_ips = nets;
            p.persistent_keepalive = ka;
            p
        })
}

fn arb_config() -> impl Strategy<Value = Config> {
    (
        any::<u16>(),
        any::<u32>(),
        proptest::collection::vec(arb_peer(), 0..5),
    )
        .prop_map(|(port, mark, peers)| {
            let mut c = Config {
                private_key: None,
                listen_port: port,
                fwmark: mark,
                peers: BTreeMap::new(),
            };
            for mut p in peers {
                // A prefix belongs to one peer, and once to it.
                p.allowed_ips.dedup();
                let mut seen = Vec::new();
                p.allowed_ips.retain(|n| {
                    let fresh =
                        !seen.contains(n) && c.peers.values().all(|q| !q.allowed_ips.contains(n));
                    seen.push(*n);
                    fresh
                });
                c.peers.insert(p.public_key, p);
            }
            c
        })
}

proptest! {
    /// `wg setconf` of what `wg showconf` printed reproduces the device
    /// from any previous state, and changes nothing when applied again.
    #[test]
    fn set_of_a_config_reproduces_it(before in arb_config(), wanted in arb_config()) {
        let req = parse_set(&wanted.to_set_lines()).expect("our own set parses");
        let after = before.apply(&req);
        prop_assert_eq!(&after, &wanted);
        let p = plan(&after, &after.apply(&req));
        prop_assert!(p.removed.is_empty() && p.upserts.is_empty() && p.keepalive_on.is_empty());
    }

    /// The plan from one configuration to another, replayed on the
    /// first, gives the second.
    #[test]
    fn plan_replays(old in arb_config(), new in arb_config()) {
        let p = plan(&old, &new);
        let mut c = old.clone();
        for k in &p.removed { c.peers.remove(k); }
        for u in &p.upserts { c.peers.insert(u.public_key, u.clone()); }
        if let Some(port) = p.listen_port { c.listen_port = port; }
        if let Some(m) = p.fwmark { c.fwmark = m; }
        prop_assert_eq!(c, new);
    }

    /// get prints every peer with its prefixes, in wg's grammar.
    #[test]
    fn get_lists_every_peer(c in arb_config()) {
        let mut m = Model { config: c.clone() };
        let text = m.get().expect("model get");
        let (dev, peers) = parse_get(&text);
        prop_assert_eq!(peers.len(), c.peers.len());
        if c.listen_port != 0 {
            prop_assert!(dev.contains(&("listen_port".into(), c.listen_port.to_string())));
        }
        for (p, lines) in c.peers.values().zip(&peers) {
            prop_assert_eq!(&lines[0].1, &to_hex(p.public_key.as_bytes()));
            let ips: Vec<IpNet> = lines.iter().filter(|(k, _)| k == "allowed_ip")
                .map(|(_, v)| v.parse().expect("prefix")).collect();
            prop_assert_eq!(&ips, &p.allowed_ips);
        }
    }

    /// Garbage never panics: every operation gets exactly one errno
    /// line, and an unparsable one closes the connection.
    #[test]
    fn garbage_gets_errno(input in proptest::collection::vec(any::<u8>(), 0..600)) {
        let mut m = Model::default();
        let out = talk(&input, &mut m);
        let answers = out.matches("errno=").count();
        prop_assert!(out.is_empty() || out.ends_with("\n\n"), "{out:?}");
        prop_assert!(answers >= usize::from(!input.is_empty()), "{out:?}");
        for l in out.lines().filter(|l| l.starts_with("errno=")) {
            let n: i32 = l["errno=".len()..].parse().expect("numeric errno");
            prop_assert!(n <= 0);
        }
    }

    /// Structured garbage: valid framing, random key=value lines.
    #[test]
    fn random_set_lines_never_panic(
        kv in proptest::collection::vec(
            (prop_oneof![
                Just("public_key"), Just("allowed_ip"), Just("endpoint"),
                Just("listen_port"), Just("private_key"), Just("remove"),
                Just("update_only"), Just("replace_peers"), Just("preshared_key"),
                Just("persistent_keepalive_interval"), Just("fwmark"), Just("x"),
            ], "[ -~]{0,70}"),
            0..12,
        )
    ) {
        let mut text = String::from("set=1\n");
        for (k, v) in &kv { text.push_str(&format!("{k}={v}\n")); }
        text.push('\n');
        let mut m = Model::default();
        let out = talk(text.as_bytes(), &mut m);
        prop_assert!(out.starts_with("errno=") && out.ends_with("\n\n"), "{out:?}");
    }
}
