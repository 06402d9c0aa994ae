//! Mesh validation with plain values: every refusal reason, and the
//! guarantee that a refusal leaves the rest of the mesh accepted.

use proptest::prelude::*;
use sdn_tunnel_api::TunnelPeer;

use crate::fixtures::*;
use crate::mesh::*;

fn validate(clusters: &[sdn_tunnel_api::TunnelCluster], peers: &[TunnelPeer]) -> Mesh {
    validate_mesh(clusters, &sourced(peers), &own_key()).unwrap()
}

fn accepted_nodes(m: &Mesh) -> Vec<String> {
    m.peers
        .iter()
        .map(|p| format!("{}/{}", p.cluster, p.node))
        .collect()
}

/// The reasons given for the object named `name`.
fn reasons(m: &Mesh, name: &str) -> Vec<RefusalReason> {
    m.refusals
        .iter()
        .filter(|r| r.object.name == name)
        .map(|r| r.reason)
        .collect()
}

fn message(m: &Mesh, name: &str, reason: RefusalReason) -> String {
    m.refusals
        .iter()
        .find(|r| r.object.name == name && r.reason == reason)
        .map(|r| r.message.clone())
        .unwrap_or_else(|| panic!("no {reason} refusal for {name}: {:#?}", m.refusals))
}

/// Adds one hostile/broken peer to the honest ones and checks that exactly it
/// is refused, with `reason`, and that all honest peers stay accepted.
fn refuse_one(bad: TunnelPeer, reason: RefusalReason) -> Mesh {
    let name = bad.metadata.name.clone().unwrap();
    let mut ps = peers();
    ps.push(bad);
    let m = validate(&clusters(), &ps);
    assert!(
        reasons(&m, &name).contains(&reason),
        "{name}: want {reason}, got {:?}",
        m.refusals
    );
    assert_eq!(accepted_nodes(&m), ["north/n1", "west/w1", "west/w2"]);
    m
}

#[test]
fn honest_mesh_is_fully_accepted() {
    let m = validate(&clusters(), &peers());
    assert!(m.refusals.is_empty(), "{:#?}", m.refusals);
    assert_eq!(m.local.name, "east");
    assert_eq!(m.local.dns_zone, "cluster.east");
    let names: Vec<&str> = m.clusters.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["north", "west"]);
    assert_eq!(accepted_nodes(&m), ["north/n1", "west/w1", "west/w2"]);
    let n1 = &m.peers[0];
    assert_eq!(n1.endpoint.to_string(), "192.0.2.4:51820");
    assert_eq!(n1.listen_port, 51820);
    assert_eq!(n1.mtu, Some(1420));
    assert_eq!(
        n1.pod_cidrs,
        vec![
            "10.3.1.0/24".parse().unwrap(),
            "fd00:3:0:1::/64".parse().unwrap()
        ]
    );
}

#[test]
fn no_local_cluster_is_an_error() {
    let cs: Vec<_> = clusters().into_iter().filter(|c| !c.spec.local).collect();
    assert_eq!(
        validate_mesh(&cs, &[], &own_key()),
        Err(MeshError::NoLocalCluster)
    );
}

#[test]
fn several_local_clusters_is_an_error() {
    let mut cs = clusters();
    cs[1].spec.local = true;
    assert_eq!(
        validate_mesh(&cs, &[], &own_key()),
        Err(MeshError::MultipleLocalClusters(vec![
            "east".into(),
            "west".into()
        ]))
    );
}

#[test]
fn broken_local_cluster_is_an_error() {
    for pods in [&["0.0.0.0/0"][..], &["garbage"], &[]] {
        let mut cs = clusters();
        cs[0] = cluster("east", pods, &["172.30.0.0/16"], true);
        let err = validate_mesh(&cs, &[], &own_key()).unwrap_err();
        assert!(
            matches!(err, MeshError::InvalidLocalCluster { .. }),
            "{err}"
        );
    }
}

#[test]
fn cluster_with_bad_name_refused() {
    let mut cs = clusters();
    cs.push(cluster(
        "South_1",
        &["10.4.0.0/16"],
        &["172.28.0.0/16"],
        false,
    ));
    let m = validate(&cs, &peers());
    assert_eq!(reasons(&m, "South_1"), [RefusalReason::InvalidName]);
    assert_eq!(accepted_nodes(&m).len(), 3);
}

#[test]
fn remote_cluster_without_kubeconfig_refused() {
    let mut cs = clusters();
    cs[1].spec.kubeconfig_secret_ref = None;
    let m = validate(&cs, &peers());
    assert_eq!(reasons(&m, "west"), [RefusalReason::MissingKubeconfigRef]);
    // West's peers are refused with it, north keeps working.
    assert_eq!(reasons(&m, "west-w1"), [RefusalReason::ClusterRefused]);
    assert_eq!(accepted_nodes(&m), ["north/n1"]);
    assert!(m.cluster("west").is_none());
    assert!(m.cluster("north").is_some());
}

#[test]
fn duplicate_cluster_names_refused() {
    let mut cs = clusters();
    let mut dup = cluster("west", &["10.9.0.0/16"], &["172.19.0.0/16"], false);
    dup.metadata.name = Some("west-again".into());
    cs.push(dup);
    let mut local_name = cluster("east", &["10.8.0.0/16"], &["172.18.0.0/16"], false);
    local_name.metadata.name = Some("east-remote".into());
    cs.push(local_name);
    let m = validate(&cs, &peers());
    // Same name means same default DNS zone, so both reasons show.
    let both = [
        RefusalReason::DuplicateClusterName,
        RefusalReason::DuplicateDnsZone,
    ];
    assert_eq!(reasons(&m, "west"), both);
    assert_eq!(reasons(&m, "west-again"), both);
    assert!(message(&m, "west", RefusalReason::DuplicateClusterName).contains("west-again"));
    assert_eq!(reasons(&m, "east-remote"), both);
    assert_eq!(
        message(&m, "east-remote", RefusalReason::DuplicateDnsZone),
        "DNS zone cluster.east is the local cluster's"
    );
    assert_eq!(accepted_nodes(&m), ["north/n1"]);
}

#[test]
fn duplicate_dns_zones_refused() {
    let mut cs = clusters();
    cs[2].spec.dns_zone = Some("Cluster.West.".into()); // north takes west's zone
    let m = validate(&cs, &peers());
    assert_eq!(reasons(&m, "west"), [RefusalReason::DuplicateDnsZone]);
    assert_eq!(reasons(&m, "north"), [RefusalReason::DuplicateDnsZone]);
    assert_eq!(
        message(&m, "west", RefusalReason::DuplicateDnsZone),
        "DNS zone cluster.west is also used by TunnelCluster north"
    );
    assert!(m.peers.is_empty());
}

#[test]
fn invalid_dns_zone_refused() {
    let mut cs = clusters();
    cs[1].spec.dns_zone = Some("bad zone".into());
    let m = validate(&cs, &peers());
    assert_eq!(reasons(&m, "west"), [RefusalReason::InvalidDnsZone]);
    assert_eq!(accepted_nodes(&m), ["north/n1"]);
}

#[test]
fn cluster_with_bad_cidrs_refused() {
    for (pods, reason) in [
        ("garbage", RefusalReason::InvalidCidr),
        ("10.4.0.1/16", RefusalReason::InvalidCidr),
        ("0.0.0.0/0", RefusalReason::DefaultRoute),
        ("::/0", RefusalReason::DefaultRoute),
        ("127.0.0.0/8", RefusalReason::LoopbackCidr),
        ("169.254.0.0/16", RefusalReason::LinkLocalCidr),
        ("fe80::/10", RefusalReason::LinkLocalCidr),
        ("224.0.0.0/4", RefusalReason::MulticastCidr),
        ("0.0.0.0/8", RefusalReason::ReservedCidr),
        ("::ffff:0:0/96", RefusalReason::ReservedCidr),
    ] {
        let mut cs = clusters();
        cs.push(cluster("south", &[pods], &["172.28.0.0/16"], false));
        let m = validate(&cs, &peers());
        assert_eq!(reasons(&m, "south"), [reason], "{pods}");
        assert_eq!(accepted_nodes(&m).len(), 3, "{pods}");
    }
    let mut cs = clusters();
    cs.push(cluster("south", &[], &[], false));
    let m = validate(&cs, &peers());
    // One refusal per empty list, pod and service.
    assert_eq!(
        reasons(&m, "south"),
        [RefusalReason::InvalidCidr, RefusalReason::InvalidCidr]
    );
    assert_eq!(
        message(&m, "south", RefusalReason::InvalidCidr),
        "no pod CIDRs"
    );
}

#[test]
fn overlapping_remote_clusters_both_refused_naming_each_other() {
    let mut cs = clusters();
    cs.push(cluster(
        "south",
        &["10.2.128.0/17"],
        &["172.28.0.0/16"],
        false,
    ));
    let m = validate(&cs, &peers());
    assert_eq!(reasons(&m, "south"), [RefusalReason::CidrOverlap]);
    assert_eq!(reasons(&m, "west"), [RefusalReason::CidrOverlap]);
    assert_eq!(
        message(&m, "south", RefusalReason::CidrOverlap),
        "pod CIDR 10.2.128.0/17 overlaps pod CIDR 10.2.0.0/16 of cluster west"
    );
    assert_eq!(
        message(&m, "west", RefusalReason::CidrOverlap),
        "pod CIDR 10.2.0.0/16 overlaps pod CIDR 10.2.128.0/17 of cluster south"
    );
    // Refusing west and south does not remove north.
    assert_eq!(accepted_nodes(&m), ["north/n1"]);
}

#[test]
fn service_cidr_overlaps_count_too() {
    let mut cs = clusters();
    // south's pod range overlaps north's service range.
    cs.push(cluster(
        "south",
        &["172.29.8.0/24"],
        &["172.28.0.0/16"],
        false,
    ));
    let m = validate(&cs, &peers());
    assert!(message(&m, "north", RefusalReason::CidrOverlap).contains("of cluster south"));
    assert!(message(&m, "south", RefusalReason::CidrOverlap).contains("of cluster north"));
    assert_eq!(accepted_nodes(&m), ["west/w1", "west/w2"]);
}

#[test]
fn overlap_with_local_cluster_refuses_the_remote() {
    let mut cs = clusters();
    cs.push(cluster("south", &["10.0.0.0/8"], &["172.28.0.0/16"], false));
    let m = validate(&cs, &peers());
    // 10.0.0.0/8 covers east, west and north: refused naming each.
    let msgs: Vec<&str> = m
        .refusals
        .iter()
        .filter(|r| r.object.name == "south")
        .map(|r| r.message.as_str())
        .collect();
    assert!(msgs
        .contains(&"pod CIDR 10.0.0.0/8 overlaps pod CIDR 10.1.0.0/16 of the local cluster east"));
    assert!(msgs.iter().any(|s| s.ends_with("of cluster west")));
    // West and north overlap south, so both are refused too: an admin
    // declaration error shows on both sides.
    assert_eq!(reasons(&m, "west"), [RefusalReason::CidrOverlap]);
    assert_eq!(accepted_nodes(&m), Vec::<String>::new());
}

#[test]
fn pod_and_service_range_of_one_cluster_must_not_overlap() {
    let mut cs = clusters();
    cs.push(cluster(
        "south",
        &["10.4.0.0/16"],
        &["10.4.128.0/17"],
        false,
    ));
    let m = validate(&cs, &peers());
    assert_eq!(
        message(&m, "south", RefusalReason::CidrOverlap),
        "pod CIDR 10.4.0.0/16 overlaps service CIDR 10.4.128.0/17 of the same cluster south"
    );
}

#[test]
fn peer_from_undeclared_cluster_refused() {
    let m = refuse_one(
        peer("south", "s1", 7, &["10.4.1.0/24"]),
        RefusalReason::UnknownCluster,
    );
    assert_eq!(m.refusals.len(), 1);
}

#[test]
fn peer_read_from_local_cluster_refused() {
    refuse_one(
        peer("east", "e2", 7, &["10.1.2.0/24"]),
        RefusalReason::UnknownCluster,
    );
}

#[test]
fn peer_claiming_another_cluster_refused() {
    // Read from north's API but claims to be west: north may not speak for west.
    let bad = peer("west", "w9", 7, &["10.2.9.0/24"]);
    let mut ps = peers();
    let honest = sourced(&ps).len();
    ps.push(bad);
    let mut sp = sourced(&ps);
    sp[honest].source = "north";
    let m = validate_mesh(&clusters(), &sp, &own_key()).unwrap();
    let r: Vec<_> = m.refusals.iter().map(|r| r.reason).collect();
    assert!(r.contains(&RefusalReason::ClusterMismatch), "{r:?}");
    // Checked against north's declaration, its CIDR is outside too.
    assert!(r.contains(&RefusalReason::CidrOutsideDeclared), "{r:?}");
    assert_eq!(accepted_nodes(&m), ["north/n1", "west/w1", "west/w2"]);
}

#[test]
fn peer_outside_declared_cidrs_refused() {
    // A west node claiming east's (local) pod range: the hijack case.
    let m = refuse_one(
        peer("west", "w9", 7, &["10.1.5.0/24"]),
        RefusalReason::CidrOutsideDeclared,
    );
    assert_eq!(
        message(&m, "west-w9", RefusalReason::CidrOutsideDeclared),
        "pod CIDR 10.1.5.0/24 is outside the pod CIDRs declared for cluster west (10.2.0.0/16)"
    );
    // Wider than the declared range.
    refuse_one(
        peer("west", "w9", 7, &["10.2.0.0/15"]),
        RefusalReason::CidrOutsideDeclared,
    );
    // One good and one bad CIDR: the whole peer is refused.
    refuse_one(
        peer("west", "w9", 7, &["10.2.9.0/24", "10.3.9.0/24"]),
        RefusalReason::CidrOutsideDeclared,
    );
    // IPv6 range west did not declare.
    refuse_one(
        peer("west", "w9", 7, &["fd00:2::/64"]),
        RefusalReason::CidrOutsideDeclared,
    );
}

#[test]
fn peer_with_forbidden_cidrs_refused() {
    for (cidr, reason) in [
        ("0.0.0.0/0", RefusalReason::DefaultRoute),
        ("::/0", RefusalReason::DefaultRoute),
        ("127.0.0.1/32", RefusalReason::LoopbackCidr),
        ("::1/128", RefusalReason::LoopbackCidr),
        ("169.254.169.254/32", RefusalReason::LinkLocalCidr),
        ("fe80::/64", RefusalReason::LinkLocalCidr),
        ("239.0.0.0/8", RefusalReason::MulticastCidr),
        ("ff02::/16", RefusalReason::MulticastCidr),
        ("255.255.255.255/32", RefusalReason::ReservedCidr),
        ("::/128", RefusalReason::ReservedCidr),
        ("garbage", RefusalReason::InvalidCidr),
        ("10.2.9.1/24", RefusalReason::InvalidCidr),
    ] {
        let m = refuse_one(peer("west", "w9", 7, &[cidr]), reason);
        assert_eq!(reasons(&m, "west-w9"), [reason], "{cidr}");
    }
    let m = refuse_one(peer("west", "w9", 7, &[]), RefusalReason::InvalidCidr);
    assert_eq!(
        message(&m, "west-w9", RefusalReason::InvalidCidr),
        "no pod CIDRs"
    );
}

#[test]
fn overlapping_peers_both_refused() {
    let mut ps = peers();
    ps.push(peer("west", "w3", 7, &["10.2.1.128/25"]));
    let m = validate(&clusters(), &ps);
    assert_eq!(reasons(&m, "west-w1"), [RefusalReason::PeerCidrOverlap]);
    assert_eq!(reasons(&m, "west-w3"), [RefusalReason::PeerCidrOverlap]);
    assert_eq!(
        message(&m, "west-w3", RefusalReason::PeerCidrOverlap),
        "pod CIDR 10.2.1.128/25 overlaps pod CIDR 10.2.1.0/24 of node w1 of cluster west"
    );
    assert_eq!(accepted_nodes(&m), ["north/n1", "west/w2"]);
}

#[test]
fn bad_key_refused() {
    let mut bad = peer("west", "w9", 7, &["10.2.9.0/24"]);
    bad.spec.public_key = "not a key".into();
    let m = refuse_one(bad, RefusalReason::BadKey);
    assert!(message(&m, "west-w9", RefusalReason::BadKey).contains("44 characters"));
}

#[test]
fn own_key_refused() {
    let mut bad = peer("west", "w9", 7, &["10.2.9.0/24"]);
    bad.spec.public_key = own_key();
    let m = refuse_one(bad, RefusalReason::DuplicateKey);
    assert_eq!(
        message(&m, "west-w9", RefusalReason::DuplicateKey),
        "public key equals this node's own public key"
    );
}

#[test]
fn duplicate_keys_refuse_both_holders() {
    let mut ps = peers();
    ps.push(peer("north", "n2", 1, &["10.3.2.0/24"])); // w1's key
    let m = validate(&clusters(), &ps);
    assert_eq!(reasons(&m, "west-w1"), [RefusalReason::DuplicateKey]);
    assert_eq!(reasons(&m, "north-n2"), [RefusalReason::DuplicateKey]);
    assert_eq!(
        message(&m, "west-w1", RefusalReason::DuplicateKey),
        "public key is also used by node n2 of cluster north"
    );
    assert_eq!(accepted_nodes(&m), ["north/n1", "west/w2"]);
}

#[test]
fn already_refused_object_cannot_knock_out_an_honest_peer() {
    // Copies w1's key and claims w1's node and CIDR, but from north, outside
    // north's declared range: refused on its own, so w1 stays.
    let mut ps = peers();
    ps.push(peer("north", "w1", 1, &["10.2.1.0/24"]));
    let m = validate(&clusters(), &ps);
    assert_eq!(
        reasons(&m, "north-w1"),
        [RefusalReason::CidrOutsideDeclared]
    );
    assert_eq!(accepted_nodes(&m), ["north/n1", "west/w1", "west/w2"]);
}

#[test]
fn bad_endpoints_refused() {
    for eps in [
        vec![],
        vec!["nope".to_string()],
        vec!["127.0.0.1:51820".to_string()],
        vec!["192.0.2.1:51820".to_string(), "192.0.2.1:0".to_string()],
    ] {
        let mut bad = peer("west", "w9", 7, &["10.2.9.0/24"]);
        bad.spec.endpoints = eps.clone();
        let m = refuse_one(bad, RefusalReason::BadEndpoint);
        assert_eq!(
            reasons(&m, "west-w9"),
            [RefusalReason::BadEndpoint],
            "{eps:?}"
        );
    }
}

#[test]
fn bad_port_and_mtu_refused() {
    let mut bad = peer("west", "w9", 7, &["10.2.9.0/24"]);
    bad.spec.listen_port = 70000;
    refuse_one(bad, RefusalReason::BadPort);
    let mut bad = peer("west", "w9", 7, &["10.2.9.0/24"]);
    bad.spec.mtu = Some(100);
    refuse_one(bad, RefusalReason::BadMtu);
}

#[test]
fn empty_node_name_refused() {
    let mut bad = peer("west", "w9", 7, &["10.2.9.0/24"]);
    bad.spec.node = String::new();
    refuse_one(bad, RefusalReason::InvalidSpec);
}

#[test]
fn two_objects_for_one_node_refused() {
    let mut ps = peers();
    let mut again = peer("west", "w1", 7, &["10.2.9.0/24"]);
    again.metadata.name = Some("w1-again".into());
    ps.push(again);
    let m = validate(&clusters(), &ps);
    assert_eq!(reasons(&m, "west-w1"), [RefusalReason::DuplicateNode]);
    assert_eq!(reasons(&m, "w1-again"), [RefusalReason::DuplicateNode]);
    assert_eq!(accepted_nodes(&m), ["north/n1", "west/w2"]);
}

#[test]
fn endpoint_override_wins() {
    let mut cs = clusters();
    cs[1] = with_override(cs[1].clone(), "w2", "lb.west.example:4500");
    let m = validate(&cs, &peers());
    let w2 = m.peers.iter().find(|p| p.node == "w2").unwrap();
    assert_eq!(w2.endpoint.to_string(), "lb.west.example:4500");
    assert_eq!(w2.published_endpoints[0].to_string(), "192.0.2.3:51820");
    let w1 = m.peers.iter().find(|p| p.node == "w1").unwrap();
    assert_eq!(w1.endpoint.to_string(), "192.0.2.2:51820");
}

#[test]
fn bad_endpoint_override_refuses_the_declaration() {
    let mut cs = clusters();
    cs[1] = with_override(cs[1].clone(), "w2", "0.0.0.0:1");
    let m = validate(&cs, &peers());
    assert_eq!(reasons(&m, "west"), [RefusalReason::BadEndpoint]);
    assert_eq!(accepted_nodes(&m), ["north/n1"]);
}

#[test]
fn reasons_are_camel_case_words() {
    let r = RefusalReason::CidrOutsideDeclared;
    assert_eq!(r.as_str(), "CidrOutsideDeclared");
    assert_eq!(r.to_string(), "CidrOutsideDeclared");
}

// ---- properties ----------------------------------------------------------

/// Pod CIDRs a west peer may claim: inside, outside, overlapping each other,
/// forbidden, garbage.
const WEST_CLAIMS: &[&str] = &[
    "10.2.1.0/24",
    "10.2.2.0/24",
    "10.2.1.0/25",
    "10.2.3.0/24",
    "10.2.0.0/16",
    "10.1.1.0/24",
    "10.3.1.0/24",
    "0.0.0.0/0",
    "garbage",
    "fd00:3::/64",
];

fn arb_peer() -> impl Strategy<Value = TunnelPeer> {
    (
        prop::sample::select(vec!["west", "north", "south"]),
        0u32..6,
        0u32..6,
        prop::collection::vec(prop::sample::select(WEST_CLAIMS.to_vec()), 0..3),
        prop::bool::weighted(0.1),
    )
        .prop_map(|(cluster, node, key_n, pods, bad_ep)| {
            let mut p = peer(cluster, &format!("n{node}"), key_n, &pods);
            p.metadata.name = Some(format!("{cluster}-n{node}-k{key_n}-{}", pods.join("_")));
            if bad_ep {
                p.spec.endpoints = vec!["bad".into()];
            }
            p
        })
}

fn arb_mesh() -> impl Strategy<Value = (Vec<sdn_tunnel_api::TunnelCluster>, Vec<TunnelPeer>)> {
    let extra = prop::sample::select(vec![
        None,
        Some(("south", "10.4.0.0/16")),
        Some(("south", "10.2.128.0/17")),
        Some(("south", "0.0.0.0/0")),
    ]);
    (extra, prop::collection::vec(arb_peer(), 0..8)).prop_map(|(extra, mut ps)| {
        let mut cs = clusters();
        if let Some((name, pods)) = extra {
            cs.push(cluster(name, &[pods], &["172.28.0.0/16"], false));
        }
        // One object per name, as in a real API.
        ps.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
        ps.dedup_by(|a, b| a.metadata.name == b.metadata.name);
        (cs, ps)
    })
}

proptest! {
    #[test]
    fn validation_is_independent_of_input_order(
        (cs, ps) in arb_mesh(),
        seed in any::<u64>(),
    ) {
        let m1 = validate(&cs, &ps);
        let mut cs2 = cs.clone();
        let mut ps2 = ps.clone();
        // Deterministic shuffle from the seed.
        let mut s = seed | 1;
        for i in (1..ps2.len()).rev() {
            s ^= s << 13; s ^= s >> 7; s ^= s << 17;
            ps2.swap(i, (s % (i as u64 + 1)) as usize);
        }
        cs2.reverse();
        let m2 = validate(&cs2, &ps2);
        prop_assert_eq!(m1, m2);
    }

    #[test]
    fn accepted_peers_respect_every_rule((cs, ps) in arb_mesh()) {
        let m = validate(&cs, &ps);
        for p in &m.peers {
            let decl = m.cluster(&p.cluster).expect("accepted peer of an accepted cluster");
            prop_assert!(m.refusals.iter().all(|r| r.object != p.object));
            prop_assert_ne!(&p.public_key, &own_key());
            for c in &p.pod_cidrs {
                prop_assert!(crate::cidr::inside_any(c, &decl.pod_cidrs));
                prop_assert!(crate::cidr::forbidden(c).is_none());
                for l in m.local.pod_cidrs.iter().chain(&m.local.service_cidrs) {
                    prop_assert!(!crate::cidr::overlaps(c, l));
                }
            }
            for q in &m.peers {
                if q.object != p.object {
                    prop_assert_ne!(&p.public_key, &q.public_key);
                    prop_assert!(!(p.cluster == q.cluster && p.node == q.node));
                    for a in &p.pod_cidrs {
                        for b in &q.pod_cidrs {
                            prop_assert!(!crate::cidr::overlaps(a, b));
                        }
                    }
                }
            }
        }
        // Every input object is either accepted or refused, never both.
        for tp in &ps {
            let name = tp.metadata.name.clone().unwrap();
            let acc = m.peers.iter().any(|p| p.object.name == name);
            let refused = m.refusals.iter().any(|r| r.object.name == name);
            prop_assert!(acc != refused, "{} accepted={} refused={}", name, acc, refused);
        }
    }
}
