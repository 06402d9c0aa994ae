//! What a `set` does to a device's configuration, as wireguard-go's
//! `device/uapi.go` does it ([`Config::apply`]), the set that reproduces a
//! configuration ([`Config::to_set_lines`]), and the [`plan`] of changes
//! from one configuration to another.

use std::collections::BTreeMap;

use sdn_tunnel_datapath::device::PeerConfig;
use sdn_tunnel_datapath::keys::{PrivateKey, PublicKey};

use super::proto::{private_to_bytes, to_hex, PeerOp, SetRequest};

/// The configurable state of a device, as UAPI sees it.
#[derive(Debug, Clone, Default)]
pub struct Config {
    pub private_key: Option<PrivateKey>,
    pub listen_port: u16,
    pub fwmark: u32,
    pub peers: BTreeMap<PublicKey, PeerConfig>,
}

impl PartialEq for Config {
    fn eq(&self, other: &Self) -> bool {
        self.private_key.as_ref().map(PrivateKey::public_key)
            == other.private_key.as_ref().map(PrivateKey::public_key)
            && self.listen_port == other.listen_port
            && self.fwmark == other.fwmark
            && self.peers == other.peers
    }
}

/// A peer as UAPI creates it: nothing set, no keepalive.
pub fn new_peer(public_key: PublicKey) -> PeerConfig {
    let mut p = PeerConfig::new(public_key);
    p.persistent_keepalive = None;
    p
}

impl Config {
    /// The configuration after `req`.
    pub fn apply(&self, req: &SetRequest) -> Config {
        let mut c = self.clone();
        if let Some(k) = &req.private_key {
            c.private_key = k.clone();
            if let Some(k) = k {
                // A device cannot be its own peer.
                c.peers.remove(&k.public_key());
            }
        }
        if let Some(p) = req.listen_port {
            c.listen_port = p;
        }
        if let Some(m) = req.fwmark {
            c.fwmark = m;
        }
        if req.replace_peers {
            c.peers.clear();
        }
        let own = c.private_key.as_ref().map(PrivateKey::public_key);
        for block in &req.peers {
            let key = block.public_key;
            // A block for our own key is parsed but changes nothing.
            let mut dummy = own == Some(key);
            let created = !dummy && !c.peers.contains_key(&key);
            if created {
                c.peers.insert(key, new_peer(key));
            }
            for op in &block.ops {
                match op {
                    PeerOp::UpdateOnly => {
                        if created && !dummy {
                            c.peers.remove(&key);
                            dummy = true;
                        }
                    }
                    PeerOp::Remove => {
                        if !dummy {
                            c.peers.remove(&key);
                        }
                        dummy = true;
                    }
                    _ if dummy => {}
                    PeerOp::AllowedIp { net, remove: false } => {
                        // A prefix belongs to one peer: it moves here.
                        for (k, p) in c.peers.iter_mut() {
                            if *k != key {
                                p.allowed_ips.retain(|n| n != net);
                            }
                        }
                        if let Some(p) = c.peers.get_mut(&key) {
                            if !p.allowed_ips.contains(net) {
                                p.allowed_ips.push(*net);
                            }
                        }
                    }
                    op => {
                        let Some(p) = c.peers.get_mut(&key) else {
                            continue;
                        };
                        match op {
                            PeerOp::PresharedKey(k) => p.preshared_key = *k,
                            PeerOp::Endpoint(e) => p.endpoint = Some(*e),
                            PeerOp::PersistentKeepalive(s) => {
                                p.persistent_keepalive = (*s > 0).then_some(*s);
                            }
                            PeerOp::ReplaceAllowedIps => p.allowed_ips.clear(),
                            PeerOp::AllowedIp { net, remove: true } => {
                                p.allowed_ips.retain(|n| n != net);
                            }
                            _ => {}
                        }
                    }
                }
            }
        }
        c
    }

    /// This configuration as a `set` that reproduces it from any state
    /// (what `wg setconf` sends for the file `wg showconf` prints).
    pub fn to_set_lines(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(k) = &self.private_key {
            out.push(format!("private_key={}", to_hex(&private_to_bytes(k))));
        }
        out.push(format!("listen_port={}", self.listen_port));
        out.push(format!("fwmark={}", self.fwmark));
        out.push("replace_peers=true".into());
        for p in self.peers.values() {
            out.push(format!("public_key={}", to_hex(p.public_key.as_bytes())));
            if let Some(k) = &p.preshared_key {
                out.push(format!("preshared_key={}", to_hex(k)));
            }
            if let Some(e) = p.endpoint {
                out.push(format!("endpoint={e}"));
            }
            out.push(format!(
                "persistent_keepalive_interval={}",
                p.persistent_keepalive.unwrap_or(0)
            ));
            out.push("replace_allowed_ips=true".into());
            for n in &p.allowed_ips {
                out.push(format!("allowed_ip={n}"));
            }
        }
        out
    }
}

/// What changes on the device to go from one configuration to another.
#[derive(Debug, Clone, Default)]
pub struct Plan {
    pub private_key: Option<Option<PrivateKey>>,
    pub listen_port: Option<u16>,
    pub fwmark: Option<u32>,
    pub removed: Vec<PublicKey>,
    /// New or changed peers, complete.
    pub upserts: Vec<PeerConfig>,
    /// Peers whose keepalive was just turned on: handshake now, as
    /// wireguard-go sends a keepalive then.
    pub keepalive_on: Vec<PublicKey>,
}

/// The difference between `old` and `new`.
pub fn plan(old: &Config, new: &Config) -> Plan {
    let old_pub = old.private_key.as_ref().map(PrivateKey::public_key);
    let new_pub = new.private_key.as_ref().map(PrivateKey::public_key);
    let mut plan = Plan {
        private_key: (old_pub != new_pub).then(|| new.private_key.clone()),
        listen_port: (old.listen_port != new.listen_port).then_some(new.listen_port),
        fwmark: (old.fwmark != new.fwmark).then_some(new.fwmark),
        ..Plan::default()
    };
    plan.removed = old
        .peers
        .keys()
        .filter(|k| !new.peers.contains_key(k))
        .copied()
        .collect();
    for (k, p) in &new.peers {
        let before = old.peers.get(k);
        if before != Some(p) {
            plan.upserts.push(p.clone());
        }
        let was_on = before.is_some_and(|b| b.persistent_keepalive.is_some());
        if p.persistent_keepalive.is_some() && !was_on {
            plan.keepalive_on.push(*k);
        }
    }
    plan
}
