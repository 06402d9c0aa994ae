//! Rendering and diffing against a model of the table, and the kernel's
//! `nft` (as root, in a scratch namespace).
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::process::Command;

use proptest::prelude::*;
use sdn_tunnel_core::services::{Protocol, ProxiedService};

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use sdn_tunnel_core::services::{Affinity, Frontend, ProxyState};
use serde_json::Value;

use super::render::BASE_RULES;
use super::*;
use crate::drivers::nftables::NftDriver;

fn svc(ip: &str, proto: Protocol, port: u16, eps: &[&str], aff: Affinity) -> ProxiedService {
    ProxiedService {
        frontend: Frontend {
            ip: ip.parse().unwrap(),
            protocol: proto,
            port,
        },
        cluster: "west".into(),
        namespace: "demo".into(),
        name: "web".into(),
        port_name: "http".into(),
        affinity: aff,
        endpoints: eps
            .iter()
            .map(|e| e.parse::<SocketAddr>().unwrap())
            .collect(),
    }
}

fn state(services: Vec<ProxiedService>) -> ProxyState {
    ProxyState {
        services,
        service_cidrs: vec![
            "10.102.0.0/16".parse().unwrap(),
            "fd00:102::/112".parse().unwrap(),
        ],
        ..ProxyState::default()
    }
}

#[test]
fn pick_chains_by_family_mode_and_count() {
    let p = Pick {
        v4: true,
        hash: false,
        n: 2,
        slot_ports: false,
    };
    assert_eq!(p.chain(), "pick_random_2_v4");
    let rules = p.rules();
    assert_eq!(
        rules[0]["rule"]["expr"][0]["mangle"]["value"]["numgen"]["mod"],
        2
    );
    let dnat = &rules[1]["rule"]["expr"][0]["dnat"];
    assert_eq!(dnat["family"], "ip");
    assert_eq!(dnat["addr"]["map"]["data"], "@endpoint_addrs_v4");
    assert_eq!(dnat["port"]["map"]["data"], "@service_ports_v4");
    let per_endpoint = Pick {
        slot_ports: true,
        ..p
    };
    assert_eq!(per_endpoint.chain(), "pick_random_2_v4_ports");
    let dnat = &per_endpoint.rules()[1]["rule"]["expr"][0]["dnat"];
    assert_eq!(dnat["port"]["map"]["data"], "@endpoint_ports_v4");
    let h = Pick {
        v4: false,
        hash: true,
        n: 3,
        slot_ports: false,
    };
    assert_eq!(h.chain(), "pick_hash_3_v6");
    let rules = h.rules();
    let jhash = &rules[0]["rule"]["expr"][0]["mangle"]["value"]["jhash"];
    assert_eq!(jhash["mod"], 3);
    assert_eq!(jhash["expr"]["payload"]["protocol"], "ip6");
    assert_eq!(rules[1]["rule"]["expr"][0]["dnat"]["family"], "ip6");
}

#[test]
fn rendering_shares_pick_chains_and_indexes_endpoints() {
    let s = state(vec![
        svc(
            "10.102.0.10",
            Protocol::Tcp,
            80,
            &["10.2.2.5:9090", "10.2.1.5:8080"],
            Affinity::None,
        ),
        svc(
            "10.102.0.12",
            Protocol::Udp,
            53,
            &["10.2.1.6:53", "10.2.1.7:53"],
            Affinity::None,
        ),
        svc(
            "10.102.0.13",
            Protocol::Udp,
            53,
            &["10.2.1.6:53", "10.2.1.7:53"],
            Affinity::ClientIp {
                timeout_seconds: 10,
            },
        ),
        svc("10.102.0.11", Protocol::Tcp, 80, &[], Affinity::None),
    ]);
    let r = Rendered::of(&s);
    assert_eq!(r.frontends.len(), 3);
    assert_eq!(r.endpoints.len(), 6);
    assert_eq!(r.no_endpoints.len(), 1);
    let chains: Vec<String> = r.picks.iter().map(Pick::chain).collect();
    // .10's endpoints listen on 9090 and 8080: ports per endpoint.
    assert_eq!(
        chains,
        [
            "pick_random_2_v4",
            "pick_random_2_v4_ports",
            "pick_hash_2_v4"
        ]
    );
    assert_eq!(r.rule_count(), 6 + BASE_RULES);
    let f = s.services[0].frontend;
    assert_eq!(r.endpoints[&(f, 1)], "10.2.1.5:8080".parse().unwrap());
    assert!(r.frontends[&f].slot_ports && !r.ports.contains_key(&f));
    let udp = s.services[1].frontend;
    assert_eq!(r.ports.get(&udp), Some(&53), "one port for both endpoints");
}

#[test]
fn full_table_names_only_our_table() {
    let s = state(vec![
        svc(
            "10.102.0.10",
            Protocol::Tcp,
            80,
            &["10.2.1.5:8080"],
            Affinity::None,
        ),
        svc("10.102.0.11", Protocol::Udp, 53, &[], Affinity::None),
    ]);
    let batch = full_batch(&Rendered::of(&s));
    for cmd in batch["nftables"].as_array().unwrap() {
        let inner = cmd.as_object().unwrap().values().next().unwrap();
        let obj = inner.as_object().unwrap().values().next().unwrap();
        let table = obj
            .get("table")
            .and_then(Value::as_str)
            .or_else(|| obj.get("name").and_then(Value::as_str));
        assert_eq!(table, Some(PROXY_TABLE), "{cmd}");
    }
    // the vmap element comes after the chain it points to
    let text = batch.to_string();
    let chain_at = text.find("\"name\":\"pick_random_1_v4\"").unwrap();
    let goto_at = text.find("\"goto\"").unwrap();
    assert!(chain_at < goto_at);
}

#[test]
fn an_endpoint_change_touches_elements_only() {
    let a = svc(
        "10.102.0.10",
        Protocol::Tcp,
        80,
        &["10.2.1.5:8080", "10.2.1.6:8080"],
        Affinity::None,
    );
    let b = svc(
        "10.102.0.11",
        Protocol::Tcp,
        80,
        &["10.2.1.6:8080"],
        Affinity::None,
    );
    let old = Rendered::of(&state(vec![a.clone(), b.clone()]));
    assert!(incremental_commands(&old, &mut old.clone()).is_empty());
    // one endpoint replaced by another: one slot rewritten
    let mut a2 = a.clone();
    a2.endpoints[1] = "10.2.2.9:8080".parse().unwrap();
    let mut new = Rendered::of(&state(vec![a2, b.clone()]));
    let cmds = incremental_commands(&old, &mut new);
    let verbs = |cmds: &[Value]| -> Vec<String> {
        cmds.iter()
            .map(|c| {
                let (verb, obj) = c.as_object().unwrap().iter().next().unwrap();
                let (kind, inner) = obj.as_object().unwrap().iter().next().unwrap();
                let name = inner["name"].as_str().unwrap_or_default();
                let n = inner["elem"].as_array().map_or(0, Vec::len);
                format!("{verb} {kind} {name} {n}")
            })
            .collect()
    };
    assert_eq!(
        verbs(&cmds),
        [
            "delete element endpoint_addrs_v4 1",
            "add element endpoint_addrs_v4 1",
        ]
    );
    // a third endpoint: a new pick chain, the frontend re-pointed, one slot more
    let mut a3 = a.clone();
    a3.endpoints.push("10.2.3.3:8080".parse().unwrap());
    let mut new = Rendered::of(&state(vec![a3, b.clone()]));
    let cmds = incremental_commands(&old, &mut new);
    assert_eq!(
        verbs(&cmds),
        [
            "add chain pick_random_3_v4 0",
            "add rule  0",
            "add rule  0",
            "delete element services_v4 1",
            "add element endpoint_addrs_v4 1",
            "add element services_v4 1",
        ]
    );
    assert!(
        new.picks.iter().any(|p| p.n == 2),
        "kept until a full replace"
    );
    // one endpoint on another port: the frontend takes its ports per
    // endpoint (a new pick chain), its shared port goes
    let mut a5 = a.clone();
    a5.endpoints[1] = "10.2.2.5:9090".parse().unwrap();
    let mut new = Rendered::of(&state(vec![a5, b.clone()]));
    let cmds = incremental_commands(&old, &mut new);
    assert_eq!(
        verbs(&cmds),
        [
            "add chain pick_random_2_v4_ports 0",
            "add rule  0",
            "add rule  0",
            "delete element endpoint_addrs_v4 1",
            "delete element service_ports_v4 1",
            "delete element services_v4 1",
            "add element endpoint_addrs_v4 1",
            "add element endpoint_ports_v4 2",
            "add element services_v4 1",
        ]
    );
    // losing every endpoint: out of both maps, into the reject set
    let mut a4 = a;
    a4.endpoints.clear();
    let mut new = Rendered::of(&state(vec![a4, b]));
    let cmds = incremental_commands(&old, &mut new);
    assert_eq!(
        verbs(&cmds),
        [
            "delete element endpoint_addrs_v4 2",
            "delete element service_ports_v4 1",
            "delete element services_v4 1",
            "add element no_endpoints_v4 1",
        ]
    );
}

#[test]
fn stale_flows_are_udp_and_sctp_endpoints_that_left() {
    let udp = svc(
        "10.102.0.10",
        Protocol::Udp,
        53,
        &["10.2.1.5:53", "10.2.1.6:53"],
        Affinity::None,
    );
    let tcp = svc(
        "10.102.0.10",
        Protocol::Tcp,
        80,
        &["10.2.1.5:80", "10.2.1.6:80"],
        Affinity::None,
    );
    let old = Rendered::of(&state(vec![tcp.clone(), udp.clone()]));
    let mut udp2 = udp.clone();
    udp2.endpoints.remove(0);
    let mut tcp2 = tcp;
    tcp2.endpoints.remove(0);
    let new = Rendered::of(&state(vec![tcp2, udp2]));
    assert_eq!(
        stale_flows(&old, &new),
        vec![(udp.frontend, "10.2.1.5:53".parse().unwrap())]
    );
    // a frontend gone entirely: all its endpoints
    let none = Rendered::of(&state(vec![]));
    assert_eq!(stale_flows(&old, &none).len(), 2);
    assert!(stale_flows(&old, &old).is_empty());
}

/// A model of the table: set/map name → element key → value, and the
/// chains. Applying a command that the kernel would refuse (adding an
/// element or chain that exists, deleting one that does not) is an error.
#[derive(Debug, Default, PartialEq)]
struct Model {
    sets: BTreeMap<String, BTreeMap<String, String>>,
    chains: BTreeSet<String>,
}

impl Model {
    fn apply(&mut self, verb: &str, obj: &Value) -> Result<(), String> {
        let (kind, inner) = obj.as_object().unwrap().iter().next().unwrap();
        let name = inner["name"].as_str().unwrap_or_default().to_string();
        match (verb, kind.as_str()) {
            ("add", "element") | ("delete", "element") => {
                let set = self.sets.entry(name.clone()).or_default();
                for e in inner["elem"].as_array().unwrap() {
                    let (k, v) = match e.as_array() {
                        Some(kv) if kv.len() == 2 => (kv[0].to_string(), kv[1].to_string()),
                        _ => (e.to_string(), String::new()),
                    };
                    if verb == "add" {
                        if set.insert(k.clone(), v).is_some() {
                            return Err(format!("{name}: {k} exists"));
                        }
                    } else if set.remove(&k).is_none() {
                        return Err(format!("{name}: {k} absent"));
                    }
                }
            }
            ("flush", "set") => {
                self.sets.entry(name).or_default().clear();
            }
            ("add", "chain") => {
                if self.chains.contains(&name) {
                    return Err(format!("chain {name} exists"));
                }
                self.chains.insert(name);
            }
            ("add", "rule") => {
                let chain = inner["chain"].as_str().unwrap();
                if !self.chains.contains(chain) {
                    return Err(format!("rule in missing chain {chain}"));
                }
            }
            _ => {}
        }
        Ok(())
    }

    fn of(r: &Rendered) -> Model {
        let mut m = Model::default();
        for o in table_objects(r) {
            m.apply("add", &o).unwrap();
        }
        m
    }
}

fn arb_state() -> impl Strategy<Value = ProxyState> {
    let one = (
        0u8..4,
        prop_oneof![Just(Protocol::Tcp), Just(Protocol::Udp)],
        any::<bool>(),
        prop::collection::vec((0u8..6, any::<bool>()), 0..5),
    );
    prop::collection::vec(one, 0..6).prop_map(|v| {
        let mut services: Vec<ProxiedService> = v
            .into_iter()
            .map(|(ip, proto, hash, eps)| {
                // Mostly one port per frontend, sometimes two.
                let eps: Vec<String> = eps
                    .iter()
                    .map(|(e, other)| format!("10.2.1.{e}:{}", if *other { 9090 } else { 8080 }))
                    .collect();
                let refs: Vec<&str> = eps.iter().map(String::as_str).collect();
                let mut s = svc(
                    &format!("10.102.0.{ip}"),
                    proto,
                    80,
                    &refs,
                    if hash {
                        Affinity::ClientIp { timeout_seconds: 1 }
                    } else {
                        Affinity::None
                    },
                );
                s.endpoints.sort();
                s.endpoints.dedup();
                s
            })
            .collect();
        services.sort_by_key(|s| s.frontend);
        services.dedup_by_key(|s| s.frontend);
        state(services)
    })
}

proptest::proptest! {
    /// The difference, applied to the old table, gives exactly the new
    /// one, and never asks the kernel for something it would refuse.
    #[test]
    fn incremental_commands_turn_old_into_new(a in arb_state(), b in arb_state()) {
        let old = Rendered::of(&a);
        let mut new = Rendered::of(&b);
        let mut model = Model::of(&old);
        for cmd in incremental_commands(&old, &mut new) {
            let (verb, obj) = cmd.as_object().unwrap().iter().next().unwrap();
            model.apply(verb, obj).map_err(proptest::test_runner::TestCaseError::fail)?;
        }
        // (an emptied set and a never-filled one are the same table)
        model.sets.retain(|_, v| !v.is_empty());
        proptest::prop_assert_eq!(model, Model::of(&new));
    }
}

// ---- against the kernel (root only) ----

struct Netns(String);
impl Netns {
    fn new(tag: &str) -> Option<Netns> {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root");
            return None;
        }
        let name = format!("sdnt-proxy-{tag}-{}", std::process::id());
        let ok = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "ip netns add {name}");
        Some(Netns(name))
    }
    fn path(&self) -> std::path::PathBuf {
        std::path::PathBuf::from(format!("/run/netns/{}", self.0))
    }
    fn nft(&self, args: &[&str]) -> String {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.0, "nft"])
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}
impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// The table's objects without handles, in a canonical order (a
/// listing follows creation order, which differs between paths).
fn normalized(ns: &Netns) -> Vec<String> {
    fn strip(v: &mut Value) {
        match v {
            Value::Object(m) => {
                m.remove("handle");
                m.values_mut().for_each(strip);
            }
            Value::Array(a) => {
                a.iter_mut().for_each(strip);
                a.sort_by_key(Value::to_string);
            }
            _ => {}
        }
    }
    let text = ns.nft(&["-j", "-s", "list", "table", "inet", PROXY_TABLE]);
    let mut v: Value = serde_json::from_str(&text).unwrap();
    let mut out: Vec<String> = v["nftables"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .filter(|o| o.get("metainfo").is_none())
        .map(|o| {
            strip(o);
            o.to_string()
        })
        .collect();
    out.sort();
    out
}

fn many(n: usize, eps: usize) -> ProxyState {
    let services = (0..n)
        .map(|i| {
            let ip = format!("10.102.{}.{}", i / 250, i % 250 + 1);
            let endpoints: Vec<String> = (0..eps)
                .map(|e| format!("10.2.{}.{}:8080", e, i % 250 + 1))
                .collect();
            let refs: Vec<&str> = endpoints.iter().map(String::as_str).collect();
            let aff = if i % 10 == 0 {
                Affinity::ClientIp {
                    timeout_seconds: 10800,
                }
            } else {
                Affinity::None
            };
            svc(&ip, Protocol::Tcp, 80, &refs, aff)
        })
        .collect();
    state(services)
}

#[tokio::test(flavor = "current_thread")]
async fn kernel_accepts_full_and_incremental_batches_and_removal() {
    let Some(ns) = Netns::new("kern") else { return };
    // a foreign table that must survive everything we do
    ns.nft(&["add", "table", "ip", "foreign"]);
    let d = ProxyDriver::new(Some(&ns.path()), Duration::from_secs(3600));
    let mut s = state(vec![
        svc(
            "10.102.0.10",
            Protocol::Tcp,
            80,
            &["10.2.1.5:8080", "10.2.2.5:8080"],
            Affinity::None,
        ),
        svc(
            "10.102.0.10",
            Protocol::Udp,
            53,
            &["10.2.1.5:5353"],
            Affinity::ClientIp { timeout_seconds: 5 },
        ),
        svc(
            "fd00:102::a",
            Protocol::Sctp,
            80,
            &["[fd00:2::1]:8080"],
            Affinity::None,
        ),
        svc("10.102.0.11", Protocol::Tcp, 80, &[], Affinity::None),
        // endpoints on different ports (a named targetPort)
        svc(
            "10.102.0.14",
            Protocol::Tcp,
            8000,
            &["10.2.1.8:8080", "10.2.1.9:9090"],
            Affinity::None,
        ),
    ]);
    let r = d.apply(&s).await.unwrap();
    assert!(r.full);
    let text = ns.nft(&["list", "table", "inet", PROXY_TABLE]);
    for want in [
        "10.102.0.10 . tcp . 80 : goto pick_random_2_v4",
        "10.102.0.10 . udp . 53 : goto pick_hash_1_v4",
        "fd00:102::a . sctp . 80 : goto pick_random_1_v6",
        "10.102.0.10 . tcp . 80 . 0x00000000 : 10.2.1.5",
        "10.102.0.10 . tcp . 80 . 0x00000001 : 10.2.2.5",
        "10.102.0.10 . tcp . 80 : 8080",
        "fd00:102::a . sctp . 80 . 0x00000000 : fd00:2::1",
        "meta mark set numgen random mod 2",
        "meta mark set jhash ip saddr mod 1 seed",
        "dnat ip to ip daddr . meta l4proto . th dport . meta mark map @endpoint_addrs_v4:ip daddr . meta l4proto . th dport map @service_ports_v4",
        "dnat ip6 to ip6 daddr . meta l4proto . th dport . meta mark map @endpoint_addrs_v6:",
        "elements = { 10.102.0.11 . tcp . 80 }",
        "10.102.0.14 . tcp . 8000 : goto pick_random_2_v4_ports",
        "10.102.0.14 . tcp . 8000 . 0x00000001 : 9090",
        "meta mark map @endpoint_ports_v4",
    ] {
        assert!(text.contains(want), "{want}: {text}");
    }
    let s0 = s.clone();
    // unchanged: nothing sent
    assert_eq!(d.apply(&s).await.unwrap().commands, 0);
    // endpoint change + a service losing its endpoints + a new one + the
    // mixed-port one down to one port
    s.services[0].endpoints.pop();
    s.services[1].endpoints.clear();
    let mixed = s
        .services
        .iter()
        .position(|x| x.frontend.port == 8000)
        .unwrap();
    s.services[mixed].endpoints.pop();
    s.services.push(svc(
        "10.102.0.12",
        Protocol::Tcp,
        443,
        &["10.2.3.3:8443"],
        Affinity::None,
    ));
    s.services.sort();
    let r = d.apply(&s).await.unwrap();
    assert!(!r.full);
    let text = ns.nft(&["list", "table", "inet", PROXY_TABLE]);
    for want in [
        "10.102.0.10 . tcp . 80 : goto pick_random_1_v4",
        "10.102.0.12 . tcp . 443 : goto pick_random_1_v4",
        "10.102.0.12 . tcp . 443 . 0x00000000 : 10.2.3.3",
        "10.102.0.12 . tcp . 443 : 8443",
        "10.102.0.14 . tcp . 8000 : goto pick_random_1_v4",
        "10.102.0.14 . tcp . 8000 : 8080",
    ] {
        assert!(text.contains(want), "{want}: {text}");
    }
    assert!(!text.contains("10.2.2.5"), "{text}");
    assert!(!text.contains("10.102.0.10 . udp . 53 :"), "{text}");
    assert!(text.contains("10.102.0.10 . udp . 53"), "{text}");
    // the listing equals what a fresh full apply produces
    let fresh = NftDriver::new(Some(&ns.path()));
    let incremental = normalized(&ns);
    let mut expected = Rendered::of(&s);
    expected.picks.extend(Rendered::of(&s0).picks);
    fresh
        .run_batch("full", &full_batch(&expected))
        .await
        .unwrap();
    assert_eq!(incremental, normalized(&ns));
    // drift: someone deletes our table; the next change falls back to full
    ns.nft(&["delete", "table", "inet", PROXY_TABLE]);
    s.services[0]
        .endpoints
        .push("10.2.9.9:8080".parse().unwrap());
    let r = d.apply(&s).await.unwrap();
    assert!(r.full, "{r:?}");
    assert!(ns
        .nft(&["list", "table", "inet", PROXY_TABLE])
        .contains(": 10.2.9.9"));
    d.remove().await.unwrap();
    let all = ns.nft(&["list", "tables"]);
    assert!(!all.contains(PROXY_TABLE), "{all}");
    assert!(all.contains("table ip foreign"), "{all}");
}

#[tokio::test(flavor = "current_thread")]
async fn periodic_full_replacement_repairs_silent_drift() {
    let Some(ns) = Netns::new("drift") else {
        return;
    };
    let d = ProxyDriver::new(Some(&ns.path()), Duration::from_millis(300));
    let s = many(3, 2);
    assert!(d.apply(&s).await.unwrap().full);
    // someone flushes our map: nothing changed in the desired state, so
    // until the full replacement is due nothing is sent ...
    ns.nft(&["flush", "map", "inet", PROXY_TABLE, "services_v4"]);
    let r = d.apply(&s).await.unwrap();
    assert_eq!((r.full, r.commands), (false, 0));
    assert!(!ns
        .nft(&["list", "map", "inet", PROXY_TABLE, "services_v4"])
        .contains("goto"));
    // ... and once it is due, the table is whole again.
    tokio::time::sleep(Duration::from_millis(350)).await;
    assert!(d.apply(&s).await.unwrap().full);
    let map = ns.nft(&["list", "map", "inet", PROXY_TABLE, "services_v4"]);
    assert_eq!(map.matches("goto").count(), 3, "{map}");
    d.remove().await.unwrap();
}

/// Not a timing assertion: prints how long `nft` takes with many
/// services, and checks the kernel holds them all
/// (`SDN_TUNNEL_PROXY_10K=1` adds 10,000 services: about 20 s more).
#[tokio::test(flavor = "current_thread")]
async fn figures_for_1000_services() {
    let Some(ns) = Netns::new("bench") else {
        return;
    };
    let d = ProxyDriver::new(Some(&ns.path()), Duration::from_secs(3600));
    let mut sizes = vec![10usize, 1000];
    if std::env::var_os("SDN_TUNNEL_PROXY_10K").is_some() {
        sizes.push(10_000);
    }
    for n in sizes {
        let mut s = many(n, 10);
        d.remove().await.unwrap();
        let r = d.apply(&s).await.unwrap();
        assert!(r.full);
        let listed = ns.nft(&["-j", "list", "map", "inet", PROXY_TABLE, "services_v4"]);
        let v: Value = serde_json::from_str(&listed).unwrap();
        let elems = v["nftables"][1]["map"]["elem"]
            .as_array()
            .map_or(0, Vec::len);
        assert_eq!(elems, n);
        // one endpoint replaced by another pod: one slot rewritten
        s.services[n / 2].endpoints[3] = "10.2.99.99:8080".parse().unwrap();
        let one = d.apply(&s).await.unwrap();
        assert!(!one.full);
        assert_eq!(one.commands, 2, "delete + add in the address map");
        // one endpoint gone: a slot less, the frontend re-pointed
        s.services[n / 2].endpoints.pop();
        let gone = d.apply(&s).await.unwrap();
        assert!(!gone.full);
        println!(
            "FIGURE nft_full_apply_{n}_services_x10_endpoints = {:.3} s ({} commands, {} rules)",
            r.took.as_secs_f64(),
            r.commands,
            Rendered::of(&s).rule_count()
        );
        println!(
            "FIGURE nft_one_endpoint_replaced_{n}_services = {:.1} ms",
            one.took.as_secs_f64() * 1000.0
        );
        println!(
            "FIGURE nft_one_endpoint_removed_{n}_services = {:.1} ms ({} commands)",
            gone.took.as_secs_f64() * 1000.0,
            gone.commands
        );
    }
}
