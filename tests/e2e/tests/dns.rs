//! `tunnel-agent dns` on the lab: two clusters on real apiservers, agents
//! as the DaemonSet runs them, the DNS server in a pod of `east` with its
//! own read-only identity (`tunnel-dns`), queried over UDP from another
//! pod of `east`. Checks the cluster zones (and that the resolved west
//! ClusterIP leads, through the agents' proxy, to west's pod), the merged
//! zone, NXDOMAIN, forwarding (to a fake upstream inside the lab) and
//! garbage; then stops `west`'s agents and measures how long `west` takes
//! to leave `cluster.all`, and to come back. Needs root, the apiserver
//! build and `cargo build --workspace --bins`.

// Test code: a panic with its message is how a check reports failure.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::api::discovery::v1::{EndpointPort, EndpointSlice};
use kube::api::{ObjectMeta, Patch, PatchParams};
use kube::Api;
use sdn_tunnel_e2e::dns_client::{decode_answer, encode_query, skip_name, NOERROR, NXDOMAIN};
use sdn_tunnel_e2e::{
    connected_mesh, service_account_kubeconfig, workspace_binary, FIELD_MANAGER, NAMESPACE,
};
use sdn_tunnel_lab::server::tcp_request;
use sdn_tunnel_lab::sys::in_netns;
use sdn_tunnel_lab::{ready_endpoint, Identity, Lab, LabConfig, Pod};

/// Sends `bytes` to `server` from inside `netns`; the answer, if any within 1 s.
fn udp_exchange(netns: &str, server: SocketAddr, bytes: Vec<u8>) -> Result<Option<Vec<u8>>> {
    in_netns(netns, move || {
        let sock = UdpSocket::bind("0.0.0.0:0")?;
        sock.set_read_timeout(Some(Duration::from_secs(1)))?;
        sock.send_to(&bytes, server)?;
        let mut buf = [0u8; 4096];
        match sock.recv(&mut buf) {
            Ok(n) => Ok(Some(buf[..n].to_vec())),
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                Ok(None)
            }
            Err(e) => Err(e.into()),
        }
    })
}

/// Resolves `name` (A) through `server` from `netns`: rcode and addresses.
fn resolve(netns: &str, server: SocketAddr, name: &str) -> Result<(u8, BTreeSet<Ipv4Addr>)> {
    let id = u16::try_from(Instant::now().elapsed().subsec_nanos() % 65_000).unwrap_or(7);
    for _ in 0..3 {
        if let Some(answer) = udp_exchange(netns, server, encode_query(id, name)?)? {
            let (rid, rcode, ips) = decode_answer(&answer)?;
            if rid != id {
                bail!("answer id {rid}, query id {id}");
            }
            return Ok((rcode, ips));
        }
    }
    bail!("no answer from {server} for {name}")
}

/// A fake upstream DNS server inside `netns` (port 53 of the pod): answers
/// every A query with 192.0.2.53, until the returned flag is cleared.
fn fake_upstream(netns: String) -> Arc<AtomicBool> {
    let running = Arc::new(AtomicBool::new(true));
    let flag = running.clone();
    std::thread::spawn(move || {
        let _ = in_netns(&netns, move || {
            let sock = UdpSocket::bind("0.0.0.0:53")?;
            sock.set_read_timeout(Some(Duration::from_millis(200)))?;
            let mut buf = [0u8; 1500];
            while flag.load(Ordering::Relaxed) {
                let Ok((n, from)) = sock.recv_from(&mut buf) else {
                    continue;
                };
                if n < 12 {
                    continue;
                }
                // Echo the question (without any EDNS record), flip QR/RA,
                // one answer pointing at the question's name.
                let Ok(end) = skip_name(&buf[..n], 12) else {
                    continue;
                };
                let Some(question) = buf.get(..end + 4) else {
                    continue;
                };
                let mut r = question.to_vec();
                r[2] |= 0x80;
                r[3] = 0x80;
                r[6..8].copy_from_slice(&1u16.to_be_bytes());
                r[10..12].copy_from_slice(&0u16.to_be_bytes());
                r.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 30, 0, 4, 192, 0, 2, 53]);
                let _ = sock.send_to(&r, from);
            }
            Ok(())
        });
    });
    running
}

/// A headless Service `name` in `namespace` with a ready endpoint per pod
/// (named port `sql`), its EndpointSlice written as the controller would.
async fn add_headless(lab: &Lab, cluster: &str, namespace: &str, name: &str, pods: &[&Pod]) {
    let client = lab.client(cluster, Identity::Admin).await.unwrap();
    let pp = PatchParams::apply(FIELD_MANAGER).force();
    let svc = Service {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(namespace.into()),
            ..Default::default()
        },
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".into()),
            ports: Some(vec![ServicePort {
                name: Some("sql".into()),
                port: 5432,
                protocol: Some("TCP".into()),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    };
    Api::<Service>::namespaced(client.clone(), namespace)
        .patch(name, &pp, &Patch::Apply(&svc))
        .await
        .unwrap();
    let slice = EndpointSlice {
        metadata: ObjectMeta {
            name: Some(format!("{name}-e2e")),
            namespace: Some(namespace.into()),
            labels: Some([("kubernetes.io/service-name".to_string(), name.to_string())].into()),
            ..Default::default()
        },
        address_type: "IPv4".into(),
        endpoints: pods.iter().map(|p| ready_endpoint(p)).collect(),
        ports: Some(vec![EndpointPort {
            name: Some("sql".into()),
            port: Some(5432),
            protocol: Some("TCP".into()),
            ..Default::default()
        }]),
    };
    Api::<EndpointSlice>::namespaced(client, namespace)
        .patch(&format!("{name}-e2e"), &pp, &Patch::Apply(&slice))
        .await
        .unwrap();
}

fn cluster_ip(svc: &Service) -> IpAddr {
    svc.spec
        .as_ref()
        .and_then(|s| s.cluster_ip.as_deref())
        .unwrap()
        .parse()
        .unwrap()
}

/// Polls `name` until `pred` holds on its addresses; how long it took.
fn wait_for(
    netns: &str,
    server: SocketAddr,
    name: &str,
    timeout: Duration,
    pred: impl Fn(&BTreeSet<IpAddr>) -> bool,
) -> Result<Duration> {
    let started = Instant::now();
    let mut last = None;
    while started.elapsed() < timeout {
        match resolve(netns, server, name) {
            Ok((_, ips)) => {
                let ips: BTreeSet<IpAddr> = ips.into_iter().map(IpAddr::V4).collect();
                if pred(&ips) {
                    return Ok(started.elapsed());
                }
                last = Some(format!("{ips:?}"));
            }
            Err(e) => last = Some(format!("{e:#}")),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("{name}: condition not met after {timeout:?}; last: {last:?}")
}

/// Waits (20 s at most) until a TCP request to `addr` from `netns` is
/// answered by pod `who`; panics with `what` and the last answer otherwise.
fn wait_answered_by(netns: &str, addr: SocketAddr, who: &str, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match tcp_request(netns, addr, Duration::from_secs(2)) {
            Ok(answer) if answer == who => return,
            other if Instant::now() > deadline => {
                panic!("{what}: {addr} answered {other:?}, not {who}")
            }
            _ => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_serves_cluster_zones_and_follows_the_tunnel() {
    let mut cfg = LabConfig::new("e2edns");
    cfg.underlay_octet = 94;
    let (mut lab, _, agents) = connected_mesh(cfg, Duration::from_secs(90)).await.unwrap();

    // Services: `web` in both clusters, `only-west` in west, headless `db` in west.
    let east_web = lab.add_pod("east", 1, "east-web").unwrap();
    let west_web = lab.add_pod("west", 1, "west-web").unwrap();
    let west_db = lab.add_pod("west", 2, "db-0").unwrap();
    let east_svc = lab
        .add_service("east", "demo", "web", 80, &[&east_web])
        .await
        .unwrap();
    let west_svc = lab
        .add_service("west", "demo", "web", 80, &[&west_web])
        .await
        .unwrap();
    let only_west = lab
        .add_service("west", "demo", "only-west", 80, &[&west_web])
        .await
        .unwrap();
    add_headless(&lab, "west", "demo", "db", &[&west_db]).await;
    let (east_ip, west_ip) = (cluster_ip(&east_svc), cluster_ip(&west_svc));

    // A fake upstream in an east pod, and the DNS server in another.
    let upstream = lab.add_pod("east", 1, "upstream").unwrap();
    let upstream_running = fake_upstream(upstream.netns.clone());
    // A snapshot of the binary: other builds sharing the target directory
    // may replace it while the lab runs.
    let agent = lab.cluster_dir("east").join("tunnel-agent-dns");
    std::fs::copy(workspace_binary("tunnel-agent").unwrap(), &agent).unwrap();
    let help = std::process::Command::new(&agent)
        .args(["dns", "--help"])
        .output()
        .unwrap();
    assert!(
        help.status.success(),
        "{} has no `dns` subcommand: run `cargo build --workspace --bins`",
        agent.display()
    );
    let args: Vec<String> = [
        "dns",
        "--listen",
        "0.0.0.0:53",
        "--status-max-age",
        "3s",
        "--upstream",
        &format!("{}:53", upstream.ip),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    // The DNS server's own read-only identity (deploy/rbac.yaml: tunnel-dns).
    let dns_kubeconfig = lab.cluster_dir("east").join("tunnel-dns.kubeconfig");
    service_account_kubeconfig(&lab, "east", "tunnel-dns", &dns_kubeconfig)
        .await
        .unwrap();
    let env = vec![
        ("POD_NAMESPACE".to_string(), NAMESPACE.to_string()),
        (
            "KUBECONFIG".to_string(),
            dns_kubeconfig.display().to_string(),
        ),
        (
            "SDN_TUNNEL_METRICS_ADDR".to_string(),
            "0.0.0.0:9587".to_string(),
        ),
        (
            "RUST_LOG".to_string(),
            "info,sdn_tunnel_agent=debug".to_string(),
        ),
    ];
    let dns = lab
        .add_pod_running("east", 2, "dns", &agent, &args, &env)
        .unwrap();
    let server = SocketAddr::from((dns.ip, 53));
    let client = lab.add_pod("east", 1, "client").unwrap();
    let ns = client.netns.clone();
    let dns_log_path = lab.pod_log("east", "dns");
    let dns_log = || std::fs::read_to_string(&dns_log_path).unwrap_or_default();

    // The cluster zones, then the merged zone with both clusters.
    let west_name = "web.demo.svc.cluster.west";
    let ready = wait_for(&ns, server, west_name, Duration::from_secs(60), |ips| {
        ips.contains(&west_ip)
    });
    if let Err(e) = ready {
        panic!("{e:#}\n--- dns log:\n{}", dns_log());
    }
    let (rcode, ips) = resolve(&ns, server, west_name).unwrap();
    assert_eq!((rcode, ips.len()), (NOERROR, 1));
    // The name leads somewhere: through the agents' proxy to west's pod.
    let resolved = SocketAddr::from((ips.into_iter().next().unwrap(), 80));
    wait_answered_by(
        &ns,
        resolved,
        "west-web",
        &format!("{west_name} ({resolved})"),
    );
    let (_, ips) = resolve(&ns, server, "web.demo.svc.cluster.east").unwrap();
    assert_eq!(
        ips.into_iter().map(IpAddr::V4).collect::<Vec<_>>(),
        [east_ip]
    );
    let all = "web.demo.svc.cluster.all";
    let both = BTreeSet::from([east_ip, west_ip]);
    let waited = wait_for(&ns, server, all, Duration::from_secs(30), |ips| {
        *ips == both
    });
    if let Err(e) = waited {
        panic!("{e:#}\n--- dns log:\n{}", dns_log());
    }
    let (_, ips) = resolve(&ns, server, "only-west.demo.svc.cluster.all").unwrap();
    assert_eq!(
        ips.into_iter().map(IpAddr::V4).collect::<Vec<_>>(),
        [cluster_ip(&only_west)]
    );
    let (_, ips) = resolve(&ns, server, "db.demo.svc.cluster.west").unwrap();
    assert_eq!(ips.into_iter().collect::<Vec<_>>(), [west_db.ip]);

    // Unknown names in our zones: NXDOMAIN; other names: the upstream's answer.
    for name in [
        "nope.demo.svc.cluster.west",
        "web.nowhere.svc.cluster.all",
        "web.demo.svc.cluster.north",
    ] {
        let (rcode, ips) = resolve(&ns, server, name).unwrap();
        if name.ends_with("north") {
            // Not one of our zones: forwarded.
            assert_eq!(rcode, NOERROR, "{name}");
            assert_eq!(
                ips,
                BTreeSet::from([Ipv4Addr::new(192, 0, 2, 53)]),
                "{name}"
            );
        } else {
            assert_eq!(rcode, NXDOMAIN, "{name}");
            assert!(ips.is_empty(), "{name}");
        }
    }
    let (rcode, ips) = resolve(&ns, server, "example.org").unwrap();
    assert_eq!(
        (rcode, ips),
        (NOERROR, BTreeSet::from([Ipv4Addr::new(192, 0, 2, 53)]))
    );

    // Garbage does not stop the server.
    for junk in [vec![1u8, 2, 3], vec![0xff; 40], {
        let mut v = encode_query(9, "web.demo.svc.cluster.west").unwrap();
        v.truncate(20);
        v
    }] {
        let _ = udp_exchange(&ns, server, junk).unwrap();
    }
    let (rcode, ips) = resolve(&ns, server, west_name).unwrap();
    assert_eq!((rcode, ips.len()), (NOERROR, 1));

    // Stop west's agents: west leaves cluster.all (its own zone stays).
    let west_agents: Vec<String> = agents
        .iter()
        .filter(|a| a.cluster == "west")
        .map(|a| a.name.clone())
        .collect();
    let stopped = Instant::now();
    for a in &west_agents {
        lab.stop_pod("west", a).unwrap();
    }
    let stop_took = stopped.elapsed();
    let left = wait_for(&ns, server, all, Duration::from_secs(60), |ips| {
        *ips == BTreeSet::from([east_ip])
    });
    let left = match left {
        Ok(_) => stopped.elapsed(),
        Err(e) => panic!("{e:#}\n--- dns log:\n{}", dns_log()),
    };
    println!(
        "FIGURE dns_down_cluster_leaves_cluster_all = {:.2} s (agents stopped in {:.2} s)",
        left.as_secs_f64(),
        stop_took.as_secs_f64()
    );
    let (_, ips) = resolve(&ns, server, west_name).unwrap();
    assert_eq!(ips.len(), 1, "cluster.west keeps answering");
    let (rcode, _) = resolve(&ns, server, "only-west.demo.svc.cluster.all").unwrap();
    assert_eq!(rcode, NXDOMAIN);

    // Bring them back: west returns.
    let restarted = Instant::now();
    for a in &west_agents {
        lab.restart_pod("west", a).unwrap();
    }
    let back = wait_for(&ns, server, all, Duration::from_secs(90), |ips| {
        *ips == both
    });
    if let Err(e) = back {
        panic!("{e:#}\n--- dns log:\n{}", dns_log());
    }
    println!(
        "FIGURE dns_cluster_returns_to_cluster_all = {:.2} s",
        restarted.elapsed().as_secs_f64()
    );

    // Import by namespace labels: east takes from west only the services of
    // namespaces labelled `sdn-e2e/export=yes` (the Namespace watch through
    // west's remote-reader identity). `demo` has no such label: its names
    // leave east's DNS and its ClusterIP leaves the proxy; labelling `demo`
    // in west brings both back.
    let east_admin = lab.client("east", Identity::Admin).await.unwrap();
    let selector = serde_json::json!({"spec": {"serviceSelector": {
        "namespaceSelector": {"matchLabels": {"sdn-e2e/export": "yes"}}}}});
    Api::<sdn_tunnel_api::TunnelCluster>::all(east_admin.clone())
        .patch("west", &PatchParams::default(), &Patch::Merge(&selector))
        .await
        .unwrap();
    if let Err(e) = wait_for(&ns, server, west_name, Duration::from_secs(30), |ips| {
        ips.is_empty()
    }) {
        panic!("{e:#}\n--- dns log:\n{}", dns_log());
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while tcp_request(&ns, resolved, Duration::from_secs(1)).is_ok() {
        assert!(
            Instant::now() < deadline,
            "{resolved} still proxied after west's demo stopped being imported"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let west_admin = lab.client("west", Identity::Admin).await.unwrap();
    let label = serde_json::json!({"metadata": {"labels": {"sdn-e2e/export": "yes"}}});
    Api::<k8s_openapi::api::core::v1::Namespace>::all(west_admin)
        .patch("demo", &PatchParams::default(), &Patch::Merge(&label))
        .await
        .unwrap();
    let labelled = Instant::now();
    if let Err(e) = wait_for(&ns, server, west_name, Duration::from_secs(30), |ips| {
        ips.contains(&west_ip)
    }) {
        panic!("{e:#}\n--- dns log:\n{}", dns_log());
    }
    wait_answered_by(&ns, resolved, "west-web", "after demo was labelled");
    println!(
        "namespace label to name and ClusterIP back: {:.2} s",
        labelled.elapsed().as_secs_f64()
    );

    upstream_running.store(false, Ordering::Relaxed);
    // Hundreds of queries, and no per-query log line at the default level.
    let log = dns_log();
    assert!(
        !log.contains("lookup_options") && !log.contains("request:"),
        "per-query lines in the DNS log:\n{log}"
    );
    println!("DNS log: {} lines", log.lines().count());
    for line in log.lines().take(30) {
        println!("  {line}");
    }
    assert!(
        left < Duration::from_secs(10),
        "west took {left:?} to leave cluster.all (goal < 5 s)"
    );
}
