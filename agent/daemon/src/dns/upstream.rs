//! The forwarder for names outside our zones: hickory's
//! `ForwardZoneHandler` (a hickory-resolver underneath) pointed at the
//! nameservers of the pod's `resolv.conf`, or at `--upstream`.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::str::FromStr;

use hickory_resolver::config::{NameServerConfig, ResolverOpts};
use hickory_server::store::forwarder::{ForwardConfig, ForwardZoneHandler};
use thiserror::Error;
use tracing::info;

#[derive(Debug, Error)]
pub enum UpstreamError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {why}")]
    Parse { path: String, why: String },
    #[error("forwarder: {0}")]
    Build(String),
}

/// One upstream server: `ip` (port 53) or `ip:port` (`[v6]:port`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Upstream(pub SocketAddr);

impl FromStr for Upstream {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if let Ok(ip) = s.parse::<IpAddr>() {
            return Ok(Upstream(SocketAddr::new(ip, 53)));
        }
        s.parse::<SocketAddr>()
            .map(Upstream)
            .map_err(|_| format!("{s:?} is neither an IP address nor ip:port"))
    }
}

fn server(u: &Upstream) -> NameServerConfig {
    let mut ns = NameServerConfig::udp_and_tcp(u.0.ip());
    for c in &mut ns.connections {
        c.port = u.0.port();
    }
    ns
}

/// The upstream servers: `explicit` when given, else the nameservers of
/// `resolv_conf`.
pub fn upstreams(
    explicit: &[Upstream],
    resolv_conf: &Path,
) -> Result<Vec<Upstream>, UpstreamError> {
    if !explicit.is_empty() {
        return Ok(explicit.to_vec());
    }
    let path = resolv_conf.display().to_string();
    let text = std::fs::read(resolv_conf).map_err(|source| UpstreamError::Read {
        path: path.clone(),
        source,
    })?;
    // A resolv.conf without any nameserver (a node without DNS, as a
    // kubelet hands it to the pod) is not an error: our zones are still
    // served, other names are REFUSED (`run` says so once, at WARN).
    // hickory refuses to parse such a file, so it is not asked.
    let names_a_server = String::from_utf8_lossy(&text)
        .lines()
        .any(|l| l.trim_start().starts_with("nameserver"));
    if !names_a_server {
        return Ok(Vec::new());
    }
    let (config, _) = hickory_resolver::system_conf::parse_resolv_conf(text).map_err(|e| {
        UpstreamError::Parse {
            path,
            why: e.to_string(),
        }
    })?;
    let mut out: Vec<Upstream> = Vec::new();
    for ns in config.name_servers() {
        let port = ns.connections.first().map_or(53, |c| c.port);
        let u = Upstream(SocketAddr::new(ns.ip, port));
        if !out.contains(&u) {
            out.push(u);
        }
    }
    Ok(out)
}

/// The forwarder for the root zone, or `None` without any upstream.
pub fn forwarder(
    explicit: &[Upstream],
    resolv_conf: &Path,
) -> Result<Option<ForwardZoneHandler>, UpstreamError> {
    let ups = upstreams(explicit, resolv_conf)?;
    if ups.is_empty() {
        return Ok(None);
    }
    info!(upstreams = ?ups.iter().map(|u| u.0).collect::<Vec<_>>(), "forwarding other names");
    let mut options = ResolverOpts::default();
    options.timeout = std::time::Duration::from_secs(2);
    options.attempts = 2;
    options.cache_size = 1024;
    let config = ForwardConfig {
        name_servers: ups.iter().map(server).collect(),
        options: Some(options),
    };
    ForwardZoneHandler::builder_tokio(config)
        .build()
        .map(Some)
        .map_err(UpstreamError::Build)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn upstream_parses() {
        assert_eq!(
            "10.0.0.10".parse::<Upstream>().unwrap().0,
            "10.0.0.10:53".parse().unwrap()
        );
        assert_eq!(
            "10.0.0.10:5353".parse::<Upstream>().unwrap().0,
            "10.0.0.10:5353".parse().unwrap()
        );
        assert_eq!(
            "[fd00::1]:5353".parse::<Upstream>().unwrap().0,
            "[fd00::1]:5353".parse().unwrap()
        );
        assert_eq!("fd00::1".parse::<Upstream>().unwrap().0.port(), 53);
        assert!("ns.example".parse::<Upstream>().is_err());
    }

    #[test]
    fn upstreams_from_resolv_conf() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("resolv.conf");
        std::fs::write(
            &path,
            "search demo.svc.cluster.local svc.cluster.local\nnameserver 10.96.0.10\nnameserver fd00::10\noptions ndots:5\n",
        )
        .unwrap();
        let ups = upstreams(&[], &path).unwrap();
        assert_eq!(
            ups.iter().map(|u| u.0).collect::<Vec<_>>(),
            vec![
                "10.96.0.10:53".parse::<SocketAddr>().unwrap(),
                "[fd00::10]:53".parse().unwrap()
            ]
        );
        // Explicit upstreams win; a missing file is an error otherwise.
        let explicit = ["127.0.0.1:5353".parse::<Upstream>().unwrap()];
        assert_eq!(
            upstreams(&explicit, &dir.path().join("nope")).unwrap(),
            explicit
        );
        assert!(upstreams(&[], &dir.path().join("nope")).is_err());
        // A resolv.conf without any nameserver (a kubelet's pod on a node
        // without DNS) gives no forwarder, so the zones are still served;
        // a broken one is an error.
        std::fs::write(&path, "# nothing\nsearch svc.cluster.local\n").unwrap();
        assert!(forwarder(&[], &path).unwrap().is_none());
        std::fs::write(&path, "nameserver not-an-address\n").unwrap();
        assert!(forwarder(&[], &path).is_err());
        // The forwarder itself builds from the explicit upstreams.
        assert!(forwarder(&explicit, &path).unwrap().is_some());
    }
}
