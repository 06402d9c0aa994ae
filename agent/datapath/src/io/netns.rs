//! Running a short piece of code inside another network namespace.
//!
//! The network namespace is a per-thread attribute on Linux, so
//! [`run_in`] spawns a short-lived thread, moves it into the namespace with
//! `setns(CLONE_NEWNET)`, runs the closure there and returns its result; the
//! calling thread (and the rest of the process) never changes namespace.
//! Sockets created by the closure stay bound to the namespace they were
//! created in and can be used from any thread afterwards.

use std::fs::File;
use std::io;
use std::path::Path;

use nix::sched::{setns, CloneFlags};

/// Runs `f` on a dedicated thread inside the network namespace at `path`
/// (`/run/netns/<name>`, `/proc/<pid>/ns/net`, …) and returns its result.
pub fn run_in<T, F>(path: &Path, f: F) -> io::Result<T>
where
    T: Send,
    F: FnOnce() -> io::Result<T> + Send,
{
    let file = File::open(path)
        .map_err(|e| io::Error::new(e.kind(), format!("open netns {}: {e}", path.display())))?;
    std::thread::scope(|s| {
        s.spawn(move || {
            setns(&file, CloneFlags::CLONE_NEWNET).map_err(|e| {
                io::Error::new(
                    io::Error::from(e).kind(),
                    format!("setns into {}: {e}", path.display()),
                )
            })?;
            f()
        })
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::testns::{require_root, TestNetns};

    fn own_netns_inode() -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata("/proc/thread-self/ns/net").unwrap().ino()
    }

    #[test]
    fn closure_runs_in_the_namespace_and_caller_stays() {
        require_root!();
        let ns = TestNetns::new("nsrun");
        let before = own_netns_inode();
        let inside = run_in(&ns.path(), || Ok(own_netns_inode())).unwrap();
        use std::os::unix::fs::MetadataExt;
        let target = std::fs::metadata(ns.path()).unwrap().ino();
        assert_eq!(inside, target);
        assert_ne!(inside, before);
        assert_eq!(own_netns_inode(), before);
    }

    #[test]
    fn bad_paths_are_errors() {
        let e = run_in(Path::new("/nonexistent/netns"), || Ok(())).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        // A regular file is not a namespace: setns refuses it.
        if crate::io::testns::is_root() {
            let e = run_in(Path::new("/proc/self/status"), || Ok(())).unwrap_err();
            assert!(e.to_string().contains("setns"), "{e}");
        }
    }
}
