//! `tunnel-agent wg` against the stock tools and a WireGuard nobody here
//! wrote: our tunnel in one network namespace, Debian's `wireguard-go` in
//! another, a veth pair between them, both configured with Debian's `wg`
//! through `/var/run/wireguard/<iface>.sock`. TCP flows both ways through
//! the tunnel, `wg show` reads our side, `/metrics` counts it, and a
//! listen port change keeps the session.
//!
//! Needs root, `wg` (wireguard-tools) and `wireguard-go` (`make test`
//! installs them). Namespaces and interfaces are named after the process
//! id and removed by `Drop` guards; only processes started here are killed,
//! and traffic only flows between the namespaces made here.

// Setup helpers panic on failure on purpose: a test that cannot set up fails.
#![allow(clippy::unwrap_used)]

mod support;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sdn_tunnel_agent::drivers::netns::in_netns;
use support::{sh, Netns};

const UAPI_DIR: &str = "/var/run/wireguard";

/// Starts `args` inside `ns`, output to `log`; stopped when dropped.
fn spawn(ns: &Netns, args: &[&str], log: &Path) -> Proc {
    let out = std::fs::File::create(log).unwrap();
    let child = Command::new("ip")
        .args(["netns", "exec", &ns.name])
        .args(args)
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {args:?}: {e}"));
    Proc {
        child,
        log: log.to_owned(),
    }
}

/// A process this test started; killed (by its pid) when dropped.
struct Proc {
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // SIGTERM first so that the socket file is removed; then make sure.
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .output();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Files removed when dropped (keys, logs, a stale socket).
struct Cleanup(Vec<PathBuf>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

fn wait_for(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("timed out waiting for {what}");
}

fn genkey(path: &Path) -> String {
    let key = sh(&["wg", "genkey"]);
    std::fs::write(path, &key).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
    let out = Command::new("sh")
        .args(["-c", &format!("wg pubkey < {}", path.display())])
        .output()
        .unwrap();
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Sends `msg` over TCP from `from` to `to` and expects it echoed back.
fn tcp_echo(listen_ns: &Netns, listen: SocketAddr, from_ns: &Netns, msg: &'static [u8]) {
    let listener = in_netns(Some(&listen_ns.path()), move || TcpListener::bind(listen))
        .unwrap()
        .unwrap();
    let server = std::thread::spawn(move || {
        let (mut s, peer) = listener.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut buf = vec![0u8; msg.len()];
        s.read_exact(&mut buf).unwrap();
        s.write_all(&buf).unwrap();
        peer
    });
    let mut c = in_netns(Some(&from_ns.path()), move || {
        TcpStream::connect_timeout(&listen, Duration::from_secs(15))
    })
    .unwrap()
    .unwrap_or_else(|e| panic!("TCP connect to {listen} through the tunnel: {e}"));
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.write_all(msg).unwrap();
    let mut back = vec![0u8; msg.len()];
    c.read_exact(&mut back).unwrap();
    assert_eq!(back, msg);
    server.join().unwrap();
}

fn http_get(ns: &Netns, addr: SocketAddr, path: &'static str) -> String {
    let mut s = in_netns(Some(&ns.path()), move || {
        TcpStream::connect_timeout(&addr, Duration::from_secs(5))
    })
    .unwrap()
    .unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

fn metric(text: &str, prefix: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {prefix} in\n{text}"))
}

#[test]
fn wg_tools_configure_us_and_wireguard_go_interoperates() {
    let pid = std::process::id();
    let ours = format!("sdnwgA{}", pid % 100_000);
    let theirs = format!("sdnwgB{}", pid % 100_000);
    let tmp = std::env::temp_dir();
    let key_a = tmp.join(format!("sdnt-wg-{pid}-a.key"));
    let key_b = tmp.join(format!("sdnt-wg-{pid}-b.key"));
    let log_a = tmp.join(format!("sdnt-wg-{pid}-a.log"));
    let log_b = tmp.join(format!("sdnt-wg-{pid}-b.log"));
    let _files = Cleanup(vec![
        key_a.clone(),
        key_b.clone(),
        log_a.clone(),
        log_b.clone(),
    ]);

    let a = Netns::new("wg-a");
    let b = Netns::new("wg-b");
    let (va, vb) = (format!("sdnva{pid}"), format!("sdnvb{pid}"));
    let (va, vb) = (&va[..va.len().min(15)], &vb[..vb.len().min(15)]);
    sh(&["ip", "link", "add", va, "type", "veth", "peer", "name", vb]);
    sh(&["ip", "link", "set", va, "netns", &a.name]);
    sh(&["ip", "link", "set", vb, "netns", &b.name]);
    a.ip(&["addr", "add", "192.168.231.1/24", "dev", va]);
    b.ip(&["addr", "add", "192.168.231.2/24", "dev", vb]);
    a.ip(&["link", "set", va, "up"]);
    b.ip(&["link", "set", vb, "up"]);

    let pub_a = genkey(&key_a);
    let pub_b = genkey(&key_b);
    let sock_a = Path::new(UAPI_DIR).join(format!("{ours}.sock"));
    let sock_b = Path::new(UAPI_DIR).join(format!("{theirs}.sock"));

    let ours_proc = spawn(
        &a,
        &[
            env!("CARGO_BIN_EXE_tunnel-agent"),
            "wg",
            &ours,
            "-f",
            "--listen-port",
            "51820",
            "--metrics-addr",
            "127.0.0.1:9586",
        ],
        &log_a,
    );
    let theirs_proc = spawn(&b, &["wireguard-go", "-f", &theirs], &log_b);
    wait_for("our UAPI socket", Duration::from_secs(20), || {
        sock_a.exists()
    });
    wait_for(
        "wireguard-go's UAPI socket",
        Duration::from_secs(20),
        || sock_b.exists(),
    );
    // The socket is root's alone, like wireguard-go's.
    let mode = std::fs::metadata(&sock_a).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "socket mode {mode:o}");

    // Configure both sides with the stock `wg`, no keepalive: the
    // handshake must come from traffic.
    a.exec(&[
        "wg",
        "set",
        &ours,
        "private-key",
        key_a.to_str().unwrap(),
        "peer",
        &pub_b,
        "endpoint",
        "192.168.231.2:51821",
        "allowed-ips",
        "10.231.0.2/32",
    ]);
    b.exec(&[
        "wg",
        "set",
        &theirs,
        "listen-port",
        "51821",
        "private-key",
        key_b.to_str().unwrap(),
        "peer",
        &pub_a,
        "endpoint",
        "192.168.231.1:51820",
        "allowed-ips",
        "10.231.0.1/32",
    ]);
    a.ip(&["addr", "add", "10.231.0.1/24", "dev", &ours]);
    b.ip(&["addr", "add", "10.231.0.2/24", "dev", &theirs]);
    b.ip(&["link", "set", &theirs, "up"]);

    let show = a.exec(&["wg", "show", &ours]);
    assert!(show.contains(&format!("public key: {pub_a}")), "{show}");
    assert!(show.contains("listening port: 51820"), "{show}");
    assert!(show.contains(&format!("peer: {pub_b}")), "{show}");
    assert!(show.contains("endpoint: 192.168.231.2:51821"), "{show}");
    assert!(show.contains("allowed ips: 10.231.0.2/32"), "{show}");
    assert!(
        !show.contains("latest handshake"),
        "no traffic yet:\n{show}"
    );

    // TCP both ways through the tunnel.
    tcp_echo(
        &b,
        SocketAddr::from((Ipv4Addr::new(10, 231, 0, 2), 7001)),
        &a,
        b"ours to wireguard-go",
    );
    tcp_echo(
        &a,
        SocketAddr::from((Ipv4Addr::new(10, 231, 0, 1), 7002)),
        &b,
        b"wireguard-go to ours",
    );

    let show = a.exec(&["wg", "show", &ours]);
    eprintln!("wg show {ours} after TCP both ways:\n{show}");
    assert!(show.contains("latest handshake:"), "{show}");
    assert!(show.contains("transfer:"), "{show}");
    let hs = a.exec(&["wg", "show", &ours, "latest-handshakes"]);
    let t: u64 = hs.split_whitespace().nth(1).unwrap().parse().unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(
        t > 0 && t <= now + 1 && now - t < 120,
        "handshake at {t}, now {now}"
    );
    // wireguard-go saw the same session from its side.
    let theirs_dump = b.exec(&["wg", "show", &theirs, "dump"]);
    let peer_line = theirs_dump.lines().nth(1).unwrap();
    let fields: Vec<&str> = peer_line.split('\t').collect();
    assert_eq!(fields[0], pub_a);
    assert!(fields[4].parse::<u64>().unwrap() > 0, "{theirs_dump}");

    let conf = a.exec(&["wg", "showconf", &ours]);
    assert!(conf.contains(&format!("PublicKey = {pub_b}")), "{conf}");
    assert!(conf.contains("ListenPort = 51820"), "{conf}");
    // `wg setconf` of what `wg showconf` printed changes nothing: the
    // session survives (no peer is recreated).
    let conf_file = tmp.join(format!("sdnt-wg-{pid}-a.conf"));
    let _conf_cleanup = Cleanup(vec![conf_file.clone()]);
    std::fs::write(&conf_file, &conf).unwrap();
    a.exec(&["wg", "setconf", &ours, conf_file.to_str().unwrap()]);
    let hs_after = a.exec(&["wg", "show", &ours, "latest-handshakes"]);
    assert_eq!(
        hs_after, hs,
        "setconf with the same configuration kept the session"
    );
    assert_eq!(a.exec(&["wg", "showconf", &ours]), conf);

    // /metrics counts the traffic.
    let m = http_get(&a, SocketAddr::from(([127, 0, 0, 1], 9586)), "/metrics");
    let peer = format!("{{interface=\"{ours}\",public_key=\"{pub_b}\"}}");
    assert!(metric(&m, &format!("sdn_tunnel_peer_receive_bytes_total{peer}")) > 0.0);
    assert!(metric(&m, &format!("sdn_tunnel_peer_transmit_packets_total{peer}")) > 0.0);
    assert_eq!(
        metric(
            &m,
            &format!("sdn_tunnel_peers_connected{{interface=\"{ours}\"}}")
        ),
        1.0
    );
    let h = http_get(&a, SocketAddr::from(([127, 0, 0, 1], 9586)), "/healthz");
    assert!(
        h.starts_with("HTTP/1.0 200") || h.starts_with("HTTP/1.1 200"),
        "{h}"
    );

    // A new listen port keeps the session: wireguard-go follows the
    // endpoint from our next authenticated packet.
    a.exec(&["wg", "set", &ours, "listen-port", "51830"]);
    let show = a.exec(&["wg", "show", &ours]);
    assert!(show.contains("listening port: 51830"), "{show}");
    tcp_echo(
        &b,
        SocketAddr::from((Ipv4Addr::new(10, 231, 0, 2), 7003)),
        &a,
        b"after the port change",
    );
    let theirs_show = b.exec(&["wg", "show", &theirs, "endpoints"]);
    assert!(theirs_show.contains("192.168.231.1:51830"), "{theirs_show}");

    // Garbage on the socket gets an errno, and the server stays up.
    let mut raw = UnixStream::connect(&sock_a).unwrap();
    raw.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    raw.write_all(b"set=1\nlisten_port=banana\n\n").unwrap();
    let mut buf = [0u8; 64];
    let n = raw.read(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"errno=-22\n\n");
    // A port in use is refused (EADDRINUSE) and changes nothing.
    let _squatter = in_netns(Some(&a.path()), || {
        std::net::UdpSocket::bind(("0.0.0.0", 51840))
    })
    .unwrap()
    .unwrap();
    let refused = a.try_exec(&["wg", "set", &ours, "listen-port", "51840"]);
    assert!(!refused.status.success());
    let why = String::from_utf8_lossy(&refused.stderr);
    assert!(why.contains("Address already in use"), "{why}");
    let show = a.exec(&["wg", "show", &ours]);
    assert!(show.contains("listening port: 51830"), "{show}");
    assert!(show.contains(&format!("peer: {pub_b}")), "{show}");

    // Removing the peer through `wg set`.
    a.exec(&["wg", "set", &ours, "peer", &pub_b, "remove"]);
    let peers = a.exec(&["wg", "show", &ours, "peers"]);
    assert!(peers.trim().is_empty(), "{peers}");

    drop(theirs_proc);
    let log = ours_proc.log();
    drop(ours_proc);
    assert!(!sock_a.exists(), "our socket is removed at exit");
    assert!(!log.contains("panicked"), "{log}");
}

/// boringtun stops initiating after 90 s of unanswered handshakes
/// (REKEY_ATTEMPT_TIME) and, with only a persistent keepalive, never starts
/// again: its timers return early once the handshake expired. Our timer
/// thread re-arms it, so a peer that comes up late is still reached
/// without any traffic. wireguard-go here has no endpoint for us and no
/// keepalive: only our side can start the handshake.
#[test]
fn keepalive_peer_is_reached_after_boringtun_gave_up() {
    let pid = std::process::id();
    let ours = format!("sdnwgC{}", pid % 100_000);
    let theirs = format!("sdnwgD{}", pid % 100_000);
    let tmp = std::env::temp_dir();
    let key_a = tmp.join(format!("sdnt-wg-{pid}-c.key"));
    let key_b = tmp.join(format!("sdnt-wg-{pid}-d.key"));
    let log_a = tmp.join(format!("sdnt-wg-{pid}-c.log"));
    let log_b = tmp.join(format!("sdnt-wg-{pid}-d.log"));
    let _files = Cleanup(vec![
        key_a.clone(),
        key_b.clone(),
        log_a.clone(),
        log_b.clone(),
    ]);
    let a = Netns::new("wg-c");
    let b = Netns::new("wg-d");
    let (va, vb) = (format!("sdnvc{pid}"), format!("sdnvd{pid}"));
    let (va, vb) = (&va[..va.len().min(15)], &vb[..vb.len().min(15)]);
    sh(&["ip", "link", "add", va, "type", "veth", "peer", "name", vb]);
    sh(&["ip", "link", "set", va, "netns", &a.name]);
    sh(&["ip", "link", "set", vb, "netns", &b.name]);
    a.ip(&["addr", "add", "192.168.232.1/24", "dev", va]);
    b.ip(&["addr", "add", "192.168.232.2/24", "dev", vb]);
    a.ip(&["link", "set", va, "up"]);
    b.ip(&["link", "set", vb, "up"]);
    let pub_a = genkey(&key_a);
    let pub_b = genkey(&key_b);
    let sock_a = Path::new(UAPI_DIR).join(format!("{ours}.sock"));
    let sock_b = Path::new(UAPI_DIR).join(format!("{theirs}.sock"));
    let ours_proc = spawn(
        &a,
        &[
            "env",
            "RUST_LOG=info,sdn_tunnel_agent::tunnel=debug",
            env!("CARGO_BIN_EXE_tunnel-agent"),
            "wg",
            &ours,
            "--listen-port",
            "51820",
        ],
        &log_a,
    );
    let _theirs_proc = spawn(&b, &["wireguard-go", "-f", &theirs], &log_b);
    wait_for("our UAPI socket", Duration::from_secs(20), || {
        sock_a.exists()
    });
    wait_for(
        "wireguard-go's UAPI socket",
        Duration::from_secs(20),
        || sock_b.exists(),
    );
    // wireguard-go listens but does not know us yet: our initiations die.
    b.exec(&[
        "wg",
        "set",
        &theirs,
        "listen-port",
        "51821",
        "private-key",
        key_b.to_str().unwrap(),
    ]);
    b.ip(&["link", "set", &theirs, "up"]);
    a.exec(&[
        "wg",
        "set",
        &ours,
        "private-key",
        key_a.to_str().unwrap(),
        "peer",
        &pub_b,
        "endpoint",
        "192.168.232.2:51821",
        "allowed-ips",
        "10.232.0.2/32",
        "persistent-keepalive",
        "1",
    ]);
    // Past REKEY_ATTEMPT_TIME: boringtun has given up by now.
    std::thread::sleep(Duration::from_secs(96));
    let hs = a.exec(&["wg", "show", &ours, "latest-handshakes"]);
    assert!(hs.trim_end().ends_with("\t0"), "no handshake yet: {hs:?}");

    // Now wireguard-go accepts us, but cannot initiate itself.
    b.exec(&[
        "wg",
        "set",
        &theirs,
        "peer",
        &pub_a,
        "allowed-ips",
        "10.232.0.1/32",
    ]);
    wait_for(
        "a handshake started by the re-arm",
        Duration::from_secs(20),
        || {
            let hs = a.exec(&["wg", "show", &ours, "latest-handshakes"]);
            !hs.trim_end().ends_with("\t0")
        },
    );
    let log = ours_proc.log();
    assert!(
        log.contains("no live session: handshake re-armed"),
        "the handshake came from the re-arm:\n{log}"
    );
    assert!(!log.contains("panicked"), "{log}");
}

/// `--config` applies a `wg setconf` file at start, before the socket
/// answers; a file `wg setconf` would refuse stops the start, non-zero.
#[test]
fn config_file_is_applied_at_start() {
    let pid = std::process::id();
    let ours = format!("sdnwgE{}", pid % 100_000);
    let tmp = std::env::temp_dir();
    let key = tmp.join(format!("sdnt-wg-{pid}-e.key"));
    let conf = tmp.join(format!("sdnt-wg-{pid}-e.conf"));
    let bad = tmp.join(format!("sdnt-wg-{pid}-e-bad.conf"));
    let log = tmp.join(format!("sdnt-wg-{pid}-e.log"));
    let _files = Cleanup(vec![key.clone(), conf.clone(), bad.clone(), log.clone()]);
    let ns = Netns::new("wg-e");
    let public = genkey(&key);
    let private = std::fs::read_to_string(&key).unwrap();
    let peer = sh(&["wg", "genkey"]);
    let peer_pub = {
        let p = tmp.join(format!("sdnt-wg-{pid}-e-peer.key"));
        let _c = Cleanup(vec![p.clone()]);
        std::fs::write(&p, &peer).unwrap();
        genkey_pub(&p)
    };
    std::fs::write(
        &conf,
        format!(
            "[Interface]\nPrivateKey = {}\nListenPort = 51899\n\n[Peer]\nPublicKey = {peer_pub}\n\
             AllowedIPs = 10.233.0.0/24, fd33::/64\nEndpoint = 192.0.2.33:51820\n",
            private.trim()
        ),
    )
    .unwrap();
    let sock = Path::new(UAPI_DIR).join(format!("{ours}.sock"));
    let proc_ = spawn(
        &ns,
        &[
            env!("CARGO_BIN_EXE_tunnel-agent"),
            "wg",
            &ours,
            "--config",
            conf.to_str().unwrap(),
        ],
        &log,
    );
    wait_for("our UAPI socket", Duration::from_secs(20), || sock.exists());
    let show = ns.exec(&["wg", "show", &ours]);
    assert!(show.contains(&format!("public key: {public}")), "{show}");
    assert!(show.contains("listening port: 51899"), "{show}");
    assert!(show.contains(&format!("peer: {peer_pub}")), "{show}");
    assert!(show.contains("endpoint: 192.0.2.33:51820"), "{show}");
    assert!(
        show.contains("allowed ips: 10.233.0.0/24, fd33::/64")
            || show.contains("allowed ips: fd33::/64, 10.233.0.0/24"),
        "{show}"
    );
    drop(proc_);

    std::fs::write(&bad, "[Interface]\nAddress = 10.0.0.1/24\n").unwrap();
    let out = ns.try_exec(&[
        env!("CARGO_BIN_EXE_tunnel-agent"),
        "wg",
        &ours,
        "--config",
        bad.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let why = String::from_utf8_lossy(&out.stderr);
    assert!(why.contains("unknown key \"address\""), "{why}");
    assert!(!sock.exists(), "no socket left behind");
}

fn genkey_pub(private: &Path) -> String {
    let out = Command::new("sh")
        .args(["-c", &format!("wg pubkey < {}", private.display())])
        .output()
        .unwrap();
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}
