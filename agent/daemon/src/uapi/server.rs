//! The UAPI socket server: `<dir>/<interface>.sock`, one thread per
//! connection, driving a [`Target`] — a tunnel UAPI configures (standalone
//! mode, the `standalone` module) or a running tunnel found by interface
//! name, read only.

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use sdn_tunnel_datapath::keys::PrivateKey;
use tracing::{debug, info, warn};

use super::proto::{
    format_get, parse_set, serve_connection, DeviceState, Handler, PeerState, SetRequest, UapiError,
};
use crate::tunnel::{self, TunnelView};

/// Default directory of the sockets (wireguard-go's).
pub const DEFAULT_SOCKET_DIR: &str = "/var/run/wireguard";

/// A tunnel whose configuration UAPI owns (standalone mode): the server
/// answers `get` and applies `set` through it.
pub trait Configurable: Send {
    /// The `get` answer (see [`get_from_view`]).
    fn get(&self) -> Result<String, UapiError>;
    /// Applies a parsed set.
    fn set(&mut self, req: &SetRequest) -> Result<(), UapiError>;
}

/// Which tunnel a server drives.
pub enum Target {
    /// Standalone mode: UAPI owns the configuration.
    ReadWrite(Arc<Mutex<dyn Configurable>>),
    /// `run` mode: the tunnel on this TUN, read only; the private key in
    /// `key_file` (the agent's) is shown when it matches the device, so
    /// that `wg show` prints the public key.
    ReadOnly {
        interface: String,
        key_file: Option<PathBuf>,
    },
}

/// The `get` answer for the device behind `view`; `private_key` is shown
/// when it is the device's.
pub fn get_from_view(view: &TunnelView, private_key: Option<&PrivateKey>, fwmark: u32) -> String {
    let state = view.with_device(|dev| {
        let own = dev.public_key();
        DeviceState {
            private_key: private_key.filter(|k| k.public_key() == own).cloned(),
            listen_port: view.local_addr().port(),
            fwmark,
            peers: dev
                .stats()
                .into_iter()
                .map(|stats| PeerState {
                    preshared_key: dev
                        .peer_config(&stats.public_key)
                        .and_then(|c| c.preshared_key),
                    stats,
                })
                .collect(),
        }
    });
    format_get(&state, SystemTime::now())
}

struct ConnHandler {
    target: Arc<Target>,
}

impl Handler for ConnHandler {
    fn get(&mut self) -> Result<String, UapiError> {
        match &*self.target {
            Target::ReadWrite(s) => s.lock().unwrap_or_else(|e| e.into_inner()).get(),
            Target::ReadOnly {
                interface,
                key_file,
            } => {
                let view = tunnel::running(interface)
                    .ok_or_else(|| UapiError::Io(format!("no tunnel running on {interface}")))?;
                let key = key_file.as_deref().and_then(|p| PrivateKey::load(p).ok());
                Ok(get_from_view(&view, key.as_ref(), 0))
            }
        }
    }

    fn set(&mut self, lines: &[String]) -> Result<(), UapiError> {
        let req = parse_set(lines)?;
        match &*self.target {
            Target::ReadWrite(s) => s.lock().unwrap_or_else(|e| e.into_inner()).set(&req),
            Target::ReadOnly { .. } => {
                warn!(
                    lines = lines.len(),
                    "UAPI set refused: under `tunnel-agent run` the control plane owns the peers"
                );
                Err(UapiError::ReadOnly(
                    "the control plane owns this tunnel's configuration".into(),
                ))
            }
        }
    }
}

/// Errors starting the UAPI server.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("UAPI socket directory {0}: {1}")]
    Dir(PathBuf, io::Error),
    #[error("UAPI socket {0} is in use by another process")]
    InUse(PathBuf),
    #[error("UAPI socket {0}: {1}")]
    Socket(PathBuf, io::Error),
}

/// The listening UAPI socket; dropping it stops accepting and removes the
/// socket file.
pub struct Server {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// The socket path of `interface` in `dir`.
pub fn socket_path(dir: &Path, interface: &str) -> PathBuf {
    dir.join(format!("{interface}.sock"))
}

impl Server {
    /// Listens on `<dir>/<interface>.sock` (directory created 0755 as
    /// wireguard-go does, socket 0600: only root may configure). A stale
    /// socket nobody answers on is replaced; a live one is an error.
    pub fn start(dir: &Path, interface: &str, target: Target) -> Result<Server, ServerError> {
        std::fs::create_dir_all(dir).map_err(|e| ServerError::Dir(dir.to_owned(), e))?;
        let path = socket_path(dir, interface);
        let listener = match UnixListener::bind(&path) {
            Ok(l) => l,
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
                if UnixStream::connect(&path).is_ok() {
                    return Err(ServerError::InUse(path));
                }
                std::fs::remove_file(&path).map_err(|e| ServerError::Socket(path.clone(), e))?;
                UnixListener::bind(&path).map_err(|e| ServerError::Socket(path.clone(), e))?
            }
            Err(e) => return Err(ServerError::Socket(path, e)),
        };
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| ServerError::Socket(path.clone(), e))?;
        let stop = Arc::new(AtomicBool::new(false));
        let target = Arc::new(target);
        let s = stop.clone();
        let thread = std::thread::Builder::new()
            .name("uapi".into())
            .spawn(move || accept_loop(&listener, &s, &target))
            .map_err(|e| ServerError::Socket(path.clone(), e))?;
        info!(socket = %path.display(), "UAPI listening");
        Ok(Server {
            path,
            stop,
            thread: Some(thread),
        })
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn accept_loop(listener: &UnixListener, stop: &AtomicBool, target: &Arc<Target>) {
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok(_) if stop.load(Ordering::Relaxed) => break,
            Ok((stream, _)) => {
                let target = target.clone();
                let spawned =
                    std::thread::Builder::new()
                        .name("uapi-conn".into())
                        .spawn(move || {
                            // Blocking I/O with a bound: a stuck client cannot
                            // hold a thread forever.
                            let _ = stream.set_nonblocking(false);
                            let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
                            let _ = stream.set_write_timeout(Some(Duration::from_secs(30)));
                            let mut h = ConnHandler { target };
                            if let Err(e) = serve_connection(&stream, &mut h) {
                                debug!(error = %e, "UAPI connection ended");
                            }
                        });
                if let Err(e) = spawned {
                    warn!(error = %e, "cannot start a UAPI connection thread");
                }
            }
            Err(e) => {
                warn!(error = %e, "UAPI accept failed");
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wake the blocking accept; it sees the stop flag. If the socket
        // cannot be reached any more the thread is left to the process end.
        if UnixStream::connect(&self.path).is_ok() {
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
        }
        let _ = std::fs::remove_file(&self.path);
    }
}
