//! The node/pod plumbing drivers against a real kernel, in network namespaces
//! each test creates for itself (`sdnt-drv-<test>-<pid>`) and removes in a
//! `Drop` guard, also when the test panics. Needs root (as `make test` runs).
//! Traffic only flows between namespaces made here.

// Helpers shared by the tests panic on setup failures on purpose.
#![allow(clippy::unwrap_used)]

mod support;

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use ipnet::IpNet;
use sdn_tunnel_agent::drivers::netlink::{
    NextHop, Route, RouteDriver, RouteError, RouteEvents, ROUTE_PROTOCOL,
};
use sdn_tunnel_agent::drivers::netns::{
    in_netns, in_netns_async, read_sysctl, set_rp_filter_loose, write_sysctl,
};
use sdn_tunnel_agent::drivers::nftables::{NftDriver, NodeRules, PodRules, NODE_TABLE, POD_TABLE};
use serde_json::{json, Value};
use support::{sh, Netns};

/// Our routes (all tables) of `family` (`-4`/`-6`) in `ns`.
fn our_routes(ns: &Netns, family: &str) -> String {
    let proto = ROUTE_PROTOCOL.to_string();
    ns.ip(&[family, "route", "show", "table", "all", "proto", &proto])
}

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

/// A veth pair with one end in each namespace, created directly there (never
/// in the test runner's namespace, so parallel tests cannot collide).
fn veth(a: &Netns, a_name: &str, b: &Netns, b_name: &str) {
    a.ip(&[
        "link", "add", a_name, "type", "veth", "peer", "name", b_name, "netns", &b.name,
    ]);
    a.ip(&["link", "set", a_name, "up"]);
    b.ip(&["link", "set", b_name, "up"]);
}

/// kubenet-style node with a `cbr0` bridge, and an agent pod on it whose
/// `eth0` is 10.1.1.2 and whose tunnel device `wg0` is a veth end (a TUN
/// without a process would do as well; routes only need the device).
struct NodeAndPod {
    node: Netns,
    pod: Netns,
}

fn node_and_pod(test: &str) -> NodeAndPod {
    let node = Netns::new(&format!("drv-{test}-node"));
    let pod = Netns::new(&format!("drv-{test}-pod"));
    node.ip(&["link", "add", "cbr0", "type", "bridge"]);
    node.ip(&["addr", "add", "10.1.1.1/24", "dev", "cbr0"]);
    node.ip(&["link", "set", "cbr0", "up"]);
    veth(&node, "vagent", &pod, "eth0");
    node.ip(&["link", "set", "vagent", "master", "cbr0"]);
    pod.ip(&["addr", "add", "10.1.1.2/24", "dev", "eth0"]);
    pod.ip(&["route", "add", "default", "via", "10.1.1.1"]);
    for dev in ["wg0", "wg1"] {
        let peer = format!("{dev}p");
        pod.ip(&["link", "add", dev, "type", "veth", "peer", "name", &peer]);
        pod.ip(&["link", "set", dev, "up"]);
        pod.ip(&["link", "set", &peer, "up"]);
    }
    NodeAndPod { node, pod }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_routes_dev_wg0_reconcile_repair_and_leave_foreign_routes_alone() {
    let t = node_and_pod("podrt");
    let driver = RouteDriver::open(Some(&t.pod.path())).await.unwrap();
    let wg0 = driver.link_index("wg0").await.unwrap();
    let wg1 = driver.link_index("wg1").await.unwrap();
    assert!(driver.link_index("nonexistent0").await.is_err());

    // A foreign route to one of our destinations, already there, in
    // another metric; and one with our exact key in IPv4 (appended).
    t.pod.ip(&[
        "route",
        "add",
        "10.2.0.0/16",
        "dev",
        "wg1",
        "metric",
        "50",
        "proto",
        "static",
    ]);
    t.pod.ip(&[
        "route",
        "append",
        "10.102.0.0/16",
        "dev",
        "wg1",
        "proto",
        "static",
    ]);
    let foreign_before = t.pod.ip(&["route", "show", "table", "all"]);

    let desired = vec![
        Route::dev(net("10.2.0.0/16"), wg0),
        Route::dev(net("10.102.0.0/16"), wg0),
        Route::dev(net("fd00:2::/48"), wg0),
    ];
    let report = driver.apply(&desired).await.unwrap();
    assert_eq!(report.added.len(), 3, "{report:?}");
    // The foreign 10.102.0.0/16 (same table, dst and metric) comes first.
    assert_eq!(report.shadowed, vec![desired[1]], "{report:?}");
    let v4 = our_routes(&t.pod, "-4");
    assert!(v4.contains("10.2.0.0/16 dev wg0"), "{v4}");
    assert!(v4.contains("10.102.0.0/16 dev wg0"), "{v4}");
    let v6 = our_routes(&t.pod, "-6");
    assert!(v6.contains("fd00:2::/48 dev wg0"), "{v6}");

    // The full listing has the foreign routes; ours-only has exactly ours.
    let all = driver.installed().await.unwrap();
    assert!(all
        .iter()
        .any(|r| !r.is_ours() && r.route.key.dst == net("10.2.0.0/16")));
    let ours = driver.installed_ours().await.unwrap();
    assert_eq!(ours.len(), 3, "{ours:?}");
    assert!(ours.iter().all(|r| r.is_ours()));

    // Idempotent: a second apply changes nothing.
    let again = driver.apply(&desired).await.unwrap();
    assert!(!again.changed(), "{again:?}");

    // Drift: someone deletes one of ours; the event stream sees it and the
    // next apply restores exactly that one.
    let mut events = RouteEvents::subscribe(Some(&t.pod.path())).await.unwrap();
    t.pod
        .ip(&["route", "del", "10.2.0.0/16", "dev", "wg0", "proto", "0x5d"]);
    assert_eq!(ROUTE_PROTOCOL, 0x5d);
    let event = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let e = events.next().await.expect("event stream ended");
            if e.removed && e.ours {
                break e;
            }
        }
    })
    .await
    .expect("no route deletion event");
    assert_eq!(event.dst, Some(net("10.2.0.0/16")));
    let repaired = driver.apply(&desired).await.unwrap();
    assert_eq!(repaired.added, vec![desired[0]]);
    assert!(our_routes(&t.pod, "-4").contains("10.2.0.0/16 dev wg0"));

    // A changed next hop is replaced, not duplicated.
    let moved = vec![Route::dev(net("10.2.0.0/16"), wg1), desired[1], desired[2]];
    let report = driver.apply(&moved).await.unwrap();
    assert_eq!(report.replaced, vec![moved[0]]);
    let v4 = our_routes(&t.pod, "-4");
    assert!(
        v4.contains("10.2.0.0/16 dev wg1") && !v4.contains("10.2.0.0/16 dev wg0"),
        "{v4}"
    );

    // A route whose device does not exist fails alone: the rest is still
    // reconciled (here: 10.3.0.0/16 added) and the error says so.
    let with_bad = vec![
        moved[0],
        moved[1],
        moved[2],
        Route::dev(net("10.3.0.0/16"), wg0),
        Route::dev(net("10.4.0.0/16"), 999_999),
    ];
    match driver.apply(&with_bad).await {
        Err(RouteError::Partial { failed, report, .. }) => {
            assert_eq!(failed, 1);
            assert_eq!(report.added, vec![with_bad[3]]);
        }
        other => panic!("expected a partial failure, got {other:?}"),
    }
    assert!(our_routes(&t.pod, "-4").contains("10.3.0.0/16 dev wg0"));
    assert!(driver.apply(&moved).await.unwrap().deleted == vec![with_bad[3]]);

    // Clean shutdown: only our routes go; the foreign ones are exactly as before.
    let removed = driver.remove_all().await.unwrap();
    assert_eq!(removed, 3);
    assert_eq!(our_routes(&t.pod, "-4").trim(), "");
    assert_eq!(our_routes(&t.pod, "-6").trim(), "");
    assert_eq!(t.pod.ip(&["route", "show", "table", "all"]), foreign_before);
    let left = t.pod.ip(&["route", "show", "10.102.0.0/16"]);
    assert!(
        left.contains("10.102.0.0/16 dev wg1 proto static"),
        "{left}"
    );
    assert!(driver.remove_all().await.unwrap() == 0);
}

/// A bridge that goes down takes our IPv4 routes with it, silently (no
/// RTM_DELROUTE); when it comes back the event stream says so and a
/// reapply restores them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn link_down_flush_is_repaired_when_the_link_comes_back() {
    let t = node_and_pod("linkup");
    let driver = RouteDriver::open(Some(&t.node.path())).await.unwrap();
    let hop = driver
        .resolve_next_hop("10.1.1.2".parse().unwrap())
        .await
        .unwrap();
    let desired = vec![Route::via(net("10.2.0.0/16"), hop)];
    driver.apply(&desired).await.unwrap();
    let mut events = RouteEvents::subscribe(Some(&t.node.path())).await.unwrap();

    t.node.ip(&["link", "set", "cbr0", "down"]);
    assert_eq!(
        our_routes(&t.node, "-4").trim(),
        "",
        "the kernel flushed it"
    );
    t.node.ip(&["link", "set", "cbr0", "up"]);
    let event = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let e = events.next().await.expect("event stream ended");
            if e.link_up {
                break e;
            }
        }
    })
    .await
    .expect("no link-up event");
    assert!(event.removed && event.ours);
    assert_eq!(driver.apply(&desired).await.unwrap().added, desired);
    assert!(our_routes(&t.node, "-4").contains("10.2.0.0/16 via 10.1.1.2 dev cbr0"));
}

/// Lost events must not go unnoticed: while the (single-threaded) runtime
/// is blocked, thousands of route changes overflow the event socket; the
/// stream then reports an overrun, flagged as a possible removal of ours.
#[tokio::test(flavor = "current_thread")]
async fn route_event_overflow_is_reported_as_a_possible_removal() {
    let t = node_and_pod("evovf");
    let mut events = RouteEvents::subscribe(Some(&t.pod.path())).await.unwrap();
    let batch: String = (0..20_000u32)
        .map(|i| format!("route add 10.50.{}.{}/32 dev wg0\n", i / 250, i % 250 + 1))
        .collect();
    let file = std::env::temp_dir().join(format!("{}.batch", t.pod.name));
    std::fs::write(&file, batch).unwrap();
    // Synchronous on purpose: nothing drains the event socket meanwhile.
    let out = Command::new("ip")
        .args(["-n", &t.pod.name, "-batch"])
        .arg(&file)
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&file);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let overrun = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let e = events.next().await.expect("event stream ended");
            if e.overrun {
                break e;
            }
        }
    })
    .await
    .expect("no overrun reported");
    assert!(overrun.removed && overrun.ours && overrun.dst.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_routes_via_agent_pod_resolve_the_bridge() {
    let t = node_and_pod("nodebr");
    let driver = RouteDriver::open(Some(&t.node.path())).await.unwrap();
    let cbr0 = driver.link_index("cbr0").await.unwrap();
    let hop = driver
        .resolve_next_hop("10.1.1.2".parse().unwrap())
        .await
        .unwrap();
    // Reached through the bridge's connected /24 (scope link): no onlink.
    assert_eq!(
        hop,
        NextHop::Via {
            gateway: "10.1.1.2".parse().unwrap(),
            oif: cbr0,
            onlink: false
        }
    );
    // Our own address is not a next hop; an unrouted one is not either.
    assert!(driver
        .resolve_next_hop("10.1.1.1".parse().unwrap())
        .await
        .is_err());
    assert!(driver
        .resolve_next_hop("10.77.0.1".parse().unwrap())
        .await
        .is_err());

    let desired = vec![
        Route::via(net("10.2.0.0/16"), hop),
        Route::via(net("10.102.0.0/16"), hop),
    ];
    // Give the agent pod a "remote" address: unreachable from the node
    // until our routes exist.
    t.pod.ip(&["addr", "add", "10.2.3.4/32", "dev", "lo"]);
    assert_eq!(udp_probe(&t.node, &t.pod, "10.2.3.4"), None);
    assert_eq!(driver.apply(&desired).await.unwrap().added.len(), 2);
    let got = t.node.ip(&["route", "get", "10.2.3.4"]);
    assert!(got.contains("via 10.1.1.2 dev cbr0"), "{got}");
    assert!(!driver.apply(&desired).await.unwrap().changed());
    // Traffic really goes there, with the node's cbr0 address as source.
    let (src, _) = udp_probe(&t.node, &t.pod, "10.2.3.4").expect("not delivered");
    assert_eq!(src, "10.1.1.1".parse::<IpAddr>().unwrap());

    // IPv6 the same way (no onlink for IPv6).
    t.node
        .ip(&["addr", "add", "fd00:1:1::1/64", "dev", "cbr0", "nodad"]);
    t.pod
        .ip(&["addr", "add", "fd00:1:1::2/64", "dev", "eth0", "nodad"]);
    let hop6 = driver
        .resolve_next_hop("fd00:1:1::2".parse().unwrap())
        .await
        .unwrap();
    assert_eq!(
        hop6,
        NextHop::Via {
            gateway: "fd00:1:1::2".parse().unwrap(),
            oif: cbr0,
            onlink: false
        }
    );
    let mut both = desired.clone();
    both.push(Route::via(net("fd00:2::/48"), hop6));
    assert_eq!(driver.apply(&both).await.unwrap().added.len(), 1);
    let got = t.node.ip(&["-6", "route", "get", "fd00:2::1"]);
    assert!(got.contains("via fd00:1:1::2 dev cbr0"), "{got}");
    assert!(!driver.apply(&both).await.unwrap().changed());

    assert_eq!(driver.remove_all().await.unwrap(), 3);
    assert_eq!(our_routes(&t.node, "-4").trim(), "");
    assert_eq!(our_routes(&t.node, "-6").trim(), "");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_routes_via_ptp_veth_need_onlink() {
    // kindnet / CNI ptp: the node has no subnet route to the pod, only a
    // host-scope /32 on the pod's veth. Without onlink the kernel accepts
    // `via` but resolves the next hop with host scope and silently ignores
    // the gateway (it would ARP for the final destination).
    let node = Netns::new("drv-ptp-node");
    let pod = Netns::new("drv-ptp-pod");
    veth(&node, "veth1234", &pod, "eth0");
    node.ip(&["addr", "add", "10.244.1.1/32", "dev", "veth1234"]);
    node.ip(&[
        "route",
        "add",
        "10.244.1.5/32",
        "dev",
        "veth1234",
        "scope",
        "host",
    ]);
    pod.ip(&["addr", "add", "10.244.1.5/24", "dev", "eth0"]);

    let driver = RouteDriver::open(Some(&node.path())).await.unwrap();
    let veth = driver.link_index("veth1234").await.unwrap();
    let hop = driver
        .resolve_next_hop("10.244.1.5".parse().unwrap())
        .await
        .unwrap();
    assert_eq!(
        hop,
        NextHop::Via {
            gateway: "10.244.1.5".parse().unwrap(),
            oif: veth,
            onlink: true
        }
    );
    let desired = vec![Route::via(net("10.2.0.0/16"), hop)];
    assert_eq!(driver.apply(&desired).await.unwrap().added.len(), 1);
    let got = node.ip(&["route", "get", "10.2.3.4"]);
    assert!(got.contains("via 10.244.1.5 dev veth1234"), "{got}");
    let ours = our_routes(&node, "-4");
    assert!(ours.contains("onlink"), "{ours}");
    assert!(
        !driver.apply(&desired).await.unwrap().changed(),
        "onlink must read back equal"
    );
    pod.ip(&["addr", "add", "10.2.3.4/32", "dev", "lo"]);
    let (src, _) = udp_probe(&node, &pod, "10.2.3.4").expect("not delivered");
    assert_eq!(src, "10.244.1.1".parse::<IpAddr>().unwrap());
    assert_eq!(driver.remove_all().await.unwrap(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_netns_enters_the_target_on_its_own_thread_only() {
    let ns = Netns::new("drv-enter-x");
    let here = || std::fs::read_link("/proc/thread-self/ns/net").unwrap();
    let mine = here();
    let theirs = in_netns(Some(&ns.path()), here).unwrap();
    let expected = sh(&[
        "ip",
        "netns",
        "exec",
        &ns.name,
        "readlink",
        "/proc/self/ns/net",
    ]);
    assert_eq!(theirs.to_string_lossy(), expected.trim());
    assert_ne!(theirs, mine);
    assert_eq!(here(), mine, "the caller's thread must not move");
    let theirs_async = in_netns_async(Some(&ns.path()), here).await.unwrap();
    assert_eq!(theirs_async, theirs);

    // The other path form, /proc/<pid>/ns/net, as the agent uses for the
    // node: a process of ours parked in the namespace.
    ns.ip(&["link", "add", "cbr0", "type", "bridge"]);
    let mut child = Command::new("ip")
        .args(["netns", "exec", &ns.name, "sleep", "30"])
        .spawn()
        .unwrap();
    let proc_path = PathBuf::from(format!("/proc/{}/ns/net", child.id()));
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while std::fs::read_link(&proc_path).ok().as_ref() != Some(&theirs) {
        assert!(
            std::time::Instant::now() < deadline,
            "child never entered the namespace"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let via_proc = in_netns(Some(&proc_path), here).unwrap();
    let driver = RouteDriver::open(Some(&proc_path)).await;
    let index = match &driver {
        Ok(d) => d.link_index("cbr0").await.ok(),
        Err(_) => None,
    };
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(via_proc, theirs);
    assert!(
        index.is_some(),
        "cbr0 not found through {proc_path:?}: {driver:?}"
    );
}

#[test]
fn rp_filter_loose_lands_in_the_target_namespace_only() {
    let t = node_and_pod("rpf");
    let node = t.node.path();
    let host_all = std::fs::read_to_string("/proc/sys/net/ipv4/conf/all/rp_filter").unwrap();
    write_sysctl(Some(&node), "net.ipv4.conf.all.rp_filter", "1").unwrap();
    write_sysctl(Some(&node), "net.ipv4.conf.cbr0.rp_filter", "1").unwrap();
    // a VLAN-style name with a dot, which dotted sysctl keys cannot express
    t.node.ip(&[
        "link", "add", "eth0.5", "type", "veth", "peer", "name", "eth0.6",
    ]);
    set_rp_filter_loose(Some(&node), &["cbr0", "vagent", "eth0.5"]).unwrap();
    assert_eq!(
        t.node
            .exec(&["cat", "/proc/sys/net/ipv4/conf/eth0.5/rp_filter"])
            .trim(),
        "2"
    );
    // What the namespace itself sees (through a process in it, not our helper).
    assert_eq!(
        t.node
            .exec(&["sysctl", "-n", "net.ipv4.conf.cbr0.rp_filter"])
            .trim(),
        "2"
    );
    assert_eq!(
        t.node
            .exec(&["sysctl", "-n", "net.ipv4.conf.vagent.rp_filter"])
            .trim(),
        "2"
    );
    assert_eq!(
        t.node
            .exec(&["sysctl", "-n", "net.ipv4.conf.all.rp_filter"])
            .trim(),
        "2"
    );
    // The pod namespace and the test's own are untouched.
    assert_eq!(
        read_sysctl(Some(&node), "net.ipv4.conf.cbr0.rp_filter").unwrap(),
        "2"
    );
    assert!(
        read_sysctl(Some(&t.pod.path()), "net.ipv4.conf.cbr0.rp_filter").is_err(),
        "cbr0 exists only in the node namespace"
    );
    assert_eq!(
        std::fs::read_to_string("/proc/sys/net/ipv4/conf/all/rp_filter").unwrap(),
        host_all
    );
}

/// Loose mode really lets through what strict mode drops: a packet from a
/// "remote pod" source arriving on an interface other than the one the
/// route back to that source uses (asymmetric path, as during a route
/// change).
#[test]
fn rp_filter_loose_accepts_asymmetric_cross_cluster_packets() {
    let node = Netns::new("drv-rpfx-node");
    let sender = Netns::new("drv-rpfx-snd");
    let other = Netns::new("drv-rpfx-oth");
    veth(&sender, "eth0", &node, "ina");
    veth(&other, "eth0", &node, "inb");
    sender.ip(&["addr", "add", "10.98.0.2/24", "dev", "eth0"]);
    sender.ip(&["addr", "add", "10.2.0.9/32", "dev", "lo"]);
    node.ip(&["addr", "add", "10.98.0.1/24", "dev", "ina"]);
    node.ip(&["addr", "add", "10.97.0.1/24", "dev", "inb"]);
    other.ip(&["addr", "add", "10.97.0.2/24", "dev", "eth0"]);
    // The node's route back to the remote pod range leaves through `inb`.
    node.ip(&["route", "add", "10.2.0.0/16", "via", "10.97.0.2"]);
    let path = node.path();
    write_sysctl(Some(&path), "net.ipv4.conf.all.rp_filter", "1").unwrap();
    write_sysctl(Some(&path), "net.ipv4.conf.ina.rp_filter", "1").unwrap();

    // Strict: dropped. (The plain node address still gets through.)
    assert!(udp_probe_from(&sender, "10.98.0.2", &node, "10.98.0.1").is_some());
    assert_eq!(
        udp_probe_from(&sender, "10.2.0.9", &node, "10.98.0.1"),
        None
    );

    set_rp_filter_loose(Some(&path), &["ina"]).unwrap();
    let (src, _) =
        udp_probe_from(&sender, "10.2.0.9", &node, "10.98.0.1").expect("dropped in loose mode");
    assert_eq!(src, "10.2.0.9".parse::<IpAddr>().unwrap());
}

fn rules_of(listing: &Value) -> Vec<&Value> {
    listing["nftables"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|o| o.get("rule"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_table_mss_clamp_replaced_atomically_and_removed() {
    let t = node_and_pod("nftpod");
    // Someone else's table in the same namespace.
    t.pod.exec(&["nft", "add table inet someone_else; add chain inet someone_else c { type filter hook forward priority 0; }; add rule inet someone_else c counter"]);
    let foreign = t
        .pod
        .exec(&["nft", "list", "table", "inet", "someone_else"]);

    let nft = NftDriver::new(Some(&t.pod.path()));
    assert!(nft.list_table(POD_TABLE).await.unwrap().is_none());
    nft.apply_pod(&PodRules {
        tunnel_interface: "wg0".into(),
    })
    .await
    .unwrap();
    let text = t.pod.exec(&["nft", "list", "table", "inet", POD_TABLE]);
    assert!(
        text.contains("oifname \"wg0\" tcp flags syn tcp option maxseg size set rt mtu"),
        "{text}"
    );
    assert!(text.contains("hook forward"), "{text}");

    // Replaced, not appended to.
    nft.apply_pod(&PodRules {
        tunnel_interface: "wg1".into(),
    })
    .await
    .unwrap();
    let listing = nft.list_table(POD_TABLE).await.unwrap().unwrap();
    let rules = rules_of(&listing);
    assert_eq!(rules.len(), 1, "{listing}");
    assert_eq!(rules[0]["expr"][0]["match"]["right"], "wg1");

    // All or nothing: a batch that fails half-way (a rule naming a set that
    // does not exist) leaves the previous table exactly as it was, although
    // the batch started by deleting it.
    let before = t.pod.exec(&["nft", "list", "table", "inet", POD_TABLE]);
    let bad = vec![
        json!({"chain": {"family": "inet", "table": POD_TABLE, "name": "x", "type": "filter", "hook": "forward", "prio": 0}}),
        json!({"rule": {"family": "inet", "table": POD_TABLE, "chain": "x", "expr": [
            {"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "daddr"}}, "right": "@missing"}},
            {"accept": null}
        ]}}),
    ];
    assert!(nft.replace_table(POD_TABLE, bad).await.is_err());
    assert_eq!(
        t.pod.exec(&["nft", "list", "table", "inet", POD_TABLE]),
        before
    );

    nft.remove_table(POD_TABLE).await.unwrap();
    assert!(nft.list_table(POD_TABLE).await.unwrap().is_none());
    nft.remove_table(POD_TABLE).await.unwrap(); // absent: still fine
    assert_eq!(
        t.pod
            .exec(&["nft", "list", "table", "inet", "someone_else"]),
        foreign
    );
}

/// The MSS a TCP server in `server` ends up with for a connection from a
/// client in `client` to `dst` (what the client's SYN advertised, after
/// whatever the path did to it, minus TCP options).
fn server_side_mss(client: &Netns, server: &Netns, dst: &str) -> u32 {
    use nix::sys::socket::{getsockopt, sockopt::TcpMaxSeg};
    use std::net::{TcpListener, TcpStream};
    let dst: IpAddr = dst.parse().unwrap();
    let listener = in_netns(Some(&server.path()), move || TcpListener::bind((dst, 0)))
        .unwrap()
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let stream = in_netns(Some(&client.path()), move || {
        TcpStream::connect_timeout(&addr, Duration::from_secs(5))
    })
    .unwrap()
    .unwrap();
    let (accepted, _) = listener.accept().unwrap();
    let mss = getsockopt(&accepted, TcpMaxSeg).unwrap();
    drop(stream);
    mss
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mss_clamp_rewrites_syns_routed_into_the_tunnel() {
    // client --eth0--> agent pod (forwards) --wg0 (MTU 1280)--> remote.
    let client = Netns::new("drv-mss-cli");
    let pod = Netns::new("drv-mss-pod");
    let remote = Netns::new("drv-mss-rem");
    veth(&client, "eth0", &pod, "eth0");
    client.ip(&["addr", "add", "10.1.1.5/24", "dev", "eth0"]);
    client.ip(&["route", "add", "default", "via", "10.1.1.1"]);
    pod.ip(&["addr", "add", "10.1.1.1/24", "dev", "eth0"]);
    veth(&pod, "wg0", &remote, "rwg");
    pod.ip(&["link", "set", "wg0", "mtu", "1280"]);
    pod.ip(&["addr", "add", "192.168.77.1/30", "dev", "wg0"]);
    remote.ip(&["addr", "add", "192.168.77.2/30", "dev", "rwg"]);
    remote.ip(&["addr", "add", "10.2.0.9/32", "dev", "lo"]);
    remote.ip(&["route", "add", "10.1.0.0/16", "via", "192.168.77.1"]);
    pod.ip(&[
        "route",
        "add",
        "10.2.0.0/16",
        "via",
        "192.168.77.2",
        "dev",
        "wg0",
    ]);
    write_sysctl(Some(&pod.path()), "net.ipv4.ip_forward", "1").unwrap();

    // Without the clamp the server sees the client's 1500-byte-MTU MSS.
    let unclamped = server_side_mss(&client, &remote, "10.2.0.9");
    assert!(unclamped > 1400, "baseline MSS {unclamped}");

    let nft = NftDriver::new(Some(&pod.path()));
    nft.apply_pod(&PodRules {
        tunnel_interface: "wg0".into(),
    })
    .await
    .unwrap();
    let clamped = server_side_mss(&client, &remote, "10.2.0.9");
    // rt mtu = 1280 - 40 = 1240 advertised; the server subtracts options.
    assert!(clamped <= 1240 && clamped > 1100, "clamped MSS {clamped}");

    nft.remove_table(POD_TABLE).await.unwrap();
    assert_eq!(server_side_mss(&client, &remote, "10.2.0.9"), unclamped);
}

/// Sends UDP from a socket in `from` to a socket bound on `dst` in `to`;
/// returns the source (address, client port) the receiver saw, or `None` if
/// nothing arrived (or the sender had no route) after a few tries.
fn udp_probe(from: &Netns, to: &Netns, dst: &str) -> Option<(IpAddr, u16)> {
    udp_probe_from(from, "0.0.0.0", to, dst)
}

/// [`udp_probe`] with the sender bound to source address `src`.
fn udp_probe_from(from: &Netns, src: &str, to: &Netns, dst: &str) -> Option<(IpAddr, u16)> {
    let src: IpAddr = src.parse().unwrap();
    let dst: IpAddr = dst.parse().unwrap();
    // A just-added IPv6 address can be tentative for a moment: retry.
    let mut tries = 0;
    let receiver = loop {
        match in_netns(Some(&to.path()), move || UdpSocket::bind((dst, 0))).unwrap() {
            Ok(socket) => break socket,
            Err(e) if e.kind() == std::io::ErrorKind::AddrNotAvailable && tries < 100 => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("bind {dst}: {e}"),
        }
    };
    let port = receiver.local_addr().unwrap().port();
    receiver
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let sender = in_netns(Some(&from.path()), move || UdpSocket::bind((src, 0)))
        .unwrap()
        .unwrap();
    let sport = sender.local_addr().unwrap().port();
    let mut buf = [0u8; 64];
    for _ in 0..10 {
        if sender.send_to(b"sdnt", SocketAddr::new(dst, port)).is_err() {
            return None;
        }
        if let Ok((n, from)) = receiver.recv_from(&mut buf) {
            assert_eq!(&buf[..n], b"sdnt");
            assert_eq!(from.port(), sport);
            return Some((from.ip(), sport));
        }
    }
    None
}

/// A node whose pods are masqueraded when they leave through `eth0`, with a
/// peer namespace behind `eth0` holding a "remote cluster" address and an
/// "outside" address.
struct MasqLab {
    node: Netns,
    client: Netns,
    ext: Netns,
    a: &'static MasqAddrs,
}

/// The addresses of a [`MasqLab`], per family.
struct MasqAddrs {
    /// client pod, on the node's `cbr0` (`gw`)
    pod: &'static str,
    pod_net: &'static str,
    gw: &'static str,
    /// node `eth0` / peer `up0`
    node: &'static str,
    peer: &'static str,
    link_len: &'static str,
    /// a remote cluster pod, inside `remote_cidr`, and an outside address
    remote: &'static str,
    remote_cidr: &'static str,
    outside: &'static str,
    outside_net: &'static str,
}

const V4: MasqAddrs = MasqAddrs {
    pod: "10.1.1.5",
    pod_net: "10.1.1.0/24",
    gw: "10.1.1.1",
    node: "10.99.0.1",
    peer: "10.99.0.2",
    link_len: "24",
    remote: "10.2.0.9",
    remote_cidr: "10.2.0.0/16",
    outside: "192.0.2.9",
    outside_net: "192.0.2.0/24",
};

const V6: MasqAddrs = MasqAddrs {
    pod: "fd00:1:1::5",
    pod_net: "fd00:1:1::/64",
    gw: "fd00:1:1::1",
    node: "fd00:99::1",
    peer: "fd00:99::2",
    link_len: "64",
    remote: "fd00:2::9",
    remote_cidr: "fd00:2::/48",
    outside: "2001:db8::9",
    outside_net: "2001:db8::/64",
};

fn masq_lab(test: &str, a: &'static MasqAddrs) -> MasqLab {
    let node = Netns::new(&format!("drv-{test}-node"));
    let client = Netns::new(&format!("drv-{test}-cli"));
    let ext = Netns::new(&format!("drv-{test}-ext"));
    let with_len = |ip: &str, len: &str| format!("{ip}/{len}");
    let host_len = if a.pod.contains(':') { "128" } else { "32" };
    let pod_len = a.pod_net.split('/').nth(1).unwrap();
    node.ip(&["link", "add", "cbr0", "type", "bridge"]);
    node.ip(&[
        "addr",
        "add",
        &with_len(a.gw, pod_len),
        "dev",
        "cbr0",
        "nodad",
    ]);
    node.ip(&["link", "set", "cbr0", "up"]);
    veth(&node, "vcli", &client, "eth0");
    node.ip(&["link", "set", "vcli", "master", "cbr0"]);
    client.ip(&[
        "addr",
        "add",
        &with_len(a.pod, pod_len),
        "dev",
        "eth0",
        "nodad",
    ]);
    client.ip(&["route", "add", "default", "via", a.gw]);
    veth(&node, "eth0", &ext, "up0");
    node.ip(&[
        "addr",
        "add",
        &with_len(a.node, a.link_len),
        "dev",
        "eth0",
        "nodad",
    ]);
    ext.ip(&[
        "addr",
        "add",
        &with_len(a.peer, a.link_len),
        "dev",
        "up0",
        "nodad",
    ]);
    ext.ip(&[
        "addr",
        "add",
        &with_len(a.remote, host_len),
        "dev",
        "lo",
        "nodad",
    ]);
    ext.ip(&[
        "addr",
        "add",
        &with_len(a.outside, host_len),
        "dev",
        "lo",
        "nodad",
    ]);
    ext.ip(&["route", "add", a.pod_net, "via", a.node]);
    node.ip(&["route", "add", a.remote_cidr, "via", a.peer]);
    node.ip(&["route", "add", a.outside_net, "via", a.peer]);
    let ns = Some(node.path());
    write_sysctl(ns.as_deref(), "net.ipv4.ip_forward", "1").unwrap();
    write_sysctl(ns.as_deref(), "net.ipv6.conf.all.forwarding", "1").unwrap();
    MasqLab {
        node,
        client,
        ext,
        a,
    }
}

/// An address as /proc/net/nf_conntrack prints it (IPv6 in full, `%pI6`).
fn ct_addr(ip: &str) -> String {
    match ip.parse::<IpAddr>().unwrap() {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => v6
            .segments()
            .iter()
            .map(|s| format!("{s:04x}"))
            .collect::<Vec<_>>()
            .join(":"),
    }
}

impl MasqLab {
    /// Sends UDP from the client pod to `dst` (a fresh socket, so a fresh
    /// conntrack entry) and returns the source address the receiver in the
    /// peer namespace saw, and the client's source port.
    fn observed_source(&self, dst: &str) -> (IpAddr, u16) {
        let any = if dst.contains(':') { "::" } else { "0.0.0.0" };
        udp_probe_from(&self.client, any, &self.ext, dst)
            .unwrap_or_else(|| panic!("nothing arrived at {dst}"))
    }

    fn conntrack_line(&self, sport: u16) -> String {
        // (`thread-self`: /proc/self/net would be the main thread's namespace.)
        let ct = in_netns(Some(&self.node.path()), || {
            std::fs::read_to_string("/proc/thread-self/net/nf_conntrack")
        })
        .unwrap()
        .expect("nf_conntrack proc file");
        let needle = format!("sport={sport} ");
        ct.lines()
            .find(|l| l.contains(&needle))
            .unwrap_or_else(|| panic!("no conntrack entry with {needle}:\n{ct}"))
            .to_string()
    }

    fn check_exemption(&self) {
        let a = self.a;
        let pod: IpAddr = a.pod.parse().unwrap();
        let node: IpAddr = a.node.parse().unwrap();
        // Without our table the node masquerades both (the test can fail).
        assert_eq!(self.observed_source(a.remote).0, node);
        assert_eq!(self.observed_source(a.outside).0, node);

        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let nft = NftDriver::new(Some(&self.node.path()));
        let rules = NodeRules {
            remote_cidrs: vec![
                net(V4.remote_cidr),
                net("10.102.0.0/16"),
                net(V6.remote_cidr),
            ],
        };
        rt.block_on(nft.apply_node(&rules)).unwrap();
        // Remote cluster keeps the pod source; everything else is still masqueraded.
        let (src, exempt_port) = self.observed_source(a.remote);
        assert_eq!(src, pod);
        let (src, masq_port) = self.observed_source(a.outside);
        assert_eq!(src, node);
        // conntrack agrees: the exempt flow has a NAT binding that maps the
        // source to itself (replies go to the pod IP), the other one to the
        // node's address.
        let (p, r, o, n) = (
            ct_addr(a.pod),
            ct_addr(a.remote),
            ct_addr(a.outside),
            ct_addr(a.node),
        );
        let flow = self.conntrack_line(exempt_port);
        assert!(flow.contains(&format!("src={p} dst={r}")), "{flow}");
        assert!(
            flow.contains(&format!("src={r} dst={p}")),
            "reply not to the pod IP: {flow}"
        );
        let flow = self.conntrack_line(masq_port);
        assert!(
            flow.contains(&format!("src={o} dst={n}")),
            "not masqueraded: {flow}"
        );
        // Replacing the table (same content) keeps it working; removing it
        // brings masquerade back for new flows.
        rt.block_on(nft.apply_node(&rules)).unwrap();
        assert_eq!(self.observed_source(a.remote).0, pod);
        rt.block_on(nft.remove_table(NODE_TABLE)).unwrap();
        assert_eq!(self.observed_source(a.remote).0, node);
    }
}

#[test]
fn masquerade_exemption_works_for_ipv6_too() {
    let lab = masq_lab("masq6", &V6);
    lab.node.exec(&["nft", "add table ip6 node_nat6; add chain ip6 node_nat6 postrouting { type nat hook postrouting priority srcnat; policy accept; }; add rule ip6 node_nat6 postrouting ip6 saddr fd00:1::/32 ip6 daddr != fd00:1::/32 oifname \"eth0\" masquerade"]);
    lab.check_exemption();
}

#[test]
fn masquerade_exemption_beats_the_lab_nft_masquerade_rule() {
    let lab = masq_lab("masqnft", &V4);
    // The lab's node rule, verbatim (tests/lab: NODE_NAT_TABLE).
    lab.node.exec(&["nft", "add table ip lab_node_nat; add chain ip lab_node_nat postrouting { type nat hook postrouting priority srcnat; policy accept; }; add rule ip lab_node_nat postrouting ip saddr 10.1.0.0/16 ip daddr != 10.1.0.0/16 oifname \"eth0\" masquerade"]);
    let theirs = lab
        .node
        .exec(&["nft", "list", "table", "ip", "lab_node_nat"]);
    lab.check_exemption();
    assert_eq!(
        lab.node
            .exec(&["nft", "list", "table", "ip", "lab_node_nat"]),
        theirs
    );
}

#[test]
fn masquerade_exemption_beats_an_iptables_nft_masquerade() {
    let lab = masq_lab("masqipt", &V4);
    // ip-masq-agent / kindnet (iptables mode) style.
    lab.node.exec(&[
        "iptables-nft",
        "-t",
        "nat",
        "-A",
        "POSTROUTING",
        "-s",
        "10.1.0.0/16",
        "!",
        "-d",
        "10.1.0.0/16",
        "-j",
        "MASQUERADE",
    ]);
    lab.check_exemption();
    let rules = lab
        .node
        .exec(&["iptables-nft", "-t", "nat", "-S", "POSTROUTING"]);
    assert!(rules.contains("-j MASQUERADE"), "{rules}");
}

/// Legacy iptables (x_tables `iptable_nat`, as kindnet's iptables-wrapper
/// picks on older nodes) registers its nat table with the same nf_nat
/// dispatcher, so the identity binding exempts from it too.
#[test]
fn masquerade_exemption_beats_a_legacy_iptables_masquerade() {
    if Command::new("iptables-legacy")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("iptables-legacy is not installed; nothing to test against");
        return;
    }
    let lab = masq_lab("masqleg", &V4);
    lab.node.exec(&[
        "iptables-legacy",
        "-t",
        "nat",
        "-A",
        "POSTROUTING",
        "-s",
        "10.1.0.0/16",
        "!",
        "-d",
        "10.1.0.0/16",
        "-j",
        "MASQUERADE",
    ]);
    lab.check_exemption();
    let rules = lab
        .node
        .exec(&["iptables-legacy", "-t", "nat", "-S", "POSTROUTING"]);
    assert!(rules.contains("-j MASQUERADE"), "{rules}");
}

#[test]
fn our_namespaces_are_gone_after_drop() {
    let name = {
        let ns = Netns::new("drv-drop-x");
        ns.name.clone()
    };
    let list = sh(&["ip", "netns", "list"]);
    assert!(
        !list
            .lines()
            .any(|l| l.split_whitespace().next() == Some(name.as_str())),
        "{list}"
    );
}
