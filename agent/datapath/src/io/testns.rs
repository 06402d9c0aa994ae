//! Test helper: network namespaces the tests create themselves, each with a
//! unique name, deleted by `Drop` (also when the test panics).

use std::fs::File;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use nix::sched::{setns, CloneFlags};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// Whether the tests run as root (the namespace tests need it).
pub(crate) fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Skips the calling test (returns from it) when not running as root.
macro_rules! require_root {
    () => {
        if !$crate::io::testns::is_root() {
            eprintln!("skipped: needs root for network namespaces");
            return;
        }
    };
}
pub(crate) use require_root;

/// A network namespace created by `ip netns add`, deleted on drop.
pub(crate) struct TestNetns {
    name: String,
}

impl TestNetns {
    /// Creates a namespace named `sdnio-<pid>-<n>-<tag>` with `lo` up.
    pub(crate) fn new(tag: &str) -> TestNetns {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!("sdnio-{}-{n}-{tag}", std::process::id());
        run("ip", &["netns", "add", &name]);
        let ns = TestNetns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    pub(crate) fn path(&self) -> PathBuf {
        PathBuf::from(format!("/run/netns/{}", self.name))
    }

    /// Runs `ip -n <ns> args…`, panicking when it fails.
    pub(crate) fn ip(&self, args: &[&str]) {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        run("ip", &all);
    }

    /// Runs `ip -n <ns> args…` and returns its stdout.
    pub(crate) fn ip_output(&self, args: &[&str]) -> String {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        let out = Command::new("ip").args(&all).output().expect("run ip");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs `f` on a fresh thread that has entered this namespace; fds it
    /// creates stay in the namespace and may be used from any thread.
    pub(crate) fn enter<T: Send, F: FnOnce() -> T + Send>(&self, f: F) -> T {
        let file = File::open(self.path()).expect("open netns");
        std::thread::scope(|s| {
            s.spawn(move || {
                setns(&file, CloneFlags::CLONE_NEWNET).expect("setns");
                f()
            })
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
        })
    }
}

impl Drop for TestNetns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// A veth pair between two test namespaces, with addresses, MTU and link up.
pub(crate) fn veth_pair(a: &TestNetns, a_cidr: &str, b: &TestNetns, b_cidr: &str, mtu: u32) {
    let mtu = mtu.to_string();
    a.ip(&[
        "link",
        "add",
        "va",
        "mtu",
        &mtu,
        "type",
        "veth",
        "peer",
        "name",
        "vb",
        "netns",
        b.name(),
    ]);
    b.ip(&["link", "set", "vb", "mtu", &mtu]);
    a.ip(&["addr", "add", a_cidr, "dev", "va"]);
    b.ip(&["addr", "add", b_cidr, "dev", "vb"]);
    a.ip(&["link", "set", "va", "up"]);
    b.ip(&["link", "set", "vb", "up"]);
}

fn run(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd).args(args).output().expect("spawn");
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
