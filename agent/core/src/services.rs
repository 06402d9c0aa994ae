//! Service proxying: which remote `ClusterIP:port/protocol` frontends the
//! agent DNATs, and to which endpoints.
//!
//! Input: every accepted remote cluster (its declared pod and service CIDRs
//! are the trust anchor), the `serviceSelector` the local admin declared for
//! it, and its `Service`s and `EndpointSlice`s as last seen. What is exported
//! and which endpoints are ready is decided once, in [`crate::catalog`] (the
//! DNS zones read the same catalog, so they name exactly what is proxied).
//! Output: plain, sorted data ([`ProxyState`]) that the nftables driver
//! renders; equal inputs in any order give equal outputs.
//!
//! On top of the catalog, per frontend:
//! - headless Services are not proxied (reported as [`SkipReason::Headless`]);
//! - the targets are the ready endpoints of the Service's slices of the
//!   frontend's address family, at the slice port matched by the Service
//!   port's *name* and protocol;
//! - a frontend without any target is kept with no endpoints: the driver
//!   rejects it (TCP reset / ICMP unreachable) instead of black-holing it;
//! - two clusters never share a frontend (their declared service CIDRs are
//!   disjoint once the mesh accepts them; checked again here).
//!
//! Whatever is left out is reported in [`ProxyState::skipped`] with a
//! machine-readable [`SkipReason`]; nothing odd in one Service affects
//! another.

use std::collections::BTreeSet;
use std::net::SocketAddr;

use ipnet::IpNet;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use sdn_tunnel_api::ServiceSelector;

use crate::catalog::{read_cluster, ClusterServices, Exported, Port, Shape};
pub use crate::catalog::{
    selected, selector_matches, Frontend, NamespaceLabels, Protocol, SkipReason, Skipped,
    NAMESPACE_NAME_LABEL, SERVICE_NAME_LABEL,
};
use crate::mesh::AcceptedCluster;

/// `sessionAffinityConfig.clientIP.timeoutSeconds` default.
pub const DEFAULT_AFFINITY_TIMEOUT: u32 = 10_800;

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

impl<'a> RemoteServices<'a> {
    /// The catalog input of this cluster.
    pub fn catalog_input(&self) -> ClusterServices<'a> {
        ClusterServices {
            cluster: &self.cluster.name,
            pod_cidrs: &self.cluster.pod_cidrs,
            service_cidrs: &self.cluster.service_cidrs,
            selector: self.selector,
            services: self.services.clone(),
            slices: self.slices.clone(),
            namespaces: self.namespaces,
        }
    }
}

fn affinity(svc: &Service) -> Affinity {
    let Some(spec) = &svc.spec else {
        return Affinity::None;
    };
    if spec.session_affinity.as_deref() != Some("ClientIP") {
        return Affinity::None;
    }
    let timeout = spec
        .session_affinity_config
        .as_ref()
        .and_then(|c| c.client_ip.as_ref())
        .and_then(|c| c.timeout_seconds)
        .and_then(|t| u32::try_from(t).ok())
        .filter(|t| *t > 0)
        .unwrap_or(DEFAULT_AFFINITY_TIMEOUT);
    Affinity::ClientIp {
        timeout_seconds: timeout,
    }
}

/// Ready targets of one Service port for frontends of family `v4`.
fn targets(e: &Exported<'_>, port: &Port, v4: bool) -> Vec<SocketAddr> {
    let mut targets: Vec<SocketAddr> = e
        .slices
        .iter()
        .filter(|s| s.v4 == v4)
        .filter_map(|s| s.target_port(&port.name, port.protocol).map(|tp| (s, tp)))
        .flat_map(|(s, tp)| s.endpoints.iter().map(move |ep| SocketAddr::new(ep.ip, tp)))
        .collect();
    targets.sort();
    targets.dedup();
    targets
}

fn one_cluster(remote: &RemoteServices<'_>) -> (Vec<ProxiedService>, BTreeSet<Skipped>, usize) {
    let input = remote.catalog_input();
    let catalog = read_cluster(&input);
    let mut skipped = catalog.skipped;
    let mut services = Vec::new();
    for e in &catalog.services {
        match &e.shape {
            Shape::Headless => {
                skipped.insert(Skipped {
                    cluster: remote.cluster.name.clone(),
                    namespace: e.namespace.clone(),
                    name: e.name.clone(),
                    reason: SkipReason::Headless,
                    detail: "clusterIP: None".into(),
                });
            }
            Shape::ClusterIp(frontends) => {
                let affinity = affinity(e.service);
                for (frontend, port) in frontends {
                    services.push(ProxiedService {
                        frontend: *frontend,
                        cluster: remote.cluster.name.clone(),
                        namespace: e.namespace.clone(),
                        name: e.name.clone(),
                        port_name: port.name.clone(),
                        affinity,
                        endpoints: targets(e, port, frontend.ip.is_ipv4()),
                    });
                }
            }
        }
    }
    (services, skipped, catalog.not_selected)
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
    use std::collections::BTreeMap;

    use k8s_openapi::api::core::v1::{ClientIPConfig, SessionAffinityConfig};
    use k8s_openapi::api::discovery::v1::Endpoint;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;
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
        crate::fixtures::service(ns, name, &[ip], ports)
    }

    fn ep(ip: &str, ready: Option<bool>, terminating: Option<bool>) -> Endpoint {
        crate::fixtures::endpoint(&[ip], None, ready, terminating)
    }

    use crate::fixtures::endpoint_slice as slice;

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
