//! Renders the CustomResourceDefinitions of this crate as YAML, for
//! `deploy/crds`. The committed files are generated, never edited by hand: the
//! `crdgen` binary writes them and a unit test fails when they are stale, so
//! what `kubectl apply` installs is always what the Rust types accept.

use std::path::Path;

use kube::CustomResourceExt;
use thiserror::Error;

use crate::{TunnelCluster, TunnelPeer};

/// Command that regenerates the committed CRDs (run from the workspace root).
pub const REGENERATE: &str = "cargo run -p sdn-tunnel-api --bin crdgen -- deploy/crds";

/// Failure to render or write the CRDs.
#[derive(Debug, Error)]
pub enum CrdGenError {
    /// serde_yaml could not render a CRD.
    #[error("rendering CRD {name}: {source}")]
    Render {
        /// CRD name.
        name: String,
        /// Underlying error.
        source: serde_yaml::Error,
    },
    /// The output directory or a file could not be written.
    #[error("writing {path}: {source}")]
    Write {
        /// Path being written.
        path: String,
        /// Underlying error.
        source: std::io::Error,
    },
}

/// One rendered CRD: its file name in `deploy/crds` and the YAML.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenderedCrd {
    /// `<plural>.<group>.yaml`.
    pub file_name: String,
    /// The full document, header comment included.
    pub yaml: String,
}

fn render<K: CustomResourceExt>() -> Result<RenderedCrd, CrdGenError> {
    let name = K::crd_name();
    let body = serde_yaml::to_string(&K::crd()).map_err(|source| CrdGenError::Render {
        name: name.to_string(),
        source,
    })?;
    Ok(RenderedCrd {
        file_name: format!("{name}.yaml"),
        yaml: format!("# Generated from agent/api by `{REGENERATE}`; do not edit.\n{body}"),
    })
}

/// Renders every CRD of the API, in a fixed order.
pub fn render_all() -> Result<Vec<RenderedCrd>, CrdGenError> {
    Ok(vec![render::<TunnelCluster>()?, render::<TunnelPeer>()?])
}

/// Writes every CRD into `dir`, creating it if needed. Returns the paths written.
pub fn write_all(dir: &Path) -> Result<Vec<String>, CrdGenError> {
    std::fs::create_dir_all(dir).map_err(|source| CrdGenError::Write {
        path: dir.display().to_string(),
        source,
    })?;
    let mut written = Vec::new();
    for crd in render_all()? {
        let path = dir.join(&crd.file_name);
        std::fs::write(&path, &crd.yaml).map_err(|source| CrdGenError::Write {
            path: path.display().to_string(),
            source,
        })?;
        written.push(path.display().to_string());
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn committed_dir() -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/crds")
    }

    #[test]
    fn committed_crds_are_up_to_date() {
        for crd in render_all().unwrap() {
            let path = committed_dir().join(&crd.file_name);
            let committed = std::fs::read_to_string(&path).unwrap_or_default();
            assert!(
                committed == crd.yaml,
                "deploy/crds is stale ({} differs from the Rust types), run `{REGENERATE}` from the workspace root and commit the result",
                crd.file_name
            );
        }
    }

    fn walk(v: &serde_json::Value, path: &str, found: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, v) in m {
                    let p = format!("{path}.{k}");
                    if k == "x-kubernetes-validations" || k == "selectableFields" {
                        found.push(p.clone());
                    }
                    walk(v, &p, found);
                }
            }
            serde_json::Value::Array(a) => {
                for (i, v) in a.iter().enumerate() {
                    walk(v, &format!("{path}[{i}]"), found);
                }
            }
            _ => {}
        }
    }

    /// The lab's apiserver is Kubernetes 1.20: no CEL, no selectable fields.
    #[test]
    fn crds_use_nothing_kubernetes_1_20_refuses() {
        for crd in [
            serde_json::to_value(TunnelCluster::crd()).unwrap(),
            serde_json::to_value(TunnelPeer::crd()).unwrap(),
        ] {
            let mut found = vec![];
            walk(&crd, "", &mut found);
            assert!(found.is_empty(), "unsupported by 1.20: {found:?}");
            assert_eq!(crd["apiVersion"], "apiextensions.k8s.io/v1");
        }
    }

    #[test]
    fn schema_carries_validation() {
        let crd = serde_json::to_value(TunnelPeer::crd()).unwrap();
        let v = &crd["spec"]["versions"][0];
        assert_eq!(v["name"], crate::VERSION);
        assert_eq!(v["subresources"]["status"], serde_json::json!({}));
        let spec = &v["schema"]["openAPIV3Schema"]["properties"]["spec"];
        assert_eq!(
            spec["properties"]["publicKey"]["pattern"],
            crate::schema::PUBLIC_KEY_PATTERN
        );
        assert_eq!(spec["properties"]["podCIDRs"]["items"]["format"], "cidr");
        assert_eq!(spec["properties"]["podCIDRs"]["minItems"], 1);
        assert_eq!(
            spec["properties"]["listenPort"]["minimum"].as_f64(),
            Some(1.0)
        );
        assert_eq!(
            spec["properties"]["listenPort"]["maximum"].as_f64(),
            Some(65535.0)
        );
        assert_eq!(crd["spec"]["scope"], "Namespaced");
        assert_eq!(crd["spec"]["group"], crate::GROUP);

        let crd = serde_json::to_value(TunnelCluster::crd()).unwrap();
        assert_eq!(crd["spec"]["scope"], "Cluster");
        assert_eq!(crd["spec"]["names"]["shortNames"][0], "tcl");
        let spec = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
        assert_eq!(
            spec["properties"]["serviceCIDRs"]["items"]["format"],
            "cidr"
        );
    }
}
