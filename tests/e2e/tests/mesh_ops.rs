//! Day-2 operations on a two-cluster mesh on real apiservers: agent
//! restart, an API outage, hostile peers, a node joining and leaving.
//! Needs root, the apiserver build and `cargo build --workspace --bins`
//! (`make test` does all of it).

// Test code: a panic with its message is how a check reports failure.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::Api;
use sdn_tunnel_api::{PeerState, TunnelPeer, TunnelPeerSpec};
use sdn_tunnel_e2e::{
    connected_mesh, start_agent, tunnel_peers, wait_mesh_connected, FIELD_MANAGER, NAMESPACE,
};
use sdn_tunnel_lab::server::tcp_request;
use sdn_tunnel_lab::{Identity, Lab, LabConfig, Pod, POD_SERVER_PORT};

fn at(p: &Pod) -> SocketAddr {
    SocketAddr::from((p.ip, POD_SERVER_PORT))
}

/// Our routes (protocol 93) in a namespace.
fn our_routes(netns: &str) -> Vec<String> {
    sdn_tunnel_e2e::our_routes(netns).unwrap()
}

/// What east's agents report about west's peers: (node, state, reason), per east node.
async fn east_views(lab: &Lab) -> Vec<Vec<(String, PeerState, Option<String>)>> {
    tunnel_peers(lab)
        .await
        .unwrap()
        .into_iter()
        .filter(|(c, _)| c == "east")
        .map(|(_, p)| {
            p.status
                .map(|s| {
                    s.peers
                        .into_iter()
                        .filter(|r| r.cluster == "west")
                        .map(|r| (r.node, r.state, r.reason))
                        .collect()
                })
                .unwrap_or_default()
        })
        .collect()
}

async fn wait_for<F: AsyncFnMut() -> bool>(what: &str, timeout: Duration, mut cond: F) -> Duration {
    let started = Instant::now();
    while !cond().await {
        assert!(
            started.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    started.elapsed()
}

fn hostile(name: &str, key: &str, cidr: &str) -> TunnelPeer {
    TunnelPeer::new(
        name,
        TunnelPeerSpec {
            cluster: "west".into(),
            node: name.into(),
            public_key: key.into(),
            endpoints: vec!["10.92.2.99:51820".into()],
            pod_cidrs: vec![cidr.into()],
            listen_port: 51820,
            mtu: None,
        },
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_outage_hostile_peers_and_node_churn() {
    let mut cfg = LabConfig::new("e2eops");
    cfg.underlay_octet = 92;
    let (mut lab, installed, _) = connected_mesh(cfg, Duration::from_secs(60)).await.unwrap();
    for c in ["east", "west"] {
        lab.add_pod(c, 1, "web-1").unwrap();
        lab.add_pod(c, 2, "web-2").unwrap();
    }
    let (ew1, ww1, ww2) = (
        lab.pod("east", "web-1").unwrap().clone(),
        lab.pod("west", "web-1").unwrap().clone(),
        lab.pod("west", "web-2").unwrap().clone(),
    );
    let t = Duration::from_secs(2);
    assert_eq!(tcp_request(&ew1.netns, at(&ww1), t).unwrap(), "web-1");
    let east_node1 = lab.cluster("east").unwrap().nodes[0].netns.clone();

    // --- Agent restart: routes go on SIGTERM, same key after, no duplicate objects.
    let key_before = tunnel_peers(&lab)
        .await
        .unwrap()
        .into_iter()
        .find(|(c, p)| c == "east" && p.spec.node == "east-node-1")
        .unwrap()
        .1
        .spec
        .public_key;
    assert!(!our_routes(&east_node1).is_empty());
    lab.stop_pod("east", "agent-1").unwrap();
    assert!(
        our_routes(&east_node1).is_empty(),
        "clean shutdown removes the node's routes: {:?}",
        our_routes(&east_node1)
    );
    lab.restart_pod("east", "agent-1").unwrap();
    let took = wait_for(
        "east-node-1 reconnected",
        Duration::from_secs(30),
        async || tcp_request(&ew1.netns, at(&ww1), Duration::from_millis(300)).is_ok(),
    )
    .await;
    println!(
        "agent restart: traffic back {:.2} s after the restart",
        took.as_secs_f64()
    );
    wait_mesh_connected(&lab, Duration::from_secs(30))
        .await
        .unwrap();
    let peers = tunnel_peers(&lab).await.unwrap();
    assert_eq!(peers.len(), 4, "no duplicate TunnelPeers");
    let key_after = &peers
        .iter()
        .find(|(c, p)| c == "east" && p.spec.node == "east-node-1")
        .unwrap()
        .1
        .spec
        .public_key;
    assert_eq!(&key_before, key_after, "the key survives a restart");

    // --- West's apiserver goes away: the tunnel keeps carrying traffic.
    lab.stop_apiserver("west").unwrap();
    let outage = Instant::now();
    while outage.elapsed() < Duration::from_secs(6) {
        assert_eq!(
            tcp_request(&ew1.netns, at(&ww2), t).unwrap(),
            "web-2",
            "traffic during the west API outage"
        );
        assert_eq!(
            tcp_request(&ww1.netns, at(&ew1), t).unwrap(),
            "web-1",
            "traffic during the west API outage"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let agent_pids: Vec<i32> = lab
        .state()
        .pods
        .iter()
        .filter_map(|p| p.server.as_ref())
        .map(|s| s.pid)
        .collect();
    lab.start_apiserver("west").await.unwrap();

    // When it returns, the agents resync without a restart: a hostile peer
    // created in west now must reach east's agents through their resumed
    // watches — and be refused, with no route change and traffic flowing.
    let west = lab.client("west", Identity::Admin).await.unwrap();
    let peers_api: Api<TunnelPeer> = Api::namespaced(west, NAMESPACE);
    // A garbage key does not even pass the CRD schema.
    let err = peers_api
        .create(
            &PostParams::default(),
            &hostile("garbage", "not-a-key", "10.2.9.0/24"),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&err, kube::Error::Api(e) if e.code == 422),
        "{err}"
    );
    let routes_before = our_routes(&east_node1);
    let pp = PatchParams::apply(FIELD_MANAGER).force();
    let default_route = hostile(
        "default-route",
        "aG9zdGlsZS1wZWVyLWtleS1mb3ItZTJlLXRlc3RzISE=",
        "0.0.0.0/0",
    );
    peers_api
        .patch("default-route", &pp, &Patch::Apply(&default_route))
        .await
        .unwrap();
    let outside = hostile(
        "outside",
        "b3V0c2lkZS1wZWVyLWtleS1mb3ItZTJlLXRlc3RzISE=",
        "10.1.200.0/24",
    );
    peers_api
        .patch("outside", &pp, &Patch::Apply(&outside))
        .await
        .unwrap();
    let took = wait_for(
        "both hostile peers refused by every east agent",
        Duration::from_secs(60),
        async || {
            let views = east_views(&lab).await;
            views.len() == 2
                && views.iter().all(|v| {
                    let reason = |n: &str| {
                        v.iter()
                            .find(|(node, s, _)| node == n && *s == PeerState::Rejected)
                            .map(|x| x.2.clone())
                    };
                    reason("default-route").flatten().as_deref() == Some("DefaultRoute")
                        && reason("outside").flatten().as_deref() == Some("CidrOutsideDeclared")
                        && v.iter()
                            .filter(|(_, s, _)| *s == PeerState::Connected)
                            .count()
                            == 2
                })
        },
    )
    .await;
    println!(
        "west API back: hostile peers refused {:.2} s after creation",
        took.as_secs_f64()
    );
    assert_eq!(
        our_routes(&east_node1),
        routes_before,
        "refused peers change no route"
    );
    assert_eq!(
        tcp_request(&ew1.netns, at(&ww1), t).unwrap(),
        "web-1",
        "honest traffic still flows"
    );
    let pids_now: Vec<i32> = lab
        .state()
        .pods
        .iter()
        .filter_map(|p| p.server.as_ref())
        .map(|s| s.pid)
        .collect();
    assert_eq!(agent_pids, pids_now, "no agent was restarted");
    for n in ["default-route", "outside"] {
        peers_api.delete(n, &DeleteParams::default()).await.unwrap();
    }

    // --- A third node joins west: from its TunnelPeer to the first packet crossing.
    let node3 = lab.add_node("west").await.unwrap();
    lab.add_pod("west", node3.index, "web-3").unwrap();
    let ww3 = lab.pod("west", "web-3").unwrap().clone();
    assert!(
        tcp_request(&ew1.netns, at(&ww3), Duration::from_millis(500)).is_err(),
        "no tunnel to node 3 yet"
    );
    let agent_started = Instant::now();
    start_agent(&mut lab, &installed, "west", node3.index).unwrap();
    let published = wait_for(
        "west-node-3 TunnelPeer",
        Duration::from_secs(30),
        async || {
            peers_api
                .get_opt(&node3.name)
                .await
                .ok()
                .flatten()
                .is_some()
        },
    )
    .await;
    let first_packet = wait_for(
        "first packet to west-node-3",
        Duration::from_secs(30),
        async || tcp_request(&ew1.netns, at(&ww3), Duration::from_millis(200)).is_ok(),
    )
    .await;
    println!(
        "node join: TunnelPeer {:.2} s after the agent started; first packet across {:.3} s after the TunnelPeer appeared",
        published.as_secs_f64(),
        first_packet.as_secs_f64()
    );
    let _ = agent_started;
    wait_mesh_connected(&lab, Duration::from_secs(30))
        .await
        .unwrap();
    assert!(east_views(&lab).await.iter().all(|v| v
        .iter()
        .any(|(n, s, _)| n == &node3.name && *s == PeerState::Connected)));

    // ... and leaves: its agent stops, its TunnelPeer goes (what the Node's
    // garbage collection does in a real cluster), the peer disappears.
    lab.stop_pod("west", &format!("agent-{}", node3.index))
        .unwrap();
    peers_api
        .delete(&node3.name, &DeleteParams::default())
        .await
        .unwrap();
    lab.remove_node("west", &node3.name).await.unwrap();
    let took = wait_for(
        "east agents forget west-node-3",
        Duration::from_secs(30),
        async || {
            east_views(&lab)
                .await
                .iter()
                .all(|v| v.iter().all(|(n, _, _)| n != &node3.name))
        },
    )
    .await;
    println!(
        "node leave: peer gone from east's status {:.2} s after the TunnelPeer was deleted",
        took.as_secs_f64()
    );
    assert_eq!(
        tcp_request(&ew1.netns, at(&ww1), t).unwrap(),
        "web-1",
        "the rest keeps working"
    );

    let report = lab.down().unwrap();
    assert!(report.leftovers.is_empty(), "{:?}", report.leftovers);
}
