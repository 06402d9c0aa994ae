//! Everything the agent installs outside the tunnel, in the pod namespace
//! and (when the agent has one) the node namespace: routes into the tunnel,
//! our nftables tables and the service proxy, plus the route-event watchers
//! that ask for a repair when one of our routes disappears. The engine
//! decides what; this applies it.

use std::net::IpAddr;
use std::sync::Arc;

use anyhow::{Context, Result};
use ipnet::IpNet;
use sdn_tunnel_core::services::ProxyState;
use tracing::{info, warn};

use crate::config::AgentConfig;
use crate::drivers::netlink::{Route, RouteDriver, RouteEvents};
use crate::drivers::netns::{set_rp_filter_loose, write_sysctl};
use crate::drivers::nftables::{NftDriver, NodeRules, PodRules, NODE_TABLE, POD_TABLE};
use crate::drivers::proxy::ProxyDriver;

/// Routes and nftables in the pod namespace and (when the agent has one)
/// the node namespace: everything the agent installs outside the tunnel.
pub struct Plumbing {
    interface: String,
    pod_ip: IpAddr,
    pod_routes: RouteDriver,
    pod_nft: NftDriver,
    node: Option<(RouteDriver, NftDriver)>,
    proxy: ProxyDriver,
}

impl Plumbing {
    pub async fn open(cfg: &AgentConfig) -> Result<Plumbing> {
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
    pub async fn apply(&self, destinations: &[IpNet]) -> Result<()> {
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
    pub async fn apply_proxy(&self, state: &ProxyState) -> Result<(), String> {
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
    pub async fn remove(&self) {
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

/// Opens the plumbing and starts the route-event watchers that trigger a
/// forced apply when one of our routes disappears.
pub async fn open_plumbing(cfg: &AgentConfig) -> Result<(Plumbing, Arc<tokio::sync::Notify>)> {
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
