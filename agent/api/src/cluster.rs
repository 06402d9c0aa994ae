//! `TunnelCluster`: the admin's declaration of one cluster of the mesh.
//!
//! The local cluster holds one `TunnelCluster` per cluster of the mesh,
//! including itself (`local: true`). What it declares for a remote cluster is
//! the trust anchor: a remote `TunnelPeer` is only accepted when it stays
//! inside the pod CIDRs declared here, whatever the remote cluster says about
//! itself.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::validate::{Endpoint, ValidationError};

/// Default key in the kubeconfig Secret.
pub const DEFAULT_KUBECONFIG_KEY: &str = "kubeconfig";

/// Declaration of one cluster of the mesh, created by the admin or installer.
// Several `printcolumn(type_ = "string", ...)` entries are distinct columns,
// not repeated attributes; clippy's `duplicated_attributes` cannot tell.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "sdntunnel.io",
    version = "v1alpha1",
    kind = "TunnelCluster",
    plural = "tunnelclusters",
    shortname = "tcl",
    category = "sdntunnel",
    status = "TunnelClusterStatus",
    derive = "PartialEq",
    doc = "A cluster of the sdn-tunnel mesh as declared by the local admin: its CIDRs, DNS zone and how to reach its API.",
    printcolumn(name = "Cluster", type_ = "string", json_path = ".spec.clusterName"),
    printcolumn(name = "Local", type_ = "boolean", json_path = ".spec.local"),
    printcolumn(name = "Pod CIDRs", type_ = "string", json_path = ".spec.podCIDRs"),
    printcolumn(
        name = "Connected",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Connected\")].status"
    ),
    printcolumn(name = "Ready", type_ = "integer", json_path = ".status.peersReady"),
    printcolumn(name = "Total", type_ = "integer", json_path = ".status.peersTotal"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct TunnelClusterSpec {
    /// Name of the cluster in the mesh. `TunnelPeer.spec.cluster` of that
    /// cluster's agents must equal it, and it names the DNS zone.
    #[schemars(schema_with = "crate::schema::dns_label")]
    pub cluster_name: String,

    /// Pod CIDRs of the cluster. Every pod CIDR a `TunnelPeer` of this cluster
    /// claims must lie inside one of these.
    #[serde(rename = "podCIDRs")]
    #[schemars(schema_with = "crate::schema::cidr_list")]
    pub pod_cidrs: Vec<String>,

    /// Service (ClusterIP) CIDRs of the cluster.
    #[serde(rename = "serviceCIDRs")]
    #[schemars(schema_with = "crate::schema::cidr_list")]
    pub service_cidrs: Vec<String>,

    /// DNS zone answering for this cluster's services; `cluster.<clusterName>`
    /// when unset (see [`TunnelClusterSpec::dns_zone`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns_zone: Option<String>,

    /// True for the one `TunnelCluster` describing the cluster this object
    /// lives in.
    #[serde(default)]
    pub local: bool,

    /// Secret holding a read-only kubeconfig for a remote cluster. Required
    /// unless `local`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubeconfig_secret_ref: Option<SecretKeyRef>,

    /// Which services of the cluster are exported to the others. Unset means
    /// all services.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_selector: Option<ServiceSelector>,

    /// Endpoints the local agents must use for given nodes of this cluster
    /// instead of the ones their `TunnelPeer` publishes (NAT, load balancer).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub endpoint_overrides: Vec<EndpointOverride>,
}

/// Reference to one key of a Secret.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct SecretKeyRef {
    /// Name of the Secret.
    #[schemars(length(min = 1))]
    pub name: String,
    /// Namespace of the Secret; the agent's namespace when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Key inside the Secret; `kubeconfig` when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

impl SecretKeyRef {
    /// The key to read, with its default.
    pub fn key_or_default(&self) -> &str {
        self.key.as_deref().unwrap_or(DEFAULT_KUBECONFIG_KEY)
    }
}

/// Selects the services of a cluster that are exported to the mesh.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ServiceSelector {
    /// Namespaces whose services are exported; all when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<LabelSelector>,
    /// Labels a service must carry to be exported; all when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<LabelSelector>,
}

/// An endpoint the local admin imposes for one node of a remote cluster.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct EndpointOverride {
    /// Node name, as in the node's `TunnelPeer.spec.node`.
    #[schemars(length(min = 1))]
    pub node: String,
    /// `host:port` to send that node's WireGuard traffic to.
    #[schemars(schema_with = "crate::schema::endpoint")]
    pub endpoint: String,
}

/// What the local agents observe about a declared cluster.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TunnelClusterStatus {
    /// `Connected`, `Degraded`, … with reason and message.
    // A list-map keyed by `type`, so that server-side apply by several field
    // managers merges conditions instead of replacing the whole list.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// Remote peers of this cluster with a recent handshake.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub peers_ready: Option<i32>,
    /// Remote peers of this cluster the agents know about, accepted or not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub peers_total: Option<i32>,
    /// Last time the agents synced this cluster's peers from its API.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_sync: Option<Time>,
}

impl TunnelClusterSpec {
    /// The DNS zone of the cluster, defaulting to `cluster.<clusterName>`. The
    /// default depends on another field, which a CRD schema default cannot
    /// express, hence a method rather than `#[serde(default)]`.
    pub fn dns_zone(&self) -> String {
        match &self.dns_zone {
            Some(zone) if !zone.is_empty() => zone.clone(),
            _ => format!("cluster.{}", self.cluster_name),
        }
    }

    /// Field-level checks that need no knowledge of the rest of the mesh:
    /// the name, a kubeconfig reference for remote clusters, the endpoint
    /// overrides. CIDR checks are mesh-level and live in `sdn-tunnel-core`.
    pub fn validate(&self) -> Result<(), ValidationError> {
        crate::validate::validate_dns_label(&self.cluster_name)?;
        crate::validate::validate_dns_zone(&self.dns_zone())?;
        if !self.local && self.kubeconfig_secret_ref.is_none() {
            return Err(ValidationError::MissingKubeconfigRef(
                self.cluster_name.clone(),
            ));
        }
        for o in &self.endpoint_overrides {
            if o.node.is_empty() {
                return Err(ValidationError::EmptyField("endpointOverrides[].node"));
            }
            Endpoint::parse(&o.endpoint)?;
        }
        Ok(())
    }

    /// The override declared for `node`, if any.
    pub fn endpoint_override(&self, node: &str) -> Option<&str> {
        self.endpoint_overrides
            .iter()
            .find(|o| o.node == node)
            .map(|o| o.endpoint.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> TunnelClusterSpec {
        TunnelClusterSpec {
            cluster_name: "west".into(),
            pod_cidrs: vec!["10.2.0.0/16".into()],
            service_cidrs: vec!["172.31.0.0/16".into()],
            dns_zone: None,
            local: false,
            kubeconfig_secret_ref: Some(SecretKeyRef {
                name: "west-kubeconfig".into(),
                namespace: None,
                key: None,
            }),
            service_selector: None,
            endpoint_overrides: vec![],
        }
    }

    #[test]
    fn dns_zone_defaults_to_cluster_name() {
        let mut s = spec();
        assert_eq!(s.dns_zone(), "cluster.west");
        s.dns_zone = Some("west.example".into());
        assert_eq!(s.dns_zone(), "west.example");
    }

    #[test]
    fn remote_cluster_needs_kubeconfig_ref() {
        let mut s = spec();
        assert_eq!(s.validate(), Ok(()));
        s.kubeconfig_secret_ref = None;
        assert_eq!(
            s.validate(),
            Err(ValidationError::MissingKubeconfigRef("west".into()))
        );
        s.local = true;
        assert_eq!(s.validate(), Ok(()));
    }

    #[test]
    fn bad_override_and_name_refused() {
        let mut s = spec();
        s.endpoint_overrides.push(EndpointOverride {
            node: "w1".into(),
            endpoint: "nope".into(),
        });
        assert!(matches!(
            s.validate(),
            Err(ValidationError::BadEndpoint { .. })
        ));
        let mut s = spec();
        s.dns_zone = Some("bad zone".into());
        assert_eq!(
            s.validate(),
            Err(ValidationError::BadDnsZone("bad zone".into()))
        );
        let mut s = spec();
        s.cluster_name = "West_1".into();
        assert!(matches!(s.validate(), Err(ValidationError::BadName { .. })));
    }

    #[test]
    fn secret_key_default() {
        let r = SecretKeyRef {
            name: "x".into(),
            namespace: None,
            key: None,
        };
        assert_eq!(r.key_or_default(), "kubeconfig");
    }

    #[test]
    fn deserializes_camel_case_wire_names() {
        let json = serde_json::json!({
            "clusterName": "west",
            "podCIDRs": ["10.2.0.0/16"],
            "serviceCIDRs": ["172.31.0.0/16"],
            "kubeconfigSecretRef": {"name": "k", "namespace": "sdn", "key": "cfg"},
            "endpointOverrides": [{"node": "w1", "endpoint": "192.0.2.1:51820"}]
        });
        let s: TunnelClusterSpec = serde_json::from_value(json).unwrap();
        assert_eq!(s.pod_cidrs, vec!["10.2.0.0/16"]);
        assert!(!s.local);
        assert_eq!(s.endpoint_override("w1"), Some("192.0.2.1:51820"));
        assert_eq!(s.endpoint_override("w2"), None);
    }
}
