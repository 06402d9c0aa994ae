//! Service proxy and DNS benchmark (not a test; never asserts timings).
//!
//! In two network namespaces of its own (`sdnb-<pid>-c`, the client side
//! where the proxy is programmed, and `sdnb-<pid>-s`, the endpoints' side,
//! joined by a veth pair), it programs 10, 1 000 and 10 000 remote
//! Services × 10 endpoints with the real [`ProxyDriver`], times each full
//! programming and one endpoint change, and measures the TCP connect
//! latency through one service's frontend at each size. Then it serves
//! 1 000 services' records from the in-process DNS server (the same
//! handler `tunnel-agent dns` uses) in the client namespace and measures
//! queries per second and p99 latency with a closed-loop UDP load
//! generator, plus `dnsperf` when installed. Output ends with
//! `FIGURE <name> = <value> <unit>` lines. The namespaces are removed on
//! exit, on failure and on Ctrl-C.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use nix::sched::{setns, CloneFlags};
use sdn_tunnel_agent::dns::{bind, build_catalog, DnsHandler};
use sdn_tunnel_agent::drivers::proxy::{ProxyDriver, Rendered};
use sdn_tunnel_core::dns::{DnsRecords, RecordData, Zone};
use sdn_tunnel_core::services::{Affinity, Frontend, Protocol, ProxiedService, ProxyState};

#[derive(Debug, Parser)]
struct Args {
    /// Service counts to program.
    #[arg(long, value_delimiter = ',', default_values_t = [10usize, 1000, 10_000])]
    sizes: Vec<usize>,
    /// Endpoints per service.
    #[arg(long, default_value_t = 10)]
    endpoints: usize,
    /// Connects per size (the median is reported).
    #[arg(long, default_value_t = 500)]
    connects: usize,
    /// Services in the DNS server's zone.
    #[arg(long, default_value_t = 1000)]
    dns_services: usize,
    /// Seconds of DNS load.
    #[arg(long, default_value_t = 5)]
    dns_seconds: u64,
    /// Concurrent DNS clients (each one query in flight).
    #[arg(long, default_value_t = 8)]
    dns_clients: usize,
}

/// The endpoints' port in the server namespace.
const EP_PORT: u16 = 8080;

/// Two namespaces and a veth pair; deleted on drop.
struct Lab {
    client: String,
    server: String,
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

impl Lab {
    fn new(endpoints: usize) -> Result<Lab> {
        let pid = std::process::id();
        let lab = Lab {
            client: format!("sdnb-{pid}-c"),
            server: format!("sdnb-{pid}-s"),
        };
        ip(&["netns", "add", &lab.client])?;
        ip(&["netns", "add", &lab.server])?;
        let (c, s) = (lab.client.as_str(), lab.server.as_str());
        let (vc, vs) = (format!("sdnb{pid}c"), format!("sdnb{pid}s"));
        ip(&[
            "-n", c, "link", "add", &vc, "type", "veth", "peer", "name", &vs, "netns", s,
        ])?;
        ip(&["-n", c, "link", "set", "lo", "up"])?;
        ip(&["-n", s, "link", "set", "lo", "up"])?;
        ip(&["-n", c, "addr", "add", "10.200.0.1/24", "dev", &vc])?;
        ip(&["-n", s, "addr", "add", "10.200.0.2/24", "dev", &vs])?;
        ip(&["-n", c, "link", "set", &vc, "up"])?;
        ip(&["-n", s, "link", "set", &vs, "up"])?;
        // frontends and endpoints are all behind the server side
        ip(&["-n", c, "route", "add", "default", "via", "10.200.0.2"])?;
        // the measured service's endpoints: 10.2.<e>.1
        for e in 0..endpoints {
            ip(&[
                "-n",
                s,
                "addr",
                "add",
                &format!("10.2.{e}.1/32"),
                "dev",
                &vs,
            ])?;
        }
        Ok(lab)
    }

    fn path(name: &str) -> PathBuf {
        PathBuf::from(format!("/run/netns/{name}"))
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for n in [&self.client, &self.server] {
            if let Err(e) = ip(&["netns", "del", n]) {
                eprintln!("cleanup: {e}");
            }
        }
    }
}

/// Spawns a thread that runs `f` inside the namespace `name`.
fn spawn_in<T, F>(name: &str, f: F) -> Result<std::thread::JoinHandle<Result<T>>>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T> + Send + 'static,
{
    let file = File::open(Lab::path(name)).with_context(|| format!("opening netns {name}"))?;
    Ok(std::thread::spawn(move || {
        setns(&file, CloneFlags::CLONE_NEWNET).context("setns")?;
        f()
    }))
}

fn run_in<T, F>(name: &str, f: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T> + Send + 'static,
{
    spawn_in(name, f)?
        .join()
        .map_err(|_| anyhow::anyhow!("thread panicked"))?
}

fn service(i: usize, endpoints: usize) -> ProxiedService {
    ProxiedService {
        frontend: Frontend {
            ip: IpAddr::V4(Ipv4Addr::new(10, 102, (i / 250) as u8, (i % 250 + 1) as u8)),
            protocol: Protocol::Tcp,
            port: 80,
        },
        cluster: "west".into(),
        namespace: "demo".into(),
        name: format!("svc-{i}"),
        port_name: "http".into(),
        // as in the driver's own figures: one in ten with ClientIP affinity
        affinity: if i.is_multiple_of(10) {
            Affinity::ClientIp {
                timeout_seconds: 10800,
            }
        } else {
            Affinity::None
        },
        endpoints: (0..endpoints)
            .map(|e| {
                SocketAddr::new(
                    IpAddr::V4(Ipv4Addr::new(10, 2, e as u8, (i % 250 + 1) as u8)),
                    EP_PORT,
                )
            })
            .collect(),
    }
}

fn proxy_state(n: usize, endpoints: usize) -> Result<ProxyState> {
    let mut services: Vec<ProxiedService> = (0..n).map(|i| service(i, endpoints)).collect();
    services.sort();
    Ok(ProxyState {
        services,
        service_cidrs: vec!["10.102.0.0/16".parse()?],
        ..ProxyState::default()
    })
}

fn median_ms(v: &mut [Duration]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort();
    v[v.len() / 2].as_secs_f64() * 1000.0
}

fn quantile_ms(v: &mut [Duration], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort();
    let i = ((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1;
    v[i].as_secs_f64() * 1000.0
}

/// `count` TCP connects from the client namespace to `to`; the latencies of
/// those that succeeded, and the failure count.
fn connects(ns: &str, to: SocketAddr, count: usize) -> Result<(Vec<Duration>, usize)> {
    run_in(ns, move || {
        let mut lat = Vec::with_capacity(count);
        let mut failed = 0;
        for _ in 0..count {
            let t = Instant::now();
            match TcpStream::connect_timeout(&to, Duration::from_secs(1)) {
                Ok(s) => {
                    lat.push(t.elapsed());
                    drop(s);
                }
                Err(e) => {
                    if failed == 0 {
                        eprintln!("  first failed connect to {to}: {e}");
                    }
                    failed += 1
                }
            }
        }
        Ok((lat, failed))
    })
}

struct Figures(Vec<(String, f64, &'static str)>);

impl Figures {
    fn add(&mut self, name: impl Into<String>, value: f64, unit: &'static str) {
        let name = name.into();
        println!("  {name}: {value:.3} {unit}");
        self.0.push((name, value, unit));
    }
}

async fn bench_proxy(args: &Args, lab: &Lab, figs: &mut Figures) -> Result<()> {
    // endpoints: one listener on every address of the server namespace
    spawn_in(&lab.server, || {
        let l = TcpListener::bind(("0.0.0.0", EP_PORT))?;
        for s in l.incoming() {
            drop(s);
        }
        Ok(())
    })?;
    let measured: SocketAddr = "10.102.0.1:80".parse()?;
    let ns = lab.client.clone();
    // warm-up: the listener is up and the neighbours are resolved
    let up = run_in(&ns, || {
        for _ in 0..50 {
            if TcpStream::connect_timeout(&"10.2.0.1:8080".parse()?, Duration::from_secs(1)).is_ok()
            {
                return Ok(true);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(false)
    })?;
    if !up {
        bail!("the endpoints' listener does not answer");
    }
    let (mut direct, failed) = connects(&ns, "10.2.0.1:8080".parse()?, args.connects)?;
    figs.add("connect_latency_direct", median_ms(&mut direct), "ms");
    if failed > 0 {
        println!("  ({failed} direct connects failed)");
    }
    for &n in &args.sizes {
        println!("{n} services x {} endpoints", args.endpoints);
        let state = proxy_state(n, args.endpoints)?;
        let d = ProxyDriver::new(Some(&Lab::path(&lab.client)), Duration::from_secs(3600));
        d.remove().await?;
        let t = Instant::now();
        let full = d.apply(&state).await?;
        let wall = t.elapsed();
        println!(
            "  full apply: {} commands, {} rules, nft {:.3} s",
            full.commands,
            Rendered::of(&state).rule_count(),
            full.took.as_secs_f64()
        );
        figs.add(format!("program_{n}_services"), wall.as_secs_f64(), "s");
        // one endpoint of one service replaced by another pod
        let mut changed = state.clone();
        let k = n / 2;
        changed.services[k].endpoints[3] = "10.2.99.99:8080".parse()?;
        changed.services[k].endpoints.sort();
        let t = Instant::now();
        let one = d.apply(&changed).await?;
        let wall = t.elapsed();
        println!(
            "  endpoint change: full={} {} commands, nft {:.1} ms",
            one.full,
            one.commands,
            one.took.as_secs_f64() * 1000.0
        );
        figs.add(
            format!("endpoint_change_{n}"),
            wall.as_secs_f64() * 1000.0,
            "ms",
        );
        let (mut lat, failed) = connects(&ns, measured, args.connects)?;
        if failed > 0 {
            println!("  ({failed} of {} connects failed)", args.connects);
        }
        figs.add(format!("connect_latency_{n}"), median_ms(&mut lat), "ms");
        d.remove().await?;
    }
    Ok(())
}

/// A DNS query for `name`, type A, id `id`.
fn dns_query(id: u16, name: &str) -> Vec<u8> {
    let mut q = Vec::with_capacity(64);
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

fn dns_name(i: usize) -> String {
    format!("svc-{i}.demo.svc.cluster.west")
}

fn dns_records(n: usize) -> DnsRecords {
    let mut records = BTreeMap::new();
    for i in 0..n {
        let a = Ipv4Addr::new(10, 102, (i / 250) as u8, (i % 250 + 1) as u8);
        records.insert(
            dns_name(i),
            BTreeSet::from([RecordData::Addr(IpAddr::V4(a))]),
        );
    }
    DnsRecords {
        zones: BTreeMap::from([("cluster.west".to_string(), Zone { records })]),
        ..Default::default()
    }
}

async fn bench_dns(args: &Args, lab: &Lab, figs: &mut Figures) -> Result<()> {
    let (catalog, errors) = build_catalog(&dns_records(args.dns_services), 5, 1, None);
    if !errors.is_empty() {
        bail!("zones: {errors:?}");
    }
    let handler = DnsHandler::new(catalog);
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    // the server, on a runtime of its own inside the client namespace
    spawn_in(&lab.client, move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        rt.block_on(async move {
            let (mut server, addr) = bind("127.0.0.1:0".parse()?, handler).await?;
            let _ = tx.send(addr);
            let _ = server.block_until_done().await;
            Ok(())
        })
    })?;
    let addr: SocketAddr = rx
        .recv_timeout(Duration::from_secs(10))
        .context("DNS server did not start")?;
    println!("DNS: {} services, server {addr}", args.dns_services);

    // closed loop: each client keeps one query in flight
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for c in 0..args.dns_clients {
        let stop = stop.clone();
        let n = args.dns_services;
        clients.push(spawn_in(&lab.client, move || {
            let sock = UdpSocket::bind("127.0.0.1:0")?;
            sock.connect(addr)?;
            sock.set_read_timeout(Some(Duration::from_secs(1)))?;
            let mut lat = Vec::new();
            let mut lost = 0usize;
            let mut buf = [0u8; 1500];
            let mut i = c;
            while !stop.load(Ordering::Relaxed) {
                let id = (i & 0xffff) as u16;
                let q = dns_query(id, &dns_name(i % n));
                let t = Instant::now();
                sock.send(&q)?;
                loop {
                    match sock.recv(&mut buf) {
                        Ok(len) if len >= 2 && buf[..2] == id.to_be_bytes() => {
                            lat.push(t.elapsed());
                            break;
                        }
                        Ok(_) => continue,
                        Err(_) => {
                            lost += 1;
                            break;
                        }
                    }
                }
                i += STRIDE;
            }
            Ok((lat, lost))
        })?);
    }
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(args.dns_seconds)).await;
    stop.store(true, Ordering::Relaxed);
    let mut all = Vec::new();
    let mut lost = 0;
    for c in clients {
        let (lat, l) = c.join().map_err(|_| anyhow::anyhow!("client panicked"))??;
        all.extend(lat);
        lost += l;
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "  {} answers, {lost} lost, {} clients",
        all.len(),
        args.dns_clients
    );
    figs.add("dns_qps", all.len() as f64 / secs, "qps");
    figs.add("dns_p50", quantile_ms(&mut all, 0.50), "ms");
    figs.add("dns_p99", quantile_ms(&mut all, 0.99), "ms");

    // dnsperf, when installed, as a second opinion on the rate
    let qfile = std::env::temp_dir().join(format!("sdnb-{}-queries", std::process::id()));
    let body: String = (0..args.dns_services)
        .map(|i| format!("{} A\n", dns_name(i)))
        .collect();
    std::fs::write(&qfile, body)?;
    let out = tokio::process::Command::new("ip")
        .args(["netns", "exec", &lab.client, "dnsperf", "-s", "127.0.0.1"])
        .arg("-p")
        .arg(addr.port().to_string())
        .arg("-d")
        .arg(&qfile)
        .args(["-l", &args.dns_seconds.to_string(), "-c", "4", "-q", "100"])
        .kill_on_drop(true)
        .output()
        .await;
    let _ = std::fs::remove_file(&qfile);
    match out {
        Ok(o) if o.status.success() => {
            let text = String::from_utf8_lossy(&o.stdout);
            for line in text.lines() {
                let l = line.trim();
                if let Some(v) = l.strip_prefix("Queries per second:") {
                    if let Ok(v) = v.trim().parse::<f64>() {
                        figs.add("dns_qps_dnsperf", v, "qps");
                    }
                } else if let Some(v) = l.strip_prefix("Average Latency (s):") {
                    if let Some(Ok(v)) = v.split_whitespace().next().map(str::parse::<f64>) {
                        figs.add("dns_avg_latency_dnsperf", v * 1000.0, "ms");
                    }
                } else if l.starts_with("Queries lost:") {
                    println!("  dnsperf {l}");
                }
            }
        }
        Ok(o) => println!(
            "  dnsperf failed: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        ),
        Err(e) => println!("  dnsperf not run: {e}"),
    }
    Ok(())
}

/// Names a client skips between queries (spreads the clients over the zone).
const STRIDE: usize = 7;

async fn run(args: &Args, lab: &Lab, figs: &mut Figures) -> Result<()> {
    bench_proxy(args, lab, figs).await?;
    bench_dns(args, lab, figs).await
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let endpoints = args.endpoints.clamp(1, 200);
    let lab = Lab::new(endpoints)?;
    println!("namespaces {} and {}", lab.client, lab.server);
    let mut figs = Figures(Vec::new());
    let outcome = tokio::select! {
        r = run(&args, &lab, &mut figs) => r,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
    };
    drop(lab);
    if let Err(e) = &outcome {
        eprintln!("error: {e:#}");
    }
    for (name, value, unit) in &figs.0 {
        let digits = if *value < 10.0 { 3 } else { 1 };
        println!("FIGURE {name} = {value:.digits$} {unit}");
    }
    if outcome.is_err() {
        std::process::exit(1);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_encodes_the_name_in_labels() {
        let q = dns_query(0x1234, "a.bc");
        assert_eq!(
            q,
            [0x12, 0x34, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 1, b'a', 2, b'b', b'c', 0, 0, 1, 0, 1]
        );
    }

    #[test]
    fn states_have_unique_frontends() {
        let s = proxy_state(10_000, 10).unwrap_or_default();
        let fronts: BTreeSet<_> = s.services.iter().map(|s| s.frontend).collect();
        assert_eq!(fronts.len(), 10_000);
    }

    #[test]
    fn quantiles() {
        let mut v: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(quantile_ms(&mut v, 0.99), 99.0);
        assert_eq!(median_ms(&mut v), 51.0);
    }
}
