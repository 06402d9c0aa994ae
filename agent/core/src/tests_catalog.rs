//! DNS and the proxy read Services and EndpointSlices through one
//! [`crate::catalog`]: what one names, the other programs.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement};
use k8s_openapi::jiff::Timestamp;
use proptest::prelude::*;
use sdn_tunnel_api::{ServiceSelector, TunnelCluster};

use crate::catalog::{
    is_dns_label, NamespaceLabels, SkipReason, MAX_PORTS, NAMESPACE_NAME_LABEL, SERVICE_NAME_LABEL,
};
use crate::dns::{dns_records, service_fqdn, ClusterObjects, DnsInput, DnsPolicy, RecordData};
use crate::fixtures::{cluster, endpoint, endpoint_slice, service};
use crate::mesh::AcceptedCluster;
use crate::services::{desired_proxy, ProxyState, RemoteServices};

const POD_CIDRS: [&str; 2] = ["10.2.0.0/16", "fd00:2::/48"];
const SERVICE_CIDRS: [&str; 2] = ["10.102.0.0/16", "fd00:102::/112"];

fn accepted_west() -> AcceptedCluster {
    AcceptedCluster {
        name: "west".into(),
        object_name: "west".into(),
        pod_cidrs: POD_CIDRS.iter().map(|c| c.parse().unwrap()).collect(),
        service_cidrs: SERVICE_CIDRS.iter().map(|c| c.parse().unwrap()).collect(),
        dns_zone: "cluster.west".into(),
        endpoint_overrides: BTreeMap::new(),
    }
}

fn declared(selector: Option<&ServiceSelector>) -> Vec<TunnelCluster> {
    let mut west = cluster("west", &POD_CIDRS, &SERVICE_CIDRS, false);
    west.spec.service_selector = selector.cloned();
    vec![
        cluster("east", &["10.1.0.0/16"], &["10.101.0.0/16"], true),
        west,
    ]
}

/// `(addresses, hostname, ready, terminating)`.
type Ep = (Vec<String>, Option<String>, Option<bool>, Option<bool>);

fn svc(ns: &str, name: &str, ips: &[&str], ports: &[(&str, &str, i32)]) -> Service {
    service(ns, name, ips, ports)
}

fn slice(
    ns: &str,
    svc: &str,
    name: &str,
    family: &str,
    ports: &[(&str, &str, i32)],
    eps: &[Ep],
) -> EndpointSlice {
    let eps = eps
        .iter()
        .map(|(addrs, host, ready, term)| {
            let addrs: Vec<&str> = addrs.iter().map(String::as_str).collect();
            endpoint(&addrs, host.as_deref(), *ready, *term)
        })
        .collect();
    endpoint_slice(ns, svc, name, family, ports, eps)
}

fn ep(addr: &str, ready: Option<bool>) -> Ep {
    (vec![addr.into()], None, ready, None)
}

struct Both {
    proxy: ProxyState,
    dns: crate::dns::DnsRecords,
}

fn both(
    selector: Option<&ServiceSelector>,
    services: &[Service],
    slices: &[EndpointSlice],
    namespaces: &NamespaceLabels,
) -> Both {
    let west = accepted_west();
    let proxy = desired_proxy(&[RemoteServices {
        cluster: &west,
        selector,
        services: services.iter().collect(),
        slices: slices.iter().collect(),
        namespaces,
    }]);
    let objects: BTreeMap<String, ClusterObjects> = [(
        "west".to_string(),
        ClusterObjects {
            peers: vec![],
            services: services.to_vec(),
            slices: slices.to_vec(),
            namespaces: namespaces.clone(),
        },
    )]
    .into();
    let dns = dns_records(DnsInput {
        local_cluster: "east",
        clusters: &declared(selector),
        objects: &objects,
        now: Timestamp::from_second(1_800_000_000).unwrap(),
        policy: &DnsPolicy::default(),
    });
    Both { proxy, dns }
}

impl Both {
    fn addrs(&self, ns: &str, name: &str) -> BTreeSet<IpAddr> {
        self.dns.zones["cluster.west"].addrs(&service_fqdn(name, ns, "cluster.west"))
    }

    fn proxied_ips(&self, ns: &str, name: &str) -> BTreeSet<IpAddr> {
        self.proxy
            .services
            .iter()
            .filter(|s| s.namespace == ns && s.name == name)
            .map(|s| s.frontend.ip)
            .collect()
    }

    /// `(port name, protocol, port)` of the SRV records of a Service name
    /// that point at the Service name itself.
    fn srv(&self, ns: &str, name: &str) -> BTreeSet<(String, String, u16)> {
        let fqdn = service_fqdn(name, ns, "cluster.west");
        let mut out = BTreeSet::new();
        for (owner, data) in &self.dns.zones["cluster.west"].records {
            let Some(prefix) = owner.strip_suffix(&format!(".{fqdn}")) else {
                continue;
            };
            let Some((pn, proto)) = prefix.split_once('.') else {
                continue;
            };
            let (Some(pn), Some(proto)) = (pn.strip_prefix('_'), proto.strip_prefix('_')) else {
                continue;
            };
            for d in data {
                if let RecordData::Srv { port, target } = d {
                    if *target == fqdn {
                        out.insert((pn.to_string(), proto.to_string(), *port));
                    }
                }
            }
        }
        out
    }

    fn proxied_srv(&self, ns: &str, name: &str) -> BTreeSet<(String, String, u16)> {
        self.proxy
            .services
            .iter()
            .filter(|s| s.namespace == ns && s.name == name && is_dns_label(&s.port_name))
            .map(|s| {
                let proto = s.frontend.protocol.as_str().to_string();
                (s.port_name.clone(), proto, s.frontend.port)
            })
            .collect()
    }

    fn headless(&self, ns: &str, name: &str) -> bool {
        self.proxy
            .skipped
            .iter()
            .any(|k| k.namespace == ns && k.name == name && k.reason == SkipReason::Headless)
    }
}

/// The ready endpoints of a Service as the API defines them, written out
/// independently of the catalog: ready (unset = ready), not terminating,
/// first address an IP of the slice's family inside the pod CIDRs.
fn oracle_ready(slices: &[EndpointSlice], ns: &str, name: &str) -> BTreeSet<IpAddr> {
    let pods = accepted_west().pod_cidrs;
    let mut out = BTreeSet::new();
    for s in slices {
        let label = s
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(SERVICE_NAME_LABEL));
        if s.metadata.namespace.as_deref() != Some(ns) || label.map(String::as_str) != Some(name) {
            continue;
        }
        let v4 = match s.address_type.as_str() {
            "IPv4" => true,
            "IPv6" => false,
            _ => continue,
        };
        for e in &s.endpoints {
            let c = e.conditions.clone().unwrap_or_default();
            if c.ready == Some(false) || c.terminating == Some(true) {
                continue;
            }
            let Some(Ok(ip)) = e.addresses.first().map(|a| a.parse::<IpAddr>()) else {
                continue;
            };
            if ip.is_ipv4() == v4 && pods.iter().any(|p| p.contains(&ip)) {
                out.insert(ip);
            }
        }
    }
    out
}

#[test]
fn dual_stack_services_are_named_by_every_proxied_cluster_ip() {
    // Behaviour change: DNS read only `clusterIP`; it now answers every
    // ClusterIP the proxy programs (A and AAAA).
    let services = [svc(
        "demo",
        "web",
        &["10.102.0.10", "fd00:102::10"],
        &[("http", "TCP", 80)],
    )];
    let b = both(None, &services, &[], &NamespaceLabels::new());
    let want: BTreeSet<IpAddr> = [
        "10.102.0.10".parse().unwrap(),
        "fd00:102::10".parse().unwrap(),
    ]
    .into();
    assert_eq!(b.addrs("demo", "web"), want);
    assert_eq!(b.proxied_ips("demo", "web"), want);
}

#[test]
fn dns_names_only_services_with_a_usable_frontend() {
    let mut dup_a = svc("a", "web", &["10.102.0.20"], &[("http", "TCP", 80)]);
    dup_a.metadata.labels = None;
    let services = [
        // every port unusable: nothing proxied, so nothing named
        svc(
            "demo",
            "broken",
            &["10.102.0.10"],
            &[("x", "ICMP", 80), ("y", "TCP", 0)],
        ),
        // one good port among bad ones: named, SRV only for the good one
        svc(
            "demo",
            "mixed",
            &["10.102.0.11"],
            &[("http", "TCP", 80), ("bad", "TCP", 0)],
        ),
        // a second claimant of a frontend is named nowhere
        dup_a,
        svc("b", "web", &["10.102.0.20"], &[("http", "TCP", 80)]),
        // more than MAX_PORTS ports: neither proxied nor named
        svc(
            "demo",
            "many",
            &["10.102.0.12"],
            &(0..=MAX_PORTS as i32)
                .map(|i| ("", "TCP", 1000 + i))
                .collect::<Vec<_>>(),
        ),
        // not a DNS label: neither named nor proxied
        svc("Demo_X", "web", &["10.102.0.13"], &[("http", "TCP", 80)]),
    ];
    let b = both(None, &services, &[], &NamespaceLabels::new());
    assert!(b.addrs("demo", "broken").is_empty());
    assert!(b.proxied_ips("demo", "broken").is_empty());
    assert_eq!(
        b.addrs("demo", "mixed"),
        ["10.102.0.11".parse().unwrap()].into()
    );
    assert_eq!(
        b.srv("demo", "mixed"),
        [("http".to_string(), "tcp".to_string(), 80)].into()
    );
    assert_eq!(b.addrs("a", "web"), ["10.102.0.20".parse().unwrap()].into());
    assert!(b.addrs("b", "web").is_empty());
    assert!(b.proxied_ips("b", "web").is_empty());
    assert!(b.addrs("demo", "many").is_empty());
    assert!(b.proxied_ips("demo", "many").is_empty());
    assert!(b.proxied_ips("Demo_X", "web").is_empty());
    let reasons: BTreeSet<(&str, SkipReason)> = b
        .proxy
        .skipped
        .iter()
        .map(|k| (k.name.as_str(), k.reason))
        .collect();
    for want in [
        ("web", SkipReason::DuplicateFrontend),
        ("many", SkipReason::TooManyPorts),
        ("web", SkipReason::BadName),
        ("broken", SkipReason::UnsupportedProtocol),
        ("broken", SkipReason::BadPort),
    ] {
        assert!(reasons.contains(&want), "{want:?} in {reasons:?}");
    }
    // DNS reports the same skips (plus nothing of its own for these)
    let dns: BTreeSet<_> = b.dns.skipped.iter().cloned().collect();
    let proxy: BTreeSet<_> = b.proxy.skipped.iter().cloned().collect();
    assert_eq!(dns, proxy);
}

#[test]
fn headless_names_the_first_address_of_ready_endpoints_of_the_slice_family() {
    // Behaviour change: DNS answered every address of an endpoint and did
    // not check it against the slice's family; it now reads endpoints as
    // the proxy does (first address, of the slice's family).
    let services = [svc("demo", "db", &["None"], &[("sql", "TCP", 5432)])];
    let slices = [
        slice(
            "demo",
            "db",
            "db-v4",
            "IPv4",
            &[("sql", "TCP", 5432)],
            &[
                (
                    vec!["10.2.1.5".into(), "10.2.1.6".into()],
                    Some("db-0".into()),
                    None,
                    None,
                ),
                ep("fd00:2::9", Some(true)),
                ep("10.2.1.7", Some(false)),
            ],
        ),
        slice("demo", "db", "db-f", "FQDN", &[], &[ep("db.example", None)]),
    ];
    let b = both(None, &services, &slices, &NamespaceLabels::new());
    assert_eq!(b.addrs("demo", "db"), ["10.2.1.5".parse().unwrap()].into());
    assert_eq!(b.addrs("demo", "db"), oracle_ready(&slices, "demo", "db"));
    let reasons: Vec<(SkipReason, &str)> = b
        .dns
        .skipped
        .iter()
        .map(|k| (k.reason, k.detail.as_str()))
        .collect();
    assert_eq!(
        reasons,
        [
            (SkipReason::BadEndpointAddress, "fd00:2::9"),
            (SkipReason::FqdnEndpoints, "db-f"),
        ]
    );
}

// ---- the property ----

fn arb_cluster_ip() -> impl Strategy<Value = &'static str> {
    prop_oneof![
        Just("10.102.0.1"),
        Just("10.102.0.2"),
        Just("10.102.0.3"),
        Just("fd00:102::1"),
        Just("10.101.0.1"), // the local cluster's service range
        Just("10.2.0.1"),   // a pod address
        Just("None"),
        Just("junk"),
    ]
}

fn arb_endpoint_ip() -> impl Strategy<Value = String> {
    prop_oneof![
        (0u8..3, 0u8..3).prop_map(|(a, b)| format!("10.2.{a}.{b}")),
        (0u8..3).prop_map(|b| format!("10.1.0.{b}")),
        (0u8..2).prop_map(|b| format!("fd00:2::{b}")),
        Just("fd00:3::1".to_string()),
        Just("junk".to_string()),
    ]
}

fn arb_port() -> impl Strategy<Value = (&'static str, &'static str, i32)> {
    (
        prop_oneof![Just(""), Just("a"), Just("b"), Just("B_x")],
        prop_oneof![Just("TCP"), Just("UDP"), Just("SCTP"), Just("ICMP")],
        prop_oneof![Just(80), Just(53), Just(0)],
    )
}

fn arb_selector() -> impl Strategy<Value = Option<ServiceSelector>> {
    prop_oneof![
        Just(None),
        Just(Some(ServiceSelector {
            namespace_selector: None,
            selector: Some(LabelSelector {
                match_labels: Some([("export".to_string(), "yes".to_string())].into()),
                match_expressions: None,
            }),
        })),
        Just(Some(ServiceSelector {
            namespace_selector: Some(LabelSelector {
                match_labels: None,
                match_expressions: Some(vec![LabelSelectorRequirement {
                    key: NAMESPACE_NAME_LABEL.into(),
                    operator: "NotIn".into(),
                    values: Some(vec!["ns2".into()]),
                }]),
            }),
            selector: None,
        })),
        Just(Some(ServiceSelector {
            namespace_selector: Some(LabelSelector {
                match_labels: Some([("team".to_string(), "a".to_string())].into()),
                match_expressions: None,
            }),
            selector: None,
        })),
    ]
}

type World = (Vec<Service>, Vec<EndpointSlice>);

fn arb_world() -> impl Strategy<Value = World> {
    let services = prop::collection::vec(
        (
            0u8..4,
            prop::collection::vec(arb_cluster_ip(), 0..3),
            prop::collection::vec(arb_port(), 0..3),
            any::<bool>(),
            any::<bool>(),
        ),
        0..6,
    );
    let slices = prop::collection::vec(
        (
            0u8..6,
            prop_oneof![Just("IPv4"), Just("IPv6"), Just("FQDN")],
            prop::collection::vec(arb_port(), 0..3),
            prop::collection::vec(
                (
                    prop::collection::vec(arb_endpoint_ip(), 0..3),
                    prop::option::of(prop_oneof![Just("h0".to_string()), Just("h1".to_string())]),
                    any::<Option<bool>>(),
                    any::<Option<bool>>(),
                ),
                0..5,
            ),
        ),
        0..8,
    );
    (services, slices).prop_map(|(svcs, slices)| {
        let services = svcs
            .into_iter()
            .enumerate()
            .map(|(i, (n, ips, ports, exported, external))| {
                // namespace 3 is not a DNS label
                let ns = if n == 3 {
                    "Ns_3".to_string()
                } else {
                    format!("ns{n}")
                };
                let mut s = svc(&ns, &format!("s{i}"), &ips, &ports);
                if exported {
                    s.metadata.labels = Some([("export".to_string(), "yes".to_string())].into());
                }
                if external {
                    if let Some(spec) = s.spec.as_mut() {
                        if ips.is_empty() {
                            spec.type_ = Some("ExternalName".into());
                            spec.external_name = Some("example.org".into());
                        }
                    }
                }
                s
            })
            .collect();
        let slices = slices
            .into_iter()
            .enumerate()
            .map(|(i, (n, fam, ports, eps))| {
                slice(
                    &format!("ns{}", n % 3),
                    &format!("s{n}"),
                    &format!("sl{i}"),
                    fam,
                    &ports,
                    &eps,
                )
            })
            .collect();
        (services, slices)
    })
}

proptest! {
    /// For random Services, slices and selectors of a remote cluster, the
    /// cluster's DNS zone answers exactly what the proxy programs: per
    /// ClusterIP Service the ClusterIPs it has frontends on (and SRV for
    /// the named frontend ports); per headless Service the ready endpoints;
    /// nothing for what the proxy refuses. And the proxy never targets an
    /// endpoint that is not ready by the API's definition.
    #[test]
    fn dns_answers_exactly_what_the_proxy_programs(
        (services, slices) in arb_world(),
        selector in arb_selector(),
        team_a in any::<bool>(),
    ) {
        let namespaces: NamespaceLabels = if team_a {
            [("ns1".to_string(), [("team".to_string(), "a".to_string())].into())].into()
        } else {
            NamespaceLabels::new()
        };
        let b = both(selector.as_ref(), &services, &slices, &namespaces);
        for s in &services {
            let ns = s.metadata.namespace.clone().unwrap_or_default();
            let name = s.metadata.name.clone().unwrap_or_default();
            let ready = oracle_ready(&slices, &ns, &name);
            for p in b.proxy.services.iter().filter(|p| p.namespace == ns && p.name == name) {
                for t in &p.endpoints {
                    prop_assert!(ready.contains(&t.ip()), "{t} not ready for {ns}/{name}");
                }
            }
            if !is_dns_label(&ns) {
                prop_assert!(b.proxied_ips(&ns, &name).is_empty());
                continue;
            }
            if b.headless(&ns, &name) {
                prop_assert!(b.proxied_ips(&ns, &name).is_empty());
                prop_assert_eq!(b.addrs(&ns, &name), ready, "headless {}/{}", ns, name);
            } else {
                prop_assert_eq!(b.addrs(&ns, &name), b.proxied_ips(&ns, &name), "{}/{}", ns, name);
                prop_assert_eq!(b.srv(&ns, &name), b.proxied_srv(&ns, &name), "{}/{}", ns, name);
            }
        }
        // Both report the same skips, except that the proxy also lists
        // the headless Services it leaves to DNS.
        let dns: BTreeSet<_> = b.dns.skipped.iter().cloned().collect();
        let proxy: BTreeSet<_> = b
            .proxy
            .skipped
            .iter()
            .filter(|k| k.reason != SkipReason::Headless)
            .cloned()
            .collect();
        prop_assert_eq!(dns, proxy);
    }
}

#[test]
fn a_cluster_without_usable_cidrs_exports_nothing() {
    // Behaviour change: DNS took an empty (or unparseable) CIDR list as
    // "everything inside"; the catalog, like the proxy, takes it as
    // "nothing inside".
    let services = [
        svc("demo", "web", &["10.102.0.10"], &[("http", "TCP", 80)]),
        svc("demo", "db", &["None"], &[("sql", "TCP", 5432)]),
    ];
    let slices = [slice(
        "demo",
        "db",
        "db-a",
        "IPv4",
        &[("sql", "TCP", 5432)],
        &[ep("10.2.1.5", None)],
    )];
    let mut cs = declared(None);
    cs[1].spec.pod_cidrs = vec!["10.2.0.0/33".into()];
    cs[1].spec.service_cidrs = vec![];
    let objects: BTreeMap<String, ClusterObjects> = [(
        "west".to_string(),
        ClusterObjects {
            services: services.to_vec(),
            slices: slices.to_vec(),
            ..Default::default()
        },
    )]
    .into();
    let r = dns_records(DnsInput {
        local_cluster: "east",
        clusters: &cs,
        objects: &objects,
        now: Timestamp::from_second(1_800_000_000).unwrap(),
        policy: &DnsPolicy::default(),
    });
    assert!(r.zones["cluster.west"].records.is_empty(), "{:?}", r.zones);
    let reasons: BTreeSet<SkipReason> = r.skipped.iter().map(|k| k.reason).collect();
    assert_eq!(
        reasons,
        [SkipReason::WrongFamily, SkipReason::EndpointOutsidePodCidrs].into()
    );
}
