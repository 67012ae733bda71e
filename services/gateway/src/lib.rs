//! securepay-gateway: the public edge (SPEC §2–§5, §8) — the `/api/v1` HTTP API on axum, JWT
//! verification, rate limits, strict input, RFC 9457 errors, the OpenAPI document — in front of
//! the payment, account and notification services (gRPC).
//!
//! [`router`] builds the whole HTTP application, so tests drive it in-process. Module map:
//! [`edge`] (request id, limits, timeout, problem rendering, RED metrics), [`auth`] (JWT/JWKS),
//! [`ratelimit`] (GCRA), [`body`] (strict JSON), [`api`] (routes, wire shapes, OpenAPI),
//! [`problem`] (problem+json and THE gRPC → HTTP mapping), [`backends`] (THE gRPC client
//! construction), [`devkeys`] (dev key pair and token minting), [`config`].
//!
//! Both modes: under `--cfg madsim` the simulator serves this same [`router`] from its gateway node
//! (`securepay-sim`'s `cluster`), with backends built by [`Backends::new`] over simulated channels.
//! Only [`Backends::connect`] (SPIFFE mTLS) is real-mode only; the binary's `main` likewise.

pub mod api;
pub mod auth;
pub mod backends;
pub mod body;
pub mod config;
pub mod devkeys;
pub mod edge;
pub mod problem;
pub mod ratelimit;

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use metrics_exporter_prometheus::PrometheusHandle;

pub use auth::Authenticator;
pub use backends::{Backends, Channels};
pub use config::GatewayConfig;
pub use ratelimit::RateLimits;

/// Shared state of the router (cheap to clone).
#[derive(Clone)]
pub struct AppState(Arc<Inner>);

pub struct Inner {
    pub config: GatewayConfig,
    pub auth: Authenticator,
    pub limits: RateLimits,
    pub backends: Backends,
    pub metrics: Option<PrometheusHandle>,
}

impl std::ops::Deref for AppState {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}

impl AppState {
    pub fn new(
        config: GatewayConfig,
        auth: Authenticator,
        backends: Backends,
        metrics: Option<PrometheusHandle>,
    ) -> AppState {
        let limits = RateLimits::new(config.rate_limits);
        AppState(Arc::new(Inner { config, auth, limits, backends, metrics }))
    }
}

async fn health() -> impl IntoResponse {
    (StatusCode::OK, [(header::CONTENT_TYPE, "application/json")], "{\"status\":\"ok\"}")
}

async fn metrics_text(State(state): State<AppState>) -> axum::response::Response {
    match &state.metrics {
        Some(handle) => ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], handle.render()).into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

/// The whole HTTP application; [`edge::edge`] is a `layer` of every route (and the 404 fallback),
/// so it sees the matched route template. Serve it with `into_make_service_with_connect_info::<SocketAddr>()`
/// so the per-IP limit sees the peer address.
pub fn router(state: AppState) -> Router {
    let resources = Router::new()
        .route("/api/v1/payments", post(api::create_payment))
        .route("/api/v1/payments/{id}", get(api::get_payment))
        .route("/api/v1/payments/{id}/notifications", get(api::list_notifications))
        .route("/api/v1/accounts/{id}/balance", get(api::get_balance))
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), api::authenticate));
    Router::new()
        .merge(resources)
        .route("/api/v1/openapi.json", get(api::serve_openapi))
        .route("/health", get(health))
        .route("/metrics", get(metrics_text))
        .layer(axum::middleware::from_fn_with_state(state.clone(), edge::edge))
        .with_state(state)
}

/// Exports the gateway's labelled counters at zero so dashboards have data on an idle stack.
pub fn register_known_series() {
    for reason in ["jwt_missing", "jwt_invalid", "jwt_expired", "scope_missing", "object_forbidden"] {
        metrics::counter!(securepay_kit::metrics::AUTH_FAILURES, "reason" => reason).increment(0);
    }
    RateLimits::register_known_series();
}
