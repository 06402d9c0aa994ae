//! The agent as a sans-IO state machine.
//!
//! [`Engine::handle`] takes one [`Event`] — objects changed, a repair or
//! resync, what the drivers reported, a status tick with the data path's
//! counters and `now` — and returns one [`Plan`]: the peers to add, update
//! or remove, the routes and nftables to (re)apply, the service proxy to
//! program, the statuses to write and the notices to log. The daemon's loop
//! (`agent/daemon/src/agent.rs`) only feeds events in and applies plans
//! through its drivers; the CRD mode and the static-peers mode are this same
//! machine fed from different sources.
//!
//! What keeps a large mesh quiet:
//! - only *spec* changes re-plan: objects are compared by spec, so the
//!   status writes of every agent of every cluster cost no decision here;
//! - peers are planned as a diff against what the drivers confirmed, so
//!   one changed TunnelPeer touches one device entry, not all of them;
//! - a refusal is a notice once, when it appears, not at every pass;
//! - this node's status is written when something an operator would read
//!   changed (states, reasons, refusals, conditions) and otherwise at the
//!   heartbeat only: counters alone do not cause a write.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use k8s_openapi::jiff::Timestamp;
use sdn_tunnel_api::{
    TunnelCluster, TunnelClusterSpec, TunnelClusterStatus, TunnelPeer, TunnelPeerSpec,
    TunnelPeerStatus,
};

use crate::desired::{desired_state, DesiredPeer, DesiredState, Snapshot};
use crate::mesh::{validate_mesh, Mesh, ObjectRef, Refusal, SourcedPeer};
use crate::services::{desired_proxy, NamespaceLabels, ProxyState, RemoteServices, Skipped};
use crate::status::{cluster_status, own_peer_status, remote_peer_statuses, PeerObservation};

/// Knobs of the machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineConfig {
    /// Keepalive of every peer (CRD mode).
    pub persistent_keepalive: Option<u16>,
    /// Longest time between two writes of this node's status when nothing
    /// material changed: readers (DNS's `cluster.all`, `tunctl`) judge
    /// liveness by its age, so it must stay below their maximum age.
    pub status_heartbeat: Duration,
}

/// The Services, EndpointSlices and namespace labels of one remote cluster,
/// as last seen (shared with the watch stores, not copied).
#[derive(Debug, Clone, Default)]
pub struct ServiceInputs {
    pub services: Vec<Arc<Service>>,
    pub slices: Vec<Arc<EndpointSlice>>,
    pub namespaces: NamespaceLabels,
}

/// What the drivers did with the last plan.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Applied {
    /// Peers the data path refused, with the reason (by public key).
    pub failed_peers: Vec<(String, String)>,
    /// Routes and nftables: `Err` with the driver's message.
    pub routes: Option<Result<(), String>>,
    /// Service proxy: `Err` with the driver's message.
    pub proxy: Option<Result<(), String>>,
}

/// What the status tick is computed from, gathered by the daemon.
#[derive(Debug, Clone)]
pub struct StatusInputs {
    pub now: Timestamp,
    /// Data-path counters by public key.
    pub observations: BTreeMap<String, PeerObservation>,
    /// Remote clusters whose API was in sync, without error, at `now`.
    pub synced: BTreeSet<String>,
    /// Whether this node writes the `TunnelCluster` statuses.
    pub writes_cluster_status: bool,
}

/// One input of the machine.
#[derive(Debug, Clone)]
pub enum Event {
    /// Every `TunnelCluster` of the local cluster, as last seen.
    Declarations(Vec<TunnelCluster>),
    /// Every remote `TunnelPeer`, with the cluster it was read from.
    RemotePeers(Vec<(String, TunnelPeer)>),
    /// This node's own `TunnelPeer` spec, as published.
    LocalPeer(TunnelPeerSpec),
    /// The remote clusters' Services and EndpointSlices, by cluster name.
    Services(BTreeMap<String, ServiceInputs>),
    /// Static mode: the whole set of peers, already checked.
    StaticPeers(Vec<DesiredPeer>),
    /// Periodic resync or drift (a route of ours removed): re-apply routes
    /// and nftables even if unchanged, and retry what failed.
    Repair,
    /// The drivers' report on the last plan.
    Applied(Applied),
    /// Time to consider writing statuses.
    StatusTick(StatusInputs),
}

/// Peers to change on the data path.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerDiff {
    /// Added or changed peers (the data path keeps sessions of peers whose
    /// key and keepalive did not change).
    pub upsert: Vec<DesiredPeer>,
    /// Public keys to remove.
    pub remove: Vec<String>,
}

impl PeerDiff {
    pub fn is_empty(&self) -> bool {
        self.upsert.is_empty() && self.remove.is_empty()
    }
}

/// Routes and nftables to apply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoutePlan {
    /// Remote pod and service CIDRs, sorted.
    pub destinations: Vec<IpNet>,
    /// Re-apply even if the destinations did not change (repair drift).
    pub force: bool,
}

/// Something to log, once, when it happens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    /// A new refusal of a declaration or a remote `TunnelPeer`.
    Refused(Refusal),
    /// An object that was refused no longer is (accepted, fixed or gone).
    RefusalCleared(ObjectRef),
    /// The declarations cannot be used at all; the data path is kept.
    Unusable(String),
    /// The declarations are usable again.
    Usable,
    /// The data path refused a peer.
    PeerFailed { public_key: String, why: String },
    /// A remote Service (or part of it) is not proxied.
    ServiceSkipped(Skipped),
    /// A driver failed; it is retried at the next repair.
    ApplyFailed { what: &'static str, why: String },
}

/// What to do, from one event. Empty fields mean nothing to do.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Plan {
    pub peers: PeerDiff,
    pub routes: Option<RoutePlan>,
    pub proxy: Option<ProxyState>,
    /// This node's `TunnelPeer` status to write.
    pub status: Option<TunnelPeerStatus>,
    /// `TunnelCluster` statuses to write, by object name.
    pub cluster_statuses: Vec<(String, TunnelClusterStatus)>,
    pub notices: Vec<Notice>,
}

impl Plan {
    /// Whether the plan changes anything on the data path.
    pub fn touches_data_path(&self) -> bool {
        !self.peers.is_empty() || self.routes.is_some() || self.proxy.is_some()
    }
}

/// Where the peers come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `TunnelPeer`s of the declared remote clusters.
    Crd,
    /// A static file.
    Static,
}

/// The state machine. Holds the last inputs (by spec), the last decision
/// and what the drivers confirmed.
#[derive(Debug)]
pub struct Engine {
    cfg: EngineConfig,
    mode: Mode,
    declarations: Vec<TunnelCluster>,
    remote_peers: Vec<(String, TunnelPeer)>,
    local_peer: Option<TunnelPeerSpec>,
    services: BTreeMap<String, ServiceInputs>,
    static_peers: Vec<DesiredPeer>,
    mesh: Option<Mesh>,
    desired: DesiredState,
    /// Peers the data path holds as far as we know, by public key.
    installed: BTreeMap<String, DesiredPeer>,
    /// Destinations of the last successful route apply.
    routed: Option<Vec<IpNet>>,
    /// The last proxy state handed out and not reported failed.
    proxied: Option<ProxyState>,
    refused: BTreeMap<ObjectRef, Refusal>,
    skipped: BTreeSet<Skipped>,
    unusable: Option<String>,
    /// The last status written, and when.
    written: Option<(TunnelPeerStatus, Timestamp)>,
}

/// `TunnelCluster`s compare by name and spec: their status (which agents
/// write) never re-plans.
fn same_declarations(a: &[TunnelCluster], b: &[TunnelCluster]) -> bool {
    fn key(c: &TunnelCluster) -> (&Option<String>, &TunnelClusterSpec) {
        (&c.metadata.name, &c.spec)
    }
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| key(x) == key(y))
}

/// `TunnelPeer`s compare by source, identity and spec (status ignored).
fn same_peers(a: &[(String, TunnelPeer)], b: &[(String, TunnelPeer)]) -> bool {
    fn key(p: &(String, TunnelPeer)) -> (&str, &Option<String>, &Option<String>, &TunnelPeerSpec) {
        (&p.0, &p.1.metadata.namespace, &p.1.metadata.name, &p.1.spec)
    }
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| key(x) == key(y))
}

/// The parts of a status an operator reads: a change of any of them is
/// written at once; counters and ages wait for the heartbeat.
fn material(s: &TunnelPeerStatus) -> impl PartialEq + '_ {
    let peers: Vec<_> = s
        .peers
        .iter()
        .map(|p| {
            (
                &p.cluster,
                &p.node,
                &p.public_key,
                &p.endpoint,
                &p.state,
                &p.reason,
            )
        })
        .collect();
    let conditions: Vec<_> = s.conditions.iter().map(condition_key).collect();
    (peers, conditions)
}

fn condition_key(c: &Condition) -> (&str, &str, &str) {
    (c.type_.as_str(), c.status.as_str(), c.reason.as_str())
}

fn age(since: Timestamp, now: Timestamp) -> Duration {
    Duration::try_from(now.duration_since(since)).unwrap_or_default()
}

impl Engine {
    pub fn new(cfg: EngineConfig, mode: Mode) -> Self {
        Engine {
            cfg,
            mode,
            declarations: Vec::new(),
            remote_peers: Vec::new(),
            local_peer: None,
            services: BTreeMap::new(),
            static_peers: Vec::new(),
            mesh: None,
            desired: DesiredState::default(),
            installed: BTreeMap::new(),
            routed: None,
            proxied: None,
            refused: BTreeMap::new(),
            skipped: BTreeSet::new(),
            unusable: None,
            written: None,
        }
    }

    /// The last validated mesh (CRD mode), for telemetry.
    pub fn mesh(&self) -> Option<&Mesh> {
        self.mesh.as_ref()
    }

    /// The desired peers and routes of the last decision.
    pub fn desired(&self) -> &DesiredState {
        &self.desired
    }

    /// Feeds one event in; returns what to do.
    pub fn handle(&mut self, event: Event) -> Plan {
        let mut plan = Plan::default();
        match event {
            // The newest objects are kept either way (their statuses feed
            // the status tick); only a spec change re-plans.
            Event::Declarations(d) => {
                let changed = !same_declarations(&d, &self.declarations);
                self.declarations = d;
                if changed {
                    self.replan(&mut plan, false);
                }
            }
            Event::RemotePeers(p) => {
                let changed = !same_peers(&p, &self.remote_peers);
                self.remote_peers = p;
                if changed {
                    self.replan(&mut plan, false);
                }
            }
            Event::LocalPeer(spec) => {
                if self.local_peer.as_ref() != Some(&spec) {
                    self.local_peer = Some(spec);
                    self.replan(&mut plan, false);
                }
            }
            Event::Services(s) => {
                self.services = s;
                self.plan_proxy(&mut plan);
            }
            Event::StaticPeers(p) => {
                self.static_peers = p;
                self.replan(&mut plan, false);
            }
            Event::Repair => self.replan(&mut plan, true),
            Event::Applied(a) => self.applied(a, &mut plan),
            Event::StatusTick(inputs) => self.status_tick(&inputs, &mut plan),
        }
        plan
    }

    /// Recomputes the desired state from the inputs and plans the difference
    /// with what is installed. `force` re-applies routes and the proxy.
    fn replan(&mut self, plan: &mut Plan, force: bool) {
        let desired = match self.mode {
            Mode::Static => Some(static_desired(&self.static_peers)),
            Mode::Crd => self.decide_mesh(plan),
        };
        let Some(desired) = desired else {
            // Nothing usable to decide from: keep the data path as it is.
            return;
        };
        self.desired = desired;
        plan.peers = self.peer_diff();
        let destinations = self.destinations();
        if force || self.routed.as_ref() != Some(&destinations) {
            plan.routes = Some(RoutePlan {
                destinations,
                force,
            });
        }
        if force {
            self.proxied = None;
        }
        if self.mode == Mode::Crd {
            self.plan_proxy(plan);
        }
    }

    /// CRD mode: validates the mesh and computes the desired state; `None`
    /// (with a notice once) when the inputs are unusable.
    fn decide_mesh(&mut self, plan: &mut Plan) -> Option<DesiredState> {
        let local = self.local_peer.as_ref()?;
        if self.declarations.is_empty() {
            return None;
        }
        let sourced: Vec<SourcedPeer<'_>> = self
            .remote_peers
            .iter()
            .map(|(c, p)| SourcedPeer { source: c, peer: p })
            .collect();
        let decided = validate_mesh(&self.declarations, &sourced, &local.public_key)
            .map_err(|e| e.to_string())
            .and_then(|mesh| {
                desired_state(&Snapshot {
                    local_peer: local,
                    mesh: &mesh,
                    persistent_keepalive: self.cfg.persistent_keepalive,
                })
                .map(|d| (mesh, d))
                .map_err(|e| e.to_string())
            });
        match decided {
            Ok((mesh, desired)) => {
                if self.unusable.take().is_some() {
                    plan.notices.push(Notice::Usable);
                }
                self.note_refusals(&mesh, plan);
                self.mesh = Some(mesh);
                Some(desired)
            }
            Err(why) => {
                if self.unusable.as_ref() != Some(&why) {
                    plan.notices.push(Notice::Unusable(why.clone()));
                    self.unusable = Some(why);
                }
                None
            }
        }
    }

    fn note_refusals(&mut self, mesh: &Mesh, plan: &mut Plan) {
        let now: BTreeMap<ObjectRef, Refusal> = mesh
            .refusals
            .iter()
            .map(|r| (r.object.clone(), r.clone()))
            .collect();
        for (object, r) in &now {
            if self.refused.get(object) != Some(r) {
                plan.notices.push(Notice::Refused(r.clone()));
            }
        }
        for object in self.refused.keys() {
            if !now.contains_key(object) {
                plan.notices.push(Notice::RefusalCleared(object.clone()));
            }
        }
        self.refused = now;
    }

    /// The difference between the desired peers and the installed ones.
    fn peer_diff(&self) -> PeerDiff {
        let wanted: BTreeMap<&str, &DesiredPeer> = self
            .desired
            .peers
            .iter()
            .map(|p| (p.public_key.as_str(), p))
            .collect();
        PeerDiff {
            upsert: self
                .desired
                .peers
                .iter()
                .filter(|p| self.installed.get(&p.public_key) != Some(*p))
                .cloned()
                .collect(),
            remove: self
                .installed
                .keys()
                .filter(|k| !wanted.contains_key(k.as_str()))
                .cloned()
                .collect(),
        }
    }

    fn destinations(&self) -> Vec<IpNet> {
        let mut d: Vec<IpNet> = self.desired.routes.iter().map(|r| r.destination).collect();
        d.sort();
        d.dedup();
        d
    }

    /// Plans the service proxy of the accepted remote clusters when it
    /// differs from what was last handed out.
    fn plan_proxy(&mut self, plan: &mut Plan) {
        let Some(mesh) = &self.mesh else { return };
        let empty = ServiceInputs::default();
        let remotes: Vec<RemoteServices<'_>> = mesh
            .clusters
            .iter()
            .map(|c| {
                let inputs = self.services.get(&c.name).unwrap_or(&empty);
                RemoteServices {
                    cluster: c,
                    selector: self
                        .declarations
                        .iter()
                        .find(|d| !d.spec.local && d.spec.cluster_name == c.name)
                        .and_then(|d| d.spec.service_selector.as_ref()),
                    services: inputs.services.iter().map(AsRef::as_ref).collect(),
                    slices: inputs.slices.iter().map(AsRef::as_ref).collect(),
                    namespaces: &inputs.namespaces,
                }
            })
            .collect();
        let state = desired_proxy(&remotes);
        let skipped: BTreeSet<Skipped> = state.skipped.iter().cloned().collect();
        for s in skipped.difference(&self.skipped) {
            plan.notices.push(Notice::ServiceSkipped(s.clone()));
        }
        self.skipped = skipped;
        if self.proxied.as_ref() != Some(&state) {
            self.proxied = Some(state.clone());
            plan.proxy = Some(state);
        }
    }

    /// Takes the drivers' report: what failed is forgotten as installed, so
    /// that the next repair plans it again.
    fn applied(&mut self, a: Applied, plan: &mut Plan) {
        // Peers: what was planned is installed unless it failed.
        let failed: BTreeSet<&str> = a.failed_peers.iter().map(|(k, _)| k.as_str()).collect();
        self.installed = self
            .desired
            .peers
            .iter()
            .filter(|p| !failed.contains(p.public_key.as_str()))
            .map(|p| (p.public_key.clone(), p.clone()))
            .collect();
        for (public_key, why) in a.failed_peers {
            plan.notices.push(Notice::PeerFailed { public_key, why });
        }
        match a.routes {
            Some(Ok(())) => self.routed = Some(self.destinations()),
            Some(Err(why)) => {
                self.routed = None;
                plan.notices.push(Notice::ApplyFailed {
                    what: "routes and nftables",
                    why,
                });
            }
            None => {}
        }
        if let Some(Err(why)) = a.proxy {
            self.proxied = None;
            plan.notices.push(Notice::ApplyFailed {
                what: "service proxy",
                why,
            });
        }
    }

    /// Whether the last plan's peers, routes and proxy are all in place.
    pub fn converged(&self) -> bool {
        self.installed.len() == self.desired.peers.len()
            && self.peer_diff().is_empty()
            && self.routed.as_ref() == Some(&self.destinations())
            && (self.mode == Mode::Static || self.mesh.is_none() || self.proxied.is_some())
    }

    /// Statuses: this node's (on a material change or at the heartbeat) and,
    /// when this node writes them, the remote `TunnelCluster`s'.
    fn status_tick(&mut self, inputs: &StatusInputs, plan: &mut Plan) {
        let Some(mesh) = &self.mesh else { return };
        let now = inputs.now;
        let sourced: Vec<SourcedPeer<'_>> = self
            .remote_peers
            .iter()
            .map(|(c, p)| SourcedPeer { source: c, peer: p })
            .collect();
        let statuses = remote_peer_statuses(
            mesh,
            &sourced,
            &self.desired.peers,
            &inputs.observations,
            now,
        );
        if inputs.writes_cluster_status {
            plan.cluster_statuses = self
                .declarations
                .iter()
                .filter(|c| !c.spec.local)
                .filter_map(|c| {
                    let name = c.metadata.name.clone()?;
                    let synced = inputs.synced.contains(&c.spec.cluster_name).then_some(now);
                    let st = cluster_status(c, mesh, &statuses, c.status.as_ref(), synced, now);
                    (c.status.as_ref().map(material_cluster) != Some(material_cluster(&st))
                        || self.heartbeat_due(now))
                    .then_some((name, st))
                })
                .collect();
        }
        let previous = self.written.as_ref().map(|(s, _)| s);
        let status = own_peer_status(statuses, previous, now);
        let changed = previous.is_none_or(|p| material(p) != material(&status));
        if changed || self.heartbeat_due(now) {
            plan.status = Some(status);
        }
    }

    fn heartbeat_due(&self, now: Timestamp) -> bool {
        self.written
            .as_ref()
            .is_none_or(|(_, at)| age(*at, now) >= self.cfg.status_heartbeat)
    }

    /// The daemon wrote (or failed to write) the planned status.
    pub fn status_written(&mut self, status: TunnelPeerStatus, now: Timestamp) {
        self.written = Some((status, now));
    }
}

fn material_cluster(s: &TunnelClusterStatus) -> impl PartialEq + '_ {
    let conditions: Vec<_> = s.conditions.iter().map(condition_key).collect();
    (conditions, s.peers_ready, s.peers_total)
}

/// Static mode: the peers as given, routes to every allowed prefix.
fn static_desired(peers: &[DesiredPeer]) -> DesiredState {
    use crate::desired::{DesiredRoute, RouteKind};
    let mut peers = peers.to_vec();
    peers.sort();
    let mut routes: Vec<DesiredRoute> = peers
        .iter()
        .flat_map(|p| {
            p.allowed_ips.iter().map(|d| DesiredRoute {
                destination: *d,
                cluster: p.cluster.clone(),
                kind: RouteKind::PodCidr,
            })
        })
        .collect();
    routes.sort();
    routes.dedup_by(|a, b| a.destination == b.destination);
    DesiredState { peers, routes }
}
