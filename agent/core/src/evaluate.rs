//! One call from a snapshot of the world to everything the daemon applies
//! and reports: the validated mesh, the desired peers and routes, this node's
//! `TunnelPeer` status and the status of every remote `TunnelCluster`.
//!
//! The daemon's loop is then: gather a [`World`] from its reflectors and the
//! data path's counters, call [`evaluate`], diff the desired state against
//! what is installed, apply, and patch the statuses.

use std::collections::BTreeMap;

use k8s_openapi::jiff::Timestamp;
use sdn_tunnel_api::{TunnelCluster, TunnelClusterStatus, TunnelPeerSpec, TunnelPeerStatus};
use thiserror::Error;

use crate::desired::{desired_state, DesiredError, DesiredState, Snapshot};
use crate::mesh::{validate_mesh, Mesh, MeshError, SourcedPeer};
use crate::status::{cluster_status, own_peer_status, remote_peer_statuses, PeerObservation};

/// The snapshot could not be turned into a desired state; the daemon keeps
/// the data path as it is and reports the error.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum EvaluateError {
    /// The cluster declarations are unusable as a whole.
    #[error(transparent)]
    Mesh(#[from] MeshError),
    /// This node's own `TunnelPeer` does not fit the declarations.
    #[error(transparent)]
    Desired(#[from] DesiredError),
}

/// Everything the decisions depend on, gathered by the daemon.
#[derive(Debug, Clone, Copy)]
pub struct World<'a> {
    /// Every `TunnelCluster` of the local cluster.
    pub clusters: &'a [TunnelCluster],
    /// This node's own `TunnelPeer` spec.
    pub local_peer: &'a TunnelPeerSpec,
    /// `TunnelPeer`s read from the remote clusters, with their source.
    pub remote_peers: &'a [SourcedPeer<'a>],
    /// Data-path counters by public key.
    pub observations: &'a BTreeMap<String, PeerObservation>,
    /// Stored status of each `TunnelCluster`, by object name.
    pub previous_cluster_status: &'a BTreeMap<String, TunnelClusterStatus>,
    /// Stored status of this node's `TunnelPeer`.
    pub previous_own_status: Option<&'a TunnelPeerStatus>,
    /// Last successful sync of each remote cluster's API, by cluster name.
    pub last_sync: &'a BTreeMap<String, Timestamp>,
    /// Keepalive for every peer.
    pub persistent_keepalive: Option<u16>,
    /// The current time.
    pub now: Timestamp,
}

/// The outcome of [`evaluate`].
#[derive(Debug, Clone, PartialEq)]
pub struct Evaluation {
    /// Validation result, with every refusal.
    pub mesh: Mesh,
    /// Peers and routes to install.
    pub desired: DesiredState,
    /// Status to write on this node's `TunnelPeer`.
    pub own_status: TunnelPeerStatus,
    /// Status of each remote `TunnelCluster`, by object name. The local
    /// declaration gets none: its state is the sum of the nodes' statuses.
    pub cluster_statuses: BTreeMap<String, TunnelClusterStatus>,
}

/// Evaluates a snapshot of the world. Pure: the same `World` always gives
/// the same `Evaluation`.
pub fn evaluate(w: &World<'_>) -> Result<Evaluation, EvaluateError> {
    let own_key = w.local_peer.public_key.as_str();
    let mesh = validate_mesh(w.clusters, w.remote_peers, own_key)?;
    let desired = desired_state(&Snapshot {
        local_peer: w.local_peer,
        mesh: &mesh,
        persistent_keepalive: w.persistent_keepalive,
    })?;
    let statuses =
        remote_peer_statuses(&mesh, w.remote_peers, &desired.peers, w.observations, w.now);
    let cluster_statuses = w
        .clusters
        .iter()
        .filter(|c| !c.spec.local)
        .filter_map(|c| {
            let name = c.metadata.name.clone()?;
            let st = cluster_status(
                c,
                &mesh,
                &statuses,
                w.previous_cluster_status.get(&name),
                w.last_sync.get(&c.spec.cluster_name).copied(),
                w.now,
            );
            Some((name, st))
        })
        .collect();
    let own_status = own_peer_status(statuses, w.previous_own_status, w.now);
    Ok(Evaluation {
        mesh,
        desired,
        own_status,
        cluster_statuses,
    })
}
