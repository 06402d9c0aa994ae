//! The wire protocol: framing one `get=1` / `set=1` operation
//! ([`read_request`], [`serve_connection`] for a [`Handler`]), the lines
//! of a set ([`parse_set`] into a [`SetRequest`]), the `get` answer
//! ([`format_get`]), the hex keys and the errno values of the replies.

use std::fmt::Write as _;
use std::io::{self, BufRead, Read, Write};
use std::net::SocketAddr;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use ipnet::IpNet;
use sdn_tunnel_datapath::device::PeerStats;
use sdn_tunnel_datapath::keys::{PrivateKey, PublicKey};
use tracing::debug;
use zeroize::Zeroizing;

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

pub(super) fn invalid(what: impl Into<String>) -> UapiError {
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
    hex::encode(key)
}

/// Parses 64 hex digits (either case) into a key.
pub fn from_hex(text: &str) -> Result<[u8; 32], UapiError> {
    if text.len() != 64 {
        return Err(invalid(format!(
            "key must be 64 hex digits, got {}",
            text.len()
        )));
    }
    let mut key = [0u8; 32];
    hex::decode_to_slice(text, &mut key).map_err(|_| invalid("key has a non-hex digit"))?;
    Ok(key)
}

pub(super) fn private_from_bytes(bytes: &[u8; 32]) -> Result<PrivateKey, UapiError> {
    let text = Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(bytes));
    PrivateKey::from_base64(&text).map_err(|e| invalid(format!("private key: {e}")))
}

pub(super) fn private_to_bytes(key: &PrivateKey) -> Zeroizing<[u8; 32]> {
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
