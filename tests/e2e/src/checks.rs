//! Assertions about an installed mesh that need only API clients, so they
//! run the same against the lab (from the tests) and against real clusters
//! (kind, through the `e2e-check` binary).

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec,
};
use k8s_openapi::api::core::v1::{Namespace, Node, Secret, Service, ServiceAccount};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::config::{AuthInfo, KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};
use sdn_tunnel_api::{PeerState, TunnelCluster, TunnelClusterSpec, TunnelPeer};

use crate::NAMESPACE;

/// The CRDs sdn-tunnel installs.
pub const CRDS: [&str; 2] = ["tunnelclusters.sdntunnel.io", "tunnelpeers.sdntunnel.io"];
/// The ServiceAccounts of deploy/rbac.yaml.
pub const SERVICE_ACCOUNTS: [&str; 3] = ["tunnel-agent", "tunnel-dns", "remote-reader"];

/// One cluster of the mesh as the installer was told about it.
#[derive(Debug, Clone)]
pub struct Declared {
    pub name: String,
    pub pod_cidrs: Vec<String>,
    pub service_cidrs: Vec<String>,
}

/// A client for `context` of `kubeconfig`, authenticated with `token`
/// instead of the context's own credentials.
pub async fn client_with_token(
    kubeconfig: &Kubeconfig,
    context: &str,
    token: &str,
) -> Result<Client> {
    let opts = KubeConfigOptions {
        context: Some(context.to_string()),
        ..Default::default()
    };
    let mut cfg = Config::from_custom_kubeconfig(kubeconfig.clone(), &opts).await?;
    cfg.auth_info = AuthInfo {
        token: Some(token.to_string().into()),
        ..Default::default()
    };
    Ok(Client::try_from(cfg)?)
}

/// A client from a whole kubeconfig document (e.g. the one in a Secret).
pub async fn client_from_kubeconfig_text(text: &str) -> Result<Client> {
    let kc = Kubeconfig::from_yaml(text)?;
    let cfg = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?;
    Ok(Client::try_from(cfg)?)
}

/// A token of ServiceAccount `sa` in sdn-tunnel's namespace, from the
/// TokenRequest API (as a kubelet gets one for a pod).
pub async fn service_account_token(admin: &Client, sa: &str) -> Result<String> {
    let req = TokenRequest {
        spec: TokenRequestSpec {
            audiences: vec![],
            expiration_seconds: Some(3600),
            ..Default::default()
        },
        ..Default::default()
    };
    Ok(Api::<ServiceAccount>::namespaced(admin.clone(), NAMESPACE)
        .create_token_request(sa, &PostParams::default(), &req)
        .await
        .with_context(|| format!("token for {NAMESPACE}/{sa}"))?
        .status
        .context("TokenRequest without status")?
        .token)
}

/// Everything the playbook must have made in cluster `here` of `mesh`.
pub async fn check_installed(admin: &Client, here: &str, mesh: &[Declared]) -> Result<()> {
    let crds: Api<CustomResourceDefinition> = Api::all(admin.clone());
    for name in CRDS {
        let crd = crds
            .get(name)
            .await
            .with_context(|| format!("{here}: CRD {name}"))?;
        ensure!(
            sdn_tunnel_lab::controlplane::crd_established(&crd),
            "{here}: CRD {name} is not Established"
        );
    }
    Api::<Namespace>::all(admin.clone())
        .get(NAMESPACE)
        .await
        .with_context(|| format!("{here}: namespace {NAMESPACE}"))?;
    for sa in SERVICE_ACCOUNTS {
        Api::<ServiceAccount>::namespaced(admin.clone(), NAMESPACE)
            .get(sa)
            .await
            .with_context(|| format!("{here}: ServiceAccount {sa}"))?;
    }
    let ds = Api::<DaemonSet>::namespaced(admin.clone(), NAMESPACE)
        .get("tunnel-agent")
        .await
        .with_context(|| format!("{here}: DaemonSet tunnel-agent"))?;
    let pod = ds
        .spec
        .and_then(|s| s.template.spec)
        .context("DaemonSet without pod spec")?;
    ensure!(
        pod.tolerations
            .iter()
            .flatten()
            .any(|t| t.operator.as_deref() == Some("Exists") && t.key.is_none()),
        "{here}: the DaemonSet does not tolerate every taint"
    );
    ensure!(
        pod.service_account_name.as_deref() == Some("tunnel-agent"),
        "{here}: DaemonSet identity"
    );
    Api::<Deployment>::namespaced(admin.clone(), NAMESPACE)
        .get("tunnel-dns")
        .await
        .with_context(|| format!("{here}: Deployment tunnel-dns"))?;
    let svc = Api::<Service>::namespaced(admin.clone(), NAMESPACE)
        .get("tunnel-dns")
        .await
        .with_context(|| format!("{here}: Service tunnel-dns"))?;
    let ports: Vec<(i32, String)> = svc
        .spec
        .and_then(|s| s.ports)
        .unwrap_or_default()
        .into_iter()
        .map(|p| (p.port, p.protocol.unwrap_or_default()))
        .collect();
    ensure!(
        ports.contains(&(53, "UDP".into())) && ports.contains(&(53, "TCP".into())),
        "{here}: Service tunnel-dns ports {ports:?}"
    );
    let declared: Vec<TunnelCluster> = Api::<TunnelCluster>::all(admin.clone())
        .list(&ListParams::default())
        .await?
        .items;
    ensure!(
        declared.len() == mesh.len(),
        "{here}: {} TunnelClusters, expected {}",
        declared.len(),
        mesh.len()
    );
    let secrets: Api<Secret> = Api::namespaced(admin.clone(), NAMESPACE);
    for c in mesh {
        let tc = declared
            .iter()
            .find(|t| t.spec.cluster_name == c.name)
            .with_context(|| format!("{here}: no TunnelCluster for {}", c.name))?;
        let local = c.name == here;
        let TunnelClusterSpec {
            pod_cidrs,
            service_cidrs,
            local: is_local,
            kubeconfig_secret_ref,
            ..
        } = &tc.spec;
        ensure!(
            *pod_cidrs == c.pod_cidrs && *service_cidrs == c.service_cidrs && *is_local == local,
            "{here}: TunnelCluster {} is {:?}",
            c.name,
            tc.spec
        );
        if local {
            ensure!(
                kubeconfig_secret_ref.is_none(),
                "{here}: local TunnelCluster with a Secret"
            );
            continue;
        }
        let r = kubeconfig_secret_ref.as_ref().with_context(|| {
            format!("{here}: TunnelCluster {} has no kubeconfig Secret", c.name)
        })?;
        let s = secrets
            .get(&r.name)
            .await
            .with_context(|| format!("{here}: Secret {}", r.name))?;
        let data = s
            .data
            .as_ref()
            .and_then(|d| d.get(r.key_or_default()))
            .with_context(|| format!("{here}: Secret {} has no {}", r.name, r.key_or_default()))?;
        Kubeconfig::from_yaml(std::str::from_utf8(&data.0)?)
            .with_context(|| format!("{here}: Secret {} is not a kubeconfig", r.name))?;
    }
    Ok(())
}

/// The kubeconfig cluster `here` holds for cluster `of` (playbook output).
pub async fn stored_kubeconfig(admin: &Client, of: &str) -> Result<String> {
    let s = Api::<Secret>::namespaced(admin.clone(), NAMESPACE)
        .get(&format!("{of}-kubeconfig"))
        .await?;
    let data = s
        .data
        .and_then(|mut d| d.remove("kubeconfig"))
        .context("no kubeconfig key")?;
    Ok(String::from_utf8(data.0)?)
}

/// One access question and the answer least privilege requires.
#[derive(Debug, Clone, Copy)]
pub struct Access {
    pub verb: &'static str,
    pub group: &'static str,
    pub resource: &'static str,
    pub subresource: &'static str,
    /// Empty: cluster-wide.
    pub namespace: &'static str,
    pub allowed: bool,
}

const fn a(
    verb: &'static str,
    group: &'static str,
    resource: &'static str,
    subresource: &'static str,
    namespace: &'static str,
    allowed: bool,
) -> Access {
    Access {
        verb,
        group,
        resource,
        subresource,
        namespace,
        allowed,
    }
}

const NS: &str = NAMESPACE;
const G: &str = "sdntunnel.io";

/// The agent identity: reads what it needs, writes only TunnelPeers (and
/// their status) in its namespace, and TunnelCluster status (never spec).
pub const AGENT_ACCESS: &[Access] = &[
    a("create", G, "tunnelpeers", "", NS, true),
    a("patch", G, "tunnelpeers", "", NS, true),
    a("patch", G, "tunnelpeers", "status", NS, true),
    a("list", G, "tunnelpeers", "", "", true),
    a("watch", G, "tunnelclusters", "", "", true),
    a("get", "", "nodes", "", "", true),
    a("watch", "", "services", "", "", true),
    a("watch", "", "namespaces", "", "", true),
    a("watch", "discovery.k8s.io", "endpointslices", "", "", true),
    a("get", "", "secrets", "", NS, true),
    a("patch", "", "namespaces", "", "", false),
    a("create", G, "tunnelpeers", "", "default", false),
    a("update", G, "tunnelpeers", "", NS, false),
    a("delete", G, "tunnelpeers", "", NS, false),
    a("create", G, "tunnelclusters", "", "", false),
    a("patch", G, "tunnelclusters", "", "", false),
    a("delete", G, "tunnelclusters", "", "", false),
    // One agent per cluster summarises the mesh into TunnelCluster status.
    a("patch", G, "tunnelclusters", "status", "", true),
    a("update", G, "tunnelclusters", "status", "", false),
    a("list", "", "secrets", "", NS, false),
    a("get", "", "secrets", "", "kube-system", false),
    a("create", "", "secrets", "", NS, false),
    a("patch", "", "nodes", "", "", false),
    a("create", "", "services", "", "default", false),
    a("patch", "", "configmaps", "", "kube-system", false),
    a("create", "", "pods", "", NS, false),
    a("create", "", "serviceaccounts", "token", NS, false),
    a("patch", "apps", "daemonsets", "", NS, false),
    a(
        "create",
        "rbac.authorization.k8s.io",
        "clusterrolebindings",
        "",
        "",
        false,
    ),
    a(
        "delete",
        "apiextensions.k8s.io",
        "customresourcedefinitions",
        "",
        "",
        false,
    ),
];

/// What other clusters may do with the kubeconfig they are given: read
/// TunnelPeers, Services, EndpointSlices and Namespaces; nothing else.
pub const REMOTE_READER_ACCESS: &[Access] = &[
    a("list", G, "tunnelpeers", "", "", true),
    a("watch", G, "tunnelpeers", "", "", true),
    a("watch", "", "services", "", "", true),
    a("watch", "", "namespaces", "", "", true),
    a("delete", "", "namespaces", "", "", false),
    a("watch", "discovery.k8s.io", "endpointslices", "", "", true),
    a("create", G, "tunnelpeers", "", NS, false),
    a("patch", G, "tunnelpeers", "", NS, false),
    a("patch", G, "tunnelpeers", "status", NS, false),
    a("list", G, "tunnelclusters", "", "", false),
    a("get", "", "secrets", "", NS, false),
    a("list", "", "nodes", "", "", false),
    a("list", "", "pods", "", "", false),
    a("create", "", "services", "", "default", false),
];

/// Asks the API server (SelfSubjectAccessReview, as `kubectl auth can-i`
/// does) every question of `expected` as `who`; an error lists every answer
/// that differs.
pub async fn check_access(who: &Client, name: &str, expected: &[Access]) -> Result<usize> {
    let api: Api<SelfSubjectAccessReview> = Api::all(who.clone());
    let mut wrong = Vec::new();
    for e in expected {
        let review = SelfSubjectAccessReview {
            spec: SelfSubjectAccessReviewSpec {
                resource_attributes: Some(ResourceAttributes {
                    verb: Some(e.verb.into()),
                    group: Some(e.group.into()),
                    resource: Some(e.resource.into()),
                    subresource: (!e.subresource.is_empty()).then(|| e.subresource.into()),
                    namespace: (!e.namespace.is_empty()).then(|| e.namespace.into()),
                    ..Default::default()
                }),
                ..Default::default()
            },
            ..Default::default()
        };
        let got = api
            .create(&PostParams::default(), &review)
            .await
            .with_context(|| format!("{name}: SelfSubjectAccessReview"))?
            .status
            .context("review without status")?
            .allowed;
        if got != e.allowed {
            wrong.push(format!(
                "{} {}{}{} in {:?}: allowed={got}, expected {}",
                e.verb,
                if e.group.is_empty() { "" } else { e.group },
                if e.group.is_empty() {
                    e.resource.to_string()
                } else {
                    format!("/{}", e.resource)
                },
                if e.subresource.is_empty() {
                    String::new()
                } else {
                    format!("/{}", e.subresource)
                },
                e.namespace,
                e.allowed
            ));
        }
    }
    if !wrong.is_empty() {
        bail!("{name} has the wrong access:\n  {}", wrong.join("\n  "));
    }
    Ok(expected.len())
}

fn forbidden<T: std::fmt::Debug>(r: kube::Result<T>, what: &str) -> Result<()> {
    match r {
        Err(kube::Error::Api(e)) if e.code == 403 => Ok(()),
        other => bail!("{what}: expected 403 Forbidden, got {other:?}"),
    }
}

/// Real writes the agent identity must be refused (not just reviews).
pub async fn check_agent_writes_refused(agent: &Client, cluster: &str) -> Result<()> {
    let pp = PatchParams::apply("sdn-tunnel-e2e-rbac");
    let tc = TunnelCluster::new(
        "rbac-probe",
        TunnelClusterSpec {
            cluster_name: "rbac-probe".into(),
            pod_cidrs: vec!["10.250.0.0/16".into()],
            service_cidrs: vec!["10.251.0.0/16".into()],
            dns_zone: None,
            local: false,
            kubeconfig_secret_ref: None,
            service_selector: None,
            endpoint_overrides: vec![],
        },
    );
    forbidden(
        Api::<TunnelCluster>::all(agent.clone())
            .patch("rbac-probe", &pp, &Patch::Apply(&tc))
            .await,
        &format!("{cluster}: agent applies a TunnelCluster"),
    )?;
    let secret = serde_json::json!({"apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "rbac-probe", "namespace": NAMESPACE}});
    forbidden(
        Api::<Secret>::namespaced(agent.clone(), NAMESPACE)
            .patch("rbac-probe", &pp, &Patch::Apply(&secret))
            .await,
        &format!("{cluster}: agent applies a Secret"),
    )?;
    forbidden(
        Api::<Secret>::namespaced(agent.clone(), NAMESPACE)
            .list(&ListParams::default())
            .await,
        &format!("{cluster}: agent lists Secrets"),
    )?;
    let peer = serde_json::json!({"apiVersion": "sdntunnel.io/v1alpha1", "kind": "TunnelPeer",
        "metadata": {"name": "rbac-probe", "namespace": "default"},
        "spec": {"cluster": "x", "node": "x", "publicKey": "aG9zdGlsZS1wZWVyLWtleS1mb3ItZTJlLXRlc3RzISE=",
                 "endpoints": ["10.0.0.1:51820"], "podCIDRs": ["10.250.1.0/24"], "listenPort": 51820}});
    forbidden(
        Api::<TunnelPeer>::namespaced(agent.clone(), "default")
            .patch("rbac-probe", &pp, &Patch::Apply(&peer))
            .await,
        &format!("{cluster}: agent applies a TunnelPeer outside {NAMESPACE}"),
    )?;
    Ok(())
}

/// Real calls with the kubeconfig another cluster holds for this one: it
/// reads TunnelPeers, and is refused Secrets and writes.
pub async fn check_remote_reader_calls(reader: &Client, cluster: &str) -> Result<()> {
    Api::<TunnelPeer>::all(reader.clone())
        .list(&ListParams::default())
        .await
        .with_context(|| format!("{cluster}: remote-reader lists TunnelPeers"))?;
    forbidden(
        Api::<Secret>::namespaced(reader.clone(), NAMESPACE)
            .get("anything")
            .await,
        &format!("{cluster}: remote-reader reads a Secret"),
    )?;
    let peer = serde_json::json!({"apiVersion": "sdntunnel.io/v1alpha1", "kind": "TunnelPeer",
        "metadata": {"name": "rbac-probe", "namespace": NAMESPACE}});
    forbidden(
        Api::<TunnelPeer>::namespaced(reader.clone(), NAMESPACE)
            .patch(
                "rbac-probe",
                &PatchParams::apply("sdn-tunnel-e2e-rbac"),
                &Patch::Apply(&peer),
            )
            .await,
        &format!("{cluster}: remote-reader applies a TunnelPeer"),
    )?;
    Ok(())
}

/// Waits until every node of every cluster reports every node of the other
/// clusters as Connected in its TunnelPeer status (node counts from the
/// Node objects); returns how long it took.
pub async fn wait_connected(clusters: &[(String, Client)], timeout: Duration) -> Result<Duration> {
    let started = Instant::now();
    let mut nodes = Vec::new();
    for (name, c) in clusters {
        let list = Api::<Node>::all(c.clone())
            .list(&ListParams::default())
            .await?;
        nodes.push((name.clone(), list.items.len()));
    }
    let total: usize = nodes.iter().map(|(_, n)| n).sum();
    let mut last = String::new();
    while started.elapsed() < timeout {
        let mut missing = Vec::new();
        for ((name, c), (_, here)) in clusters.iter().zip(&nodes) {
            let peers = Api::<TunnelPeer>::namespaced(c.clone(), NAMESPACE)
                .list(&ListParams::default())
                .await?
                .items;
            if peers.len() < *here {
                missing.push(format!("{name}: {}/{here} TunnelPeers", peers.len()));
                continue;
            }
            for p in &peers {
                let connected = p
                    .status
                    .as_ref()
                    .map(|s| {
                        s.peers
                            .iter()
                            .filter(|r| r.state == PeerState::Connected)
                            .count()
                    })
                    .unwrap_or(0);
                if connected < total - here {
                    missing.push(format!(
                        "{name}/{}: {connected}/{}",
                        p.spec.node,
                        total - here
                    ));
                }
            }
        }
        if missing.is_empty() {
            return Ok(started.elapsed());
        }
        last = missing.join(", ");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    bail!("mesh not connected after {timeout:?}: {last}")
}

/// One cluster of an Ansible inventory of the sdn-tunnel playbooks.
#[derive(Debug, Clone)]
pub struct InventoryCluster {
    pub name: String,
    pub kubeconfig: std::path::PathBuf,
    pub context: Option<String>,
    pub declared: Declared,
}

/// The clusters of an inventory in the format `ansible/site.yml` takes
/// (group `sdn_tunnel_clusters`, one host per cluster).
pub fn read_inventory(path: &std::path::Path) -> Result<Vec<InventoryCluster>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}", path.display()))?;
    let doc: serde_yaml::Value = serde_yaml::from_str(&text)?;
    let group = doc
        .get("sdn_tunnel_clusters")
        .or_else(|| {
            doc.get("all")
                .and_then(|a| a.get("children"))
                .and_then(|c| c.get("sdn_tunnel_clusters"))
        })
        .context("the inventory has no group sdn_tunnel_clusters")?;
    let hosts = group
        .get("hosts")
        .and_then(|h| h.as_mapping())
        .context("sdn_tunnel_clusters has no hosts")?;
    let strings = |v: Option<&serde_yaml::Value>| -> Vec<String> {
        v.and_then(|v| v.as_sequence())
            .map(|s| {
                s.iter()
                    .filter_map(|x| x.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut out = Vec::new();
    for (host, vars) in hosts {
        let host = host.as_str().context("host name")?.to_string();
        let kubeconfig = vars
            .get("kubeconfig")
            .and_then(|v| v.as_str())
            .with_context(|| format!("host {host} has no kubeconfig"))?;
        let kubeconfig = match kubeconfig.strip_prefix("~/") {
            Some(rest) => {
                std::path::PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(rest)
            }
            None => std::path::PathBuf::from(kubeconfig),
        };
        let name = vars
            .get("cluster_name")
            .and_then(|v| v.as_str())
            .map(String::from)
            .unwrap_or_else(|| host.clone());
        out.push(InventoryCluster {
            kubeconfig,
            context: vars
                .get("context")
                .and_then(|v| v.as_str())
                .map(String::from),
            declared: Declared {
                name: name.clone(),
                pod_cidrs: strings(vars.get("pod_cidrs")),
                service_cidrs: strings(vars.get("service_cidrs")),
            },
            name,
        });
    }
    Ok(out)
}

impl InventoryCluster {
    fn kubeconfig_doc(&self) -> Result<Kubeconfig> {
        Kubeconfig::read_from(&self.kubeconfig)
            .with_context(|| format!("{}", self.kubeconfig.display()))
    }

    fn context_name(&self, kc: &Kubeconfig) -> Result<String> {
        self.context
            .clone()
            .or_else(|| kc.current_context.clone())
            .with_context(|| format!("{}: no context", self.name))
    }

    /// A client with the inventory's (admin) credentials.
    pub async fn admin(&self) -> Result<Client> {
        let kc = self.kubeconfig_doc()?;
        let opts = KubeConfigOptions {
            context: Some(self.context_name(&kc)?),
            ..Default::default()
        };
        Ok(Client::try_from(
            Config::from_custom_kubeconfig(kc, &opts).await?,
        )?)
    }

    /// A client authenticated as ServiceAccount `sa` of sdn-tunnel.
    pub async fn as_service_account(&self, sa: &str) -> Result<Client> {
        let token = service_account_token(&self.admin().await?, sa).await?;
        let kc = self.kubeconfig_doc()?;
        let ctx = self.context_name(&kc)?;
        client_with_token(&kc, &ctx, &token).await
    }
}

/// [`check_installed`] in every cluster of the inventory.
pub async fn check_inventory_installed(inv: &[InventoryCluster]) -> Result<()> {
    let mesh: Vec<Declared> = inv.iter().map(|c| c.declared.clone()).collect();
    for c in inv {
        check_installed(&c.admin().await?, &c.name, &mesh).await?;
    }
    Ok(())
}

/// RBAC, for real, in every cluster: the agent's ServiceAccount (a fresh
/// TokenRequest token, as its pods get) and the kubeconfig every other
/// cluster holds for this one (the playbook's output). Returns the number
/// of access reviews asked.
pub async fn check_inventory_rbac(inv: &[InventoryCluster]) -> Result<usize> {
    let mut asked = 0;
    for c in inv {
        let agent = c.as_service_account("tunnel-agent").await?;
        asked += check_access(&agent, &format!("{}: tunnel-agent", c.name), AGENT_ACCESS).await?;
        check_agent_writes_refused(&agent, &c.name).await?;
        for other in inv.iter().filter(|o| o.name != c.name) {
            let text = stored_kubeconfig(&other.admin().await?, &c.name).await?;
            let reader = client_from_kubeconfig_text(&text).await?;
            let who = format!("{}'s kubeconfig for {}", other.name, c.name);
            asked += check_access(&reader, &who, REMOTE_READER_ACCESS).await?;
            check_remote_reader_calls(&reader, &c.name).await?;
        }
    }
    Ok(asked)
}

/// [`wait_connected`] over the inventory's clusters.
pub async fn wait_inventory_connected(
    inv: &[InventoryCluster],
    timeout: Duration,
) -> Result<Duration> {
    let mut clients = Vec::new();
    for c in inv {
        clients.push((c.name.clone(), c.admin().await?));
    }
    wait_connected(&clients, timeout).await
}

/// Every object of ours that is still in the cluster (empty after a
/// complete uninstall).
pub async fn leftovers(admin: &Client) -> Result<Vec<String>> {
    use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
    let mut out = Vec::new();
    match Api::<Namespace>::all(admin.clone()).get(NAMESPACE).await {
        Ok(ns) => out.push(format!(
            "namespace {NAMESPACE} (phase {:?})",
            ns.status.and_then(|s| s.phase)
        )),
        Err(kube::Error::Api(e)) if e.code == 404 => {}
        Err(e) => return Err(e.into()),
    }
    let crds: Api<CustomResourceDefinition> = Api::all(admin.clone());
    for name in CRDS {
        match crds.get(name).await {
            Ok(_) => out.push(format!("CRD {name}")),
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(e.into()),
        }
    }
    let ours = |n: &str| n.starts_with("sdn-tunnel-") && !n.starts_with("sdn-tunnel-lab");
    for r in Api::<ClusterRole>::all(admin.clone())
        .list(&ListParams::default())
        .await?
    {
        let n = r.metadata.name.unwrap_or_default();
        if ours(&n) {
            out.push(format!("ClusterRole {n}"));
        }
    }
    for r in Api::<ClusterRoleBinding>::all(admin.clone())
        .list(&ListParams::default())
        .await?
    {
        let n = r.metadata.name.unwrap_or_default();
        if ours(&n) {
            out.push(format!("ClusterRoleBinding {n}"));
        }
    }
    Ok(out)
}
