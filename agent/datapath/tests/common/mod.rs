//! A tiny in-memory network for two or more `Device`s: datagrams are byte
//! vectors on a queue, addresses are plain `SocketAddr` values, no sockets.

// Test support: panicking on a bad literal is the right failure here, and
// not every test binary uses every helper.
#![allow(dead_code, clippy::unwrap_used)]

use std::collections::VecDeque;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use ipnet::IpNet;
use sdn_tunnel_datapath::{
    Device, DeviceConfig, DropReason, Outcome, PeerConfig, PrivateKey, PublicKey,
};

pub const BUF: usize = 2048;

/// What a device call returned, owned so tests can keep it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Got {
    Done,
    Sent(SocketAddr, Vec<u8>),
    Tun(Vec<u8>),
    Dropped(DropReason),
}

impl Got {
    pub fn from(o: Outcome<'_>) -> Self {
        match o {
            Outcome::Done => Got::Done,
            Outcome::Network { to, datagram } => Got::Sent(to, datagram.to_vec()),
            Outcome::Tunnel { packet } => Got::Tun(packet.to_vec()),
            Outcome::Dropped(r) => Got::Dropped(r),
        }
    }
}

pub struct Node {
    pub dev: Device,
    pub key: PrivateKey,
    /// Source address of the datagrams this node sends.
    pub addr: SocketAddr,
    /// IP packets the device handed to its TUN.
    pub tun: Vec<Vec<u8>>,
    /// Drops reported by `decapsulate` on this node, in order.
    pub drops: Vec<DropReason>,
}

impl Node {
    pub fn new(addr: &str) -> Self {
        Self::with_config(addr, |c| c)
    }

    pub fn with_config(addr: &str, f: impl FnOnce(DeviceConfig) -> DeviceConfig) -> Self {
        let key = PrivateKey::generate();
        Node {
            dev: Device::new(f(DeviceConfig::new(key.clone()))),
            key,
            addr: addr.parse().unwrap(),
            tun: Vec::new(),
            drops: Vec::new(),
        }
    }

    pub fn public(&self) -> PublicKey {
        self.key.public_key()
    }
}

pub fn nets(list: &[&str]) -> Vec<IpNet> {
    list.iter().map(|s| s.parse().unwrap()).collect()
}

/// Peer config for `other` as seen from a node.
pub fn peer_cfg(other: &Node, allowed: &[&str], keepalive: Option<u16>) -> PeerConfig {
    PeerConfig {
        endpoint: Some(other.addr),
        allowed_ips: nets(allowed),
        persistent_keepalive: keepalive,
        ..PeerConfig::new(other.public())
    }
}

pub struct Lab {
    pub nodes: Vec<Node>,
    /// In flight: (sender index, destination, payload).
    pub wire: VecDeque<(usize, SocketAddr, Vec<u8>)>,
    /// Datagrams sent to an address no node has.
    pub lost: Vec<(SocketAddr, Vec<u8>)>,
    /// Every datagram delivered, for replay tests: (to node, bytes).
    pub delivered: Vec<(usize, Vec<u8>)>,
}

impl Lab {
    pub fn new(nodes: Vec<Node>) -> Self {
        Lab {
            nodes,
            wire: VecDeque::new(),
            lost: Vec::new(),
            delivered: Vec::new(),
        }
    }

    /// Two nodes: A (10.1.0.0/16, fd01::/64) and B (10.2.0.0/16, fd02::/64),
    /// each the other's peer with a known endpoint.
    pub fn pair(keepalive: Option<u16>) -> Self {
        let mut a = Node::new("192.0.2.1:51820");
        let mut b = Node::new("192.0.2.2:51820");
        a.dev
            .set_peer(peer_cfg(&b, &["10.2.0.0/16", "fd02::/64"], keepalive))
            .unwrap();
        b.dev
            .set_peer(peer_cfg(&a, &["10.1.0.0/16", "fd01::/64"], keepalive))
            .unwrap();
        Lab::new(vec![a, b])
    }

    /// A packet read from node `i`'s TUN.
    pub fn tun_read(&mut self, i: usize, packet: &[u8]) -> Got {
        let mut out = [0u8; BUF];
        let got = Got::from(self.nodes[i].dev.encapsulate(packet, &mut out));
        if let Got::Sent(to, d) = &got {
            self.wire.push_back((i, *to, d.clone()));
        }
        got
    }

    /// Run node `i`'s timers; returns what they sent (also put on the wire).
    pub fn timers(&mut self, i: usize) -> Vec<(SocketAddr, Vec<u8>)> {
        let mut out = [0u8; BUF];
        let mut sent = Vec::new();
        self.nodes[i]
            .dev
            .update_timers(&mut out, |to, d| sent.push((to, d.to_vec())));
        for (to, d) in &sent {
            self.wire.push_back((i, *to, d.clone()));
        }
        sent
    }

    /// Deliver one datagram to node `dst` as if sent from `src`, then drain
    /// its queue; replies go on the wire. Returns the decapsulate outcome.
    pub fn inject(&mut self, dst: usize, src: SocketAddr, datagram: &[u8]) -> Got {
        let mut out = [0u8; BUF];
        self.delivered.push((dst, datagram.to_vec()));
        let got = Got::from(self.nodes[dst].dev.decapsulate(src, datagram, &mut out));
        match &got {
            Got::Sent(to, d) => self.wire.push_back((dst, *to, d.clone())),
            Got::Tun(p) => self.nodes[dst].tun.push(p.clone()),
            Got::Dropped(r) => self.nodes[dst].drops.push(*r),
            Got::Done => {}
        }
        loop {
            match self.nodes[dst].dev.next_queued(&mut out) {
                Outcome::Network { to, datagram } => {
                    self.wire.push_back((dst, to, datagram.to_vec()))
                }
                Outcome::Done => break,
                other => panic!("next_queued returned {other:?}"),
            }
        }
        got
    }

    /// Deliver everything on the wire until it is quiet.
    pub fn run(&mut self) {
        let mut steps = 0;
        while let Some((from, to, d)) = self.wire.pop_front() {
            steps += 1;
            assert!(steps < 1000, "datagram storm");
            let Some(dst) = self.nodes.iter().position(|n| n.addr == to) else {
                self.lost.push((to, d));
                continue;
            };
            let src = self.nodes[from].addr;
            self.inject(dst, src, &d);
        }
    }

    /// Send `packet` from node `i`'s TUN and run the network.
    pub fn send(&mut self, i: usize, packet: &[u8]) -> Got {
        let got = self.tun_read(i, packet);
        self.run();
        got
    }
}

pub fn v4(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

pub fn v6(s: &str) -> Ipv6Addr {
    s.parse().unwrap()
}

/// A UDP-in-IPv4 packet with a correct total length (checksums are not
/// checked by WireGuard and left zero).
pub fn ipv4_packet(src: Ipv4Addr, dst: Ipv4Addr, payload: &[u8]) -> Vec<u8> {
    let total = 20 + payload.len();
    let mut p = vec![0u8; 20];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    p.extend_from_slice(payload);
    p
}

pub fn ipv6_packet(src: Ipv6Addr, dst: Ipv6Addr, payload: &[u8]) -> Vec<u8> {
    let mut p = vec![0u8; 40];
    p[0] = 0x60;
    p[4..6].copy_from_slice(&(payload.len() as u16).to_be_bytes());
    p[6] = 17;
    p[7] = 64;
    p[8..24].copy_from_slice(&src.octets());
    p[24..40].copy_from_slice(&dst.octets());
    p.extend_from_slice(payload);
    p
}

pub fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// WireGuard message type of a datagram.
pub fn msg_type(d: &[u8]) -> u32 {
    u32::from_le_bytes([d[0], d[1], d[2], d[3]])
}

/// Handshake A→B and back, then check the session carries data.
pub fn establish(lab: &mut Lab) {
    let p = ipv4_packet(v4("10.1.0.5"), v4("10.2.0.7"), b"hello");
    match lab.tun_read(0, &p) {
        Got::Sent(to, d) => {
            assert_eq!(to, lab.nodes[1].addr);
            assert_eq!(msg_type(&d), 1, "first datagram is a handshake initiation");
            assert_eq!(d.len(), 148);
        }
        other => panic!("expected a handshake initiation, got {other:?}"),
    }
    lab.run();
    // The queued packet arrived once the handshake completed.
    assert_eq!(lab.nodes[1].tun, vec![p]);
    lab.nodes[1].tun.clear();
}
