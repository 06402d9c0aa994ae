//! The I/O layer of the data path: the only place that touches file
//! descriptors, and the only module allowed to use `unsafe` (each block
//! carries a `// SAFETY:` comment).
//!
//! Built directly on `libc` (ioctls, `recvmmsg`/`sendmmsg`, control
//! messages) and `nix` (`setns`); no extra crates.
//!
//! - [`tun`]: the TUN device (`IFF_TUN | IFF_NO_PI`, multi-queue, MTU, up),
//!   non-blocking single-packet reads and writes into caller buffers.
//! - [`offload`]: `virtio_net_hdr`, splitting TSO/USO super-packets read
//!   from the TUN, coalescing TCP segments written to it (GRO).
//! - [`udp`]: UDP sockets, optionally created inside another network
//!   namespace, `SO_REUSEPORT` for several workers, batched
//!   `recvmmsg`/`sendmmsg` into caller-owned reusable buffers.
//! - [`netns`]: run a closure on a short-lived thread inside another
//!   network namespace.

#![allow(unsafe_code)]

pub mod netns;
pub mod offload;
pub(crate) mod sys;
pub mod tun;
pub mod udp;

#[cfg(test)]
mod alloc_check;
#[cfg(test)]
pub(crate) mod testns;

pub use offload::GroBatch;
pub use tun::{Tun, TunOffloads, TunOptions, TunReadBuf, TunWriteReport};
pub use udp::{BatchFull, RecvBatch, SendBatch, SendReport, UdpOptions, UdpSocket};
