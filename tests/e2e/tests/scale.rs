//! 200 extra TunnelPeers in west that never answer (nodes still booting, or
//! gone), on real apiservers, while east pods probe west pods every 0.5 s:
//! not one probe may fail, the agents program the 200 and drop them again,
//! status writes alone never re-plan peers, and nothing is logged per peer
//! per retry at the DaemonSet's log level. Needs root, the apiserver build
//! and `cargo build --workspace --bins` (`make test` does all of it).

// Test code: a panic with its message is how a check reports failure.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use kube::api::{DeleteParams, Patch, PatchParams};
use kube::Api;
use sdn_tunnel_api::{TunnelPeer, TunnelPeerSpec};
use sdn_tunnel_e2e::{connected_mesh, dump_logs, tunnel_peers, FIELD_MANAGER, NAMESPACE};
use sdn_tunnel_lab::server::{tcp_request, udp_request};
use sdn_tunnel_lab::{Identity, Lab, LabConfig, Pod, POD_SERVER_PORT};

const IDLE: u32 = 200;

/// A distinct valid public key per `i` (any 32 bytes are a Curve25519 point).
fn idle_key(i: u32) -> String {
    let mut k = [0x5au8; 32];
    k[..4].copy_from_slice(&i.to_be_bytes());
    base64::engine::general_purpose::STANDARD.encode(k)
}

fn idle_peer(i: u32) -> TunnelPeer {
    TunnelPeer::new(
        &format!("idle-{i}"),
        TunnelPeerSpec {
            cluster: "west".into(),
            node: format!("idle-{i}"),
            public_key: idle_key(i),
            // On the underlay, where nobody has these addresses.
            endpoints: vec![format!("10.69.2.{}:51820", 100 + i % 100)],
            // Inside west's declared 10.2.0.0/16, beside the real nodes' /24s.
            pod_cidrs: vec![format!("10.2.{}.0/24", 10 + i)],
            listen_port: 51820,
            mtu: None,
        },
    )
}

/// How many peers each east agent reports in its status.
async fn east_peer_counts(lab: &Lab) -> Vec<usize> {
    tunnel_peers(lab)
        .await
        .unwrap()
        .into_iter()
        .filter(|(c, p)| c == "east" && !p.spec.node.starts_with("idle-"))
        .map(|(_, p)| p.status.map(|s| s.peers.len()).unwrap_or(0))
        .collect()
}

async fn wait_counts(lab: &Lab, agents: &[Pod], want: usize, timeout: Duration) -> Duration {
    let started = Instant::now();
    loop {
        let counts = east_peer_counts(lab).await;
        if counts.len() == 2 && counts.iter().all(|c| *c == want) {
            return started.elapsed();
        }
        if started.elapsed() > timeout {
            dump_logs(lab, agents);
            panic!("east agents report {counts:?} peers, want {want} each");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn log_lines(lab: &Lab, agents: &[Pod], needle: &str) -> usize {
    agents
        .iter()
        .filter(|p| p.cluster == "east")
        .map(|p| {
            std::fs::read_to_string(lab.pod_log(&p.cluster, &p.name))
                .unwrap_or_default()
                .lines()
                .filter(|l| l.contains(needle))
                .count()
        })
        .sum()
}

fn rss_kib(pod: &Pod) -> u64 {
    let pid = pod.server.as_ref().unwrap().pid;
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

/// Probes from `from` to every target every 0.5 s (TCP and UDP) until
/// stopped; returns the failures (what, when) and the latencies.
fn start_probes(
    from: Pod,
    targets: Vec<(String, SocketAddr)>,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<(Vec<String>, Vec<Duration>, usize)> {
    std::thread::spawn(move || {
        let started = Instant::now();
        let (mut failures, mut latencies, mut probes) = (Vec::new(), Vec::new(), 0);
        let t = Duration::from_secs(2);
        while !stop.load(Ordering::Relaxed) {
            let round = Instant::now();
            for (name, addr) in &targets {
                for (proto, r) in [
                    ("TCP", tcp_request(&from.netns, *addr, t)),
                    ("UDP", udp_request(&from.netns, *addr, t)),
                ] {
                    probes += 1;
                    let at = started.elapsed().as_secs_f64();
                    match r {
                        Ok(answer) if answer == *name => {}
                        other => failures.push(format!("{proto} {name} at {at:.1}s: {other:?}")),
                    }
                }
                latencies.push(round.elapsed());
            }
            std::thread::sleep(Duration::from_millis(500).saturating_sub(round.elapsed()));
        }
        (failures, latencies, probes)
    })
}

fn percentile(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    v.get(((v.len() as f64 - 1.0) * p) as usize)
        .copied()
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_idle_peers_cost_no_probe_and_no_log_flood() {
    let mut cfg = LabConfig::new("e2escale");
    cfg.underlay_octet = 69;
    let (mut lab, _installed, agents) = connected_mesh(cfg, Duration::from_secs(90)).await.unwrap();
    lab.add_pod("east", 1, "web-1").unwrap();
    lab.add_pod("west", 1, "web-1").unwrap();
    lab.add_pod("west", 2, "web-2").unwrap();
    let from = lab.pod("east", "web-1").unwrap().clone();
    let targets: Vec<(String, SocketAddr)> = ["web-1", "web-2"]
        .iter()
        .map(|n| {
            let p = lab.pod("west", n).unwrap();
            (n.to_string(), SocketAddr::from((p.ip, POD_SERVER_PORT)))
        })
        .collect();
    let east_agent = agents.iter().find(|p| p.cluster == "east").unwrap().clone();
    let rss_before = rss_kib(&east_agent);
    let stop = Arc::new(AtomicBool::new(false));
    let probes = start_probes(from, targets, stop.clone());
    let warned_before = log_lines(&lab, &agents, " WARN ");

    // 200 peers that never answer.
    let west = lab.client("west", Identity::Admin).await.unwrap();
    let api: Api<TunnelPeer> = Api::namespaced(west, NAMESPACE);
    let created = Instant::now();
    for i in 0..IDLE {
        api.patch(
            &format!("idle-{i}"),
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&idle_peer(i)),
        )
        .await
        .unwrap();
    }
    let writes = created.elapsed();
    let programmed = wait_counts(&lab, &agents, 2 + IDLE as usize, Duration::from_secs(60)).await;
    println!(
        "{IDLE} TunnelPeers written in {:.2} s; every east agent reports them {:.2} s after the first write",
        writes.as_secs_f64(),
        (created.elapsed()).as_secs_f64().min(programmed.as_secs_f64() + writes.as_secs_f64())
    );

    // Steady: statuses keep being written by every agent, handshakes to the
    // 200 keep failing; nothing is re-planned and nothing floods the log.
    let replans_before = log_lines(&lab, &agents, "peers changed");
    let steady = Instant::now();
    tokio::time::sleep(Duration::from_secs(30)).await;
    let replans = log_lines(&lab, &agents, "peers changed") - replans_before;
    let warned = log_lines(&lab, &agents, " WARN ") - warned_before;
    let rss_with = rss_kib(&east_agent);
    println!(
        "steady {:.0} s with {IDLE} idle peers: {replans} re-plans, {warned} WARN lines in east's agents",
        steady.elapsed().as_secs_f64()
    );

    // And gone again.
    for i in 0..IDLE {
        api.delete(&format!("idle-{i}"), &DeleteParams::default())
            .await
            .unwrap();
    }
    let removed = wait_counts(&lab, &agents, 2, Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::Relaxed);
    let (failures, mut latencies, count) = probes.join().unwrap();
    let rss_after = rss_kib(&east_agent);
    println!(
        "removed in {:.2} s; {count} probes, {} failed; round p50 {:?} p95 {:?}; east agent RSS {} -> {} -> {} KiB",
        removed.as_secs_f64(),
        failures.len(),
        percentile(&mut latencies, 0.5),
        percentile(&mut latencies, 0.95),
        rss_before,
        rss_with,
        rss_after
    );
    if !failures.is_empty() {
        dump_logs(&lab, &agents);
    }
    assert!(failures.is_empty(), "probes failed: {failures:#?}");
    assert!(count > 100, "only {count} probes ran");
    assert_eq!(replans, 0, "status-only updates re-planned peers");
    assert!(
        warned <= 2,
        "{warned} WARN lines in 30 s of failing handshakes: per-peer retries must not be WARN"
    );
    let report = lab.down().unwrap();
    assert!(report.leftovers.is_empty(), "{:?}", report.leftovers);
}
