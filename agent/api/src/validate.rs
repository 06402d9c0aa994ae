//! Field-level validation of the API types: what can be decided from one
//! field alone. Mesh-level checks (CIDR containment, overlaps, duplicate keys
//! across peers) need the whole picture and live in `sdn-tunnel-core`.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use thiserror::Error;

/// Why a field of a `TunnelCluster` or `TunnelPeer` is not acceptable.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ValidationError {
    /// Not a base64 WireGuard public key.
    #[error("bad public key {key:?}: {why}")]
    BadKey {
        /// The offending value.
        key: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// Not a usable `host:port`.
    #[error("bad endpoint {endpoint:?}: {why}")]
    BadEndpoint {
        /// The offending value.
        endpoint: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// Port outside 1..=65535.
    #[error("port {0} is outside 1..=65535")]
    BadPort(i64),
    /// MTU outside the accepted range.
    #[error("MTU {0} is outside {min}..={max}", min = crate::peer::MIN_MTU, max = crate::peer::MAX_MTU)]
    BadMtu(i32),
    /// A name that must be a DNS label is not.
    #[error("bad name {name:?}: must be a DNS-1123 label (lowercase letters, digits, '-', at most 63 characters)")]
    BadName {
        /// The offending value.
        name: String,
    },
    /// The DNS zone is not a DNS name.
    #[error(
        "bad DNS zone {0:?}: must be a DNS name (letters, digits, '-' in dot-separated labels)"
    )]
    BadDnsZone(String),
    /// A required field is empty.
    #[error("{0} must not be empty")]
    EmptyField(&'static str),
    /// A remote cluster without a kubeconfig reference cannot be watched.
    #[error("remote cluster {0:?} has no kubeconfigSecretRef")]
    MissingKubeconfigRef(String),
}

/// Length of a base64-encoded 32-byte key with its padding.
const KEY_B64_LEN: usize = 44;

fn is_b64(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'+' || c == b'/'
}

/// Checks that `key` is a canonical base64 encoding of 32 bytes, as
/// `wg genkey | wg pubkey` prints it (same rule as the CRD pattern
/// `^[A-Za-z0-9+/]{42}[AEIMQUYcgkosw480]=$`), and not the all-zero key,
/// which is a low-order point every WireGuard implementation refuses.
pub fn validate_public_key(key: &str) -> Result<(), ValidationError> {
    let bad = |why| {
        Err(ValidationError::BadKey {
            key: key.to_string(),
            why,
        })
    };
    let b = key.as_bytes();
    if b.len() != KEY_B64_LEN {
        return bad("must be 44 characters of base64 (32 bytes)");
    }
    if !b[..42].iter().all(|&c| is_b64(c)) {
        return bad("contains characters outside the base64 alphabet");
    }
    // The 43rd character holds the last 4 bits of the key and 2 zero bits of
    // padding: only these 16 symbols are canonical.
    if !b"AEIMQUYcgkosw480".contains(&b[42]) {
        return bad("is not canonical base64 of 32 bytes");
    }
    if b[43] != b'=' {
        return bad("must end with one '=' of padding");
    }
    if b[..43].iter().all(|&c| c == b'A') {
        return bad("is the all-zero key");
    }
    Ok(())
}

/// A UDP port must be 1..=65535; the API carries it as an `i32` as Kubernetes
/// conventions want, so it is checked before any conversion.
pub fn validate_port(port: i32) -> Result<u16, ValidationError> {
    match u16::try_from(port) {
        Ok(p) if p != 0 => Ok(p),
        _ => Err(ValidationError::BadPort(i64::from(port))),
    }
}

/// The tunnel MTU must be within [`crate::peer::MIN_MTU`]..=[`crate::peer::MAX_MTU`].
pub fn validate_mtu(mtu: i32) -> Result<u16, ValidationError> {
    if (crate::peer::MIN_MTU..=crate::peer::MAX_MTU).contains(&mtu) {
        u16::try_from(mtu).map_err(|_| ValidationError::BadMtu(mtu))
    } else {
        Err(ValidationError::BadMtu(mtu))
    }
}

/// Cluster names become DNS labels (`cluster.<name>`).
pub fn validate_dns_label(name: &str) -> Result<(), ValidationError> {
    let b = name.as_bytes();
    let ok = !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|&c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-';
    if ok {
        Ok(())
    } else {
        Err(ValidationError::BadName {
            name: name.to_string(),
        })
    }
}

/// A DNS zone must be a DNS name: the DNS server answers for it.
pub fn validate_dns_zone(zone: &str) -> Result<(), ValidationError> {
    if is_dns_name(zone) {
        Ok(())
    } else {
        Err(ValidationError::BadDnsZone(zone.to_string()))
    }
}

/// Host part of an endpoint.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum EndpointHost {
    /// A literal address.
    Ip(IpAddr),
    /// A DNS name the data path resolves (a load balancer, for instance).
    Name(String),
}

/// A parsed `host:port` WireGuard endpoint.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Endpoint {
    /// Where to send.
    pub host: EndpointHost,
    /// UDP port, never 0.
    pub port: u16,
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.host {
            EndpointHost::Ip(IpAddr::V6(a)) => write!(f, "[{a}]:{}", self.port),
            EndpointHost::Ip(IpAddr::V4(a)) => write!(f, "{a}:{}", self.port),
            EndpointHost::Name(n) => write!(f, "{n}:{}", self.port),
        }
    }
}

impl Endpoint {
    /// Parses `host:port`: an IPv4 address, a bracketed IPv6 address
    /// (`[2001:db8::1]:51820`) or a DNS name, then a port in 1..=65535.
    ///
    /// Addresses that can never reach another node are refused — unspecified,
    /// loopback, link-local, multicast, broadcast — because a remote peer
    /// publishing one would make us send its traffic to ourselves or nowhere.
    pub fn parse(s: &str) -> Result<Self, ValidationError> {
        let bad = |why| ValidationError::BadEndpoint {
            endpoint: s.to_string(),
            why,
        };
        let (host, port) = if let Some(rest) = s.strip_prefix('[') {
            let (h, p) = rest
                .split_once("]:")
                .ok_or_else(|| bad("bracketed IPv6 address must be followed by ]:port"))?;
            let ip: Ipv6Addr = h.parse().map_err(|_| bad("not an IPv6 address"))?;
            (EndpointHost::Ip(IpAddr::V6(ip)), p)
        } else {
            let (h, p) = s.rsplit_once(':').ok_or_else(|| bad("missing :port"))?;
            if h.contains(':') {
                return Err(bad("IPv6 addresses must be written [addr]:port"));
            }
            if let Ok(ip) = h.parse::<Ipv4Addr>() {
                (EndpointHost::Ip(IpAddr::V4(ip)), p)
            } else if h.bytes().all(|c| c.is_ascii_digit() || c == b'.') {
                return Err(bad("not an IPv4 address"));
            } else if is_dns_name(h) {
                (EndpointHost::Name(h.to_ascii_lowercase()), p)
            } else {
                return Err(bad("host is neither an IP address nor a DNS name"));
            }
        };
        if port.is_empty() || !port.bytes().all(|c| c.is_ascii_digit()) {
            return Err(bad("port is not a number"));
        }
        let port = port
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| bad("port is outside 1..=65535"))?;
        if let EndpointHost::Ip(ip) = &host {
            if let Some(why) = unusable_endpoint_ip(ip) {
                return Err(bad(why));
            }
        }
        Ok(Endpoint { host, port })
    }
}

fn unusable_endpoint_ip(ip: &IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(a) if a.is_unspecified() => Some("unspecified address"),
        IpAddr::V4(a) if a.is_loopback() => Some("loopback address"),
        IpAddr::V4(a) if a.is_link_local() => Some("link-local address"),
        IpAddr::V4(a) if a.is_multicast() => Some("multicast address"),
        IpAddr::V4(a) if a.is_broadcast() => Some("broadcast address"),
        IpAddr::V6(a) if a.is_unspecified() => Some("unspecified address"),
        IpAddr::V6(a) if a.is_loopback() => Some("loopback address"),
        IpAddr::V6(a) if a.is_unicast_link_local() => Some("link-local address"),
        IpAddr::V6(a) if a.is_multicast() => Some("multicast address"),
        _ => None,
    }
}

/// RFC 1123 host name: dot-separated labels of letters, digits and '-', not
/// starting or ending with '-', each at most 63 characters, 253 in all.
fn is_dns_name(h: &str) -> bool {
    let h = h.strip_suffix('.').unwrap_or(h);
    !h.is_empty()
        && h.len() <= 253
        && h.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw=";

    #[test]
    fn good_key_accepted() {
        assert_eq!(validate_public_key(KEY), Ok(()));
        assert_eq!(
            validate_public_key("xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg="),
            Ok(())
        );
    }

    #[test]
    fn bad_keys_refused() {
        for k in [
            "",
            "short=",
            &KEY[..43],                                     // no padding
            "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykx=", // non-canonical last symbol
            "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8y-w=", // url-safe alphabet
            "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw==",
            "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykwA",
            "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
        ] {
            assert!(
                matches!(validate_public_key(k), Err(ValidationError::BadKey { .. })),
                "{k:?} accepted"
            );
        }
    }

    /// The hand-written check and the CRD pattern must agree; the pattern is
    /// checked here by a tiny interpreter of its three parts.
    #[test]
    fn key_check_matches_schema_pattern() {
        assert_eq!(
            crate::schema::PUBLIC_KEY_PATTERN,
            "^[A-Za-z0-9+/]{42}[AEIMQUYcgkosw480]=$"
        );
        let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        for &c in alphabet {
            let mut k = KEY.as_bytes().to_vec();
            k[42] = c;
            let k = String::from_utf8(k).unwrap();
            assert_eq!(
                validate_public_key(&k).is_ok(),
                b"AEIMQUYcgkosw480".contains(&c),
                "{k}"
            );
        }
    }

    #[test]
    fn ports_and_mtu() {
        assert_eq!(validate_port(51820), Ok(51820));
        assert_eq!(validate_port(65535), Ok(65535));
        assert_eq!(validate_port(0), Err(ValidationError::BadPort(0)));
        assert_eq!(validate_port(65536), Err(ValidationError::BadPort(65536)));
        assert_eq!(validate_port(-1), Err(ValidationError::BadPort(-1)));
        assert_eq!(validate_mtu(1420), Ok(1420));
        assert_eq!(validate_mtu(575), Err(ValidationError::BadMtu(575)));
        assert_eq!(validate_mtu(9001), Err(ValidationError::BadMtu(9001)));
    }

    #[test]
    fn dns_zones() {
        assert!(validate_dns_zone("cluster.west").is_ok());
        assert!(validate_dns_zone("west.example.com.").is_ok());
        for bad in ["", ".", "a..b", "bad_zone", "-a.b", "a b"] {
            assert_eq!(
                validate_dns_zone(bad),
                Err(ValidationError::BadDnsZone(bad.into())),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn dns_labels() {
        assert!(validate_dns_label("east").is_ok());
        assert!(validate_dns_label("a-1").is_ok());
        for bad in ["", "-a", "a-", "East", "a.b", &"a".repeat(64)] {
            assert!(validate_dns_label(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn endpoints_parse_and_print() {
        for (s, want) in [
            ("192.0.2.1:51820", "192.0.2.1:51820"),
            ("[2001:db8::1]:1", "[2001:db8::1]:1"),
            ("LB.Example.com:65535", "lb.example.com:65535"),
            ("node-1:51820", "node-1:51820"),
        ] {
            assert_eq!(Endpoint::parse(s).unwrap().to_string(), want);
        }
        let e = Endpoint::parse("[2001:db8::1]:443").unwrap();
        assert_eq!(e.port, 443);
        assert_eq!(e.host, EndpointHost::Ip("2001:db8::1".parse().unwrap()));
    }

    #[test]
    fn bad_endpoints_refused() {
        for s in [
            "",
            "192.0.2.1",
            "192.0.2.1:",
            "192.0.2.1:0",
            "192.0.2.1:65536",
            "192.0.2.1:+80",
            "192.0.2.1:x",
            "2001:db8::1:51820",
            "[2001:db8::1]",
            "[not-v6]:1",
            "999.1.1.1:1",
            "-bad-.example:1",
            "a..b:1",
            "0.0.0.0:51820",
            "127.0.0.1:51820",
            "169.254.1.1:51820",
            "224.0.0.1:51820",
            "255.255.255.255:51820",
            "[::]:51820",
            "[::1]:51820",
            "[fe80::1]:51820",
            "[ff02::1]:51820",
            "under_score:1",
        ] {
            assert!(
                matches!(Endpoint::parse(s), Err(ValidationError::BadEndpoint { .. })),
                "{s:?} accepted"
            );
        }
    }

    #[test]
    fn errors_read_well() {
        let e = Endpoint::parse("127.0.0.1:1").unwrap_err();
        assert_eq!(
            e.to_string(),
            "bad endpoint \"127.0.0.1:1\": loopback address"
        );
        assert_eq!(
            ValidationError::BadMtu(1).to_string(),
            "MTU 1 is outside 576..=9000"
        );
    }
}
