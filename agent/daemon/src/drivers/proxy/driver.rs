//! [`ProxyDriver`]: programs [`PROXY_TABLE`] in one namespace — the
//! difference from the last apply, or the whole table when due or when the
//! difference fails — and deletes the conntrack entries of endpoints that
//! left.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use sdn_tunnel_core::services::{Frontend, ProxyState};
use serde_json::{json, Value};
use tokio::sync::Mutex;
use tracing::{debug, info, warn};

use super::render::{full_batch, incremental_commands, stale_flows, Rendered, PROXY_TABLE};
use crate::drivers::conntrack;
use crate::drivers::netns::in_netns_async;
use crate::drivers::nftables::{remove_table_batch, NftDriver, NftError};

/// What one [`ProxyDriver::apply`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApplyReport {
    /// The whole table was replaced (else only the difference was sent).
    pub full: bool,
    /// Commands in the batch (0: nothing to do, nothing sent).
    pub commands: usize,
    /// Time spent in `nft`.
    pub took: Duration,
}

#[derive(Default)]
struct Installed {
    table: Option<Rendered>,
    last_full: Option<Instant>,
}

/// Programs [`PROXY_TABLE`] in one namespace.
pub struct ProxyDriver {
    nft: NftDriver,
    netns: Option<std::path::PathBuf>,
    /// How often a full replacement repairs drift.
    pub full_every: Duration,
    installed: Mutex<Installed>,
}

impl ProxyDriver {
    /// A driver for `netns` (`None`: the agent's own).
    pub fn new(netns: Option<&Path>, full_every: Duration) -> Self {
        ProxyDriver {
            nft: NftDriver::new(netns),
            netns: netns.map(Path::to_path_buf),
            full_every,
            installed: Mutex::new(Installed::default()),
        }
    }

    /// Makes the table match `state`: the difference from the last apply,
    /// or the whole table when due or when the difference fails.
    pub async fn apply(&self, state: &ProxyState) -> Result<ApplyReport, NftError> {
        let mut new = Rendered::of(state);
        let mut inst = self.installed.lock().await;
        let due = inst
            .last_full
            .is_none_or(|t| t.elapsed() >= self.full_every);
        if let (false, Some(old)) = (due, &inst.table) {
            let cmds = incremental_commands(old, &mut new);
            if cmds.is_empty() {
                return Ok(ApplyReport {
                    full: false,
                    commands: 0,
                    took: Duration::ZERO,
                });
            }
            let n = cmds.len();
            let started = Instant::now();
            match self
                .nft
                .run_batch("update service proxy", &json!({ "nftables": cmds }))
                .await
            {
                Ok(()) => {
                    let took = started.elapsed();
                    debug!(commands = n, ?took, "service proxy updated");
                    let stale = stale_flows(old, &new);
                    inst.table = Some(new);
                    self.forget(stale).await;
                    return Ok(ApplyReport {
                        full: false,
                        commands: n,
                        took,
                    });
                }
                Err(e) => {
                    warn!(error = %e, "incremental service proxy update failed; replacing the table")
                }
            }
        }
        // (an attempted difference may have widened `picks`: start afresh)
        let new = Rendered::of(state);
        let batch = full_batch(&new);
        let n = batch["nftables"].as_array().map_or(0, Vec::len);
        let started = Instant::now();
        let stale = inst
            .table
            .as_ref()
            .map(|old| stale_flows(old, &new))
            .unwrap_or_default();
        inst.table = None;
        self.nft.run_batch("replace service proxy", &batch).await?;
        let took = started.elapsed();
        info!(
            frontends = new.frontends.len() + new.no_endpoints.len(),
            endpoints = new.endpoints.len(),
            without_endpoints = new.no_endpoints.len(),
            rules = new.rule_count(),
            ?took,
            "service proxy table replaced"
        );
        inst.table = Some(new);
        inst.last_full = Some(Instant::now());
        self.forget(stale).await;
        Ok(ApplyReport {
            full: true,
            commands: n,
            took,
        })
    }

    /// Deletes the conntrack entries that still bind clients to endpoints
    /// that left (UDP, SCTP), so their next packet picks a current one.
    /// Best effort: a failure is logged, the table is right regardless.
    async fn forget(&self, stale: Vec<(Frontend, SocketAddr)>) {
        if stale.is_empty() {
            return;
        }
        let pairs = stale.len();
        match in_netns_async(self.netns.as_deref(), move || {
            conntrack::delete_flows(&stale)
        })
        .await
        {
            Ok(Ok(deleted)) => {
                debug!(
                    pairs,
                    deleted, "conntrack entries of removed endpoints deleted"
                )
            }
            Ok(Err(e)) => warn!(error = %e, "cannot delete conntrack entries of removed endpoints"),
            Err(e) => warn!(error = %e, "cannot enter the namespace to delete conntrack entries"),
        }
    }

    /// Removes the table (clean shutdown); no error if it is absent.
    pub async fn remove(&self) -> Result<(), NftError> {
        let mut inst = self.installed.lock().await;
        *inst = Installed::default();
        self.nft
            .run_batch("remove service proxy", &remove_table_batch(PROXY_TABLE))
            .await
    }

    /// The JSON listing of the table, if it exists.
    pub async fn list(&self) -> Result<Option<Value>, NftError> {
        self.nft.list_table(PROXY_TABLE).await
    }
}
