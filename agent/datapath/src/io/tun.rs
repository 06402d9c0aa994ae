//! The TUN device: `IFF_TUN | IFF_NO_PI` (raw IP packets, no extra header),
//! optionally `IFF_MULTI_QUEUE` so that every worker thread reads and writes
//! its own queue fd, MTU and link state set with `SIOCSIFMTU` /
//! `SIOCSIFFLAGS` ioctls (no `ip` subprocess).
//!
//! Every [`Tun`] value is one queue fd, opened non-blocking: [`Tun::read`]
//! returns `ErrorKind::WouldBlock` when no packet is waiting. Dropping the
//! value closes the fd; when the last queue of a non-persistent device is
//! closed the kernel removes the device.
//!
//! Offloads ([`TunOptions::offload`]): the device is opened with
//! `IFF_VNET_HDR` and `TUNSETOFFLOAD` asks for checksum offload, TSO4/TSO6
//! and, where the kernel has it (6.2+), USO. Then
//! [`Tun::read_packets`] receives TCP/UDP super-packets and splits them into
//! MTU-sized packets ([`super::offload::split`]) and [`Tun::write_batch`]
//! writes decrypted TCP segments of one flow as one coalesced super-packet
//! (one `writev`). Without offloads the same calls move one packet each.
//!
//! Namespaces: the device is created in (and attached from) the network
//! namespace of the *calling thread*. Create the TUN, and every extra queue,
//! from the agent's own namespace.

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::time::Duration;

use super::offload::{split, GroBatch, Split, VirtioNetHdr, VNET_HDR_LEN};
use super::sys::{cvt, cvt_size, ifr_name, ifr_name_to_string, poll_one};

const TUN_PATH: &CStr = c"/dev/net/tun";

/// How to create or attach the TUN device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TunOptions {
    /// Interface name (at most 15 bytes), `wg0` by default. A name that
    /// already exists as a TUN device with the same flags is attached to
    /// (that is how the extra queues of a multi-queue device are opened).
    pub name: String,
    /// MTU to set; `None` leaves the kernel's default (1500).
    pub mtu: Option<u32>,
    /// Create with `IFF_MULTI_QUEUE` so that [`Tun::clone_queue`] works.
    pub multi_queue: bool,
    /// Bring the link up after creating it.
    pub up: bool,
    /// Use `IFF_VNET_HDR` and ask for TSO/USO and checksum offload (see
    /// [`Tun::offloads`] for what the kernel accepted).
    pub offload: bool,
}

/// TUN offloads in effect.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TunOffloads {
    /// Frames carry a `virtio_net_hdr`.
    pub vnet_hdr: bool,
    /// The kernel may send TCP super-packets (TSO4/TSO6) and we coalesce
    /// TCP segments on write.
    pub tso: bool,
    /// The kernel may send UDP super-packets (USO4/USO6).
    pub uso: bool,
}

const OFFLOAD_TCP: libc::c_uint = libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6;
const OFFLOAD_UDP: libc::c_uint = libc::TUN_F_USO4 | libc::TUN_F_USO6;

impl Default for TunOptions {
    fn default() -> Self {
        Self {
            name: "wg0".to_owned(),
            mtu: None,
            multi_queue: true,
            up: true,
            offload: true,
        }
    }
}

/// One queue of a TUN device.
#[derive(Debug)]
pub struct Tun {
    fd: OwnedFd,
    name: String,
    flags: libc::c_short,
    /// An `AF_INET` datagram socket in the device's namespace, used for the
    /// interface ioctls (shared by all queues of one device).
    ctl: Arc<OwnedFd>,
    offloads: TunOffloads,
}

impl Tun {
    /// Creates (or attaches to) the device described by `opts`, sets its
    /// MTU and brings it up as asked, and returns its first queue.
    pub fn create(opts: &TunOptions) -> io::Result<Tun> {
        let mut flags = (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short;
        if opts.multi_queue {
            flags |= libc::IFF_MULTI_QUEUE as libc::c_short;
        }
        let (fd, name, flags) = if opts.offload {
            let with_vnet = flags | libc::IFF_VNET_HDR as libc::c_short;
            match open_queue(&opts.name, with_vnet) {
                Ok((fd, name)) => (fd, name, with_vnet),
                // A kernel (or an existing device) without vnet headers.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    let (fd, name) = open_queue(&opts.name, flags)?;
                    (fd, name, flags)
                }
                Err(e) => return Err(e),
            }
        } else {
            let (fd, name) = open_queue(&opts.name, flags)?;
            (fd, name, flags)
        };
        let ctl = Arc::new(ctl_socket()?);
        let vnet_hdr = flags & libc::IFF_VNET_HDR as libc::c_short != 0;
        let mut offloads = TunOffloads {
            vnet_hdr,
            tso: false,
            uso: false,
        };
        if vnet_hdr {
            if set_offload(&fd, OFFLOAD_TCP | OFFLOAD_UDP).is_ok() {
                offloads.tso = true;
                offloads.uso = true;
            } else if set_offload(&fd, OFFLOAD_TCP).is_ok() {
                offloads.tso = true;
            }
        }
        let tun = Tun {
            fd,
            name,
            flags,
            ctl,
            offloads,
        };
        if let Some(mtu) = opts.mtu {
            tun.set_mtu(mtu)?;
        }
        if opts.up {
            tun.set_up(true)?;
        }
        Ok(tun)
    }

    /// Opens one more queue of the same multi-queue device (one per worker
    /// thread). Must be called from the device's network namespace.
    pub fn clone_queue(&self) -> io::Result<Tun> {
        if self.flags & libc::IFF_MULTI_QUEUE as libc::c_short == 0 {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "TUN device was not created with IFF_MULTI_QUEUE",
            ));
        }
        let (fd, name) = open_queue(&self.name, self.flags)?;
        Ok(Tun {
            fd,
            name,
            flags: self.flags,
            ctl: Arc::clone(&self.ctl),
            offloads: self.offloads,
        })
    }

    /// The offloads the kernel accepted for this device.
    pub fn offloads(&self) -> TunOffloads {
        self.offloads
    }

    /// The interface name the kernel gave the device.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether the device is a multi-queue device.
    pub fn is_multi_queue(&self) -> bool {
        self.flags & libc::IFF_MULTI_QUEUE as libc::c_short != 0
    }

    /// Current MTU of the device.
    pub fn mtu(&self) -> io::Result<u32> {
        let mut req = self.ifreq()?;
        // SAFETY: SIOCGIFMTU reads the name from and writes `ifru_mtu` into
        // the ifreq we own; the fd is a valid socket.
        cvt(unsafe { libc::ioctl(self.ctl.as_raw_fd(), libc::SIOCGIFMTU, &mut req) })?;
        // SAFETY: the kernel filled the `ifru_mtu` member of the union.
        let mtu = unsafe { req.ifr_ifru.ifru_mtu };
        Ok(mtu as u32)
    }

    /// Sets the MTU of the device.
    pub fn set_mtu(&self, mtu: u32) -> io::Result<()> {
        let mut req = self.ifreq()?;
        req.ifr_ifru.ifru_mtu = libc::c_int::try_from(mtu)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "MTU out of range"))?;
        // SAFETY: SIOCSIFMTU only reads the ifreq we own; the fd is a valid
        // socket.
        cvt(unsafe { libc::ioctl(self.ctl.as_raw_fd(), libc::SIOCSIFMTU, &req) })?;
        Ok(())
    }

    /// Whether the link is administratively up (`IFF_UP`).
    pub fn is_up(&self) -> io::Result<bool> {
        Ok(self.link_flags()? & libc::IFF_UP as libc::c_short != 0)
    }

    /// Sets or clears `IFF_UP` on the link.
    pub fn set_up(&self, up: bool) -> io::Result<()> {
        let current = self.link_flags()?;
        let wanted = if up {
            current | libc::IFF_UP as libc::c_short
        } else {
            current & !(libc::IFF_UP as libc::c_short)
        };
        if wanted == current {
            return Ok(());
        }
        let mut req = self.ifreq()?;
        req.ifr_ifru.ifru_flags = wanted;
        // SAFETY: SIOCSIFFLAGS only reads the ifreq we own; the fd is a
        // valid socket.
        cvt(unsafe { libc::ioctl(self.ctl.as_raw_fd(), libc::SIOCSIFFLAGS, &req) })?;
        Ok(())
    }

    /// Reads one packet into `buf`, returning its length. Returns
    /// `ErrorKind::WouldBlock` when the queue is empty. A packet longer than
    /// `buf` is truncated by the kernel, so give at least MTU bytes.
    ///
    /// On a device with vnet headers a read may return a super-packet: use
    /// [`Tun::read_packets`] there (this returns `ErrorKind::Unsupported`).
    pub fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        if self.offloads.vnet_hdr {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "TUN has vnet headers: use read_packets",
            ));
        }
        self.read_raw(buf)
    }

    fn read_raw(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            // SAFETY: `buf` is valid for writes of `buf.len()` bytes and the
            // fd is open for the lifetime of `self`.
            let r = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            match cvt_size(r) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                other => return other,
            }
        }
    }

    /// Writes one IP packet. The kernel rejects (`EINVAL`) data that is not
    /// an IPv4 or IPv6 packet.
    pub fn write(&self, packet: &[u8]) -> io::Result<usize> {
        if self.offloads.vnet_hdr {
            let hdr = [0u8; VNET_HDR_LEN];
            let n = self.writev(&[&hdr, packet])?;
            return Ok(n.saturating_sub(VNET_HDR_LEN));
        }
        loop {
            // SAFETY: `packet` is valid for reads of `packet.len()` bytes and
            // the fd is open for the lifetime of `self`.
            let r =
                unsafe { libc::write(self.fd.as_raw_fd(), packet.as_ptr().cast(), packet.len()) };
            match cvt_size(r) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                other => return other,
            }
        }
    }

    /// Reads one frame and returns the IP packets in it (after this call,
    /// `rb.len()` of them): a super-packet is split into MTU-sized packets
    /// with correct headers and checksums, a packet whose checksum the kernel
    /// left to us is completed. `ErrorKind::WouldBlock` when the queue is
    /// empty, `ErrorKind::InvalidData` for a frame that cannot be split
    /// (drop and count it).
    pub fn read_packets(&self, rb: &mut TunReadBuf) -> io::Result<usize> {
        rb.count = 0;
        rb.in_place = None;
        if !self.offloads.vnet_hdr {
            let n = self.read_raw(&mut rb.frame[VNET_HDR_LEN..])?;
            rb.in_place = Some(n);
            rb.count = 1;
            return Ok(1);
        }
        let n = self.read_raw(&mut rb.frame)?;
        let hdr = VirtioNetHdr::decode(&rb.frame[..n]).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                "frame shorter than its vnet header",
            )
        })?;
        let (frame, out) = (&mut rb.frame[VNET_HDR_LEN..n], &mut rb.out);
        match split(frame, &hdr, out, rb.stride, &mut rb.sizes) {
            Ok(Split::InPlace(len)) => {
                rb.in_place = Some(len);
                rb.count = 1;
            }
            Ok(Split::Segments(k)) => rb.count = k,
            Err(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, e)),
        }
        Ok(rb.count)
    }

    /// Writes every packet of `batch` and clears it. With TSO accepted, the
    /// TCP segments of one flow (and with USO the UDP datagrams of one flow)
    /// are first coalesced into super-packets (one `writev` each, payloads
    /// gathered from their slots); otherwise each packet is written on its
    /// own. A frame the kernel refuses is counted
    /// and skipped.
    pub fn write_batch(&self, batch: &mut GroBatch) -> TunWriteReport {
        let mut report = TunWriteReport::default();
        if self.offloads.vnet_hdr && self.offloads.tso {
            batch.coalesce_with(self.offloads.uso);
        } else {
            batch.plain();
        }
        for frame in batch.frames() {
            let mut iov: [&[u8]; 2 + super::offload::GRO_MAX_SEGMENTS] =
                [&[]; 2 + super::offload::GRO_MAX_SEGMENTS];
            let mut n = 0;
            if self.offloads.vnet_hdr {
                iov[0] = &frame.hdr;
                n = 1;
            }
            iov[n] = frame.head;
            n += 1;
            let mut segments = 1;
            for t in frame.tails() {
                iov[n] = t;
                n += 1;
                segments += 1;
            }
            match self.writev(&iov[..n]) {
                Ok(_) => {
                    report.frames += 1;
                    report.packets += segments;
                    if segments > 1 {
                        report.coalesced_frames += 1;
                    }
                }
                Err(e) => {
                    report.failed += segments;
                    report.last_error = Some(e);
                }
            }
        }
        batch.clear();
        report
    }

    fn writev(&self, parts: &[&[u8]]) -> io::Result<usize> {
        let mut iov = [libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        }; 2 + super::offload::GRO_MAX_SEGMENTS];
        let n = parts.len();
        if n > iov.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "too many pieces for one TUN frame",
            ));
        }
        for (v, p) in iov.iter_mut().zip(parts) {
            *v = libc::iovec {
                iov_base: p.as_ptr() as *mut libc::c_void,
                iov_len: p.len(),
            };
        }
        loop {
            // SAFETY: the first `n` iovecs point at live, borrowed slices
            // the kernel only reads; the fd is open for the lifetime of self.
            let r = unsafe { libc::writev(self.fd.as_raw_fd(), iov.as_ptr(), n as libc::c_int) };
            match cvt_size(r) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                other => return other,
            }
        }
    }

    /// Waits until a packet can be read, or the timeout passes (`None`:
    /// forever). Returns whether the queue became readable. Event loops can
    /// instead register [`AsRawFd::as_raw_fd`] with epoll.
    pub fn wait_readable(&self, timeout: Option<Duration>) -> io::Result<bool> {
        poll_one(self.fd.as_raw_fd(), libc::POLLIN, timeout)
    }

    fn ifreq(&self) -> io::Result<libc::ifreq> {
        // SAFETY: ifreq is plain old data (a name array and a union of
        // integers and pointers); all-zero is a valid value.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        req.ifr_name = ifr_name(&self.name)?;
        Ok(req)
    }

    fn link_flags(&self) -> io::Result<libc::c_short> {
        let mut req = self.ifreq()?;
        // SAFETY: SIOCGIFFLAGS reads the name from and writes `ifru_flags`
        // into the ifreq we own; the fd is a valid socket.
        cvt(unsafe { libc::ioctl(self.ctl.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) })?;
        // SAFETY: the kernel filled the `ifru_flags` member of the union.
        Ok(unsafe { req.ifr_ifru.ifru_flags })
    }
}

/// What one [`Tun::write_batch`] did.
#[derive(Debug, Default)]
pub struct TunWriteReport {
    /// Frames (`write`/`writev` calls) the kernel accepted.
    pub frames: usize,
    /// Packets in those frames.
    pub packets: usize,
    /// Frames that carried a coalesced super-packet.
    pub coalesced_frames: usize,
    /// Packets in frames the kernel refused.
    pub failed: usize,
    /// The last refusal.
    pub last_error: Option<io::Error>,
}

/// Caller-owned buffers for [`Tun::read_packets`]: one 64 KiB frame buffer
/// and `max_segments` output slots of `stride` bytes, allocated once.
pub struct TunReadBuf {
    frame: Box<[u8]>,
    out: Box<[u8]>,
    stride: usize,
    sizes: Vec<usize>,
    count: usize,
    in_place: Option<usize>,
}

impl TunReadBuf {
    /// `stride` must hold one MTU-sized packet; `max_segments` bounds how
    /// many packets one super-packet may split into (64 KiB / MSS).
    pub fn new(stride: usize, max_segments: usize) -> Self {
        assert!(stride > 0 && max_segments > 0, "empty TUN read buffer");
        Self {
            frame: vec![0u8; VNET_HDR_LEN + 65_535].into_boxed_slice(),
            out: vec![0u8; stride * max_segments].into_boxed_slice(),
            stride,
            sizes: vec![0; max_segments],
            count: 0,
            in_place: None,
        }
    }

    /// Packets from the last read.
    pub fn len(&self) -> usize {
        self.count
    }

    /// Whether the last read produced nothing.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Packet `i` (`i < len()`).
    pub fn get(&self, i: usize) -> &[u8] {
        assert!(i < self.count, "packet index out of range");
        match self.in_place {
            Some(n) => &self.frame[VNET_HDR_LEN..VNET_HDR_LEN + n],
            None => &self.out[i * self.stride..i * self.stride + self.sizes[i]],
        }
    }

    /// The packets from the last read.
    pub fn iter(&self) -> impl Iterator<Item = &[u8]> + '_ {
        (0..self.count).map(|i| self.get(i))
    }
}

impl AsRawFd for Tun {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl AsFd for Tun {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// Opens `/dev/net/tun` non-blocking and binds it to `name` with `flags`.
fn open_queue(name: &str, flags: libc::c_short) -> io::Result<(OwnedFd, String)> {
    let name_raw = ifr_name(name)?;
    // SAFETY: the path is a valid NUL-terminated string.
    let raw = cvt(unsafe {
        libc::open(
            TUN_PATH.as_ptr(),
            libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
        )
    })
    .map_err(|e| io::Error::new(e.kind(), format!("open /dev/net/tun: {e}")))?;
    // SAFETY: `raw` was just returned by open(2) and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    req.ifr_name = name_raw;
    req.ifr_ifru.ifru_flags = flags;
    // SAFETY: TUNSETIFF reads the ifreq we own and writes the final name back
    // into it; the fd is an open /dev/net/tun.
    cvt(unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, &mut req) })
        .map_err(|e| io::Error::new(e.kind(), format!("TUNSETIFF {name}: {e}")))?;
    Ok((fd, ifr_name_to_string(&req.ifr_name)))
}

/// `TUNSETOFFLOAD` with `flags` (the argument is the value itself).
fn set_offload(fd: &OwnedFd, flags: libc::c_uint) -> io::Result<()> {
    // SAFETY: TUNSETOFFLOAD takes its argument by value, no pointer.
    cvt(unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETOFFLOAD, flags as libc::c_ulong) })?;
    Ok(())
}

/// A datagram socket for interface ioctls, in the calling thread's namespace.
fn ctl_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2) call, no pointers.
    let raw =
        cvt(unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: `raw` was just returned by socket(2) and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::testns::{require_root, TestNetns};
    use std::net::{Ipv4Addr, UdpSocket};

    /// One's-complement sum over `data` (test-only reference).
    fn csum(data: &[u8], mut sum: u32) -> u16 {
        for c in data.chunks(2) {
            let w = if c.len() == 2 {
                u16::from_be_bytes([c[0], c[1]])
            } else {
                u16::from(c[0]) << 8
            };
            sum += u32::from(w);
        }
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        !(sum as u16)
    }

    fn ipv4_udp(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, payload: &[u8]) -> Vec<u8> {
        let total = 28 + payload.len();
        let mut p = vec![0u8; total];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        p[8] = 64;
        p[9] = 17;
        p[12..16].copy_from_slice(&src.octets());
        p[16..20].copy_from_slice(&dst.octets());
        let c = csum(&p[..20], 0);
        p[10..12].copy_from_slice(&c.to_be_bytes());
        p[20..22].copy_from_slice(&sport.to_be_bytes());
        p[22..24].copy_from_slice(&dport.to_be_bytes());
        p[24..26].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
        p[28..].copy_from_slice(payload);
        let mut pseudo = Vec::new();
        pseudo.extend_from_slice(&src.octets());
        pseudo.extend_from_slice(&dst.octets());
        pseudo.extend_from_slice(&[0, 17]);
        pseudo.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
        pseudo.extend_from_slice(&p[20..]);
        let c = csum(&pseudo, 0);
        p[26..28].copy_from_slice(&c.to_be_bytes());
        p
    }

    #[test]
    fn rejects_bad_names() {
        let opts = TunOptions {
            name: "this-name-is-too-long".into(),
            ..TunOptions::default()
        };
        let err = Tun::create(&opts).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }

    #[test]
    fn create_set_mtu_up_queues_and_close() {
        require_root!();
        let ns = TestNetns::new("tun");
        ns.enter(|| {
            let tun = Tun::create(&TunOptions {
                name: "sdt0".into(),
                mtu: Some(1380),
                multi_queue: true,
                up: true,
                offload: true,
            })
            .expect("create tun");
            assert_eq!(tun.name(), "sdt0");
            assert_eq!(tun.mtu().unwrap(), 1380);
            assert!(tun.is_up().unwrap());
            assert!(tun.is_multi_queue());
            let q2 = tun.clone_queue().expect("second queue");
            assert_ne!(q2.as_raw_fd(), tun.as_raw_fd());
            tun.set_mtu(1420).unwrap();
            assert_eq!(q2.mtu().unwrap(), 1420);
            let link = ns.ip_output(&["-o", "link", "show", "sdt0"]);
            assert!(link.contains("mtu 1420"), "{link}");
            assert!(link.contains("UP"), "{link}");
            tun.set_up(false).unwrap();
            assert!(!q2.is_up().unwrap());
            drop(tun);
            drop(q2);
            // Another test thread forking `ip` may hold our fds until its
            // exec, so allow the close a moment to take effect.
            let mut after = String::new();
            for _ in 0..100 {
                after = ns.ip_output(&["-o", "link", "show"]);
                if !after.contains("sdt0") {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            assert!(
                !after.contains("sdt0"),
                "device must vanish on close: {after}"
            );
        });
    }

    #[test]
    fn single_queue_refuses_clone() {
        require_root!();
        let ns = TestNetns::new("tunsq");
        ns.enter(|| {
            let tun = Tun::create(&TunOptions {
                name: "sdt1".into(),
                multi_queue: false,
                up: false,
                ..TunOptions::default()
            })
            .unwrap();
            assert!(!tun.is_up().unwrap());
            // Down, so the kernel sends nothing into it: nothing to read.
            assert!(tun.offloads().vnet_hdr, "offload is on by default");
            let mut rb = TunReadBuf::new(1500, 4);
            assert_eq!(
                tun.read_packets(&mut rb).unwrap_err().kind(),
                io::ErrorKind::WouldBlock
            );
            let mut buf = [0u8; 1500];
            assert_eq!(
                tun.read(&mut buf).unwrap_err().kind(),
                io::ErrorKind::Unsupported,
                "single reads cannot return super-packets"
            );
            assert!(!tun.wait_readable(Some(Duration::from_millis(10))).unwrap());
            assert_eq!(
                tun.clone_queue().unwrap_err().kind(),
                io::ErrorKind::Unsupported
            );
        });
    }

    #[test]
    fn packets_flow_both_ways() {
        require_root!();
        let ns = TestNetns::new("tunio");
        let (tun, sock) = ns.enter(|| {
            let tun = Tun::create(&TunOptions {
                name: "sdt2".into(),
                mtu: Some(1420),
                multi_queue: false,
                up: true,
                offload: false,
            })
            .unwrap();
            ns.ip(&["addr", "add", "10.77.0.1/24", "dev", "sdt2"]);
            let sock = UdpSocket::bind("10.77.0.1:0").unwrap();
            (tun, sock)
        });
        let local_port = sock.local_addr().unwrap().port();
        // Kernel → TUN: a datagram routed into the device comes out of read().
        sock.send_to(b"hello tun", "10.77.0.2:9999").unwrap();
        let mut buf = [0u8; 2048];
        let n = loop {
            assert!(
                tun.wait_readable(Some(Duration::from_secs(5))).unwrap(),
                "no packet on the TUN"
            );
            let n = tun.read(&mut buf).unwrap();
            // Skip anything else the kernel may emit (e.g. IPv6 router solicitations).
            if buf[0] >> 4 == 4 && buf[9] == 17 {
                break n;
            }
        };
        let p = &buf[..n];
        assert_eq!(&p[12..16], &[10, 77, 0, 1]);
        assert_eq!(&p[16..20], &[10, 77, 0, 2]);
        assert_eq!(u16::from_be_bytes([p[22], p[23]]), 9999);
        assert_eq!(&p[28..], b"hello tun");
        assert_eq!(
            csum(&p[..20], 0),
            0,
            "kernel IPv4 header checksum must verify"
        );

        // TUN → kernel: a packet written to the TUN reaches the socket.
        let reply = ipv4_udp(
            Ipv4Addr::new(10, 77, 0, 2),
            9999,
            Ipv4Addr::new(10, 77, 0, 1),
            local_port,
            b"hello socket",
        );
        assert_eq!(tun.write(&reply).unwrap(), reply.len());
        sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut rb = [0u8; 64];
        let (m, from) = sock.recv_from(&mut rb).unwrap();
        assert_eq!(&rb[..m], b"hello socket");
        assert_eq!(from, "10.77.0.2:9999".parse().unwrap());

        // Garbage that is not IP is refused by the kernel.
        assert!(tun.write(&[0u8; 20]).is_err());
    }

    fn offload_tun(ns: &TestNetns, name: &str, cidr: &str, offload: bool) -> Tun {
        ns.enter(|| {
            let tun = Tun::create(&TunOptions {
                name: name.into(),
                mtu: Some(1500),
                multi_queue: true,
                up: true,
                offload,
            })
            .unwrap();
            if cidr.contains(':') {
                ns.ip(&["addr", "add", cidr, "dev", name, "nodad"]);
            } else {
                ns.ip(&["addr", "add", cidr, "dev", name]);
            }
            tun
        })
    }

    /// RX packets and bytes of `dev` as the kernel counts them (one per skb).
    fn rx_counters(ns: &TestNetns, dev: &str) -> (u64, u64) {
        let out = ns.ip_output(&["-s", "link", "show", "dev", dev]);
        let mut lines = out.lines();
        while let Some(l) = lines.next() {
            if l.trim_start().starts_with("RX:") {
                let nums: Vec<u64> = lines
                    .next()
                    .unwrap()
                    .split_whitespace()
                    .map(|n| n.parse().unwrap())
                    .collect();
                return (nums[1], nums[0]);
            }
        }
        panic!("no RX counters in {out}");
    }

    #[test]
    fn kernel_accepts_vnet_header_tso_and_uso() {
        require_root!();
        let ns = TestNetns::new("tunoff");
        let tun = offload_tun(&ns, "sdt4", "10.93.0.1/24", true);
        let got = tun.offloads();
        eprintln!("TUN offloads on this kernel: {got:?}");
        assert_eq!(
            got,
            TunOffloads {
                vnet_hdr: true,
                tso: true,
                uso: true
            }
        );
        let q2 = ns.enter(|| tun.clone_queue()).unwrap();
        assert_eq!(q2.offloads(), got);
    }

    #[test]
    fn uso_super_packet_is_read_and_split() {
        require_root!();
        use crate::io::offload::l4_checksum_valid;
        use crate::io::udp::{SendBatch, UdpOptions, UdpSocket};
        let ns = TestNetns::new("tunuso");
        let tun = offload_tun(&ns, "sdt5", "10.94.0.1/24", true);
        assert!(tun.offloads().uso);
        let sock = UdpSocket::bind(&UdpOptions {
            netns: Some(ns.path()),
            ..UdpOptions::new("10.94.0.1:0".parse().unwrap())
        })
        .unwrap();
        assert!(sock.offloads().gso);
        let mut sb = SendBatch::new(32, 32 * 1500);
        for i in 0..20u8 {
            sb.push("10.94.0.2:7000".parse().unwrap(), &[i; 1200])
                .unwrap();
        }
        let r = sock.send_batch(&mut sb);
        assert_eq!((r.sent, r.gso_messages), (20, 1), "{r:?}");
        let mut rb = TunReadBuf::new(1600, 64);
        let (mut seen, mut reads) = (0u8, 0);
        while seen < 20 {
            assert!(tun.wait_readable(Some(Duration::from_secs(5))).unwrap());
            let n = match tun.read_packets(&mut rb) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => panic!("read_packets: {e}"),
            };
            let mut udp_here = false;
            for p in rb.iter().take(n) {
                if p[0] >> 4 != 4 || p[9] != 17 {
                    continue; // IPv6 noise from the kernel
                }
                udp_here = true;
                assert_eq!(p.len(), 20 + 8 + 1200);
                assert_eq!(csum(&p[..20], 0), 0, "IPv4 header checksum");
                assert!(l4_checksum_valid(p, 20, 17), "UDP checksum");
                assert_eq!(&p[28..], &[seen; 1200][..]);
                seen += 1;
            }
            if udp_here {
                reads += 1;
            }
        }
        eprintln!("USO: 20 datagrams arrived in {reads} TUN read(s)");
        assert!(reads < 20, "the kernel handed over a UDP super-packet");
    }

    #[test]
    fn partial_checksum_from_the_kernel_is_completed() {
        require_root!();
        use crate::io::offload::l4_checksum_valid;
        let ns = TestNetns::new("tuncsum");
        let tun = offload_tun(&ns, "sdt6", "10.95.0.1/24", true);
        // A TCP SYN routed into the TUN leaves the stack CHECKSUM_PARTIAL.
        std::thread::scope(|s| {
            s.spawn(|| {
                ns.enter(|| {
                    let _ = std::net::TcpStream::connect_timeout(
                        &"10.95.0.2:80".parse().unwrap(),
                        Duration::from_millis(1500),
                    );
                })
            });
            let mut rb = TunReadBuf::new(1600, 4);
            loop {
                assert!(tun.wait_readable(Some(Duration::from_secs(5))).unwrap());
                let Ok(n) = tun.read_packets(&mut rb) else {
                    continue;
                };
                let p = rb.get(n - 1);
                if p[0] >> 4 == 4 && p[9] == 6 {
                    assert_eq!(p[20 + 13] & 0x02, 0x02, "a SYN");
                    assert!(l4_checksum_valid(p, 20, 6), "checksum completed");
                    break;
                }
            }
        });
    }

    #[test]
    fn tcp_segments_are_written_as_one_super_packet() {
        require_root!();
        use crate::io::offload::tests::tcp_packet;
        use crate::io::offload::GroBatch;
        let ns = TestNetns::new("tungro");
        // The segments' addresses are 10.1.0.2 → 10.1.0.1.
        let tun = offload_tun(&ns, "sdt7", "10.1.0.1/24", true);
        let plain = offload_tun(&ns, "sdt8", "10.2.0.1/24", false);
        let segs: Vec<Vec<u8>> = (0..10u32)
            .map(|i| tcp_packet(false, 5000 + i * 1000, 1, 0x10, &[], &[i as u8; 1000]))
            .collect();
        let mut batch = GroBatch::new(16, 1600);
        for (dev, t, frames) in [("sdt7", &tun, 1), ("sdt8", &plain, 10)] {
            let before = rx_counters(&ns, dev);
            for p in &segs {
                assert!(batch.push(p));
            }
            let r = t.write_batch(&mut batch);
            assert!(batch.is_empty());
            assert_eq!(
                (r.frames, r.packets, r.failed),
                (frames, 10, 0),
                "{dev}: {r:?}"
            );
            assert_eq!(r.coalesced_frames, usize::from(frames == 1));
            let after = rx_counters(&ns, dev);
            // One skb of 40 + 10 000 bytes with offloads, ten without.
            assert_eq!(after.0 - before.0, frames as u64, "{dev} rx packets");
            assert_eq!(
                after.1 - before.1,
                40 * frames as u64 + 10_000,
                "{dev} rx bytes"
            );
        }
        // Single packets still go through on the vnet-header device.
        assert_eq!(tun.write(&segs[0]).unwrap(), segs[0].len());
    }

    /// Moves packets from `from` to `to` until `stop`: reads split
    /// super-packets, writes coalesce them again. Returns (reads that held
    /// more than one packet, coalesced frames written, packets moved).
    fn relay(from: &Tun, to: &Tun, stop: &std::sync::atomic::AtomicBool) -> (usize, usize, usize) {
        use crate::io::offload::GroBatch;
        use std::sync::atomic::Ordering;
        let mut rb = TunReadBuf::new(1600, 64);
        let mut batch = GroBatch::new(64, 1600);
        let (mut split_reads, mut coalesced, mut moved) = (0, 0, 0);
        while !stop.load(Ordering::Relaxed) {
            if !from.wait_readable(Some(Duration::from_millis(20))).unwrap() {
                continue;
            }
            loop {
                match from.read_packets(&mut rb) {
                    Ok(n) => {
                        if n > 1 {
                            split_reads += 1;
                        }
                        for p in rb.iter() {
                            if !batch.push(p) {
                                let r = to.write_batch(&mut batch);
                                assert_eq!(r.failed, 0, "{r:?}");
                                coalesced += r.coalesced_frames;
                                moved += r.packets;
                                assert!(batch.push(p));
                            }
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => panic!("read_packets: {e}"),
                }
                if batch.len() >= 48 {
                    break;
                }
            }
            let r = to.write_batch(&mut batch);
            assert_eq!(r.failed, 0, "{r:?}");
            coalesced += r.coalesced_frames;
            moved += r.packets;
        }
        (split_reads, coalesced, moved)
    }

    /// Sends 4 MB over TCP from namespace a to b through two TUNs and a
    /// userspace relay; returns the relay statistics of both directions.
    fn stream_through_relay(
        offload_a: bool,
        offload_b: bool,
        v6: bool,
    ) -> ((usize, usize, usize), (usize, usize, usize)) {
        use std::io::{Read, Write};
        use std::sync::atomic::{AtomicBool, Ordering};
        let a = TestNetns::new("relaya");
        let b = TestNetns::new("relayb");
        let (cidr_a, cidr_b, server_addr): (&str, &str, std::net::SocketAddr) = if v6 {
            (
                "fd96::1/64",
                "fd96::2/64",
                "[fd96::2]:5001".parse().unwrap(),
            )
        } else {
            (
                "10.96.0.1/24",
                "10.96.0.2/24",
                "10.96.0.2:5001".parse().unwrap(),
            )
        };
        let ta = offload_tun(&a, "sdra", cidr_a, offload_a);
        let tb = offload_tun(&b, "sdrb", cidr_b, offload_b);
        let listener = b.enter(|| std::net::TcpListener::bind(server_addr).unwrap());
        let data: Vec<u8> = (0..4_000_000u32).map(|i| (i % 251) as u8).collect();
        let stop = AtomicBool::new(false);
        let (ab, ba, received) = std::thread::scope(|s| {
            // Stops the relays however this closure ends (a failed
            // assertion must not leave them spinning).
            struct StopOnDrop<'a>(&'a AtomicBool);
            impl Drop for StopOnDrop<'_> {
                fn drop(&mut self) {
                    self.0.store(true, Ordering::Relaxed);
                }
            }
            let _stop = StopOnDrop(&stop);
            let ab = s.spawn(|| relay(&ta, &tb, &stop));
            let ba = s.spawn(|| relay(&tb, &ta, &stop));
            let server = s.spawn(|| {
                let (mut c, _) = listener.accept().unwrap();
                c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
                let mut got = Vec::new();
                c.read_to_end(&mut got).unwrap();
                got
            });
            a.enter(|| {
                let mut c =
                    std::net::TcpStream::connect_timeout(&server_addr, Duration::from_secs(5))
                        .unwrap();
                c.write_all(&data).unwrap();
            });
            let received = server.join().unwrap();
            stop.store(true, Ordering::Relaxed);
            (ab.join().unwrap(), ba.join().unwrap(), received)
        });
        eprintln!(
            "offload a={offload_a} b={offload_b} v6={v6}: relay a→b: {} TSO reads split, {} GRO frames, {} packets; b→a: {:?}",
            ab.0, ab.1, ab.2, ba
        );
        assert!(
            received == data,
            "stream corrupted: {} of {} bytes",
            received.len(),
            data.len()
        );
        (ab, ba)
    }

    #[test]
    fn tcp_stream_through_two_offload_tuns_and_a_relay() {
        require_root!();
        for v6 in [false, true] {
            let (ab, _) = stream_through_relay(true, true, v6);
            assert!(
                ab.0 > 0,
                "the sender's kernel handed over TSO super-packets"
            );
            assert!(
                ab.1 > 0,
                "segments were coalesced on the way into the receiver"
            );
        }
    }

    #[test]
    fn tcp_stream_between_offload_and_plain_tuns() {
        require_root!();
        // Plain receiver: super-packets split, nothing coalesced.
        let (ab, _) = stream_through_relay(true, false, false);
        assert!(ab.0 > 0);
        assert_eq!(ab.1, 0);
        // Plain sender: no super-packets to split, coalescing on write.
        let (ab, _) = stream_through_relay(false, true, false);
        assert_eq!(ab.0, 0);
        assert!(ab.1 > 0);
    }

    #[test]
    fn multi_queue_spreads_flows_over_queues() {
        require_root!();
        let ns = TestNetns::new("tunmq");
        let q1 = offload_tun(&ns, "sdmq", "10.99.0.1/24", true);
        let q2 = ns.enter(|| q1.clone_queue()).unwrap();
        let senders: Vec<UdpSocket> = ns.enter(|| {
            (0..16)
                .map(|_| UdpSocket::bind("10.99.0.1:0").unwrap())
                .collect()
        });
        for s in &senders {
            s.send_to(b"flow", "10.99.0.2:4000").unwrap();
        }
        let mut counts = [0usize; 2];
        let mut rb = TunReadBuf::new(1600, 4);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while counts[0] + counts[1] < 16 && std::time::Instant::now() < deadline {
            for (k, q) in [&q1, &q2].into_iter().enumerate() {
                if !q.wait_readable(Some(Duration::from_millis(10))).unwrap() {
                    continue;
                }
                while let Ok(n) = q.read_packets(&mut rb) {
                    counts[k] += rb
                        .iter()
                        .take(n)
                        .filter(|p| p[0] >> 4 == 4 && p[9] == 17 && p.ends_with(b"flow"))
                        .count();
                }
            }
        }
        assert_eq!(counts[0] + counts[1], 16, "{counts:?}");
        assert!(
            counts[0] > 0 && counts[1] > 0,
            "both queues carry flows: {counts:?}"
        );
    }

    #[test]
    fn udp_datagrams_are_written_as_one_super_packet() {
        require_root!();
        use crate::io::offload::tests::udp_packet;
        use crate::io::offload::GroBatch;
        use crate::io::udp::{RecvBatch, UdpOptions, UdpSocket, GRO_SLOT_SIZE};
        let ns = TestNetns::new("tunugro");
        // The datagrams go from 10.1.0.2:4000 to 10.1.0.1:51820.
        let tun = offload_tun(&ns, "sdtu", "10.1.0.1/24", true);
        assert!(tun.offloads().uso);
        let mut batch = GroBatch::new(32, 1600);
        for (gro, round) in [(false, 0u8), (true, 1)] {
            let sock = UdpSocket::bind(&UdpOptions {
                netns: Some(ns.path()),
                gro,
                ..UdpOptions::new("10.1.0.1:51820".parse().unwrap())
            })
            .unwrap();
            let before = rx_counters(&ns, "sdtu");
            for i in 0..20u16 {
                let len = if i == 19 { 333 } else { 1000 };
                let payload = vec![(i as u8) ^ round; len];
                assert!(batch.push(&udp_packet(false, 0x100 + i, &payload)));
            }
            let r = tun.write_batch(&mut batch);
            assert_eq!(
                (r.frames, r.coalesced_frames, r.packets, r.failed),
                (1, 1, 20, 0),
                "{r:?}"
            );
            let after = rx_counters(&ns, "sdtu");
            assert_eq!(after.0 - before.0, 1, "one skb");
            assert_eq!(after.1 - before.1, 28 + 19 * 1000 + 333);
            // The socket sees the 20 datagrams (split by the kernel, or as
            // one GRO message it hands over whole).
            let mut rb = RecvBatch::new(8, GRO_SLOT_SIZE);
            let mut got: Vec<Vec<u8>> = Vec::new();
            let mut coalesced = false;
            while got.len() < 20 {
                assert!(sock.wait_readable(Some(Duration::from_secs(5))).unwrap());
                if let Ok(n) = sock.recv_batch(&mut rb) {
                    coalesced |= (0..n).any(|i| rb.segment_size(i).is_some());
                    got.extend(rb.datagrams().map(|(_, d)| d.to_vec()));
                }
            }
            for (i, d) in got.iter().enumerate() {
                let len = if i == 19 { 333 } else { 1000 };
                assert!(*d == vec![(i as u8) ^ round; len], "datagram {i}");
            }
            assert_eq!(coalesced, gro, "a GRO socket gets the super-packet whole");
        }
    }
}
