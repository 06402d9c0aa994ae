//! Mesh validation: which declared clusters and which remote `TunnelPeer`s
//! may shape the data path.
//!
//! The local admin's `TunnelCluster` declarations are the trust anchor. A
//! remote cluster can publish whatever it likes in its `TunnelPeer`s; it only
//! gets onto our data path inside the pod CIDRs we declared for it, so a
//! compromised cluster can never pull the local cluster's or a third cluster's
//! traffic to itself.
//!
//! Refusals are per object and never remove the accepted rest: one hostile or
//! broken object gets a [`Refusal`] (a machine-readable [`RefusalReason`] and
//! a message for its status condition) and everything else keeps working.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use ipnet::IpNet;
use sdn_tunnel_api::{Endpoint, TunnelCluster, TunnelPeer, ValidationError};
use thiserror::Error;

use crate::cidr::{self, Forbidden};

/// The declarations are unusable as a whole: without exactly one sound local
/// cluster nothing can be judged (overlap with the local cluster is the first
/// rule), so the daemon keeps its last plan and reports this error.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum MeshError {
    /// No `TunnelCluster` has `local: true`.
    #[error("no TunnelCluster is marked local: true; declare the local cluster")]
    NoLocalCluster,
    /// Several `TunnelCluster`s have `local: true`.
    #[error("several TunnelClusters are marked local: true: {}", .0.join(", "))]
    MultipleLocalClusters(Vec<String>),
    /// The local cluster's own declaration is broken.
    #[error("the local TunnelCluster {name:?} is invalid: {message}")]
    InvalidLocalCluster {
        /// Its object name.
        name: String,
        /// What is wrong.
        message: String,
    },
}

/// Machine-readable reason of a refusal; [`RefusalReason::as_str`] is the
/// CamelCase string used as a condition reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RefusalReason {
    /// A name is not a DNS label.
    InvalidName,
    /// A required field is empty.
    InvalidSpec,
    /// A remote cluster has no kubeconfig Secret reference.
    MissingKubeconfigRef,
    /// Two declarations use the same cluster name (or the local one's).
    DuplicateClusterName,
    /// The DNS zone is not a DNS name.
    InvalidDnsZone,
    /// Two declarations use the same DNS zone (or the local one's).
    DuplicateDnsZone,
    /// A CIDR does not parse or has host bits set.
    InvalidCidr,
    /// `0.0.0.0/0` or `::/0`.
    DefaultRoute,
    /// A CIDR overlapping loopback addresses.
    LoopbackCidr,
    /// A CIDR overlapping link-local addresses.
    LinkLocalCidr,
    /// A CIDR overlapping multicast addresses.
    MulticastCidr,
    /// A CIDR overlapping the unspecified/this-network range, the broadcast
    /// address or IPv4-mapped IPv6 addresses.
    ReservedCidr,
    /// Declared CIDRs overlap another cluster's (or the same cluster's pod
    /// and service ranges overlap).
    CidrOverlap,
    /// The peer's source cluster is not declared here.
    UnknownCluster,
    /// The peer's cluster declaration is refused, so nothing of it is trusted.
    ClusterRefused,
    /// The peer says it belongs to another cluster than the one it was read from.
    ClusterMismatch,
    /// A peer pod CIDR lies outside the pod CIDRs declared for its cluster.
    CidrOutsideDeclared,
    /// Two peers' pod CIDRs overlap.
    PeerCidrOverlap,
    /// Not a WireGuard public key.
    BadKey,
    /// The key is used by another peer or is this node's own.
    DuplicateKey,
    /// An endpoint is not a usable `host:port`.
    BadEndpoint,
    /// The listen port is outside 1..=65535.
    BadPort,
    /// The MTU is out of range.
    BadMtu,
    /// Two peers claim the same node of the same cluster.
    DuplicateNode,
}

impl RefusalReason {
    /// CamelCase reason for status conditions.
    pub fn as_str(self) -> &'static str {
        match self {
            RefusalReason::InvalidName => "InvalidName",
            RefusalReason::InvalidSpec => "InvalidSpec",
            RefusalReason::MissingKubeconfigRef => "MissingKubeconfigRef",
            RefusalReason::DuplicateClusterName => "DuplicateClusterName",
            RefusalReason::InvalidDnsZone => "InvalidDnsZone",
            RefusalReason::DuplicateDnsZone => "DuplicateDnsZone",
            RefusalReason::InvalidCidr => "InvalidCidr",
            RefusalReason::DefaultRoute => "DefaultRoute",
            RefusalReason::LoopbackCidr => "LoopbackCidr",
            RefusalReason::LinkLocalCidr => "LinkLocalCidr",
            RefusalReason::MulticastCidr => "MulticastCidr",
            RefusalReason::ReservedCidr => "ReservedCidr",
            RefusalReason::CidrOverlap => "CidrOverlap",
            RefusalReason::UnknownCluster => "UnknownCluster",
            RefusalReason::ClusterRefused => "ClusterRefused",
            RefusalReason::ClusterMismatch => "ClusterMismatch",
            RefusalReason::CidrOutsideDeclared => "CidrOutsideDeclared",
            RefusalReason::PeerCidrOverlap => "PeerCidrOverlap",
            RefusalReason::BadKey => "BadKey",
            RefusalReason::DuplicateKey => "DuplicateKey",
            RefusalReason::BadEndpoint => "BadEndpoint",
            RefusalReason::BadPort => "BadPort",
            RefusalReason::BadMtu => "BadMtu",
            RefusalReason::DuplicateNode => "DuplicateNode",
        }
    }

    fn from_forbidden(f: Forbidden) -> Self {
        match f {
            Forbidden::DefaultRoute => RefusalReason::DefaultRoute,
            Forbidden::Loopback => RefusalReason::LoopbackCidr,
            Forbidden::LinkLocal => RefusalReason::LinkLocalCidr,
            Forbidden::Multicast => RefusalReason::MulticastCidr,
            Forbidden::Unspecified | Forbidden::Broadcast | Forbidden::Ipv4Mapped => {
                RefusalReason::ReservedCidr
            }
        }
    }

    fn from_validation(e: &ValidationError) -> Self {
        match e {
            ValidationError::BadKey { .. } => RefusalReason::BadKey,
            ValidationError::BadEndpoint { .. } | ValidationError::EmptyField("endpoints") => {
                RefusalReason::BadEndpoint
            }
            ValidationError::BadPort(_) => RefusalReason::BadPort,
            ValidationError::BadMtu(_) => RefusalReason::BadMtu,
            ValidationError::BadName { .. } => RefusalReason::InvalidName,
            ValidationError::BadDnsZone(_) => RefusalReason::InvalidDnsZone,
            ValidationError::EmptyField(_) => RefusalReason::InvalidSpec,
            ValidationError::MissingKubeconfigRef(_) => RefusalReason::MissingKubeconfigRef,
        }
    }
}

impl fmt::Display for RefusalReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Kind of the refused object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ObjectKind {
    /// A `TunnelCluster` declaration in the local cluster.
    TunnelCluster,
    /// A `TunnelPeer` read from a remote cluster.
    TunnelPeer,
}

/// Identifies an object so the daemon can put the refusal in its status.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectRef {
    /// Which kind of object.
    pub kind: ObjectKind,
    /// For a `TunnelPeer`, the cluster it was read from; for a
    /// `TunnelCluster`, the cluster name it declares.
    pub cluster: String,
    /// Namespace (`TunnelPeer` only).
    pub namespace: Option<String>,
    /// `metadata.name`.
    pub name: String,
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.kind, &self.namespace) {
            (ObjectKind::TunnelCluster, _) => write!(f, "TunnelCluster {}", self.name),
            (ObjectKind::TunnelPeer, Some(ns)) => {
                write!(
                    f,
                    "TunnelPeer {}/{} in cluster {}",
                    ns, self.name, self.cluster
                )
            }
            (ObjectKind::TunnelPeer, None) => {
                write!(f, "TunnelPeer {} in cluster {}", self.name, self.cluster)
            }
        }
    }
}

/// One reason an object is refused.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Refusal {
    /// The refused object.
    pub object: ObjectRef,
    /// Why, for machines.
    pub reason: RefusalReason,
    /// Why, for people.
    pub message: String,
}

/// A remote `TunnelPeer` together with the cluster whose API it was read
/// from. The source is what counts, not `spec.cluster`: a remote cluster can
/// write anything into its objects, but it cannot change which kubeconfig we
/// used to read them.
#[derive(Debug, Clone, Copy)]
pub struct SourcedPeer<'a> {
    /// Cluster name of the API the object was read from.
    pub source: &'a str,
    /// The object.
    pub peer: &'a TunnelPeer,
}

/// The local cluster as declared.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalCluster {
    /// Cluster name.
    pub name: String,
    /// Pod CIDRs, sorted.
    pub pod_cidrs: Vec<IpNet>,
    /// Service CIDRs, sorted.
    pub service_cidrs: Vec<IpNet>,
    /// DNS zone.
    pub dns_zone: String,
}

/// A remote cluster whose declaration passed every check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcceptedCluster {
    /// Cluster name.
    pub name: String,
    /// `metadata.name` of the `TunnelCluster`.
    pub object_name: String,
    /// Declared pod CIDRs, sorted.
    pub pod_cidrs: Vec<IpNet>,
    /// Declared service CIDRs, sorted.
    pub service_cidrs: Vec<IpNet>,
    /// DNS zone.
    pub dns_zone: String,
    /// Endpoints imposed by the local admin, by node name.
    pub endpoint_overrides: BTreeMap<String, Endpoint>,
}

/// A remote peer that passed every check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcceptedPeer {
    /// The object it came from.
    pub object: ObjectRef,
    /// Its cluster (the source cluster).
    pub cluster: String,
    /// Its node.
    pub node: String,
    /// Its WireGuard public key.
    pub public_key: String,
    /// The endpoint to use: the local admin's override, else the peer's first.
    pub endpoint: Endpoint,
    /// All endpoints the peer published, preferred first.
    pub published_endpoints: Vec<Endpoint>,
    /// Its pod CIDRs, sorted and deduplicated.
    pub pod_cidrs: Vec<IpNet>,
    /// Its listen port.
    pub listen_port: u16,
    /// Its MTU, if it fixes one.
    pub mtu: Option<u16>,
}

/// Result of [`validate_mesh`]; every list is sorted, so equal inputs in any
/// order give equal results.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mesh {
    /// The local cluster.
    pub local: LocalCluster,
    /// Accepted remote clusters, by name.
    pub clusters: Vec<AcceptedCluster>,
    /// Accepted remote peers, by (cluster, node, object).
    pub peers: Vec<AcceptedPeer>,
    /// Every refusal, by object then reason. An object may have several.
    pub refusals: Vec<Refusal>,
}

impl Mesh {
    /// The accepted cluster called `name`.
    pub fn cluster(&self, name: &str) -> Option<&AcceptedCluster> {
        self.clusters.iter().find(|c| c.name == name)
    }

    /// The refusals of one object, in order.
    pub fn refusals_of<'a>(
        &'a self,
        object: &'a ObjectRef,
    ) -> impl Iterator<Item = &'a Refusal> + 'a {
        self.refusals.iter().filter(move |r| &r.object == object)
    }
}

/// A declaration being examined.
#[derive(Debug)]
struct Decl {
    object: ObjectRef,
    name: String,
    pods: Vec<IpNet>,
    services: Vec<IpNet>,
    dns_zone: String,
    overrides: BTreeMap<String, Endpoint>,
}

impl Decl {
    fn all_cidrs(&self) -> impl Iterator<Item = (&'static str, &IpNet)> + '_ {
        self.pods
            .iter()
            .map(|c| ("pod", c))
            .chain(self.services.iter().map(|c| ("service", c)))
    }
}

/// Collects refusals keyed by object, deduplicated and ordered.
#[derive(Default)]
struct Refusals(BTreeSet<Refusal>);

impl Refusals {
    fn add(&mut self, object: &ObjectRef, reason: RefusalReason, message: impl Into<String>) {
        self.0.insert(Refusal {
            object: object.clone(),
            reason,
            message: message.into(),
        });
    }

    fn has(&self, object: &ObjectRef) -> bool {
        self.0.iter().any(|r| &r.object == object)
    }
}

/// Parses a list of CIDRs, refusing garbage and forbidden ranges, and returns
/// the ones that parse (sorted, deduplicated) so that overlap checks can still
/// see them.
fn parse_cidrs(
    what: &str,
    list: &[String],
    object: &ObjectRef,
    refusals: &mut Refusals,
) -> Vec<IpNet> {
    if list.is_empty() {
        refusals.add(
            object,
            RefusalReason::InvalidCidr,
            format!("no {what} CIDRs"),
        );
    }
    let mut out = BTreeSet::new();
    for s in list {
        match cidr::parse_cidr(s) {
            Ok(net) => {
                if let Some(f) = cidr::forbidden(&net) {
                    refusals.add(
                        object,
                        RefusalReason::from_forbidden(f),
                        format!("{what} CIDR {net} covers {}", f.describe()),
                    );
                } else {
                    out.insert(net);
                }
            }
            Err(e) => {
                refusals.add(
                    object,
                    RefusalReason::InvalidCidr,
                    format!("{what} CIDR {e}"),
                );
            }
        }
    }
    out.into_iter().collect()
}

fn cluster_ref(c: &TunnelCluster) -> ObjectRef {
    ObjectRef {
        kind: ObjectKind::TunnelCluster,
        cluster: c.spec.cluster_name.clone(),
        namespace: None,
        name: c.metadata.name.clone().unwrap_or_default(),
    }
}

/// Step 1 (per cluster): parses one declaration; its CIDRs are checked
/// against the forbidden ranges ([`parse_cidrs`]) and against each other
/// ([`check_own_cidrs`]).
fn declaration(c: &TunnelCluster, refusals: &mut Refusals) -> Decl {
    let object = cluster_ref(c);
    if let Err(e) = c.spec.validate() {
        refusals.add(&object, RefusalReason::from_validation(&e), e.to_string());
    }
    let pods = parse_cidrs("pod", &c.spec.pod_cidrs, &object, refusals);
    let services = parse_cidrs("service", &c.spec.service_cidrs, &object, refusals);
    let overrides = c
        .spec
        .endpoint_overrides
        .iter()
        .filter_map(|o| {
            Endpoint::parse(&o.endpoint)
                .ok()
                .map(|e| (o.node.clone(), e))
        })
        .collect();
    let decl = Decl {
        object,
        name: c.spec.cluster_name.clone(),
        pods,
        services,
        dns_zone: c.spec.dns_zone(),
        overrides,
    };
    check_own_cidrs(&decl, refusals);
    decl
}

/// A cluster's pod and service ranges are disjoint.
fn check_own_cidrs(d: &Decl, refusals: &mut Refusals) {
    for (p, s) in cidr::overlapping_pairs(&d.pods, &d.services) {
        refusals.add(
            &d.object,
            RefusalReason::CidrOverlap,
            format!(
                "pod CIDR {p} overlaps service CIDR {s} of the same cluster {}",
                d.name
            ),
        );
    }
}

/// Step 2: exactly one sound local cluster, or nothing can be judged.
fn local_cluster(clusters: &[TunnelCluster]) -> Result<Decl, MeshError> {
    let locals: Vec<&TunnelCluster> = clusters.iter().filter(|c| c.spec.local).collect();
    let local_obj = match locals.as_slice() {
        [] => return Err(MeshError::NoLocalCluster),
        [one] => *one,
        many => {
            let mut names: Vec<String> = many.iter().map(|c| c.spec.cluster_name.clone()).collect();
            names.sort();
            return Err(MeshError::MultipleLocalClusters(names));
        }
    };
    let mut local_refusals = Refusals::default();
    let local = declaration(local_obj, &mut local_refusals);
    if let Some(first) = local_refusals.0.iter().next() {
        return Err(MeshError::InvalidLocalCluster {
            name: local.object.name.clone(),
            message: first.message.clone(),
        });
    }
    Ok(local)
}

/// Step 3: the remote declarations, each parsed and checked on its own.
fn remote_declarations(clusters: &[TunnelCluster], refusals: &mut Refusals) -> Vec<Decl> {
    clusters
        .iter()
        .filter(|c| !c.spec.local)
        .map(|c| declaration(c, refusals))
        .collect()
}

/// Every declaration sharing `key(d)` with another, with the names of the
/// others.
fn same_key(decls: &[Decl], key: impl Fn(&Decl) -> String) -> Vec<(&Decl, Vec<&str>)> {
    let mut by_key: BTreeMap<String, Vec<&Decl>> = BTreeMap::new();
    for d in decls {
        by_key.entry(key(d)).or_default().push(d);
    }
    decls
        .iter()
        .filter_map(|d| {
            let same = by_key.get(&key(d)).filter(|v| v.len() > 1)?;
            let others = same
                .iter()
                .filter(|o| o.object != d.object)
                .map(|o| o.object.name.as_str())
                .collect();
            Some((d, others))
        })
        .collect()
}

/// Step 4: one declaration per cluster name, none the local one's.
fn check_cluster_names(decls: &[Decl], local: &Decl, refusals: &mut Refusals) {
    for d in decls.iter().filter(|d| d.name == local.name) {
        refusals.add(
            &d.object,
            RefusalReason::DuplicateClusterName,
            format!("cluster name {} is the local cluster's", d.name),
        );
    }
    for (d, others) in same_key(decls, |d| d.name.clone()) {
        refusals.add(
            &d.object,
            RefusalReason::DuplicateClusterName,
            format!(
                "cluster name {} is also declared by TunnelCluster {}",
                d.name,
                others.join(", ")
            ),
        );
    }
}

/// DNS zones compare without case and trailing dot, as DNS does.
fn zone_key(z: &str) -> String {
    z.trim_end_matches('.').to_ascii_lowercase()
}

/// Step 5: a DNS zone answers for one cluster.
fn check_dns_zones(decls: &[Decl], local: &Decl, refusals: &mut Refusals) {
    let local_zone = zone_key(&local.dns_zone);
    for d in decls.iter().filter(|d| zone_key(&d.dns_zone) == local_zone) {
        refusals.add(
            &d.object,
            RefusalReason::DuplicateDnsZone,
            format!("DNS zone {} is the local cluster's", d.dns_zone),
        );
    }
    for (d, others) in same_key(decls, |d| zone_key(&d.dns_zone)) {
        refusals.add(
            &d.object,
            RefusalReason::DuplicateDnsZone,
            format!(
                "DNS zone {} is also used by TunnelCluster {}",
                d.dns_zone,
                others.join(", ")
            ),
        );
    }
}

/// Step 6: no declared range overlaps the local cluster's or another remote
/// cluster's (reported on both sides).
fn check_cross_cluster_overlaps(decls: &[Decl], local: &Decl, refusals: &mut Refusals) {
    for (i, a) in decls.iter().enumerate() {
        for ((ka, ca), (kl, cl)) in cidr_pairs(a, local) {
            refusals.add(
                &a.object,
                RefusalReason::CidrOverlap,
                format!(
                    "{ka} CIDR {ca} overlaps {kl} CIDR {cl} of the local cluster {}",
                    local.name
                ),
            );
        }
        for b in &decls[i + 1..] {
            for ((ka, ca), (kb, cb)) in cidr_pairs(a, b) {
                refusals.add(
                    &a.object,
                    RefusalReason::CidrOverlap,
                    format!(
                        "{ka} CIDR {ca} overlaps {kb} CIDR {cb} of cluster {}",
                        b.name
                    ),
                );
                refusals.add(
                    &b.object,
                    RefusalReason::CidrOverlap,
                    format!(
                        "{kb} CIDR {cb} overlaps {ka} CIDR {ca} of cluster {}",
                        a.name
                    ),
                );
            }
        }
    }
}

/// The overlapping (kind, CIDR) pairs of two declarations.
fn cidr_pairs<'d>(
    a: &'d Decl,
    b: &'d Decl,
) -> impl Iterator<Item = ((&'static str, &'d IpNet), (&'static str, &'d IpNet))> + 'd {
    a.all_cidrs()
        .flat_map(move |x| b.all_cidrs().map(move |y| (x, y)))
        .filter(|((_, x), (_, y))| cidr::overlaps(x, y))
}

/// Step 7 (per peer): the checks a peer passes on its own; `Some` is a
/// candidate for the checks between peers.
fn check_peer(
    sp: &SourcedPeer<'_>,
    accepted_decls: &BTreeMap<&str, &Decl>,
    declared: &BTreeSet<&str>,
    own_public_key: &str,
    refusals: &mut Refusals,
) -> Option<AcceptedPeer> {
    let p = sp.peer;
    let object = ObjectRef {
        kind: ObjectKind::TunnelPeer,
        cluster: sp.source.to_string(),
        namespace: p.metadata.namespace.clone(),
        name: p.metadata.name.clone().unwrap_or_default(),
    };
    let Some(decl) = accepted_decls.get(sp.source) else {
        if declared.contains(sp.source) {
            refusals.add(
                &object,
                RefusalReason::ClusterRefused,
                format!("the TunnelCluster declaration of {} is refused, so none of its peers are trusted", sp.source),
            );
        } else {
            refusals.add(
                &object,
                RefusalReason::UnknownCluster,
                format!(
                    "cluster {} is not declared by any remote TunnelCluster here",
                    sp.source
                ),
            );
        }
        return None;
    };
    if p.spec.cluster != sp.source {
        refusals.add(
            &object,
            RefusalReason::ClusterMismatch,
            format!(
                "spec.cluster is {:?} but the object was read from cluster {}",
                p.spec.cluster, sp.source
            ),
        );
    }
    let endpoints = match p.spec.validate() {
        Ok(e) => e,
        Err(e) => {
            refusals.add(&object, RefusalReason::from_validation(&e), e.to_string());
            Vec::new()
        }
    };
    if p.spec.public_key == own_public_key {
        refusals.add(
            &object,
            RefusalReason::DuplicateKey,
            "public key equals this node's own public key",
        );
    }
    let pod_cidrs = parse_cidrs("pod", &p.spec.pod_cidrs, &object, refusals);
    for c in &pod_cidrs {
        if !cidr::inside_any(c, &decl.pods) {
            let declared: Vec<String> = decl.pods.iter().map(ToString::to_string).collect();
            refusals.add(
                &object,
                RefusalReason::CidrOutsideDeclared,
                format!(
                    "pod CIDR {c} is outside the pod CIDRs declared for cluster {} ({})",
                    decl.name,
                    declared.join(", ")
                ),
            );
        }
    }
    if refusals.has(&object) {
        return None;
    }
    // validate() has already refused both cases; checked again so that a
    // peer can never be accepted without an endpoint or port, and never
    // dropped silently either.
    let Some(first) = endpoints.first() else {
        refusals.add(&object, RefusalReason::BadEndpoint, "no usable endpoint");
        return None;
    };
    let listen_port = match sdn_tunnel_api::validate::validate_port(p.spec.listen_port) {
        Ok(port) => port,
        Err(e) => {
            refusals.add(&object, RefusalReason::BadPort, e.to_string());
            return None;
        }
    };
    let endpoint = decl.overrides.get(&p.spec.node).unwrap_or(first).clone();
    Some(AcceptedPeer {
        object,
        cluster: sp.source.to_string(),
        node: p.spec.node.clone(),
        public_key: p.spec.public_key.clone(),
        endpoint,
        published_endpoints: endpoints,
        pod_cidrs,
        listen_port,
        mtu: p.spec.mtu.and_then(|m| u16::try_from(m).ok()),
    })
}

/// Every unordered pair of candidates, each way round.
fn both_ways(candidates: &[AcceptedPeer]) -> impl Iterator<Item = (&AcceptedPeer, &AcceptedPeer)> {
    candidates.iter().enumerate().flat_map(move |(i, a)| {
        candidates[i + 1..]
            .iter()
            .flat_map(move |b| [(a, b), (b, a)])
    })
}

/// Step 8: one peer per node of a cluster.
fn check_duplicate_nodes(candidates: &[AcceptedPeer], refusals: &mut Refusals) {
    for (x, y) in both_ways(candidates).filter(|(x, y)| x.cluster == y.cluster && x.node == y.node)
    {
        refusals.add(
            &x.object,
            RefusalReason::DuplicateNode,
            format!(
                "node {} of cluster {} is also claimed by {}",
                x.node, x.cluster, y.object
            ),
        );
    }
}

/// Step 9: one peer per key.
fn check_key_conflicts(candidates: &[AcceptedPeer], refusals: &mut Refusals) {
    for (x, y) in both_ways(candidates).filter(|(x, y)| x.public_key == y.public_key) {
        refusals.add(
            &x.object,
            RefusalReason::DuplicateKey,
            format!(
                "public key is also used by node {} of cluster {}",
                y.node, y.cluster
            ),
        );
    }
}

/// Step 10: no two peers route the same addresses.
fn check_peer_cidr_overlaps(candidates: &[AcceptedPeer], refusals: &mut Refusals) {
    for (x, y) in both_ways(candidates) {
        for (cx, cy) in cidr::overlapping_pairs(&x.pod_cidrs, &y.pod_cidrs) {
            refusals.add(
                &x.object,
                RefusalReason::PeerCidrOverlap,
                format!(
                    "pod CIDR {cx} overlaps pod CIDR {cy} of node {} of cluster {}",
                    y.node, y.cluster
                ),
            );
        }
    }
}

/// Validates the declared clusters and the remote peers.
///
/// - `clusters`: every `TunnelCluster` of the local cluster, exactly one of
///   them `local: true`.
/// - `peers`: the `TunnelPeer`s read from the remote clusters, each with the
///   cluster it was read from.
/// - `own_public_key`: this node's key; a remote peer using it is refused.
///
/// Each object is expected once; the same object given twice is refused as a
/// duplicate node rather than accepted twice.
///
/// Cluster declarations come from the local admin: every CIDR of every
/// declaration that parses takes part in the overlap check, so an overlap is
/// reported on both sides even if one side is refused for another reason
/// too. Peers come from remote clusters: only peers that passed their own
/// checks take part in the duplicate-key, duplicate-node and overlap checks,
/// so an object that is already refused cannot knock an honest peer out.
///
/// A pipeline of named steps, each a function of its own: the local cluster
/// (`local_cluster`), the remote declarations and their own CIDRs
/// (`remote_declarations`), names (`check_cluster_names`), zones
/// (`check_dns_zones`), overlaps between clusters
/// (`check_cross_cluster_overlaps`), each peer (`check_peer`), and between
/// the peers that passed: nodes (`check_duplicate_nodes`), keys
/// (`check_key_conflicts`) and pod CIDRs (`check_peer_cidr_overlaps`).
/// Refusals go into one set, so the order of the steps within a stage
/// does not change the result.
pub fn validate_mesh(
    clusters: &[TunnelCluster],
    peers: &[SourcedPeer<'_>],
    own_public_key: &str,
) -> Result<Mesh, MeshError> {
    let mut refusals = Refusals::default();
    let local = local_cluster(clusters)?;
    let decls = remote_declarations(clusters, &mut refusals);
    check_cluster_names(&decls, &local, &mut refusals);
    check_dns_zones(&decls, &local, &mut refusals);
    check_cross_cluster_overlaps(&decls, &local, &mut refusals);

    let accepted_decls: BTreeMap<&str, &Decl> = decls
        .iter()
        .filter(|d| !refusals.has(&d.object))
        .map(|d| (d.name.as_str(), d))
        .collect();
    let declared: BTreeSet<&str> = decls.iter().map(|d| d.name.as_str()).collect();

    let candidates: Vec<AcceptedPeer> = peers
        .iter()
        .filter_map(|sp| {
            check_peer(
                sp,
                &accepted_decls,
                &declared,
                own_public_key,
                &mut refusals,
            )
        })
        .collect();
    // All refusals of this stage are decided on the same candidate set, so
    // order does not matter.
    check_duplicate_nodes(&candidates, &mut refusals);
    check_key_conflicts(&candidates, &mut refusals);
    check_peer_cidr_overlaps(&candidates, &mut refusals);

    let mut accepted: Vec<AcceptedPeer> = candidates
        .into_iter()
        .filter(|p| !refusals.has(&p.object))
        .collect();
    accepted
        .sort_by(|a, b| (&a.cluster, &a.node, &a.object).cmp(&(&b.cluster, &b.node, &b.object)));

    let clusters = accepted_decls
        .values()
        .map(|d| AcceptedCluster {
            name: d.name.clone(),
            object_name: d.object.name.clone(),
            pod_cidrs: d.pods.clone(),
            service_cidrs: d.services.clone(),
            dns_zone: d.dns_zone.clone(),
            endpoint_overrides: d.overrides.clone(),
        })
        .collect();

    Ok(Mesh {
        local: LocalCluster {
            name: local.name,
            pod_cidrs: local.pods,
            service_cidrs: local.services,
            dns_zone: local.dns_zone,
        },
        clusters,
        peers: accepted,
        refusals: refusals.0.into_iter().collect(),
    })
}

#[cfg(test)]
#[path = "tests_mesh_steps.rs"]
mod tests_steps;
