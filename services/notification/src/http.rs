//! The HTTP API (SPEC §3; real mode only): `GET /api/v1/notifications?payment_id=<uuid>`.
//!
//! - 200 `{payment_id, notifications: [{event_id, kind, status, failure_reason?, amount, currency,
//!   from_account, to_account, occurred_at, recorded_at}]}`, first recorded first, at most
//!   [`LIST_LIMIT`]; amounts are exact decimal strings, times RFC 3339.
//! - A missing, repeated or malformed `payment_id` is 400 `application/problem+json` (RFC 9457:
//!   `type`, `title`, `status`, `detail`, `code`) with code `invalid_payment_id`; the store being
//!   down is 503 `service_unavailable`; anything else 500 `internal_error`. Unknown routes are 404
//!   problems. No driver or internal text reaches a client.
//! - Every request on these routes is counted (`securepay_http_requests_total{service,route,status}`
//!   and the duration histogram), labelled by the route TEMPLATE, never the raw path.

use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::extract::rejection::QueryRejection;
use axum::extract::{MatchedPath, Query, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use securepay_core::ids::PaymentId;
use securepay_ports::{Notification, NotificationStore, PortError};
use serde::{Deserialize, Serialize};
use time::format_description::well_known::Rfc3339;

use crate::metrics::{self, ROUTE_NOTIFICATIONS};

/// Most notifications one answer lists (a payment has a handful: initiated, then its outcome).
pub const LIST_LIMIT: usize = 100;

pub const PROBLEM_CONTENT_TYPE: &str = "application/problem+json";

/// The API routes (with RED metrics) over `store`. The admin routes are merged in by the binary.
pub fn router<S: NotificationStore>(store: Arc<S>) -> Router {
    Router::new()
        .route(ROUTE_NOTIFICATIONS, get(list::<S>))
        .fallback(|| async { Problem::new(StatusCode::NOT_FOUND, "not_found", "no such resource") })
        .method_not_allowed_fallback(|| async {
            Problem::new(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", "this method is not allowed here")
        })
        .layer(middleware::from_fn(red))
        .with_state(store)
}

#[derive(Debug, Deserialize)]
struct ListQuery {
    payment_id: Option<String>,
}

#[derive(Debug, Serialize)]
struct ListBody {
    payment_id: String,
    notifications: Vec<NotificationBody>,
}

#[derive(Debug, Serialize)]
struct NotificationBody {
    event_id: String,
    kind: &'static str,
    status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    failure_reason: Option<&'static str>,
    amount: String,
    currency: &'static str,
    from_account: String,
    to_account: String,
    occurred_at: String,
    recorded_at: String,
}

impl NotificationBody {
    fn new(n: &Notification) -> NotificationBody {
        NotificationBody {
            event_id: n.event_id.to_string(),
            kind: n.kind.as_str(),
            status: n.kind.status().as_str(),
            failure_reason: n.failure_reason.map(|r| r.code()),
            amount: n.amount.to_string(),
            currency: n.amount.currency().code(),
            from_account: n.from.to_string(),
            to_account: n.to.to_string(),
            occurred_at: rfc3339(n.occurred_at),
            recorded_at: rfc3339(n.recorded_at),
        }
    }
}

fn rfc3339(at: time::OffsetDateTime) -> String {
    // Every time the stores hold is within RFC 3339's years 0000-9999.
    at.format(&Rfc3339).unwrap_or_default()
}

async fn list<S: NotificationStore>(
    State(store): State<Arc<S>>,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Response {
    let payment = match query.ok().and_then(|Query(q)| q.payment_id) {
        Some(text) => PaymentId::parse(&text).ok(),
        None => None,
    };
    let Some(payment) = payment else {
        return Problem::new(
            StatusCode::BAD_REQUEST,
            "invalid_payment_id",
            "query parameter payment_id must be one UUID like 3f2b8c1e-9d4a-4e7b-8f6a-2c1d0e9b7a65",
        )
        .into_response();
    };
    match store.for_payment(payment, LIST_LIMIT).await {
        Ok(notifications) => {
            let body = ListBody {
                payment_id: payment.to_string(),
                notifications: notifications.iter().map(NotificationBody::new).collect(),
            };
            axum::Json(body).into_response()
        }
        Err(PortError::Unavailable { .. }) => Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "service_unavailable",
            "the service is unavailable; retry later",
        )
        .into_response(),
        Err(error) => {
            tracing::error!(%error, "listing notifications failed");
            Problem::new(StatusCode::INTERNAL_SERVER_ERROR, "internal_error", "the request could not be completed")
                .into_response()
        }
    }
}

/// An RFC 9457 problem with a stable `code`; `detail` is a fixed, client-safe sentence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    status: StatusCode,
    code: &'static str,
    detail: &'static str,
}

impl Problem {
    pub const fn new(status: StatusCode, code: &'static str, detail: &'static str) -> Problem {
        Problem { status, code, detail }
    }
}

#[derive(Serialize)]
struct ProblemDocument {
    #[serde(rename = "type")]
    type_uri: String,
    title: &'static str,
    status: u16,
    detail: &'static str,
    code: &'static str,
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let document = ProblemDocument {
            type_uri: format!("https://securepay.dev/problems/{}", self.code),
            title: self.status.canonical_reason().unwrap_or("Error"),
            status: self.status.as_u16(),
            detail: self.detail,
            code: self.code,
        };
        let mut response = (self.status, axum::Json(document)).into_response();
        response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_CONTENT_TYPE));
        response
    }
}

/// RED metrics per request, labelled by the matched route template (`other` for unmatched paths).
async fn red(request: Request, next: Next) -> Response {
    let route = match request.extensions().get::<MatchedPath>().map(MatchedPath::as_str) {
        Some(ROUTE_NOTIFICATIONS) => ROUTE_NOTIFICATIONS,
        _ => "other",
    };
    let started = Instant::now();
    let response = next.run(request).await;
    metrics::http_request(route, response.status().as_u16(), started.elapsed());
    response
}
