//! Status the agent reports, computed from the validated mesh, the desired
//! peers and what the data path observed — with `now` passed in, so every
//! age and every condition transition is decided with plain values.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use sdn_tunnel_api::{
    PeerState, RemotePeerStatus, TunnelCluster, TunnelClusterStatus, TunnelPeerStatus,
    CONDITION_CONNECTED, CONDITION_DEGRADED,
};

use crate::desired::DesiredPeer;
use crate::mesh::{Mesh, ObjectKind, SourcedPeer};

/// A WireGuard session is dropped 180 s after its handshake
/// (`REJECT_AFTER_TIME`); a peer with traffic or keepalives re-handshakes
/// every 120 s, so a handshake younger than this means the peer is up.
pub const HANDSHAKE_FRESH_SECS: i64 = 180;

/// What the data path reports about one peer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerObservation {
    /// When the last handshake completed, if any.
    pub last_handshake: Option<Timestamp>,
    /// Bytes received.
    pub rx_bytes: u64,
    /// Bytes sent.
    pub tx_bytes: u64,
    /// Last measured round trip in microseconds.
    pub rtt_micros: Option<u64>,
    /// When anything authenticated was last received from the peer.
    pub last_receive: Option<Timestamp>,
    /// The persistent keepalive we use with the peer, in seconds.
    pub keepalive_secs: Option<u16>,
}

/// Slack on top of two keepalive intervals before a silent peer counts as
/// unreachable (see [`silence`]).
pub const RECEIVE_MARGIN_SECS: i64 = 10;

/// How long the peer has been silent, and the keepalive that makes the
/// silence meaningful, when it exceeds two keepalive intervals plus
/// [`RECEIVE_MARGIN_SECS`] (60 s with the default 25 s). Every agent of a
/// mesh sends persistent keepalives, so a live path carries something at
/// least every interval; a silent one is broken (a firewall, a dead node)
/// even while the WireGuard session has not expired yet — found in about
/// a minute instead of the 180 s it takes the session to expire. Without
/// a keepalive (0) an idle link is legitimately silent: never judged.
pub fn silence(obs: &PeerObservation, now: Timestamp) -> Option<(i64, u16)> {
    let keepalive = obs.keepalive_secs.filter(|k| *k > 0)?;
    let since = obs.last_receive.or(obs.last_handshake)?;
    let silent = now.duration_since(since).as_secs().max(0);
    (silent > 2 * i64::from(keepalive) + RECEIVE_MARGIN_SECS).then_some((silent, keepalive))
}

/// State of an accepted peer and the age of its last handshake in seconds.
/// A handshake "in the future" (clock skew between the data path's clock and
/// `now`) counts as age 0.
pub fn peer_state(obs: Option<&PeerObservation>, now: Timestamp) -> (PeerState, Option<i64>) {
    match obs.and_then(|o| o.last_handshake) {
        None => (PeerState::Handshaking, None),
        Some(t) => {
            let age = now.duration_since(t).as_secs().max(0);
            let silent = obs.and_then(|o| silence(o, now)).is_some();
            if age <= HANDSHAKE_FRESH_SECS && !silent {
                (PeerState::Connected, Some(age))
            } else {
                (PeerState::Stale, Some(age))
            }
        }
    }
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// One status entry per remote peer this node knows about: the desired
/// peers with their observed state, and the refused `TunnelPeer`s as
/// `Rejected` with the reason, so `tunctl peers` shows why a node is missing.
/// `peers` is the same input given to [`crate::mesh::validate_mesh`]; it
/// supplies the published key and endpoint of refused objects.
/// Sorted by (cluster, node, public key).
pub fn remote_peer_statuses(
    mesh: &Mesh,
    peers: &[SourcedPeer<'_>],
    desired: &[DesiredPeer],
    observations: &BTreeMap<String, PeerObservation>,
    now: Timestamp,
) -> Vec<RemotePeerStatus> {
    let mut out: Vec<RemotePeerStatus> = desired
        .iter()
        .map(|p| {
            let obs = observations.get(&p.public_key);
            let (state, age) = peer_state(obs, now);
            let (reason, message) = match state {
                PeerState::Connected => (None, None),
                PeerState::Handshaking => (
                    Some("NoHandshake".to_string()),
                    Some("no handshake has completed yet".to_string()),
                ),
                _ => match obs.and_then(|o| silence(o, now)) {
                    Some((silent, keepalive)) if age.unwrap_or_default() <= HANDSHAKE_FRESH_SECS => (
                        Some("NothingReceived".to_string()),
                        Some(format!(
                            "nothing received for {silent}s although keepalives are every {keepalive}s: the path is broken"
                        )),
                    ),
                    _ => (
                        Some("HandshakeExpired".to_string()),
                        Some(format!(
                            "last handshake {}s ago, more than {HANDSHAKE_FRESH_SECS}s",
                            age.unwrap_or_default()
                        )),
                    ),
                },
            };
            RemotePeerStatus {
                cluster: p.cluster.clone(),
                node: p.node.clone(),
                public_key: p.public_key.clone(),
                endpoint: Some(p.endpoint.to_string()),
                state,
                reason,
                message,
                last_handshake_age_seconds: age,
                rx_bytes: obs.map(|o| to_i64(o.rx_bytes)).unwrap_or(0),
                tx_bytes: obs.map(|o| to_i64(o.tx_bytes)).unwrap_or(0),
                rtt_micros: obs.and_then(|o| o.rtt_micros).map(to_i64),
            }
        })
        .collect();

    // Refused peers: one entry per object, all its reasons in the message.
    let mut refused: BTreeMap<_, Vec<&crate::mesh::Refusal>> = BTreeMap::new();
    for r in mesh
        .refusals
        .iter()
        .filter(|r| r.object.kind == ObjectKind::TunnelPeer)
    {
        refused.entry(&r.object).or_default().push(r);
    }
    for (object, rs) in refused {
        let published = peers.iter().find(|sp| {
            sp.source == object.cluster
                && sp.peer.metadata.namespace == object.namespace
                && sp.peer.metadata.name.as_deref() == Some(object.name.as_str())
        });
        let (node, key, endpoint) = match published {
            Some(sp) => (
                sp.peer.spec.node.clone(),
                sp.peer.spec.public_key.clone(),
                sp.peer.spec.endpoints.first().cloned(),
            ),
            None => (object.name.clone(), String::new(), None),
        };
        out.push(RemotePeerStatus {
            cluster: object.cluster.clone(),
            node,
            public_key: key,
            endpoint,
            state: PeerState::Rejected,
            reason: rs.first().map(|r| r.reason.as_str().to_string()),
            message: Some(join_messages(rs.iter().map(|r| r.message.as_str()))),
            last_handshake_age_seconds: None,
            rx_bytes: 0,
            tx_bytes: 0,
            rtt_micros: None,
        });
    }
    out.sort_by(|a, b| {
        (&a.cluster, &a.node, &a.public_key).cmp(&(&b.cluster, &b.node, &b.public_key))
    });
    out
}

fn join_messages<'a>(msgs: impl Iterator<Item = &'a str>) -> String {
    msgs.collect::<Vec<_>>().join("; ")
}

/// Sets condition `type_` in `conditions`, keeping its `lastTransitionTime`
/// when the status does not change (Kubernetes convention: the time marks a
/// transition, not the last write).
pub fn set_condition(
    conditions: &mut Vec<Condition>,
    type_: &str,
    status: bool,
    reason: &str,
    message: String,
    now: Timestamp,
) {
    let status = if status { "True" } else { "False" }.to_string();
    // An empty message reaches the apiserver as null through server-side
    // apply, which the CRD schema (type: string) refuses: say the reason.
    let message = if message.is_empty() {
        reason.to_string()
    } else {
        message
    };
    match conditions.iter_mut().find(|c| c.type_ == type_) {
        Some(c) => {
            if c.status != status {
                c.last_transition_time = Time(now);
                c.status = status;
            }
            c.reason = reason.to_string();
            c.message = message;
        }
        None => conditions.push(Condition {
            last_transition_time: Time(now),
            message,
            observed_generation: None,
            reason: reason.to_string(),
            status,
            type_: type_.to_string(),
        }),
    }
    conditions.sort_by(|a, b| a.type_.cmp(&b.type_));
}

/// Status of one remote `TunnelCluster` declaration, from this node's view.
///
/// `statuses` are this node's [`remote_peer_statuses`]; `previous` the status
/// currently stored (its condition times are kept across unchanged writes);
/// `last_sync` when the remote API was last listed successfully. Keyed by
/// the object, not the cluster name, so two declarations of one name get
/// their own refusals.
pub fn cluster_status(
    cluster: &TunnelCluster,
    mesh: &Mesh,
    statuses: &[RemotePeerStatus],
    previous: Option<&TunnelClusterStatus>,
    last_sync: Option<Timestamp>,
    now: Timestamp,
) -> TunnelClusterStatus {
    let name = cluster.spec.cluster_name.as_str();
    let object_name = cluster.metadata.name.as_deref().unwrap_or_default();
    let mut conditions = previous.map(|p| p.conditions.clone()).unwrap_or_default();
    let ours: Vec<&RemotePeerStatus> = statuses.iter().filter(|s| s.cluster == name).collect();
    let total = ours.len();
    let ready = ours
        .iter()
        .filter(|s| s.state == PeerState::Connected)
        .count();
    let refusals: Vec<_> = mesh
        .refusals
        .iter()
        .filter(|r| r.object.kind == ObjectKind::TunnelCluster && r.object.name == object_name)
        .collect();

    if let Some(first) = refusals.first() {
        let msg = join_messages(refusals.iter().map(|r| r.message.as_str()));
        set_condition(
            &mut conditions,
            CONDITION_CONNECTED,
            false,
            first.reason.as_str(),
            format!("declaration refused: {msg}"),
            now,
        );
        set_condition(
            &mut conditions,
            CONDITION_DEGRADED,
            true,
            first.reason.as_str(),
            msg,
            now,
        );
    } else if !mesh.clusters.iter().any(|c| c.object_name == object_name) {
        set_condition(
            &mut conditions,
            CONDITION_CONNECTED,
            false,
            "NotDeclared",
            format!("TunnelCluster {object_name} is not an accepted remote cluster"),
            now,
        );
    } else {
        let (reason, msg) = match (ready, total) {
            (_, 0) => (
                "NoPeers",
                "no TunnelPeer published by the cluster".to_string(),
            ),
            (0, t) => ("NoPeerConnected", format!("0/{t} peers connected")),
            (r, t) => ("PeersConnected", format!("{r}/{t} peers connected")),
        };
        set_condition(
            &mut conditions,
            CONDITION_CONNECTED,
            ready > 0,
            reason,
            msg,
            now,
        );
        let not_ready: Vec<String> = ours
            .iter()
            .filter(|s| s.state != PeerState::Connected)
            .map(|s| {
                format!(
                    "{} {}{}",
                    s.node,
                    s.reason.as_deref().unwrap_or("NotConnected"),
                    s.message
                        .as_deref()
                        .map(|m| format!(" ({m})"))
                        .unwrap_or_default()
                )
            })
            .collect();
        let rejected = ours.iter().find(|s| s.state == PeerState::Rejected);
        let (reason, degraded) = match (rejected, not_ready.is_empty()) {
            (_, true) => ("AllPeersConnected", false),
            (Some(_), false) => ("PeerRejected", true),
            (None, false) => ("PeersNotConnected", true),
        };
        set_condition(
            &mut conditions,
            CONDITION_DEGRADED,
            degraded,
            reason,
            not_ready.join("; "),
            now,
        );
    }
    TunnelClusterStatus {
        conditions,
        peers_ready: Some(i32::try_from(ready).unwrap_or(i32::MAX)),
        peers_total: Some(i32::try_from(total).unwrap_or(i32::MAX)),
        last_sync: last_sync
            .map(Time)
            .or_else(|| previous.and_then(|p| p.last_sync.clone())),
    }
}

/// Status of this node's own `TunnelPeer`: the per-peer entries and two
/// conditions — `Connected` (at least one remote peer is connected) and
/// `Degraded` (some peer is not, or was refused).
pub fn own_peer_status(
    statuses: Vec<RemotePeerStatus>,
    previous: Option<&TunnelPeerStatus>,
    now: Timestamp,
) -> TunnelPeerStatus {
    let mut conditions = previous.map(|p| p.conditions.clone()).unwrap_or_default();
    let ready = statuses
        .iter()
        .filter(|s| s.state == PeerState::Connected)
        .count();
    let rejected = statuses
        .iter()
        .filter(|s| s.state == PeerState::Rejected)
        .count();
    let total = statuses.len();
    let (reason, msg) = match (ready, total) {
        (_, 0) => ("NoPeers", "no remote peer known".to_string()),
        (0, t) => ("NoPeerConnected", format!("0/{t} remote peers connected")),
        (r, t) => ("PeersConnected", format!("{r}/{t} remote peers connected")),
    };
    set_condition(
        &mut conditions,
        CONDITION_CONNECTED,
        ready > 0,
        reason,
        msg,
        now,
    );
    let (reason, degraded) = if rejected > 0 {
        ("PeerRejected", true)
    } else if ready < total {
        ("PeersNotConnected", true)
    } else {
        ("AllPeersConnected", false)
    };
    set_condition(
        &mut conditions,
        CONDITION_DEGRADED,
        degraded,
        reason,
        format!(
            "{ready} connected, {} not connected, {rejected} rejected",
            total - ready - rejected
        ),
        now,
    );
    TunnelPeerStatus {
        peers: statuses,
        conditions,
        last_update: Some(Time(now)),
    }
}
