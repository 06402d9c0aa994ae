//! The agent's shell around its state machine
//! ([`sdn_tunnel_core::engine`]): it turns watch changes, timers, signals
//! and the data path's counters into events, feeds them in, and applies
//! each plan through the drivers (tunnel, routes and nftables, service
//! proxy, status writes). No decision is taken here.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use ipnet::IpNet;
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use sdn_tunnel_api::{EndpointHost, TunnelPeerSpec};
use sdn_tunnel_core::engine::{
    Applied, Engine, EngineConfig, Event, Mode, Notice, Plan, ServiceInputs, StatusInputs,
};
use sdn_tunnel_core::services::ProxyState;
use sdn_tunnel_core::status::PeerObservation;
use sdn_tunnel_core::DesiredPeer;
use sdn_tunnel_datapath::device::{Device, DeviceConfig};
use sdn_tunnel_datapath::io::tun::{Tun, TunOptions};
use sdn_tunnel_datapath::keys::{PrivateKey, PublicKey};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::config::AgentConfig;
use crate::control::{self, Dirty, Watches};
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

/// Routes and nftables in the pod namespace and (when the agent has one)
/// the node namespace: everything the agent installs outside the tunnel.
struct Plumbing {
    interface: String,
    pod_ip: IpAddr,
    pod_routes: RouteDriver,
    pod_nft: NftDriver,
    node: Option<(RouteDriver, NftDriver)>,
    proxy: ProxyDriver,
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
            proxy: ProxyDriver::new(None, cfg.resync_interval),
        })
    }

    /// Makes routes and nftables match `destinations` (remote pod and
    /// service CIDRs): `dev wg0` in the pod, `via <pod IP>` on the node,
    /// MSS clamping into the tunnel, and no masquerade towards them. The
    /// engine plans this only when the destinations changed or at a repair.
    async fn apply(&self, destinations: &[IpNet]) -> Result<()> {
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
        Ok(())
    }

    /// Programs the service proxy (nftables DNAT in the pod namespace).
    async fn apply_proxy(&self, state: &ProxyState) -> Result<(), String> {
        let r = self.proxy.apply(state).await.map_err(|e| e.to_string())?;
        if r.commands > 0 {
            info!(
                frontends = state.services.len(),
                full = r.full,
                commands = r.commands,
                took_ms = r.took.as_millis() as u64,
                "service proxy applied"
            );
        }
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
        if let Err(e) = self.proxy.remove().await {
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

/// The engine's knobs from the agent's flags.
fn engine_config(cfg: &AgentConfig) -> EngineConfig {
    EngineConfig {
        persistent_keepalive: cfg.keepalive(),
        status_heartbeat: cfg.status_heartbeat(),
    }
}

/// Applies the engine's plans through the drivers: the tunnel, routes and
/// nftables, the service proxy. Holds no decision of its own.
struct Shell {
    tunnel: Arc<Tunnel>,
    plumbing: Plumbing,
    readiness: watch::Sender<Readiness>,
    /// Static mode: the file's peers by public key (endpoints may be
    /// absent there, so they are taken from here, not from the plan).
    statics: Option<BTreeMap<String, TunnelPeer>>,
}

impl Shell {
    /// Feeds `event` into the engine and applies the plan.
    async fn feed(&mut self, engine: &mut Engine, event: Event) {
        let plan = engine.handle(event);
        self.apply(engine, plan).await;
    }

    async fn apply(&mut self, engine: &mut Engine, plan: Plan) {
        log_notices(&plan.notices);
        if !plan.touches_data_path() {
            return;
        }
        let mut applied = Applied::default();
        if !plan.peers.is_empty() {
            let upsert = match &self.statics {
                None => resolve_peers(&plan.peers.upsert).await,
                Some(statics) => plan
                    .peers
                    .upsert
                    .iter()
                    .filter_map(|p| statics.get(&p.public_key).cloned())
                    .collect(),
            };
            let remove: Vec<PublicKey> = plan
                .peers
                .remove
                .iter()
                .filter_map(|k| PublicKey::from_base64(k).ok())
                .collect();
            applied.failed_peers = self
                .tunnel
                .apply_peers(&upsert, &remove)
                .into_iter()
                .map(|(k, why)| (k.to_base64(), why))
                .collect();
        }
        if let Some(r) = &plan.routes {
            applied.routes = Some(
                self.plumbing
                    .apply(&r.destinations)
                    .await
                    .map_err(|e| format!("{e:#}")),
            );
        }
        if let Some(state) = &plan.proxy {
            applied.proxy = Some(self.plumbing.apply_proxy(state).await);
        }
        let follow = engine.handle(Event::Applied(applied));
        log_notices(&follow.notices);
        let ok = engine.converged();
        self.readiness.send_modify(|r| r.last_apply_ok = ok);
    }
}

/// Logs the engine's notices: each is said once, when it happens.
fn log_notices(notices: &[Notice]) {
    for n in notices {
        match n {
            Notice::Refused(r) => {
                warn!(object = %r.object, reason = %r.reason, "{}", r.message)
            }
            Notice::RefusalCleared(o) => info!(object = %o, "no longer refused"),
            Notice::Unusable(why) => {
                warn!(error = %why, "mesh declaration unusable; data path left unchanged")
            }
            Notice::Usable => info!("mesh declaration usable again"),
            Notice::PeerFailed { public_key, why } => {
                warn!(peer = %public_key, %why, "peer not configured")
            }
            Notice::ServiceSkipped(s) => warn!(
                cluster = %s.cluster,
                namespace = %s.namespace,
                service = %s.name,
                reason = %s.reason,
                detail = %s.detail,
                "remote service (or part of it) not proxied"
            ),
            Notice::ApplyFailed { what, why } => {
                warn!(error = %why, "applying {what} failed; retrying at the next repair")
            }
        }
    }
}

/// The events for what the watches say changed.
fn watch_events(watches: &Watches, dirty: u8) -> Vec<Event> {
    let mut events = Vec::new();
    if dirty & Dirty::DECLARATIONS != 0 {
        events.push(Event::Declarations(watches.clusters()));
    }
    if dirty & Dirty::PEERS != 0 {
        events.push(Event::RemotePeers(watches.remote_peers()));
    }
    if dirty & Dirty::SERVICES != 0 {
        let local = watches.local_cluster_name().ok();
        let inputs = watches
            .cluster_stores()
            .into_iter()
            .filter(|(name, _)| Some(name) != local.as_ref())
            .map(|(name, s)| {
                let inputs = ServiceInputs {
                    services: s.services.state(),
                    slices: s.slices.state(),
                    namespaces: s.namespace_labels(),
                };
                (name, inputs)
            })
            .collect();
        events.push(Event::Services(inputs));
    }
    events
}

/// What the status tick needs: the data path's counters, the remote
/// watches' health, and whether this node writes the cluster statuses.
fn status_inputs(watches: &Watches, tunnel: &Tunnel, node: &str) -> StatusInputs {
    let now = Timestamp::now();
    let at = |age: Option<Duration>| {
        age.and_then(|a| k8s_openapi::jiff::SignedDuration::try_from(a).ok())
            .and_then(|a| now.checked_sub(a).ok())
    };
    let observations = tunnel
        .stats()
        .into_iter()
        .map(|s| {
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
    let synced = watches
        .remote_health()
        .into_iter()
        .filter(|(_, h)| h.synced && h.last_error.is_none())
        .map(|(c, _)| c)
        .collect();
    StatusInputs {
        now,
        observations,
        synced,
        writes_cluster_status: writes_cluster_status(watches, node, now),
    }
}

/// Writes the statuses a status tick planned; a write error is said once
/// until it changes, and the status is planned again at the next tick.
struct StatusWriter {
    client: Client,
    namespace: String,
    node: String,
    last_error: Option<String>,
}

impl StatusWriter {
    async fn write(&mut self, engine: &mut Engine, plan: Plan) {
        log_notices(&plan.notices);
        let mut error = None;
        if let Some(status) = plan.status {
            let now = status
                .last_update
                .as_ref()
                .map_or_else(Timestamp::now, |t| t.0);
            match control::write_status(&self.client, &self.namespace, &self.node, status.clone())
                .await
            {
                Ok(()) => engine.status_written(status, now),
                Err(e) => error = Some(format!("TunnelPeer status: {e}")),
            }
        }
        for (name, st) in plan.cluster_statuses {
            if let Err(e) = control::write_cluster_status(&self.client, &name, st).await {
                error = Some(format!("TunnelCluster {name} status: {e}"));
            }
        }
        if error != self.last_error {
            match &error {
                Some(e) => warn!(error = %e, "cannot write a status; retrying at the next tick"),
                None => info!("statuses written again"),
            }
            self.last_error = error;
        }
    }
}

/// Runs the agent until SIGTERM/SIGINT: with `--static-peers`, from that
/// file; otherwise from the TunnelPeer CRDs. Both are the same engine fed
/// from different sources.
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
    let (plumbing, repair) = open_plumbing(&cfg).await?;
    let mut shell = Shell {
        tunnel: tunnel.clone(),
        plumbing,
        readiness,
        statics: None,
    };
    let mut status = StatusWriter {
        client: client.clone(),
        namespace: cfg.namespace.clone(),
        node: cfg.node_name.clone(),
        last_error: None,
    };
    let mut engine = Engine::new(engine_config(&cfg), Mode::Crd);
    shell.feed(&mut engine, Event::LocalPeer(local_peer)).await;

    let mut resync = tokio::time::interval(cfg.resync_interval);
    resync.tick().await;
    let mut status_tick = tokio::time::interval(cfg.status_interval);
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    // Everything is new at the start.
    let mut dirty = Dirty::DECLARATIONS | Dirty::PEERS | Dirty::SERVICES;
    loop {
        if dirty & Dirty::DECLARATIONS != 0 {
            watches.follow_declarations();
        }
        for event in watch_events(&watches, dirty) {
            shell.feed(&mut engine, event).await;
        }
        dirty = 0;
        tokio::select! {
            _ = watches.changed.notified() => {
                // Coalesce bursts of watch events into one pass; statuses
                // alone wake nothing here.
                tokio::time::sleep(Duration::from_millis(100)).await;
                dirty = watches.dirty.take() & !Dirty::STATUS;
            }
            _ = repair.notified() => shell.feed(&mut engine, Event::Repair).await,
            _ = resync.tick() => shell.feed(&mut engine, Event::Repair).await,
            _ = status_tick.tick() => {
                let inputs = status_inputs(&watches, &tunnel, &cfg.node_name);
                let plan = engine.handle(Event::StatusTick(inputs));
                status.write(&mut engine, plan).await;
            }
            _ = tokio::signal::ctrl_c() => break,
            _ = sigterm.recv() => break,
        }
    }
    info!("shutting down: removing our routes and nftables tables");
    shell.plumbing.remove().await;
    Ok(())
}

/// A static peer as the engine plans it. A peer without an endpoint in
/// the file waits for the other side to reach it; the engine still needs
/// one to compare, so it gets the unspecified address (the shell takes the
/// real, absent, endpoint from the file).
fn static_desired(p: &TunnelPeer) -> DesiredPeer {
    let endpoint = p
        .endpoint
        .unwrap_or_else(|| SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0));
    DesiredPeer {
        public_key: p.public_key.to_base64(),
        cluster: "static".into(),
        node: String::new(),
        endpoint: sdn_tunnel_api::Endpoint {
            host: EndpointHost::Ip(endpoint.ip()),
            port: endpoint.port(),
        },
        allowed_ips: p.allowed_ips.clone(),
        persistent_keepalive: p.persistent_keepalive,
    }
}

/// The file's peers: for the engine, and by key for the shell.
fn static_inputs(peers: Vec<TunnelPeer>) -> (Event, BTreeMap<String, TunnelPeer>) {
    let event = Event::StaticPeers(peers.iter().map(static_desired).collect());
    let by_key = peers
        .into_iter()
        .map(|p| (p.public_key.to_base64(), p))
        .collect();
    (event, by_key)
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
    let peers = static_peers::load(path, cfg.keepalive())
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
    let (event, statics) = static_inputs(peers);
    let mut shell = Shell {
        tunnel,
        plumbing,
        readiness,
        statics: Some(statics),
    };
    let mut engine = Engine::new(engine_config(&cfg), Mode::Static);
    shell.feed(&mut engine, event).await;

    let mut resync = tokio::time::interval(cfg.resync_interval);
    resync.tick().await;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sighup = signal(SignalKind::hangup())?;
    loop {
        tokio::select! {
            _ = sighup.recv() => {
                match static_peers::load(path, cfg.keepalive())
                    .and_then(|p| static_peers::refuse_local(&p, &own, cfg.pod_ip).map(|()| p))
                {
                    Ok(p) => {
                        info!(file = %path.display(), peers = p.len(), "static peers reloaded");
                        let (event, statics) = static_inputs(p);
                        shell.statics = Some(statics);
                        shell.feed(&mut engine, event).await;
                    }
                    Err(e) => warn!(
                        file = %path.display(),
                        error = %e,
                        "static peers not reloaded; the peers and routes in place are kept"
                    ),
                }
            }
            _ = repair.notified() => shell.feed(&mut engine, Event::Repair).await,
            _ = resync.tick() => shell.feed(&mut engine, Event::Repair).await,
            _ = tokio::signal::ctrl_c() => break,
            _ = sigterm.recv() => break,
        }
    }
    info!("shutting down: removing our routes and nftables tables");
    shell.plumbing.remove().await;
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
