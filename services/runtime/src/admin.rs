//! The admin HTTP listener of a service (SPEC §2, §8): `/health` (the process is alive),
//! `/ready` (every dependency answered its check just now; 503 naming the failing ones otherwise)
//! and `/metrics` (Prometheus text from the recorder installed by [`install_metrics`]).

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

/// How long one readiness check may take before it counts as failed.
pub const READY_CHECK_TIMEOUT: Duration = Duration::from_secs(2);

type CheckFuture = Pin<Box<dyn Future<Output = bool> + Send>>;

/// A named readiness check: `true` when the dependency is reachable.
#[derive(Clone)]
pub struct ReadyCheck {
    name: &'static str,
    check: Arc<dyn Fn() -> CheckFuture + Send + Sync>,
}

impl ReadyCheck {
    pub fn new<F, Fut>(name: &'static str, check: F) -> ReadyCheck
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = bool> + Send + 'static,
    {
        ReadyCheck { name, check: Arc::new(move || Box::pin(check())) }
    }
}

/// Installs the process-wide Prometheus recorder behind the `metrics` facade. Call once, early.
pub fn install_metrics() -> anyhow::Result<PrometheusHandle> {
    let buckets = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];
    let handle = PrometheusBuilder::new().set_buckets(&buckets)?.install_recorder()?;
    Ok(handle)
}

#[derive(Clone)]
struct Admin {
    metrics: PrometheusHandle,
    checks: Arc<Vec<ReadyCheck>>,
}

/// The admin routes, for services that serve them on their main HTTP listener too.
pub fn router(metrics: PrometheusHandle, checks: Vec<ReadyCheck>) -> Router {
    let state = Admin { metrics, checks: Arc::new(checks) };
    Router::new()
        .route(
            "/health",
            get(|| async { (StatusCode::OK, [(header::CONTENT_TYPE, "application/json")], "{\"status\":\"ok\"}") }),
        )
        .route("/ready", get(ready))
        .route("/metrics", get(metrics_text))
        .with_state(state)
}

/// Serves the admin routes on `addr` until `shutdown` resolves.
pub async fn serve(
    addr: SocketAddr,
    metrics: PrometheusHandle,
    checks: Vec<ReadyCheck>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "admin HTTP listening (/health, /ready, /metrics)");
    axum::serve(listener, router(metrics, checks)).with_graceful_shutdown(shutdown).await?;
    Ok(())
}

async fn ready(State(admin): State<Admin>) -> impl IntoResponse {
    let mut failing = Vec::new();
    for check in admin.checks.iter() {
        let ok = tokio::time::timeout(READY_CHECK_TIMEOUT, (check.check)()).await.unwrap_or(false);
        if !ok {
            failing.push(check.name);
        }
    }
    let status = if failing.is_empty() { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    let body = serde_json::json!({
        "status": if failing.is_empty() { "ready" } else { "not_ready" },
        "failing": failing,
    });
    (status, [(header::CONTENT_TYPE, "application/json")], body.to_string())
}

async fn metrics_text(State(admin): State<Admin>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], admin.metrics.render())
}
