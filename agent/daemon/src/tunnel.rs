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
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

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
/// How often dead sessions of keepalive peers are re-armed (see
/// [`needs_handshake_rearm`]).
const REARM_EVERY: Duration = Duration::from_secs(5);
/// A session older than this is dead (WireGuard's REJECT_AFTER_TIME).
pub const SESSION_DEAD_AFTER: Duration = Duration::from_secs(180);

/// Whether the timer thread should start a handshake with this peer now.
/// boringtun stops retrying after 90 s of failed handshakes (REKEY_ATTEMPT_TIME)
/// even with a persistent keepalive, until traffic comes; the kernel keeps
/// trying. So a peer that has a keepalive and an endpoint but no live
/// session (none, or older than [`SESSION_DEAD_AFTER`]) is re-armed. While
/// a handshake is in flight boringtun ignores the request, so this never
/// speeds up its own retry schedule.
pub fn needs_handshake_rearm(peer: &PeerStats) -> bool {
    peer.persistent_keepalive.is_some_and(|k| k > 0)
        && peer.endpoint.is_some()
        && peer
            .last_handshake_age
            .is_none_or(|age| age > SESSION_DEAD_AFTER)
}

/// Tunnels running in this process, by TUN name, so that telemetry started
/// beside the control plane (`/metrics`, UAPI `get` under `run`) finds the
/// tunnel that `agent::run` creates. Weak: it never keeps a device alive.
static RUNNING: Mutex<Vec<Running>> = Mutex::new(Vec::new());
/// TUN name, device, UDP address.
type Running = (String, Weak<Mutex<Device>>, SocketAddr);

/// Read access to a running tunnel's device (see [`running`]).
#[derive(Clone)]
pub struct TunnelView {
    device: Arc<Mutex<Device>>,
    local_addr: SocketAddr,
}

impl TunnelView {
    /// Counters of every peer.
    pub fn stats(&self) -> Vec<PeerStats> {
        lock(&self.device).stats()
    }
    /// Device-wide drop counters.
    pub fn drops(&self) -> DropCounters {
        lock(&self.device).drops()
    }
    /// The device's public key.
    pub fn public_key(&self) -> PublicKey {
        lock(&self.device).public_key()
    }
    /// Where the UDP socket listens.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }
    /// Runs `f` on the device, locked: reads that need several calls
    /// consistent with each other (UAPI `get`).
    pub fn with_device<R>(&self, f: impl FnOnce(&Device) -> R) -> R {
        f(&lock(&self.device))
    }
}

/// The tunnel running in this process on TUN `interface`, if any.
pub fn running(interface: &str) -> Option<TunnelView> {
    let reg = RUNNING.lock().unwrap_or_else(|e| e.into_inner());
    reg.iter().rev().find_map(|(name, device, local_addr)| {
        (name == interface)
            .then(|| device.upgrade())
            .flatten()
            .map(|device| TunnelView {
                device,
                local_addr: *local_addr,
            })
    })
}

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
    tun: Arc<Tun>,
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
        {
            let mut reg = RUNNING.lock().unwrap_or_else(|e| e.into_inner());
            reg.retain(|(_, d, _)| d.strong_count() > 0);
            reg.push((tun.name().to_owned(), Arc::downgrade(&device), local_addr));
        }
        Ok(Tunnel {
            device,
            stop,
            threads,
            local_addr,
            udp,
            tun,
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

    /// Read access for telemetry.
    pub fn view(&self) -> TunnelView {
        TunnelView {
            device: self.device.clone(),
            local_addr: self.local_addr,
        }
    }

    /// Runs `f` on the device, locked (UAPI `set` in standalone mode).
    pub fn with_device_mut<R>(&self, f: impl FnOnce(&mut Device) -> R) -> R {
        f(&mut lock(&self.device))
    }

    /// Starts a handshake with `key` now (a keepalive just turned on).
    pub fn initiate_handshake(&self, key: &PublicKey) {
        let mut out = vec![0u8; BUF_LEN];
        if let Outcome::Network { to, datagram } =
            lock(&self.device).initiate_handshake(key, &mut out)
        {
            send(&self.udp, to, datagram);
        }
    }

    /// Stops the threads and hands back the device and the TUN, to start
    /// them again on another socket (UAPI `listen_port`). Telemetry views
    /// ([`running`]) are held for microseconds; one still held after a
    /// second makes this fail, and the tunnel stays stopped.
    pub fn into_parts(mut self) -> io::Result<(Device, Tun)> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        let mut device = self.device.clone();
        let tun = self.tun.clone();
        drop(self);
        let deadline = Instant::now() + Duration::from_secs(1);
        let device = loop {
            match Arc::try_unwrap(device) {
                Ok(m) => break m.into_inner().unwrap_or_else(|e| e.into_inner()),
                Err(d) if Instant::now() < deadline => {
                    device = d;
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(_) => return Err(io::Error::other("the device is still in use")),
            }
        };
        let tun = Arc::try_unwrap(tun).map_err(|_| io::Error::other("the TUN is still in use"))?;
        Ok((device, tun))
    }

    /// The UDP socket (to set `SO_MARK` for UAPI `fwmark`).
    pub fn udp_socket(&self) -> &UdpSocket {
        &self.udp
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
                    // Do not spin on a persistent error.
                    std::thread::sleep(POLL);
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
    let mut last_rearm = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(TIMER_TICK);
        let mut dev = lock(device);
        dev.update_timers(&mut out, |to, datagram| send(udp, to, datagram));
        if last_rearm.elapsed() >= REARM_EVERY {
            last_rearm = Instant::now();
            let dead: Vec<PublicKey> = dev
                .stats()
                .iter()
                .filter(|p| needs_handshake_rearm(p))
                .map(|p| p.public_key)
                .collect();
            for key in dead {
                if let Outcome::Network { to, datagram } = dev.initiate_handshake(&key, &mut out) {
                    debug!(peer = %key.to_base64(), "no live session: handshake re-armed");
                    send(udp, to, datagram);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(keepalive: Option<u16>, endpoint: bool, age: Option<u64>) -> PeerStats {
        PeerStats {
            public_key: PublicKey::from_bytes([7; 32]),
            endpoint: endpoint.then(|| SocketAddr::from(([192, 0, 2, 1], 51820))),
            allowed_ips: Vec::new(),
            persistent_keepalive: keepalive,
            rx_packets: 0,
            rx_bytes: 0,
            tx_packets: 0,
            tx_bytes: 0,
            last_handshake_age: age.map(Duration::from_secs),
            handshake_rtt: None,
        }
    }

    #[test]
    fn rearm_only_keepalive_peers_with_endpoint_and_no_live_session() {
        // Never handshaked, or the session is past REJECT_AFTER_TIME.
        assert!(needs_handshake_rearm(&peer(Some(25), true, None)));
        assert!(needs_handshake_rearm(&peer(Some(25), true, Some(181))));
        // A live session (rekeyed every 120 s) is left to boringtun.
        assert!(!needs_handshake_rearm(&peer(Some(25), true, Some(0))));
        assert!(!needs_handshake_rearm(&peer(Some(25), true, Some(180))));
        // No keepalive: handshakes wait for traffic, as in WireGuard.
        assert!(!needs_handshake_rearm(&peer(None, true, None)));
        assert!(!needs_handshake_rearm(&peer(Some(0), true, None)));
        // Nowhere to send.
        assert!(!needs_handshake_rearm(&peer(Some(25), false, None)));
    }
}
