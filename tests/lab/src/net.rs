//! The lab's network: an underlay namespace (one bridge joining the host,
//! every control plane and every node), node namespaces with a kubenet-style
//! `cbr0` bridge (seed 001), and pod namespaces attached to it by veth.
//!
//! Nodes have no default route: traffic for anything but the underlay and
//! their own cluster's pod CIDRs is unroutable, so nothing a test sends can
//! leave the lab, and a pod of one cluster cannot reach another cluster
//! until the tunnel routes it.

use std::net::Ipv4Addr;

use anyhow::{Context, Result};
use ipnet::Ipv4Net;

use crate::config::{ClusterPlan, LabConfig, NodePlan};
use crate::sys::{ip, ip_in, netns_exists, nft_in, run, sysctl_in};

/// Name of the underlay bridge inside the underlay namespace.
pub const UNDERLAY_BRIDGE: &str = "br0";
/// Name of every node's pod bridge, as kubenet calls it.
pub const POD_BRIDGE: &str = "cbr0";
/// nftables table the lab installs in every node: the node's own masquerade
/// (what kindnet or ip-masq-agent would do), not the product's.
pub const NODE_NAT_TABLE: &str = "lab_node_nat";

fn add_netns(name: &str) -> Result<()> {
    ip(&["netns", "add", name]).with_context(|| format!("creating network namespace {name}"))?;
    ip_in(name, &["link", "set", "lo", "up"])?;
    Ok(())
}

/// Creates the underlay namespace with its bridge, and the host's veth into
/// it (`<lab>-host`, the host's address on the underlay).
pub fn create_underlay(cfg: &LabConfig) -> Result<()> {
    let ns = cfg.underlay_netns();
    add_netns(&ns)?;
    // A pure layer-2 segment: the underlay namespace itself never routes.
    sysctl_in(&ns, "net.ipv4.ip_forward", "0")?;
    ip_in(&ns, &["link", "add", UNDERLAY_BRIDGE, "type", "bridge"])?;
    ip_in(
        &ns,
        &[
            "link",
            "set",
            UNDERLAY_BRIDGE,
            "mtu",
            &cfg.underlay_mtu.to_string(),
            "up",
        ],
    )?;
    let host = cfg.host_link();
    ip(&[
        "link",
        "add",
        &host,
        "mtu",
        &cfg.underlay_mtu.to_string(),
        "type",
        "veth",
        "peer",
        "name",
        "uhost",
        "netns",
        &ns,
    ])?;
    ip_in(
        &ns,
        &[
            "link",
            "set",
            "uhost",
            "mtu",
            &cfg.underlay_mtu.to_string(),
            "master",
            UNDERLAY_BRIDGE,
            "up",
        ],
    )?;
    let host_addr = format!("{}/{}", cfg.host_ip(), cfg.underlay().prefix_len());
    ip(&["addr", "add", &host_addr, "dev", &host])?;
    ip(&["link", "set", &host, "up"])?;
    Ok(())
}

/// Creates a namespace attached to the underlay bridge through `eth0` with
/// `addr`, the underlay-side end named `underlay_end`.
fn attach_to_underlay(
    cfg: &LabConfig,
    netns: &str,
    underlay_end: &str,
    addr: Ipv4Addr,
) -> Result<()> {
    let ul = cfg.underlay_netns();
    let mtu = cfg.underlay_mtu.to_string();
    add_netns(netns)?;
    ip_in(
        &ul,
        &[
            "link",
            "add",
            underlay_end,
            "mtu",
            &mtu,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            netns,
        ],
    )?;
    ip_in(
        &ul,
        &["link", "set", underlay_end, "master", UNDERLAY_BRIDGE, "up"],
    )?;
    let cidr = format!("{addr}/{}", cfg.underlay().prefix_len());
    ip_in(netns, &["addr", "add", &cidr, "dev", "eth0"])?;
    ip_in(netns, &["link", "set", "eth0", "mtu", &mtu, "up"])?;
    Ok(())
}

/// The control-plane namespace of a cluster, on the underlay.
pub fn create_control_plane(cfg: &LabConfig, cluster: &ClusterPlan) -> Result<()> {
    attach_to_underlay(
        cfg,
        &cluster.cp_netns,
        &format!("u{}cp", cluster.index),
        cluster.apiserver_ip,
    )
}

/// A node namespace: `eth0` on the underlay, `cbr0` owning the node's pod
/// CIDR, forwarding on, routes to the other nodes' pod CIDRs of its
/// cluster, and masquerade of pod traffic leaving the cluster's pod network.
pub fn create_node(cfg: &LabConfig, cluster: &ClusterPlan, node: &NodePlan) -> Result<()> {
    let ns = &node.netns;
    attach_to_underlay(
        cfg,
        ns,
        &format!("u{}n{}", cluster.index, node.index),
        node.underlay_ip,
    )?;
    sysctl_in(ns, "net.ipv4.ip_forward", "1")?;
    ip_in(ns, &["link", "add", POD_BRIDGE, "type", "bridge"])?;
    let gw = format!("{}/{}", node.gateway(), node.pod_cidr.prefix_len());
    ip_in(ns, &["addr", "add", &gw, "dev", POD_BRIDGE])?;
    ip_in(
        ns,
        &[
            "link",
            "set",
            POD_BRIDGE,
            "mtu",
            &cfg.underlay_mtu.to_string(),
            "up",
        ],
    )?;
    for other in cluster.nodes.iter().filter(|o| o.name != node.name) {
        ip_in(
            ns,
            &[
                "route",
                "add",
                &other.pod_cidr.to_string(),
                "via",
                &other.underlay_ip.to_string(),
                "dev",
                "eth0",
            ],
        )?;
    }
    nft_in(
        ns,
        &format!(
            "table ip {NODE_NAT_TABLE} {{\n  chain postrouting {{\n    type nat hook postrouting priority srcnat; policy accept;\n    \
             ip saddr {pods} ip daddr != {pods} oifname \"eth0\" masquerade\n  }}\n}}\n",
            pods = cluster.pod_cidr
        ),
    )?;
    if let Some(netem) = cfg.netem {
        run(
            "ip",
            &[
                "netns",
                "exec",
                ns,
                "tc",
                "qdisc",
                "add",
                "dev",
                "eth0",
                "root",
                "netem",
                "delay",
                &format!("{}ms", netem.delay_ms),
                "loss",
                &format!("{}%", netem.loss_percent),
            ],
        )?;
    }
    Ok(())
}

/// Short, stable name of a pod's node-side veth (interface names are
/// limited to 15 bytes): `v` and a hash of the pod namespace name.
pub fn pod_veth_name(pod_netns: &str) -> String {
    // FNV-1a: stable across runs and Rust versions, unlike DefaultHasher.
    let hash = pod_netns.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    format!("v{:08x}", hash & 0xffff_ffff)
}

/// A pod namespace attached to its node's `cbr0`: `eth0` with `ip`, default
/// route via the node's bridge address.
pub fn create_pod(
    cfg: &LabConfig,
    node: &NodePlan,
    pod_netns: &str,
    pod_ip: Ipv4Addr,
) -> Result<()> {
    if netns_exists(pod_netns) {
        anyhow::bail!("network namespace {pod_netns} already exists");
    }
    let mtu = cfg.underlay_mtu.to_string();
    add_netns(pod_netns)?;
    let veth = pod_veth_name(pod_netns);
    ip_in(
        &node.netns,
        &[
            "link", "add", &veth, "mtu", &mtu, "type", "veth", "peer", "name", "eth0", "netns",
            pod_netns,
        ],
    )?;
    ip_in(
        &node.netns,
        &["link", "set", &veth, "master", POD_BRIDGE, "up"],
    )?;
    let cidr = format!("{pod_ip}/{}", node.pod_cidr.prefix_len());
    ip_in(pod_netns, &["addr", "add", &cidr, "dev", "eth0"])?;
    ip_in(pod_netns, &["link", "set", "eth0", "mtu", &mtu, "up"])?;
    ip_in(
        pod_netns,
        &[
            "route",
            "add",
            "default",
            "via",
            &node.gateway().to_string(),
            "dev",
            "eth0",
        ],
    )?;
    Ok(())
}

/// The first free pod address of a node (from `.10`), given the used ones.
pub fn next_pod_ip(pod_cidr: Ipv4Net, used: &[Ipv4Addr]) -> Option<Ipv4Addr> {
    pod_cidr.hosts().skip(9).find(|a| !used.contains(a))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn veth_names_fit_and_differ() {
        let a = pod_veth_name("sdnt-east-web-1");
        let b = pod_veth_name("sdnt-east-web-2");
        assert_ne!(a, b);
        assert!(a.len() <= 15, "{a}");
        assert_eq!(a, pod_veth_name("sdnt-east-web-1"), "stable");
    }

    #[test]
    fn pod_ips_start_at_ten_and_skip_used() {
        let net: Ipv4Net = "10.1.1.0/24".parse().unwrap();
        assert_eq!(next_pod_ip(net, &[]), Some(Ipv4Addr::new(10, 1, 1, 10)));
        let used = [Ipv4Addr::new(10, 1, 1, 10), Ipv4Addr::new(10, 1, 1, 11)];
        assert_eq!(next_pod_ip(net, &used), Some(Ipv4Addr::new(10, 1, 1, 12)));
        let full: Vec<Ipv4Addr> = net.hosts().collect();
        assert_eq!(next_pod_ip(net, &full), None);
    }
}
