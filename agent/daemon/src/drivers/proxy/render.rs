//! The table as data: [`Rendered`] (what [`PROXY_TABLE`] holds for a
//! [`ProxyState`], in a form that diffs cheaply), the nftables JSON of the
//! whole table ([`full_batch`]) and of the difference between two renders
//! ([`incremental_commands`]), and the UDP/SCTP flows an endpoint change
//! leaves stale ([`stale_flows`]). Pure: nothing here runs `nft`.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;
use sdn_tunnel_core::services::{Affinity, Frontend, ProxyState};
use serde_json::{json, Value};

use crate::drivers::nftables::{self, replace_table_batch, tagged, FAMILY};

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
pub(super) const BASE_RULES: usize = 4 + 8 + 2;

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
        let cidrs = nftables::set_elements(&r.cidrs, is_v4);
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
            let elems = nftables::set_elements(&new.cidrs, is_v4);
            if !elems.is_empty() {
                cmds.push(tagged("add", element(&cidrs_set(is_v4), elems)));
            }
        }
    }
    cmds
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
