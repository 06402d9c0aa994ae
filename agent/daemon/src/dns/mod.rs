//! `tunnel-agent dns`: the sdn-tunnel DNS server. Serves `cluster.<name>`
//! for every declared cluster (local included) and the merged zone
//! (`cluster.all`), from the same watches as the agent
//! ([`crate::control::Watches`]); the records and the "working tunnel" rule
//! are decided in [`sdn_tunnel_core::dns`]. Everything else is forwarded to
//! the upstream servers of the pod's `resolv.conf`. UDP and TCP, EDNS and
//! truncation are hickory-server's.

pub mod health;
pub mod upstream;
pub mod zones;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use hickory_server::zone_handler::ZoneHandler;
use hickory_server::Server;
use kube::Client;
use sdn_tunnel_core::dns::{dns_records, ClusterObjects, DnsInput, DnsPolicy, DnsRecords};
use thiserror::Error;
use tracing::{debug, info, warn};

use crate::config::parse_duration;
use crate::control::Watches;

pub use upstream::{forwarder, Upstream};
pub use zones::{build_catalog, DnsHandler, ZoneError};

#[derive(Debug, Error)]
pub enum DnsError {
    #[error("listening on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("kubeconfig {path}: {why}")]
    Kubeconfig { path: PathBuf, why: String },
    #[error(transparent)]
    Kube(#[from] kube::Error),
    #[error(transparent)]
    Upstream(#[from] upstream::UpstreamError),
    #[error("the DNS server stopped: {0}")]
    Server(String),
}

/// Flags and environment of `tunnel-agent dns`.
#[derive(Debug, Clone, Args)]
pub struct DnsConfig {
    /// Address to answer on (UDP and TCP).
    #[arg(long, env = "SDN_TUNNEL_DNS_LISTEN", default_value = "0.0.0.0:53")]
    pub listen: SocketAddr,

    /// Namespace of the TunnelPeers and of kubeconfig Secrets without one.
    #[arg(long, env = "POD_NAMESPACE", default_value = "sdn-tunnel")]
    pub namespace: String,

    /// Kubeconfig of the local cluster; in-cluster configuration when unset.
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,

    /// Name of the merged zone.
    #[arg(long, env = "SDN_TUNNEL_DNS_MERGED_ZONE", default_value = sdn_tunnel_core::dns::DEFAULT_MERGED_ZONE)]
    pub merged_zone: String,

    /// TTL of the answers (and of negative answers), seconds.
    #[arg(long, env = "SDN_TUNNEL_DNS_TTL", default_value_t = 5)]
    pub ttl: u32,

    /// A TunnelPeer status older than this does not count as evidence of a
    /// working tunnel; a few times the agents' `--status-interval`.
    #[arg(long, env = "SDN_TUNNEL_DNS_STATUS_MAX_AGE", default_value = "15s", value_parser = parse_duration)]
    pub status_max_age: Duration,

    /// resolv.conf whose nameservers get every query outside our zones.
    #[arg(
        long,
        env = "SDN_TUNNEL_DNS_RESOLV_CONF",
        default_value = "/etc/resolv.conf"
    )]
    pub resolv_conf: PathBuf,

    /// Upstream servers (`ip` or `ip:port`, comma-separated) instead of
    /// the resolv.conf's.
    #[arg(long, env = "SDN_TUNNEL_DNS_UPSTREAM", value_delimiter = ',')]
    pub upstream: Vec<Upstream>,

    /// Address of `/healthz` and `/readyz`.
    #[arg(long, env = "SDN_TUNNEL_METRICS_ADDR", default_value = "0.0.0.0:9586")]
    pub metrics_addr: SocketAddr,

    /// How often the records are recomputed without any watch event (status
    /// ages move with the clock).
    #[arg(long, default_value = "500ms", value_parser = parse_duration)]
    pub recompute_interval: Duration,
}

impl DnsConfig {
    pub fn policy(&self) -> DnsPolicy {
        DnsPolicy {
            merged_zone: self.merged_zone.clone(),
            max_status_age_secs: i64::try_from(self.status_max_age.as_secs()).unwrap_or(i64::MAX),
        }
    }
}

/// A plain copy of what the watches hold, for `sdn-tunnel-core`.
pub fn snapshot(watches: &Watches) -> BTreeMap<String, ClusterObjects> {
    watches
        .cluster_stores()
        .into_iter()
        .map(|(name, s)| {
            let objects = ClusterObjects {
                peers: s.peers.state().iter().map(|p| (**p).clone()).collect(),
                services: s.services.state().iter().map(|p| (**p).clone()).collect(),
                slices: s.slices.state().iter().map(|p| (**p).clone()).collect(),
                namespaces: s.namespace_labels(),
            };
            (name, objects)
        })
        .collect()
}

/// The records for the current state of the watches, if the local cluster
/// is declared.
pub fn compute(watches: &Watches, policy: &DnsPolicy) -> Option<DnsRecords> {
    let local = watches.local_cluster_name().ok()?;
    let clusters = watches.clusters();
    let objects = snapshot(watches);
    Some(dns_records(DnsInput {
        local_cluster: &local,
        clusters: &clusters,
        objects: &objects,
        now: k8s_openapi::jiff::Timestamp::now(),
        policy,
    }))
}

/// Binds UDP and TCP on `addr` (port 0: the same free port for both) and
/// serves `handler` on them; returns the server and the bound address.
pub async fn bind(
    addr: SocketAddr,
    handler: DnsHandler,
) -> Result<(Server<DnsHandler>, SocketAddr), DnsError> {
    let err = |source| DnsError::Listen { addr, source };
    let udp = tokio::net::UdpSocket::bind(addr).await.map_err(err)?;
    let bound = udp.local_addr().map_err(err)?;
    let tcp = tokio::net::TcpListener::bind(bound).await.map_err(err)?;
    let mut server = Server::new(handler);
    server.register_socket(udp);
    server.register_listener(tcp, Duration::from_secs(5), 64);
    Ok((server, bound))
}

async fn local_client(cfg: &DnsConfig) -> Result<Client, DnsError> {
    Ok(match &cfg.kubeconfig {
        Some(path) => {
            let err = |why: String| DnsError::Kubeconfig {
                path: path.clone(),
                why,
            };
            let kc = kube::config::Kubeconfig::read_from(path).map_err(|e| err(e.to_string()))?;
            let config = kube::Config::from_custom_kubeconfig(kc, &Default::default())
                .await
                .map_err(|e| err(e.to_string()))?;
            Client::try_from(config)?
        }
        None => Client::try_default().await?,
    })
}

/// Logs what changed between two computations: tunnel health and skips.
fn log_changes(old: Option<&DnsRecords>, new: &DnsRecords) {
    for (cluster, health) in &new.tunnels {
        if old.and_then(|o| o.tunnels.get(cluster)) != Some(health) {
            info!(%cluster, ?health, "tunnel health for the merged zone");
        }
    }
    for s in &new.skipped {
        if !old.is_some_and(|o| o.skipped.contains(s)) {
            warn!(cluster = %s.cluster, namespace = %s.namespace, service = %s.name, reason = %s.reason, detail = %s.detail, "skipped in DNS");
        }
    }
}

/// `tunnel-agent dns`: watches, recomputes on every change (and every
/// `recompute_interval`, since status ages move with the clock) and serves.
pub async fn run(cfg: DnsConfig) -> Result<(), DnsError> {
    let forwarder: Option<Arc<dyn ZoneHandler>> =
        forwarder(&cfg.upstream, &cfg.resolv_conf)?.map(|f| Arc::new(f) as Arc<dyn ZoneHandler>);
    if forwarder.is_none() {
        warn!(resolv_conf = %cfg.resolv_conf.display(), "no upstream nameserver: names outside our zones get REFUSED");
    }
    let ready = Arc::new(AtomicBool::new(false));
    let probes = tokio::net::TcpListener::bind(cfg.metrics_addr)
        .await
        .map_err(|source| DnsError::Listen {
            addr: cfg.metrics_addr,
            source,
        })?;
    tokio::spawn(health::serve(probes, ready.clone()));
    let client = local_client(&cfg).await?;
    let watches = Watches::start(client, &cfg.namespace);
    let policy = cfg.policy();
    let handler =
        DnsHandler::new(build_catalog(&DnsRecords::default(), cfg.ttl, 0, forwarder.clone()).0);
    let (mut server, _) = bind(cfg.listen, handler.clone()).await?;
    info!(listen = %cfg.listen, merged_zone = %policy.merged_zone, ttl = cfg.ttl, "serving DNS");
    let mut served: Option<DnsRecords> = None;
    let mut serial: u32 = 0;
    let mut tick = tokio::time::interval(cfg.recompute_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = watches.changed.notified() => {}
            _ = tick.tick() => {}
            r = server.block_until_done() => {
                return Err(DnsError::Server(match r {
                    Ok(()) => "all listeners closed".into(),
                    Err(e) => e.to_string(),
                }));
            }
        }
        watches.follow_declarations();
        let Some(records) = compute(&watches, &policy) else {
            continue;
        };
        if served.as_ref() == Some(&records) {
            continue;
        }
        log_changes(served.as_ref(), &records);
        serial = serial.wrapping_add(1);
        let (catalog, errors) = build_catalog(&records, cfg.ttl, serial, forwarder.clone());
        for e in errors {
            warn!(error = %e, "zone left out");
        }
        handler.replace(catalog);
        debug!(
            serial,
            zones = records.zones.len(),
            names = records
                .zones
                .values()
                .map(|z| z.records.len())
                .sum::<usize>(),
            "zones updated"
        );
        served = Some(records);
        ready.store(true, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests;
