//! `tunnel-agent`: the per-node DaemonSet agent of sdn-tunnel.
//!
//! So far it only reports its version; the data path (TUN + boringtun), the
//! control plane (CRD watches) and the service proxy arrive with their issues.

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "tunnel-agent", version, about = "sdn-tunnel per-node agent")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print the agent version and the API version it speaks.
    Version,
}

fn main() {
    let cli = Cli::parse();
    match cli.command {
        Command::Version => println!(
            "tunnel-agent {} (API {}/{})",
            env!("CARGO_PKG_VERSION"),
            sdn_tunnel_api::GROUP,
            sdn_tunnel_api::VERSION
        ),
    }
}
