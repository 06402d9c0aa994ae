//! Real nodes (`LabConfig::real_nodes`): the lab's clusters become real
//! Kubernetes clusters on this machine.
//!
//! Per cluster, beside etcd and kube-apiserver (which then runs with the
//! Node authorizer, NodeRestriction, the ServiceAccount admission plugin
//! and a lease endpoint reconciler): kube-controller-manager and
//! kube-scheduler in the control-plane namespace, with their own client
//! certificates, and the lab's EndpointSlice mirror ([`mirror`]). Per node:
//! containerd, kubelet (client certificate `system:node:<name>`) and
//! kube-proxy in iptables mode, all in one PID and mount namespace of the
//! node ([`node`]), pods from the node's pod CIDR on its `cbr0` through
//! CNI ([`containerd`]), images imported from `make image` ([`image`]).
//!
//! The Node objects are still created by the lab before the kubelets
//! register (they carry the lab's pod CIDRs, as a node IPAM would set
//! them); the kubelets then own their status.

pub mod containerd;
pub mod image;
pub mod mirror;
pub mod node;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use base64::Engine as _;
use k8s_openapi::api::core::v1::Node;
use kube::Api;

use crate::config::{ClusterPlan, LabConfig, NodePlan};
use crate::controlplane::{self, spawn_in_netns, tail, write_private, Identity};
use crate::pki::ClusterPki;
use crate::sys::{self, ProcRecord};
use crate::Lab;
use node::NodeDir;

/// Binaries a real node needs.
#[derive(Debug, Clone)]
pub struct Binaries {
    pub kubelet: PathBuf,
    pub kube_proxy: PathBuf,
    pub controller_manager: PathBuf,
    pub scheduler: PathBuf,
    pub containerd: PathBuf,
}

fn in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/sbin:/usr/bin:/sbin:/bin".into());
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// The cgroup hierarchies mounted on this machine (mount points): every
/// v1 hierarchy, and the v2 one of a hybrid layout (`unified`, where runc
/// makes the containers' cgroups too).
pub fn cgroup_hierarchies() -> Vec<PathBuf> {
    let text = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            matches!(right.split_whitespace().next()?, "cgroup" | "cgroup2")
                .then(|| left.split_whitespace().nth(4).map(PathBuf::from))?
        })
        .collect()
}

/// Everything a real node needs, or one line naming what is missing and
/// the command that fixes it.
pub fn preflight() -> Result<Binaries> {
    let k8s_dir = controlplane::apiserver_binary()?
        .parent()
        .map(Path::to_path_buf)
        .context("apiserver path without a directory")?;
    let k8s = |name: &str| -> Result<PathBuf> {
        let p = k8s_dir.join(name);
        if p.is_file() {
            Ok(p)
        } else {
            bail!(
                "{name} is not built (no {}): run `bash tests/lab/build-apiserver.sh` (builds the five Kubernetes binaries, about 20 minutes once)",
                p.display()
            )
        }
    };
    let bins = Binaries {
        kubelet: k8s("kubelet")?,
        kube_proxy: k8s("kube-proxy")?,
        controller_manager: k8s("kube-controller-manager")?,
        scheduler: k8s("kube-scheduler")?,
        containerd: in_path("containerd").with_context(|| {
            "no containerd: run `apt-get install containerd runc containernetworking-plugins` (or `bash scripts/install-deps.sh`)"
        })?,
    };
    for tool in [
        "containerd-shim-runc-v2",
        "runc",
        "ctr",
        "nsenter",
        "unshare",
    ] {
        if in_path(tool).is_none() {
            bail!("no {tool}: run `apt-get install containerd runc util-linux` (or `bash scripts/install-deps.sh`)");
        }
    }
    for plugin in ["bridge", "host-local", "loopback"] {
        let p = Path::new(containerd::CNI_BIN_DIR).join(plugin);
        if !p.is_file() {
            bail!(
                "no CNI plugin {}: run `apt-get install containernetworking-plugins` (or `bash scripts/install-deps.sh`)",
                p.display()
            );
        }
    }
    let have = cgroup_hierarchies();
    for h in ["cpu", "cpuset", "memory", "pids", "devices"] {
        if !have.iter().any(|m| {
            m.file_name()
                .is_some_and(|n| n.to_string_lossy().split(',').any(|c| c == h))
        }) {
            bail!("no cgroup v1 hierarchy {h} under /sys/fs/cgroup: the kubelet lab needs cgroup v1 (kubelet 1.20, cgroupfs driver); boot with systemd.unified_cgroup_hierarchy=0");
        }
    }
    image::archives(&image::images_dir())?;
    Ok(bins)
}

/// The apiserver's flags for a cluster with real kubelets: what the
/// process lab turns off comes back on.
pub fn apiserver_args(args: Vec<String>, pki: &ClusterPki) -> Vec<String> {
    let mut out: Vec<String> = args
        .into_iter()
        .filter(|a| a != "--disable-admission-plugins=ServiceAccount")
        .map(|a| {
            if a == "--endpoint-reconciler-type=none" {
                "--endpoint-reconciler-type=lease".to_string()
            } else {
                a
            }
        })
        .collect();
    let (crt, key) = kubelet_client_cert(pki);
    out.extend([
        "--enable-admission-plugins=NodeRestriction".to_string(),
        format!("--kubelet-client-certificate={}", crt.display()),
        format!("--kubelet-client-key={}", key.display()),
        // Nodes are named e.g. east-node-1, which nothing resolves.
        "--kubelet-preferred-address-types=InternalIP".to_string(),
    ]);
    out
}

fn kubelet_client_cert(pki: &ClusterPki) -> (PathBuf, PathBuf) {
    (
        pki.dir.join("apiserver-kubelet-client.crt"),
        pki.dir.join("apiserver-kubelet-client.key"),
    )
}

/// The client certificates of a cluster's components (before its
/// apiserver starts: it needs its kubelet client certificate).
pub fn issue_certs(pki: &ClusterPki, cluster: &ClusterPlan) -> Result<()> {
    pki.issue_client(
        "apiserver-kubelet-client",
        "/O=system:masters/CN=kube-apiserver-kubelet-client",
    )?;
    pki.issue_client(
        "kube-controller-manager",
        "/CN=system:kube-controller-manager",
    )?;
    pki.issue_client("kube-scheduler", "/CN=system:kube-scheduler")?;
    pki.issue_client("kube-proxy", "/CN=system:kube-proxy")?;
    for n in &cluster.nodes {
        pki.issue_client(
            &format!("node-{}", n.name),
            &format!("/O=system:nodes/CN=system:node:{}", n.name),
        )?;
    }
    Ok(())
}

/// A kubeconfig authenticating with a client certificate of the cluster.
fn cert_kubeconfig(cluster: &ClusterPlan, pki: &ClusterPki, who: &str, path: &Path) -> Result<()> {
    let b64 = |f: PathBuf| -> Result<String> {
        Ok(base64::engine::general_purpose::STANDARD
            .encode(fs::read(&f).with_context(|| format!("{}", f.display()))?))
    };
    let name = &cluster.name;
    let text = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: {name}\n  cluster:\n    server: {}\n    \
         certificate-authority-data: {}\nusers:\n- name: {who}\n  user:\n    client-certificate-data: {}\n    \
         client-key-data: {}\ncontexts:\n- name: {name}\n  context:\n    cluster: {name}\n    user: {who}\n\
         current-context: {name}\n",
        cluster.apiserver_url(),
        b64(pki.ca_crt())?,
        b64(pki.dir.join(format!("{who}.crt")))?,
        b64(pki.dir.join(format!("{who}.key")))?,
    );
    write_private(path, &text)
}

/// Name of the lab's cgroup (in every hierarchy) holding its nodes'.
pub fn cgroup_parent(lab: &str) -> String {
    format!("sdn-tunnel-lab-{lab}")
}

/// Creates `rel` in every v1 hierarchy (cpuset: cpus and mems copied from
/// the parent at each level, or nothing can join it).
fn create_cgroup(rel: &str) -> Result<()> {
    for h in cgroup_hierarchies() {
        let mut dir = h.clone();
        for part in rel.split('/') {
            let parent = dir.clone();
            dir = dir.join(part);
            if !dir.exists() {
                fs::create_dir(&dir)
                    .with_context(|| format!("creating cgroup {}", dir.display()))?;
            }
            for f in ["cpuset.cpus", "cpuset.mems"] {
                if let Ok(v) = fs::read_to_string(parent.join(f)) {
                    fs::write(dir.join(f), v.trim())
                        .with_context(|| format!("{}", dir.join(f).display()))?;
                }
            }
        }
    }
    Ok(())
}

/// Removes a cgroup tree bottom-up (retrying while its tasks die).
fn remove_cgroup_tree(dir: &Path, deadline: Instant) -> Result<()> {
    if !dir.is_dir() {
        return Ok(());
    }
    for e in fs::read_dir(dir)?.flatten() {
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            remove_cgroup_tree(&e.path(), deadline)?;
        }
    }
    loop {
        match fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() > deadline => {
                return Err(e).with_context(|| format!("cgroup {}", dir.display()))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// The host PID of the process whose parent is `pid` (the node's init,
/// forked by `unshare`).
fn child_of(pid: i32, timeout: Duration) -> Option<i32> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        for e in fs::read_dir("/proc").ok()?.flatten() {
            let Ok(child) = e.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let ppid = fs::read_to_string(format!("/proc/{child}/status"))
                .ok()
                .and_then(|s| {
                    s.lines()
                        .find_map(|l| l.strip_prefix("PPid:"))
                        .and_then(|v| v.trim().parse::<i32>().ok())
                });
            if ppid == Some(pid) {
                return Some(child);
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

/// Whether a host PID is PID 1 of a PID namespace below ours.
fn is_namespace_init(pid: i32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| l.strip_prefix("NSpid:")).map(|v| {
                let ids: Vec<&str> = v.split_whitespace().collect();
                ids.len() > 1 && ids.last() == Some(&"1")
            })
        })
        .unwrap_or(false)
}

/// Starts a node: `nsenter --net=<netns> unshare --pid --mount --fork
/// --mount-proc bash <init>`. Returns the records of the init (PID 1 of
/// the node) and of the `unshare` waiting for it.
fn start_node(netns: &str, init: &Path, log: &Path, name: &str) -> Result<Vec<ProcRecord>> {
    use std::os::unix::process::CommandExt;
    let out = fs::OpenOptions::new().create(true).append(true).open(log)?;
    let err = out.try_clone()?;
    let child = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{netns}"))
        .args([
            "unshare",
            "--pid",
            "--mount",
            "--fork",
            "--mount-proc",
            "--kill-child",
            "bash",
        ])
        .arg(init)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .process_group(0)
        .spawn()
        .with_context(|| format!("cannot start node {name}"))?;
    let pid = i32::try_from(child.id()).context("pid out of range")?;
    let wrapper = ProcRecord::of(pid, &format!("node {name} (unshare)"))?;
    let init_pid = child_of(pid, Duration::from_secs(5))
        .with_context(|| format!("node {name}: its init did not start; see {}", log.display()))?;
    let init = ProcRecord::of(init_pid, &format!("node {name} (init, PID 1 of the node)"))?;
    Ok(vec![init, wrapper])
}

/// Waits for a node's containerd, imports the images, lets kubelet start.
fn import_images(nd: &NodeDir, name: &str, archives: &[PathBuf], init: &ProcRecord) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if !init.alive() {
            bail!(
                "node {name} stopped; {}:\n{}",
                nd.log("init").display(),
                tail(&nd.log("init"), 10)
            );
        }
        if image::ctr(&nd.socket(), &["version"]).is_ok() {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "containerd of {name} not up after 60 s; {}:\n{}",
                nd.log("containerd").display(),
                tail(&nd.log("containerd"), 15)
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    image::import(&nd.socket(), archives).with_context(|| format!("node {name}"))?;
    fs::write(nd.dir.join(node::IMAGES_READY), "")?;
    Ok(())
}

/// Whether a Node reports Ready=True.
pub fn node_ready(n: &Node) -> bool {
    n.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

impl Lab {
    /// The directory of a real node (configuration, state, logs, and its
    /// copies of the per-machine paths under `fs/`).
    pub fn node_dir(&self, cluster: &str, node: &str) -> PathBuf {
        self.cluster_dir(cluster).join("nodes").join(node)
    }

    /// Tags an image in every node's containerd (a "new version" of an
    /// image for a rolling update, without a registry).
    pub fn tag_image_on_nodes(&self, from: &str, to: &str) -> Result<()> {
        for c in self.config().plan() {
            for n in &c.nodes {
                let nd = NodeDir::new(&self.cluster_dir(&c.name), n);
                image::ctr(&nd.socket(), &["images", "tag", "--force", from, to])
                    .with_context(|| format!("tagging {to} on {}", n.name))?;
            }
        }
        Ok(())
    }

    /// Starts the real-node parts of every cluster (see the module
    /// documentation) and waits until every node is Ready.
    pub(crate) async fn start_real_nodes(&mut self, bins: &Binaries) -> Result<()> {
        let started = Instant::now();
        let cfg = self.config().clone();
        let archives = image::archives(&image::images_dir())?;
        for (path, _) in node::PER_NODE_PATHS {
            let p = Path::new(path);
            if !p.exists() {
                fs::create_dir_all(p).with_context(|| format!("mount point {path}"))?;
                self.state.host_dirs_created.push(p.to_path_buf());
            }
        }
        self.save()?;
        for cluster in cfg.plan() {
            let dir = self.cluster_dir(&cluster.name);
            let pki = ClusterPki {
                dir: dir.join("pki"),
            };
            let p = |f: PathBuf| f.to_string_lossy().into_owned();
            for who in ["kube-controller-manager", "kube-scheduler", "kube-proxy"] {
                cert_kubeconfig(&cluster, &pki, who, &dir.join(format!("{who}.kubeconfig")))?;
            }
            let kcm_args = vec![
                format!(
                    "--kubeconfig={}",
                    p(dir.join("kube-controller-manager.kubeconfig"))
                ),
                "--use-service-account-credentials=true".to_string(),
                format!("--service-account-private-key-file={}", p(pki.sa_key())),
                format!("--root-ca-file={}", p(pki.ca_crt())),
                "--leader-elect=false".to_string(),
                // The 1.20 endpointslice controllers write v1beta1, which
                // this apiserver does not serve: see `mirror`.
                "--controllers=*,-endpointslice,-endpointslicemirroring".to_string(),
                format!("--service-cluster-ip-range={}", cluster.service_cidr),
                "--v=1".to_string(),
            ];
            let kcm = spawn_in_netns(
                &cluster.cp_netns,
                &bins.controller_manager,
                &kcm_args,
                &dir.join("kube-controller-manager.log"),
                &format!("kube-controller-manager ({})", cluster.name),
            )?;
            self.state.control_plane.push(kcm);
            let sched_args = vec![
                format!("--kubeconfig={}", p(dir.join("kube-scheduler.kubeconfig"))),
                "--leader-elect=false".to_string(),
                "--v=1".to_string(),
            ];
            let sched = spawn_in_netns(
                &cluster.cp_netns,
                &bins.scheduler,
                &sched_args,
                &dir.join("kube-scheduler.log"),
                &format!("kube-scheduler ({})", cluster.name),
            )?;
            self.state.control_plane.push(sched);
            let mirror = spawn_in_netns(
                &cluster.cp_netns,
                &crate::lab_binary()?,
                &[
                    "mirror-endpointslices".to_string(),
                    "--kubeconfig".into(),
                    p(self.kubeconfig(&cluster.name, Identity::Admin)),
                ],
                &dir.join("endpointslice-mirror.log"),
                &format!("endpointslice mirror ({})", cluster.name),
            )?;
            self.state.control_plane.push(mirror);
            self.save()?;

            for n in &cluster.nodes {
                let nd = NodeDir::new(&dir, n);
                fs::create_dir_all(&nd.dir)?;
                create_cgroup(&node::cgroup_root(&cfg.name, n))?;
                cert_kubeconfig(
                    &cluster,
                    &pki,
                    &format!("node-{}", n.name),
                    &nd.dir.join("kubelet.kubeconfig"),
                )?;
                fs::copy(
                    dir.join("kube-proxy.kubeconfig"),
                    nd.dir.join("kube-proxy.kubeconfig"),
                )?;
                let init = node::write_node(&cfg, &cluster, n, &nd, bins, &pki.ca_crt())?;
                let recs = start_node(&n.netns, &init, &nd.log("init"), &n.name)?;
                self.state.nodes.extend(recs);
                self.save()?;
            }
        }
        // Images into every node at once (containerd must be up first).
        let nodes: Vec<(NodeDir, NodePlan, ProcRecord)> = cfg
            .plan()
            .into_iter()
            .flat_map(|c| {
                let dir = self.cluster_dir(&c.name);
                c.nodes
                    .into_iter()
                    .map(move |n| (NodeDir::new(&dir, &n), n))
            })
            .filter_map(|(nd, n)| {
                let what = format!("node {} (init, PID 1 of the node)", n.name);
                let init = self.state.nodes.iter().find(|r| r.what == what)?.clone();
                Some((nd, n, init))
            })
            .collect();
        let results: Vec<Result<()>> = std::thread::scope(|s| {
            let handles: Vec<_> = nodes
                .iter()
                .map(|(nd, n, init)| s.spawn(|| import_images(nd, &n.name, &archives, init)))
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(anyhow::anyhow!("import thread panicked")))
                })
                .collect()
        });
        for r in results {
            r?;
        }
        tracing::info!(elapsed = ?started.elapsed(), "images imported into every node");
        self.assign_pod_cidrs(Duration::from_secs(120)).await?;
        self.wait_nodes_ready(Duration::from_secs(120)).await?;
        tracing::info!(elapsed = ?started.elapsed(), "every real node is Ready");
        Ok(())
    }

    /// Sets every registered Node's pod CIDR (the lab's plan), as a node
    /// IPAM controller would, once its kubelet has registered it.
    async fn assign_pod_cidrs(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        for c in self.config().plan() {
            let nodes: Api<Node> = Api::all(self.client(&c.name, Identity::Admin).await?);
            for n in &c.nodes {
                loop {
                    if nodes.get_opt(&n.name).await?.is_some() {
                        break;
                    }
                    if Instant::now() > deadline {
                        let log = self.node_dir(&c.name, &n.name).join("kubelet.log");
                        bail!(
                            "node {} not registered after {timeout:?}; {}:\n{}",
                            n.name,
                            log.display(),
                            tail(&log, 15)
                        );
                    }
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                let patch = serde_json::json!({
                    "metadata": {"labels": {"sdntunnel.io/lab": "true"}},
                    "spec": {
                        "podCIDR": n.pod_cidr.to_string(),
                        "podCIDRs": [n.pod_cidr.to_string()]
                    }
                });
                nodes
                    .patch(
                        &n.name,
                        &kube::api::PatchParams::default(),
                        &kube::api::Patch::Merge(&patch),
                    )
                    .await
                    .with_context(|| format!("setting the pod CIDR of {}", n.name))?;
            }
        }
        Ok(())
    }

    /// Waits until every node of every cluster reports Ready (the kubelet's
    /// log tail of those that do not, on failure).
    pub async fn wait_nodes_ready(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let plan = self.config().plan();
        loop {
            let mut not_ready = Vec::new();
            for c in &plan {
                let nodes: Api<Node> = Api::all(self.client(&c.name, Identity::Admin).await?);
                for n in &c.nodes {
                    let ready = nodes
                        .get_opt(&n.name)
                        .await?
                        .is_some_and(|o| node_ready(&o));
                    if !ready {
                        not_ready.push((c.name.clone(), n.name.clone()));
                    }
                }
            }
            if not_ready.is_empty() {
                return Ok(());
            }
            if Instant::now() > deadline {
                let mut msg = format!("nodes not Ready after {timeout:?}: {not_ready:?}");
                for (c, n) in &not_ready {
                    let log = self.node_dir(c, n).join("kubelet.log");
                    msg.push_str(&format!("\n--- {}:\n{}", log.display(), tail(&log, 15)));
                }
                bail!(msg);
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

/// What a real-node lab leaves beside namespaces and recorded processes:
/// the nodes' PID namespaces (their init is killed, which kills every
/// process of the node, containers included), the nodes' cgroups, and the
/// empty mount points the lab created on the host. Called by
/// [`crate::teardown`] before it removes the namespaces.
pub fn teardown(
    cfg: &LabConfig,
    state: Option<&crate::State>,
    leftovers: &mut Vec<String>,
) -> usize {
    let mut stopped = 0;
    if let Some(s) = state {
        for p in s.nodes.iter().filter(|p| p.alive()) {
            p.stop(Duration::from_secs(5));
            stopped += 1;
        }
    }
    // Nodes of a lab whose state is lost: any PID-namespace init living in
    // one of its node namespaces.
    for c in cfg.plan() {
        for n in &c.nodes {
            for pid in sys::netns_pids(&n.netns) {
                if is_namespace_init(pid) {
                    if let Ok(rec) = ProcRecord::of(pid, "node init") {
                        let _ = nix::sys::signal::kill(
                            nix::unistd::Pid::from_raw(pid),
                            nix::sys::signal::Signal::SIGKILL,
                        );
                        rec.stop(Duration::from_secs(5));
                        stopped += 1;
                    }
                }
            }
        }
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    for h in cgroup_hierarchies() {
        let dir = h.join(cgroup_parent(&cfg.name));
        if let Err(e) = remove_cgroup_tree(&dir, deadline) {
            leftovers.push(format!("{e:#}"));
        }
    }
    if let Some(s) = state {
        for d in &s.host_dirs_created {
            // Only if still empty: someone else may have started using it.
            let _ = fs::remove_dir(d);
        }
    }
    stopped
}
