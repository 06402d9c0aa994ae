//! Status computation with plain values and a fixed `now`.

use std::collections::BTreeMap;

use k8s_openapi::jiff::{SignedDuration, Timestamp};
use sdn_tunnel_api::{PeerState, TunnelPeer};

use crate::desired::{desired_state, Snapshot};
use crate::fixtures::*;
use crate::mesh::validate_mesh;
use crate::status::*;

fn now() -> Timestamp {
    Timestamp::from_second(1_800_000_000).unwrap()
}

fn ago(secs: i64) -> Timestamp {
    now().checked_sub(SignedDuration::from_secs(secs)).unwrap()
}

fn obs(handshake_ago: Option<i64>) -> PeerObservation {
    PeerObservation {
        last_handshake: handshake_ago.map(ago),
        rx_bytes: 1000,
        tx_bytes: 2000,
        rtt_micros: Some(350),
        // Traffic (or keepalives) flowing: received a second ago.
        last_receive: handshake_ago.map(|_| ago(1)),
        keepalive_secs: Some(25),
    }
}

/// Honest peers plus a hostile west node; w1 fresh, w2 stale, n1 never seen.
fn scenario() -> (Vec<TunnelPeer>, BTreeMap<String, PeerObservation>) {
    let mut ps = peers();
    ps.push(peer("west", "w9", 7, &["10.1.5.0/24"]));
    let mut o = BTreeMap::new();
    o.insert(key(1), obs(Some(5)));
    o.insert(key(2), obs(Some(HANDSHAKE_FRESH_SECS + 1)));
    (ps, o)
}

fn statuses() -> Vec<sdn_tunnel_api::RemotePeerStatus> {
    let (ps, o) = scenario();
    statuses_of(&ps, &o)
}

fn statuses_of(
    ps: &[TunnelPeer],
    o: &BTreeMap<String, PeerObservation>,
) -> Vec<sdn_tunnel_api::RemotePeerStatus> {
    let sp = sourced(ps);
    let m = validate_mesh(&clusters(), &sp, &own_key()).unwrap();
    let lp = local_peer();
    let d = desired_state(&Snapshot {
        local_peer: &lp,
        mesh: &m,
        persistent_keepalive: None,
    })
    .unwrap();
    remote_peer_statuses(&m, &sp, &d.peers, o, now())
}

#[test]
fn a_silent_peer_is_stale_within_two_keepalives_not_at_session_expiry() {
    let silent_for = |secs: i64, keepalive: Option<u16>| PeerObservation {
        last_receive: Some(ago(secs)),
        keepalive_secs: keepalive,
        ..obs(Some(30))
    };
    // 25 s keepalives: up to 60 s of silence is normal (two intervals + 10 s).
    assert_eq!(
        peer_state(Some(&silent_for(60, Some(25))), now()),
        (PeerState::Connected, Some(30))
    );
    assert_eq!(
        peer_state(Some(&silent_for(61, Some(25))), now()),
        (PeerState::Stale, Some(30))
    );
    assert_eq!(silence(&silent_for(61, Some(25)), now()), Some((61, 25)));
    // No keepalive: an idle link is silent by design, never judged.
    assert_eq!(
        peer_state(Some(&silent_for(150, None)), now()),
        (PeerState::Connected, Some(30))
    );
    assert_eq!(silence(&silent_for(150, Some(0)), now()), None);
    // Nothing received ever recorded: the handshake is the last receive.
    let old_handshake = PeerObservation {
        last_receive: None,
        ..obs(Some(100))
    };
    assert_eq!(silence(&old_handshake, now()), Some((100, 25)));
    // The status says which of the two it is.
    let (ps, mut o) = scenario();
    o.insert(key(1), silent_for(90, Some(25)));
    let w1 = statuses_of(&ps, &o)
        .into_iter()
        .find(|s| s.node == "w1")
        .unwrap();
    assert_eq!(
        (w1.state, w1.reason.as_deref()),
        (PeerState::Stale, Some("NothingReceived"))
    );
    assert!(w1.message.unwrap().contains("nothing received for 90s"));
}

#[test]
fn peer_state_from_handshake_age() {
    assert_eq!(peer_state(None, now()), (PeerState::Handshaking, None));
    assert_eq!(
        peer_state(Some(&obs(None)), now()),
        (PeerState::Handshaking, None)
    );
    assert_eq!(
        peer_state(Some(&obs(Some(0))), now()),
        (PeerState::Connected, Some(0))
    );
    assert_eq!(
        peer_state(Some(&obs(Some(HANDSHAKE_FRESH_SECS))), now()),
        (PeerState::Connected, Some(HANDSHAKE_FRESH_SECS))
    );
    assert_eq!(
        peer_state(Some(&obs(Some(HANDSHAKE_FRESH_SECS + 1))), now()),
        (PeerState::Stale, Some(HANDSHAKE_FRESH_SECS + 1))
    );
    // Handshake stamped after `now` (clock skew): age 0, connected.
    assert_eq!(
        peer_state(Some(&obs(Some(-30))), now()),
        (PeerState::Connected, Some(0))
    );
}

#[test]
fn statuses_list_desired_and_rejected_peers() {
    let st = statuses();
    let rows: Vec<(&str, &str, PeerState, Option<&str>)> = st
        .iter()
        .map(|s| {
            (
                s.cluster.as_str(),
                s.node.as_str(),
                s.state,
                s.reason.as_deref(),
            )
        })
        .collect();
    assert_eq!(
        rows,
        vec![
            ("north", "n1", PeerState::Handshaking, Some("NoHandshake")),
            ("west", "w1", PeerState::Connected, None),
            ("west", "w2", PeerState::Stale, Some("HandshakeExpired")),
            (
                "west",
                "w9",
                PeerState::Rejected,
                Some("CidrOutsideDeclared")
            ),
        ]
    );
    let w1 = &st[1];
    assert_eq!(w1.last_handshake_age_seconds, Some(5));
    assert_eq!(
        (w1.rx_bytes, w1.tx_bytes, w1.rtt_micros),
        (1000, 2000, Some(350))
    );
    assert_eq!(w1.endpoint.as_deref(), Some("192.0.2.2:51820"));
    let w9 = &st[3];
    assert_eq!(w9.public_key, key(7));
    assert!(w9
        .message
        .as_deref()
        .unwrap()
        .contains("outside the pod CIDRs declared for cluster west"));
}

#[test]
fn set_condition_keeps_transition_time_when_status_is_unchanged() {
    let mut c = vec![];
    set_condition(&mut c, "Connected", true, "A", "m1".into(), ago(100));
    set_condition(&mut c, "Connected", true, "B", "m2".into(), now());
    assert_eq!(c.len(), 1);
    assert_eq!(c[0].last_transition_time.0, ago(100));
    assert_eq!((c[0].reason.as_str(), c[0].message.as_str()), ("B", "m2"));
    set_condition(&mut c, "Connected", false, "C", "m3".into(), now());
    assert_eq!(c[0].last_transition_time.0, now());
    assert_eq!(c[0].status, "False");
}

#[test]
fn cluster_status_counts_and_conditions() {
    let (ps, _) = scenario();
    let m = validate_mesh(&clusters(), &sourced(&ps), &own_key()).unwrap();
    let st = statuses();
    let cs = clusters();
    let west = cluster_status(&cs[1], &m, &st, None, Some(ago(2)), now());
    assert_eq!((west.peers_ready, west.peers_total), (Some(1), Some(3)));
    let cond = |t: &str| west.conditions.iter().find(|c| c.type_ == t).unwrap();
    assert_eq!(cond("Connected").status, "True");
    assert_eq!(cond("Connected").message, "1/3 peers connected");
    assert_eq!(cond("Degraded").status, "True");
    assert_eq!(cond("Degraded").reason, "PeerRejected");
    assert!(cond("Degraded").message.contains("w9 CidrOutsideDeclared"));
    assert_eq!(west.last_sync.as_ref().unwrap().0, ago(2));

    let north = cluster_status(&cs[2], &m, &st, None, None, now());
    let cond = |t: &str| north.conditions.iter().find(|c| c.type_ == t).unwrap();
    assert_eq!(cond("Connected").status, "False");
    assert_eq!(cond("Connected").reason, "NoPeerConnected");
    assert_eq!(cond("Degraded").reason, "PeersNotConnected");
}

#[test]
fn refused_declaration_shows_in_its_status() {
    let mut cs = clusters();
    cs.push(cluster(
        "south",
        &["10.2.128.0/17"],
        &["172.28.0.0/16"],
        false,
    ));
    let ps = peers();
    let m = validate_mesh(&cs, &sourced(&ps), &own_key()).unwrap();
    let s = cluster_status(&cs[3], &m, &[], None, None, now());
    let degraded = s.conditions.iter().find(|c| c.type_ == "Degraded").unwrap();
    assert_eq!(degraded.status, "True");
    assert_eq!(degraded.reason, "CidrOverlap");
    assert_eq!(
        degraded.message,
        "pod CIDR 10.2.128.0/17 overlaps pod CIDR 10.2.0.0/16 of cluster west"
    );
    let connected = s
        .conditions
        .iter()
        .find(|c| c.type_ == "Connected")
        .unwrap();
    assert_eq!(connected.status, "False");
}

#[test]
fn own_status_summarises() {
    let s = own_peer_status(statuses(), None, now());
    assert_eq!(s.peers.len(), 4);
    assert_eq!(s.last_update.as_ref().unwrap().0, now());
    let degraded = s.conditions.iter().find(|c| c.type_ == "Degraded").unwrap();
    assert_eq!(degraded.reason, "PeerRejected");
    assert_eq!(degraded.message, "1 connected, 2 not connected, 1 rejected");
    let all_good = own_peer_status(vec![statuses()[1].clone()], Some(&s), now());
    let degraded = all_good
        .conditions
        .iter()
        .find(|c| c.type_ == "Degraded")
        .unwrap();
    assert_eq!(degraded.status, "False");
    assert_eq!(degraded.last_transition_time.0, now());
}
