//! The edge middleware every request passes first, in this order: request id (a sane incoming
//! `X-Request-Id` or a fresh UUID, echoed on the response), header size bound (431), per-IP rate
//! limit (429), the whole-request timeout (504), and on the way out: problem rendering with the
//! request id as `instance`, a generic problem for any bare error status, one log line and the RED
//! metrics with the matched route template. All of it runs inside the request's `gateway.request`
//! span (SPEC §8), continued from the client's W3C `traceparent` when it sent one.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Instant;

use axum::extract::{ConnectInfo, MatchedPath, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use securepay_kit::trace::{self, names};
use tracing::Instrument;

use crate::AppState;
use crate::config::HEADER_LIMIT_BYTES;
use crate::problem::{self, Problem};

pub const REQUEST_ID_HEADER: &str = "x-request-id";
pub const HTTP_REQUESTS: &str = "securepay_http_requests_total";
pub const HTTP_REQUEST_DURATION: &str = "securepay_http_request_duration_seconds";

/// The request id of the request being served (a request extension).
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

fn sane_request_id(value: &HeaderValue) -> Option<String> {
    let text = value.to_str().ok()?;
    let ok = !text.is_empty()
        && text.len() <= 64
        && text.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'));
    ok.then(|| text.to_owned())
}

fn client_ip(req: &Request) -> IpAddr {
    // The direct peer. Forwarding headers are not trusted: nothing in front of the gateway sets them.
    req.extensions().get::<ConnectInfo<SocketAddr>>().map(|c| c.0.ip()).unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED))
}

/// The edge middleware (a `Router::layer`, so the router has matched the route already). Every
/// request gets a `gateway.request` server span (SPEC §8) whose parent is the client's
/// `traceparent`, if any; the rest of the request runs inside it, so the backend calls continue
/// its trace and the per-request log line carries its `trace_id`.
pub async fn edge(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    let started = Instant::now();
    let request_id = req
        .headers()
        .get(REQUEST_ID_HEADER)
        .and_then(sane_request_id)
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    req.extensions_mut().insert(RequestId(request_id.clone()));
    // The template, never the raw path: bounded label and attribute values.
    let route =
        req.extensions().get::<MatchedPath>().map(|m| m.as_str().to_owned()).unwrap_or_else(|| "unmatched".into());
    let span = tracing::info_span!(
        names::GATEWAY_REQUEST,
        otel.kind = "server",
        http.request.method = %req.method(),
        http.route = %route,
        http.response.status_code = tracing::field::Empty,
        request_id = %request_id,
    );
    trace::set_parent(&span, trace::extract_from_http(req.headers()));
    serve(state, req, next, request_id, route, started).instrument(span).await
}

/// The edge's work for one request, inside its `gateway.request` span.
async fn serve(
    state: AppState,
    req: Request,
    next: Next,
    request_id: String,
    route: String,
    started: Instant,
) -> Response {
    let header_bytes: usize = req.headers().iter().map(|(n, v)| n.as_str().len() + v.len()).sum();
    let mut response = if header_bytes > HEADER_LIMIT_BYTES {
        Problem::for_status(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE).into_response()
    } else {
        let verdict = state.limits.ip.check(&client_ip(&req));
        if !verdict.allowed {
            verdict.rejection()
        } else {
            match tokio::time::timeout(state.config.request_timeout, next.run(req)).await {
                Ok(response) => response,
                Err(_) => Problem::for_status(StatusCode::GATEWAY_TIMEOUT).into_response(),
            }
        }
    };

    if let Some(problem) = response.extensions_mut().remove::<Problem>() {
        let mut rendered = problem.render(&request_id);
        // Keep the headers the problem's producer added (Retry-After, RateLimit-*).
        for (name, value) in response.headers() {
            if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
                rendered.headers_mut().insert(name.clone(), value.clone());
            }
        }
        response = rendered;
    } else if (response.status().is_client_error() || response.status().is_server_error())
        && response.headers().get(header::CONTENT_TYPE).map(|v| v.as_bytes()) != Some(problem::CONTENT_TYPE.as_bytes())
    {
        let mut rendered = Problem::for_status(response.status()).render(&request_id);
        if let Some(allow) = response.headers().get(header::ALLOW) {
            rendered.headers_mut().insert(header::ALLOW, allow.clone());
        }
        response = rendered;
    }
    if let Ok(value) = HeaderValue::from_str(&request_id) {
        response.headers_mut().insert(REQUEST_ID_HEADER, value);
    }

    let status = response.status().as_u16();
    let elapsed = started.elapsed();
    metrics::counter!(HTTP_REQUESTS, "service" => "gateway", "route" => route.clone(), "status" => status.to_string())
        .increment(1);
    metrics::histogram!(HTTP_REQUEST_DURATION, "service" => "gateway", "route" => route.clone())
        .record(elapsed.as_secs_f64());
    tracing::Span::current().record("http.response.status_code", status);
    tracing::info!(route, status, elapsed_ms = elapsed.as_millis() as u64, "request served");
    response
}
