//! The I/O layer of the data path: the only place that touches file
//! descriptors, and the only module allowed to use `unsafe` (each block
//! carries a `// SAFETY:` comment).
//!
//! Built directly on `libc` (ioctls, `recvmmsg`/`sendmmsg`, `writev`,
//! control messages) and `nix` (`setns`); no extra crates.
//!
//! - [`tun`]: the TUN device (`IFF_TUN | IFF_NO_PI`, `IFF_MULTI_QUEUE`, MTU
//!   and link state by ioctl), optionally with `IFF_VNET_HDR` and
//!   `TUNSETOFFLOAD` (TSO4/6, USO); [`Tun::read_packets`] splits
//!   super-packets, [`Tun::write_batch`] writes a [`GroBatch`] coalesced.
//! - [`offload`]: the pure part of that: `virtio_net_hdr`, [`offload::split`]
//!   of TSO/USO super-packets, [`GroBatch`] coalescing TCP (and UDP) flows.
//! - [`udp`]: UDP sockets, optionally created inside another network
//!   namespace, `SO_REUSEPORT` groups for several workers, batched
//!   `recvmmsg`/`sendmmsg` into caller-owned reusable [`RecvBatch`] /
//!   [`SendBatch`], with UDP GSO (`UDP_SEGMENT`) and GRO (`UDP_GRO`) probed
//!   and falling back to plain datagrams.
//! - [`netns`]: run a closure on a short-lived thread inside another
//!   network namespace.
//!
//! A worker owns one TUN queue ([`Tun::clone_queue`]), one socket of the
//! group, and one set of batches; after setup none of the batched calls
//! allocates (checked by a counting allocator in the tests).

#![allow(unsafe_code)]

pub mod netns;
pub mod offload;
pub(crate) mod sys;
pub use sys::release_free_memory;
pub mod tun;
pub mod udp;

#[cfg(test)]
mod alloc_check;
#[cfg(test)]
pub(crate) mod testns;

pub use offload::GroBatch;
pub use tun::{Tun, TunOffloads, TunOptions, TunReadBuf, TunWriteReport};
pub use udp::{BatchFull, RecvBatch, SendBatch, SendReport, UdpOffloads, UdpOptions, UdpSocket};
