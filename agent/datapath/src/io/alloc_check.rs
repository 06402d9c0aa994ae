//! Proof that the batched I/O paths do not allocate per packet: a counting
//! global allocator for this crate's unit-test binary (per thread, so tests
//! running in parallel do not disturb each other's counts).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::time::Duration;

use super::offload::GroBatch;
use super::testns::{require_root, TestNetns};
use super::tun::{Tun, TunOptions, TunReadBuf};
use super::udp::{RecvBatch, SendBatch, UdpOptions, UdpSocket, GRO_SLOT_SIZE};

struct Counting;

thread_local! {
    static ALLOCS: Cell<u64> = const { Cell::new(0) };
}

// SAFETY: forwards every call unchanged to the system allocator; the only
// addition is bumping a thread-local counter, which does not allocate.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = ALLOCS.try_with(|c| c.set(c.get() + 1));
        // SAFETY: same contract as our caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System.alloc`/`realloc` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let _ = ALLOCS.try_with(|c| c.set(c.get() + 1));
        // SAFETY: same contract as our caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Runs `f` and returns its result and the allocations it made on this thread.
fn allocations<R>(f: impl FnOnce() -> R) -> (R, u64) {
    let before = ALLOCS.with(Cell::get);
    let r = f();
    (r, ALLOCS.with(Cell::get) - before)
}

#[test]
fn the_counter_sees_allocations() {
    let (v, n) = allocations(|| vec![1u8; 10]);
    assert_eq!((v.len(), n), (10, 1));
}

#[test]
fn udp_batches_do_not_allocate() {
    require_root!();
    let ns = TestNetns::new("noalloc");
    let opts = UdpOptions {
        netns: Some(ns.path()),
        ..UdpOptions::new("127.0.0.1:0".parse().unwrap())
    };
    let a = UdpSocket::bind(&opts).unwrap();
    let b = UdpSocket::bind(&opts).unwrap();
    let mut sb = SendBatch::new(64, 64 * 1500);
    let mut rb = RecvBatch::new(16, GRO_SLOT_SIZE);
    let to = b.local_addr();
    for round in 0..3 {
        let (report, n) = allocations(|| {
            for i in 0..64 {
                let len = if i < 40 { 1400 } else { 700 };
                let slot = sb.spare();
                slot[..len].fill(i as u8);
                sb.commit(to, len).unwrap();
            }
            a.send_batch(&mut sb)
        });
        assert_eq!(report.sent, 64);
        assert!(report.gso_messages > 0);
        assert_eq!(n, 0, "send_batch allocated (round {round})");
        let mut got = 0;
        while got < 64 {
            assert!(b.wait_readable(Some(Duration::from_secs(5))).unwrap());
            let (r, n) = allocations(|| b.recv_batch(&mut rb).map(|_| rb.datagrams().count()));
            assert_eq!(n, 0, "recv_batch allocated (round {round})");
            got += r.unwrap_or(0);
        }
        assert_eq!(got, 64);
    }
}

#[test]
fn tun_offload_paths_do_not_allocate() {
    require_root!();
    let ns = TestNetns::new("noalloct");
    let (tun, sock) = ns.enter(|| {
        let tun = Tun::create(&TunOptions {
            name: "sdt9".into(),
            mtu: Some(1500),
            multi_queue: false,
            up: true,
            offload: true,
        })
        .unwrap();
        ns.ip(&["addr", "add", "10.97.0.1/24", "dev", "sdt9"]);
        let sock = UdpSocket::bind(&UdpOptions::new("10.97.0.1:0".parse().unwrap())).unwrap();
        (tun, sock)
    });
    let mut sb = SendBatch::new(32, 32 * 1500);
    let mut rb = TunReadBuf::new(1600, 64);
    let mut gro = GroBatch::new(64, 1600);
    let segs: Vec<Vec<u8>> = (0..10u32)
        .map(|i| super::offload::tests::tcp_packet(false, i * 1000, 1, 0x10, &[], &[1; 1000]))
        .collect();
    for round in 0..3 {
        for _ in 0..20 {
            sb.push("10.97.0.2:9".parse().unwrap(), &[5; 1200]).unwrap();
        }
        assert_eq!(sock.send_batch(&mut sb).sent, 20);
        let mut udp = 0;
        while udp < 20 {
            assert!(tun.wait_readable(Some(Duration::from_secs(5))).unwrap());
            let (r, n) = allocations(|| tun.read_packets(&mut rb));
            assert_eq!(n, 0, "read_packets allocated (round {round})");
            if r.is_ok() {
                udp += rb.iter().filter(|p| p[0] >> 4 == 4 && p[9] == 17).count();
            }
        }
        let (report, n) = allocations(|| {
            for s in &segs {
                gro.push(s);
            }
            tun.write_batch(&mut gro)
        });
        assert_eq!(n, 0, "write_batch allocated (round {round})");
        assert_eq!((report.coalesced_frames, report.failed), (1, 0));
    }
}
