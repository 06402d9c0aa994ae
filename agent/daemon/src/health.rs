//! `/healthz` (the process answers) and `/readyz` (local cluster synced,
//! TunnelPeer published, tunnel up, last apply succeeded) for the
//! DaemonSet's probes.

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::warn;

use crate::agent::Readiness;

/// Serves the probes until the process ends.
pub async fn serve(listener: TcpListener, readiness: watch::Receiver<Readiness>) {
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(readiness);
    if let Err(e) = axum::serve(listener, app).await {
        warn!(error = %e, "health endpoint stopped");
    }
}

async fn readyz(State(readiness): State<watch::Receiver<Readiness>>) -> (StatusCode, String) {
    let r = readiness.borrow().clone();
    let body = format!(
        "local cluster synced: {}\nTunnelPeer published: {}\ntunnel up: {}\nlast apply ok: {}\n",
        r.local_synced, r.published, r.tunnel_up, r.last_apply_ok
    );
    if r.ready() {
        (StatusCode::OK, body)
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, body)
    }
}
