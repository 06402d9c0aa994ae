//! Images without a registry: `scripts/build-image.sh` (`make image`)
//! writes OCI archives into the images directory; the lab imports every one
//! of them into every node's containerd (`ctr -n k8s.io images import`).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::sys::run;

/// The pods' sandbox ("pause") image: a tiny static program (see
/// scripts/build-image.sh).
pub const PAUSE_IMAGE: &str = "localhost/sdn-tunnel-lab-pause:1";
/// Image name of sdn-tunnel itself (tag: the workspace version).
pub const IMAGE: &str = "localhost/sdn-tunnel";
/// Image of the lab's test pods: the `lab` binary (`lab serve`, `lab
/// request`) and busybox (`nslookup`, `sh`).
pub const TOOLS_IMAGE: &str = "localhost/sdn-tunnel-lab-tools";

/// containerd namespace the CRI plugin uses.
pub const CRI_NAMESPACE: &str = "k8s.io";

/// Where `make image` puts its archives: `$SDN_TUNNEL_IMAGES`, or
/// `<cache>/images` (the cache of build-apiserver.sh).
pub fn images_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("SDN_TUNNEL_IMAGES") {
        return PathBuf::from(d);
    }
    crate::controlplane::cache_dir().join("images")
}

/// `localhost/sdn-tunnel:<version>`: the tag `make image` gives by default.
pub fn default_image() -> String {
    format!("{IMAGE}:{}", env!("CARGO_PKG_VERSION"))
}

/// Every OCI archive of the images directory; fails (with the fixing
/// command) if the pause image is not among them.
pub fn archives(dir: &Path) -> Result<Vec<PathBuf>> {
    let fix = "run `make image` (scripts/build-image.sh)";
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("no image directory {}: {fix}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.to_string_lossy().ends_with(".oci.tar"))
        .collect();
    out.sort();
    if !out.iter().any(|p| {
        p.file_name()
            .is_some_and(|n| n == "sdn-tunnel-lab-pause.oci.tar")
    }) {
        bail!(
            "no pause image (sdn-tunnel-lab-pause.oci.tar) in {}: {fix}",
            dir.display()
        );
    }
    Ok(out)
}

/// `ctr` against one node's containerd, in the CRI namespace.
pub fn ctr(socket: &Path, args: &[&str]) -> Result<String> {
    let sock = socket.to_string_lossy();
    let mut all = vec!["--address", &sock, "-n", CRI_NAMESPACE];
    all.extend_from_slice(args);
    run("ctr", &all)
}

/// Imports archives into a node's containerd.
pub fn import(socket: &Path, archives: &[PathBuf]) -> Result<()> {
    for a in archives {
        ctr(socket, &["images", "import", &a.to_string_lossy()])
            .with_context(|| format!("importing {}", a.display()))?;
    }
    Ok(())
}

/// The image references a node's containerd has (`ctr images ls -q`).
pub fn list(socket: &Path) -> Result<Vec<String>> {
    Ok(ctr(socket, &["images", "ls", "-q"])?
        .lines()
        .map(str::to_string)
        .collect())
}
