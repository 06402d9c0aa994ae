//! Doing things inside another network namespace without moving the agent.
//!
//! The agent lives in its pod's network namespace but also programs the
//! node's. `setns(CLONE_NEWNET)` only changes the namespace of the calling
//! *thread*, so every namespace-bound operation here runs on a fresh,
//! short-lived OS thread that enters the target namespace, creates what it
//! needs (a netlink socket, a file opened under `/proc/sys/net`) and exits.
//! Sockets keep the namespace they were created in for their whole life, so
//! the caller can then drive them from any thread (tokio's, typically).
//! Pooled threads (tokio's `spawn_blocking`) are never used for this: a pooled
//! thread left in the wrong namespace would poison unrelated later work.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use nix::sched::{setns, CloneFlags};
use thiserror::Error;

/// Errors of entering a namespace or touching its sysctls.
#[derive(Debug, Error)]
pub enum NetnsError {
    #[error("open network namespace {path}: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error("setns into {path}: {source}")]
    Setns { path: PathBuf, source: nix::Error },
    #[error("spawn namespace thread: {0}")]
    Spawn(io::Error),
    #[error("namespace thread panicked")]
    Panicked,
    #[error("sysctl {key} in {netns}: {source}")]
    Sysctl {
        key: String,
        netns: String,
        source: io::Error,
    },
    #[error("invalid sysctl key {0:?}")]
    BadKey(String),
}

/// Describes a namespace for error messages: its path, or "current".
pub fn describe(netns: Option<&Path>) -> String {
    netns.map_or_else(|| "current netns".to_string(), |p| p.display().to_string())
}

/// Runs `f` on a new thread that first entered the network namespace at
/// `netns` (`/run/netns/<name>`, `/proc/<pid>/ns/net`); `None` runs it in the
/// caller's namespace (still on a new thread, so both paths behave alike).
pub fn in_netns<T, F>(netns: Option<&Path>, f: F) -> Result<T, NetnsError>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    let thread = spawn_in_netns(netns, f, move |r| {
        let _ = tx.send(r);
    })?;
    let _ = thread.join();
    rx.recv().map_err(|_| NetnsError::Panicked)?
}

/// [`in_netns`] for async callers: the result comes back through a channel
/// so no tokio worker blocks waiting for the thread.
pub async fn in_netns_async<T, F>(netns: Option<&Path>, f: F) -> Result<T, NetnsError>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let (tx, rx) = tokio::sync::oneshot::channel();
    spawn_in_netns(netns, f, move |r| {
        let _ = tx.send(r);
    })?;
    rx.await.map_err(|_| NetnsError::Panicked)?
}

/// Opens the namespace file here (so a bad path fails in the caller), then
/// spawns the thread that enters it, runs `f` and hands the outcome to
/// `done`. The thread exits right after: it is never reused.
fn spawn_in_netns<T, F, D>(
    netns: Option<&Path>,
    f: F,
    done: D,
) -> Result<std::thread::JoinHandle<()>, NetnsError>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
    D: FnOnce(Result<T, NetnsError>) + Send + 'static,
{
    let target = match netns {
        Some(path) => Some((
            path.to_path_buf(),
            File::open(path).map_err(|source| NetnsError::Open {
                path: path.to_path_buf(),
                source,
            })?,
        )),
        None => None,
    };
    std::thread::Builder::new()
        .name("sdnt-netns".into())
        .spawn(move || {
            if let Some((path, file)) = target {
                if let Err(source) = setns(&file, CloneFlags::CLONE_NEWNET) {
                    done(Err(NetnsError::Setns { path, source }));
                    return;
                }
            }
            done(Ok(f()));
        })
        .map_err(NetnsError::Spawn)
}

/// Path of a sysctl under `/proc/sys` from its key, refusing keys that could
/// escape the sysctl tree. Like sysctl(8), a key is dotted
/// (`net.ipv4.ip_forward`) or, when a component itself contains dots (a
/// VLAN interface `eth0.100`), slash-separated
/// (`net/ipv4/conf/eth0.100/rp_filter`).
fn sysctl_path(key: &str) -> Result<PathBuf, NetnsError> {
    let separator = if key.contains('/') { '/' } else { '.' };
    let parts: Vec<&str> = key.split(separator).collect();
    if key.is_empty()
        || parts
            .iter()
            .any(|part| part.is_empty() || *part == ".." || *part == ".")
    {
        return Err(NetnsError::BadKey(key.to_string()));
    }
    Ok(parts
        .iter()
        .fold(PathBuf::from("/proc/sys"), |path, part| path.join(part)))
}

/// Writes a sysctl in the given namespace. `/proc/sys/net/*` resolves against
/// the network namespace of the *thread* that opens it (the kernel looks at
/// `current->nsproxy->net_ns`), which is why this runs through [`in_netns`].
pub fn write_sysctl(netns: Option<&Path>, key: &str, value: &str) -> Result<(), NetnsError> {
    let path = sysctl_path(key)?;
    let value = value.to_string();
    in_netns(netns, move || std::fs::write(&path, value.as_bytes()))?.map_err(|source| {
        NetnsError::Sysctl {
            key: key.to_string(),
            netns: describe(netns),
            source,
        }
    })
}

/// Reads a sysctl in the given namespace (trimmed).
pub fn read_sysctl(netns: Option<&Path>, key: &str) -> Result<String, NetnsError> {
    let path = sysctl_path(key)?;
    in_netns(netns, move || std::fs::read_to_string(&path))?
        .map(|s| s.trim().to_string())
        .map_err(|source| NetnsError::Sysctl {
            key: key.to_string(),
            netns: describe(netns),
            source,
        })
}

/// Value of `rp_filter` for loose mode (RFC 3704 loose: the source only has
/// to be routable through *some* interface).
pub const RP_FILTER_LOOSE: &str = "2";

/// Puts reverse-path filtering in loose mode on `interfaces` of the namespace
/// (and on `all`, only if it was strict).
///
/// Why: cross-cluster packets arrive with sources in remote pod CIDRs. With
/// strict mode (`1`, the default of many distributions and of kindnet nodes)
/// a packet is dropped when the route back to its source does not leave
/// through the interface it came in on, which happens whenever our routes are
/// missing for a moment, asymmetric (node socket vs pod TUN) or shadowed.
/// The kernel uses `max(conf/all, conf/<if>)`, so `2` on the interface is
/// enough unless `all` is stricter than loose, which it never is (`2` is the
/// maximum); `all` is only lowered from `1` to `2` so that interfaces we do
/// not list but the traffic crosses (e.g. a pod veth) follow too.
pub fn set_rp_filter_loose(netns: Option<&Path>, interfaces: &[&str]) -> Result<(), NetnsError> {
    if read_sysctl(netns, "net.ipv4.conf.all.rp_filter")? == "1" {
        write_sysctl(netns, "net.ipv4.conf.all.rp_filter", RP_FILTER_LOOSE)?;
    }
    for iface in interfaces {
        // slash form: interface names may contain dots (VLANs)
        write_sysctl(
            netns,
            &format!("net/ipv4/conf/{iface}/rp_filter"),
            RP_FILTER_LOOSE,
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_on_a_thread_and_reports_bad_paths_and_panics() {
        assert_eq!(in_netns(None, || 42).unwrap(), 42);
        assert!(matches!(
            in_netns(Some(Path::new("/nonexistent/netns")), || ()),
            Err(NetnsError::Open { .. })
        ));
        // a regular file is not a namespace: setns refuses it
        assert!(matches!(
            in_netns(Some(Path::new("/proc/self/status")), || ()),
            Err(NetnsError::Setns { .. })
        ));
        assert!(matches!(
            in_netns(None, || -> () { panic!("boom") }),
            Err(NetnsError::Panicked)
        ));
    }

    #[test]
    fn sysctl_keys_cannot_escape_proc_sys() {
        assert_eq!(
            sysctl_path("net.ipv4.conf.cbr0.rp_filter").unwrap(),
            PathBuf::from("/proc/sys/net/ipv4/conf/cbr0/rp_filter")
        );
        assert_eq!(
            sysctl_path("net/ipv4/conf/eth0.100/rp_filter").unwrap(),
            PathBuf::from("/proc/sys/net/ipv4/conf/eth0.100/rp_filter")
        );
        for bad in [
            "",
            "net..ipv4",
            "net.ipv4/../../etc",
            "net/ipv4/conf/../../../etc/x",
            "net/./ipv4",
            ".net",
            "net.",
            "net/",
        ] {
            assert!(sysctl_path(bad).is_err(), "{bad:?} accepted");
        }
    }
}
