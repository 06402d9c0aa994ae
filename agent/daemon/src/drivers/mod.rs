//! Drivers: the thin layer that makes the kernel match what `sdn-tunnel-core`
//! decided. They observe and apply, idempotently; they decide nothing beyond
//! the difference between what is installed and what is desired.
//!
//! - [`netlink`]: routes of ours (route protocol [`netlink::ROUTE_PROTOCOL`])
//!   in the pod namespace (`dev wg0`) and the node namespace
//!   (`via <agent pod IP>`), with drift repair and netlink change events;
//! - [`nftables`]: our own nftables tables — TCP MSS clamping in the pod
//!   namespace, the masquerade exemption in the node namespace — replaced
//!   atomically per apply;
//! - [`netns`]: running those against another network namespace (the node's)
//!   from short-lived threads, and namespace sysctls such as loose
//!   reverse-path filtering;
//! - [`proxy`]: the service proxy table (`inet sdn_tunnel_proxy`), rendered
//!   as data and driven through `nft`;
//! - [`conntrack`]: deleting the conntrack entries of UDP/SCTP flows bound to
//!   endpoints that left a frontend.

pub mod conntrack;
pub mod netlink;
pub mod netns;
pub mod nftables;
pub mod proxy;
