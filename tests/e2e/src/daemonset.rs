//! The lab's stand-in for a kubelet running the `tunnel-agent` DaemonSet:
//! it reads the DaemonSet *as installed in the cluster* and starts one agent
//! per lab node with exactly what a kubelet would give that pod — the
//! container's args, its env (plain values and the downward API), a token
//! of its ServiceAccount from the TokenRequest API, and its hostPath
//! volumes mapped onto per-node directories of the lab. Anything in the
//! pod spec the lab cannot reproduce is an error, so the DaemonSet cannot
//! drift away from what the e2e proves.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{Container, PodSpec};
use kube::Api;
use sdn_tunnel_lab::{Identity, Lab, NodePlan, Pod};

use crate::{service_account_kubeconfig, workspace_binary, AGENT_POD, NAMESPACE};

/// Name of the agent DaemonSet (deploy/daemonset.yaml).
pub const DAEMONSET: &str = "tunnel-agent";
/// Name of the DNS Deployment (deploy/dns.yaml).
pub const DNS_DEPLOYMENT: &str = "tunnel-dns";

/// What one lab node's agent pod gets, derived from the DaemonSet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentLaunch {
    pub cluster: String,
    pub node: String,
    pub args: Vec<String>,
    /// Environment besides `POD_IP`/`NODE_NAME`, which the lab sets for
    /// every pod as the downward API does.
    pub env: Vec<(String, String)>,
    pub service_account: String,
}

/// A hostPath (or emptyDir, a kubelet-made directory on the node) volume
/// mounted into the container.
#[derive(Debug, Clone)]
struct HostMount {
    mount_path: PathBuf,
    host_path: PathBuf,
    host_type: String,
}

/// Where a node's "host filesystem" lives in the lab (hostPath volumes).
pub fn node_root(lab: &Lab, cluster: &str, node: &str) -> PathBuf {
    lab.cluster_dir(cluster).join("node-fs").join(node)
}

fn host_mounts(spec: &PodSpec, c: &Container) -> Result<Vec<HostMount>> {
    let mut out = Vec::new();
    for m in c.volume_mounts.iter().flatten() {
        let vol = spec
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == m.name)
            .with_context(|| format!("volumeMount {} has no volume", m.name))?;
        let (host_path, host_type) = match (&vol.host_path, &vol.empty_dir) {
            (Some(hp), None) => (
                PathBuf::from(&hp.path),
                hp.type_.clone().unwrap_or_default(),
            ),
            // An emptyDir is a directory the kubelet makes on the node for
            // this pod (one pod of this template per node in the lab). Kept
            // short: UNIX socket paths must fit in 108 bytes.
            (None, Some(_)) => (
                PathBuf::from(format!("/emptydir/{}", vol.name)),
                "DirectoryOrCreate".to_string(),
            ),
            _ => bail!(
                "volume {} is neither a hostPath nor an emptyDir: the lab cannot provide it",
                vol.name
            ),
        };
        out.push(HostMount {
            mount_path: PathBuf::from(&m.mount_path),
            host_path,
            host_type,
        });
    }
    Ok(out)
}

/// Maps a path inside the container onto the lab: a path under a hostPath
/// mount lands in the node's lab directory, except the host's procfs, where
/// the only thing the lab has is PID 1's network namespace (the node's
/// netns). Paths outside every mount are returned unchanged.
fn map_path(
    lab: &Lab,
    cluster: &str,
    node: &NodePlan,
    mounts: &[HostMount],
    p: &str,
) -> Result<String> {
    let path = Path::new(p);
    for m in mounts {
        if let Ok(rest) = path.strip_prefix(&m.mount_path) {
            if m.host_path == Path::new("/proc") {
                if rest == Path::new("1/ns/net") {
                    return Ok(format!("/run/netns/{}", node.netns));
                }
                bail!("{p}: the lab's host procfs only has 1/ns/net");
            }
            let host = m.host_path.strip_prefix("/").unwrap_or(&m.host_path);
            return Ok(node_root(lab, cluster, &node.name)
                .join(host)
                .join(rest)
                .display()
                .to_string());
        }
    }
    Ok(p.to_string())
}

/// Reads the installed DaemonSet and derives every node's agent launch.
pub async fn agent_launches(lab: &Lab, cluster: &str) -> Result<Vec<AgentLaunch>> {
    let client = lab.client(cluster, Identity::Admin).await?;
    let ds = Api::<DaemonSet>::namespaced(client, NAMESPACE)
        .get(DAEMONSET)
        .await
        .with_context(|| format!("DaemonSet {NAMESPACE}/{DAEMONSET} in {cluster}"))?;
    let spec = ds
        .spec
        .and_then(|s| s.template.spec)
        .context("DaemonSet without a pod spec")?;
    let plan = lab.cluster(cluster)?;
    template_launches(lab, cluster, &spec, &plan.nodes)
}

/// Reads the installed DNS Deployment and derives one replica's launch on
/// the cluster's first node (the lab has no scheduler; one replica is
/// enough to prove the pod template and its identity).
pub async fn dns_launch(lab: &Lab, cluster: &str) -> Result<AgentLaunch> {
    let client = lab.client(cluster, Identity::Admin).await?;
    let d = Api::<Deployment>::namespaced(client, NAMESPACE)
        .get(DNS_DEPLOYMENT)
        .await
        .with_context(|| format!("Deployment {NAMESPACE}/{DNS_DEPLOYMENT} in {cluster}"))?;
    let spec = d
        .spec
        .and_then(|s| s.template.spec)
        .context("Deployment without a pod spec")?;
    let plan = lab.cluster(cluster)?;
    let first = plan.nodes.first().context("a cluster without nodes")?;
    template_launches(lab, cluster, &spec, std::slice::from_ref(first))?
        .pop()
        .context("no launch")
}

/// What a kubelet on each of `nodes` would run for pod template `spec`.
fn template_launches(
    lab: &Lab,
    cluster: &str,
    spec: &PodSpec,
    nodes: &[NodePlan],
) -> Result<Vec<AgentLaunch>> {
    if spec.host_network == Some(true) {
        bail!("the pod template asks for hostNetwork: sdn-tunnel's pods (and the lab) need their own pod netns");
    }
    let [c] = spec.containers.as_slice() else {
        bail!(
            "the lab runs one container per pod, the template has {}",
            spec.containers.len()
        );
    };
    match c.command.as_deref() {
        None => {}
        Some([one]) if one == "tunnel-agent" || one == "/usr/local/bin/tunnel-agent" => {}
        Some(other) => bail!("container command {other:?}: the lab runs tunnel-agent"),
    }
    let sa = spec
        .service_account_name
        .clone()
        .context("the pod template names no serviceAccountName")?;
    let mounts = host_mounts(spec, c)?;
    let mut out = Vec::new();
    for node in nodes {
        let mut env = Vec::new();
        for e in c.env.iter().flatten() {
            let value = match (&e.value, &e.value_from) {
                (Some(v), None) => map_path(lab, cluster, node, &mounts, v)?,
                (None, Some(from)) => {
                    let field = from
                        .field_ref
                        .as_ref()
                        .map(|f| f.field_path.as_str())
                        .with_context(|| format!("env {}: only fieldRef is emulated", e.name))?;
                    match field {
                        // The lab sets these for every pod (Lab::add_pod_running).
                        "spec.nodeName" | "status.podIP" => continue,
                        "metadata.namespace" => NAMESPACE.to_string(),
                        other => bail!("env {}: fieldRef {other} is not emulated", e.name),
                    }
                }
                (None, None) => String::new(),
                (Some(_), Some(_)) => bail!("env {} has both value and valueFrom", e.name),
            };
            env.push((e.name.clone(), value));
        }
        out.push(AgentLaunch {
            cluster: cluster.to_string(),
            node: node.name.clone(),
            args: c.args.clone().unwrap_or_default(),
            env,
            service_account: sa.clone(),
        });
    }
    // hostPath types, checked or created as the kubelet does.
    for node in nodes {
        for m in &mounts {
            if m.host_path == Path::new("/proc") {
                continue;
            }
            let lab_path = if m.host_type == "CharDevice" {
                m.host_path.clone()
            } else {
                node_root(lab, cluster, &node.name)
                    .join(m.host_path.strip_prefix("/").unwrap_or(&m.host_path))
            };
            match m.host_type.as_str() {
                "DirectoryOrCreate" => std::fs::create_dir_all(&lab_path)?,
                "CharDevice" => {
                    use std::os::unix::fs::FileTypeExt;
                    if !std::fs::metadata(&lab_path)?.file_type().is_char_device() {
                        bail!("{} is not a character device", lab_path.display());
                    }
                }
                t => bail!(
                    "hostPath {} of type {t:?} is not emulated",
                    m.host_path.display()
                ),
            }
        }
    }
    Ok(out)
}

/// Starts an agent in a pod namespace on every node of every lab cluster,
/// as the installed DaemonSet describes it, authenticated with a token of
/// the DaemonSet's ServiceAccount (the lab's stand-in for the in-cluster
/// config: a kubeconfig with that token and the apiserver's URL).
pub async fn start_agents_from_daemonset(lab: &mut Lab) -> Result<Vec<(AgentLaunch, Pod)>> {
    let agent = workspace_binary("tunnel-agent")?;
    start_agents_from_daemonset_running(lab, &agent).await
}

/// [`start_agents_from_daemonset`] with another `tunnel-agent` binary
/// (a release build, or one under comparison: the benchmarks use it).
pub async fn start_agents_from_daemonset_running(
    lab: &mut Lab,
    agent: &Path,
) -> Result<Vec<(AgentLaunch, Pod)>> {
    let mut launches = Vec::new();
    for cluster in lab.config().clusters.clone() {
        launches.extend(agent_launches(lab, &cluster).await?);
    }
    start_launches(lab, launches, agent, |node| format!("{AGENT_POD}-{node}")).await
}

/// Starts one replica of the installed DNS Deployment (`tunnel-agent dns`)
/// in every lab cluster, in pod `tunnel-dns` on the first node, with a token
/// of the Deployment's ServiceAccount.
pub async fn start_dns_from_deployment(lab: &mut Lab) -> Result<Vec<(AgentLaunch, Pod)>> {
    let mut launches = Vec::new();
    for cluster in lab.config().clusters.clone() {
        launches.push(dns_launch(lab, &cluster).await?);
    }
    let agent = workspace_binary("tunnel-agent")?;
    start_launches(lab, launches, &agent, |_| DNS_DEPLOYMENT.to_string()).await
}

async fn start_launches(
    lab: &mut Lab,
    launches: Vec<AgentLaunch>,
    agent: &Path,
    pod_name: impl Fn(u8) -> String,
) -> Result<Vec<(AgentLaunch, Pod)>> {
    let mut tokens = BTreeMap::new();
    let mut pods = Vec::new();
    for l in launches {
        let key = (l.cluster.clone(), l.service_account.clone());
        if let std::collections::btree_map::Entry::Vacant(slot) = tokens.entry(key.clone()) {
            let path = lab
                .cluster_dir(&l.cluster)
                .join(format!("{}.sa.kubeconfig", l.service_account));
            service_account_kubeconfig(lab, &l.cluster, &l.service_account, &path).await?;
            slot.insert(path);
        }
        let plan = lab.cluster(&l.cluster)?;
        let node = plan
            .nodes
            .iter()
            .find(|n| n.name == l.node)
            .context("node vanished from the plan")?;
        let mut env = l.env.clone();
        env.push(("KUBECONFIG".into(), tokens[&key].display().to_string()));
        let pod = lab.add_pod_running(
            &l.cluster,
            node.index,
            &pod_name(node.index),
            agent,
            &l.args,
            &env,
        )?;
        pods.push((l, pod));
    }
    Ok(pods)
}

/// The HTTP status of `GET <path>` on `addr`, from inside `netns` (for the
/// pods' `/healthz` and `/readyz`, as the kubelet probes them).
pub fn http_status(netns: &str, addr: std::net::SocketAddr, path: &str) -> Result<u16> {
    http_get(netns, addr, path).map(|(status, _)| status)
}

/// `GET <path>` on `addr` from inside `netns`: the status and the body.
pub fn http_get(netns: &str, addr: std::net::SocketAddr, path: &str) -> Result<(u16, String)> {
    use std::io::{Read, Write};
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    let answer = sdn_tunnel_lab::sys::in_netns(netns, move || {
        let mut s = std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(2))?;
        s.set_read_timeout(Some(std::time::Duration::from_secs(2)))?;
        s.write_all(request.as_bytes())?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf).into_owned())
    })?;
    let status = answer
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .with_context(|| format!("not an HTTP answer from {addr}{path}: {answer:?}"))?;
    let body = answer
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// Resolves `name` (type A) through the DNS server at `server`, from inside
/// `netns`: the response code and the addresses answered.
pub fn resolve_a(
    netns: &str,
    server: std::net::SocketAddr,
    name: &str,
) -> Result<(u8, Vec<std::net::Ipv4Addr>)> {
    use crate::dns_client::{decode_answer, encode_query};
    let id: u16 = 0x5d7e;
    let q = encode_query(id, name)?;
    let answer = sdn_tunnel_lab::sys::in_netns(netns, move || {
        let sock = std::net::UdpSocket::bind("0.0.0.0:0")?;
        sock.set_read_timeout(Some(std::time::Duration::from_secs(2)))?;
        sock.send_to(&q, server)?;
        let mut buf = [0u8; 1500];
        let n = sock.recv(&mut buf)?;
        Ok(buf[..n].to_vec())
    })?;
    let (answer_id, rcode, ips) = decode_answer(&answer)?;
    if answer_id != id {
        bail!("answer for another query");
    }
    Ok((rcode, ips.into_iter().collect()))
}
