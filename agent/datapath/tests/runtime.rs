//! Real traffic through two [`Runtime`]s: two network namespaces joined by
//! a veth pair (the underlay), a TUN and a runtime in each, TCP streams and
//! UDP datagrams of many sizes in both directions, with and without the TUN
//! and UDP offloads. Needs root (namespaces, TUN); skipped otherwise.

#![allow(clippy::unwrap_used)]

use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket as StdUdp};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use nix::sched::{setns, CloneFlags};
use sdn_tunnel_datapath::io::tun::{Tun, TunOffloads, TunOptions};
use sdn_tunnel_datapath::io::udp::{UdpOffloads, UdpOptions, UdpSocket};
use sdn_tunnel_datapath::runtime::{IoStats, Runtime, RuntimeConfig};
use sdn_tunnel_datapath::{Device, DeviceConfig, PeerConfig, PrivateKey};

static COUNTER: AtomicU32 = AtomicU32::new(0);

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

fn run(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

struct Netns(String);

impl Netns {
    fn new(tag: &str) -> Netns {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!("sdnrt-{}-{n}-{tag}", std::process::id());
        run(&["ip", "netns", "add", &name]);
        let ns = Netns(name);
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }
    fn path(&self) -> String {
        format!("/run/netns/{}", self.0)
    }
    fn ip(&self, args: &[&str]) {
        let mut all = vec!["ip", "-n", self.0.as_str()];
        all.extend_from_slice(args);
        run(&all);
    }
    fn enter<T: Send, F: FnOnce() -> T + Send>(&self, f: F) -> T {
        let file = File::open(self.path()).unwrap();
        std::thread::scope(|s| {
            s.spawn(move || {
                setns(&file, CloneFlags::CLONE_NEWNET).unwrap();
                f()
            })
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

struct Side {
    ns: Netns,
    rt: Option<Runtime>,
}

const PORT: u16 = 51820;

/// Two namespaces, underlay 192.168.77.1/.2 on a veth pair (MTU 1500),
/// tunnel 10.77.0.1/.2 on TUN `sdnrt` (MTU 1420), a runtime on each side.
fn pair(offload: [bool; 2], workers: usize) -> (Side, Side) {
    let a = Netns::new("a");
    let b = Netns::new("b");
    a.ip(&[
        "link", "add", "ua", "type", "veth", "peer", "name", "ub", "netns", &b.0,
    ]);
    a.ip(&["addr", "add", "192.168.77.1/24", "dev", "ua"]);
    b.ip(&["addr", "add", "192.168.77.2/24", "dev", "ub"]);
    a.ip(&["link", "set", "ua", "up"]);
    b.ip(&["link", "set", "ub", "up"]);
    let keys = [PrivateKey::generate(), PrivateKey::generate()];
    let mut sides = Vec::new();
    for (i, ns) in [a, b].into_iter().enumerate() {
        let me = i + 1;
        let other = 2 - i;
        let mut dev = Device::new(DeviceConfig::new(keys[i].clone()));
        let mut peer = PeerConfig::new(keys[1 - i].public_key());
        peer.endpoint = Some(format!("192.168.77.{other}:{PORT}").parse().unwrap());
        peer.allowed_ips = vec![format!("10.77.0.{other}/32").parse().unwrap()];
        peer.persistent_keepalive = None;
        dev.set_peer(peer).unwrap();
        let path = ns.path();
        let rt = ns.enter(|| {
            let tun = Tun::create(&TunOptions {
                name: "sdnrt".into(),
                mtu: Some(1420),
                multi_queue: true,
                up: true,
                offload: offload[i],
            })
            .unwrap();
            let mut opts = UdpOptions::new(format!("192.168.77.{me}:{PORT}").parse().unwrap());
            opts.netns = Some(path.into());
            let udp = UdpSocket::bind_group(&opts, workers).unwrap();
            Runtime::start(
                dev,
                tun,
                udp,
                RuntimeConfig {
                    workers,
                    ..RuntimeConfig::default()
                },
            )
            .unwrap()
        });
        ns.ip(&["addr", "add", &format!("10.77.0.{me}/24"), "dev", "sdnrt"]);
        sides.push(Side { ns, rt: Some(rt) });
    }
    let b = sides.pop().unwrap();
    let a = sides.pop().unwrap();
    (a, b)
}

impl Side {
    fn rt(&self) -> &Runtime {
        self.rt.as_ref().unwrap()
    }
}

impl Drop for Side {
    fn drop(&mut self) {
        // Stop the threads before the namespace goes.
        self.rt.take();
    }
}

fn pattern(len: usize, seed: u32) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2_654_435_761).max(1);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

/// Sends `len` bytes over TCP from `from` to a listener in `to` and checks
/// that exactly those bytes arrive.
fn tcp_transfer(from: &Side, to: &Side, to_ip: &str, len: usize, seed: u32) {
    let addr: SocketAddr = format!("{to_ip}:5201").parse().unwrap();
    let listener = to.ns.enter(|| TcpListener::bind(addr).unwrap());
    let data = pattern(len, seed);
    std::thread::scope(|s| {
        let server = s.spawn(|| {
            let (mut c, _) = listener.accept().unwrap();
            c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
            let mut got = Vec::with_capacity(len);
            c.read_to_end(&mut got).unwrap();
            got
        });
        let mut c = from.ns.enter(|| {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                // The first SYN waits for the handshake; retry until up.
                match TcpStream::connect_timeout(&addr, Duration::from_secs(3)) {
                    Ok(c) => break c,
                    Err(e) if Instant::now() < deadline => {
                        eprintln!("connect {addr}: {e}, retrying");
                        std::thread::sleep(Duration::from_millis(100));
                    }
                    Err(e) => panic!("connect {addr}: {e}"),
                }
            }
        });
        c.set_write_timeout(Some(Duration::from_secs(30))).unwrap();
        c.write_all(&data).unwrap();
        drop(c);
        let got = server.join().unwrap();
        assert_eq!(got.len(), data.len(), "bytes received");
        assert!(got == data, "received bytes differ from the sent ones");
    });
}

/// Sends one datagram of every size in `sizes` from `from` to an echo
/// server in `to` and checks each echo (retrying a lost one).
fn udp_echo(from: &Side, to: &Side, to_ip: &str, sizes: &[usize]) {
    let addr: SocketAddr = format!("{to_ip}:5301").parse().unwrap();
    let server = to.ns.enter(|| StdUdp::bind(addr).unwrap());
    server
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let client = from.ns.enter(|| StdUdp::bind("0.0.0.0:0").unwrap());
    client
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            let mut buf = vec![0u8; 70_000];
            while !stop.load(Ordering::Relaxed) {
                if let Ok((n, src)) = server.recv_from(&mut buf) {
                    server.send_to(&buf[..n], src).unwrap();
                }
            }
        });
        let mut buf = vec![0u8; 70_000];
        for (k, &size) in sizes.iter().enumerate() {
            let data = pattern(size, k as u32 + 7);
            let mut ok = false;
            for _ in 0..20 {
                client.send_to(&data, addr).unwrap();
                match client.recv_from(&mut buf) {
                    Ok((n, _)) if buf[..n] == data[..] => {
                        ok = true;
                        break;
                    }
                    Ok((n, _)) => panic!("echo of {size} bytes came back as {n} different bytes"),
                    Err(_) => continue,
                }
            }
            assert!(ok, "no echo for a {size}-byte datagram to {addr}");
        }
        stop.store(true, Ordering::Relaxed);
    });
}

/// Bursts of UDP datagrams (more than a batch) arrive in one piece each.
fn udp_burst(from: &Side, to: &Side, to_ip: &str, count: usize, size: usize) -> usize {
    let addr: SocketAddr = format!("{to_ip}:5302").parse().unwrap();
    let server = to.ns.enter(|| StdUdp::bind(addr).unwrap());
    server
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let client = from.ns.enter(|| StdUdp::bind("0.0.0.0:0").unwrap());
    let body = pattern(size, 99);
    let mut got = 0;
    let mut buf = vec![0u8; 70_000];
    for chunk in 0..count.div_ceil(100) {
        let n = 100.min(count - chunk * 100);
        for _ in 0..n {
            client.send_to(&body, addr).unwrap();
        }
        let want = got + n;
        while got < want {
            match server.recv_from(&mut buf) {
                Ok((len, _)) => {
                    assert_eq!(buf[..len], body[..], "datagram changed on the way");
                    got += 1;
                }
                Err(_) => break,
            }
        }
    }
    got
}

const SIZES: &[usize] = &[
    0, 1, 20, 64, 500, 1000, 1391, 1392, 1393, 3000, 8000, 30_000,
];

fn exercise(offload: [bool; 2], workers: usize) -> (IoStats, IoStats, TunOffloads, UdpOffloads) {
    let (a, b) = pair(offload, workers);
    udp_echo(&a, &b, "10.77.0.2", SIZES);
    udp_echo(&b, &a, "10.77.0.1", SIZES);
    tcp_transfer(&a, &b, "10.77.0.2", 16 << 20, 1);
    tcp_transfer(&b, &a, "10.77.0.1", 16 << 20, 2);
    let got = udp_burst(&a, &b, "10.77.0.2", 2000, 1200);
    assert!(got >= 1900, "{got} of 2000 datagrams arrived");
    let (sa, sb) = (a.rt().io_stats(), b.rt().io_stats());
    eprintln!("offload {offload:?} workers {workers}:\n a: {sa:?}\n b: {sb:?}");
    // Nothing was refused or cut on the way.
    for s in [&sa, &sb] {
        assert_eq!(s.tun_bad_frames, 0);
        assert_eq!(s.tun_write_failed, 0);
        assert_eq!(s.udp_truncated, 0);
        assert_eq!(s.udp_send_failed, 0);
    }
    // Both devices saw only good traffic.
    for side in [&a, &b] {
        let drops = side.rt().drops();
        // NoRoute: the kernel sends IPv6 link-local chatter (MLD, router
        // solicitations) into a TUN that comes up; nothing else may drop.
        let no_route = drops.get(sdn_tunnel_datapath::DropReason::NoRoute);
        assert_eq!(drops.total() - no_route, 0, "{drops:?}");
    }
    let (tun_off, udp_off) = a.rt().offloads();
    (sa, sb, tun_off, udp_off)
}

#[test]
fn traffic_with_offloads_on_both_sides() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let (sa, sb, tun_off, udp_off) = exercise([true, true], 1);
    assert!(tun_off.vnet_hdr, "this kernel has IFF_VNET_HDR");
    if tun_off.tso {
        // TSO super-packets were read and split on the sending side...
        assert!(sa.tun_packets_read > sa.tun_frames_read, "{sa:?}");
        // ...and decrypted segments coalesced on the receiving side.
        assert!(sb.tun_coalesced_frames > 0, "{sb:?}");
    }
    if udp_off.gso {
        assert!(sa.udp_gso_messages > 0, "{sa:?}");
    }
    if udp_off.gro {
        assert!(sb.udp_datagrams_received > sb.udp_msgs_received, "{sb:?}");
    }
}

#[test]
fn traffic_without_tun_offloads() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let (sa, sb, tun_off, _) = exercise([false, false], 1);
    assert!(!tun_off.vnet_hdr);
    // One packet per TUN read and per TUN write.
    assert_eq!(sa.tun_packets_read, sa.tun_frames_read);
    assert_eq!(sb.tun_coalesced_frames, 0);
}

#[test]
fn traffic_between_offload_and_plain_tuns_with_two_workers() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    exercise([true, false], 2);
    exercise([false, true], 2);
}

#[test]
fn stop_on_drop_and_restart_from_parts() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let (mut a, b) = pair([true, true], 1);
    udp_echo(&a, &b, "10.77.0.2", &[100]);
    let rt = a.rt.take().unwrap();
    let before = rt.stats();
    let (device, tun) = rt.into_parts().unwrap();
    // The device comes back as it was (the session age moves on).
    let counters = |v: &[sdn_tunnel_datapath::PeerStats]| -> Vec<_> {
        v.iter()
            .map(|p| (p.public_key, p.endpoint, p.rx_bytes, p.tx_bytes))
            .collect()
    };
    assert_eq!(counters(&device.stats()), counters(&before));
    assert!(before[0].last_handshake_age.is_some());
    // Restart on a fresh socket group (two workers): sessions survive, traffic flows.
    let path = a.ns.path();
    let rt = a.ns.enter(|| {
        let mut opts = UdpOptions::new(format!("192.168.77.1:{PORT}").parse().unwrap());
        opts.netns = Some(path.into());
        // `bind`: one socket per worker, default buffers.
        let config = RuntimeConfig {
            workers: 2,
            ..RuntimeConfig::default()
        };
        Runtime::bind(device, tun, &opts, config).unwrap()
    });
    assert_eq!(rt.workers(), 2);
    a.rt = Some(rt);
    udp_echo(&a, &b, "10.77.0.2", &[100, 1400]);
    tcp_transfer(&b, &a, "10.77.0.1", 1 << 20, 3);
}
