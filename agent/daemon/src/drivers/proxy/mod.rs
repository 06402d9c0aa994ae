//! Service proxying in the agent's pod namespace: remote
//! `ClusterIP:port/protocol` → one ready remote endpoint, with nftables.
//!
//! Our own table, [`PROXY_TABLE`] (`inet sdn_tunnel_proxy`), separate from
//! [`crate::drivers::nftables::POD_TABLE`] so that neither apply replaces the other.
//! Every Service is *data* (map and set elements); the rules are a fixed
//! few plus one small chain per endpoint count in use:
//!
//! ```text
//! table inet sdn_tunnel_proxy {
//!   map services_v4  { type ipv4_addr . inet_proto . inet_service : verdict
//!                      elements = { 10.102.0.10 . tcp . 80 : goto pick_random_2_v4,
//!                                   10.102.0.11 . udp . 53 : goto pick_hash_3_v4, ... } }
//!   map endpoint_addrs_v4 { type ipv4_addr . inet_proto . inet_service . mark : ipv4_addr
//!                      elements = { 10.102.0.10 . tcp . 80 . 0 : 10.2.1.5,
//!                                   10.102.0.10 . tcp . 80 . 1 : 10.2.2.5, ... } }
//!   map service_ports_v4 { type ipv4_addr . inet_proto . inet_service : inet_service
//!                      elements = { 10.102.0.10 . tcp . 80 : 8080, ... } }
//!   map endpoint_ports_v4 { keys of endpoint_addrs_v4 : inet_service
//!                      (only frontends whose endpoints listen on different
//!                      ports, a named targetPort; their chains end in _ports) }
//!   set no_endpoints_v4  { type ipv4_addr . inet_proto . inet_service }
//!   set service_cidrs_v4 { type ipv4_addr; flags interval }
//!   (and the v6 twins)
//!   chain pick_random_2_v4 {
//!     meta mark set numgen random mod 2 counter
//!     dnat ip to ip daddr . meta l4proto . th dport . meta mark map @endpoint_addrs_v4
//!                : ip daddr . meta l4proto . th dport map @service_ports_v4
//!   }
//!   chain pick_hash_3_v4 {     (sessionAffinity: ClientIP)
//!     meta mark set jhash ip saddr mod 3 seed 0x… counter
//!     dnat ip to ip daddr . meta l4proto . th dport . meta mark map @endpoint_addrs_v4
//!                : ip daddr . meta l4proto . th dport map @service_ports_v4
//!   }
//!   chain pick_random_2_v4_ports {   (per-endpoint ports)
//!     meta mark set numgen random mod 2 counter
//!     dnat ip to ip daddr . meta l4proto . th dport . meta mark map @endpoint_addrs_v4
//!                : ip daddr . meta l4proto . th dport . meta mark map @endpoint_ports_v4
//!   }
//!   chain nat_prerouting { type nat hook prerouting priority dstnat
//!     ip daddr . meta l4proto . th dport vmap @services_v4 ; ip6 twin }
//!   chain nat_output     { type nat hook output priority dstnat; same }
//!   chain refuse { no_endpoints / service_cidrs → reject with tcp reset | icmpx port-unreachable }
//!   chain filter_forward { type filter hook forward priority filter; jump refuse }
//!   chain filter_output  { type filter hook output priority filter; jump refuse }
//! }
//! ```
//!
//! Per packet: one verdict-map lookup whatever the number of services, two
//! rules in a pick chain, two map lookups for the endpoint. A frontend's
//! port is one element when its endpoints share it (the common case), so
//! 10 000 services × 10 endpoints are 110 000 elements, not 200 000: the
//! full table loads in half the time. Only the first
//! packet of a connection traverses nat chains; conntrack applies the
//! binding to the rest and reverses it for replies. The packet mark is
//! used as scratch for the endpoint index (libnftables 1.0 cannot type a
//! map key with a bare `numgen`); it is set on the first packet only, in
//! the agent's own namespace, and is scrubbed when the packet leaves it.
//! After prerouting DNAT the destination is a remote pod IP, which the
//! pod's `dev wg0` routes send into the tunnel. A frontend with no ready
//! endpoint is not in the verdict map: its packets keep the ClusterIP, are
//! routed towards `wg0`, and the forward filter refuses them (TCP reset /
//! ICMP port unreachable) — as it does any other port of a remote service
//! CIDR, which no tunnel peer would take.
//!
//! Why elements and not a chain per Service (the first version of this
//! driver, and kube-proxy's nftables mode): each chain's rule needs an
//! anonymous map, the kernel names anonymous sets by scanning the table's
//! sets (quadratic), and `nft` reloads every chain and rule on each call.
//! With elements, an endpoint change is a few element commands, and the
//! table holds a handful of rules whatever the number of Services.
//!
//! When an endpoint leaves a UDP or SCTP frontend, the conntrack entries
//! that still bind clients to it are deleted (ctnetlink, [`crate::drivers::conntrack`]),
//! so a client that keeps its source port moves to a current endpoint
//! instead of talking to the old one until its entry times out. TCP
//! connections are left to end by themselves.
//!
//! Updates: the first apply, and then every [`ProxyDriver::full_every`],
//! replaces the whole table in one transaction (drift repair; pick chains
//! no longer used go then). In between, an apply sends only the
//! difference from what it last installed — map and set elements deleted
//! or added, a pick chain added when a new endpoint count appears — also as
//! one transaction. If that fails (someone deleted our table, say), the
//! driver falls back to a full replacement at once.
//!
//! Rooms: [`render`] (the table as data and its nftables JSON, pure),
//! [`driver`] (running it through `nft`), and [`crate::drivers::conntrack`]
//! (the ctnetlink client that deletes stale flows).

pub mod driver;
pub mod render;
#[cfg(test)]
mod tests;

pub use driver::{ApplyReport, ProxyDriver};
pub use render::{
    base_objects, full_batch, incremental_commands, stale_flows, table_objects, Pick, Rendered,
    DSTNAT_PRIORITY, FILTER_PRIORITY, PROXY_TABLE,
};
