//! One real node: a directory with its configuration, state and logs, and
//! an init script that is PID 1 of the node's own PID namespace (started
//! as `nsenter --net=<node netns> unshare --pid --mount --fork
//! --mount-proc`). In its private mount namespace the init binds per-node
//! directories over the paths that kubelet, containerd and CNI take to be
//! one per machine, starts containerd, waits for the lab to import the
//! images, then starts kubelet and kube-proxy (each restarted if it exits,
//! as systemd would).

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::config::{ClusterPlan, LabConfig, NodePlan};
use crate::kubelet::Binaries;

/// The per-machine paths every node gets its own copy of, and the name of
/// that copy under `<node dir>/fs`. `/run/netns` holds the pods' network
/// namespaces (containerd's `cni-*`); `/var/lib/sdn-tunnel` is the
/// DaemonSet's hostPath for the node's private key.
pub const PER_NODE_PATHS: &[(&str, &str)] = &[
    ("/var/lib/kubelet", "var-lib-kubelet"),
    ("/var/log/pods", "var-log-pods"),
    ("/var/log/containers", "var-log-containers"),
    ("/run/containerd", "run-containerd"),
    ("/var/lib/cni", "var-lib-cni"),
    ("/run/netns", "run-netns"),
    ("/var/lib/sdn-tunnel", "var-lib-sdn-tunnel"),
];

/// File the lab creates once the images are imported (the init waits for
/// it before starting kubelet, so no pod ever tries a registry).
pub const IMAGES_READY: &str = "images-imported";

/// Paths of one node.
#[derive(Debug, Clone)]
pub struct NodeDir {
    pub dir: PathBuf,
}

impl NodeDir {
    pub fn new(cluster_dir: &Path, node: &NodePlan) -> Self {
        Self {
            dir: cluster_dir.join("nodes").join(&node.name),
        }
    }
    pub fn socket(&self) -> PathBuf {
        self.dir.join("containerd.sock")
    }
    pub fn log(&self, component: &str) -> PathBuf {
        self.dir.join(format!("{component}.log"))
    }
    /// The node's copy of a per-machine path (e.g. `/var/lib/sdn-tunnel`).
    pub fn host_path(&self, path: &str) -> Option<PathBuf> {
        PER_NODE_PATHS
            .iter()
            .find(|(p, _)| *p == path)
            .map(|(_, copy)| self.dir.join("fs").join(copy))
    }
}

/// The kubelet cgroup root of a node (relative to every hierarchy).
pub fn cgroup_root(lab: &str, node: &NodePlan) -> String {
    format!("{}/{}", crate::kubelet::cgroup_parent(lab), node.name)
}

/// Writes the node's files (configuration, kubeconfigs are written by the
/// caller) and returns the init script's path.
pub fn write_node(
    cfg: &LabConfig,
    cluster: &ClusterPlan,
    node: &NodePlan,
    nd: &NodeDir,
    bins: &Binaries,
    ca: &Path,
) -> Result<PathBuf> {
    let (lab, mtu) = (cfg.name.as_str(), cfg.underlay_mtu);
    let d = &nd.dir;
    for (_, copy) in PER_NODE_PATHS {
        fs::create_dir_all(d.join("fs").join(copy))?;
    }
    fs::create_dir_all(d.join("cni/net.d"))?;
    fs::create_dir_all(d.join("kubelet-pki"))?;
    fs::create_dir_all(d.join("volume-plugins"))?;
    fs::write(
        d.join("containerd.toml"),
        super::containerd::config_toml(d, super::image::PAUSE_IMAGE),
    )?;
    fs::write(
        d.join("cni/net.d/10-lab.conflist"),
        super::containerd::cni_conflist(node, mtu, &d.join("fs/var-lib-cni/networks")),
    )?;
    // Pods of the default DNS policy get the node's resolv.conf (the lab
    // runs no cluster DNS). Its nameserver is the lab host's underlay
    // address, where nothing listens: queries are refused at once and never
    // leave the machine. (An empty one makes `tunnel-agent dns` exit: "no
    // nameservers found".)
    fs::write(
        d.join("resolv.conf"),
        format!("nameserver {}\noptions ndots:1\n", cfg.host_ip()),
    )?;

    let q = |p: &Path| shell_quote(&p.to_string_lossy());
    let kubelet_args = [
        "--container-runtime=remote".to_string(),
        format!(
            "--container-runtime-endpoint=unix://{}",
            nd.socket().display()
        ),
        "--runtime-request-timeout=5m".into(),
        format!("--kubeconfig={}", d.join("kubelet.kubeconfig").display()),
        "--cgroup-driver=cgroupfs".into(),
        format!("--cgroup-root=/{}", cgroup_root(lab, node)),
        "--fail-swap-on=false".into(),
        "--root-dir=/var/lib/kubelet".into(),
        format!("--cert-dir={}", d.join("kubelet-pki").display()),
        format!("--volume-plugin-dir={}", d.join("volume-plugins").display()),
        format!("--hostname-override={}", node.name),
        format!("--node-ip={}", node.underlay_ip),
        // Where the apiserver reaches it for `kubectl logs/exec`.
        format!("--address={}", node.underlay_ip),
        "--anonymous-auth=false".into(),
        format!("--client-ca-file={}", ca.display()),
        "--authorization-mode=AlwaysAllow".into(),
        "--read-only-port=0".into(),
        format!("--resolv-conf={}", d.join("resolv.conf").display()),
        "--cluster-domain=cluster.local".into(),
        "--node-status-update-frequency=4s".into(),
        "--serialize-image-pulls=false".into(),
        // A shared lab machine whose disk may be nearly full: evict (and so
        // garbage-collect images, the pause image included, which leaves
        // every new pod unable to start) only when it is really full.
        "--eviction-hard=memory.available<50Mi,nodefs.available<100Mi,imagefs.available<100Mi"
            .into(),
        "--image-gc-high-threshold=100".into(),
        "--image-gc-low-threshold=99".into(),
        // Kept out of image garbage collection.
        format!("--pod-infra-container-image={}", super::image::PAUSE_IMAGE),
        "--max-pods=40".into(),
        "--v=2".into(),
    ];
    let proxy_args = [
        format!("--kubeconfig={}", d.join("kube-proxy.kubeconfig").display()),
        "--proxy-mode=iptables".into(),
        format!("--hostname-override={}", node.name),
        format!("--bind-address={}", node.underlay_ip),
        format!("--cluster-cidr={}", cluster.pod_cidr),
        // 1.20's kube-proxy would read v1beta1 EndpointSlices, which the
        // lab's apiserver does not serve: it reads Endpoints instead.
        "--feature-gates=EndpointSliceProxying=false".into(),
        // nf_conntrack_max is global, not the node's to set.
        "--conntrack-max-per-core=0".into(),
        "--v=1".into(),
    ];
    let join = |args: &[String]| {
        args.iter()
            .map(|a| shell_quote(a))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let mut binds = String::new();
    for (path, copy) in PER_NODE_PATHS {
        binds.push_str(&format!(
            "bind {} {}\n",
            q(&d.join("fs").join(copy)),
            shell_quote(path)
        ));
    }
    let script = format!(
        r#"#!/bin/bash
# PID 1 of lab node {name} (written by the lab). TERM ends the node: when
# PID 1 exits, the kernel kills everything in its PID namespace.
set -u
N={dir}
trap 'exit 0' TERM INT
bind() {{
    mount --bind "$1" "$2" || {{ echo "node init: cannot bind $1 on $2" >&2; exit 1; }}
}}
{binds}supervise() {{
    local name=$1; shift
    while true; do
        "$@" >>"$N/$name.log" 2>&1
        echo "node init: $name exited ($?), restarting in 1 s" >>"$N/$name.log"
        sleep 1
    done
}}
supervise containerd {containerd} --config "$N/containerd.toml" &
while [ ! -e "$N/{ready}" ]; do sleep 0.2; done
supervise kubelet {kubelet} {kubelet_args} &
supervise kube-proxy {proxy} {proxy_args} &
while true; do wait; done
"#,
        name = node.name,
        dir = q(d),
        containerd = q(&bins.containerd),
        ready = IMAGES_READY,
        kubelet = q(&bins.kubelet),
        kubelet_args = join(&kubelet_args),
        proxy = q(&bins.kube_proxy),
        proxy_args = join(&proxy_args),
    );
    let init = d.join("init.sh");
    fs::write(&init, script).with_context(|| format!("writing {}", init.display()))?;
    Ok(init)
}

/// Single-quotes a word for bash.
pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_survives_quotes() {
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
    }
}
