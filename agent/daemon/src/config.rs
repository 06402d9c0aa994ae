//! The agent's configuration, from flags or from the environment the
//! DaemonSet sets (downward API: `NODE_NAME`, `POD_IP`, `POD_NAMESPACE`).

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

/// Default WireGuard port.
pub const DEFAULT_LISTEN_PORT: u16 = 51820;

#[derive(Debug, Clone, Args)]
pub struct AgentConfig {
    /// Name of this node's Node object (required unless `--static-peers`).
    #[arg(long, env = "NODE_NAME", default_value_t = String::new(), hide_default_value = true)]
    pub node_name: String,

    /// IP of the agent pod: the next hop of the node's routes into the tunnel.
    #[arg(long, env = "POD_IP")]
    pub pod_ip: IpAddr,

    /// Namespace of the agent's TunnelPeer (and of kubeconfig Secrets without one).
    #[arg(long, env = "POD_NAMESPACE", default_value = "sdn-tunnel")]
    pub namespace: String,

    /// Kubeconfig of the local cluster; in-cluster configuration when unset.
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,

    /// UDP port of the WireGuard socket.
    #[arg(long, env = "SDN_TUNNEL_LISTEN_PORT", default_value_t = DEFAULT_LISTEN_PORT)]
    pub listen_port: u16,

    /// Name of the TUN device in the agent pod.
    #[arg(long, env = "SDN_TUNNEL_INTERFACE", default_value = "wg0")]
    pub interface: String,

    /// Private key file (created with mode 0600 on first start).
    #[arg(
        long,
        env = "SDN_TUNNEL_KEY_FILE",
        default_value = "/var/lib/sdn-tunnel/private.key"
    )]
    pub key_file: PathBuf,

    /// The node's network namespace (e.g. `/proc/1/ns/net` with hostPID, or
    /// a mounted `/run/netns/...`): the UDP socket is opened there, so the
    /// endpoint is `nodeIP:port`, and the node's routes are installed there.
    #[arg(long, env = "SDN_TUNNEL_NODE_NETNS")]
    pub node_netns: Option<PathBuf>,

    /// Endpoint other clusters should use (`host:port`), for nodes behind
    /// NAT or a load balancer; the node's InternalIP and the port otherwise.
    #[arg(long, env = "SDN_TUNNEL_ENDPOINT")]
    pub endpoint: Option<String>,

    /// Tunnel MTU; derived from the underlay device when unset.
    #[arg(long, env = "SDN_TUNNEL_MTU")]
    pub mtu: Option<u16>,

    /// WireGuard persistent keepalive in seconds (0 disables it).
    #[arg(long, env = "SDN_TUNNEL_KEEPALIVE", default_value_t = 25)]
    pub keepalive_secs: u16,

    /// Address of `/metrics`, `/healthz` and `/readyz`.
    #[arg(long, env = "SDN_TUNNEL_METRICS_ADDR", default_value = "0.0.0.0:9586")]
    pub metrics_addr: SocketAddr,

    /// How often the agent looks at its peers for its TunnelPeer status: a
    /// change of a peer's state, a refusal or a condition is written at the
    /// next look.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub status_interval: Duration,

    /// Longest time between two status writes when nothing changed but the
    /// counters (default: twice `--status-interval`). Readers judge liveness
    /// by the status' age: keep it below the DNS server's `--status-max-age`.
    #[arg(long, value_parser = parse_duration)]
    pub status_heartbeat: Option<Duration>,

    /// Take the peers from this file (`[Peer]` sections in `wg setconf`
    /// format) instead of the TunnelPeer CRDs: no Kubernetes API is used.
    /// Re-read on SIGHUP; a bad file is refused whole (see `static_peers`).
    #[arg(long, env = "SDN_TUNNEL_STATIC_PEERS")]
    pub static_peers: Option<PathBuf>,

    /// How often the whole desired state is re-applied (repairs drift).
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub resync_interval: Duration,
}

impl AgentConfig {
    /// The status heartbeat: as set, or twice the status interval.
    pub fn status_heartbeat(&self) -> Duration {
        self.status_heartbeat
            .unwrap_or(self.status_interval.saturating_mul(2))
            .max(self.status_interval)
    }

    /// The keepalive as WireGuard takes it.
    pub fn keepalive(&self) -> Option<u16> {
        (self.keepalive_secs > 0).then_some(self.keepalive_secs)
    }
}

/// Parses a duration in humantime's grammar (`500ms`, `5s`, `2m`,
/// `1m30s`, `1h`); a bare number is seconds. Zero is refused.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        s.parse::<u64>()
            .map(Duration::from_secs)
            .map_err(|_| format!("{s:?} is out of range"))?
    } else {
        humantime::parse_duration(s)
            .map_err(|e| format!("{s:?} is not a duration like 500ms, 5s or 2m: {e}"))?
    };
    if d.is_zero() {
        return Err(format!("{s:?} must be more than zero"));
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_and_refuse_garbage() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("0s").is_err());
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert!(parse_duration("5x").is_err());
        assert!(parse_duration("-5s").is_err());
        assert!(parse_duration("fast").is_err());
        assert!(parse_duration("").is_err());
    }
}
