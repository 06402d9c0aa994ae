//! `tunctl`: the sdn-tunnel command-line client.
//!
//! `tunctl peers` shows every tunnel of the mesh as the agents report it;
//! `tunctl crd` prints the CRDs; `tunctl version` the version.

mod peers;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use k8s_openapi::jiff::Timestamp;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};
use sdn_tunnel_api::TunnelPeer;

#[derive(Debug, Parser)]
#[command(
    name = "tunctl",
    version,
    about = "Inspect and operate sdn-tunnel meshes"
)]
struct Cli {
    /// Kubeconfig file (default: $KUBECONFIG, then ~/.kube/config).
    #[arg(long, global = true, env = "KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// Kubeconfig contexts to read, comma-separated (default: the current one).
    #[arg(long, global = true, value_delimiter = ',')]
    context: Vec<String>,
    /// Read every context of the kubeconfig.
    #[arg(long, global = true, conflicts_with = "context")]
    all_contexts: bool,
    /// Namespace of the agents' TunnelPeers.
    #[arg(short = 'n', long, global = true, default_value = "sdn-tunnel")]
    namespace: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Output {
    Table,
    Json,
    Yaml,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Every peer of the mesh as each node sees it: state, handshake age, traffic, round trip.
    Peers {
        #[arg(short = 'o', long, value_enum, default_value = "table")]
        output: Output,
        /// Exit non-zero unless every peer is connected (for scripts and CI).
        #[arg(long)]
        check: bool,
    },
    /// Print the CustomResourceDefinitions (YAML), as `deploy/crds` holds them.
    Crd,
    /// Print the client version and the API version it speaks.
    Version,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Version => {
            println!(
                "tunctl {} (API {}/{})",
                env!("CARGO_PKG_VERSION"),
                sdn_tunnel_api::GROUP,
                sdn_tunnel_api::VERSION
            );
            Ok(true)
        }
        Command::Crd => print_crds().map(|()| true),
        Command::Peers { output, check } => match tokio::runtime::Runtime::new() {
            Ok(rt) => rt.block_on(peers_command(&cli, *output, *check)),
            Err(e) => Err(e.into()),
        },
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("tunctl: error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn print_crds() -> Result<()> {
    for crd in sdn_tunnel_api::crdgen::render_all()? {
        print!("---\n{}", crd.yaml);
    }
    Ok(())
}

fn load_kubeconfig(path: Option<&PathBuf>) -> Result<Kubeconfig> {
    match path {
        Some(p) => {
            Kubeconfig::read_from(p).with_context(|| format!("reading kubeconfig {}", p.display()))
        }
        None => Kubeconfig::read()
            .context("reading the kubeconfig (~/.kube/config; set --kubeconfig or KUBECONFIG)"),
    }
}

/// The contexts to read, in the order given.
fn contexts(cli: &Cli, kubeconfig: &Kubeconfig) -> Result<Vec<String>> {
    let known: Vec<String> = kubeconfig.contexts.iter().map(|c| c.name.clone()).collect();
    let wanted = if cli.all_contexts {
        known.clone()
    } else if !cli.context.is_empty() {
        cli.context.clone()
    } else {
        vec![kubeconfig
            .current_context
            .clone()
            .context("the kubeconfig has no current context; pass --context")?]
    };
    if let Some(bad) = wanted.iter().find(|c| !known.contains(c)) {
        bail!("no context {bad:?} in the kubeconfig (it has {known:?})");
    }
    Ok(wanted)
}

async fn read_context(
    kubeconfig: &Kubeconfig,
    context: &str,
    namespace: &str,
) -> Result<Vec<TunnelPeer>> {
    let options = KubeConfigOptions {
        context: Some(context.to_string()),
        ..Default::default()
    };
    let config = Config::from_custom_kubeconfig(kubeconfig.clone(), &options).await?;
    let url = config.cluster_url.clone();
    let client = Client::try_from(config)?;
    let api: Api<TunnelPeer> = Api::namespaced(client, namespace);
    match api.list(&Default::default()).await {
        Ok(list) => Ok(list.items),
        Err(kube::Error::Api(e)) if e.code == 404 => {
            bail!("the TunnelPeer CRD is not installed at {url} (apply deploy/crds, or run the installer)")
        }
        Err(kube::Error::Api(e)) if e.code == 403 => {
            bail!(
                "not allowed to list TunnelPeers in {namespace} at {url}: {}",
                e.message
            )
        }
        Err(e) => Err(anyhow::Error::new(e).context(format!("cannot reach {url}"))),
    }
}

/// Returns whether the check (if asked) passed.
async fn peers_command(cli: &Cli, output: Output, check: bool) -> Result<bool> {
    let kubeconfig = load_kubeconfig(cli.kubeconfig.as_ref())?;
    let mut all: Vec<(String, TunnelPeer)> = Vec::new();
    let mut unreachable = 0;
    let wanted = contexts(cli, &kubeconfig)?;
    for context in &wanted {
        match read_context(&kubeconfig, context, &cli.namespace).await {
            Ok(items) => {
                // Rows name clusters by the TunnelPeers' own cluster field;
                // the context name only labels errors.
                all.extend(items.into_iter().map(|p| (p.spec.cluster.clone(), p)));
            }
            Err(e) => {
                eprintln!("tunctl: context {context}: {e:#}");
                unreachable += 1;
            }
        }
    }
    if unreachable == wanted.len() {
        bail!("no cluster could be read");
    }
    let rows = peers::rows(&all, Timestamp::now());
    match output {
        Output::Table if rows.is_empty() => println!("no peers reported (are the agents running?)"),
        Output::Table => print!("{}", peers::render_table(&rows)),
        Output::Json => println!("{}", serde_json::to_string_pretty(&rows)?),
        Output::Yaml => print!("{}", serde_yaml::to_string(&rows)?),
    }
    if !check {
        return Ok(true);
    }
    let not_connected = rows.iter().filter(|r| !r.connected()).count();
    let ok = unreachable == 0 && !rows.is_empty() && not_connected == 0;
    if !ok {
        eprintln!(
            "tunctl: check failed: {not_connected} of {} peers not connected, {unreachable} cluster(s) unreadable",
            rows.len()
        );
    }
    Ok(ok)
}
