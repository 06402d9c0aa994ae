//! The installer, for real: `ansible/site.yml` against the two lab
//! apiservers from an inventory the lab writes; a bad inventory stopped by
//! the preflight with nothing changed; the objects checked; RBAC checked
//! with real tokens; agents started exactly as the installed DaemonSet
//! describes them bringing up the mesh; a second run with `changed=0`;
//! `ansible/uninstall.yml` leaving nothing. Needs root, Debian's ansible
//! and python3-kubernetes, and `cargo build --workspace --bins` (`make test`
//! does all of it).

// Test code: a panic with its message is how a check reports failure.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{ListParams, PostParams};
use kube::Api;
use sdn_tunnel_e2e::ansible::{run_playbook, PlaybookRun};
use sdn_tunnel_e2e::checks::{
    check_inventory_installed, check_inventory_rbac, leftovers, read_inventory,
};
use sdn_tunnel_e2e::daemonset::{
    http_status, resolve_a, start_agents_from_daemonset, start_dns_from_deployment,
};
use sdn_tunnel_e2e::{wait_mesh_connected, workspace_binary, NAMESPACE};
use sdn_tunnel_lab::server::tcp_request;
use sdn_tunnel_lab::{Identity, InventoryOptions, Lab, LabConfig, POD_SERVER_PORT};

const COREFILE: &str = ".:53 {\n    errors\n    kubernetes cluster.local in-addr.arpa ip6.arpa\n    forward . /etc/resolv.conf\n    reload\n}\n";

fn must(run: &PlaybookRun, what: &str) {
    assert!(run.success, "{what} failed:\n{}", run.output());
    println!(
        "{what}: {:.1} s, changed {:?}",
        run.elapsed.as_secs_f64(),
        run.recap
            .iter()
            .map(|(h, r)| (h.as_str(), r.changed))
            .collect::<Vec<_>>()
    );
}

/// Nothing of ours exists in any lab cluster (the bad runs must leave it so).
async fn assert_untouched(lab: &Lab, why: &str) {
    for c in &lab.config().clusters {
        let admin = lab.client(c, Identity::Admin).await.unwrap();
        let left = leftovers(&admin).await.unwrap();
        assert!(left.is_empty(), "{why}: {c} was changed: {left:?}");
    }
}

/// The Corefile of the cluster's CoreDNS (its ConfigMap in kube-system).
async fn corefile(admin: kube::Client) -> String {
    Api::<ConfigMap>::namespaced(admin, "kube-system")
        .get("coredns")
        .await
        .unwrap()
        .data
        .unwrap()["Corefile"]
        .clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn playbook_installs_the_mesh_idempotently_and_uninstalls_it() {
    let mut cfg = LabConfig::new("e2eans");
    cfg.underlay_octet = 95;
    let mut lab = Lab::up(cfg).await.expect("lab up");
    let tunctl = workspace_binary("tunctl").unwrap();
    let dir = lab.config().dir.clone();

    // A cluster DNS to add stub domains to, as kubeadm/kind would have it.
    for c in &lab.config().clusters {
        let admin = lab.client(c, Identity::Admin).await.unwrap();
        let cm: ConfigMap = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "coredns", "namespace": "kube-system"},
            "data": {"Corefile": COREFILE}
        }))
        .unwrap();
        Api::<ConfigMap>::namespaced(admin, "kube-system")
            .create(&PostParams::default(), &cm)
            .await
            .unwrap();
    }
    let mut opts = InventoryOptions {
        tunctl: Some(tunctl.clone()),
        ..Default::default()
    };
    opts.vars.insert(
        "sdn_tunnel_coredns_stub_domains".into(),
        serde_yaml::Value::Bool(true),
    );
    // An endpoint override (what a node behind NAT gets), here pointing at
    // the node's real address so that the mesh must still come up with it.
    let west1 = lab.cluster("west").unwrap().nodes[0].clone();
    let west1_endpoint = format!("{}:51820", west1.underlay_ip);
    opts.host_overrides.insert(
        "west".into(),
        BTreeMap::from([(
            "endpoint_overrides".to_string(),
            serde_yaml::from_str(&format!(
                "[{{node: {}, endpoint: \"{west1_endpoint}\"}}]",
                west1.name
            ))
            .unwrap(),
        )]),
    );

    // 1. Bad inventories fail the preflight, clearly, and change nothing.
    let mut overlapping = opts.clone();
    overlapping.host_overrides.insert(
        "west".into(),
        BTreeMap::from([(
            "pod_cidrs".to_string(),
            serde_yaml::from_str("[10.1.128.0/17]").unwrap(),
        )]),
    );
    let bad = lab
        .write_ansible_inventory(&dir.join("overlap.yml"), &overlapping)
        .unwrap();
    let run = run_playbook("site.yml", &bad, &[]).unwrap();
    assert!(
        !run.success,
        "overlapping CIDRs accepted:\n{}",
        run.output()
    );
    assert!(
        run.stdout.contains(
            "preflight: pod CIDR 10.1.0.0/16 of cluster east overlaps pod CIDR 10.1.128.0/17 of cluster west"
        ),
        "{}",
        run.output()
    );
    assert_untouched(&lab, "overlapping CIDRs").await;

    let mut unreachable = opts.clone();
    let dead = dir.join("west-dead.kubeconfig");
    let text = std::fs::read_to_string(lab.kubeconfig("west", Identity::Admin)).unwrap();
    let url = lab.cluster("west").unwrap().apiserver_url();
    std::fs::write(&dead, text.replace(&url, &url.replace(":6443", ":6449"))).unwrap();
    unreachable.host_overrides.insert(
        "west".into(),
        BTreeMap::from([("kubeconfig".to_string(), dead.display().to_string().into())]),
    );
    let bad = lab
        .write_ansible_inventory(&dir.join("unreachable.yml"), &unreachable)
        .unwrap();
    let run = run_playbook("site.yml", &bad, &[]).unwrap();
    assert!(!run.success, "unreachable API accepted:\n{}", run.output());
    assert!(
        run.stdout
            .contains("preflight: cannot reach the API of cluster west")
            && run.stdout.contains("Connection refused"),
        "{}",
        run.output()
    );
    assert_eq!(run.recap["east"].changed, 0);
    assert_untouched(&lab, "unreachable API").await;

    // 2. The real install.
    let inventory = lab
        .write_ansible_inventory(&lab.ansible_inventory_path(), &opts)
        .unwrap();
    let first = run_playbook("site.yml", &inventory, &[]).unwrap();
    must(&first, "site.yml (first run)");
    assert!(first.recap.values().all(|r| r.changed > 0));
    let inv = read_inventory(&inventory).unwrap();
    assert_eq!(inv.len(), 2);
    check_inventory_installed(&inv).await.unwrap();
    let east = lab.client("east", Identity::Admin).await.unwrap();
    let declared = Api::<sdn_tunnel_api::TunnelCluster>::all(east)
        .get("west")
        .await
        .unwrap();
    assert_eq!(
        declared.spec.endpoint_override(&west1.name),
        Some(west1_endpoint.as_str()),
        "{:?}",
        declared.spec
    );
    for c in &lab.config().clusters {
        let admin = lab.client(c, Identity::Admin).await.unwrap();
        let dns = Api::<k8s_openapi::api::core::v1::Service>::namespaced(admin.clone(), NAMESPACE)
            .get("tunnel-dns")
            .await
            .unwrap();
        let ip = dns.spec.unwrap().cluster_ip.unwrap();
        let corefile = corefile(admin).await;
        assert!(corefile.starts_with(COREFILE), "{corefile}");
        assert!(
            corefile.contains("cluster.all:53 cluster.east:53 cluster.west:53 {")
                && corefile.contains(&format!("forward . {ip}")),
            "{c}: {corefile}"
        );
    }

    // 3. RBAC for real: SelfSubjectAccessReviews and refused writes, as the
    // agent's ServiceAccount and with the kubeconfigs the clusters exchanged.
    let asked = check_inventory_rbac(&inv).await.unwrap();
    println!("RBAC: {asked} access reviews answered as least privilege requires");

    // 4. Agents exactly as the installed DaemonSet runs them bring up the mesh.
    let started = Instant::now();
    let agents = start_agents_from_daemonset(&mut lab).await.unwrap();
    assert_eq!(agents.len(), 4);
    for (l, _) in &agents {
        let env: BTreeMap<_, _> = l.env.iter().cloned().collect();
        assert_eq!(l.args, ["run"]);
        assert_eq!(l.service_account, "tunnel-agent");
        assert_eq!(env["POD_NAMESPACE"], NAMESPACE);
        assert!(env["SDN_TUNNEL_NODE_NETNS"].starts_with("/run/netns/e2eans-"));
        assert!(env["SDN_TUNNEL_KEY_FILE"]
            .ends_with(&format!("{}/var/lib/sdn-tunnel/private.key", l.node)));
    }
    match wait_mesh_connected(&lab, Duration::from_secs(90)).await {
        Ok(t) => println!(
            "mesh connected {:.1} s after the agents started ({:.1} s waiting)",
            started.elapsed().as_secs_f64(),
            t.as_secs_f64()
        ),
        Err(e) => {
            for (_, p) in &agents {
                eprintln!(
                    "--- {}/{}:\n{}",
                    p.cluster,
                    p.name,
                    std::fs::read_to_string(lab.pod_log(&p.cluster, &p.name)).unwrap_or_default()
                );
            }
            panic!("{e:#}");
        }
    }
    for (_, p) in &agents {
        let key = &p.node;
        let path = sdn_tunnel_e2e::daemonset::node_root(&lab, &p.cluster, key)
            .join("var/lib/sdn-tunnel/private.key");
        assert!(path.is_file(), "{} has no key on its node", p.node);
    }
    // Each agent serves `wg show` (UAPI, read-only) in its emptyDir.
    for (_, p) in &agents {
        use std::io::{BufRead, Write};
        let sock = sdn_tunnel_e2e::daemonset::node_root(&lab, &p.cluster, &p.node)
            .join("emptydir/wireguard-uapi/wg0.sock");
        let mut s = std::os::unix::net::UnixStream::connect(&sock)
            .unwrap_or_else(|e| panic!("{}: {e}", sock.display()));
        s.write_all(b"get=1\n\n").unwrap();
        let mut r = std::io::BufReader::new(s);
        let mut lines = Vec::new();
        loop {
            let mut l = String::new();
            if r.read_line(&mut l).unwrap() == 0 || l == "\n" {
                break;
            }
            lines.push(l.trim_end().to_string());
        }
        assert!(
            lines.iter().any(|l| l == "errno=0"),
            "{}: {lines:?}",
            p.node
        );
        assert_eq!(
            lines
                .iter()
                .filter(|l| l.starts_with("public_key="))
                .count(),
            2,
            "{}: {lines:?}",
            p.node
        );
    }

    // Least privilege is also enough: no agent was refused anything.
    for (_, p) in &agents {
        let log = std::fs::read_to_string(lab.pod_log(&p.cluster, &p.name)).unwrap();
        assert!(
            !log.to_lowercase().contains("forbidden"),
            "{}/{} was refused something:\n{log}",
            p.cluster,
            p.name
        );
    }
    let a = lab.add_pod("east", 1, "web-1").unwrap();
    let b = lab.add_pod("west", 2, "web-2").unwrap();
    let t = Duration::from_secs(3);
    assert_eq!(
        tcp_request(&a.netns, SocketAddr::from((b.ip, POD_SERVER_PORT)), t).unwrap(),
        "web-2"
    );
    assert_eq!(
        tcp_request(&b.netns, SocketAddr::from((a.ip, POD_SERVER_PORT)), t).unwrap(),
        "web-1"
    );

    // The DNS Deployment, as installed, with its own read-only identity:
    // ready, never refused, and answering the other cluster's zone and the
    // merged one (the installed tunnel-dns Services are the names asked).
    let mut svc_ip = BTreeMap::new();
    for c in &lab.config().clusters {
        let admin = lab.client(c, Identity::Admin).await.unwrap();
        let svc = Api::<k8s_openapi::api::core::v1::Service>::namespaced(admin, NAMESPACE)
            .get("tunnel-dns")
            .await
            .unwrap();
        let ip: std::net::Ipv4Addr = svc.spec.unwrap().cluster_ip.unwrap().parse().unwrap();
        svc_ip.insert(c.clone(), ip);
    }
    let dns = start_dns_from_deployment(&mut lab).await.unwrap();
    assert_eq!(dns.len(), 2);
    for (l, p) in &dns {
        assert_eq!(l.args, ["dns"]);
        assert_eq!(l.service_account, "tunnel-dns");
        let metrics = SocketAddr::from((p.ip, 9586));
        let deadline = Instant::now() + Duration::from_secs(30);
        while http_status(&p.netns, metrics, "/readyz").ok() != Some(200) {
            assert!(
                Instant::now() < deadline,
                "{}/{} not ready:\n{}",
                p.cluster,
                p.name,
                std::fs::read_to_string(lab.pod_log(&p.cluster, &p.name)).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let other = if p.cluster == "east" { "west" } else { "east" };
        let server = SocketAddr::from((p.ip, 53));
        let name = format!("tunnel-dns.{NAMESPACE}.svc.cluster.{other}");
        let merged = format!("tunnel-dns.{NAMESPACE}.svc.cluster.all");
        let mut both: Vec<_> = svc_ip.values().copied().collect();
        both.sort();
        for (q, want) in [(&name, vec![svc_ip[other]]), (&merged, both)] {
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                let got = resolve_a(&p.netns, server, q).unwrap();
                if got == (0, want.clone()) {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "{}: {q} -> {got:?}, expected {want:?}\n{}",
                    p.cluster,
                    std::fs::read_to_string(lab.pod_log(&p.cluster, &p.name)).unwrap_or_default()
                );
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
        let log = std::fs::read_to_string(lab.pod_log(&p.cluster, &p.name)).unwrap();
        assert!(
            !log.to_lowercase().contains("forbidden"),
            "{}: {log}",
            p.cluster
        );
    }
    println!(
        "tunnel-dns (from the Deployment, as tunnel-dns) answers cluster.<name> and cluster.all"
    );

    // 5. A second run changes nothing, and its `tunctl peers` shows the mesh.
    let second = run_playbook(
        "site.yml",
        &inventory,
        &["-e", "sdn_tunnel_peers_check=true"],
    )
    .unwrap();
    must(&second, "site.yml (second run)");
    assert_eq!(second.changed(), 0, "{}", second.output());
    assert_eq!(
        second.stdout.matches("Connected").count(),
        8,
        "tunctl peers in the playbook output:\n{}",
        second.stdout
    );

    // 6. Uninstall leaves nothing, and a second uninstall changes nothing.
    let node_state = |netns: &str| {
        let routes = sdn_tunnel_lab::sys::ip_in(netns, &["route", "show", "proto", "93"]).unwrap();
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", netns, "nft", "list", "tables"])
            .output()
            .unwrap();
        (routes, String::from_utf8_lossy(&out.stdout).into_owned())
    };
    for plan in lab.config().plan() {
        for n in &plan.nodes {
            let (routes, tables) = node_state(&n.netns);
            assert!(
                !routes.is_empty() && tables.contains("sdn_tunnel_node"),
                "{}: {routes} {tables}",
                n.name
            );
        }
    }
    let gone = run_playbook("uninstall.yml", &inventory, &[]).unwrap();
    must(&gone, "uninstall.yml");
    // With the DaemonSet and Deployment gone, a kubelet stops their pods
    // (SIGTERM): the agents take their routes and nftables tables with them.
    for (_, p) in agents.iter().chain(&dns) {
        lab.stop_pod(&p.cluster, &p.name).unwrap();
    }
    for plan in lab.config().plan() {
        for n in &plan.nodes {
            let (routes, tables) = node_state(&n.netns);
            assert!(
                routes.is_empty() && !tables.contains("sdn_tunnel"),
                "{} after uninstall: {routes} {tables}",
                n.name
            );
        }
    }
    for c in &lab.config().clusters {
        let admin = lab.client(c, Identity::Admin).await.unwrap();
        let left = leftovers(&admin).await.unwrap();
        assert!(left.is_empty(), "{c}: uninstall left {left:?}");
        assert!(Api::<Namespace>::all(admin.clone())
            .get(NAMESPACE)
            .await
            .is_err());
        let crds = Api::<CustomResourceDefinition>::all(admin.clone())
            .list(&ListParams::default())
            .await
            .unwrap();
        assert!(crds.items.iter().all(|c| !c
            .metadata
            .name
            .as_deref()
            .unwrap_or_default()
            .ends_with("sdntunnel.io")));
        let corefile = corefile(admin).await;
        assert_eq!(
            corefile.trim_end(),
            COREFILE.trim_end(),
            "{c}: Corefile not restored"
        );
    }
    let again = run_playbook("uninstall.yml", &inventory, &[]).unwrap();
    must(&again, "uninstall.yml (again)");
    assert_eq!(again.changed(), 0, "{}", again.output());

    let report = lab.down().unwrap();
    assert!(report.leftovers.is_empty(), "{:?}", report.leftovers);
}
