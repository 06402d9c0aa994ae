//! DNS records of the `cluster.<name>` zones and of the merged zone
//! (`cluster.all` by default), from the declared clusters, each cluster's
//! Services and EndpointSlices, and the health of the tunnels.
//!
//! Pure: the caller passes plain copies of what the watches hold and `now`.
//!
//! # Zones
//!
//! - For every declared cluster (local included) its zone
//!   ([`sdn_tunnel_api::TunnelClusterSpec::dns_zone`], default `cluster.<name>`) answers
//!   `<svc>.<ns>.svc.<zone>` with the Service's ClusterIP (A or AAAA), or for
//!   a headless Service with the IPs of its ready, not terminating
//!   endpoints (and `<hostname>.<svc>.<ns>.svc.<zone>` per endpoint);
//!   `_<port>._<proto>.<svc>.<ns>.svc.<zone>` answers SRV for every named
//!   port. A cluster zone is served from the last known state of that
//!   cluster, whatever the state of its tunnel.
//! - The merged zone answers the same names with the union over the local
//!   cluster and every remote cluster whose tunnel works
//!   ([`tunnel_health`]) and which has the Service.
//!
//! # Working tunnel
//!
//! A remote cluster `C` has a working tunnel at `now` when **both**:
//!
//! 1. some node of the local cluster wrote its `TunnelPeer` status at most
//!    `max_status_age` ago, and that status has a peer of `C` in state
//!    `Connected` whose handshake, aged by the age of the status, is at most
//!    [`HANDSHAKE_FRESH_SECS`] old; and
//! 2. some node of `C` (its `TunnelPeer` as read through `C`'s API) wrote its
//!    status at most `max_status_age` ago, and that status has a peer of the
//!    local cluster in state `Connected`.
//!
//! (1) is the local view of the tunnel. (2) makes the answer follow the
//! remote side within `max_status_age`: agents that die, or a cluster whose
//! API cannot be reached any more (its statuses stop advancing in our
//! store), drop out as soon as their last status is too old, without
//! waiting for the WireGuard session to expire (180 s). `max_status_age`
//! must exceed the agents' status interval (a few intervals: 3 × 5 s by
//! default); status times come from other machines' clocks, so clocks must
//! agree within a small fraction of it (NTP). A status dated in the future
//! counts as just written.
//!
//! # What a zone holds
//!
//! Exactly what [`crate::catalog`] exports (the same reading the service
//! proxy programs): a ClusterIP Service answers the ClusterIPs that carry a
//! frontend, with SRV for its named frontend ports; a headless Service
//! answers its ready endpoints. Everything else is reported with the
//! catalog's [`SkipReason`], and a zone that cannot be served with
//! [`SkipReason::BadZone`] or [`SkipReason::ZoneConflict`]. Nothing of one
//! Service affects another.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnet::IpNet;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::jiff::Timestamp;
use sdn_tunnel_api::{PeerState, TunnelCluster, TunnelPeer};

pub use crate::catalog::{is_dns_label, SkipReason, Skipped, MAX_PORTS, SERVICE_NAME_LABEL};
use crate::catalog::{read_cluster, ClusterServices, Shape};
use crate::cidr::parse_cidr;
use crate::status::HANDSHAKE_FRESH_SECS;

/// Default name of the merged zone.
pub const DEFAULT_MERGED_ZONE: &str = "cluster.all";
/// Default `max_status_age`: three times the agents' default status interval.
pub const DEFAULT_MAX_STATUS_AGE_SECS: i64 = 15;

/// How DNS records are computed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsPolicy {
    /// Name of the merged zone (`cluster.all`).
    pub merged_zone: String,
    /// How old a `TunnelPeer` status may be and still count, in seconds.
    pub max_status_age_secs: i64,
}

impl Default for DnsPolicy {
    fn default() -> Self {
        DnsPolicy {
            merged_zone: DEFAULT_MERGED_ZONE.into(),
            max_status_age_secs: DEFAULT_MAX_STATUS_AGE_SECS,
        }
    }
}

/// What is known of one cluster: its TunnelPeers, Services and
/// EndpointSlices, as last seen.
#[derive(Debug, Clone, Default)]
pub struct ClusterObjects {
    pub peers: Vec<TunnelPeer>,
    pub services: Vec<Service>,
    pub slices: Vec<EndpointSlice>,
    /// Labels of its namespaces (for a `namespaceSelector`).
    pub namespaces: crate::catalog::NamespaceLabels,
}

/// Everything the DNS records depend on.
#[derive(Debug, Clone, Copy)]
pub struct DnsInput<'a> {
    /// Name of the local cluster.
    pub local_cluster: &'a str,
    /// The declared clusters (local included).
    pub clusters: &'a [TunnelCluster],
    /// What is watched of each cluster, by cluster name.
    pub objects: &'a BTreeMap<String, ClusterObjects>,
    pub now: Timestamp,
    pub policy: &'a DnsPolicy,
}

/// Data of one record.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RecordData {
    /// An A or AAAA record, by the address family.
    Addr(IpAddr),
    /// An SRV record (served with priority 0 and equal weights).
    Srv { port: u16, target: String },
}

/// One zone: record data by owner name (lower case, absolute, without the
/// trailing dot).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Zone {
    pub records: BTreeMap<String, BTreeSet<RecordData>>,
}

impl Zone {
    fn add(&mut self, name: String, data: RecordData) {
        self.records.entry(name).or_default().insert(data);
    }

    /// Every address `name` resolves to.
    pub fn addrs(&self, name: &str) -> BTreeSet<IpAddr> {
        self.records
            .get(&name.to_ascii_lowercase())
            .into_iter()
            .flatten()
            .filter_map(|d| match d {
                RecordData::Addr(ip) => Some(*ip),
                RecordData::Srv { .. } => None,
            })
            .collect()
    }
}

/// Whether a remote cluster's tunnel works, and why not.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum TunnelHealth {
    Working,
    /// No fresh local status reports a Connected peer of the cluster.
    NotConnectedHere,
    /// No fresh status of the cluster's nodes reports a Connected local peer.
    NotConnectedThere,
}

/// The records to serve.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DnsRecords {
    /// Zones by name (lower case, without the trailing dot); the merged zone
    /// included.
    pub zones: BTreeMap<String, Zone>,
    /// Health of every declared remote cluster.
    pub tunnels: BTreeMap<String, TunnelHealth>,
    pub skipped: Vec<Skipped>,
}

/// `<svc>.<ns>.svc.<zone>`.
pub fn service_fqdn(service: &str, namespace: &str, zone: &str) -> String {
    format!("{service}.{namespace}.svc.{zone}").to_ascii_lowercase()
}

/// The Service and namespace of `<svc>.<ns>.svc.<zone>`; `None` for any
/// other name.
pub fn parse_service_fqdn(name: &str, zone: &str) -> Option<(String, String)> {
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    let zone = zone.trim_end_matches('.').to_ascii_lowercase();
    let rest = name.strip_suffix(&zone)?.strip_suffix(".svc.")?;
    let (svc, ns) = rest.split_once('.')?;
    (is_dns_label(svc) && is_dns_label(ns)).then(|| (svc.to_string(), ns.to_string()))
}

fn age_secs(t: Timestamp, now: Timestamp) -> i64 {
    now.duration_since(t).as_secs().max(0)
}

/// Peers of `cluster` that `peer`'s fresh status reports Connected, with the
/// handshake aged by the age of the status; `None` when the status is
/// missing or too old.
fn fresh_connected_to<'p>(
    peer: &'p TunnelPeer,
    cluster: &'p str,
    now: Timestamp,
    max_age: i64,
) -> impl Iterator<Item = i64> + 'p {
    let status = peer.status.as_ref();
    let age = status
        .and_then(|s| s.last_update.as_ref())
        .map(|t| age_secs(t.0, now))
        .filter(|a| *a <= max_age);
    status
        .into_iter()
        .filter(move |_| age.is_some())
        .flat_map(|s| s.peers.iter())
        .filter(move |r| r.cluster == cluster && r.state == PeerState::Connected)
        .map(move |r| r.last_handshake_age_seconds.unwrap_or(0).max(0) + age.unwrap_or(0))
}

/// The health of every remote cluster's tunnel (see the module docs for the
/// rule). `objects` holds the TunnelPeers of the local cluster and of each
/// remote cluster.
pub fn tunnel_health(
    local_cluster: &str,
    remote_clusters: &[&str],
    objects: &BTreeMap<String, ClusterObjects>,
    now: Timestamp,
    max_status_age_secs: i64,
) -> BTreeMap<String, TunnelHealth> {
    let peers_of = |cluster: &str| -> Vec<&TunnelPeer> {
        objects
            .get(cluster)
            .map(|o| {
                o.peers
                    .iter()
                    .filter(|p| p.spec.cluster == cluster)
                    .collect()
            })
            .unwrap_or_default()
    };
    let local_peers = peers_of(local_cluster);
    remote_clusters
        .iter()
        .map(|&remote| {
            let here = local_peers.iter().any(|p| {
                fresh_connected_to(p, remote, now, max_status_age_secs)
                    .any(|hs| hs <= HANDSHAKE_FRESH_SECS)
            });
            let there = peers_of(remote).iter().any(|p| {
                fresh_connected_to(p, local_cluster, now, max_status_age_secs)
                    .any(|hs| hs <= HANDSHAKE_FRESH_SECS)
            });
            let health = match (here, there) {
                (true, true) => TunnelHealth::Working,
                (false, _) => TunnelHealth::NotConnectedHere,
                (true, false) => TunnelHealth::NotConnectedThere,
            };
            (remote.to_string(), health)
        })
        .collect()
}

/// The records of one Service in one cluster, relative to a zone: what
/// `render` turns into names. Sets, so that merging clusters is a union.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct ServiceEntry {
    /// ClusterIP, or the ready endpoints of a headless Service.
    addrs: BTreeSet<IpAddr>,
    /// Headless endpoints with a name: hostname label → addresses.
    hosts: BTreeMap<String, BTreeSet<IpAddr>>,
    /// `(port name, protocol, port, target host label or None for the
    /// Service name)`.
    srv: BTreeSet<(String, String, u16, Option<String>)>,
}

impl ServiceEntry {
    fn merge(&mut self, other: &ServiceEntry) {
        self.addrs.extend(other.addrs.iter().copied());
        for (h, ips) in &other.hosts {
            self.hosts.entry(h.clone()).or_default().extend(ips);
        }
        self.srv.extend(other.srv.iter().cloned());
    }

    fn render(&self, zone: &mut Zone, svc: &str, ns: &str, zone_name: &str) {
        let base = service_fqdn(svc, ns, zone_name);
        for ip in &self.addrs {
            zone.add(base.clone(), RecordData::Addr(*ip));
        }
        for (host, ips) in &self.hosts {
            for ip in ips {
                zone.add(format!("{host}.{base}"), RecordData::Addr(*ip));
            }
        }
        for (pname, proto, port, host) in &self.srv {
            let target = match host {
                Some(h) => format!("{h}.{base}"),
                None => base.clone(),
            };
            zone.add(
                format!("_{pname}._{proto}.{base}"),
                RecordData::Srv {
                    port: *port,
                    target,
                },
            );
        }
    }
}

type ServiceKey = (String, String); // (namespace, name)

fn parse_cidrs(list: &[String]) -> Vec<IpNet> {
    list.iter().filter_map(|c| parse_cidr(c).ok()).collect()
}

/// Host label of a headless endpoint: its `hostname`, or its address with
/// `.`/`:` replaced by `-` (as Kubernetes DNS does).
fn endpoint_host(hostname: Option<&String>, ip: IpAddr) -> String {
    match hostname {
        Some(h) if is_dns_label(h) => h.clone(),
        _ => ip.to_string().replace(['.', ':'], "-"),
    }
}

/// The entries of every Service of one cluster, from its catalog.
fn cluster_entries(
    cluster: &str,
    spec: &sdn_tunnel_api::TunnelClusterSpec,
    objects: &ClusterObjects,
    skipped: &mut Vec<Skipped>,
) -> BTreeMap<ServiceKey, ServiceEntry> {
    let service_cidrs = parse_cidrs(&spec.service_cidrs);
    let pod_cidrs = parse_cidrs(&spec.pod_cidrs);
    let catalog = read_cluster(&ClusterServices {
        cluster,
        pod_cidrs: &pod_cidrs,
        service_cidrs: &service_cidrs,
        // A remote cluster's zone holds what the local admin imports from
        // it; the local cluster's own zone is never filtered.
        selector: if spec.local {
            None
        } else {
            spec.service_selector.as_ref()
        },
        services: objects.services.iter().collect(),
        slices: objects.slices.iter().collect(),
        namespaces: &objects.namespaces,
    });
    skipped.extend(catalog.skipped);
    let mut out = BTreeMap::new();
    for e in catalog.services {
        let mut entry = ServiceEntry::default();
        match &e.shape {
            Shape::ClusterIp(frontends) => {
                for (f, port) in frontends {
                    entry.addrs.insert(f.ip);
                    if is_dns_label(&port.name) {
                        let proto = port.protocol.as_str().to_string();
                        entry
                            .srv
                            .insert((port.name.clone(), proto, port.number, None));
                    }
                }
            }
            Shape::Headless => {
                for (slice, ep) in e.ready_endpoints() {
                    let host = endpoint_host(ep.hostname.as_ref(), ep.ip);
                    entry.addrs.insert(ep.ip);
                    entry.hosts.entry(host.clone()).or_default().insert(ep.ip);
                    for p in slice.ports.iter().filter(|p| is_dns_label(&p.name)) {
                        let proto = p.protocol.as_str().to_string();
                        entry
                            .srv
                            .insert((p.name.clone(), proto, p.number, Some(host.clone())));
                    }
                }
            }
        }
        out.insert((e.namespace, e.name), entry);
    }
    out
}

fn zone_skip(cluster: &str, reason: SkipReason, zone: String) -> Skipped {
    Skipped {
        cluster: cluster.to_string(),
        namespace: String::new(),
        name: String::new(),
        reason,
        detail: zone,
    }
}

/// The records of every zone (see the module docs).
pub fn dns_records(input: DnsInput<'_>) -> DnsRecords {
    let merged_zone = input
        .policy
        .merged_zone
        .trim_end_matches('.')
        .to_ascii_lowercase();
    let mut out = DnsRecords::default();
    let remotes: Vec<&str> = input
        .clusters
        .iter()
        .filter(|c| c.spec.cluster_name != input.local_cluster)
        .map(|c| c.spec.cluster_name.as_str())
        .collect();
    out.tunnels = tunnel_health(
        input.local_cluster,
        &remotes,
        input.objects,
        input.now,
        input.policy.max_status_age_secs,
    );
    let empty = ClusterObjects::default();
    let mut merged: BTreeMap<ServiceKey, ServiceEntry> = BTreeMap::new();
    let mut clusters: Vec<&TunnelCluster> = input.clusters.iter().collect();
    clusters.sort_by(|a, b| a.spec.cluster_name.cmp(&b.spec.cluster_name));
    for c in clusters {
        let name = c.spec.cluster_name.as_str();
        let zone_name = c.spec.dns_zone().trim_end_matches('.').to_ascii_lowercase();
        let objects = input.objects.get(name).unwrap_or(&empty);
        let entries = cluster_entries(name, &c.spec, objects, &mut out.skipped);
        if sdn_tunnel_api::validate::validate_dns_zone(&zone_name).is_err() {
            out.skipped
                .push(zone_skip(name, SkipReason::BadZone, zone_name));
        } else if zone_name == merged_zone || out.zones.contains_key(&zone_name) {
            out.skipped
                .push(zone_skip(name, SkipReason::ZoneConflict, zone_name));
        } else {
            let mut zone = Zone::default();
            for ((ns, svc), e) in &entries {
                e.render(&mut zone, svc, ns, &zone_name);
            }
            out.zones.insert(zone_name, zone);
        }
        let in_merged =
            name == input.local_cluster || out.tunnels.get(name) == Some(&TunnelHealth::Working);
        if in_merged {
            for (key, e) in entries {
                merged.entry(key).or_default().merge(&e);
            }
        }
    }
    if sdn_tunnel_api::validate::validate_dns_zone(&merged_zone).is_err() {
        out.skipped.push(zone_skip(
            input.local_cluster,
            SkipReason::BadZone,
            merged_zone,
        ));
    } else {
        let mut zone = Zone::default();
        for ((ns, svc), e) in &merged {
            e.render(&mut zone, svc, ns, &merged_zone);
        }
        out.zones.insert(merged_zone, zone);
    }
    out.skipped.sort();
    out.skipped.dedup();
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::fixtures::{cluster, peer};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use proptest::prelude::*;
    use sdn_tunnel_api::{RemotePeerStatus, TunnelPeerStatus};

    const NOW: i64 = 1_800_000_000;

    fn now() -> Timestamp {
        Timestamp::from_second(NOW).unwrap()
    }

    fn clusters() -> Vec<TunnelCluster> {
        vec![
            cluster("east", &["10.1.0.0/16"], &["10.101.0.0/16"], true),
            cluster("west", &["10.2.0.0/16"], &["10.102.0.0/16"], false),
            cluster(
                "north",
                &["10.3.0.0/16", "fd00:3::/48"],
                &["10.103.0.0/16", "fd00:103::/108"],
                false,
            ),
        ]
    }

    fn service(ns: &str, name: &str, cluster_ip: &str, ports: &[(&str, i32, &str)]) -> Service {
        let ports: Vec<(&str, &str, i32)> = ports.iter().map(|(n, p, t)| (*n, *t, *p)).collect();
        crate::fixtures::service(ns, name, &[cluster_ip], &ports)
    }

    /// `(addresses, hostname, ready, terminating)`.
    type Ep<'a> = (&'a [&'a str], Option<&'a str>, Option<bool>, Option<bool>);

    fn slice(
        ns: &str,
        svc: &str,
        family: &str,
        ports: &[(&str, i32)],
        eps: &[Ep<'_>],
    ) -> EndpointSlice {
        let ports: Vec<(&str, &str, i32)> = ports.iter().map(|(n, p)| (*n, "TCP", *p)).collect();
        let eps = eps
            .iter()
            .map(|(addrs, host, ready, term)| {
                crate::fixtures::endpoint(addrs, *host, *ready, *term)
            })
            .collect();
        let name = format!("{svc}-{family}");
        crate::fixtures::endpoint_slice(ns, svc, &name, family, &ports, eps)
    }

    /// A TunnelPeer of `cluster` whose status, written `age` seconds ago,
    /// reports the given peers of `of` with their state and handshake age.
    fn peer_seeing(
        cluster: &str,
        node: &str,
        age: i64,
        of: &str,
        seen: &[(PeerState, Option<i64>)],
    ) -> TunnelPeer {
        let mut p = peer(cluster, node, 1, &["10.9.0.0/24"]);
        p.status = Some(TunnelPeerStatus {
            peers: seen
                .iter()
                .enumerate()
                .map(|(i, (state, hs))| RemotePeerStatus {
                    cluster: of.into(),
                    node: format!("{of}-{i}"),
                    public_key: crate::fixtures::key(7),
                    endpoint: None,
                    state: *state,
                    reason: None,
                    message: None,
                    last_handshake_age_seconds: *hs,
                    rx_bytes: 0,
                    tx_bytes: 0,
                    rtt_micros: None,
                })
                .collect(),
            conditions: vec![],
            last_update: Some(Time(Timestamp::from_second(NOW - age).unwrap())),
        });
        p
    }

    fn connected(here: &str, there: &str, age: i64) -> (TunnelPeer, TunnelPeer) {
        (
            peer_seeing(here, "h1", age, there, &[(PeerState::Connected, Some(3))]),
            peer_seeing(there, "t1", age, here, &[(PeerState::Connected, Some(3))]),
        )
    }

    /// east local; `web` in every cluster, `only-west` in west; the tunnel
    /// to west and north up.
    fn world() -> BTreeMap<String, ClusterObjects> {
        let (e_w, w_e) = connected("east", "west", 1);
        let (e_n, n_e) = connected("east", "north", 1);
        let mut m = BTreeMap::new();
        m.insert(
            "east".into(),
            ClusterObjects {
                peers: vec![e_w, e_n],
                services: vec![service(
                    "demo",
                    "web",
                    "10.101.0.10",
                    &[("http", 80, "TCP")],
                )],
                slices: vec![],
                ..Default::default()
            },
        );
        m.insert(
            "west".into(),
            ClusterObjects {
                peers: vec![w_e],
                services: vec![
                    service("demo", "web", "10.102.0.10", &[("http", 80, "TCP")]),
                    service("demo", "only-west", "10.102.0.11", &[("dns", 53, "UDP")]),
                ],
                slices: vec![],
                ..Default::default()
            },
        );
        m.insert(
            "north".into(),
            ClusterObjects {
                peers: vec![n_e],
                services: vec![service(
                    "demo",
                    "web",
                    "fd00:103::10",
                    &[("http", 8080, "TCP")],
                )],
                slices: vec![],
                ..Default::default()
            },
        );
        m
    }

    fn records(objects: &BTreeMap<String, ClusterObjects>) -> DnsRecords {
        dns_records(DnsInput {
            local_cluster: "east",
            clusters: &clusters(),
            objects,
            now: now(),
            policy: &DnsPolicy::default(),
        })
    }

    fn ips(v: &[&str]) -> BTreeSet<IpAddr> {
        v.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn cluster_zones_answer_cluster_ips() {
        let r = records(&world());
        assert_eq!(
            r.zones.keys().collect::<Vec<_>>(),
            [
                "cluster.all",
                "cluster.east",
                "cluster.north",
                "cluster.west"
            ]
        );
        let west = &r.zones["cluster.west"];
        assert_eq!(
            west.addrs("web.demo.svc.cluster.west"),
            ips(&["10.102.0.10"])
        );
        assert_eq!(
            west.addrs("only-west.demo.svc.cluster.west"),
            ips(&["10.102.0.11"])
        );
        assert_eq!(
            r.zones["cluster.north"].addrs("web.demo.svc.cluster.north"),
            ips(&["fd00:103::10"])
        );
        assert_eq!(
            west.records["_dns._udp.only-west.demo.svc.cluster.west"],
            BTreeSet::from([RecordData::Srv {
                port: 53,
                target: "only-west.demo.svc.cluster.west".into()
            }])
        );
        assert!(r.skipped.is_empty(), "{:?}", r.skipped);
    }

    #[test]
    fn merged_zone_is_the_union_over_working_clusters() {
        let r = records(&world());
        assert!(r.tunnels.values().all(|h| *h == TunnelHealth::Working));
        let all = &r.zones["cluster.all"];
        assert_eq!(
            all.addrs("web.demo.svc.cluster.all"),
            ips(&["10.101.0.10", "10.102.0.10", "fd00:103::10"])
        );
        assert_eq!(
            all.addrs("only-west.demo.svc.cluster.all"),
            ips(&["10.102.0.11"])
        );
        assert_eq!(
            all.records["_http._tcp.web.demo.svc.cluster.all"],
            BTreeSet::from([
                RecordData::Srv {
                    port: 80,
                    target: "web.demo.svc.cluster.all".into()
                },
                RecordData::Srv {
                    port: 8080,
                    target: "web.demo.svc.cluster.all".into()
                }
            ])
        );
    }

    #[test]
    fn a_down_cluster_leaves_the_merged_zone_only() {
        let mut w = world();
        // west's agents stopped writing 20 s ago (> 15 s).
        w.get_mut("west").unwrap().peers = vec![peer_seeing(
            "west",
            "t1",
            20,
            "east",
            &[(PeerState::Connected, Some(1))],
        )];
        let r = records(&w);
        assert_eq!(r.tunnels["west"], TunnelHealth::NotConnectedThere);
        assert_eq!(r.tunnels["north"], TunnelHealth::Working);
        let all = &r.zones["cluster.all"];
        assert_eq!(
            all.addrs("web.demo.svc.cluster.all"),
            ips(&["10.101.0.10", "fd00:103::10"])
        );
        assert!(all.addrs("only-west.demo.svc.cluster.all").is_empty());
        assert!(!all
            .records
            .contains_key("_dns._udp.only-west.demo.svc.cluster.all"));
        // The cluster's own zone keeps answering from the last known state.
        assert_eq!(
            r.zones["cluster.west"].addrs("web.demo.svc.cluster.west"),
            ips(&["10.102.0.10"])
        );
    }

    #[test]
    fn tunnel_rule_needs_both_sides_fresh_and_connected() {
        let health = |east: Vec<TunnelPeer>, west: Vec<TunnelPeer>| {
            let mut m = BTreeMap::new();
            m.insert(
                "east".to_string(),
                ClusterObjects {
                    peers: east,
                    ..Default::default()
                },
            );
            m.insert(
                "west".to_string(),
                ClusterObjects {
                    peers: west,
                    ..Default::default()
                },
            );
            tunnel_health("east", &["west"], &m, now(), 15)["west"]
        };
        let (e, w) = connected("east", "west", 0);
        assert_eq!(
            health(vec![e.clone()], vec![w.clone()]),
            TunnelHealth::Working
        );
        // Nothing known.
        assert_eq!(health(vec![], vec![]), TunnelHealth::NotConnectedHere);
        // Only one side.
        assert_eq!(
            health(vec![], vec![w.clone()]),
            TunnelHealth::NotConnectedHere
        );
        assert_eq!(
            health(vec![e.clone()], vec![]),
            TunnelHealth::NotConnectedThere
        );
        // Local status too old; exactly at the limit still counts.
        let old = peer_seeing("east", "h1", 16, "west", &[(PeerState::Connected, Some(0))]);
        assert_eq!(
            health(vec![old], vec![w.clone()]),
            TunnelHealth::NotConnectedHere
        );
        let edge = peer_seeing("east", "h1", 15, "west", &[(PeerState::Connected, Some(0))]);
        assert_eq!(health(vec![edge], vec![w.clone()]), TunnelHealth::Working);
        // Not Connected.
        for state in [
            PeerState::Handshaking,
            PeerState::Stale,
            PeerState::Rejected,
        ] {
            let p = peer_seeing("east", "h1", 0, "west", &[(state, Some(1))]);
            assert_eq!(
                health(vec![p], vec![w.clone()]),
                TunnelHealth::NotConnectedHere
            );
        }
        // A handshake that has expired once aged by the status age.
        let p = peer_seeing(
            "east",
            "h1",
            10,
            "west",
            &[(PeerState::Connected, Some(175))],
        );
        assert_eq!(
            health(vec![p], vec![w.clone()]),
            TunnelHealth::NotConnectedHere
        );
        // One good node among bad ones is enough.
        let bad = peer_seeing(
            "east",
            "h2",
            100,
            "west",
            &[(PeerState::Connected, Some(1))],
        );
        assert_eq!(
            health(vec![bad, e.clone()], vec![w.clone()]),
            TunnelHealth::Working
        );
        // Connected to another cluster does not count.
        let other = peer_seeing("east", "h1", 0, "north", &[(PeerState::Connected, Some(1))]);
        assert_eq!(
            health(vec![other], vec![w.clone()]),
            TunnelHealth::NotConnectedHere
        );
        // A peer object of another cluster in west's store does not speak for west.
        let (_, mut liar) = connected("east", "west", 0);
        liar.spec.cluster = "north".into();
        assert_eq!(
            health(vec![e.clone()], vec![liar]),
            TunnelHealth::NotConnectedThere
        );
        // No status time at all: not fresh.
        let mut no_time = w.clone();
        if let Some(s) = no_time.status.as_mut() {
            s.last_update = None;
        }
        assert_eq!(
            health(vec![e.clone()], vec![no_time]),
            TunnelHealth::NotConnectedThere
        );
        // A status from the (slightly) future counts as just written.
        let future = peer_seeing("west", "t1", -3, "east", &[(PeerState::Connected, Some(1))]);
        assert_eq!(health(vec![e], vec![future]), TunnelHealth::Working);
    }

    #[test]
    fn headless_services_answer_ready_endpoints() {
        let mut w = world();
        let west = w.get_mut("west").unwrap();
        west.services
            .push(service("demo", "db", "None", &[("sql", 5432, "TCP")]));
        west.slices.push(slice(
            "demo",
            "db",
            "IPv4",
            &[("sql", 5432)],
            &[
                (&["10.2.1.5"], Some("db-0"), Some(true), None),
                (&["10.2.2.6"], None, None, None),
                (&["10.2.1.7"], None, Some(false), None),
                (&["10.2.1.8"], None, Some(true), Some(true)),
                (&["192.168.0.1"], None, Some(true), None),
                (&["garbage"], None, Some(true), None),
            ],
        ));
        let r = records(&w);
        let zone = &r.zones["cluster.west"];
        assert_eq!(
            zone.addrs("db.demo.svc.cluster.west"),
            ips(&["10.2.1.5", "10.2.2.6"])
        );
        assert_eq!(
            zone.addrs("db-0.db.demo.svc.cluster.west"),
            ips(&["10.2.1.5"])
        );
        assert_eq!(
            zone.addrs("10-2-2-6.db.demo.svc.cluster.west"),
            ips(&["10.2.2.6"])
        );
        assert_eq!(
            zone.records["_sql._tcp.db.demo.svc.cluster.west"],
            BTreeSet::from([
                RecordData::Srv {
                    port: 5432,
                    target: "10-2-2-6.db.demo.svc.cluster.west".into()
                },
                RecordData::Srv {
                    port: 5432,
                    target: "db-0.db.demo.svc.cluster.west".into()
                },
            ])
        );
        assert_eq!(
            r.zones["cluster.all"].addrs("db.demo.svc.cluster.all"),
            ips(&["10.2.1.5", "10.2.2.6"])
        );
        let reasons: Vec<(SkipReason, &str)> = r
            .skipped
            .iter()
            .map(|s| (s.reason, s.detail.as_str()))
            .collect();
        assert_eq!(
            reasons,
            [
                (SkipReason::EndpointOutsidePodCidrs, "192.168.0.1"),
                (SkipReason::BadEndpointAddress, "garbage"),
            ]
        );
    }

    #[test]
    fn odd_services_are_skipped_and_break_nothing() {
        let mut w = world();
        let west = w.get_mut("west").unwrap();
        let mut ext = service("demo", "ext", "", &[("http", 80, "TCP")]);
        if let Some(s) = ext.spec.as_mut() {
            s.type_ = Some("ExternalName".into());
            s.external_name = Some("example.invalid".into());
        }
        let many: Vec<(&str, i32, &str)> = (0..300).map(|i| ("", 1000 + i, "TCP")).collect();
        west.services.extend([
            ext,
            service("demo", "noports", "10.102.0.20", &[]),
            service("demo", "v6only", "fd00:102::1", &[("http", 80, "TCP")]),
            service("demo", "noip", "", &[("http", 80, "TCP")]),
            service("demo", "badip", "10.102.0.300", &[("http", 80, "TCP")]),
            service("demo", "many", "10.102.0.21", &many),
            service("Demo_X", "web", "10.102.0.22", &[("http", 80, "TCP")]),
            Service::default(),
        ]);
        let r = records(&w);
        let mut reasons: Vec<(String, SkipReason, &str)> = r
            .skipped
            .iter()
            .map(|s| {
                let object = format!("{}/{}", s.namespace, s.name);
                (object, s.reason, s.detail.as_str())
            })
            .collect();
        reasons.sort();
        assert_eq!(
            reasons,
            [
                ("/".to_string(), SkipReason::BadName, ""),
                ("Demo_X/web".into(), SkipReason::BadName, "Demo_X"),
                (
                    "demo/badip".into(),
                    SkipReason::BadClusterIp,
                    "10.102.0.300"
                ),
                (
                    "demo/ext".into(),
                    SkipReason::ExternalName,
                    "example.invalid"
                ),
                ("demo/many".into(), SkipReason::TooManyPorts, "300"),
                ("demo/noip".into(), SkipReason::NoClusterIp, ""),
                ("demo/noports".into(), SkipReason::NoPorts, ""),
                // one reading with the proxy: an IPv6 ClusterIP in an
                // IPv4-only cluster is of the wrong family (DNS used to
                // call it "outside the service CIDRs")
                ("demo/v6only".into(), SkipReason::WrongFamily, "fd00:102::1"),
            ]
        );
        // The rest is as without them.
        assert_eq!(r.zones, records(&world()).zones);
    }

    #[test]
    fn a_zone_clash_skips_the_cluster_zone_not_the_rest() {
        let mut cs = clusters();
        cs[1].spec.dns_zone = Some("cluster.all".into());
        let r = dns_records(DnsInput {
            local_cluster: "east",
            clusters: &cs,
            objects: &world(),
            now: now(),
            policy: &DnsPolicy::default(),
        });
        assert!(!r.zones.contains_key("cluster.west"));
        assert!(r.skipped.iter().any(|s| s.cluster == "west"
            && s.reason == SkipReason::ZoneConflict
            && s.detail == "cluster.all"));
        // west still contributes to the merged zone.
        assert_eq!(
            r.zones["cluster.all"].addrs("only-west.demo.svc.cluster.all"),
            ips(&["10.102.0.11"])
        );
    }

    #[test]
    fn a_remote_zone_holds_only_what_its_service_selector_imports() {
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
        let mut cs = clusters();
        // west: only the services of namespaces labelled team=web
        cs[1].spec.service_selector = Some(sdn_tunnel_api::ServiceSelector {
            namespace_selector: Some(LabelSelector {
                match_labels: Some([("team".to_string(), "web".to_string())].into()),
                match_expressions: None,
            }),
            selector: None,
        });
        let mut objects = world();
        fn input(cs: &[TunnelCluster], objects: &BTreeMap<String, ClusterObjects>) -> DnsRecords {
            dns_records(DnsInput {
                local_cluster: "east",
                clusters: cs,
                objects,
                now: now(),
                policy: &DnsPolicy::default(),
            })
        }
        // namespaces not known yet: nothing of west is imported
        let r = input(&cs, &objects);
        assert!(r.zones["cluster.west"].records.is_empty());
        assert!(r.zones["cluster.all"]
            .addrs("only-west.demo.svc.cluster.all")
            .is_empty());
        // demo carries the label: west's services are back, in both zones
        if let Some(west) = objects.get_mut("west") {
            west.namespaces = [(
                "demo".to_string(),
                [("team".to_string(), "web".to_string())].into(),
            )]
            .into();
        }
        let r = input(&cs, &objects);
        assert_eq!(
            r.zones["cluster.west"].addrs("only-west.demo.svc.cluster.west"),
            ips(&["10.102.0.11"])
        );
        // the local cluster's own zone is never filtered
        assert_eq!(
            r.zones["cluster.east"].addrs("web.demo.svc.cluster.east"),
            ips(&["10.101.0.10"])
        );
        // a broken selector serves nothing of west, and says why
        cs[1].spec.service_selector = Some(sdn_tunnel_api::ServiceSelector {
            namespace_selector: None,
            selector: Some(LabelSelector {
                match_labels: None,
                match_expressions: Some(vec![
                    k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement {
                        key: "x".into(),
                        operator: "Near".into(),
                        values: None,
                    },
                ]),
            }),
        });
        let r = input(&cs, &objects);
        assert!(r.zones["cluster.west"].records.is_empty());
        assert!(r
            .skipped
            .iter()
            .any(|s| s.cluster == "west" && s.reason == SkipReason::BadSelector));
    }

    #[test]
    fn a_bad_zone_is_skipped_not_fatal() {
        let mut cs = clusters();
        cs[1].spec.dns_zone = Some("bad zone..".into());
        let policy = DnsPolicy {
            merged_zone: "-all".into(),
            ..DnsPolicy::default()
        };
        let r = dns_records(DnsInput {
            local_cluster: "east",
            clusters: &cs,
            objects: &world(),
            now: now(),
            policy: &policy,
        });
        assert_eq!(
            r.zones.keys().collect::<Vec<_>>(),
            ["cluster.east", "cluster.north"]
        );
        let bad: Vec<&str> = r
            .skipped
            .iter()
            .filter(|s| s.reason == SkipReason::BadZone)
            .map(|s| s.detail.as_str())
            .collect();
        assert_eq!(bad, ["-all", "bad zone"]);
    }

    #[test]
    fn names_parse_back() {
        assert_eq!(
            parse_service_fqdn("Web.Demo.svc.cluster.west.", "cluster.west"),
            Some(("web".into(), "demo".into()))
        );
        assert_eq!(
            parse_service_fqdn("web.demo.svc.cluster.east", "cluster.west"),
            None
        );
        assert_eq!(
            parse_service_fqdn("a.web.demo.svc.cluster.west", "cluster.west"),
            None
        );
        assert_eq!(
            parse_service_fqdn("web.svc.cluster.west", "cluster.west"),
            None
        );
    }

    fn label() -> impl Strategy<Value = String> {
        "[a-z]([a-z0-9-]{0,10}[a-z0-9])?"
    }

    proptest! {
        #[test]
        fn service_names_round_trip(svc in label(), ns in label(), zone in "[a-z]{1,8}(\\.[a-z]{1,8}){0,2}") {
            let fqdn = service_fqdn(&svc, &ns, &zone);
            prop_assert_eq!(parse_service_fqdn(&fqdn, &zone), Some((svc, ns)));
        }

        /// Whatever the statuses, a cluster that is not Working contributes
        /// nothing to the merged zone, and a Working one contributes all.
        #[test]
        fn down_clusters_never_appear_in_the_merged_zone(
            ages in proptest::collection::vec((0i64..40, 0i64..40, 0i64..250, any::<bool>()), 2),
            svcs in proptest::collection::vec((0u8..3, 0u8..4, 1u8..250), 0..12),
        ) {
            let names = ["west", "north"];
            let mut objects = world();
            for o in objects.values_mut() {
                o.services.clear();
            }
            let mut east_peers = vec![];
            for (i, (here_age, there_age, hs, connected)) in ages.iter().enumerate() {
                let state = if *connected { PeerState::Connected } else { PeerState::Stale };
                east_peers.push(peer_seeing("east", &format!("h{i}"), *here_age, names[i], &[(state, Some(*hs))]));
                objects.get_mut(names[i]).unwrap().peers =
                    vec![peer_seeing(names[i], "t1", *there_age, "east", &[(PeerState::Connected, Some(1))])];
            }
            objects.get_mut("east").unwrap().peers = east_peers;
            let cidr_octet = |c: u8| match c { 0 => 101, 1 => 102, _ => 103 };
            let cluster_name = |c: u8| ["east", "west", "north"][usize::from(c)];
            // A Service name is unique in its namespace and cluster.
            let svcs: BTreeMap<(u8, u8), u8> = svcs.into_iter().map(|(c, s, h)| ((c, s), h)).collect();
            // And a ClusterIP belongs to one Service of its cluster (a
            // second claimant is a DuplicateFrontend, named nowhere).
            let mut claimed = BTreeSet::new();
            let svcs: BTreeMap<(u8, u8), u8> =
                svcs.into_iter().filter(|((c, _), h)| claimed.insert((*c, *h))).collect();
            for ((c, s), host) in &svcs {
                let ip = format!("10.{}.0.{host}", cidr_octet(*c));
                objects.get_mut(cluster_name(*c)).unwrap().services
                    .push(service("demo", &format!("s{s}"), &ip, &[("http", 80, "TCP")]));
            }
            let r = records(&objects);
            let all = &r.zones["cluster.all"];
            for ((c, s), host) in &svcs {
                let ip: IpAddr = format!("10.{}.0.{host}", cidr_octet(*c)).parse().unwrap();
                let name = service_fqdn(&format!("s{s}"), "demo", "cluster.all");
                let up = *c == 0 || r.tunnels[cluster_name(*c)] == TunnelHealth::Working;
                prop_assert_eq!(all.addrs(&name).contains(&ip), up);
            }
            for (i, (here_age, there_age, hs, connected)) in ages.iter().enumerate() {
                let expect = *connected && *here_age <= 15 && *there_age <= 15 && hs + here_age <= HANDSHAKE_FRESH_SECS;
                prop_assert_eq!(r.tunnels[names[i]] == TunnelHealth::Working, expect);
            }
        }
    }
}
