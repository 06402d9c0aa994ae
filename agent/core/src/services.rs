//! Service proxying: which remote `ClusterIP:port/protocol` frontends the
//! agent DNATs, and to which endpoints.
//!
//! Input: every accepted remote cluster (its declared pod and service CIDRs
//! are the trust anchor), the `serviceSelector` the local admin declared for
//! it, and its `Service`s and `EndpointSlice`s as last seen. Output: plain,
//! sorted data ([`ProxyState`]) that the nftables driver renders; equal inputs
//! in any order give equal outputs.
//!
//! Rules, per Service port:
//! - only `ClusterIP` addresses inside the cluster's declared service CIDRs,
//!   of a family the cluster declares, are frontends; headless,
//!   `ExternalName` and port-less Services are not proxied;
//! - endpoints come from the Service's `EndpointSlice`s
//!   (`kubernetes.io/service-name`) of the frontend's address family, port
//!   matched by the Service port's *name* and protocol (this is how named
//!   target ports are resolved: the slice carries the number per pod);
//! - only ready (`ready` unset counts as ready) and not terminating
//!   endpoints, first address only (addresses are fungible by API contract);
//! - an endpoint address outside the cluster's declared pod CIDRs is never a
//!   target: a remote cluster cannot make us DNAT into our own cluster or a
//!   third one;
//! - a frontend without any target is kept with no endpoints: the driver
//!   rejects it (TCP reset / ICMP unreachable) instead of black-holing it.
//!
//! Whatever is left out is reported in [`ProxyState::skipped`] with a
//! machine-readable [`SkipReason`]; nothing odd in one Service affects
//! another.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;
use k8s_openapi::api::core::v1::{Service, ServicePort};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use sdn_tunnel_api::ServiceSelector;

use crate::mesh::AcceptedCluster;

/// Label tying an `EndpointSlice` to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// Label every namespace carries with its own name (Kubernetes ≥ 1.21); the
/// only namespace label a namespace selector can see here, since the agent
/// does not watch Namespace objects.
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";
/// `sessionAffinityConfig.clientIP.timeoutSeconds` default.
pub const DEFAULT_AFFINITY_TIMEOUT: u32 = 10_800;

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

    /// The nftables spelling (`tcp`, `udp`, `sctp`).
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

/// How an endpoint is chosen for a new connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Affinity {
    /// At random, per connection.
    None,
    /// `sessionAffinity: ClientIP`: by a hash of the client address, so a
    /// client keeps its endpoint while the endpoint set is unchanged. The
    /// timeout is carried along but a hash has no memory to expire.
    ClientIp { timeout_seconds: u32 },
}

/// One proxied frontend and its targets.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ProxiedService {
    /// Field order matters: sorting by it sorts by frontend first.
    pub frontend: Frontend,
    pub cluster: String,
    pub namespace: String,
    pub name: String,
    /// The Service port's name (`""` when unnamed).
    pub port_name: String,
    pub affinity: Affinity,
    /// Ready endpoints, sorted and deduplicated; empty means reject.
    pub endpoints: Vec<SocketAddr>,
}

impl ProxiedService {
    /// Whether new connections must be refused (no ready endpoint).
    pub fn rejects(&self) -> bool {
        self.endpoints.is_empty()
    }
}

/// Why something was left out of the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SkipReason {
    /// `clusterIP: None`: DNS answers pod IPs, nothing to proxy.
    Headless,
    /// `type: ExternalName`.
    ExternalName,
    /// No `spec.ports`.
    NoPorts,
    /// No ClusterIP allocated.
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
    /// An endpoint address that is not an IP address.
    BadEndpointAddress,
    /// An `EndpointSlice` of `addressType: FQDN`.
    FqdnEndpoints,
    /// The cluster's `serviceSelector` cannot be evaluated (unknown
    /// operator): nothing of that cluster is proxied.
    BadSelector,
}

impl SkipReason {
    /// CamelCase, for logs and conditions.
    pub fn as_str(self) -> &'static str {
        match self {
            SkipReason::Headless => "Headless",
            SkipReason::ExternalName => "ExternalName",
            SkipReason::NoPorts => "NoPorts",
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
    pub namespace: String,
    /// Service name (empty for a cluster-wide skip such as a bad selector).
    pub name: String,
    pub reason: SkipReason,
    /// What exactly: the address, port or expression concerned.
    pub detail: String,
}

impl fmt::Display for Skipped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "cluster {} service {}/{}: {} ({})",
            self.cluster, self.namespace, self.name, self.reason, self.detail
        )
    }
}

/// The desired proxy: what the nftables driver programs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProxyState {
    /// Frontends, sorted by frontend, unique.
    pub services: Vec<ProxiedService>,
    /// Every accepted remote cluster's service CIDRs, sorted: traffic to
    /// them that no frontend DNATs is refused rather than sent into the
    /// tunnel, where no peer would take it.
    pub service_cidrs: Vec<IpNet>,
    /// What was left out, sorted, unique.
    pub skipped: Vec<Skipped>,
    /// Services the clusters' selectors exclude (not an error).
    pub not_selected: usize,
}

/// One remote cluster's inputs.
#[derive(Debug, Clone)]
pub struct RemoteServices<'a> {
    pub cluster: &'a AcceptedCluster,
    pub selector: Option<&'a ServiceSelector>,
    pub services: Vec<&'a Service>,
    pub slices: Vec<&'a EndpointSlice>,
    /// Labels of the cluster's namespaces, by name, for the selector's
    /// `namespaceSelector` (a namespace missing here has only its name label).
    pub namespaces: &'a NamespaceLabels,
}

/// Labels of a cluster's namespaces, by namespace name.
pub type NamespaceLabels = BTreeMap<String, BTreeMap<String, String>>;

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

/// Whether a Service in `namespace` with `labels` is exported by `sel`
/// (the proxy and DNS both ask). The namespace's labels come from
/// `namespaces`; its `kubernetes.io/metadata.name` label is always there,
/// as the API server sets it, so selecting by name works before the
/// Namespace watch has synced.
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

fn port_number(p: Option<i32>) -> Option<u16> {
    p.and_then(|p| u16::try_from(p).ok()).filter(|p| *p != 0)
}

/// Collects results and skips of one cluster.
struct Out<'a> {
    cluster: &'a AcceptedCluster,
    services: Vec<ProxiedService>,
    skipped: BTreeSet<Skipped>,
}

impl Out<'_> {
    fn skip(&mut self, namespace: &str, name: &str, reason: SkipReason, detail: String) {
        self.skipped.insert(Skipped {
            cluster: self.cluster.name.clone(),
            namespace: namespace.to_string(),
            name: name.to_string(),
            reason,
            detail,
        });
    }
}

/// The frontend addresses of `svc`, or the reason it has none.
fn cluster_ips(out: &mut Out<'_>, ns: &str, name: &str, svc: &Service) -> Vec<IpAddr> {
    let Some(spec) = &svc.spec else {
        out.skip(ns, name, SkipReason::NoClusterIp, "no spec".into());
        return vec![];
    };
    if spec.type_.as_deref() == Some("ExternalName") {
        let target = spec.external_name.clone().unwrap_or_default();
        out.skip(ns, name, SkipReason::ExternalName, target);
        return vec![];
    }
    let mut raw: Vec<String> = spec.cluster_ips.clone().unwrap_or_default();
    if raw.is_empty() {
        raw.extend(spec.cluster_ip.clone());
    }
    raw.retain(|s| !s.is_empty());
    if raw.iter().any(|s| s == "None") {
        out.skip(ns, name, SkipReason::Headless, "clusterIP: None".into());
        return vec![];
    }
    if raw.is_empty() {
        out.skip(ns, name, SkipReason::NoClusterIp, String::new());
        return vec![];
    }
    if spec.ports.as_ref().is_none_or(Vec::is_empty) {
        out.skip(ns, name, SkipReason::NoPorts, String::new());
        return vec![];
    }
    let mut ips = Vec::new();
    for s in raw {
        let Ok(ip) = s.parse::<IpAddr>() else {
            out.skip(ns, name, SkipReason::BadClusterIp, s);
            continue;
        };
        let cidrs = &out.cluster.service_cidrs;
        if !cidrs.iter().any(|c| c.addr().is_ipv4() == ip.is_ipv4()) {
            out.skip(ns, name, SkipReason::WrongFamily, ip.to_string());
        } else if !cidrs.iter().any(|c| c.contains(&ip)) {
            out.skip(
                ns,
                name,
                SkipReason::ClusterIpOutsideServiceCidrs,
                ip.to_string(),
            );
        } else {
            ips.push(ip);
        }
    }
    ips
}

/// Ready targets of one Service port for frontends of family `v4`.
fn targets(
    out: &mut Out<'_>,
    ns: &str,
    name: &str,
    port: &ServicePort,
    protocol: Protocol,
    v4: bool,
    slices: &[&EndpointSlice],
) -> Vec<SocketAddr> {
    let wanted_name = port.name.as_deref().unwrap_or("");
    let mut targets = Vec::new();
    for slice in slices {
        let family_ok = match slice.address_type.as_str() {
            "IPv4" => v4,
            "IPv6" => !v4,
            "FQDN" => {
                let slice_name = slice.metadata.name.clone().unwrap_or_default();
                out.skip(ns, name, SkipReason::FqdnEndpoints, slice_name);
                false
            }
            _ => false,
        };
        if !family_ok {
            continue;
        }
        let matching = slice.ports.iter().flatten().find(|p| {
            p.name.as_deref().unwrap_or("") == wanted_name
                && Protocol::from_k8s(p.protocol.as_deref()) == Some(protocol)
        });
        let Some(slice_port) = matching else { continue };
        let Some(target_port) = port_number(slice_port.port) else {
            out.skip(
                ns,
                name,
                SkipReason::BadPort,
                format!("EndpointSlice port {wanted_name:?}: {:?}", slice_port.port),
            );
            continue;
        };
        for ep in &slice.endpoints {
            let cond = ep.conditions.clone().unwrap_or_default();
            if cond.ready == Some(false) || cond.terminating == Some(true) {
                continue;
            }
            let Some(addr) = ep.addresses.first() else {
                continue;
            };
            let Ok(ip) = addr.parse::<IpAddr>() else {
                out.skip(ns, name, SkipReason::BadEndpointAddress, addr.clone());
                continue;
            };
            if ip.is_ipv4() != v4 {
                out.skip(ns, name, SkipReason::BadEndpointAddress, addr.clone());
                continue;
            }
            if !out.cluster.pod_cidrs.iter().any(|c| c.contains(&ip)) {
                out.skip(
                    ns,
                    name,
                    SkipReason::EndpointOutsidePodCidrs,
                    ip.to_string(),
                );
                continue;
            }
            targets.push(SocketAddr::new(ip, target_port));
        }
    }
    targets.sort();
    targets.dedup();
    targets
}

fn one_cluster(remote: &RemoteServices<'_>) -> (Vec<ProxiedService>, BTreeSet<Skipped>, usize) {
    let mut out = Out {
        cluster: remote.cluster,
        services: Vec::new(),
        skipped: BTreeSet::new(),
    };
    let mut not_selected = 0;
    let mut by_service: BTreeMap<(&str, &str), Vec<&EndpointSlice>> = BTreeMap::new();
    for slice in &remote.slices {
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
    let mut services: Vec<&Service> = remote.services.clone();
    services.sort_by(|a, b| {
        (&a.metadata.namespace, &a.metadata.name).cmp(&(&b.metadata.namespace, &b.metadata.name))
    });
    for svc in services {
        let ns = svc.metadata.namespace.as_deref().unwrap_or("default");
        let Some(name) = svc.metadata.name.as_deref() else {
            continue;
        };
        let labels = svc.metadata.labels.clone().unwrap_or_default();
        match selected(remote.selector, ns, remote.namespaces, &labels) {
            Ok(true) => {}
            Ok(false) => {
                not_selected += 1;
                continue;
            }
            Err(e) => {
                // The selector is the same for the whole cluster: one
                // record, nothing of the cluster exported.
                out.skip("", "", SkipReason::BadSelector, e);
                return (vec![], out.skipped, 0);
            }
        }
        let ips = cluster_ips(&mut out, ns, name, svc);
        if ips.is_empty() {
            continue;
        }
        let spec = svc.spec.clone().unwrap_or_default();
        let affinity = if spec.session_affinity.as_deref() == Some("ClientIP") {
            let timeout = spec
                .session_affinity_config
                .and_then(|c| c.client_ip)
                .and_then(|c| c.timeout_seconds)
                .and_then(|t| u32::try_from(t).ok())
                .filter(|t| *t > 0)
                .unwrap_or(DEFAULT_AFFINITY_TIMEOUT);
            Affinity::ClientIp {
                timeout_seconds: timeout,
            }
        } else {
            Affinity::None
        };
        let slices = by_service.get(&(ns, name)).cloned().unwrap_or_default();
        let mut ports: Vec<&ServicePort> = spec.ports.iter().flatten().collect();
        ports.sort_by(|a, b| (&a.name, a.port, &a.protocol).cmp(&(&b.name, b.port, &b.protocol)));
        for port in ports {
            let port_name = port.name.clone().unwrap_or_default();
            let Some(protocol) = Protocol::from_k8s(port.protocol.as_deref()) else {
                out.skip(
                    ns,
                    name,
                    SkipReason::UnsupportedProtocol,
                    format!("port {port_name:?}: {:?}", port.protocol),
                );
                continue;
            };
            let Some(number) = port_number(Some(port.port)) else {
                out.skip(
                    ns,
                    name,
                    SkipReason::BadPort,
                    format!("port {port_name:?}: {}", port.port),
                );
                continue;
            };
            for ip in &ips {
                let endpoints = targets(&mut out, ns, name, port, protocol, ip.is_ipv4(), &slices);
                out.services.push(ProxiedService {
                    frontend: Frontend {
                        ip: *ip,
                        protocol,
                        port: number,
                    },
                    cluster: remote.cluster.name.clone(),
                    namespace: ns.to_string(),
                    name: name.to_string(),
                    port_name: port_name.clone(),
                    affinity,
                    endpoints,
                });
            }
        }
    }
    (out.services, out.skipped, not_selected)
}

/// The desired proxy state from every accepted remote cluster's Services
/// and EndpointSlices. Pure; sorted; independent of input order.
pub fn desired_proxy(remotes: &[RemoteServices<'_>]) -> ProxyState {
    let mut candidates = Vec::new();
    let mut skipped = BTreeSet::new();
    let mut not_selected = 0;
    let mut service_cidrs = Vec::new();
    for remote in remotes {
        service_cidrs.extend(remote.cluster.service_cidrs.iter().copied());
        let (s, k, n) = one_cluster(remote);
        candidates.extend(s);
        skipped.extend(k);
        not_selected += n;
    }
    // One owner per frontend: the first by (cluster, namespace, name, port
    // name); the others are reported. Sorting everything first makes the
    // winner independent of input order.
    candidates.sort_by(|a, b| {
        (&a.frontend, &a.cluster, &a.namespace, &a.name, &a.port_name).cmp(&(
            &b.frontend,
            &b.cluster,
            &b.namespace,
            &b.name,
            &b.port_name,
        ))
    });
    let mut services: Vec<ProxiedService> = Vec::with_capacity(candidates.len());
    for c in candidates {
        if let Some(prev) = services.last() {
            if prev.frontend == c.frontend {
                if prev != &c {
                    skipped.insert(Skipped {
                        cluster: c.cluster.clone(),
                        namespace: c.namespace.clone(),
                        name: c.name.clone(),
                        reason: SkipReason::DuplicateFrontend,
                        detail: format!(
                            "{} already served by {}/{}/{}",
                            c.frontend, prev.cluster, prev.namespace, prev.name
                        ),
                    });
                }
                continue;
            }
        }
        services.push(c);
    }
    service_cidrs.sort();
    service_cidrs.dedup();
    ProxyState {
        services,
        service_cidrs,
        skipped: skipped.into_iter().collect(),
        not_selected,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{ClientIPConfig, ServiceSpec, SessionAffinityConfig};
    use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelectorRequirement, ObjectMeta};
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    use proptest::prelude::*;

    fn west() -> AcceptedCluster {
        AcceptedCluster {
            name: "west".into(),
            object_name: "west".into(),
            pod_cidrs: vec!["10.2.0.0/16".parse().unwrap()],
            service_cidrs: vec!["10.102.0.0/16".parse().unwrap()],
            dns_zone: "cluster.west".into(),
            endpoint_overrides: BTreeMap::new(),
        }
    }

    fn svc(ns: &str, name: &str, ip: &str, ports: &[(&str, &str, i32)]) -> Service {
        Service {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some(ns.into()),
                ..Default::default()
            },
            spec: Some(ServiceSpec {
                cluster_ip: Some(ip.into()),
                cluster_ips: Some(vec![ip.into()]),
                type_: Some("ClusterIP".into()),
                ports: Some(
                    ports
                        .iter()
                        .map(|(n, proto, port)| ServicePort {
                            name: Some((*n).into()),
                            protocol: Some((*proto).into()),
                            port: *port,
                            target_port: Some(IntOrString::String("http".into())),
                            ..Default::default()
                        })
                        .collect(),
                ),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn ep(ip: &str, ready: Option<bool>, terminating: Option<bool>) -> Endpoint {
        Endpoint {
            addresses: vec![ip.into()],
            conditions: Some(EndpointConditions {
                ready,
                serving: ready,
                terminating,
            }),
            ..Default::default()
        }
    }

    fn slice(
        ns: &str,
        svc: &str,
        name: &str,
        family: &str,
        ports: &[(&str, &str, i32)],
        endpoints: Vec<Endpoint>,
    ) -> EndpointSlice {
        EndpointSlice {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some(ns.into()),
                labels: Some([(SERVICE_NAME_LABEL.to_string(), svc.to_string())].into()),
                ..Default::default()
            },
            address_type: family.into(),
            endpoints,
            ports: Some(
                ports
                    .iter()
                    .map(|(n, proto, port)| EndpointPort {
                        name: Some((*n).into()),
                        protocol: Some((*proto).into()),
                        port: Some(*port),
                        ..Default::default()
                    })
                    .collect(),
            ),
        }
    }

    fn run(
        cluster: &AcceptedCluster,
        selector: Option<&ServiceSelector>,
        services: &[Service],
        slices: &[EndpointSlice],
    ) -> ProxyState {
        run_with_namespaces(cluster, selector, services, slices, &NamespaceLabels::new())
    }

    fn run_with_namespaces(
        cluster: &AcceptedCluster,
        selector: Option<&ServiceSelector>,
        services: &[Service],
        slices: &[EndpointSlice],
        namespaces: &NamespaceLabels,
    ) -> ProxyState {
        desired_proxy(&[RemoteServices {
            cluster,
            selector,
            services: services.iter().collect(),
            slices: slices.iter().collect(),
            namespaces,
        }])
    }

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn named_ports_resolve_per_slice_and_only_ready_endpoints_count() {
        let c = west();
        let services = [svc(
            "demo",
            "web",
            "10.102.0.10",
            &[("http", "TCP", 80), ("dns", "UDP", 53)],
        )];
        let slices = [
            slice(
                "demo",
                "web",
                "web-a",
                "IPv4",
                &[("http", "TCP", 8080), ("dns", "UDP", 5353)],
                vec![
                    ep("10.2.1.5", Some(true), Some(false)),
                    ep("10.2.1.6", None, None), // unset: ready
                    ep("10.2.1.7", Some(false), None),
                    ep("10.2.1.8", Some(true), Some(true)),
                ],
            ),
            // another slice of the same service, pods listening elsewhere
            slice(
                "demo",
                "web",
                "web-b",
                "IPv4",
                &[("http", "TCP", 9090)],
                vec![ep("10.2.2.5", Some(true), None)],
            ),
        ];
        let s = run(&c, None, &services, &slices);
        assert!(s.skipped.is_empty(), "{:?}", s.skipped);
        assert_eq!(s.services.len(), 2);
        // sorted by frontend: same IP, TCP before UDP
        let udp = &s.services[1];
        assert_eq!(udp.frontend.protocol, Protocol::Udp);
        assert_eq!(
            udp.endpoints,
            vec![sa("10.2.1.5:5353"), sa("10.2.1.6:5353")]
        );
        let tcp = &s.services[0];
        assert_eq!(tcp.frontend.port, 80);
        assert_eq!(tcp.port_name, "http");
        assert_eq!(
            tcp.endpoints,
            vec![
                sa("10.2.1.5:8080"),
                sa("10.2.1.6:8080"),
                sa("10.2.2.5:9090")
            ]
        );
        assert_eq!(tcp.affinity, Affinity::None);
        assert_eq!(s.service_cidrs, c.service_cidrs);
    }

    #[test]
    fn no_ready_endpoint_means_reject() {
        let c = west();
        let services = [svc("demo", "web", "10.102.0.10", &[("", "TCP", 80)])];
        let slices = [slice(
            "demo",
            "web",
            "web-a",
            "IPv4",
            &[("", "TCP", 8080)],
            vec![ep("10.2.1.5", Some(false), None)],
        )];
        let s = run(&c, None, &services, &slices);
        assert_eq!(s.services.len(), 1);
        assert!(s.services[0].rejects());
        // and with no slice at all
        let s = run(&c, None, &services, &[]);
        assert!(s.services[0].rejects());
    }

    #[test]
    fn endpoints_outside_the_pod_cidrs_are_never_targets() {
        let c = west();
        let services = [svc("demo", "web", "10.102.0.10", &[("", "TCP", 80)])];
        let slices = [slice(
            "demo",
            "web",
            "web-a",
            "IPv4",
            &[("", "TCP", 8080)],
            vec![
                ep("10.1.1.5", Some(true), None), // the local cluster's pods
                ep("10.2.3.4", Some(true), None),
                ep("not-an-ip", Some(true), None),
            ],
        )];
        let s = run(&c, None, &services, &slices);
        assert_eq!(s.services[0].endpoints, vec![sa("10.2.3.4:8080")]);
        let reasons: Vec<_> = s.skipped.iter().map(|k| (k.reason, &k.detail)).collect();
        assert_eq!(
            reasons,
            vec![
                (SkipReason::EndpointOutsidePodCidrs, &"10.1.1.5".to_string()),
                (SkipReason::BadEndpointAddress, &"not-an-ip".to_string()),
            ]
        );
    }

    #[test]
    fn odd_services_are_skipped_with_a_reason_and_the_rest_works() {
        let c = west();
        let mut headless = svc("demo", "headless", "None", &[("", "TCP", 80)]);
        headless.spec.as_mut().unwrap().cluster_ips = Some(vec!["None".into()]);
        let mut external = svc("demo", "ext", "", &[("", "TCP", 80)]);
        external.spec.as_mut().unwrap().type_ = Some("ExternalName".into());
        external.spec.as_mut().unwrap().external_name = Some("example.org".into());
        let noports = svc("demo", "noports", "10.102.0.12", &[]);
        let v6 = svc("demo", "v6", "fd00:102::1", &[("", "TCP", 80)]);
        let outside = svc("demo", "outside", "10.101.0.5", &[("", "TCP", 80)]);
        let weird = svc(
            "demo",
            "weird",
            "10.102.0.13",
            &[("x", "ICMP", 80), ("y", "TCP", 0)],
        );
        let good = svc("demo", "good", "10.102.0.14", &[("", "TCP", 80)]);
        let services = [headless, external, noports, v6, outside, weird, good];
        let slices = [slice(
            "demo",
            "good",
            "good-a",
            "IPv4",
            &[("", "TCP", 8080)],
            vec![ep("10.2.1.1", Some(true), None)],
        )];
        let s = run(&c, None, &services, &slices);
        assert_eq!(s.services.len(), 1);
        assert_eq!(s.services[0].name, "good");
        assert_eq!(s.services[0].endpoints, vec![sa("10.2.1.1:8080")]);
        let mut reasons: Vec<(&str, SkipReason)> = s
            .skipped
            .iter()
            .map(|k| (k.name.as_str(), k.reason))
            .collect();
        reasons.sort();
        assert_eq!(
            reasons,
            vec![
                ("ext", SkipReason::ExternalName),
                ("headless", SkipReason::Headless),
                ("noports", SkipReason::NoPorts),
                ("outside", SkipReason::ClusterIpOutsideServiceCidrs),
                ("v6", SkipReason::WrongFamily),
                ("weird", SkipReason::BadPort),
                ("weird", SkipReason::UnsupportedProtocol),
            ]
        );
    }

    #[test]
    fn dual_stack_uses_the_slices_of_each_family() {
        let mut c = west();
        c.pod_cidrs.push("fd00:2::/48".parse().unwrap());
        c.service_cidrs.push("fd00:102::/112".parse().unwrap());
        let mut s = svc("demo", "web", "10.102.0.10", &[("", "SCTP", 80)]);
        s.spec.as_mut().unwrap().cluster_ips =
            Some(vec!["10.102.0.10".into(), "fd00:102::10".into()]);
        let slices = [
            slice(
                "demo",
                "web",
                "v4",
                "IPv4",
                &[("", "SCTP", 8080)],
                vec![ep("10.2.1.1", None, None)],
            ),
            slice(
                "demo",
                "web",
                "v6",
                "IPv6",
                &[("", "SCTP", 8080)],
                vec![ep("fd00:2::1", None, None)],
            ),
            slice("demo", "web", "f", "FQDN", &[("", "SCTP", 8080)], vec![]),
        ];
        let st = run(&c, None, &[s], &slices);
        assert_eq!(st.services.len(), 2);
        assert_eq!(st.services[0].endpoints, vec![sa("10.2.1.1:8080")]);
        assert_eq!(st.services[1].endpoints, vec![sa("[fd00:2::1]:8080")]);
        assert_eq!(st.services[1].frontend.protocol, Protocol::Sctp);
        assert_eq!(st.skipped[0].reason, SkipReason::FqdnEndpoints);
    }

    #[test]
    fn client_ip_affinity_with_default_and_explicit_timeout() {
        let c = west();
        let mut a = svc("demo", "a", "10.102.0.10", &[("", "TCP", 80)]);
        a.spec.as_mut().unwrap().session_affinity = Some("ClientIP".into());
        let mut b = svc("demo", "b", "10.102.0.11", &[("", "TCP", 80)]);
        b.spec.as_mut().unwrap().session_affinity = Some("ClientIP".into());
        b.spec.as_mut().unwrap().session_affinity_config = Some(SessionAffinityConfig {
            client_ip: Some(ClientIPConfig {
                timeout_seconds: Some(60),
            }),
        });
        let s = run(&c, None, &[a, b], &[]);
        assert_eq!(
            s.services[0].affinity,
            Affinity::ClientIp {
                timeout_seconds: DEFAULT_AFFINITY_TIMEOUT
            }
        );
        assert_eq!(
            s.services[1].affinity,
            Affinity::ClientIp {
                timeout_seconds: 60
            }
        );
    }

    #[test]
    fn selectors_filter_by_labels_and_namespace_name() {
        let c = west();
        let mut exported = svc("demo", "a", "10.102.0.10", &[("", "TCP", 80)]);
        exported.metadata.labels = Some([("export".to_string(), "yes".to_string())].into());
        let plain = svc("demo", "b", "10.102.0.11", &[("", "TCP", 80)]);
        let mut other_ns = svc("kube-system", "c", "10.102.0.12", &[("", "TCP", 80)]);
        other_ns.metadata.labels = exported.metadata.labels.clone();
        let services = [exported, plain, other_ns];
        let sel = ServiceSelector {
            namespace_selector: Some(LabelSelector {
                match_expressions: Some(vec![LabelSelectorRequirement {
                    key: NAMESPACE_NAME_LABEL.into(),
                    operator: "NotIn".into(),
                    values: Some(vec!["kube-system".into()]),
                }]),
                match_labels: None,
            }),
            selector: Some(LabelSelector {
                match_labels: Some([("export".to_string(), "yes".to_string())].into()),
                match_expressions: None,
            }),
        };
        let s = run(&c, Some(&sel), &services, &[]);
        let names: Vec<&str> = s.services.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, vec!["a"]);
        assert_eq!(s.not_selected, 2);
        // no selector: everything
        assert_eq!(run(&c, None, &services, &[]).services.len(), 3);
        // a broken selector exports nothing and says why
        let bad = ServiceSelector {
            namespace_selector: None,
            selector: Some(LabelSelector {
                match_expressions: Some(vec![LabelSelectorRequirement {
                    key: "x".into(),
                    operator: "Near".into(),
                    values: None,
                }]),
                match_labels: None,
            }),
        };
        let s = run(&c, Some(&bad), &services, &[]);
        assert!(s.services.is_empty());
        assert_eq!(s.skipped.len(), 1);
        assert_eq!(s.skipped[0].reason, SkipReason::BadSelector);
        // a namespace selected by its own labels (from the Namespace watch)
        let team = ServiceSelector {
            namespace_selector: Some(LabelSelector {
                match_labels: Some([("team".to_string(), "a".to_string())].into()),
                match_expressions: None,
            }),
            selector: None,
        };
        let namespaces: NamespaceLabels = [(
            "demo".to_string(),
            [("team".to_string(), "a".to_string())].into(),
        )]
        .into();
        let s = run_with_namespaces(&c, Some(&team), &services, &[], &namespaces);
        let names: Vec<&str> = s.services.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, vec!["a", "b"]);
        // before the namespaces are known, only the name label matches
        assert!(run(&c, Some(&team), &services, &[]).services.is_empty());
    }

    #[test]
    fn duplicate_frontends_keep_one_owner() {
        let c = west();
        let services = [
            svc("b", "web", "10.102.0.10", &[("", "TCP", 80)]),
            svc("a", "web", "10.102.0.10", &[("", "TCP", 80)]),
        ];
        let s = run(&c, None, &services, &[]);
        assert_eq!(s.services.len(), 1);
        assert_eq!(s.services[0].namespace, "a");
        assert_eq!(s.skipped.len(), 1);
        assert_eq!(s.skipped[0].reason, SkipReason::DuplicateFrontend);
        assert_eq!(s.skipped[0].namespace, "b");
    }

    #[test]
    fn slices_of_other_services_or_namespaces_do_not_leak() {
        let c = west();
        let services = [svc("demo", "web", "10.102.0.10", &[("", "TCP", 80)])];
        let slices = [
            slice(
                "other",
                "web",
                "x",
                "IPv4",
                &[("", "TCP", 8080)],
                vec![ep("10.2.1.1", None, None)],
            ),
            slice(
                "demo",
                "api",
                "y",
                "IPv4",
                &[("", "TCP", 8080)],
                vec![ep("10.2.1.2", None, None)],
            ),
            // port name mismatch
            slice(
                "demo",
                "web",
                "z",
                "IPv4",
                &[("metrics", "TCP", 9100)],
                vec![ep("10.2.1.3", None, None)],
            ),
        ];
        let s = run(&c, None, &services, &slices);
        assert!(s.services[0].rejects(), "{:?}", s.services[0]);
    }

    // ---- properties ----

    fn arb_ip() -> impl Strategy<Value = String> {
        prop_oneof![
            (0u8..4, 0u8..4).prop_map(|(a, b)| format!("10.2.{a}.{b}")),
            (0u8..4).prop_map(|b| format!("10.1.0.{b}")),
            (0u8..2).prop_map(|b| format!("10.102.0.{b}")),
            Just("fd00:2::1".to_string()),
            Just("junk".to_string()),
        ]
    }

    fn arb_world() -> impl Strategy<Value = (Vec<Service>, Vec<EndpointSlice>)> {
        let svcs = prop::collection::vec(
            (
                0u8..3,
                prop_oneof![
                    (0u8..4).prop_map(|b| format!("10.102.0.{b}")),
                    Just("10.101.0.1".to_string()),
                    Just("None".to_string()),
                ],
                prop::collection::vec(
                    (
                        prop_oneof![Just(""), Just("a"), Just("b")],
                        prop_oneof![Just("TCP"), Just("UDP"), Just("SCTP")],
                        prop_oneof![Just(80), Just(53), Just(0)],
                    ),
                    0..3,
                ),
            ),
            0..5,
        );
        let slices = prop::collection::vec(
            (
                0u8..5,
                prop_oneof![Just("IPv4"), Just("IPv6")],
                prop::collection::vec(
                    (
                        prop_oneof![Just(""), Just("a"), Just("b")],
                        prop_oneof![Just("TCP"), Just("UDP")],
                        1i32..3,
                    ),
                    0..3,
                ),
                prop::collection::vec(
                    (arb_ip(), any::<Option<bool>>(), any::<Option<bool>>()),
                    0..5,
                ),
            ),
            0..6,
        );
        (svcs, slices).prop_map(|(svcs, slices)| {
            let services = svcs
                .into_iter()
                .enumerate()
                .map(|(i, (n, ip, ports))| {
                    let ports: Vec<(&str, &str, i32)> = ports;
                    // names are unique in a store; `n` picks the namespace
                    svc(&format!("ns{n}"), &format!("s{i}"), &ip, &ports)
                })
                .collect();
            let slices = slices
                .into_iter()
                .enumerate()
                .map(|(i, (n, fam, ports, eps))| {
                    let ports: Vec<(&str, &str, i32)> = ports;
                    slice(
                        &format!("ns{}", n % 3),
                        &format!("s{n}"),
                        &format!("sl{i}"),
                        fam,
                        &ports,
                        eps.into_iter().map(|(ip, r, t)| ep(&ip, r, t)).collect(),
                    )
                })
                .collect();
            (services, slices)
        })
    }

    proptest! {
        #[test]
        fn no_target_outside_declared_pod_cidrs_and_order_does_not_matter(
            (services, slices) in arb_world(),
            seed in any::<u64>(),
        ) {
            let c = west();
            let a = run(&c, None, &services, &slices);
            for s in &a.services {
                prop_assert!(c.service_cidrs.iter().any(|n| n.contains(&s.frontend.ip)));
                for t in &s.endpoints {
                    prop_assert!(c.pod_cidrs.iter().any(|n| n.contains(&t.ip())), "{t}");
                    prop_assert!(t.port() != 0);
                }
                prop_assert!(s.endpoints.windows(2).all(|w| w[0] < w[1]));
            }
            prop_assert!(a.services.windows(2).all(|w| w[0].frontend < w[1].frontend));
            // reversed and rotated inputs give the same answer
            let mut rs = services.clone();
            let mut rl = slices.clone();
            rs.reverse();
            rl.reverse();
            if !rs.is_empty() {
                let k = (seed as usize) % rs.len();
                rs.rotate_left(k);
            }
            if !rl.is_empty() {
                let k = (seed as usize) % rl.len();
                rl.rotate_left(k);
            }
            let b = run(&c, None, &rs, &rl);
            prop_assert_eq!(a, b);
        }
    }
}
