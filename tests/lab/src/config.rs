//! Lab configuration and its addressing plan: a pure function of the config,
//! so the same lab always gets the same names and addresses.
//!
//! Addressing (cluster `i` is 1-based, node `n` is 1-based, `U` is the
//! underlay octet, 99 by default):
//! - underlay `10.U.0.0/16`: the host end `10.U.0.1`, cluster `i`'s control
//!   plane `10.U.i.2`, its node `n` at `10.U.i.(10+n)`;
//! - cluster `i` pods `10.i.0.0/16`, node `n` owns `10.i.n.0/24` (gateway
//!   `10.i.n.1` on `cbr0`);
//! - cluster `i` services `10.(100+i).0.0/16`.

use std::net::Ipv4Addr;
use std::path::PathBuf;

use anyhow::{bail, Result};
use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

/// Default lab name: the prefix of every namespace and the state directory.
pub const DEFAULT_NAME: &str = "sdnt";
/// Port of every control plane's kube-apiserver.
pub const APISERVER_PORT: u16 = 6443;

/// Delay and loss applied on every node's underlay link (egress).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Netem {
    pub delay_ms: u32,
    pub loss_percent: f32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LabConfig {
    /// Prefix of every namespace and link the lab creates (1-8 of `[a-z0-9]`).
    pub name: String,
    /// State directory: PKI, kubeconfigs, etcd data, logs, `state.json`.
    pub dir: PathBuf,
    /// Cluster names, in order; the first is cluster 1.
    pub clusters: Vec<String>,
    pub nodes_per_cluster: u8,
    /// Nodes added to a cluster after `up` ([`crate::Lab::add_node`]), by
    /// cluster name: they follow the cluster's first `nodes_per_cluster`.
    #[serde(default)]
    pub extra_nodes: std::collections::BTreeMap<String, u8>,
    /// Second octet of the underlay `10.U.0.0/16`.
    pub underlay_octet: u8,
    /// MTU of every underlay link; pod links get the same (as a CNI would).
    pub underlay_mtu: u32,
    pub netem: Option<Netem>,
    /// Real nodes: containerd, kubelet and kube-proxy on every node, and
    /// kube-controller-manager and kube-scheduler beside every apiserver
    /// (see [`crate::kubelet`]). Off: the process lab (nodes are network
    /// namespaces, pods are processes the tests start).
    #[serde(default)]
    pub real_nodes: bool,
}

impl LabConfig {
    /// The default two-cluster lab (`east`, `west`, two nodes each).
    pub fn new(name: &str) -> Self {
        Self {
            name: name.to_string(),
            dir: default_dir(name),
            clusters: vec!["east".into(), "west".into()],
            nodes_per_cluster: 2,
            extra_nodes: Default::default(),
            underlay_octet: 99,
            underlay_mtu: 1500,
            netem: None,
            real_nodes: false,
        }
    }

    pub fn validate(&self) -> Result<()> {
        let n = &self.name;
        if n.is_empty()
            || n.len() > 8
            || !n
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        {
            bail!("lab name {n:?} must be 1 to 8 characters of [a-z0-9] (it prefixes interface names)");
        }
        if self.clusters.is_empty() || self.clusters.len() > 50 {
            bail!("a lab has 1 to 50 clusters, not {}", self.clusters.len());
        }
        for (i, c) in self.clusters.iter().enumerate() {
            let dns_label = !c.is_empty()
                && c.len() <= 20
                && c.chars()
                    .all(|ch| ch.is_ascii_lowercase() || ch.is_ascii_digit() || ch == '-')
                && !c.starts_with('-')
                && !c.ends_with('-');
            if !dns_label {
                bail!("cluster name {c:?} must be a DNS label of at most 20 characters");
            }
            if self.clusters[..i].contains(c) {
                bail!("cluster name {c:?} appears twice");
            }
        }
        if self.nodes_per_cluster == 0 || self.nodes_per_cluster > 200 {
            bail!(
                "nodes per cluster must be 1 to 200, not {}",
                self.nodes_per_cluster
            );
        }
        let u = usize::from(self.underlay_octet);
        if u <= self.clusters.len() || (101..=100 + self.clusters.len()).contains(&u) || u > 250 {
            bail!(
                "underlay octet {u} collides with the pod (10.1-{}.x) or service (10.101-{}.x) ranges",
                self.clusters.len(),
                100 + self.clusters.len()
            );
        }
        if !(1280..=9000).contains(&self.underlay_mtu) {
            bail!("underlay MTU {} is outside 1280..=9000", self.underlay_mtu);
        }
        if let Some(netem) = self.netem {
            if !(0.0..=100.0).contains(&netem.loss_percent) {
                bail!("loss {}% is not a percentage", netem.loss_percent);
            }
        }
        Ok(())
    }

    /// The underlay network.
    pub fn underlay(&self) -> Ipv4Net {
        net(Ipv4Addr::new(10, self.underlay_octet, 0, 0), 16)
    }

    /// The host's address on the underlay (used by tests, kubectl and tunctl).
    pub fn host_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, self.underlay_octet, 0, 1)
    }

    /// Name of the underlay namespace (a bridge joining every node and control plane).
    pub fn underlay_netns(&self) -> String {
        format!("{}-underlay", self.name)
    }

    /// Name of the host-side veth joining the host to the underlay.
    pub fn host_link(&self) -> String {
        format!("{}-host", self.name)
    }

    /// Every cluster with its nodes, names and addresses.
    pub fn plan(&self) -> Vec<ClusterPlan> {
        self.clusters
            .iter()
            .enumerate()
            .map(|(i, name)| {
                let i = u8::try_from(i + 1).unwrap_or(u8::MAX);
                let extra = self.extra_nodes.get(name).copied().unwrap_or(0);
                let nodes = (1..=self.nodes_per_cluster.saturating_add(extra))
                    .map(|n| NodePlan {
                        name: format!("{name}-node-{n}"),
                        netns: format!("{}-{name}-node-{n}", self.name),
                        index: n,
                        underlay_ip: Ipv4Addr::new(10, self.underlay_octet, i, 10 + n),
                        pod_cidr: net(Ipv4Addr::new(10, i, n, 0), 24),
                    })
                    .collect();
                ClusterPlan {
                    name: name.clone(),
                    index: i,
                    cp_netns: format!("{}-{name}-cp", self.name),
                    apiserver_ip: Ipv4Addr::new(10, self.underlay_octet, i, 2),
                    pod_cidr: net(Ipv4Addr::new(10, i, 0, 0), 16),
                    service_cidr: net(Ipv4Addr::new(10, 100 + i, 0, 0), 16),
                    nodes,
                    real_nodes: self.real_nodes,
                }
            })
            .collect()
    }
}

/// Default state directory of a lab named `name`.
pub fn default_dir(name: &str) -> PathBuf {
    PathBuf::from(format!("/tmp/sdn-tunnel-lab/{name}"))
}

fn net(addr: Ipv4Addr, prefix: u8) -> Ipv4Net {
    // Only called with constant, valid prefix lengths (16, 24).
    Ipv4Net::new(addr, prefix).unwrap_or_else(|_| Ipv4Net::from(addr))
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClusterPlan {
    pub name: String,
    /// 1-based position in the lab.
    pub index: u8,
    pub cp_netns: String,
    pub apiserver_ip: Ipv4Addr,
    pub pod_cidr: Ipv4Net,
    pub service_cidr: Ipv4Net,
    pub nodes: Vec<NodePlan>,
    /// The cluster has real kubelets ([`LabConfig::real_nodes`]).
    #[serde(default)]
    pub real_nodes: bool,
}

impl ClusterPlan {
    pub fn apiserver_url(&self) -> String {
        format!("https://{}:{APISERVER_PORT}", self.apiserver_ip)
    }

    /// First address of the service range: the `kubernetes` Service's ClusterIP.
    pub fn kubernetes_service_ip(&self) -> Ipv4Addr {
        let o = self.service_cidr.network().octets();
        Ipv4Addr::new(o[0], o[1], o[2], o[3] + 1)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodePlan {
    /// Node object name, e.g. `east-node-1`.
    pub name: String,
    pub netns: String,
    /// 1-based position in its cluster.
    pub index: u8,
    pub underlay_ip: Ipv4Addr,
    pub pod_cidr: Ipv4Net,
}

impl NodePlan {
    /// The node's address on its `cbr0` bridge, the pods' default gateway.
    pub fn gateway(&self) -> Ipv4Addr {
        let o = self.pod_cidr.network().octets();
        Ipv4Addr::new(o[0], o[1], o[2], 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_plan_has_disjoint_ranges() {
        let cfg = LabConfig::new("sdnt");
        cfg.validate().unwrap();
        let plan = cfg.plan();
        assert_eq!(plan.len(), 2);
        let mut nets = vec![cfg.underlay()];
        for c in &plan {
            nets.push(c.pod_cidr);
            nets.push(c.service_cidr);
            for n in &c.nodes {
                assert!(c.pod_cidr.contains(&n.pod_cidr));
                assert!(cfg.underlay().contains(&n.underlay_ip));
                assert!(n.pod_cidr.contains(&n.gateway()));
            }
            assert!(c.service_cidr.contains(&c.kubernetes_service_ip()));
        }
        for (i, a) in nets.iter().enumerate() {
            for b in &nets[i + 1..] {
                assert!(!a.contains(b) && !b.contains(a), "{a} overlaps {b}");
            }
        }
        assert_eq!(plan[0].nodes[1].name, "east-node-2");
        assert_eq!(plan[1].nodes[0].pod_cidr.to_string(), "10.2.1.0/24");
        assert_eq!(plan[1].apiserver_url(), "https://10.99.2.2:6443");
    }

    #[test]
    fn bad_configs_are_refused() {
        let ok = LabConfig::new("sdnt");
        let mut c = ok.clone();
        c.name = "Has-Caps".into();
        assert!(c.validate().is_err());
        let mut c = ok.clone();
        c.clusters = vec!["east".into(), "east".into()];
        assert!(c.validate().unwrap_err().to_string().contains("twice"));
        let mut c = ok.clone();
        c.underlay_octet = 2;
        assert!(c.validate().unwrap_err().to_string().contains("collides"));
        let mut c = ok.clone();
        c.underlay_octet = 101;
        assert!(c.validate().is_err());
        let mut c = ok.clone();
        c.underlay_mtu = 500;
        assert!(c.validate().is_err());
        let mut c = ok.clone();
        c.nodes_per_cluster = 0;
        assert!(c.validate().is_err());
        let mut c = ok;
        c.clusters = vec!["-bad".into()];
        assert!(c.validate().is_err());
    }
}
