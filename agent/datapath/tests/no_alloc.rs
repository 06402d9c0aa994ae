//! The hot path does not allocate: once a session is up, `encapsulate` and
//! `decapsulate` of data messages touch the heap zero times. Checked with a
//! counting global allocator (this test binary only), per thread so other
//! tests running in parallel do not disturb the count.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use common::*;
use sdn_tunnel_datapath::Outcome;

struct Counting;

thread_local! {
    static ALLOCS: Cell<u64> = const { Cell::new(0) };
}

// SAFETY: forwards every call unchanged to the system allocator; the only
// addition is bumping a thread-local counter, which does not allocate.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCS.with(|c| c.set(c.get() + 1));
        // SAFETY: same contract as our caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System.alloc` above with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCS.with(|c| c.set(c.get() + 1));
        // SAFETY: same contract as our caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocs() -> u64 {
    ALLOCS.with(|c| c.get())
}

#[test]
fn data_path_does_not_allocate() {
    let mut lab = Lab::pair(None);
    establish(&mut lab);
    let b_addr = lab.nodes[1].addr;
    let a_addr = lab.nodes[0].addr;
    let v4p = ipv4_packet(v4("10.1.0.5"), v4("10.2.0.7"), &[0x42; 1400]);
    let v6p = ipv6_packet(v6("fd01::5"), v6("fd02::7"), &[0x43; 1380]);
    let mut wire = vec![0u8; BUF];
    let mut plain = vec![0u8; BUF];
    let [a, b] = &mut lab.nodes[..] else {
        panic!("two nodes")
    };

    let before = allocs();
    let mut delivered = 0;
    for i in 0..2000 {
        let p = if i % 2 == 0 { &v4p } else { &v6p };
        let n = match a.dev.encapsulate(p, &mut wire) {
            Outcome::Network { to, datagram } => {
                assert_eq!(to, b_addr);
                datagram.len()
            }
            other => panic!("encapsulate: {other:?}"),
        };
        match b.dev.decapsulate(a_addr, &wire[..n], &mut plain) {
            Outcome::Tunnel { packet } => {
                assert_eq!(packet, &p[..]);
                delivered += 1;
            }
            other => panic!("decapsulate: {other:?}"),
        }
        // Drops are on the hot path too (a flood of junk must be cheap).
        let _ = b.dev.decapsulate(a_addr, &wire[..n - 1], &mut plain);
    }
    let used = allocs() - before;
    assert_eq!(delivered, 2000);
    assert_eq!(used, 0, "hot path allocated {used} times");

    // The counter does count: a handshake-era path that queues a packet in
    // boringtun allocates, which shows the check above is not vacuous.
    let mut fresh = Lab::pair(None);
    let before = allocs();
    let o = fresh.nodes[0].dev.encapsulate(&v4p, &mut wire);
    assert!(matches!(o, Outcome::Network { .. }), "{o:?}");
    assert!(allocs() > before);
}
