//! Allowed-IPs table: longest-prefix match over IPv4 and IPv6 prefixes.
//!
//! WireGuard uses one table per device for two decisions: which peer an
//! outgoing packet is encrypted for (lookup of the destination address) and
//! whether a decrypted packet may be accepted from the peer that sent it
//! (lookup of the source address must give back that same peer). A prefix
//! belongs to at most one peer: inserting it for another peer moves it.
//!
//! The lookup structure is `ip_network_table` (a tree bitmap per address
//! family), the same table boringtun's own device uses, so it is already in
//! our dependency graph and proven on this exact workload. We wrap it so the
//! rest of the workspace speaks `ipnet::IpNet` (which our CRD types use) and
//! so the crate behind it can change without touching callers.

use std::net::IpAddr;

use ip_network::{IpNetwork, Ipv4Network, Ipv6Network};
use ip_network_table::IpNetworkTable;
use ipnet::{IpNet, Ipv4Net, Ipv6Net};

/// Longest-prefix table from IP prefixes to a value (normally a peer id).
///
/// Prefixes are stored truncated to their network address (`10.1.2.3/16`
/// is `10.1.0.0/16`), as `wg set ... allowed-ips` does.
pub struct AllowedIps<T> {
    table: IpNetworkTable<T>,
}

impl<T> Default for AllowedIps<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T: std::fmt::Debug> std::fmt::Debug for AllowedIps<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

impl<T> AllowedIps<T> {
    /// An empty table.
    pub fn new() -> Self {
        Self {
            table: IpNetworkTable::new(),
        }
    }

    /// Map `net` to `value`. Returns the previous owner of exactly this
    /// prefix, if any: under WireGuard semantics the prefix has now moved
    /// from that owner to `value`.
    pub fn insert(&mut self, net: IpNet, value: T) -> Option<T> {
        self.table.insert(to_network(net), value)
    }

    /// Remove exactly `net` (not the prefixes it contains). Returns its owner.
    pub fn remove(&mut self, net: IpNet) -> Option<T> {
        self.table.remove(to_network(net))
    }

    /// The owner of exactly `net`, if that prefix is in the table.
    pub fn get(&self, net: IpNet) -> Option<&T> {
        self.table.exact_match(to_network(net))
    }

    /// The value of the longest prefix containing `ip`.
    #[inline]
    pub fn lookup(&self, ip: IpAddr) -> Option<&T> {
        self.table.longest_match(ip).map(|(_, v)| v)
    }

    /// The longest prefix containing `ip`, with its value.
    pub fn lookup_prefix(&self, ip: IpAddr) -> Option<(IpNet, &T)> {
        self.table
            .longest_match(ip)
            .map(|(net, v)| (from_network(net), v))
    }

    /// Keep only the entries for which `keep` returns true (used to remove
    /// every prefix of a peer at once).
    pub fn retain(&mut self, mut keep: impl FnMut(IpNet, &T) -> bool) {
        self.table.retain(|net, v| keep(from_network(net), v));
    }

    /// All entries, IPv4 first.
    pub fn iter(&self) -> impl Iterator<Item = (IpNet, &T)> {
        self.table.iter().map(|(net, v)| (from_network(net), v))
    }

    /// Number of prefixes (IPv4 + IPv6).
    pub fn len(&self) -> usize {
        let (v4, v6) = self.table.len();
        v4 + v6
    }

    /// True when no prefix is stored.
    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }
}

fn to_network(net: IpNet) -> IpNetwork {
    // `ipnet` guarantees prefix_len <= 32 (v4) / 128 (v6), the only error
    // `new_truncate` can return, so these cannot fail for any IpNet value.
    match net {
        IpNet::V4(n) => IpNetwork::V4(
            Ipv4Network::new_truncate(n.addr(), n.prefix_len())
                .expect("ipnet prefix length is at most 32"),
        ),
        IpNet::V6(n) => IpNetwork::V6(
            Ipv6Network::new_truncate(n.addr(), n.prefix_len())
                .expect("ipnet prefix length is at most 128"),
        ),
    }
}

fn from_network(net: IpNetwork) -> IpNet {
    // `ip_network` guarantees the same bounds as `ipnet`.
    match net {
        IpNetwork::V4(n) => IpNet::V4(
            Ipv4Net::new(n.network_address(), n.netmask())
                .expect("ip_network prefix length is at most 32"),
        ),
        IpNetwork::V6(n) => IpNet::V6(
            Ipv6Net::new(n.network_address(), n.netmask())
                .expect("ip_network prefix length is at most 128"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn longest_prefix_wins_v4_and_v6() {
        let mut t = AllowedIps::new();
        t.insert(net("10.0.0.0/8"), 1);
        t.insert(net("10.1.0.0/16"), 2);
        t.insert(net("10.1.2.0/24"), 3);
        t.insert(net("fd00::/8"), 4);
        t.insert(net("fd00:1::/32"), 5);
        assert_eq!(t.lookup(ip("10.9.9.9")), Some(&1));
        assert_eq!(t.lookup(ip("10.1.9.9")), Some(&2));
        assert_eq!(t.lookup(ip("10.1.2.200")), Some(&3));
        assert_eq!(t.lookup(ip("11.0.0.1")), None);
        assert_eq!(t.lookup(ip("fd00:1::1")), Some(&5));
        assert_eq!(t.lookup(ip("fd00:2::1")), Some(&4));
        assert_eq!(t.lookup(ip("fe80::1")), None);
        // An IPv4 /0 does not swallow IPv6 and vice versa.
        t.insert(net("0.0.0.0/0"), 9);
        assert_eq!(t.lookup(ip("fe80::1")), None);
        assert_eq!(t.lookup(ip("11.0.0.1")), Some(&9));
        assert_eq!(t.len(), 6);
    }

    #[test]
    fn host_bits_are_truncated() {
        let mut t = AllowedIps::new();
        t.insert(net("10.1.2.3/16"), 1);
        assert_eq!(t.get(net("10.1.0.0/16")), Some(&1));
        assert_eq!(
            t.lookup_prefix(ip("10.1.200.1")),
            Some((net("10.1.0.0/16"), &1))
        );
        assert_eq!(t.remove(net("10.1.9.9/16")), Some(1));
        assert!(t.is_empty());
    }

    #[test]
    fn reinserting_a_prefix_moves_it_to_the_new_peer() {
        let mut t = AllowedIps::new();
        assert_eq!(t.insert(net("10.2.0.0/16"), 1), None);
        assert_eq!(t.insert(net("10.2.0.0/16"), 2), Some(1));
        assert_eq!(t.lookup(ip("10.2.3.4")), Some(&2));
        assert_eq!(t.len(), 1);
        t.retain(|_, v| *v != 2);
        assert_eq!(t.lookup(ip("10.2.3.4")), None);
    }

    /// The naive model: a list of (prefix, owner), at most one entry per
    /// prefix, searched linearly.
    #[derive(Default)]
    struct Model(Vec<(IpNet, u8)>);

    impl Model {
        fn insert(&mut self, n: IpNet, v: u8) -> Option<u8> {
            let n = n.trunc();
            match self.0.iter_mut().find(|(m, _)| *m == n) {
                Some(e) => Some(std::mem::replace(&mut e.1, v)),
                None => {
                    self.0.push((n, v));
                    None
                }
            }
        }
        fn remove(&mut self, n: IpNet) -> Option<u8> {
            let n = n.trunc();
            let pos = self.0.iter().position(|(m, _)| *m == n)?;
            Some(self.0.remove(pos).1)
        }
        fn lookup(&self, ip: IpAddr) -> Option<(IpNet, u8)> {
            self.0
                .iter()
                .filter(|(n, _)| n.contains(&ip))
                .max_by_key(|(n, _)| n.prefix_len())
                .copied()
        }
    }

    // Addresses drawn from a small space so that prefixes overlap a lot.
    fn v4_addr() -> impl Strategy<Value = Ipv4Addr> {
        (0u8..4, 0u8..4, any::<u8>()).prop_map(|(a, b, c)| Ipv4Addr::new(10, a, b, c))
    }

    fn v6_addr() -> impl Strategy<Value = Ipv6Addr> {
        (0u16..4, 0u16..4, any::<u16>())
            .prop_map(|(a, b, c)| Ipv6Addr::new(0xfd00, a, b, 0, 0, 0, 0, c))
    }

    fn addr() -> impl Strategy<Value = IpAddr> {
        prop_oneof![
            v4_addr().prop_map(IpAddr::V4),
            v6_addr().prop_map(IpAddr::V6)
        ]
    }

    fn prefix() -> impl Strategy<Value = IpNet> {
        prop_oneof![
            (v4_addr(), 0u8..=32).prop_map(|(a, l)| IpNet::V4(Ipv4Net::new(a, l).unwrap())),
            (v6_addr(), 0u8..=128).prop_map(|(a, l)| IpNet::V6(Ipv6Net::new(a, l).unwrap())),
        ]
    }

    #[derive(Debug, Clone)]
    enum Op {
        Insert(IpNet, u8),
        Remove(IpNet),
        RemoveOwner(u8),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (prefix(), 0u8..4).prop_map(|(n, v)| Op::Insert(n, v)),
            1 => prefix().prop_map(Op::Remove),
            1 => (0u8..4).prop_map(Op::RemoveOwner),
        ]
    }

    proptest! {
        #[test]
        fn matches_linear_scan_model(
            ops in proptest::collection::vec(op(), 0..60),
            probes in proptest::collection::vec(addr(), 0..40),
        ) {
            let mut table = AllowedIps::new();
            let mut model = Model::default();
            for op in &ops {
                match *op {
                    Op::Insert(n, v) => prop_assert_eq!(table.insert(n, v), model.insert(n, v)),
                    Op::Remove(n) => prop_assert_eq!(table.remove(n), model.remove(n)),
                    Op::RemoveOwner(v) => {
                        table.retain(|_, o| *o != v);
                        model.0.retain(|(_, o)| *o != v);
                    }
                }
            }
            prop_assert_eq!(table.len(), model.0.len());
            // Probe random addresses plus the first and last address of
            // every stored prefix (the boundaries are where tries go wrong).
            let edges = model.0.iter().flat_map(|(n, _)| [n.network(), n.broadcast()]);
            for ip in probes.iter().copied().chain(edges) {
                let got = table.lookup_prefix(ip).map(|(n, v)| (n, *v));
                prop_assert_eq!(got, model.lookup(ip), "lookup {}", ip);
            }
            let mut listed: Vec<(IpNet, u8)> = table.iter().map(|(n, v)| (n, *v)).collect();
            let mut expected = model.0.clone();
            listed.sort();
            expected.sort();
            prop_assert_eq!(listed, expected);
        }
    }
}
