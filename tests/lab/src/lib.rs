//! The sdn-tunnel lab: several Kubernetes clusters on one machine, each with a
//! real etcd and kube-apiserver, nodes and pods in network namespaces.
//!
//! ```text
//!            host (10.U.0.1, <lab>-host)
//!                   │
//!   underlay netns: br0 ── control planes (etcd + kube-apiserver, 10.U.i.2)
//!                   └──── nodes (eth0 10.U.i.10+n, cbr0 = pod CIDR) ── pods
//! ```
//!
//! [`Lab::up`] builds it all and returns a guard whose `Drop` tears it down
//! (also on panic); the `lab` binary wraps the same code for the shell
//! (`lab up`, `lab status`, `lab down`). Every namespace is named
//! `<lab>-...`, every process is recorded with its PID and start time in
//! `<dir>/state.json`, so `down` (or the next `up`) finds and removes
//! everything even after a crash.

pub mod ansible;
pub mod config;
pub mod controlplane;
pub mod kubelet;
pub mod net;
pub mod pki;
pub mod server;
pub mod sys;

use std::fs;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use k8s_openapi::api::core::v1::{Namespace, Service, ServicePort, ServiceSpec};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};
use serde::{Deserialize, Serialize};

pub use ansible::InventoryOptions;
pub use config::{ClusterPlan, LabConfig, Netem, NodePlan};
pub use controlplane::Identity;
use controlplane::FIELD_MANAGER;
pub use sys::ProcRecord;

/// Port every lab pod's server listens on, TCP and UDP.
pub const POD_SERVER_PORT: u16 = 8080;
/// Port of every lab pod's bulk-transfer server (TCP; see [`server::bulk_download`]).
pub const POD_BULK_PORT: u16 = POD_SERVER_PORT + 1;

/// A pod of the lab: a network namespace on a node's `cbr0`, usually with
/// the lab's tiny server in it (it answers its own name).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pod {
    pub name: String,
    pub cluster: String,
    /// Node object name.
    pub node: String,
    pub netns: String,
    pub ip: Ipv4Addr,
    /// The pod's process while it runs.
    pub server: Option<ProcRecord>,
    /// What the pod runs, so it can be restarted ([`Lab::restart_pod`]).
    #[serde(default)]
    pub command: Option<PodCommand>,
}

/// A pod's program, arguments and environment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodCommand {
    pub program: PathBuf,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
}

/// What `state.json` records: enough to find and remove everything.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct State {
    pub config: LabConfig,
    /// etcd and kube-apiserver of every cluster, in start order.
    pub control_plane: Vec<ProcRecord>,
    pub pods: Vec<Pod>,
    /// Real nodes ([`LabConfig::real_nodes`]): each node's init (PID 1 of
    /// the node) and the `unshare` waiting for it.
    #[serde(default)]
    pub nodes: Vec<ProcRecord>,
    /// Empty mount points the lab created on the host for the nodes'
    /// per-machine paths (removed by teardown if still empty).
    #[serde(default)]
    pub host_dirs_created: Vec<PathBuf>,
}

/// A running lab. Dropping an owned lab tears it down; [`Lab::detach`]
/// leaves it running (what `lab up` does).
#[derive(Debug)]
pub struct Lab {
    state: State,
    owned: bool,
}

/// What a teardown removed, and what it could not.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct TeardownReport {
    pub processes_stopped: usize,
    pub namespaces_removed: Vec<String>,
    /// Namespaces, links or processes still present afterwards.
    pub leftovers: Vec<String>,
}

fn state_path(dir: &Path) -> PathBuf {
    dir.join("state.json")
}

fn require_root() -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("the lab needs root (network namespaces, veth, nftables); run it with sudo");
    }
    Ok(())
}

impl Lab {
    /// Builds the whole lab: underlay, control planes (etcd + apiserver,
    /// ready and bootstrapped), nodes, Node objects, kubeconfigs.
    ///
    /// Leftovers of an earlier lab of the same name whose processes are gone
    /// are removed first; a lab of that name that still runs is an error.
    pub async fn up(cfg: LabConfig) -> Result<Lab> {
        cfg.validate()?;
        require_root()?;
        let apiserver_bin = controlplane::apiserver_binary()?;
        controlplane::etcd_binary()?;
        let node_bins = if cfg.real_nodes {
            Some(kubelet::preflight()?)
        } else {
            None
        };
        if let Ok(existing) = Lab::attach(&cfg.dir) {
            if existing.state.control_plane.iter().any(ProcRecord::alive) {
                bail!(
                    "lab {:?} is already up (state in {}); run `lab down --name {}` first",
                    cfg.name,
                    cfg.dir.display(),
                    cfg.name
                );
            }
        }
        let stale = teardown(&cfg)?;
        if !stale.namespaces_removed.is_empty() {
            tracing::warn!(removed = ?stale.namespaces_removed, "removed leftovers of an earlier lab {}", cfg.name);
        }
        if !stale.leftovers.is_empty() {
            bail!(
                "cannot clean leftovers of an earlier lab: {:?}; remove them by hand",
                stale.leftovers
            );
        }

        fs::create_dir_all(&cfg.dir)?;
        let mut lab = Lab {
            state: State {
                config: cfg.clone(),
                control_plane: Vec::new(),
                pods: Vec::new(),
                nodes: Vec::new(),
                host_dirs_created: Vec::new(),
            },
            owned: true,
        };
        lab.save()?;
        // From here on an error returns through `?`, dropping `lab`: its
        // Drop removes whatever was already made.
        net::create_underlay(&cfg)?;
        let plan = cfg.plan();
        for cluster in &plan {
            net::create_control_plane(&cfg, cluster)?;
            for node in &cluster.nodes {
                net::create_node(&cfg, cluster, node)?;
            }
        }
        for cluster in &plan {
            let dir = lab.cluster_dir(&cluster.name);
            let pki = pki::ClusterPki::create(&dir.join("pki"), cluster)?;
            if cluster.real_nodes {
                kubelet::issue_certs(&pki, cluster)?;
            }
            let etcd = controlplane::start_etcd(cluster, &dir)?;
            lab.state.control_plane.push(etcd);
            lab.save()?;
            let apiserver = controlplane::start_apiserver(cluster, &pki, &dir, &apiserver_bin)?;
            lab.state.control_plane.push(apiserver);
            lab.save()?;
            controlplane::write_kubeconfigs(cluster, &pki, &dir)?;
        }
        lab.write_merged_kubeconfig()?;
        let started = Instant::now();
        let waits = plan.iter().map(|cluster| lab.wait_and_bootstrap(cluster));
        for r in futures::future::join_all(waits).await {
            r?;
        }
        tracing::info!(elapsed = ?started.elapsed(), "every apiserver is ready and bootstrapped");
        if let Some(bins) = &node_bins {
            lab.start_real_nodes(bins).await?;
        }
        Ok(lab)
    }

    async fn wait_and_bootstrap(&self, cluster: &ClusterPlan) -> Result<()> {
        let client = self.client(&cluster.name, Identity::Admin).await?;
        let apiserver = self
            .apiserver_process(&cluster.name)
            .with_context(|| format!("no apiserver recorded for {}", cluster.name))?;
        let log = self.cluster_dir(&cluster.name).join("kube-apiserver.log");
        controlplane::wait_ready(&client, apiserver, &log, Duration::from_secs(90)).await?;
        controlplane::bootstrap(&client, cluster)
            .await
            .with_context(|| format!("bootstrapping {}", cluster.name))
    }

    /// A lab that already runs, from its state directory. Not owned: dropping
    /// it leaves the lab running.
    pub fn attach(dir: &Path) -> Result<Lab> {
        let path = state_path(dir);
        let text = fs::read_to_string(&path)
            .with_context(|| format!("no lab state at {} (is the lab up?)", path.display()))?;
        let state: State = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a lab state file", path.display()))?;
        Ok(Lab {
            state,
            owned: false,
        })
    }

    /// Leaves the lab running when this value is dropped.
    pub fn detach(mut self) {
        self.owned = false;
    }

    /// Tears the lab down now, reporting what was removed.
    pub fn down(mut self) -> Result<TeardownReport> {
        self.owned = false;
        teardown(&self.state.config)
    }

    pub fn config(&self) -> &LabConfig {
        &self.state.config
    }

    pub fn state(&self) -> &State {
        &self.state
    }

    /// The plan of one cluster by name.
    pub fn cluster(&self, name: &str) -> Result<ClusterPlan> {
        self.state
            .config
            .plan()
            .into_iter()
            .find(|c| c.name == name)
            .with_context(|| {
                format!(
                    "the lab has no cluster {name:?} (it has {:?})",
                    self.state.config.clusters
                )
            })
    }

    /// Directory of one cluster's PKI, kubeconfigs, etcd data and logs.
    pub fn cluster_dir(&self, cluster: &str) -> PathBuf {
        self.state.config.dir.join(cluster)
    }

    /// Kubeconfig of a cluster for an identity.
    pub fn kubeconfig(&self, cluster: &str, who: Identity) -> PathBuf {
        self.cluster_dir(cluster).join(who.file_name())
    }

    /// One kubeconfig with an admin context per cluster (context = cluster name).
    pub fn merged_kubeconfig(&self) -> PathBuf {
        self.state.config.dir.join("kubeconfig")
    }

    pub async fn client(&self, cluster: &str, who: Identity) -> Result<Client> {
        controlplane::client_from_kubeconfig(&self.kubeconfig(cluster, who)).await
    }

    fn apiserver_process(&self, cluster: &str) -> Option<&ProcRecord> {
        let what = format!("kube-apiserver ({cluster})");
        self.state.control_plane.iter().find(|p| p.what == what)
    }

    /// Resident memory of a cluster's kube-apiserver in KiB.
    pub fn apiserver_rss_kib(&self, cluster: &str) -> Option<u64> {
        self.apiserver_process(cluster)?.rss_kib()
    }

    pub(crate) fn save(&self) -> Result<()> {
        let path = state_path(&self.state.config.dir);
        let tmp = path.with_extension("json.tmp");
        fs::write(&tmp, serde_json::to_vec_pretty(&self.state)?)?;
        fs::rename(&tmp, &path)?;
        Ok(())
    }

    fn write_merged_kubeconfig(&self) -> Result<()> {
        // kubeconfigs are plain YAML maps: merge their lists.
        let mut merged = serde_yaml::Mapping::new();
        merged.insert("apiVersion".into(), "v1".into());
        merged.insert("kind".into(), "Config".into());
        for key in ["clusters", "users", "contexts"] {
            let mut all = Vec::new();
            for cluster in &self.state.config.clusters {
                let text = fs::read_to_string(self.kubeconfig(cluster, Identity::Admin))?;
                let doc: serde_yaml::Value = serde_yaml::from_str(&text)?;
                if let Some(serde_yaml::Value::Sequence(items)) = doc.get(key) {
                    all.extend(items.iter().cloned());
                }
            }
            merged.insert(key.into(), serde_yaml::Value::Sequence(all));
        }
        if let Some(first) = self.state.config.clusters.first() {
            merged.insert("current-context".into(), first.as_str().into());
        }
        controlplane::write_private(&self.merged_kubeconfig(), &serde_yaml::to_string(&merged)?)
    }

    /// Adds a pod on node `node_index` (1-based) of `cluster`, running the
    /// lab's server (TCP and UDP on [`POD_SERVER_PORT`], answers its name).
    pub fn add_pod(&mut self, cluster: &str, node_index: u8, name: &str) -> Result<Pod> {
        let args = vec![
            "serve".to_string(),
            "--name".into(),
            name.into(),
            "--port".into(),
            POD_SERVER_PORT.to_string(),
        ];
        let pod = self.add_pod_running(cluster, node_index, name, &lab_binary()?, &args, &[])?;
        server::wait_listening(
            &pod.netns,
            SocketAddr::from((pod.ip, POD_SERVER_PORT)),
            Duration::from_secs(10),
        )?;
        Ok(pod)
    }

    /// Adds a pod on node `node_index` (1-based) of `cluster` running
    /// `program args` with `env` (plus `POD_IP` and `NODE_NAME`, as the
    /// downward API would set them); its output goes to
    /// `<dir>/<cluster>/pod-<name>.log`. The process is recorded and stopped
    /// by teardown.
    pub fn add_pod_running(
        &mut self,
        cluster: &str,
        node_index: u8,
        name: &str,
        program: &Path,
        args: &[String],
        env: &[(String, String)],
    ) -> Result<Pod> {
        let valid = !name.is_empty()
            && name.len() <= 30
            && name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
        if !valid {
            bail!("pod name {name:?} must be 1 to 30 characters of [a-z0-9-]");
        }
        if self
            .state
            .pods
            .iter()
            .any(|p| p.name == name && p.cluster == cluster)
        {
            bail!("cluster {cluster} already has a pod {name}");
        }
        let plan = self.cluster(cluster)?;
        let node = plan
            .nodes
            .iter()
            .find(|n| n.index == node_index)
            .with_context(|| {
                format!(
                    "cluster {cluster} has no node {node_index} (it has {})",
                    plan.nodes.len()
                )
            })?
            .clone();
        let used: Vec<Ipv4Addr> = self
            .state
            .pods
            .iter()
            .filter(|p| p.node == node.name)
            .map(|p| p.ip)
            .collect();
        let ip = net::next_pod_ip(node.pod_cidr, &used)
            .with_context(|| format!("node {} has no free pod address", node.name))?;
        let netns = format!("{}-{cluster}-{name}", self.state.config.name);
        let mut pod = Pod {
            name: name.into(),
            cluster: cluster.into(),
            node: node.name.clone(),
            netns,
            ip,
            server: None,
            command: None,
        };
        // Record first, so a failure half-way is still cleaned up.
        self.state.pods.push(pod.clone());
        self.save()?;
        net::create_pod(&self.state.config, &node, &pod.netns, ip)?;
        let log = self.cluster_dir(cluster).join(format!("pod-{name}.log"));
        let mut all_env = vec![
            ("POD_IP".to_string(), ip.to_string()),
            ("NODE_NAME".to_string(), node.name.clone()),
        ];
        all_env.extend(env.iter().cloned());
        let what = format!("pod {name} ({})", program.display());
        let process = controlplane::spawn_in_netns_with_env(
            &pod.netns, program, args, &all_env, &log, &what,
        )?;
        pod.server = Some(process);
        pod.command = Some(PodCommand {
            program: program.to_path_buf(),
            args: args.to_vec(),
            env: all_env,
        });
        if let Some(p) = self
            .state
            .pods
            .iter_mut()
            .find(|p| p.name == name && p.cluster == cluster)
        {
            *p = pod.clone();
        }
        self.save()?;
        Ok(pod)
    }

    /// The log file of a pod's process.
    pub fn pod_log(&self, cluster: &str, name: &str) -> PathBuf {
        self.cluster_dir(cluster).join(format!("pod-{name}.log"))
    }

    /// Stops a pod's process (SIGTERM, then SIGKILL after 10 s); the pod's
    /// namespace stays, so [`Lab::restart_pod`] can start it again.
    pub fn stop_pod(&mut self, cluster: &str, name: &str) -> Result<()> {
        let pod = self.pod_mut(cluster, name)?;
        if let Some(p) = pod.server.take() {
            p.stop(Duration::from_secs(10));
        }
        self.save()
    }

    /// Starts a pod's recorded command again (after [`Lab::stop_pod`] or a crash).
    pub fn restart_pod(&mut self, cluster: &str, name: &str) -> Result<Pod> {
        let log = self.cluster_dir(cluster).join(format!("pod-{name}.log"));
        let pod = self.pod_mut(cluster, name)?;
        if pod.server.as_ref().is_some_and(ProcRecord::alive) {
            bail!("pod {name} in {cluster} is still running");
        }
        let cmd = pod
            .command
            .clone()
            .with_context(|| format!("pod {name} has no recorded command"))?;
        let what = format!("pod {name} ({})", cmd.program.display());
        let process = controlplane::spawn_in_netns_with_env(
            &pod.netns,
            &cmd.program,
            &cmd.args,
            &cmd.env,
            &log,
            &what,
        )?;
        pod.server = Some(process);
        let pod = pod.clone();
        self.save()?;
        Ok(pod)
    }

    fn pod_mut(&mut self, cluster: &str, name: &str) -> Result<&mut Pod> {
        self.state
            .pods
            .iter_mut()
            .find(|p| p.cluster == cluster && p.name == name)
            .with_context(|| format!("no pod {name} in cluster {cluster}"))
    }

    /// Stops a cluster's kube-apiserver (etcd keeps running): what an API
    /// outage looks like to the agents.
    pub fn stop_apiserver(&mut self, cluster: &str) -> Result<()> {
        let what = format!("kube-apiserver ({cluster})");
        let p = self
            .state
            .control_plane
            .iter()
            .find(|p| p.what == what)
            .with_context(|| format!("no apiserver recorded for {cluster}"))?;
        p.stop(Duration::from_secs(15));
        Ok(())
    }

    /// Starts a cluster's kube-apiserver again and waits until it is ready.
    pub async fn start_apiserver(&mut self, cluster: &str) -> Result<()> {
        let plan = self.cluster(cluster)?;
        let what = format!("kube-apiserver ({cluster})");
        if self
            .state
            .control_plane
            .iter()
            .any(|p| p.what == what && p.alive())
        {
            bail!("the apiserver of {cluster} is running");
        }
        let dir = self.cluster_dir(cluster);
        let pki = pki::ClusterPki {
            dir: dir.join("pki"),
        };
        let process =
            controlplane::start_apiserver(&plan, &pki, &dir, &controlplane::apiserver_binary()?)?;
        self.state.control_plane.retain(|p| p.what != what);
        self.state.control_plane.push(process.clone());
        self.save()?;
        let client = self.client(cluster, Identity::Admin).await?;
        controlplane::wait_ready(
            &client,
            &process,
            &dir.join("kube-apiserver.log"),
            Duration::from_secs(90),
        )
        .await
    }

    /// Adds a node to a running cluster: its namespace on the underlay,
    /// routes between it and the cluster's other nodes, and its Node object.
    pub async fn add_node(&mut self, cluster: &str) -> Result<NodePlan> {
        if self.state.config.real_nodes {
            bail!("adding nodes to a running lab is a process-lab feature (real nodes are planned at `up`)");
        }
        let before = self.cluster(cluster)?;
        *self
            .state
            .config
            .extra_nodes
            .entry(cluster.to_string())
            .or_insert(0) += 1;
        self.save()?;
        let plan = self.cluster(cluster)?;
        let node = plan
            .nodes
            .last()
            .context("a cluster without nodes")?
            .clone();
        net::create_node(&self.state.config, &plan, &node)?;
        for other in &before.nodes {
            sys::ip_in(
                &other.netns,
                &[
                    "route",
                    "add",
                    &node.pod_cidr.to_string(),
                    "via",
                    &node.underlay_ip.to_string(),
                    "dev",
                    "eth0",
                ],
            )?;
        }
        let client = self.client(cluster, Identity::Admin).await?;
        controlplane::create_node_object(&client, &node).await?;
        Ok(node)
    }

    /// Removes a node added with [`Lab::add_node`] or planned: its pods,
    /// its namespace, the other nodes' routes to it and its Node object.
    pub async fn remove_node(&mut self, cluster: &str, node_name: &str) -> Result<()> {
        let plan = self.cluster(cluster)?;
        let node = plan
            .nodes
            .iter()
            .find(|n| n.name == node_name)
            .with_context(|| format!("no node {node_name}"))?
            .clone();
        let pods: Vec<Pod> = self
            .state
            .pods
            .iter()
            .filter(|p| p.node == node.name)
            .cloned()
            .collect();
        for p in &pods {
            if let Some(proc_) = &p.server {
                proc_.stop(Duration::from_secs(10));
            }
            sys::ip(&["netns", "del", &p.netns])?;
        }
        self.state.pods.retain(|p| p.node != node.name);
        for other in plan.nodes.iter().filter(|n| n.name != node.name) {
            sys::ip_in(&other.netns, &["route", "del", &node.pod_cidr.to_string()])?;
        }
        sys::ip(&["netns", "del", &node.netns])?;
        self.save()?;
        let client = self.client(cluster, Identity::Admin).await?;
        kube::Api::<k8s_openapi::api::core::v1::Node>::all(client)
            .delete(&node.name, &Default::default())
            .await?;
        Ok(())
    }

    pub fn pod(&self, cluster: &str, name: &str) -> Result<&Pod> {
        self.state
            .pods
            .iter()
            .find(|p| p.cluster == cluster && p.name == name)
            .with_context(|| format!("no pod {name} in cluster {cluster}"))
    }

    /// Creates (or updates) a ClusterIP Service with a TCP and a UDP port
    /// (`port` → the pods' [`POD_SERVER_PORT`]) and the EndpointSlice that
    /// controller-manager would make for it (there is none in the lab), with
    /// `backends` ready. Returns the Service as stored (with its ClusterIP).
    pub async fn add_service(
        &self,
        cluster: &str,
        namespace: &str,
        name: &str,
        port: u16,
        backends: &[&Pod],
    ) -> Result<Service> {
        if let Some(p) = backends.iter().find(|p| p.cluster != cluster) {
            bail!("pod {} is in cluster {}, not {cluster}", p.name, p.cluster);
        }
        let client = self.client(cluster, Identity::Admin).await?;
        let pp = PatchParams::apply(FIELD_MANAGER).force();
        let ns = Namespace {
            metadata: ObjectMeta {
                name: Some(namespace.into()),
                ..Default::default()
            },
            ..Default::default()
        };
        Api::<Namespace>::all(client.clone())
            .patch(namespace, &pp, &Patch::Apply(&ns))
            .await?;

        let ports = [("tcp", "TCP"), ("udp", "UDP")];
        let svc = Service {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some(namespace.into()),
                ..Default::default()
            },
            spec: Some(ServiceSpec {
                type_: Some("ClusterIP".into()),
                ports: Some(
                    ports
                        .iter()
                        .map(|(pname, proto)| ServicePort {
                            name: Some((*pname).into()),
                            port: i32::from(port),
                            protocol: Some((*proto).into()),
                            target_port: Some(IntOrString::Int(i32::from(POD_SERVER_PORT))),
                            ..Default::default()
                        })
                        .collect(),
                ),
                ..Default::default()
            }),
            ..Default::default()
        };
        let services: Api<Service> = Api::namespaced(client.clone(), namespace);
        let svc = services.patch(name, &pp, &Patch::Apply(&svc)).await?;

        let slice = EndpointSlice {
            metadata: ObjectMeta {
                name: Some(format!("{name}-lab")),
                namespace: Some(namespace.into()),
                labels: Some(
                    [
                        ("kubernetes.io/service-name".to_string(), name.to_string()),
                        (
                            "endpointslice.kubernetes.io/managed-by".to_string(),
                            FIELD_MANAGER.to_string(),
                        ),
                    ]
                    .into(),
                ),
                ..Default::default()
            },
            address_type: "IPv4".into(),
            endpoints: backends.iter().map(|p| ready_endpoint(p)).collect(),
            ports: Some(
                ports
                    .iter()
                    .map(|(pname, proto)| EndpointPort {
                        name: Some((*pname).into()),
                        port: Some(i32::from(POD_SERVER_PORT)),
                        protocol: Some((*proto).into()),
                        ..Default::default()
                    })
                    .collect(),
            ),
        };
        Api::<EndpointSlice>::namespaced(client, namespace)
            .patch(&format!("{name}-lab"), &pp, &Patch::Apply(&slice))
            .await?;
        Ok(svc)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if !self.owned {
            return;
        }
        if std::env::var_os("SDN_TUNNEL_KEEP_LAB").is_some() {
            eprintln!("lab {}: kept for debugging (SDN_TUNNEL_KEEP_LAB); remove it with `lab down --name {}`", self.state.config.name, self.state.config.name);
            return;
        }
        match teardown(&self.state.config) {
            Ok(r) if r.leftovers.is_empty() => {}
            Ok(r) => eprintln!(
                "lab {}: teardown left {:?}",
                self.state.config.name, r.leftovers
            ),
            Err(e) => eprintln!("lab {}: teardown failed: {e:#}", self.state.config.name),
        }
    }
}

/// Namespaces that belong to lab `name`: the exact names of its plan, its
/// recorded pods, and any other `<name>-...` namespace (a pod from a run
/// that died before recording its state).
fn our_namespaces(cfg: &LabConfig, state: Option<&State>) -> Vec<String> {
    let prefix = format!("{}-", cfg.name);
    let mut names: Vec<String> = sys::netns_list()
        .into_iter()
        .filter(|n| n.starts_with(&prefix))
        .collect();
    let planned = cfg
        .plan()
        .into_iter()
        .flat_map(|c| {
            std::iter::once(c.cp_netns.clone()).chain(c.nodes.into_iter().map(|n| n.netns))
        })
        .chain(std::iter::once(cfg.underlay_netns()))
        .chain(
            state
                .into_iter()
                .flat_map(|s| s.pods.iter().map(|p| p.netns.clone())),
        );
    for n in planned {
        if sys::netns_exists(&n) && !names.contains(&n) {
            names.push(n);
        }
    }
    // Pods and nodes before the underlay, so veths go away with their ends.
    names.sort_by_key(|n| *n == cfg.underlay_netns());
    names
}

/// Removes everything lab `cfg.name` made: its processes (recorded ones
/// first, by PID and start time; then anything still running inside its
/// namespaces), its namespaces, the host link and the state directory.
/// Idempotent: a teardown of nothing reports nothing.
pub fn teardown(cfg: &LabConfig) -> Result<TeardownReport> {
    let state = fs::read_to_string(state_path(&cfg.dir))
        .ok()
        .and_then(|t| serde_json::from_str::<State>(&t).ok());
    // Use the recorded config if there is one: it names what was really made.
    let cfg = state
        .as_ref()
        .map(|s| s.config.clone())
        .unwrap_or_else(|| cfg.clone());
    let mut report = TeardownReport::default();

    let mut procs: Vec<ProcRecord> = Vec::new();
    if let Some(s) = &state {
        procs.extend(s.pods.iter().filter_map(|p| p.server.clone()));
        procs.extend(s.control_plane.iter().rev().cloned());
    }
    let alive: Vec<&ProcRecord> = procs.iter().filter(|p| p.alive()).collect();
    for p in &alive {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(p.pid),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
    for p in &alive {
        p.stop(Duration::from_secs(10));
    }
    report.processes_stopped += alive.len();
    report.processes_stopped += kubelet::teardown(&cfg, state.as_ref(), &mut report.leftovers);

    for ns in our_namespaces(&cfg, state.as_ref()) {
        // Anything still inside one of our namespaces was started by the lab
        // or by a test using it (an agent, a client): it has to go too.
        for pid in sys::netns_pids(&ns) {
            if let Ok(rec) = ProcRecord::of(pid, "process in lab namespace") {
                rec.stop(Duration::from_secs(5));
                report.processes_stopped += 1;
            }
        }
        match sys::ip(&["netns", "del", &ns]) {
            Ok(_) => report.namespaces_removed.push(ns),
            Err(e) => report.leftovers.push(format!("namespace {ns}: {e}")),
        }
    }
    let host = cfg.host_link();
    if sys::link_exists(&host) {
        if let Err(e) = sys::ip(&["link", "del", &host]) {
            report.leftovers.push(format!("link {host}: {e}"));
        }
    }
    if cfg.dir.exists() {
        if let Err(e) = fs::remove_dir_all(&cfg.dir) {
            report
                .leftovers
                .push(format!("directory {}: {e}", cfg.dir.display()));
        }
    }
    report.leftovers.extend(
        procs
            .iter()
            .filter(|p| p.alive())
            .map(|p| format!("process {} ({})", p.pid, p.what)),
    );
    Ok(report)
}

/// Path of the `lab` binary (it also runs the pods' servers):
/// `$SDN_TUNNEL_LAB_BIN`, this executable if it is `lab`, or the `lab` next
/// to it or one directory up (where cargo puts it for test binaries).
/// The EndpointSlice entry of a ready, serving pod, as the endpointslice
/// controller writes it.
pub fn ready_endpoint(pod: &Pod) -> Endpoint {
    Endpoint {
        addresses: vec![pod.ip.to_string()],
        conditions: Some(EndpointConditions {
            ready: Some(true),
            serving: Some(true),
            terminating: Some(false),
        }),
        node_name: Some(pod.node.clone()),
        ..Default::default()
    }
}

pub fn lab_binary() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("SDN_TUNNEL_LAB_BIN") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe()?;
    if exe.file_name().is_some_and(|n| n == "lab") {
        return Ok(exe);
    }
    let candidates = exe
        .parent()
        .into_iter()
        .flat_map(|d| [d.join("lab"), d.join("../lab")]);
    for c in candidates {
        if c.is_file() {
            return Ok(c);
        }
    }
    bail!("cannot find the `lab` binary next to {}: build it (`cargo build -p sdn-tunnel-lab`) or set SDN_TUNNEL_LAB_BIN", exe.display())
}
