//! `lab`: the sdn-tunnel multi-cluster lab from the shell.
//!
//! `lab up` builds it and leaves it running, `lab status` shows it,
//! `lab down` removes everything. `lab pod` and `lab service` add workloads;
//! `make demo` (tests/e2e/src/bin/demo.rs) shows the whole system on it.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Result;
use clap::{Args, Parser, Subcommand};
use sdn_tunnel_lab::config::{default_dir, DEFAULT_NAME};
use sdn_tunnel_lab::server;
use sdn_tunnel_lab::{teardown, Lab, LabConfig, Netem, POD_SERVER_PORT};

#[derive(Debug, Parser)]
#[command(
    name = "lab",
    about = "sdn-tunnel's multi-cluster lab: real kube-apiservers, nodes and pods in network namespaces"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Args)]
struct LabRef {
    /// Lab name: prefix of every namespace and link it makes.
    #[arg(long, default_value = DEFAULT_NAME)]
    name: String,
    /// State directory (default /tmp/sdn-tunnel-lab/<name>).
    #[arg(long)]
    dir: Option<PathBuf>,
}

impl LabRef {
    fn dir(&self) -> PathBuf {
        self.dir.clone().unwrap_or_else(|| default_dir(&self.name))
    }
    fn attach(&self) -> Result<Lab> {
        Lab::attach(&self.dir())
    }
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Build the lab and leave it running.
    Up {
        #[command(flatten)]
        lab: LabRef,
        /// Cluster names, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "east,west")]
        clusters: Vec<String>,
        /// Nodes per cluster.
        #[arg(long, default_value_t = 2)]
        nodes: u8,
        /// MTU of the underlay links.
        #[arg(long, default_value_t = 1500)]
        mtu: u32,
        /// Delay added on every node's underlay link, in milliseconds.
        #[arg(long)]
        delay_ms: Option<u32>,
        /// Packet loss on every node's underlay link, in percent.
        #[arg(long)]
        loss: Option<f32>,
        /// Second octet of the underlay 10.U.0.0/16 (distinct per lab that
        /// runs at the same time).
        #[arg(long, default_value_t = 99)]
        underlay_octet: u8,
        /// Real nodes: containerd, kubelet and kube-proxy on every node,
        /// controller-manager and scheduler per cluster (needs `make image`).
        #[arg(long)]
        real_nodes: bool,
    },
    /// Show the clusters, their processes and pods.
    Status {
        #[command(flatten)]
        lab: LabRef,
    },
    /// Remove every namespace, process and file of the lab.
    Down {
        #[command(flatten)]
        lab: LabRef,
    },
    /// Add a pod running the lab server (answers its name on TCP/UDP 8080).
    Pod {
        #[command(flatten)]
        lab: LabRef,
        #[arg(long)]
        cluster: String,
        /// 1-based node index.
        #[arg(long, default_value_t = 1)]
        node: u8,
        name: String,
    },
    /// Add a ClusterIP Service with an EndpointSlice over the given pods.
    Service {
        #[command(flatten)]
        lab: LabRef,
        #[arg(long)]
        cluster: String,
        #[arg(long, default_value = "default")]
        namespace: String,
        #[arg(long, default_value_t = 80)]
        port: u16,
        name: String,
        /// Pods (of the same cluster) backing the Service.
        #[arg(required = true)]
        pods: Vec<String>,
    },
    /// Write an Ansible inventory of the lab's clusters for ansible/site.yml
    /// (default <lab dir>/inventory.yml) and print its path.
    Inventory {
        #[command(flatten)]
        lab: LabRef,
        /// Where to write it.
        #[arg(long)]
        output: Option<PathBuf>,
        /// The tunctl the playbook runs at the end.
        #[arg(long)]
        tunctl: Option<PathBuf>,
    },
    /// Mirror Endpoints into the discovery.k8s.io/v1 EndpointSlice shim
    /// until stopped (the kubelet lab runs one per cluster).
    MirrorEndpointslices {
        #[arg(long)]
        kubeconfig: PathBuf,
    },
    /// Ask a pod server once (TCP, or UDP with --udp) and print its answer
    /// (used inside real pods: `kubectl exec ... -- lab request`).
    Request {
        #[arg(long)]
        udp: bool,
        #[arg(long, default_value_t = 3000)]
        timeout_ms: u64,
        addr: std::net::SocketAddr,
    },
    /// Ask a pod server over TCP every interval and print each result and
    /// the longest gap between answers (a real pod's probe).
    Probe {
        #[arg(long, default_value_t = 100)]
        interval_ms: u64,
        #[arg(long, default_value_t = 60)]
        duration_s: u64,
        /// Stop once an outage is over (20 answers in a row after a failure).
        #[arg(long)]
        until_recovered: bool,
        addr: std::net::SocketAddr,
    },
    /// Run the pod server (used inside pod namespaces).
    Serve {
        #[arg(long)]
        name: String,
        #[arg(long, default_value_t = POD_SERVER_PORT)]
        port: u16,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,kube_client::client::builder=off".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match &cli.command {
        Command::Serve { name, port } => return report(server::serve(name, *port)),
        Command::Request {
            udp,
            timeout_ms,
            addr,
        } => {
            let t = std::time::Duration::from_millis(*timeout_ms);
            let answer = if *udp {
                server::udp_ask(*addr, t)
            } else {
                server::tcp_ask(*addr, t)
            };
            return report(answer.map(|a| println!("{a}")));
        }
        Command::Probe {
            interval_ms,
            duration_s,
            until_recovered,
            addr,
        } => {
            let r = server::probe(
                *addr,
                std::time::Duration::from_millis(*interval_ms),
                std::time::Duration::from_secs(*duration_s),
                *until_recovered,
                &mut std::io::stdout(),
            );
            return report(r.map(drop));
        }
        _ => {}
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return report(Err(e.into())),
    };
    report(runtime.block_on(run(cli.command)))
}

fn report(result: Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lab: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command) -> Result<()> {
    match command {
        Command::Up {
            lab,
            clusters,
            nodes,
            mtu,
            delay_ms,
            loss,
            underlay_octet,
            real_nodes,
        } => {
            let mut cfg = LabConfig::new(&lab.name);
            cfg.dir = lab.dir();
            cfg.clusters = clusters;
            cfg.nodes_per_cluster = nodes;
            cfg.underlay_mtu = mtu;
            cfg.underlay_octet = underlay_octet;
            cfg.real_nodes = real_nodes;
            if delay_ms.is_some() || loss.is_some() {
                cfg.netem = Some(Netem {
                    delay_ms: delay_ms.unwrap_or(0),
                    loss_percent: loss.unwrap_or(0.0),
                });
            }
            up(cfg).await
        }
        Command::Status { lab } => status(&lab.attach()?),
        Command::Down { lab } => {
            let mut cfg = LabConfig::new(&lab.name);
            cfg.dir = lab.dir();
            let started = Instant::now();
            let r = teardown(&cfg)?;
            println!(
                "lab {}: stopped {} processes, removed {} namespaces in {:.1} s",
                cfg.name,
                r.processes_stopped,
                r.namespaces_removed.len(),
                started.elapsed().as_secs_f64()
            );
            if !r.leftovers.is_empty() {
                anyhow::bail!("could not remove: {:?}", r.leftovers);
            }
            Ok(())
        }
        Command::Pod {
            lab,
            cluster,
            node,
            name,
        } => {
            let mut lab = lab.attach()?;
            let pod = lab.add_pod(&cluster, node, &name)?;
            println!(
                "pod {} in {} on {}: {} (netns {})",
                pod.name, pod.cluster, pod.node, pod.ip, pod.netns
            );
            Ok(())
        }
        Command::Service {
            lab,
            cluster,
            namespace,
            port,
            name,
            pods,
        } => {
            let lab = lab.attach()?;
            let backends = pods
                .iter()
                .map(|p| lab.pod(&cluster, p))
                .collect::<Result<Vec<_>>>()?;
            let svc = lab
                .add_service(&cluster, &namespace, &name, port, &backends)
                .await?;
            let ip = svc.spec.and_then(|s| s.cluster_ip).unwrap_or_default();
            println!("service {namespace}/{name} in {cluster}: {ip}:{port} -> {pods:?}");
            Ok(())
        }
        Command::Inventory {
            lab,
            output,
            tunctl,
        } => {
            let lab = lab.attach()?;
            let path = output.unwrap_or_else(|| lab.ansible_inventory_path());
            let opts = sdn_tunnel_lab::InventoryOptions {
                tunctl,
                ..Default::default()
            };
            println!("{}", lab.write_ansible_inventory(&path, &opts)?.display());
            Ok(())
        }
        Command::MirrorEndpointslices { kubeconfig } => {
            let client = sdn_tunnel_lab::controlplane::client_from_kubeconfig(&kubeconfig).await?;
            sdn_tunnel_lab::kubelet::mirror::run(client).await
        }
        Command::Serve { .. } | Command::Request { .. } | Command::Probe { .. } => {
            unreachable!("handled before the runtime starts")
        }
    }
}

/// Builds the lab; Ctrl-C or SIGTERM during the build removes what was made.
async fn up(cfg: LabConfig) -> Result<()> {
    let started = Instant::now();
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let cleanup_cfg = cfg.clone();
    tokio::select! {
        lab = Lab::up(cfg) => {
            let lab = lab?;
            println!("lab {} is up in {:.1} s", lab.config().name, started.elapsed().as_secs_f64());
            status(&lab)?;
            lab.detach();
            Ok(())
        }
        _ = tokio::signal::ctrl_c() => interrupted(&cleanup_cfg),
        _ = sigterm.recv() => interrupted(&cleanup_cfg),
    }
}

fn interrupted(cfg: &LabConfig) -> Result<()> {
    // Dropping the `up` future already dropped (and so tore down) the lab it
    // was building; this catches anything made before the guard existed.
    let r = teardown(cfg)?;
    anyhow::bail!(
        "interrupted; removed {} namespaces, {} processes",
        r.namespaces_removed.len(),
        r.processes_stopped
    )
}

fn status(lab: &Lab) -> Result<()> {
    let cfg = lab.config();
    println!("lab {} (state in {})", cfg.name, cfg.dir.display());
    println!(
        "  kubectl --kubeconfig {} --context <cluster> ...",
        lab.merged_kubeconfig().display()
    );
    for c in cfg.plan() {
        let rss = lab
            .apiserver_rss_kib(&c.name)
            .map(|k| format!("{} MiB", k / 1024))
            .unwrap_or_else(|| "DOWN".into());
        println!(
            "  cluster {}: apiserver {} (RSS {rss}), pods {}, services {}",
            c.name,
            c.apiserver_url(),
            c.pod_cidr,
            c.service_cidr
        );
        for n in &c.nodes {
            println!(
                "    node {}: {} pod CIDR {} (netns {})",
                n.name, n.underlay_ip, n.pod_cidr, n.netns
            );
        }
        for p in lab.state().pods.iter().filter(|p| p.cluster == c.name) {
            let up = if p.server.as_ref().is_some_and(|s| s.alive()) {
                "running"
            } else {
                "no server"
            };
            println!(
                "    pod {} on {}: {} ({up}, netns {})",
                p.name, p.node, p.ip, p.netns
            );
        }
    }
    for p in &lab.state().control_plane {
        if !p.alive() {
            println!("  WARNING: {} (pid {}) is not running", p.what, p.pid);
        }
    }
    Ok(())
}
