//! The running tunnel: the sans-IO [`Device`] between the TUN device and
//! the UDP socket, driven by the data path's batched [`Runtime`] (per
//! worker a TUN → encrypt → UDP and a UDP → decrypt → TUN thread, plus a
//! timer thread; `recvmmsg`/`sendmmsg`, UDP GSO/GRO, and the TUN offloads
//! when the TUN was opened with them). The control plane talks to it
//! through [`Tunnel::apply_peers`] and reads [`Tunnel::stats`].
//!
//! The UDP socket may live in another network namespace than the TUN (the
//! node's, so the endpoint is `nodeIP:port` without NAT): it is created on a
//! short-lived thread that has entered that namespace, and keeps belonging
//! to it afterwards.

use std::collections::BTreeSet;
use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use ipnet::IpNet;
use sdn_tunnel_datapath::device::{
    Device, DropCounters, Outcome, PeerChange, PeerConfig, PeerStats,
};
use sdn_tunnel_datapath::io::tun::Tun;
use sdn_tunnel_datapath::io::udp::{UdpOptions, UdpSocket};
use sdn_tunnel_datapath::keys::PublicKey;
use sdn_tunnel_datapath::runtime::{Runtime, RuntimeConfig, DEFAULT_SOCKET_BUFFER};
use tracing::{debug, info};

/// Room for any handshake message.
const HANDSHAKE_BUF: usize = 256;
/// How often dead sessions of keepalive peers are re-armed (see
/// [`needs_handshake_rearm`]).
const REARM_EVERY: Duration = Duration::from_secs(5);
/// Peer changes applied per hold of the device lock (see
/// [`Tunnel::apply_peers`]).
const PEERS_PER_LOCK: usize = 32;
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
    /// Handshake initiations sent (first attempts and retries).
    pub fn handshake_initiations(&self) -> u64 {
        lock(&self.device).handshake_initiations()
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
/// `netns` when given (e.g. `/proc/1/ns/net`, `/run/netns/<name>`), with
/// UDP GSO/GRO where the kernel has them and large buffers. The runtime's
/// workers share it.
pub fn bind_udp(addr: SocketAddr, netns: Option<&Path>) -> io::Result<UdpSocket> {
    let mut opts = UdpOptions::new(addr);
    opts.netns = netns.map(Path::to_path_buf);
    opts.recv_buffer = Some(DEFAULT_SOCKET_BUFFER);
    opts.send_buffer = Some(DEFAULT_SOCKET_BUFFER);
    UdpSocket::bind(&opts)
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
    rt: Runtime,
}

fn lock(device: &Mutex<Device>) -> MutexGuard<'_, Device> {
    // A panic in one I/O thread must not take the others down with a
    // poisoned lock: the device's state is still consistent per call.
    device.lock().unwrap_or_else(|e| e.into_inner())
}

impl Tunnel {
    /// Starts the data path over `tun` and `udp`.
    pub fn start(device: Device, tun: Tun, udp: UdpSocket) -> io::Result<Tunnel> {
        let name = tun.name().to_owned();
        let rt = Runtime::start(
            device,
            tun,
            vec![udp],
            RuntimeConfig {
                tick: Some(rearm_hook()),
                ..RuntimeConfig::default()
            },
        )?;
        let local_addr = rt.local_addr();
        let (tun_offloads, udp_offloads) = rt.offloads();
        info!(%local_addr, workers = rt.workers(), ?tun_offloads, ?udp_offloads, "tunnel running");
        {
            let mut reg = RUNNING.lock().unwrap_or_else(|e| e.into_inner());
            reg.retain(|(_, d, _)| d.strong_count() > 0);
            reg.push((name, Arc::downgrade(rt.device()), local_addr));
        }
        Ok(Tunnel { rt })
    }

    /// Where the UDP socket listens.
    pub fn local_addr(&self) -> SocketAddr {
        self.rt.local_addr()
    }

    /// Applies a peer diff: adds or updates `upsert`, then removes `remove`
    /// (sessions of peers whose key and keepalive did not change are kept);
    /// every other peer is left alone. Returns the keys that could not be
    /// configured, with the reason.
    pub fn apply_peers(
        &self,
        upsert: &[TunnelPeer],
        remove: &[PublicKey],
    ) -> Vec<(PublicKey, String)> {
        let mut failed = Vec::new();
        let mut handshakes = Vec::new();
        // The device lock is taken per chunk, not for the whole diff: the
        // data path's threads get it between chunks, so a thousand new
        // peers (a Tunn each, an allowed-IPs update each) never stall the
        // packets of the others for long.
        let mut out = [0u8; HANDSHAKE_BUF];
        for chunk in upsert.chunks(PEERS_PER_LOCK) {
            let mut device = lock(self.rt.device());
            for p in chunk {
                let mut cfg = PeerConfig::new(p.public_key);
                cfg.endpoint = p.endpoint;
                cfg.allowed_ips = p.allowed_ips.clone();
                cfg.persistent_keepalive = p.persistent_keepalive;
                match device.set_peer(cfg) {
                    Ok(change) => {
                        debug!(peer = %p.public_key.to_base64(), ?change, "peer configured");
                        // Like the kernel with a persistent keepalive:
                        // handshake now, so the peer is up before traffic
                        // needs it.
                        if change != PeerChange::Updated && p.persistent_keepalive.is_some() {
                            if let Outcome::Network { to, datagram } =
                                device.initiate_handshake(&p.public_key, &mut out)
                            {
                                handshakes.push((to, datagram.to_vec()));
                            }
                        }
                    }
                    Err(e) => failed.push((p.public_key, e.to_string())),
                }
            }
        }
        // Removals last: a prefix that moves from a removed peer to a new
        // one (a node's key replaced) is held by one of them throughout.
        for chunk in remove.chunks(PEERS_PER_LOCK) {
            let mut device = lock(self.rt.device());
            for k in chunk {
                if device.remove_peer(k) {
                    debug!(peer = %k.to_base64(), "peer removed");
                }
            }
        }
        if !upsert.is_empty() || !remove.is_empty() {
            info!(
                configured = upsert.len() - failed.len(),
                removed = remove.len(),
                "peers changed"
            );
        }
        for (to, d) in handshakes {
            self.rt.send(to, &d);
        }
        if !remove.is_empty() {
            // Removed peers' sessions go back to the kernel, not only to
            // the allocator's free lists.
            sdn_tunnel_datapath::io::release_free_memory();
        }
        failed
    }

    /// Makes the device's peers exactly `peers` (a diff against what it
    /// holds, through [`Tunnel::apply_peers`]).
    pub fn set_peers(&self, peers: &[TunnelPeer]) -> Vec<(PublicKey, String)> {
        let wanted: BTreeSet<PublicKey> = peers.iter().map(|p| p.public_key).collect();
        let stale: Vec<PublicKey> = lock(self.rt.device())
            .peer_keys()
            .filter(|k| !wanted.contains(k))
            .copied()
            .collect();
        self.apply_peers(peers, &stale)
    }

    /// Counters of every peer.
    pub fn stats(&self) -> Vec<PeerStats> {
        self.rt.stats()
    }

    /// Device-wide drop counters.
    pub fn drops(&self) -> DropCounters {
        self.rt.drops()
    }

    /// Read access for telemetry.
    pub fn view(&self) -> TunnelView {
        TunnelView {
            device: Arc::clone(self.rt.device()),
            local_addr: self.rt.local_addr(),
        }
    }

    /// Runs `f` on the device, locked (UAPI `set` in standalone mode).
    pub fn with_device_mut<R>(&self, f: impl FnOnce(&mut Device) -> R) -> R {
        self.rt.with_device_mut(f)
    }

    /// Starts a handshake with `key` now (a keepalive just turned on).
    pub fn initiate_handshake(&self, key: &PublicKey) {
        self.rt.initiate_handshake(key);
    }

    /// Stops the threads and hands back the device and the TUN, to start
    /// them again on another socket (UAPI `listen_port`). Telemetry views
    /// ([`running`]) are held for microseconds; one still held after a
    /// second makes this fail, and the tunnel stays stopped.
    pub fn into_parts(self) -> io::Result<(Device, Tun)> {
        self.rt.into_parts()
    }

    /// The UDP socket (to set `SO_MARK` for UAPI `fwmark`); the only one:
    /// the runtime's workers share it.
    pub fn udp_socket(&self) -> &UdpSocket {
        self.rt.udp_socket()
    }
}

/// Runs on the timer thread every tick: re-arms the handshake of keepalive
/// peers without a live session (see [`needs_handshake_rearm`]) every
/// [`REARM_EVERY`].
fn rearm_hook() -> sdn_tunnel_datapath::runtime::TickHook {
    let mut last_rearm = Instant::now();
    let mut out = [0u8; HANDSHAKE_BUF];
    Box::new(
        move |dev: &mut Device, send: &mut dyn FnMut(SocketAddr, &[u8])| {
            if last_rearm.elapsed() < REARM_EVERY {
                return;
            }
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
                    send(to, datagram);
                }
            }
        },
    )
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
            last_receive_age: None,
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
