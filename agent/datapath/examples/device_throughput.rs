//! Single-thread cost of the sans-IO device on the data path: encrypt a
//! packet on one device, decrypt it on the other, no syscalls. Tells how
//! much of a core's per-packet budget the crypto and the peer/prefix
//! lookups take before any I/O is added.
//!
//!   cargo run --release -p sdn-tunnel-datapath --example device_throughput [packet_size] [count]

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Instant;

use sdn_tunnel_datapath::{Device, DeviceConfig, Outcome, PeerConfig, PrivateKey};

fn ipv4(src: [u8; 4], dst: [u8; 4], total: usize) -> Vec<u8> {
    let mut p = vec![0x17u8; total.max(20)];
    p[..20].fill(0);
    p[0] = 0x45;
    let len = p.len() as u16;
    p[2..4].copy_from_slice(&len.to_be_bytes());
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&src);
    p[16..20].copy_from_slice(&dst);
    p
}

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let size: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(1420);
    let count: u64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(500_000);
    if !(20..=65_000).contains(&size) {
        eprintln!("packet size must be 20..=65000");
        return ExitCode::FAILURE;
    }

    let (ka, kb) = (PrivateKey::generate(), PrivateKey::generate());
    let a_addr: SocketAddr = ([192, 0, 2, 1], 51820).into();
    let b_addr: SocketAddr = ([192, 0, 2, 2], 51820).into();
    let mut a = Device::new(DeviceConfig::new(ka.clone()));
    let mut b = Device::new(DeviceConfig::new(kb.clone()));
    let mut pa = PeerConfig::new(kb.public_key());
    pa.endpoint = Some(b_addr);
    pa.allowed_ips = vec!["10.2.0.0/16".parse().expect("literal")];
    let mut pb = PeerConfig::new(ka.public_key());
    pb.endpoint = Some(a_addr);
    pb.allowed_ips = vec!["10.1.0.0/16".parse().expect("literal")];
    if a.set_peer(pa).is_err() || b.set_peer(pb).is_err() {
        eprintln!("peer setup failed");
        return ExitCode::FAILURE;
    }

    let mut wire = vec![0u8; (size + 64).max(2048)];
    let mut plain = vec![0u8; (size + 64).max(2048)];
    let packet = ipv4([10, 1, 0, 1], [10, 2, 0, 1], size);

    // Handshake: init A->B, response B->A, keepalive A->B, then the
    // queued packet A->B.
    let mut to_b: Vec<Vec<u8>> = Vec::new();
    if let Outcome::Network { datagram, .. } = a.encapsulate(&packet, &mut wire) {
        to_b.push(datagram.to_vec());
    }
    let mut rounds = 0;
    while let Some(d) = to_b.pop() {
        rounds += 1;
        if rounds > 10 {
            break;
        }
        if let Outcome::Network { datagram, .. } = b.decapsulate(a_addr, &d, &mut plain) {
            let resp = datagram.to_vec();
            if let Outcome::Network { datagram, .. } = a.decapsulate(b_addr, &resp, &mut plain) {
                to_b.push(datagram.to_vec());
            }
            while let Outcome::Network { datagram, .. } = a.next_queued(&mut plain) {
                to_b.push(datagram.to_vec());
            }
        }
    }

    let start = Instant::now();
    let mut ok = 0u64;
    for _ in 0..count {
        let n = match a.encapsulate(&packet, &mut wire) {
            Outcome::Network { datagram, .. } => datagram.len(),
            other => {
                eprintln!("encapsulate: {other:?}");
                return ExitCode::FAILURE;
            }
        };
        if let Outcome::Tunnel { .. } = b.decapsulate(a_addr, &wire[..n], &mut plain) {
            ok += 1;
        }
    }
    let secs = start.elapsed().as_secs_f64();
    if ok != count {
        eprintln!("only {ok} of {count} packets arrived: {:?}", b.drops());
        return ExitCode::FAILURE;
    }
    let pps = count as f64 / secs;
    println!(
        "packet {size} B: {count} encrypt+decrypt in {secs:.3} s = {:.0} ns/packet, {:.2} Gbit/s of plaintext per core (both directions' work on one core)",
        1e9 / pps,
        pps * size as f64 * 8.0 / 1e9
    );
    ExitCode::SUCCESS
}
