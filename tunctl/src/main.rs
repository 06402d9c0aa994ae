//! `tunctl`: the sdn-tunnel command-line client.
//!
//! So far it only reports its version; `peers`, `keys` and `diagnose`
//! arrive with the control-plane and data-path issues.

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "tunctl",
    version,
    about = "Inspect and operate sdn-tunnel meshes"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print the client version and the API version it speaks.
    Version,
}

fn main() {
    let cli = Cli::parse();
    match cli.command {
        Command::Version => println!(
            "tunctl {} (API {}/{})",
            env!("CARGO_PKG_VERSION"),
            sdn_tunnel_api::GROUP,
            sdn_tunnel_api::VERSION
        ),
    }
}
