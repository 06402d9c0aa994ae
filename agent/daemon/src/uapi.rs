//! The WireGuard cross-platform userspace API (UAPI,
//! <https://www.wireguard.com/xplatform/>), as `wg show`, `wg showconf`,
//! `wg set` and `wg setconf` speak it over `/var/run/wireguard/<iface>.sock`.
//!
//! The protocol part is pure: [`read_request`] frames one `get=1` / `set=1`
//! operation, [`parse_set`] turns the lines of a set into a [`SetRequest`],
//! [`Config::apply`] computes the configuration a set leads to (semantics
//! of wireguard-go's `device/uapi.go`: `replace_peers`, `update_only`,
//! `remove`, `replace_allowed_ips`, `allowed_ip=-...`, a prefix moving
//! between peers) and [`format_get`] prints what `get` answers. Unlike
//! wireguard-go, a set is validated whole before anything is applied: an
//! invalid line leaves the device as it was.
//!
//! [`serve_connection`] runs the protocol on any stream for a [`Handler`];
//! [`Server`] listens on the unix socket and drives a [`Tunnel`] (read and
//! write, standalone mode) or a running tunnel found by interface name
//! (read only, under `tunnel-agent run`, where the control plane owns the
//! peers: a `set` there would be undone at the next reconcile, so it is
//! refused with `errno=-1` (EPERM) and logged).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{self, BufRead, Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use ipnet::IpNet;
use sdn_tunnel_datapath::device::{PeerConfig, PeerStats};
use sdn_tunnel_datapath::keys::{PrivateKey, PublicKey};
use tracing::{debug, info, warn};
use zeroize::Zeroizing;

use crate::tunnel::{self, Tunnel, TunnelView};

/// Default directory of the sockets (wireguard-go's).
pub const DEFAULT_SOCKET_DIR: &str = "/var/run/wireguard";

/// Longest line accepted (a line of `wg` is below 200 bytes).
pub const MAX_LINE: usize = 4096;

/// errno values of the replies (negative, as wireguard-go sends them).
pub mod errno {
    /// Refused: the peers belong to the control plane (`run` mode).
    pub const EPERM: i32 = -1;
    /// I/O error.
    pub const EIO: i32 = -5;
    /// Invalid value or key.
    pub const EINVAL: i32 = -22;
    /// Malformed line or unknown operation.
    pub const EPROTO: i32 = -71;
    /// The listen port (or fwmark) cannot be applied.
    pub const EADDRINUSE: i32 = -98;
}

/// Why an operation failed; [`UapiError::errno`] is what the client sees.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum UapiError {
    #[error("malformed UAPI input: {0}")]
    Protocol(String),
    #[error("invalid UAPI value: {0}")]
    Invalid(String),
    #[error("cannot apply: {0}")]
    PortInUse(String),
    #[error("refused: {0}")]
    ReadOnly(String),
    #[error("I/O: {0}")]
    Io(String),
}

impl UapiError {
    /// The `errno=` value of the reply.
    pub fn errno(&self) -> i32 {
        match self {
            UapiError::Protocol(_) => errno::EPROTO,
            UapiError::Invalid(_) => errno::EINVAL,
            UapiError::PortInUse(_) => errno::EADDRINUSE,
            UapiError::ReadOnly(_) => errno::EPERM,
            UapiError::Io(_) => errno::EIO,
        }
    }
}

fn invalid(what: impl Into<String>) -> UapiError {
    UapiError::Invalid(what.into())
}

/// One operation read from a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// `get=1`.
    Get,
    /// `set=1` and its lines (without the terminating blank line).
    Set(Vec<String>),
    /// Anything else: answered with this error, then the connection is
    /// closed (there is no way to find the next operation's start).
    Bad(UapiError),
}

/// Reads one line of at most [`MAX_LINE`] bytes without its `\n`.
/// `Ok(None)` at end of input; a line without `\n` at the end of input is
/// returned as is.
fn read_line<R: BufRead>(r: &mut R) -> io::Result<Option<Result<String, UapiError>>> {
    let mut buf = Vec::new();
    let n = r
        .by_ref()
        .take(MAX_LINE as u64 + 1)
        .read_until(b'\n', &mut buf)?;
    if n == 0 {
        return Ok(None);
    }
    if buf.last() == Some(&b'\n') {
        buf.pop();
    } else if buf.len() > MAX_LINE {
        // Skip the rest of the overlong line.
        let mut rest = Vec::new();
        loop {
            rest.clear();
            let m = r.by_ref().take(64 * 1024).read_until(b'\n', &mut rest)?;
            if m == 0 || rest.last() == Some(&b'\n') {
                break;
            }
        }
        return Ok(Some(Err(UapiError::Protocol(format!(
            "line longer than {MAX_LINE} bytes"
        )))));
    }
    Ok(Some(String::from_utf8(buf).map_err(|_| {
        UapiError::Protocol("line is not UTF-8".into())
    })))
}

/// Reads the next operation. `Ok(None)` at end of input.
pub fn read_request<R: BufRead>(r: &mut R) -> io::Result<Option<Request>> {
    let op = match read_line(r)? {
        None => return Ok(None),
        Some(Err(e)) => return Ok(Some(Request::Bad(e))),
        Some(Ok(op)) => op,
    };
    match op.as_str() {
        "get=1" => match read_line(r)? {
            // wireguard-go wants the blank line; at end of input we answer
            // anyway, the client may have half-closed.
            None => Ok(Some(Request::Get)),
            Some(Ok(l)) if l.is_empty() => Ok(Some(Request::Get)),
            Some(Ok(l)) => Ok(Some(Request::Bad(UapiError::Invalid(format!(
                "trailing line after get: {l:?}"
            ))))),
            Some(Err(e)) => Ok(Some(Request::Bad(e))),
        },
        "set=1" => {
            let mut lines = Vec::new();
            let mut first_error = None;
            // Until the blank line (or end of input, as wireguard-go).
            while let Some(line) = read_line(r)? {
                match line {
                    Ok(l) if l.is_empty() => break,
                    Ok(l) => lines.push(l),
                    Err(e) => {
                        first_error.get_or_insert(e);
                    }
                }
            }
            Ok(Some(match first_error {
                Some(e) => Request::Bad(e),
                None => Request::Set(lines),
            }))
        }
        other => Ok(Some(Request::Bad(UapiError::Protocol(format!(
            "unknown operation {:?}",
            other.chars().take(64).collect::<String>()
        ))))),
    }
}

/// What a connection asks of the device.
pub trait Handler {
    /// The `get` answer without the final `errno=0` and blank line.
    fn get(&mut self) -> Result<String, UapiError>;
    /// Applies a set whose lines were read.
    fn set(&mut self, lines: &[String]) -> Result<(), UapiError>;
}

/// Answers operations on `stream` until its end or a bad operation.
pub fn serve_connection<S: io::Read + Write>(
    stream: S,
    handler: &mut impl Handler,
) -> io::Result<()> {
    let mut r = io::BufReader::new(stream);
    while let Some(req) = read_request(&mut r)? {
        let (body, result, close) = match req {
            Request::Get => match handler.get() {
                Ok(body) => (body, Ok(()), false),
                Err(e) => (String::new(), Err(e), false),
            },
            Request::Set(lines) => (String::new(), handler.set(&lines), false),
            Request::Bad(e) => (String::new(), Err(e), true),
        };
        let code = match &result {
            Ok(()) => 0,
            Err(e) => {
                debug!(error = %e, "UAPI operation failed");
                e.errno()
            }
        };
        let w = r.get_mut();
        w.write_all(body.as_bytes())?;
        w.write_all(format!("errno={code}\n\n").as_bytes())?;
        w.flush()?;
        if close {
            break;
        }
    }
    Ok(())
}

/// A 32-byte key in lowercase hex, as UAPI carries keys.
pub fn to_hex(key: &[u8; 32]) -> String {
    let mut s = String::with_capacity(64);
    for b in key {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// Parses 64 hex digits (either case) into a key.
pub fn from_hex(text: &str) -> Result<[u8; 32], UapiError> {
    let bytes = text.as_bytes();
    if bytes.len() != 64 {
        return Err(invalid(format!(
            "key must be 64 hex digits, got {}",
            bytes.len()
        )));
    }
    let mut key = [0u8; 32];
    for (i, pair) in bytes.chunks_exact(2).enumerate() {
        let hi = hex_digit(pair[0])?;
        let lo = hex_digit(pair[1])?;
        key[i] = hi << 4 | lo;
    }
    Ok(key)
}

fn hex_digit(c: u8) -> Result<u8, UapiError> {
    match c {
        b'0'..=b'9' => Ok(c - b'0'),
        b'a'..=b'f' => Ok(c - b'a' + 10),
        b'A'..=b'F' => Ok(c - b'A' + 10),
        _ => Err(invalid("key has a non-hex digit")),
    }
}

fn private_from_bytes(bytes: &[u8; 32]) -> Result<PrivateKey, UapiError> {
    let text = Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(bytes));
    PrivateKey::from_base64(&text).map_err(|e| invalid(format!("private key: {e}")))
}

fn private_to_bytes(key: &PrivateKey) -> Zeroizing<[u8; 32]> {
    let mut out = Zeroizing::new([0u8; 32]);
    let text = key.to_base64();
    // A PrivateKey always prints as 32 bytes of base64; leave zeros if not.
    if let Ok(v) = base64::engine::general_purpose::STANDARD.decode(text.as_bytes()) {
        let v = Zeroizing::new(v);
        if v.len() == 32 {
            out.copy_from_slice(&v);
        }
    }
    out
}

/// One line of a peer block, in the order received (order matters:
/// `replace_allowed_ips` after an `allowed_ip` removes it, `remove` turns
/// the rest of the block into no-ops).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerOp {
    Remove,
    UpdateOnly,
    /// All zeros clears it.
    PresharedKey(Option<[u8; 32]>),
    Endpoint(SocketAddr),
    /// Seconds; 0 disables it.
    PersistentKeepalive(u16),
    ReplaceAllowedIps,
    AllowedIp {
        net: IpNet,
        remove: bool,
    },
    ProtocolVersion,
}

/// The lines after one `public_key=`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerBlock {
    pub public_key: PublicKey,
    pub ops: Vec<PeerOp>,
}

/// A parsed `set=1`.
#[derive(Debug, Clone, Default)]
pub struct SetRequest {
    /// `Some(None)`: all zeros, i.e. clear the key.
    pub private_key: Option<Option<PrivateKey>>,
    pub listen_port: Option<u16>,
    pub fwmark: Option<u32>,
    pub replace_peers: bool,
    pub peers: Vec<PeerBlock>,
}

fn parse_true(key: &str, value: &str) -> Result<(), UapiError> {
    if value == "true" {
        Ok(())
    } else {
        Err(invalid(format!("{key} must be \"true\", got {value:?}")))
    }
}

fn parse_num<T: std::str::FromStr>(key: &str, value: &str) -> Result<T, UapiError> {
    // Like Go's ParseUint: digits only (no sign, no spaces).
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(invalid(format!("{key}: {value:?} is not a number")));
    }
    value
        .parse()
        .map_err(|_| invalid(format!("{key}: {value:?} is out of range")))
}

fn parse_prefix(value: &str) -> Result<IpNet, UapiError> {
    let net: IpNet = value
        .parse()
        .map_err(|_| invalid(format!("allowed_ip: {value:?} is not a prefix")))?;
    Ok(net.trunc())
}

/// Parses the lines of a set (everything between `set=1` and the blank
/// line).
pub fn parse_set(lines: &[String]) -> Result<SetRequest, UapiError> {
    let mut req = SetRequest::default();
    for line in lines {
        let Some((key, value)) = line.split_once('=') else {
            return Err(UapiError::Protocol(format!(
                "line {:?} is not key=value",
                line.chars().take(64).collect::<String>()
            )));
        };
        if key == "public_key" {
            req.peers.push(PeerBlock {
                public_key: PublicKey::from_bytes(from_hex(value)?),
                ops: Vec::new(),
            });
            continue;
        }
        let Some(peer) = req.peers.last_mut() else {
            match key {
                "private_key" => {
                    let bytes = Zeroizing::new(from_hex(value)?);
                    req.private_key = Some(if bytes.iter().all(|b| *b == 0) {
                        None
                    } else {
                        Some(private_from_bytes(&bytes)?)
                    });
                }
                "listen_port" => req.listen_port = Some(parse_num(key, value)?),
                "fwmark" => req.fwmark = Some(parse_num(key, value)?),
                "replace_peers" => {
                    parse_true(key, value)?;
                    req.replace_peers = true;
                }
                _ => return Err(invalid(format!("unknown device key {key:?}"))),
            }
            continue;
        };
        let op = match key {
            "remove" => parse_true(key, value).map(|()| PeerOp::Remove)?,
            "update_only" => parse_true(key, value).map(|()| PeerOp::UpdateOnly)?,
            "preshared_key" => {
                let k = from_hex(value)?;
                PeerOp::PresharedKey((k != [0; 32]).then_some(k))
            }
            "endpoint" => PeerOp::Endpoint(
                value
                    .parse()
                    .map_err(|_| invalid(format!("endpoint {value:?} is not ip:port")))?,
            ),
            "persistent_keepalive_interval" => PeerOp::PersistentKeepalive(parse_num(key, value)?),
            "replace_allowed_ips" => parse_true(key, value).map(|()| PeerOp::ReplaceAllowedIps)?,
            "allowed_ip" => match value.strip_prefix('-') {
                Some(v) => PeerOp::AllowedIp {
                    net: parse_prefix(v)?,
                    remove: true,
                },
                None => PeerOp::AllowedIp {
                    net: parse_prefix(value)?,
                    remove: false,
                },
            },
            "protocol_version" => {
                if value != "1" {
                    return Err(invalid(format!("protocol_version {value:?}")));
                }
                PeerOp::ProtocolVersion
            }
            _ => return Err(invalid(format!("unknown peer key {key:?}"))),
        };
        peer.ops.push(op);
    }
    Ok(req)
}

/// The configurable state of a device, as UAPI sees it.
#[derive(Debug, Clone, Default)]
pub struct Config {
    pub private_key: Option<PrivateKey>,
    pub listen_port: u16,
    pub fwmark: u32,
    pub peers: BTreeMap<PublicKey, PeerConfig>,
}

impl PartialEq for Config {
    fn eq(&self, other: &Self) -> bool {
        self.private_key.as_ref().map(PrivateKey::public_key)
            == other.private_key.as_ref().map(PrivateKey::public_key)
            && self.listen_port == other.listen_port
            && self.fwmark == other.fwmark
            && self.peers == other.peers
    }
}

/// A peer as UAPI creates it: nothing set, no keepalive.
pub fn new_peer(public_key: PublicKey) -> PeerConfig {
    let mut p = PeerConfig::new(public_key);
    p.persistent_keepalive = None;
    p
}

impl Config {
    /// The configuration after `req`.
    pub fn apply(&self, req: &SetRequest) -> Config {
        let mut c = self.clone();
        if let Some(k) = &req.private_key {
            c.private_key = k.clone();
            if let Some(k) = k {
                // A device cannot be its own peer.
                c.peers.remove(&k.public_key());
            }
        }
        if let Some(p) = req.listen_port {
            c.listen_port = p;
        }
        if let Some(m) = req.fwmark {
            c.fwmark = m;
        }
        if req.replace_peers {
            c.peers.clear();
        }
        let own = c.private_key.as_ref().map(PrivateKey::public_key);
        for block in &req.peers {
            let key = block.public_key;
            // A block for our own key is parsed but changes nothing.
            let mut dummy = own == Some(key);
            let created = !dummy && !c.peers.contains_key(&key);
            if created {
                c.peers.insert(key, new_peer(key));
            }
            for op in &block.ops {
                match op {
                    PeerOp::UpdateOnly => {
                        if created && !dummy {
                            c.peers.remove(&key);
                            dummy = true;
                        }
                    }
                    PeerOp::Remove => {
                        if !dummy {
                            c.peers.remove(&key);
                        }
                        dummy = true;
                    }
                    _ if dummy => {}
                    PeerOp::AllowedIp { net, remove: false } => {
                        // A prefix belongs to one peer: it moves here.
                        for (k, p) in c.peers.iter_mut() {
                            if *k != key {
                                p.allowed_ips.retain(|n| n != net);
                            }
                        }
                        if let Some(p) = c.peers.get_mut(&key) {
                            if !p.allowed_ips.contains(net) {
                                p.allowed_ips.push(*net);
                            }
                        }
                    }
                    op => {
                        let Some(p) = c.peers.get_mut(&key) else {
                            continue;
                        };
                        match op {
                            PeerOp::PresharedKey(k) => p.preshared_key = *k,
                            PeerOp::Endpoint(e) => p.endpoint = Some(*e),
                            PeerOp::PersistentKeepalive(s) => {
                                p.persistent_keepalive = (*s > 0).then_some(*s);
                            }
                            PeerOp::ReplaceAllowedIps => p.allowed_ips.clear(),
                            PeerOp::AllowedIp { net, remove: true } => {
                                p.allowed_ips.retain(|n| n != net);
                            }
                            _ => {}
                        }
                    }
                }
            }
        }
        c
    }

    /// This configuration as a `set` that reproduces it from any state
    /// (what `wg setconf` sends for the file `wg showconf` prints).
    pub fn to_set_lines(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(k) = &self.private_key {
            out.push(format!("private_key={}", to_hex(&private_to_bytes(k))));
        }
        out.push(format!("listen_port={}", self.listen_port));
        out.push(format!("fwmark={}", self.fwmark));
        out.push("replace_peers=true".into());
        for p in self.peers.values() {
            out.push(format!("public_key={}", to_hex(p.public_key.as_bytes())));
            if let Some(k) = &p.preshared_key {
                out.push(format!("preshared_key={}", to_hex(k)));
            }
            if let Some(e) = p.endpoint {
                out.push(format!("endpoint={e}"));
            }
            out.push(format!(
                "persistent_keepalive_interval={}",
                p.persistent_keepalive.unwrap_or(0)
            ));
            out.push("replace_allowed_ips=true".into());
            for n in &p.allowed_ips {
                out.push(format!("allowed_ip={n}"));
            }
        }
        out
    }
}

/// What changes on the device to go from one configuration to another.
#[derive(Debug, Clone, Default)]
pub struct Plan {
    pub private_key: Option<Option<PrivateKey>>,
    pub listen_port: Option<u16>,
    pub fwmark: Option<u32>,
    pub removed: Vec<PublicKey>,
    /// New or changed peers, complete.
    pub upserts: Vec<PeerConfig>,
    /// Peers whose keepalive was just turned on: handshake now, as
    /// wireguard-go sends a keepalive then.
    pub keepalive_on: Vec<PublicKey>,
}

/// The difference between `old` and `new`.
pub fn plan(old: &Config, new: &Config) -> Plan {
    let old_pub = old.private_key.as_ref().map(PrivateKey::public_key);
    let new_pub = new.private_key.as_ref().map(PrivateKey::public_key);
    let mut plan = Plan {
        private_key: (old_pub != new_pub).then(|| new.private_key.clone()),
        listen_port: (old.listen_port != new.listen_port).then_some(new.listen_port),
        fwmark: (old.fwmark != new.fwmark).then_some(new.fwmark),
        ..Plan::default()
    };
    plan.removed = old
        .peers
        .keys()
        .filter(|k| !new.peers.contains_key(k))
        .copied()
        .collect();
    for (k, p) in &new.peers {
        let before = old.peers.get(k);
        if before != Some(p) {
            plan.upserts.push(p.clone());
        }
        let was_on = before.is_some_and(|b| b.persistent_keepalive.is_some());
        if p.persistent_keepalive.is_some() && !was_on {
            plan.keepalive_on.push(*k);
        }
    }
    plan
}

/// One peer as `get` reports it.
#[derive(Debug, Clone)]
pub struct PeerState {
    pub stats: PeerStats,
    pub preshared_key: Option<[u8; 32]>,
}

/// The device as `get` reports it.
#[derive(Debug, Clone)]
pub struct DeviceState {
    pub private_key: Option<PrivateKey>,
    pub listen_port: u16,
    pub fwmark: u32,
    pub peers: Vec<PeerState>,
}

/// The `get` answer (without `errno=0`), wireguard-go's fields and order.
/// The last handshake time is `now` minus the session's age; 0 when there
/// is no session.
pub fn format_get(state: &DeviceState, now: SystemTime) -> String {
    let mut s = String::new();
    if let Some(k) = &state.private_key {
        let _ = writeln!(s, "private_key={}", to_hex(&private_to_bytes(k)));
    }
    if state.listen_port != 0 {
        let _ = writeln!(s, "listen_port={}", state.listen_port);
    }
    if state.fwmark != 0 {
        let _ = writeln!(s, "fwmark={}", state.fwmark);
    }
    for p in &state.peers {
        let st = &p.stats;
        let _ = writeln!(s, "public_key={}", to_hex(st.public_key.as_bytes()));
        let _ = writeln!(
            s,
            "preshared_key={}",
            to_hex(&p.preshared_key.unwrap_or([0; 32]))
        );
        let _ = writeln!(s, "protocol_version=1");
        if let Some(e) = st.endpoint {
            let _ = writeln!(s, "endpoint={e}");
        }
        let (sec, nsec) = st
            .last_handshake_age
            .and_then(|age| now.checked_sub(age))
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or((0, 0), |d| (d.as_secs(), d.subsec_nanos()));
        let _ = writeln!(s, "last_handshake_time_sec={sec}");
        let _ = writeln!(s, "last_handshake_time_nsec={nsec}");
        let _ = writeln!(s, "tx_bytes={}", st.tx_bytes);
        let _ = writeln!(s, "rx_bytes={}", st.rx_bytes);
        let _ = writeln!(
            s,
            "persistent_keepalive_interval={}",
            st.persistent_keepalive.unwrap_or(0)
        );
        for n in &st.allowed_ips {
            let _ = writeln!(s, "allowed_ip={n}");
        }
    }
    s
}

/// Which tunnel a server drives.
pub enum Target {
    /// Standalone mode: UAPI owns the configuration.
    ReadWrite(Arc<Mutex<Standalone>>),
    /// `run` mode: the tunnel on this TUN, read only; the private key in
    /// `key_file` (the agent's) is shown when it matches the device, so
    /// that `wg show` prints the public key.
    ReadOnly {
        interface: String,
        key_file: Option<PathBuf>,
    },
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

fn get_from_view(view: &TunnelView, private_key: Option<&PrivateKey>, fwmark: u32) -> String {
    let state = view.with_device(|dev| {
        let own = dev.public_key();
        DeviceState {
            private_key: private_key.filter(|k| k.public_key() == own).cloned(),
            listen_port: view.local_addr().port(),
            fwmark,
            peers: dev
                .stats()
                .into_iter()
                .map(|stats| PeerState {
                    preshared_key: dev
                        .peer_config(&stats.public_key)
                        .and_then(|c| c.preshared_key),
                    stats,
                })
                .collect(),
        }
    });
    format_get(&state, SystemTime::now())
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

    /// Applies a parsed set: validated whole first, then the port, the
    /// mark, the key and the peers.
    pub fn set(&mut self, req: &SetRequest) -> Result<(), UapiError> {
        let old = self.current()?;
        let new = old.apply(req);
        let plan = plan(&old, &new);
        if let Some(None) = plan.private_key {
            return Err(invalid(
                "clearing the private key is not supported (set another one)",
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
                    .map_err(|e| invalid(e.to_string()))?;
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

struct ConnHandler {
    target: Arc<Target>,
}

impl Handler for ConnHandler {
    fn get(&mut self) -> Result<String, UapiError> {
        match &*self.target {
            Target::ReadWrite(s) => {
                let s = s.lock().unwrap_or_else(|e| e.into_inner());
                Ok(get_from_view(
                    &s.tunnel()?.view(),
                    s.private_key.as_ref(),
                    s.fwmark,
                ))
            }
            Target::ReadOnly {
                interface,
                key_file,
            } => {
                let view = tunnel::running(interface)
                    .ok_or_else(|| UapiError::Io(format!("no tunnel running on {interface}")))?;
                let key = key_file.as_deref().and_then(|p| PrivateKey::load(p).ok());
                Ok(get_from_view(&view, key.as_ref(), 0))
            }
        }
    }

    fn set(&mut self, lines: &[String]) -> Result<(), UapiError> {
        let req = parse_set(lines)?;
        match &*self.target {
            Target::ReadWrite(s) => s.lock().unwrap_or_else(|e| e.into_inner()).set(&req),
            Target::ReadOnly { .. } => {
                warn!(
                    lines = lines.len(),
                    "UAPI set refused: under `tunnel-agent run` the control plane owns the peers"
                );
                Err(UapiError::ReadOnly(
                    "the control plane owns this tunnel's configuration".into(),
                ))
            }
        }
    }
}

/// Errors starting the UAPI server.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("UAPI socket directory {0}: {1}")]
    Dir(PathBuf, io::Error),
    #[error("UAPI socket {0} is in use by another process")]
    InUse(PathBuf),
    #[error("UAPI socket {0}: {1}")]
    Socket(PathBuf, io::Error),
}

/// The listening UAPI socket; dropping it stops accepting and removes the
/// socket file.
pub struct Server {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// The socket path of `interface` in `dir`.
pub fn socket_path(dir: &Path, interface: &str) -> PathBuf {
    dir.join(format!("{interface}.sock"))
}

impl Server {
    /// Listens on `<dir>/<interface>.sock` (directory created 0755 as
    /// wireguard-go does, socket 0600: only root may configure). A stale
    /// socket nobody answers on is replaced; a live one is an error.
    pub fn start(dir: &Path, interface: &str, target: Target) -> Result<Server, ServerError> {
        std::fs::create_dir_all(dir).map_err(|e| ServerError::Dir(dir.to_owned(), e))?;
        let path = socket_path(dir, interface);
        let listener = match UnixListener::bind(&path) {
            Ok(l) => l,
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
                if UnixStream::connect(&path).is_ok() {
                    return Err(ServerError::InUse(path));
                }
                std::fs::remove_file(&path).map_err(|e| ServerError::Socket(path.clone(), e))?;
                UnixListener::bind(&path).map_err(|e| ServerError::Socket(path.clone(), e))?
            }
            Err(e) => return Err(ServerError::Socket(path, e)),
        };
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| ServerError::Socket(path.clone(), e))?;
        let stop = Arc::new(AtomicBool::new(false));
        let target = Arc::new(target);
        let s = stop.clone();
        let thread = std::thread::Builder::new()
            .name("uapi".into())
            .spawn(move || accept_loop(&listener, &s, &target))
            .map_err(|e| ServerError::Socket(path.clone(), e))?;
        info!(socket = %path.display(), "UAPI listening");
        Ok(Server {
            path,
            stop,
            thread: Some(thread),
        })
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn accept_loop(listener: &UnixListener, stop: &AtomicBool, target: &Arc<Target>) {
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok(_) if stop.load(Ordering::Relaxed) => break,
            Ok((stream, _)) => {
                let target = target.clone();
                let spawned =
                    std::thread::Builder::new()
                        .name("uapi-conn".into())
                        .spawn(move || {
                            // Blocking I/O with a bound: a stuck client cannot
                            // hold a thread forever.
                            let _ = stream.set_nonblocking(false);
                            let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
                            let _ = stream.set_write_timeout(Some(Duration::from_secs(30)));
                            let mut h = ConnHandler { target };
                            if let Err(e) = serve_connection(&stream, &mut h) {
                                debug!(error = %e, "UAPI connection ended");
                            }
                        });
                if let Err(e) = spawned {
                    warn!(error = %e, "cannot start a UAPI connection thread");
                }
            }
            Err(e) => {
                warn!(error = %e, "UAPI accept failed");
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wake the blocking accept; it sees the stop flag. If the socket
        // cannot be reached any more the thread is left to the process end.
        if UnixStream::connect(&self.path).is_ok() {
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

    use proptest::prelude::*;

    use super::*;

    fn key(b: u8) -> PublicKey {
        PublicKey::from_bytes([b; 32])
    }

    fn lines(text: &str) -> Vec<String> {
        text.lines().map(str::to_owned).collect()
    }

    fn net(s: &str) -> IpNet {
        s.parse().expect("test prefix")
    }

    /// A handler over a pure [`Config`], as a device would be.
    #[derive(Default)]
    struct Model {
        config: Config,
    }

    impl Handler for Model {
        fn get(&mut self) -> Result<String, UapiError> {
            let state = DeviceState {
                private_key: self.config.private_key.clone(),
                listen_port: self.config.listen_port,
                fwmark: self.config.fwmark,
                peers: self
                    .config
                    .peers
                    .values()
                    .map(|p| PeerState {
                        preshared_key: p.preshared_key,
                        stats: PeerStats {
                            public_key: p.public_key,
                            endpoint: p.endpoint,
                            allowed_ips: p.allowed_ips.clone(),
                            persistent_keepalive: p.persistent_keepalive,
                            rx_packets: 0,
                            rx_bytes: 0,
                            tx_packets: 0,
                            tx_bytes: 0,
                            last_handshake_age: None,
                            handshake_rtt: None,
                            last_receive_age: None,
                        },
                    })
                    .collect(),
            };
            Ok(format_get(&state, SystemTime::now()))
        }
        fn set(&mut self, lines: &[String]) -> Result<(), UapiError> {
            let req = parse_set(lines)?;
            self.config = self.config.apply(&req);
            Ok(())
        }
    }

    fn talk(input: &[u8], h: &mut impl Handler) -> String {
        let mut io = Duplex {
            input: io::Cursor::new(input.to_vec()),
            output: Vec::new(),
        };
        serve_connection(&mut io, h).expect("in-memory I/O");
        String::from_utf8(io.output).expect("replies are UTF-8")
    }

    struct Duplex {
        input: io::Cursor<Vec<u8>>,
        output: Vec<u8>,
    }
    impl io::Read for Duplex {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.input.read(buf)
        }
    }
    impl Write for Duplex {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.output.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// What `wg` reads back from a get: key=value pairs, per device/peer.
    type Pairs = Vec<(String, String)>;

    fn parse_get(text: &str) -> (Pairs, Vec<Pairs>) {
        let mut dev = Vec::new();
        let mut peers: Vec<Vec<(String, String)>> = Vec::new();
        for l in text.lines() {
            let (k, v) = l.split_once('=').expect("get lines are key=value");
            if k == "public_key" {
                peers.push(Vec::new());
            }
            match peers.last_mut() {
                Some(p) => p.push((k.into(), v.into())),
                None => dev.push((k.into(), v.into())),
            }
        }
        (dev, peers)
    }

    #[test]
    fn hex_keys_round_trip_and_refuse_garbage() {
        let k = [0xabu8; 32];
        assert_eq!(to_hex(&k), "ab".repeat(32));
        assert_eq!(from_hex(&"AB".repeat(32)), Ok(k));
        assert!(from_hex("ab").is_err());
        assert!(from_hex(&"zz".repeat(32)).is_err());
        assert!(from_hex(&"é".repeat(32)).is_err());
    }

    #[test]
    fn wg_set_lines_parse() {
        let priv_hex = to_hex(&[0x11; 32]);
        let req = parse_set(&lines(&format!(
            "private_key={priv_hex}\nlisten_port=51820\nfwmark=7\nreplace_peers=true\n\
             public_key={pk}\npreshared_key={psk}\nendpoint=[fd00::1]:4242\n\
             persistent_keepalive_interval=25\nreplace_allowed_ips=true\n\
             allowed_ip=10.1.2.3/24\nallowed_ip=-fd00::/64\nprotocol_version=1\n\
             public_key={pk2}\nremove=true\n",
            pk = to_hex(&[2; 32]),
            psk = to_hex(&[3; 32]),
            pk2 = to_hex(&[4; 32]),
        )))
        .expect("valid set");
        assert!(req.private_key.is_some());
        assert_eq!(req.listen_port, Some(51820));
        assert_eq!(req.fwmark, Some(7));
        assert!(req.replace_peers);
        assert_eq!(
            req.peers,
            vec![
                PeerBlock {
                    public_key: key(2),
                    ops: vec![
                        PeerOp::PresharedKey(Some([3; 32])),
                        PeerOp::Endpoint(SocketAddr::new(
                            IpAddr::V6("fd00::1".parse().expect("v6")),
                            4242
                        )),
                        PeerOp::PersistentKeepalive(25),
                        PeerOp::ReplaceAllowedIps,
                        // Host bits are cleared, as the kernel does.
                        PeerOp::AllowedIp {
                            net: net("10.1.2.0/24"),
                            remove: false
                        },
                        PeerOp::AllowedIp {
                            net: net("fd00::/64"),
                            remove: true
                        },
                        PeerOp::ProtocolVersion,
                    ]
                },
                PeerBlock {
                    public_key: key(4),
                    ops: vec![PeerOp::Remove]
                },
            ]
        );
    }

    #[test]
    fn bad_set_lines_are_refused_with_the_right_errno() {
        let pk = format!("public_key={}", to_hex(&[2; 32]));
        for (text, errno) in [
            ("garbage", errno::EPROTO),
            ("listen_port=65536", errno::EINVAL),
            ("listen_port=-1", errno::EINVAL),
            ("listen_port=+5", errno::EINVAL),
            ("fwmark=4294967296", errno::EINVAL),
            ("replace_peers=false", errno::EINVAL),
            ("bogus=1", errno::EINVAL),
            ("endpoint=1.2.3.4:5", errno::EINVAL), // peer key before any peer
            ("private_key=12", errno::EINVAL),
            ("public_key=xyz", errno::EINVAL),
        ] {
            let e = parse_set(&lines(text)).expect_err(text);
            assert_eq!(e.errno(), errno, "{text}: {e}");
        }
        for line in [
            "endpoint=nohost",
            "endpoint=1.2.3.4",
            "persistent_keepalive_interval=65536",
            "allowed_ip=10.0.0.0/33",
            "allowed_ip=banana",
            "remove=yes",
            "update_only=1",
            "protocol_version=2",
            "listen_port=5",
        ] {
            let e = parse_set(&[pk.clone(), line.to_owned()]).expect_err(line);
            assert_eq!(e.errno(), errno::EINVAL, "{line}: {e}");
        }
    }

    #[test]
    fn set_semantics_follow_wireguard_go() {
        let mut c = Config::default();
        let pk = |b| to_hex(&[b; 32]);
        let set = |c: &Config, text: String| c.apply(&parse_set(&lines(&text)).expect("valid"));
        // New peers have no keepalive unless told.
        c = set(
            &c,
            format!(
                "public_key={}\nallowed_ip=10.0.0.0/24\nendpoint=192.0.2.1:1",
                pk(1)
            ),
        );
        let p1 = &c.peers[&key(1)];
        assert_eq!(p1.persistent_keepalive, None);
        assert_eq!(p1.allowed_ips, vec![net("10.0.0.0/24")]);
        // A prefix moves from peer 1 to peer 2.
        c = set(
            &c,
            format!(
                "public_key={}\nallowed_ip=10.0.0.0/24\nallowed_ip=10.9.0.0/16",
                pk(2)
            ),
        );
        assert!(c.peers[&key(1)].allowed_ips.is_empty());
        assert_eq!(c.peers[&key(2)].allowed_ips.len(), 2);
        // Removing a prefix; replace_allowed_ips drops the earlier ones.
        c = set(&c, format!("public_key={}\nallowed_ip=-10.9.0.0/16", pk(2)));
        assert_eq!(c.peers[&key(2)].allowed_ips, vec![net("10.0.0.0/24")]);
        c = set(
            &c,
            format!(
                "public_key={}\nallowed_ip=10.5.0.0/16\nreplace_allowed_ips=true\nallowed_ip=10.6.0.0/16",
                pk(2)
            ),
        );
        assert_eq!(c.peers[&key(2)].allowed_ips, vec![net("10.6.0.0/16")]);
        // update_only does not create, but updates.
        c = set(
            &c,
            format!(
                "public_key={}\nupdate_only=true\nendpoint=192.0.2.9:9",
                pk(3)
            ),
        );
        assert!(!c.peers.contains_key(&key(3)));
        c = set(
            &c,
            format!(
                "public_key={}\nupdate_only=true\npersistent_keepalive_interval=25",
                pk(1)
            ),
        );
        assert_eq!(c.peers[&key(1)].persistent_keepalive, Some(25));
        c = set(
            &c,
            format!("public_key={}\npersistent_keepalive_interval=0", pk(1)),
        );
        assert_eq!(c.peers[&key(1)].persistent_keepalive, None);
        // remove, and the rest of its block does nothing.
        c = set(
            &c,
            format!("public_key={}\nremove=true\nallowed_ip=10.7.0.0/16", pk(1)),
        );
        assert!(!c.peers.contains_key(&key(1)));
        assert!(c
            .peers
            .values()
            .all(|p| !p.allowed_ips.contains(&net("10.7.0.0/16"))));
        // Our own key is never a peer.
        let own = PrivateKey::generate();
        c = set(
            &c,
            format!("private_key={}", to_hex(&private_to_bytes(&own))),
        );
        c = set(
            &c,
            format!("public_key={}", to_hex(own.public_key().as_bytes())),
        );
        assert!(!c.peers.contains_key(&own.public_key()));
        // replace_peers keeps only what follows.
        c = set(&c, format!("replace_peers=true\npublic_key={}", pk(5)));
        assert_eq!(c.peers.keys().copied().collect::<Vec<_>>(), vec![key(5)]);
    }

    #[test]
    fn get_prints_what_wg_reads() {
        let sk = PrivateKey::generate();
        let now = UNIX_EPOCH + Duration::from_secs(1_000_000) + Duration::from_nanos(500);
        let state = DeviceState {
            private_key: Some(sk.clone()),
            listen_port: 51820,
            fwmark: 0,
            peers: vec![PeerState {
                preshared_key: None,
                stats: PeerStats {
                    public_key: key(9),
                    endpoint: Some(SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), 7)),
                    allowed_ips: vec![net("10.0.0.0/8"), net("fd00::/8")],
                    persistent_keepalive: Some(25),
                    rx_packets: 3,
                    rx_bytes: 300,
                    tx_packets: 4,
                    tx_bytes: 400,
                    last_handshake_age: Some(Duration::from_secs(10)),
                    handshake_rtt: None,
                    last_receive_age: None,
                },
            }],
        };
        let text = format_get(&state, now);
        let expected = format!(
            "private_key={}\nlisten_port=51820\npublic_key={}\npreshared_key={}\n\
             protocol_version=1\nendpoint=[::1]:7\nlast_handshake_time_sec=999990\n\
             last_handshake_time_nsec=500\ntx_bytes=400\nrx_bytes=300\n\
             persistent_keepalive_interval=25\nallowed_ip=10.0.0.0/8\nallowed_ip=fd00::/8\n",
            to_hex(&private_to_bytes(&sk)),
            to_hex(&[9; 32]),
            "0".repeat(64),
        );
        assert_eq!(text, expected);
        // The private key printed is the one we hold.
        let back = private_from_bytes(&from_hex(&to_hex(&private_to_bytes(&sk))).expect("hex"))
            .expect("key");
        assert_eq!(back.public_key(), sk.public_key());
    }

    #[test]
    fn framing_answers_each_operation_and_closes_on_garbage() {
        let mut m = Model::default();
        let pk = to_hex(&[1; 32]);
        let out = talk(
            format!("set=1\npublic_key={pk}\nallowed_ip=10.0.0.0/24\n\nget=1\n\n").as_bytes(),
            &mut m,
        );
        assert_eq!(
            out,
            format!(
                "errno=0\n\npublic_key={pk}\npreshared_key={}\nprotocol_version=1\n\
                 last_handshake_time_sec=0\nlast_handshake_time_nsec=0\ntx_bytes=0\nrx_bytes=0\n\
                 persistent_keepalive_interval=0\nallowed_ip=10.0.0.0/24\nerrno=0\n\n",
                "0".repeat(64)
            )
        );
        // A bad set changes nothing (validated whole), the next op still runs.
        let out = talk(
            b"set=1\nreplace_peers=true\nlisten_port=x\n\nget=1\n\n",
            &mut m,
        );
        assert!(out.starts_with("errno=-22\n\npublic_key="), "{out}");
        assert_eq!(m.config.peers.len(), 1);
        // Unknown operation: errno, then the connection closes.
        assert_eq!(talk(b"hello\nget=1\n\n", &mut m), "errno=-71\n\n");
        assert_eq!(talk(b"get=1\nx\n", &mut m), "errno=-22\n\n");
        // An overlong line is refused, not buffered.
        let long = format!("set=1\n{}\n\n", "a".repeat(MAX_LINE * 4));
        assert_eq!(talk(long.as_bytes(), &mut m), "errno=-71\n\n");
        assert_eq!(talk(b"", &mut m), "");
    }

    fn arb_net() -> impl Strategy<Value = IpNet> {
        prop_oneof![
            (any::<[u8; 4]>(), 0u8..=32).prop_map(|(a, l)| IpNet::new(
                IpAddr::V4(Ipv4Addr::from(a)),
                l
            )
            .expect("valid length")
            .trunc()),
            (any::<[u8; 16]>(), 0u8..=128).prop_map(|(a, l)| IpNet::new(
                IpAddr::V6(Ipv6Addr::from(a)),
                l
            )
            .expect("valid length")
            .trunc()),
        ]
    }

    fn arb_peer() -> impl Strategy<Value = PeerConfig> {
        (
            1u8..8,
            proptest::option::of(any::<[u8; 32]>().prop_filter("zero is none", |k| *k != [0; 32])),
            proptest::option::of((any::<[u8; 4]>(), 1u16..)),
            proptest::collection::vec(arb_net(), 0..4),
            proptest::option::of(1u16..),
        )
            .prop_map(|(k, psk, ep, nets, ka)| {
                let mut p = new_peer(key(k));
                p.preshared_key = psk;
                p.endpoint = ep.map(|(a, port)| SocketAddr::from((a, port)));
                p.allowed_ips = nets;
                p.persistent_keepalive = ka;
                p
            })
    }

    fn arb_config() -> impl Strategy<Value = Config> {
        (
            any::<u16>(),
            any::<u32>(),
            proptest::collection::vec(arb_peer(), 0..5),
        )
            .prop_map(|(port, mark, peers)| {
                let mut c = Config {
                    private_key: None,
                    listen_port: port,
                    fwmark: mark,
                    peers: BTreeMap::new(),
                };
                for mut p in peers {
                    // A prefix belongs to one peer, and once to it.
                    p.allowed_ips.dedup();
                    let mut seen = Vec::new();
                    p.allowed_ips.retain(|n| {
                        let fresh = !seen.contains(n)
                            && c.peers.values().all(|q| !q.allowed_ips.contains(n));
                        seen.push(*n);
                        fresh
                    });
                    c.peers.insert(p.public_key, p);
                }
                c
            })
    }

    proptest! {
        /// `wg setconf` of what `wg showconf` printed reproduces the device
        /// from any previous state, and changes nothing when applied again.
        #[test]
        fn set_of_a_config_reproduces_it(before in arb_config(), wanted in arb_config()) {
            let req = parse_set(&wanted.to_set_lines()).expect("our own set parses");
            let after = before.apply(&req);
            prop_assert_eq!(&after, &wanted);
            let p = plan(&after, &after.apply(&req));
            prop_assert!(p.removed.is_empty() && p.upserts.is_empty() && p.keepalive_on.is_empty());
        }

        /// The plan from one configuration to another, replayed on the
        /// first, gives the second.
        #[test]
        fn plan_replays(old in arb_config(), new in arb_config()) {
            let p = plan(&old, &new);
            let mut c = old.clone();
            for k in &p.removed { c.peers.remove(k); }
            for u in &p.upserts { c.peers.insert(u.public_key, u.clone()); }
            if let Some(port) = p.listen_port { c.listen_port = port; }
            if let Some(m) = p.fwmark { c.fwmark = m; }
            prop_assert_eq!(c, new);
        }

        /// get prints every peer with its prefixes, in wg's grammar.
        #[test]
        fn get_lists_every_peer(c in arb_config()) {
            let mut m = Model { config: c.clone() };
            let text = m.get().expect("model get");
            let (dev, peers) = parse_get(&text);
            prop_assert_eq!(peers.len(), c.peers.len());
            if c.listen_port != 0 {
                prop_assert!(dev.contains(&("listen_port".into(), c.listen_port.to_string())));
            }
            for (p, lines) in c.peers.values().zip(&peers) {
                prop_assert_eq!(&lines[0].1, &to_hex(p.public_key.as_bytes()));
                let ips: Vec<IpNet> = lines.iter().filter(|(k, _)| k == "allowed_ip")
                    .map(|(_, v)| v.parse().expect("prefix")).collect();
                prop_assert_eq!(&ips, &p.allowed_ips);
            }
        }

        /// Garbage never panics: every operation gets exactly one errno
        /// line, and an unparsable one closes the connection.
        #[test]
        fn garbage_gets_errno(input in proptest::collection::vec(any::<u8>(), 0..600)) {
            let mut m = Model::default();
            let out = talk(&input, &mut m);
            let answers = out.matches("errno=").count();
            prop_assert!(out.is_empty() || out.ends_with("\n\n"), "{out:?}");
            prop_assert!(answers >= usize::from(!input.is_empty()), "{out:?}");
            for l in out.lines().filter(|l| l.starts_with("errno=")) {
                let n: i32 = l["errno=".len()..].parse().expect("numeric errno");
                prop_assert!(n <= 0);
            }
        }

        /// Structured garbage: valid framing, random key=value lines.
        #[test]
        fn random_set_lines_never_panic(
            kv in proptest::collection::vec(
                (prop_oneof![
                    Just("public_key"), Just("allowed_ip"), Just("endpoint"),
                    Just("listen_port"), Just("private_key"), Just("remove"),
                    Just("update_only"), Just("replace_peers"), Just("preshared_key"),
                    Just("persistent_keepalive_interval"), Just("fwmark"), Just("x"),
                ], "[ -~]{0,70}"),
                0..12,
            )
        ) {
            let mut text = String::from("set=1\n");
            for (k, v) in &kv { text.push_str(&format!("{k}={v}\n")); }
            text.push('\n');
            let mut m = Model::default();
            let out = talk(text.as_bytes(), &mut m);
            prop_assert!(out.starts_with("errno=") && out.ends_with("\n\n"), "{out:?}");
        }
    }
}
