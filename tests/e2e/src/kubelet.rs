//! Helpers of the e2e on the kubelet lab (`LabConfig::real_nodes`):
//! `kubectl` against the lab's merged kubeconfig, waiting for real pods,
//! the lab's test workloads (the tools image: `lab serve`, `lab probe`,
//! busybox), and what a failure shows (pods, events, logs of pods that are
//! not ready, previous logs of crash-looping ones).

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use k8s_openapi::api::core::v1::Pod;
use kube::api::ListParams;
use kube::Api;
use sdn_tunnel_lab::kubelet::image::TOOLS_IMAGE;
use sdn_tunnel_lab::{Identity, Lab};

/// `kubectl --context <cluster> <args>` with the lab's merged kubeconfig;
/// fails with its stderr.
pub fn kubectl(lab: &Lab, cluster: &str, args: &[&str]) -> Result<String> {
    kubectl_stdin(lab, cluster, args, None)
}

/// [`kubectl`] with `stdin` fed to it (`apply -f -`).
pub fn kubectl_stdin(
    lab: &Lab,
    cluster: &str,
    args: &[&str],
    stdin: Option<&str>,
) -> Result<String> {
    let mut child = Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(lab.merged_kubeconfig())
        .args(["--context", cluster])
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot run kubectl (is it installed?)")?;
    if let Some(text) = stdin {
        child
            .stdin
            .take()
            .context("kubectl stdin")?
            .write_all(text.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "kubectl --context {cluster} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Whether a pod is Running with every container ready.
pub fn pod_ready(p: &Pod) -> bool {
    let Some(s) = &p.status else { return false };
    s.phase.as_deref() == Some("Running")
        && s.conditions
            .iter()
            .flatten()
            .any(|c| c.type_ == "Ready" && c.status == "True")
}

/// Pods of `namespace` matching `selector`.
pub async fn pods(lab: &Lab, cluster: &str, namespace: &str, selector: &str) -> Result<Vec<Pod>> {
    let api: Api<Pod> = Api::namespaced(lab.client(cluster, Identity::Admin).await?, namespace);
    Ok(api
        .list(&ListParams::default().labels(selector))
        .await?
        .items)
}

/// Waits until `count` pods matching `selector` are ready (and no other
/// pod matches, e.g. one still terminating); returns them.
pub async fn wait_ready(
    lab: &Lab,
    cluster: &str,
    namespace: &str,
    selector: &str,
    count: usize,
    timeout: Duration,
) -> Result<Vec<Pod>> {
    let deadline = Instant::now() + timeout;
    loop {
        let all = pods(lab, cluster, namespace, selector).await?;
        let ready = all.iter().filter(|p| pod_ready(p)).count();
        if ready == count && all.len() == count {
            return Ok(all);
        }
        if Instant::now() > deadline {
            bail!("{cluster}: {ready}/{count} pods {selector} ready in {namespace} after {timeout:?} ({} exist)", all.len());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Waits until a pod has finished (Succeeded or Failed); returns its phase.
pub async fn wait_finished(
    lab: &Lab,
    cluster: &str,
    name: &str,
    timeout: Duration,
) -> Result<String> {
    let api: Api<Pod> = Api::namespaced(lab.client(cluster, Identity::Admin).await?, "default");
    let deadline = Instant::now() + timeout;
    loop {
        let phase = api
            .get(name)
            .await?
            .status
            .and_then(|s| s.phase)
            .unwrap_or_default();
        if phase == "Succeeded" || phase == "Failed" {
            return Ok(phase);
        }
        if Instant::now() > deadline {
            bail!("{cluster}: pod {name} still {phase} after {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The tools image `make image` built (same tag as sdn-tunnel's).
pub fn tools_image() -> String {
    format!("{TOOLS_IMAGE}:{}", env!("CARGO_PKG_VERSION"))
}

/// Two `lab serve` pods per cluster, `web-1` on node 1 and `web-2` on node
/// 2, and a Service `web` over them (TCP and UDP port 80 → 8080).
pub fn web_yaml(cluster: &str) -> String {
    let image = tools_image();
    let mut out = String::new();
    for n in 1..=2 {
        out.push_str(&format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: web-{n}\n  namespace: default\n  labels: {{app: web}}\n\
             spec:\n  nodeName: {cluster}-node-{n}\n  containers:\n  - name: web\n    image: {image}\n    \
             imagePullPolicy: Never\n    args: [serve, --name, {cluster}-web-{n}]\n    readinessProbe:\n      \
             tcpSocket: {{port: 8080}}\n      periodSeconds: 1\n---\n"
        ));
    }
    out.push_str(
        "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: default}\nspec:\n  selector: {app: web}\n  \
         ports:\n  - {name: tcp, port: 80, targetPort: 8080, protocol: TCP}\n  - {name: udp, port: 80, targetPort: 8080, protocol: UDP}\n",
    );
    out
}

/// A pod on `node` asking `target` over TCP every 100 ms for at most
/// `seconds`, until an outage is over (`lab probe --until-recovered`; its
/// log ends with `longest-gap-ms <n>`; it fails if traffic did not come back).
pub fn probe_yaml(name: &str, node: &str, target: &str, seconds: u64) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  nodeName: {node}\n  \
         restartPolicy: Never\n  containers:\n  - name: probe\n    image: {}\n    imagePullPolicy: Never\n    \
         args: [probe, --until-recovered, --interval-ms, \"100\", --duration-s, \"{seconds}\", \"{target}\"]\n",
        tools_image()
    )
}

/// A pod whose resolver is only the given server (`dnsPolicy: None` +
/// `dnsConfig`, the path the README documents), idling for `kubectl exec`.
pub fn dns_client_yaml(name: &str, nameserver: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: default, labels: {{app: {name}}}}}\nspec:\n  dnsPolicy: None\n  \
         dnsConfig:\n    nameservers: [\"{nameserver}\"]\n  containers:\n  - name: c\n    image: {}\n    \
         imagePullPolicy: Never\n    command: [/bin/sleep, \"100000\"]\n",
        tools_image()
    )
}

/// The longest gap a `lab probe` log reports, and its failed probes.
pub fn probe_result(log: &str) -> Result<(Duration, usize)> {
    let gap = log
        .lines()
        .find_map(|l| l.strip_prefix("longest-gap-ms "))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .with_context(|| format!("no longest-gap-ms in the probe's log:\n{log}"))?;
    let failed = log.lines().filter(|l| l.starts_with("fail ")).count();
    Ok((Duration::from_millis(gap), failed))
}

/// The addresses busybox `nslookup` printed for the name it was asked
/// (the server's own address, printed first, excluded).
pub fn nslookup_addresses(out: &str) -> Vec<String> {
    let mut seen_name = false;
    let mut addrs = Vec::new();
    for l in out.lines() {
        if l.starts_with("Name:") {
            seen_name = true;
        } else if let Some(a) = l.strip_prefix("Address:") {
            if seen_name {
                addrs.push(a.trim().to_string());
            }
        }
    }
    addrs.sort();
    addrs
}

/// What a failed kubelet e2e shows: per cluster the pods, the recent
/// events, and the logs (current and previous) of every pod not ready.
pub async fn diagnostics(lab: &Lab) -> String {
    let mut out = String::new();
    for c in &lab.config().clusters {
        let get = |args: &[&str]| kubectl(lab, c, args).unwrap_or_else(|e| format!("{e:#}\n"));
        out.push_str(&format!(
            "===== cluster {c}: pods\n{}",
            get(&["get", "pods", "-A", "-o", "wide"])
        ));
        out.push_str(&format!(
            "===== cluster {c}: events\n{}",
            get(&["get", "events", "-A", "--sort-by=.lastTimestamp"])
        ));
        let Ok(client) = lab.client(c, Identity::Admin).await else {
            continue;
        };
        let Ok(all) = Api::<Pod>::all(client).list(&ListParams::default()).await else {
            continue;
        };
        for p in all.items.iter().filter(|p| !pod_ready(p)) {
            let ns = p.metadata.namespace.clone().unwrap_or_default();
            let name = p.metadata.name.clone().unwrap_or_default();
            for prev in [false, true] {
                let mut args = vec!["logs", "-n", &ns, &name, "--all-containers", "--tail=40"];
                if prev {
                    args.push("--previous");
                }
                if let Ok(log) = kubectl(lab, c, &args) {
                    out.push_str(&format!(
                        "===== {c} {ns}/{name} logs{}:\n{log}",
                        if prev { " (previous container)" } else { "" }
                    ));
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_logs_and_nslookup_parse() {
        let log = "ok 0 a\nfail 100 TCP connect\nok 200 a\nlongest-gap-ms 210\n";
        assert_eq!(probe_result(log).unwrap(), (Duration::from_millis(210), 1));
        assert!(probe_result("ok 0 a\n").is_err());
        let ns = "Server:\t\t10.101.0.10\nAddress:\t10.101.0.10:53\n\nName:\tweb.default.svc.cluster.all\n\
                  Address: 10.102.0.5\nName:\tweb.default.svc.cluster.all\nAddress: 10.101.0.7\n";
        assert_eq!(nslookup_addresses(ns), ["10.101.0.7", "10.102.0.5"]);
    }
}
