//! `e2e-check`: the e2e assertions of `tests/e2e` against real clusters
//! described by an inventory of the sdn-tunnel playbooks (used by
//! `tests/e2e/kind/run.sh`; the lab tests call the same functions).
//!
//! ```text
//! e2e-check --inventory inventory.yml installed   # objects the playbook makes
//! e2e-check --inventory inventory.yml rbac        # least privilege, for real
//! e2e-check --inventory inventory.yml mesh [--timeout 180]
//! e2e-check --inventory inventory.yml uninstalled # nothing of ours left
//! ```

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use sdn_tunnel_e2e::checks::{
    check_inventory_installed, check_inventory_rbac, leftovers, read_inventory,
    wait_inventory_connected,
};

const USAGE: &str =
    "usage: e2e-check --inventory FILE [--timeout SECONDS] installed|rbac|mesh|uninstalled";

fn main() -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("e2e-check: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(std::env::args().skip(1).collect())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("e2e-check: FAILED: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Vec<String>) -> Result<()> {
    let mut inventory = None;
    let mut timeout = Duration::from_secs(180);
    let mut what = None;
    let mut it = args.into_iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--inventory" => inventory = Some(PathBuf::from(it.next().context(USAGE)?)),
            "--timeout" => timeout = Duration::from_secs(it.next().context(USAGE)?.parse()?),
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(());
            }
            w if what.is_none() && !w.starts_with('-') => what = Some(w.to_string()),
            other => bail!("unexpected argument {other:?}\n{USAGE}"),
        }
    }
    let inv = read_inventory(&inventory.context(USAGE)?)?;
    match what.as_deref() {
        Some("installed") => {
            check_inventory_installed(&inv).await?;
            println!(
                "e2e-check: installed: every object present in {} clusters",
                inv.len()
            );
        }
        Some("rbac") => {
            let n = check_inventory_rbac(&inv).await?;
            println!("e2e-check: rbac: {n} access reviews and the refused writes as expected");
        }
        Some("mesh") => {
            let took = wait_inventory_connected(&inv, timeout).await?;
            println!(
                "e2e-check: mesh: every node connected to every remote node ({:.1} s)",
                took.as_secs_f64()
            );
        }
        Some("uninstalled") => {
            for c in &inv {
                let left = leftovers(&c.admin().await?).await?;
                if !left.is_empty() {
                    bail!("{}: left behind: {left:?}", c.name);
                }
            }
            println!(
                "e2e-check: uninstalled: nothing of ours in {} clusters",
                inv.len()
            );
        }
        _ => bail!("{USAGE}"),
    }
    Ok(())
}
