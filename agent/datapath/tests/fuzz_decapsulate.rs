//! Fuzz-style property tests for the receive path: arbitrary, WireGuard-
//! shaped and mutated-valid datagrams into `Device::decapsulate` never
//! panic, are always dropped and counted, and never disturb the session.

mod common;

use std::net::SocketAddr;

use common::*;
use proptest::prelude::*;
use sdn_tunnel_datapath::Outcome;

/// An established pair plus genuine datagrams from B to A to mutate.
struct Fixture {
    lab: Lab,
    /// A data message B sent, not yet delivered.
    data: Vec<u8>,
    data_plain: Vec<u8>,
    /// The handshake response B sent during `establish` (already used).
    response: Vec<u8>,
}

fn fixture() -> Fixture {
    let mut lab = Lab::pair(None);
    establish(&mut lab);
    let response = lab
        .delivered
        .iter()
        .find(|(to, d)| *to == 0 && msg_type(d) == 2)
        .map(|(_, d)| d.clone())
        .expect("A received a handshake response");
    let data_plain = ipv4_packet(v4("10.2.0.7"), v4("10.1.0.5"), &[0x5a; 64]);
    let Got::Sent(_, data) = lab.tun_read(1, &data_plain) else {
        panic!("B should send data")
    };
    lab.wire.clear();
    Fixture {
        lab,
        data,
        data_plain,
        response,
    }
}

fn wg_shaped() -> impl Strategy<Value = Vec<u8>> {
    (
        1u32..=4,
        any::<u32>(),
        proptest::collection::vec(any::<u8>(), 0..1500),
    )
        .prop_map(|(ty, idx, body)| {
            let len = match ty {
                1 => 148,
                2 => 92,
                3 => 64,
                _ => 32 + body.len().min(1400),
            };
            let mut d = Vec::with_capacity(len);
            d.extend_from_slice(&ty.to_le_bytes());
            d.extend_from_slice(&idx.to_le_bytes());
            d.extend(body.iter().copied().cycle().take(len - 8));
            d.resize(len, 0);
            d
        })
}

#[derive(Debug, Clone)]
enum Mutation {
    /// XOR a byte with a non-zero value.
    Flip(usize, u8),
    Truncate(usize),
    Append(Vec<u8>),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        4 => (any::<usize>(), 1u8..=255).prop_map(|(i, x)| Mutation::Flip(i, x)),
        1 => any::<usize>().prop_map(Mutation::Truncate),
        1 => proptest::collection::vec(any::<u8>(), 1..64).prop_map(Mutation::Append),
    ]
}

fn apply(base: &[u8], muts: &[Mutation]) -> Vec<u8> {
    let mut d = base.to_vec();
    for m in muts {
        match m {
            Mutation::Flip(i, x) if !d.is_empty() => {
                let i = i % d.len();
                d[i] ^= x;
            }
            Mutation::Flip(..) => {}
            Mutation::Truncate(n) => {
                let n = n % d.len().max(1);
                d.truncate(n);
            }
            Mutation::Append(tail) => d.extend_from_slice(tail),
        }
    }
    d
}

fn src_addr() -> impl Strategy<Value = SocketAddr> {
    prop_oneof![
        Just(SocketAddr::from(([192, 0, 2, 2], 51820))),
        any::<([u8; 4], u16)>().prop_map(|(ip, port)| SocketAddr::from((ip, port))),
        any::<([u8; 16], u16)>().prop_map(|(ip, port)| SocketAddr::from((ip, port))),
    ]
}

/// Raw bytes, or IP packets routed to B (so they reach boringtun) with a
/// random source, payload size and a possibly lying length field.
fn tun_packet() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..2100),
        (
            any::<[u8; 4]>(),
            any::<u16>(),
            0usize..2100,
            any::<Option<u16>>()
        )
            .prop_map(|(src, host, len, bad_len)| {
                let [h1, h2] = host.to_be_bytes();
                let dst = std::net::Ipv4Addr::new(10, 2, h1, h2);
                let mut p = ipv4_packet(src.into(), dst, &vec![0x11; len]);
                if let Some(l) = bad_len {
                    p[2..4].copy_from_slice(&l.to_be_bytes());
                }
                p
            }),
        (any::<u64>(), 0usize..2100).prop_map(|(host, len)| {
            let dst = std::net::Ipv6Addr::from(
                0xfd02_0000_0000_0000_0000_0000_0000_0000u128 | host as u128,
            );
            ipv6_packet(v6("fd02::1"), dst, &vec![0x22; len])
        }),
    ]
}

fn check_session_still_works(f: &mut Fixture) -> Result<(), TestCaseError> {
    let p = ipv4_packet(v4("10.2.0.8"), v4("10.1.0.9"), b"after the storm");
    f.lab.nodes[0].tun.clear();
    f.lab.send(1, &p);
    prop_assert_eq!(&f.lab.nodes[0].tun, &vec![p]);
    let q = ipv4_packet(v4("10.1.0.9"), v4("10.2.0.8"), b"and back");
    f.lab.nodes[1].tun.clear();
    f.lab.send(0, &q);
    prop_assert_eq!(&f.lab.nodes[1].tun, &vec![q]);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic_and_are_dropped(
        inputs in proptest::collection::vec(
            (src_addr(), prop_oneof![
                proptest::collection::vec(any::<u8>(), 0..1600),
                wg_shaped(),
            ]),
            1..16,
        ),
    ) {
        let mut f = fixture();
        let before = f.lab.nodes[0].dev.drops().total();
        let mut out = [0u8; BUF];
        for (src, d) in &inputs {
            let o = f.lab.nodes[0].dev.decapsulate(*src, d, &mut out);
            prop_assert!(matches!(o, Outcome::Dropped(_)), "accepted junk: {:?}", o);
        }
        prop_assert_eq!(
            f.lab.nodes[0].dev.drops().total() - before,
            inputs.len() as u64
        );
        // Junk never moves B's endpoint at A.
        let st = f.lab.nodes[0].dev.peer_stats(&f.lab.nodes[1].public()).unwrap();
        prop_assert_eq!(st.endpoint, Some(f.lab.nodes[1].addr));
        check_session_still_works(&mut f)?;
    }

    #[test]
    fn mutated_genuine_datagrams_are_dropped(
        cases in proptest::collection::vec(
            (src_addr(), any::<bool>(), proptest::collection::vec(mutation(), 1..4)),
            1..12,
        ),
    ) {
        let mut f = fixture();
        let mut out = [0u8; BUF];
        for (src, use_response, muts) in &cases {
            let base = if *use_response { &f.response } else { &f.data };
            let d = apply(base, muts);
            if d == *base {
                // Mutations can cancel out (flip the same bit twice).
                continue;
            }
            let o = f.lab.nodes[0].dev.decapsulate(*src, &d, &mut out);
            prop_assert!(matches!(o, Outcome::Dropped(_)), "accepted forgery: {:?}", o);
        }
        let st = f.lab.nodes[0].dev.peer_stats(&f.lab.nodes[1].public()).unwrap();
        prop_assert_eq!(st.endpoint, Some(f.lab.nodes[1].addr));
        // The genuine datagram still decrypts (nothing consumed its counter).
        let b_addr = f.lab.nodes[1].addr;
        let o = f.lab.nodes[0].dev.decapsulate(b_addr, &f.data, &mut out);
        prop_assert_eq!(Got::from(o), Got::Tun(f.data_plain.clone()));
        check_session_still_works(&mut f)?;
    }

    #[test]
    fn arbitrary_bytes_into_encapsulate_never_panic(
        packets in proptest::collection::vec(tun_packet(), 1..16),
        small_out in any::<bool>(),
    ) {
        let mut f = fixture();
        let mut out = vec![0u8; if small_out { 100 } else { BUF }];
        for p in &packets {
            // Whatever comes from the TUN: routed, refused or dropped, but
            // never a panic (boringtun panics on a short buffer; we check).
            let _ = f.lab.nodes[0].dev.encapsulate(p, &mut out);
        }
        f.lab.wire.clear();
        check_session_still_works(&mut f)?;
    }
}
