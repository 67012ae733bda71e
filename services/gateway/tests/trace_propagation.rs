//! Trace propagation through the gateway (SPEC §8): the `gateway.request` span continues the
//! client's W3C `traceparent` (or starts a fresh trace), every backend gRPC call carries that
//! span's context as `traceparent` metadata, and the per-request log line carries its ids.
//!
//! Own test binary: it installs the services' telemetry (`log_and_trace_layers` + the W3C
//! propagator) as the GLOBAL subscriber, which must not leak into the other gateway tests. The
//! gateway is driven in-process in front of in-process tonic servers that record the trace
//! metadata of every call.

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, OnceLock};

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{Request, StatusCode, header};
use opentelemetry_sdk::trace::SdkTracerProvider;
use securepay_gateway::config::GatewayConfig;
use securepay_gateway::{AppState, Authenticator, Backends, devkeys};
use securepay_proto::account::v1 as account;
use securepay_proto::payment::v1 as payment;
use securepay_runtime::telemetry;
use serde_json::Value;
use tonic::Status;
use tower::ServiceExt;
use tracing_subscriber::layer::SubscriberExt;

const FROM: &str = "3f2b8c1e-9d4a-4e7b-8f6a-2c1d0e9b7a65";
const TO: &str = "9a8b7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d";

// ---------------------------------------------------------------------------------------------
// Telemetry, installed once for this binary

/// The log sink of the global subscriber; tests find their lines by request id.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Captured {
    /// The JSON log lines whose span has `request_id`.
    fn lines_of(&self, request_id: &str) -> Vec<Value> {
        let bytes = self.0.lock().unwrap().clone();
        String::from_utf8(bytes)
            .unwrap()
            .lines()
            .map(|line| serde_json::from_str::<Value>(line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}")))
            .filter(|line| line["span"]["request_id"] == request_id)
            .collect()
    }
}

impl io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
    type Writer = Captured;

    fn make_writer(&'a self) -> Captured {
        self.clone()
    }
}

/// Installs, once, what `securepay_runtime::init_telemetry` installs (without an exporter), with
/// the logs going to the returned sink.
fn telemetry_logs() -> &'static Captured {
    static INSTALLED: OnceLock<(SdkTracerProvider, Captured)> = OnceLock::new();
    let (_, logs) = INSTALLED.get_or_init(|| {
        telemetry::install_propagator();
        let provider = telemetry::tracer_provider("api-gateway", None);
        let logs = Captured::default();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_subscriber::EnvFilter::new("info"))
            .with(telemetry::log_and_trace_layers(&provider, logs.clone()));
        tracing::subscriber::set_global_default(subscriber).expect("the only subscriber of this test binary");
        (provider, logs)
    });
    logs
}

// ---------------------------------------------------------------------------------------------
// Backends that record the trace metadata of every call

/// (gRPC method, its `traceparent` metadata).
type Calls = Arc<Mutex<Vec<(&'static str, Option<String>)>>>;

#[derive(Clone)]
struct Recording(Calls);

impl Recording {
    fn record<T>(&self, method: &'static str, request: &tonic::Request<T>) {
        let traceparent = request.metadata().get("traceparent").map(|v| v.to_str().unwrap().to_owned());
        self.0.lock().unwrap().push((method, traceparent));
    }
}

fn ts() -> Option<prost_types::Timestamp> {
    Some(prost_types::Timestamp { seconds: 1_767_225_600, nanos: 0 })
}

#[tonic::async_trait]
impl payment::payment_service_server::PaymentService for Recording {
    async fn initiate_payment(
        &self,
        request: tonic::Request<payment::InitiatePaymentRequest>,
    ) -> Result<tonic::Response<payment::InitiatePaymentResponse>, Status> {
        self.record("InitiatePayment", &request);
        let r = request.into_inner();
        let payment = payment::Payment {
            payment_id: "7b0e1f8a-3c5d-4e2f-9a1b-6c7d8e9f0a1b".to_owned(),
            status: payment::PaymentStatus::Pending as i32,
            failure_reason: String::new(),
            amount: r.amount,
            from_account: r.from_account,
            to_account: r.to_account,
            created_at: ts(),
            updated_at: ts(),
            transitions: vec![],
        };
        Ok(tonic::Response::new(payment::InitiatePaymentResponse { payment: Some(payment), replayed: false }))
    }

    async fn get_payment(
        &self,
        request: tonic::Request<payment::GetPaymentRequest>,
    ) -> Result<tonic::Response<payment::Payment>, Status> {
        self.record("GetPayment", &request);
        Err(Status::not_found("payment not found"))
    }
}

#[tonic::async_trait]
impl account::account_service_server::AccountService for Recording {
    async fn check_balance(
        &self,
        request: tonic::Request<account::CheckBalanceRequest>,
    ) -> Result<tonic::Response<account::CheckBalanceResponse>, Status> {
        self.record("CheckBalance", &request);
        Err(Status::permission_denied("the gateway never calls this"))
    }

    async fn get_balance(
        &self,
        request: tonic::Request<account::GetBalanceRequest>,
    ) -> Result<tonic::Response<account::Balance>, Status> {
        self.record("GetBalance", &request);
        let account_id = request.into_inner().account_id;
        Ok(tonic::Response::new(account::Balance {
            account_id,
            balance: "1000.00".into(),
            currency: "EUR".into(),
            as_of: ts(),
        }))
    }
}

// ---------------------------------------------------------------------------------------------
// Harness

struct Gateway {
    app: Router,
    calls: Calls,
    token: String,
    _dir: tempfile::TempDir,
}

async fn gateway() -> Gateway {
    let calls = Calls::default();
    let incoming = tonic::transport::server::TcpIncoming::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = incoming.local_addr().unwrap().to_string();
    let backend = Recording(calls.clone());
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(payment::payment_service_server::PaymentServiceServer::new(backend.clone()))
            .add_service(account::account_service_server::AccountServiceServer::new(backend))
            .serve_with_incoming(incoming),
    );
    let config = GatewayConfig::default();
    let dir = tempfile::tempdir().unwrap();
    let (key_path, jwks_path) = devkeys::ensure_dev_keys(dir.path()).unwrap();
    let key = devkeys::load_key(&key_path).unwrap();
    let token = devkeys::mint_token(&key, &config.jwt, "alice", "payments:read payments:write", 600).unwrap();
    let auth = Authenticator::from_jwks_file(&jwks_path, config.jwt.clone()).unwrap();
    let backends = plaintext_backends(&addr);
    let app = securepay_gateway::router(AppState::new(config, auth, backends, None));
    Gateway { app, calls, token, _dir: dir }
}

impl Gateway {
    /// Sends `request` with a fresh request id and alice's token; answers the status and the id.
    async fn send(&self, request: Request<Body>) -> (StatusCode, String) {
        self.send_with_token(request, &self.token).await
    }

    async fn send_with_token(&self, mut request: Request<Body>, token: &str) -> (StatusCode, String) {
        let request_id = uuid::Uuid::new_v4().to_string();
        let headers = request.headers_mut();
        headers.insert("x-request-id", request_id.parse().unwrap());
        headers.insert(header::AUTHORIZATION, format!("Bearer {token}").parse().unwrap());
        request.extensions_mut().insert(ConnectInfo(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 40_000)));
        let response = self.app.clone().oneshot(request).await.unwrap();
        (response.status(), request_id)
    }

    /// The `traceparent` of the only backend call so far.
    fn only_call_traceparent(&self, method: &str) -> Traceparent {
        let calls = self.calls.lock().unwrap().clone();
        assert_eq!(calls.len(), 1, "one backend call expected: {calls:?}");
        assert_eq!(calls[0].0, method);
        let value = calls[0].1.clone().unwrap_or_else(|| panic!("{method} reached the backend without traceparent"));
        Traceparent::parse(&value)
    }
}

/// A W3C `traceparent` (`00-<trace id>-<parent span id>-<flags>`).
#[derive(Debug)]
struct Traceparent {
    trace_id: String,
    span_id: String,
    flags: String,
}

impl Traceparent {
    fn parse(value: &str) -> Traceparent {
        let parts: Vec<&str> = value.split('-').collect();
        let hex = |s: &str, len: usize| s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit());
        assert!(
            parts.len() == 4 && parts[0] == "00" && hex(parts[1], 32) && hex(parts[2], 16) && hex(parts[3], 2),
            "not a W3C traceparent: {value:?}"
        );
        assert!(parts[1].bytes().any(|b| b != b'0') && parts[2].bytes().any(|b| b != b'0'), "invalid ids: {value:?}");
        Traceparent { trace_id: parts[1].to_owned(), span_id: parts[2].to_owned(), flags: parts[3].to_owned() }
    }
}

/// The request's "request served" log line: it must carry the ids of the `gateway.request` span.
fn served_line(logs: &Captured, request_id: &str) -> Value {
    let lines: Vec<Value> =
        logs.lines_of(request_id).into_iter().filter(|line| line["fields"]["message"] == "request served").collect();
    assert_eq!(lines.len(), 1, "one 'request served' line for request {request_id}: {lines:?}");
    lines[0].clone()
}

// ---------------------------------------------------------------------------------------------
// Tests

#[tokio::test]
async fn a_client_traceparent_reaches_the_payment_service_in_the_same_trace_under_the_gateway_span() {
    let logs = telemetry_logs();
    let gw = gateway().await;
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let client_span = "00f067aa0ba902b7";
    let body = serde_json::json!({"from_account": FROM, "to_account": TO, "amount": "10.50", "currency": "EUR"});
    let request = Request::post("/api/v1/payments")
        .header(header::CONTENT_TYPE, "application/json")
        .header("traceparent", format!("00-{trace_id}-{client_span}-01"))
        .body(Body::from(body.to_string()))
        .unwrap();
    let (status, request_id) = gw.send(request).await;
    assert_eq!(status, StatusCode::ACCEPTED);

    let sent = gw.only_call_traceparent("InitiatePayment");
    assert_eq!(sent.trace_id, trace_id, "the backend call continues the client's trace");
    assert_ne!(sent.span_id, client_span, "the backend's parent is the gateway's span, not the client's");
    assert_eq!(sent.flags, "01", "the client's sampling decision is kept");

    let line = served_line(logs, &request_id);
    assert_eq!(line["trace_id"], trace_id, "{line}");
    assert_eq!(line["span_id"], sent.span_id.as_str(), "the backend's parent is the gateway.request span: {line}");
    assert_eq!(line["span"]["name"], "gateway.request", "{line}");
    assert_eq!(line["span"]["http.route"], "/api/v1/payments", "{line}");
    assert_eq!(line["span"]["http.request.method"], "POST", "{line}");
}

#[tokio::test]
async fn a_request_without_traceparent_starts_a_fresh_trace_that_reaches_the_account_service() {
    let logs = telemetry_logs();
    let mut trace_ids = Vec::new();
    for _ in 0..2 {
        let gw = gateway().await;
        let request = Request::get(format!("/api/v1/accounts/{FROM}/balance")).body(Body::empty()).unwrap();
        let (status, request_id) = gw.send(request).await;
        assert_eq!(status, StatusCode::OK);
        let sent = gw.only_call_traceparent("GetBalance");
        let line = served_line(logs, &request_id);
        assert_eq!(line["trace_id"], sent.trace_id.as_str(), "the log line and the backend share the trace: {line}");
        assert_eq!(line["span_id"], sent.span_id.as_str(), "{line}");
        assert_eq!(line["span"]["http.route"], "/api/v1/accounts/{id}/balance", "the template, not the path: {line}");
        trace_ids.push(sent.trace_id);
    }
    assert_ne!(trace_ids[0], trace_ids[1], "each request without a traceparent is its own trace");
}

#[tokio::test]
async fn a_refused_request_is_still_logged_inside_its_span_with_the_clients_trace() {
    let logs = telemetry_logs();
    let gw = gateway().await;
    let trace_id = "0af7651916cd43dd8448eb211c80319c";
    let request = Request::get(format!("/api/v1/accounts/{FROM}/balance"))
        .header("traceparent", format!("00-{trace_id}-b7ad6b7169203331-01"))
        .body(Body::empty())
        .unwrap();
    let (status, request_id) = gw.send_with_token(request, "not-a-token").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(gw.calls.lock().unwrap().is_empty(), "a refused request makes no backend call");
    let line = served_line(logs, &request_id);
    assert_eq!(line["trace_id"], trace_id, "{line}");
    assert_eq!(line["fields"]["status"], 401, "{line}");
}

/// TEST-ONLY transport: every client over one lazily connecting plaintext channel to the
/// in-process fakes at `addr` (the binary only ever uses `Backends::connect`, mTLS).
fn plaintext_backends(addr: &str) -> Backends {
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}")).unwrap().connect_lazy();
    Backends::new(securepay_gateway::Channels::one(channel), securepay_gateway::backends::CallInterceptor::none())
}
