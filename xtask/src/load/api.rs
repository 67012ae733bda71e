//! The two gateway calls a load run makes: `POST /api/v1/payments` and
//! `GET /api/v1/payments/{id}`, over pooled HTTP/1.1 connections, each bounded by a timeout.
//!
//! Each load user is a client of its own: its own connection pool, and (unless the run asks for
//! one source address) its own loopback source address `127.10.x.y`, so the gateway's per-IP
//! limit sees many clients, as it would in production, instead of one client doing everything.

use std::net::{IpAddr, Ipv4Addr};
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

/// The loopback source address of load user `user`: `127.10.<user / 250>.<user % 250 + 1>`.
pub fn source_address(user: usize) -> IpAddr {
    let (high, low) = (user / 250, user % 250 + 1);
    IpAddr::V4(Ipv4Addr::new(127, 10, u8::try_from(high).unwrap_or(u8::MAX), u8::try_from(low).unwrap_or(u8::MAX)))
}

pub struct Gateway {
    /// One client per load user.
    clients: Vec<Client<HttpConnector, Full<Bytes>>>,
    base: String,
}

impl Gateway {
    /// `base`: `http://127.0.0.1:8080`; `users` clients, each from its own source address unless
    /// `one_source` (then all from the system's choice, 127.0.0.1).
    pub fn new(base: String, users: usize, one_source: bool) -> Gateway {
        let clients = (0..users)
            .map(|user| {
                let mut connector = HttpConnector::new();
                connector.set_nodelay(true);
                connector.set_connect_timeout(Some(Duration::from_secs(3)));
                if !one_source {
                    connector.set_local_address(Some(source_address(user)));
                }
                Client::builder(TokioExecutor::new()).pool_idle_timeout(Duration::from_secs(30)).build(connector)
            })
            .collect();
        Gateway { clients, base }
    }

    pub async fn create_payment(
        &self,
        user: usize,
        token: &str,
        idempotency_key: &str,
        body: serde_json::Value,
    ) -> Answer {
        let request = Request::builder()
            .method(Method::POST)
            .uri(format!("{}/api/v1/payments", self.base))
            .header("authorization", format!("Bearer {token}"))
            .header("content-type", "application/json")
            .header("idempotency-key", idempotency_key)
            .body(Full::new(Bytes::from(body.to_string())));
        self.call(user, request, StatusCode::ACCEPTED).await
    }

    pub async fn get_payment(&self, user: usize, token: &str, payment_id: &str) -> Answer {
        let request = Request::builder()
            .method(Method::GET)
            .uri(format!("{}/api/v1/payments/{payment_id}", self.base))
            .header("authorization", format!("Bearer {token}"))
            .body(Full::new(Bytes::new()));
        self.call(user, request, StatusCode::OK).await
    }

    async fn call(
        &self,
        user: usize,
        request: Result<Request<Full<Bytes>>, hyper::http::Error>,
        success: StatusCode,
    ) -> Answer {
        let Ok(request) = request else {
            return Answer::Error("0 invalid_request".into());
        };
        let exchange = async {
            let response = self.clients[user].request(request).await.map_err(|e| transport_error(&e))?;
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
    fn every_load_user_has_its_own_loopback_source_address() {
        assert_eq!(source_address(0).to_string(), "127.10.0.1");
        assert_eq!(source_address(249).to_string(), "127.10.0.250");
        assert_eq!(source_address(250).to_string(), "127.10.1.1");
        let all: std::collections::HashSet<_> = (0..1000).map(source_address).collect();
        assert_eq!(all.len(), 1000);
        assert!(all.iter().all(IpAddr::is_loopback));
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
