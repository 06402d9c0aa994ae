//! The fast runtime: the sans-IO [`Device`] between a TUN device and a group
//! of UDP sockets, with batched syscalls and the Linux offloads.
//!
//! Threads (see [`RuntimeConfig::workers`]):
//!
//! - per worker, one **TUN → UDP** thread on its own TUN queue
//!   (`IFF_MULTI_QUEUE`): [`Tun::read_packets`] returns a TSO/USO
//!   super-packet already split into MTU-sized packets (or one packet
//!   without offloads); every packet is encrypted straight into a
//!   [`SendBatch`] (no copy), frames are read until the queue is empty or
//!   the batch is full, and the batch leaves in one `sendmmsg` where a run
//!   of equal-size datagrams to one endpoint is one UDP GSO message;
//! - per worker, one **UDP → TUN** thread on its own `SO_REUSEPORT` socket:
//!   one `recvmmsg` (with UDP GRO, each message may carry up to 64
//!   datagrams), every datagram decrypted straight into a [`GroBatch`]
//!   slot, and the batch written with [`Tun::write_batch`], which coalesces
//!   the TCP segments of a flow into one super-packet (one `writev`) when
//!   the TUN accepted TSO;
//! - one **timer** thread (boringtun's timers every 100 ms, plus an optional
//!   hook for the caller's periodic work).
//!
//! Locking: the device is one `Mutex<Device>` (its API is `&mut self`), but
//! it is taken once per TUN frame and once per `recvmmsg` batch, never
//! around a syscall, so a lock round trip is paid per 1–64 packets instead
//! of per packet. Encryption of one super-packet (~45 packets × ~0.7 µs)
//! is the longest hold; the other direction's thread waits at most that.
//!
//! Each buffer is allocated once per thread at start; the loops do not
//! allocate (except inside boringtun while a handshake is pending).
//!
//! Without offloads (a TUN without `IFF_VNET_HDR`, a kernel without UDP
//! GSO/GRO) the same loops move one packet per TUN read/write and one
//! datagram per `mmsghdr`: the fallbacks live in [`crate::io`].

use std::collections::BTreeSet;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::device::{Device, DropCounters, Outcome, PeerChange, PeerConfig, PeerStats};
use crate::io::offload::GroBatch;
use crate::io::tun::{Tun, TunOffloads, TunReadBuf};
use crate::io::udp::{RecvBatch, SendBatch, UdpOffloads, UdpOptions, UdpSocket, GRO_SLOT_SIZE};
use crate::keys::PublicKey;

/// How often threads blocked in `poll` look at the stop flag.
const POLL: Duration = Duration::from_millis(200);
/// boringtun's timers want a tick every 100–250 ms.
const TIMER_TICK: Duration = Duration::from_millis(100);
/// Largest IP packet (and so largest datagram payload) handled.
const MAX_PACKET: usize = 65_535;
/// Scratch buffers hold the largest packet plus WireGuard's overhead.
const SCRATCH: usize = MAX_PACKET + 256;
/// Most packets one TUN super-packet may split into.
const MAX_SEGMENTS: usize = 128;
/// `recvmmsg` messages per call on a socket with UDP GRO (each up to 64 KiB).
const RECV_MSGS_GRO: usize = 16;
/// `recvmmsg` messages per call without GRO.
const RECV_MSGS_PLAIN: usize = 64;
/// Decrypted packets queued before they are written to the TUN.
const GRO_CAPACITY: usize = 128;
/// TUN frames that fit in one send batch (bounds the batch's memory and
/// the latency added by batching).
const FRAMES_PER_SEND: usize = 3;
/// Decrypted datagrams (anything but TCP) written to the TUN before the
/// receive thread flushes and yields. Why: with the kernel's default buffer
/// a receiving application's UDP socket holds about 90 datagrams (212 KB at
/// ~2.3 KB per datagram). After this thread was held up, our own (large)
/// socket holds a backlog that we decrypt and write faster than the
/// application reads: written in one go, it overflows the application's
/// socket. Writing at most this many and then yielding lets an application
/// that was woken on this CPU drain its socket in between. Measured on the
/// bench's UDP test (1 Gbit/s, 2 cores): loss at the application's socket
/// 2.6 % → 0.7–0.8 %. TCP is flow-controlled and keeps the whole batch, so
/// its GRO super-packets stay large.
const DATAGRAM_BURST: usize = 32;

/// Socket buffer sizes [`Runtime::bind`] asks for when the options leave
/// them unset: a 1 Gbit/s burst of 1.4 KB datagrams fills the kernel's
/// default (~200 KB) in under 2 ms, which a descheduled worker easily
/// misses. Memory is only used while datagrams wait.
pub const DEFAULT_SOCKET_BUFFER: usize = 4 << 20;

/// Periodic work of the caller, run on the timer thread every tick with the
/// device locked; datagrams handed to `send` go out on the first socket.
pub type TickHook = Box<dyn FnMut(&mut Device, &mut dyn FnMut(SocketAddr, &[u8])) + Send>;

/// Runtime settings (`Default`: everything picked at start).
#[derive(Default)]
pub struct RuntimeConfig {
    /// Worker count; each worker is one TUN → UDP and one UDP → TUN
    /// thread. `0` picks [`default_workers`].
    pub workers: usize,
    /// Slot size of the packet buffers: packets up to this size take the
    /// batched path, larger ones (a TUN MTU above it) a slower one-by-one
    /// path. `0` picks `max(2048, TUN MTU + 64)` at start.
    pub stride: usize,
    /// Called on every timer tick (100 ms) after boringtun's timers.
    pub tick: Option<TickHook>,
}

impl std::fmt::Debug for RuntimeConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RuntimeConfig")
            .field("workers", &self.workers)
            .field("stride", &self.stride)
            .field("tick", &self.tick.is_some())
            .finish()
    }
}

/// Workers for this machine: one per two CPUs (each worker is two busy
/// threads, and on a small machine the applications and the kernel's
/// network stack need the other cores), at least one.
pub fn default_workers() -> usize {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    (cpus / 2).max(1)
}

/// Whether an IP packet is TCP (IPv4 protocol / IPv6 next header 6; an
/// IPv6 packet with extension headers counts as not TCP, which only means
/// it is paced like a datagram).
fn is_tcp(packet: &[u8]) -> bool {
    const TCP: u8 = 6;
    match packet.first().map(|b| b >> 4) {
        Some(4) => packet.get(9) == Some(&TCP),
        Some(6) => packet.get(6) == Some(&TCP),
        _ => false,
    }
}

/// I/O counters of a runtime (device counters are in [`Device`]).
#[derive(Debug, Default)]
struct Counters {
    tun_frames_read: AtomicU64,
    tun_packets_read: AtomicU64,
    tun_bad_frames: AtomicU64,
    tun_frames_written: AtomicU64,
    tun_packets_written: AtomicU64,
    tun_coalesced_frames: AtomicU64,
    tun_write_failed: AtomicU64,
    udp_msgs_received: AtomicU64,
    udp_datagrams_received: AtomicU64,
    udp_truncated: AtomicU64,
    udp_datagrams_sent: AtomicU64,
    udp_gso_messages: AtomicU64,
    udp_send_syscalls: AtomicU64,
    udp_send_failed: AtomicU64,
    oversized_packets: AtomicU64,
}

/// A snapshot of the runtime's I/O counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IoStats {
    /// Frames read from the TUN (a super-packet is one frame).
    pub tun_frames_read: u64,
    /// Packets in them, after splitting.
    pub tun_packets_read: u64,
    /// Frames that could not be split (dropped).
    pub tun_bad_frames: u64,
    /// Frames written to the TUN (a coalesced super-packet is one).
    pub tun_frames_written: u64,
    /// Packets in them.
    pub tun_packets_written: u64,
    /// Written frames that carried several coalesced segments.
    pub tun_coalesced_frames: u64,
    /// Packets the TUN refused.
    pub tun_write_failed: u64,
    /// `recvmmsg` messages (a GRO message carries several datagrams).
    pub udp_msgs_received: u64,
    /// Datagrams in them.
    pub udp_datagrams_received: u64,
    /// Messages cut by a too small slot (dropped).
    pub udp_truncated: u64,
    /// Datagrams handed to the kernel.
    pub udp_datagrams_sent: u64,
    /// GSO messages among them (each carrying several datagrams).
    pub udp_gso_messages: u64,
    /// `sendmmsg` calls.
    pub udp_send_syscalls: u64,
    /// Datagrams the kernel refused.
    pub udp_send_failed: u64,
    /// Packets larger than the stride that took the one-by-one path.
    pub oversized_packets: u64,
}

impl Counters {
    fn snapshot(&self) -> IoStats {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        IoStats {
            tun_frames_read: g(&self.tun_frames_read),
            tun_packets_read: g(&self.tun_packets_read),
            tun_bad_frames: g(&self.tun_bad_frames),
            tun_frames_written: g(&self.tun_frames_written),
            tun_packets_written: g(&self.tun_packets_written),
            tun_coalesced_frames: g(&self.tun_coalesced_frames),
            tun_write_failed: g(&self.tun_write_failed),
            udp_msgs_received: g(&self.udp_msgs_received),
            udp_datagrams_received: g(&self.udp_datagrams_received),
            udp_truncated: g(&self.udp_truncated),
            udp_datagrams_sent: g(&self.udp_datagrams_sent),
            udp_gso_messages: g(&self.udp_gso_messages),
            udp_send_syscalls: g(&self.udp_send_syscalls),
            udp_send_failed: g(&self.udp_send_failed),
            oversized_packets: g(&self.oversized_packets),
        }
    }

    fn add(a: &AtomicU64, n: usize) {
        if n > 0 {
            a.fetch_add(n as u64, Ordering::Relaxed);
        }
    }

    fn count_send(&self, r: &crate::io::udp::SendReport) {
        Self::add(&self.udp_datagrams_sent, r.sent);
        Self::add(&self.udp_gso_messages, r.gso_messages);
        Self::add(&self.udp_send_syscalls, r.syscalls);
        Self::add(&self.udp_send_failed, r.failed);
    }

    fn count_tun_write(&self, r: &crate::io::tun::TunWriteReport) {
        Self::add(&self.tun_frames_written, r.frames);
        Self::add(&self.tun_packets_written, r.packets);
        Self::add(&self.tun_coalesced_frames, r.coalesced_frames);
        Self::add(&self.tun_write_failed, r.failed);
    }
}

fn lock(device: &Mutex<Device>) -> MutexGuard<'_, Device> {
    // A panic in one thread must not stop the others: the device is
    // consistent between calls.
    device.lock().unwrap_or_else(|e| e.into_inner())
}

/// A running data path; dropping it stops and joins its threads.
pub struct Runtime {
    device: Arc<Mutex<Device>>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    udp: Vec<Arc<UdpSocket>>,
    /// The TUN queue handed to [`Runtime::start`] (returned by
    /// [`Runtime::into_parts`]); extra queues live in the worker threads.
    tun: Arc<Tun>,
    counters: Arc<Counters>,
    workers: usize,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime")
            .field("tun", &self.tun.name())
            .field("local_addr", &self.local_addr())
            .field("workers", &self.workers)
            .finish_non_exhaustive()
    }
}

impl Runtime {
    /// Starts the threads over `device`, the TUN queue `tun` and the UDP
    /// sockets `udp` (one or more, e.g. from [`UdpSocket::bind_group`]
    /// with one socket per worker; the sockets are shared round-robin when
    /// there are fewer than workers). With a multi-queue TUN every extra
    /// worker opens its own queue, so this must run in the TUN's network
    /// namespace (the sockets may belong to another one).
    pub fn start(
        device: Device,
        tun: Tun,
        udp: Vec<UdpSocket>,
        mut config: RuntimeConfig,
    ) -> io::Result<Runtime> {
        if udp.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "the runtime needs at least one UDP socket",
            ));
        }
        let workers = if config.workers == 0 {
            default_workers()
        } else {
            config.workers
        };
        let stride = if config.stride == 0 {
            let mtu = tun.mtu().unwrap_or(1500) as usize;
            (mtu + 64).max(2048).next_multiple_of(64)
        } else {
            config.stride.max(256)
        };
        let tun = Arc::new(tun);
        let mut queues = vec![Arc::clone(&tun)];
        for _ in 1..workers {
            if tun.is_multi_queue() {
                queues.push(Arc::new(tun.clone_queue()?));
            } else {
                queues.push(Arc::clone(&tun));
            }
        }
        let udp: Vec<Arc<UdpSocket>> = udp.into_iter().map(Arc::new).collect();
        let device = Arc::new(Mutex::new(device));
        let stop = Arc::new(AtomicBool::new(false));
        let counters = Arc::new(Counters::default());
        let mut rt = Runtime {
            device,
            stop,
            threads: Vec::new(),
            udp,
            tun,
            counters,
            workers,
        };
        // From here on, a failed spawn drops `rt`, which stops the threads
        // already started.
        for (w, queue) in queues.into_iter().enumerate() {
            let sock = Arc::clone(&rt.udp[w % rt.udp.len()]);
            let ctx = Ctx {
                device: Arc::clone(&rt.device),
                stop: Arc::clone(&rt.stop),
                counters: Arc::clone(&rt.counters),
                tun: queue,
                udp: sock,
                stride,
            };
            let rx = ctx.clone();
            rt.threads.push(
                std::thread::Builder::new()
                    .name(format!("wg-tx-{w}"))
                    .spawn(move || ctx.tun_to_udp())?,
            );
            rt.threads.push(
                std::thread::Builder::new()
                    .name(format!("wg-rx-{w}"))
                    .spawn(move || rx.udp_to_tun())?,
            );
        }
        let ctx = Ctx {
            device: Arc::clone(&rt.device),
            stop: Arc::clone(&rt.stop),
            counters: Arc::clone(&rt.counters),
            tun: Arc::clone(&rt.tun),
            udp: Arc::clone(&rt.udp[0]),
            stride,
        };
        let tick = config.tick.take();
        rt.threads.push(
            std::thread::Builder::new()
                .name("wg-timers".into())
                .spawn(move || ctx.timers(tick))?,
        );
        Ok(rt)
    }

    /// Binds one UDP socket per worker as `opts` says (`SO_REUSEPORT`
    /// group; buffers of [`DEFAULT_SOCKET_BUFFER`] unless set; inside
    /// `opts.netns` when given) and starts the runtime over them.
    pub fn bind(
        device: Device,
        tun: Tun,
        opts: &UdpOptions,
        mut config: RuntimeConfig,
    ) -> io::Result<Runtime> {
        if config.workers == 0 {
            config.workers = default_workers();
        }
        let mut opts = opts.clone();
        opts.recv_buffer = opts.recv_buffer.or(Some(DEFAULT_SOCKET_BUFFER));
        opts.send_buffer = opts.send_buffer.or(Some(DEFAULT_SOCKET_BUFFER));
        let udp = UdpSocket::bind_group(&opts, config.workers)?;
        Runtime::start(device, tun, udp, config)
    }

    /// The device, shared with the worker threads (hold it briefly: the
    /// data path waits while it is locked).
    pub fn device(&self) -> &Arc<Mutex<Device>> {
        &self.device
    }

    /// Runs `f` on the locked device.
    pub fn with_device<R>(&self, f: impl FnOnce(&Device) -> R) -> R {
        f(&lock(&self.device))
    }

    /// Runs `f` on the locked device, mutably (configuration changes).
    pub fn with_device_mut<R>(&self, f: impl FnOnce(&mut Device) -> R) -> R {
        f(&mut lock(&self.device))
    }

    /// Where the UDP sockets listen.
    pub fn local_addr(&self) -> SocketAddr {
        self.udp[0].local_addr()
    }

    /// The first UDP socket (the one control traffic leaves on; the only
    /// one when the workers share a socket).
    pub fn udp_socket(&self) -> &UdpSocket {
        &self.udp[0]
    }

    /// The UDP sockets (to set `SO_MARK` and the like on each).
    pub fn udp_sockets(&self) -> impl Iterator<Item = &UdpSocket> + '_ {
        self.udp.iter().map(|s| &**s)
    }

    /// Offloads in effect: the TUN's and the first socket's.
    pub fn offloads(&self) -> (TunOffloads, UdpOffloads) {
        (self.tun.offloads(), self.udp[0].offloads())
    }

    /// Number of workers running.
    pub fn workers(&self) -> usize {
        self.workers
    }

    /// Makes the device's peers exactly `peers`: adds and updates them
    /// (sessions of unchanged peers are kept) and removes the others. A
    /// peer that is new or was recreated and has a persistent keepalive
    /// handshakes at once, as the kernel does. Returns the peers that could
    /// not be configured, with the reason.
    pub fn set_peers(&self, peers: &[PeerConfig]) -> Vec<(PublicKey, String)> {
        let mut out = vec![0u8; crate::device::MIN_OUT_BUFFER];
        let mut to_send: Vec<(SocketAddr, Vec<u8>)> = Vec::new();
        let mut failed = Vec::new();
        {
            let mut dev = lock(&self.device);
            let wanted: BTreeSet<PublicKey> = peers.iter().map(|p| p.public_key).collect();
            let stale: Vec<PublicKey> = dev
                .peer_keys()
                .filter(|k| !wanted.contains(k))
                .copied()
                .collect();
            for k in stale {
                dev.remove_peer(&k);
            }
            for p in peers {
                match dev.set_peer(p.clone()) {
                    Ok(change) => {
                        if change != PeerChange::Updated && p.persistent_keepalive.is_some() {
                            if let Outcome::Network { to, datagram } =
                                dev.initiate_handshake(&p.public_key, &mut out)
                            {
                                to_send.push((to, datagram.to_vec()));
                            }
                        }
                    }
                    Err(e) => failed.push((p.public_key, e.to_string())),
                }
            }
        }
        for (to, d) in to_send {
            self.send(to, &d);
        }
        failed
    }

    /// Starts a handshake with `key` now (e.g. a keepalive was turned on).
    pub fn initiate_handshake(&self, key: &PublicKey) {
        let mut out = [0u8; crate::device::MIN_OUT_BUFFER];
        let msg = match lock(&self.device).initiate_handshake(key, &mut out) {
            Outcome::Network { to, datagram } => Some((to, datagram.len())),
            _ => None,
        };
        if let Some((to, n)) = msg {
            self.send(to, &out[..n]);
        }
    }

    /// Sends one datagram on the first socket (control traffic).
    pub fn send(&self, to: SocketAddr, datagram: &[u8]) {
        let mut b = SendBatch::new(1, datagram.len().max(1));
        if b.push(to, datagram).is_ok() {
            let r = self.udp[0].send_batch(&mut b);
            self.counters.count_send(&r);
        }
    }

    /// Counters of every peer.
    pub fn stats(&self) -> Vec<PeerStats> {
        lock(&self.device).stats()
    }

    /// Device-wide drop counters.
    pub fn drops(&self) -> DropCounters {
        lock(&self.device).drops()
    }

    /// The runtime's I/O counters.
    pub fn io_stats(&self) -> IoStats {
        self.counters.snapshot()
    }

    fn stop_threads(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }

    /// Stops the threads and hands back the device and the TUN queue given
    /// to [`Runtime::start`] (to start again on other sockets). Fails when
    /// someone still holds [`Runtime::device`] after a second.
    pub fn into_parts(mut self) -> io::Result<(Device, Tun)> {
        self.stop_threads();
        let mut device = Arc::clone(&self.device);
        let tun = Arc::clone(&self.tun);
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
}

impl Drop for Runtime {
    fn drop(&mut self) {
        self.stop_threads();
    }
}

/// What one worker thread works with.
#[derive(Clone)]
struct Ctx {
    device: Arc<Mutex<Device>>,
    stop: Arc<AtomicBool>,
    counters: Arc<Counters>,
    tun: Arc<Tun>,
    udp: Arc<UdpSocket>,
    stride: usize,
}

impl Ctx {
    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    fn flush_udp(&self, batch: &mut SendBatch) {
        if !batch.is_empty() {
            let r = self.udp.send_batch(batch);
            self.counters.count_send(&r);
        }
    }

    fn flush_tun(&self, batch: &mut GroBatch) {
        if !batch.is_empty() {
            let r = self.tun.write_batch(batch);
            self.counters.count_tun_write(&r);
        }
    }

    /// TUN → encrypt → UDP.
    fn tun_to_udp(self) {
        let mut rb = TunReadBuf::new(self.stride, MAX_SEGMENTS);
        // One frame's worth: its packets, each with WireGuard's overhead.
        let frame_bytes =
            MAX_PACKET + MAX_SEGMENTS * (crate::device::DATA_OVERHEAD + 128) + SCRATCH;
        let slots = FRAMES_PER_SEND * MAX_SEGMENTS;
        let mut batch = SendBatch::new(slots, FRAMES_PER_SEND * frame_bytes);
        while !self.stopped() {
            // Fill: read frames until the queue is empty or the batch could
            // not take another one.
            let mut idle = false;
            while batch.len() + MAX_SEGMENTS <= slots && batch.has_room(frame_bytes) {
                match self.tun.read_packets(&mut rb) {
                    Ok(n) => {
                        Counters::add(&self.counters.tun_frames_read, 1);
                        Counters::add(&self.counters.tun_packets_read, n);
                        let mut dev = lock(&self.device);
                        for pkt in rb.iter() {
                            encapsulate_into(&mut dev, pkt, &mut batch);
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        idle = true;
                        break;
                    }
                    Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                        Counters::add(&self.counters.tun_bad_frames, 1);
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => {
                        // A persistent error (device gone): do not spin.
                        std::thread::sleep(POLL);
                        idle = true;
                        break;
                    }
                }
                if self.stopped() {
                    break;
                }
            }
            self.flush_udp(&mut batch);
            if idle {
                let _ = self.tun.wait_readable(Some(POLL));
            }
        }
    }

    /// UDP → decrypt → TUN.
    fn udp_to_tun(self) {
        let gro = self.udp.offloads().gro;
        let mut rb = if gro {
            RecvBatch::new(RECV_MSGS_GRO, GRO_SLOT_SIZE)
        } else {
            RecvBatch::new(RECV_MSGS_PLAIN, GRO_SLOT_SIZE)
        };
        let mut packets = GroBatch::new(GRO_CAPACITY, self.stride);
        let mut replies = SendBatch::new(64, 64 * 256 + SCRATCH);
        let mut scratch = vec![0u8; SCRATCH];
        // Datagrams written since the last yield (see DATAGRAM_BURST).
        let mut datagrams_pending = 0usize;
        while !self.stopped() {
            match self.udp.recv_batch(&mut rb) {
                Ok(n) => {
                    Counters::add(&self.counters.udp_msgs_received, n);
                    let mut datagrams = 0;
                    let mut dev = lock(&self.device);
                    for i in 0..n {
                        if rb.is_truncated(i) {
                            Counters::add(&self.counters.udp_truncated, 1);
                        }
                    }
                    for (src, d) in rb.datagrams() {
                        datagrams += 1;
                        if d.len() > self.stride {
                            // Larger than a slot: keep the order, then take
                            // the one-by-one path.
                            drop(dev);
                            self.flush_tun(&mut packets);
                            dev = lock(&self.device);
                            Counters::add(&self.counters.oversized_packets, 1);
                            match dev.decapsulate(src, d, &mut scratch) {
                                Outcome::Tunnel { packet } => {
                                    // The plaintext is 32 bytes shorter
                                    // and may fit a slot after all.
                                    if !packets.push(packet) {
                                        match self.tun.write(packet) {
                                            Ok(_) => {
                                                Counters::add(&self.counters.tun_packets_written, 1)
                                            }
                                            Err(_) => {
                                                Counters::add(&self.counters.tun_write_failed, 1)
                                            }
                                        }
                                    }
                                }
                                Outcome::Network { to, datagram } => {
                                    push_reply(&self, &mut replies, to, datagram)
                                }
                                Outcome::Done | Outcome::Dropped(_) => {}
                            }
                            continue;
                        }
                        if packets.is_full() {
                            drop(dev);
                            self.flush_tun(&mut packets);
                            datagrams_pending = 0;
                            dev = lock(&self.device);
                        }
                        let spare = packets.spare();
                        let base = spare.as_ptr() as usize;
                        let landed = match dev.decapsulate(src, d, spare) {
                            Outcome::Tunnel { packet } => {
                                Some((packet.as_ptr() as usize - base, packet.len()))
                            }
                            Outcome::Network { to, datagram } => {
                                push_reply(&self, &mut replies, to, datagram);
                                None
                            }
                            Outcome::Done | Outcome::Dropped(_) => None,
                        };
                        if let Some((off, len)) = landed {
                            if off != 0 {
                                // Not at the slot's start (never with
                                // boringtun 0.7): move it there.
                                packets.spare().copy_within(off..off + len, 0);
                            }
                            let datagram = !is_tcp(&packets.spare()[..len]);
                            packets.commit(len);
                            if datagram {
                                datagrams_pending += 1;
                                if datagrams_pending >= DATAGRAM_BURST {
                                    drop(dev);
                                    self.flush_tun(&mut packets);
                                    datagrams_pending = 0;
                                    std::thread::yield_now();
                                    dev = lock(&self.device);
                                }
                            }
                        }
                    }
                    // Packets that waited for a handshake this batch completed.
                    loop {
                        match dev.next_queued(&mut scratch) {
                            Outcome::Network { to, datagram } => {
                                push_reply(&self, &mut replies, to, datagram)
                            }
                            Outcome::Dropped(_) => {}
                            _ => break,
                        }
                    }
                    drop(dev);
                    Counters::add(&self.counters.udp_datagrams_received, datagrams);
                    self.flush_tun(&mut packets);
                    self.flush_udp(&mut replies);
                    if datagrams_pending > 0 {
                        // See DATAGRAM_BURST.
                        datagrams_pending = 0;
                        std::thread::yield_now();
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let _ = self.udp.wait_readable(Some(POLL));
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    // Not expected on an unconnected socket; do not spin
                    // on a persistent error.
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        }
    }

    /// boringtun's timers (handshakes, keepalives, expiry) and the hook.
    fn timers(self, mut tick: Option<TickHook>) {
        let mut out = vec![0u8; SCRATCH];
        let mut batch = SendBatch::new(256, 256 * 256);
        let mut next = Instant::now() + TIMER_TICK;
        while !self.stopped() {
            let now = Instant::now();
            if now < next {
                std::thread::sleep((next - now).min(POLL));
                continue;
            }
            next += TIMER_TICK;
            if next < now {
                next = now + TIMER_TICK;
            }
            {
                let mut dev = lock(&self.device);
                let mut push = |to: SocketAddr, d: &[u8]| {
                    // Full only with hundreds of peers due in one tick;
                    // boringtun retries what it still wants next tick.
                    let _ = batch.push(to, d);
                };
                dev.update_timers(&mut out, &mut push);
                if let Some(hook) = tick.as_mut() {
                    hook(&mut dev, &mut push);
                }
            }
            self.flush_udp(&mut batch);
        }
    }
}

/// Encrypts `pkt` into the batch's spare room and queues the datagram.
fn encapsulate_into(dev: &mut Device, pkt: &[u8], batch: &mut SendBatch) {
    let spare = batch.spare();
    let base = spare.as_ptr();
    let msg = match dev.encapsulate(pkt, spare) {
        Outcome::Network { to, datagram } => {
            let off = datagram.as_ptr() as usize - base as usize;
            Some((to, off, datagram.len()))
        }
        Outcome::Done | Outcome::Tunnel { .. } | Outcome::Dropped(_) => None,
    };
    if let Some((to, off, len)) = msg {
        if off == 0 {
            let _ = batch.commit(to, len);
        } else {
            // Output not at the start of the buffer: move it there.
            let spare = batch.spare();
            spare.copy_within(off..off + len, 0);
            let _ = batch.commit(to, len);
        }
    }
}

fn push_reply(ctx: &Ctx, replies: &mut SendBatch, to: SocketAddr, datagram: &[u8]) {
    if replies.push(to, datagram).is_err() {
        ctx.flush_udp(replies);
        let _ = replies.push(to, datagram);
    }
}

#[cfg(test)]
mod tests {
    use super::is_tcp;

    #[test]
    fn tcp_is_told_from_datagrams_by_the_ip_header() {
        let mut v4 = [0u8; 40];
        v4[0] = 0x45;
        v4[9] = 6;
        assert!(is_tcp(&v4));
        v4[9] = 17;
        assert!(!is_tcp(&v4));
        let mut v6 = [0u8; 60];
        v6[0] = 0x60;
        v6[6] = 6;
        assert!(is_tcp(&v6));
        v6[6] = 17;
        assert!(!is_tcp(&v6));
        assert!(!is_tcp(&[]));
        assert!(!is_tcp(&[0x45]), "truncated");
        assert!(!is_tcp(&[0x70; 40]), "not IP");
    }
}
