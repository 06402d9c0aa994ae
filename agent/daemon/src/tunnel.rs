//! The running tunnel: the sans-IO [`Device`] between the TUN device and
//! the UDP socket, driven by three threads (TUN → encrypt → UDP,
//! UDP → decrypt → TUN, timers). The control plane talks to it through
//! [`Tunnel::set_peers`] and reads [`Tunnel::stats`].
//!
//! The UDP socket may live in another network namespace than the TUN (the
//! node's, so the endpoint is `nodeIP:port` without NAT): it is created on a
//! short-lived thread that has entered that namespace, and keeps belonging
//! to it afterwards.

use std::collections::BTreeSet;
use std::fs::File;
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use ipnet::IpNet;
use nix::sched::{setns, CloneFlags};
use sdn_tunnel_datapath::device::{
    Device, DropCounters, Outcome, PeerChange, PeerConfig, PeerStats,
};
use sdn_tunnel_datapath::io::tun::Tun;
use sdn_tunnel_datapath::keys::PublicKey;
use tracing::{debug, info, trace, warn};

/// Largest datagram or packet handled (a 64 KiB IP packet plus overhead).
const BUF_LEN: usize = 65_536 + 256;
/// How often the stop flag is checked by threads blocked in I/O.
const POLL: Duration = Duration::from_millis(250);
/// boringtun's timers want a tick every 100-250 ms.
const TIMER_TICK: Duration = Duration::from_millis(100);

/// Opens a UDP socket bound to `addr`, inside the network namespace at
/// `netns` when given (e.g. `/proc/1/ns/net`, `/run/netns/<name>`).
pub fn bind_udp(addr: SocketAddr, netns: Option<&Path>) -> io::Result<UdpSocket> {
    let Some(path) = netns else {
        return UdpSocket::bind(addr);
    };
    let ns = File::open(path).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("network namespace {}: {e}", path.display()),
        )
    })?;
    std::thread::spawn(move || {
        setns(&ns, CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
        UdpSocket::bind(addr)
    })
    .join()
    .map_err(|_| io::Error::other("thread binding the UDP socket panicked"))?
}

/// One peer as the control plane wants it, endpoint already resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TunnelPeer {
    pub public_key: PublicKey,
    pub endpoint: Option<SocketAddr>,
    pub allowed_ips: Vec<IpNet>,
    pub persistent_keepalive: Option<u16>,
}

/// A running tunnel; dropping it stops the threads.
pub struct Tunnel {
    device: Arc<Mutex<Device>>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    local_addr: SocketAddr,
    udp: Arc<UdpSocket>,
}

fn lock(device: &Mutex<Device>) -> MutexGuard<'_, Device> {
    // A panic in one I/O thread must not take the others down with a
    // poisoned lock: the device's state is still consistent per call.
    device.lock().unwrap_or_else(|e| e.into_inner())
}

impl Tunnel {
    /// Starts the I/O threads over `tun` and `udp`.
    pub fn start(device: Device, tun: Tun, udp: UdpSocket) -> io::Result<Tunnel> {
        udp.set_read_timeout(Some(POLL))?;
        let local_addr = udp.local_addr()?;
        let device = Arc::new(Mutex::new(device));
        let stop = Arc::new(AtomicBool::new(false));
        let tun = Arc::new(tun);
        let udp = Arc::new(udp);
        let mut threads = Vec::new();

        let (d, s, t, u) = (device.clone(), stop.clone(), tun.clone(), udp.clone());
        threads.push(
            std::thread::Builder::new()
                .name("tun-to-udp".into())
                .spawn(move || tun_to_udp(&d, &s, &t, &u))?,
        );
        let (d, s, t, u) = (device.clone(), stop.clone(), tun.clone(), udp.clone());
        threads.push(
            std::thread::Builder::new()
                .name("udp-to-tun".into())
                .spawn(move || udp_to_tun(&d, &s, &t, &u))?,
        );
        let (d, s, u) = (device.clone(), stop.clone(), udp.clone());
        threads.push(
            std::thread::Builder::new()
                .name("wg-timers".into())
                .spawn(move || timers(&d, &s, &u))?,
        );
        info!(%local_addr, "tunnel running");
        Ok(Tunnel {
            device,
            stop,
            threads,
            local_addr,
            udp,
        })
    }

    /// Where the UDP socket listens.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Makes the device's peers exactly `peers`: adds and updates them
    /// (sessions of unchanged peers are kept), removes the others.
    /// Returns the keys that could not be configured, with the reason.
    pub fn set_peers(&self, peers: &[TunnelPeer]) -> Vec<(PublicKey, String)> {
        let mut device = lock(&self.device);
        let wanted: BTreeSet<PublicKey> = peers.iter().map(|p| p.public_key).collect();
        let stale: Vec<PublicKey> = device
            .peer_keys()
            .filter(|k| !wanted.contains(k))
            .copied()
            .collect();
        for k in stale {
            device.remove_peer(&k);
            info!(peer = %k.to_base64(), "peer removed");
        }
        let mut failed = Vec::new();
        let mut out = vec![0u8; BUF_LEN];
        for p in peers {
            let mut cfg = PeerConfig::new(p.public_key);
            cfg.endpoint = p.endpoint;
            cfg.allowed_ips = p.allowed_ips.clone();
            cfg.persistent_keepalive = p.persistent_keepalive;
            match device.set_peer(cfg) {
                Ok(change) => {
                    debug!(peer = %p.public_key.to_base64(), ?change, "peer configured");
                    // Like the kernel with a persistent keepalive: handshake
                    // now, so the peer is up before traffic needs it.
                    if change != PeerChange::Updated && p.persistent_keepalive.is_some() {
                        if let Outcome::Network { to, datagram } =
                            device.initiate_handshake(&p.public_key, &mut out)
                        {
                            send(&self.udp, to, datagram);
                        }
                    }
                }
                Err(e) => failed.push((p.public_key, e.to_string())),
            }
        }
        failed
    }

    /// Counters of every peer.
    pub fn stats(&self) -> Vec<PeerStats> {
        lock(&self.device).stats()
    }

    /// Device-wide drop counters.
    pub fn drops(&self) -> DropCounters {
        lock(&self.device).drops()
    }
}

impl Drop for Tunnel {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn send(udp: &UdpSocket, to: SocketAddr, datagram: &[u8]) {
    if let Err(e) = udp.send_to(datagram, to) {
        trace!(%to, error = %e, "UDP send failed");
    }
}

fn tun_to_udp(device: &Mutex<Device>, stop: &AtomicBool, tun: &Tun, udp: &UdpSocket) {
    let mut packet = vec![0u8; BUF_LEN];
    let mut out = vec![0u8; BUF_LEN];
    while !stop.load(Ordering::Relaxed) {
        match tun.wait_readable(Some(POLL)) {
            Ok(true) => {}
            Ok(false) => continue,
            Err(e) => {
                warn!(error = %e, "waiting on the TUN device");
                std::thread::sleep(POLL);
                continue;
            }
        }
        loop {
            let n = match tun.read(&mut packet) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    warn!(error = %e, "reading the TUN device");
                    break;
                }
            };
            let mut dev = lock(device);
            match dev.encapsulate(&packet[..n], &mut out) {
                Outcome::Network { to, datagram } => send(udp, to, datagram),
                Outcome::Dropped(reason) => trace!(%reason, "outgoing packet dropped"),
                Outcome::Done | Outcome::Tunnel { .. } => {}
            }
        }
    }
}

fn udp_to_tun(device: &Mutex<Device>, stop: &AtomicBool, tun: &Tun, udp: &UdpSocket) {
    let mut datagram = vec![0u8; BUF_LEN];
    let mut out = vec![0u8; BUF_LEN];
    while !stop.load(Ordering::Relaxed) {
        let (n, src) = match udp.recv_from(&mut datagram) {
            Ok(r) => r,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                continue
            }
            Err(e) => {
                warn!(error = %e, "receiving on the UDP socket");
                std::thread::sleep(POLL);
                continue;
            }
        };
        let mut dev = lock(device);
        match dev.decapsulate(src, &datagram[..n], &mut out) {
            Outcome::Tunnel { packet } => {
                if let Err(e) = tun.write(packet) {
                    trace!(error = %e, "TUN write failed");
                }
            }
            Outcome::Network { to, datagram } => send(udp, to, datagram),
            Outcome::Dropped(reason) => trace!(%src, %reason, "datagram dropped"),
            Outcome::Done => {}
        }
        // Packets that waited for the handshake this datagram completed.
        while let Outcome::Network { to, datagram } = dev.next_queued(&mut out) {
            send(udp, to, datagram);
        }
    }
}

fn timers(device: &Mutex<Device>, stop: &AtomicBool, udp: &UdpSocket) {
    let mut out = vec![0u8; BUF_LEN];
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(TIMER_TICK);
        lock(device).update_timers(&mut out, |to, datagram| send(udp, to, datagram));
    }
}
