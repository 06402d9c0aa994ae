//! The sans-IO WireGuard device: a peer table around boringtun's `Tunn`.
//!
//! `noise::Tunn` implements one point-to-point WireGuard session. A device
//! needs more: pick the peer for an outgoing packet (allowed-IPs lookup on
//! the destination), find the peer for an incoming datagram (the static key
//! inside a handshake initiation, or the receiver index of every other
//! message), drop decrypted packets whose source the peer may not use,
//! learn the peer's endpoint from authenticated packets (roaming), rate
//! limit handshakes with cookie replies, and count what it drops. This
//! module does all of that without any I/O: callers hand in bytes and
//! buffers, and get back what to send where.
//!
//! Hot path: `encapsulate` and `decapsulate` do a hash lookup and a prefix
//! lookup and write into the caller's buffer; they do not allocate (except
//! inside boringtun, which copies a packet into its queue when no session
//! exists yet, i.e. only while a handshake is pending).
//!
//! Time: boringtun 0.7.1 reads its own monotonic clock inside `Tunn` (its
//! only alternative is the `mock-instant` feature, a process-wide mock
//! clock that cargo's feature unification would also switch on for the
//! real agent). So these methods take no `now`; `update_timers` must be
//! called every 100–250 ms, as boringtun's own device does.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use boringtun::noise::errors::WireGuardError;
use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Packet, Tunn, TunnResult};
use boringtun::x25519;
use ipnet::IpNet;
use rand_core::{OsRng, RngCore};

use crate::allowed_ips::AllowedIps;
use crate::keys::{PrivateKey, PublicKey};

/// Persistent keepalive interval used unless a peer says otherwise
/// (seconds). Keeps NAT and conntrack state alive between clusters.
pub const DEFAULT_PERSISTENT_KEEPALIVE: u16 = 25;

/// Handshake messages per second the device verifies before it answers
/// with cookie replies instead (boringtun's device uses the same figure).
pub const DEFAULT_HANDSHAKE_RATE_LIMIT: u64 = 100;

/// WireGuard data message overhead: header (16) + AEAD tag (16).
pub const DATA_OVERHEAD: usize = 32;

/// The largest WireGuard message that is not a data message (handshake
/// initiation); every output buffer must hold at least this much.
pub const MIN_OUT_BUFFER: usize = 148;

/// Receiver indices carry the peer's index in their upper 24 bits (boringtun
/// shifts the index we give `Tunn::new` left by 8 and counts sessions in
/// the low byte).
const PEER_INDEX_MASK: u32 = 0x00ff_ffff;

/// Why a packet or datagram was dropped. Counted per device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DropReason {
    /// Not a WireGuard message / not an IP packet, or truncated.
    Malformed,
    /// Handshake message whose MAC1 is wrong (not meant for our key).
    InvalidMac,
    /// Authentication failed: AEAD tag, handshake decryption, wrong key.
    DecryptFailed,
    /// A replayed data counter or handshake timestamp.
    Replay,
    /// No peer for this static key or receiver index.
    UnknownPeer,
    /// Decrypted packet whose source address the peer may not use.
    DisallowedSource,
    /// No peer's allowed IPs contain the destination of an outgoing packet.
    NoRoute,
    /// The peer has no endpoint yet (none configured, none learned).
    NoEndpoint,
    /// Data for a session we do not have (expired, or never established).
    NoSession,
    /// A handshake message that does not fit the handshake state.
    UnexpectedHandshake,
    /// Handshake dropped under load; a cookie reply was sent instead.
    UnderLoad,
    /// The session gave up (rekey attempts exhausted).
    Expired,
    /// The caller's output buffer cannot hold the result.
    BufferTooSmall,
}

impl DropReason {
    /// Every reason, in counter order.
    pub const ALL: [DropReason; 13] = [
        DropReason::Malformed,
        DropReason::InvalidMac,
        DropReason::DecryptFailed,
        DropReason::Replay,
        DropReason::UnknownPeer,
        DropReason::DisallowedSource,
        DropReason::NoRoute,
        DropReason::NoEndpoint,
        DropReason::NoSession,
        DropReason::UnexpectedHandshake,
        DropReason::UnderLoad,
        DropReason::Expired,
        DropReason::BufferTooSmall,
    ];

    /// Stable snake_case name, for metrics labels.
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::Malformed => "malformed",
            DropReason::InvalidMac => "invalid_mac",
            DropReason::DecryptFailed => "decrypt_failed",
            DropReason::Replay => "replay",
            DropReason::UnknownPeer => "unknown_peer",
            DropReason::DisallowedSource => "disallowed_source",
            DropReason::NoRoute => "no_route",
            DropReason::NoEndpoint => "no_endpoint",
            DropReason::NoSession => "no_session",
            DropReason::UnexpectedHandshake => "unexpected_handshake",
            DropReason::UnderLoad => "under_load",
            DropReason::Expired => "expired",
            DropReason::BufferTooSmall => "buffer_too_small",
        }
    }

    fn from_wireguard(e: &WireGuardError) -> DropReason {
        match e {
            WireGuardError::InvalidMac => DropReason::InvalidMac,
            WireGuardError::InvalidAeadTag | WireGuardError::WrongKey => DropReason::DecryptFailed,
            WireGuardError::InvalidCounter
            | WireGuardError::DuplicateCounter
            | WireGuardError::WrongTai64nTimestamp => DropReason::Replay,
            WireGuardError::NoCurrentSession => DropReason::NoSession,
            WireGuardError::UnexpectedPacket | WireGuardError::WrongIndex => {
                DropReason::UnexpectedHandshake
            }
            WireGuardError::UnderLoad => DropReason::UnderLoad,
            WireGuardError::ConnectionExpired => DropReason::Expired,
            WireGuardError::DestinationBufferTooSmall => DropReason::BufferTooSmall,
            WireGuardError::InvalidTai64nTimestamp
            | WireGuardError::IncorrectPacketLength
            | WireGuardError::WrongPacketType
            | WireGuardError::InvalidPacket
            | WireGuardError::LockFailed => DropReason::Malformed,
        }
    }
}

impl std::fmt::Display for DropReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Device-wide drop counters, one per [`DropReason`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DropCounters([u64; DropReason::ALL.len()]);

impl DropCounters {
    /// Drops counted for `reason`.
    pub fn get(&self, reason: DropReason) -> u64 {
        self.0[reason as usize]
    }

    /// Sum over all reasons.
    pub fn total(&self) -> u64 {
        self.0.iter().sum()
    }

    /// `(reason, count)` for every reason, zeros included (metrics want
    /// every series to exist).
    pub fn iter(&self) -> impl Iterator<Item = (DropReason, u64)> + '_ {
        DropReason::ALL.iter().map(|r| (*r, self.get(*r)))
    }

    fn bump(&mut self, reason: DropReason) {
        self.0[reason as usize] += 1;
    }
}

/// What the caller must do after a device call. Slices borrow the caller's
/// output buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome<'a> {
    /// Nothing to send or write (a keepalive arrived, a cookie was stored,
    /// or a packet was queued behind a handshake already in flight).
    Done,
    /// Send this UDP payload to `to`.
    Network {
        /// Destination endpoint.
        to: SocketAddr,
        /// The WireGuard message.
        datagram: &'a [u8],
    },
    /// Write this decrypted IP packet to the TUN device.
    Tunnel {
        /// The IP packet, source already checked against allowed IPs.
        packet: &'a [u8],
    },
    /// Dropped, and counted under this reason.
    Dropped(DropReason),
}

/// Errors from peer configuration.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DeviceError {
    /// A peer cannot be configured with our own public key.
    #[error("peer {0} has the device's own public key")]
    OwnKey(PublicKey),
}

/// Desired configuration of one peer (what UAPI `set` and the control plane
/// provide).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerConfig {
    /// The peer's static public key: its identity.
    pub public_key: PublicKey,
    /// Optional pre-shared key mixed into the handshake.
    pub preshared_key: Option<[u8; 32]>,
    /// Where to send; `None` keeps whatever endpoint is known (configured
    /// earlier or learned from the peer's packets).
    pub endpoint: Option<SocketAddr>,
    /// Prefixes this peer may send from and receives traffic for.
    pub allowed_ips: Vec<IpNet>,
    /// Persistent keepalive interval in seconds; `None` disables it.
    pub persistent_keepalive: Option<u16>,
}

impl PeerConfig {
    /// A peer with the default keepalive and nothing else set.
    pub fn new(public_key: PublicKey) -> Self {
        Self {
            public_key,
            preshared_key: None,
            endpoint: None,
            allowed_ips: Vec::new(),
            persistent_keepalive: Some(DEFAULT_PERSISTENT_KEEPALIVE),
        }
    }
}

/// What [`Device::set_peer`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerChange {
    /// A new peer was added.
    Added,
    /// An existing peer was updated in place; its session is kept.
    Updated,
    /// Key material or keepalive changed, which boringtun only takes at
    /// construction: the peer's session was reset (this peer only).
    Recreated,
}

/// Counters and state of one peer, for status, metrics and UAPI `get`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerStats {
    /// The peer.
    pub public_key: PublicKey,
    /// Current endpoint, configured or learned.
    pub endpoint: Option<SocketAddr>,
    /// Its allowed IPs, as the table holds them now.
    pub allowed_ips: Vec<IpNet>,
    /// Persistent keepalive interval in seconds.
    pub persistent_keepalive: Option<u16>,
    /// Authenticated datagrams received from the peer (all message types).
    pub rx_packets: u64,
    /// Their UDP payload bytes.
    pub rx_bytes: u64,
    /// Datagrams sent to the peer (all message types).
    pub tx_packets: u64,
    /// Their UDP payload bytes.
    pub tx_bytes: u64,
    /// Age of the current session, `None` if there is none. Advances with
    /// [`Device::update_timers`] (boringtun's timers tick there).
    pub last_handshake_age: Option<Duration>,
    /// Round trip of the last handshake we initiated (millisecond
    /// resolution), `None` until we have initiated one.
    pub handshake_rtt: Option<Duration>,
    /// Time since anything authenticated was last received from the peer
    /// (timer-tick resolution, see [`Device::update_timers`]); `None` if
    /// nothing ever was. With persistent keepalives on both sides, a long
    /// silence means the path is broken even while the session lives on.
    pub last_receive_age: Option<Duration>,
}

struct Peer {
    tunn: Tunn,
    public_key: PublicKey,
    preshared_key: Option<[u8; 32]>,
    persistent_keepalive: Option<u16>,
    endpoint: Option<SocketAddr>,
    rx_packets: u64,
    rx_bytes: u64,
    tx_packets: u64,
    tx_bytes: u64,
    /// `rx_packets` at the timer tick that last saw it change, and when:
    /// the receive clock costs one comparison per peer and tick, nothing
    /// per packet.
    rx_seen: u64,
    last_receive: Option<Instant>,
}

impl Peer {
    fn count_tx(&mut self, len: usize) {
        self.tx_packets += 1;
        self.tx_bytes += len as u64;
    }

    fn count_rx(&mut self, len: usize) {
        self.rx_packets += 1;
        self.rx_bytes += len as u64;
    }
}

/// WireGuard's message type of a handshake initiation (first byte).
const HANDSHAKE_INITIATION: u8 = 1;

/// Device settings.
#[derive(Debug, Clone)]
pub struct DeviceConfig {
    /// Our static private key.
    pub private_key: PrivateKey,
    /// Handshake messages per second verified before answering with cookie
    /// replies (WireGuard's DoS protection).
    pub handshake_rate_limit: u64,
}

impl DeviceConfig {
    /// Defaults for everything but the key.
    pub fn new(private_key: PrivateKey) -> Self {
        Self {
            private_key,
            handshake_rate_limit: DEFAULT_HANDSHAKE_RATE_LIMIT,
        }
    }
}

/// A WireGuard device without I/O. See the module documentation.
pub struct Device {
    private: x25519::StaticSecret,
    public: x25519::PublicKey,
    /// Decides, for the whole device, when handshakes get cookie replies.
    rate_limiter: Arc<RateLimiter>,
    /// Handed to every `Tunn`. `Tunn::decapsulate` always runs its own
    /// limiter (boringtun 0.7.1 keeps the verified-packet entry point
    /// crate-private), and we have already applied the device limiter, so
    /// this one only re-checks MAC1 and never reports load.
    verify_only: Arc<RateLimiter>,
    /// Peers by their 24-bit index (upper bits of receiver indices).
    peers: HashMap<u32, Peer>,
    by_key: HashMap<PublicKey, u32>,
    allowed_ips: AllowedIps<u32>,
    drops: DropCounters,
    /// Kept to rebuild the limiter when the private key changes.
    handshake_rate_limit: u64,
    /// Peers whose boringtun queue may hold packets to send after a
    /// handshake; drained by [`Device::next_queued`].
    to_flush: Vec<u32>,
    /// Handshake initiations sent (first attempts and retries), for
    /// `/metrics`: boringtun's own per-retry log lines are filtered out.
    handshake_initiations: u64,
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device")
            .field("public_key", &self.public_key())
            .field("peers", &self.peers.len())
            .field("drops", &self.drops)
            .finish_non_exhaustive()
    }
}

impl Device {
    /// A device with no peers.
    pub fn new(config: DeviceConfig) -> Self {
        let private = config.private_key.to_static_secret();
        let public = x25519::PublicKey::from(&private);
        Self {
            rate_limiter: Arc::new(RateLimiter::new(&public, config.handshake_rate_limit)),
            verify_only: Arc::new(RateLimiter::new(&public, u64::MAX)),
            private,
            public,
            peers: HashMap::new(),
            by_key: HashMap::new(),
            allowed_ips: AllowedIps::new(),
            drops: DropCounters::default(),
            handshake_rate_limit: config.handshake_rate_limit,
            to_flush: Vec::new(),
            handshake_initiations: 0,
        }
    }

    /// Our public key.
    pub fn public_key(&self) -> PublicKey {
        PublicKey::from(self.public)
    }

    /// Replace our static key (UAPI `private_key=`). Every session is
    /// cleared, since it was keyed to the old identity; peers keep their
    /// endpoints, allowed IPs and counters and handshake again on demand.
    /// A peer whose key equals the new public key is removed, as the kernel
    /// does (a device cannot be its own peer); returns whether that
    /// happened. Setting the current key again changes nothing.
    pub fn set_private_key(&mut self, key: &PrivateKey) -> bool {
        let private = key.to_static_secret();
        let public = x25519::PublicKey::from(&private);
        if public == self.public {
            return false;
        }
        self.rate_limiter = Arc::new(RateLimiter::new(&public, self.handshake_rate_limit));
        self.verify_only = Arc::new(RateLimiter::new(&public, u64::MAX));
        self.private = private;
        self.public = public;
        let removed_self = self.remove_peer(&PublicKey::from(public));
        for peer in self.peers.values_mut() {
            peer.tunn.set_static_private(
                self.private.clone(),
                self.public,
                Some(Arc::clone(&self.verify_only)),
            );
        }
        self.to_flush.clear();
        removed_self
    }

    /// Number of peers.
    pub fn peer_count(&self) -> usize {
        self.peers.len()
    }

    /// Device-wide drop counters.
    pub fn drops(&self) -> DropCounters {
        self.drops
    }

    fn new_tunn(&self, cfg: &PeerConfig, index: u32) -> Tunn {
        Tunn::new(
            self.private.clone(),
            cfg.public_key.to_x25519(),
            cfg.preshared_key,
            cfg.persistent_keepalive,
            index,
            Some(Arc::clone(&self.verify_only)),
        )
    }

    fn fresh_index(&self) -> u32 {
        loop {
            let idx = OsRng.next_u32() & PEER_INDEX_MASK;
            if !self.peers.contains_key(&idx) {
                return idx;
            }
        }
    }

    /// Add a peer or update an existing one, leaving every other peer's
    /// session untouched. Allowed IPs are replaced by `cfg.allowed_ips`;
    /// a prefix another peer held moves to this one. The endpoint is
    /// replaced only if `cfg.endpoint` is set.
    pub fn set_peer(&mut self, cfg: PeerConfig) -> Result<PeerChange, DeviceError> {
        if cfg.public_key == self.public_key() {
            return Err(DeviceError::OwnKey(cfg.public_key));
        }
        let (idx, change) = match self.by_key.get(&cfg.public_key).copied() {
            Some(idx) => {
                let tunn_changed = self.peers.get(&idx).is_some_and(|p| {
                    p.preshared_key != cfg.preshared_key
                        || p.persistent_keepalive != cfg.persistent_keepalive
                });
                let new_tunn = tunn_changed.then(|| self.new_tunn(&cfg, idx));
                if let Some(peer) = self.peers.get_mut(&idx) {
                    if let Some(t) = new_tunn {
                        peer.tunn = t;
                        peer.preshared_key = cfg.preshared_key;
                        peer.persistent_keepalive = cfg.persistent_keepalive;
                    }
                    if cfg.endpoint.is_some() {
                        peer.endpoint = cfg.endpoint;
                    }
                }
                let change = if tunn_changed {
                    PeerChange::Recreated
                } else {
                    PeerChange::Updated
                };
                (idx, change)
            }
            None => {
                let idx = self.fresh_index();
                let peer = Peer {
                    tunn: self.new_tunn(&cfg, idx),
                    public_key: cfg.public_key,
                    preshared_key: cfg.preshared_key,
                    persistent_keepalive: cfg.persistent_keepalive,
                    endpoint: cfg.endpoint,
                    rx_packets: 0,
                    rx_bytes: 0,
                    tx_packets: 0,
                    tx_bytes: 0,
                    rx_seen: 0,
                    last_receive: None,
                };
                self.peers.insert(idx, peer);
                self.by_key.insert(cfg.public_key, idx);
                (idx, PeerChange::Added)
            }
        };
        self.allowed_ips.retain(|_, owner| *owner != idx);
        for net in &cfg.allowed_ips {
            self.allowed_ips.insert(*net, idx);
        }
        Ok(change)
    }

    /// Start a handshake with a peer now instead of waiting for its first
    /// packet, so a freshly configured mesh is up before traffic needs it
    /// (the kernel does the same when a persistent keepalive is set).
    /// Returns `Done` when the peer is unknown or a handshake is already in
    /// flight, and drops with `NoEndpoint` when there is nowhere to send.
    pub fn initiate_handshake<'a>(&mut self, key: &PublicKey, out: &'a mut [u8]) -> Outcome<'a> {
        if out.len() < MIN_OUT_BUFFER {
            return self.dropped(DropReason::BufferTooSmall);
        }
        let Some(peer) = self.by_key.get(key).and_then(|i| self.peers.get_mut(i)) else {
            return Outcome::Done;
        };
        let Some(to) = peer.endpoint else {
            return self.dropped(DropReason::NoEndpoint);
        };
        match peer.tunn.format_handshake_initiation(out, false) {
            TunnResult::WriteToNetwork(datagram) => {
                peer.count_tx(datagram.len());
                self.handshake_initiations += 1;
                Outcome::Network { to, datagram }
            }
            TunnResult::Err(e) => self.dropped(DropReason::from_wireguard(&e)),
            _ => Outcome::Done,
        }
    }

    /// Remove a peer: its session ends, its prefixes route nowhere, and its
    /// datagrams count as `UnknownPeer`. Returns whether it existed.
    pub fn remove_peer(&mut self, key: &PublicKey) -> bool {
        let Some(idx) = self.by_key.remove(key) else {
            return false;
        };
        self.peers.remove(&idx);
        self.allowed_ips.retain(|_, owner| *owner != idx);
        self.to_flush.retain(|i| *i != idx);
        true
    }

    /// Handshake initiations sent so far (first attempts and retries).
    pub fn handshake_initiations(&self) -> u64 {
        self.handshake_initiations
    }

    /// Keys of all peers.
    pub fn peer_keys(&self) -> impl Iterator<Item = &PublicKey> + '_ {
        self.by_key.keys()
    }

    fn stats_of(&self, idx: u32, peer: &Peer) -> PeerStats {
        let allowed_ips = self.prefixes_of(idx);
        PeerStats {
            public_key: peer.public_key,
            endpoint: peer.endpoint,
            allowed_ips,
            persistent_keepalive: peer.persistent_keepalive,
            rx_packets: peer.rx_packets,
            rx_bytes: peer.rx_bytes,
            tx_packets: peer.tx_packets,
            tx_bytes: peer.tx_bytes,
            last_handshake_age: peer.tunn.time_since_last_handshake(),
            handshake_rtt: peer
                .tunn
                .stats()
                .4
                .map(|ms| Duration::from_millis(u64::from(ms))),
            last_receive_age: peer.last_receive.map(|t| t.elapsed()),
        }
    }

    /// The configuration a peer has now: allowed IPs as the table holds
    /// them (prefixes may have moved to other peers), the current endpoint
    /// (possibly learned by roaming). Feeding it back to [`Device::set_peer`]
    /// changes nothing; UAPI `get`/`set` build on it.
    pub fn peer_config(&self, key: &PublicKey) -> Option<PeerConfig> {
        let idx = *self.by_key.get(key)?;
        let peer = self.peers.get(&idx)?;
        Some(PeerConfig {
            public_key: peer.public_key,
            preshared_key: peer.preshared_key,
            endpoint: peer.endpoint,
            allowed_ips: self.prefixes_of(idx),
            persistent_keepalive: peer.persistent_keepalive,
        })
    }

    fn prefixes_of(&self, idx: u32) -> Vec<IpNet> {
        self.allowed_ips
            .iter()
            .filter(|(_, owner)| **owner == idx)
            .map(|(net, _)| net)
            .collect()
    }

    /// Snapshot of one peer.
    pub fn peer_stats(&self, key: &PublicKey) -> Option<PeerStats> {
        let idx = *self.by_key.get(key)?;
        let peer = self.peers.get(&idx)?;
        Some(self.stats_of(idx, peer))
    }

    /// Snapshot of all peers, sorted by public key (stable output for
    /// status and `wg show`).
    pub fn stats(&self) -> Vec<PeerStats> {
        let mut all: Vec<_> = self
            .peers
            .iter()
            .map(|(idx, p)| self.stats_of(*idx, p))
            .collect();
        all.sort_by_key(|s| s.public_key);
        all
    }

    fn dropped(&mut self, reason: DropReason) -> Outcome<'static> {
        self.drops.bump(reason);
        Outcome::Dropped(reason)
    }

    /// Encrypt an IP packet read from the TUN device for the peer whose
    /// allowed IPs contain its destination. `out` must hold
    /// `packet.len() + DATA_OVERHEAD` and at least [`MIN_OUT_BUFFER`]
    /// bytes. Without a session the packet is queued inside the peer and a
    /// handshake initiation is returned instead.
    pub fn encapsulate<'a>(&mut self, packet: &[u8], out: &'a mut [u8]) -> Outcome<'a> {
        let Some(dst) = Tunn::dst_address(packet) else {
            return self.dropped(DropReason::Malformed);
        };
        let Some(&idx) = self.allowed_ips.lookup(dst) else {
            return self.dropped(DropReason::NoRoute);
        };
        if out.len() < packet.len() + DATA_OVERHEAD || out.len() < MIN_OUT_BUFFER {
            return self.dropped(DropReason::BufferTooSmall);
        }
        let Some(peer) = self.peers.get_mut(&idx) else {
            // Unreachable by construction (prefixes are removed with their
            // peer); counted rather than trusted.
            return self.dropped(DropReason::NoRoute);
        };
        let Some(to) = peer.endpoint else {
            return self.dropped(DropReason::NoEndpoint);
        };
        match peer.tunn.encapsulate(packet, out) {
            TunnResult::WriteToNetwork(datagram) => {
                peer.count_tx(datagram.len());
                Outcome::Network { to, datagram }
            }
            TunnResult::Done => Outcome::Done,
            TunnResult::Err(e) => self.dropped(DropReason::from_wireguard(&e)),
            // Encapsulation never yields plaintext.
            TunnResult::WriteToTunnelV4(..) | TunnResult::WriteToTunnelV6(..) => {
                self.dropped(DropReason::Malformed)
            }
        }
    }

    /// Handle one UDP datagram received from `src`. `out` must hold
    /// `datagram.len()` and at least [`MIN_OUT_BUFFER`] bytes.
    ///
    /// Afterwards call [`Device::next_queued`] until it returns `Done`: a
    /// completed handshake releases the packets that waited for it. In a
    /// batch this may wait until the whole batch is processed.
    pub fn decapsulate<'a>(
        &mut self,
        src: SocketAddr,
        datagram: &[u8],
        out: &'a mut [u8],
    ) -> Outcome<'a> {
        if out.len() < datagram.len() || out.len() < MIN_OUT_BUFFER {
            return self.dropped(DropReason::BufferTooSmall);
        }
        // MAC1 and load check first: cheap, and it keeps unauthenticated
        // senders from making us do Diffie-Hellman under load.
        let mut cookie = [0u8; 64];
        let packet = match self
            .rate_limiter
            .verify_packet(Some(src.ip()), datagram, &mut cookie)
        {
            Ok(p) => p,
            Err(TunnResult::WriteToNetwork(reply)) => {
                let n = reply.len();
                self.drops.bump(DropReason::UnderLoad);
                out[..n].copy_from_slice(&cookie[..n]);
                return Outcome::Network {
                    to: src,
                    datagram: &out[..n],
                };
            }
            Err(TunnResult::Err(e)) => return self.dropped(DropReason::from_wireguard(&e)),
            Err(_) => return self.dropped(DropReason::Malformed),
        };
        let idx = match packet {
            Packet::HandshakeInit(ref init) => {
                match parse_handshake_anon(&self.private, &self.public, init) {
                    Ok(half) => {
                        let key = PublicKey::from_bytes(half.peer_static_public);
                        match self.by_key.get(&key) {
                            Some(idx) => *idx,
                            None => return self.dropped(DropReason::UnknownPeer),
                        }
                    }
                    Err(_) => return self.dropped(DropReason::DecryptFailed),
                }
            }
            Packet::HandshakeResponse(ref p) => p.receiver_idx >> 8,
            Packet::PacketCookieReply(ref p) => p.receiver_idx >> 8,
            Packet::PacketData(ref p) => p.receiver_idx >> 8,
        };
        let Some(peer) = self.peers.get_mut(&idx) else {
            return self.dropped(DropReason::UnknownPeer);
        };
        let result = peer.tunn.decapsulate(Some(src.ip()), datagram, out);
        if !matches!(result, TunnResult::Err(_)) {
            // Authenticated: this is where the peer is now (roaming).
            peer.endpoint = Some(src);
            peer.count_rx(datagram.len());
        }
        match result {
            TunnResult::Done => {
                // A keepalive or cookie: the session may have just become
                // usable for packets queued behind the handshake.
                if !self.to_flush.contains(&idx) {
                    self.to_flush.push(idx);
                }
                Outcome::Done
            }
            TunnResult::WriteToNetwork(reply) => {
                peer.count_tx(reply.len());
                if !self.to_flush.contains(&idx) {
                    self.to_flush.push(idx);
                }
                Outcome::Network {
                    to: src,
                    datagram: reply,
                }
            }
            TunnResult::WriteToTunnelV4(packet, from) => {
                self.check_source(idx, IpAddr::V4(from), packet)
            }
            TunnResult::WriteToTunnelV6(packet, from) => {
                self.check_source(idx, IpAddr::V6(from), packet)
            }
            TunnResult::Err(e) => self.dropped(DropReason::from_wireguard(&e)),
        }
    }

    fn check_source<'a>(&mut self, idx: u32, from: IpAddr, packet: &'a mut [u8]) -> Outcome<'a> {
        if self.allowed_ips.lookup(from) == Some(&idx) {
            Outcome::Tunnel { packet }
        } else {
            self.dropped(DropReason::DisallowedSource)
        }
    }

    /// Next packet that was queued behind a handshake, encrypted now that
    /// a session exists. Returns `Done` when nothing is left.
    pub fn next_queued<'a>(&mut self, out: &'a mut [u8]) -> Outcome<'a> {
        if out.len() < MIN_OUT_BUFFER {
            return self.dropped(DropReason::BufferTooSmall);
        }
        // Find a peer with something to send without holding a borrow of
        // `out` across loop iterations, then produce its datagram once.
        let base = out.as_ptr() as usize;
        let mut found = None;
        while let Some(&idx) = self.to_flush.last() {
            let Some(peer) = self.peers.get_mut(&idx) else {
                self.to_flush.pop();
                continue;
            };
            match peer.tunn.decapsulate(None, &[], out) {
                TunnResult::WriteToNetwork(d) => {
                    let start = d.as_ptr() as usize - base;
                    found = Some((idx, start..start + d.len()));
                    break;
                }
                _ => {
                    self.to_flush.pop();
                }
            }
        }
        let Some((idx, range)) = found else {
            return Outcome::Done;
        };
        let Some(peer) = self.peers.get_mut(&idx) else {
            return Outcome::Done;
        };
        match peer.endpoint {
            Some(to) => {
                peer.count_tx(range.len());
                Outcome::Network {
                    to,
                    datagram: &out[range],
                }
            }
            None => self.dropped(DropReason::NoEndpoint),
        }
    }

    /// Run every peer's timers: handshake (re)initiation, keepalives,
    /// session expiry. `send` is called for each datagram to send; the
    /// slice is only valid during the call. Call every 100–250 ms.
    pub fn update_timers(&mut self, out: &mut [u8], mut send: impl FnMut(SocketAddr, &[u8])) {
        // The device limiter is shared, so no Tunn resets it; boringtun
        // only resets once a second has passed since the last reset.
        self.rate_limiter.reset_count();
        if out.len() < MIN_OUT_BUFFER {
            self.drops.bump(DropReason::BufferTooSmall);
            return;
        }
        let now = Instant::now();
        for peer in self.peers.values_mut() {
            if peer.rx_packets != peer.rx_seen {
                peer.rx_seen = peer.rx_packets;
                peer.last_receive = Some(now);
            }
            match peer.tunn.update_timers(out) {
                TunnResult::WriteToNetwork(datagram) => match peer.endpoint {
                    Some(to) => {
                        peer.count_tx(datagram.len());
                        if datagram.first() == Some(&HANDSHAKE_INITIATION) {
                            self.handshake_initiations += 1;
                        }
                        send(to, datagram);
                    }
                    None => self.drops.bump(DropReason::NoEndpoint),
                },
                // `ConnectionExpired` repeats on every tick once a peer
                // gave up until new traffic restarts the handshake: a
                // state, not a dropped packet.
                TunnResult::Done | TunnResult::Err(_) => {}
                TunnResult::WriteToTunnelV4(..) | TunnResult::WriteToTunnelV6(..) => {}
            }
        }
    }
}
