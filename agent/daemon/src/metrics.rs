//! `/metrics`: the tunnel's counters in the OpenMetrics text format (which
//! Prometheus scrapes), read from [`TunnelView::stats`] and
//! [`TunnelView::drops`] at scrape time: nothing is counted per packet here.
//!
//! Series (labels `interface`, and `public_key` in base64 for peers):
//! - `sdn_tunnel_up`: 1 while the tunnel on the interface runs;
//! - `sdn_tunnel_peers`, `sdn_tunnel_peers_connected`: peers configured
//!   (what the control plane or UAPI asked for) and those with a live
//!   session (a handshake less than 180 s old);
//! - `sdn_tunnel_peer_{receive,transmit}_{bytes,packets}_total`;
//! - `sdn_tunnel_peer_session_up`, `sdn_tunnel_peer_last_handshake_age_seconds`
//!   (only while there is a session), `sdn_tunnel_peer_handshake_rtt_seconds`
//!   (once a handshake we initiated completed),
//!   `sdn_tunnel_peer_last_receive_age_seconds` (once anything was received:
//!   with keepalives on, more than two intervals means a broken path);
//! - `sdn_tunnel_drops_total{reason}`: every [`DropReason`], zeros included.

use std::fmt;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use sdn_tunnel_datapath::device::{DropCounters, DropReason, PeerStats};

use crate::tunnel::{self, TunnelView, SESSION_DEAD_AFTER};

/// The content type of [`Metrics::render`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The registry behind `/metrics`.
pub struct Metrics {
    registry: Registry,
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    /// Metrics of the tunnel running on TUN `interface` (looked up at each
    /// scrape, so it may start later or be restarted).
    pub fn new(interface: &str) -> Metrics {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(TunnelCollector {
            interface: interface.to_owned(),
        }));
        Metrics { registry }
    }

    /// The exposition text.
    pub fn render(&self) -> Result<String, fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

#[derive(Debug)]
struct TunnelCollector {
    interface: String,
}

impl Collector for TunnelCollector {
    fn encode(&self, encoder: DescriptorEncoder<'_>) -> Result<(), fmt::Error> {
        let view = tunnel::running(&self.interface);
        let snapshot = view.as_ref().map(|v: &TunnelView| (v.stats(), v.drops()));
        let mut encoder = encoder;
        if let Some(v) = &view {
            // Retries of peers that do not answer: boringtun's own log
            // lines for them are filtered out (see `logging`).
            let mut m = encoder.encode_descriptor(
                "sdn_tunnel_handshake_initiations",
                "Handshake initiations sent, first attempts and retries",
                None,
                MetricType::Counter,
            )?;
            ConstCounter::new(v.handshake_initiations())
                .encode(m.encode_family(&[("interface", self.interface.as_str())])?)?;
        }
        encode_snapshot(&self.interface, snapshot.as_ref(), encoder)
    }
}

fn counter(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    series: &[([(&str, &str); 2], u64)],
) -> Result<(), fmt::Error> {
    let mut m = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, v) in series {
        ConstCounter::new(*v).encode(m.encode_family(labels)?)?;
    }
    Ok(())
}

fn gauge(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    series: &[([(&str, &str); 2], f64)],
) -> Result<(), fmt::Error> {
    let mut m = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, v) in series {
        ConstGauge::new(*v).encode(m.encode_family(labels)?)?;
    }
    Ok(())
}

/// A peer's session is live: a handshake less than 180 s ago.
pub fn connected(p: &PeerStats) -> bool {
    p.last_handshake_age
        .is_some_and(|a| a <= SESSION_DEAD_AFTER)
}

/// Encodes one snapshot (`None`: no tunnel running on the interface).
pub fn encode_snapshot(
    interface: &str,
    snapshot: Option<&(Vec<PeerStats>, DropCounters)>,
    mut encoder: DescriptorEncoder<'_>,
) -> Result<(), fmt::Error> {
    let up = [("interface", interface)];
    let mut m = encoder.encode_descriptor(
        "sdn_tunnel_up",
        "Whether the tunnel runs on the interface",
        None,
        MetricType::Gauge,
    )?;
    ConstGauge::new(i64::from(snapshot.is_some())).encode(m.encode_family(&up)?)?;
    let Some((stats, drops)) = snapshot else {
        return Ok(());
    };
    let peers = i64::try_from(stats.len()).unwrap_or(i64::MAX);
    let live = i64::try_from(stats.iter().filter(|p| connected(p)).count()).unwrap_or(i64::MAX);
    let mut m = encoder.encode_descriptor(
        "sdn_tunnel_peers",
        "Peers configured on the tunnel",
        None,
        MetricType::Gauge,
    )?;
    ConstGauge::new(peers).encode(m.encode_family(&up)?)?;
    let mut m = encoder.encode_descriptor(
        "sdn_tunnel_peers_connected",
        "Peers with a live session (handshake less than 180 s old)",
        None,
        MetricType::Gauge,
    )?;
    ConstGauge::new(live).encode(m.encode_family(&up)?)?;

    let keys: Vec<String> = stats.iter().map(|p| p.public_key.to_base64()).collect();
    let labels = |i: usize| [("interface", interface), ("public_key", keys[i].as_str())];
    let per_peer = |f: &dyn Fn(&PeerStats) -> u64| -> Vec<([(&str, &str); 2], u64)> {
        stats
            .iter()
            .enumerate()
            .map(|(i, p)| (labels(i), f(p)))
            .collect()
    };
    // A gauge in seconds for the peers that have the duration.
    let seconds_per_peer =
        |f: &dyn Fn(&PeerStats) -> Option<std::time::Duration>| -> Vec<([(&str, &str); 2], f64)> {
            stats
                .iter()
                .enumerate()
                .filter_map(|(i, p)| f(p).map(|d| (labels(i), d.as_secs_f64())))
                .collect()
        };
    counter(
        &mut encoder,
        "sdn_tunnel_peer_receive_bytes",
        "UDP payload bytes of authenticated datagrams received from the peer",
        &per_peer(&|p| p.rx_bytes),
    )?;
    counter(
        &mut encoder,
        "sdn_tunnel_peer_transmit_bytes",
        "UDP payload bytes sent to the peer",
        &per_peer(&|p| p.tx_bytes),
    )?;
    counter(
        &mut encoder,
        "sdn_tunnel_peer_receive_packets",
        "Authenticated datagrams received from the peer",
        &per_peer(&|p| p.rx_packets),
    )?;
    counter(
        &mut encoder,
        "sdn_tunnel_peer_transmit_packets",
        "Datagrams sent to the peer",
        &per_peer(&|p| p.tx_packets),
    )?;
    let session: Vec<_> = stats
        .iter()
        .enumerate()
        .map(|(i, p)| (labels(i), if connected(p) { 1.0 } else { 0.0 }))
        .collect();
    gauge(
        &mut encoder,
        "sdn_tunnel_peer_session_up",
        "1 when the peer has a live session",
        &session,
    )?;
    gauge(
        &mut encoder,
        "sdn_tunnel_peer_last_handshake_age_seconds",
        "Age of the peer's current session",
        &seconds_per_peer(&|p| p.last_handshake_age),
    )?;
    gauge(
        &mut encoder,
        "sdn_tunnel_peer_last_receive_age_seconds",
        "Time since anything authenticated was received from the peer",
        &seconds_per_peer(&|p| p.last_receive_age),
    )?;
    gauge(
        &mut encoder,
        "sdn_tunnel_peer_handshake_rtt_seconds",
        "Round trip of the last handshake initiated with the peer",
        &seconds_per_peer(&|p| p.handshake_rtt),
    )?;
    let reasons: Vec<_> = DropReason::ALL
        .iter()
        .map(|r| {
            (
                [("interface", interface), ("reason", r.as_str())],
                drops.get(*r),
            )
        })
        .collect();
    counter(
        &mut encoder,
        "sdn_tunnel_drops",
        "Packets and datagrams dropped by the device, by reason",
        &reasons,
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use prometheus_client::registry::Registry;
    use sdn_tunnel_datapath::keys::PublicKey;

    use super::*;

    #[derive(Debug)]
    struct Fixed(Option<(Vec<PeerStats>, DropCounters)>);

    impl Collector for Fixed {
        fn encode(&self, encoder: DescriptorEncoder<'_>) -> Result<(), fmt::Error> {
            encode_snapshot("wgt", self.0.as_ref(), encoder)
        }
    }

    fn render(snapshot: Option<(Vec<PeerStats>, DropCounters)>) -> String {
        let mut r = Registry::default();
        r.register_collector(Box::new(Fixed(snapshot)));
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &r).expect("encode");
        out
    }

    fn peer(b: u8, age: Option<u64>) -> PeerStats {
        PeerStats {
            public_key: PublicKey::from_bytes([b; 32]),
            endpoint: None,
            allowed_ips: Vec::new(),
            persistent_keepalive: Some(25),
            rx_packets: 2,
            rx_bytes: 200,
            tx_packets: 3,
            tx_bytes: 300 + u64::from(b),
            last_handshake_age: age.map(Duration::from_secs),
            handshake_rtt: age.map(|_| Duration::from_millis(4)),
            last_receive_age: age.map(|a| Duration::from_secs(a / 2)),
        }
    }

    #[test]
    fn no_tunnel_is_down_and_nothing_else() {
        let text = render(None);
        assert!(
            text.contains("sdn_tunnel_up{interface=\"wgt\"} 0\n"),
            "{text}"
        );
        assert!(!text.contains("sdn_tunnel_peers"), "{text}");
    }

    #[test]
    fn peers_and_drops_are_exposed() {
        let text = render(Some((
            vec![peer(1, Some(10)), peer(2, None), peer(3, Some(500))],
            DropCounters::default(),
        )));
        let k1 = PublicKey::from_bytes([1; 32]).to_base64();
        for want in [
            "sdn_tunnel_up{interface=\"wgt\"} 1\n".to_owned(),
            "sdn_tunnel_peers{interface=\"wgt\"} 3\n".to_owned(),
            "sdn_tunnel_peers_connected{interface=\"wgt\"} 1\n".to_owned(),
            format!("sdn_tunnel_peer_transmit_bytes_total{{interface=\"wgt\",public_key=\"{k1}\"}} 301\n"),
            format!("sdn_tunnel_peer_receive_packets_total{{interface=\"wgt\",public_key=\"{k1}\"}} 2\n"),
            format!("sdn_tunnel_peer_last_handshake_age_seconds{{interface=\"wgt\",public_key=\"{k1}\"}} 10.0\n"),
            format!("sdn_tunnel_peer_handshake_rtt_seconds{{interface=\"wgt\",public_key=\"{k1}\"}} 0.004\n"),
            format!("sdn_tunnel_peer_session_up{{interface=\"wgt\",public_key=\"{k1}\"}} 1.0\n"),
            format!("sdn_tunnel_peer_last_receive_age_seconds{{interface=\"wgt\",public_key=\"{k1}\"}} 5.0\n"),
            "sdn_tunnel_drops_total{interface=\"wgt\",reason=\"invalid_mac\"} 0\n".to_owned(),
            "# TYPE sdn_tunnel_drops counter\n".to_owned(),
        ] {
            assert!(text.contains(&want), "missing {want:?} in\n{text}");
        }
        // A peer without a session has no age series.
        let k2 = PublicKey::from_bytes([2; 32]).to_base64();
        assert!(!text.contains(&format!(
            "age_seconds{{interface=\"wgt\",public_key=\"{k2}\"}}"
        )));
        assert_eq!(
            text.matches("sdn_tunnel_drops_total{").count(),
            DropReason::ALL.len()
        );
    }
}
