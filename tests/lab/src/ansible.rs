//! An Ansible inventory describing the lab's clusters for sdn-tunnel's
//! playbooks (`ansible/site.yml`, `ansible/uninstall.yml`): one host per
//! cluster (the cluster's name), with the admin kubeconfig and context, pod
//! and service CIDRs, plus the lab's own settings (no kubelets, so no
//! rollout to wait for; no namespace controller, so uninstall finalizes the
//! emptied namespace itself).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Result;
use serde_yaml::{Mapping, Value};

use crate::controlplane::{self, Identity};
use crate::Lab;

/// What to put into the inventory besides the clusters.
#[derive(Debug, Clone, Default)]
pub struct InventoryOptions {
    /// `tunctl` the playbook runs at the end (`sdn_tunnel_tunctl`).
    pub tunctl: Option<PathBuf>,
    /// More group variables (they override the lab's defaults).
    pub vars: BTreeMap<String, Value>,
    /// Per-cluster host variables that replace the lab's (e.g. a bad
    /// `pod_cidrs` or `kubeconfig` to test the preflight).
    pub host_overrides: BTreeMap<String, BTreeMap<String, Value>>,
}

impl Lab {
    /// The inventory as a YAML document (see the module documentation).
    pub fn ansible_inventory(&self, opts: &InventoryOptions) -> Result<String> {
        let mut hosts = Mapping::new();
        for plan in self.config().plan() {
            let mut host = Mapping::new();
            let kubeconfig = self.kubeconfig(&plan.name, Identity::Admin);
            host.insert("kubeconfig".into(), path_value(&kubeconfig));
            // The lab's kubeconfigs name their one context after the cluster.
            host.insert("context".into(), plan.name.clone().into());
            host.insert(
                "pod_cidrs".into(),
                Value::Sequence(vec![plan.pod_cidr.to_string().into()]),
            );
            host.insert(
                "service_cidrs".into(),
                Value::Sequence(vec![plan.service_cidr.to_string().into()]),
            );
            host.insert("api_server_for_peers".into(), plan.apiserver_url().into());
            if let Some(over) = opts.host_overrides.get(&plan.name) {
                for (k, v) in over {
                    host.insert(k.as_str().into(), v.clone());
                }
            }
            hosts.insert(plan.name.clone().into(), Value::Mapping(host));
        }
        let mut vars = Mapping::new();
        // Real nodes: kubelets roll the DaemonSet out, kube-controller-manager
        // finalizes namespaces, and the image is the one `make image` built.
        let real = self.config().real_nodes;
        vars.insert("sdn_tunnel_wait_rollout".into(), real.into());
        vars.insert("sdn_tunnel_finalize_namespace".into(), (!real).into());
        if real {
            vars.insert(
                "sdn_tunnel_image".into(),
                crate::kubelet::image::default_image().into(),
            );
        }
        if let Some(t) = &opts.tunctl {
            vars.insert("sdn_tunnel_tunctl".into(), path_value(t));
        }
        for (k, v) in &opts.vars {
            vars.insert(k.as_str().into(), v.clone());
        }
        let mut group = Mapping::new();
        group.insert("hosts".into(), Value::Mapping(hosts));
        group.insert("vars".into(), Value::Mapping(vars));
        let mut doc = Mapping::new();
        doc.insert("sdn_tunnel_clusters".into(), Value::Mapping(group));
        Ok(format!(
            "# sdn-tunnel lab {}: Ansible inventory of its clusters (written by the lab)\n{}",
            self.config().name,
            serde_yaml::to_string(&Value::Mapping(doc))?
        ))
    }

    /// Writes [`Lab::ansible_inventory`] to `path` (mode 0600: it names
    /// admin credentials) and returns the path.
    pub fn write_ansible_inventory(&self, path: &Path, opts: &InventoryOptions) -> Result<PathBuf> {
        controlplane::write_private(path, &self.ansible_inventory(opts)?)?;
        Ok(path.to_path_buf())
    }

    /// Default place of the inventory: `<lab dir>/inventory.yml`.
    pub fn ansible_inventory_path(&self) -> PathBuf {
        self.config().dir.join("inventory.yml")
    }
}

fn path_value(p: &Path) -> Value {
    p.display().to_string().into()
}
