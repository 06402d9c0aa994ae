//! `tunnel-agent`: the per-node DaemonSet agent of sdn-tunnel.
//!
//! `tunnel-agent run` terminates the userspace WireGuard tunnel in the
//! agent's pod, publishes this node's TunnelPeer and follows the mesh;
//! `tunnel-agent keys` prints the node's public key; `tunnel-agent wg
//! <iface>` runs the tunnel alone, configured with `wg set` (no Kubernetes).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use sdn_tunnel_agent::agent;
use sdn_tunnel_agent::config::AgentConfig;
use sdn_tunnel_agent::health::{self, Readiness};
use sdn_tunnel_agent::metrics::Metrics;
use sdn_tunnel_agent::standalone::{self, StandaloneConfig};
use sdn_tunnel_agent::uapi;
use sdn_tunnel_datapath::keys::PrivateKey;

#[derive(Debug, Parser)]
#[command(name = "tunnel-agent", version, about = "sdn-tunnel per-node agent")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the agent (what the DaemonSet starts).
    Run(Box<AgentConfig>),
    /// Print this node's WireGuard public key (creating the key pair if absent).
    Keys {
        #[arg(
            long,
            env = "SDN_TUNNEL_KEY_FILE",
            default_value = "/var/lib/sdn-tunnel/private.key"
        )]
        key_file: PathBuf,
    },
    /// Serve the cluster.<name> zones and the merged zone (the DNS Deployment).
    Dns(Box<sdn_tunnel_agent::dns::DnsConfig>),
    /// Print the agent version and the API version it speaks.
    Version,
    /// Run the tunnel alone, configured through the WireGuard UAPI socket
    /// (`wg set`, `wg setconf`), like `wireguard-go -f <iface>`.
    Wg(StandaloneConfig),
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(sdn_tunnel_agent::logging::quiet_dependencies(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
            &std::env::var("RUST_LOG").unwrap_or_default(),
        ))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Version => {
            println!(
                "tunnel-agent {} (API {}/{})",
                env!("CARGO_PKG_VERSION"),
                sdn_tunnel_api::GROUP,
                sdn_tunnel_api::VERSION
            );
            Ok(())
        }
        Command::Keys { key_file } => PrivateKey::load_or_generate(&key_file)
            .map(|(k, _)| println!("{}", k.public_key().to_base64()))
            .map_err(anyhow::Error::from),
        Command::Run(cfg) => run(*cfg),
        Command::Dns(cfg) => dns(*cfg),
        Command::Wg(cfg) => standalone::run(cfg),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tunnel-agent: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn dns(cfg: sdn_tunnel_agent::dns::DnsConfig) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    Ok(runtime.block_on(sdn_tunnel_agent::dns::run(cfg))?)
}

fn run(cfg: AgentConfig) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let (readiness_tx, readiness_rx) = tokio::sync::watch::channel(Readiness::default());
        let listener = tokio::net::TcpListener::bind(cfg.metrics_addr).await?;
        let metrics = Arc::new(Metrics::new(&cfg.interface));
        tokio::spawn(health::serve(listener, readiness_rx, metrics));
        // `wg show` reads the tunnel; the control plane owns its peers, so
        // UAPI sets are refused. Several agents on one machine (the lab)
        // share the socket directory: only the first gets the socket.
        let uapi_dir = std::env::var_os("SDN_TUNNEL_UAPI_DIR")
            .map_or_else(|| PathBuf::from(uapi::DEFAULT_SOCKET_DIR), PathBuf::from);
        let _uapi = uapi::Server::start(
            &uapi_dir,
            &cfg.interface,
            uapi::Target::ReadOnly {
                interface: cfg.interface.clone(),
                key_file: Some(cfg.key_file.clone()),
            },
        )
        .inspect_err(
            |e| tracing::warn!(error = %e, "no UAPI socket: `wg show` will not see this agent"),
        )
        .ok();
        agent::run(cfg, readiness_tx).await
    })
}
