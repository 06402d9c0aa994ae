//! Two clusters, agents with static peer files (`tunnel-agent run
//! --static-peers`, no CRDs, no Kubernetes API): pods behind the agents talk
//! TCP and UDP across clusters, routed from the node namespaces through the
//! agent pods into the tunnel. A bad file is refused at start (exit, nothing
//! created) and on reload (nothing changed); a good reload changes exactly
//! the routes it should; a clean stop leaves none of ours.
//! Needs root and `cargo build --workspace --bins` (`make test` does both).

// Test code: a panic with its message is how a check reports failure.
#![allow(clippy::unwrap_used)]

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use sdn_tunnel_e2e::daemonset::http_get;
use sdn_tunnel_e2e::workspace_binary;
use sdn_tunnel_lab::config::NodePlan;
use sdn_tunnel_lab::server::{tcp_request, udp_request};
use sdn_tunnel_lab::{sys, Lab, LabConfig, Pod, POD_SERVER_PORT};

const PORT: u16 = 51820;

/// Our routes (protocol 93) in a namespace.
fn our_routes(netns: &str) -> Vec<String> {
    sdn_tunnel_e2e::our_routes(netns).unwrap()
}

fn public_key(agent: &Path, key_file: &Path) -> String {
    let out = Command::new(agent)
        .args(["keys", "--key-file"])
        .arg(key_file)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// The static peer file of a node: every node of the other cluster.
fn peer_file(remote: &[(NodePlan, String)]) -> String {
    let mut text = String::from("# written by the static_peers e2e test\n");
    for (node, key) in remote {
        write!(
            text,
            "[Peer]\n# {}\nPublicKey = {key}\nEndpoint = {}:{PORT}\nAllowedIPs = {}\n\n",
            node.name, node.underlay_ip, node.pod_cidr
        )
        .unwrap();
    }
    text
}

fn hup(pod: &Pod) {
    let pid = pod.server.as_ref().unwrap().pid;
    let st = Command::new("kill")
        .args(["-HUP", &pid.to_string()])
        .status()
        .unwrap();
    assert!(st.success());
}

/// Waits until `f` holds, or panics with `what` and the agents' logs.
fn eventually(lab: &Lab, what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        if Instant::now() > deadline {
            for c in ["east", "west"] {
                for n in 1..=2 {
                    let log = lab.pod_log(c, &format!("agent-{n}"));
                    eprintln!(
                        "--- {c}/agent-{n}:\n{}",
                        std::fs::read_to_string(log).unwrap_or_default()
                    );
                }
            }
            panic!("timed out: {what}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn static_peers_route_pods_across_clusters_through_the_agent_pods() {
    let mut cfg = LabConfig::new("e2estat");
    cfg.underlay_octet = 90;
    let mut lab = Lab::up(cfg).await.expect("lab up");
    let agent = workspace_binary("tunnel-agent").unwrap();

    // Keys first: each node's file lists the other cluster's public keys.
    let mut nodes: Vec<(String, NodePlan, PathBuf, String)> = Vec::new();
    for plan in lab.config().plan() {
        for node in &plan.nodes {
            let key = lab
                .cluster_dir(&plan.name)
                .join(format!("{}.key", node.name));
            let public = public_key(&agent, &key);
            nodes.push((plan.name.clone(), node.clone(), key, public));
        }
    }
    let remote_of = |cluster: &str| -> Vec<(NodePlan, String)> {
        nodes
            .iter()
            .filter(|(c, ..)| c != cluster)
            .map(|(_, n, _, k)| (n.clone(), k.clone()))
            .collect()
    };
    let mut files = Vec::new();
    let mut agents = Vec::new();
    let started = Instant::now();
    for (cluster, node, key, _) in &nodes {
        let file = lab
            .cluster_dir(cluster)
            .join(format!("{}.peers", node.name));
        std::fs::write(&file, peer_file(&remote_of(cluster))).unwrap();
        let args: Vec<String> = vec![
            "run".into(),
            "--static-peers".into(),
            file.display().to_string(),
            "--key-file".into(),
            key.display().to_string(),
            "--node-netns".into(),
            format!("/run/netns/{}", node.netns),
            "--listen-port".into(),
            PORT.to_string(),
            "--metrics-addr".into(),
            "0.0.0.0:9586".into(),
            // Short keepalives: a broken path shows within seconds below.
            "--keepalive-secs".into(),
            "2".into(),
        ];
        // No kubeconfig, no namespace: nothing here talks to an apiserver.
        let env = vec![("RUST_LOG".to_string(), "info".to_string())];
        let name = format!("agent-{}", node.index);
        agents.push(
            lab.add_pod_running(cluster, node.index, &name, &agent, &args, &env)
                .unwrap(),
        );
        files.push((cluster.clone(), node.clone(), file));
    }
    for c in ["east", "west"] {
        lab.add_pod(c, 1, "web-1").unwrap();
        lab.add_pod(c, 2, "web-2").unwrap();
    }

    // Every pod of one cluster reaches every pod of the other, TCP and UDP.
    let t = Duration::from_millis(1500);
    let exchange = |lab: &Lab, from_c: &str, from: &str, to_c: &str, to: &str| -> bool {
        let (src, dst) = (lab.pod(from_c, from).unwrap(), lab.pod(to_c, to).unwrap());
        let addr = SocketAddr::from((dst.ip, POD_SERVER_PORT));
        tcp_request(&src.netns, addr, t).is_ok_and(|n| n == to)
            && udp_request(&src.netns, addr, t).is_ok_and(|n| n == to)
    };
    for (from_c, to_c) in [("east", "west"), ("west", "east")] {
        for from in ["web-1", "web-2"] {
            for to in ["web-1", "web-2"] {
                eventually(
                    &lab,
                    &format!("TCP+UDP {from_c}/{from} -> {to_c}/{to}"),
                    Duration::from_secs(30),
                    || exchange(&lab, from_c, from, to_c, to),
                );
            }
        }
    }
    println!(
        "8 TCP + 8 UDP cross-cluster exchanges through static peers within {:.2} s of the agents' start",
        started.elapsed().as_secs_f64()
    );

    // Each agent is ready and counts both remote peers as connected in
    // /metrics (no Kubernetes involved in either).
    for a in &agents {
        let at = SocketAddr::from((a.ip, 9586));
        let (status, _) = http_get(&a.netns, at, "/readyz").unwrap();
        assert_eq!(status, 200, "{}/{} /readyz", a.cluster, a.name);
        eventually(
            &lab,
            "peers connected in /metrics",
            Duration::from_secs(10),
            || {
                http_get(&a.netns, at, "/metrics").is_ok_and(|(_, body)| {
                    body.lines()
                        .any(|l| l.starts_with("sdn_tunnel_peers_connected") && l.ends_with(" 2"))
                })
            },
        );
    }

    // A path that breaks silently (west node 1's datagrams dropped before
    // east node 1's socket): the receive clock of that peer runs on while
    // the other peer's keepalives keep arriving. (The status rule built on
    // it, Stale/NothingReceived after two keepalives + 10 s, is unit-tested
    // in sdn-tunnel-core; static mode writes no status.)
    let east_agent = &agents[0];
    let west1 = &nodes
        .iter()
        .find(|(c, n, ..)| c == "west" && n.index == 1)
        .unwrap();
    let west2 = &nodes
        .iter()
        .find(|(c, n, ..)| c == "west" && n.index == 2)
        .unwrap();
    let east_node = &files[0].1;
    let nft = |script: &str| {
        sys::run("ip", &["netns", "exec", &east_node.netns, "nft", script]).unwrap();
    };
    nft(&format!(
        "add table inet e2e_block; add chain inet e2e_block input {{ type filter hook input priority -10; }}; \
         add rule inet e2e_block input ip saddr {} udp dport {PORT} drop",
        west1.1.underlay_ip
    ));
    let receive_age = |key: &str| -> Option<f64> {
        let (_, body) = http_get(
            &east_agent.netns,
            SocketAddr::from((east_agent.ip, 9586)),
            "/metrics",
        )
        .ok()?;
        body.lines()
            .find(|l| {
                l.starts_with("sdn_tunnel_peer_last_receive_age_seconds")
                    && l.contains(&format!("public_key=\"{key}\""))
            })
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    };
    eventually(
        &lab,
        "west node 1 silent for 6 s",
        Duration::from_secs(20),
        || receive_age(&west1.3).is_some_and(|a| a > 6.0),
    );
    let live = receive_age(&west2.3).unwrap();
    assert!(live < 4.0, "west node 2 keeps talking: {live} s");
    nft("delete table inet e2e_block");
    eventually(
        &lab,
        "west node 1 heard again",
        Duration::from_secs(10),
        || receive_age(&west1.3).is_some_and(|a| a < 4.0),
    );

    // The node routes the remote pod CIDRs via its agent pod (not directly
    // into a tunnel device, which lives in the agent pod).
    let (east1, west_nodes) = (&files[0].1, remote_of("east"));
    let east_agent1 = agents[0].clone();
    let node_routes = our_routes(&east1.netns);
    for (w, _) in &west_nodes {
        assert!(
            node_routes
                .iter()
                .any(|r| r.starts_with(&w.pod_cidr.to_string())
                    && r.contains(&format!("via {}", east_agent1.ip))),
            "east node 1 routes {} via its agent pod: {node_routes:?}",
            w.pod_cidr
        );
    }
    let pod_routes = our_routes(&east_agent1.netns);
    assert_eq!(pod_routes.len(), 2, "{pod_routes:?}");
    assert!(
        pod_routes.iter().all(|r| r.contains("dev wg0")),
        "{pod_routes:?}"
    );

    // A bad reload (west's two nodes overlapping) is refused whole: routes
    // and traffic stay as they were.
    let file = &files[0].2;
    let good = std::fs::read_to_string(file).unwrap();
    let overlapping = format!(
        "{good}[Peer]\nPublicKey = {}\nAllowedIPs = {}\n",
        nodes[0].3, west_nodes[0].0.pod_cidr
    );
    std::fs::write(file, overlapping).unwrap();
    hup(&east_agent1);
    let log = lab.pod_log("east", "agent-1");
    eventually(
        &lab,
        "refused reload logged",
        Duration::from_secs(10),
        || std::fs::read_to_string(&log).is_ok_and(|l| l.contains("static peers not reloaded")),
    );
    assert_eq!(
        our_routes(&east1.netns),
        node_routes,
        "a refused reload changes no route"
    );
    // Nor may a file route this node's own pod range into the tunnel.
    let local_range = format!(
        "{good}[Peer]\nPublicKey = {}\nAllowedIPs = {}\n",
        nodes[1].3, east1.pod_cidr
    );
    std::fs::write(file, local_range).unwrap();
    hup(&east_agent1);
    eventually(&lab, "local range refused", Duration::from_secs(10), || {
        std::fs::read_to_string(&log).is_ok_and(|l| l.contains("own pod IP"))
    });
    assert_eq!(our_routes(&east1.netns), node_routes);
    assert!(exchange(&lab, "east", "web-1", "west", "web-2"));

    // A good reload without west node 2: its route goes, node 1's stays.
    std::fs::write(file, peer_file(&west_nodes[..1])).unwrap();
    hup(&east_agent1);
    let gone = west_nodes[1].0.pod_cidr.to_string();
    eventually(
        &lab,
        "west node 2's route removed",
        Duration::from_secs(10),
        || {
            let r = our_routes(&east1.netns);
            r.len() == 1 && !r.iter().any(|l| l.starts_with(&gone))
        },
    );
    assert!(exchange(&lab, "east", "web-1", "west", "web-1"));
    std::fs::write(file, good).unwrap();
    hup(&east_agent1);
    eventually(
        &lab,
        "route back after reload",
        Duration::from_secs(10),
        || our_routes(&east1.netns) == node_routes,
    );
    eventually(
        &lab,
        "traffic back after reload",
        Duration::from_secs(10),
        || exchange(&lab, "east", "web-1", "west", "web-2"),
    );

    // A bad file at start: a clear error, a non-zero exit, nothing created
    // (no TUN device in the pod, no route on the node).
    let web = lab.pod("east", "web-1").unwrap().clone();
    let bad = lab.cluster_dir("east").join("bad.peers");
    std::fs::write(&bad, "[Peer]\nPublicKey = AAAA\nAllowedIPs = 10.9.0.0/16\n").unwrap();
    let routes_before = our_routes(&east1.netns);
    let out = Command::new("ip")
        .args(["netns", "exec", &web.netns])
        .arg(&agent)
        .args(["run", "--static-peers"])
        .arg(&bad)
        .args(["--key-file"])
        .arg(lab.cluster_dir("east").join("bad.key"))
        .args(["--pod-ip", &web.ip.to_string(), "--node-netns"])
        .arg(format!("/run/netns/{}", east1.netns))
        .args(["--listen-port", "51821", "--metrics-addr", "127.0.0.1:0"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a bad file must fail the start");
    assert!(
        stderr.contains("static peers") && stderr.contains("PublicKey"),
        "{stderr}"
    );
    assert!(
        sys::ip_in(&web.netns, &["-o", "link", "show", "dev", "wg0"]).is_err(),
        "no TUN device after a refused start"
    );
    assert_eq!(our_routes(&east1.netns), routes_before);
    assert!(
        !lab.cluster_dir("east").join("bad.key").exists(),
        "a refused start creates no key file"
    );

    // A clean stop removes every route of ours, in the pod and on the node.
    for a in &agents {
        lab.stop_pod(&a.cluster, &a.name).unwrap();
    }
    for (_, node, _) in &files {
        assert!(our_routes(&node.netns).is_empty(), "{}", node.name);
    }
    assert!(our_routes(&east_agent1.netns).is_empty());
    lab.down().unwrap();
}
