//! Plain-value builders for the tests: clusters and peers as the apiserver
//! would hand them over.

use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use sdn_tunnel_api::{
    EndpointOverride, SecretKeyRef, TunnelCluster, TunnelClusterSpec, TunnelPeer, TunnelPeerSpec,
};

use crate::catalog::SERVICE_NAME_LABEL;
use crate::mesh::SourcedPeer;

/// A valid, distinct WireGuard public key for every `n`.
pub fn key(n: u32) -> String {
    format!("{n:0>42}A=")
}

/// This node's key in the fixtures.
pub fn own_key() -> String {
    key(999)
}

pub fn cluster(name: &str, pods: &[&str], services: &[&str], local: bool) -> TunnelCluster {
    TunnelCluster::new(
        name,
        TunnelClusterSpec {
            cluster_name: name.into(),
            pod_cidrs: pods.iter().map(|s| s.to_string()).collect(),
            service_cidrs: services.iter().map(|s| s.to_string()).collect(),
            dns_zone: None,
            local,
            kubeconfig_secret_ref: (!local).then(|| SecretKeyRef {
                name: format!("{name}-kubeconfig"),
                namespace: Some("sdn-tunnel".into()),
                key: None,
            }),
            service_selector: None,
            endpoint_overrides: vec![],
        },
    )
}

pub fn with_override(mut c: TunnelCluster, node: &str, endpoint: &str) -> TunnelCluster {
    c.spec.endpoint_overrides.push(EndpointOverride {
        node: node.into(),
        endpoint: endpoint.into(),
    });
    c
}

/// east (local), west and north, disjoint.
pub fn clusters() -> Vec<TunnelCluster> {
    vec![
        cluster("east", &["10.1.0.0/16"], &["172.30.0.0/16"], true),
        cluster("west", &["10.2.0.0/16"], &["172.31.0.0/16"], false),
        cluster(
            "north",
            &["10.3.0.0/16", "fd00:3::/48"],
            &["172.29.0.0/16"],
            false,
        ),
    ]
}

pub fn peer(cluster: &str, node: &str, key_n: u32, pods: &[&str]) -> TunnelPeer {
    let mut p = TunnelPeer::new(
        &format!("{cluster}-{node}"),
        TunnelPeerSpec {
            cluster: cluster.into(),
            node: node.into(),
            public_key: key(key_n),
            endpoints: vec![format!("192.0.2.{}:51820", key_n % 250 + 1)],
            pod_cidrs: pods.iter().map(|s| s.to_string()).collect(),
            listen_port: 51820,
            mtu: Some(1420),
        },
    );
    p.metadata = ObjectMeta {
        namespace: Some("sdn-tunnel".into()),
        ..p.metadata
    };
    p
}

/// Honest peers: two in west, one in north.
pub fn peers() -> Vec<TunnelPeer> {
    vec![
        peer("west", "w1", 1, &["10.2.1.0/24"]),
        peer("west", "w2", 2, &["10.2.2.0/24"]),
        peer("north", "n1", 3, &["10.3.1.0/24", "fd00:3:0:1::/64"]),
    ]
}

/// Each peer read from the cluster its spec names.
pub fn sourced(peers: &[TunnelPeer]) -> Vec<SourcedPeer<'_>> {
    peers
        .iter()
        .map(|p| SourcedPeer {
            source: &p.spec.cluster,
            peer: p,
        })
        .collect()
}

/// Our own `TunnelPeer` spec in east.
pub fn local_peer() -> TunnelPeerSpec {
    TunnelPeerSpec {
        cluster: "east".into(),
        node: "e1".into(),
        public_key: own_key(),
        endpoints: vec!["192.0.2.200:51820".into()],
        pod_cidrs: vec!["10.1.1.0/24".into()],
        listen_port: 51820,
        mtu: None,
    }
}

/// A `Service` with these ClusterIPs (the first is also `clusterIP`) and
/// `(name, protocol, port)` ports; an empty name is an unnamed port.
pub fn service(ns: &str, name: &str, ips: &[&str], ports: &[(&str, &str, i32)]) -> Service {
    Service {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(ns.into()),
            ..Default::default()
        },
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".into()),
            cluster_ip: ips.first().map(|s| s.to_string()),
            cluster_ips: Some(ips.iter().map(|s| s.to_string()).collect()),
            ports: Some(
                ports
                    .iter()
                    .map(|(n, proto, port)| ServicePort {
                        name: (!n.is_empty()).then(|| n.to_string()),
                        protocol: Some(proto.to_string()),
                        port: *port,
                        ..Default::default()
                    })
                    .collect(),
            ),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// An endpoint with these addresses, hostname and conditions.
pub fn endpoint(
    addrs: &[&str],
    hostname: Option<&str>,
    ready: Option<bool>,
    terminating: Option<bool>,
) -> Endpoint {
    Endpoint {
        addresses: addrs.iter().map(|s| s.to_string()).collect(),
        hostname: hostname.map(String::from),
        conditions: Some(EndpointConditions {
            ready,
            serving: ready,
            terminating,
        }),
        ..Default::default()
    }
}

/// An `EndpointSlice` `name` of Service `ns/svc`, with `(name, protocol,
/// port)` ports.
pub fn endpoint_slice(
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
                    name: Some(n.to_string()),
                    protocol: Some(proto.to_string()),
                    port: Some(*port),
                    ..Default::default()
                })
                .collect(),
        ),
    }
}
