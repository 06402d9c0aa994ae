//! sdn-tunnel data path: WireGuard in user space on top of boringtun's
//! sans-IO `noise::Tunn` (one per remote peer), an allowed-IP longest-prefix
//! table, and the TUN/UDP I/O layer (batched syscalls, offloads).
//!
//! Only the `io` module (to come) may use `unsafe`, each block with a
//! `// SAFETY:` comment.
