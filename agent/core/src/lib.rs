//! sdn-tunnel core: pure functions from a snapshot of the world (local node,
//! declared clusters, remote peers, services, `now`) to the desired state of
//! the data path (peers, allowed IPs, routes, nftables elements, DNS records)
//! and to the status the agent reports.
//!
//! Nothing here performs I/O or reads a clock: drivers in `agent/daemon`
//! observe and apply, this crate decides.
//!
//! - [`catalog`]: the one reading of Services and EndpointSlices (what is
//!   exported, which endpoints are ready) that [`services`] and [`dns`] share.
//! - [`cidr`]: prefix parsing and relations, forbidden ranges.
//! - [`mesh`]: which declared clusters and remote `TunnelPeer`s are accepted,
//!   and why the others are refused.
//! - [`desired`]: WireGuard peers and routes to install, and a keyed diff.
//! - [`status`]: peer states, conditions and counters to report.
//! - [`engine`]: the agent's state machine: events in, one plan out (what
//!   runs; see docs/ARCHITECTURE.md).

pub mod catalog;
pub mod cidr;
pub mod desired;
pub mod dns;
pub mod engine;
pub mod mesh;
pub mod services;
pub mod status;

pub use desired::{
    desired_state, diff, DesiredError, DesiredPeer, DesiredRoute, DesiredState, Diff, RouteKind,
    Snapshot,
};
pub use mesh::{
    validate_mesh, AcceptedCluster, AcceptedPeer, LocalCluster, Mesh, MeshError, ObjectKind,
    ObjectRef, Refusal, RefusalReason, SourcedPeer,
};

#[cfg(test)]
mod fixtures;
#[cfg(test)]
mod tests_catalog;
#[cfg(test)]
mod tests_desired;
#[cfg(test)]
mod tests_engine;
#[cfg(test)]
mod tests_mesh;
#[cfg(test)]
mod tests_status;
