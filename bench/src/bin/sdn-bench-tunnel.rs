//! A minimal tunnel for the benchmark: the data path's [`Runtime`] over a
//! TUN and a UDP socket group, one peer from the command line, no UAPI.
//! It measures the runtime on its own; the product binary
//! (`tunnel-agent wg <iface>`, configured with `wg set`) is measured beside
//! it. Runs until SIGINT/SIGTERM.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Parser;
use ipnet::IpNet;
use nix::sys::signal::{SigSet, Signal};
use sdn_tunnel_datapath::io::tun::{Tun, TunOptions};
use sdn_tunnel_datapath::io::udp::UdpOptions;
use sdn_tunnel_datapath::runtime::{Runtime, RuntimeConfig};
use sdn_tunnel_datapath::{Device, DeviceConfig, PeerConfig, PrivateKey, PublicKey};

#[derive(Debug, Parser)]
struct Args {
    /// TUN interface to create (in the caller's network namespace).
    #[arg(long)]
    iface: String,
    /// UDP address to listen on.
    #[arg(long)]
    listen: SocketAddr,
    /// File holding our private key (base64, `wg genkey` format).
    #[arg(long)]
    private_key_file: PathBuf,
    /// The peer's public key (base64).
    #[arg(long)]
    peer: String,
    /// The peer's endpoint.
    #[arg(long)]
    endpoint: SocketAddr,
    /// Prefixes routed to the peer.
    #[arg(long = "allowed-ip", required = true)]
    allowed_ips: Vec<IpNet>,
    /// Tunnel MTU.
    #[arg(long, default_value_t = 1420)]
    mtu: u32,
    /// Worker count (0: the runtime's default for this machine).
    #[arg(long, default_value_t = 0)]
    workers: usize,
    /// Open the TUN without vnet headers (no TSO split / GRO coalescing).
    #[arg(long)]
    no_tun_offload: bool,
    /// Turn UDP GSO/GRO off.
    #[arg(long)]
    no_udp_offload: bool,
}

fn main() -> Result<()> {
    let args = Args::parse();
    // Signals are taken synchronously below; block them before any thread
    // exists so that every thread inherits the mask.
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGINT);
    signals.add(Signal::SIGTERM);
    signals.thread_block().context("blocking signals")?;

    let text = std::fs::read_to_string(&args.private_key_file)
        .with_context(|| format!("reading {}", args.private_key_file.display()))?;
    let key = PrivateKey::from_base64(text.trim()).context("private key")?;
    let peer_key = PublicKey::from_base64(args.peer.trim()).context("peer key")?;
    let workers = if args.workers == 0 {
        sdn_tunnel_datapath::runtime::default_workers()
    } else {
        args.workers
    };
    let tun = Tun::create(&TunOptions {
        name: args.iface.clone(),
        mtu: Some(args.mtu),
        multi_queue: true,
        up: true,
        offload: !args.no_tun_offload,
    })
    .with_context(|| format!("creating TUN {}", args.iface))?;
    let mut opts = UdpOptions::new(args.listen);
    opts.gso = !args.no_udp_offload;
    opts.gro = !args.no_udp_offload;
    let rt = Runtime::bind(
        Device::new(DeviceConfig::new(key)),
        tun,
        &opts,
        RuntimeConfig {
            workers,
            ..RuntimeConfig::default()
        },
    )
    .context("starting the runtime")?;
    let mut peer = PeerConfig::new(peer_key);
    peer.endpoint = Some(args.endpoint);
    peer.allowed_ips = args.allowed_ips.clone();
    peer.persistent_keepalive = None;
    let failed = rt.set_peers(&[peer]);
    anyhow::ensure!(failed.is_empty(), "peer refused: {failed:?}");
    let (tun_off, udp_off) = rt.offloads();
    eprintln!(
        "sdn-bench-tunnel {}: {} worker(s), TUN {tun_off:?}, UDP {udp_off:?}",
        args.iface,
        rt.workers()
    );
    let sig = signals.wait().context("waiting for a signal")?;
    eprintln!("sdn-bench-tunnel: {sig}: {:?}", rt.io_stats());
    drop(rt);
    Ok(())
}
