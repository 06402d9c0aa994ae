//! Peer configuration against a model: after any sequence of `set_peer` /
//! `remove_peer`, every prefix belongs to the peer that set it last (and
//! still exists), `peer_config` reports exactly that, and outgoing packets
//! are sent towards that peer's endpoint.

mod common;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use common::*;
use ipnet::IpNet;
use proptest::prelude::*;
use sdn_tunnel_datapath::{DropReason, Outcome, PeerConfig, PrivateKey, PublicKey};

const PEERS: usize = 4;

/// Prefixes from a small overlapping pool, v4 and v6.
const POOL: [&str; 8] = [
    "10.0.0.0/8",
    "10.2.0.0/16",
    "10.2.3.0/24",
    "10.2.3.4/32",
    "10.7.0.0/16",
    "fd00::/8",
    "fd00:2::/32",
    "fd00:2::1/128",
];

fn pool() -> Vec<IpNet> {
    POOL.iter().map(|s| net(s)).collect()
}

fn net(s: &str) -> IpNet {
    s.parse().expect("pool literal")
}

#[derive(Debug, Clone)]
enum Op {
    /// Set peer `i` with these pool entries (bitmask).
    Set(usize, u8),
    Remove(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..PEERS, any::<u8>()).prop_map(|(i, m)| Op::Set(i, m)),
        1 => (0..PEERS).prop_map(Op::Remove),
    ]
}

fn endpoint(i: usize) -> SocketAddr {
    SocketAddr::from(([192, 0, 2, 10 + i as u8], 51820))
}

/// Addresses inside and around the pool.
const PROBES: [&str; 10] = [
    "10.1.1.1",
    "10.2.9.9",
    "10.2.3.9",
    "10.2.3.4",
    "10.7.0.1",
    "11.0.0.1",
    "fd00:1::1",
    "fd00:2::9",
    "fd00:2::1",
    "fe80::1",
];

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn prefixes_follow_the_last_writer(ops in proptest::collection::vec(op(), 1..20)) {
        let keys: Vec<PublicKey> =
            (0..PEERS).map(|_| PrivateKey::generate().public_key()).collect();
        let pool = pool();
        let mut dev = Node::new("192.0.2.1:51820").dev;
        // Model: which peers exist, and the owner of each prefix.
        let mut exists = [false; PEERS];
        let mut owner: BTreeMap<IpNet, usize> = BTreeMap::new();

        for op in &ops {
            match *op {
                Op::Set(i, mask) => {
                    let nets: Vec<IpNet> = (0..POOL.len())
                        .filter(|b| mask & (1 << b) != 0)
                        .map(|b| pool[b])
                        .collect();
                    let cfg = PeerConfig {
                        endpoint: Some(endpoint(i)),
                        allowed_ips: nets.clone(),
                        persistent_keepalive: None,
                        ..PeerConfig::new(keys[i])
                    };
                    dev.set_peer(cfg).unwrap();
                    exists[i] = true;
                    owner.retain(|_, o| *o != i);
                    for n in nets {
                        owner.insert(n, i);
                    }
                }
                Op::Remove(i) => {
                    prop_assert_eq!(dev.remove_peer(&keys[i]), exists[i]);
                    exists[i] = false;
                    owner.retain(|_, o| *o != i);
                }
            }
        }

        prop_assert_eq!(dev.peer_count(), exists.iter().filter(|e| **e).count());
        for i in 0..PEERS {
            let cfg = dev.peer_config(&keys[i]);
            prop_assert_eq!(cfg.is_some(), exists[i]);
            if let Some(cfg) = cfg {
                let mut got = cfg.allowed_ips.clone();
                got.sort();
                let want: Vec<IpNet> =
                    owner.iter().filter(|(_, o)| **o == i).map(|(n, _)| *n).collect();
                prop_assert_eq!(got, want, "peer {}", i);
            }
        }

        let mut out = [0u8; BUF];
        let mut initiated = [false; PEERS];
        for probe in PROBES {
            let dst: IpAddr = probe.parse().unwrap();
            let expected = owner
                .iter()
                .filter(|(n, _)| n.contains(&dst))
                .max_by_key(|(n, _)| n.prefix_len())
                .map(|(_, o)| *o);
            let packet = match dst {
                IpAddr::V4(d) => ipv4_packet(v4("10.1.0.1"), d, b"probe"),
                IpAddr::V6(d) => ipv6_packet(v6("fd01::1"), d, b"probe"),
            };
            match (dev.encapsulate(&packet, &mut out), expected) {
                // No session yet: the packet is queued and a handshake
                // initiation goes to the owner the first time, nothing
                // while that one is in flight.
                (Outcome::Network { to, .. }, Some(i)) => {
                    prop_assert_eq!(to, endpoint(i));
                    prop_assert!(!initiated[i], "second initiation to {}", i);
                    initiated[i] = true;
                }
                (Outcome::Done, Some(i)) => prop_assert!(initiated[i], "{} queued silently", probe),
                (Outcome::Dropped(DropReason::NoRoute), None) => {}
                (other, want) => {
                    prop_assert!(false, "{} -> {:?}, expected peer {:?}", probe, other, want)
                }
            }
        }
    }
}
