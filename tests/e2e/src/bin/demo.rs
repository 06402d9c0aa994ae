//! `demo`: the main job of the README. Brings up the two-cluster lab
//! (`east`, `west`, two nodes each, real kube-apiservers), installs
//! sdn-tunnel into both with its Ansible playbook, starts the agents and the
//! DNS server exactly as the installed DaemonSet and Deployment describe
//! them (the lab has no kubelets), and shows traffic crossing: pod to pod,
//! to a remote ClusterIP, by name through `cluster.<name>` and
//! `cluster.all`, and `tunctl peers`. Leaves the lab running (`make down`
//! removes it); on failure it removes what it made.

use std::net::{Ipv4Addr, SocketAddr};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use sdn_tunnel_e2e::ansible::run_site_yml;
use sdn_tunnel_e2e::daemonset::{
    resolve_a, start_agents_from_daemonset, start_dns_from_deployment,
};
use sdn_tunnel_e2e::{wait_mesh_connected, workspace_binary};
use sdn_tunnel_lab::config::DEFAULT_NAME;
use sdn_tunnel_lab::server::{tcp_request, udp_request};
use sdn_tunnel_lab::{Lab, LabConfig, POD_SERVER_PORT};

fn main() -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("demo: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(demo()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("demo: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn step(n: u8, what: &str) {
    println!("\n== {n}. {what}");
}

async fn demo() -> Result<()> {
    let started = Instant::now();
    step(
        1,
        "the lab: two clusters on real kube-apiservers, nodes and pods in network namespaces",
    );
    let mut lab = Lab::up(LabConfig::new(DEFAULT_NAME)).await?;
    for c in lab.config().plan() {
        println!(
            "{}: apiserver {}, pods {}, services {}",
            c.name,
            c.apiserver_url(),
            c.pod_cidr,
            c.service_cidr
        );
    }

    step(
        2,
        "install sdn-tunnel into both clusters with ansible/site.yml",
    );
    let tunctl = workspace_binary("tunctl")?;
    let (inventory, run) = run_site_yml(&lab, &tunctl)?;
    if !run.success {
        bail!("the playbook failed:\n{}", run.output());
    }
    println!(
        "site.yml done in {:.1} s, changed per cluster: {:?} (inventory: {})",
        run.elapsed.as_secs_f64(),
        run.recap
            .iter()
            .map(|(h, r)| (h.as_str(), r.changed))
            .collect::<Vec<_>>(),
        inventory.display()
    );

    step(
        3,
        "agents and DNS started as the installed DaemonSet and Deployment say (the lab's kubelet)",
    );
    let t0 = Instant::now();
    let agents = start_agents_from_daemonset(&mut lab).await?;
    let dns = start_dns_from_deployment(&mut lab).await?;
    let took = wait_mesh_connected(&lab, Duration::from_secs(90)).await?;
    println!(
        "{} agents, {} DNS servers; full mesh connected {:.1} s after start ({:.1} s waiting)",
        agents.len(),
        dns.len(),
        t0.elapsed().as_secs_f64(),
        took.as_secs_f64()
    );

    step(
        4,
        "workloads: two pods per cluster and a Service `web` in namespace `demo` in each",
    );
    for c in ["east", "west"] {
        lab.add_pod(c, 1, "web-1")?;
        lab.add_pod(c, 2, "web-2")?;
    }
    let mut cluster_ips = Vec::new();
    for c in ["east", "west"] {
        let pods = [lab.pod(c, "web-1")?.clone(), lab.pod(c, "web-2")?.clone()];
        let svc = lab
            .add_service(c, "demo", "web", 80, &[&pods[0], &pods[1]])
            .await?;
        let ip = svc
            .spec
            .and_then(|s| s.cluster_ip)
            .context("no ClusterIP")?;
        println!(
            "{c}: demo/web ClusterIP {ip}:80 -> {} {}, {} {}",
            pods[0].name, pods[0].ip, pods[1].name, pods[1].ip
        );
        cluster_ips.push((c, ip));
    }

    step(5, "traffic from east/web-1 into west");
    let from = lab.pod("east", "web-1")?.clone();
    let t = Duration::from_secs(3);
    for to in ["web-1", "web-2"] {
        let dst = lab.pod("west", to)?.clone();
        let addr = SocketAddr::from((dst.ip, POD_SERVER_PORT));
        println!(
            "TCP {addr} (west/{to}): answered {:?}",
            tcp_request(&from.netns, addr, t)?
        );
        println!(
            "UDP {addr} (west/{to}): answered {:?}",
            udp_request(&from.netns, addr, t)?
        );
    }
    let west_ip: Ipv4Addr = cluster_ips
        .iter()
        .find(|(c, _)| *c == "west")
        .context("west")?
        .1
        .parse()?;
    let addr = SocketAddr::from((west_ip, 80));
    // The agents learn the new Service through their watches of west.
    let deadline = Instant::now() + Duration::from_secs(20);
    while tcp_request(&from.netns, addr, Duration::from_millis(300)).is_err() {
        if Instant::now() > deadline {
            bail!("west's ClusterIP {addr} not proxied after 20 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for _ in 0..4 {
        println!(
            "TCP {addr} (west's ClusterIP, DNATed in the agent pod): answered {:?}",
            tcp_request(&from.netns, addr, t)?
        );
    }

    step(
        6,
        "names: the DNS server of east answers cluster.<name> and the merged cluster.all",
    );
    let server_pod = dns
        .iter()
        .find(|(_, p)| p.cluster == "east")
        .context("no DNS in east")?
        .1
        .clone();
    let server = SocketAddr::from((server_pod.ip, 53));
    for name in [
        "web.demo.svc.cluster.west",
        "web.demo.svc.cluster.east",
        "web.demo.svc.cluster.all",
        "nope.demo.svc.cluster.all",
    ] {
        let (rcode, addrs) = resolve_a(&from.netns, server, name)?;
        let rcode = if rcode == 3 {
            "NXDOMAIN".to_string()
        } else {
            format!("rcode {rcode}")
        };
        println!("{name}: {rcode} {addrs:?}");
    }

    step(7, "tunctl peers, through both apiservers");
    let out = std::process::Command::new(&tunctl)
        .arg("--kubeconfig")
        .arg(lab.merged_kubeconfig())
        .args(["--all-contexts", "peers"])
        .output()?;
    print!("{}", String::from_utf8_lossy(&out.stdout));
    eprint!("{}", String::from_utf8_lossy(&out.stderr));

    let dir = lab.config().dir.clone();
    lab.detach();
    println!(
        "\nDemo done in {:.0} s. The lab is still up:\n  \
         target/debug/tunctl --kubeconfig {kc} --all-contexts peers\n  \
         kubectl --kubeconfig {kc} --context west get tunnelpeers -n sdn-tunnel\n  \
         ip netns exec {DEFAULT_NAME}-east-web-1 ...   (a shell in a pod: add `bash`)\n  \
         logs: {dir}/<cluster>/pod-*.log\nRemove it with: make down",
        started.elapsed().as_secs_f64(),
        kc = dir.join("kubeconfig").display(),
        dir = dir.display(),
    );
    Ok(())
}
