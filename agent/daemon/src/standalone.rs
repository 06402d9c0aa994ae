//! `tunnel-agent wg <iface>`: the tunnel without Kubernetes, configured
//! through the WireGuard UAPI socket (`wg set`, `wg setconf`) like
//! `wireguard-go -f <iface>` or `boringtun-cli -f <iface>`, optionally from
//! a `wg setconf` file at start. Creates the TUN (up, no address: give it
//! one with `ip addr`), binds the UDP socket, serves UAPI (read and write)
//! and, when asked, `/healthz` + `/metrics`. Runs until SIGINT/SIGTERM,
//! always in the foreground.
//!
//! [`Standalone`] is the device control behind the socket: UAPI's view of
//! the tunnel (key, port, mark, peers) and how a `set` is applied to it.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use clap::Args;
use sdn_tunnel_datapath::device::{Device, DeviceConfig};
use sdn_tunnel_datapath::io::tun::{Tun, TunOptions};
use sdn_tunnel_datapath::keys::PrivateKey;
use tracing::{info, warn};

use crate::health;
use crate::metrics::Metrics;
use crate::tunnel::{self, bind_udp, Tunnel};
use crate::uapi::{self, get_from_view, plan, Config, Configurable, SetRequest, Target, UapiError};
use crate::wgconf::setconf_to_uapi;

/// Flags of `tunnel-agent wg`.
#[derive(Debug, Clone, Args)]
pub struct StandaloneConfig {
    /// TUN interface to create; also names the UAPI socket
    /// (`<uapi-dir>/<interface>.sock`), which `wg` finds by this name.
    pub interface: String,

    /// UDP port (0: any free port, as wireguard-go starts; `wg show`
    /// prints it).
    #[arg(long, default_value_t = 0)]
    pub listen_port: u16,

    /// Address the UDP socket binds to.
    #[arg(long, default_value_t = IpAddr::V4(Ipv4Addr::UNSPECIFIED))]
    pub bind: IpAddr,

    /// Accepted for command-line compatibility with `wireguard-go -f`:
    /// this command never daemonizes.
    #[arg(short = 'f', long)]
    pub foreground: bool,

    /// Directory of the UAPI socket. It is shared by every network
    /// namespace of the machine: instances need distinct interface names.
    #[arg(long, env = "SDN_TUNNEL_UAPI_DIR", default_value = uapi::DEFAULT_SOCKET_DIR)]
    pub uapi_dir: PathBuf,

    /// Tunnel MTU.
    #[arg(long, default_value_t = 1420)]
    pub mtu: u32,

    /// Private key file (`wg genkey` output, mode 0600); a fresh key is
    /// generated in memory when absent (set one with `wg set ... private-key`).
    #[arg(long)]
    pub private_key: Option<PathBuf>,

    /// A configuration in `wg setconf` format applied at start.
    #[arg(long)]
    pub config: Option<PathBuf>,

    /// Serve `/healthz` and `/metrics` on this address.
    #[arg(long)]
    pub metrics_addr: Option<SocketAddr>,
}

fn load_key(path: Option<&Path>) -> Result<PrivateKey> {
    match path {
        Some(p) => PrivateKey::load(p).with_context(|| format!("private key {}", p.display())),
        None => Ok(PrivateKey::generate()),
    }
}

/// The state UAPI keeps beside a standalone tunnel.
pub struct Standalone {
    /// `None` only after a failed listen port change stopped it.
    tunnel: Option<Tunnel>,
    private_key: Option<PrivateKey>,
    fwmark: u32,
    /// Address the UDP socket binds to when `listen_port` changes.
    bind_ip: IpAddr,
}

impl Standalone {
    /// UAPI's view of `tunnel`, which runs with `private_key` and whose
    /// socket is bound to `bind_ip`.
    pub fn new(tunnel: Tunnel, private_key: PrivateKey, bind_ip: IpAddr) -> Standalone {
        Standalone {
            tunnel: Some(tunnel),
            private_key: Some(private_key),
            fwmark: 0,
            bind_ip,
        }
    }

    /// The running tunnel.
    pub fn tunnel(&self) -> Result<&Tunnel, UapiError> {
        self.tunnel
            .as_ref()
            .ok_or_else(|| UapiError::Io("the tunnel stopped during a listen port change".into()))
    }

    /// Moves the tunnel to a socket on `port`: the device (peers,
    /// sessions) and the TUN are kept.
    fn rebind(&mut self, port: u16) -> Result<(), UapiError> {
        let addr = SocketAddr::new(self.bind_ip, port);
        let udp = tunnel::bind_udp(addr, None)
            .map_err(|e| UapiError::PortInUse(format!("listen_port {port}: {e}")))?;
        let Some(old) = self.tunnel.take() else {
            return Err(UapiError::Io("no tunnel".into()));
        };
        let (device, tun) = old.into_parts().map_err(|e| {
            warn!(error = %e, "listen port change failed: the tunnel is stopped");
            UapiError::Io(e.to_string())
        })?;
        let t = Tunnel::start(device, tun, udp).map_err(|e| UapiError::Io(e.to_string()))?;
        if self.fwmark != 0 {
            set_mark(&t, self.fwmark)?;
        }
        self.tunnel = Some(t);
        Ok(())
    }

    fn current(&self) -> Result<Config, UapiError> {
        let tunnel = self.tunnel()?;
        Ok(tunnel.with_device_mut(|dev| Config {
            private_key: self.private_key.clone(),
            listen_port: tunnel.local_addr().port(),
            fwmark: self.fwmark,
            peers: dev
                .stats()
                .iter()
                .filter_map(|s| dev.peer_config(&s.public_key))
                .map(|p| (p.public_key, p))
                .collect(),
        }))
    }
}

impl Configurable for Standalone {
    fn get(&self) -> Result<String, UapiError> {
        Ok(get_from_view(
            &self.tunnel()?.view(),
            self.private_key.as_ref(),
            self.fwmark,
        ))
    }

    /// Applies a parsed set: validated whole first, then the port, the
    /// mark, the key and the peers.
    fn set(&mut self, req: &SetRequest) -> Result<(), UapiError> {
        let old = self.current()?;
        let new = old.apply(req);
        let plan = plan(&old, &new);
        if let Some(None) = plan.private_key {
            return Err(UapiError::Invalid(
                "clearing the private key is not supported (set another one)".into(),
            ));
        }
        if let Some(port) = plan.listen_port {
            self.rebind(port)?;
            info!(listen = %self.tunnel()?.local_addr(), "UAPI: listen port changed");
        }
        if let Some(mark) = plan.fwmark {
            set_mark(self.tunnel()?, mark)?;
            self.fwmark = mark;
            info!(fwmark = mark, "UAPI: fwmark set");
        }
        let mut private_key = self.private_key.clone();
        let tunnel = self.tunnel()?;
        tunnel.with_device_mut(|dev| -> Result<(), UapiError> {
            if let Some(Some(k)) = &plan.private_key {
                dev.set_private_key(k);
                private_key = Some(k.clone());
                info!(public_key = %k.public_key().to_base64(), "UAPI: private key set");
            }
            for k in &plan.removed {
                dev.remove_peer(k);
                info!(peer = %k.to_base64(), "UAPI: peer removed");
            }
            for p in &plan.upserts {
                let change = dev
                    .set_peer(p.clone())
                    .map_err(|e| UapiError::Invalid(e.to_string()))?;
                info!(peer = %p.public_key.to_base64(), ?change, endpoint = ?p.endpoint,
                      allowed_ips = ?p.allowed_ips, "UAPI: peer configured");
            }
            Ok(())
        })?;
        for k in &plan.keepalive_on {
            tunnel.initiate_handshake(k);
        }
        self.private_key = private_key;
        Ok(())
    }
}

fn set_mark(tunnel: &Tunnel, mark: u32) -> Result<(), UapiError> {
    nix::sys::socket::setsockopt(tunnel.udp_socket(), nix::sys::socket::sockopt::Mark, &mark)
        .map_err(|e| UapiError::PortInUse(format!("fwmark {mark}: {e}")))
}

/// Runs the standalone tunnel until SIGINT/SIGTERM.
pub fn run(cfg: StandaloneConfig) -> Result<()> {
    let key = load_key(cfg.private_key.as_deref())?;
    let tun = Tun::create(&TunOptions {
        name: cfg.interface.clone(),
        mtu: Some(cfg.mtu),
        multi_queue: false,
        up: true,
        // Virtio-net headers with TSO/USO: the runtime splits super-packets
        // before encryption and coalesces decrypted TCP segments (GRO), and
        // falls back to plain packets where the kernel refuses the offloads.
        offload: true,
    })
    .with_context(|| format!("creating TUN device {}", cfg.interface))?;
    let bind = SocketAddr::new(cfg.bind, cfg.listen_port);
    let udp = bind_udp(bind, None).with_context(|| format!("binding UDP {bind}"))?;
    let tunnel = Tunnel::start(Device::new(DeviceConfig::new(key.clone())), tun, udp)?;
    let listen = tunnel.local_addr();
    let state = Arc::new(Mutex::new(Standalone::new(tunnel, key, cfg.bind)));
    if let Some(path) = &cfg.config {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let lines = setconf_to_uapi(&text).with_context(|| format!("{}", path.display()))?;
        let req = uapi::parse_set(&lines).with_context(|| format!("{}", path.display()))?;
        state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .set(&req)
            .with_context(|| format!("applying {}", path.display()))?;
    }
    let server = uapi::Server::start(&cfg.uapi_dir, &cfg.interface, Target::ReadWrite(state))?;
    info!(
        interface = %cfg.interface,
        %listen,
        uapi = %server.path().display(),
        "standalone tunnel up"
    );
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        if let Some(addr) = cfg.metrics_addr {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("metrics address {addr}"))?;
            tokio::spawn(health::serve_metrics(
                listener,
                Arc::new(Metrics::new(&cfg.interface)),
            ));
        }
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        info!("shutting down");
        anyhow::Ok(())
    })?;
    drop(server);
    Ok(())
}
