//! Desired data-path state: the WireGuard peers and the routes this node
//! should have, computed from the validated mesh.
//!
//! Output is plain, sorted data so that drivers can diff it against what is
//! installed ([`diff`]) and apply only the difference, idempotently; a
//! periodic resync feeding the same snapshot repairs drift.

use std::collections::BTreeMap;

use ipnet::IpNet;
use sdn_tunnel_api::{Endpoint, TunnelPeerSpec};
use thiserror::Error;

use crate::mesh::Mesh;

/// WireGuard's conventional keepalive, short enough to keep NAT and conntrack
/// entries on the path alive.
pub const DEFAULT_PERSISTENT_KEEPALIVE_SECS: u16 = 25;

/// The snapshot does not describe this node consistently.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum DesiredError {
    /// The local `TunnelPeer` says another cluster than the declared local one.
    #[error("the local TunnelPeer belongs to cluster {peer:?} but the local TunnelCluster is {declared:?}")]
    LocalClusterMismatch {
        /// `spec.cluster` of the local `TunnelPeer`.
        peer: String,
        /// Name of the `local: true` `TunnelCluster`.
        declared: String,
    },
}

/// What the desired state is computed from.
#[derive(Debug, Clone, Copy)]
pub struct Snapshot<'a> {
    /// This node's own `TunnelPeer` spec (as published).
    pub local_peer: &'a TunnelPeerSpec,
    /// The validated mesh ([`crate::mesh::validate_mesh`]).
    pub mesh: &'a Mesh,
    /// Keepalive for every peer; `None` disables it.
    pub persistent_keepalive: Option<u16>,
}

/// One WireGuard peer to configure.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DesiredPeer {
    /// Base64 public key, the identity WireGuard knows the peer by.
    pub public_key: String,
    /// Cluster of the peer (for status and logs).
    pub cluster: String,
    /// Node of the peer (for status and logs).
    pub node: String,
    /// Where to send its packets.
    pub endpoint: Endpoint,
    /// The node's pod CIDRs: cryptokey routing only accepts, and only sends
    /// to this peer, packets for these.
    pub allowed_ips: Vec<IpNet>,
    /// Keepalive interval in seconds.
    pub persistent_keepalive: Option<u16>,
}

/// Why a route exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RouteKind {
    /// A remote cluster's pod CIDR.
    PodCidr,
    /// A remote cluster's service CIDR (DNATed to pod IPs before the tunnel).
    ServiceCidr,
}

/// One route into the tunnel (in the node namespace via the agent pod, in the
/// pod namespace via the TUN device).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DesiredRoute {
    /// Destination prefix.
    pub destination: IpNet,
    /// Remote cluster it belongs to.
    pub cluster: String,
    /// Pod or service range.
    pub kind: RouteKind,
}

/// The desired state of this node's data path.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DesiredState {
    /// Peers, sorted by public key.
    pub peers: Vec<DesiredPeer>,
    /// Routes, sorted by destination.
    pub routes: Vec<DesiredRoute>,
}

/// Computes the peers and routes this node should have.
///
/// Every accepted remote peer becomes a WireGuard peer whose allowed IPs are
/// its own pod CIDRs. Routes go to the declared pod and service CIDRs of the
/// accepted clusters that have at least one accepted peer ("connected"): a
/// cluster without any usable peer gets no route, so its traffic is not
/// blackholed into a tunnel that leads nowhere. Refused objects never
/// contribute anything, since only [`Mesh::peers`] and [`Mesh::clusters`] are
/// read.
pub fn desired_state(snap: &Snapshot<'_>) -> Result<DesiredState, DesiredError> {
    let mesh = snap.mesh;
    if snap.local_peer.cluster != mesh.local.name {
        return Err(DesiredError::LocalClusterMismatch {
            peer: snap.local_peer.cluster.clone(),
            declared: mesh.local.name.clone(),
        });
    }
    let mut peers: Vec<DesiredPeer> = mesh
        .peers
        .iter()
        // validate_mesh already refuses our own key; this keeps the
        // guarantee local even if a caller built the Mesh by hand.
        .filter(|p| p.public_key != snap.local_peer.public_key)
        .map(|p| DesiredPeer {
            public_key: p.public_key.clone(),
            cluster: p.cluster.clone(),
            node: p.node.clone(),
            endpoint: p.endpoint.clone(),
            allowed_ips: p.pod_cidrs.clone(),
            persistent_keepalive: snap.persistent_keepalive,
        })
        .collect();
    peers.sort();

    let mut routes: BTreeMap<IpNet, DesiredRoute> = BTreeMap::new();
    for c in &mesh.clusters {
        if !peers.iter().any(|p| p.cluster == c.name) {
            continue;
        }
        let all = c
            .pod_cidrs
            .iter()
            .map(|d| (d, RouteKind::PodCidr))
            .chain(c.service_cidrs.iter().map(|d| (d, RouteKind::ServiceCidr)));
        for (dest, kind) in all {
            routes.entry(*dest).or_insert_with(|| DesiredRoute {
                destination: *dest,
                cluster: c.name.clone(),
                kind,
            });
        }
    }
    Ok(DesiredState {
        peers,
        routes: routes.into_values().collect(),
    })
}

/// What to change to go from `installed` to `desired`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diff<T> {
    /// Present in desired only.
    pub add: Vec<T>,
    /// Present in both under the same key but different: the desired value.
    pub change: Vec<T>,
    /// Present in installed only.
    pub remove: Vec<T>,
}

impl<T> Diff<T> {
    /// True when nothing has to change.
    pub fn is_empty(&self) -> bool {
        self.add.is_empty() && self.change.is_empty() && self.remove.is_empty()
    }
}

/// Diffs two sets keyed by `key` (public key for peers, destination for
/// routes). Output follows key order, so it is deterministic.
pub fn diff<T, K, F>(desired: &[T], installed: &[T], key: F) -> Diff<T>
where
    T: Clone + PartialEq,
    K: Ord,
    F: Fn(&T) -> K,
{
    let want: BTreeMap<K, &T> = desired.iter().map(|t| (key(t), t)).collect();
    let have: BTreeMap<K, &T> = installed.iter().map(|t| (key(t), t)).collect();
    let mut out = Diff {
        add: Vec::new(),
        change: Vec::new(),
        remove: Vec::new(),
    };
    for (k, w) in &want {
        match have.get(k) {
            None => out.add.push((*w).clone()),
            Some(h) if h != w => out.change.push((*w).clone()),
            Some(_) => {}
        }
    }
    for (k, h) in &have {
        if !want.contains_key(k) {
            out.remove.push((*h).clone());
        }
    }
    out
}
