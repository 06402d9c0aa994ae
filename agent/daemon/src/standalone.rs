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

/// Errors of a `wg setconf` file.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfError {
    #[error("line {0}: {1}")]
    Line(usize, String),
}

fn key_hex(line: usize, what: &str, b64: &str) -> Result<String, ConfError> {
    use base64::Engine as _;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .map_err(|_| ConfError::Line(line, format!("{what} is not base64")))?;
    let key: [u8; 32] = bytes
        .try_into()
        .map_err(|_| ConfError::Line(line, format!("{what} is not 32 bytes")))?;
    Ok(uapi::to_hex(&key))
}

/// Turns a `wg setconf` file into the UAPI set lines `wg setconf` sends:
/// `replace_peers`, and per peer `replace_allowed_ips`. Endpoints that are
/// host names are resolved here.
pub fn setconf_to_uapi(text: &str) -> Result<Vec<String>, ConfError> {
    #[derive(PartialEq)]
    enum Section {
        None,
        Interface,
        Peer,
    }
    let mut out = vec!["replace_peers=true".to_owned()];
    let mut peers: Vec<Vec<String>> = Vec::new();
    let mut section = Section::None;
    for (i, raw) in text.lines().enumerate() {
        let n = i + 1;
        let line = raw.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        if line.eq_ignore_ascii_case("[interface]") {
            section = Section::Interface;
            continue;
        }
        if line.eq_ignore_ascii_case("[peer]") {
            section = Section::Peer;
            peers.push(Vec::new());
            continue;
        }
        let Some((k, v)) = line.split_once('=') else {
            return Err(ConfError::Line(n, format!("{line:?} is not Key = Value")));
        };
        let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
        let bad = |why: &str| ConfError::Line(n, why.to_owned());
        match (&section, k.as_str()) {
            (Section::Interface, "privatekey") => {
                out.push(format!("private_key={}", key_hex(n, "PrivateKey", v)?));
            }
            (Section::Interface, "listenport") => {
                let p: u16 = v.parse().map_err(|_| bad("ListenPort is not a port"))?;
                out.push(format!("listen_port={p}"));
            }
            (Section::Interface, "fwmark") => {
                let m = if v == "off" {
                    0
                } else if let Some(h) = v.strip_prefix("0x") {
                    u32::from_str_radix(h, 16).map_err(|_| bad("FwMark is not a number"))?
                } else {
                    v.parse().map_err(|_| bad("FwMark is not a number"))?
                };
                out.push(format!("fwmark={m}"));
            }
            (Section::Peer, key) => {
                let peer = peers.last_mut().ok_or_else(|| bad("no [Peer]"))?;
                match key {
                    "publickey" => {
                        peer.insert(0, format!("public_key={}", key_hex(n, "PublicKey", v)?))
                    }
                    "presharedkey" => {
                        peer.push(format!("preshared_key={}", key_hex(n, "PresharedKey", v)?));
                    }
                    "endpoint" => {
                        let addr = resolve(v).ok_or_else(|| bad("Endpoint cannot be resolved"))?;
                        peer.push(format!("endpoint={addr}"));
                    }
                    "persistentkeepalive" => {
                        let s: u16 = if v == "off" {
                            0
                        } else {
                            v.parse()
                                .map_err(|_| bad("PersistentKeepalive is not a number"))?
                        };
                        peer.push(format!("persistent_keepalive_interval={s}"));
                    }
                    "allowedips" => {
                        peer.push("replace_allowed_ips=true".into());
                        for ip in v.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                            let net: ipnet::IpNet = match ip.parse() {
                                Ok(n) => n,
                                Err(_) => ip
                                    .parse::<IpAddr>()
                                    .map(ipnet::IpNet::from)
                                    .map_err(|_| bad("AllowedIPs has a bad prefix"))?,
                            };
                            peer.push(format!("allowed_ip={net}"));
                        }
                    }
                    other => return Err(bad(&format!("unknown peer key {other:?}"))),
                }
            }
            (_, other) => {
                return Err(ConfError::Line(n, format!("unknown key {other:?} here")));
            }
        }
    }
    for (i, p) in peers.into_iter().enumerate() {
        if !p.first().is_some_and(|l| l.starts_with("public_key=")) {
            return Err(ConfError::Line(
                0,
                format!("[Peer] #{} has no PublicKey", i + 1),
            ));
        }
        // Every peer's AllowedIPs are replaced, as `wg setconf` does.
        if !p.iter().any(|l| l == "replace_allowed_ips=true") {
            out.push(p[0].clone());
            out.push("replace_allowed_ips=true".into());
            out.extend(p.into_iter().skip(1));
        } else {
            out.extend(p);
        }
    }
    Ok(out)
}

fn resolve(endpoint: &str) -> Option<SocketAddr> {
    use std::net::ToSocketAddrs;
    if let Ok(a) = endpoint.parse() {
        return Some(a);
    }
    endpoint.to_socket_addrs().ok()?.next()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn setconf_file_becomes_what_wg_setconf_sends() {
        let k = |b: u8| {
            use base64::Engine as _;
            base64::engine::general_purpose::STANDARD.encode([b; 32])
        };
        let text = format!(
            "[Interface]\nPrivateKey = {}\nListenPort = 51820 # comment\nFwMark = 0x10\n\n\
             [Peer]\nPublicKey = {}\nEndpoint = 192.0.2.1:51820\nAllowedIPs = 10.0.0.0/24, fd00::1\n\
             PersistentKeepalive = 25\n[Peer]\nPublicKey={}\n",
            k(1),
            k(2),
            k(3)
        );
        let lines = setconf_to_uapi(&text).expect("valid file");
        let hex = |b: u8| uapi::to_hex(&[b; 32]);
        assert_eq!(
            lines,
            vec![
                "replace_peers=true".to_owned(),
                format!("private_key={}", hex(1)),
                "listen_port=51820".into(),
                "fwmark=16".into(),
                format!("public_key={}", hex(2)),
                "endpoint=192.0.2.1:51820".into(),
                "replace_allowed_ips=true".into(),
                "allowed_ip=10.0.0.0/24".into(),
                "allowed_ip=fd00::1/128".into(),
                "persistent_keepalive_interval=25".into(),
                format!("public_key={}", hex(3)),
                "replace_allowed_ips=true".into(),
            ]
        );
        // And the UAPI parser takes it.
        uapi::parse_set(&lines).expect("parses");
    }

    #[test]
    fn setconf_refuses_what_wg_setconf_refuses() {
        for bad in [
            "[Interface]\nAddress = 10.0.0.1/24\n",
            "[Interface]\nPrivateKey = abc\n",
            "[Peer]\nAllowedIPs = 10.0.0.0/24\n",
            "[Peer]\nPublicKey = AAAA\n",
            "ListenPort = 1\n",
            "[Interface]\nListenPort = 70000\n",
            "[Interface]\njunk\n",
        ] {
            assert!(setconf_to_uapi(bad).is_err(), "{bad}");
        }
    }
}
