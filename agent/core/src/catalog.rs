//! The one reading of a cluster's `Service`s and `EndpointSlice`s: what is
//! exported, which endpoints are ready, and why anything is left out.
//!
//! Both consumers read through here, so they cannot disagree: the service
//! proxy ([`crate::services`]) programs the frontends of the exported
//! ClusterIP Services and targets their ready endpoints; the DNS zones
//! ([`crate::dns`]) name the same frontends' addresses and, for headless
//! Services, the same ready endpoints.
//!
//! Rules, per Service, in this order (the first that fails skips it):
//! 1. its name and namespace are DNS labels ([`SkipReason::BadName`]);
//! 2. the cluster's `serviceSelector`, if any, selects it (labels, and the
//!    namespace's labels for `namespaceSelector`); a selector that cannot be
//!    evaluated exports nothing of the cluster ([`SkipReason::BadSelector`]);
//! 3. it has a spec, is not `ExternalName`, has 1..=[`MAX_PORTS`] ports;
//! 4. it is headless (`clusterIP: None`), or has ClusterIPs (`clusterIPs`,
//!    else `clusterIP`), of which those inside the declared service CIDRs of
//!    a declared family are used; each ClusterIP × port of TCP/UDP/SCTP in
//!    1..=65535 is a frontend, and no two Services of a cluster share one
//!    (the first by namespace, name and port name keeps it). A ClusterIP
//!    Service with no frontend left is not exported.
//!
//! Endpoints come from the `EndpointSlice`s labelled
//! `kubernetes.io/service-name` in the Service's namespace, `IPv4` or `IPv6`
//! (`FQDN` is reported and ignored); an endpoint counts when it is ready
//! (`ready` unset counts as ready) and not terminating, by its first address
//! (addresses are fungible by API contract), which must be an IP of the
//! slice's family inside the cluster's declared pod CIDRs: a remote cluster
//! can never point us into our own cluster or a third one.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;
use k8s_openapi::api::core::v1::{Service, ServicePort};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use sdn_tunnel_api::ServiceSelector;

/// Label tying an `EndpointSlice` to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// Label every namespace carries with its own name (Kubernetes ≥ 1.21); it
/// is always seen by a namespace selector, even before the Namespace watch
/// has synced.
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";
/// A Service with more ports than this is skipped.
pub const MAX_PORTS: usize = 256;

/// Labels of a cluster's namespaces, by namespace name.
pub type NamespaceLabels = BTreeMap<String, BTreeMap<String, String>>;

/// L4 protocols a Service port can use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    /// The Kubernetes spelling (`TCP`, `UDP`, `SCTP`); unset means TCP.
    pub fn from_k8s(p: Option<&str>) -> Option<Protocol> {
        match p.unwrap_or("TCP") {
            "TCP" => Some(Protocol::Tcp),
            "UDP" => Some(Protocol::Udp),
            "SCTP" => Some(Protocol::Sctp),
            _ => None,
        }
    }

    /// The nftables and SRV spelling (`tcp`, `udp`, `sctp`).
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Sctp => "sctp",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a client connects to: a remote ClusterIP, protocol and port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Frontend {
    pub ip: IpAddr,
    pub protocol: Protocol,
    pub port: u16,
}

impl fmt::Display for Frontend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{}",
            SocketAddr::new(self.ip, self.port),
            self.protocol
        )
    }
}

/// Why something was left out of the proxy, the DNS zones, or both.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SkipReason {
    /// `clusterIP: None`: DNS answers pod IPs, nothing to proxy.
    Headless,
    /// `type: ExternalName`.
    ExternalName,
    /// No `spec.ports`.
    NoPorts,
    /// More than [`MAX_PORTS`] ports.
    TooManyPorts,
    /// No ClusterIP allocated (or no spec).
    NoClusterIp,
    /// A ClusterIP that is not an IP address.
    BadClusterIp,
    /// A ClusterIP of a family the cluster declares no service CIDR for.
    WrongFamily,
    /// A ClusterIP outside the declared service CIDRs.
    ClusterIpOutsideServiceCidrs,
    /// A Service or EndpointSlice port outside 1..=65535.
    BadPort,
    /// A protocol other than TCP, UDP or SCTP.
    UnsupportedProtocol,
    /// Another Service already claims the same `ClusterIP:port/protocol`.
    DuplicateFrontend,
    /// An endpoint address outside the cluster's declared pod CIDRs.
    EndpointOutsidePodCidrs,
    /// An endpoint address that is not an IP address of its slice's family.
    BadEndpointAddress,
    /// An `EndpointSlice` of `addressType: FQDN`.
    FqdnEndpoints,
    /// The cluster's `serviceSelector` cannot be evaluated (unknown
    /// operator): nothing of that cluster is exported.
    BadSelector,
    /// A Service name or namespace that is not a DNS label.
    BadName,
    /// DNS only: the zone of a cluster is the merged zone, or another
    /// cluster's zone.
    ZoneConflict,
    /// DNS only: the zone of a cluster (or the merged zone) is not a valid
    /// DNS zone.
    BadZone,
}

impl SkipReason {
    /// CamelCase, for logs and conditions.
    pub fn as_str(self) -> &'static str {
        match self {
            SkipReason::Headless => "Headless",
            SkipReason::ExternalName => "ExternalName",
            SkipReason::NoPorts => "NoPorts",
            SkipReason::TooManyPorts => "TooManyPorts",
            SkipReason::NoClusterIp => "NoClusterIP",
            SkipReason::BadClusterIp => "BadClusterIP",
            SkipReason::WrongFamily => "WrongFamily",
            SkipReason::ClusterIpOutsideServiceCidrs => "ClusterIPOutsideServiceCIDRs",
            SkipReason::BadPort => "BadPort",
            SkipReason::UnsupportedProtocol => "UnsupportedProtocol",
            SkipReason::DuplicateFrontend => "DuplicateFrontend",
            SkipReason::EndpointOutsidePodCidrs => "EndpointOutsidePodCIDRs",
            SkipReason::BadEndpointAddress => "BadEndpointAddress",
            SkipReason::FqdnEndpoints => "FQDNEndpoints",
            SkipReason::BadSelector => "BadSelector",
            SkipReason::BadName => "BadName",
            SkipReason::ZoneConflict => "ZoneConflict",
            SkipReason::BadZone => "BadZone",
        }
    }
}

impl fmt::Display for SkipReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Something left out, and why.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Skipped {
    pub cluster: String,
    /// Namespace of the Service (empty for a cluster-wide skip such as a bad
    /// selector or a zone).
    pub namespace: String,
    /// Service name (empty for a cluster-wide skip).
    pub name: String,
    pub reason: SkipReason,
    /// What exactly: the address, port, expression or zone concerned.
    pub detail: String,
}

impl fmt::Display for Skipped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.namespace.is_empty() && self.name.is_empty() {
            write!(
                f,
                "cluster {}: {} ({})",
                self.cluster, self.reason, self.detail
            )
        } else {
            write!(
                f,
                "cluster {} service {}/{}: {} ({})",
                self.cluster, self.namespace, self.name, self.reason, self.detail
            )
        }
    }
}

/// RFC 1123 label: 1–63 of `[a-z0-9-]`, not starting or ending with `-`.
pub fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// Whether `labels` satisfy `selector`; `Err` names an expression that
/// cannot be evaluated. An empty selector matches everything.
pub fn selector_matches(
    selector: &LabelSelector,
    labels: &BTreeMap<String, String>,
) -> Result<bool, String> {
    for (k, v) in selector.match_labels.iter().flatten() {
        if labels.get(k) != Some(v) {
            return Ok(false);
        }
    }
    for req in selector.match_expressions.iter().flatten() {
        let values = req.values.as_deref().unwrap_or_default();
        let value = labels.get(&req.key);
        let ok = match req.operator.as_str() {
            "In" => value.is_some_and(|v| values.contains(v)),
            "NotIn" => value.is_none_or(|v| !values.contains(v)),
            "Exists" => value.is_some(),
            "DoesNotExist" => value.is_none(),
            other => return Err(format!("key {:?}: unknown operator {other:?}", req.key)),
        };
        if !ok {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Whether a Service in `namespace` with `labels` is exported by `sel`.
/// The namespace's labels come from `namespaces`; its
/// `kubernetes.io/metadata.name` label is always there, as the API server
/// sets it, so selecting by name works before the Namespace watch has
/// synced.
pub fn selected(
    sel: Option<&ServiceSelector>,
    namespace: &str,
    namespaces: &NamespaceLabels,
    labels: &BTreeMap<String, String>,
) -> Result<bool, String> {
    let Some(sel) = sel else { return Ok(true) };
    if let Some(ns) = &sel.namespace_selector {
        let mut ns_labels = namespaces.get(namespace).cloned().unwrap_or_default();
        ns_labels.insert(NAMESPACE_NAME_LABEL.to_string(), namespace.to_string());
        if !selector_matches(ns, &ns_labels).map_err(|e| format!("namespaceSelector: {e}"))? {
            return Ok(false);
        }
    }
    match &sel.selector {
        Some(s) => selector_matches(s, labels).map_err(|e| format!("selector: {e}")),
        None => Ok(true),
    }
}

/// One cluster's inputs.
#[derive(Debug, Clone)]
pub struct ClusterServices<'a> {
    /// Cluster name (for [`Skipped`]).
    pub cluster: &'a str,
    /// Declared pod CIDRs: endpoints must lie inside.
    pub pod_cidrs: &'a [IpNet],
    /// Declared service CIDRs: ClusterIPs must lie inside.
    pub service_cidrs: &'a [IpNet],
    /// What the local admin imports; `None` exports everything (and is what
    /// the local cluster's own zone uses).
    pub selector: Option<&'a ServiceSelector>,
    pub services: Vec<&'a Service>,
    pub slices: Vec<&'a EndpointSlice>,
    /// Labels of the cluster's namespaces, for a `namespaceSelector`.
    pub namespaces: &'a NamespaceLabels,
}

/// A usable Service port.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Port {
    /// The port's name (`""` when unnamed).
    pub name: String,
    pub protocol: Protocol,
    pub number: u16,
}

/// A ready endpoint: its first address, and its hostname if it has one.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ReadyEndpoint {
    pub ip: IpAddr,
    pub hostname: Option<String>,
}

/// An `IPv4` or `IPv6` `EndpointSlice` of an exported Service, reduced to
/// its usable ports and ready endpoints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadySlice {
    /// `addressType: IPv4` (else IPv6).
    pub v4: bool,
    /// Ports of 1..=65535 with a supported protocol, in slice order.
    pub ports: Vec<Port>,
    pub endpoints: Vec<ReadyEndpoint>,
}

impl ReadySlice {
    /// The target port of this slice for a Service port: matched by name and
    /// protocol (this is how named target ports are resolved: the slice
    /// carries the number per pod).
    pub fn target_port(&self, name: &str, protocol: Protocol) -> Option<u16> {
        self.ports
            .iter()
            .find(|p| p.name == name && p.protocol == protocol)
            .map(|p| p.number)
    }
}

/// How an exported Service is reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Shape {
    /// Through its frontends (each a ClusterIP × a port), sorted, unique,
    /// none claimed by another Service of the cluster.
    ClusterIp(Vec<(Frontend, Port)>),
    /// `clusterIP: None`: directly at its ready endpoints.
    Headless,
}

/// A Service that passed every rule.
#[derive(Debug, Clone)]
pub struct Exported<'a> {
    pub service: &'a Service,
    pub namespace: String,
    pub name: String,
    pub shape: Shape,
    /// Its `IPv4`/`IPv6` slices, in input order.
    pub slices: Vec<ReadySlice>,
}

impl Exported<'_> {
    /// The frontends (empty for a headless Service).
    pub fn frontends(&self) -> &[(Frontend, Port)] {
        match &self.shape {
            Shape::ClusterIp(f) => f,
            Shape::Headless => &[],
        }
    }

    /// The ClusterIPs that carry at least one frontend, sorted.
    pub fn cluster_ips(&self) -> BTreeSet<IpAddr> {
        self.frontends().iter().map(|(f, _)| f.ip).collect()
    }

    /// Every ready endpoint of every slice, with the slice it is in.
    pub fn ready_endpoints(&self) -> impl Iterator<Item = (&ReadySlice, &ReadyEndpoint)> + '_ {
        self.slices
            .iter()
            .flat_map(|s| s.endpoints.iter().map(move |e| (s, e)))
    }
}

/// The reading of one cluster.
#[derive(Debug, Clone, Default)]
pub struct Catalog<'a> {
    /// Exported Services, sorted by (namespace, name).
    pub services: Vec<Exported<'a>>,
    /// What was left out.
    pub skipped: BTreeSet<Skipped>,
    /// Services the selector excludes (not an error).
    pub not_selected: usize,
}

struct Reader<'r> {
    input: &'r ClusterServices<'r>,
    skipped: BTreeSet<Skipped>,
}

impl Reader<'_> {
    fn skip(&mut self, namespace: &str, name: &str, reason: SkipReason, detail: String) {
        self.skipped.insert(Skipped {
            cluster: self.input.cluster.to_string(),
            namespace: namespace.to_string(),
            name: name.to_string(),
            reason,
            detail,
        });
    }

    /// Steps 3 and 4 of the rules up to the ClusterIPs: `Some(None)` for a
    /// headless Service, `Some(Some(ips))` for the usable ClusterIPs.
    fn addresses(&mut self, ns: &str, name: &str, svc: &Service) -> Option<Option<Vec<IpAddr>>> {
        let Some(spec) = &svc.spec else {
            self.skip(ns, name, SkipReason::NoClusterIp, "no spec".into());
            return None;
        };
        if spec.type_.as_deref() == Some("ExternalName") {
            let target = spec.external_name.clone().unwrap_or_default();
            self.skip(ns, name, SkipReason::ExternalName, target);
            return None;
        }
        let nports = spec.ports.as_ref().map_or(0, Vec::len);
        if nports == 0 {
            self.skip(ns, name, SkipReason::NoPorts, String::new());
            return None;
        }
        if nports > MAX_PORTS {
            self.skip(ns, name, SkipReason::TooManyPorts, nports.to_string());
            return None;
        }
        let mut raw: Vec<String> = spec.cluster_ips.clone().unwrap_or_default();
        if raw.is_empty() {
            raw.extend(spec.cluster_ip.clone());
        }
        raw.retain(|s| !s.is_empty());
        if raw.iter().any(|s| s == "None") {
            return Some(None);
        }
        if raw.is_empty() {
            self.skip(ns, name, SkipReason::NoClusterIp, String::new());
            return None;
        }
        let cidrs = self.input.service_cidrs;
        let mut ips = Vec::new();
        for s in raw {
            let Ok(ip) = s.parse::<IpAddr>() else {
                self.skip(ns, name, SkipReason::BadClusterIp, s);
                continue;
            };
            if !cidrs.iter().any(|c| c.addr().is_ipv4() == ip.is_ipv4()) {
                self.skip(ns, name, SkipReason::WrongFamily, ip.to_string());
            } else if !cidrs.iter().any(|c| c.contains(&ip)) {
                let detail = ip.to_string();
                self.skip(ns, name, SkipReason::ClusterIpOutsideServiceCidrs, detail);
            } else if !ips.contains(&ip) {
                ips.push(ip);
            }
        }
        (!ips.is_empty()).then_some(Some(ips))
    }

    /// The usable ports of a ClusterIP Service.
    fn ports(&mut self, ns: &str, name: &str, ports: &[ServicePort]) -> Vec<Port> {
        let mut out = Vec::new();
        for port in ports {
            let port_name = port.name.clone().unwrap_or_default();
            let Some(protocol) = Protocol::from_k8s(port.protocol.as_deref()) else {
                let detail = format!("port {port_name:?}: {:?}", port.protocol);
                self.skip(ns, name, SkipReason::UnsupportedProtocol, detail);
                continue;
            };
            let Some(number) = port_number(Some(port.port)) else {
                let detail = format!("port {port_name:?}: {}", port.port);
                self.skip(ns, name, SkipReason::BadPort, detail);
                continue;
            };
            out.push(Port {
                name: port_name,
                protocol,
                number,
            });
        }
        out
    }

    /// The ready endpoints and usable ports of one slice.
    fn slice(&mut self, ns: &str, name: &str, slice: &EndpointSlice) -> Option<ReadySlice> {
        let v4 = match slice.address_type.as_str() {
            "IPv4" => true,
            "IPv6" => false,
            "FQDN" => {
                let slice_name = slice.metadata.name.clone().unwrap_or_default();
                self.skip(ns, name, SkipReason::FqdnEndpoints, slice_name);
                return None;
            }
            _ => return None,
        };
        let mut ports = Vec::new();
        for p in slice.ports.iter().flatten() {
            let port_name = p.name.clone().unwrap_or_default();
            let Some(protocol) = Protocol::from_k8s(p.protocol.as_deref()) else {
                let detail = format!("EndpointSlice port {port_name:?}: {:?}", p.protocol);
                self.skip(ns, name, SkipReason::UnsupportedProtocol, detail);
                continue;
            };
            let Some(number) = port_number(p.port) else {
                let detail = format!("EndpointSlice port {port_name:?}: {:?}", p.port);
                self.skip(ns, name, SkipReason::BadPort, detail);
                continue;
            };
            ports.push(Port {
                name: port_name,
                protocol,
                number,
            });
        }
        let mut endpoints = Vec::new();
        for ep in &slice.endpoints {
            let cond = ep.conditions.as_ref();
            if cond.and_then(|c| c.ready) == Some(false)
                || cond.and_then(|c| c.terminating) == Some(true)
            {
                continue;
            }
            let Some(addr) = ep.addresses.first() else {
                continue;
            };
            let ip = match addr.parse::<IpAddr>() {
                Ok(ip) if ip.is_ipv4() == v4 => ip,
                _ => {
                    self.skip(ns, name, SkipReason::BadEndpointAddress, addr.clone());
                    continue;
                }
            };
            if !self.input.pod_cidrs.iter().any(|c| c.contains(&ip)) {
                let detail = ip.to_string();
                self.skip(ns, name, SkipReason::EndpointOutsidePodCidrs, detail);
                continue;
            }
            endpoints.push(ReadyEndpoint {
                ip,
                hostname: ep.hostname.clone(),
            });
        }
        Some(ReadySlice {
            v4,
            ports,
            endpoints,
        })
    }
}

fn port_number(p: Option<i32>) -> Option<u16> {
    p.and_then(|p| u16::try_from(p).ok()).filter(|p| *p != 0)
}

/// Reads one cluster's Services and EndpointSlices by the rules of the
/// module docs. Pure; independent of input order.
pub fn read_cluster<'a>(input: &ClusterServices<'a>) -> Catalog<'a> {
    let mut r = Reader {
        input,
        skipped: BTreeSet::new(),
    };
    let mut by_service: BTreeMap<(&str, &str), Vec<&EndpointSlice>> = BTreeMap::new();
    for slice in &input.slices {
        let (Some(ns), Some(svc)) = (
            slice.metadata.namespace.as_deref(),
            slice
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(SERVICE_NAME_LABEL)),
        ) else {
            continue;
        };
        by_service
            .entry((ns, svc.as_str()))
            .or_default()
            .push(slice);
    }
    let mut services: Vec<&'a Service> = input.services.clone();
    services.sort_by(|a, b| {
        (&a.metadata.namespace, &a.metadata.name).cmp(&(&b.metadata.namespace, &b.metadata.name))
    });
    let mut exported: Vec<Exported<'a>> = Vec::new();
    let mut not_selected = 0;
    for svc in services {
        let ns = svc.metadata.namespace.clone().unwrap_or_default();
        let name = svc.metadata.name.clone().unwrap_or_default();
        let mut bad_name = false;
        for label in [&ns, &name] {
            if !is_dns_label(label) {
                r.skip(&ns, &name, SkipReason::BadName, label.clone());
                bad_name = true;
            }
        }
        if bad_name {
            continue;
        }
        let labels = svc.metadata.labels.clone().unwrap_or_default();
        match selected(input.selector, &ns, input.namespaces, &labels) {
            Ok(true) => {}
            Ok(false) => {
                not_selected += 1;
                continue;
            }
            Err(e) => {
                // The selector is the same for the whole cluster: one
                // record, nothing of the cluster exported.
                r.skipped.clear();
                r.skip("", "", SkipReason::BadSelector, e);
                return Catalog {
                    services: Vec::new(),
                    skipped: r.skipped,
                    not_selected: 0,
                };
            }
        }
        let shape = match r.addresses(&ns, &name, svc) {
            None => continue,
            Some(None) => Shape::Headless,
            Some(Some(ips)) => {
                let spec_ports = svc.spec.as_ref().and_then(|s| s.ports.as_deref());
                let mut ports = r.ports(&ns, &name, spec_ports.unwrap_or_default());
                ports.sort();
                let mut frontends: Vec<(Frontend, Port)> = ips
                    .iter()
                    .flat_map(|ip| {
                        ports.iter().map(|p| {
                            let f = Frontend {
                                ip: *ip,
                                protocol: p.protocol,
                                port: p.number,
                            };
                            (f, p.clone())
                        })
                    })
                    .collect();
                frontends.sort();
                frontends.dedup();
                if frontends.is_empty() {
                    continue;
                }
                Shape::ClusterIp(frontends)
            }
        };
        let slices = by_service
            .get(&(ns.as_str(), name.as_str()))
            .into_iter()
            .flatten()
            .filter_map(|s| r.slice(&ns, &name, s))
            .collect();
        exported.push(Exported {
            service: svc,
            namespace: ns,
            name,
            shape,
            slices,
        });
    }
    one_owner_per_frontend(input.cluster, &mut exported, &mut r.skipped);
    exported.retain(|e| !matches!(&e.shape, Shape::ClusterIp(f) if f.is_empty()));
    Catalog {
        services: exported,
        skipped: r.skipped,
        not_selected,
    }
}

/// No two Services share a frontend: the first by (namespace, name, port
/// name) keeps it, the others lose it and are reported. `services` is
/// sorted by (namespace, name), so the first seen wins.
fn one_owner_per_frontend(
    cluster: &str,
    services: &mut [Exported<'_>],
    skipped: &mut BTreeSet<Skipped>,
) {
    let mut owners: BTreeMap<Frontend, (String, String, String)> = BTreeMap::new();
    for e in services.iter_mut() {
        let Shape::ClusterIp(frontends) = &mut e.shape else {
            continue;
        };
        frontends.retain(|(f, p)| {
            let me = (e.namespace.clone(), e.name.clone(), p.name.clone());
            match owners.get(f) {
                None => {
                    owners.insert(*f, me);
                    true
                }
                Some(owner) if owner == &me => false,
                Some((ons, oname, _)) => {
                    skipped.insert(Skipped {
                        cluster: cluster.to_string(),
                        namespace: e.namespace.clone(),
                        name: e.name.clone(),
                        reason: SkipReason::DuplicateFrontend,
                        detail: format!("{f} already served by {cluster}/{ons}/{oname}"),
                    });
                    false
                }
            }
        });
    }
}
