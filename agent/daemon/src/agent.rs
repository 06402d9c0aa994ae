//! The agent's event loop: watch → snapshot → desired → apply, plus the
//! status writer. Decisions come from `sdn-tunnel-core`; this module only
//! gathers inputs, calls it, and hands the result to the tunnel and drivers.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use ipnet::IpNet;
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use sdn_tunnel_api::{EndpointHost, TunnelPeerSpec, TunnelPeerStatus};
use sdn_tunnel_core::mesh::{validate_mesh, SourcedPeer};
use sdn_tunnel_core::status::{own_peer_status, remote_peer_statuses, PeerObservation};
use sdn_tunnel_core::{desired_state, DesiredPeer, DesiredState, Snapshot};
use sdn_tunnel_datapath::device::{Device, DeviceConfig};
use sdn_tunnel_datapath::io::tun::{Tun, TunOptions};
use sdn_tunnel_datapath::keys::{PrivateKey, PublicKey};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::config::AgentConfig;
use crate::control::{self, Watches};
use crate::drivers::netlink::{Route, RouteDriver, RouteEvents};
use crate::drivers::netns::{set_rp_filter_loose, write_sysctl};
use crate::drivers::nftables::{NftDriver, NodeRules, PodRules, NODE_TABLE, POD_TABLE};
use crate::drivers::proxy::ProxyDriver;
use crate::health::Readiness;
use crate::static_peers;
use crate::tunnel::{bind_udp, Tunnel, TunnelPeer};

/// WireGuard's outer headers: IPv4 20 + UDP 8 + WireGuard 32 = 60 bytes
/// (IPv6: 80). The tunnel MTU is the underlay's minus this.
pub const OVERHEAD_V4: u32 = 60;

/// The tunnel MTU: the configured one, or the MTU of the pod's `eth0`
/// (what the CNI gave the pod, at most the underlay's) minus the IPv4
/// overhead.
pub fn tunnel_mtu(configured: Option<u16>) -> u32 {
    if let Some(m) = configured {
        return u32::from(m);
    }
    let underlay = std::fs::read_to_string("/sys/class/net/eth0/mtu")
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
        .unwrap_or(1500);
    underlay.saturating_sub(OVERHEAD_V4).max(1280)
}

/// What the reconcile loop last decided, for the status writer.
#[derive(Default)]
struct Decided {
    mesh: Option<sdn_tunnel_core::Mesh>,
    inputs: Vec<(String, sdn_tunnel_api::TunnelPeer)>,
    desired: DesiredState,
}

/// Routes and nftables in the pod namespace and (when the agent has one)
/// the node namespace: everything the agent installs outside the tunnel.
struct Plumbing {
    interface: String,
    pod_ip: IpAddr,
    pod_routes: RouteDriver,
    pod_nft: NftDriver,
    node: Option<(RouteDriver, NftDriver)>,
    /// Destinations of the last successful apply.
    applied: Mutex<Option<Vec<IpNet>>>,
    services: ServiceProxy,
}

impl Plumbing {
    async fn open(cfg: &AgentConfig) -> Result<Plumbing> {
        let node_netns = cfg.node_netns.as_deref();
        let node = match node_netns {
            Some(ns) => Some((RouteDriver::open(Some(ns)).await?, NftDriver::new(Some(ns)))),
            None => None,
        };
        // The agent pod routes between the node and the tunnel.
        write_sysctl(None, "net.ipv4.ip_forward", "1")?;
        if let Err(e) = write_sysctl(None, "net.ipv6.conf.all.forwarding", "1") {
            warn!(error = %e, "IPv6 forwarding not enabled (IPv6 disabled?)");
        }
        // Cross-cluster packets arrive with remote pod sources: loose
        // reverse-path filtering keeps them from being dropped.
        set_rp_filter_loose(None, &[cfg.interface.as_str(), "eth0"])?;
        if node_netns.is_some() {
            set_rp_filter_loose(node_netns, &[])?;
        }
        Ok(Plumbing {
            interface: cfg.interface.clone(),
            pod_ip: cfg.pod_ip,
            pod_routes: RouteDriver::open(None).await?,
            pod_nft: NftDriver::new(None),
            node,
            applied: Mutex::new(None),
            services: ServiceProxy::new(cfg.resync_interval),
        })
    }

    /// Makes routes and nftables match `destinations` (remote pod and
    /// service CIDRs): `dev wg0` in the pod, `via <pod IP>` on the node,
    /// MSS clamping into the tunnel, and no masquerade towards them.
    ///
    /// Unless `force`d (resync, a route event), nothing is done when the
    /// destinations are those last applied: watch events that change no
    /// decision (status updates, mostly) cost no netlink dump or nft run.
    async fn apply(&self, destinations: &[IpNet], force: bool) -> Result<()> {
        if !force
            && self
                .applied
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .as_deref()
                == Some(destinations)
        {
            return Ok(());
        }
        let wg = self.pod_routes.link_index(&self.interface).await?;
        let pod: Vec<Route> = destinations.iter().map(|d| Route::dev(*d, wg)).collect();
        self.pod_routes.apply(&pod).await?;
        self.pod_nft
            .apply_pod(&PodRules {
                tunnel_interface: self.interface.clone(),
            })
            .await?;
        if let Some((routes, nft)) = &self.node {
            let hop = routes.resolve_next_hop(self.pod_ip).await?;
            let node: Vec<Route> = destinations.iter().map(|d| Route::via(*d, hop)).collect();
            routes.apply(&node).await?;
            nft.apply_node(&NodeRules {
                remote_cidrs: destinations.to_vec(),
            })
            .await?;
        }
        *self.applied.lock().unwrap_or_else(|e| e.into_inner()) = Some(destinations.to_vec());
        Ok(())
    }

    /// Removes exactly what the agent installed (clean shutdown).
    async fn remove(&self) {
        if let Err(e) = self.pod_routes.remove_all().await {
            warn!(error = %e, "removing pod routes");
        }
        if let Err(e) = self.pod_nft.remove_table(POD_TABLE).await {
            warn!(error = %e, "removing pod nftables table");
        }
        if let Err(e) = self.services.driver.remove().await {
            warn!(error = %e, "removing the service proxy table");
        }
        if let Some((routes, nft)) = &self.node {
            if let Err(e) = routes.remove_all().await {
                warn!(error = %e, "removing node routes");
            }
            if let Err(e) = nft.remove_table(NODE_TABLE).await {
                warn!(error = %e, "removing node nftables table");
            }
        }
    }
}

/// Pokes `changed` whenever a route of ours changes in `netns`, so that a
/// deleted route is restored at once rather than at the next resync.
async fn watch_routes(netns: Option<std::path::PathBuf>, repair: Arc<tokio::sync::Notify>) {
    let mut events = match RouteEvents::subscribe(netns.as_deref()).await {
        Ok(e) => e,
        Err(e) => {
            warn!(error = %e, "no route events; drift is repaired by the periodic resync only");
            return;
        }
    };
    while let Some(ev) = events.next().await {
        if ev.ours && ev.removed {
            info!(dst = ?ev.dst, "one of our routes was removed; reapplying");
            repair.notify_one();
        }
    }
}

/// Resolves the endpoints of the desired peers (names through DNS).
async fn resolve_peers(desired: &[DesiredPeer]) -> Vec<TunnelPeer> {
    let mut out = Vec::with_capacity(desired.len());
    for p in desired {
        let Ok(public_key) = PublicKey::from_base64(&p.public_key) else {
            // validate_mesh refused bad keys already; never reached in practice.
            warn!(peer = %p.public_key, "skipping a peer with an unparsable key");
            continue;
        };
        let endpoint = match &p.endpoint.host {
            EndpointHost::Ip(ip) => Some(SocketAddr::new(*ip, p.endpoint.port)),
            EndpointHost::Name(name) => {
                match tokio::net::lookup_host((name.as_str(), p.endpoint.port)).await {
                    Ok(mut addrs) => addrs.next(),
                    Err(e) => {
                        warn!(peer = %p.public_key, endpoint = %p.endpoint, error = %e, "cannot resolve endpoint");
                        None
                    }
                }
            }
        };
        out.push(TunnelPeer {
            public_key,
            endpoint,
            allowed_ips: p.allowed_ips.clone(),
            persistent_keepalive: p.persistent_keepalive,
        });
    }
    out
}

/// Creates the TUN device and the UDP socket (in the node's namespace when
/// configured) and starts the data path over them.
fn start_tunnel(cfg: &AgentConfig, key: PrivateKey) -> Result<Arc<Tunnel>> {
    let mtu = tunnel_mtu(cfg.mtu);
    let tun = Tun::create(&TunOptions {
        name: cfg.interface.clone(),
        mtu: Some(mtu),
        multi_queue: false,
        up: true,
        // Virtio-net headers with TSO/USO: the runtime splits super-packets
        // before encryption and coalesces decrypted TCP segments (GRO), and
        // falls back to plain packets where the kernel refuses the offloads.
        offload: true,
    })
    .with_context(|| format!("creating TUN device {}", cfg.interface))?;
    let bind = SocketAddr::new(
        if cfg.pod_ip.is_ipv6() {
            IpAddr::V6(Ipv6Addr::UNSPECIFIED)
        } else {
            IpAddr::V4(Ipv4Addr::UNSPECIFIED)
        },
        cfg.listen_port,
    );
    let udp =
        bind_udp(bind, cfg.node_netns.as_deref()).with_context(|| format!("binding UDP {bind}"))?;
    let tunnel = Arc::new(Tunnel::start(
        Device::new(DeviceConfig::new(key)),
        tun,
        udp,
    )?);
    info!(interface = %cfg.interface, mtu, listen = %tunnel.local_addr(), "data path up");
    Ok(tunnel)
}

/// Opens the plumbing and starts the route-event watchers that trigger a
/// forced apply when one of our routes disappears.
async fn open_plumbing(cfg: &AgentConfig) -> Result<(Plumbing, Arc<tokio::sync::Notify>)> {
    let plumbing = Plumbing::open(cfg)
        .await
        .context("opening netlink and nftables")?;
    let repair = Arc::new(tokio::sync::Notify::new());
    tokio::spawn(watch_routes(None, repair.clone()));
    if let Some(ns) = &cfg.node_netns {
        tokio::spawn(watch_routes(Some(ns.clone()), repair.clone()));
    }
    Ok((plumbing, repair))
}

/// Runs the agent until SIGTERM/SIGINT: with `--static-peers`, from that
/// file; otherwise from the TunnelPeer CRDs.
pub async fn run(cfg: AgentConfig, readiness: watch::Sender<Readiness>) -> Result<()> {
    if let Some(path) = cfg.static_peers.clone() {
        return run_static(cfg, &path, readiness).await;
    }
    if cfg.node_name.is_empty() {
        anyhow::bail!(
            "the node name is required (--node-name or NODE_NAME, from the downward API), \
             unless the peers come from --static-peers"
        );
    }
    let (key, created) = PrivateKey::load_or_generate(&cfg.key_file)
        .with_context(|| format!("private key {}", cfg.key_file.display()))?;
    let public = key.public_key().to_base64();
    info!(public_key = %public, created, "WireGuard key ready");

    let client = match &cfg.kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)?;
            Client::try_from(kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?)?
        }
        None => Client::try_default()
            .await
            .context("in-cluster Kubernetes configuration")?,
    };

    let watches = Watches::start(client.clone(), &cfg.namespace);
    watches.wait_local_synced().await;
    readiness.send_modify(|r| r.local_synced = true);
    let cluster = loop {
        match watches.local_cluster_name() {
            Ok(c) => break c,
            Err(e) => {
                warn!(error = %e, "waiting for the local TunnelCluster");
                let _ =
                    tokio::time::timeout(Duration::from_secs(5), watches.changed.notified()).await;
            }
        }
    };
    let local_peer = publish_with_retry(&client, &cfg, &cluster, &public).await;
    readiness.send_modify(|r| r.published = true);
    info!(%cluster, node = %cfg.node_name, endpoint = ?local_peer.endpoints, "TunnelPeer published");

    let tunnel = start_tunnel(&cfg, key)?;
    readiness.send_modify(|r| r.tunnel_up = true);
    // Route events force a full apply (drift repair); watch events only
    // apply what changed.
    let (plumbing, repair) = open_plumbing(&cfg).await?;

    let decided = Arc::new(Mutex::new(Decided::default()));
    let status_task = tokio::spawn(status_loop(
        client.clone(),
        cfg.clone(),
        tunnel.clone(),
        decided.clone(),
        watches.clone(),
    ));

    let mut resync = tokio::time::interval(cfg.resync_interval);
    let mut force = true;
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        watches.follow_declarations();
        let ok = reconcile(
            &watches,
            &local_peer,
            &cfg,
            &tunnel,
            &plumbing,
            &decided,
            force,
        )
        .await;
        readiness.send_modify(|r| r.last_apply_ok = ok);
        tokio::select! {
            _ = watches.changed.notified() => {
                // Coalesce bursts of watch events into one reconcile.
                tokio::time::sleep(Duration::from_millis(100)).await;
                force = false;
            }
            _ = repair.notified() => force = true,
            _ = resync.tick() => force = true,
            _ = tokio::signal::ctrl_c() => break,
            _ = sigterm.recv() => break,
        }
    }
    info!("shutting down: removing our routes and nftables tables");
    status_task.abort();
    plumbing.remove().await;
    Ok(())
}

/// The agent with its peers from a file (`--static-peers`): the same data
/// path, routes and nftables as with the CRDs, no Kubernetes API. SIGHUP
/// re-reads the file; a file that fails its checks is logged and ignored,
/// and the peers and routes in place stay as they are.
async fn run_static(
    cfg: AgentConfig,
    path: &std::path::Path,
    readiness: watch::Sender<Readiness>,
) -> Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    // Checked before anything is created (the key file included): a bad
    // file changes nothing.
    let mut peers = static_peers::load(path, cfg.keepalive())
        .with_context(|| format!("static peers {}", path.display()))?;
    let (key, created) = PrivateKey::load_or_generate(&cfg.key_file)
        .with_context(|| format!("private key {}", cfg.key_file.display()))?;
    let own = key.public_key();
    info!(public_key = %own.to_base64(), created, "WireGuard key ready");
    static_peers::refuse_local(&peers, &own, cfg.pod_ip)
        .with_context(|| format!("static peers {}", path.display()))?;
    info!(file = %path.display(), peers = peers.len(), "static peers loaded");
    readiness.send_modify(|r| {
        r.local_synced = true;
        r.published = true;
    });

    let tunnel = start_tunnel(&cfg, key)?;
    readiness.send_modify(|r| r.tunnel_up = true);
    let (plumbing, repair) = open_plumbing(&cfg).await?;

    let mut resync = tokio::time::interval(cfg.resync_interval);
    let mut force = true;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sighup = signal(SignalKind::hangup())?;
    loop {
        let failed = tunnel.set_peers(&peers);
        for (k, why) in &failed {
            warn!(peer = %k.to_base64(), %why, "peer not configured");
        }
        let routed = match plumbing
            .apply(&static_peers::destinations(&peers), force)
            .await
        {
            Ok(()) => true,
            Err(e) => {
                warn!(error = %e, "applying routes and nftables failed; retrying at the next resync");
                false
            }
        };
        readiness.send_modify(|r| r.last_apply_ok = failed.is_empty() && routed);
        tokio::select! {
            _ = sighup.recv() => {
                match static_peers::load(path, cfg.keepalive())
                    .and_then(|p| static_peers::refuse_local(&p, &own, cfg.pod_ip).map(|()| p))
                {
                    Ok(p) => {
                        info!(file = %path.display(), peers = p.len(), "static peers reloaded");
                        peers = p;
                    }
                    Err(e) => warn!(
                        file = %path.display(),
                        error = %e,
                        "static peers not reloaded; the peers and routes in place are kept"
                    ),
                }
                force = false;
            }
            _ = repair.notified() => force = true,
            _ = resync.tick() => force = true,
            _ = tokio::signal::ctrl_c() => break,
            _ = sigterm.recv() => break,
        }
    }
    info!("shutting down: removing our routes and nftables tables");
    plumbing.remove().await;
    Ok(())
}

async fn publish_with_retry(
    client: &Client,
    cfg: &AgentConfig,
    cluster: &str,
    public: &str,
) -> TunnelPeerSpec {
    let mut backoff = Duration::from_secs(1);
    loop {
        match control::publish_local_peer(client, cfg, cluster, public).await {
            Ok(p) => return p.spec,
            Err(e) => {
                warn!(error = %e, retry_in = ?backoff, "cannot publish this node's TunnelPeer");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    }
}

/// One pass of watch → snapshot → desired → apply. Returns whether it applied.
async fn reconcile(
    watches: &Watches,
    local_peer: &TunnelPeerSpec,
    cfg: &AgentConfig,
    tunnel: &Tunnel,
    plumbing: &Plumbing,
    decided: &Mutex<Decided>,
    force: bool,
) -> bool {
    let clusters = watches.clusters();
    let inputs = watches.remote_peers();
    let sourced: Vec<SourcedPeer<'_>> = inputs
        .iter()
        .map(|(c, p)| SourcedPeer { source: c, peer: p })
        .collect();
    let mesh = match validate_mesh(&clusters, &sourced, &local_peer.public_key) {
        Ok(m) => m,
        Err(e) => {
            // Nothing usable to decide from: keep the data path as it is.
            warn!(error = %e, "mesh declaration unusable; data path left unchanged");
            return false;
        }
    };
    for r in &mesh.refusals {
        warn!(object = %r.object, reason = %r.reason, "{}", r.message);
    }
    let desired = match desired_state(&Snapshot {
        local_peer,
        mesh: &mesh,
        persistent_keepalive: cfg.keepalive(),
    }) {
        Ok(d) => d,
        Err(e) => {
            warn!(error = %e, "cannot compute the desired state; data path left unchanged");
            return false;
        }
    };
    let peers = resolve_peers(&desired.peers).await;
    let failed = tunnel.set_peers(&peers);
    for (k, why) in &failed {
        warn!(peer = %k.to_base64(), %why, "peer not configured");
    }
    let destinations: Vec<IpNet> = desired.routes.iter().map(|r| r.destination).collect();
    let routed = match plumbing.apply(&destinations, force).await {
        Ok(()) => true,
        Err(e) => {
            warn!(error = %e, "applying routes and nftables failed; retrying at the next resync");
            false
        }
    };
    let proxied = plumbing.services.apply(watches, &mesh).await;
    let mut d = decided.lock().unwrap_or_else(|e| e.into_inner());
    *d = Decided {
        mesh: Some(mesh),
        inputs,
        desired,
    };
    failed.is_empty() && routed && proxied
}

async fn status_loop(
    client: Client,
    cfg: AgentConfig,
    tunnel: Arc<Tunnel>,
    decided: Arc<Mutex<Decided>>,
    watches: Arc<Watches>,
) {
    let mut previous: Option<TunnelPeerStatus> = None;
    let mut tick = tokio::time::interval(cfg.status_interval);
    loop {
        tick.tick().await;
        let now = Timestamp::now();
        let observations: BTreeMap<String, PeerObservation> = tunnel
            .stats()
            .into_iter()
            .map(|s| {
                let at = |age: Option<Duration>| {
                    age.and_then(|a| k8s_openapi::jiff::SignedDuration::try_from(a).ok())
                        .and_then(|a| now.checked_sub(a).ok())
                };
                (
                    s.public_key.to_base64(),
                    PeerObservation {
                        last_handshake: at(s.last_handshake_age),
                        rx_bytes: s.rx_bytes,
                        tx_bytes: s.tx_bytes,
                        rtt_micros: s
                            .handshake_rtt
                            .and_then(|r| u64::try_from(r.as_micros()).ok()),
                        last_receive: at(s.last_receive_age),
                        keepalive_secs: s.persistent_keepalive,
                    },
                )
            })
            .collect();
        let status = {
            let d = decided.lock().unwrap_or_else(|e| e.into_inner());
            let Some(mesh) = &d.mesh else { continue };
            let sourced: Vec<SourcedPeer<'_>> = d
                .inputs
                .iter()
                .map(|(c, p)| SourcedPeer { source: c, peer: p })
                .collect();
            let statuses =
                remote_peer_statuses(mesh, &sourced, &d.desired.peers, &observations, now);
            let cluster_statuses = if writes_cluster_status(&watches, &cfg.node_name, now) {
                cluster_statuses(&watches, mesh, &statuses, now)
            } else {
                Vec::new()
            };
            (
                own_peer_status(statuses, previous.as_ref(), now),
                cluster_statuses,
            )
        };
        let (status, cluster_statuses) = status;
        match control::write_status(&client, &cfg.namespace, &cfg.node_name, status.clone()).await {
            Ok(()) => previous = Some(status),
            Err(e) => warn!(error = %e, "cannot write the TunnelPeer status"),
        }
        debug!(
            count = cluster_statuses.len(),
            "TunnelCluster statuses to write"
        );
        for (name, st) in cluster_statuses {
            if let Err(e) = control::write_cluster_status(&client, &name, st).await {
                warn!(cluster = %name, error = %e, "cannot write the TunnelCluster status");
            }
        }
    }
}

/// Every agent of a cluster sees the same remote clusters, so one of them
/// is enough to write the (cluster-scoped) `TunnelCluster` statuses: the
/// live agent whose node name sorts first. Live = its TunnelPeer status was
/// written within the last 30 s. No lease is needed: during a hand-over two
/// agents may both write, with the same field manager, and the last write wins.
fn writes_cluster_status(watches: &Watches, node: &str, now: Timestamp) -> bool {
    let Ok(local) = watches.local_cluster_name() else {
        return false;
    };
    let Some(stores) = watches.cluster_stores().remove(&local) else {
        return false;
    };
    let live_first = stores
        .peers
        .state()
        .iter()
        .filter(|p| {
            p.status
                .as_ref()
                .and_then(|s| s.last_update.as_ref())
                .is_some_and(|t| now.duration_since(t.0).as_secs() <= 30)
        })
        .map(|p| p.spec.node.clone())
        .min();
    live_first.is_none_or(|first| node <= first.as_str())
}

/// This node's view of every remote `TunnelCluster`, as its status.
fn cluster_statuses(
    watches: &Watches,
    mesh: &sdn_tunnel_core::Mesh,
    statuses: &[sdn_tunnel_api::RemotePeerStatus],
    now: Timestamp,
) -> Vec<(String, sdn_tunnel_api::TunnelClusterStatus)> {
    let health = watches.remote_health();
    watches
        .clusters()
        .into_iter()
        .filter(|c| !c.spec.local)
        .filter_map(|c| {
            let name = c.metadata.name.clone()?;
            // Synced and no error now: the remote API was in sync at `now`.
            let synced_now = health
                .get(&c.spec.cluster_name)
                .is_some_and(|h| h.synced && h.last_error.is_none())
                .then_some(now);
            let st = sdn_tunnel_core::status::cluster_status(
                &c,
                mesh,
                statuses,
                c.status.as_ref(),
                synced_now,
                now,
            );
            Some((name, st))
        })
        .collect()
}

/// Service proxying: the remote clusters' Services and EndpointSlices (as
/// last seen) → `sdn_tunnel_core::services` → nftables DNAT in the pod
/// namespace (`drivers::proxy`).
struct ServiceProxy {
    driver: ProxyDriver,
    /// What was last reported as skipped, so a reason is logged once.
    reported: Mutex<Vec<sdn_tunnel_core::services::Skipped>>,
}

impl ServiceProxy {
    fn new(full_every: Duration) -> Self {
        ServiceProxy {
            driver: ProxyDriver::new(None, full_every),
            reported: Mutex::new(Vec::new()),
        }
    }

    /// Computes and applies the proxy for the accepted remote clusters of
    /// `mesh`. Returns whether it applied.
    async fn apply(&self, watches: &Watches, mesh: &sdn_tunnel_core::Mesh) -> bool {
        use sdn_tunnel_core::services::{desired_proxy, RemoteServices};
        let declared = watches.clusters();
        let stores = watches.cluster_stores();
        let held: Vec<_> = mesh
            .clusters
            .iter()
            .map(|c| {
                let selector = declared
                    .iter()
                    .find(|d| !d.spec.local && d.spec.cluster_name == c.name)
                    .and_then(|d| d.spec.service_selector.clone());
                let (services, slices, namespaces) = stores
                    .get(&c.name)
                    .map(|s| (s.services.state(), s.slices.state(), s.namespace_labels()))
                    .unwrap_or_default();
                (c, selector, services, slices, namespaces)
            })
            .collect();
        let remotes: Vec<RemoteServices<'_>> = held
            .iter()
            .map(
                |(c, selector, services, slices, namespaces)| RemoteServices {
                    cluster: c,
                    selector: selector.as_ref(),
                    services: services.iter().map(AsRef::as_ref).collect(),
                    slices: slices.iter().map(AsRef::as_ref).collect(),
                    namespaces,
                },
            )
            .collect();
        let state = desired_proxy(&remotes);
        {
            let mut reported = self.reported.lock().unwrap_or_else(|e| e.into_inner());
            if *reported != state.skipped {
                for s in state.skipped.iter().filter(|s| !reported.contains(s)) {
                    warn!(cluster = %s.cluster, namespace = %s.namespace, service = %s.name, reason = %s.reason, detail = %s.detail, "remote service (or part of it) not proxied");
                }
                *reported = state.skipped.clone();
            }
        }
        match self.driver.apply(&state).await {
            Ok(r) => {
                if r.commands > 0 {
                    info!(
                        frontends = state.services.len(),
                        full = r.full,
                        commands = r.commands,
                        took_ms = r.took.as_millis() as u64,
                        "service proxy applied"
                    );
                }
                true
            }
            Err(e) => {
                warn!(error = %e, "applying the service proxy failed; retrying at the next change or resync");
                false
            }
        }
    }
}
