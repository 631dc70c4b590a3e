//! `/metrics`, `/healthz` and `/readyz` on `--metrics-addr`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio_util::sync::CancellationToken;

use crate::ops::health::{Health, Liveness};
use crate::ops::metrics::Metrics;

#[derive(Clone)]
struct AppState {
    metrics: Arc<Metrics>,
    health: Arc<Health>,
}

#[derive(Debug, thiserror::Error)]
#[error("cannot listen on --metrics-addr {addr}: {source}")]
pub struct BindError {
    pub addr: SocketAddr,
    #[source]
    pub source: std::io::Error,
}

/// Binds first (so a taken port fails start-up), then serves until `shutdown`.
pub async fn spawn(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    shutdown: CancellationToken,
) -> Result<SocketAddr, BindError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| BindError { addr, source })?;
    let local = listener
        .local_addr()
        .map_err(|source| BindError { addr, source })?;
    let app = Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(live_handler))
        .route("/readyz", get(ready_handler))
        .with_state(AppState { metrics, health });
    tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "metrics server failed");
        }
    });
    Ok(local)
}

async fn metrics_handler(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.encode(),
    )
}

async fn ready_handler(State(state): State<AppState>) -> impl IntoResponse {
    let health = &state.health;
    let body = format!(
        "stream_connected={} index_loaded={}\n",
        health.stream_connected.load(Ordering::Relaxed),
        health.index_loaded.load(Ordering::Relaxed)
    );
    let status = if health.ready() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, body)
}

async fn live_handler(State(state): State<AppState>) -> impl IntoResponse {
    match state.health.liveness() {
        Liveness::Starting => (StatusCode::OK, "ok: starting\n".to_owned()),
        Liveness::Alive { .. } => (StatusCode::OK, "ok\n".to_owned()),
        Liveness::Wedged { since } => {
            tracing::error!(
                since_s = since.as_secs(),
                "liveness failing: the message loop has not run for longer than --liveness-timeout"
            );
            (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("message loop last ran {}s ago\n", since.as_secs()),
            )
        }
    }
}
