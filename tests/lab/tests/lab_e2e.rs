//! The lab on real kube-apiservers: TLS, authentication and RBAC, Node
//! objects, Services and EndpointSlices through kube-rs, pod routing inside
//! a cluster and isolation between clusters, and a teardown that leaves
//! nothing behind. Needs root and the apiserver build
//! (`bash tests/lab/build-apiserver.sh`); `make test` provides both.

// Test code: a panic with its message is how a check reports failure.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Secret};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{DeleteParams, ListParams, PostParams};
use kube::runtime::watcher;
use kube::{Api, Client, Config};
use sdn_tunnel_lab::server::{tcp_request, udp_request};
use sdn_tunnel_lab::{sys, teardown, Identity, Lab, LabConfig, POD_SERVER_PORT};

fn config(name: &str, underlay_octet: u8) -> LabConfig {
    let mut cfg = LabConfig::new(name);
    cfg.underlay_octet = underlay_octet;
    cfg
}

fn api_status(err: &kube::Error) -> Option<u16> {
    match err {
        kube::Error::Api(s) => Some(s.code),
        _ => None,
    }
}

/// Everything the test made must be gone: namespaces, the host link and
/// its route, the processes, the state directory.
fn assert_nothing_left(cfg: &LabConfig, procs: &[sys::ProcRecord]) {
    let prefix = format!("{}-", cfg.name);
    let ns: Vec<String> = sys::netns_list()
        .into_iter()
        .filter(|n| n.starts_with(&prefix))
        .collect();
    assert!(ns.is_empty(), "namespaces left behind: {ns:?}");
    assert!(!sys::link_exists(&cfg.host_link()), "host link left behind");
    let routes = sys::ip(&["route", "show"]).unwrap();
    assert!(
        !routes.contains(&cfg.underlay().to_string()),
        "underlay route left behind:\n{routes}"
    );
    for p in procs {
        assert!(!p.alive(), "{} (pid {}) still runs", p.what, p.pid);
    }
    assert!(
        !cfg.dir.exists(),
        "state directory {} left behind",
        cfg.dir.display()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_clusters_on_real_apiservers() {
    let cfg = config("e2elab", 98);
    let started = Instant::now();
    let mut lab = Lab::up(cfg.clone()).await.expect("lab up");
    println!("lab up: {:.1} s", started.elapsed().as_secs_f64());
    let east = lab.cluster("east").unwrap();
    let west = lab.cluster("west").unwrap();

    // --- TLS: the apiserver's certificate only verifies against its own CA.
    let mut wrong_ca = Config::from_custom_kubeconfig(
        kube::config::Kubeconfig::read_from(lab.kubeconfig("east", Identity::Admin)).unwrap(),
        &Default::default(),
    )
    .await
    .unwrap();
    wrong_ca.cluster_url = west.apiserver_url().parse().unwrap();
    let err = Client::try_from(wrong_ca)
        .unwrap()
        .apiserver_version()
        .await
        .unwrap_err();
    assert!(
        api_status(&err).is_none(),
        "a foreign CA must fail the TLS handshake, got {err}"
    );

    // --- Authentication: anonymous requests are refused.
    let mut anonymous = Config::new(east.apiserver_url().parse().unwrap());
    anonymous.accept_invalid_certs = true;
    let nodes_anon: Api<Node> = Api::all(Client::try_from(anonymous).unwrap());
    let err = nodes_anon.list(&ListParams::default()).await.unwrap_err();
    assert!(
        matches!(api_status(&err), Some(401 | 403)),
        "anonymous list nodes: {err}"
    );

    for cluster in [&east, &west] {
        let admin = lab.client(&cluster.name, Identity::Admin).await.unwrap();
        let agent = lab.client(&cluster.name, Identity::Agent).await.unwrap();

        // --- Nodes with their pod CIDRs and addresses.
        let nodes = Api::<Node>::all(admin.clone())
            .list(&ListParams::default())
            .await
            .unwrap();
        let mut seen: Vec<(String, String, String)> = nodes
            .items
            .iter()
            .map(|n| {
                let spec = n.spec.clone().unwrap();
                let ip = n
                    .status
                    .clone()
                    .unwrap()
                    .addresses
                    .unwrap()
                    .into_iter()
                    .find(|a| a.type_ == "InternalIP")
                    .unwrap();
                (
                    n.metadata.name.clone().unwrap(),
                    spec.pod_cidr.unwrap(),
                    ip.address,
                )
            })
            .collect();
        seen.sort();
        let want: Vec<(String, String, String)> = cluster
            .nodes
            .iter()
            .map(|n| {
                (
                    n.name.clone(),
                    n.pod_cidr.to_string(),
                    n.underlay_ip.to_string(),
                )
            })
            .collect();
        assert_eq!(seen, want, "Node objects of {}", cluster.name);

        // --- RBAC: the agent identity reads what it is granted, nothing more.
        Api::<Node>::all(agent.clone())
            .list(&ListParams::default())
            .await
            .expect("agent may list nodes");
        Api::<EndpointSlice>::all(agent.clone())
            .list(&ListParams::default())
            .await
            .expect("agent may list slices");
        let secrets: Api<Secret> = Api::namespaced(agent.clone(), "default");
        let err = secrets.list(&ListParams::default()).await.unwrap_err();
        assert_eq!(api_status(&err), Some(403), "agent list secrets: {err}");
        let err = secrets
            .create(&PostParams::default(), &Secret::default())
            .await
            .unwrap_err();
        assert_eq!(api_status(&err), Some(403), "agent create secret: {err}");
        let err = Api::<Node>::all(agent.clone())
            .delete(&cluster.nodes[0].name, &DeleteParams::default())
            .await
            .unwrap_err();
        assert_eq!(api_status(&err), Some(403), "agent delete node: {err}");
    }

    // --- Pods: one per node in each cluster, each running the lab server.
    for c in ["east", "west"] {
        lab.add_pod(c, 1, "a").unwrap();
        lab.add_pod(c, 2, "b").unwrap();
        lab.add_pod(c, 2, "c").unwrap();
    }
    let pod = |c: &str, n: &str| lab.pod(c, n).unwrap().clone();
    let (ea, eb, ec, wa, wb) = (
        pod("east", "a"),
        pod("east", "b"),
        pod("east", "c"),
        pod("west", "a"),
        pod("west", "b"),
    );
    assert!(east.nodes[1].pod_cidr.contains(&eb.ip) && east.nodes[0].pod_cidr.contains(&ea.ip));
    let t = Duration::from_secs(3);
    let at = |p: &sdn_tunnel_lab::Pod| SocketAddr::from((p.ip, POD_SERVER_PORT));

    // --- Service + EndpointSlice (discovery.k8s.io/v1) round-trip through kube-rs, and a watch on them.
    let admin = lab.client("east", Identity::Admin).await.unwrap();
    let slices: Api<EndpointSlice> = Api::namespaced(admin.clone(), "shop");
    let watch = tokio::spawn({
        let slices = slices.clone();
        async move {
            let mut events = watcher(slices, watcher::Config::default()).boxed();
            while let Some(ev) = events.next().await {
                if let Ok(watcher::Event::Apply(s) | watcher::Event::InitApply(s)) = ev {
                    if s.metadata.name.as_deref() == Some("cart-lab") {
                        return s;
                    }
                }
            }
            panic!("watch ended");
        }
    });
    let svc = lab
        .add_service("east", "shop", "cart", 80, &[&eb, &ec])
        .await
        .unwrap();
    let cluster_ip: std::net::Ipv4Addr = svc
        .spec
        .as_ref()
        .unwrap()
        .cluster_ip
        .clone()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        east.service_cidr.contains(&cluster_ip),
        "ClusterIP {cluster_ip} outside {}",
        east.service_cidr
    );
    let listed = slices
        .list(&ListParams::default().labels("kubernetes.io/service-name=cart"))
        .await
        .unwrap();
    assert_eq!(listed.items.len(), 1);
    let slice = &listed.items[0];
    let mut addrs: Vec<String> = slice
        .endpoints
        .iter()
        .flat_map(|e| e.addresses.clone())
        .collect();
    addrs.sort();
    let mut want = vec![eb.ip.to_string(), ec.ip.to_string()];
    want.sort();
    assert_eq!(addrs, want);
    assert!(slice
        .endpoints
        .iter()
        .all(|e| e.conditions.as_ref().and_then(|c| c.ready) == Some(true)));
    let ports: Vec<(Option<String>, Option<i32>)> = slice
        .ports
        .clone()
        .unwrap()
        .into_iter()
        .map(|p| (p.name, p.port))
        .collect();
    assert!(
        ports.contains(&(Some("tcp".into()), Some(i32::from(POD_SERVER_PORT)))),
        "{ports:?}"
    );
    let watched = tokio::time::timeout(Duration::from_secs(20), watch)
        .await
        .expect("watch event")
        .unwrap();
    assert_eq!(watched.address_type, "IPv4");
    let agent = lab.client("east", Identity::Agent).await.unwrap();
    let err = Api::<EndpointSlice>::namespaced(agent, "shop")
        .delete("cart-lab", &DeleteParams::default())
        .await
        .unwrap_err();
    assert_eq!(
        api_status(&err),
        Some(403),
        "agent delete endpointslice: {err}"
    );

    // --- Pod to pod inside a cluster: across nodes and on one node, TCP and UDP.
    assert_eq!(
        tcp_request(&ea.netns, at(&eb), t).unwrap(),
        "b",
        "east a -> b across nodes"
    );
    assert_eq!(
        tcp_request(&eb.netns, at(&ea), t).unwrap(),
        "a",
        "east b -> a across nodes"
    );
    assert_eq!(
        tcp_request(&eb.netns, at(&ec), t).unwrap(),
        "c",
        "east b -> c on one node"
    );
    assert_eq!(
        udp_request(&ea.netns, at(&ec), t).unwrap(),
        "c",
        "east a -> c UDP"
    );
    assert_eq!(
        tcp_request(&wa.netns, at(&wb), t).unwrap(),
        "b",
        "west a -> b across nodes"
    );
    // ... and pods reach their own cluster's apiserver over the underlay.
    let api = SocketAddr::from((east.apiserver_ip, 6443));
    sys::in_netns(&ea.netns, move || {
        Ok(std::net::TcpStream::connect_timeout(
            &api,
            Duration::from_secs(3),
        )?)
    })
    .unwrap();

    // --- No pod of east reaches west, nor the other way round: that is the tunnel's job.
    for (from, to) in [(&ea, &wa), (&ea, &wb), (&eb, &wb), (&wa, &ea), (&wb, &ec)] {
        let r = tcp_request(&from.netns, at(to), Duration::from_secs(1));
        assert!(
            r.is_err(),
            "{}/{} reached {}/{}: {r:?}",
            from.cluster,
            from.name,
            to.cluster,
            to.name
        );
    }

    for c in ["east", "west"] {
        let rss = lab.apiserver_rss_kib(c).unwrap();
        println!("kube-apiserver {c}: RSS {} MiB", rss / 1024);
    }

    // --- Teardown leaves nothing behind.
    let mut procs: Vec<sys::ProcRecord> = lab.state().control_plane.clone();
    procs.extend(lab.state().pods.iter().filter_map(|p| p.server.clone()));
    assert!(procs.iter().all(sys::ProcRecord::alive));
    let started = Instant::now();
    let report = lab.down().unwrap();
    println!("lab down: {:.1} s", started.elapsed().as_secs_f64());
    assert!(report.leftovers.is_empty(), "{:?}", report.leftovers);
    assert_eq!(
        report.namespaces_removed.len(),
        1 + 2 * (1 + 2) + 6,
        "underlay, 2 x (control plane + 2 nodes), 6 pods"
    );
    assert_nothing_left(&cfg, &procs);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_up_refuses_a_running_lab_and_cleans_a_dead_one() {
    let mut cfg = config("e2eleft", 97);
    cfg.clusters = vec!["solo".into()];
    cfg.nodes_per_cluster = 1;

    let first = Lab::up(cfg.clone()).await.expect("first up");
    let err = Lab::up(cfg.clone()).await.unwrap_err();
    assert!(err.to_string().contains("already up"), "{err:#}");
    // The refused second `up` changed nothing: the first lab still answers.
    let client = first.client("solo", Identity::Admin).await.unwrap();
    client
        .apiserver_version()
        .await
        .expect("first lab still serves");

    // Simulate a crash: the processes die, the namespaces, link and state stay.
    let procs = first.state().control_plane.clone();
    first.detach();
    for p in &procs {
        p.stop(Duration::from_secs(10));
    }
    sys::ip(&["netns", "add", &format!("{}-stray", cfg.name)]).unwrap();
    assert!(sys::netns_exists(&cfg.underlay_netns()));

    let second = Lab::up(cfg.clone())
        .await
        .expect("up over leftovers cleans them");
    assert!(
        !sys::netns_exists(&format!("{}-stray", cfg.name)),
        "stray namespace removed"
    );
    let client = second.client("solo", Identity::Admin).await.unwrap();
    client.apiserver_version().await.expect("new lab serves");
    let procs2 = second.state().control_plane.clone();
    drop(second); // the guard tears down
    assert_nothing_left(&cfg, &procs2);
    // A teardown of nothing is fine and reports nothing.
    let again = teardown(&cfg).unwrap();
    assert!(again.namespaces_removed.is_empty() && again.leftovers.is_empty());
}
