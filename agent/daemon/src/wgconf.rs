//! The `wg setconf` file format (`[Interface]` / `[Peer]` sections, `Key =
//! Value` lines, base64 keys) turned into the UAPI set lines `wg setconf`
//! sends ([`setconf_to_uapi`]). Used by `tunnel-agent wg --config` and by
//! the static peers file.

use std::net::{IpAddr, SocketAddr};

use crate::uapi;

/// Errors of a `wg setconf` file.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfError {
    #[error("line {0}: {1}")]
    Line(usize, String),
}

fn key_hex(line: usize, what: &str, b64: &str) -> Result<String, ConfError> {
    use base64::Engine as _;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .map_err(|_| ConfError::Line(line, format!("{what} is not base64")))?;
    let key: [u8; 32] = bytes
        .try_into()
        .map_err(|_| ConfError::Line(line, format!("{what} is not 32 bytes")))?;
    Ok(uapi::to_hex(&key))
}

/// Turns a `wg setconf` file into the UAPI set lines `wg setconf` sends:
/// `replace_peers`, and per peer `replace_allowed_ips`. Endpoints that are
/// host names are resolved here.
pub fn setconf_to_uapi(text: &str) -> Result<Vec<String>, ConfError> {
    #[derive(PartialEq)]
    enum Section {
        None,
        Interface,
        Peer,
    }
    let mut out = vec!["replace_peers=true".to_owned()];
    let mut peers: Vec<Vec<String>> = Vec::new();
    let mut section = Section::None;
    for (i, raw) in text.lines().enumerate() {
        let n = i + 1;
        let line = raw.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        if line.eq_ignore_ascii_case("[interface]") {
            section = Section::Interface;
            continue;
        }
        if line.eq_ignore_ascii_case("[peer]") {
            section = Section::Peer;
            peers.push(Vec::new());
            continue;
        }
        let Some((k, v)) = line.split_once('=') else {
            return Err(ConfError::Line(n, format!("{line:?} is not Key = Value")));
        };
        let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
        let bad = |why: &str| ConfError::Line(n, why.to_owned());
        match (&section, k.as_str()) {
            (Section::Interface, "privatekey") => {
                out.push(format!("private_key={}", key_hex(n, "PrivateKey", v)?));
            }
            (Section::Interface, "listenport") => {
                let p: u16 = v.parse().map_err(|_| bad("ListenPort is not a port"))?;
                out.push(format!("listen_port={p}"));
            }
            (Section::Interface, "fwmark") => {
                let m = if v == "off" {
                    0
                } else if let Some(h) = v.strip_prefix("0x") {
                    u32::from_str_radix(h, 16).map_err(|_| bad("FwMark is not a number"))?
                } else {
                    v.parse().map_err(|_| bad("FwMark is not a number"))?
                };
                out.push(format!("fwmark={m}"));
            }
            (Section::Peer, key) => {
                let peer = peers.last_mut().ok_or_else(|| bad("no [Peer]"))?;
                match key {
                    "publickey" => {
                        peer.insert(0, format!("public_key={}", key_hex(n, "PublicKey", v)?))
                    }
                    "presharedkey" => {
                        peer.push(format!("preshared_key={}", key_hex(n, "PresharedKey", v)?));
                    }
                    "endpoint" => {
                        let addr = resolve(v).ok_or_else(|| bad("Endpoint cannot be resolved"))?;
                        peer.push(format!("endpoint={addr}"));
                    }
                    "persistentkeepalive" => {
                        let s: u16 = if v == "off" {
                            0
                        } else {
                            v.parse()
                                .map_err(|_| bad("PersistentKeepalive is not a number"))?
                        };
                        peer.push(format!("persistent_keepalive_interval={s}"));
                    }
                    "allowedips" => {
                        peer.push("replace_allowed_ips=true".into());
                        for ip in v.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                            let net: ipnet::IpNet = match ip.parse() {
                                Ok(n) => n,
                                Err(_) => ip
                                    .parse::<IpAddr>()
                                    .map(ipnet::IpNet::from)
                                    .map_err(|_| bad("AllowedIPs has a bad prefix"))?,
                            };
                            peer.push(format!("allowed_ip={net}"));
                        }
                    }
                    other => return Err(bad(&format!("unknown peer key {other:?}"))),
                }
            }
            (_, other) => {
                return Err(ConfError::Line(n, format!("unknown key {other:?} here")));
            }
        }
    }
    for (i, p) in peers.into_iter().enumerate() {
        if !p.first().is_some_and(|l| l.starts_with("public_key=")) {
            return Err(ConfError::Line(
                0,
                format!("[Peer] #{} has no PublicKey", i + 1),
            ));
        }
        // Every peer's AllowedIPs are replaced, as `wg setconf` does.
        if !p.iter().any(|l| l == "replace_allowed_ips=true") {
            out.push(p[0].clone());
            out.push("replace_allowed_ips=true".into());
            out.extend(p.into_iter().skip(1));
        } else {
            out.extend(p);
        }
    }
    Ok(out)
}

fn resolve(endpoint: &str) -> Option<SocketAddr> {
    use std::net::ToSocketAddrs;
    if let Ok(a) = endpoint.parse() {
        return Some(a);
    }
    endpoint.to_socket_addrs().ok()?.next()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn setconf_file_becomes_what_wg_setconf_sends() {
        let k = |b: u8| {
            use base64::Engine as _;
            base64::engine::general_purpose::STANDARD.encode([b; 32])
        };
        let text = format!(
            "[Interface]\nPrivateKey = {}\nListenPort = 51820 # comment\nFwMark = 0x10\n\n\
             [Peer]\nPublicKey = {}\nEndpoint = 192.0.2.1:51820\nAllowedIPs = 10.0.0.0/24, fd00::1\n\
             PersistentKeepalive = 25\n[Peer]\nPublicKey={}\n",
            k(1),
            k(2),
            k(3)
        );
        let lines = setconf_to_uapi(&text).expect("valid file");
        let hex = |b: u8| uapi::to_hex(&[b; 32]);
        assert_eq!(
            lines,
            vec![
                "replace_peers=true".to_owned(),
                format!("private_key={}", hex(1)),
                "listen_port=51820".into(),
                "fwmark=16".into(),
                format!("public_key={}", hex(2)),
                "endpoint=192.0.2.1:51820".into(),
                "replace_allowed_ips=true".into(),
                "allowed_ip=10.0.0.0/24".into(),
                "allowed_ip=fd00::1/128".into(),
                "persistent_keepalive_interval=25".into(),
                format!("public_key={}", hex(3)),
                "replace_allowed_ips=true".into(),
            ]
        );
        // And the UAPI parser takes it.
        uapi::parse_set(&lines).expect("parses");
    }

    #[test]
    fn setconf_refuses_what_wg_setconf_refuses() {
        for bad in [
            "[Interface]\nAddress = 10.0.0.1/24\n",
            "[Interface]\nPrivateKey = abc\n",
            "[Peer]\nAllowedIPs = 10.0.0.0/24\n",
            "[Peer]\nPublicKey = AAAA\n",
            "ListenPort = 1\n",
            "[Interface]\nListenPort = 70000\n",
            "[Interface]\njunk\n",
        ] {
            assert!(setconf_to_uapi(bad).is_err(), "{bad}");
        }
    }
}
