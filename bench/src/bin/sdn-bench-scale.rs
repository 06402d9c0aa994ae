//! Scale benchmark of the agent's control loop (issue 13; not a test, it
//! never asserts): one release `tunnel-agent` in cluster `east` of a
//! process lab, against 10 / 100 / 1 000 remote TunnelPeers in `west`.
//!
//! The agent is driven only from the outside — its binary started as the
//! installed DaemonSet says (`sdn_tunnel_e2e::daemonset`), TunnelPeer
//! objects in west's apiserver, its `/metrics`, `/proc/<pid>` and its log —
//! so the same bench measures any version of the agent.
//!
//! Peers: the two real west agents (the honest peers), plus N TunnelPeers
//! the bench creates in west (`sim-<slot>`, each with its own key and a /28
//! of west's declared pod range). One in four of them is *answering*: its
//! endpoint is one UDP socket of the bench on the lab's host address
//! (`10.70.0.1:51900`), where a responder holds one boringtun `noise::Tunn`
//! per simulated key and answers handshake initiations (the initiation's
//! mac1 names the responder key it is for, so each is offered to the Tunns
//! until one accepts its mac1) and keepalives (the receiver index names
//! the Tunn: `index << 8`). The other three in four are *idle*: their
//! endpoint is a second socket (`10.70.0.1:51901`) that reads and drops
//! everything, a node that never answers.
//!
//! Measured per size, in this order: time from the first create to all N
//! programmed (`sdn_tunnel_peers` on the agent's `/metrics`); then a quiet
//! window without any scrape of the agent: its CPU (utime + stime of
//! `/proc/<pid>/stat`), RSS, status writes (the east apiserver's
//! `apiserver_request_total` for sdntunnel.io `status` subresource writes:
//! only the east agent writes there) and WARN lines of its log; then, while
//! 10 % of the simulated peers are replaced every churn period, UDP probes
//! every 10 ms from an east pod to a west pod through the tunnel and
//! single-stream TCP downloads, as ratios to the same measured with the two
//! real peers only; then 50 kube-rs watchers of west's TunnelPeers (what 50
//! agents of other clusters would hold) and west apiserver's RSS and watch
//! gauge; then the N are deleted and the agent's RSS read again.
//!
//! Output ends with `FIGURE <name> = <value> <unit>` lines, with the
//! issue's target beside those that have one.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io::Read;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use boringtun::noise::errors::WireGuardError;
use boringtun::noise::{Tunn, TunnResult};
use clap::Parser;
use futures::{StreamExt, TryStreamExt};
use kube::api::{DeleteParams, PostParams};
use kube::runtime::watcher;
use kube::{Api, Client};
use sdn_tunnel_api::{TunnelPeer, TunnelPeerSpec};
use sdn_tunnel_datapath::keys::{PrivateKey, PublicKey};
use sdn_tunnel_e2e::daemonset::{http_get, start_agents_from_daemonset_running};
use sdn_tunnel_e2e::{apply_yaml, install, repo_root, wait_mesh_connected_or_dump, NAMESPACE};
use sdn_tunnel_lab::{Identity, Lab, LabConfig, Pod, POD_BULK_PORT, POD_SERVER_PORT};

#[derive(Debug, Parser)]
#[command(about = "Scale benchmark of tunnel-agent (issue 13): FIGURE lines, never asserts")]
struct Args {
    /// Numbers of simulated remote TunnelPeers, measured one after the other.
    #[arg(long, value_delimiter = ',', default_values_t = [10usize, 100, 1000])]
    sizes: Vec<usize>,
    /// Short windows (10 s instead of 60 s, churn every 10 s, smaller TCP transfers).
    #[arg(long)]
    quick: bool,
    /// The tunnel-agent binary (default: the one next to this bench).
    #[arg(long)]
    agent: Option<PathBuf>,
    /// One simulated peer in this many answers handshakes; the rest are idle.
    #[arg(long, default_value_t = 4)]
    answering_one_in: usize,
    /// Simulated agents watching west's TunnelPeers.
    #[arg(long, default_value_t = 50)]
    watchers: usize,
}

/// Lab name and underlay octet reserved for this bench (no test uses 70).
const LAB_NAME: &str = "scale70";
const UNDERLAY_OCTET: u8 = 70;
/// The host's underlay address: where the simulated peers' sockets are.
const HOST_IP: Ipv4Addr = Ipv4Addr::new(10, UNDERLAY_OCTET, 0, 1);
const ANSWERING_PORT: u16 = 51900;
const IDLE_PORT: u16 = 51901;
/// The agents' `/metrics` port (deploy/daemonset.yaml).
const METRICS_PORT: u16 = 9586;
/// Simulated peers' /28s start at 10.2.16.0 (west's nodes own 10.2.1-2.0/24).
const SIM_FIRST_OCTET3: u32 = 16;
const SIM_SLOTS: u32 = (256 - SIM_FIRST_OCTET3) * 16;
/// The real peers of the east agent: west's two nodes.
const REAL_PEERS: usize = 2;

/// Durations of one run.
#[derive(Debug, Clone, Copy)]
struct Windows {
    quiet: Duration,
    probes: Duration,
    churn_every: Duration,
    tcp_bytes: u64,
    tcp_runs: usize,
    settle: Duration,
}

impl Windows {
    fn new(quick: bool) -> Self {
        if quick {
            Windows {
                quiet: Duration::from_secs(10),
                probes: Duration::from_secs(10),
                churn_every: Duration::from_secs(10),
                tcp_bytes: 64 << 20,
                tcp_runs: 1,
                settle: Duration::from_secs(3),
            }
        } else {
            Windows {
                quiet: Duration::from_secs(60),
                probes: Duration::from_secs(60),
                churn_every: Duration::from_secs(60),
                tcp_bytes: 256 << 20,
                tcp_runs: 3,
                settle: Duration::from_secs(10),
            }
        }
    }
}

/// Prints one figure, with its target when it has one.
fn figure(name: &str, value: f64, unit: &str, target: Option<&str>) {
    let digits = if value.abs() >= 100.0 { 1 } else { 3 };
    match target {
        Some(t) => println!("FIGURE {name} = {value:.digits$} {unit}  (target {t})"),
        None => println!("FIGURE {name} = {value:.digits$} {unit}"),
    }
}

// ---------------------------------------------------------------------------
// The simulated peers' responder.

/// One answering simulated peer: its Tunn and where the agent spoke from.
struct Answering {
    tunn: Box<Tunn>,
    last_src: Option<SocketAddr>,
}

#[derive(Default)]
struct ResponderState {
    /// By Tunn index (the slot): the receiver index of data is `slot << 8 | n`.
    peers: HashMap<u32, Answering>,
}

/// Counters of the simulated peers' sockets.
#[derive(Default)]
struct ResponderStats {
    handshakes_answered: AtomicU64,
    packets_in: AtomicU64,
    idle_packets_in: AtomicU64,
}

struct Responder {
    state: Arc<Mutex<ResponderState>>,
    stats: Arc<ResponderStats>,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

fn lock(state: &Mutex<ResponderState>) -> std::sync::MutexGuard<'_, ResponderState> {
    state.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Responder {
    fn start() -> Result<Responder> {
        let state = Arc::new(Mutex::new(ResponderState::default()));
        let stats = Arc::new(ResponderStats::default());
        let stop = Arc::new(AtomicBool::new(false));
        let answering = UdpSocket::bind(SocketAddrV4::new(HOST_IP, ANSWERING_PORT))
            .context("binding the answering peers' socket")?;
        let idle = UdpSocket::bind(SocketAddrV4::new(HOST_IP, IDLE_PORT))
            .context("binding the idle peers' socket")?;
        answering.set_read_timeout(Some(Duration::from_millis(100)))?;
        idle.set_read_timeout(Some(Duration::from_millis(200)))?;
        let mut threads = Vec::new();
        {
            let (state, stats, stop) = (state.clone(), stats.clone(), stop.clone());
            threads.push(std::thread::spawn(move || {
                answer_loop(&answering, &state, &stats, &stop)
            }));
        }
        {
            let (stats, stop) = (stats.clone(), stop.clone());
            threads.push(std::thread::spawn(move || {
                let mut buf = [0u8; 2048];
                while !stop.load(Ordering::Relaxed) {
                    if idle.recv_from(&mut buf).is_ok() {
                        stats.idle_packets_in.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }));
        }
        Ok(Responder {
            state,
            stats,
            stop,
            threads,
        })
    }

    fn add(&self, slot: u32, key: &PrivateKey, agent: &PublicKey) {
        let tunn = Tunn::new(
            key.to_static_secret(),
            agent.to_x25519(),
            None,
            None,
            slot,
            None,
        );
        lock(&self.state).peers.insert(
            slot,
            Answering {
                tunn: Box::new(tunn),
                last_src: None,
            },
        );
    }

    fn remove(&self, slot: u32) {
        lock(&self.state).peers.remove(&slot);
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Sends what a Tunn wants sent, then drains its queue (repeated calls with
/// an empty datagram, as boringtun asks).
fn flush(sock: &UdpSocket, peer: &mut Answering, first: TunnResult<'_>, to: SocketAddr) {
    if let TunnResult::WriteToNetwork(p) = first {
        let _ = sock.send_to(p, to);
        let mut out = [0u8; 2048];
        while let TunnResult::WriteToNetwork(p) = peer.tunn.decapsulate(None, &[], &mut out) {
            let _ = sock.send_to(p, to);
        }
    }
}

fn answer_loop(
    sock: &UdpSocket,
    state: &Mutex<ResponderState>,
    stats: &ResponderStats,
    stop: &AtomicBool,
) {
    let mut buf = [0u8; 2048];
    let mut out = [0u8; 2048];
    let mut last_tick = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        if let Ok((n, src)) = sock.recv_from(&mut buf) {
            stats.packets_in.fetch_add(1, Ordering::Relaxed);
            let pkt = &buf[..n];
            let mut st = lock(state);
            match pkt.first() {
                // Handshake initiation: its mac1 is keyed by the responder's
                // public key; the Tunns whose key it is not refuse it cheaply.
                Some(1) => {
                    for peer in st.peers.values_mut() {
                        let r = peer.tunn.decapsulate(Some(src.ip()), pkt, &mut out);
                        if matches!(r, TunnResult::Err(WireGuardError::InvalidMac)) {
                            continue;
                        }
                        if matches!(r, TunnResult::WriteToNetwork(_)) {
                            stats.handshakes_answered.fetch_add(1, Ordering::Relaxed);
                        }
                        peer.last_src = Some(src);
                        flush(sock, peer, r, src);
                        break;
                    }
                }
                // Cookie reply or data (keepalives): the receiver index.
                Some(3 | 4) if n >= 8 => {
                    let idx = u32::from_le_bytes([pkt[4], pkt[5], pkt[6], pkt[7]]) >> 8;
                    if let Some(peer) = st.peers.get_mut(&idx) {
                        peer.last_src = Some(src);
                        let r = peer.tunn.decapsulate(Some(src.ip()), pkt, &mut out);
                        flush(sock, peer, r, src);
                    }
                }
                _ => {}
            }
        }
        if last_tick.elapsed() >= Duration::from_millis(250) {
            last_tick = Instant::now();
            let mut st = lock(state);
            for peer in st.peers.values_mut() {
                let r = peer.tunn.update_timers(&mut out);
                if let (TunnResult::WriteToNetwork(p), Some(to)) = (r, peer.last_src) {
                    let _ = sock.send_to(p, to);
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------
// The simulated TunnelPeers in west.

struct SimPeer {
    slot: u32,
    name: String,
    answering: bool,
}

struct SimPeers {
    api: Api<TunnelPeer>,
    agent_key: PublicKey,
    answering_one_in: u32,
    next: u32,
    live: VecDeque<SimPeer>,
}

fn sim_cidr(slot: u32) -> String {
    let s = slot % SIM_SLOTS;
    let o3 = SIM_FIRST_OCTET3 + s / 16;
    let o4 = (s % 16) * 16;
    format!("10.2.{o3}.{o4}/28")
}

impl SimPeers {
    /// Creates `n` peers, `parallel` requests at a time.
    async fn create(&mut self, n: usize, responder: &Responder) -> Result<()> {
        let mut made = Vec::new();
        for _ in 0..n {
            let slot = self.next;
            self.next += 1;
            if self.live.len() + made.len() >= SIM_SLOTS as usize {
                bail!("more simulated peers than /28s in west's range");
            }
            let key = PrivateKey::generate();
            let answering = slot.is_multiple_of(self.answering_one_in);
            if answering {
                responder.add(slot, &key, &self.agent_key);
            }
            let port = if answering { ANSWERING_PORT } else { IDLE_PORT };
            let name = format!("sim-{slot}");
            let peer = TunnelPeer::new(
                &name,
                TunnelPeerSpec {
                    cluster: "west".into(),
                    node: format!("sim-node-{slot}"),
                    public_key: key.public_key().to_base64(),
                    endpoints: vec![format!("{HOST_IP}:{port}")],
                    pod_cidrs: vec![sim_cidr(slot)],
                    listen_port: i32::from(port),
                    mtu: None,
                },
            );
            made.push((
                SimPeer {
                    slot,
                    name,
                    answering,
                },
                peer,
            ));
        }
        let api = self.api.clone();
        futures::stream::iter(made.iter().map(|(_, p)| {
            let api = api.clone();
            async move {
                api.create(&PostParams::default(), p)
                    .await
                    .with_context(|| {
                        format!("creating TunnelPeer {}", kube::ResourceExt::name_any(p))
                    })
            }
        }))
        .buffer_unordered(16)
        .try_collect::<Vec<_>>()
        .await?;
        self.live.extend(made.into_iter().map(|(s, _)| s));
        Ok(())
    }

    /// Deletes the `n` oldest peers.
    async fn delete_oldest(&mut self, n: usize, responder: &Responder) -> Result<()> {
        let n = n.min(self.live.len());
        let gone: Vec<SimPeer> = self.live.drain(..n).collect();
        for p in &gone {
            if p.answering {
                responder.remove(p.slot);
            }
        }
        let api = self.api.clone();
        futures::stream::iter(gone.iter().map(|p| {
            let api = api.clone();
            async move {
                api.delete(&p.name, &DeleteParams::default())
                    .await
                    .with_context(|| format!("deleting TunnelPeer {}", p.name))
            }
        }))
        .buffer_unordered(16)
        .try_collect::<Vec<_>>()
        .await?;
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// What the bench reads from the agent and the apiservers.

struct AgentProbe {
    pod: Pod,
    pid: i32,
    log: PathBuf,
    clk_tck: f64,
}

impl AgentProbe {
    /// utime + stime of the agent in seconds.
    fn cpu_s(&self) -> Result<f64> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid))
            .context("the agent is gone")?;
        let rest = stat
            .rsplit_once(')')
            .map(|(_, r)| r)
            .context("unexpected /proc/<pid>/stat")?;
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks = |i: usize| -> Result<f64> {
            Ok(f.get(i).context("short /proc/<pid>/stat")?.parse::<f64>()?)
        };
        // Fields 14 and 15 of stat(5); `rest` starts at field 3.
        Ok((ticks(11)? + ticks(12)?) / self.clk_tck)
    }

    fn rss_mb(&self) -> Result<f64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid))?;
        let kib: f64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .context("no VmRSS")?
            .parse()?;
        Ok(kib / 1024.0)
    }

    /// Lines of its log so far, and those at WARN.
    fn log_lines(&self) -> Result<(usize, usize)> {
        let mut text = String::new();
        std::fs::File::open(&self.log)?.read_to_string(&mut text)?;
        let lines = text.lines().count();
        let warns = text.lines().filter(|l| is_warn(l)).count();
        Ok((lines, warns))
    }

    /// `sdn_tunnel_peers` and `sdn_tunnel_peers_connected` from `/metrics`.
    async fn peers(&self) -> Result<(usize, usize)> {
        let netns = self.pod.netns.clone();
        let addr = SocketAddr::from((self.pod.ip, METRICS_PORT));
        let (status, body) =
            tokio::task::spawn_blocking(move || http_get(&netns, addr, "/metrics")).await??;
        if status != 200 {
            bail!("/metrics answered {status}");
        }
        let gauge = |name: &str| {
            body.lines()
                .filter(|l| {
                    l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} "))
                })
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum::<f64>() as usize
        };
        Ok((
            gauge("sdn_tunnel_peers"),
            gauge("sdn_tunnel_peers_connected"),
        ))
    }

    /// Waits until the agent has `want` peers; returns how long that took
    /// from `since`.
    async fn wait_peers(&self, want: usize, since: Instant, timeout: Duration) -> Result<f64> {
        let mut last = (0, 0);
        while since.elapsed() < timeout {
            if let Ok(p) = self.peers().await {
                last = p;
                if p.0 == want {
                    return Ok(since.elapsed().as_secs_f64());
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!(
            "the agent has {} peers after {timeout:?}, not {want}",
            last.0
        )
    }
}

/// A tracing line at WARN (with or without ANSI colours).
fn is_warn(line: &str) -> bool {
    sdn_tunnel_e2e::strip_ansi(line).split_whitespace().nth(1) == Some("WARN")
}

/// A kube-apiserver's `/metrics` text.
async fn apiserver_metrics(client: &Client) -> Result<String> {
    let req = http::Request::get("/metrics").body(Vec::new())?;
    Ok(client.request_text(req).await?)
}

/// Value of a Prometheus text sample line.
fn sample_value(line: &str) -> Option<f64> {
    line.rsplit(' ').next()?.parse().ok()
}

/// Status-subresource writes to sdntunnel.io objects the apiserver served.
fn status_writes(metrics: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with("apiserver_request_total{"))
        .filter(|l| l.contains("group=\"sdntunnel.io\"") && l.contains("subresource=\"status\""))
        .filter(|l| {
            ["APPLY", "PATCH", "UPDATE"]
                .iter()
                .any(|v| l.contains(&format!("verb=\"{v}\"")))
        })
        .filter_map(sample_value)
        .sum()
}

/// Watches of TunnelPeers open on the apiserver (whichever gauge this
/// version has), and the gauge's name.
fn tunnelpeer_watches(metrics: &str) -> Option<(String, f64)> {
    for gauge in [
        "apiserver_longrunning_requests{",
        "apiserver_longrunning_gauge{",
        "apiserver_registered_watchers{",
    ] {
        let lines: Vec<&str> = metrics
            .lines()
            .filter(|l| l.starts_with(gauge))
            .filter(|l| l.contains("tunnelpeers") || l.contains("TunnelPeer"))
            .filter(|l| !gauge.starts_with("apiserver_long") || l.contains("verb=\"WATCH\""))
            .collect();
        if !lines.is_empty() {
            let name = gauge.trim_end_matches('{').to_string();
            return Some((name, lines.iter().filter_map(|l| sample_value(l)).sum()));
        }
    }
    None
}

// ---------------------------------------------------------------------------
// Honest traffic: an east pod to a west pod through the tunnel.

#[derive(Debug, Clone, Copy)]
struct Probes {
    p50_ms: f64,
    p99_ms: f64,
    sent: usize,
    lost: usize,
}

/// A lost probe counts as this in the percentiles.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// UDP probes every 10 ms for `window` from `netns` to the pod server at `to`.
fn udp_probes(netns: &str, to: SocketAddr, window: Duration) -> Result<Probes> {
    sdn_tunnel_lab::sys::in_netns(netns, move || {
        let sock = UdpSocket::bind(("0.0.0.0", 0))?;
        sock.connect(to)?;
        let mut rtts = Vec::new();
        let mut lost = 0;
        let mut buf = [0u8; 256];
        let start = Instant::now();
        let mut next = start;
        while start.elapsed() < window {
            // A late answer of an earlier probe must not count for this one.
            sock.set_nonblocking(true)?;
            while sock.recv(&mut buf).is_ok() {}
            sock.set_nonblocking(false)?;
            sock.set_read_timeout(Some(PROBE_TIMEOUT))?;
            let t = Instant::now();
            sock.send(b"probe\n")?;
            match sock.recv(&mut buf) {
                Ok(_) => rtts.push(t.elapsed()),
                Err(_) => {
                    lost += 1;
                    rtts.push(PROBE_TIMEOUT);
                }
            }
            next += Duration::from_millis(10);
            let now = Instant::now();
            if next > now {
                std::thread::sleep(next - now);
            } else {
                next = now;
            }
        }
        rtts.sort();
        let pct = |p: usize| {
            rtts.get((rtts.len() * p / 100).min(rtts.len().saturating_sub(1)))
                .map_or(f64::NAN, |d| d.as_secs_f64() * 1e3)
        };
        Ok(Probes {
            p50_ms: pct(50),
            p99_ms: pct(99),
            sent: rtts.len(),
            lost,
        })
    })
}

/// Median single-stream TCP download rate in Mbit/s over `runs` transfers.
fn tcp_mbps(netns: &str, to: SocketAddr, bytes: u64, runs: usize) -> Result<f64> {
    let mut rates = Vec::new();
    for _ in 0..runs {
        let t = Instant::now();
        let got = sdn_tunnel_lab::server::bulk_download(netns, to, bytes, Duration::from_secs(60))?;
        if got != bytes {
            bail!("TCP download got {got} of {bytes} bytes");
        }
        rates.push(got as f64 * 8.0 / t.elapsed().as_secs_f64() / 1e6);
    }
    rates.sort_by(f64::total_cmp);
    rates.get(rates.len() / 2).copied().context("no TCP run")
}

struct Honest {
    probes: Probes,
    tcp_mbps: f64,
}

async fn honest(probe: &Pod, echo: &Pod, w: Windows) -> Result<Honest> {
    let (netns, ip) = (probe.netns.clone(), echo.ip);
    let probes = tokio::task::spawn_blocking(move || {
        udp_probes(&netns, SocketAddr::from((ip, POD_SERVER_PORT)), w.probes)
    })
    .await??;
    let netns = probe.netns.clone();
    let tcp = tokio::task::spawn_blocking(move || {
        tcp_mbps(
            &netns,
            SocketAddr::from((ip, POD_BULK_PORT)),
            w.tcp_bytes,
            w.tcp_runs,
        )
    })
    .await??;
    Ok(Honest {
        probes,
        tcp_mbps: tcp,
    })
}

// ---------------------------------------------------------------------------
// The run.

struct Quiet {
    cpu_pct: f64,
    rss_mb: f64,
    status_writes_per_min: f64,
    warn_per_min: f64,
}

/// A window in which the bench changes nothing and does not scrape the agent.
async fn quiet_window(agent: &AgentProbe, east: &Client, window: Duration) -> Result<Quiet> {
    let writes0 = status_writes(&apiserver_metrics(east).await?);
    let (_, warns0) = agent.log_lines()?;
    let cpu0 = agent.cpu_s()?;
    let t0 = Instant::now();
    tokio::time::sleep(window).await;
    let cpu1 = agent.cpu_s()?;
    let secs = t0.elapsed().as_secs_f64();
    let (_, warns1) = agent.log_lines()?;
    let writes1 = status_writes(&apiserver_metrics(east).await?);
    let per_min = 60.0 / secs;
    Ok(Quiet {
        cpu_pct: (cpu1 - cpu0) / secs * 100.0,
        rss_mb: agent.rss_mb()?,
        status_writes_per_min: (writes1 - writes0) * per_min,
        warn_per_min: (warns1 - warns0) as f64 * per_min,
    })
}

/// `watchers` kube-rs watchers of west's TunnelPeers, each on its own
/// client (as many agents would hold them); returns once every one has
/// listed, with the tasks (aborted on drop of the handles by the caller).
async fn start_watchers(
    kubeconfig: &Path,
    watchers: usize,
) -> Result<Vec<tokio::task::JoinHandle<()>>> {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(watchers.max(1));
    let mut tasks = Vec::new();
    for _ in 0..watchers {
        let client = sdn_tunnel_lab::controlplane::client_from_kubeconfig(kubeconfig).await?;
        let tx = tx.clone();
        tasks.push(tokio::spawn(async move {
            let api: Api<TunnelPeer> = Api::all(client);
            let mut events = std::pin::pin!(watcher(api, watcher::Config::default()));
            let mut told = false;
            while let Some(ev) = events.next().await {
                if matches!(ev, Ok(watcher::Event::InitDone)) && !told {
                    told = true;
                    let _ = tx.send(()).await;
                }
            }
        }));
    }
    drop(tx);
    let deadline = Instant::now() + Duration::from_secs(60);
    for _ in 0..watchers {
        let left = deadline.saturating_duration_since(Instant::now());
        tokio::time::timeout(left, rx.recv())
            .await
            .context("the watchers did not all list within 60 s")?;
    }
    Ok(tasks)
}

fn clk_tck() -> Result<f64> {
    let out = std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .context("getconf CLK_TCK")?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().parse()?)
}

fn default_agent() -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let p = exe.with_file_name("tunnel-agent");
    if !p.is_file() {
        bail!(
            "no tunnel-agent next to {}: `cargo build --release -p sdn-tunnel-agent` or --agent",
            exe.display()
        );
    }
    Ok(p)
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    // Dropping `run` on a signal drops its lab, whose Drop tears it down.
    tokio::select! {
        r = run(args) => r,
        _ = tokio::signal::ctrl_c() => bail!("interrupted: lab removed"),
        _ = term.recv() => bail!("terminated: lab removed"),
    }
}

async fn run(args: Args) -> Result<()> {
    if args.answering_one_in == 0 {
        bail!("--answering-one-in must be at least 1");
    }
    let w = Windows::new(args.quick);
    let agent_bin = match &args.agent {
        Some(p) => p.clone(),
        None => default_agent()?,
    };
    let started = Instant::now();
    println!(
        "bench-scale: agent {}, sizes {:?}, windows {:?}",
        agent_bin.display(),
        args.sizes,
        w
    );

    let mut cfg = LabConfig::new(LAB_NAME);
    cfg.underlay_octet = UNDERLAY_OCTET;
    cfg.nodes_per_cluster = 1;
    cfg.extra_nodes = BTreeMap::from([("west".to_string(), 1)]);
    let mut lab = Lab::up(cfg).await.context("lab up")?;
    install(&lab).await.context("install")?;
    let daemonset = std::fs::read_to_string(repo_root().join("deploy/daemonset.yaml"))?;
    for c in lab.config().clusters.clone() {
        apply_yaml(&lab.client(&c, Identity::Admin).await?, &daemonset).await?;
    }
    let agents = start_agents_from_daemonset_running(&mut lab, &agent_bin).await?;
    let pods: Vec<Pod> = agents.iter().map(|(_, p)| p.clone()).collect();
    wait_mesh_connected_or_dump(&lab, &pods, Duration::from_secs(120)).await?;
    println!(
        "lab up, mesh connected after {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let east_agent = agents
        .iter()
        .map(|(_, p)| p)
        .find(|p| p.cluster == "east")
        .context("no east agent")?
        .clone();
    let agent = AgentProbe {
        pid: east_agent
            .server
            .as_ref()
            .context("east agent not running")?
            .pid,
        log: lab.pod_log(&east_agent.cluster, &east_agent.name),
        pod: east_agent.clone(),
        clk_tck: clk_tck()?,
    };
    let probe = lab.add_pod("east", 1, "probe")?;
    let echo = lab.add_pod("west", 1, "echo")?;

    let east = lab.client("east", Identity::Admin).await?;
    let west = lab.client("west", Identity::Admin).await?;
    let agent_key = Api::<TunnelPeer>::namespaced(east.clone(), NAMESPACE)
        .get(&east_agent.node)
        .await?
        .spec
        .public_key;
    let agent_key = PublicKey::from_base64(&agent_key)?;
    let responder = Responder::start()?;
    let mut sims = SimPeers {
        api: Api::namespaced(west.clone(), NAMESPACE),
        agent_key,
        answering_one_in: u32::try_from(args.answering_one_in)?,
        next: 0,
        live: VecDeque::new(),
    };
    let reader_kubeconfig = lab.cluster_dir("west").join("remote-reader.kubeconfig");

    // Baseline: the two real peers only.
    agent
        .wait_peers(REAL_PEERS, Instant::now(), Duration::from_secs(30))
        .await?;
    let base_quiet = quiet_window(&agent, &east, w.quiet).await?;
    let base = honest(&probe, &echo, w).await?;
    let mut figures: Vec<(String, f64, &str, Option<&str>)> = vec![
        (
            "baseline_idle_cpu_pct".into(),
            base_quiet.cpu_pct,
            "%",
            None,
        ),
        ("baseline_rss_mb".into(), base_quiet.rss_mb, "MB", None),
        (
            "baseline_status_writes_per_min".into(),
            base_quiet.status_writes_per_min,
            "/min",
            None,
        ),
        (
            "baseline_warn_lines_per_min".into(),
            base_quiet.warn_per_min,
            "/min",
            None,
        ),
        (
            "baseline_honest_p50_ms".into(),
            base.probes.p50_ms,
            "ms",
            None,
        ),
        (
            "baseline_honest_p99_ms".into(),
            base.probes.p99_ms,
            "ms",
            None,
        ),
        ("baseline_tcp_mbps".into(), base.tcp_mbps, "Mbit/s", None),
    ];
    println!(
        "baseline: {} probes, {} lost; agent RSS {:.1} MB",
        base.probes.sent, base.probes.lost, base_quiet.rss_mb
    );

    for &n in &args.sizes {
        let p = format!("peers_{n}");
        // 1. Programmed.
        let t0 = Instant::now();
        sims.create(n, &responder).await?;
        let created_s = t0.elapsed().as_secs_f64();
        let programmed = agent
            .wait_peers(REAL_PEERS + n, t0, Duration::from_secs(300))
            .await;
        let programmed_s = match programmed {
            Ok(s) => s,
            Err(e) => {
                println!("{p}: {e:#}");
                f64::NAN
            }
        };
        tokio::time::sleep(w.settle).await;
        let (_, connected) = agent.peers().await.unwrap_or((0, 0));
        println!(
            "{p}: created in {created_s:.2} s, programmed after {programmed_s:.2} s; {} connected ({} answering simulated + {REAL_PEERS} real)",
            connected,
            sims.live.iter().filter(|s| s.answering).count()
        );
        // 2. Quiet.
        let quiet = quiet_window(&agent, &east, w.quiet).await?;
        // 3. Honest traffic under churn.
        let churn_n = n.div_ceil(10);
        let churned = Arc::new(AtomicU64::new(0));
        let honest_task = {
            let (probe, echo) = (probe.clone(), echo.clone());
            tokio::spawn(async move { honest(&probe, &echo, w).await })
        };
        let mut next_churn = Instant::now();
        while !honest_task.is_finished() {
            if Instant::now() >= next_churn {
                sims.delete_oldest(churn_n, &responder).await?;
                sims.create(churn_n, &responder).await?;
                churned.fetch_add(churn_n as u64, Ordering::Relaxed);
                next_churn += w.churn_every;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let under_churn = honest_task.await??;
        println!(
            "{p}: under churn ({} replaced, {churn_n} every {:?}): {} probes, {} lost, p50 {:.2} ms, p99 {:.2} ms, TCP {:.0} Mbit/s",
            churned.load(Ordering::Relaxed),
            w.churn_every,
            under_churn.probes.sent,
            under_churn.probes.lost,
            under_churn.probes.p50_ms,
            under_churn.probes.p99_ms,
            under_churn.tcp_mbps
        );
        // 4. 50 agents watching west's TunnelPeers.
        let before = apiserver_metrics(&west).await?;
        let rss_before = lab.apiserver_rss_kib("west").unwrap_or(0) as f64 / 1024.0;
        let watchers = start_watchers(&reader_kubeconfig, args.watchers).await?;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let with = apiserver_metrics(&west).await?;
        let rss_with = lab.apiserver_rss_kib("west").unwrap_or(0) as f64 / 1024.0;
        for t in &watchers {
            t.abort();
        }
        let watches =
            |m: &str| tunnelpeer_watches(m).map_or((String::from("none"), f64::NAN), |x| x);
        let (gauge, watches_before) = watches(&before);
        let (_, watches_with) = watches(&with);
        println!(
            "{p}: west apiserver RSS {rss_before:.0} MB -> {rss_with:.0} MB with {} watchers; TunnelPeer watches ({gauge}) {watches_before} -> {watches_with}",
            args.watchers
        );
        // 5. Delete them all.
        let t_del = Instant::now();
        let live = sims.live.len();
        sims.delete_oldest(live, &responder).await?;
        let removed_s = agent
            .wait_peers(REAL_PEERS, t_del, Duration::from_secs(300))
            .await
            .unwrap_or(f64::NAN);
        tokio::time::sleep(w.settle).await;
        let rss_after = agent.rss_mb()?;
        println!("{p}: all deleted, agent back to {REAL_PEERS} peers after {removed_s:.2} s");

        let rel = |a: f64, b: f64| if b > 0.0 { a / b } else { f64::NAN };
        let p99_ratio = rel(under_churn.probes.p99_ms, base.probes.p99_ms);
        let tcp_ratio = rel(under_churn.tcp_mbps, base.tcp_mbps);
        let lost_pct = rel(
            under_churn.probes.lost as f64 * 100.0,
            under_churn.probes.sent as f64,
        );
        let more: Vec<(String, f64, &str, Option<&str>)> = vec![
            (
                format!("{p}_programmed_s"),
                programmed_s,
                "s",
                (n == 1000).then_some("< 2 s"),
            ),
            (
                format!("{p}_idle_cpu_pct"),
                quiet.cpu_pct,
                "%",
                Some("< 1 %"),
            ),
            (format!("{p}_rss_mb"), quiet.rss_mb, "MB", Some("< 64 MB")),
            (format!("{p}_rss_after_delete_mb"), rss_after, "MB", None),
            (
                format!("{p}_status_writes_per_min"),
                quiet.status_writes_per_min,
                "/min",
                None,
            ),
            (
                format!("{p}_warn_lines_per_min"),
                quiet.warn_per_min,
                "/min",
                None,
            ),
            (
                format!("{p}_honest_p50_ms"),
                under_churn.probes.p50_ms,
                "ms",
                None,
            ),
            (
                format!("{p}_honest_p99_ms"),
                under_churn.probes.p99_ms,
                "ms",
                None,
            ),
            (format!("{p}_honest_lost_pct"), lost_pct, "%", None),
            (
                format!("{p}_honest_p99_ratio"),
                p99_ratio,
                "x",
                Some("<= 1.2"),
            ),
            (format!("{p}_tcp_ratio"), tcp_ratio, "x", Some(">= 0.95")),
            (
                format!("{p}_west_apiserver_rss_mb_{}_watchers", args.watchers),
                rss_with,
                "MB",
                None,
            ),
            (
                format!("{p}_west_apiserver_rss_mb_no_watchers"),
                rss_before,
                "MB",
                None,
            ),
            (
                format!("{p}_west_tunnelpeer_watches_{}_watchers", args.watchers),
                watches_with,
                "",
                None,
            ),
        ];
        figures.extend(more);
    }
    println!(
        "simulated peers' sockets: {} handshakes answered, {} packets to answering peers, {} to idle ones",
        responder.stats.handshakes_answered.load(Ordering::Relaxed),
        responder.stats.packets_in.load(Ordering::Relaxed),
        responder.stats.idle_packets_in.load(Ordering::Relaxed)
    );
    println!("bench ran {:.0} s", started.elapsed().as_secs_f64());
    for (name, v, unit, target) in &figures {
        figure(name, *v, unit, *target);
    }
    drop(responder);
    drop(lab);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sim_cidrs_are_distinct_28s_inside_west_outside_its_nodes() {
        let west: ipnet::Ipv4Net = "10.2.0.0/16".parse().unwrap_or_else(|e| panic!("{e}"));
        let nodes: ipnet::Ipv4Net = "10.2.0.0/20".parse().unwrap_or_else(|e| panic!("{e}"));
        let mut seen = std::collections::BTreeSet::new();
        for slot in 0..SIM_SLOTS {
            let c: ipnet::Ipv4Net = sim_cidr(slot).parse().unwrap_or_else(|e| panic!("{e}"));
            assert!(west.contains(&c) && !nodes.contains(&c), "{c}");
            assert!(seen.insert(c), "{c} twice");
        }
        assert_eq!(sim_cidr(SIM_SLOTS), sim_cidr(0));
    }

    #[test]
    fn status_writes_count_only_sdntunnel_status_writes() {
        let m = r#"# HELP apiserver_request_total x
apiserver_request_total{code="200",component="apiserver",dry_run="",group="sdntunnel.io",resource="tunnelpeers",scope="resource",subresource="status",verb="APPLY",version="v1alpha1"} 12
apiserver_request_total{code="200",component="apiserver",dry_run="",group="sdntunnel.io",resource="tunnelclusters",scope="resource",subresource="status",verb="PATCH",version="v1alpha1"} 3
apiserver_request_total{code="200",component="apiserver",dry_run="",group="sdntunnel.io",resource="tunnelpeers",scope="resource",subresource="status",verb="GET",version="v1alpha1"} 100
apiserver_request_total{code="200",component="apiserver",dry_run="",group="sdntunnel.io",resource="tunnelpeers",scope="resource",subresource="",verb="APPLY",version="v1alpha1"} 7
apiserver_request_total{code="201",component="apiserver",dry_run="",group="",resource="pods",scope="resource",subresource="status",verb="UPDATE",version="v1"} 9
"#;
        assert_eq!(status_writes(m), 15.0);
    }

    #[test]
    fn watches_read_from_the_gauge_this_apiserver_has() {
        let m = r#"apiserver_longrunning_gauge{component="apiserver",group="sdntunnel.io",resource="tunnelpeers",scope="cluster",subresource="",verb="WATCH",version="v1alpha1"} 50
apiserver_longrunning_gauge{component="apiserver",group="sdntunnel.io",resource="tunnelpeers",scope="namespace",subresource="",verb="WATCH",version="v1alpha1"} 3
apiserver_longrunning_gauge{component="apiserver",group="",resource="pods",scope="cluster",subresource="",verb="WATCH",version="v1"} 4
"#;
        assert_eq!(
            tunnelpeer_watches(m),
            Some(("apiserver_longrunning_gauge".to_string(), 53.0))
        );
        assert_eq!(tunnelpeer_watches("apiserver_request_total{} 1\n"), None);
    }

    #[test]
    fn warn_lines_are_recognised_with_and_without_colours() {
        assert!(is_warn(
            "2026-12-03T13:00:00.000000Z  WARN boringtun::noise: HANDSHAKE(REKEY_TIMEOUT)"
        ));
        assert!(is_warn(
            "\u{1b}[2m2026-12-03T13:00:00Z\u{1b}[0m \u{1b}[33m WARN\u{1b}[0m x: y"
        ));
        assert!(!is_warn(
            "2026-12-03T13:00:00Z  INFO x: WARN in the message"
        ));
    }
}
