//! `tunctl peers`: every tunnel of the mesh as each node's agent reports it
//! in its `TunnelPeer` status, one row per (observing node, remote peer).
//!
//! Gathering is I/O; turning `TunnelPeer`s into rows, judging staleness and
//! rendering the table are pure functions, tested with plain values.

use std::fmt::Write as _;

use k8s_openapi::jiff::Timestamp;
use sdn_tunnel_api::{PeerState, TunnelPeer};
use serde::Serialize;

/// A status older than this means the observing agent stopped writing it
/// (it writes every few seconds): its rows are shown as `Unknown`.
pub const STALE_STATUS_SECS: i64 = 30;

/// One remote peer as seen by one node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PeerRow {
    /// Cluster and node of the agent that reports this row.
    pub from_cluster: String,
    pub from_node: String,
    /// The remote peer.
    pub cluster: String,
    pub node: String,
    pub endpoint: Option<String>,
    pub public_key: String,
    pub pod_cidrs: Vec<String>,
    /// Connected, Handshaking, Stale, Rejected, or Unknown when the
    /// observer's status is too old to trust.
    pub state: String,
    pub reason: Option<String>,
    pub handshake_age_seconds: Option<i64>,
    pub rx_bytes: i64,
    pub tx_bytes: i64,
    pub rtt_micros: Option<i64>,
}

impl PeerRow {
    pub fn connected(&self) -> bool {
        self.state == "Connected"
    }
}

/// Rows from the `TunnelPeer`s read in every reachable cluster (`(cluster
/// the object was read from, object)`). Remote peers' pod CIDRs are looked
/// up among the same objects by public key.
pub fn rows(peers: &[(String, TunnelPeer)], now: Timestamp) -> Vec<PeerRow> {
    let mut out = Vec::new();
    for (cluster, observer) in peers {
        let Some(status) = &observer.status else {
            continue;
        };
        let age = status
            .last_update
            .as_ref()
            .map(|t| now.duration_since(t.0).as_secs());
        let stale = age.is_none_or(|a| a > STALE_STATUS_SECS);
        for r in &status.peers {
            let pod_cidrs = peers
                .iter()
                .find(|(_, p)| !r.public_key.is_empty() && p.spec.public_key == r.public_key)
                .map(|(_, p)| p.spec.pod_cidrs.clone())
                .unwrap_or_default();
            let (state, reason) = if stale && r.state != PeerState::Rejected {
                let why = match age {
                    Some(a) => format!("observer status is {a}s old: is its agent running?"),
                    None => "observer never wrote a status".to_string(),
                };
                ("Unknown".to_string(), Some(why))
            } else {
                (format!("{:?}", r.state), r.reason.clone())
            };
            out.push(PeerRow {
                from_cluster: cluster.clone(),
                from_node: observer.spec.node.clone(),
                cluster: r.cluster.clone(),
                node: r.node.clone(),
                endpoint: r.endpoint.clone(),
                public_key: r.public_key.clone(),
                pod_cidrs,
                state,
                reason,
                handshake_age_seconds: r.last_handshake_age_seconds,
                rx_bytes: r.rx_bytes,
                tx_bytes: r.tx_bytes,
                rtt_micros: r.rtt_micros,
            });
        }
    }
    out.sort_by(|a, b| {
        (&a.from_cluster, &a.from_node, &a.cluster, &a.node).cmp(&(
            &b.from_cluster,
            &b.from_node,
            &b.cluster,
            &b.node,
        ))
    });
    out
}

/// `1.2 KiB`, `3.4 MiB`, ...
pub fn human_bytes(n: i64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n.max(0) as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

fn age(secs: Option<i64>) -> String {
    match secs {
        None => "never".into(),
        Some(s) if s < 120 => format!("{s}s ago"),
        Some(s) if s < 7200 => format!("{}m ago", s / 60),
        Some(s) => format!("{}h ago", s / 3600),
    }
}

fn short_key(k: &str) -> String {
    if k.len() > 8 {
        format!("{}…", &k[..8])
    } else if k.is_empty() {
        "-".into()
    } else {
        k.to_string()
    }
}

/// The table `tunctl peers` prints.
pub fn render_table(rows: &[PeerRow]) -> String {
    let header = [
        "FROM",
        "CLUSTER",
        "NODE",
        "ENDPOINT",
        "PUBLIC KEY",
        "POD CIDR",
        "STATE",
        "HANDSHAKE",
        "RX",
        "TX",
        "RTT",
    ];
    let mut cells: Vec<Vec<String>> = vec![header.iter().map(|h| h.to_string()).collect()];
    for r in rows {
        let state = match &r.reason {
            Some(reason) if !r.connected() => format!("{} ({reason})", r.state),
            _ => r.state.clone(),
        };
        cells.push(vec![
            format!("{}/{}", r.from_cluster, r.from_node),
            r.cluster.clone(),
            r.node.clone(),
            r.endpoint.clone().unwrap_or_else(|| "-".into()),
            short_key(&r.public_key),
            if r.pod_cidrs.is_empty() {
                "-".into()
            } else {
                r.pod_cidrs.join(",")
            },
            state,
            age(r.handshake_age_seconds),
            human_bytes(r.rx_bytes),
            human_bytes(r.tx_bytes),
            r.rtt_micros
                .map(|us| format!("{:.1}ms", us as f64 / 1000.0))
                .unwrap_or_else(|| "-".into()),
        ]);
    }
    let widths: Vec<usize> = (0..header.len())
        .map(|i| {
            cells
                .iter()
                .map(|row| row[i].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in &cells {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        let _ = writeln!(out, "{}", line.join("  ").trim_end());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use sdn_tunnel_api::{RemotePeerStatus, TunnelPeerSpec, TunnelPeerStatus};

    fn key(c: char) -> String {
        format!("{}=", c.to_string().repeat(43))
    }

    fn peer(
        cluster: &str,
        node: &str,
        k: char,
        status: Option<TunnelPeerStatus>,
    ) -> (String, TunnelPeer) {
        let mut p = TunnelPeer::new(
            node,
            TunnelPeerSpec {
                cluster: cluster.into(),
                node: node.into(),
                public_key: key(k),
                endpoints: vec!["10.0.0.1:51820".into()],
                pod_cidrs: vec![format!(
                    "10.{}.1.0/24",
                    if cluster == "east" { 1 } else { 2 }
                )],
                listen_port: 51820,
                mtu: None,
            },
        );
        p.status = status;
        (cluster.to_string(), p)
    }

    fn remote(
        cluster: &str,
        node: &str,
        k: char,
        state: PeerState,
        hs: Option<i64>,
    ) -> RemotePeerStatus {
        RemotePeerStatus {
            cluster: cluster.into(),
            node: node.into(),
            public_key: key(k),
            endpoint: Some("10.99.2.11:51820".into()),
            state,
            reason: (state != PeerState::Connected).then(|| "NoHandshakeYet".into()),
            message: None,
            last_handshake_age_seconds: hs,
            rx_bytes: 2048,
            tx_bytes: 10,
            rtt_micros: Some(1500),
        }
    }

    #[test]
    fn rows_join_pod_cidrs_and_flag_stale_observers() {
        let now: Timestamp = "2026-11-26T01:00:00Z".parse().unwrap();
        let fresh = Time("2026-11-26T00:59:58Z".parse().unwrap());
        let old = Time("2026-11-26T00:50:00Z".parse().unwrap());
        let peers = vec![
            peer(
                "east",
                "e1",
                'E',
                Some(TunnelPeerStatus {
                    peers: vec![remote("west", "w1", 'W', PeerState::Connected, Some(4))],
                    conditions: vec![],
                    last_update: Some(fresh),
                }),
            ),
            peer(
                "west",
                "w1",
                'W',
                Some(TunnelPeerStatus {
                    peers: vec![remote("east", "e1", 'E', PeerState::Connected, Some(4))],
                    conditions: vec![],
                    last_update: Some(old),
                }),
            ),
        ];
        let rows = rows(&peers, now);
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].from_node, "e1");
        assert_eq!(rows[0].state, "Connected");
        assert_eq!(rows[0].pod_cidrs, vec!["10.2.1.0/24"]);
        assert!(rows[0].connected());
        assert_eq!(
            rows[1].state, "Unknown",
            "a 600 s old status is not trusted"
        );
        assert!(rows[1].reason.as_deref().unwrap().contains("600s old"));
        let table = render_table(&rows);
        let lines: Vec<&str> = table.lines().collect();
        assert!(lines[0].starts_with("FROM") && lines[0].contains("RTT"));
        assert!(
            lines[1].contains("east/e1")
                && lines[1].contains("Connected")
                && lines[1].contains("2.0 KiB")
        );
        assert!(
            lines[1].contains("4s ago")
                && lines[1].contains("1.5ms")
                && lines[1].contains("WWWWWWWW…")
        );
        assert!(lines[2].contains("Unknown (observer status is 600s old"));
    }

    #[test]
    fn no_status_no_rows_and_bytes_read_well() {
        let now: Timestamp = "2026-11-26T01:00:00Z".parse().unwrap();
        assert!(rows(&[peer("east", "e1", 'E', None)], now).is_empty());
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(5 * 1024 * 1024 * 1024), "5.0 GiB");
        assert_eq!(age(None), "never");
        assert_eq!(age(Some(200)), "3m ago");
    }
}
