//! sdn-tunnel API types: the `TunnelCluster` and `TunnelPeer` custom resources,
//! their validation, and the generator of `deploy/crds`.
//!
//! This crate is the one place where the API group and version are defined;
//! every other crate refers to them from here.

/// API group of every sdn-tunnel custom resource.
pub const GROUP: &str = "sdntunnel.io";
/// API version served for the custom resources.
pub const VERSION: &str = "v1alpha1";
