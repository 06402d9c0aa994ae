//! sdn-tunnel on real kubelets (the kubelet lab, `LabConfig::real_nodes`):
//! the installer run as a user runs it, then nothing started by the test —
//! the DaemonSet and the DNS Deployment scheduled and run by kubelets from
//! the image `make image` built, reaching the API through kube-proxy. Then,
//! with real pods: pod↔pod TCP and UDP between the clusters, a remote
//! ClusterIP next to the cluster's own Services (kube-proxy, iptables mode,
//! on every node), `cluster.<name>` and `cluster.all` through a pod's
//! dnsConfig, `kubectl exec … wg show` and `kubectl logs`, an agent pod
//! deleted (same key back; the probe's gap reported), a rolling update to a
//! new image tag under a 100 ms probe (gap reported), and an uninstall
//! leaving nothing on the nodes. Needs root, `make image`, the Kubernetes
//! build and containerd (`make e2e-kubelet` does all of it).

// Test code: a panic with its message is how a check reports failure.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use k8s_openapi::api::core::v1::Namespace;
use kube::Api;
use sdn_tunnel_e2e::ansible::{run_playbook, run_site_yml};
use sdn_tunnel_e2e::checks::{check_inventory_installed, leftovers, read_inventory};
use sdn_tunnel_e2e::kubelet::{
    diagnostics, dns_client_yaml, kubectl, kubectl_stdin, nslookup_addresses, pod_ready, pods,
    probe_result, probe_yaml, wait_finished, wait_ready, web_yaml,
};
use sdn_tunnel_e2e::{wait_mesh_connected, workspace_binary, NAMESPACE};
use sdn_tunnel_lab::kubelet::image::default_image;
use sdn_tunnel_lab::{Identity, Lab, LabConfig};

const AGENTS: &str = "app.kubernetes.io/name=tunnel-agent";
const DNS: &str = "app.kubernetes.io/name=tunnel-dns";

// Not in `make test` yet (see the README's lab section): `make e2e-kubelet`
// runs it with `--ignored`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "the kubelet lab: run with `make e2e-kubelet`"]
async fn real_kubelets_run_the_installed_mesh() {
    let started = Instant::now();
    let mut cfg = LabConfig::new("e2ekubl");
    cfg.underlay_octet = 85;
    cfg.real_nodes = true;
    let lab = Lab::up(cfg).await.expect("kubelet lab up");
    println!(
        "kubelet lab up (4 Ready nodes) in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    if let Err(e) = scenario(&lab, started).await {
        let diag = diagnostics(&lab).await;
        panic!("{e:#}\n\n{diag}");
    }
    let report = lab.down().unwrap();
    assert!(report.leftovers.is_empty(), "{:?}", report.leftovers);
    println!(
        "kubelet e2e: {:.1} s in all",
        started.elapsed().as_secs_f64()
    );
}

/// Resident memory of every process on the machine that lives in one of
/// the lab's network namespaces or in the PID namespaces of its nodes
/// (a node's containers have their own network namespaces).
/// The WireGuard public key an east agent pod shows (`kubectl exec … wg show`).
fn agent_public_key(lab: &Lab, pod: &str) -> Result<String> {
    kubectl(
        lab,
        "east",
        &[
            "-n",
            NAMESPACE,
            "exec",
            pod,
            "--",
            "wg",
            "show",
            "wg0",
            "public-key",
        ],
    )
}

fn lab_rss_mib() -> u64 {
    let mut kib = 0;
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
        let cmd = std::fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let ours = cg.contains("sdn-tunnel-lab-e2ekubl")
            || cmd.contains("/tmp/sdn-tunnel-lab/e2ekubl/")
            || cmd.contains("e2ekubl-");
        if !ours {
            continue;
        }
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        kib += status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .unwrap_or(0);
    }
    kib / 1024
}

fn node_netns(lab: &Lab) -> Vec<(String, String)> {
    lab.config()
        .plan()
        .into_iter()
        .flat_map(|c| c.nodes.into_iter().map(|n| (n.name, n.netns)))
        .collect()
}

fn in_netns(netns: &str, cmd: &[&str]) -> Result<String> {
    let mut all = vec!["netns", "exec", netns];
    all.extend_from_slice(cmd);
    sdn_tunnel_lab::sys::run("ip", &all)
}

/// Starts a `lab probe` pod on east-node-1 towards `target` and gives it
/// 5 s of answers before the disruption.
async fn start_probe(lab: &Lab, name: &str, target: &str, seconds: u64) -> Result<()> {
    let yaml = probe_yaml(name, "east-node-1", target, seconds);
    kubectl_stdin(lab, "east", &["apply", "-f", "-"], Some(&yaml))?;
    tokio::time::sleep(Duration::from_secs(5)).await;
    Ok(())
}

/// The longest gap and the failed probes of a finished probe pod (which
/// fails if traffic never came back).
async fn probe_outcome(lab: &Lab, name: &str, timeout: Duration) -> Result<(Duration, usize)> {
    let phase = wait_finished(lab, "east", name, timeout).await?;
    let log = kubectl(lab, "east", &["logs", name])?;
    ensure!(phase == "Succeeded", "{name} {phase}:\n{log}");
    probe_result(&log)
}

async fn scenario(lab: &Lab, started: Instant) -> Result<()> {
    let clusters = lab.config().clusters.clone();
    let nodes_per_cluster = usize::from(lab.config().nodes_per_cluster);

    // 1. The installer, as a user runs it (it waits for the rollout).
    let tunctl = workspace_binary("tunctl")?;
    let (inventory, run) = run_site_yml(lab, &tunctl)?;
    ensure!(run.success, "site.yml failed:\n{}", run.output());
    println!(
        "site.yml: {:.1} s (DaemonSet and DNS Deployment rolled out); {:.1} s since the lab started",
        run.elapsed.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    check_inventory_installed(&read_inventory(&inventory)?).await?;
    for c in &clusters {
        let agents = wait_ready(
            lab,
            c,
            NAMESPACE,
            AGENTS,
            nodes_per_cluster,
            Duration::from_secs(60),
        )
        .await?;
        let mut on: Vec<String> = agents
            .iter()
            .filter_map(|p| p.spec.as_ref()?.node_name.clone())
            .collect();
        on.sort();
        let want: Vec<String> = (1..=nodes_per_cluster)
            .map(|n| format!("{c}-node-{n}"))
            .collect();
        ensure!(on == want, "{c}: agents on {on:?}, expected {want:?}");
        wait_ready(lab, c, NAMESPACE, DNS, 2, Duration::from_secs(60)).await?;
    }
    println!(
        "DaemonSet Running on every node, tunnel-dns 2/2: {:.1} s after the lab started",
        started.elapsed().as_secs_f64()
    );
    let t = wait_mesh_connected(lab, Duration::from_secs(90)).await?;
    println!("mesh connected ({:.1} s more)", t.as_secs_f64());
    let out = std::process::Command::new(&tunctl)
        .arg("--kubeconfig")
        .arg(lab.merged_kubeconfig())
        .args(["--all-contexts", "peers", "--check"])
        .output()?;
    ensure!(
        out.status.success(),
        "tunctl peers --check: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // 2. Real pods: `lab serve` on both nodes of both clusters.
    for c in &clusters {
        kubectl_stdin(lab, c, &["apply", "-f", "-"], Some(&web_yaml(c)))?;
    }
    let mut web_ip = std::collections::BTreeMap::new();
    let mut svc_ip = std::collections::BTreeMap::new();
    for c in &clusters {
        for p in wait_ready(lab, c, "default", "app=web", 2, Duration::from_secs(60)).await? {
            let name = p.metadata.name.clone().unwrap_or_default();
            let ip = p.status.and_then(|s| s.pod_ip).context("pod without IP")?;
            web_ip.insert((c.clone(), name), ip);
        }
        let ip = kubectl(
            lab,
            c,
            &["get", "svc", "web", "-o", "jsonpath={.spec.clusterIP}"],
        )?;
        svc_ip.insert(c.clone(), ip);
    }
    let ask = |from: &str, target: &str, udp: bool| -> Result<String> {
        let mut args = vec!["exec", "web-1", "--", "lab", "request"];
        if udp {
            args.push("--udp");
        }
        args.push(target);
        Ok(kubectl(lab, from, &args)?.trim().to_string())
    };
    for (from, to) in [("east", "west"), ("west", "east")] {
        for n in 1..=2 {
            let ip = &web_ip[&(to.to_string(), format!("web-{n}"))];
            let want = format!("{to}-web-{n}");
            for udp in [false, true] {
                let got = ask(from, &format!("{ip}:8080"), udp)?;
                ensure!(got == want, "{from} → {to} web-{n} (udp {udp}): {got:?}");
            }
        }
        // The other cluster's ClusterIP (sdn-tunnel's service proxy) and
        // this cluster's own (kube-proxy), one right after the other.
        for udp in [false, true] {
            let remote = ask(from, &format!("{}:80", svc_ip[to]), udp)?;
            ensure!(
                remote.starts_with(&format!("{to}-web-")),
                "{from} → {to} ClusterIP: {remote:?}"
            );
            let local = ask(from, &format!("{}:80", svc_ip[from]), udp)?;
            ensure!(
                local.starts_with(&format!("{from}-web-")),
                "{from} own ClusterIP: {local:?}"
            );
        }
    }
    println!("pod↔pod TCP/UDP both ways, remote ClusterIPs and local ones (kube-proxy) answer");
    println!(
        "lab memory, everything running: {} MiB RSS (every process of the lab's namespaces and node cgroups)",
        lab_rss_mib()
    );
    for (node, netns) in node_netns(lab) {
        let rules = in_netns(&netns, &["iptables-save", "-t", "nat"])?;
        ensure!(
            rules.contains("-A KUBE-SERVICES"),
            "{node}: no kube-proxy rules:\n{rules}"
        );
        let tables = in_netns(&netns, &["nft", "list", "tables"])?;
        ensure!(
            tables.contains("sdn_tunnel_node"),
            "{node}: no sdn_tunnel_node table: {tables}"
        );
    }

    // 3. DNS through a pod's dnsConfig (nameserver: the tunnel-dns Service).
    let dns_ip = kubectl(
        lab,
        "east",
        &[
            "-n",
            NAMESPACE,
            "get",
            "svc",
            "tunnel-dns",
            "-o",
            "jsonpath={.spec.clusterIP}",
        ],
    )?;
    kubectl_stdin(
        lab,
        "east",
        &["apply", "-f", "-"],
        Some(&dns_client_yaml("dnsclient", &dns_ip)),
    )?;
    wait_ready(
        lab,
        "east",
        "default",
        "app=dnsclient",
        1,
        Duration::from_secs(60),
    )
    .await?;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut all = vec![svc_ip["east"].clone(), svc_ip["west"].clone()];
    all.sort();
    for (name, want) in [
        ("web.default.svc.cluster.west", vec![svc_ip["west"].clone()]),
        ("web.default.svc.cluster.all", all),
    ] {
        loop {
            let got = kubectl(lab, "east", &["exec", "dnsclient", "--", "nslookup", name])
                .map(|o| nslookup_addresses(&o));
            if got.as_ref().is_ok_and(|g| *g == want) {
                break;
            }
            if Instant::now() > deadline {
                bail!("nslookup {name} in a dnsConfig pod: {got:?}, expected {want:?}");
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    println!("cluster.west and cluster.all resolved from a real pod through its dnsConfig");

    // 4. kubectl exec and logs in the agent pod.
    let agent = |node: &str| {
        let node = node.to_string();
        async move {
            let all = pods(lab, "east", NAMESPACE, AGENTS).await?;
            all.into_iter()
                .find(|p| {
                    pod_ready(p)
                        && p.metadata.deletion_timestamp.is_none()
                        && p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(&node)
                })
                .and_then(|p| p.metadata.name)
                .with_context(|| format!("no ready agent on {node}"))
        }
    };
    let a1 = agent("east-node-1").await?;
    let wg = kubectl(
        lab,
        "east",
        &["-n", NAMESPACE, "exec", &a1, "--", "wg", "show"],
    )?;
    ensure!(
        wg.contains("interface: wg0") && wg.matches("peer: ").count() == 2,
        "wg show in {a1}:\n{wg}"
    );
    let key_before = agent_public_key(lab, &a1)?;
    let logs = kubectl(lab, "east", &["-n", NAMESPACE, "logs", &a1])?;
    ensure!(
        logs.contains("nftables table replaced"),
        "kubectl logs {a1}:\n{logs}"
    );

    // 5. An agent pod deleted: the DaemonSet makes a new one, with the same
    // key (hostPath), and traffic comes back. Probe: east-node-1 → west web-1.
    let target = format!(
        "{}:8080",
        web_ip[&("west".to_string(), "web-1".to_string())]
    );
    start_probe(lab, "probe-delete", &target, 180).await?;
    let t0 = Instant::now();
    kubectl(
        lab,
        "east",
        &["-n", NAMESPACE, "delete", "pod", &a1, "--wait=false"],
    )?;
    let a1b = loop {
        if let Ok(n) = agent("east-node-1").await {
            if n != a1 {
                break n;
            }
        }
        ensure!(
            t0.elapsed() < Duration::from_secs(90),
            "no new agent on east-node-1 after 90 s"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    println!(
        "deleted {a1}: {a1b} ready after {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    let key_after = agent_public_key(lab, &a1b)?;
    ensure!(
        key_before == key_after,
        "key changed: {key_before} → {key_after}"
    );
    wait_mesh_connected(lab, Duration::from_secs(60)).await?;
    let (gap, failed) = probe_outcome(lab, "probe-delete", Duration::from_secs(200)).await?;
    println!(
        "delete pod: longest gap {} ms ({failed} failed probes of 100 ms), same key",
        gap.as_millis()
    );

    // 6. A rolling update of east's DaemonSet to a new tag (the same image,
    // tagged anew on every node: no registry), under the same probe.
    let next = format!("{}-next", default_image());
    lab.tag_image_on_nodes(&default_image(), &next)?;
    start_probe(lab, "probe-rollout", &target, 240).await?;
    let t0 = Instant::now();
    kubectl(
        lab,
        "east",
        &[
            "-n",
            NAMESPACE,
            "set",
            "image",
            "daemonset/tunnel-agent",
            &format!("tunnel-agent={next}"),
        ],
    )?;
    kubectl(
        lab,
        "east",
        &[
            "-n",
            NAMESPACE,
            "rollout",
            "status",
            "daemonset/tunnel-agent",
            "--timeout=300s",
        ],
    )?;
    println!(
        "rolling update to {next}: {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    for p in pods(lab, "east", NAMESPACE, AGENTS).await? {
        let image = p
            .spec
            .and_then(|s| s.containers.first().and_then(|c| c.image.clone()));
        ensure!(
            image.as_deref() == Some(next.as_str()),
            "agent still on {image:?}"
        );
    }
    wait_mesh_connected(lab, Duration::from_secs(60)).await?;
    let (gap, failed) = probe_outcome(lab, "probe-rollout", Duration::from_secs(260)).await?;
    println!(
        "rolling update: longest gap {} ms ({failed} failed probes of 100 ms)",
        gap.as_millis()
    );

    // 7. Uninstall: the agents stop (kubelet, SIGTERM) and take their routes
    // and tables with them; the key stays where deploy/README says.
    let gone = run_playbook("uninstall.yml", &inventory, &[])?;
    ensure!(gone.success, "uninstall.yml failed:\n{}", gone.output());
    let deadline = Instant::now() + Duration::from_secs(120);
    for c in &clusters {
        let admin = lab.client(c, Identity::Admin).await?;
        loop {
            let left = leftovers(&admin).await?;
            let ns_gone = Api::<Namespace>::all(admin.clone())
                .get_opt(NAMESPACE)
                .await?
                .is_none();
            if left.is_empty() && ns_gone {
                break;
            }
            ensure!(Instant::now() < deadline, "{c}: uninstall left {left:?}");
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    for (node, netns) in node_netns(lab) {
        let routes = sdn_tunnel_lab::sys::ip_in(&netns, &["route", "show", "proto", "93"])?;
        let tables = in_netns(&netns, &["nft", "list", "tables"])?;
        ensure!(
            routes.trim().is_empty() && !tables.contains("sdn_tunnel"),
            "{node} after uninstall: routes {routes:?}, tables {tables:?}"
        );
        let cluster = node.rsplitn(3, '-').last().unwrap_or_default().to_string();
        let key = lab
            .node_dir(&cluster, &node)
            .join("fs/var-lib-sdn-tunnel/private.key");
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(&key)
                .with_context(|| format!("{}", key.display()))?
                .permissions(),
        );
        ensure!(mode & 0o077 == 0, "{node}: key mode {mode:o}");
    }
    println!("uninstall: no routes, no nftables tables on any node; keys kept (0600) in /var/lib/sdn-tunnel");
    Ok(())
}
