//! The UAPI socket as `tunnel-agent run` serves it: the tunnel's peers come
//! from the control plane (`Tunnel::set_peers`), `wg show` reads them
//! through the socket, and `wg set` is refused with EPERM and changes
//! nothing. `/metrics` finds the same tunnel by its interface name.
//!
//! Needs root and `wg` (`make test` installs it). The TUN lives in a
//! network namespace made here (removed by a `Drop` guard); the socket has
//! a name unique to this process.

// Setup helpers panic on failure on purpose: a test that cannot set up fails.
#![allow(clippy::unwrap_used)]

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

use sdn_tunnel_agent::drivers::netns::in_netns;
use sdn_tunnel_agent::metrics::Metrics;
use sdn_tunnel_agent::tunnel::{bind_udp, Tunnel, TunnelPeer};
use sdn_tunnel_agent::uapi::{Server, Target, DEFAULT_SOCKET_DIR};
use sdn_tunnel_datapath::device::{Device, DeviceConfig};
use sdn_tunnel_datapath::io::tun::{Tun, TunOptions};
use sdn_tunnel_datapath::keys::PrivateKey;
use support::Netns;

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn wg(args: &[&str]) -> std::process::Output {
    Command::new("wg").args(args).output().unwrap()
}

#[test]
fn run_mode_socket_is_read_only() {
    let pid = std::process::id();
    let iface = format!("sdnro{}", pid % 1_000_000);
    let ns = Netns::new("uapiro");
    let key_file = std::env::temp_dir().join(format!("sdnt-uapiro-{pid}.key"));
    let _ = std::fs::remove_file(&key_file);
    let _cleanup = RemoveOnDrop(key_file.clone());
    let (key, _) = PrivateKey::load_or_generate(&key_file).unwrap();

    let name = iface.clone();
    let tun = in_netns(Some(&ns.path()), move || {
        Tun::create(&TunOptions {
            name,
            mtu: Some(1420),
            multi_queue: false,
            up: true,
            offload: false,
        })
    })
    .unwrap()
    .unwrap();
    let udp = bind_udp("0.0.0.0:0".parse().unwrap(), Some(&ns.path())).unwrap();
    let tunnel = Tunnel::start(Device::new(DeviceConfig::new(key.clone())), tun, udp).unwrap();
    let peer_key = PrivateKey::generate().public_key();
    let endpoint: SocketAddr = "192.0.2.7:51820".parse().unwrap();
    let failed = tunnel.set_peers(&[TunnelPeer {
        public_key: peer_key,
        endpoint: Some(endpoint),
        allowed_ips: vec!["10.44.0.0/16".parse().unwrap()],
        persistent_keepalive: None,
    }]);
    assert!(failed.is_empty(), "{failed:?}");

    let server = Server::start(
        Path::new(DEFAULT_SOCKET_DIR),
        &iface,
        Target::ReadOnly {
            interface: iface.clone(),
            key_file: Some(key_file.clone()),
        },
    )
    .unwrap();

    let show = wg(&["show", &iface, "dump"]);
    assert!(show.status.success(), "{show:?}");
    let text = String::from_utf8_lossy(&show.stdout).into_owned();
    let mut lines = text.lines();
    let dev: Vec<&str> = lines.next().unwrap().split('\t').collect();
    assert_eq!(dev[1], key.public_key().to_base64(), "{text}");
    assert_eq!(dev[2], tunnel.local_addr().port().to_string(), "{text}");
    let p: Vec<&str> = lines.next().unwrap().split('\t').collect();
    assert_eq!(p[0], peer_key.to_base64());
    assert_eq!(p[2], "192.0.2.7:51820");
    assert_eq!(p[3], "10.44.0.0/16");
    assert!(lines.next().is_none(), "{text}");

    // The control plane owns the peers: sets are refused, nothing changes.
    let set = wg(&["set", &iface, "peer", &peer_key.to_base64(), "remove"]);
    assert!(!set.status.success());
    let why = String::from_utf8_lossy(&set.stderr);
    assert!(why.contains("Operation not permitted"), "{why}");
    assert_eq!(tunnel.stats().len(), 1);
    let again = wg(&["show", &iface, "dump"]);
    assert_eq!(String::from_utf8_lossy(&again.stdout), text);

    // /metrics finds the same tunnel by name.
    let m = Metrics::new(&iface).render().unwrap();
    assert!(
        m.contains(&format!("sdn_tunnel_peers{{interface=\"{iface}\"}} 1\n")),
        "{m}"
    );

    // When the tunnel is gone the socket says so instead of inventing state.
    drop(tunnel);
    let gone = wg(&["show", &iface]);
    assert!(!gone.status.success());
    let m = Metrics::new(&iface).render().unwrap();
    assert!(
        m.contains(&format!("sdn_tunnel_up{{interface=\"{iface}\"}} 0\n")),
        "{m}"
    );
    let path = server.path().to_owned();
    drop(server);
    assert!(!path.exists());
}
