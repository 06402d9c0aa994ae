//! End-to-end checks of sdn-tunnel, run against the lab: install the
//! manifests of `deploy/` into every lab cluster through the real
//! apiservers, give agents the identity the DaemonSet would give them (a
//! token of the `tunnel-agent` ServiceAccount), declare the mesh with
//! TunnelClusters and kubeconfig Secrets, start one agent per node in its
//! own pod namespace, and observe the result.

pub mod ansible;
pub mod checks;
pub mod daemonset;
pub mod dns_client;
pub mod kubelet;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Secret, ServiceAccount};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::ByteString;
use kube::api::{DynamicObject, Patch, PatchParams, PostParams};
use kube::core::GroupVersionKind;
use kube::discovery::pinned_kind;
use kube::{Api, Client, ResourceExt};
use sdn_tunnel_api::{PeerState, SecretKeyRef, TunnelCluster, TunnelClusterSpec, TunnelPeer};
use sdn_tunnel_lab::{Identity, Lab, Pod};

/// Namespace of the agents (deploy/namespace.yaml).
pub const NAMESPACE: &str = "sdn-tunnel";
/// Field manager of what the e2e installer writes.
pub const FIELD_MANAGER: &str = "sdn-tunnel-e2e";
/// Prefix of the agent pod names (`agent-<node index>`).
pub const AGENT_POD: &str = "agent";

/// The routes the agent installed in a namespace: those of its route
/// protocol (93, `drivers::netlink::ROUTE_PROTOCOL`), as `ip route` prints them.
pub fn our_routes(netns: &str) -> Result<Vec<String>> {
    Ok(
        sdn_tunnel_lab::sys::ip_in(netns, &["route", "show", "proto", "93"])?
            .lines()
            .map(str::to_string)
            .collect(),
    )
}

/// The repository's root (where `deploy/` is).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A cargo-built binary of this workspace (`tunnel-agent`, `tunctl`), next
/// to the test executable's directory.
pub fn workspace_binary(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    for dir in exe.ancestors().skip(1).take(2) {
        let p = dir.join(name);
        if p.is_file() {
            return Ok(p);
        }
    }
    bail!(
        "no {name} binary near {}: run `cargo build --workspace --bins` first",
        exe.display()
    )
}

/// Applies every document of a multi-document YAML with server-side apply,
/// resolving each kind through API discovery.
pub async fn apply_yaml(client: &Client, yaml: &str) -> Result<()> {
    let pp = PatchParams::apply(FIELD_MANAGER).force();
    for doc in serde_yaml::Deserializer::from_str(yaml) {
        let value = <serde_yaml::Value as serde::Deserialize>::deserialize(doc)?;
        if value.is_null() {
            continue;
        }
        let obj: DynamicObject = serde_yaml::from_value(value)?;
        let types = obj
            .types
            .clone()
            .context("a document without apiVersion/kind")?;
        let gvk = GroupVersionKind::try_from(&types)?;
        let (resource, caps) = pinned_kind(client, &gvk).await?;
        let name = obj.name_any();
        let api: Api<DynamicObject> = if caps.scope == kube::discovery::Scope::Namespaced {
            let ns = obj.namespace().unwrap_or_else(|| "default".into());
            Api::namespaced_with(client.clone(), &ns, &resource)
        } else {
            Api::all_with(client.clone(), &resource)
        };
        api.patch(&name, &pp, &Patch::Apply(&obj))
            .await
            .with_context(|| format!("applying {} {name}", gvk.kind))?;
    }
    Ok(())
}

/// Applies the CRDs of `deploy/crds` and waits until they are served.
pub async fn install_crds(client: &Client) -> Result<()> {
    let dir = repo_root().join("deploy/crds");
    let mut names = Vec::new();
    for entry in std::fs::read_dir(&dir).with_context(|| format!("{}", dir.display()))? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let text = std::fs::read_to_string(&path)?;
            let crd: CustomResourceDefinition = serde_yaml::from_str(&text)?;
            names.push(crd.name_any());
            apply_yaml(client, &text).await?;
        }
    }
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for name in names {
        sdn_tunnel_lab::controlplane::wait_crd_established(&crds, &name).await?;
    }
    Ok(())
}

/// A kubeconfig authenticating as a ServiceAccount with a token from the
/// TokenRequest API, as the kubelet would mount it into the pod.
pub async fn service_account_kubeconfig(
    lab: &Lab,
    cluster: &str,
    sa: &str,
    path: &Path,
) -> Result<()> {
    let client = lab.client(cluster, Identity::Admin).await?;
    let req = TokenRequest {
        spec: TokenRequestSpec {
            audiences: vec!["https://kubernetes.default.svc".into()],
            expiration_seconds: Some(24 * 3600),
            ..Default::default()
        },
        ..Default::default()
    };
    let token = Api::<ServiceAccount>::namespaced(client, NAMESPACE)
        .create_token_request(sa, &PostParams::default(), &req)
        .await
        .with_context(|| format!("token for {NAMESPACE}/{sa} in {cluster}"))?
        .status
        .context("TokenRequest without status")?
        .token;
    // The admin kubeconfig has the cluster's CA and URL: swap the user.
    let text = std::fs::read_to_string(lab.kubeconfig(cluster, Identity::Admin))?;
    let mut doc: serde_yaml::Value = serde_yaml::from_str(&text)?;
    let user = serde_yaml::to_value(BTreeMap::from([("token", token)]))?;
    if let Some(serde_yaml::Value::Sequence(users)) = doc.get_mut("users") {
        for u in users {
            if let Some(m) = u.as_mapping_mut() {
                m.insert("user".into(), user.clone());
            }
        }
    }
    std::fs::write(path, serde_yaml::to_string(&doc)?)?;
    Ok(())
}

/// What the e2e installer did, per cluster.
#[derive(Debug, Clone)]
pub struct Installed {
    /// Kubeconfig of the `tunnel-agent` ServiceAccount, by cluster.
    pub agent_kubeconfig: BTreeMap<String, PathBuf>,
}

/// Installs sdn-tunnel's manifests into every lab cluster and declares the
/// full mesh: in each cluster a local TunnelCluster, and for every other
/// cluster a TunnelCluster plus a Secret with that cluster's read-only
/// (`remote-reader`) kubeconfig.
pub async fn install(lab: &Lab) -> Result<Installed> {
    let root = repo_root();
    let namespace = std::fs::read_to_string(root.join("deploy/namespace.yaml"))?;
    let rbac = std::fs::read_to_string(root.join("deploy/rbac.yaml"))?;
    let mut agent_kubeconfig = BTreeMap::new();
    let mut reader_kubeconfig = BTreeMap::new();
    for cluster in &lab.config().clusters {
        let client = lab.client(cluster, Identity::Admin).await?;
        apply_yaml(&client, &namespace).await?;
        install_crds(&client).await?;
        apply_yaml(&client, &rbac).await?;
        let dir = lab.cluster_dir(cluster);
        let agent = dir.join("tunnel-agent.kubeconfig");
        service_account_kubeconfig(lab, cluster, "tunnel-agent", &agent).await?;
        let reader = dir.join("remote-reader.kubeconfig");
        service_account_kubeconfig(lab, cluster, "remote-reader", &reader).await?;
        agent_kubeconfig.insert(cluster.clone(), agent);
        reader_kubeconfig.insert(cluster.clone(), reader);
    }
    let plans = lab.config().plan();
    let pp = PatchParams::apply(FIELD_MANAGER).force();
    for here in &plans {
        let client = lab.client(&here.name, Identity::Admin).await?;
        let clusters: Api<TunnelCluster> = Api::all(client.clone());
        let secrets: Api<Secret> = Api::namespaced(client.clone(), NAMESPACE);
        for other in &plans {
            let local = other.name == here.name;
            let secret_name = format!("{}-kubeconfig", other.name);
            if !local {
                let kubeconfig = std::fs::read(&reader_kubeconfig[&other.name])?;
                let secret = Secret {
                    metadata: kube::api::ObjectMeta {
                        name: Some(secret_name.clone()),
                        namespace: Some(NAMESPACE.into()),
                        ..Default::default()
                    },
                    data: Some(BTreeMap::from([(
                        "kubeconfig".to_string(),
                        ByteString(kubeconfig),
                    )])),
                    ..Default::default()
                };
                secrets
                    .patch(&secret_name, &pp, &Patch::Apply(&secret))
                    .await?;
            }
            let decl = TunnelCluster::new(
                &other.name,
                TunnelClusterSpec {
                    cluster_name: other.name.clone(),
                    pod_cidrs: vec![other.pod_cidr.to_string()],
                    service_cidrs: vec![other.service_cidr.to_string()],
                    dns_zone: None,
                    local,
                    kubeconfig_secret_ref: (!local).then(|| SecretKeyRef {
                        name: secret_name.clone(),
                        namespace: Some(NAMESPACE.into()),
                        key: None,
                    }),
                    service_selector: None,
                    endpoint_overrides: vec![],
                },
            );
            clusters
                .patch(&other.name, &pp, &Patch::Apply(&decl))
                .await?;
        }
    }
    Ok(Installed { agent_kubeconfig })
}

/// Starts `tunnel-agent run` in an agent pod on every node, configured as
/// the DaemonSet configures it (env from the downward API, the node's
/// network namespace, a key file on the node).
pub fn start_agents(lab: &mut Lab, installed: &Installed) -> Result<Vec<Pod>> {
    let mut pods = Vec::new();
    for plan in lab.config().plan() {
        for node in &plan.nodes {
            pods.push(start_agent(lab, installed, &plan.name, node.index)?);
        }
    }
    Ok(pods)
}

/// Starts the agent pod (`agent-<index>`) of one node.
pub fn start_agent(
    lab: &mut Lab,
    installed: &Installed,
    cluster: &str,
    node_index: u8,
) -> Result<Pod> {
    let agent = workspace_binary("tunnel-agent")?;
    let plan = lab.cluster(cluster)?;
    let node = plan
        .nodes
        .iter()
        .find(|n| n.index == node_index)
        .context("no such node")?;
    let key = lab.cluster_dir(cluster).join(format!("{}.key", node.name));
    let kubeconfig = installed
        .agent_kubeconfig
        .get(cluster)
        .context("cluster not installed")?;
    let env = vec![
        ("POD_NAMESPACE".to_string(), NAMESPACE.to_string()),
        ("KUBECONFIG".to_string(), kubeconfig.display().to_string()),
        ("SDN_TUNNEL_KEY_FILE".to_string(), key.display().to_string()),
        (
            "SDN_TUNNEL_NODE_NETNS".to_string(),
            format!("/run/netns/{}", node.netns),
        ),
        (
            "SDN_TUNNEL_METRICS_ADDR".to_string(),
            "0.0.0.0:9586".to_string(),
        ),
        (
            "RUST_LOG".to_string(),
            "info,sdn_tunnel_agent=debug".to_string(),
        ),
    ];
    let args = vec!["run".to_string(), "--status-interval".into(), "1s".into()];
    let name = format!("{AGENT_POD}-{}", node.index);
    lab.add_pod_running(cluster, node.index, &name, &agent, &args, &env)
}

/// `text` without terminal colour codes (CSI sequences: ESC [ params
/// final-byte), as the agents' tracing writes them to their logs.
pub fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Prints the logs of `pods` to stderr: what a failed check shows.
pub fn dump_logs(lab: &Lab, pods: &[Pod]) {
    for p in pods {
        eprintln!(
            "--- {}/{}:\n{}",
            p.cluster,
            p.name,
            std::fs::read_to_string(lab.pod_log(&p.cluster, &p.name)).unwrap_or_default()
        );
    }
}

/// A lab per `cfg` with sdn-tunnel installed ([`install`]) and an agent on
/// every node ([`start_agents`]), once every tunnel is connected (the
/// agents' logs are printed when that takes longer than `timeout`).
pub async fn connected_mesh(
    cfg: sdn_tunnel_lab::LabConfig,
    timeout: Duration,
) -> Result<(Lab, Installed, Vec<Pod>)> {
    let mut lab = Lab::up(cfg).await.context("lab up")?;
    let installed = install(&lab).await.context("install")?;
    let agents = start_agents(&mut lab, &installed).context("agents")?;
    wait_mesh_connected_or_dump(&lab, &agents, timeout).await?;
    Ok((lab, installed, agents))
}

/// [`wait_mesh_connected`], printing the `agents`' logs when it fails.
pub async fn wait_mesh_connected_or_dump(
    lab: &Lab,
    agents: &[Pod],
    timeout: Duration,
) -> Result<Duration> {
    let r = wait_mesh_connected(lab, timeout).await;
    if r.is_err() {
        dump_logs(lab, agents);
    }
    r
}

/// Every TunnelPeer of every cluster, with the cluster it is in.
pub async fn tunnel_peers(lab: &Lab) -> Result<Vec<(String, TunnelPeer)>> {
    let mut out = Vec::new();
    for cluster in &lab.config().clusters {
        let client = lab.client(cluster, Identity::Admin).await?;
        for p in Api::<TunnelPeer>::namespaced(client, NAMESPACE)
            .list(&Default::default())
            .await?
        {
            out.push((cluster.clone(), p));
        }
    }
    Ok(out)
}

/// Waits until every node's TunnelPeer reports every remote node as
/// Connected; returns how long it took.
pub async fn wait_mesh_connected(lab: &Lab, timeout: Duration) -> Result<Duration> {
    let started = Instant::now();
    let plans = lab.config().plan();
    let total_nodes: usize = plans.iter().map(|c| c.nodes.len()).sum();
    let mut last = String::new();
    while started.elapsed() < timeout {
        let peers = tunnel_peers(lab).await?;
        let mut missing = Vec::new();
        for plan in &plans {
            let remote_nodes = total_nodes - plan.nodes.len();
            for node in &plan.nodes {
                let connected = peers
                    .iter()
                    .find(|(c, p)| c == &plan.name && p.spec.node == node.name)
                    .and_then(|(_, p)| p.status.as_ref())
                    .map(|s| {
                        s.peers
                            .iter()
                            .filter(|r| r.state == PeerState::Connected)
                            .count()
                    })
                    .unwrap_or(0);
                if connected < remote_nodes {
                    missing.push(format!("{}: {connected}/{remote_nodes}", node.name));
                }
            }
        }
        if missing.is_empty() {
            return Ok(started.elapsed());
        }
        last = missing.join(", ");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    bail!("mesh not connected after {timeout:?}: {last}")
}
