//! `/healthz` (the process answers) and `/readyz` (local cluster synced,
//! TunnelPeer published, tunnel up, last apply succeeded) for the
//! DaemonSet's probes, and `/metrics` (see [`crate::metrics`]).

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::warn;

use crate::metrics::{self, Metrics};

/// Where the data path stands, for `/readyz`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Readiness {
    pub local_synced: bool,
    pub published: bool,
    pub tunnel_up: bool,
    pub last_apply_ok: bool,
}

impl Readiness {
    pub fn ready(&self) -> bool {
        self.local_synced && self.published && self.tunnel_up && self.last_apply_ok
    }
}

/// Serves the probes and `/metrics` until the process ends.
pub async fn serve(
    listener: TcpListener,
    readiness: watch::Receiver<Readiness>,
    metrics: Arc<Metrics>,
) {
    let app = Router::new()
        .route("/readyz", get(readyz))
        .with_state(readiness)
        .merge(common(metrics));
    if let Err(e) = axum::serve(listener, app).await {
        warn!(error = %e, "health endpoint stopped");
    }
}

/// Serves `/healthz` and `/metrics` only (standalone mode: there is no
/// control plane to be ready for).
pub async fn serve_metrics(listener: TcpListener, metrics: Arc<Metrics>) {
    if let Err(e) = axum::serve(listener, common(metrics)).await {
        warn!(error = %e, "metrics endpoint stopped");
    }
}

fn common(metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics_text))
        .with_state(metrics)
}

async fn metrics_text(State(m): State<Arc<Metrics>>) -> impl IntoResponse {
    match m.render() {
        Ok(text) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, metrics::CONTENT_TYPE)],
            text,
        ),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            format!("encoding metrics: {e}\n"),
        ),
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
