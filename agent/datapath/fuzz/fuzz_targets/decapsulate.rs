//! Feed arbitrary datagrams to a device that has an established session
//! with one peer. Input format: a sequence of `[mode: u8][len: u16 LE]
//! [bytes]` records, each delivered as one datagram from the peer's
//! address. Mode (low 2 bits): 0 raw bytes; 1 raw bytes with the live
//! receiver index spliced in at offset 4 (reaches the session code, which
//! a fuzzer cannot guess its way to); 2 a genuine data message XORed with
//! the bytes. Nothing may panic, nothing unauthenticated may reach the TUN,
//! and the session must still carry data afterwards.

#![no_main]

use std::net::SocketAddr;

use libfuzzer_sys::fuzz_target;
use sdn_tunnel_datapath::{Device, DeviceConfig, Outcome, PeerConfig, PrivateKey};

const BUF: usize = 4096;

fn ipv4(src: [u8; 4], dst: [u8; 4], payload: &[u8]) -> Vec<u8> {
    let mut p = vec![0u8; 20];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&((20 + payload.len()) as u16).to_be_bytes());
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&src);
    p[16..20].copy_from_slice(&dst);
    p.extend_from_slice(payload);
    p
}

/// Deliver `d` to `to` and everything it answers back and forth until
/// quiet; returns the packets written to either TUN.
fn exchange(
    a: &mut Device,
    b: &mut Device,
    a_addr: SocketAddr,
    b_addr: SocketAddr,
    first: (bool, Vec<u8>),
) -> Vec<Vec<u8>> {
    let mut tun = Vec::new();
    let mut wire = vec![first];
    let mut out = [0u8; BUF];
    while let Some((to_a, d)) = wire.pop() {
        let (dev, src) = if to_a {
            (&mut *a, b_addr)
        } else {
            (&mut *b, a_addr)
        };
        match dev.decapsulate(src, &d, &mut out) {
            Outcome::Network { datagram, .. } => wire.push((!to_a, datagram.to_vec())),
            Outcome::Tunnel { packet } => tun.push(packet.to_vec()),
            _ => {}
        }
        while let Outcome::Network { datagram, .. } = dev.next_queued(&mut out) {
            wire.push((!to_a, datagram.to_vec()));
        }
    }
    tun
}

fuzz_target!(|data: &[u8]| {
    let a_key = PrivateKey::generate();
    let b_key = PrivateKey::generate();
    let a_addr: SocketAddr = ([192, 0, 2, 1], 51820).into();
    let b_addr: SocketAddr = ([192, 0, 2, 2], 51820).into();
    let mut a = Device::new(DeviceConfig::new(a_key.clone()));
    let mut b = Device::new(DeviceConfig::new(b_key.clone()));
    let mut pa = PeerConfig::new(b_key.public_key());
    pa.endpoint = Some(b_addr);
    pa.allowed_ips = vec!["10.2.0.0/16".parse().unwrap()];
    a.set_peer(pa).unwrap();
    let mut pb = PeerConfig::new(a_key.public_key());
    pb.endpoint = Some(a_addr);
    pb.allowed_ips = vec!["10.1.0.0/16".parse().unwrap()];
    b.set_peer(pb).unwrap();

    // Handshake, initiated by B.
    let mut out = [0u8; BUF];
    let p = ipv4([10, 2, 0, 7], [10, 1, 0, 5], b"hello");
    let Outcome::Network { datagram, .. } = b.encapsulate(&p, &mut out) else {
        panic!("no handshake initiation")
    };
    let tun = exchange(&mut a, &mut b, a_addr, b_addr, (true, datagram.to_vec()));
    assert_eq!(tun, vec![p]);

    // A genuine data message from B, never delivered: source of the live
    // receiver index and a base for mutations.
    let g = ipv4([10, 2, 0, 7], [10, 1, 0, 5], &[0x5a; 48]);
    let Outcome::Network { datagram, .. } = b.encapsulate(&g, &mut out) else {
        panic!("B cannot send")
    };
    let genuine = datagram.to_vec();

    let mut rest = data;
    let mut d = Vec::with_capacity(BUF);
    while rest.len() >= 3 {
        let mode = rest[0] & 3;
        let len = (u16::from_le_bytes([rest[1], rest[2]]) as usize).min(rest.len() - 3);
        let (bytes, tail) = rest[3..].split_at(len);
        rest = tail;
        d.clear();
        match mode {
            1 => {
                d.extend_from_slice(bytes);
                if d.len() >= 8 {
                    d[4..8].copy_from_slice(&genuine[4..8]);
                }
            }
            2 => {
                d.extend_from_slice(&genuine);
                for (i, x) in bytes.iter().enumerate() {
                    d[i % genuine.len()] ^= x;
                }
                if d == genuine {
                    continue;
                }
            }
            _ => d.extend_from_slice(bytes),
        }
        let o = a.decapsulate(b_addr, &d, &mut out);
        assert!(
            !matches!(o, Outcome::Tunnel { .. }),
            "unauthenticated bytes reached the TUN"
        );
        while let Outcome::Network { .. } = a.next_queued(&mut out) {}
    }

    // The session survived.
    let q = ipv4([10, 2, 0, 8], [10, 1, 0, 9], b"still alive");
    let Outcome::Network { datagram, .. } = b.encapsulate(&q, &mut out) else {
        panic!("B cannot send")
    };
    let d = datagram.to_vec();
    assert_eq!(exchange(&mut a, &mut b, a_addr, b_addr, (true, d)), vec![q]);
});
