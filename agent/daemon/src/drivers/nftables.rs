//! nftables through `nft -j`: our own tables, each replaced atomically.
//!
//! Why `nft -j -f -` rather than a netlink crate: nftables' netlink ABI is
//! a bytecode that `libnftables` compiles from rules; the Rust crates that
//! speak it directly (`nftnl`, `rustables`) cover only part of the
//! expressions we need (`tcp option maxseg size set rt mtu`, `snat to ip
//! saddr`) and are thinly maintained, while the JSON API is libnftables' own
//! stable, documented interface (libnftables-json(5)), takes a whole batch as
//! one kernel transaction, and `nft` ships wherever nftables does. The
//! batches are built as plain JSON values by pure functions, so they are
//! unit-tested without a kernel.
//!
//! Every apply sends one batch: `add table` (so the next command cannot fail
//! on a missing table), `delete table`, `add table` and the table's whole
//! content. nftables commits a batch as a single transaction, so packets see
//! either the old table or the new one, never a half-built or empty one, and
//! nothing left over from an older version of the table survives. No other
//! table is named, so nothing of anyone else's is touched.
//!
//! `nft` runs inside the target namespace: it is spawned from a thread that
//! entered it (a child inherits the namespace of the thread that forks it).

use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use ipnet::IpNet;
use serde_json::{json, Value};
use thiserror::Error;
use tracing::{debug, info};

use super::netns::{self, NetnsError};

/// Our table in the agent's pod namespace (MSS clamping; service proxying
/// adds to it later).
pub const POD_TABLE: &str = "sdn_tunnel";
/// Our table in the node namespace (masquerade exemption). A different name
/// from [`POD_TABLE`] so an agent run with `hostNetwork` by mistake cannot
/// have one replace the other.
pub const NODE_TABLE: &str = "sdn_tunnel_node";
/// Family of both tables: `inet` covers IPv4 and IPv6 with one table.
pub const FAMILY: &str = "inet";

// Our node nat chain must run before srcnat (100).
const _: () = assert!(NODE_NAT_PRIORITY < 100);

/// Priority of our node nat chain: before `srcnat` (100), where iptables
/// (legacy and nft) `POSTROUTING` nat rules and kindnet/ip-masq-agent style
/// masquerade chains sit. See [`node_table`] for why this exempts.
pub const NODE_NAT_PRIORITY: i32 = 90;

/// Errors of the nftables driver.
#[derive(Debug, Error)]
pub enum NftError {
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error("run {nft}: {source}")]
    Spawn { nft: String, source: std::io::Error },
    #[error("nft {what} in {netns} failed ({status}): {stderr}")]
    Failed {
        what: String,
        netns: String,
        status: String,
        stderr: String,
    },
    #[error("nft output is not the JSON expected: {0}")]
    Json(String),
}

/// What the pod namespace table does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodRules {
    /// The TUN interface of the tunnel (`wg0`). TCP SYNs routed into it get
    /// their MSS clamped to the route's MTU, so that TCP never sends segments
    /// the tunnel would have to fragment (or ICMP-bounce) first.
    pub tunnel_interface: String,
}

/// What the node namespace table does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeRules {
    /// Remote clusters' pod and service CIDRs: traffic to them keeps its pod
    /// source address (no masquerade).
    pub remote_cidrs: Vec<IpNet>,
}

/// The batch that replaces table `name` with `objects` (chains, sets,
/// rules, each a libnftables JSON object without the `add` wrapper) in one
/// transaction.
pub fn replace_table_batch(name: &str, objects: Vec<Value>) -> Value {
    let table = json!({"table": {"family": FAMILY, "name": name}});
    let mut commands = vec![
        tagged("add", table.clone()),
        tagged("delete", table.clone()),
        tagged("add", table),
    ];
    commands.extend(objects.into_iter().map(|o| tagged("add", o)));
    tagged("nftables", Value::Array(commands))
}

/// `{"<key>": value}`, moving `value` in. (`json!({ "k": v })` with a
/// `Value` inside copies it through serde: for the service proxy's 200 000
/// map elements that copy cost a second per full table.)
pub fn tagged(key: &str, value: Value) -> Value {
    let mut object = serde_json::Map::with_capacity(1);
    object.insert(key.to_owned(), value);
    Value::Object(object)
}

/// The batch that removes table `name` if it exists (the `add` makes the
/// `delete` unconditional, so this never fails on an absent table).
pub fn remove_table_batch(name: &str) -> Value {
    let table = json!({"table": {"family": FAMILY, "name": name}});
    json!({"nftables": [{"add": table}, {"delete": table}]})
}

/// Content of [`POD_TABLE`]: in the forward hook, `oifname <tun> tcp flags
/// syn tcp option maxseg size set rt mtu` (SYN and SYN-ACK both carry an MSS
/// and both match). `rt mtu` is the MTU of the route the packet takes, i.e.
/// the tunnel's, so the clamp follows MTU changes without a rule change.
pub fn pod_table(rules: &PodRules) -> Vec<Value> {
    let chain = "mss_clamp";
    vec![
        json!({"chain": {
            "family": FAMILY, "table": POD_TABLE, "name": chain,
            "type": "filter", "hook": "forward", "prio": -150, "policy": "accept"
        }}),
        json!({"rule": {
            "family": FAMILY, "table": POD_TABLE, "chain": chain,
            "comment": "sdn-tunnel: clamp TCP MSS to the tunnel path MTU",
            "expr": [
                {"match": {"op": "==", "left": {"meta": {"key": "oifname"}}, "right": rules.tunnel_interface}},
                {"match": {"op": "in", "left": {"payload": {"protocol": "tcp", "field": "flags"}}, "right": "syn"}},
                {"mangle": {
                    "key": {"tcp option": {"name": "maxseg", "field": "size"}},
                    "value": {"rt": {"key": "mtu"}}
                }}
            ]
        }}),
    ]
}

/// The elements of an interval set of one family holding `cidrs` (the
/// other family filtered out, overlaps merged).
pub(crate) fn set_elements(cidrs: &[IpNet], v4: bool) -> Vec<Value> {
    let of_family: Vec<IpNet> = cidrs
        .iter()
        .filter(|c| matches!(c, IpNet::V4(_)) == v4)
        .map(IpNet::trunc)
        .collect();
    // Interval sets refuse overlapping elements: merge them first.
    IpNet::aggregate(&of_family)
        .into_iter()
        .map(|c| json!({"prefix": {"addr": c.addr().to_string(), "len": c.prefix_len()}}))
        .collect()
}

/// Content of [`NODE_TABLE`]: two interval sets of remote CIDRs and a nat
/// postrouting chain at priority [`NODE_NAT_PRIORITY`] that does
/// `ip daddr @remote_v4 snat ip to ip saddr` (and the IPv6 twin).
///
/// Why an identity SNAT and not `accept`: netfilter runs all nat chains of a
/// hook (nft `type nat` chains of every table and family, iptables-nft's and
/// legacy iptables' `nat` tables) from one dispatcher, `nf_nat_inet_fn`, for
/// the first packet of a connection only. It walks them in priority order
/// and, after each chain that accepts, stops as soon as the connection has a
/// NAT binding for that direction (`nf_nat_initialized`). A plain `accept`
/// leaves no binding, so the masquerade chain at `srcnat` would still run;
/// `snat to <its own source>` creates a binding that maps the source to
/// itself, so the later chains — the lab's `lab_node_nat`, kindnet's, an
/// iptables `MASQUERADE` from ip-masq-agent — are never consulted for that
/// connection, and the packet leaves with its pod IP. Other destinations
/// are not matched here and are masqueraded as before. Connections that were
/// already masqueraded before this table existed keep their binding until
/// conntrack forgets them.
pub fn node_table(rules: &NodeRules) -> Vec<Value> {
    let chain = "postrouting";
    let mut objects = Vec::new();
    for (set, ty, v4) in [
        ("remote_v4", "ipv4_addr", true),
        ("remote_v6", "ipv6_addr", false),
    ] {
        let mut s = json!({"set": {
            "family": FAMILY, "table": NODE_TABLE, "name": set,
            "type": ty, "flags": ["interval"]
        }});
        let elements = set_elements(&rules.remote_cidrs, v4);
        if !elements.is_empty() {
            s["set"]["elem"] = Value::Array(elements);
        }
        objects.push(s);
    }
    objects.push(json!({"chain": {
        "family": FAMILY, "table": NODE_TABLE, "name": chain,
        "type": "nat", "hook": "postrouting", "prio": NODE_NAT_PRIORITY, "policy": "accept"
    }}));
    for (proto, set) in [("ip", "@remote_v4"), ("ip6", "@remote_v6")] {
        objects.push(json!({"rule": {
            "family": FAMILY, "table": NODE_TABLE, "chain": chain,
            "comment": "sdn-tunnel: keep pod source IPs towards remote clusters",
            "expr": [
                {"match": {"op": "==", "left": {"payload": {"protocol": proto, "field": "daddr"}}, "right": set}},
                {"counter": {"packets": 0, "bytes": 0}},
                {"snat": {"family": proto, "addr": {"payload": {"protocol": proto, "field": "saddr"}}}}
            ]
        }}));
    }
    objects
}

/// Runs `nft` batches in one network namespace.
#[derive(Debug, Clone)]
pub struct NftDriver {
    netns: Option<PathBuf>,
    nft: PathBuf,
}

impl NftDriver {
    /// A driver for `netns` (`None`: the agent's own), using `nft` from PATH.
    pub fn new(netns: Option<&Path>) -> Self {
        Self::with_binary(netns, Path::new("nft"))
    }

    /// A driver using a specific `nft` binary.
    pub fn with_binary(netns: Option<&Path>, nft: &Path) -> Self {
        NftDriver {
            netns: netns.map(Path::to_path_buf),
            nft: nft.to_path_buf(),
        }
    }

    /// Replaces [`POD_TABLE`] with `rules`, atomically.
    pub async fn apply_pod(&self, rules: &PodRules) -> Result<(), NftError> {
        self.replace_table(POD_TABLE, pod_table(rules)).await
    }

    /// Replaces [`NODE_TABLE`] with `rules`, atomically.
    pub async fn apply_node(&self, rules: &NodeRules) -> Result<(), NftError> {
        self.replace_table(NODE_TABLE, node_table(rules)).await
    }

    /// Replaces table `name` with `objects` in one transaction.
    pub async fn replace_table(&self, name: &str, objects: Vec<Value>) -> Result<(), NftError> {
        let count = objects.len();
        self.run_batch(
            &format!("replace table {name}"),
            &replace_table_batch(name, objects),
        )
        .await?;
        info!(netns = %netns::describe(self.netns.as_deref()), table = name, objects = count, "nftables table replaced");
        Ok(())
    }

    /// Removes table `name` (no error if it is absent).
    pub async fn remove_table(&self, name: &str) -> Result<(), NftError> {
        self.run_batch(&format!("remove table {name}"), &remove_table_batch(name))
            .await?;
        info!(netns = %netns::describe(self.netns.as_deref()), table = name, "nftables table removed");
        Ok(())
    }

    /// The JSON listing of table `name` (`nft -j list table inet <name>`),
    /// or `None` if it does not exist.
    pub async fn list_table(&self, name: &str) -> Result<Option<Value>, NftError> {
        let out = self
            .run(
                vec![
                    "-j".into(),
                    "list".into(),
                    "table".into(),
                    FAMILY.into(),
                    name.into(),
                ],
                None,
            )
            .await?;
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr);
            if stderr.contains("No such file or directory") {
                return Ok(None);
            }
            return Err(self.failed(&format!("list table {name}"), &out));
        }
        serde_json::from_slice(&out.stdout)
            .map(Some)
            .map_err(|e| NftError::Json(e.to_string()))
    }

    /// Sends one JSON batch through `nft -j -f -`.
    pub async fn run_batch(&self, what: &str, batch: &Value) -> Result<(), NftError> {
        debug!(netns = %netns::describe(self.netns.as_deref()), what, %batch, "nft batch");
        let out = self
            .run(
                vec!["-j".into(), "-f".into(), "-".into()],
                Some(batch.to_string().into_bytes()),
            )
            .await?;
        if out.status.success() {
            Ok(())
        } else {
            Err(self.failed(what, &out))
        }
    }

    fn failed(&self, what: &str, out: &std::process::Output) -> NftError {
        NftError::Failed {
            what: what.to_string(),
            netns: netns::describe(self.netns.as_deref()),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        }
    }

    async fn run(
        &self,
        args: Vec<String>,
        stdin: Option<Vec<u8>>,
    ) -> Result<std::process::Output, NftError> {
        let nft = self.nft.clone();
        let shown = nft.display().to_string();
        netns::in_netns_async(self.netns.as_deref(), move || {
            let mut child = Command::new(&nft)
                .args(&args)
                .stdin(if stdin.is_some() {
                    Stdio::piped()
                } else {
                    Stdio::null()
                })
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()?;
            if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
                pipe.write_all(&input)?;
            }
            child.wait_with_output()
        })
        .await?
        .map_err(|source| NftError::Spawn { nft: shown, source })
    }
}

/// Whether traffic to `ip` is exempted from masquerade by `rules`.
pub fn is_exempt(rules: &NodeRules, ip: IpAddr) -> bool {
    rules.remote_cidrs.iter().any(|c| c.contains(&ip))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn commands(batch: &Value) -> &Vec<Value> {
        batch["nftables"].as_array().unwrap()
    }

    #[test]
    fn replace_is_one_batch_that_recreates_only_our_table() {
        let batch = replace_table_batch(
            POD_TABLE,
            pod_table(&PodRules {
                tunnel_interface: "wg0".into(),
            }),
        );
        let cmds = commands(&batch);
        assert_eq!(
            cmds[0],
            json!({"add": {"table": {"family": "inet", "name": "sdn_tunnel"}}})
        );
        assert_eq!(
            cmds[1],
            json!({"delete": {"table": {"family": "inet", "name": "sdn_tunnel"}}})
        );
        assert_eq!(cmds[2], cmds[0]);
        // every command names our table and nothing else
        for cmd in cmds {
            let obj = cmd.as_object().unwrap().values().next().unwrap();
            let inner = obj.as_object().unwrap().values().next().unwrap();
            let table = inner
                .get("table")
                .and_then(Value::as_str)
                .or_else(|| inner.get("name").and_then(Value::as_str));
            assert_eq!(table, Some(POD_TABLE), "{cmd}");
        }
    }

    #[test]
    fn mss_clamp_rule_targets_the_tunnel_interface() {
        let objs = pod_table(&PodRules {
            tunnel_interface: "wg7".into(),
        });
        let rule = &objs[1]["rule"];
        assert_eq!(rule["expr"][0]["match"]["right"], "wg7");
        assert_eq!(
            rule["expr"][2]["mangle"]["value"],
            json!({"rt": {"key": "mtu"}})
        );
        assert_eq!(objs[0]["chain"]["hook"], "forward");
    }

    #[test]
    fn node_sets_are_split_by_family_and_merged() {
        let rules = NodeRules {
            remote_cidrs: vec![
                "10.2.0.0/16".parse().unwrap(),
                "10.2.5.0/24".parse().unwrap(),
                "10.102.0.0/16".parse().unwrap(),
                "fd00:2::/48".parse().unwrap(),
            ],
        };
        let objs = node_table(&rules);
        let v4 = objs[0]["set"]["elem"].as_array().unwrap();
        assert_eq!(v4.len(), 2, "10.2.5.0/24 is inside 10.2.0.0/16: {v4:?}");
        assert_eq!(v4[0], json!({"prefix": {"addr": "10.2.0.0", "len": 16}}));
        assert_eq!(objs[1]["set"]["elem"].as_array().unwrap().len(), 1);
        assert_eq!(objs[2]["chain"]["prio"], NODE_NAT_PRIORITY);
        assert_eq!(
            objs[3]["rule"]["expr"][2]["snat"]["addr"]["payload"]["field"],
            "saddr"
        );
        assert!(is_exempt(&rules, "10.2.9.9".parse().unwrap()));
        assert!(!is_exempt(&rules, "10.3.0.1".parse().unwrap()));
    }

    #[test]
    fn empty_node_sets_have_no_elem_key() {
        let objs = node_table(&NodeRules {
            remote_cidrs: vec![],
        });
        assert!(objs[0]["set"].get("elem").is_none());
        assert!(objs[1]["set"].get("elem").is_none());
    }
}
