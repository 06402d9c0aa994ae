//! `TunnelPeer`: one per node, written by that node's agent in its own
//! cluster. It is the key exchange: other clusters' agents read it to learn
//! the node's public key, endpoint and pod CIDRs, and the status tells what
//! the node sees of every remote peer.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::validate::{
    validate_mtu, validate_port, validate_public_key, Endpoint, ValidationError,
};

/// Lowest MTU accepted: the IPv4 minimum reassembly size. A tunnel that only
/// carries IPv4 may go that low; IPv6 needs 1280.
pub const MIN_MTU: i32 = 576;
/// Highest MTU accepted: jumbo frames.
pub const MAX_MTU: i32 = 9000;

/// The WireGuard identity and reachability of one node, published by its agent.
// Several `printcolumn(type_ = "string", ...)` entries are distinct columns,
// not repeated attributes; clippy's `duplicated_attributes` cannot tell.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "sdntunnel.io",
    version = "v1alpha1",
    kind = "TunnelPeer",
    plural = "tunnelpeers",
    namespaced,
    shortname = "tpeer",
    category = "sdntunnel",
    status = "TunnelPeerStatus",
    derive = "PartialEq",
    doc = "One node of the sdn-tunnel mesh: its WireGuard public key, endpoints and pod CIDRs, published by the node's agent.",
    printcolumn(name = "Cluster", type_ = "string", json_path = ".spec.cluster"),
    printcolumn(name = "Node", type_ = "string", json_path = ".spec.node"),
    printcolumn(name = "Endpoint", type_ = "string", json_path = ".spec.endpoints[0]"),
    printcolumn(name = "Pod CIDRs", type_ = "string", json_path = ".spec.podCIDRs"),
    printcolumn(
        name = "Public Key",
        type_ = "string",
        json_path = ".spec.publicKey",
        priority = 1
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct TunnelPeerSpec {
    /// Name of the cluster the node belongs to (its `TunnelCluster.spec.clusterName`).
    #[schemars(schema_with = "crate::schema::dns_label")]
    pub cluster: String,

    /// Name of the Node object.
    #[schemars(length(min = 1, max = 253))]
    pub node: String,

    /// The node's WireGuard public key (base64 of 32 bytes). The private key
    /// never leaves the node.
    #[schemars(schema_with = "crate::schema::public_key")]
    pub public_key: String,

    /// Where the node receives WireGuard UDP, `host:port`, preferred first.
    #[schemars(schema_with = "crate::schema::endpoint_list")]
    pub endpoints: Vec<String>,

    /// Pod CIDRs of the node (`Node.spec.podCIDRs`); the allowed IPs of the
    /// WireGuard peer other clusters make for it.
    #[serde(rename = "podCIDRs")]
    #[schemars(schema_with = "crate::schema::cidr_list")]
    pub pod_cidrs: Vec<String>,

    /// UDP port the agent listens on.
    #[schemars(range(min = 1, max = 65535))]
    pub listen_port: i32,

    /// Tunnel MTU of the node, when fixed; derived from the path otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 576, max = 9000))]
    pub mtu: Option<i32>,
}

/// State of one remote peer as seen by the node writing the status.
#[derive(
    JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash,
)]
pub enum PeerState {
    /// A handshake completed recently; traffic can flow.
    Connected,
    /// Accepted, but no handshake has completed yet.
    Handshaking,
    /// The last handshake is too old: the session has expired.
    Stale,
    /// Refused by validation; not on the data path.
    Rejected,
}

/// What the node writing the status sees of one remote peer.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RemotePeerStatus {
    /// Cluster of the remote peer.
    pub cluster: String,
    /// Node of the remote peer.
    pub node: String,
    /// Public key of the remote peer, as published.
    pub public_key: String,
    /// Endpoint in use (override or first published endpoint).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// Connected, Handshaking, Stale or Rejected.
    pub state: PeerState,
    /// Machine-readable reason, set when `Rejected` or not connected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Human-readable explanation of `reason`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Seconds since the last completed handshake; unset if none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub last_handshake_age_seconds: Option<i64>,
    /// Bytes received from the peer.
    #[serde(default)]
    #[schemars(range(min = 0))]
    pub rx_bytes: i64,
    /// Bytes sent to the peer.
    #[serde(default)]
    #[schemars(range(min = 0))]
    pub tx_bytes: i64,
    /// Last measured round trip, microseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub rtt_micros: Option<i64>,
}

/// Written by the node's agent every few seconds.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TunnelPeerStatus {
    /// One entry per remote peer known to this node.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub peers: Vec<RemotePeerStatus>,
    /// `Connected`, `Degraded`, … with reason and message.
    // A list-map keyed by `type`, so that server-side apply by several field
    // managers merges conditions instead of replacing the whole list.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// When the agent last wrote this status; lets readers spot a dead agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_update: Option<Time>,
}

impl TunnelPeerSpec {
    /// Field-level checks that need no knowledge of the mesh: names, key,
    /// endpoints, port and MTU. Returns the parsed endpoints, preferred first.
    /// CIDR checks are mesh-level and live in `sdn-tunnel-core`.
    pub fn validate(&self) -> Result<Vec<Endpoint>, ValidationError> {
        crate::validate::validate_dns_label(&self.cluster)?;
        if self.node.is_empty() {
            return Err(ValidationError::EmptyField("node"));
        }
        validate_public_key(&self.public_key)?;
        validate_port(self.listen_port)?;
        if let Some(mtu) = self.mtu {
            validate_mtu(mtu)?;
        }
        if self.endpoints.is_empty() {
            return Err(ValidationError::EmptyField("endpoints"));
        }
        self.endpoints.iter().map(|e| Endpoint::parse(e)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn spec() -> TunnelPeerSpec {
        TunnelPeerSpec {
            cluster: "west".into(),
            node: "w1".into(),
            public_key: "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw=".into(),
            endpoints: vec!["192.0.2.10:51820".into(), "[2001:db8::a]:51820".into()],
            pod_cidrs: vec!["10.2.1.0/24".into()],
            listen_port: 51820,
            mtu: Some(1420),
        }
    }

    #[test]
    fn valid_spec_parses_endpoints_in_order() {
        let eps = spec().validate().unwrap();
        assert_eq!(eps.len(), 2);
        assert_eq!(eps[0].to_string(), "192.0.2.10:51820");
        assert_eq!(eps[1].to_string(), "[2001:db8::a]:51820");
    }

    #[test]
    fn each_field_check_fails() {
        let mut s = spec();
        s.public_key = "garbage".into();
        assert!(matches!(s.validate(), Err(ValidationError::BadKey { .. })));
        let mut s = spec();
        s.listen_port = 0;
        assert!(matches!(s.validate(), Err(ValidationError::BadPort(0))));
        let mut s = spec();
        s.mtu = Some(100);
        assert!(matches!(s.validate(), Err(ValidationError::BadMtu(100))));
        let mut s = spec();
        s.endpoints = vec![];
        assert!(matches!(
            s.validate(),
            Err(ValidationError::EmptyField("endpoints"))
        ));
        let mut s = spec();
        s.endpoints.push("192.0.2.1".into());
        assert!(matches!(
            s.validate(),
            Err(ValidationError::BadEndpoint { .. })
        ));
        let mut s = spec();
        s.node = String::new();
        assert!(matches!(
            s.validate(),
            Err(ValidationError::EmptyField("node"))
        ));
    }

    #[test]
    fn status_round_trips_with_wire_names() {
        let st = RemotePeerStatus {
            cluster: "east".into(),
            node: "e1".into(),
            public_key: spec().public_key,
            endpoint: Some("192.0.2.1:51820".into()),
            state: PeerState::Connected,
            reason: None,
            message: None,
            last_handshake_age_seconds: Some(3),
            rx_bytes: 10,
            tx_bytes: 20,
            rtt_micros: Some(250),
        };
        let v = serde_json::to_value(&st).unwrap();
        assert_eq!(v["state"], "Connected");
        assert_eq!(v["lastHandshakeAgeSeconds"], 3);
        assert_eq!(v["rttMicros"], 250);
        let back: RemotePeerStatus = serde_json::from_value(v).unwrap();
        assert_eq!(back, st);
    }
}
