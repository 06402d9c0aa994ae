//! The agent's state machine driven with plain values: a fake data path
//! that applies plans and reports back, and a fake clock.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use ipnet::IpNet;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use sdn_tunnel_api::{Endpoint, PeerState, TunnelPeer, TunnelPeerStatus};

use crate::desired::DesiredPeer;
use crate::engine::{
    Applied, Engine, EngineConfig, Event, Mode, Notice, Plan, ServiceInputs, StatusInputs,
};
use crate::fixtures::{clusters, key, local_peer, peer, peers};
use crate::mesh::RefusalReason;
use crate::status::PeerObservation;

const HEARTBEAT: Duration = Duration::from_secs(10);

fn engine(mode: Mode) -> Engine {
    Engine::new(
        EngineConfig {
            persistent_keepalive: Some(25),
            status_heartbeat: HEARTBEAT,
        },
        mode,
    )
}

fn sourced(ps: Vec<TunnelPeer>) -> Vec<(String, TunnelPeer)> {
    ps.into_iter()
        .map(|p| (p.spec.cluster.clone(), p))
        .collect()
}

/// The data path as a fake driver: peers by key, routes, proxy, and the
/// count of peer operations (what a real device would pay for).
#[derive(Default)]
struct FakeDataPath {
    peers: BTreeMap<String, DesiredPeer>,
    routes: Option<Vec<IpNet>>,
    route_applies: usize,
    forced_applies: usize,
    proxy_applies: usize,
    peer_ops: usize,
    /// Keys the device refuses.
    refuse: BTreeSet<String>,
    /// The next route apply fails.
    fail_routes: bool,
}

impl FakeDataPath {
    /// Applies a plan and feeds the report back; returns every notice.
    fn run(&mut self, e: &mut Engine, plan: Plan) -> Vec<Notice> {
        let mut notices = plan.notices.clone();
        if !plan.touches_data_path() {
            return notices;
        }
        let mut applied = Applied::default();
        for k in &plan.peers.remove {
            self.peers.remove(k);
            self.peer_ops += 1;
        }
        for p in plan.peers.upsert {
            self.peer_ops += 1;
            if self.refuse.contains(&p.public_key) {
                applied
                    .failed_peers
                    .push((p.public_key.clone(), "refused by the device".into()));
            } else {
                self.peers.insert(p.public_key.clone(), p);
            }
        }
        if let Some(r) = plan.routes {
            self.route_applies += 1;
            self.forced_applies += usize::from(r.force);
            if std::mem::take(&mut self.fail_routes) {
                applied.routes = Some(Err("netlink: device busy".into()));
            } else {
                self.routes = Some(r.destinations);
                applied.routes = Some(Ok(()));
            }
        }
        if plan.proxy.is_some() {
            self.proxy_applies += 1;
            applied.proxy = Some(Ok(()));
        }
        let follow = e.handle(Event::Applied(applied));
        assert!(
            !follow.touches_data_path(),
            "a report plans nothing by itself"
        );
        notices.extend(follow.notices);
        notices
    }

    /// Feeds one event and applies its plan.
    fn feed(&mut self, e: &mut Engine, ev: Event) -> Vec<Notice> {
        let plan = e.handle(ev);
        self.run(e, plan)
    }

    fn keys(&self) -> Vec<String> {
        self.peers.keys().cloned().collect()
    }
}

/// An engine fed with east's declarations, its own peer and the fixture peers.
fn converged() -> (Engine, FakeDataPath) {
    let mut e = engine(Mode::Crd);
    let mut dp = FakeDataPath::default();
    for ev in [
        Event::LocalPeer(local_peer()),
        Event::Declarations(clusters()),
        Event::RemotePeers(sourced(peers())),
    ] {
        let plan = e.handle(ev);
        dp.run(&mut e, plan);
    }
    assert!(e.converged());
    (e, dp)
}

#[test]
fn first_inputs_program_every_peer_route_and_the_proxy() {
    let (e, dp) = converged();
    assert_eq!(dp.keys(), vec![key(1), key(2), key(3)]);
    let routes = dp.routes.expect("routes applied");
    for d in ["10.2.0.0/16", "172.31.0.0/16", "10.3.0.0/16", "fd00:3::/48"] {
        assert!(routes.contains(&d.parse().unwrap()), "{d} routed");
    }
    assert!(dp.proxy_applies >= 1);
    assert_eq!(e.desired().peers.len(), 3);
}

#[test]
fn nothing_is_decided_before_the_own_peer_and_declarations_are_known() {
    let mut e = engine(Mode::Crd);
    assert_eq!(
        e.handle(Event::RemotePeers(sourced(peers()))),
        Plan::default()
    );
    assert_eq!(e.handle(Event::Declarations(clusters())), Plan::default());
    let plan = e.handle(Event::LocalPeer(local_peer()));
    assert_eq!(plan.peers.upsert.len(), 3);
}

#[test]
fn status_only_updates_change_nothing() {
    let (mut e, mut dp) = converged();
    let ops = dp.peer_ops;
    let mut ps = peers();
    for p in &mut ps {
        p.status = Some(TunnelPeerStatus {
            last_update: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                Timestamp::UNIX_EPOCH,
            )),
            ..Default::default()
        });
        p.metadata.resource_version = Some("4711".into());
    }
    let plan = e.handle(Event::RemotePeers(sourced(ps)));
    assert_eq!(plan, Plan::default());
    let mut cs = clusters();
    cs[1].status = Some(Default::default());
    assert_eq!(e.handle(Event::Declarations(cs)), Plan::default());
    assert_eq!(dp.run(&mut e, Plan::default()), vec![]);
    assert_eq!(dp.peer_ops, ops, "no peer touched");
}

#[test]
fn one_changed_peer_is_one_upsert_and_no_route_work() {
    let (mut e, mut dp) = converged();
    let routes_before = dp.route_applies;
    let mut ps = peers();
    ps[1].spec.endpoints = vec!["192.0.2.77:51820".into()];
    let plan = e.handle(Event::RemotePeers(sourced(ps)));
    assert_eq!(plan.peers.upsert.len(), 1);
    assert_eq!(plan.peers.upsert[0].public_key, key(2));
    assert_eq!(
        plan.peers.upsert[0].endpoint,
        Endpoint::parse("192.0.2.77:51820").unwrap()
    );
    assert!(plan.peers.remove.is_empty());
    assert!(plan.routes.is_none(), "same destinations: no route apply");
    dp.run(&mut e, plan);
    assert_eq!(dp.route_applies, routes_before);
    assert!(e.converged());
}

#[test]
fn a_removed_peer_is_one_removal() {
    let (mut e, mut dp) = converged();
    let mut ps = peers();
    ps.remove(0);
    let plan = e.handle(Event::RemotePeers(sourced(ps)));
    assert_eq!(plan.peers.remove, vec![key(1)]);
    assert!(plan.peers.upsert.is_empty());
    dp.run(&mut e, plan);
    assert_eq!(dp.keys(), vec![key(2), key(3)]);
}

#[test]
fn a_refusal_is_noticed_once_and_its_end_too() {
    let (mut e, mut dp) = converged();
    let mut ps = peers();
    // Outside west's declared pod range.
    ps.push(peer("west", "w9", 9, &["10.9.0.0/24"]));
    let notices = dp.feed(&mut e, Event::RemotePeers(sourced(ps.clone())));
    let refused: Vec<_> = notices
        .iter()
        .filter_map(|n| match n {
            Notice::Refused(r) => Some(r.reason),
            _ => None,
        })
        .collect();
    assert_eq!(refused, vec![RefusalReason::CidrOutsideDeclared]);
    // Another change elsewhere: the refusal is not repeated.
    ps[0].spec.endpoints = vec!["192.0.2.90:51820".into()];
    let notices = dp.feed(&mut e, Event::RemotePeers(sourced(ps.clone())));
    assert!(notices.iter().all(|n| !matches!(n, Notice::Refused(_))));
    // Nor at a repair.
    let notices = dp.feed(&mut e, Event::Repair);
    assert!(notices.is_empty(), "{notices:?}");
    // The object goes: its refusal is cleared, once.
    ps.pop();
    let notices = dp.feed(&mut e, Event::RemotePeers(sourced(ps)));
    assert!(
        matches!(notices.as_slice(), [Notice::RefusalCleared(o)] if o.name == "west-w9"),
        "{notices:?}"
    );
    assert_eq!(dp.keys(), vec![key(1), key(2), key(3)]);
}

#[test]
fn repair_forces_routes_and_touches_no_installed_peer() {
    let (mut e, mut dp) = converged();
    let ops = dp.peer_ops;
    let plan = e.handle(Event::Repair);
    assert!(plan.peers.is_empty());
    assert!(plan.routes.as_ref().is_some_and(|r| r.force));
    assert!(plan.proxy.is_some(), "a repair re-applies the proxy too");
    dp.run(&mut e, plan);
    assert_eq!(dp.peer_ops, ops);
    assert_eq!(dp.forced_applies, 1);
}

#[test]
fn failures_are_retried_at_the_next_repair() {
    let mut e = engine(Mode::Crd);
    let mut dp = FakeDataPath {
        refuse: [key(2)].into(),
        fail_routes: true,
        ..Default::default()
    };
    e.handle(Event::LocalPeer(local_peer()));
    e.handle(Event::Declarations(clusters()));
    let notices = dp.feed(&mut e, Event::RemotePeers(sourced(peers())));
    assert!(notices
        .iter()
        .any(|n| matches!(n, Notice::PeerFailed { public_key, .. } if *public_key == key(2))));
    assert!(notices.iter().any(|n| matches!(
        n,
        Notice::ApplyFailed {
            what: "routes and nftables",
            ..
        }
    )));
    assert!(!e.converged());
    dp.refuse.clear();
    let plan = e.handle(Event::Repair);
    assert_eq!(plan.peers.upsert.len(), 1, "only the failed peer again");
    assert!(plan.routes.is_some());
    dp.run(&mut e, plan);
    assert_eq!(dp.keys(), vec![key(1), key(2), key(3)]);
    assert!(e.converged());
}

#[test]
fn unusable_declarations_keep_the_data_path_and_are_noticed_once() {
    let (mut e, mut dp) = converged();
    let before = dp.keys();
    // Two local declarations: unusable as a whole.
    let mut cs = clusters();
    cs[1].spec.local = true;
    cs[1].spec.kubeconfig_secret_ref = None;
    let plan = e.handle(Event::Declarations(cs.clone()));
    assert!(!plan.touches_data_path());
    assert!(matches!(plan.notices.as_slice(), [Notice::Unusable(_)]));
    // The same again (a resync): no second notice, still nothing changes.
    let plan = e.handle(Event::Repair);
    assert_eq!(plan, Plan::default());
    assert_eq!(dp.keys(), before);
    // Fixed: usable again, nothing to re-program.
    let plan = e.handle(Event::Declarations(clusters()));
    assert!(plan.notices.contains(&Notice::Usable));
    assert!(plan.peers.is_empty());
    dp.run(&mut e, plan);
    assert_eq!(dp.keys(), before);
}

#[test]
fn a_declaration_removed_by_the_admin_removes_its_peers_and_routes() {
    let (mut e, mut dp) = converged();
    let cs: Vec<_> = clusters()
        .into_iter()
        .filter(|c| c.spec.cluster_name != "north")
        .collect();
    let plan = e.handle(Event::Declarations(cs));
    assert_eq!(plan.peers.remove, vec![key(3)]);
    dp.run(&mut e, plan);
    let routes = dp.routes.clone().unwrap();
    assert!(!routes.contains(&"10.3.0.0/16".parse().unwrap()));
    assert!(routes.contains(&"10.2.0.0/16".parse().unwrap()));
}

fn observation(now: Timestamp, rx: u64) -> PeerObservation {
    PeerObservation {
        last_handshake: Some(now),
        rx_bytes: rx,
        tx_bytes: rx,
        rtt_micros: Some(300),
        last_receive: Some(now),
        keepalive_secs: Some(25),
    }
}

fn tick(now: Timestamp, connected: &[u32], rx: u64) -> Event {
    Event::StatusTick(StatusInputs {
        now,
        observations: connected
            .iter()
            .map(|n| (key(*n), observation(now, rx)))
            .collect(),
        synced: ["west".to_string(), "north".to_string()].into(),
        writes_cluster_status: false,
    })
}

fn at(secs: i64) -> Timestamp {
    Timestamp::UNIX_EPOCH
        .checked_add(SignedDuration::from_secs(1_700_000_000 + secs))
        .unwrap()
}

#[test]
fn status_is_written_on_change_and_at_the_heartbeat_not_for_counters() {
    let (mut e, _) = converged();
    let mut writes = Vec::new();
    // One tick a second for a minute: counters move every tick, one peer
    // connects at second 35.
    for s in 0..60 {
        let connected: &[u32] = if s < 35 { &[1, 2] } else { &[1, 2, 3] };
        let plan = e.handle(tick(at(s), connected, 1000 * s as u64));
        if let Some(st) = plan.status {
            writes.push((s, st.clone()));
            e.status_written(st, at(s));
        }
    }
    let secs: Vec<i64> = writes.iter().map(|(s, _)| *s).collect();
    // First tick, heartbeats every 10 s, and the change at 35 at once
    // (the heartbeat counts from the last write).
    assert_eq!(secs, vec![0, 10, 20, 30, 35, 45, 55]);
    let at35 = &writes[4].1;
    assert!(at35.peers.iter().all(|p| p.state == PeerState::Connected));
    // A state change between heartbeats is written at once.
    let plan = e.handle(tick(at(52), &[1], 0));
    assert!(plan.status.is_some(), "two peers lost: written at once");
}

#[test]
fn cluster_statuses_only_from_the_writer_and_on_change() {
    let (mut e, _) = converged();
    let mut inputs = match tick(at(0), &[1, 2, 3], 1) {
        Event::StatusTick(i) => i,
        _ => unreachable!(),
    };
    assert!(e
        .handle(Event::StatusTick(inputs.clone()))
        .cluster_statuses
        .is_empty());
    inputs.writes_cluster_status = true;
    let plan = e.handle(Event::StatusTick(inputs));
    let names: Vec<&str> = plan
        .cluster_statuses
        .iter()
        .map(|(n, _)| n.as_str())
        .collect();
    assert_eq!(names, vec!["west", "north"]);
}

#[test]
fn services_change_only_the_proxy() {
    let (mut e, mut dp) = converged();
    let ops = dp.peer_ops;
    let plan = e.handle(Event::Services(BTreeMap::from([(
        "west".to_string(),
        ServiceInputs::default(),
    )])));
    // Nothing new to proxy: no apply at all.
    assert!(!plan.touches_data_path(), "{plan:?}");
    dp.run(&mut e, plan);
    assert_eq!(dp.peer_ops, ops);
}

fn static_peer(n: u32, prefix: &str) -> DesiredPeer {
    DesiredPeer {
        public_key: key(n),
        cluster: "static".into(),
        node: format!("peer-{n}"),
        endpoint: Endpoint::parse(&format!("192.0.2.{n}:51820")).unwrap(),
        allowed_ips: vec![prefix.parse().unwrap()],
        persistent_keepalive: Some(25),
    }
}

#[test]
fn static_mode_is_the_same_machine() {
    let mut e = engine(Mode::Static);
    let mut dp = FakeDataPath::default();
    let plan = e.handle(Event::StaticPeers(vec![
        static_peer(1, "10.2.0.0/16"),
        static_peer(2, "10.3.0.0/16"),
    ]));
    assert!(plan.proxy.is_none(), "no proxy without CRDs");
    dp.run(&mut e, plan);
    assert_eq!(dp.keys(), vec![key(1), key(2)]);
    assert!(e.converged());
    // A reload without peer 2: exactly its peer and route go.
    let plan = e.handle(Event::StaticPeers(vec![static_peer(1, "10.2.0.0/16")]));
    assert_eq!(plan.peers.remove, vec![key(2)]);
    assert!(plan.peers.upsert.is_empty());
    dp.run(&mut e, plan);
    assert_eq!(dp.routes, Some(vec!["10.2.0.0/16".parse().unwrap()]));
    // No status in static mode.
    assert!(e.handle(tick(at(0), &[1], 0)).status.is_none());
}

#[test]
fn churn_of_a_thousand_peers_costs_operations_in_proportion_to_the_change() {
    let mut e = engine(Mode::Crd);
    let mut dp = FakeDataPath::default();
    let mut cs = clusters();
    cs[1].spec.pod_cidrs = vec!["10.128.0.0/9".into()];
    let many = |gen: u32| -> Vec<TunnelPeer> {
        (0..1000u32)
            .map(|i| {
                let k = if i < 100 {
                    10_000 * gen + i
                } else {
                    100_000 + i
                };
                peer(
                    "west",
                    &format!("w{i}"),
                    k,
                    &[&format!("10.{}.{}.0/24", 128 + i / 256, i % 256)],
                )
            })
            .collect()
    };
    for ev in [
        Event::LocalPeer(local_peer()),
        Event::Declarations(cs),
        Event::RemotePeers(sourced(many(1))),
    ] {
        let plan = e.handle(ev);
        dp.run(&mut e, plan);
    }
    assert_eq!(dp.peers.len(), 1000);
    let ops = dp.peer_ops;
    // 10 % of the peers replaced (new keys for the same nodes).
    let plan = e.handle(Event::RemotePeers(sourced(many(2))));
    assert_eq!(plan.peers.upsert.len(), 100);
    assert_eq!(plan.peers.remove.len(), 100);
    assert!(plan.routes.is_none());
    dp.run(&mut e, plan);
    assert_eq!(dp.peer_ops - ops, 200);
    assert_eq!(dp.peers.len(), 1000);
    assert!(e.converged());
}
