//! RFC 9457 `application/problem+json`: every error the gateway answers, with a stable `code`.
//!
//! A handler or middleware returns a [`Problem`]; the edge middleware renders it once, adding the
//! request id as `instance` (see `edge`). gRPC statuses from the backends become problems in
//! exactly one place, [`from_status`]. No internal text (driver errors, transport messages, stack)
//! ever reaches a client: details are fixed sentences, or the short client-safe message a backend
//! attached to a deliberate domain error.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use tonic::Code;
use utoipa::ToSchema;

pub const CONTENT_TYPE: &str = "application/problem+json";

/// An error answer before rendering. Put in the response's extensions by `into_response`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub status: StatusCode,
    pub code: String,
    pub detail: String,
}

/// The rendered body (also the OpenAPI schema of every error).
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ProblemDocument {
    /// A URI naming the problem type; ends with the code.
    #[serde(rename = "type")]
    #[schema(example = "https://securepay.dev/problems/invalid_amount")]
    pub type_uri: String,
    #[schema(example = "Bad Request")]
    pub title: String,
    #[schema(example = 400)]
    pub status: u16,
    #[schema(example = "amount must be a decimal number like \"10.50\"")]
    pub detail: String,
    /// Stable, machine-readable error code (snake_case).
    #[schema(example = "invalid_amount")]
    pub code: String,
    /// The request id (`X-Request-Id`) of the failed request.
    #[schema(example = "3f2b8c1e-9d4a-4e7b-8f6a-2c1d0e9b7a65")]
    pub instance: String,
}

impl Problem {
    pub fn new(status: StatusCode, code: &str, detail: impl Into<String>) -> Problem {
        Problem { status, code: code.to_owned(), detail: detail.into() }
    }

    pub fn bad_request(code: &str, detail: impl Into<String>) -> Problem {
        Problem::new(StatusCode::BAD_REQUEST, code, detail)
    }

    pub fn unauthorized() -> Problem {
        Problem::new(StatusCode::UNAUTHORIZED, "unauthorized", "a valid bearer token is required")
    }

    /// The generic problem for a status nobody described (404 of an unknown route, 405, ...).
    pub fn for_status(status: StatusCode) -> Problem {
        let (code, detail) = match status {
            StatusCode::NOT_FOUND => ("not_found", "no such resource"),
            StatusCode::METHOD_NOT_ALLOWED => ("method_not_allowed", "this method is not allowed here"),
            StatusCode::PAYLOAD_TOO_LARGE => ("payload_too_large", "the request body is too large"),
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE => {
                ("request_header_fields_too_large", "the request headers are too large")
            }
            StatusCode::UNSUPPORTED_MEDIA_TYPE => ("unsupported_media_type", "the body must be application/json"),
            StatusCode::GATEWAY_TIMEOUT => ("gateway_timeout", "the request took too long; retry later"),
            StatusCode::SERVICE_UNAVAILABLE => ("service_unavailable", "the service is unavailable; retry later"),
            s if s.is_client_error() => ("invalid_request", "the request is not valid"),
            _ => ("internal_error", "the request could not be completed"),
        };
        Problem::new(status, code, detail)
    }

    pub fn document(&self, instance: &str) -> ProblemDocument {
        ProblemDocument {
            type_uri: format!("https://securepay.dev/problems/{}", self.code),
            title: self.status.canonical_reason().unwrap_or("Error").to_owned(),
            status: self.status.as_u16(),
            detail: self.detail.clone(),
            code: self.code.clone(),
            instance: instance.to_owned(),
        }
    }

    /// The final response: body rendered with `instance`, content type, and the
    /// `WWW-Authenticate` challenge on 401.
    pub fn render(&self, instance: &str) -> Response {
        let body = serde_json::to_vec(&self.document(instance)).expect("a problem document serializes");
        let mut response = (self.status, body).into_response();
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE));
        if self.status == StatusCode::UNAUTHORIZED {
            headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer error=\"invalid_token\""));
        }
        response
    }
}

/// Leaves the problem in the response extensions; the edge middleware renders it with the
/// request id (a response that never passes the edge renders with an empty `instance`).
impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let mut response = self.render("");
        response.extensions_mut().insert(self);
        response
    }
}

/// A stable code a backend sent: lowercase snake_case, bounded; anything else is ignored.
fn sane_code(code: &str) -> bool {
    !code.is_empty()
        && code.len() <= 64
        && code.starts_with(|c: char| c.is_ascii_lowercase())
        && code.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// A backend's client-safe message: short, printable, one line.
fn sane_message(message: &str) -> bool {
    !message.is_empty() && message.len() <= 200 && message.chars().all(|c| !c.is_control())
}

/// THE mapping from a backend's gRPC status to the client's problem (SPEC §3). The HTTP status
/// follows the gRPC code; the public `code` is the backend's stable `x-securepay-error-code` when it
/// sent one, a generic code otherwise.
pub fn from_status(status: &tonic::Status) -> Problem {
    let (http, generic, generic_detail) = match status.code() {
        Code::InvalidArgument | Code::OutOfRange => {
            (StatusCode::BAD_REQUEST, "invalid_request", "the request is not valid")
        }
        Code::NotFound => (StatusCode::NOT_FOUND, "not_found", "no such resource"),
        Code::PermissionDenied => (StatusCode::FORBIDDEN, "forbidden", "the caller may not access this resource"),
        Code::FailedPrecondition => {
            (StatusCode::UNPROCESSABLE_ENTITY, "precondition_failed", "the request cannot be carried out")
        }
        Code::AlreadyExists => (StatusCode::CONFLICT, "conflict", "the resource already exists"),
        Code::Aborted => {
            (StatusCode::CONFLICT, "request_in_progress", "a request with this idempotency key is in progress")
        }
        Code::ResourceExhausted => (StatusCode::TOO_MANY_REQUESTS, "rate_limited", "too many requests; retry later"),
        Code::Unavailable => {
            (StatusCode::SERVICE_UNAVAILABLE, "service_unavailable", "a service is unavailable; retry later")
        }
        Code::DeadlineExceeded | Code::Cancelled => {
            (StatusCode::GATEWAY_TIMEOUT, "gateway_timeout", "the request took too long; retry later")
        }
        // Unauthenticated/Unimplemented/Internal/Unknown/DataLoss: the platform failed, not the client.
        _ => (StatusCode::BAD_GATEWAY, "bad_gateway", "the request could not be completed"),
    };
    if http == StatusCode::FORBIDDEN {
        securepay_kit::metrics::auth_failure("object_forbidden");
    }
    match securepay_kit::status::error_code(status).filter(|c| sane_code(c)) {
        Some(code) if http != StatusCode::BAD_GATEWAY => {
            let detail = if sane_message(status.message()) { status.message() } else { generic_detail };
            Problem::new(http, code, detail)
        }
        _ => Problem::new(http, generic, generic_detail),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_coded_status_keeps_its_code_and_an_uncoded_one_hides_its_text() {
        let s = securepay_kit::status::status(
            Code::FailedPrecondition,
            "insufficient_funds",
            "the account cannot cover this amount",
        );
        let p = from_status(&s);
        assert_eq!((p.status, p.code.as_str()), (StatusCode::UNPROCESSABLE_ENTITY, "insufficient_funds"));
        let p = from_status(&tonic::Status::internal("pq: relation \"payments\" does not exist"));
        assert_eq!((p.status, p.code.as_str()), (StatusCode::BAD_GATEWAY, "bad_gateway"));
        assert!(!p.detail.contains("pq"));
        let p = from_status(&tonic::Status::unavailable("tcp connect error: Connection refused (os error 111)"));
        assert_eq!((p.status, p.code.as_str()), (StatusCode::SERVICE_UNAVAILABLE, "service_unavailable"));
        assert!(!p.detail.contains("tcp"));
    }

    #[test]
    fn every_documented_backend_code_has_its_http_status() {
        use securepay_kit::status::status;
        let cases = [
            (Code::InvalidArgument, "invalid_amount", 400),
            (Code::InvalidArgument, "same_account", 400),
            (Code::NotFound, "unknown_account", 404),
            (Code::NotFound, "payment_not_found", 404),
            (Code::PermissionDenied, "forbidden", 403),
            (Code::FailedPrecondition, "idempotency_key_reused", 422),
            (Code::FailedPrecondition, "currency_mismatch", 422),
            (Code::Aborted, "request_in_progress", 409),
            (Code::Unavailable, "account_service_unavailable", 503),
        ];
        for (code, error_code, http) in cases {
            let p = from_status(&status(code, error_code, "m"));
            assert_eq!((p.status.as_u16(), p.code.as_str()), (http, error_code));
        }
    }
}
