//! The two gateway calls a load run makes: `POST /api/v1/payments` and
//! `GET /api/v1/payments/{id}`, over pooled HTTP/1.1 connections, each bounded by a timeout.

use std::time::Duration;

use http_body_util::{BodyExt as _, Full};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::Deserialize;

/// A call's time limit; beyond it the call counts as `0 timeout`.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// A payment as the gateway shows it (the fields a load run reads).
#[derive(Debug, Clone, Deserialize)]
pub struct PaymentView {
    pub payment_id: String,
    pub status: String,
    #[serde(default)]
    pub failure_reason: Option<String>,
    pub created_at: String,
    pub updated_at: String,
}

impl PaymentView {
    pub fn is_terminal(&self) -> bool {
        self.status != "PENDING"
    }

    /// `COMPLETED`, or `FAILED <reason>`.
    pub fn outcome(&self) -> String {
        match &self.failure_reason {
            Some(reason) => format!("{} {reason}", self.status),
            None => self.status.clone(),
        }
    }

    /// `updated_at − created_at`: how long the server took to settle it (if both parse).
    pub fn server_settlement(&self) -> Option<Duration> {
        let parse = |s: &str| time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok();
        let elapsed = parse(&self.updated_at)? - parse(&self.created_at)?;
        Duration::try_from(elapsed).ok()
    }
}

/// What a call got: the payment, or an error named `"<HTTP status> <problem code>"` (`0 ...` when
/// there was no HTTP answer).
#[derive(Debug)]
pub enum Answer {
    Payment { view: PaymentView, replayed: bool },
    Error(String),
}

#[derive(Deserialize)]
struct ProblemCode {
    code: Option<String>,
}

/// The error name of a non-success answer: its status and the problem document's `code`.
pub fn error_name(status: StatusCode, body: &[u8]) -> String {
    let code = serde_json::from_slice::<ProblemCode>(body).ok().and_then(|p| p.code);
    format!("{} {}", status.as_u16(), code.as_deref().unwrap_or("(no problem code)"))
}

#[derive(Clone)]
pub struct Gateway {
    client: Client<HttpConnector, Full<Bytes>>,
    base: String,
}

impl Gateway {
    /// `base`: `http://127.0.0.1:8080`.
    pub fn new(base: String) -> Gateway {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(3)));
        let client = Client::builder(TokioExecutor::new()).pool_idle_timeout(Duration::from_secs(30)).build(connector);
        Gateway { client, base }
    }

    pub async fn create_payment(&self, token: &str, idempotency_key: &str, body: serde_json::Value) -> Answer {
        let request = Request::builder()
            .method(Method::POST)
            .uri(format!("{}/api/v1/payments", self.base))
            .header("authorization", format!("Bearer {token}"))
            .header("content-type", "application/json")
            .header("idempotency-key", idempotency_key)
            .body(Full::new(Bytes::from(body.to_string())));
        self.call(request, StatusCode::ACCEPTED).await
    }

    pub async fn get_payment(&self, token: &str, payment_id: &str) -> Answer {
        let request = Request::builder()
            .method(Method::GET)
            .uri(format!("{}/api/v1/payments/{payment_id}", self.base))
            .header("authorization", format!("Bearer {token}"))
            .body(Full::new(Bytes::new()));
        self.call(request, StatusCode::OK).await
    }

    async fn call(&self, request: Result<Request<Full<Bytes>>, hyper::http::Error>, success: StatusCode) -> Answer {
        let Ok(request) = request else {
            return Answer::Error("0 invalid_request".into());
        };
        let exchange = async {
            let response = self.client.request(request).await.map_err(|e| transport_error(&e))?;
            let status = response.status();
            let replayed = response.headers().get("idempotent-replayed").is_some_and(|v| v == "true");
            let body = response.into_body().collect().await.map_err(|_| "0 body_read_failed".to_string())?;
            Ok::<_, String>((status, replayed, body.to_bytes()))
        };
        match tokio::time::timeout(CALL_TIMEOUT, exchange).await {
            Err(_) => Answer::Error("0 timeout".into()),
            Ok(Err(e)) => Answer::Error(e),
            Ok(Ok((status, replayed, body))) if status == success => match serde_json::from_slice(&body) {
                Ok(view) => Answer::Payment { view, replayed },
                Err(_) => Answer::Error(format!("{} (unreadable payment)", status.as_u16())),
            },
            Ok(Ok((status, _, body))) => Answer::Error(error_name(status, &body)),
        }
    }
}

/// `0 connect_failed` / `0 connection_error`: the kind, never the address or the OS message.
fn transport_error(e: &hyper_util::client::legacy::Error) -> String {
    if e.is_connect() { "0 connect_failed".into() } else { "0 connection_error".into() }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(status: &str, reason: Option<&str>, created: &str, updated: &str) -> PaymentView {
        PaymentView {
            payment_id: "p".into(),
            status: status.into(),
            failure_reason: reason.map(str::to_string),
            created_at: created.into(),
            updated_at: updated.into(),
        }
    }

    #[test]
    fn errors_are_named_by_status_and_problem_code() {
        let body = br#"{"type":"about:blank","title":"Unprocessable","status":422,"code":"insufficient_funds"}"#;
        assert_eq!(error_name(StatusCode::UNPROCESSABLE_ENTITY, body), "422 insufficient_funds");
        assert_eq!(error_name(StatusCode::BAD_GATEWAY, b"<html>"), "502 (no problem code)");
    }

    #[test]
    fn outcomes_and_server_settlement_time_come_from_the_payment() {
        let done = view("COMPLETED", None, "2026-01-01T12:00:00.100Z", "2026-01-01T12:00:00.350Z");
        assert!(done.is_terminal());
        assert_eq!(done.outcome(), "COMPLETED");
        assert_eq!(done.server_settlement(), Some(Duration::from_millis(250)));
        let failed = view("FAILED", Some("insufficient_funds"), "2026-01-01T12:00:00Z", "2026-01-01T12:00:01Z");
        assert_eq!(failed.outcome(), "FAILED insufficient_funds");
        assert_eq!(failed.server_settlement(), Some(Duration::from_secs(1)));
        let pending = view("PENDING", None, "2026-01-01T12:00:00Z", "not a time");
        assert!(!pending.is_terminal());
        assert_eq!(pending.server_settlement(), None);
    }
}
