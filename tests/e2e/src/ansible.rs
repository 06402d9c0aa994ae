//! Running sdn-tunnel's Ansible playbooks (`ansible/`) from tests, and
//! reading their PLAY RECAP.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::repo_root;

/// The counters of one host in a PLAY RECAP.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Recap {
    pub ok: u32,
    pub changed: u32,
    pub unreachable: u32,
    pub failed: u32,
    pub skipped: u32,
}

/// One `ansible-playbook` run.
#[derive(Debug, Clone)]
pub struct PlaybookRun {
    pub success: bool,
    pub stdout: String,
    pub stderr: String,
    pub recap: BTreeMap<String, Recap>,
    pub elapsed: Duration,
}

impl PlaybookRun {
    /// Sum of `changed` over every host.
    pub fn changed(&self) -> u32 {
        self.recap.values().map(|r| r.changed).sum()
    }

    /// Output for a failure message.
    pub fn output(&self) -> String {
        format!("--- stdout\n{}\n--- stderr\n{}", self.stdout, self.stderr)
    }
}

/// The `ansible/` directory.
pub fn ansible_dir() -> PathBuf {
    repo_root().join("ansible")
}

/// Parses the PLAY RECAP lines (`east : ok=14 changed=0 unreachable=0 ...`).
pub fn parse_recap(stdout: &str) -> BTreeMap<String, Recap> {
    let mut out = BTreeMap::new();
    let Some(start) = stdout.find("PLAY RECAP") else {
        return out;
    };
    for line in stdout[start..].lines().skip(1) {
        let Some((host, counters)) = line.split_once(" : ") else {
            continue;
        };
        let mut r = Recap::default();
        for kv in counters.split_whitespace() {
            let Some((k, v)) = kv.split_once('=') else {
                continue;
            };
            let Ok(v) = v.parse() else { continue };
            match k {
                "ok" => r.ok = v,
                "changed" => r.changed = v,
                "unreachable" => r.unreachable = v,
                "failed" => r.failed = v,
                "skipped" => r.skipped = v,
                _ => {}
            }
        }
        out.insert(host.trim().to_string(), r);
    }
    out
}

/// Runs `ansible-playbook -i <inventory> <playbook> <extra>` from `ansible/`
/// (so its ansible.cfg applies).
/// `site.yml` into `lab` as a user runs it: the lab's inventory (with
/// `tunctl` for the playbook's final `tunctl peers`), then the playbook.
/// Returns the inventory's path and the run; the caller judges `success`.
pub fn run_site_yml(lab: &sdn_tunnel_lab::Lab, tunctl: &Path) -> Result<(PathBuf, PlaybookRun)> {
    let opts = sdn_tunnel_lab::InventoryOptions {
        tunctl: Some(tunctl.to_path_buf()),
        ..Default::default()
    };
    let inventory = lab.write_ansible_inventory(&lab.ansible_inventory_path(), &opts)?;
    let run = run_playbook("site.yml", &inventory, &[])?;
    Ok((inventory, run))
}

pub fn run_playbook(playbook: &str, inventory: &Path, extra: &[&str]) -> Result<PlaybookRun> {
    let dir = ansible_dir();
    if !dir.join(playbook).is_file() {
        bail!("no playbook {playbook} in {}", dir.display());
    }
    let started = Instant::now();
    let out = Command::new("ansible-playbook")
        .current_dir(&dir)
        .arg("-i")
        .arg(inventory)
        .arg(playbook)
        .args(extra)
        .env("ANSIBLE_NOCOLOR", "1")
        .env("ANSIBLE_FORCE_COLOR", "0")
        .env("ANSIBLE_CONFIG", dir.join("ansible.cfg"))
        .output()
        .context("cannot run ansible-playbook: install Debian's ansible and python3-kubernetes (make deps)")?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    Ok(PlaybookRun {
        success: out.status.success(),
        recap: parse_recap(&stdout),
        stdout,
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        elapsed: started.elapsed(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recap_lines_parse() {
        let out = "TASK [x]\nok: [east]\n\nPLAY RECAP *****\n\
            east                       : ok=14   changed=2    unreachable=0    failed=0    skipped=7    rescued=0    ignored=0   \n\
            west                       : ok=13   changed=0    unreachable=1    failed=1    skipped=7    rescued=0    ignored=0   \n";
        let r = parse_recap(out);
        assert_eq!(r.len(), 2);
        assert_eq!(r["east"].changed, 2);
        assert_eq!(r["east"].ok, 14);
        assert_eq!(r["west"].failed, 1);
        assert_eq!(r["west"].unreachable, 1);
        assert!(parse_recap("no recap").is_empty());
    }
}
