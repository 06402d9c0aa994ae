//! Routes over rtnetlink: make one network namespace's routes that are *ours*
//! match a desired set, and never touch anyone else's.
//!
//! "Ours" is decided by the route protocol number ([`ROUTE_PROTOCOL`]), the
//! tag the kernel stores with every route (`ip route ... proto 0x5d`). The
//! driver lists the namespace's routes, keeps those with our protocol, diffs
//! them against the desired set with the pure [`plan`] and applies only the
//! difference. Routes are identified by `(table, destination, metric)`, the
//! key the kernel itself uses to tell routes apart.
//!
//! Never touching foreign routes shapes the netlink flags used:
//! - no `NLM_F_REPLACE`: the kernel replaces the first route with the same
//!   `(table, dst, tos, metric)` whatever its protocol, which may be a foreign
//!   one. A changed route of ours is deleted (a delete that names our
//!   protocol and next hop, which the kernel matches exactly) and re-added;
//! - adds use `NLM_F_EXCL`. If a foreign route holds the same key, IPv4 lets
//!   ours coexist as a second entry (`NLM_F_APPEND`; the foreign one, being
//!   first, keeps precedence: reported as *shadowed*), while IPv6 would merge
//!   the two into one multipath route, so there the route is reported as a
//!   *conflict* and left out.
//!
//! The driver can work on another namespace: its netlink socket is opened on
//! a short-lived thread that entered that namespace (see
//! [`super::netns`]) and is then driven from tokio.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use futures::StreamExt;
use ipnet::IpNet;
use rtnetlink::packet_core::{
    NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_APPEND, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL,
    NLM_F_REQUEST,
};
use rtnetlink::packet_route::link::LinkFlags;
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteFlags, RouteHeader, RouteMessage, RouteProtocol, RouteScope,
    RouteType,
};
use rtnetlink::packet_route::{AddressFamily, RouteNetlinkMessage};
use rtnetlink::MulticastGroup;
use thiserror::Error;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use super::netns::{self, NetnsError};

/// The route protocol number that marks a route as installed by sdn-tunnel
/// (`proto 0x5d` = 93 in `ip route`). Unassigned in the kernel's
/// `rtnetlink.h` and iproute2's `rt_protos`; everything with it is ours and
/// everything without it is left alone.
pub const ROUTE_PROTOCOL: u8 = 0x5d;

/// The main routing table (`RT_TABLE_MAIN`).
pub const MAIN_TABLE: u32 = 254;

/// The metric the kernel stores for IPv6 routes added with metric 0
/// (`IP6_RT_PRIO_USER`); normalised so that desired and installed compare
/// equal.
const IPV6_DEFAULT_METRIC: u32 = 1024;

const ENOENT: i32 = 2;
const ESRCH: i32 = 3;
const EEXIST: i32 = 17;

/// Errors of the route driver.
#[derive(Debug, Error)]
pub enum RouteError {
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error("open netlink socket in {netns}: {source}")]
    Socket {
        netns: String,
        source: std::io::Error,
    },
    #[error("netlink {op} {what}: {message} (errno {errno})")]
    Kernel {
        op: &'static str,
        what: String,
        errno: i32,
        message: String,
    },
    #[error("netlink {op}: {message}")]
    Protocol { op: &'static str, message: String },
    #[error("no interface named {0:?}")]
    NoSuchLink(String),
    #[error("{0} is not directly reachable (the kernel routes it via {1}); a route via it would not work")]
    NotOnLink(IpAddr, IpAddr),
    #[error("{0} is a local address of this namespace, not a next hop")]
    LocalAddress(IpAddr),
    #[error("the kernel returned no usable route to {0}")]
    NoRoute(IpAddr),
    #[error("desired routes conflict: {0} and {1} have the same table, destination and metric")]
    DesiredConflict(Route, Route),
    #[error("next hop {0} and destination {1} are of different address families")]
    FamilyMismatch(IpAddr, IpNet),
    /// Some changes failed; the others were applied (see `report`).
    #[error("{failed} route change(s) failed, the rest applied; first: {first}")]
    Partial {
        failed: usize,
        first: Box<RouteError>,
        report: Box<ApplyReport>,
    },
}

/// Where a route sends packets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum NextHop {
    /// Straight out of an interface (`dev wg0`): in the agent's pod namespace.
    Dev { oif: u32 },
    /// To a gateway through an interface (`via <agent pod IP> dev cbr0`): in
    /// the node namespace. `onlink` tells the kernel not to check that the
    /// gateway is covered by a link route (needed for /32 host routes of
    /// point-to-point veths).
    Via {
        gateway: IpAddr,
        oif: u32,
        onlink: bool,
    },
}

/// What identifies a route for the kernel (and for the diff).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RouteKey {
    pub table: u32,
    pub dst: IpNet,
    pub metric: u32,
}

/// One route, ours or foreign.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Route {
    pub key: RouteKey,
    pub next_hop: NextHop,
}

impl Route {
    /// `dst dev <oif>` in the main table, metric 0.
    pub fn dev(dst: IpNet, oif: u32) -> Self {
        Self::in_table(dst, NextHop::Dev { oif }, MAIN_TABLE, 0)
    }

    /// `dst <next_hop>` in the main table, metric 0 (see [`RouteDriver::resolve_next_hop`]).
    pub fn via(dst: IpNet, next_hop: NextHop) -> Self {
        Self::in_table(dst, next_hop, MAIN_TABLE, 0)
    }

    /// Any table and metric. The destination is truncated to its network
    /// address (the kernel refuses host bits) and an IPv6 metric of 0 becomes
    /// the 1024 the kernel would store, so desired and installed compare equal.
    pub fn in_table(dst: IpNet, next_hop: NextHop, table: u32, metric: u32) -> Self {
        Route {
            key: RouteKey { table, dst, metric },
            next_hop,
        }
        .normalized()
    }

    fn normalized(mut self) -> Self {
        self.key.dst = self.key.dst.trunc();
        if matches!(self.key.dst, IpNet::V6(_)) && self.key.metric == 0 {
            self.key.metric = IPV6_DEFAULT_METRIC;
        }
        self
    }

    fn is_v6(&self) -> bool {
        matches!(self.key.dst, IpNet::V6(_))
    }
}

impl fmt::Display for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.key.dst)?;
        match self.next_hop {
            NextHop::Dev { oif } => write!(f, " dev #{oif}")?,
            NextHop::Via {
                gateway,
                oif,
                onlink,
            } => {
                write!(f, " via {gateway} dev #{oif}")?;
                if onlink {
                    f.write_str(" onlink")?;
                }
            }
        }
        write!(f, " table {} metric {}", self.key.table, self.key.metric)
    }
}

/// A route as found in the kernel, with the protocol that tells whose it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct InstalledRoute {
    pub route: Route,
    pub protocol: u8,
}

impl InstalledRoute {
    pub fn is_ours(&self) -> bool {
        self.protocol == ROUTE_PROTOCOL
    }
}

/// One step that brings the kernel to the desired set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum RouteChange {
    /// Remove a route of ours that is not desired (or a duplicate).
    Delete(Route),
    /// Our route for this key points elsewhere than desired.
    Replace { old: Route, new: Route },
    /// A desired route is missing.
    Add(Route),
}

/// Computes the changes that turn the installed routes *of ours* into
/// `desired`. Foreign routes (another protocol) in `installed` are ignored:
/// no change ever names one. Deletes come first (they free keys), then
/// replaces, then adds. Identical duplicates in `desired` collapse; two
/// desired routes with the same key but different next hops are an error,
/// since the kernel could only keep one of them.
pub fn plan(
    installed: &[InstalledRoute],
    desired: &[Route],
) -> Result<Vec<RouteChange>, RouteError> {
    let mut want: BTreeMap<RouteKey, Route> = BTreeMap::new();
    for route in desired.iter().map(|r| r.normalized()) {
        check_family(&route)?;
        if let Some(prev) = want.insert(route.key, route) {
            if prev != route {
                return Err(RouteError::DesiredConflict(prev, route));
            }
        }
    }
    let mut ours: BTreeMap<RouteKey, Vec<Route>> = BTreeMap::new();
    for installed in installed.iter().filter(|r| r.is_ours()) {
        ours.entry(installed.route.key)
            .or_default()
            .push(installed.route);
    }

    let mut deletes = Vec::new();
    let mut replaces = Vec::new();
    let mut adds = Vec::new();
    for (key, mut have) in ours.iter().map(|(k, v)| (*k, v.clone())) {
        have.sort();
        match want.get(&key) {
            None => deletes.extend(have.into_iter().map(RouteChange::Delete)),
            Some(new) => {
                if let Some(pos) = have.iter().position(|r| r == new) {
                    have.remove(pos);
                    deletes.extend(have.into_iter().map(RouteChange::Delete));
                } else {
                    let old = have.remove(0);
                    deletes.extend(have.into_iter().map(RouteChange::Delete));
                    replaces.push(RouteChange::Replace { old, new: *new });
                }
            }
        }
    }
    for (key, route) in &want {
        if !ours.contains_key(key) {
            adds.push(RouteChange::Add(*route));
        }
    }
    deletes.extend(replaces);
    deletes.extend(adds);
    Ok(deletes)
}

/// What one [`RouteDriver::apply`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ApplyReport {
    pub added: Vec<Route>,
    pub replaced: Vec<Route>,
    pub deleted: Vec<Route>,
    /// Installed, but a foreign IPv4 route with the same key comes first and
    /// carries the traffic.
    pub shadowed: Vec<Route>,
    /// Not installed: a foreign IPv6 route holds the same key.
    pub conflicts: Vec<Route>,
}

impl ApplyReport {
    /// Whether the kernel's routes changed.
    pub fn changed(&self) -> bool {
        !(self.added.is_empty() && self.replaced.is_empty() && self.deleted.is_empty())
    }
}

/// A route netlink event, as delivered by [`RouteEvents`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
///
/// Events are triggers for a reapply, not a mirror of the table: the kernel
/// does not announce every removal (IPv4 routes flushed with a device that
/// goes away produce no `RTM_DELROUTE`), so a periodic resync stays needed.
pub struct RouteEvent {
    /// The route went away (`RTM_DELROUTE`) rather than appeared.
    pub removed: bool,
    /// The route carries our protocol.
    pub ours: bool,
    pub dst: Option<IpNet>,
    /// The socket's receive buffer overflowed and events were lost
    /// (`ENOBUFS`). Delivered with `removed` and `ours` set, since one of the
    /// lost events may have been the removal of a route of ours: reapply.
    pub overrun: bool,
    /// An interface was just set up (`RTM_NEWLINK` with `IFF_UP` changed to
    /// on). When a device goes down, IPv4 flushes every route through it
    /// *without* sending `RTM_DELROUTE`; the device coming back is the
    /// moment our routes can and must be restored, so this is delivered with
    /// `removed` and `ours` set too. `dst` is `None`.
    pub link_up: bool,
}

/// Kills the task driving a netlink connection when the owner goes away.
#[derive(Debug)]
struct ConnectionTask(JoinHandle<()>);

impl Drop for ConnectionTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Applies desired route sets to one network namespace.
#[derive(Debug)]
pub struct RouteDriver {
    handle: rtnetlink::Handle,
    netns: Option<PathBuf>,
    _connection: ConnectionTask,
}

impl RouteDriver {
    /// Opens a netlink socket in `netns` (`/run/netns/<name>`,
    /// `/proc/<pid>/ns/net`, or `None` for the caller's namespace). Must be
    /// called inside a tokio runtime, which then drives the socket.
    pub async fn open(netns: Option<&Path>) -> Result<Self, RouteError> {
        let runtime = tokio::runtime::Handle::current();
        let (connection, handle, _messages) = netns::in_netns_async(netns, move || {
            // The socket is created (and registered with the runtime's
            // reactor) here, inside the target namespace, and stays bound
            // to it after this thread exits.
            let _enter = runtime.enter();
            rtnetlink::new_connection_with_strict_check()
        })
        .await?
        .map_err(|source| RouteError::Socket {
            netns: netns::describe(netns),
            source,
        })?;
        let task = tokio::spawn(connection);
        Ok(RouteDriver {
            handle,
            netns: netns.map(Path::to_path_buf),
            _connection: ConnectionTask(task),
        })
    }

    /// The namespace this driver works on (`None`: the agent's own).
    pub fn netns(&self) -> Option<&Path> {
        self.netns.as_deref()
    }

    /// Index of the interface `name` in this namespace.
    pub async fn link_index(&self, name: &str) -> Result<u32, RouteError> {
        let mut links = self
            .handle
            .link()
            .get()
            .match_name(name.to_string())
            .execute();
        match links.next().await {
            Some(Ok(link)) => Ok(link.header.index),
            Some(Err(rtnetlink::Error::NetlinkError(e)))
                if -e.raw_code() == 19 /* ENODEV */ =>
            {
                Err(RouteError::NoSuchLink(name.to_string()))
            }
            Some(Err(e)) => Err(kernel_error("get link", name.to_string(), e)),
            None => Err(RouteError::NoSuchLink(name.to_string())),
        }
    }

    /// Resolves how this namespace reaches `gateway` (the agent pod's IP, in
    /// the node namespace): asks the kernel for the FIB entry that matches it
    /// (`ip route get fibmatch`) and returns a [`NextHop::Via`] through that
    /// entry's device. Whatever the CNI built (a bridge such as `cbr0` with a
    /// connected subnet route, or a point-to-point veth with a /32 route) is
    /// found this way rather than assumed.
    ///
    /// `onlink` is set for IPv4 unless the match is a link-scope route. CNI
    /// `ptp` (kindnet) gives the node a *host*-scope `/32` to the pod; a
    /// route `via` such a gateway is accepted by the kernel but resolved with
    /// host scope, and the gateway is then silently ignored (the node would
    /// ARP for the final destination). `onlink` makes the kernel treat the
    /// gateway as a neighbour on that device. IPv6 has no such quirk (its
    /// routes all report universe scope, and a gateway covered by a route on
    /// the device is used as such), so it never gets `onlink`.
    pub async fn resolve_next_hop(&self, gateway: IpAddr) -> Result<NextHop, RouteError> {
        let mut message = RouteMessage::default();
        message.header.address_family = family_of(gateway);
        message.header.destination_prefix_length = if gateway.is_ipv4() { 32 } else { 128 };
        message.header.flags = RouteFlags::FibMatch;
        message
            .attributes
            .push(RouteAttribute::Destination(RouteAddress::from(gateway)));
        let mut request = NetlinkMessage::from(RouteNetlinkMessage::GetRoute(message));
        request.header.flags = NLM_F_REQUEST;
        let mut handle = self.handle.clone();
        let mut responses = handle.request(request).map_err(|e| RouteError::Protocol {
            op: "get route",
            message: e.to_string(),
        })?;
        while let Some(msg) = responses.next().await {
            match msg.payload {
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewRoute(route)) => {
                    if route.header.kind == RouteType::Local {
                        return Err(RouteError::LocalAddress(gateway));
                    }
                    let mut oif = None;
                    for attr in &route.attributes {
                        match attr {
                            RouteAttribute::Oif(i) => oif = Some(*i),
                            RouteAttribute::Gateway(gw) => {
                                if let Some(gw) = route_address(gw) {
                                    if gw != gateway {
                                        return Err(RouteError::NotOnLink(gateway, gw));
                                    }
                                }
                            }
                            _ => {}
                        }
                    }
                    let oif = oif.ok_or(RouteError::NoRoute(gateway))?;
                    let onlink = gateway.is_ipv4() && route.header.scope != RouteScope::Link;
                    debug!(%gateway, oif, onlink, scope = ?route.header.scope, "resolved next hop");
                    return Ok(NextHop::Via {
                        gateway,
                        oif,
                        onlink,
                    });
                }
                NetlinkPayload::Error(e) if e.code.is_some() => {
                    return Err(kernel_error_msg("get route", gateway.to_string(), &e));
                }
                _ => {}
            }
        }
        Err(RouteError::NoRoute(gateway))
    }

    /// Every unicast route of the namespace (all tables, both families),
    /// ours and foreign. Cached clones and multipath routes are skipped (we
    /// never install either).
    pub async fn installed(&self) -> Result<Vec<InstalledRoute>, RouteError> {
        self.dump(None).await
    }

    /// Our routes only. The socket has `NETLINK_GET_STRICT_CHK` on, so the
    /// kernel (4.20+) filters the dump by protocol itself and a node with a
    /// large routing table (BGP, thousands of pod routes) costs nothing per
    /// reapply; older kernels ignore the filter and the protocol check here
    /// (and in [`plan`]) does the same job.
    pub async fn installed_ours(&self) -> Result<Vec<InstalledRoute>, RouteError> {
        let mut routes = self.dump(Some(ROUTE_PROTOCOL)).await?;
        routes.retain(InstalledRoute::is_ours);
        Ok(routes)
    }

    async fn dump(&self, protocol: Option<u8>) -> Result<Vec<InstalledRoute>, RouteError> {
        let mut out = Vec::new();
        for family in [AddressFamily::Inet, AddressFamily::Inet6] {
            let mut message = RouteMessage::default();
            message.header.address_family = family;
            if let Some(protocol) = protocol {
                message.header.protocol = RouteProtocol::from(protocol);
            }
            let mut request = NetlinkMessage::from(RouteNetlinkMessage::GetRoute(message));
            request.header.flags = NLM_F_REQUEST | NLM_F_DUMP;
            let mut handle = self.handle.clone();
            let mut responses = handle.request(request).map_err(|e| RouteError::Protocol {
                op: "dump routes",
                message: e.to_string(),
            })?;
            while let Some(msg) = responses.next().await {
                match msg.payload {
                    NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewRoute(route)) => {
                        // With IPv6 disabled (ipv6.disable=1) the kernel
                        // answers an AF_INET6 dump with *every* family's
                        // routes (its PF_UNSPEC fallback); keeping only the
                        // family asked for avoids seeing our IPv4 routes
                        // twice and deleting the "duplicate".
                        if route.header.address_family != family {
                            continue;
                        }
                        if let Some(route) = parse_route(&route) {
                            out.push(route);
                        }
                    }
                    NetlinkPayload::Error(e) if e.code.is_some() => {
                        return Err(kernel_error_msg("dump routes", format!("{family:?}"), &e));
                    }
                    _ => {}
                }
            }
        }
        Ok(out)
    }

    /// Makes this namespace's routes of ours equal to `desired` (the whole
    /// set: anything of ours not in it is deleted). Idempotent; calling it
    /// again after someone deleted or changed one of our routes repairs it.
    pub async fn apply(&self, desired: &[Route]) -> Result<ApplyReport, RouteError> {
        let installed = self.installed_ours().await?;
        let changes = plan(&installed, desired)?;
        let mut report = ApplyReport::default();
        // One bad route (its device gone, say) must not keep the others
        // from being reconciled: apply every change, then report failures.
        let mut failed = Vec::new();
        for change in changes {
            if let Err(e) = self.apply_change(change, &mut report).await {
                warn!(netns = %netns::describe(self.netns()), ?change, error = %e, "route change failed");
                failed.push(e);
            }
        }
        for route in &report.conflicts {
            warn!(netns = %netns::describe(self.netns()), %route, "a foreign IPv6 route holds this destination and metric; ours is not installed");
        }
        for route in &report.shadowed {
            warn!(netns = %netns::describe(self.netns()), %route, "a foreign route with the same destination and metric takes precedence over ours");
        }
        if report.changed() {
            info!(netns = %netns::describe(self.netns()), added = report.added.len(), replaced = report.replaced.len(), deleted = report.deleted.len(), "routes reconciled");
        }
        let total = failed.len();
        match failed.into_iter().next() {
            None => Ok(report),
            Some(first) => Err(RouteError::Partial {
                failed: total,
                first: Box::new(first),
                report: Box::new(report),
            }),
        }
    }

    async fn apply_change(
        &self,
        change: RouteChange,
        report: &mut ApplyReport,
    ) -> Result<(), RouteError> {
        match change {
            RouteChange::Delete(route) => {
                self.delete(&route).await?;
                report.deleted.push(route);
            }
            RouteChange::Replace { old, new } => {
                self.delete(&old).await?;
                match self.add(&new).await? {
                    AddOutcome::Added => report.replaced.push(new),
                    AddOutcome::Shadowed => {
                        report.replaced.push(new);
                        report.shadowed.push(new);
                    }
                    AddOutcome::Conflict => report.conflicts.push(new),
                }
            }
            RouteChange::Add(route) => match self.add(&route).await? {
                AddOutcome::Added => report.added.push(route),
                AddOutcome::Shadowed => {
                    report.added.push(route);
                    report.shadowed.push(route);
                }
                AddOutcome::Conflict => report.conflicts.push(route),
            },
        }
        Ok(())
    }

    /// Removes every route of ours from the namespace (clean shutdown), and
    /// nothing else. Returns how many were removed.
    pub async fn remove_all(&self) -> Result<usize, RouteError> {
        let report = self.apply(&[]).await?;
        Ok(report.deleted.len())
    }

    async fn add(&self, route: &Route) -> Result<AddOutcome, RouteError> {
        match self
            .send(
                RouteNetlinkMessage::NewRoute(route_message(route, false)),
                NLM_F_CREATE | NLM_F_EXCL,
                "add route",
                route,
            )
            .await
        {
            Ok(()) => Ok(AddOutcome::Added),
            Err(RouteError::Kernel { errno: EEXIST, .. }) if route.is_v6() => {
                Ok(AddOutcome::Conflict)
            }
            Err(RouteError::Kernel { errno: EEXIST, .. }) => {
                // A foreign IPv4 route with our key: coexist behind it.
                self.send(
                    RouteNetlinkMessage::NewRoute(route_message(route, false)),
                    NLM_F_CREATE | NLM_F_APPEND,
                    "append route",
                    route,
                )
                .await?;
                Ok(AddOutcome::Shadowed)
            }
            Err(e) => Err(e),
        }
    }

    async fn delete(&self, route: &Route) -> Result<(), RouteError> {
        // The message names our protocol and the exact next hop, so the
        // kernel only ever matches our own entry (fib_table_delete and
        // ip6_route_del both compare the protocol when it is set).
        match self
            .send(
                RouteNetlinkMessage::DelRoute(route_message(route, true)),
                0,
                "delete route",
                route,
            )
            .await
        {
            Err(RouteError::Kernel { errno, .. }) if errno == ESRCH || errno == ENOENT => {
                debug!(%route, "already gone");
                Ok(())
            }
            other => other,
        }
    }

    async fn send(
        &self,
        payload: RouteNetlinkMessage,
        flags: u16,
        op: &'static str,
        route: &Route,
    ) -> Result<(), RouteError> {
        let mut request = NetlinkMessage::from(payload);
        request.header.flags = NLM_F_REQUEST | NLM_F_ACK | flags;
        let mut handle = self.handle.clone();
        let mut responses = handle.request(request).map_err(|e| RouteError::Protocol {
            op,
            message: e.to_string(),
        })?;
        while let Some(msg) = responses.next().await {
            if let NetlinkPayload::Error(e) = msg.payload {
                if e.code.is_some() {
                    return Err(kernel_error_msg(op, route.to_string(), &e));
                }
            }
        }
        debug!(op, %route, "ok");
        Ok(())
    }
}

enum AddOutcome {
    Added,
    Shadowed,
    Conflict,
}

/// A subscription to IPv4 and IPv6 route changes (`RTNLGRP_IPV4_ROUTE`,
/// `RTNLGRP_IPV6_ROUTE`) and link changes (`RTNLGRP_LINK`) of one
/// namespace, so drift (someone deleting our route, an interface going down
/// and taking routes with it) triggers a reapply at once instead of at the
/// next periodic resync.
#[derive(Debug)]
pub struct RouteEvents {
    messages: futures::channel::mpsc::UnboundedReceiver<(
        NetlinkMessage<RouteNetlinkMessage>,
        rtnetlink::sys::SocketAddr,
    )>,
    _connection: ConnectionTask,
}

impl RouteEvents {
    /// Subscribes in `netns` (see [`RouteDriver::open`]).
    pub async fn subscribe(netns: Option<&Path>) -> Result<Self, RouteError> {
        let runtime = tokio::runtime::Handle::current();
        let (connection, _handle, messages) = netns::in_netns_async(netns, move || {
            let _enter = runtime.enter();
            rtnetlink::new_multicast_connection(&[
                MulticastGroup::Ipv4Route,
                MulticastGroup::Ipv6Route,
                MulticastGroup::Link,
            ])
        })
        .await?
        .map_err(|source| RouteError::Socket {
            netns: netns::describe(netns),
            source,
        })?;
        let task = tokio::spawn(connection);
        Ok(RouteEvents {
            messages,
            _connection: ConnectionTask(task),
        })
    }

    /// The next route event; `None` when the socket is gone.
    pub async fn next(&mut self) -> Option<RouteEvent> {
        while let Some((msg, _)) = self.messages.next().await {
            let (removed, route) = match msg.payload {
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewRoute(r)) => (false, r),
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelRoute(r)) => (true, r),
                NetlinkPayload::Overrun(_) => {
                    warn!("route events lost (netlink receive buffer overflow)");
                    return Some(RouteEvent {
                        removed: true,
                        ours: true,
                        dst: None,
                        overrun: true,
                        link_up: false,
                    });
                }
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(link)) => {
                    let up = LinkFlags::Up;
                    if link.header.flags.contains(up) && link.header.change_mask.contains(up) {
                        debug!(ifindex = link.header.index, "interface came up");
                        return Some(RouteEvent {
                            removed: true,
                            ours: true,
                            dst: None,
                            overrun: false,
                            link_up: true,
                        });
                    }
                    continue;
                }
                _ => continue,
            };
            let ours = u8::from(route.header.protocol) == ROUTE_PROTOCOL;
            let dst = destination(&route);
            return Some(RouteEvent {
                removed,
                ours,
                dst,
                overrun: false,
                link_up: false,
            });
        }
        None
    }
}

fn family_of(ip: IpAddr) -> AddressFamily {
    if ip.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    }
}

fn route_address(addr: &RouteAddress) -> Option<IpAddr> {
    match addr {
        RouteAddress::Inet(a) => Some(IpAddr::V4(*a)),
        RouteAddress::Inet6(a) => Some(IpAddr::V6(*a)),
        _ => None,
    }
}

fn destination(route: &RouteMessage) -> Option<IpNet> {
    let addr = route.attributes.iter().find_map(|a| match a {
        RouteAttribute::Destination(d) => route_address(d),
        _ => None,
    });
    let addr = match (addr, route.header.address_family) {
        (Some(a), _) => a,
        (None, AddressFamily::Inet) => IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
        (None, AddressFamily::Inet6) => IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
        (None, _) => return None,
    };
    IpNet::new(addr, route.header.destination_prefix_length).ok()
}

/// Reads one dumped route; `None` for what we never install and so need not
/// model (non-unicast, cached clones, multipath, non-IP).
fn parse_route(message: &RouteMessage) -> Option<InstalledRoute> {
    let header = &message.header;
    if header.kind != RouteType::Unicast || header.flags.contains(RouteFlags::Cloned) {
        return None;
    }
    let dst = destination(message)?;
    let mut table = u32::from(header.table);
    let mut metric = 0;
    let mut oif = None;
    let mut gateway = None;
    for attr in &message.attributes {
        match attr {
            RouteAttribute::Table(t) => table = *t,
            RouteAttribute::Priority(p) => metric = *p,
            RouteAttribute::Oif(i) => oif = Some(*i),
            RouteAttribute::Gateway(g) => gateway = route_address(g),
            RouteAttribute::MultiPath(_) => return None,
            _ => {}
        }
    }
    let oif = oif?;
    let next_hop = match gateway {
        Some(gateway) => NextHop::Via {
            gateway,
            oif,
            onlink: header.flags.contains(RouteFlags::Onlink),
        },
        None => NextHop::Dev { oif },
    };
    Some(InstalledRoute {
        route: Route {
            key: RouteKey { table, dst, metric },
            next_hop,
        },
        protocol: u8::from(header.protocol),
    })
}

/// The netlink message for adding or deleting `route` as ours.
fn route_message(route: &Route, for_delete: bool) -> RouteMessage {
    let mut message = RouteMessage::default();
    let header: &mut RouteHeader = &mut message.header;
    header.address_family = if route.is_v6() {
        AddressFamily::Inet6
    } else {
        AddressFamily::Inet
    };
    header.destination_prefix_length = route.key.dst.prefix_len();
    header.protocol = RouteProtocol::from(ROUTE_PROTOCOL);
    header.kind = RouteType::Unicast;
    header.table = u8::try_from(route.key.table).unwrap_or(RouteHeader::RT_TABLE_UNSPEC);
    header.scope = match (for_delete, route.next_hop) {
        // "any scope" on delete, as iproute2 does: match on everything else.
        (true, _) => RouteScope::NoWhere,
        (false, NextHop::Dev { .. }) => RouteScope::Link,
        (false, NextHop::Via { .. }) => RouteScope::Universe,
    };
    let attrs = &mut message.attributes;
    attrs.push(RouteAttribute::Table(route.key.table));
    attrs.push(RouteAttribute::Destination(RouteAddress::from(
        route.key.dst.addr(),
    )));
    attrs.push(RouteAttribute::Priority(route.key.metric));
    match route.next_hop {
        NextHop::Dev { oif } => attrs.push(RouteAttribute::Oif(oif)),
        NextHop::Via {
            gateway,
            oif,
            onlink,
        } => {
            attrs.push(RouteAttribute::Oif(oif));
            attrs.push(RouteAttribute::Gateway(RouteAddress::from(gateway)));
            if onlink {
                message.header.flags |= RouteFlags::Onlink;
            }
        }
    }
    message
}

fn kernel_error_msg(
    op: &'static str,
    what: String,
    e: &rtnetlink::packet_core::ErrorMessage,
) -> RouteError {
    let errno = -e.raw_code();
    RouteError::Kernel {
        op,
        what,
        errno,
        message: std::io::Error::from_raw_os_error(errno).to_string(),
    }
}

fn kernel_error(op: &'static str, what: String, e: rtnetlink::Error) -> RouteError {
    match e {
        rtnetlink::Error::NetlinkError(msg) => kernel_error_msg(op, what, &msg),
        other => RouteError::Protocol {
            op,
            message: other.to_string(),
        },
    }
}

/// Checks that a next hop's family matches the destination's (a v4 route via
/// a v6 gateway is a caller bug the kernel would reject less clearly).
pub fn check_family(route: &Route) -> Result<(), RouteError> {
    if let NextHop::Via { gateway, .. } = route.next_hop {
        if gateway.is_ipv4() != route.key.dst.addr().is_ipv4() {
            return Err(RouteError::FamilyMismatch(gateway, route.key.dst));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn ours(route: Route) -> InstalledRoute {
        InstalledRoute {
            route,
            protocol: ROUTE_PROTOCOL,
        }
    }

    fn foreign(route: Route) -> InstalledRoute {
        InstalledRoute { route, protocol: 4 }
    }

    fn via(dst: &str, gw: &str, oif: u32) -> Route {
        Route::via(
            net(dst),
            NextHop::Via {
                gateway: gw.parse().unwrap(),
                oif,
                onlink: false,
            },
        )
    }

    #[test]
    fn nothing_installed_adds_everything() {
        let desired = [
            Route::dev(net("10.2.0.0/16"), 5),
            Route::dev(net("10.102.0.0/16"), 5),
        ];
        let changes = plan(&[], &desired).unwrap();
        assert_eq!(
            changes,
            vec![RouteChange::Add(desired[0]), RouteChange::Add(desired[1])]
        );
    }

    #[test]
    fn matching_set_changes_nothing() {
        let desired = [Route::dev(net("10.2.0.0/16"), 5)];
        assert!(plan(&[ours(desired[0])], &desired).unwrap().is_empty());
    }

    #[test]
    fn changed_next_hop_is_a_replace() {
        let old = via("10.2.0.0/16", "10.1.1.2", 3);
        let new = via("10.2.0.0/16", "10.1.1.7", 3);
        assert_eq!(
            plan(&[ours(old)], &[new]).unwrap(),
            vec![RouteChange::Replace { old, new }]
        );
    }

    #[test]
    fn undesired_route_of_ours_is_deleted() {
        let stale = Route::dev(net("10.3.0.0/16"), 5);
        let keep = Route::dev(net("10.2.0.0/16"), 5);
        assert_eq!(
            plan(&[ours(stale), ours(keep)], &[keep]).unwrap(),
            vec![RouteChange::Delete(stale)]
        );
    }

    #[test]
    fn foreign_routes_are_never_named_even_with_our_destination() {
        let desired = Route::dev(net("10.2.0.0/16"), 5);
        let same_key = Route::dev(net("10.2.0.0/16"), 9);
        let other = Route::dev(net("10.9.0.0/16"), 9);
        let changes = plan(&[foreign(same_key), foreign(other)], &[desired]).unwrap();
        assert_eq!(changes, vec![RouteChange::Add(desired)]);
        // And with nothing desired, foreign routes stay: no change at all.
        assert!(plan(&[foreign(same_key), foreign(other)], &[])
            .unwrap()
            .is_empty());
    }

    #[test]
    fn duplicates_of_ours_are_collapsed() {
        let a = via("10.2.0.0/16", "10.1.1.2", 3);
        let b = via("10.2.0.0/16", "10.1.1.9", 3);
        assert_eq!(
            plan(&[ours(b), ours(a)], &[a]).unwrap(),
            vec![RouteChange::Delete(b)]
        );
    }

    #[test]
    fn conflicting_desired_routes_are_refused() {
        let a = via("10.2.0.0/16", "10.1.1.2", 3);
        let b = via("10.2.0.0/16", "10.1.1.9", 3);
        assert!(matches!(
            plan(&[], &[a, b]),
            Err(RouteError::DesiredConflict(..))
        ));
        // identical duplicates are fine
        assert_eq!(plan(&[], &[a, a]).unwrap(), vec![RouteChange::Add(a)]);
    }

    #[test]
    fn destinations_and_v6_metric_are_normalised() {
        let r = Route::dev(net("10.2.3.4/16"), 1);
        assert_eq!(r.key.dst, net("10.2.0.0/16"));
        let r6 = Route::dev(net("fd00:2::1/48"), 1);
        assert_eq!(r6.key.dst, net("fd00:2::/48"));
        assert_eq!(r6.key.metric, 1024);
        // a kernel-reported v6 route with metric 1024 equals the desired one
        assert!(plan(&[ours(r6)], &[r6]).unwrap().is_empty());
    }

    #[test]
    fn messages_carry_our_protocol_and_next_hop() {
        let r = Route::via(
            net("10.2.0.0/16"),
            NextHop::Via {
                gateway: "10.1.1.2".parse().unwrap(),
                oif: 7,
                onlink: true,
            },
        );
        let m = route_message(&r, false);
        assert_eq!(u8::from(m.header.protocol), ROUTE_PROTOCOL);
        assert!(m.header.flags.contains(RouteFlags::Onlink));
        assert_eq!(m.header.scope, RouteScope::Universe);
        assert!(m.attributes.contains(&RouteAttribute::Oif(7)));
        // and parsing it back (as the kernel would report it) gives the route
        let back = parse_route(&m).unwrap();
        assert_eq!(back, ours(r));
        assert_eq!(route_message(&r, true).header.scope, RouteScope::NoWhere);
        assert!(check_family(&r).is_ok());
        let bad = Route::via(
            net("fd00::/64"),
            NextHop::Via {
                gateway: "10.1.1.2".parse().unwrap(),
                oif: 7,
                onlink: false,
            },
        );
        assert!(check_family(&bad).is_err());
    }

    /// Applies `changes` to a model of the kernel table, failing on anything
    /// a real kernel would refuse or that would hit a foreign route.
    fn simulate(mut table: Vec<InstalledRoute>, changes: &[RouteChange]) -> Vec<InstalledRoute> {
        let remove_ours = |table: &mut Vec<InstalledRoute>, r: &Route| {
            let pos = table
                .iter()
                .position(|i| i.is_ours() && i.route == *r)
                .expect("delete of a route of ours that is not installed");
            table.remove(pos);
        };
        for change in changes {
            match change {
                RouteChange::Delete(r) => remove_ours(&mut table, r),
                RouteChange::Replace { old, new } => {
                    remove_ours(&mut table, old);
                    table.push(ours(*new));
                }
                RouteChange::Add(r) => {
                    assert!(
                        !table.iter().any(|i| i.is_ours() && i.route.key == r.key),
                        "add over an existing route of ours"
                    );
                    table.push(ours(*r));
                }
            }
        }
        table
    }

    fn arb_route() -> impl Strategy<Value = Route> {
        (
            0u8..4,
            prop_oneof![Just(16u8), Just(24u8)],
            0u32..2,
            prop_oneof![
                (1u32..4).prop_map(|oif| NextHop::Dev { oif }),
                (1u8..4, 1u32..3, any::<bool>()).prop_map(|(g, oif, onlink)| NextHop::Via {
                    gateway: IpAddr::from([10, 1, 1, g]),
                    oif,
                    onlink
                }),
            ],
        )
            .prop_map(|(n, len, metric, nh)| {
                Route::in_table(
                    IpNet::new(IpAddr::from([10, 2, n, 0]), len).unwrap(),
                    nh,
                    MAIN_TABLE,
                    metric,
                )
            })
    }

    proptest! {
        #[test]
        fn applying_the_plan_yields_desired_and_keeps_foreign(
            installed_ours in proptest::collection::vec(arb_route(), 0..8),
            installed_foreign in proptest::collection::vec(arb_route(), 0..8),
            desired in proptest::collection::vec(arb_route(), 0..8),
        ) {
            // desired must be conflict-free: keep the first route per key
            let mut seen = BTreeMap::new();
            let desired: Vec<Route> = desired.into_iter().filter(|r| seen.insert(r.key, *r).is_none()).collect();
            let mut table: Vec<InstalledRoute> = installed_ours.iter().copied().map(ours).collect();
            table.extend(installed_foreign.iter().copied().map(foreign));

            let changes = plan(&table, &desired).unwrap();
            let after = simulate(table.clone(), &changes);

            let ours_after: BTreeSet<Route> = after.iter().filter(|r| r.is_ours()).map(|r| r.route).collect();
            let want: BTreeSet<Route> = desired.iter().copied().collect();
            prop_assert_eq!(&ours_after, &want);
            // exactly one of ours per desired route: no duplicates left
            prop_assert_eq!(after.iter().filter(|r| r.is_ours()).count(), want.len());
            let mut foreign_before: Vec<_> = table.iter().filter(|r| !r.is_ours()).collect();
            let mut foreign_after: Vec<_> = after.iter().filter(|r| !r.is_ours()).collect();
            foreign_before.sort();
            foreign_after.sort();
            prop_assert_eq!(foreign_before, foreign_after);
            // and planning again on the result changes nothing
            prop_assert!(plan(&after, &desired).unwrap().is_empty());
        }
    }
}
