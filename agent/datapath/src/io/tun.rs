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
//! Namespaces: the device is created in (and attached from) the network
//! namespace of the *calling thread*. Create the TUN, and every extra queue,
//! from the agent's own namespace.

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::time::Duration;

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
}

impl Default for TunOptions {
    fn default() -> Self {
        Self {
            name: "wg0".to_owned(),
            mtu: None,
            multi_queue: true,
            up: true,
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
}

impl Tun {
    /// Creates (or attaches to) the device described by `opts`, sets its
    /// MTU and brings it up as asked, and returns its first queue.
    pub fn create(opts: &TunOptions) -> io::Result<Tun> {
        let mut flags = (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short;
        if opts.multi_queue {
            flags |= libc::IFF_MULTI_QUEUE as libc::c_short;
        }
        let (fd, name) = open_queue(&opts.name, flags)?;
        let ctl = Arc::new(ctl_socket()?);
        let tun = Tun {
            fd,
            name,
            flags,
            ctl,
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
        })
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
    pub fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
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
            let mut buf = [0u8; 1500];
            assert_eq!(
                tun.read(&mut buf).unwrap_err().kind(),
                io::ErrorKind::WouldBlock
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
}
