//! The steps of [`super::validate_mesh`], one at a time (the whole pipeline
//! is tested in `tests_mesh.rs`).
#![allow(clippy::unwrap_used)]

use super::*;
use crate::fixtures::{cluster, clusters, key, own_key, peer, peers, sourced};

fn reasons(r: &Refusals) -> Vec<(String, RefusalReason)> {
    r.0.iter()
        .map(|x| (x.object.name.clone(), x.reason))
        .collect()
}

fn decls(cs: &[TunnelCluster]) -> (Vec<Decl>, Refusals) {
    let mut r = Refusals::default();
    let d = remote_declarations(cs, &mut r);
    (d, r)
}

fn local() -> Decl {
    local_cluster(&clusters()).unwrap()
}

#[test]
fn declaration_refuses_forbidden_and_self_overlapping_cidrs() {
    let mut r = Refusals::default();
    let d = declaration(
        &cluster(
            "west",
            &["10.2.0.0/16", "127.0.0.0/8"],
            &["10.2.128.0/20"],
            false,
        ),
        &mut r,
    );
    assert_eq!(d.pods, vec!["10.2.0.0/16".parse::<IpNet>().unwrap()]);
    assert_eq!(
        reasons(&r),
        [
            ("west".to_string(), RefusalReason::LoopbackCidr),
            ("west".to_string(), RefusalReason::CidrOverlap),
        ]
    );
    let mut r = Refusals::default();
    declaration(
        &cluster("west", &["10.2.0.0/16"], &["10.102.0.0/16"], false),
        &mut r,
    );
    assert!(r.0.is_empty());
}

#[test]
fn check_own_cidrs_compares_pods_with_services_only() {
    let mut r = Refusals::default();
    let mut d = declaration(
        &cluster("west", &["10.2.0.0/16"], &["10.102.0.0/16"], false),
        &mut r,
    );
    // two pod ranges may nest (the parser deduplicates, not this step)
    d.pods.push("10.2.1.0/24".parse().unwrap());
    check_own_cidrs(&d, &mut r);
    assert!(r.0.is_empty());
    d.services.push("10.2.3.0/24".parse().unwrap());
    check_own_cidrs(&d, &mut r);
    assert_eq!(reasons(&r).len(), 1, "{:?}", r.0);
}

#[test]
fn local_cluster_wants_exactly_one_sound_local() {
    assert_eq!(local().name, "east");
    let remotes: Vec<TunnelCluster> = clusters().into_iter().filter(|c| !c.spec.local).collect();
    assert_eq!(
        local_cluster(&remotes).unwrap_err(),
        MeshError::NoLocalCluster
    );
    let mut two = clusters();
    two[1].spec.local = true;
    assert!(matches!(
        local_cluster(&two),
        Err(MeshError::MultipleLocalClusters(n)) if n == ["east", "west"]
    ));
    let bad = [cluster("east", &["0.0.0.0/0"], &["10.101.0.0/16"], true)];
    assert!(matches!(
        local_cluster(&bad),
        Err(MeshError::InvalidLocalCluster { .. })
    ));
}

#[test]
fn remote_declarations_skip_the_local_one() {
    let (d, r) = decls(&clusters());
    let names: Vec<&str> = d.iter().map(|d| d.name.as_str()).collect();
    assert_eq!(names, ["west", "north"]);
    assert!(r.0.is_empty());
}

#[test]
fn check_cluster_names_refuses_twins_and_the_local_name() {
    let mut cs = clusters();
    let mut twin = cluster("west", &["10.4.0.0/16"], &["10.104.0.0/16"], false);
    twin.metadata.name = Some("west-2".into());
    cs.push(twin);
    cs.push(cluster("east", &["10.5.0.0/16"], &["10.105.0.0/16"], false));
    // the second "east" object needs its own metadata name
    if let Some(last) = cs.last_mut() {
        last.metadata.name = Some("east-remote".into());
    }
    let (d, mut r) = decls(&cs);
    check_cluster_names(&d, &local(), &mut r);
    assert_eq!(
        reasons(&r),
        [
            (
                "east-remote".to_string(),
                RefusalReason::DuplicateClusterName
            ),
            ("west".to_string(), RefusalReason::DuplicateClusterName),
            ("west-2".to_string(), RefusalReason::DuplicateClusterName),
        ]
    );
}

#[test]
fn check_dns_zones_ignores_case_and_trailing_dot() {
    let mut cs = clusters();
    cs[1].spec.dns_zone = Some("Cluster.North.".into());
    cs[2].spec.dns_zone = Some("cluster.north".into());
    let (d, mut r) = decls(&cs);
    check_dns_zones(&d, &local(), &mut r);
    assert_eq!(
        reasons(&r),
        [
            ("north".to_string(), RefusalReason::DuplicateDnsZone),
            ("west".to_string(), RefusalReason::DuplicateDnsZone),
        ]
    );
    let mut cs = clusters();
    cs[1].spec.dns_zone = Some("CLUSTER.EAST".into());
    let (d, mut r) = decls(&cs);
    check_dns_zones(&d, &local(), &mut r);
    assert_eq!(
        reasons(&r),
        [("west".to_string(), RefusalReason::DuplicateDnsZone)]
    );
}

#[test]
fn check_cross_cluster_overlaps_reports_both_sides_and_the_local_one() {
    let mut cs = clusters();
    cs.push(cluster(
        "south",
        &["10.2.128.0/17"],
        &["172.31.5.0/24"],
        false,
    ));
    cs.push(cluster("up", &["10.1.2.0/24"], &["10.106.0.0/16"], false));
    let (d, mut r) = decls(&cs);
    check_cross_cluster_overlaps(&d, &local(), &mut r);
    let mut got = reasons(&r);
    got.dedup();
    assert_eq!(
        got,
        [
            ("south".to_string(), RefusalReason::CidrOverlap),
            ("up".to_string(), RefusalReason::CidrOverlap),
            ("west".to_string(), RefusalReason::CidrOverlap),
        ]
    );
    // south overlaps west twice (pods and services), each said on both sides
    let south = r.0.iter().filter(|x| x.object.name == "south").count();
    let west = r.0.iter().filter(|x| x.object.name == "west").count();
    assert_eq!((south, west), (2, 2));
    // disjoint declarations: nothing
    let (d, mut r) = decls(&clusters());
    check_cross_cluster_overlaps(&d, &local(), &mut r);
    assert!(r.0.is_empty());
}

fn check_all(ps: &[TunnelPeer], cs: &[TunnelCluster]) -> (Vec<AcceptedPeer>, Refusals) {
    let (d, mut r) = decls(cs);
    let accepted: BTreeMap<&str, &Decl> = d
        .iter()
        .filter(|d| !r.has(&d.object))
        .map(|d| (d.name.as_str(), d))
        .collect();
    let declared: BTreeSet<&str> = d.iter().map(|d| d.name.as_str()).collect();
    let out = sourced(ps)
        .iter()
        .filter_map(|sp| check_peer(sp, &accepted, &declared, &own_key(), &mut r))
        .collect();
    (out, r)
}

#[test]
fn check_peer_alone() {
    let (ok, r) = check_all(&peers(), &clusters());
    assert_eq!(ok.len(), 3);
    assert!(r.0.is_empty());
    let cases = [
        (
            peer("south", "s1", 9, &["10.9.0.0/24"]),
            RefusalReason::UnknownCluster,
        ),
        (
            peer("west", "w9", 9, &["10.3.0.0/24"]),
            RefusalReason::CidrOutsideDeclared,
        ),
        (
            peer("west", "w9", 9, &["169.254.0.0/24"]),
            RefusalReason::LinkLocalCidr,
        ),
        (
            peer("west", "w9", 999, &["10.2.9.0/24"]),
            RefusalReason::DuplicateKey,
        ),
    ];
    for (p, want) in cases {
        let (ok, r) = check_all(std::slice::from_ref(&p), &clusters());
        assert!(ok.is_empty(), "{want}");
        assert!(
            reasons(&r).iter().any(|(_, x)| *x == want),
            "{want}: {:?}",
            r.0
        );
    }
    // a refused declaration refuses its peers
    let mut cs = clusters();
    cs[1].spec.pod_cidrs = vec!["10.2.0.0/16".into(), "127.0.0.0/8".into()];
    let (ok, r) = check_all(&[peer("west", "w1", 1, &["10.2.1.0/24"])], &cs);
    assert!(ok.is_empty());
    assert!(reasons(&r).contains(&("west-w1".to_string(), RefusalReason::ClusterRefused)));
    // the local admin's override wins over the published endpoint
    let cs = [
        clusters()[0].clone(),
        crate::fixtures::with_override(clusters()[1].clone(), "w1", "198.51.100.1:4000"),
    ];
    let (ok, _) = check_all(&[peer("west", "w1", 1, &["10.2.1.0/24"])], &cs);
    assert_eq!(ok[0].endpoint.to_string(), "198.51.100.1:4000");
}

fn candidates(ps: &[TunnelPeer]) -> Vec<AcceptedPeer> {
    let (ok, r) = check_all(ps, &clusters());
    assert!(r.0.is_empty(), "{:?}", r.0);
    ok
}

#[test]
fn check_duplicate_nodes_refuses_both_claimants() {
    let mut again = peer("west", "w1", 2, &["10.2.2.0/24"]);
    again.metadata.name = Some("west-w1-again".into());
    let c = candidates(&[
        peer("west", "w1", 1, &["10.2.1.0/24"]),
        again,
        peer("north", "w1", 3, &["10.3.1.0/24"]),
    ]);
    let mut r = Refusals::default();
    check_duplicate_nodes(&c, &mut r);
    assert_eq!(r.0.len(), 2);
    assert!(r.0.iter().all(|x| x.reason == RefusalReason::DuplicateNode));
    assert!(r.0.iter().all(|x| x.object.cluster == "west"));
}

#[test]
fn check_key_conflicts_refuses_both_holders() {
    let c = candidates(&[
        peer("west", "w1", 1, &["10.2.1.0/24"]),
        peer("north", "n1", 1, &["10.3.1.0/24"]),
        peer("west", "w2", 2, &["10.2.2.0/24"]),
    ]);
    let mut r = Refusals::default();
    check_key_conflicts(&c, &mut r);
    let names: Vec<&str> = r.0.iter().map(|x| x.object.name.as_str()).collect();
    assert_eq!(names, ["north-n1", "west-w1"]);
    assert_eq!(key(1), c[0].public_key);
}

#[test]
fn check_peer_cidr_overlaps_refuses_both_sides() {
    let c = candidates(&[
        peer("west", "w1", 1, &["10.2.0.0/23"]),
        peer("west", "w2", 2, &["10.2.1.0/24"]),
        peer("west", "w3", 3, &["10.2.2.0/24"]),
    ]);
    let mut r = Refusals::default();
    check_peer_cidr_overlaps(&c, &mut r);
    let names: Vec<&str> = r.0.iter().map(|x| x.object.name.as_str()).collect();
    assert_eq!(names, ["west-w1", "west-w2"]);
    assert!(r
        .0
        .iter()
        .all(|x| x.reason == RefusalReason::PeerCidrOverlap));
}
