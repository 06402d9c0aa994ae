//! MTU: with an underlay MTU of 1400 (the pods get 1400 too, as a CNI
//! would give them), the tunnel runs at 1340 and bulk TCP crosses it both
//! ways: the agent's MSS clamp keeps segments inside the tunnel, and
//! oversized packets get ICMP "fragmentation needed" from the agent pod's
//! forwarding path, so path-MTU discovery works. Needs root, the apiserver
//! build and `cargo build --workspace --bins` (`make test` does all of it).

// Test code: a panic with its message is how a check reports failure.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use sdn_tunnel_e2e::connected_mesh;
use sdn_tunnel_lab::server::{bulk_download, bulk_upload};
use sdn_tunnel_lab::{sys, LabConfig, POD_BULK_PORT};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_tcp_crosses_a_1400_byte_underlay() {
    let mut cfg = LabConfig::new("e2emtu");
    cfg.underlay_octet = 91;
    cfg.underlay_mtu = 1400;
    cfg.nodes_per_cluster = 1;
    let (mut lab, _, _) = connected_mesh(cfg, Duration::from_secs(60)).await.unwrap();
    let east = lab.add_pod("east", 1, "bulk").unwrap();
    let west = lab.add_pod("west", 1, "bulk").unwrap();

    // The tunnel MTU follows the underlay: 1400 - 60.
    let link = sys::ip_in(
        &lab.pod("east", "agent-1").unwrap().netns,
        &["link", "show", "wg0"],
    )
    .unwrap();
    assert!(link.contains("mtu 1340"), "{link}");

    let bytes: u64 = 8 * 1024 * 1024;
    let t = Duration::from_secs(30);
    let to_west = SocketAddr::from((west.ip, POD_BULK_PORT));
    let started = Instant::now();
    assert_eq!(
        bulk_upload(&east.netns, to_west, bytes, t).unwrap(),
        bytes,
        "east -> west upload"
    );
    let up = started.elapsed();
    let started = Instant::now();
    assert_eq!(
        bulk_download(&east.netns, to_west, bytes, t).unwrap(),
        bytes,
        "west -> east download"
    );
    let down = started.elapsed();
    let to_east = SocketAddr::from((east.ip, POD_BULK_PORT));
    assert_eq!(
        bulk_upload(&west.netns, to_east, bytes, t).unwrap(),
        bytes,
        "west -> east upload"
    );
    println!(
        "8 MiB across a 1400-byte underlay: up {:.2} s, down {:.2} s (debug build, shared machine)",
        up.as_secs_f64(),
        down.as_secs_f64()
    );

    let report = lab.down().unwrap();
    assert!(report.leftovers.is_empty(), "{:?}", report.leftovers);
}
