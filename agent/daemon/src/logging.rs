//! Log filtering for the crates we run on: their chatter stays out of the
//! operator's log unless `RUST_LOG` names them.
//!
//! - hickory logs every query at INFO (ours are at TRACE): only its
//!   warnings pass.
//! - boringtun logs every failed handshake retry of every peer at WARN
//!   (`HANDSHAKE(REKEY_TIMEOUT)`): with a thousand peers, some still
//!   booting or gone, that is dozens of lines a second for nothing an
//!   operator can act on. Only its errors pass; the retries are counted in
//!   `/metrics` (`sdn_tunnel_handshake_initiations_total`) and the peer's
//!   state says `NoHandshake` or `HandshakeExpired` in its status.

use tracing_subscriber::EnvFilter;

/// Directives added unless `RUST_LOG` mentions the crate.
const QUIET: &[(&str, &str)] = &[
    ("hickory", "hickory_server=warn"),
    ("hickory", "hickory_resolver=warn"),
    ("hickory", "hickory_net=warn"),
    ("hickory", "hickory_proto=warn"),
    ("boringtun", "boringtun=error"),
];

/// `filter` with the quiet directives of every crate `asked` (the
/// `RUST_LOG` text) does not name.
pub fn quiet_dependencies(filter: EnvFilter, asked: &str) -> EnvFilter {
    QUIET
        .iter()
        .filter(|(krate, _)| !asked.contains(krate))
        .filter_map(|(_, d)| d.parse().ok())
        .fold(filter, |f, d| f.add_directive(d))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quiet_unless_asked_for() {
        let f = quiet_dependencies(EnvFilter::new("info"), "info").to_string();
        assert!(f.contains("boringtun=error"), "{f}");
        assert!(f.contains("hickory_server=warn"), "{f}");
        let f = quiet_dependencies(
            EnvFilter::new("info,boringtun=debug"),
            "info,boringtun=debug",
        )
        .to_string();
        assert!(!f.contains("boringtun=error"), "{f}");
        assert!(f.contains("boringtun=debug"), "{f}");
    }
}
