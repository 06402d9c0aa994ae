//! A cluster's control plane: a real `etcd` and a real `kube-apiserver`
//! (built from Debian's `kubernetes` source by `build-apiserver.sh`), both
//! running inside the cluster's control-plane network namespace, plus the
//! kubeconfigs and the objects a fresh cluster needs before anything else.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use base64::Engine as _;
use k8s_openapi::api::core::v1::{Node, NodeAddress, NodeSpec, NodeStatus};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, RoleRef, Subject};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};

use crate::config::{ClusterPlan, APISERVER_PORT};
use crate::pki::{ClusterPki, AGENT_GROUP};
use crate::sys::ProcRecord;

/// Field manager of everything the lab writes through the API.
pub const FIELD_MANAGER: &str = "sdn-tunnel-lab";

/// Name of the stand-in CRD that serves `discovery.k8s.io/v1` EndpointSlices
/// on the 1.20 apiserver (which only knows `v1beta1`). A lab shim only: the
/// agent itself speaks the real v1 API.
pub const ENDPOINTSLICE_V1_SHIM_CRD: &str = "endpointslices.discovery.k8s.io";

/// ClusterRole granted to the lab's agent identity (token user `lab-agent`).
pub const LAB_AGENT_CLUSTER_ROLE: &str = "sdn-tunnel-lab-agent";

/// Who a kubeconfig authenticates as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Identity {
    /// Client certificate in `system:masters`.
    Admin,
    /// Static bearer token in group `sdn-tunnel:lab-agents`: read-only on
    /// nodes, services and endpoint slices.
    Agent,
}

impl Identity {
    pub fn file_name(self) -> &'static str {
        match self {
            Identity::Admin => "admin.kubeconfig",
            Identity::Agent => "agent.kubeconfig",
        }
    }
}

/// Path of the etcd binary (Debian's `etcd-server`).
pub fn etcd_binary() -> Result<PathBuf> {
    let p = PathBuf::from("/usr/bin/etcd");
    if p.exists() {
        Ok(p)
    } else {
        bail!(
            "etcd not found at {}: run `bash tests/lab/build-apiserver.sh` (installs etcd-server)",
            p.display()
        )
    }
}

/// The cache of `build-apiserver.sh` (and `make image`):
/// `$SDN_TUNNEL_CACHE`, default `~/.cache/sdn-tunnel`.
pub fn cache_dir() -> PathBuf {
    std::env::var_os("SDN_TUNNEL_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into()))
                .join(".cache/sdn-tunnel")
        })
}

/// Path of the kube-apiserver built by `build-apiserver.sh`:
/// `$SDN_TUNNEL_APISERVER`, or the cached build.
pub fn apiserver_binary() -> Result<PathBuf> {
    if let Ok(p) = std::env::var("SDN_TUNNEL_APISERVER") {
        return Ok(PathBuf::from(p));
    }
    let cache = cache_dir();
    let missing = || {
        anyhow::anyhow!(
            "no kube-apiserver build in {}: run `bash tests/lab/build-apiserver.sh` first (about 10 minutes once)",
            cache.display()
        )
    };
    let ver =
        fs::read_to_string(cache.join(".kubernetes-source-version")).map_err(|_| missing())?;
    let bin = cache
        .join(format!("kube-apiserver-{}", ver.trim()))
        .join("kube-apiserver");
    if bin.exists() {
        Ok(bin)
    } else {
        Err(missing())
    }
}

/// Starts `program args` inside network namespace `netns` (`ip netns exec`
/// execs in place, so the PID is the program's), in its own process group
/// (a Ctrl-C in the terminal is handled by the lab, not delivered to it),
/// with stdout and stderr appended to `log`.
pub fn spawn_in_netns(
    netns: &str,
    program: &Path,
    args: &[String],
    log: &Path,
    what: &str,
) -> Result<ProcRecord> {
    spawn_in_netns_with_env(netns, program, args, &[], log, what)
}

/// [`spawn_in_netns`] with extra environment variables.
pub fn spawn_in_netns_with_env(
    netns: &str,
    program: &Path,
    args: &[String],
    env: &[(String, String)],
    log: &Path,
    what: &str,
) -> Result<ProcRecord> {
    use std::os::unix::process::CommandExt;
    let out = fs::OpenOptions::new().create(true).append(true).open(log)?;
    let err = out.try_clone()?;
    let child = Command::new("ip")
        .args(["netns", "exec", netns])
        .arg(program)
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .process_group(0)
        .spawn()
        .with_context(|| format!("cannot start {what}"))?;
    let pid = i32::try_from(child.id()).context("pid out of range")?;
    // `ip netns exec` needs a moment to exec the program; the start time
    // stays the same across exec, so the record is valid from now on.
    ProcRecord::of(pid, what)
}

/// Starts etcd in the control-plane namespace, listening on its loopback.
pub fn start_etcd(cluster: &ClusterPlan, dir: &Path) -> Result<ProcRecord> {
    let data = dir.join("etcd");
    fs::create_dir_all(&data)?;
    let args: Vec<String> = [
        "--name",
        "default",
        "--data-dir",
        &data.to_string_lossy(),
        "--listen-client-urls",
        "http://127.0.0.1:2379",
        "--advertise-client-urls",
        "http://127.0.0.1:2379",
        "--listen-peer-urls",
        "http://127.0.0.1:2380",
        "--initial-advertise-peer-urls",
        "http://127.0.0.1:2380",
        "--initial-cluster",
        "default=http://127.0.0.1:2380",
        // A lab etcd on a shared machine: durability is not the point, speed is.
        "--unsafe-no-fsync",
        "--log-level",
        "warn",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    spawn_in_netns(
        &cluster.cp_netns,
        &etcd_binary()?,
        &args,
        &dir.join("etcd.log"),
        &format!("etcd ({})", cluster.name),
    )
}

/// Starts kube-apiserver in the control-plane namespace, on the underlay
/// address, with TLS, client certificates, a token file and RBAC.
pub fn start_apiserver(
    cluster: &ClusterPlan,
    pki: &ClusterPki,
    dir: &Path,
    binary: &Path,
) -> Result<ProcRecord> {
    let p = |f: PathBuf| f.to_string_lossy().into_owned();
    let mut args = vec![
        "--etcd-servers=http://127.0.0.1:2379".to_string(),
        format!("--advertise-address={}", cluster.apiserver_ip),
        "--bind-address=0.0.0.0".to_string(),
        format!("--secure-port={APISERVER_PORT}"),
        "--insecure-port=0".to_string(),
        format!("--tls-cert-file={}", p(pki.server_crt())),
        format!("--tls-private-key-file={}", p(pki.server_key())),
        format!("--client-ca-file={}", p(pki.ca_crt())),
        format!("--token-auth-file={}", p(pki.tokens())),
        format!("--service-account-key-file={}", p(pki.sa_pub())),
        format!("--service-account-signing-key-file={}", p(pki.sa_key())),
        "--service-account-issuer=https://kubernetes.default.svc".to_string(),
        "--api-audiences=https://kubernetes.default.svc".to_string(),
        "--authorization-mode=Node,RBAC".to_string(),
        // No controller-manager runs: the ServiceAccount admission plugin
        // would refuse pods for lack of token secrets.
        "--disable-admission-plugins=ServiceAccount".to_string(),
        // No kubelets and no second apiserver: nothing to reconcile.
        "--endpoint-reconciler-type=none".to_string(),
        format!("--service-cluster-ip-range={}", cluster.service_cidr),
        // 1.20 serves EndpointSlice only as v1beta1; the lab serves v1
        // through a stand-in CRD (see ENDPOINTSLICE_V1_SHIM_CRD).
        "--runtime-config=discovery.k8s.io/v1beta1=false".to_string(),
        "--allow-privileged=true".to_string(),
        "--profiling=false".to_string(),
        "--enable-priority-and-fairness=false".to_string(),
        "--v=1".to_string(),
    ];
    if cluster.real_nodes {
        args = crate::kubelet::apiserver_args(args, pki);
    }
    spawn_in_netns(
        &cluster.cp_netns,
        binary,
        &args,
        &dir.join("kube-apiserver.log"),
        &format!("kube-apiserver ({})", cluster.name),
    )
}

/// Writes the admin and agent kubeconfigs of a cluster (credentials
/// embedded, so the files can be copied elsewhere) and returns their paths.
pub fn write_kubeconfigs(
    cluster: &ClusterPlan,
    pki: &ClusterPki,
    dir: &Path,
) -> Result<(PathBuf, PathBuf)> {
    let b64 = |f: PathBuf| -> Result<String> {
        Ok(base64::engine::general_purpose::STANDARD
            .encode(fs::read(&f).with_context(|| format!("{}", f.display()))?))
    };
    let ca = b64(pki.ca_crt())?;
    let server = cluster.apiserver_url();
    let name = &cluster.name;
    let admin = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: {name}\n  cluster:\n    server: {server}\n    \
         certificate-authority-data: {ca}\nusers:\n- name: {name}-admin\n  user:\n    client-certificate-data: {}\n    \
         client-key-data: {}\ncontexts:\n- name: {name}\n  context:\n    cluster: {name}\n    user: {name}-admin\n\
         current-context: {name}\n",
        b64(pki.admin_crt())?,
        b64(pki.admin_key())?
    );
    let agent = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: {name}\n  cluster:\n    server: {server}\n    \
         certificate-authority-data: {ca}\nusers:\n- name: {name}-agent\n  user:\n    token: {}\ncontexts:\n\
         - name: {name}\n  context:\n    cluster: {name}\n    user: {name}-agent\ncurrent-context: {name}\n",
        pki.agent_token()?
    );
    let admin_path = dir.join(Identity::Admin.file_name());
    let agent_path = dir.join(Identity::Agent.file_name());
    write_private(&admin_path, &admin)?;
    write_private(&agent_path, &agent)?;
    Ok((admin_path, agent_path))
}

/// Writes a file readable by its owner only (it holds credentials).
pub fn write_private(path: &Path, contents: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(contents.as_bytes())?;
    Ok(())
}

/// A kube-rs client from a kubeconfig file (its current context).
pub async fn client_from_kubeconfig(path: &Path) -> Result<Client> {
    let kubeconfig =
        Kubeconfig::read_from(path).with_context(|| format!("reading {}", path.display()))?;
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
    Ok(Client::try_from(config)?)
}

/// Waits until the apiserver answers `/readyz` with `ok` (every post-start
/// hook done, bootstrap RBAC in place), or fails with the log's tail.
pub async fn wait_ready(
    client: &Client,
    apiserver: &ProcRecord,
    log: &Path,
    timeout: Duration,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    let mut last = String::from("no answer yet");
    while Instant::now() < deadline {
        if !apiserver.alive() {
            bail!(
                "{} exited during start-up; last lines of {}:\n{}",
                apiserver.what,
                log.display(),
                tail(log, 20)
            );
        }
        let req = http::Request::get("/readyz").body(Vec::new())?;
        match client.request_text(req).await {
            Ok(body) if body.trim() == "ok" => return Ok(()),
            Ok(body) => last = body,
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    bail!(
        "{} not ready after {timeout:?} ({last}); last lines of {}:\n{}",
        apiserver.what,
        log.display(),
        tail(log, 20)
    )
}

/// The last `n` lines of a log file, for error messages.
pub fn tail(path: &Path, n: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// What a fresh lab cluster needs before anything else: the EndpointSlice
/// v1 shim, the agent identity's RBAC, and one Node object per node.
pub async fn bootstrap(client: &Client, cluster: &ClusterPlan) -> Result<()> {
    let pp = PatchParams::apply(FIELD_MANAGER).force();

    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    crds.patch(
        ENDPOINTSLICE_V1_SHIM_CRD,
        &pp,
        &Patch::Apply(endpointslice_v1_shim()?),
    )
    .await?;
    wait_crd_established(&crds, ENDPOINTSLICE_V1_SHIM_CRD).await?;

    let role = ClusterRole {
        metadata: ObjectMeta {
            name: Some(LAB_AGENT_CLUSTER_ROLE.into()),
            ..Default::default()
        },
        rules: Some(vec![
            PolicyRule {
                api_groups: Some(vec![String::new()]),
                resources: Some(vec!["nodes".into(), "services".into()]),
                verbs: vec!["get".into(), "list".into(), "watch".into()],
                ..Default::default()
            },
            PolicyRule {
                api_groups: Some(vec!["discovery.k8s.io".into()]),
                resources: Some(vec!["endpointslices".into()]),
                verbs: vec!["get".into(), "list".into(), "watch".into()],
                ..Default::default()
            },
        ]),
        ..Default::default()
    };
    Api::<ClusterRole>::all(client.clone())
        .patch(LAB_AGENT_CLUSTER_ROLE, &pp, &Patch::Apply(&role))
        .await?;
    let binding = ClusterRoleBinding {
        metadata: ObjectMeta {
            name: Some(LAB_AGENT_CLUSTER_ROLE.into()),
            ..Default::default()
        },
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".into(),
            kind: "ClusterRole".into(),
            name: LAB_AGENT_CLUSTER_ROLE.into(),
        },
        subjects: Some(vec![Subject {
            api_group: Some("rbac.authorization.k8s.io".into()),
            kind: "Group".into(),
            name: AGENT_GROUP.into(),
            ..Default::default()
        }]),
    };
    Api::<ClusterRoleBinding>::all(client.clone())
        .patch(LAB_AGENT_CLUSTER_ROLE, &pp, &Patch::Apply(&binding))
        .await?;

    // Real kubelets register their Node themselves (a Node made before
    // them, without status.capacity, crashes the 1.20 kubelet's
    // registration); the lab then only sets their pod CIDRs.
    if !cluster.real_nodes {
        for n in &cluster.nodes {
            create_node_object(client, n).await?;
        }
    }
    Ok(())
}

/// Creates a node's Node object (kept if it exists). Nodes are created,
/// not applied: create is the one call where the apiserver keeps `status`
/// (the addresses a kubelet would report).
pub async fn create_node_object(client: &Client, n: &crate::config::NodePlan) -> Result<()> {
    let nodes: Api<Node> = Api::all(client.clone());
    let node = Node {
        metadata: ObjectMeta {
            name: Some(n.name.clone()),
            labels: Some(
                [
                    ("kubernetes.io/hostname".to_string(), n.name.clone()),
                    ("sdntunnel.io/lab".to_string(), "true".to_string()),
                ]
                .into(),
            ),
            ..Default::default()
        },
        spec: Some(NodeSpec {
            pod_cidr: Some(n.pod_cidr.to_string()),
            pod_cidrs: Some(vec![n.pod_cidr.to_string()]),
            ..Default::default()
        }),
        status: Some(NodeStatus {
            addresses: Some(vec![
                NodeAddress {
                    type_: "InternalIP".into(),
                    address: n.underlay_ip.to_string(),
                },
                NodeAddress {
                    type_: "Hostname".into(),
                    address: n.name.clone(),
                },
            ]),
            ..Default::default()
        }),
    };
    match nodes.create(&PostParams::default(), &node).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
        Err(e) => Err(e).with_context(|| format!("creating Node {}", n.name)),
    }
}

fn endpointslice_v1_shim() -> Result<CustomResourceDefinition> {
    let crd = serde_json::json!({
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": ENDPOINTSLICE_V1_SHIM_CRD,
            "annotations": {
                // *.k8s.io groups are protected; this is a lab-only stand-in.
                "api-approved.kubernetes.io": "unapproved, sdn-tunnel lab shim serving discovery.k8s.io/v1 on a 1.20 apiserver"
            },
            "labels": { "sdntunnel.io/lab-shim": "true" }
        },
        "spec": {
            "group": "discovery.k8s.io",
            "scope": "Namespaced",
            "names": {
                "plural": "endpointslices",
                "singular": "endpointslice",
                "kind": "EndpointSlice",
                "listKind": "EndpointSliceList"
            },
            "versions": [{
                "name": "v1",
                "served": true,
                "storage": true,
                "schema": { "openAPIV3Schema": { "type": "object", "x-kubernetes-preserve-unknown-fields": true } }
            }]
        }
    });
    Ok(serde_json::from_value(crd)?)
}

/// Whether a CRD has the condition `Established=True`, i.e. is served.
pub fn crd_established(crd: &CustomResourceDefinition) -> bool {
    crd.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| {
            cs.iter()
                .any(|c| c.type_ == "Established" && c.status == "True")
        })
}

/// Waits (up to 30 s) until the CRD `name` is Established, i.e. served.
pub async fn wait_crd_established(crds: &Api<CustomResourceDefinition>, name: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if crd_established(&crds.get(name).await?) {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    bail!("CRD {name} not established after 30 s")
}
