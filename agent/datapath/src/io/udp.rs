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
//! The fd is blocking for sends (a full socket buffer applies backpressure
//! to the worker) and receives use `MSG_DONTWAIT`, so a worker polls or
//! epolls the fd and then drains it.

use std::io;
use std::mem;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
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
}

impl UdpOptions {
    /// Options for `addr` with everything else at its default.
    pub fn new(addr: SocketAddr) -> Self {
        Self {
            addr,
            netns: None,
            reuse_port: false,
            recv_buffer: None,
            send_buffer: None,
        }
    }
}

/// A UDP socket with batched I/O.
#[derive(Debug)]
pub struct UdpSocket {
    fd: OwnedFd,
    local: SocketAddr,
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
        Ok(UdpSocket { fd, local })
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
        while next < total {
            let msgs = batch.prepare(next);
            // SAFETY: `prepare` filled `msgs` headers pointing at the
            // batch's own iovec, name and payload storage, which is not
            // moved or touched during the call.
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
                    let sent = sent as usize;
                    report.sent += sent;
                    next += sent;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // The first message of this call failed: skip it.
                    report.failed += 1;
                    report.last_error = Some(e);
                    next += 1;
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
    lens: Vec<usize>,
    addrs: Vec<SocketAddr>,
    truncated: Vec<bool>,
    count: usize,
}

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
            lens: vec![0; capacity],
            addrs: vec![unspecified; capacity],
            truncated: vec![false; capacity],
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

    /// Iterates over the received `(source, payload)` pairs.
    pub fn iter(&self) -> impl Iterator<Item = (SocketAddr, &[u8])> + '_ {
        (0..self.count).map(|i| self.get(i))
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
            h.msg_control = std::ptr::null_mut();
            h.msg_controllen = 0;
            h.msg_flags = 0;
            self.hdrs[i].msg_len = 0;
        }
    }

    fn finish(&mut self, n: usize) {
        for i in 0..n {
            let h = &self.hdrs[i];
            self.lens[i] = (h.msg_len as usize).min(self.slot);
            self.truncated[i] = h.msg_hdr.msg_flags & libc::MSG_TRUNC != 0;
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

    /// Fills headers for entries `start..`, one message per datagram;
    /// returns the number of messages.
    fn prepare(&mut self, start: usize) -> usize {
        let base = self.buf.as_mut_ptr();
        let n = self.entries.len() - start;
        for (k, e) in self.entries[start..].iter().enumerate() {
            self.iovs[k] = libc::iovec {
                // SAFETY: e.off + e.len <= used <= buf.len().
                iov_base: unsafe { base.add(e.off) }.cast(),
                iov_len: e.len,
            };
            let namelen = sockaddr_from(&e.addr, &mut self.names[k]);
            let h = &mut self.hdrs[k].msg_hdr;
            h.msg_name = (&mut self.names[k] as *mut libc::sockaddr_storage).cast();
            h.msg_namelen = namelen;
            h.msg_iov = &mut self.iovs[k];
            h.msg_iovlen = 1;
            h.msg_control = std::ptr::null_mut();
            h.msg_controllen = 0;
            h.msg_flags = 0;
        }
        n
    }
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

    fn recv_all(
        sock: &UdpSocket,
        batch: &mut RecvBatch,
        want: usize,
    ) -> Vec<(SocketAddr, Vec<u8>)> {
        let mut got = Vec::new();
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
                    }
                    got.extend(batch.iter().map(|(a, d)| (a, d.to_vec())));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("recv_batch: {e}"),
            }
        }
        got
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
        for any in ["127.0.0.1:0", "[::1]:0"] {
            let opts = UdpOptions {
                netns: Some(ns.path()),
                ..UdpOptions::new(any.parse().unwrap())
            };
            let a = UdpSocket::bind(&opts).unwrap();
            let b = UdpSocket::bind(&opts).unwrap();
            let mut rb = RecvBatch::new(8, 2048);
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
            let got = recv_all(&b, &mut rb, 50);
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
        let opts = UdpOptions {
            netns: Some(ns.path()),
            ..UdpOptions::new("127.0.0.1:0".parse().unwrap())
        };
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
        let got = recv_all(&b, &mut RecvBatch::new(4, 100), 2);
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
        let got = recv_all(&b, &mut RecvBatch::new(16, 2048), 16);
        assert!(got.iter().all(|(from, _)| *from == a.local_addr()));
        assert_eq!(got[15].1, payload(15, 1400));
    }

    #[test]
    fn reuse_port_group_shares_the_port() {
        require_root!();
        let ns = TestNetns::new("udprp");
        let opts = UdpOptions {
            netns: Some(ns.path()),
            ..UdpOptions::new("127.0.0.1:0".parse().unwrap())
        };
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
}
