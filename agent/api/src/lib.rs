//! sdn-tunnel API types: the `TunnelCluster` and `TunnelPeer` custom resources,
//! their validation, and the generator of `deploy/crds`.
//!
//! This crate is the one place where the API group and version are defined;
//! every other crate refers to them from here.
//!
//! CIDRs are carried as plain strings on the wire on purpose: a remote
//! `TunnelPeer` with a garbage CIDR must still deserialize, so that the agent
//! can refuse it with a readable status condition instead of having its watch
//! fail on the object. Parsing and the mesh-level checks (containment,
//! overlap, forbidden ranges) live in `sdn-tunnel-core`; this crate only has
//! the checks that concern a single field (key format, endpoint, port, MTU).

pub mod cluster;
pub mod crdgen;
pub mod peer;
mod schema;
pub mod validate;

pub use cluster::{
    EndpointOverride, SecretKeyRef, ServiceSelector, TunnelCluster, TunnelClusterSpec,
    TunnelClusterStatus,
};
pub use peer::{PeerState, RemotePeerStatus, TunnelPeer, TunnelPeerSpec, TunnelPeerStatus};
pub use validate::{Endpoint, EndpointHost, ValidationError};

/// API group of every sdn-tunnel custom resource.
pub const GROUP: &str = "sdntunnel.io";
/// API version served for the custom resources.
pub const VERSION: &str = "v1alpha1";
/// `apiVersion` of the custom resources. `concat!` cannot take constants and
/// the `#[kube(group, version)]` attributes need literals, so the literals are
/// repeated there; a unit test checks that all of them agree with [`GROUP`]
/// and [`VERSION`].
pub const API_VERSION: &str = "sdntunnel.io/v1alpha1";

/// Condition type on `TunnelCluster` and `TunnelPeer`: the tunnel to the
/// cluster / the peer set is up.
pub const CONDITION_CONNECTED: &str = "Connected";
/// Condition type: something was refused or is not working; the reason says what.
pub const CONDITION_DEGRADED: &str = "Degraded";
/// Condition type on a `TunnelPeer` as seen by another cluster: accepted or not.
pub const CONDITION_ACCEPTED: &str = "Accepted";

#[cfg(test)]
mod tests {
    use super::*;
    use kube::core::Resource;

    #[test]
    fn api_version_matches_group_and_version() {
        assert_eq!(API_VERSION, format!("{GROUP}/{VERSION}"));
        assert_eq!(TunnelCluster::group(&()), GROUP);
        assert_eq!(TunnelCluster::version(&()), VERSION);
        assert_eq!(TunnelPeer::group(&()), GROUP);
        assert_eq!(TunnelPeer::version(&()), VERSION);
        assert_eq!(TunnelPeer::api_version(&()), API_VERSION);
    }

    /// Objects as a Kubernetes 1.20 apiserver returned them after
    /// `kubectl apply -f deploy/crds` and a status patch (captured into
    /// `testdata/`): the Rust types must read what the apiserver stores.
    #[test]
    fn reads_objects_returned_by_a_1_20_apiserver() {
        let p: TunnelPeer =
            serde_json::from_str(include_str!("../testdata/tunnelpeer-k8s-1.20.json")).unwrap();
        assert_eq!(p.spec.validate().unwrap().len(), 2);
        let st = p.status.unwrap();
        assert_eq!(st.peers[0].state, PeerState::Connected);
        assert_eq!(st.peers[0].rtt_micros, Some(300));
        assert_eq!(st.conditions[0].type_, CONDITION_CONNECTED);
        assert!(st.last_update.is_some());

        let c: TunnelCluster =
            serde_json::from_str(include_str!("../testdata/tunnelcluster-k8s-1.20.json")).unwrap();
        assert_eq!(c.spec.validate(), Ok(()));
        assert_eq!(c.spec.dns_zone(), "cluster.west");
        assert_eq!(c.spec.pod_cidrs, ["10.2.0.0/16", "fd00:2::/48"]);
        assert!(c
            .spec
            .service_selector
            .unwrap()
            .namespace_selector
            .is_some());
        assert_eq!(c.spec.endpoint_overrides[0].endpoint, "lb.example.com:4500");
        assert_eq!(c.status.unwrap().conditions[0].status, "True");
    }
}
