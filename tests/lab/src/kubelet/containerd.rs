//! A node's containerd: its `config.toml` (own root, state and sockets;
//! overlayfs; runc without systemd cgroups; the lab's pause image) and the
//! CNI network its CRI plugin gives pods (bridge `cbr0` + host-local on the
//! node's pod CIDR, the bridge the process lab already makes).

use std::path::Path;

use crate::config::NodePlan;
use crate::net::POD_BRIDGE;

/// Where Debian's containernetworking-plugins installs the CNI binaries.
pub const CNI_BIN_DIR: &str = "/usr/lib/cni";

/// containerd's configuration for one node; `dir` is the node's directory.
pub fn config_toml(dir: &Path, sandbox_image: &str) -> String {
    let d = dir.display();
    format!(
        r#"# containerd of one kubelet-lab node (written by the lab)
version = 2
root = "{d}/containerd/root"
state = "{d}/containerd/state"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper"]

[grpc]
  address = "{d}/containerd.sock"

[ttrpc]
  address = "{d}/containerd.sock.ttrpc"

[debug]
  address = "{d}/containerd-debug.sock"

[metrics]
  address = ""

[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/containerd/opt"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{sandbox_image}"
  # No CAP_SYS_RESOURCE in this VM: without it every sandbox fails with
  # "can't get final child's PID from pipe: EOF".
  restrict_oom_score_adj = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{CNI_BIN_DIR}"
    conf_dir = "{d}/cni/net.d"
"#
    )
}

/// The node's CNI network list: pods on `cbr0` with addresses from the
/// node's pod CIDR (from `.10`, as the process lab gives them), the node's
/// bridge address as their gateway; no masquerade (the node's own NAT
/// table does that, see [`crate::net::NODE_NAT_TABLE`]).
pub fn cni_conflist(node: &NodePlan, mtu: u32, ipam_dir: &Path) -> String {
    let o = node.pod_cidr.network().octets();
    let first = std::net::Ipv4Addr::new(o[0], o[1], o[2], 10);
    serde_json::json!({
        "cniVersion": "0.4.0",
        "name": "lab",
        "plugins": [{
            "type": "bridge",
            "bridge": POD_BRIDGE,
            "isGateway": true,
            "ipMasq": false,
            "hairpinMode": true,
            "mtu": mtu,
            "ipam": {
                "type": "host-local",
                "dataDir": ipam_dir.display().to_string(),
                "ranges": [[{
                    "subnet": node.pod_cidr.to_string(),
                    "rangeStart": first.to_string(),
                    "gateway": node.gateway().to_string()
                }]],
                "routes": [{"dst": "0.0.0.0/0"}]
            }
        }]
    })
    .to_string()
}
