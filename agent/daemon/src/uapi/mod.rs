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
//! [`Server`] listens on the unix socket and drives a [`Configurable`]
//! tunnel (read and write, standalone mode: `standalone::Standalone`)
//! or a running tunnel found by interface name
//! (read only, under `tunnel-agent run`, where the control plane owns the
//! peers: a `set` there would be undone at the next reconcile, so it is
//! refused with `errno=-1` (EPERM) and logged).
//!
//! Rooms: [`proto`] (the wire protocol: framing, set lines, get answer,
//! hex keys), [`config`] (`set` semantics on a configuration, and the plan
//! of device changes), [`server`] (the unix socket server).

pub mod config;
pub mod proto;
pub mod server;
#[cfg(test)]
mod tests;

pub use config::{new_peer, plan, Config, Plan};
pub use proto::{
    errno, format_get, from_hex, parse_set, read_request, serve_connection, to_hex, DeviceState,
    Handler, PeerBlock, PeerOp, PeerState, Request, SetRequest, UapiError, MAX_LINE,
};
pub use server::{
    get_from_view, socket_path, Configurable, Server, ServerError, Target, DEFAULT_SOCKET_DIR,
};
