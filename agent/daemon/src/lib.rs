//! The `tunnel-agent` library: configuration, the control plane (kube
//! watches, publishing and status) and the drivers that apply the desired
//! state; `main.rs` wires them into the binary.

pub mod agent;
pub mod config;
pub mod control;
pub mod dns;
pub mod drivers;
pub mod health;
pub mod logging;
pub mod metrics;
pub mod standalone;
pub mod static_peers;
pub mod tunnel;
pub mod uapi;
pub mod wgconf;
