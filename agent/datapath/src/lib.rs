//! sdn-tunnel data path: WireGuard in user space on top of boringtun's
//! sans-IO `noise::Tunn` (one per remote peer), an allowed-IP longest-prefix
//! table, and the TUN/UDP I/O layer (batched syscalls, offloads).
//!
//! - [`allowed_ips`]: longest-prefix table from prefixes to peers.
//! - [`keys`]: X25519 keys in WireGuard text form, the 0600 key file.
//! - [`device`]: the sans-IO device (peer table, encapsulate/decapsulate,
//!   timers, roaming, cookie replies, counters).
//!
//! Only the `io` module (to come) may use `unsafe`, each block with a
//! `// SAFETY:` comment.

#![deny(unsafe_code)]

pub mod allowed_ips;
pub mod device;
pub mod io;
pub mod keys;
pub mod runtime;

pub use allowed_ips::AllowedIps;
pub use device::{
    Device, DeviceConfig, DeviceError, DropCounters, DropReason, Outcome, PeerChange, PeerConfig,
    PeerStats,
};
pub use keys::{KeyFileError, KeyFormatError, PrivateKey, PublicKey};
