//! Writes the CRDs of sdn-tunnel into a directory (default `deploy/crds`):
//! `cargo run -p sdn-tunnel-api --bin crdgen -- deploy/crds`.

use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let dir = std::env::args_os()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("deploy/crds"));
    match sdn_tunnel_api::crdgen::write_all(&dir) {
        Ok(paths) => {
            for p in paths {
                println!("wrote {p}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("crdgen: {e}");
            ExitCode::FAILURE
        }
    }
}
