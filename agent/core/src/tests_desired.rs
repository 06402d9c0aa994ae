//! Desired peers and routes from plain values.

use ipnet::IpNet;
use proptest::prelude::*;
use sdn_tunnel_api::TunnelPeer;

use crate::desired::*;
use crate::fixtures::*;
use crate::mesh::{validate_mesh, Mesh};

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

fn mesh(peers: &[TunnelPeer]) -> Mesh {
    validate_mesh(&clusters(), &sourced(peers), &own_key()).unwrap()
}

fn desired(m: &Mesh) -> DesiredState {
    let lp = local_peer();
    desired_state(&Snapshot {
        local_peer: &lp,
        mesh: m,
        persistent_keepalive: Some(DEFAULT_PERSISTENT_KEEPALIVE_SECS),
    })
    .unwrap()
}

#[test]
fn one_peer_per_remote_node_with_its_pod_cidrs() {
    let d = desired(&mesh(&peers()));
    let got: Vec<(String, String, Vec<IpNet>)> = d
        .peers
        .iter()
        .map(|p| {
            (
                p.node.clone(),
                p.endpoint.to_string(),
                p.allowed_ips.clone(),
            )
        })
        .collect();
    // Sorted by public key: key(1) < key(2) < key(3).
    assert_eq!(
        got,
        vec![
            (
                "w1".into(),
                "192.0.2.2:51820".into(),
                vec![net("10.2.1.0/24")]
            ),
            (
                "w2".into(),
                "192.0.2.3:51820".into(),
                vec![net("10.2.2.0/24")]
            ),
            (
                "n1".into(),
                "192.0.2.4:51820".into(),
                vec![net("10.3.1.0/24"), net("fd00:3:0:1::/64")]
            ),
        ]
    );
    assert!(d.peers.iter().all(|p| p.persistent_keepalive == Some(25)));
}

#[test]
fn routes_cover_declared_pod_and_service_cidrs_of_connected_clusters() {
    let d = desired(&mesh(&peers()));
    let got: Vec<(IpNet, &str, RouteKind)> = d
        .routes
        .iter()
        .map(|r| (r.destination, r.cluster.as_str(), r.kind))
        .collect();
    assert_eq!(
        got,
        vec![
            (net("10.2.0.0/16"), "west", RouteKind::PodCidr),
            (net("10.3.0.0/16"), "north", RouteKind::PodCidr),
            (net("172.29.0.0/16"), "north", RouteKind::ServiceCidr),
            (net("172.31.0.0/16"), "west", RouteKind::ServiceCidr),
            (net("fd00:3::/48"), "north", RouteKind::PodCidr),
        ]
    );
}

#[test]
fn cluster_without_accepted_peers_gets_no_route() {
    let only_west: Vec<TunnelPeer> = peers()
        .into_iter()
        .filter(|p| p.spec.cluster == "west")
        .collect();
    let d = desired(&mesh(&only_west));
    assert!(d.routes.iter().all(|r| r.cluster == "west"));
    assert_eq!(d.routes.len(), 2);
}

#[test]
fn hostile_peer_changes_nothing() {
    let honest = desired(&mesh(&peers()));
    for bad in [
        peer("west", "w9", 7, &["10.1.5.0/24"]),
        peer("west", "w9", 7, &["0.0.0.0/0"]),
        {
            let mut p = peer("west", "w9", 7, &["10.2.9.0/24"]);
            p.spec.public_key = "garbage".into();
            p
        },
    ] {
        let mut ps = peers();
        ps.push(bad);
        assert_eq!(desired(&mesh(&ps)), honest);
    }
}

#[test]
fn override_endpoint_is_used() {
    let mut cs = clusters();
    cs[1] = with_override(cs[1].clone(), "w1", "[2001:db8::7]:4500");
    let ps = peers();
    let m = validate_mesh(&cs, &sourced(&ps), &own_key()).unwrap();
    let d = desired(&m);
    let w1 = d.peers.iter().find(|p| p.node == "w1").unwrap();
    assert_eq!(w1.endpoint.to_string(), "[2001:db8::7]:4500");
}

#[test]
fn local_peer_of_another_cluster_is_an_error() {
    let m = mesh(&peers());
    let mut lp = local_peer();
    lp.cluster = "west".into();
    let err = desired_state(&Snapshot {
        local_peer: &lp,
        mesh: &m,
        persistent_keepalive: None,
    })
    .unwrap_err();
    assert_eq!(
        err,
        DesiredError::LocalClusterMismatch {
            peer: "west".into(),
            declared: "east".into()
        }
    );
}

#[test]
fn own_key_never_becomes_a_peer_even_in_a_hand_built_mesh() {
    let mut m = mesh(&peers());
    m.peers[0].public_key = own_key();
    let d = desired(&m);
    assert_eq!(d.peers.len(), 2);
    assert!(d.peers.iter().all(|p| p.public_key != own_key()));
}

#[test]
fn diff_adds_changes_and_removes() {
    let full = desired(&mesh(&peers()));
    let mut ps = peers();
    ps.remove(0); // w1 goes away
    ps[0].spec.endpoints = vec!["192.0.2.99:51820".into()]; // w2 moves
    ps.push(peer("west", "w3", 5, &["10.2.3.0/24"])); // w3 appears
    let next = desired(&mesh(&ps));
    let d = diff(&next.peers, &full.peers, |p| p.public_key.clone());
    let names = |v: &[DesiredPeer]| v.iter().map(|p| p.node.clone()).collect::<Vec<_>>();
    assert_eq!(names(&d.add), ["w3"]);
    assert_eq!(names(&d.change), ["w2"]);
    assert_eq!(d.change[0].endpoint.to_string(), "192.0.2.99:51820");
    assert_eq!(names(&d.remove), ["w1"]);
    assert!(diff(&next.peers, &next.peers, |p| p.public_key.clone()).is_empty());
    let r = diff(&next.routes, &full.routes, |r| r.destination);
    assert!(r.is_empty(), "routes follow clusters, not nodes: {r:?}");
}

/// Peers from a pool mixing honest, hostile and broken objects.
fn arb_peers() -> impl Strategy<Value = Vec<TunnelPeer>> {
    let pool: Vec<TunnelPeer> = vec![
        peer("west", "w1", 1, &["10.2.1.0/24"]),
        peer("west", "w2", 2, &["10.2.2.0/24"]),
        peer("west", "w3", 3, &["10.2.2.128/25"]),
        peer("west", "w4", 4, &["10.1.0.0/24"]),
        peer("west", "w5", 5, &["0.0.0.0/0"]),
        peer("west", "w6", 1, &["10.2.6.0/24"]),
        peer("north", "n1", 6, &["10.3.1.0/24", "fd00:3:0:1::/64"]),
        peer("north", "n2", 7, &["10.2.7.0/24"]),
        peer("north", "n3", 999, &["10.3.3.0/24"]),
        peer("south", "s1", 8, &["10.4.1.0/24"]),
    ];
    prop::sample::subsequence(pool, 0..=10).prop_shuffle()
}

proptest! {
    #[test]
    fn refused_peers_never_contribute(ps in arb_peers()) {
        let m = mesh(&ps);
        let d = desired(&m);
        let refused = |tp: &TunnelPeer| m.refusals.iter().any(|r| Some(&r.object.name) == tp.metadata.name.as_ref());
        let triple = |tp: &TunnelPeer| (tp.spec.cluster.clone(), tp.spec.node.clone(), tp.spec.public_key.clone());
        let accepted: Vec<&TunnelPeer> = ps.iter().filter(|tp| !refused(tp)).collect();
        // Every desired peer is exactly one accepted input, with its own CIDRs
        // as allowed IPs.
        prop_assert_eq!(d.peers.len(), accepted.len());
        for p in &d.peers {
            let o = accepted.iter().find(|o| triple(o) == (p.cluster.clone(), p.node.clone(), p.public_key.clone()));
            prop_assert!(o.is_some(), "desired peer {} not from an accepted object", p.node);
            let mut cidrs: Vec<IpNet> = o.into_iter().flat_map(|o| o.spec.pod_cidrs.iter().map(|c| net(c))).collect();
            cidrs.sort();
            prop_assert_eq!(&p.allowed_ips, &cidrs);
        }
        // No refused input shows up as a peer.
        for tp in ps.iter().filter(|tp| refused(tp)) {
            prop_assert!(d.peers.iter().all(|p| (p.cluster.clone(), p.node.clone(), p.public_key.clone()) != triple(tp)));
        }
        // Routes are declared ranges of clusters that have a desired peer.
        let decls = clusters();
        for r in &d.routes {
            prop_assert!(d.peers.iter().any(|p| p.cluster == r.cluster));
            let decl = decls.iter().find(|c| c.spec.cluster_name == r.cluster && !c.spec.local);
            prop_assert!(decl.is_some());
            let declared: Vec<IpNet> = decl.into_iter()
                .flat_map(|c| c.spec.pod_cidrs.iter().chain(&c.spec.service_cidrs).map(|s| net(s)))
                .collect();
            prop_assert!(declared.contains(&r.destination));
        }
    }

    #[test]
    fn desired_state_is_independent_of_input_order(ps in arb_peers(), seed in any::<u64>()) {
        let a = desired(&mesh(&ps));
        let mut rev = ps.clone();
        rev.reverse();
        if !rev.is_empty() {
            let n = rev.len();
            rev.rotate_left((seed as usize) % n);
        }
        let b = desired(&mesh(&rev));
        prop_assert_eq!(a, b);
    }
}
