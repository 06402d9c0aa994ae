//! `sdn-bench`: the data-path benchmark. For each implementation, in the
//! same run and interleaved round by round, it builds two network
//! namespaces on a veth pair, runs one tunnel process per side (tunnel MTU
//! 1420, configured with `wg set` through the UAPI socket, except the
//! bench-local runtime binary, which takes flags), and measures with iperf3
//! and sockperf: TCP 1 and 4 streams, UDP loss at 1 Gbit/s offered
//! (1372-byte datagrams), UDP ping-pong latency p50, the tunnels' CPU per
//! Gbit/s and their RSS under load. It prints medians, then
//! `RATIO <metric> ours/<other> = <x>` lines. It never judges the figures.
//!
//! Everything it creates carries its process id (namespaces `sdnb<pid>a/b`,
//! interfaces `wb<pid><n>a/b`) and is removed on exit, on failure and on
//! SIGINT/SIGTERM/SIGHUP.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use nix::sys::signal::{kill, SigSet, Signal};
use nix::unistd::Pid;
use sdn_tunnel_datapath::PrivateKey;

const UAPI_DIR: &str = "/var/run/wireguard";
const UNDERLAY: [&str; 2] = ["10.231.0.1", "10.231.0.2"];
const OVERLAY: [&str; 2] = ["10.232.0.1", "10.232.0.2"];
const WG_PORT: u16 = 51820;
const IPERF_PORT: u16 = 5201;
const SOCKPERF_PORT: u16 = 11111;
const TUNNEL_MTU: u32 = 1420;

#[derive(Debug, Parser)]
#[command(about = "Userspace WireGuard data-path benchmark (netns + veth, iperf3, sockperf)")]
struct Args {
    /// Rounds; each round measures every implementation once.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Seconds per measurement.
    #[arg(long, default_value_t = 10)]
    secs: u64,
    /// CI mode: one round of 2-second measurements.
    #[arg(long)]
    quick: bool,
    /// Only these implementations (comma-separated names as printed).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// The product binary (`tunnel-agent`, run as `tunnel-agent wg <iface>`).
    #[arg(long)]
    ours: Option<PathBuf>,
    /// The bench-local runtime binary (`sdn-bench-tunnel`).
    #[arg(long)]
    ours_runtime: Option<PathBuf>,
    /// Root of `cargo install --root` holding boringtun-cli and gotatun.
    #[arg(long)]
    tools_root: Option<PathBuf>,
    /// Upstream wireguard-go with offloads.
    #[arg(long)]
    wireguard_go_upstream: Option<PathBuf>,
    /// Worker counts for the bench-local runtime, one row each
    /// (`ours-runtime-w<n>`; the default `0` is one row `ours-runtime`
    /// with the runtime's own choice).
    #[arg(long, value_delimiter = ',', default_value = "0")]
    workers: Vec<usize>,
    /// Keep the logs of the tunnel processes here.
    #[arg(long)]
    log_dir: Option<PathBuf>,
}

/// How an implementation is started and configured.
#[derive(Clone, Debug)]
enum Kind {
    /// No tunnel: iperf3 straight over the veth pair.
    Veth,
    /// A process `argv… <iface>` configured with `wg set` over UAPI.
    Uapi {
        argv: Vec<String>,
        env: Vec<(String, String)>,
    },
    /// The bench-local runtime binary, configured with flags.
    Static { bin: PathBuf, workers: usize },
}

#[derive(Clone, Debug)]
struct Impl {
    name: String,
    kind: Kind,
}

/// Figures of one implementation in one round (NaN: not measured).
#[derive(Clone, Copy, Debug)]
struct Sample {
    tcp1: f64,
    tcp4: f64,
    udp_loss: f64,
    /// Of the UDP test's datagrams, % dropped at the receiving
    /// application's socket (its buffer full: iperf3 did not read in time).
    udp_drop_app: f64,
    /// % dropped inside the tunnel: its UDP socket's buffer, its TUN queues.
    udp_drop_tunnel: f64,
    /// The TUN queues' part of `udp_drop_tunnel`.
    udp_drop_tun: f64,
    udp_gbps: f64,
    lat_p50: f64,
    gbps_per_core: f64,
    cpu_cores: f64,
    rss_mb: f64,
}

impl Default for Sample {
    fn default() -> Self {
        Sample {
            tcp1: f64::NAN,
            tcp4: f64::NAN,
            udp_loss: f64::NAN,
            udp_drop_app: f64::NAN,
            udp_drop_tunnel: f64::NAN,
            udp_drop_tun: f64::NAN,
            udp_gbps: f64::NAN,
            lat_p50: f64::NAN,
            gbps_per_core: f64::NAN,
            cpu_cores: f64::NAN,
            rss_mb: f64::NAN,
        }
    }
}

/// Everything the bench created, for cleanup from any path (normal end,
/// error, panic, signal).
#[derive(Default)]
struct Registry {
    namespaces: Vec<String>,
    pids: Vec<i32>,
    sockets: Vec<PathBuf>,
}

static REGISTRY: Mutex<Registry> = Mutex::new(Registry {
    namespaces: Vec::new(),
    pids: Vec::new(),
    sockets: Vec::new(),
});

fn registry() -> std::sync::MutexGuard<'static, Registry> {
    REGISTRY.lock().unwrap_or_else(|e| e.into_inner())
}

fn kill_pid(pid: i32) {
    let p = Pid::from_raw(pid);
    if kill(p, Signal::SIGTERM).is_err() {
        return;
    }
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        if !Path::new(&format!("/proc/{pid}")).exists() || is_zombie(pid) {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = kill(p, Signal::SIGKILL);
}

fn is_zombie(pid: i32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, r)| r.trim_start().starts_with('Z'))
        })
        .unwrap_or(true)
}

/// Kills every process we started and every process left in our
/// namespaces, deletes the namespaces (and with them the veth pair and
/// TUNs) and stale UAPI sockets of our interfaces.
fn cleanup() {
    let (pids, namespaces, sockets) = {
        let mut r = registry();
        (
            std::mem::take(&mut r.pids),
            std::mem::take(&mut r.namespaces),
            std::mem::take(&mut r.sockets),
        )
    };
    for pid in pids.into_iter().rev() {
        kill_pid(pid);
    }
    for ns in &namespaces {
        if let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() {
            for pid in String::from_utf8_lossy(&out.stdout)
                .split_whitespace()
                .filter_map(|p| p.parse::<i32>().ok())
            {
                kill_pid(pid);
            }
        }
        let _ = Command::new("ip")
            .args(["netns", "del", ns])
            .stderr(Stdio::null())
            .status();
    }
    for s in sockets {
        let _ = fs::remove_file(s);
    }
}

struct CleanupOnDrop;

impl Drop for CleanupOnDrop {
    fn drop(&mut self) {
        cleanup();
    }
}

fn sh(args: &[&str]) -> Result<String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {}", args[0]))?;
    if !out.status.success() {
        bail!(
            "{} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn netns_cmd(ns: &str, argv: &[&str]) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns]).args(argv);
    c.stdin(Stdio::null());
    c
}

/// A child process registered for cleanup.
fn spawn(mut c: Command, log: Option<&Path>) -> Result<Child> {
    match log {
        Some(p) => {
            let f = fs::File::create(p)?;
            c.stdout(f.try_clone()?).stderr(f);
        }
        None => {
            c.stdout(Stdio::null()).stderr(Stdio::null());
        }
    }
    let child = c.spawn().context("spawning")?;
    registry().pids.push(child.id() as i32);
    Ok(child)
}

fn stop_child(mut child: Child) {
    let pid = child.id() as i32;
    kill_pid(pid);
    let _ = child.wait();
    registry().pids.retain(|p| *p != pid);
}

/// Two namespaces on a veth pair, underlay addresses, MTU 1500.
struct Env {
    ns: [String; 2],
}

impl Env {
    fn new(tag: u32) -> Result<Env> {
        let pid = std::process::id();
        let ns = [format!("sdnb{pid}{tag}a"), format!("sdnb{pid}{tag}b")];
        for n in &ns {
            registry().namespaces.push(n.clone());
            sh(&["ip", "netns", "add", n])?;
            sh(&["ip", "-n", n, "link", "set", "lo", "up"])?;
        }
        let (va, vb) = (format!("sbv{pid}a"), format!("sbv{pid}b"));
        sh(&[
            "ip", "-n", &ns[0], "link", "add", &va, "mtu", "1500", "type", "veth", "peer", "name",
            &vb, "netns", &ns[1],
        ])?;
        sh(&["ip", "-n", &ns[1], "link", "set", &vb, "mtu", "1500"])?;
        for (i, v) in [&va, &vb].into_iter().enumerate() {
            let cidr = format!("{}/24", UNDERLAY[i]);
            sh(&["ip", "-n", &ns[i], "addr", "add", &cidr, "dev", v])?;
            sh(&["ip", "-n", &ns[i], "link", "set", v, "up"])?;
        }
        Ok(Env { ns })
    }

    fn destroy(self) {
        for n in &self.ns {
            if let Ok(out) = Command::new("ip").args(["netns", "pids", n]).output() {
                for pid in String::from_utf8_lossy(&out.stdout)
                    .split_whitespace()
                    .filter_map(|p| p.parse::<i32>().ok())
                {
                    kill_pid(pid);
                }
            }
            let _ = sh(&["ip", "netns", "del", n]);
            registry().namespaces.retain(|x| x != n);
        }
    }
}

/// The tunnel processes of one implementation, one per side.
struct Tunnels {
    children: Vec<Child>,
    ifaces: [String; 2],
}

impl Tunnels {
    fn pids(&self) -> Vec<i32> {
        self.children.iter().map(|c| c.id() as i32).collect()
    }

    fn stop(self) {
        for c in self.children {
            stop_child(c);
        }
        for i in &self.ifaces {
            let s = PathBuf::from(format!("{UAPI_DIR}/{i}.sock"));
            let _ = fs::remove_file(&s);
            registry().sockets.retain(|x| x != &s);
        }
    }
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("timed out waiting for {what}")
}

fn start_tunnels(
    imp: &Impl,
    idx: usize,
    env: &Env,
    keydir: &Path,
    log_dir: &Path,
) -> Result<Option<Tunnels>> {
    let pid = std::process::id();
    let ifaces = [format!("wb{pid}{idx}a"), format!("wb{pid}{idx}b")];
    let keys = [PrivateKey::generate(), PrivateKey::generate()];
    let mut key_files = Vec::new();
    for (i, k) in keys.iter().enumerate() {
        let p = keydir.join(format!("key{i}"));
        fs::write(&p, format!("{}\n", k.to_base64().as_str()))?;
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&p, fs::Permissions::from_mode(0o600))?;
        key_files.push(p);
    }
    let mut children = Vec::new();
    match &imp.kind {
        Kind::Veth => return Ok(None),
        Kind::Uapi { argv, env: vars } => {
            for (i, iface) in ifaces.iter().enumerate() {
                let sock = PathBuf::from(format!("{UAPI_DIR}/{iface}.sock"));
                registry().sockets.push(sock.clone());
                let mut full: Vec<&str> = argv.iter().map(String::as_str).collect();
                full.push(iface);
                let mut c = netns_cmd(&env.ns[i], &full);
                for (k, v) in vars {
                    c.env(k, v);
                }
                let log = log_dir.join(format!("{}-{}.log", imp.name, i));
                children.push(spawn(c, Some(&log))?);
                let child = children.last_mut().context("child")?;
                wait_for(
                    &format!("{}", sock.display()),
                    Duration::from_secs(15),
                    || sock.exists() || matches!(child.try_wait(), Ok(Some(_))),
                )?;
                if let Ok(Some(st)) = child.try_wait() {
                    bail!(
                        "{} exited ({st}) before its UAPI socket appeared; see {}",
                        imp.name,
                        log.display()
                    );
                }
            }
            for i in 0..2 {
                let o = 1 - i;
                let peer = keys[o].public_key().to_base64();
                let allowed = format!("{}/32", OVERLAY[o]);
                let endpoint = format!("{}:{WG_PORT}", UNDERLAY[o]);
                let port = WG_PORT.to_string();
                let key_file = key_files[i].to_string_lossy().into_owned();
                sh(&[
                    "wg",
                    "set",
                    &ifaces[i],
                    "listen-port",
                    &port,
                    "private-key",
                    &key_file,
                    "peer",
                    &peer,
                    "allowed-ips",
                    &allowed,
                    "endpoint",
                    &endpoint,
                ])
                .with_context(|| format!("configuring {}", imp.name))?;
            }
        }
        Kind::Static { bin, workers } => {
            for i in 0..2 {
                let o = 1 - i;
                let peer = keys[o].public_key().to_base64();
                let allowed = format!("{}/32", OVERLAY[o]);
                let endpoint = format!("{}:{WG_PORT}", UNDERLAY[o]);
                let listen = format!("{}:{WG_PORT}", UNDERLAY[i]);
                let key_file = key_files[i].to_string_lossy().into_owned();
                let bin = bin.to_string_lossy().into_owned();
                let workers = workers.to_string();
                let c = netns_cmd(
                    &env.ns[i],
                    &[
                        &bin,
                        "--iface",
                        &ifaces[i],
                        "--listen",
                        &listen,
                        "--private-key-file",
                        &key_file,
                        "--peer",
                        &peer,
                        "--endpoint",
                        &endpoint,
                        "--allowed-ip",
                        &allowed,
                        "--workers",
                        &workers,
                    ],
                );
                let log = log_dir.join(format!("{}-{}.log", imp.name, i));
                children.push(spawn(c, Some(&log))?);
                let ns = env.ns[i].clone();
                let iface = ifaces[i].clone();
                let child = children.last_mut().context("child")?;
                wait_for(&format!("{iface} in {ns}"), Duration::from_secs(15), || {
                    sh(&["ip", "-n", &ns, "link", "show", &iface]).is_ok()
                        || matches!(child.try_wait(), Ok(Some(_)))
                })?;
                if let Ok(Some(st)) = child.try_wait() {
                    bail!("{} exited ({st}); see {}", imp.name, log.display());
                }
            }
        }
    }
    for i in 0..2 {
        let cidr = format!("{}/24", OVERLAY[i]);
        let mtu = TUNNEL_MTU.to_string();
        sh(&[
            "ip", "-n", &env.ns[i], "addr", "add", &cidr, "dev", &ifaces[i],
        ])?;
        sh(&[
            "ip", "-n", &env.ns[i], "link", "set", &ifaces[i], "mtu", &mtu, "up",
        ])?;
    }
    let t = Tunnels { children, ifaces };
    // Up when a ping crosses (the first one waits for the handshake).
    let up = (0..20).any(|_| {
        netns_cmd(
            &env.ns[0],
            &["ping", "-c", "1", "-W", "1", "-q", OVERLAY[1]],
        )
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
    });
    if !up {
        t.stop();
        bail!("{}: no ping through the tunnel", imp.name);
    }
    Ok(Some(t))
}

/// CPU seconds (user + system, all threads) of a process.
fn cpu_secs(pid: i32) -> f64 {
    let tck = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64;
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| stat_cpu_ticks(&s))
        .map_or(f64::NAN, |t| t / tck)
}

/// utime + stime (fields 14 and 15) of a `/proc/<pid>/stat` line, in
/// clock ticks. The command (field 2) may hold spaces and parentheses.
fn stat_cpu_ticks(stat: &str) -> Option<f64> {
    let (_, rest) = stat.rsplit_once(')')?;
    // `rest` starts with field 3 (the state).
    let f: Vec<&str> = rest.split_whitespace().collect();
    let get = |i: usize| f.get(i - 3).and_then(|v| v.parse::<f64>().ok());
    Some(get(14)? + get(15)?)
}

/// sockperf's median latency (µs) from its `percentile 50.000 = x` line.
fn sockperf_p50(out: &str) -> Option<f64> {
    out.lines()
        .find(|l| l.contains("percentile 50.000"))
        .and_then(|l| l.rsplit('=').next())
        .and_then(|v| v.trim().parse::<f64>().ok())
}

fn rss_kb(pid: i32) -> f64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<f64>().ok())
        })
        .unwrap_or(f64::NAN)
}

/// Runs `c` while sampling the tunnels' RSS; returns its stdout, the wall
/// time, the tunnels' CPU seconds and the largest RSS sum seen (kB).
fn measured(c: &mut Command, pids: &[i32]) -> Result<(String, f64, f64, f64)> {
    let cpu0: f64 = pids.iter().map(|p| cpu_secs(*p)).sum();
    let stop = Arc::new(AtomicBool::new(false));
    let peak = Arc::new(Mutex::new(0f64));
    let sampler = {
        let (stop, peak, pids) = (stop.clone(), peak.clone(), pids.to_vec());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let sum: f64 = pids.iter().map(|p| rss_kb(*p)).sum();
                let mut p = peak.lock().unwrap_or_else(|e| e.into_inner());
                if sum > *p {
                    *p = sum;
                }
                drop(p);
                std::thread::sleep(Duration::from_millis(200));
            }
        })
    };
    let t0 = Instant::now();
    let out = c.stderr(Stdio::piped()).stdout(Stdio::piped()).output();
    let wall = t0.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let _ = sampler.join();
    let cpu1: f64 = pids.iter().map(|p| cpu_secs(*p)).sum();
    let out = out.context("running the client")?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!(
            "client failed: {} {}",
            stdout.lines().take(5).collect::<Vec<_>>().join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let peak = *peak.lock().unwrap_or_else(|e| e.into_inner());
    Ok((stdout, wall, cpu1 - cpu0, peak))
}

fn iperf_json(stdout: &str) -> Result<serde_json::Value> {
    let v: serde_json::Value = serde_json::from_str(stdout).context("iperf3 JSON")?;
    if let Some(e) = v.get("error").and_then(|e| e.as_str()) {
        bail!("iperf3: {e}");
    }
    Ok(v)
}

/// Receive-buffer drops of every UDP socket in `ns` (IPv4 and IPv6 MIBs).
fn rcvbuf_errors(ns: &str) -> Result<u64> {
    let mut total = 0;
    for (file, key) in [
        ("/proc/net/snmp", "RcvbufErrors"),
        ("/proc/net/snmp6", "Udp6RcvbufErrors"),
    ] {
        let text = sh(&["ip", "netns", "exec", ns, "cat", file])?;
        if file.ends_with("snmp6") {
            total += text
                .lines()
                .filter_map(|l| l.split_once(char::is_whitespace))
                .find(|(k, _)| *k == key)
                .and_then(|(_, v)| v.trim().parse::<u64>().ok())
                .unwrap_or(0);
        } else {
            // "Udp: InDatagrams ... RcvbufErrors ..." then "Udp: <values>".
            let rows: Vec<&str> = text.lines().filter(|l| l.starts_with("Udp:")).collect();
            if let [names, values, ..] = rows.as_slice() {
                if let Some(i) = names.split_whitespace().position(|n| n == key) {
                    total += values
                        .split_whitespace()
                        .nth(i)
                        .and_then(|v| v.parse::<u64>().ok())
                        .unwrap_or(0);
                }
            }
        }
    }
    Ok(total)
}

/// Drops counted on the UDP sockets bound to `port` in `ns` (the last
/// column of /proc/net/udp{,6}): the tunnel's own receive socket(s).
fn socket_drops(ns: &str, port: u16) -> Result<u64> {
    let want = format!(":{port:04X}");
    let mut total = 0;
    for file in ["/proc/net/udp", "/proc/net/udp6"] {
        let text = sh(&["ip", "netns", "exec", ns, "cat", file])?;
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            if cols.get(1).is_some_and(|local| local.ends_with(&want)) {
                total += cols.last().and_then(|d| d.parse::<u64>().ok()).unwrap_or(0);
            }
        }
    }
    Ok(total)
}

/// Packets a TUN device dropped (its queue towards the tunnel process full,
/// or refused on write), from `ip -s -j link`.
fn link_drops(ns: &str, iface: &str) -> Result<u64> {
    let out = sh(&["ip", "-n", ns, "-s", "-j", "link", "show", "dev", iface])?;
    let v: serde_json::Value = serde_json::from_str(&out).context("ip -j link")?;
    let st = &v[0]["stats64"];
    Ok(["rx", "tx"]
        .iter()
        .filter_map(|d| st[*d]["dropped"].as_u64())
        .sum())
}

/// The receiving side's drop counters: (every UDP socket's buffer drops,
/// the tunnel's sockets' drops, both TUN devices' drops).
fn drop_counters(ns: &[String; 2], ifaces: &[String]) -> Result<(u64, u64, u64)> {
    let all = rcvbuf_errors(&ns[1])?;
    let (mut tunnel_socket, mut tun) = (0, 0);
    if ifaces.len() == 2 {
        tunnel_socket = socket_drops(&ns[1], WG_PORT)?;
        for (n, i) in ns.iter().zip(ifaces) {
            tun += link_drops(n, i)?;
        }
    }
    Ok((all, tunnel_socket, tun))
}

fn measure(
    ns: &[String; 2],
    target: &str,
    pids: &[i32],
    ifaces: &[String],
    secs: u64,
) -> Result<Sample> {
    let mut s = Sample::default();
    let t = secs.to_string();
    let port = IPERF_PORT.to_string();
    let mut rss_peak: f64 = 0.0;
    let tunnel = !pids.is_empty();

    // TCP, one stream (CPU per Gbit/s from this one).
    let mut c = netns_cmd(
        &ns[0],
        &["iperf3", "-c", target, "-p", &port, "-t", &t, "-J"],
    );
    match measured(&mut c, pids)
        .and_then(|(o, wall, cpu, rss)| Ok((iperf_json(&o)?, wall, cpu, rss)))
    {
        Ok((v, wall, cpu, rss)) => {
            s.tcp1 = v["end"]["sum_received"]["bits_per_second"]
                .as_f64()
                .unwrap_or(f64::NAN)
                / 1e9;
            if tunnel {
                s.cpu_cores = cpu / wall;
                s.gbps_per_core = s.tcp1 / s.cpu_cores;
                rss_peak = rss_peak.max(rss);
            }
        }
        Err(e) => eprintln!("  tcp1: {e:#}"),
    }
    // TCP, four streams.
    let mut c = netns_cmd(
        &ns[0],
        &[
            "iperf3", "-c", target, "-p", &port, "-t", &t, "-P", "4", "-J",
        ],
    );
    match measured(&mut c, pids).and_then(|(o, _, _, rss)| Ok((iperf_json(&o)?, rss))) {
        Ok((v, rss)) => {
            s.tcp4 = v["end"]["sum_received"]["bits_per_second"]
                .as_f64()
                .unwrap_or(f64::NAN)
                / 1e9;
            rss_peak = rss_peak.max(rss);
        }
        Err(e) => eprintln!("  tcp4: {e:#}"),
    }
    // UDP at 1 Gbit/s offered, 1372-byte datagrams.
    let mut c = netns_cmd(
        &ns[0],
        &[
            "iperf3", "-c", target, "-p", &port, "-t", &t, "-u", "-b", "1G", "-l", "1372", "-J",
        ],
    );
    let drops_before = drop_counters(ns, ifaces);
    match measured(&mut c, pids).and_then(|(o, _, _, rss)| Ok((iperf_json(&o)?, rss))) {
        Ok((v, rss)) => {
            let sum = &v["end"]["sum"];
            s.udp_loss = sum["lost_percent"].as_f64().unwrap_or(f64::NAN);
            let lost = sum["lost_packets"].as_f64().unwrap_or(f64::NAN);
            let packets = sum["packets"].as_f64().unwrap_or(f64::NAN);
            // Where the lost datagrams went (the tunnel's socket shares the
            // receiving namespace with iperf3's, so its drops are taken out
            // of the namespace's total).
            if let (Ok((all0, sock0, tun0)), Ok((all1, sock1, tun1))) =
                (&drops_before, drop_counters(ns, ifaces))
            {
                let tunnel_socket = sock1.saturating_sub(*sock0);
                let app = all1.saturating_sub(*all0).saturating_sub(tunnel_socket);
                let tun = tun1.saturating_sub(*tun0);
                if packets > 0.0 {
                    s.udp_drop_app = app as f64 * 100.0 / packets;
                    s.udp_drop_tunnel = (tunnel_socket + tun) as f64 * 100.0 / packets;
                    s.udp_drop_tun = tun as f64 * 100.0 / packets;
                }
            }
            let bps = sum["bits_per_second"].as_f64().unwrap_or(f64::NAN);
            s.udp_gbps = if packets > 0.0 {
                bps * (packets - lost) / packets / 1e9
            } else {
                f64::NAN
            };
            rss_peak = rss_peak.max(rss);
        }
        Err(e) => eprintln!("  udp: {e:#}"),
    }
    // Ping-pong latency (sockperf's figure: half the round trip).
    let sp = SOCKPERF_PORT.to_string();
    let mut c = netns_cmd(
        &ns[0],
        &[
            "sockperf",
            "ping-pong",
            "-i",
            target,
            "-p",
            &sp,
            "-t",
            &t,
            "--msg-size",
            "64",
        ],
    );
    match measured(&mut c, pids) {
        Ok((o, _, _, _)) => {
            s.lat_p50 = sockperf_p50(&o).unwrap_or(f64::NAN);
        }
        Err(e) => eprintln!("  latency: {e:#}"),
    }
    if tunnel {
        s.rss_mb = rss_peak / 1024.0;
    }
    Ok(s)
}

fn round_one(imp: &Impl, idx: usize, secs: u64, keydir: &Path, log_dir: &Path) -> Result<Sample> {
    let env = Env::new(idx as u32)?;
    let result = (|| {
        let tunnels = start_tunnels(imp, idx, &env, keydir, log_dir)?;
        let (target, pids, ifaces) = match &tunnels {
            Some(t) => (OVERLAY[1], t.pids(), t.ifaces.to_vec()),
            None => (UNDERLAY[1], Vec::new(), Vec::new()),
        };
        let port = IPERF_PORT.to_string();
        let server = spawn(netns_cmd(&env.ns[1], &["iperf3", "-s", "-p", &port]), None)?;
        let sp = SOCKPERF_PORT.to_string();
        let sock = spawn(
            netns_cmd(&env.ns[1], &["sockperf", "server", "-i", target, "-p", &sp]),
            None,
        )?;
        // Let the servers bind.
        let iperf_up = wait_for("iperf3 server", Duration::from_secs(5), || {
            sh(&[
                "ip",
                "netns",
                "exec",
                &env.ns[1],
                "ss",
                "-Htln",
                "sport",
                "=",
                &format!(":{port}"),
            ])
            .is_ok_and(|o| !o.trim().is_empty())
        });
        std::thread::sleep(Duration::from_millis(300));
        let s = iperf_up.and_then(|_| measure(&env.ns, target, &pids, &ifaces, secs));
        stop_child(server);
        stop_child(sock);
        if let Some(t) = tunnels {
            t.stop();
        }
        s
    })();
    env.destroy();
    result
}

fn median(v: &[f64]) -> f64 {
    let mut v: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn fmt(x: f64, prec: usize) -> String {
    if x.is_finite() {
        format!("{x:.prec$}")
    } else {
        "—".into()
    }
}

fn main() -> Result<()> {
    let mut args = Args::parse();
    if args.quick {
        args.runs = 1;
        args.secs = 2;
    }
    anyhow::ensure!(
        args.runs > 0 && args.secs > 0,
        "--runs and --secs must be positive"
    );
    anyhow::ensure!(
        nix::unistd::geteuid().is_root(),
        "the bench needs root (network namespaces, TUN devices)"
    );
    for tool in ["ip", "iperf3", "sockperf", "wg", "ping", "ss"] {
        anyhow::ensure!(
            Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .stdout(Stdio::null())
                .status()?
                .success(),
            "{tool} is missing (apt-get install iproute2 iperf3 sockperf wireguard-tools iputils-ping)"
        );
    }
    // Signals: blocked here, before any thread exists, and taken by one
    // thread that cleans up and exits. Children start with an empty mask.
    let mut signals = SigSet::empty();
    for s in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        signals.add(s);
    }
    signals.thread_block()?;
    std::thread::spawn(move || {
        if let Ok(sig) = signals.wait() {
            eprintln!("\nsdn-bench: {sig}: cleaning up");
            cleanup();
            std::process::exit(130);
        }
    });
    let _cleanup = CleanupOnDrop;

    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("workspace root")?
        .to_path_buf();
    let tools = args
        .tools_root
        .clone()
        .unwrap_or_else(|| root.join("target/bench-tools"));
    let upstream = args
        .wireguard_go_upstream
        .clone()
        .unwrap_or_else(|| root.join("../shared/tools/wireguard-go-upstream"));
    let ours = args
        .ours
        .clone()
        .unwrap_or_else(|| root.join("target/release/tunnel-agent"));
    let ours_runtime = args.ours_runtime.clone().unwrap_or_else(|| {
        std::env::current_exe()
            .ok()
            .and_then(|p| p.parent().map(|d| d.join("sdn-bench-tunnel")))
            .unwrap_or_else(|| root.join("target/release/sdn-bench-tunnel"))
    });

    let s = |x: &str| x.to_string();
    let go_env = vec![(s("WG_PROCESS_FOREGROUND"), s("1"))];
    let mut candidates: Vec<(Impl, Option<String>)> = vec![(
        Impl {
            name: s("veth"),
            kind: Kind::Veth,
        },
        None,
    )];
    let exists = |p: &Path| p.is_file();
    let mut add =
        |name: &str, bin: &Path, argv: Vec<String>, env: Vec<(String, String)>, why: String| {
            let missing = (!exists(bin)).then_some(why);
            let mut full = vec![bin.to_string_lossy().into_owned()];
            full.extend(argv);
            candidates.push((
                Impl {
                    name: name.into(),
                    kind: Kind::Uapi { argv: full, env },
                },
                missing,
            ));
        };
    add(
        "wireguard-go-upstream",
        &upstream,
        vec![s("-f")],
        go_env.clone(),
        format!("{} is absent", upstream.display()),
    );
    add(
        "wireguard-go",
        Path::new("/usr/bin/wireguard-go"),
        vec![s("-f")],
        go_env,
        s("Debian's wireguard-go is not installed (apt-get install wireguard-go)"),
    );
    let bt = tools.join("bin/boringtun-cli");
    let why_bt = format!(
        "{} is absent (cargo install --root {} boringtun-cli)",
        bt.display(),
        tools.display()
    );
    let bt_args = |threads: Option<&str>| {
        let mut v = vec![
            s("-f"),
            s("--disable-drop-privileges"),
            s("-l"),
            s("/dev/null"),
        ];
        if let Some(t) = threads {
            v.extend([s("--threads"), s(t)]);
        }
        v
    };
    add("boringtun-cli", &bt, bt_args(None), vec![], why_bt.clone());
    add("boringtun-cli-t1", &bt, bt_args(Some("1")), vec![], why_bt);
    let gt = tools.join("bin/gotatun");
    add(
        "gotatun",
        &gt,
        vec![
            s("-f"),
            s("--disable-drop-privileges"),
            s("-l"),
            s("/dev/null"),
        ],
        vec![],
        format!(
            "{} is absent (cargo install --root {} gotatun-cli)",
            gt.display(),
            tools.display()
        ),
    );
    // The product: only when it has the standalone `wg` mode.
    let has_wg_mode = exists(&ours)
        && Command::new(&ours)
            .args(["wg", "--help"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
    candidates.push((
        Impl {
            name: s("ours"),
            kind: Kind::Uapi {
                argv: vec![ours.to_string_lossy().into_owned(), s("wg"), s("-f")],
                env: vec![],
            },
        },
        (!has_wg_mode).then(|| {
            format!(
                "{} is absent or has no `wg` mode (cargo build --release -p sdn-tunnel-agent)",
                ours.display()
            )
        }),
    ));
    for &w in &args.workers {
        let name = match (w, args.workers.len()) {
            (0, 1) => s("ours-runtime"),
            (w, _) => format!("ours-runtime-w{w}"),
        };
        candidates.push((
            Impl {
                name,
                kind: Kind::Static {
                    bin: ours_runtime.clone(),
                    workers: w,
                },
            },
            (!exists(&ours_runtime)).then(|| format!("{} is absent", ours_runtime.display())),
        ));
    }

    let mut impls = Vec::new();
    for (imp, missing) in candidates {
        if !args.only.is_empty() && !args.only.contains(&imp.name) {
            continue;
        }
        match missing {
            Some(why) => println!("NOTE skipping {}: {why}", imp.name),
            None => impls.push(imp),
        }
    }
    anyhow::ensure!(!impls.is_empty(), "nothing to measure");

    let work = std::env::temp_dir().join(format!("sdn-bench-{}", std::process::id()));
    fs::create_dir_all(&work)?;
    let log_dir = args.log_dir.clone().unwrap_or_else(|| work.join("logs"));
    fs::create_dir_all(&log_dir)?;
    println!(
        "sdn-bench: {} round(s) × {} s per measurement, tunnel MTU {TUNNEL_MTU}, {} CPUs, kernel {}",
        args.runs,
        args.secs,
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        sh(&["uname", "-r"]).unwrap_or_default().trim()
    );
    println!(
        "implementations: {}",
        impls
            .iter()
            .map(|i| i.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );

    let mut samples: BTreeMap<String, Vec<Sample>> = BTreeMap::new();
    for round in 1..=args.runs {
        for (idx, imp) in impls.iter().enumerate() {
            print!("round {round}/{} {:<22} ", args.runs, imp.name);
            let _ = std::io::stdout().flush();
            let keydir = work.join(format!("keys-{idx}"));
            fs::create_dir_all(&keydir)?;
            match round_one(imp, idx, args.secs, &keydir, &log_dir) {
                Ok(s) => {
                    println!(
                        "tcp1 {} Gbit/s, tcp4 {}, udp loss {} % (at the app's socket {}, in the tunnel {} of which TUN {}), p50 {} µs, {} Gbit/s/core, rss {} MB",
                        fmt(s.tcp1, 2),
                        fmt(s.tcp4, 2),
                        fmt(s.udp_loss, 2),
                        fmt(s.udp_drop_app, 2),
                        fmt(s.udp_drop_tunnel, 2),
                        fmt(s.udp_drop_tun, 2),
                        fmt(s.lat_p50, 1),
                        fmt(s.gbps_per_core, 2),
                        fmt(s.rss_mb, 1)
                    );
                    samples.entry(imp.name.clone()).or_default().push(s);
                }
                Err(e) => println!("FAILED: {e:#}"),
            }
        }
    }
    let _ = fs::remove_dir_all(work.join("keys-0"));

    // Medians.
    let med = |name: &str, f: fn(&Sample) -> f64| -> f64 {
        samples
            .get(name)
            .map(|v| median(&v.iter().map(f).collect::<Vec<_>>()))
            .unwrap_or(f64::NAN)
    };
    type Metric = (&'static str, &'static str, fn(&Sample) -> f64, usize);
    let metrics: [Metric; 10] = [
        ("tcp1", "TCP 1 stream Gbit/s", |s| s.tcp1, 2),
        ("tcp4", "TCP 4 streams Gbit/s", |s| s.tcp4, 2),
        ("udp_loss", "UDP 1G loss %", |s| s.udp_loss, 2),
        (
            "udp_drop_app",
            "of which at the receiving app's socket %",
            |s| s.udp_drop_app,
            2,
        ),
        (
            "udp_drop_tunnel",
            "of which in the tunnel (its socket, TUN queues) %",
            |s| s.udp_drop_tunnel,
            2,
        ),
        ("udp_gbps", "UDP 1G delivered Gbit/s", |s| s.udp_gbps, 3),
        ("latency_p50", "ping-pong p50 µs", |s| s.lat_p50, 1),
        (
            "gbps_per_core",
            "TCP1 Gbit/s per tunnel core",
            |s| s.gbps_per_core,
            2,
        ),
        (
            "cpu_cores",
            "tunnel CPU during TCP1 (cores)",
            |s| s.cpu_cores,
            2,
        ),
        ("rss_mb", "RSS under load, both ends MB", |s| s.rss_mb, 1),
    ];
    println!();
    print!("| implementation |");
    for (_, title, _, _) in &metrics {
        print!(" {title} |");
    }
    println!();
    print!("|---|");
    for _ in &metrics {
        print!("---|");
    }
    println!();
    for imp in &impls {
        print!("| {} |", imp.name);
        for (_, _, f, p) in &metrics {
            print!(" {} |", fmt(med(&imp.name, *f), *p));
        }
        println!();
    }
    println!();
    let ours_rows: Vec<&str> = impls
        .iter()
        .map(|i| i.name.as_str())
        .filter(|n| n.starts_with("ours"))
        .collect();
    for ours in ours_rows {
        if !samples.contains_key(ours) {
            continue;
        }
        for other in impls.iter().map(|i| i.name.as_str()) {
            if other == "veth" || other.starts_with("ours") {
                continue;
            }
            for (key, _, f, _) in &metrics {
                // Drop shares are mostly zero: a ratio of them says nothing.
                if matches!(*key, "cpu_cores" | "udp_drop_app" | "udp_drop_tunnel") {
                    continue;
                }
                let r = med(ours, *f) / med(other, *f);
                println!("RATIO {key} {ours}/{other} = {}", fmt(r, 2));
            }
        }
    }
    println!("\nlogs of the tunnel processes: {}", log_dir.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_skips_missing_samples() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
        assert_eq!(median(&[f64::NAN, 5.0, 1.0]), 3.0);
        assert!(median(&[f64::NAN]).is_nan());
    }

    #[test]
    fn cpu_ticks_from_proc_stat() {
        // A command with a space and a parenthesis; utime 250, stime 31.
        let line =
            "4242 (wg (go) x) S 1 4242 4242 0 -1 4194560 1234 0 0 0 250 31 0 0 20 0 9 0 100 0 0";
        assert_eq!(stat_cpu_ticks(line), Some(281.0));
        assert_eq!(stat_cpu_ticks("garbage"), None);
    }

    #[test]
    fn sockperf_median_line() {
        let out = "sockperf: ====> avg-latency=30.120 (std-dev=3.2)\n\
                   sockperf: ---> percentile 99.000 =   41.870\n\
                   sockperf: ---> percentile 50.000 =   29.633\n";
        assert_eq!(sockperf_p50(out), Some(29.633));
        assert_eq!(sockperf_p50("no figures"), None);
    }
}
