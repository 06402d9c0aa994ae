//! Two clusters × two nodes on real apiservers: the installer's manifests,
//! agents with the DaemonSet's identity, and a mesh that comes up by itself
//! from CRDs alone (no static peer config). Needs root, the apiserver build
//! and `cargo build --workspace --bins` (`make test` does all of it).

// Test code: a panic with its message is how a check reports failure.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use kube::api::{Patch, PatchParams};
use kube::Api;
use sdn_tunnel_api::{PeerState, TunnelCluster, TunnelPeer, TunnelPeerSpec};
use sdn_tunnel_e2e::{
    install, start_agents, tunnel_peers, wait_mesh_connected_or_dump, workspace_binary,
    FIELD_MANAGER, NAMESPACE,
};
use sdn_tunnel_lab::server::{tcp_request, udp_request};
use sdn_tunnel_lab::{Identity, Lab, LabConfig, POD_SERVER_PORT};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_comes_up_from_crds_and_refuses_a_hostile_peer() {
    let mut cfg = LabConfig::new("e2emesh");
    cfg.underlay_octet = 96;
    let mut lab = Lab::up(cfg).await.expect("lab up");

    let installed = install(&lab).await.expect("install");
    let started = Instant::now();
    let agents = start_agents(&mut lab, &installed).expect("agents");
    assert_eq!(agents.len(), 4);
    let took = wait_mesh_connected_or_dump(&lab, &agents, Duration::from_secs(90))
        .await
        .unwrap();
    println!(
        "mesh connected {:.1} s after the agents started ({:.1} s waiting)",
        started.elapsed().as_secs_f64(),
        took.as_secs_f64()
    );

    // One agent per cluster summarises the mesh into the TunnelCluster status.
    for (here, there) in [("east", "west"), ("west", "east")] {
        let client = lab.client(here, Identity::Admin).await.unwrap();
        let api: Api<TunnelCluster> = Api::all(client);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let st = api.get(there).await.unwrap().status.unwrap_or_default();
            let connected = st
                .conditions
                .iter()
                .any(|c| c.type_ == "Connected" && c.status == "True");
            if connected
                && st.peers_ready == Some(2)
                && st.peers_total == Some(2)
                && st.last_sync.is_some()
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "TunnelCluster {there} in {here}: {st:#?}"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    // Every node published its TunnelPeer: own key, node endpoint, node pod CIDR.
    let peers = tunnel_peers(&lab).await.unwrap();
    assert_eq!(peers.len(), 4);
    for plan in lab.config().plan() {
        for node in &plan.nodes {
            let (_, p) = peers
                .iter()
                .find(|(c, p)| *c == plan.name && p.spec.node == node.name)
                .unwrap();
            assert_eq!(p.spec.cluster, plan.name);
            assert_eq!(
                p.spec.endpoints,
                vec![format!("{}:51820", node.underlay_ip)]
            );
            assert_eq!(p.spec.pod_cidrs, vec![node.pod_cidr.to_string()]);
        }
    }
    let mut keys: Vec<&str> = peers
        .iter()
        .map(|(_, p)| p.spec.public_key.as_str())
        .collect();
    keys.sort();
    keys.dedup();
    assert_eq!(keys.len(), 4, "every node has its own key");

    // Every pod of east reaches every pod of west over TCP and UDP, and back.
    for c in ["east", "west"] {
        lab.add_pod(c, 1, "web-1").unwrap();
        lab.add_pod(c, 2, "web-2").unwrap();
    }
    let t = Duration::from_secs(3);
    let started = Instant::now();
    for (from_c, to_c) in [("east", "west"), ("west", "east")] {
        for from in ["web-1", "web-2"] {
            for to in ["web-1", "web-2"] {
                let (src, dst) = (
                    lab.pod(from_c, from).unwrap().clone(),
                    lab.pod(to_c, to).unwrap().clone(),
                );
                let addr = SocketAddr::from((dst.ip, POD_SERVER_PORT));
                assert_eq!(
                    tcp_request(&src.netns, addr, t).unwrap(),
                    to,
                    "TCP {from_c}/{from} -> {to_c}/{to}"
                );
                assert_eq!(
                    udp_request(&src.netns, addr, t).unwrap(),
                    to,
                    "UDP {from_c}/{from} -> {to_c}/{to}"
                );
            }
        }
    }
    println!(
        "8 TCP + 8 UDP cross-cluster exchanges in {:.2} s",
        started.elapsed().as_secs_f64()
    );

    // `tunctl peers` sees all 4 x 2 tunnels connected, through both apiservers.
    let tunctl = workspace_binary("tunctl").unwrap();
    let kubeconfig = lab.merged_kubeconfig();
    let run = |args: &[&str]| {
        std::process::Command::new(&tunctl)
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .args(args)
            .output()
            .unwrap()
    };
    let out = run(&["--all-contexts", "peers", "--check"]);
    let table = String::from_utf8_lossy(&out.stdout);
    println!("{table}");
    assert!(
        out.status.success(),
        "tunctl peers --check: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        table.lines().filter(|l| l.contains("Connected")).count(),
        8,
        "{table}"
    );
    let out = run(&["--all-contexts", "peers", "-o", "json"]);
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(rows.len(), 8);
    assert!(
        rows.iter()
            .all(|r| r["state"] == "Connected" && r["rxBytes"].as_i64().unwrap() > 0),
        "{rows:#?}"
    );
    let out = run(&["--context", "nowhere", "peers"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no context \"nowhere\""));

    // A hostile TunnelPeer in west claiming east's pod range is refused by
    // east's agents with a reason, and the rest of the mesh keeps working.
    let west = lab.client("west", Identity::Admin).await.unwrap();
    let hostile = TunnelPeer::new(
        "hostile",
        TunnelPeerSpec {
            cluster: "west".into(),
            node: "hostile".into(),
            public_key: "aG9zdGlsZS1wZWVyLWtleS1mb3ItZTJlLXRlc3RzISE=".into(),
            endpoints: vec!["10.96.2.99:51820".into()],
            pod_cidrs: vec!["10.1.1.0/24".into()],
            listen_port: 51820,
            mtu: None,
        },
    );
    Api::<TunnelPeer>::namespaced(west, NAMESPACE)
        .patch(
            "hostile",
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&hostile),
        )
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let peers = tunnel_peers(&lab).await.unwrap();
        let east_views: Vec<_> = peers
            .iter()
            .filter(|(c, _)| c == "east")
            .filter_map(|(_, p)| p.status.clone())
            .collect();
        let refused = east_views.iter().all(|s| {
            s.peers.iter().any(|r| {
                r.node == "hostile"
                    && r.state == PeerState::Rejected
                    && r.reason.as_deref() == Some("CidrOutsideDeclared")
            })
        });
        let still_connected = east_views.iter().all(|s| {
            s.peers
                .iter()
                .filter(|r| r.cluster == "west" && r.state == PeerState::Connected)
                .count()
                == 2
        });
        if refused && still_connected && east_views.len() == 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "hostile peer not refused in time: {east_views:#?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    // ... and `tunctl peers --check` now fails, naming the reason.
    let out = run(&["--all-contexts", "peers", "--check"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("Rejected (CidrOutsideDeclared)"));

    let report = lab.down().unwrap();
    assert!(report.leftovers.is_empty(), "{:?}", report.leftovers);
}
