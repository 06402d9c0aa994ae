//! Thin wrappers over the commands and syscalls the lab needs: `ip`, `nft`,
//! `tc`, sysctl, entering a network namespace, and processes we started.

use std::fs::File;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::sched::{setns, CloneFlags};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

/// Runs a command, failing with its stderr when it exits non-zero.
pub fn run(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {program} (is it installed?)"))?;
    if !out.status.success() {
        bail!(
            "`{program} {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `ip <args>`.
pub fn ip(args: &[&str]) -> Result<String> {
    run("ip", args)
}

/// Runs `ip -n <netns> <args>`.
pub fn ip_in(netns: &str, args: &[&str]) -> Result<String> {
    let mut all = vec!["-n", netns];
    all.extend_from_slice(args);
    run("ip", &all)
}

/// Runs a command inside a network namespace (`ip netns exec`).
pub fn exec_in(netns: &str, program: &str, args: &[&str]) -> Result<String> {
    let mut all = vec!["netns", "exec", netns, program];
    all.extend_from_slice(args);
    run("ip", &all)
}

/// Sets a sysctl inside a network namespace.
pub fn sysctl_in(netns: &str, key: &str, value: &str) -> Result<()> {
    exec_in(netns, "sysctl", &["-qw", &format!("{key}={value}")]).map(drop)
}

/// Loads an nftables ruleset (`nft -f -`) inside a network namespace.
pub fn nft_in(netns: &str, ruleset: &str) -> Result<()> {
    use std::io::Write;
    let mut child = Command::new("ip")
        .args(["netns", "exec", netns, "nft", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot run nft (is nftables installed?)")?;
    child
        .stdin
        .take()
        .context("nft stdin")?
        .write_all(ruleset.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "nft in {netns} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Every named network namespace on the machine (`/run/netns`).
pub fn netns_list() -> Vec<String> {
    let Ok(dir) = std::fs::read_dir("/run/netns") else {
        return Vec::new();
    };
    let mut names: Vec<String> = dir
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    names.sort();
    names
}

pub fn netns_exists(name: &str) -> bool {
    Path::new("/run/netns").join(name).exists()
}

/// PIDs of the processes living in a network namespace.
pub fn netns_pids(name: &str) -> Vec<i32> {
    ip(&["netns", "pids", name])
        .map(|out| {
            out.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Runs `f` on a fresh thread that has entered network namespace `netns`:
/// sockets it creates belong to that namespace. The calling thread is untouched.
pub fn in_netns<T: Send + 'static>(
    netns: &str,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    let path = Path::new("/run/netns").join(netns);
    let file =
        File::open(&path).with_context(|| format!("network namespace {netns} does not exist"))?;
    std::thread::spawn(move || {
        setns(&file, CloneFlags::CLONE_NEWNET).context("setns")?;
        f()
    })
    .join()
    .map_err(|_| anyhow::anyhow!("thread in {netns} panicked"))?
}

/// A process the lab started, identified by PID *and* start time so that a
/// recycled PID is never mistaken for ours.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcRecord {
    pub pid: i32,
    pub start_time: u64,
    pub what: String,
}

impl ProcRecord {
    pub fn of(pid: i32, what: &str) -> Result<Self> {
        let start_time =
            start_time(pid).with_context(|| format!("process {pid} ({what}) exited at once"))?;
        Ok(Self {
            pid,
            start_time,
            what: what.to_string(),
        })
    }

    /// Whether the recorded process still runs (and is still the same one).
    pub fn alive(&self) -> bool {
        start_time(self.pid) == Some(self.start_time)
    }

    /// SIGTERM, then SIGKILL after `grace`; returns once it is gone.
    pub fn stop(&self, grace: Duration) {
        if !self.alive() {
            return;
        }
        let _ = kill(Pid::from_raw(self.pid), Signal::SIGTERM);
        let deadline = Instant::now() + grace;
        while self.alive() && Instant::now() < deadline {
            reap(self.pid);
            std::thread::sleep(Duration::from_millis(20));
        }
        if self.alive() {
            let _ = kill(Pid::from_raw(self.pid), Signal::SIGKILL);
            let deadline = Instant::now() + Duration::from_secs(5);
            while self.alive() && Instant::now() < deadline {
                reap(self.pid);
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// Resident set size in KiB, if the process runs.
    pub fn rss_kib(&self) -> Option<u64> {
        if !self.alive() {
            return None;
        }
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid)).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
    }
}

/// Reaps `pid` if it is an exited child of ours, so that it does not
/// linger as a zombie (which would still count as "alive" by PID and start
/// time). Only that PID: reaping any child (`waitpid(-1)`) would steal the
/// exit status of commands other threads are running (`ECHILD` there).
pub fn reap(pid: i32) {
    use nix::sys::wait::{waitpid, WaitPidFlag};
    // Not our child (started by an earlier `lab up`): nothing to reap.
    let _ = waitpid(Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG));
}

/// Whether a network interface exists in this process's namespace. Asks
/// the kernel (`ip link show`): `/sys/class/net` shows the namespace that
/// mounted sysfs, which need not be ours.
pub fn link_exists(name: &str) -> bool {
    run("ip", &["-o", "link", "show", "dev", name]).is_ok()
}

/// Start time of a process in clock ticks since boot (field 22 of `stat`);
/// `None` when it does not exist or is a zombie.
pub fn start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces and parentheses: parse after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    if fields.first() == Some(&"Z") {
        return None;
    }
    fields.get(19)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_start_time_is_stable_and_alive() {
        let me = std::process::id() as i32;
        let rec = ProcRecord::of(me, "test").unwrap();
        assert!(rec.alive());
        assert_eq!(start_time(me), Some(rec.start_time));
        let other = ProcRecord {
            start_time: rec.start_time + 1,
            ..rec.clone()
        };
        assert!(
            !other.alive(),
            "a different start time is a different process"
        );
        assert!(rec.rss_kib().unwrap() > 0);
    }

    #[test]
    fn failing_command_reports_stderr() {
        let err = run("ip", &["link", "show", "dev", "does-not-exist-0"]).unwrap_err();
        assert!(err.to_string().contains("does-not-exist-0"), "{err}");
    }
}
