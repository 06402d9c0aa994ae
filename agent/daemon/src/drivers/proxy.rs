//! Service proxying in the agent's pod namespace: remote
//! `ClusterIP:port/protocol` → one ready remote endpoint, with nftables.
//!
//! Our own table, [`PROXY_TABLE`] (`inet sdn_tunnel_proxy`), separate from
//! [`super::nftables::POD_TABLE`] so that neither apply replaces the other:
//!
//! ```text
//! table inet sdn_tunnel_proxy {
//!   map services_v4 { type ipv4_addr . inet_proto . inet_service : verdict
//!                     elements = { 10.102.0.10 . tcp . 80 : goto svc_0a66000a_tcp_80, ... } }
//!   map services_v6 { ... ipv6 twin ... }
//!   set no_endpoints_v4 { type ipv4_addr . inet_proto . inet_service }   (+ v6)
//!   set service_cidrs_v4 { type ipv4_addr; flags interval }             (+ v6)
//!   chain svc_0a66000a_tcp_80 {
//!     meta l4proto tcp counter dnat ip to numgen random mod 2 map { 0 : 10.2.1.5 . 8080, 1 : 10.2.2.5 . 8080 }
//!   }                  (sessionAffinity ClientIP: jhash ip saddr mod N seed S instead of numgen)
//!   chain nat_prerouting { type nat hook prerouting priority dstnat
//!     ip daddr . meta l4proto . th dport vmap @services_v4 ; ip6 twin }
//!   chain nat_output     { type nat hook output priority dstnat; same }
//!   chain refuse { no_endpoints / service_cidrs → reject with tcp reset | icmpx port-unreachable }
//!   chain filter_forward { type filter hook forward priority filter; jump refuse }
//!   chain filter_output  { type filter hook output priority filter; jump refuse }
//! }
//! ```
//!
//! Per packet: one verdict-map lookup (a hash of the concatenated key)
//! whatever the number of services, then one rule in the service's chain.
//! Only the first packet of a connection traverses nat chains; conntrack
//! applies the binding to the rest and reverses it for replies. After
//! prerouting DNAT the destination is a remote pod IP, which the pod's
//! `dev wg0` routes send into the tunnel. A frontend with no ready endpoint
//! is not in the verdict map: its packets keep the ClusterIP, are routed
//! towards `wg0`, and the forward filter refuses them (TCP reset / ICMP port
//! unreachable) — as it does any other port of a remote service CIDR, which
//! no tunnel peer would take.
//!
//! Updates: the first apply, and then every [`ProxyDriver::full_every`],
//! replaces the whole table in one transaction (drift repair). In between,
//! an apply sends only the difference from what it last installed — map
//! elements and set elements added or deleted, a changed service's chain
//! flushed and given its new rule — also as one transaction. If that fails
//! (someone deleted our table, say), the driver falls back to a full
//! replacement at once.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use ipnet::IpNet;
use sdn_tunnel_core::services::{Affinity, Frontend, ProxiedService, ProxyState};
use serde_json::{json, Value};
use tokio::sync::Mutex;
use tracing::{debug, info, warn};

use super::nftables::{remove_table_batch, replace_table_batch, NftDriver, NftError, FAMILY};

/// Our table of the service proxy, in the agent's pod namespace.
pub const PROXY_TABLE: &str = "sdn_tunnel_proxy";
/// Priority of the nat chains: `dstnat`.
pub const DSTNAT_PRIORITY: i32 = -100;
/// Priority of the filter chains: `filter`.
pub const FILTER_PRIORITY: i32 = 0;

fn v4(ip: &IpAddr) -> bool {
    ip.is_ipv4()
}

fn suffix(is_v4: bool) -> &'static str {
    if is_v4 {
        "v4"
    } else {
        "v6"
    }
}

fn services_map(is_v4: bool) -> String {
    format!("services_{}", suffix(is_v4))
}

fn no_endpoints_set(is_v4: bool) -> String {
    format!("no_endpoints_{}", suffix(is_v4))
}

fn cidrs_set(is_v4: bool) -> String {
    format!("service_cidrs_{}", suffix(is_v4))
}

/// The chain of one frontend: `svc_<address in hex>_<proto>_<port>`,
/// stable across restarts so that diffs and listings line up.
pub fn chain_name(f: &Frontend) -> String {
    let hex: String = match f.ip {
        IpAddr::V4(a) => a.octets().iter().map(|b| format!("{b:02x}")).collect(),
        IpAddr::V6(a) => a.octets().iter().map(|b| format!("{b:02x}")).collect(),
    };
    format!("svc_{hex}_{}_{}", f.protocol.as_str(), f.port)
}

/// The key of `f` in the verdict map and the no-endpoint sets.
fn element_key(f: &Frontend) -> Value {
    json!({"concat": [f.ip.to_string(), f.protocol.as_str(), f.port]})
}

/// A stable jhash seed per frontend (FNV-1a of its chain name), so that a
/// full resync keeps every client on the endpoint it had.
fn affinity_seed(f: &Frontend) -> u32 {
    chain_name(f).bytes().fold(0x811c_9dc5_u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

/// The rule of a frontend's chain (which must have endpoints).
pub fn service_rule(s: &ProxiedService) -> Value {
    let f = &s.frontend;
    let family = if v4(&f.ip) { "ip" } else { "ip6" };
    let n = s.endpoints.len();
    let key = match s.affinity {
        Affinity::None => json!({"numgen": {"mode": "random", "mod": n, "offset": 0}}),
        Affinity::ClientIp { .. } => json!({"jhash": {
            "mod": n, "seed": affinity_seed(f),
            "expr": {"payload": {"protocol": family, "field": "saddr"}}
        }}),
    };
    let data: Vec<Value> = s
        .endpoints
        .iter()
        .enumerate()
        .map(|(i, e)| json!([i, {"concat": [e.ip().to_string(), e.port()]}]))
        .collect();
    json!({"rule": {
        "family": FAMILY, "table": PROXY_TABLE, "chain": chain_name(f),
        "comment": format!("{}/{}/{}:{}", s.cluster, s.namespace, s.name, s.port_name),
        "expr": [
            {"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": f.protocol.as_str()}},
            {"counter": {"packets": 0, "bytes": 0}},
            {"dnat": {"family": family, "addr": {"map": {"key": key, "data": {"set": data}}}}}
        ]
    }})
}

/// What the table holds, in a form that diffs cheaply.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Rendered {
    /// Frontends with endpoints: chain name → (frontend, its rule).
    pub chains: BTreeMap<String, (Frontend, Value)>,
    /// Frontends without endpoints.
    pub no_endpoints: BTreeSet<Frontend>,
    /// Remote service CIDRs.
    pub cidrs: Vec<IpNet>,
}

impl Rendered {
    /// The table content for `state`.
    pub fn of(state: &ProxyState) -> Rendered {
        let mut r = Rendered {
            cidrs: state.service_cidrs.clone(),
            ..Rendered::default()
        };
        for s in &state.services {
            if s.rejects() {
                r.no_endpoints.insert(s.frontend);
            } else {
                r.chains
                    .insert(chain_name(&s.frontend), (s.frontend, service_rule(s)));
            }
        }
        r
    }

    /// Number of rules in the table.
    pub fn rule_count(&self) -> usize {
        self.chains.len() + BASE_RULES
    }
}

/// Rules outside the per-service chains (see [`base_objects`]).
const BASE_RULES: usize = 4 + 8 + 2;

fn cidr_elements(cidrs: &[IpNet], is_v4: bool) -> Vec<Value> {
    let of_family: Vec<IpNet> = cidrs
        .iter()
        .filter(|c| matches!(c, IpNet::V4(_)) == is_v4)
        .map(IpNet::trunc)
        .collect();
    IpNet::aggregate(&of_family)
        .into_iter()
        .map(|c| json!({"prefix": {"addr": c.addr().to_string(), "len": c.prefix_len()}}))
        .collect()
}

fn obj_ref(kind: &str, name: &str) -> Value {
    json!({ kind: {"family": FAMILY, "table": PROXY_TABLE, "name": name} })
}

fn element(set: &str, elems: Vec<Value>) -> Value {
    json!({"element": {"family": FAMILY, "table": PROXY_TABLE, "name": set, "elem": elems}})
}

fn rule(chain: &str, expr: Value) -> Value {
    json!({"rule": {"family": FAMILY, "table": PROXY_TABLE, "chain": chain, "expr": expr}})
}

fn daddr_key(is_v4: bool) -> Value {
    let proto = if is_v4 { "ip" } else { "ip6" };
    json!({"concat": [
        {"payload": {"protocol": proto, "field": "daddr"}},
        {"meta": {"key": "l4proto"}},
        {"payload": {"protocol": "th", "field": "dport"}}
    ]})
}

/// Sets, maps, base chains and their rules (no elements, no service chain).
pub fn base_objects() -> Vec<Value> {
    let mut objs = Vec::new();
    for is_v4 in [true, false] {
        let addr = if is_v4 { "ipv4_addr" } else { "ipv6_addr" };
        objs.push(json!({"map": {
            "family": FAMILY, "table": PROXY_TABLE, "name": services_map(is_v4),
            "type": [addr, "inet_proto", "inet_service"], "map": "verdict"
        }}));
        objs.push(json!({"set": {
            "family": FAMILY, "table": PROXY_TABLE, "name": no_endpoints_set(is_v4),
            "type": [addr, "inet_proto", "inet_service"]
        }}));
        objs.push(json!({"set": {
            "family": FAMILY, "table": PROXY_TABLE, "name": cidrs_set(is_v4),
            "type": addr, "flags": ["interval"]
        }}));
    }
    for (name, ty, hook, prio) in [
        ("nat_prerouting", "nat", "prerouting", DSTNAT_PRIORITY),
        ("nat_output", "nat", "output", DSTNAT_PRIORITY),
        ("filter_forward", "filter", "forward", FILTER_PRIORITY),
        ("filter_output", "filter", "output", FILTER_PRIORITY),
    ] {
        objs.push(json!({"chain": {
            "family": FAMILY, "table": PROXY_TABLE, "name": name,
            "type": ty, "hook": hook, "prio": prio, "policy": "accept"
        }}));
    }
    objs.push(json!({"chain": {"family": FAMILY, "table": PROXY_TABLE, "name": "refuse"}}));
    // 4 rules: the verdict-map lookups
    for chain in ["nat_prerouting", "nat_output"] {
        for is_v4 in [true, false] {
            objs.push(rule(
                chain,
                json!([{"vmap": {"key": daddr_key(is_v4), "data": format!("@{}", services_map(is_v4))}}]),
            ));
        }
    }
    // 8 rules: refuse what no endpoint serves
    let tcp = json!({"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": "tcp"}});
    let reset = json!({"reject": {"type": "tcp reset"}});
    let unreachable = json!({"reject": {"type": "icmpx", "expr": "port-unreachable"}});
    for is_v4 in [true, false] {
        let proto = if is_v4 { "ip" } else { "ip6" };
        let no_ep = json!({"match": {"op": "==", "left": daddr_key(is_v4),
            "right": format!("@{}", no_endpoints_set(is_v4))}});
        let in_cidrs = json!({"match": {"op": "==",
            "left": {"payload": {"protocol": proto, "field": "daddr"}},
            "right": format!("@{}", cidrs_set(is_v4))}});
        for m in [no_ep, in_cidrs] {
            objs.push(rule(
                "refuse",
                json!([m, tcp, {"counter": {"packets": 0, "bytes": 0}}, reset]),
            ));
            objs.push(rule(
                "refuse",
                json!([m, {"counter": {"packets": 0, "bytes": 0}}, unreachable]),
            ));
        }
    }
    // 2 rules: both filter hooks use it
    for chain in ["filter_forward", "filter_output"] {
        objs.push(rule(chain, json!([{"jump": {"target": "refuse"}}])));
    }
    objs
}

/// The whole table for `r`: service chains and rules before the elements
/// that point at them.
pub fn table_objects(r: &Rendered) -> Vec<Value> {
    let mut objs = Vec::with_capacity(2 * r.chains.len() + 24);
    for (name, (_, rule)) in &r.chains {
        objs.push(obj_ref("chain", name));
        objs.push(rule.clone());
    }
    objs.extend(base_objects());
    for is_v4 in [true, false] {
        let vmap: Vec<Value> = r
            .chains
            .iter()
            .filter(|(_, (f, _))| v4(&f.ip) == is_v4)
            .map(|(name, (f, _))| json!([element_key(f), {"goto": {"target": name}}]))
            .collect();
        if !vmap.is_empty() {
            objs.push(element(&services_map(is_v4), vmap));
        }
        let noep: Vec<Value> = r
            .no_endpoints
            .iter()
            .filter(|f| v4(&f.ip) == is_v4)
            .map(element_key)
            .collect();
        if !noep.is_empty() {
            objs.push(element(&no_endpoints_set(is_v4), noep));
        }
        let cidrs = cidr_elements(&r.cidrs, is_v4);
        if !cidrs.is_empty() {
            objs.push(element(&cidrs_set(is_v4), cidrs));
        }
    }
    objs
}

/// The batch that replaces the whole table with `r`.
pub fn full_batch(r: &Rendered) -> Value {
    replace_table_batch(PROXY_TABLE, &table_objects(r))
}

/// The commands that turn table `old` into `new`, or an empty list.
pub fn incremental_commands(old: &Rendered, new: &Rendered) -> Vec<Value> {
    let mut cmds = Vec::new();
    // 1. Frontends leaving the verdict map (removed, or now without
    //    endpoints): element first, then the chain it pointed to.
    for (name, (f, _)) in &old.chains {
        if !new.chains.contains_key(name) {
            cmds.push(json!({"delete": element(&services_map(v4(&f.ip)), vec![element_key(f)])}));
            cmds.push(json!({"delete": obj_ref("chain", name)}));
        }
    }
    for f in old.no_endpoints.difference(&new.no_endpoints) {
        cmds.push(json!({"delete": element(&no_endpoints_set(v4(&f.ip)), vec![element_key(f)])}));
    }
    // 2. Changed endpoints: the chain's single rule is replaced.
    for (name, (f, rule)) in &new.chains {
        match old.chains.get(name) {
            Some((_, old_rule)) if old_rule == rule => {}
            Some(_) => {
                cmds.push(json!({"flush": obj_ref("chain", name)}));
                cmds.push(json!({ "add": rule }));
            }
            None => {
                cmds.push(json!({"add": obj_ref("chain", name)}));
                cmds.push(json!({ "add": rule }));
                cmds.push(json!({"add": element(&services_map(v4(&f.ip)), vec![
                    json!([element_key(f), {"goto": {"target": name}}])
                ])}));
            }
        }
    }
    for f in new.no_endpoints.difference(&old.no_endpoints) {
        cmds.push(json!({"add": element(&no_endpoints_set(v4(&f.ip)), vec![element_key(f)])}));
    }
    // 3. Service CIDRs (rarely change): the sets are refilled.
    if old.cidrs != new.cidrs {
        for is_v4 in [true, false] {
            cmds.push(json!({"flush": obj_ref("set", &cidrs_set(is_v4))}));
            let elems = cidr_elements(&new.cidrs, is_v4);
            if !elems.is_empty() {
                cmds.push(json!({"add": element(&cidrs_set(is_v4), elems)}));
            }
        }
    }
    cmds
}

/// What one [`ProxyDriver::apply`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApplyReport {
    /// The whole table was replaced (else only the difference was sent).
    pub full: bool,
    /// Commands in the batch (0: nothing to do, nothing sent).
    pub commands: usize,
    /// Time spent in `nft`.
    pub took: Duration,
}

#[derive(Default)]
struct Installed {
    table: Option<Rendered>,
    last_full: Option<Instant>,
}

/// Programs [`PROXY_TABLE`] in one namespace.
pub struct ProxyDriver {
    nft: NftDriver,
    /// How often a full replacement repairs drift.
    pub full_every: Duration,
    installed: Mutex<Installed>,
}

impl ProxyDriver {
    /// A driver for `netns` (`None`: the agent's own).
    pub fn new(netns: Option<&Path>, full_every: Duration) -> Self {
        ProxyDriver {
            nft: NftDriver::new(netns),
            full_every,
            installed: Mutex::new(Installed::default()),
        }
    }

    /// Makes the table match `state`: the difference from the last apply,
    /// or the whole table when due or when the difference fails.
    pub async fn apply(&self, state: &ProxyState) -> Result<ApplyReport, NftError> {
        let new = Rendered::of(state);
        let mut inst = self.installed.lock().await;
        let due = inst
            .last_full
            .is_none_or(|t| t.elapsed() >= self.full_every);
        if let (false, Some(old)) = (due, &inst.table) {
            let cmds = incremental_commands(old, &new);
            if cmds.is_empty() {
                return Ok(ApplyReport {
                    full: false,
                    commands: 0,
                    took: Duration::ZERO,
                });
            }
            let n = cmds.len();
            let started = Instant::now();
            match self
                .nft
                .run_batch("update service proxy", &json!({ "nftables": cmds }))
                .await
            {
                Ok(()) => {
                    let took = started.elapsed();
                    debug!(commands = n, ?took, "service proxy updated");
                    inst.table = Some(new);
                    return Ok(ApplyReport {
                        full: false,
                        commands: n,
                        took,
                    });
                }
                Err(e) => {
                    warn!(error = %e, "incremental service proxy update failed; replacing the table")
                }
            }
        }
        let batch = full_batch(&new);
        let n = batch["nftables"].as_array().map_or(0, Vec::len);
        let started = Instant::now();
        inst.table = None;
        self.nft.run_batch("replace service proxy", &batch).await?;
        let took = started.elapsed();
        info!(
            frontends = new.chains.len() + new.no_endpoints.len(),
            without_endpoints = new.no_endpoints.len(),
            rules = new.rule_count(),
            ?took,
            "service proxy table replaced"
        );
        inst.table = Some(new);
        inst.last_full = Some(Instant::now());
        Ok(ApplyReport {
            full: true,
            commands: n,
            took,
        })
    }

    /// Removes the table (clean shutdown); no error if it is absent.
    pub async fn remove(&self) -> Result<(), NftError> {
        let mut inst = self.installed.lock().await;
        *inst = Installed::default();
        self.nft
            .run_batch("remove service proxy", &remove_table_batch(PROXY_TABLE))
            .await
    }

    /// The JSON listing of the table, if it exists.
    pub async fn list(&self) -> Result<Option<Value>, NftError> {
        self.nft.list_table(PROXY_TABLE).await
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::net::SocketAddr;
    use std::process::Command;

    use sdn_tunnel_core::services::Protocol;

    use super::*;

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
    fn chain_names_are_stable_and_distinct() {
        let a = svc("10.102.0.10", Protocol::Tcp, 80, &[], Affinity::None);
        assert_eq!(chain_name(&a.frontend), "svc_0a66000a_tcp_80");
        let b = svc("fd00:102::a", Protocol::Udp, 53, &[], Affinity::None);
        let hex = format!("fd000102{}0a", "00".repeat(11));
        assert_eq!(chain_name(&b.frontend), format!("svc_{hex}_udp_53"));
        assert_ne!(chain_name(&a.frontend), chain_name(&b.frontend));
    }

    #[test]
    fn random_and_affinity_rules() {
        let r = service_rule(&svc(
            "10.102.0.10",
            Protocol::Tcp,
            80,
            &["10.2.1.5:8080", "10.2.2.5:9090"],
            Affinity::None,
        ));
        let dnat = &r["rule"]["expr"][2]["dnat"];
        assert_eq!(dnat["family"], "ip");
        assert_eq!(dnat["addr"]["map"]["key"]["numgen"]["mod"], 2);
        assert_eq!(
            dnat["addr"]["map"]["data"]["set"][1],
            json!([1, {"concat": ["10.2.2.5", 9090]}])
        );
        let r = service_rule(&svc(
            "fd00:102::a",
            Protocol::Udp,
            53,
            &["[fd00:2::1]:53"],
            Affinity::ClientIp {
                timeout_seconds: 10,
            },
        ));
        let dnat = &r["rule"]["expr"][2]["dnat"];
        assert_eq!(dnat["family"], "ip6");
        assert_eq!(
            dnat["addr"]["map"]["key"]["jhash"]["expr"]["payload"]["protocol"],
            "ip6"
        );
        assert_eq!(r["rule"]["expr"][0]["match"]["right"], "udp");
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
        let r = Rendered::of(&s);
        assert_eq!(r.chains.len(), 1);
        assert_eq!(r.no_endpoints.len(), 1);
        let batch = full_batch(&r);
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
        let chain_at = text.find("\"name\":\"svc_0a66000a_tcp_80\"").unwrap();
        let goto_at = text.find("\"goto\"").unwrap();
        assert!(chain_at < goto_at);
    }

    #[test]
    fn an_endpoint_change_touches_one_chain_only() {
        let a = svc(
            "10.102.0.10",
            Protocol::Tcp,
            80,
            &["10.2.1.5:8080"],
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
        assert!(incremental_commands(&old, &old).is_empty());
        let mut a2 = a.clone();
        a2.endpoints.push("10.2.2.5:8080".parse().unwrap());
        let new = Rendered::of(&state(vec![a2, b.clone()]));
        let cmds = incremental_commands(&old, &new);
        assert_eq!(cmds.len(), 2, "{cmds:#?}");
        assert_eq!(cmds[0]["flush"]["chain"]["name"], "svc_0a66000a_tcp_80");
        assert!(cmds[1]["add"]["rule"].is_object());
        // losing every endpoint: out of the vmap, into the reject set
        let mut a3 = a;
        a3.endpoints.clear();
        let new = Rendered::of(&state(vec![a3, b]));
        let cmds = incremental_commands(&old, &new);
        let verbs: Vec<String> = cmds
            .iter()
            .map(|c| {
                let (verb, obj) = c.as_object().unwrap().iter().next().unwrap();
                let kind = obj.as_object().unwrap().keys().next().unwrap();
                format!("{verb} {kind}")
            })
            .collect();
        assert_eq!(verbs, ["delete element", "delete chain", "add element"]);
        assert_eq!(cmds[2]["add"]["element"]["name"], "no_endpoints_v4");
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
        ]);
        let r = d.apply(&s).await.unwrap();
        assert!(r.full);
        let text = ns.nft(&["list", "table", "inet", PROXY_TABLE]);
        assert!(
            text.contains("10.102.0.10 . tcp . 80 : goto svc_0a66000a_tcp_80"),
            "{text}"
        );
        assert!(
            text.contains("numgen random mod 2 map { 0 : 10.2.1.5 . 8080, 1 : 10.2.2.5 . 8080 }"),
            "{text}"
        );
        assert!(text.contains("jhash ip saddr mod 1 seed"), "{text}");
        assert!(
            text.contains("dnat ip6 to numgen random mod 1 map { 0 : fd00:2::1 . 8080 }"),
            "{text}"
        );
        assert!(
            text.contains("elements = { 10.102.0.11 . tcp . 80 }"),
            "{text}"
        );
        // unchanged: nothing sent
        assert_eq!(d.apply(&s).await.unwrap().commands, 0);
        // endpoint change + a service losing its endpoints + a new one
        s.services[0].endpoints.pop();
        s.services[1].endpoints.clear();
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
        assert!(
            text.contains("numgen random mod 1 map { 0 : 10.2.1.5 . 8080 }"),
            "{text}"
        );
        assert!(!text.contains("svc_0a66000a_udp_53"), "{text}");
        assert!(text.contains("10.102.0.10 . udp . 53"), "{text}");
        assert!(
            text.contains("10.102.0.12 . tcp . 443 : goto svc_0a66000c_tcp_443"),
            "{text}"
        );
        // the listing equals what a fresh full apply produces
        let fresh = NftDriver::new(Some(&ns.path()));
        let incremental = normalized(&ns);
        fresh
            .run_batch("full", &full_batch(&Rendered::of(&s)))
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
            .contains("10.2.9.9 . 8080"));
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
    /// services, and checks the kernel holds them all.
    #[tokio::test(flavor = "current_thread")]
    async fn figures_for_1000_services() {
        let Some(ns) = Netns::new("bench") else {
            return;
        };
        let d = ProxyDriver::new(Some(&ns.path()), Duration::from_secs(3600));
        for n in [10usize, 1000] {
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
            s.services[n / 2].endpoints.pop();
            let one = d.apply(&s).await.unwrap();
            assert!(!one.full);
            assert_eq!(one.commands, 2);
            println!(
                "FIGURE nft_full_apply_{n}_services_x10_endpoints = {:.3} s ({} commands, {} rules)",
                r.took.as_secs_f64(),
                r.commands,
                Rendered::of(&s).rule_count()
            );
            println!(
                "FIGURE nft_one_endpoint_change_{n}_services = {:.1} ms",
                one.took.as_secs_f64() * 1000.0
            );
        }
    }
}
