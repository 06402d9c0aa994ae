//! UDP sockets for the WireGuard underlay.
//!
//! - [`UdpSocket::bind`]: IPv4 or IPv6 (`IPV6_V6ONLY`), optionally created
//!   inside another network namespace (see [`super::netns::run_in`]): the
//!   socket stays there while the rest of the agent (and its TUN) stays in
//!   the caller's namespace.
//! - [`UdpSocket::bind_group`]: several sockets on one port with
//!   `SO_REUSEPORT`, one per worker; the kernel spreads flows over them.
//! - [`UdpSocket::recv_batch`] / [`UdpSocket::send_batch`]: `recvmmsg` /
//!   `sendmmsg` into and out of caller-owned [`RecvBatch`] / [`SendBatch`]
//!   values that are allocated once and reused: no allocation per packet.
//!
//! - UDP GSO/GRO: with [`UdpOptions::gso`] one `sendmmsg` message carries a
//!   run of equal-size datagrams to one destination (`UDP_SEGMENT`), and with
//!   [`UdpOptions::gro`] the kernel may hand over several datagrams of one
//!   flow as one message whose `UDP_GRO` control message gives the segment
//!   size; [`RecvBatch::datagrams`] splits them again. Both are probed when
//!   the socket is made; GSO falls back to one datagram per message at run
//!   time when the kernel refuses it (`EIO`: the route's device cannot
//!   checksum: off for the socket) or refuses one run (`EMSGSIZE` /
//!   `EINVAL`: a segment larger than the path MTU: that run only).
//!
//! The fd is blocking for sends (a full socket buffer applies backpressure
//! to the worker) and receives use `MSG_DONTWAIT`, so a worker polls or
//! epolls the fd and then drains it.

use std::io;
use std::mem;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use super::sys::{cvt, poll_one};

/// How to create the socket(s).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UdpOptions {
    /// Local address and port (`0.0.0.0:51820`, `[::]:51820`, port 0 for
    /// any). IPv6 sockets are `IPV6_V6ONLY`.
    pub addr: SocketAddr,
    /// Create the socket inside this network namespace (a path such as
    /// `/run/netns/<name>` or `/proc/<pid>/ns/net`); `None`: the caller's.
    pub netns: Option<PathBuf>,
    /// Set `SO_REUSEPORT` (always set by [`UdpSocket::bind_group`]).
    pub reuse_port: bool,
    /// `SO_RCVBUF` in bytes (`SO_RCVBUFFORCE` tried first when root).
    pub recv_buffer: Option<usize>,
    /// `SO_SNDBUF` in bytes (`SO_SNDBUFFORCE` tried first when root).
    pub send_buffer: Option<usize>,
    /// Use UDP GSO (`UDP_SEGMENT`) on send when the kernel has it.
    pub gso: bool,
    /// Ask for UDP GRO (`UDP_GRO`) on receive when the kernel has it.
    /// A receive batch for such a socket needs slots of at least
    /// [`GRO_SLOT_SIZE`] bytes.
    pub gro: bool,
}

/// Slot size a [`RecvBatch`] needs on a socket with GRO: one coalesced
/// message can hold up to 64 KiB.
pub const GRO_SLOT_SIZE: usize = 65_535;

/// Most datagrams the kernel accepts in one GSO message (`UDP_MAX_SEGMENTS`).
pub const GSO_MAX_SEGMENTS: usize = 64;

/// Most payload bytes in one GSO message (an IPv4 packet's limit).
pub const GSO_MAX_BYTES: usize = 65_507;

impl UdpOptions {
    /// Options for `addr` with everything else at its default.
    pub fn new(addr: SocketAddr) -> Self {
        Self {
            addr,
            netns: None,
            reuse_port: false,
            recv_buffer: None,
            send_buffer: None,
            gso: true,
            gro: true,
        }
    }
}

/// Offloads in effect on a socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UdpOffloads {
    /// `UDP_SEGMENT` on send.
    pub gso: bool,
    /// `UDP_GRO` on receive.
    pub gro: bool,
}

/// A UDP socket with batched I/O.
#[derive(Debug)]
pub struct UdpSocket {
    fd: OwnedFd,
    local: SocketAddr,
    gso: AtomicBool,
    gro: bool,
}

impl UdpSocket {
    /// Creates and binds one socket as `opts` says.
    pub fn bind(opts: &UdpOptions) -> io::Result<UdpSocket> {
        Ok(Self::bind_group(opts, 1)?.remove(0))
    }

    /// Creates `n` sockets bound to the same address and port with
    /// `SO_REUSEPORT` (when `opts.addr` has port 0, the first socket picks
    /// the port and the others join it). All are created in `opts.netns`.
    pub fn bind_group(opts: &UdpOptions, n: usize) -> io::Result<Vec<UdpSocket>> {
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "need at least one socket",
            ));
        }
        let mut opts = opts.clone();
        if n > 1 {
            opts.reuse_port = true;
        }
        let netns = opts.netns.take();
        let create = move || {
            let mut out: Vec<UdpSocket> = Vec::with_capacity(n);
            let mut addr = opts.addr;
            for _ in 0..n {
                let s = Self::create(&opts, addr)?;
                addr = s.local;
                out.push(s);
            }
            Ok(out)
        };
        match netns {
            Some(path) => super::netns::run_in(&path, create),
            None => create(),
        }
    }

    fn create(opts: &UdpOptions, addr: SocketAddr) -> io::Result<UdpSocket> {
        let domain = match addr {
            SocketAddr::V4(_) => libc::AF_INET,
            SocketAddr::V6(_) => libc::AF_INET6,
        };
        // SAFETY: plain socket(2) call, no pointers.
        let raw = cvt(unsafe {
            libc::socket(
                domain,
                libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
                libc::IPPROTO_UDP,
            )
        })?;
        // SAFETY: `raw` was just returned by socket(2) and is owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        if domain == libc::AF_INET6 {
            setsockopt_int(&fd, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, 1)?;
        }
        if opts.reuse_port {
            setsockopt_int(&fd, libc::SOL_SOCKET, libc::SO_REUSEPORT, 1)?;
        }
        if let Some(b) = opts.recv_buffer {
            let b = libc::c_int::try_from(b).unwrap_or(libc::c_int::MAX);
            setsockopt_int(&fd, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, b)
                .or_else(|_| setsockopt_int(&fd, libc::SOL_SOCKET, libc::SO_RCVBUF, b))?;
        }
        if let Some(b) = opts.send_buffer {
            let b = libc::c_int::try_from(b).unwrap_or(libc::c_int::MAX);
            setsockopt_int(&fd, libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, b)
                .or_else(|_| setsockopt_int(&fd, libc::SOL_SOCKET, libc::SO_SNDBUF, b))?;
        }
        // SAFETY: sockaddr_storage is plain old data; all-zero is valid.
        let mut ss: libc::sockaddr_storage = unsafe { mem::zeroed() };
        let len = sockaddr_from(&addr, &mut ss);
        // SAFETY: `ss` holds a valid sockaddr of `len` bytes for the
        // socket's family.
        cvt(unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&ss as *const libc::sockaddr_storage).cast(),
                len,
            )
        })
        .map_err(|e| io::Error::new(e.kind(), format!("bind {addr}: {e}")))?;
        let mut len = mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        // SAFETY: getsockname writes at most `len` bytes into `ss`, which we own.
        cvt(unsafe {
            libc::getsockname(
                fd.as_raw_fd(),
                (&mut ss as *mut libc::sockaddr_storage).cast(),
                &mut len,
            )
        })?;
        let local = sockaddr_to(&ss, len)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "bad local address"))?;
        // Probes: a kernel without UDP_SEGMENT refuses to report it, one
        // without UDP_GRO refuses to set it.
        let gso = opts.gso && getsockopt_int(&fd, libc::SOL_UDP, libc::UDP_SEGMENT).is_ok();
        let gro = opts.gro && setsockopt_int(&fd, libc::SOL_UDP, libc::UDP_GRO, 1).is_ok();
        Ok(UdpSocket {
            fd,
            local,
            gso: AtomicBool::new(gso),
            gro,
        })
    }

    /// The offloads in effect (GSO turns itself off when the kernel refuses
    /// a GSO send).
    pub fn offloads(&self) -> UdpOffloads {
        UdpOffloads {
            gso: self.gso.load(Ordering::Relaxed),
            gro: self.gro,
        }
    }

    /// The bound local address (with the port the kernel chose for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Waits until the socket is readable or the timeout passes (`None`:
    /// forever). Returns whether it became readable.
    pub fn wait_readable(&self, timeout: Option<Duration>) -> io::Result<bool> {
        poll_one(self.fd.as_raw_fd(), libc::POLLIN, timeout)
    }

    /// Receives up to `batch.capacity()` datagrams with one `recvmmsg`
    /// without blocking. Returns how many arrived (also `batch.len()`);
    /// `ErrorKind::WouldBlock` when none is waiting.
    pub fn recv_batch(&self, batch: &mut RecvBatch) -> io::Result<usize> {
        batch.count = 0;
        if self.gro && batch.slot < GRO_SLOT_SIZE {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "socket has UDP GRO: receive slots must hold GRO_SLOT_SIZE bytes",
            ));
        }
        batch.prepare();
        let n = loop {
            // SAFETY: `prepare` pointed every mmsghdr at the batch's own
            // iovec, name and buffer storage, which lives (and is not moved
            // or touched) for the duration of the call; vlen is the number
            // of prepared headers.
            let r = unsafe {
                libc::recvmmsg(
                    self.fd.as_raw_fd(),
                    batch.hdrs.as_mut_ptr(),
                    batch.hdrs.len() as libc::c_uint,
                    libc::MSG_DONTWAIT,
                    std::ptr::null_mut(),
                )
            };
            match cvt(r) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                other => break other? as usize,
            }
        };
        batch.finish(n);
        Ok(n)
    }

    /// Sends every datagram queued in `batch` with as few `sendmmsg` calls
    /// as it takes, then clears the batch. A datagram the kernel refuses
    /// (unreachable, bad address) is skipped and reported; the rest still
    /// go out. Blocks while the socket buffer is full.
    pub fn send_batch(&self, batch: &mut SendBatch) -> SendReport {
        let mut report = SendReport::default();
        let total = batch.entries.len();
        let mut next = 0;
        // Entries before this index go out one per message (a GSO run the
        // kernel refused with EINVAL is retried that way).
        let mut plain_until = 0;
        while next < total {
            let gso = self.gso.load(Ordering::Relaxed);
            let msgs = batch.prepare(next, gso, plain_until);
            // SAFETY: `prepare` filled `msgs` headers pointing at the
            // batch's own iovec, name, control and payload storage, which is
            // not moved or touched during the call.
            let r = unsafe {
                libc::sendmmsg(
                    self.fd.as_raw_fd(),
                    batch.hdrs.as_mut_ptr(),
                    msgs as libc::c_uint,
                    0,
                )
            };
            report.syscalls += 1;
            match cvt(r) {
                Ok(sent) => {
                    for &count in &batch.msg_entries[..sent as usize] {
                        report.sent += count;
                        report.messages += 1;
                        if count > 1 {
                            report.gso_messages += 1;
                        }
                        next += count;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // The first message of this call failed.
                    let count = batch.msg_entries[0];
                    let errno = e.raw_os_error();
                    if count > 1 && errno == Some(libc::EIO) {
                        // The route's device cannot checksum GSO: stop
                        // using it on this socket and resend the run.
                        self.gso.store(false, Ordering::Relaxed);
                        report.gso_disabled = true;
                    } else if count > 1
                        && matches!(errno, Some(libc::EINVAL) | Some(libc::EMSGSIZE))
                    {
                        // The run does not fit (segment larger than the
                        // path MTU: EMSGSIZE on recent kernels, EINVAL on
                        // older ones): send it datagram by datagram, which
                        // IP may fragment.
                        plain_until = next + count;
                    } else {
                        report.failed += count;
                        report.last_error = Some(e);
                        next += count;
                    }
                }
            }
        }
        batch.clear();
        report
    }
}

impl AsRawFd for UdpSocket {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl AsFd for UdpSocket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// What one [`UdpSocket::send_batch`] did.
#[derive(Debug, Default)]
pub struct SendReport {
    /// Datagrams handed to the kernel.
    pub sent: usize,
    /// Datagrams the kernel refused (skipped).
    pub failed: usize,
    /// `sendmmsg` calls made.
    pub syscalls: usize,
    /// Messages the kernel accepted (a GSO message carries several
    /// datagrams).
    pub messages: usize,
    /// Accepted messages that carried more than one datagram.
    pub gso_messages: usize,
    /// The kernel refused GSO (`EIO`) and the socket fell back to plain
    /// sends for good.
    pub gso_disabled: bool,
    /// The last error seen for a refused datagram.
    pub last_error: Option<io::Error>,
}

/// Caller-owned storage for one `recvmmsg`: `capacity` slots of
/// `slot_size` bytes, allocated once.
pub struct RecvBatch {
    buf: Box<[u8]>,
    slot: usize,
    hdrs: Vec<libc::mmsghdr>,
    iovs: Vec<libc::iovec>,
    names: Vec<libc::sockaddr_storage>,
    control: Vec<CmsgBuf>,
    lens: Vec<usize>,
    addrs: Vec<SocketAddr>,
    truncated: Vec<bool>,
    segments: Vec<usize>,
    count: usize,
}

/// Room for the control messages of one message, aligned for `cmsghdr`.
#[derive(Clone, Copy)]
#[repr(C, align(8))]
struct CmsgBuf([u8; 64]);

// SAFETY: the raw pointers inside `hdrs` and `iovs` only ever point into the
// batch's own heap storage (`buf`, `iovs`, `names`), are rewritten before
// every syscall, and are never dereferenced by Rust code; moving the batch to
// another thread moves that storage with it.
unsafe impl Send for RecvBatch {}

impl RecvBatch {
    /// Storage for up to `capacity` datagrams of at most `slot_size` bytes.
    pub fn new(capacity: usize, slot_size: usize) -> Self {
        assert!(capacity > 0 && slot_size > 0, "empty receive batch");
        let unspecified = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0));
        Self {
            buf: vec![0u8; capacity * slot_size].into_boxed_slice(),
            slot: slot_size,
            // SAFETY: mmsghdr, iovec and sockaddr_storage are plain old
            // data (integers and pointers); all-zero is a valid value.
            hdrs: (0..capacity).map(|_| unsafe { mem::zeroed() }).collect(),
            // SAFETY: as above.
            iovs: (0..capacity).map(|_| unsafe { mem::zeroed() }).collect(),
            // SAFETY: as above.
            names: (0..capacity).map(|_| unsafe { mem::zeroed() }).collect(),
            control: vec![CmsgBuf([0; 64]); capacity],
            lens: vec![0; capacity],
            addrs: vec![unspecified; capacity],
            truncated: vec![false; capacity],
            segments: vec![0; capacity],
            count: 0,
        }
    }

    /// Most datagrams one call can receive.
    pub fn capacity(&self) -> usize {
        self.hdrs.len()
    }

    /// Datagrams received by the last call.
    pub fn len(&self) -> usize {
        self.count
    }

    /// Whether the last call received nothing.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Source address and payload of message `i` (`i < len()`).
    pub fn get(&self, i: usize) -> (SocketAddr, &[u8]) {
        assert!(i < self.count, "message index out of range");
        let off = i * self.slot;
        (self.addrs[i], &self.buf[off..off + self.lens[i]])
    }

    /// Whether message `i` was longer than a slot and got cut.
    pub fn is_truncated(&self, i: usize) -> bool {
        assert!(i < self.count, "message index out of range");
        self.truncated[i]
    }

    /// Iterates over the received `(source, payload)` messages; with GRO
    /// one message may hold several datagrams (see [`RecvBatch::datagrams`]).
    pub fn iter(&self) -> impl Iterator<Item = (SocketAddr, &[u8])> + '_ {
        (0..self.count).map(|i| self.get(i))
    }

    /// The GRO segment size of message `i` when the kernel coalesced
    /// several datagrams into it: every datagram but the last is exactly
    /// this long.
    pub fn segment_size(&self, i: usize) -> Option<usize> {
        assert!(i < self.count, "message index out of range");
        match self.segments[i] {
            0 => None,
            s => Some(s),
        }
    }

    /// Iterates over every received datagram, splitting GRO messages.
    pub fn datagrams(&self) -> impl Iterator<Item = (SocketAddr, &[u8])> + '_ {
        (0..self.count).flat_map(move |i| {
            let (addr, mut rest) = self.get(i);
            // Without a GRO segment size the message is one datagram (even
            // an empty one).
            let seg = match self.segments[i] {
                0 => usize::MAX,
                s => s,
            };
            let mut first = true;
            std::iter::from_fn(move || {
                if rest.is_empty() && !first {
                    return None;
                }
                first = false;
                let (d, r) = rest.split_at(seg.min(rest.len()));
                rest = r;
                Some((addr, d))
            })
        })
    }

    fn prepare(&mut self) {
        let base = self.buf.as_mut_ptr();
        for i in 0..self.hdrs.len() {
            self.iovs[i] = libc::iovec {
                // SAFETY: i * slot + slot <= buf.len(), so the pointer stays
                // inside the allocation.
                iov_base: unsafe { base.add(i * self.slot) }.cast(),
                iov_len: self.slot,
            };
            let h = &mut self.hdrs[i].msg_hdr;
            h.msg_name = (&mut self.names[i] as *mut libc::sockaddr_storage).cast();
            h.msg_namelen = mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            h.msg_iov = &mut self.iovs[i];
            h.msg_iovlen = 1;
            h.msg_control = self.control[i].0.as_mut_ptr().cast();
            h.msg_controllen = mem::size_of::<CmsgBuf>();
            h.msg_flags = 0;
            self.hdrs[i].msg_len = 0;
        }
    }

    fn finish(&mut self, n: usize) {
        for i in 0..n {
            let h = &self.hdrs[i];
            self.lens[i] = (h.msg_len as usize).min(self.slot);
            self.truncated[i] = h.msg_hdr.msg_flags & libc::MSG_TRUNC != 0;
            let clen = h.msg_hdr.msg_controllen.min(mem::size_of::<CmsgBuf>());
            self.segments[i] = parse_gro_segment(&self.control[i].0[..clen]).unwrap_or(0);
            self.addrs[i] = sockaddr_to(&self.names[i], h.msg_hdr.msg_namelen)
                .unwrap_or(SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0)));
        }
        self.count = n;
    }
}

#[derive(Clone, Copy, Debug)]
struct Entry {
    addr: SocketAddr,
    off: usize,
    len: usize,
}

/// Caller-owned storage for outgoing datagrams: one byte buffer in which
/// datagrams are packed back to back, plus the `sendmmsg` headers, all
/// allocated once.
///
/// Write a datagram straight into [`SendBatch::spare`] (e.g. let the
/// encryption write its output there) and then [`SendBatch::commit`] it, or
/// copy one in with [`SendBatch::push`].
pub struct SendBatch {
    buf: Box<[u8]>,
    used: usize,
    entries: Vec<Entry>,
    hdrs: Vec<libc::mmsghdr>,
    iovs: Vec<libc::iovec>,
    names: Vec<libc::sockaddr_storage>,
    control: Vec<CmsgBuf>,
    msg_entries: Vec<usize>,
}

// SAFETY: the raw pointers inside `hdrs` and `iovs` only point into the
// batch's own heap storage, are rewritten before every syscall and are never
// dereferenced by Rust code.
unsafe impl Send for SendBatch {}

/// The batch has no room for another datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("send batch is full")]
pub struct BatchFull;

impl SendBatch {
    /// Room for up to `max_datagrams` datagrams totalling `buf_bytes`.
    pub fn new(max_datagrams: usize, buf_bytes: usize) -> Self {
        assert!(max_datagrams > 0 && buf_bytes > 0, "empty send batch");
        Self {
            buf: vec![0u8; buf_bytes].into_boxed_slice(),
            used: 0,
            entries: Vec::with_capacity(max_datagrams),
            // SAFETY: mmsghdr, iovec and sockaddr_storage are plain old
            // data; all-zero is a valid value.
            hdrs: (0..max_datagrams)
                .map(|_| unsafe { mem::zeroed() })
                .collect(),
            // SAFETY: as above.
            iovs: (0..max_datagrams)
                .map(|_| unsafe { mem::zeroed() })
                .collect(),
            // SAFETY: as above.
            names: (0..max_datagrams)
                .map(|_| unsafe { mem::zeroed() })
                .collect(),
            control: vec![CmsgBuf([0; 64]); max_datagrams],
            msg_entries: vec![0; max_datagrams],
        }
    }

    /// Datagrams queued.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Whether another datagram can be queued (a slot is free and at least
    /// `min_len` bytes of buffer are left).
    pub fn has_room(&self, min_len: usize) -> bool {
        self.entries.len() < self.hdrs.len() && self.buf.len() - self.used >= min_len
    }

    /// Drops everything queued.
    pub fn clear(&mut self) {
        self.entries.clear();
        self.used = 0;
    }

    /// The free part of the buffer; the next datagram starts at its first
    /// byte. Empty when no slot is free.
    pub fn spare(&mut self) -> &mut [u8] {
        if self.entries.len() >= self.hdrs.len() {
            return &mut [];
        }
        &mut self.buf[self.used..]
    }

    /// Queues the first `len` bytes of [`SendBatch::spare`] for `addr`.
    pub fn commit(&mut self, addr: SocketAddr, len: usize) -> Result<(), BatchFull> {
        if self.entries.len() >= self.hdrs.len() || len > self.buf.len() - self.used {
            return Err(BatchFull);
        }
        self.entries.push(Entry {
            addr,
            off: self.used,
            len,
        });
        self.used += len;
        Ok(())
    }

    /// Copies `data` into the batch for `addr`.
    pub fn push(&mut self, addr: SocketAddr, data: &[u8]) -> Result<(), BatchFull> {
        if !self.has_room(data.len()) {
            return Err(BatchFull);
        }
        self.buf[self.used..self.used + data.len()].copy_from_slice(data);
        self.commit(addr, data.len())
    }

    /// Fills headers for entries `start..`: with `gso`, a run of
    /// datagrams to one destination becomes one message (see
    /// [`gso_run`]); entries before `plain_until` go one per message.
    /// Returns the number of messages; `msg_entries[k]` says how many
    /// datagrams message `k` carries.
    fn prepare(&mut self, start: usize, gso: bool, plain_until: usize) -> usize {
        let base = self.buf.as_mut_ptr();
        let mut k = 0;
        let mut i = start;
        while i < self.entries.len() {
            let e = self.entries[i];
            let count = if gso && i >= plain_until {
                gso_run(&self.entries[i..])
            } else {
                1
            };
            let bytes: usize = self.entries[i..i + count].iter().map(|x| x.len).sum();
            self.iovs[k] = libc::iovec {
                // SAFETY: entries are packed back to back, so the run spans
                // e.off..e.off + bytes <= used <= buf.len().
                iov_base: unsafe { base.add(e.off) }.cast(),
                iov_len: bytes,
            };
            let namelen = sockaddr_from(&e.addr, &mut self.names[k]);
            let controllen = if count > 1 {
                write_gso_cmsg(&mut self.control[k], e.len as u16)
            } else {
                0
            };
            let h = &mut self.hdrs[k].msg_hdr;
            h.msg_name = (&mut self.names[k] as *mut libc::sockaddr_storage).cast();
            h.msg_namelen = namelen;
            h.msg_iov = &mut self.iovs[k];
            h.msg_iovlen = 1;
            h.msg_control = if controllen > 0 {
                self.control[k].0.as_mut_ptr().cast()
            } else {
                std::ptr::null_mut()
            };
            h.msg_controllen = controllen;
            h.msg_flags = 0;
            self.msg_entries[k] = count;
            k += 1;
            i += count;
        }
        k
    }
}

/// How many datagrams from the front of `entries` one GSO message can
/// carry: same destination, contiguous, all as long as the first except a
/// shorter last one, at most [`GSO_MAX_SEGMENTS`] and [`GSO_MAX_BYTES`].
fn gso_run(entries: &[Entry]) -> usize {
    let Some(first) = entries.first() else {
        return 0;
    };
    if first.len == 0 || first.len > usize::from(u16::MAX) {
        return 1;
    }
    let mut count = 1;
    let mut bytes = first.len;
    let mut end = first.off + first.len;
    for e in &entries[1..] {
        if count == GSO_MAX_SEGMENTS
            || e.addr != first.addr
            || e.off != end
            || e.len == 0
            || e.len > first.len
            || bytes + e.len > GSO_MAX_BYTES
        {
            break;
        }
        count += 1;
        bytes += e.len;
        end += e.len;
        if e.len < first.len {
            break;
        }
    }
    count
}

/// Writes a `SOL_UDP`/`UDP_SEGMENT` control message into `buf`, returning
/// the control length.
fn write_gso_cmsg(buf: &mut CmsgBuf, segment: u16) -> usize {
    buf.0.fill(0);
    // SAFETY: CMSG_SPACE/CMSG_LEN are pure arithmetic.
    let (space, len) = unsafe { (libc::CMSG_SPACE(2) as usize, libc::CMSG_LEN(2) as usize) };
    let hdr = libc::cmsghdr {
        cmsg_len: len,
        cmsg_level: libc::SOL_UDP,
        cmsg_type: libc::UDP_SEGMENT,
    };
    // SAFETY: the buffer is 8-aligned and 64 bytes long, more than a
    // cmsghdr plus two bytes of data need (`space` <= 24).
    unsafe { std::ptr::write(buf.0.as_mut_ptr().cast::<libc::cmsghdr>(), hdr) };
    let data = mem::size_of::<libc::cmsghdr>();
    buf.0[data..data + 2].copy_from_slice(&segment.to_ne_bytes());
    space
}

/// Finds the `SOL_UDP`/`UDP_GRO` control message in a received control
/// buffer and returns its segment size.
pub(crate) fn parse_gro_segment(control: &[u8]) -> Option<usize> {
    const HDR: usize = mem::size_of::<libc::cmsghdr>();
    const ALIGN: usize = mem::size_of::<usize>();
    let mut off = 0;
    while off + HDR <= control.len() {
        let field = |at: usize, n: usize| &control[off + at..off + at + n];
        let len = usize::from_ne_bytes(field(0, ALIGN).try_into().ok()?);
        let level = i32::from_ne_bytes(field(ALIGN, 4).try_into().ok()?);
        let kind = i32::from_ne_bytes(field(ALIGN + 4, 4).try_into().ok()?);
        if len < HDR || off + len > control.len() {
            return None;
        }
        if level == libc::SOL_UDP && kind == libc::UDP_GRO && len >= HDR + 4 {
            let v = i32::from_ne_bytes(field(HDR, 4).try_into().ok()?);
            return usize::try_from(v).ok().filter(|&v| v > 0);
        }
        off += (len + ALIGN - 1) & !(ALIGN - 1);
    }
    None
}

fn getsockopt_int(fd: &OwnedFd, level: libc::c_int, name: libc::c_int) -> io::Result<libc::c_int> {
    let mut val: libc::c_int = 0;
    let mut len = mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: we pass a pointer to a live c_int and its exact size.
    cvt(unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&mut val as *mut libc::c_int).cast(),
            &mut len,
        )
    })?;
    Ok(val)
}

fn setsockopt_int(
    fd: &OwnedFd,
    level: libc::c_int,
    name: libc::c_int,
    val: libc::c_int,
) -> io::Result<()> {
    // SAFETY: we pass a pointer to a live c_int and its exact size.
    cvt(unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&val as *const libc::c_int).cast(),
            mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    })?;
    Ok(())
}

/// Writes `addr` into `ss`, returning the length to pass to the kernel.
pub(crate) fn sockaddr_from(addr: &SocketAddr, ss: &mut libc::sockaddr_storage) -> libc::socklen_t {
    match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and suitably aligned for
            // sockaddr_in.
            unsafe { std::ptr::write((ss as *mut libc::sockaddr_storage).cast(), sin) };
            mem::size_of::<libc::sockaddr_in>() as libc::socklen_t
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: sockaddr_storage is larger than and suitably aligned for
            // sockaddr_in6.
            unsafe { std::ptr::write((ss as *mut libc::sockaddr_storage).cast(), sin6) };
            mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t
        }
    }
}

/// Reads a socket address the kernel wrote into `ss`.
pub(crate) fn sockaddr_to(ss: &libc::sockaddr_storage, len: libc::socklen_t) -> Option<SocketAddr> {
    match ss.ss_family as libc::c_int {
        libc::AF_INET if len as usize >= mem::size_of::<libc::sockaddr_in>() => {
            // SAFETY: the family says the storage holds a sockaddr_in and it
            // is at least that long; sockaddr_storage is suitably aligned.
            let sin: &libc::sockaddr_in = unsafe { &*(ss as *const libc::sockaddr_storage).cast() };
            Some(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(sin.sin_addr.s_addr.to_ne_bytes()),
                u16::from_be(sin.sin_port),
            )))
        }
        libc::AF_INET6 if len as usize >= mem::size_of::<libc::sockaddr_in6>() => {
            // SAFETY: as above for sockaddr_in6.
            let sin6: &libc::sockaddr_in6 =
                unsafe { &*(ss as *const libc::sockaddr_storage).cast() };
            Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(sin6.sin6_addr.s6_addr),
                u16::from_be(sin6.sin6_port),
                sin6.sin6_flowinfo,
                sin6.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::testns::{require_root, veth_pair, TestNetns};

    /// Receives until `want` datagrams (GRO messages split) arrived;
    /// returns them and how many messages came coalesced by GRO.
    fn recv_all(
        sock: &UdpSocket,
        batch: &mut RecvBatch,
        want: usize,
    ) -> (Vec<(SocketAddr, Vec<u8>)>, usize) {
        let mut got = Vec::new();
        let mut coalesced = 0;
        while got.len() < want {
            assert!(
                sock.wait_readable(Some(Duration::from_secs(5))).unwrap(),
                "timed out after {} of {want} datagrams",
                got.len()
            );
            match sock.recv_batch(batch) {
                Ok(n) => {
                    assert_eq!(n, batch.len());
                    for i in 0..n {
                        assert!(!batch.is_truncated(i));
                        if batch.segment_size(i).is_some() {
                            coalesced += 1;
                        }
                    }
                    got.extend(batch.datagrams().map(|(a, d)| (a, d.to_vec())));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("recv_batch: {e}"),
            }
        }
        assert_eq!(got.len(), want, "no extra datagrams");
        (got, coalesced)
    }

    fn plain(mut o: UdpOptions) -> UdpOptions {
        o.gso = false;
        o.gro = false;
        o
    }

    fn payload(i: usize, len: usize) -> Vec<u8> {
        (0..len).map(|k| (i * 31 + k) as u8).collect()
    }

    #[test]
    fn sockaddr_round_trip() {
        for a in [
            "192.0.2.7:51820".parse::<SocketAddr>().unwrap(),
            "[2001:db8::1]:443".parse().unwrap(),
            SocketAddr::V6(SocketAddrV6::new("fe80::1".parse().unwrap(), 9, 0, 3)),
        ] {
            // SAFETY: sockaddr_storage is plain old data.
            let mut ss: libc::sockaddr_storage = unsafe { mem::zeroed() };
            let len = sockaddr_from(&a, &mut ss);
            assert_eq!(sockaddr_to(&ss, len), Some(a));
            assert_eq!(sockaddr_to(&ss, len - 1), None, "short length is refused");
        }
    }

    #[test]
    fn datagrams_are_split_by_the_gro_segment_size() {
        let mut b = RecvBatch::new(3, 100);
        let from: SocketAddr = "192.0.2.1:5".parse().unwrap();
        b.buf[..10].copy_from_slice(&[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
        b.buf[200..203].copy_from_slice(&[7, 7, 7]);
        b.lens[..3].copy_from_slice(&[10, 0, 3]);
        b.segments[..3].copy_from_slice(&[4, 0, 0]);
        b.addrs[..3].copy_from_slice(&[from; 3]);
        b.count = 3;
        let got: Vec<&[u8]> = b.datagrams().map(|(_, d)| d).collect();
        let want: Vec<&[u8]> = vec![&[1, 2, 3, 4], &[5, 6, 7, 8], &[9, 10], &[], &[7, 7, 7]];
        assert_eq!(got, want);
        assert_eq!(b.segment_size(0), Some(4));
        assert_eq!(b.segment_size(1), None);
        assert_eq!(b.iter().count(), 3);
    }

    #[test]
    fn send_batch_bookkeeping() {
        let to: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let mut b = SendBatch::new(3, 100);
        assert!(b.is_empty());
        b.push(to, &[1; 40]).unwrap();
        let spare = b.spare();
        assert_eq!(spare.len(), 60);
        spare[..10].fill(7);
        b.commit(to, 10).unwrap();
        assert_eq!(b.push(to, &[0; 51]), Err(BatchFull));
        b.push(to, &[2; 50]).unwrap();
        assert_eq!(b.len(), 3);
        assert!(b.spare().is_empty(), "no slot left");
        assert_eq!(b.push(to, &[]), Err(BatchFull));
        assert_eq!(&b.buf[40..50], &[7; 10]);
        b.clear();
        assert!(b.is_empty() && b.has_room(100));
    }

    #[test]
    fn batches_over_loopback_v4_and_v6() {
        require_root!();
        let ns = TestNetns::new("udplo");
        for (any, offload) in [
            ("127.0.0.1:0", false),
            ("[::1]:0", false),
            ("127.0.0.1:0", true),
            ("[::1]:0", true),
        ] {
            let mut opts = UdpOptions {
                netns: Some(ns.path()),
                ..UdpOptions::new(any.parse().unwrap())
            };
            if !offload {
                opts = plain(opts);
            }
            let a = UdpSocket::bind(&opts).unwrap();
            let b = UdpSocket::bind(&opts).unwrap();
            assert_eq!(a.offloads().gso, offload);
            let slot = if offload { GRO_SLOT_SIZE } else { 2048 };
            let mut rb = RecvBatch::new(8, slot);
            assert_eq!(
                b.recv_batch(&mut rb).unwrap_err().kind(),
                io::ErrorKind::WouldBlock
            );
            let mut sb = SendBatch::new(64, 64 * 1500);
            for i in 0..50 {
                sb.push(b.local_addr(), &payload(i, 100 + i * 13)).unwrap();
            }
            let r = a.send_batch(&mut sb);
            assert_eq!((r.sent, r.failed), (50, 0), "{r:?}");
            assert!(r.syscalls <= 2, "batched: {r:?}");
            assert!(sb.is_empty());
            let (got, _) = recv_all(&b, &mut rb, 50);
            for (i, (from, data)) in got.iter().enumerate() {
                assert_eq!(*from, a.local_addr());
                assert_eq!(*data, payload(i, 100 + i * 13));
            }
        }
    }

    #[test]
    fn refused_datagram_is_skipped_and_reported() {
        require_root!();
        let ns = TestNetns::new("udperr");
        let opts = plain(UdpOptions {
            netns: Some(ns.path()),
            ..UdpOptions::new("127.0.0.1:0".parse().unwrap())
        });
        let a = UdpSocket::bind(&opts).unwrap();
        let b = UdpSocket::bind(&opts).unwrap();
        let mut sb = SendBatch::new(4, 4096);
        sb.push(b.local_addr(), b"one").unwrap();
        sb.push("[::1]:9".parse().unwrap(), b"wrong family")
            .unwrap();
        sb.push(b.local_addr(), b"three").unwrap();
        let r = a.send_batch(&mut sb);
        assert_eq!((r.sent, r.failed), (2, 1), "{r:?}");
        assert!(r.last_error.is_some());
        let (got, _) = recv_all(&b, &mut RecvBatch::new(4, 100), 2);
        assert_eq!(got[0].1, b"one");
        assert_eq!(got[1].1, b"three");
    }

    #[test]
    fn socket_lives_in_the_other_namespace() {
        require_root!();
        let left = TestNetns::new("udpl");
        let right = TestNetns::new("udpr");
        veth_pair(&left, "10.88.0.1/24", &right, "10.88.0.2/24", 1500);
        // 10.88.0.1 exists only in `left`: binding it from here must fail …
        let here = UdpSocket::bind(&UdpOptions::new("10.88.0.1:0".parse().unwrap()));
        assert!(
            here.is_err(),
            "address must not exist in the caller's namespace"
        );
        // … and work when the socket is made inside `left`.
        let a = UdpSocket::bind(&UdpOptions {
            netns: Some(left.path()),
            ..UdpOptions::new("10.88.0.1:0".parse().unwrap())
        })
        .unwrap();
        let b = UdpSocket::bind(&UdpOptions {
            netns: Some(right.path()),
            ..UdpOptions::new("10.88.0.2:0".parse().unwrap())
        })
        .unwrap();
        let mut sb = SendBatch::new(16, 16 * 1400);
        for i in 0..16 {
            sb.push(b.local_addr(), &payload(i, 1400)).unwrap();
        }
        assert_eq!(a.send_batch(&mut sb).sent, 16);
        let (got, _) = recv_all(&b, &mut RecvBatch::new(4, GRO_SLOT_SIZE), 16);
        assert!(got.iter().all(|(from, _)| *from == a.local_addr()));
        assert_eq!(got[15].1, payload(15, 1400));
    }

    #[test]
    fn reuse_port_group_shares_the_port() {
        require_root!();
        let ns = TestNetns::new("udprp");
        let opts = plain(UdpOptions {
            netns: Some(ns.path()),
            ..UdpOptions::new("127.0.0.1:0".parse().unwrap())
        });
        let group = UdpSocket::bind_group(&opts, 2).unwrap();
        assert_eq!(group[0].local_addr(), group[1].local_addr());
        assert_ne!(group[0].local_addr().port(), 0);
        // A third socket without SO_REUSEPORT cannot take the port.
        let taken = UdpSocket::bind(&UdpOptions {
            netns: Some(ns.path()),
            ..UdpOptions::new(group[0].local_addr())
        });
        assert_eq!(taken.unwrap_err().kind(), io::ErrorKind::AddrInUse);
        // Many source ports: the kernel spreads them over both sockets.
        let senders: Vec<UdpSocket> = (0..32).map(|_| UdpSocket::bind(&opts).unwrap()).collect();
        for (i, s) in senders.iter().enumerate() {
            let mut sb = SendBatch::new(1, 64);
            sb.push(group[0].local_addr(), &payload(i, 10)).unwrap();
            assert_eq!(s.send_batch(&mut sb).sent, 1);
        }
        std::thread::sleep(Duration::from_millis(50));
        let mut counts = [0usize; 2];
        let mut rb = RecvBatch::new(64, 64);
        for (k, sock) in group.iter().enumerate() {
            while let Ok(n) = sock.recv_batch(&mut rb) {
                counts[k] += n;
            }
        }
        assert_eq!(counts[0] + counts[1], 32);
        assert!(
            counts[0] > 0 && counts[1] > 0,
            "both workers get flows: {counts:?}"
        );
    }

    fn entry(addr: &str, off: usize, len: usize) -> Entry {
        Entry {
            addr: addr.parse().unwrap(),
            off,
            len,
        }
    }

    fn entries(addr: &str, lens: &[usize]) -> Vec<Entry> {
        let mut off = 0;
        lens.iter()
            .map(|&l| {
                off += l;
                entry(addr, off - l, l)
            })
            .collect()
    }

    #[test]
    fn gso_runs_follow_the_kernel_rules() {
        let a = "10.0.0.1:1";
        assert_eq!(gso_run(&[]), 0);
        // Equal sizes form one run; a shorter datagram ends it.
        assert_eq!(gso_run(&entries(a, &[100, 100, 100])), 3);
        assert_eq!(gso_run(&entries(a, &[100, 100, 40, 100])), 3);
        // A longer one cannot join.
        assert_eq!(gso_run(&entries(a, &[100, 120])), 1);
        // At most GSO_MAX_SEGMENTS datagrams and GSO_MAX_BYTES bytes.
        assert_eq!(gso_run(&entries(a, &[10; 100])), GSO_MAX_SEGMENTS);
        assert_eq!(gso_run(&entries(a, &[1400; 64])), GSO_MAX_BYTES / 1400);
        // Another destination ends the run.
        let mut e = entries(a, &[100, 100, 100]);
        e[2].addr = "10.0.0.2:1".parse().unwrap();
        assert_eq!(gso_run(&e), 2);
        // Non-contiguous payloads cannot share one iovec.
        let mut e = entries(a, &[100, 100]);
        e[1].off += 1;
        assert_eq!(gso_run(&e), 1);
        assert_eq!(gso_run(&entries(a, &[0, 0])), 1);
    }

    /// Builds a control buffer the way the kernel lays it out.
    fn control(msgs: &[(i32, i32, i32)]) -> Vec<u8> {
        let mut out = Vec::new();
        for &(level, kind, value) in msgs {
            // SAFETY: pure arithmetic.
            let (space, len) =
                unsafe { (libc::CMSG_SPACE(4) as usize, libc::CMSG_LEN(4) as usize) };
            let mut m = vec![0u8; space];
            m[..8].copy_from_slice(&len.to_ne_bytes());
            m[8..12].copy_from_slice(&level.to_ne_bytes());
            m[12..16].copy_from_slice(&kind.to_ne_bytes());
            m[16..20].copy_from_slice(&value.to_ne_bytes());
            out.extend_from_slice(&m);
        }
        out
    }

    #[test]
    fn gro_control_message_is_parsed() {
        let gro = (libc::SOL_UDP, libc::UDP_GRO, 1200);
        let ttl = (libc::SOL_IP, libc::IP_TTL, 64);
        assert_eq!(parse_gro_segment(&control(&[gro])), Some(1200));
        assert_eq!(parse_gro_segment(&control(&[ttl, gro])), Some(1200));
        assert_eq!(parse_gro_segment(&control(&[ttl])), None);
        assert_eq!(parse_gro_segment(&[]), None);
        let whole = control(&[gro]);
        assert_eq!(parse_gro_segment(&whole[..12]), None, "short header");
        let mut bad = whole.clone();
        bad[..8].copy_from_slice(&4usize.to_ne_bytes());
        assert_eq!(parse_gro_segment(&bad), None, "cmsg_len below header");
        let mut huge = whole;
        huge[..8].copy_from_slice(&1000usize.to_ne_bytes());
        assert_eq!(parse_gro_segment(&huge), None, "cmsg_len beyond buffer");
        assert_eq!(
            parse_gro_segment(&control(&[(libc::SOL_UDP, libc::UDP_GRO, 0)])),
            None
        );
    }

    #[test]
    fn gso_control_message_layout() {
        let mut buf = CmsgBuf([0xff; 64]);
        let space = write_gso_cmsg(&mut buf, 1372);
        // SAFETY: pure arithmetic.
        assert_eq!(space, unsafe { libc::CMSG_SPACE(2) } as usize);
        let b = &buf.0;
        // SAFETY: pure arithmetic.
        let len = unsafe { libc::CMSG_LEN(2) } as usize;
        assert_eq!(usize::from_ne_bytes(b[..8].try_into().unwrap()), len);
        assert_eq!(
            i32::from_ne_bytes(b[8..12].try_into().unwrap()),
            libc::SOL_UDP
        );
        assert_eq!(
            i32::from_ne_bytes(b[12..16].try_into().unwrap()),
            libc::UDP_SEGMENT
        );
        assert_eq!(u16::from_ne_bytes(b[16..18].try_into().unwrap()), 1372);
    }

    #[test]
    fn gso_and_gro_across_a_veth_pair() {
        require_root!();
        let left = TestNetns::new("gsol");
        let right = TestNetns::new("gsor");
        veth_pair(&left, "10.89.0.1/24", &right, "10.89.0.2/24", 1500);
        let a = UdpSocket::bind(&UdpOptions {
            netns: Some(left.path()),
            ..UdpOptions::new("10.89.0.1:0".parse().unwrap())
        })
        .unwrap();
        let b = UdpSocket::bind(&UdpOptions {
            netns: Some(right.path()),
            recv_buffer: Some(4 << 20),
            ..UdpOptions::new("10.89.0.2:0".parse().unwrap())
        })
        .unwrap();
        assert_eq!(
            a.offloads(),
            UdpOffloads {
                gso: true,
                gro: true
            },
            "this kernel has UDP GSO/GRO"
        );
        let mut small = RecvBatch::new(1, 2048);
        assert_eq!(
            b.recv_batch(&mut small).unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );

        // 100 × 1200 bytes, then 7 × 1000 + 300, then 5 of varied sizes.
        let mut lens = vec![1200; 100];
        lens.extend([1000; 7]);
        lens.push(300);
        lens.extend([500, 900, 1300, 40, 1472]);
        let mut sb = SendBatch::new(256, 256 * 1500);
        for (i, &l) in lens.iter().enumerate() {
            sb.push(b.local_addr(), &payload(i, l)).unwrap();
        }
        let r = a.send_batch(&mut sb);
        eprintln!("GSO send: {r:?}");
        assert_eq!((r.sent, r.failed), (lens.len(), 0), "{r:?}");
        assert!(!r.gso_disabled);
        // 100 → 64 + 36 (segment cap), 7 + 1, then 500 | 900 | 1300,40 | 1472.
        assert_eq!(r.gso_messages, 4, "{r:?}");
        assert_eq!(r.messages, 7, "{r:?}");
        let mut rb = RecvBatch::new(8, GRO_SLOT_SIZE);
        let (got, coalesced) = recv_all(&b, &mut rb, lens.len());
        eprintln!(
            "GRO receive: {coalesced} coalesced messages for {} datagrams",
            got.len()
        );
        for (i, (from, data)) in got.iter().enumerate() {
            assert_eq!(*from, a.local_addr());
            assert_eq!(*data, payload(i, lens[i]), "datagram {i}");
        }
        assert!(
            coalesced > 0,
            "GSO runs arrive as GRO messages on a UDP_GRO socket"
        );
    }

    #[test]
    fn gso_run_larger_than_the_path_falls_back_to_plain_sends() {
        require_root!();
        let left = TestNetns::new("gsofl");
        let right = TestNetns::new("gsofr");
        veth_pair(&left, "10.91.0.1/24", &right, "10.91.0.2/24", 1400);
        let a = UdpSocket::bind(&UdpOptions {
            netns: Some(left.path()),
            ..UdpOptions::new("10.91.0.1:0".parse().unwrap())
        })
        .unwrap();
        let b = UdpSocket::bind(&UdpOptions {
            netns: Some(right.path()),
            ..UdpOptions::new("10.91.0.2:0".parse().unwrap())
        })
        .unwrap();
        // 1472-byte segments do not fit a 1400-byte path: the kernel refuses
        // the GSO message (EINVAL) and the run goes out datagram by datagram
        // (fragmented by IP), while GSO stays on for later runs.
        let mut sb = SendBatch::new(32, 32 * 1500);
        for i in 0..10 {
            sb.push(b.local_addr(), &payload(i, 1472)).unwrap();
        }
        for i in 10..20 {
            sb.push(b.local_addr(), &payload(i, 1000)).unwrap();
        }
        let r = a.send_batch(&mut sb);
        assert_eq!((r.sent, r.failed), (20, 0), "{r:?}");
        assert!(!r.gso_disabled);
        assert_eq!(r.gso_messages, 1, "the fitting run still uses GSO: {r:?}");
        // The refused run (10 × 1472 plus the first 1000, a shorter tail)
        // went as 11 messages, the other nine 1000-byte datagrams as one.
        assert_eq!(r.messages, 12, "{r:?}");
        assert!(a.offloads().gso);
        let (got, _) = recv_all(&b, &mut RecvBatch::new(8, GRO_SLOT_SIZE), 20);
        for (i, (_, data)) in got.iter().enumerate() {
            let len = if i < 10 { 1472 } else { 1000 };
            assert_eq!(*data, payload(i, len), "datagram {i}");
        }
    }
}
