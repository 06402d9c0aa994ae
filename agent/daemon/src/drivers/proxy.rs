//! Service proxying in the agent's pod namespace: remote
//! `ClusterIP:port/protocol` → one ready remote endpoint, with nftables.
//!
//! Our own table, [`PROXY_TABLE`] (`inet sdn_tunnel_proxy`), separate from
//! [`super::nftables::POD_TABLE`] so that neither apply replaces the other.
//! Every Service is *data* (map and set elements); the rules are a fixed
//! few plus one small chain per endpoint count in use:
//!
//! ```text
//! table inet sdn_tunnel_proxy {
//!   map services_v4  { type ipv4_addr . inet_proto . inet_service : verdict
//!                      elements = { 10.102.0.10 . tcp . 80 : goto pick_random_2_v4,
//!                                   10.102.0.11 . udp . 53 : goto pick_hash_3_v4, ... } }
//!   map endpoint_addrs_v4 { type ipv4_addr . inet_proto . inet_service . mark : ipv4_addr
//!                      elements = { 10.102.0.10 . tcp . 80 . 0 : 10.2.1.5,
//!                                   10.102.0.10 . tcp . 80 . 1 : 10.2.2.5, ... } }
//!   map service_ports_v4 { type ipv4_addr . inet_proto . inet_service : inet_service
//!                      elements = { 10.102.0.10 . tcp . 80 : 8080, ... } }
//!   map endpoint_ports_v4 { keys of endpoint_addrs_v4 : inet_service
//!                      (only frontends whose endpoints listen on different
//!                      ports, a named targetPort; their chains end in _ports) }
//!   set no_endpoints_v4  { type ipv4_addr . inet_proto . inet_service }
//!   set service_cidrs_v4 { type ipv4_addr; flags interval }
//!   (and the v6 twins)
//!   chain pick_random_2_v4 {
//!     meta mark set numgen random mod 2 counter
//!     dnat ip to ip daddr . meta l4proto . th dport . meta mark map @endpoint_addrs_v4
//!                : ip daddr . meta l4proto . th dport map @service_ports_v4
//!   }
//!   chain pick_hash_3_v4 {     (sessionAffinity: ClientIP)
//!     meta mark set jhash ip saddr mod 3 seed 0x… counter
//!     dnat ip to ip daddr . meta l4proto . th dport . meta mark map @endpoint_addrs_v4
//!                : ip daddr . meta l4proto . th dport map @service_ports_v4
//!   }
//!   chain pick_random_2_v4_ports {   (per-endpoint ports)
//!     meta mark set numgen random mod 2 counter
//!     dnat ip to ip daddr . meta l4proto . th dport . meta mark map @endpoint_addrs_v4
//!                : ip daddr . meta l4proto . th dport . meta mark map @endpoint_ports_v4
//!   }
//!   chain nat_prerouting { type nat hook prerouting priority dstnat
//!     ip daddr . meta l4proto . th dport vmap @services_v4 ; ip6 twin }
//!   chain nat_output     { type nat hook output priority dstnat; same }
//!   chain refuse { no_endpoints / service_cidrs → reject with tcp reset | icmpx port-unreachable }
//!   chain filter_forward { type filter hook forward priority filter; jump refuse }
//!   chain filter_output  { type filter hook output priority filter; jump refuse }
//! }
//! ```
//!
//! Per packet: one verdict-map lookup whatever the number of services, two
//! rules in a pick chain, two map lookups for the endpoint. A frontend's
//! port is one element when its endpoints share it (the common case), so
//! 10 000 services × 10 endpoints are 110 000 elements, not 200 000: the
//! full table loads in half the time. Only the first
//! packet of a connection traverses nat chains; conntrack applies the
//! binding to the rest and reverses it for replies. The packet mark is
//! used as scratch for the endpoint index (libnftables 1.0 cannot type a
//! map key with a bare `numgen`); it is set on the first packet only, in
//! the agent's own namespace, and is scrubbed when the packet leaves it.
//! After prerouting DNAT the destination is a remote pod IP, which the
//! pod's `dev wg0` routes send into the tunnel. A frontend with no ready
//! endpoint is not in the verdict map: its packets keep the ClusterIP, are
//! routed towards `wg0`, and the forward filter refuses them (TCP reset /
//! ICMP port unreachable) — as it does any other port of a remote service
//! CIDR, which no tunnel peer would take.
//!
//! Why elements and not a chain per Service (the first version of this
//! driver, and kube-proxy's nftables mode): each chain's rule needs an
//! anonymous map, the kernel names anonymous sets by scanning the table's
//! sets (quadratic), and `nft` reloads every chain and rule on each call.
//! With elements, an endpoint change is a few element commands, and the
//! table holds a handful of rules whatever the number of Services.
//!
//! When an endpoint leaves a UDP or SCTP frontend, the conntrack entries
//! that still bind clients to it are deleted (ctnetlink, [`conntrack`]),
//! so a client that keeps its source port moves to a current endpoint
//! instead of talking to the old one until its entry times out. TCP
//! connections are left to end by themselves.
//!
//! Updates: the first apply, and then every [`ProxyDriver::full_every`],
//! replaces the whole table in one transaction (drift repair; pick chains
//! no longer used go then). In between, an apply sends only the
//! difference from what it last installed — map and set elements deleted
//! or added, a pick chain added when a new endpoint count appears — also as
//! one transaction. If that fails (someone deleted our table, say), the
//! driver falls back to a full replacement at once.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use ipnet::IpNet;
use sdn_tunnel_core::services::{Affinity, Frontend, ProxyState};
use serde_json::{json, Value};
use tokio::sync::Mutex;
use tracing::{debug, info, warn};

use super::nftables::{
    remove_table_batch, replace_table_batch, tagged, NftDriver, NftError, FAMILY,
};

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

fn addrs_map(is_v4: bool) -> String {
    format!("endpoint_addrs_{}", suffix(is_v4))
}

fn ports_map(is_v4: bool) -> String {
    format!("endpoint_ports_{}", suffix(is_v4))
}

fn service_ports_map(is_v4: bool) -> String {
    format!("service_ports_{}", suffix(is_v4))
}

fn no_endpoints_set(is_v4: bool) -> String {
    format!("no_endpoints_{}", suffix(is_v4))
}

fn cidrs_set(is_v4: bool) -> String {
    format!("service_cidrs_{}", suffix(is_v4))
}

/// How a frontend picks its endpoint: the chain its verdict-map element
/// jumps to. Shared by every frontend of the same family, mode and count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Pick {
    pub v4: bool,
    /// `sessionAffinity: ClientIP` (hash of the client address) or random.
    pub hash: bool,
    /// Number of endpoints.
    pub n: u32,
    /// The endpoints listen on different ports (a named `targetPort` that
    /// resolves differently per pod): the port comes per endpoint from
    /// `endpoint_ports`. Otherwise (nearly always) one port per frontend,
    /// from `service_ports`, which holds a tenth of the elements.
    pub slot_ports: bool,
}

impl Pick {
    /// `pick_random_<n>_v4`, `pick_hash_<n>_v6`, ... (`..._ports` with
    /// per-endpoint ports).
    pub fn chain(&self) -> String {
        let mode = if self.hash { "hash" } else { "random" };
        let ports = if self.slot_ports { "_ports" } else { "" };
        format!("pick_{mode}_{}_{}{ports}", self.n, suffix(self.v4))
    }

    /// The chain's rules.
    pub fn rules(&self) -> Vec<Value> {
        let family = if self.v4 { "ip" } else { "ip6" };
        let index = if self.hash {
            // A fixed seed: a full resync keeps every client where it was.
            json!({"jhash": {
                "mod": self.n, "seed": 0x5d7e_11a5_u32,
                "expr": {"payload": {"protocol": family, "field": "saddr"}}
            }})
        } else {
            json!({"numgen": {"mode": "random", "mod": self.n, "offset": 0}})
        };
        let key = json!({"concat": [
            {"payload": {"protocol": family, "field": "daddr"}},
            {"meta": {"key": "l4proto"}},
            {"payload": {"protocol": "th", "field": "dport"}},
            {"meta": {"key": "mark"}}
        ]});
        let port = if self.slot_ports {
            json!({"map": {"key": key, "data": format!("@{}", ports_map(self.v4))}})
        } else {
            json!({"map": {"key": {"concat": [
                {"payload": {"protocol": family, "field": "daddr"}},
                {"meta": {"key": "l4proto"}},
                {"payload": {"protocol": "th", "field": "dport"}}
            ]}, "data": format!("@{}", service_ports_map(self.v4))}})
        };
        let chain = self.chain();
        vec![
            rule(
                &chain,
                json!([
                    {"mangle": {"key": {"meta": {"key": "mark"}}, "value": index}},
                    {"counter": {"packets": 0, "bytes": 0}}
                ]),
            ),
            rule(
                &chain,
                json!([{"dnat": {
                    "family": family,
                    "addr": {"map": {"key": key, "data": format!("@{}", addrs_map(self.v4))}},
                    "port": port
                }}]),
            ),
        ]
    }
}

/// The key of `f` in the verdict map and the no-endpoint sets.
fn element_key(f: &Frontend) -> Value {
    json!({"concat": [f.ip.to_string(), f.protocol.as_str(), f.port]})
}

/// The key of endpoint `i` of `f` in the endpoints map.
fn endpoint_key(f: &Frontend, i: u32) -> Value {
    json!({"concat": [f.ip.to_string(), f.protocol.as_str(), f.port, i]})
}

/// `[key, address]` of the endpoint-addresses map.
fn addr_element(key: Value, e: &SocketAddr) -> Value {
    Value::Array(vec![key, Value::String(e.ip().to_string())])
}

/// `[key, port]` of a ports map.
fn port_element(key: Value, port: u16) -> Value {
    Value::Array(vec![key, Value::from(port)])
}

/// What the table holds, in a form that diffs cheaply.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Rendered {
    /// Frontends with endpoints, and how each picks one.
    pub frontends: BTreeMap<Frontend, Pick>,
    /// (frontend, index) → endpoint.
    pub endpoints: BTreeMap<(Frontend, u32), SocketAddr>,
    /// The one port of the endpoints of a frontend, where they share it
    /// (see [`Pick::slot_ports`]).
    pub ports: BTreeMap<Frontend, u16>,
    /// Frontends without endpoints.
    pub no_endpoints: BTreeSet<Frontend>,
    /// Remote service CIDRs.
    pub cidrs: Vec<IpNet>,
    /// Pick chains present in the table (a superset of those in use
    /// between full replacements).
    pub picks: BTreeSet<Pick>,
}

impl Rendered {
    /// The table content for `state`.
    pub fn of(state: &ProxyState) -> Rendered {
        let mut r = Rendered {
            cidrs: state.service_cidrs.clone(),
            ..Rendered::default()
        };
        for s in &state.services {
            let f = s.frontend;
            let Ok(n) = u32::try_from(s.endpoints.len()) else {
                continue;
            };
            if n == 0 {
                r.no_endpoints.insert(f);
                continue;
            }
            let first_port = s.endpoints.first().map(SocketAddr::port);
            let shared_port = first_port.filter(|p| s.endpoints.iter().all(|e| e.port() == *p));
            let pick = Pick {
                v4: v4(&f.ip),
                hash: matches!(s.affinity, Affinity::ClientIp { .. }),
                n,
                slot_ports: shared_port.is_none(),
            };
            if let Some(port) = shared_port {
                r.ports.insert(f, port);
            }
            r.frontends.insert(f, pick);
            r.picks.insert(pick);
            for (i, e) in (0..n).zip(&s.endpoints) {
                r.endpoints.insert((f, i), *e);
            }
        }
        r
    }

    /// Whether the port of `f`'s endpoints comes per endpoint.
    fn slot_ports(&self, f: &Frontend) -> bool {
        self.frontends.get(f).is_some_and(|p| p.slot_ports)
    }

    /// Number of rules in the table.
    pub fn rule_count(&self) -> usize {
        2 * self.picks.len() + BASE_RULES
    }
}

/// Rules outside the pick chains (see [`base_objects`]).
const BASE_RULES: usize = 4 + 8 + 2;

fn obj_ref(kind: &str, name: &str) -> Value {
    json!({ kind: {"family": FAMILY, "table": PROXY_TABLE, "name": name} })
}

fn element(set: &str, elems: Vec<Value>) -> Value {
    let mut body = obj_ref("element", set);
    if let Some(Value::Object(inner)) = body.get_mut("element") {
        inner.insert("elem".to_owned(), Value::Array(elems));
    }
    body
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

/// Sets, maps, base chains and their rules (no elements, no pick chain).
pub fn base_objects() -> Vec<Value> {
    let mut objs = Vec::new();
    for is_v4 in [true, false] {
        let addr = if is_v4 { "ipv4_addr" } else { "ipv6_addr" };
        objs.push(json!({"map": {
            "family": FAMILY, "table": PROXY_TABLE, "name": services_map(is_v4),
            "type": [addr, "inet_proto", "inet_service"], "map": "verdict"
        }}));
        // (two maps, not one of `addr . port`: libnftables 1.0's JSON
        // cannot declare a map with concatenated data)
        for (name, data) in [(addrs_map(is_v4), addr), (ports_map(is_v4), "inet_service")] {
            objs.push(json!({"map": {
                "family": FAMILY, "table": PROXY_TABLE, "name": name,
                "type": [addr, "inet_proto", "inet_service", "mark"], "map": data
            }}));
        }
        objs.push(json!({"map": {
            "family": FAMILY, "table": PROXY_TABLE, "name": service_ports_map(is_v4),
            "type": [addr, "inet_proto", "inet_service"], "map": "inet_service"
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

fn pick_objects(p: &Pick) -> Vec<Value> {
    let mut objs = vec![obj_ref("chain", &p.chain())];
    objs.extend(p.rules());
    objs
}

fn vmap_element(f: &Frontend, p: &Pick) -> Value {
    Value::Array(vec![element_key(f), json!({"goto": {"target": p.chain()}})])
}

/// The whole table for `r`: base objects and pick chains before the
/// elements that point at them.
pub fn table_objects(r: &Rendered) -> Vec<Value> {
    let mut objs = base_objects();
    for p in &r.picks {
        objs.extend(pick_objects(p));
    }
    for is_v4 in [true, false] {
        let vmap: Vec<Value> = r
            .frontends
            .iter()
            .filter(|(f, _)| v4(&f.ip) == is_v4)
            .map(|(f, p)| vmap_element(f, p))
            .collect();
        if !vmap.is_empty() {
            objs.push(element(&services_map(is_v4), vmap));
        }
        let slots: Vec<(&(Frontend, u32), &SocketAddr)> = r
            .endpoints
            .iter()
            .filter(|((f, _), _)| v4(&f.ip) == is_v4)
            .collect();
        if !slots.is_empty() {
            let addrs = slots
                .iter()
                .map(|((f, i), e)| addr_element(endpoint_key(f, *i), e))
                .collect();
            objs.push(element(&addrs_map(is_v4), addrs));
            let ports: Vec<Value> = slots
                .iter()
                .filter(|((f, _), _)| r.slot_ports(f))
                .map(|((f, i), e)| port_element(endpoint_key(f, *i), e.port()))
                .collect();
            if !ports.is_empty() {
                objs.push(element(&ports_map(is_v4), ports));
            }
        }
        let service_ports: Vec<Value> = r
            .ports
            .iter()
            .filter(|(f, _)| v4(&f.ip) == is_v4)
            .map(|(f, port)| port_element(element_key(f), *port))
            .collect();
        if !service_ports.is_empty() {
            objs.push(element(&service_ports_map(is_v4), service_ports));
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
        let cidrs = super::nftables::set_elements(&r.cidrs, is_v4);
        if !cidrs.is_empty() {
            objs.push(element(&cidrs_set(is_v4), cidrs));
        }
    }
    objs
}

/// The batch that replaces the whole table with `r`.
pub fn full_batch(r: &Rendered) -> Value {
    replace_table_batch(PROXY_TABLE, table_objects(r))
}

/// Groups single-element commands on the same set into one command.
fn grouped(verb: &str, elems: Vec<(String, Value)>) -> Vec<Value> {
    let mut by_set: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for (set, e) in elems {
        by_set.entry(set).or_default().push(e);
    }
    by_set
        .into_iter()
        .map(|(set, elems)| tagged(verb, element(&set, elems)))
        .collect()
}

/// The commands that turn table `old` into `new` (whose `picks` are
/// extended to keep `old`'s: chains are only dropped by a full
/// replacement), or an empty list.
pub fn incremental_commands(old: &Rendered, new: &mut Rendered) -> Vec<Value> {
    let mut cmds = Vec::new();
    // 1. Pick chains that appear.
    for p in new.picks.difference(&old.picks) {
        for o in pick_objects(p) {
            cmds.push(tagged("add", o));
        }
    }
    new.picks.extend(old.picks.iter().copied());
    // 2. Deletions: verdict-map elements of frontends gone or picking
    //    differently, endpoint slots gone or changed, no-endpoint entries gone.
    let mut del = Vec::new();
    let mut add = Vec::new();
    for (f, p) in &old.frontends {
        if new.frontends.get(f) != Some(p) {
            del.push((services_map(v4(&f.ip)), element_key(f)));
        }
    }
    for ((f, i), e) in &old.endpoints {
        let changed = new.endpoints.get(&(*f, *i)) != Some(e);
        if changed {
            del.push((addrs_map(v4(&f.ip)), endpoint_key(f, *i)));
        }
        // A slot's port is in the table while its frontend's pick says so.
        if old.slot_ports(f) && (changed || !new.slot_ports(f)) {
            del.push((ports_map(v4(&f.ip)), endpoint_key(f, *i)));
        }
    }
    for (f, port) in &old.ports {
        if new.ports.get(f) != Some(port) {
            del.push((service_ports_map(v4(&f.ip)), element_key(f)));
        }
    }
    for f in old.no_endpoints.difference(&new.no_endpoints) {
        del.push((no_endpoints_set(v4(&f.ip)), element_key(f)));
    }
    // 3. Additions, in the same transaction: nothing is ever half-done.
    for ((f, i), e) in &new.endpoints {
        let changed = old.endpoints.get(&(*f, *i)) != Some(e);
        if changed {
            add.push((addrs_map(v4(&f.ip)), addr_element(endpoint_key(f, *i), e)));
        }
        if new.slot_ports(f) && (changed || !old.slot_ports(f)) {
            add.push((
                ports_map(v4(&f.ip)),
                port_element(endpoint_key(f, *i), e.port()),
            ));
        }
    }
    for (f, port) in &new.ports {
        if old.ports.get(f) != Some(port) {
            add.push((
                service_ports_map(v4(&f.ip)),
                port_element(element_key(f), *port),
            ));
        }
    }
    for (f, p) in &new.frontends {
        if old.frontends.get(f) != Some(p) {
            add.push((services_map(v4(&f.ip)), vmap_element(f, p)));
        }
    }
    for f in new.no_endpoints.difference(&old.no_endpoints) {
        add.push((no_endpoints_set(v4(&f.ip)), element_key(f)));
    }
    cmds.extend(grouped("delete", del));
    cmds.extend(grouped("add", add));
    // 4. Service CIDRs (rarely change): the sets are refilled.
    if old.cidrs != new.cidrs {
        for is_v4 in [true, false] {
            cmds.push(tagged("flush", obj_ref("set", &cidrs_set(is_v4))));
            let elems = super::nftables::set_elements(&new.cidrs, is_v4);
            if !elems.is_empty() {
                cmds.push(tagged("add", element(&cidrs_set(is_v4), elems)));
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
    netns: Option<std::path::PathBuf>,
    /// How often a full replacement repairs drift.
    pub full_every: Duration,
    installed: Mutex<Installed>,
}

impl ProxyDriver {
    /// A driver for `netns` (`None`: the agent's own).
    pub fn new(netns: Option<&Path>, full_every: Duration) -> Self {
        ProxyDriver {
            nft: NftDriver::new(netns),
            netns: netns.map(Path::to_path_buf),
            full_every,
            installed: Mutex::new(Installed::default()),
        }
    }

    /// Makes the table match `state`: the difference from the last apply,
    /// or the whole table when due or when the difference fails.
    pub async fn apply(&self, state: &ProxyState) -> Result<ApplyReport, NftError> {
        let mut new = Rendered::of(state);
        let mut inst = self.installed.lock().await;
        let due = inst
            .last_full
            .is_none_or(|t| t.elapsed() >= self.full_every);
        if let (false, Some(old)) = (due, &inst.table) {
            let cmds = incremental_commands(old, &mut new);
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
                    let stale = stale_flows(old, &new);
                    inst.table = Some(new);
                    self.forget(stale).await;
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
        // (an attempted difference may have widened `picks`: start afresh)
        let new = Rendered::of(state);
        let batch = full_batch(&new);
        let n = batch["nftables"].as_array().map_or(0, Vec::len);
        let started = Instant::now();
        let stale = inst
            .table
            .as_ref()
            .map(|old| stale_flows(old, &new))
            .unwrap_or_default();
        inst.table = None;
        self.nft.run_batch("replace service proxy", &batch).await?;
        let took = started.elapsed();
        info!(
            frontends = new.frontends.len() + new.no_endpoints.len(),
            endpoints = new.endpoints.len(),
            without_endpoints = new.no_endpoints.len(),
            rules = new.rule_count(),
            ?took,
            "service proxy table replaced"
        );
        inst.table = Some(new);
        inst.last_full = Some(Instant::now());
        self.forget(stale).await;
        Ok(ApplyReport {
            full: true,
            commands: n,
            took,
        })
    }

    /// Deletes the conntrack entries that still bind clients to endpoints
    /// that left (UDP, SCTP), so their next packet picks a current one.
    /// Best effort: a failure is logged, the table is right regardless.
    async fn forget(&self, stale: Vec<(Frontend, SocketAddr)>) {
        if stale.is_empty() {
            return;
        }
        let pairs = stale.len();
        match super::netns::in_netns_async(self.netns.as_deref(), move || {
            conntrack::delete_flows(&stale)
        })
        .await
        {
            Ok(Ok(deleted)) => {
                debug!(
                    pairs,
                    deleted, "conntrack entries of removed endpoints deleted"
                )
            }
            Ok(Err(e)) => warn!(error = %e, "cannot delete conntrack entries of removed endpoints"),
            Err(e) => warn!(error = %e, "cannot enter the namespace to delete conntrack entries"),
        }
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

/// Connections (UDP and SCTP) still bound to endpoints that left their
/// frontend: `(frontend, endpoint)` pairs from `old` to `new`. TCP needs
/// nothing: a removed endpoint's connections end with it (RST or timeout),
/// while a UDP "connection" would stick to it for as long as the client
/// keeps its source port.
pub fn stale_flows(old: &Rendered, new: &Rendered) -> Vec<(Frontend, SocketAddr)> {
    let mut out = BTreeSet::new();
    for ((f, _), e) in &old.endpoints {
        if f.protocol == sdn_tunnel_core::services::Protocol::Tcp {
            continue;
        }
        let still = new
            .frontends
            .get(f)
            .is_some_and(|p| (0..p.n).any(|i| new.endpoints.get(&(*f, i)) == Some(e)));
        if !still {
            out.insert((*f, *e));
        }
    }
    out.into_iter().collect()
}

/// Deleting conntrack entries over ctnetlink (`NETLINK_NETFILTER`): a dump,
/// a filter, and one delete per entry. Plain netlink messages, built and
/// parsed here; see `linux/netfilter/nfnetlink_conntrack.h`.
pub mod conntrack {
    use std::io;
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
    use std::os::fd::{AsRawFd, OwnedFd};

    use nix::sys::socket::{
        bind, recv, send, setsockopt, socket, sockopt, AddressFamily, MsgFlags, NetlinkAddr,
        SockFlag, SockProtocol, SockType,
    };
    use nix::sys::time::TimeVal;

    use sdn_tunnel_core::services::{Frontend, Protocol};

    const NFNL_SUBSYS_CTNETLINK: u16 = 1;
    const IPCTNL_MSG_CT_NEW: u16 = 0;
    const IPCTNL_MSG_CT_GET: u16 = 1;
    const IPCTNL_MSG_CT_DELETE: u16 = 2;
    const NLMSG_ERROR: u16 = 2;
    const NLMSG_DONE: u16 = 3;
    const NLM_F_REQUEST: u16 = 1;
    const NLM_F_ACK: u16 = 4;
    const NLM_F_DUMP: u16 = 0x300;
    const CTA_TUPLE_ORIG: u16 = 1;
    const CTA_TUPLE_REPLY: u16 = 2;
    const CTA_TUPLE_IP: u16 = 1;
    const CTA_TUPLE_PROTO: u16 = 2;
    const CTA_PROTO_NUM: u16 = 1;
    const CTA_PROTO_SRC_PORT: u16 = 2;
    const CTA_PROTO_DST_PORT: u16 = 3;
    const NLA_TYPE_MASK: u16 = 0x3fff;

    /// One direction of a conntrack entry.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
    pub struct Tuple {
        pub src: Option<IpAddr>,
        pub dst: Option<IpAddr>,
        pub proto: u8,
        pub sport: u16,
        pub dport: u16,
    }

    fn align4(n: usize) -> usize {
        (n + 3) & !3
    }

    /// The attributes in `buf`: (type without flags, payload).
    pub fn attrs(mut buf: &[u8]) -> Vec<(u16, &[u8])> {
        let mut out = Vec::new();
        while buf.len() >= 4 {
            let len = usize::from(u16::from_ne_bytes([buf[0], buf[1]]));
            let ty = u16::from_ne_bytes([buf[2], buf[3]]) & NLA_TYPE_MASK;
            if len < 4 || len > buf.len() {
                break;
            }
            out.push((ty, &buf[4..len]));
            buf = &buf[align4(len).min(buf.len())..];
        }
        out
    }

    fn ip(payload: &[u8]) -> Option<IpAddr> {
        match payload.len() {
            4 => Some(IpAddr::V4(Ipv4Addr::new(
                payload[0], payload[1], payload[2], payload[3],
            ))),
            16 => {
                let mut a = [0u8; 16];
                a.copy_from_slice(payload);
                Some(IpAddr::V6(Ipv6Addr::from(a)))
            }
            _ => None,
        }
    }

    fn be16(p: &[u8]) -> u16 {
        if p.len() >= 2 {
            u16::from_be_bytes([p[0], p[1]])
        } else {
            0
        }
    }

    /// Parses the payload of a `CTA_TUPLE_*` attribute.
    pub fn tuple(payload: &[u8]) -> Tuple {
        let mut t = Tuple::default();
        for (ty, p) in attrs(payload) {
            match ty {
                CTA_TUPLE_IP => {
                    for (k, v) in attrs(p) {
                        match k {
                            1 | 3 => t.src = ip(v),
                            2 | 4 => t.dst = ip(v),
                            _ => {}
                        }
                    }
                }
                CTA_TUPLE_PROTO => {
                    for (k, v) in attrs(p) {
                        match k {
                            CTA_PROTO_NUM => t.proto = v.first().copied().unwrap_or(0),
                            CTA_PROTO_SRC_PORT => t.sport = be16(v),
                            CTA_PROTO_DST_PORT => t.dport = be16(v),
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        t
    }

    fn proto_num(p: Protocol) -> u8 {
        match p {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
            Protocol::Sctp => 132,
        }
    }

    /// Whether an entry (original, reply) is a connection of `f` that was
    /// DNATed to `e`.
    pub fn matches(orig: &Tuple, reply: &Tuple, f: &Frontend, e: &SocketAddr) -> bool {
        orig.proto == proto_num(f.protocol)
            && orig.dst == Some(f.ip)
            && orig.dport == f.port
            && reply.src == Some(e.ip())
            && reply.sport == e.port()
    }

    fn message(ty: u16, flags: u16, family: u8, seq: u32, attrs: &[u8]) -> Vec<u8> {
        let len = 16 + 4 + attrs.len();
        let mut m = Vec::with_capacity(len);
        m.extend_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_ne_bytes());
        m.extend_from_slice(&((NFNL_SUBSYS_CTNETLINK << 8) | ty).to_ne_bytes());
        m.extend_from_slice(&flags.to_ne_bytes());
        m.extend_from_slice(&seq.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(&[family, 0, 0, 0]);
        m.extend_from_slice(attrs);
        m
    }

    fn open() -> io::Result<OwnedFd> {
        let fd = socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkNetFilter,
        )?;
        bind(fd.as_raw_fd(), &NetlinkAddr::new(0, 0))?;
        setsockopt(&fd, sockopt::ReceiveTimeout, &TimeVal::new(2, 0))?;
        Ok(fd)
    }

    /// Reads replies to request `seq` until DONE (dump) or the ACK; calls
    /// `each` with every message's type and payload (after `nfgenmsg`).
    fn read_replies(fd: &OwnedFd, seq: u32, mut each: impl FnMut(u16, &[u8])) -> io::Result<()> {
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty())?;
            let mut rest = &buf[..n];
            while rest.len() >= 16 {
                let len = u32::from_ne_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
                let ty = u16::from_ne_bytes([rest[4], rest[5]]);
                let mseq = u32::from_ne_bytes([rest[8], rest[9], rest[10], rest[11]]);
                if len < 16 || len > rest.len() {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "bad netlink length",
                    ));
                }
                let body = &rest[16..len];
                rest = &rest[align4(len).min(rest.len())..];
                if mseq != seq {
                    continue;
                }
                match ty {
                    NLMSG_DONE => return Ok(()),
                    NLMSG_ERROR => {
                        let code = body
                            .get(..4)
                            .map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
                            .unwrap_or(0);
                        return if code == 0 {
                            Ok(())
                        } else {
                            Err(io::Error::from_raw_os_error(-code))
                        };
                    }
                    _ => each(ty & 0xff, body.get(4..).unwrap_or_default()),
                }
            }
        }
    }

    /// Deletes the conntrack entries of every `(frontend, endpoint)` pair,
    /// in the calling thread's network namespace. Returns how many went.
    pub fn delete_flows(pairs: &[(Frontend, SocketAddr)]) -> io::Result<usize> {
        if pairs.is_empty() {
            return Ok(0);
        }
        let fd = open()?;
        let mut victims: Vec<(u8, Vec<u8>)> = Vec::new();
        let mut seq = 1;
        for (family, is_v4) in [(libc_af_inet(), true), (libc_af_inet6(), false)] {
            if !pairs.iter().any(|(f, _)| f.ip.is_ipv4() == is_v4) {
                continue;
            }
            seq += 1;
            let req = message(
                IPCTNL_MSG_CT_GET,
                NLM_F_REQUEST | NLM_F_DUMP,
                family,
                seq,
                &[],
            );
            send(fd.as_raw_fd(), &req, MsgFlags::empty())?;
            read_replies(&fd, seq, |ty, payload| {
                if ty != IPCTNL_MSG_CT_NEW {
                    return;
                }
                let mut orig_raw = None;
                let (mut orig, mut reply) = (Tuple::default(), Tuple::default());
                let mut at = 0;
                for (t, p) in attrs(payload) {
                    // keep the raw original tuple attribute for the delete
                    let len = 4 + p.len();
                    if t == CTA_TUPLE_ORIG {
                        orig = tuple(p);
                        orig_raw = payload.get(at..at + len).map(<[u8]>::to_vec);
                    } else if t == CTA_TUPLE_REPLY {
                        reply = tuple(p);
                    }
                    at += align4(len);
                }
                if let Some(raw) = orig_raw {
                    if pairs.iter().any(|(f, e)| matches(&orig, &reply, f, e)) {
                        victims.push((family, raw));
                    }
                }
            })?;
        }
        let mut deleted = 0;
        for (family, raw) in victims {
            seq += 1;
            let req = message(
                IPCTNL_MSG_CT_DELETE,
                NLM_F_REQUEST | NLM_F_ACK,
                family,
                seq,
                &raw,
            );
            send(fd.as_raw_fd(), &req, MsgFlags::empty())?;
            match read_replies(&fd, seq, |_, _| {}) {
                Ok(()) => deleted += 1,
                // gone meanwhile (timed out, or deleted by someone else)
                Err(e) if e.raw_os_error() == Some(2) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(deleted)
    }

    fn libc_af_inet() -> u8 {
        2
    }

    fn libc_af_inet6() -> u8 {
        10
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::net::SocketAddr;
    use std::process::Command;

    use proptest::prelude::*;
    use sdn_tunnel_core::services::{Protocol, ProxiedService};

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

    fn nla(ty: u16, payload: &[u8]) -> Vec<u8> {
        let len = u16::try_from(4 + payload.len()).unwrap();
        let mut v = len.to_ne_bytes().to_vec();
        v.extend_from_slice(&ty.to_ne_bytes());
        v.extend_from_slice(payload);
        while v.len() % 4 != 0 {
            v.push(0);
        }
        v
    }

    fn ct_tuple(src: [u8; 4], dst: [u8; 4], proto: u8, sport: u16, dport: u16) -> Vec<u8> {
        let nested = 0x8000;
        let ip = [nla(1, &src), nla(2, &dst)].concat();
        let pr = [
            nla(1, &[proto]),
            nla(2, &sport.to_be_bytes()),
            nla(3, &dport.to_be_bytes()),
        ]
        .concat();
        [nla(1 | nested, &ip), nla(2 | nested, &pr)].concat()
    }

    #[test]
    fn conntrack_tuples_parse_and_match_the_dnat_of_a_frontend() {
        // client 10.1.1.7:40000 -> 10.102.0.10:53, DNATed to 10.2.1.5:5353
        let orig = ct_tuple([10, 1, 1, 7], [10, 102, 0, 10], 17, 40000, 53);
        let reply = ct_tuple([10, 2, 1, 5], [10, 1, 1, 7], 17, 5353, 40000);
        let entry = [nla(1 | 0x8000, &orig), nla(2 | 0x8000, &reply)].concat();
        let attrs = conntrack::attrs(&entry);
        assert_eq!(attrs.len(), 2);
        let o = conntrack::tuple(attrs[0].1);
        let r = conntrack::tuple(attrs[1].1);
        assert_eq!(o.dst, Some("10.102.0.10".parse().unwrap()));
        assert_eq!((o.proto, o.sport, o.dport), (17, 40000, 53));
        assert_eq!(r.src, Some("10.2.1.5".parse().unwrap()));
        let f = Frontend {
            ip: "10.102.0.10".parse().unwrap(),
            protocol: Protocol::Udp,
            port: 53,
        };
        assert!(conntrack::matches(
            &o,
            &r,
            &f,
            &"10.2.1.5:5353".parse().unwrap()
        ));
        assert!(!conntrack::matches(
            &o,
            &r,
            &f,
            &"10.2.1.6:5353".parse().unwrap()
        ));
        let tcp = Frontend {
            protocol: Protocol::Tcp,
            ..f
        };
        assert!(!conntrack::matches(
            &o,
            &r,
            &tcp,
            &"10.2.1.5:5353".parse().unwrap()
        ));
        // truncated input: no panic, nothing parsed past the damage
        assert!(conntrack::attrs(&entry[..3]).is_empty());
        assert_eq!(conntrack::attrs(&entry[..entry.len() - 4]).len(), 1);
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
                        .map(|(e, other)| {
                            format!("10.2.1.{e}:{}", if *other { 9090 } else { 8080 })
                        })
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
}
