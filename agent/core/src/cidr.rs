//! CIDR parsing and the prefix relations the mesh validation is built on.
//!
//! Two prefixes overlap exactly when one contains the other (prefixes are
//! aligned power-of-two blocks), so containment is the only primitive; the
//! property tests check both against a naive interval model.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use thiserror::Error;

/// A CIDR string that cannot be used.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum CidrError {
    /// Not `address/prefix`.
    #[error("{0:?} is not a CIDR (address/prefix-length)")]
    Parse(String),
    /// Bits set after the prefix: ambiguous about what was meant, so refused
    /// rather than silently truncated.
    #[error("{cidr:?} has host bits set; did you mean {canonical}?")]
    HostBits {
        /// The value as written.
        cidr: String,
        /// The network it truncates to.
        canonical: IpNet,
    },
}

/// Parses a CIDR, refusing host bits after the prefix.
pub fn parse_cidr(s: &str) -> Result<IpNet, CidrError> {
    let net: IpNet = s
        .trim()
        .parse()
        .map_err(|_| CidrError::Parse(s.to_string()))?;
    let canonical = net.trunc();
    if canonical != net {
        return Err(CidrError::HostBits {
            cidr: s.to_string(),
            canonical,
        });
    }
    Ok(net)
}

/// Address ranges a tunnel must never carry as a destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Forbidden {
    /// `0.0.0.0/0` or `::/0`: would pull all traffic into the tunnel.
    DefaultRoute,
    /// `127.0.0.0/8`, `::1/128`.
    Loopback,
    /// `169.254.0.0/16`, `fe80::/10`.
    LinkLocal,
    /// `224.0.0.0/4`, `ff00::/8`.
    Multicast,
    /// `0.0.0.0/8` ("this network"), `::/128`.
    Unspecified,
    /// `255.255.255.255/32`.
    Broadcast,
    /// `::ffff:0:0/96`: IPv4-mapped IPv6 addresses, an alias of the IPv4 space.
    Ipv4Mapped,
}

impl Forbidden {
    /// Words for messages.
    pub fn describe(self) -> &'static str {
        match self {
            Forbidden::DefaultRoute => "a default route",
            Forbidden::Loopback => "loopback addresses",
            Forbidden::LinkLocal => "link-local addresses",
            Forbidden::Multicast => "multicast addresses",
            Forbidden::Unspecified => "the unspecified / this-network range",
            Forbidden::Broadcast => "the broadcast address",
            Forbidden::Ipv4Mapped => "IPv4-mapped IPv6 addresses",
        }
    }
}

fn v4(a: [u8; 4], len: u8) -> IpNet {
    // Prefix lengths here are constants below 33; `new_assert` cannot fail.
    IpNet::V4(Ipv4Net::new_assert(Ipv4Addr::from(a), len))
}

fn v6(a: [u16; 8], len: u8) -> IpNet {
    IpNet::V6(Ipv6Net::new_assert(
        Ipv6Addr::new(a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7]),
        len,
    ))
}

/// The special ranges, each with the reason it is refused.
pub fn special_ranges() -> [(IpNet, Forbidden); 10] {
    [
        (v4([0, 0, 0, 0], 8), Forbidden::Unspecified),
        (v4([127, 0, 0, 0], 8), Forbidden::Loopback),
        (v4([169, 254, 0, 0], 16), Forbidden::LinkLocal),
        (v4([224, 0, 0, 0], 4), Forbidden::Multicast),
        (v4([255, 255, 255, 255], 32), Forbidden::Broadcast),
        (v6([0; 8], 128), Forbidden::Unspecified),
        (v6([0, 0, 0, 0, 0, 0, 0, 1], 128), Forbidden::Loopback),
        (v6([0xfe80, 0, 0, 0, 0, 0, 0, 0], 10), Forbidden::LinkLocal),
        (v6([0xff00, 0, 0, 0, 0, 0, 0, 0], 8), Forbidden::Multicast),
        (v6([0, 0, 0, 0, 0, 0xffff, 0, 0], 96), Forbidden::Ipv4Mapped),
    ]
}

/// Why `net` may not be routed into the tunnel, if it may not. A prefix is
/// refused when it *overlaps* a special range, not only when it lies inside
/// one: `0.0.0.0/1` is refused because it contains the loopback range.
pub fn forbidden(net: &IpNet) -> Option<Forbidden> {
    if net.prefix_len() == 0 {
        return Some(Forbidden::DefaultRoute);
    }
    special_ranges()
        .into_iter()
        .find(|(range, _)| overlaps(range, net))
        .map(|(_, why)| why)
}

/// True when every address of `inner` is in `outer`. Different address
/// families never contain each other.
pub fn contains(outer: &IpNet, inner: &IpNet) -> bool {
    match (outer, inner) {
        (IpNet::V4(o), IpNet::V4(i)) => {
            o.prefix_len() <= i.prefix_len()
                && o.network() == truncate_v4(i.network(), o.prefix_len())
        }
        (IpNet::V6(o), IpNet::V6(i)) => {
            o.prefix_len() <= i.prefix_len()
                && o.network() == truncate_v6(i.network(), o.prefix_len())
        }
        _ => false,
    }
}

fn truncate_v4(a: Ipv4Addr, len: u8) -> Ipv4Addr {
    let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
    Ipv4Addr::from(u32::from(a) & mask)
}

fn truncate_v6(a: Ipv6Addr, len: u8) -> Ipv6Addr {
    let mask = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
    Ipv6Addr::from(u128::from(a) & mask)
}

/// True when the two prefixes share at least one address.
pub fn overlaps(a: &IpNet, b: &IpNet) -> bool {
    contains(a, b) || contains(b, a)
}

/// Every pair `(x, y)`, `x` from `a` and `y` from `b`, that overlaps, in the
/// order of `a` then `b`: the one overlap rule of the mesh checks and of the
/// static peer file.
pub fn overlapping_pairs<'a>(
    a: &'a [IpNet],
    b: &'a [IpNet],
) -> impl Iterator<Item = (&'a IpNet, &'a IpNet)> + 'a {
    a.iter()
        .flat_map(move |x| b.iter().map(move |y| (x, y)))
        .filter(|(x, y)| overlaps(x, y))
}

/// True when `inner` lies inside one of `outers`.
pub fn inside_any(inner: &IpNet, outers: &[IpNet]) -> bool {
    outers.iter().any(|o| contains(o, inner))
}

/// Family of an address, for messages.
pub fn family(net: &IpNet) -> &'static str {
    match net.addr() {
        IpAddr::V4(_) => "IPv4",
        IpAddr::V6(_) => "IPv6",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn n(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn parse_refuses_garbage_and_host_bits() {
        assert_eq!(parse_cidr("10.0.0.0/8"), Ok(n("10.0.0.0/8")));
        assert_eq!(parse_cidr("fd00::/64"), Ok(n("fd00::/64")));
        assert!(matches!(parse_cidr("10.0.0.0"), Err(CidrError::Parse(_))));
        assert!(matches!(
            parse_cidr("10.0.0.0/33"),
            Err(CidrError::Parse(_))
        ));
        assert!(matches!(parse_cidr("garbage"), Err(CidrError::Parse(_))));
        assert_eq!(
            parse_cidr("10.0.0.1/8"),
            Err(CidrError::HostBits {
                cidr: "10.0.0.1/8".into(),
                canonical: n("10.0.0.0/8")
            })
        );
    }

    #[test]
    fn forbidden_ranges() {
        for (s, want) in [
            ("0.0.0.0/0", Some(Forbidden::DefaultRoute)),
            ("::/0", Some(Forbidden::DefaultRoute)),
            ("0.0.0.0/1", Some(Forbidden::Unspecified)),
            ("127.0.0.0/8", Some(Forbidden::Loopback)),
            ("127.1.0.0/16", Some(Forbidden::Loopback)),
            ("64.0.0.0/2", Some(Forbidden::Loopback)),
            ("169.254.1.0/24", Some(Forbidden::LinkLocal)),
            ("224.0.0.0/8", Some(Forbidden::Multicast)),
            ("128.0.0.0/1", Some(Forbidden::LinkLocal)),
            ("192.0.0.0/2", Some(Forbidden::Multicast)),
            ("255.255.255.255/32", Some(Forbidden::Broadcast)),
            ("::1/128", Some(Forbidden::Loopback)),
            ("::/128", Some(Forbidden::Unspecified)),
            ("fe80::/64", Some(Forbidden::LinkLocal)),
            ("ff02::/16", Some(Forbidden::Multicast)),
            ("::ffff:10.0.0.0/104", Some(Forbidden::Ipv4Mapped)),
            ("10.0.0.0/8", None),
            ("100.64.0.0/10", None),
            ("fd00:10::/48", None),
            ("2001:db8::/32", None),
        ] {
            assert_eq!(forbidden(&n(s)), want, "{s}");
        }
    }

    #[test]
    fn containment_examples() {
        assert!(contains(&n("10.0.0.0/8"), &n("10.1.2.0/24")));
        assert!(contains(&n("10.0.0.0/8"), &n("10.0.0.0/8")));
        assert!(!contains(&n("10.1.2.0/24"), &n("10.0.0.0/8")));
        assert!(!contains(&n("10.0.0.0/8"), &n("11.0.0.0/24")));
        assert!(!contains(&n("::/0"), &n("10.0.0.0/8")));
        assert!(overlaps(&n("10.1.2.0/24"), &n("10.0.0.0/8")));
        assert!(!overlaps(&n("10.1.0.0/16"), &n("10.2.0.0/16")));
        assert!(inside_any(
            &n("10.2.1.0/24"),
            &[n("10.1.0.0/16"), n("10.2.0.0/16")]
        ));
        assert!(!inside_any(
            &n("10.3.1.0/24"),
            &[n("10.1.0.0/16"), n("10.2.0.0/16")]
        ));
    }

    /// Naive model: a prefix is the closed interval of its addresses.
    fn interval(net: &IpNet) -> (bool, u128, u128) {
        match net {
            IpNet::V4(n) => (
                false,
                u128::from(u32::from(n.network())),
                u128::from(u32::from(n.broadcast())),
            ),
            IpNet::V6(n) => (true, u128::from(n.network()), u128::from(n.broadcast())),
        }
    }

    /// Random prefixes, biased towards related ones: the address is drawn from
    /// a small pool so that containment actually happens often.
    fn arb_net() -> impl Strategy<Value = IpNet> {
        prop_oneof![
            (any::<u8>(), any::<u8>(), 0u8..=32).prop_map(|(a, b, len)| {
                IpNet::V4(Ipv4Net::new_assert(Ipv4Addr::new(10, a & 3, b & 7, 0), len).trunc())
            }),
            (any::<u32>(), 0u8..=32).prop_map(|(a, len)| IpNet::V4(
                Ipv4Net::new_assert(Ipv4Addr::from(a), len).trunc()
            )),
            (any::<u8>(), 0u8..=128).prop_map(|(a, len)| {
                let addr =
                    Ipv6Addr::new(0xfd00, u16::from(a & 3), 0, u16::from(a >> 6), 0, 0, 0, 0);
                IpNet::V6(Ipv6Net::new_assert(addr, len).trunc())
            }),
            (any::<u128>(), 0u8..=128).prop_map(|(a, len)| IpNet::V6(
                Ipv6Net::new_assert(Ipv6Addr::from(a), len).trunc()
            )),
        ]
    }

    proptest! {
        #[test]
        fn containment_agrees_with_interval_model(a in arb_net(), b in arb_net()) {
            let (fa, sa, ea) = interval(&a);
            let (fb, sb, eb) = interval(&b);
            let model_contains = fa == fb && sa <= sb && eb <= ea;
            let model_overlaps = fa == fb && sa <= eb && sb <= ea;
            prop_assert_eq!(contains(&a, &b), model_contains);
            prop_assert_eq!(overlaps(&a, &b), model_overlaps);
            prop_assert_eq!(overlaps(&a, &b), overlaps(&b, &a));
        }

        #[test]
        fn forbidden_agrees_with_interval_model(a in arb_net()) {
            let (fa, sa, ea) = interval(&a);
            let hits_special = special_ranges().iter().any(|(r, _)| {
                let (fr, sr, er) = interval(r);
                fr == fa && sa <= er && sr <= ea
            });
            prop_assert_eq!(forbidden(&a).is_some(), a.prefix_len() == 0 || hits_special);
        }

        #[test]
        fn parse_round_trips_canonical(a in arb_net()) {
            prop_assert_eq!(parse_cidr(&a.to_string()), Ok(a));
        }
    }
}
