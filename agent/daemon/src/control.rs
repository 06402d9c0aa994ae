//! The kube side of the agent: publishes this node's `TunnelPeer` (server-side
//! apply, owned by the Node), watches the local `TunnelCluster`s, and for every
//! declared remote cluster watches its `TunnelPeer`s through the kubeconfig in
//! the Secret the local admin referenced. Everything it observes lands in
//! reflector stores; [`Watches::snapshot`] hands the decision-making in
//! `sdn-tunnel-core` a plain copy.
//!
//! A remote API that is down keeps its store as last seen (the data path
//! keeps working) and is retried with backoff; so is the local API.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Node, Secret, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{Patch, PatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::reflector::{self, store::Writer, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client, Config, Resource, ResourceExt};
use sdn_tunnel_api::{
    TunnelCluster, TunnelClusterStatus, TunnelPeer, TunnelPeerSpec, TunnelPeerStatus,
};
use thiserror::Error;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tracing::{info, info_span, warn, Instrument};

use crate::config::AgentConfig;

/// What changed since the agent last looked, so that it feeds its state
/// machine only the inputs that moved: the status writes of every agent of
/// every cluster mark [`Dirty::STATUS`] only, which the agent ignores (the
/// DNS server, which reads statuses, is woken by every change).
#[derive(Debug, Default)]
pub struct Dirty(AtomicU8);

impl Dirty {
    /// A `TunnelCluster`'s name or spec.
    pub const DECLARATIONS: u8 = 1;
    /// A remote `TunnelPeer`'s spec (its generation), or one came or went.
    pub const PEERS: u8 = 2;
    /// A Service, EndpointSlice or Namespace of a watched cluster.
    pub const SERVICES: u8 = 4;
    /// Only statuses (or watch health).
    pub const STATUS: u8 = 8;

    fn mark(&self, what: u8) {
        self.0.fetch_or(what, Ordering::AcqRel);
    }

    /// What changed since the last call.
    pub fn take(&self) -> u8 {
        self.0.swap(0, Ordering::AcqRel)
    }
}

/// Which watch events change an object's spec: a custom resource with a
/// status subresource bumps `metadata.generation` on spec changes only, so
/// status writes are told apart without comparing objects.
#[derive(Default)]
struct SpecChanges(HashMap<(Option<String>, String), Option<i64>>);

impl SpecChanges {
    /// Whether `ev` added, removed or changed the spec of an object.
    fn spec_changed<K: Resource>(&mut self, ev: &watcher::Event<K>) -> bool {
        let id = |o: &K| {
            (
                o.meta().namespace.clone(),
                o.meta().name.clone().unwrap_or_default(),
            )
        };
        match ev {
            watcher::Event::Apply(o) | watcher::Event::InitApply(o) => {
                let generation = o.meta().generation;
                self.0.insert(id(o), generation) != Some(generation)
            }
            watcher::Event::Delete(o) => {
                self.0.remove(&id(o));
                true
            }
            // A re-list may drop objects: the store is swapped at InitDone.
            watcher::Event::Init => false,
            watcher::Event::InitDone => true,
        }
    }
}

/// Field manager of everything the agent writes.
pub const FIELD_MANAGER: &str = "tunnel-agent";

#[derive(Debug, Error)]
pub enum ControlError {
    #[error("Node {0:?} not found: is NODE_NAME right?")]
    NodeNotFound(String),
    #[error("Node {0} has no spec.podCIDRs: the agent needs a per-node pod CIDR (kubenet, kindnet, Calico host-local IPAM, ...)")]
    NoPodCidr(String),
    #[error("Node {0} has no InternalIP address; set --endpoint (SDN_TUNNEL_ENDPOINT)")]
    NoEndpoint(String),
    #[error("no TunnelCluster with local: true in this cluster; the installer creates it")]
    NoLocalCluster,
    #[error("kubeconfig for cluster {cluster} (Secret {namespace}/{name}): {why}")]
    Kubeconfig {
        cluster: String,
        namespace: String,
        name: String,
        why: String,
    },
    #[error(transparent)]
    Kube(#[from] kube::Error),
}

/// This node's `TunnelPeer` spec, from its Node object: endpoint from the
/// override or the InternalIP, pod CIDRs from `spec.podCIDRs`.
pub fn local_peer_spec(
    node: &Node,
    cluster: &str,
    public_key: &str,
    listen_port: u16,
    endpoint_override: Option<&str>,
    mtu: Option<u16>,
) -> Result<TunnelPeerSpec, ControlError> {
    let name = node.name_any();
    let spec = node.spec.clone().unwrap_or_default();
    let mut pod_cidrs = spec.pod_cidrs.unwrap_or_default();
    if pod_cidrs.is_empty() {
        pod_cidrs.extend(spec.pod_cidr);
    }
    if pod_cidrs.is_empty() {
        return Err(ControlError::NoPodCidr(name));
    }
    let endpoint = match endpoint_override {
        Some(e) => e.to_string(),
        None => {
            let addrs = node
                .status
                .as_ref()
                .and_then(|s| s.addresses.clone())
                .unwrap_or_default();
            let ip = addrs
                .iter()
                .find(|a| a.type_ == "InternalIP")
                .map(|a| a.address.clone())
                .ok_or_else(|| ControlError::NoEndpoint(name.clone()))?;
            if ip.contains(':') {
                format!("[{ip}]:{listen_port}")
            } else {
                format!("{ip}:{listen_port}")
            }
        }
    };
    Ok(TunnelPeerSpec {
        cluster: cluster.to_string(),
        node: name,
        public_key: public_key.to_string(),
        endpoints: vec![endpoint],
        pod_cidrs,
        listen_port: i32::from(listen_port),
        mtu: mtu.map(i32::from),
    })
}

/// Publishes this node's `TunnelPeer` (named after the node, owned by the
/// Node so that it goes away with it) with server-side apply.
pub async fn publish_local_peer(
    client: &Client,
    cfg: &AgentConfig,
    cluster: &str,
    public_key: &str,
) -> Result<TunnelPeer, ControlError> {
    let (namespace, node_name) = (cfg.namespace.as_str(), cfg.node_name.as_str());
    let node = match Api::<Node>::all(client.clone()).get(node_name).await {
        Ok(n) => n,
        Err(kube::Error::Api(e)) if e.code == 404 => {
            return Err(ControlError::NodeNotFound(node_name.into()))
        }
        Err(e) => return Err(e.into()),
    };
    let spec = local_peer_spec(
        &node,
        cluster,
        public_key,
        cfg.listen_port,
        cfg.endpoint.as_deref(),
        cfg.mtu,
    )?;
    let mut peer = TunnelPeer::new(node_name, spec);
    peer.metadata.namespace = Some(namespace.to_string());
    peer.metadata.owner_references = node.meta().uid.clone().map(|uid| {
        vec![OwnerReference {
            api_version: "v1".into(),
            kind: "Node".into(),
            name: node_name.into(),
            uid,
            ..Default::default()
        }]
    });
    let api: Api<TunnelPeer> = Api::namespaced(client.clone(), namespace);
    Ok(api
        .patch(
            node_name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&peer),
        )
        .await?)
}

/// Writes this node's `TunnelPeer` status (server-side apply on the status
/// subresource: only the fields the agent owns).
pub async fn write_status(
    client: &Client,
    namespace: &str,
    node_name: &str,
    status: TunnelPeerStatus,
) -> Result<(), ControlError> {
    let api: Api<TunnelPeer> = Api::namespaced(client.clone(), namespace);
    let patch = serde_json::json!({
        "apiVersion": sdn_tunnel_api::API_VERSION,
        "kind": "TunnelPeer",
        "status": status,
    });
    api.patch_status(
        node_name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await?;
    Ok(())
}

/// Writes a `TunnelCluster` status (server-side apply on the status subresource).
pub async fn write_cluster_status(
    client: &Client,
    name: &str,
    status: TunnelClusterStatus,
) -> Result<(), ControlError> {
    let api: Api<TunnelCluster> = Api::all(client.clone());
    let patch = serde_json::json!({
        "apiVersion": sdn_tunnel_api::API_VERSION,
        "kind": "TunnelCluster",
        "status": status,
    });
    api.patch_status(
        name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await?;
    Ok(())
}

/// Health of one cluster's watches, for status and `/readyz`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RemoteHealth {
    /// The cluster's TunnelPeers have been listed at least once.
    pub synced: bool,
    /// The last error, cleared by the next successful event.
    pub last_error: Option<String>,
}

/// Where a remote cluster's kubeconfig lives; a change restarts its watch.
#[derive(Debug, Clone, PartialEq, Eq)]
struct RemoteSource {
    namespace: String,
    name: String,
    key: String,
}

/// What is watched in one cluster (the local one or a remote one): its
/// TunnelPeers, Services and EndpointSlices, as last seen. The stores
/// outlive the API connection: when an API goes away, the last known state
/// stays and keeps the data path as it was.
#[derive(Clone)]
pub struct ClusterStores {
    pub peers: Store<TunnelPeer>,
    pub services: Store<Service>,
    pub slices: Store<EndpointSlice>,
    /// For the labels a `namespaceSelector` may select on.
    pub namespaces: Store<Namespace>,
}

impl ClusterStores {
    /// The labels of the cluster's namespaces, as last seen.
    pub fn namespace_labels(&self) -> sdn_tunnel_core::services::NamespaceLabels {
        self.namespaces
            .state()
            .iter()
            .filter_map(|n| {
                let name = n.metadata.name.clone()?;
                Some((name, n.metadata.labels.clone().unwrap_or_default()))
            })
            .collect()
    }
}

struct ClusterWriters {
    peers: Writer<TunnelPeer>,
    services: Writer<Service>,
    slices: Writer<EndpointSlice>,
    namespaces: Writer<Namespace>,
}

fn cluster_stores() -> (ClusterStores, ClusterWriters) {
    let (peers, pw) = reflector::store();
    let (services, sw) = reflector::store();
    let (slices, ew) = reflector::store();
    let (namespaces, nw) = reflector::store();
    (
        ClusterStores {
            peers,
            services,
            slices,
            namespaces,
        },
        ClusterWriters {
            peers: pw,
            services: sw,
            slices: ew,
            namespaces: nw,
        },
    )
}

/// Where the client of a watched cluster comes from.
#[derive(Clone)]
enum ClientSource {
    /// The local cluster: the agent's own client.
    Local(Client),
    /// A remote cluster: the kubeconfig in a local Secret, re-read whenever
    /// a client cannot be built.
    Secret { local: Client, source: RemoteSource },
}

struct ClusterWatch {
    source: Option<RemoteSource>,
    stores: ClusterStores,
    health: Arc<Mutex<RemoteHealth>>,
    task: JoinHandle<()>,
}

impl Drop for ClusterWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The agent's view of the world: declared clusters, and per cluster
/// (local included) its TunnelPeers, Services and EndpointSlices.
pub struct Watches {
    local: Client,
    namespace: String,
    clusters: Store<TunnelCluster>,
    local_watch: Mutex<Option<(String, ClusterWatch)>>,
    remotes: Mutex<BTreeMap<String, ClusterWatch>>,
    /// Poked on every change of anything watched.
    pub changed: Arc<Notify>,
    /// What changed (see [`Dirty`]).
    pub dirty: Arc<Dirty>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Watches {
    /// Starts the local `TunnelCluster` watch; the per-cluster watches follow
    /// the declarations (call [`Watches::follow_declarations`] on change).
    pub fn start(local: Client, namespace: &str) -> Arc<Watches> {
        let changed = Arc::new(Notify::new());
        let dirty = Arc::new(Dirty::default());
        let (store, mut writer) = reflector::store();
        let api: Api<TunnelCluster> = Api::all(local.clone());
        let notify = changed.clone();
        let marks = dirty.clone();
        tokio::spawn(
            async move {
                let mut specs = SpecChanges::default();
                let mut events = watcher(api, watcher::Config::default())
                    .default_backoff()
                    .boxed();
                while let Some(ev) = events.next().await {
                    match ev {
                        Ok(ev) => {
                            writer.apply_watcher_event(&ev);
                            marks.mark(if specs.spec_changed(&ev) {
                                Dirty::DECLARATIONS
                            } else {
                                Dirty::STATUS
                            });
                            notify.notify_one();
                        }
                        Err(e) => warn!(error = %e, "watching TunnelClusters"),
                    }
                }
            }
            .instrument(info_span!(
                "watch",
                kind = "TunnelCluster",
                cluster = "local"
            )),
        );
        Arc::new(Watches {
            local,
            namespace: namespace.to_string(),
            clusters: store,
            local_watch: Mutex::new(None),
            remotes: Mutex::new(BTreeMap::new()),
            changed,
            dirty,
        })
    }

    /// Waits until the local `TunnelCluster`s have been listed once.
    pub async fn wait_local_synced(&self) {
        let _ = self.clusters.wait_until_ready().await;
    }

    /// The declared clusters, as last seen.
    pub fn clusters(&self) -> Vec<TunnelCluster> {
        let mut v: Vec<TunnelCluster> = self
            .clusters
            .state()
            .iter()
            .map(|c| (**c).clone())
            .collect();
        v.sort_by_key(|c| c.name_any());
        v
    }

    /// The local cluster's name (`local: true`).
    pub fn local_cluster_name(&self) -> Result<String, ControlError> {
        let locals: Vec<String> = self
            .clusters()
            .into_iter()
            .filter(|c| c.spec.local)
            .map(|c| c.spec.cluster_name)
            .collect();
        locals
            .into_iter()
            .next()
            .ok_or(ControlError::NoLocalCluster)
    }

    /// Every remote peer as last seen, with the cluster it was read from.
    pub fn remote_peers(&self) -> Vec<(String, TunnelPeer)> {
        let remotes = lock(&self.remotes);
        let mut out: Vec<(String, TunnelPeer)> = remotes
            .iter()
            .flat_map(|(cluster, w)| {
                w.stores
                    .peers
                    .state()
                    .into_iter()
                    .map(move |p| (cluster.clone(), (*p).clone()))
            })
            .collect();
        out.sort_by(|a, b| (&a.0, a.1.name_any()).cmp(&(&b.0, b.1.name_any())));
        out
    }

    /// The stores of every watched cluster, the local one included, by name.
    pub fn cluster_stores(&self) -> BTreeMap<String, ClusterStores> {
        let mut out: BTreeMap<String, ClusterStores> = lock(&self.remotes)
            .iter()
            .map(|(c, w)| (c.clone(), w.stores.clone()))
            .collect();
        if let Some((name, w)) = lock(&self.local_watch).as_ref() {
            out.insert(name.clone(), w.stores.clone());
        }
        out
    }

    /// Health of every remote watch, by cluster name.
    pub fn remote_health(&self) -> BTreeMap<String, RemoteHealth> {
        lock(&self.remotes)
            .iter()
            .map(|(c, w)| (c.clone(), lock(&w.health).clone()))
            .collect()
    }

    /// Starts the watches of the local cluster (once its name is known) and
    /// of every declared remote cluster with a kubeconfig Secret, restarts
    /// the ones whose Secret reference changed, and stops the ones no longer
    /// declared.
    pub fn follow_declarations(self: &Arc<Self>) {
        if let Ok(name) = self.local_cluster_name() {
            let mut local = lock(&self.local_watch);
            if local.as_ref().is_none_or(|(n, _)| *n != name) {
                *local = Some((
                    name.clone(),
                    self.spawn_watch(&name, ClientSource::Local(self.local.clone()), None),
                ));
            }
        }
        let mut wanted: BTreeMap<String, RemoteSource> = BTreeMap::new();
        for c in self.clusters() {
            if c.spec.local {
                continue;
            }
            if let Some(r) = &c.spec.kubeconfig_secret_ref {
                wanted.insert(
                    c.spec.cluster_name.clone(),
                    RemoteSource {
                        namespace: r
                            .namespace
                            .clone()
                            .unwrap_or_else(|| self.namespace.clone()),
                        name: r.name.clone(),
                        key: r.key_or_default().to_string(),
                    },
                );
            }
        }
        let mut remotes = lock(&self.remotes);
        remotes.retain(|cluster, w| {
            let keep = wanted.get(cluster) == w.source.as_ref();
            if !keep {
                info!(%cluster, "stopping watch of remote cluster");
            }
            keep
        });
        for (cluster, source) in wanted {
            if remotes.contains_key(&cluster) {
                continue;
            }
            info!(%cluster, secret = %format!("{}/{}", source.namespace, source.name), "watching remote cluster");
            let client = ClientSource::Secret {
                local: self.local.clone(),
                source: source.clone(),
            };
            let watch = self.spawn_watch(&cluster, client, Some(source));
            remotes.insert(cluster, watch);
        }
    }

    fn spawn_watch(
        &self,
        cluster: &str,
        client: ClientSource,
        source: Option<RemoteSource>,
    ) -> ClusterWatch {
        let (stores, writers) = cluster_stores();
        let health = Arc::new(Mutex::new(RemoteHealth::default()));
        let task = tokio::spawn(
            watch_cluster(
                cluster.to_string(),
                client,
                writers,
                health.clone(),
                Changed {
                    notify: self.changed.clone(),
                    dirty: self.dirty.clone(),
                },
            )
            .instrument(info_span!("watch", cluster = %cluster)),
        );
        ClusterWatch {
            source,
            stores,
            health,
            task,
        }
    }
}

fn set_health(health: &Mutex<RemoteHealth>, f: impl FnOnce(&mut RemoteHealth)) {
    f(&mut lock(health));
}

/// Reads a remote cluster's kubeconfig from a local Secret and makes a client.
pub async fn remote_client(
    local: &Client,
    cluster: &str,
    namespace: &str,
    name: &str,
    key: &str,
) -> Result<Client, ControlError> {
    let err = |why: String| ControlError::Kubeconfig {
        cluster: cluster.into(),
        namespace: namespace.into(),
        name: name.into(),
        why,
    };
    let secret = Api::<Secret>::namespaced(local.clone(), namespace)
        .get(name)
        .await
        .map_err(|e| err(e.to_string()))?;
    let data = secret
        .data
        .and_then(|mut d| d.remove(key))
        .ok_or_else(|| err(format!("no key {key:?} in the Secret")))?;
    let text = String::from_utf8(data.0).map_err(|_| err("the kubeconfig is not UTF-8".into()))?;
    let kubeconfig =
        Kubeconfig::from_yaml(&text).map_err(|e| err(format!("not a kubeconfig: {e}")))?;
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .map_err(|e| err(e.to_string()))?;
    Client::try_from(config).map_err(|e| err(e.to_string()))
}

/// Where a watch reports changes.
#[derive(Clone)]
struct Changed {
    notify: Arc<Notify>,
    dirty: Arc<Dirty>,
}

impl Changed {
    fn mark(&self, what: u8) {
        self.dirty.mark(what);
        self.notify.notify_one();
    }
}

/// How one kind's events are told apart.
#[derive(Clone, Copy)]
enum Kind {
    /// Every event changes what the agent decides from (Services, ...).
    Spec(u8),
    /// Custom resources with a status subresource: `spec` when the
    /// generation moved, [`Dirty::STATUS`] otherwise.
    Generation(u8),
}

/// Feeds one kind's watch events into its store until the stream ends.
async fn pump<K>(
    api: Api<K>,
    writer: &mut Writer<K>,
    health: &Mutex<RemoteHealth>,
    changed: &Changed,
    kind: Kind,
    marks_synced: bool,
) where
    K: kube::Resource
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    let mut events = watcher(api, watcher::Config::default())
        .default_backoff()
        .boxed();
    let mut specs = SpecChanges::default();
    while let Some(ev) = events.next().await {
        match ev {
            Ok(ev) => {
                writer.apply_watcher_event(&ev);
                set_health(health, |h| {
                    h.last_error = None;
                    if marks_synced && matches!(ev, watcher::Event::InitDone) {
                        h.synced = true;
                    }
                });
                changed.mark(match kind {
                    Kind::Spec(what) => what,
                    Kind::Generation(what) if specs.spec_changed(&ev) => what,
                    Kind::Generation(_) => Dirty::STATUS,
                });
            }
            Err(e) => {
                warn!(kind = %K::kind(&Default::default()), error = %e, "watch failed; keeping the last known state");
                set_health(health, |h| h.last_error = Some(e.to_string()));
                changed.mark(Dirty::STATUS);
            }
        }
    }
}

async fn watch_cluster(
    cluster: String,
    client: ClientSource,
    mut writers: ClusterWriters,
    health: Arc<Mutex<RemoteHealth>>,
    changed: Changed,
) {
    let mut backoff = Duration::from_secs(1);
    loop {
        let client = match &client {
            ClientSource::Local(c) => c.clone(),
            ClientSource::Secret { local, source } => {
                match remote_client(
                    local,
                    &cluster,
                    &source.namespace,
                    &source.name,
                    &source.key,
                )
                .await
                {
                    Ok(c) => c,
                    Err(e) => {
                        warn!(error = %e, retry_in = ?backoff, "cannot build a client for the remote cluster");
                        set_health(&health, |h| h.last_error = Some(e.to_string()));
                        changed.mark(Dirty::STATUS);
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(60));
                        continue;
                    }
                }
            }
        };
        backoff = Duration::from_secs(1);
        tokio::join!(
            pump(
                Api::<TunnelPeer>::all(client.clone()),
                &mut writers.peers,
                &health,
                &changed,
                Kind::Generation(Dirty::PEERS),
                true
            ),
            pump(
                Api::<Service>::all(client.clone()),
                &mut writers.services,
                &health,
                &changed,
                Kind::Spec(Dirty::SERVICES),
                false
            ),
            pump(
                Api::<EndpointSlice>::all(client.clone()),
                &mut writers.slices,
                &health,
                &changed,
                Kind::Spec(Dirty::SERVICES),
                false
            ),
            pump(
                Api::<Namespace>::all(client),
                &mut writers.namespaces,
                &health,
                &changed,
                Kind::Spec(Dirty::SERVICES),
                false
            ),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{NodeAddress, NodeSpec, NodeStatus};

    fn node(pod_cidrs: &[&str], internal_ip: Option<&str>) -> Node {
        Node {
            metadata: kube::api::ObjectMeta {
                name: Some("n1".into()),
                ..Default::default()
            },
            spec: Some(NodeSpec {
                pod_cidrs: Some(pod_cidrs.iter().map(|s| s.to_string()).collect()),
                ..Default::default()
            }),
            status: Some(NodeStatus {
                addresses: internal_ip.map(|ip| {
                    vec![NodeAddress {
                        type_: "InternalIP".into(),
                        address: ip.into(),
                    }]
                }),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn local_spec_from_node() {
        let key = "A".repeat(43) + "=";
        let s = local_peer_spec(
            &node(&["10.1.1.0/24"], Some("10.99.1.11")),
            "east",
            &key,
            51820,
            None,
            None,
        )
        .unwrap();
        assert_eq!(s.endpoints, vec!["10.99.1.11:51820"]);
        assert_eq!(s.pod_cidrs, vec!["10.1.1.0/24"]);
        assert_eq!(s.node, "n1");
        let s = local_peer_spec(
            &node(&["fd00::/64"], Some("fd00:99::1")),
            "east",
            &key,
            4000,
            None,
            Some(1400),
        )
        .unwrap();
        assert_eq!(s.endpoints, vec!["[fd00:99::1]:4000"]);
        assert_eq!(s.mtu, Some(1400));
        let s = local_peer_spec(
            &node(&["10.1.1.0/24"], None),
            "east",
            &key,
            51820,
            Some("lb.example:443"),
            None,
        )
        .unwrap();
        assert_eq!(s.endpoints, vec!["lb.example:443"]);
    }

    #[test]
    fn local_spec_needs_cidr_and_address() {
        let key = "A".repeat(43) + "=";
        assert!(matches!(
            local_peer_spec(&node(&[], Some("10.0.0.1")), "east", &key, 1, None, None),
            Err(ControlError::NoPodCidr(_))
        ));
        assert!(matches!(
            local_peer_spec(&node(&["10.1.1.0/24"], None), "east", &key, 1, None, None),
            Err(ControlError::NoEndpoint(_))
        ));
    }
}
