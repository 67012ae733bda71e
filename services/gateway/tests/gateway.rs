//! The gateway driven in-process (`tower::ServiceExt::oneshot`) in front of in-process tonic
//! servers that implement payment.v1, account.v1 and notification.v1 and RECORD every call: "nothing written" below
//! means "no backend call was made". The backends also check what the gateway sends them (the
//! verified subject). Most tests reach the fakes over a test-only plaintext channel; one test runs
//! them behind the real mTLS transport with SVIDs from the test platform's SPIRE and checks the
//! gateway is served as `api-gateway` and refuses a server with the wrong identity.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{Request, StatusCode, header};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use http_body_util::BodyExt;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use p256::SecretKey;
use p256::pkcs8::{EncodePrivateKey, EncodePublicKey, LineEnding};
use securepay_gateway::config::{GatewayConfig, JwtConfig, RateQuota};
use securepay_gateway::{AppState, Authenticator, Backends, api, devkeys};
use securepay_proto::account::v1 as account;
use securepay_proto::notification::v1 as notification;
use securepay_proto::payment::v1 as payment;
use serde_json::{Value, json};
use tonic::{Code, Status};
use tower::ServiceExt;

const FROM: &str = "3f2b8c1e-9d4a-4e7b-8f6a-2c1d0e9b7a65";
const TO: &str = "9a8b7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d";
const PAYMENT: &str = "7b0e1f8a-3c5d-4e2f-9a1b-6c7d8e9f0a1b";
const GATEWAY_ID: &str = "spiffe://securepay.dev/api-gateway";

// ---------------------------------------------------------------------------------------------
// Recording backends

#[derive(Debug, Clone, PartialEq)]
struct Call {
    method: &'static str,
    subject: Option<String>,
    peer: Option<String>,
    detail: String,
}

#[derive(Default)]
struct Recorder {
    calls: Mutex<Vec<Call>>,
    /// Next answer is this status instead of success.
    fail_with: Mutex<Option<Status>>,
    /// Successful InitiatePayment answers say "replayed" in metadata.
    replay: Mutex<bool>,
    /// Answers take this long.
    delay: Mutex<Option<std::time::Duration>>,
}

impl Recorder {
    async fn record<T>(&self, method: &'static str, request: &tonic::Request<T>, detail: String) -> Result<(), Status> {
        let md = |k: &str| request.metadata().get(k).and_then(|v| v.to_str().ok()).map(str::to_owned);
        self.calls.lock().unwrap().push(Call {
            method,
            subject: md(securepay_kit::caller::SUBJECT_METADATA),
            // The transport's verified peer (present only over mTLS).
            peer: request.extensions().get::<securepay_kit::PeerSvid>().map(|p| p.0.spiffe_id.clone()),
            detail,
        });
        let delay = *self.delay.lock().unwrap();
        if let Some(delay) = delay {
            tokio::time::sleep(delay).await;
        }
        match self.fail_with.lock().unwrap().clone() {
            Some(status) => Err(status),
            None => Ok(()),
        }
    }
}

#[derive(Clone)]
struct Fake(Arc<Recorder>);

fn ts(seconds: i64) -> Option<prost_types::Timestamp> {
    Some(prost_types::Timestamp { seconds, nanos: 0 })
}

fn stored_payment(id: &str, from: &str, to: &str, money: payment::Money) -> payment::Payment {
    payment::Payment {
        payment_id: id.to_owned(),
        status: payment::PaymentStatus::Pending as i32,
        failure_reason: String::new(),
        amount: Some(money),
        from_account: from.to_owned(),
        to_account: to.to_owned(),
        created_at: ts(1_767_225_600),
        updated_at: ts(1_767_225_600),
        transitions: vec![],
    }
}

#[tonic::async_trait]
impl payment::payment_service_server::PaymentService for Fake {
    async fn initiate_payment(
        &self,
        request: tonic::Request<payment::InitiatePaymentRequest>,
    ) -> Result<tonic::Response<payment::InitiatePaymentResponse>, Status> {
        let r = request.get_ref().clone();
        self.0.record("InitiatePayment", &request, format!("{r:?}")).await?;
        let id = if r.payment_id.is_empty() { PAYMENT.to_owned() } else { r.payment_id.clone() };
        let replayed = *self.0.replay.lock().unwrap();
        let body = payment::InitiatePaymentResponse {
            payment: Some(stored_payment(&id, &r.from_account, &r.to_account, r.amount.unwrap())),
            replayed: false,
        };
        let mut response = tonic::Response::new(body);
        if replayed {
            response.metadata_mut().insert("x-securepay-idempotent-replayed", "true".parse().unwrap());
        }
        Ok(response)
    }

    async fn get_payment(
        &self,
        request: tonic::Request<payment::GetPaymentRequest>,
    ) -> Result<tonic::Response<payment::Payment>, Status> {
        let id = request.get_ref().payment_id.clone();
        self.0.record("GetPayment", &request, id.clone()).await?;
        let money = payment::Money { amount: "10.50".into(), currency: "EUR".into() };
        Ok(tonic::Response::new(stored_payment(&id, FROM, TO, money)))
    }
}

#[tonic::async_trait]
impl account::account_service_server::AccountService for Fake {
    async fn check_balance(
        &self,
        request: tonic::Request<account::CheckBalanceRequest>,
    ) -> Result<tonic::Response<account::CheckBalanceResponse>, Status> {
        self.0.record("CheckBalance", &request, String::new()).await?;
        Err(Status::permission_denied("the gateway never calls this"))
    }

    async fn get_balance(
        &self,
        request: tonic::Request<account::GetBalanceRequest>,
    ) -> Result<tonic::Response<account::Balance>, Status> {
        let id = request.get_ref().account_id.clone();
        self.0.record("GetBalance", &request, id.clone()).await?;
        Ok(tonic::Response::new(account::Balance {
            account_id: id,
            balance: "1000.00".into(),
            currency: "EUR".into(),
            as_of: ts(1_767_225_600),
        }))
    }
}

#[tonic::async_trait]
impl notification::notification_service_server::NotificationService for Fake {
    async fn list_notifications(
        &self,
        request: tonic::Request<notification::ListNotificationsRequest>,
    ) -> Result<tonic::Response<notification::ListNotificationsResponse>, Status> {
        let id = request.get_ref().payment_id.clone();
        self.0.record("ListNotifications", &request, id.clone()).await?;
        let one = |event: &str, kind: &str, status: &str, failure: &str, at: i64| notification::Notification {
            event_id: event.to_owned(),
            kind: kind.to_owned(),
            status: status.to_owned(),
            failure_reason: failure.to_owned(),
            amount: "10.50".into(),
            currency: "EUR".into(),
            from_account: FROM.into(),
            to_account: TO.into(),
            occurred_at: ts(at),
            recorded_at: ts(at + 1),
        };
        Ok(tonic::Response::new(notification::ListNotificationsResponse {
            payment_id: id,
            notifications: vec![
                one("0196f0c0-0000-7000-8000-000000000001", "initiated", "PENDING", "", 1_767_225_600),
                one("0196f0c0-0000-7000-8000-000000000002", "failed", "FAILED", "insufficient_funds", 1_767_225_601),
            ],
        }))
    }
}

// ---------------------------------------------------------------------------------------------
// Harness

struct Gateway {
    app: Router,
    backend: Arc<Recorder>,
    key: SecretKey,
    jwt: JwtConfig,
    _dir: tempfile::TempDir,
}

async fn start_backend() -> (SocketAddr, Arc<Recorder>) {
    let recorder = Arc::new(Recorder::default());
    let incoming = tonic::transport::server::TcpIncoming::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = incoming.local_addr().unwrap();
    let fake = Fake(recorder.clone());
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(payment::payment_service_server::PaymentServiceServer::new(fake.clone()))
            .add_service(account::account_service_server::AccountServiceServer::new(fake.clone()))
            .add_service(notification::notification_service_server::NotificationServiceServer::new(fake))
            .serve_with_incoming(incoming),
    );
    (addr, recorder)
}

async fn gateway_with(config: GatewayConfig) -> Gateway {
    let dir = tempfile::tempdir().unwrap();
    let (key_path, jwks_path) = devkeys::ensure_dev_keys(dir.path()).unwrap();
    let key = devkeys::load_key(&key_path).unwrap();
    let auth = Authenticator::from_jwks_file(&jwks_path, config.jwt.clone()).unwrap();
    let (addr, backend) = start_backend().await;
    let backends = plaintext_backends(&addr.to_string());
    let jwt = config.jwt.clone();
    let app = securepay_gateway::router(AppState::new(config, auth, backends, None));
    Gateway { app, backend, key, jwt, _dir: dir }
}

async fn gateway() -> Gateway {
    gateway_with(GatewayConfig::default()).await
}

fn now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

struct Reply {
    status: StatusCode,
    headers: axum::http::HeaderMap,
    bytes: Vec<u8>,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.bytes)
            .unwrap_or_else(|_| panic!("not JSON: {:?}", String::from_utf8_lossy(&self.bytes)))
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// Asserts an RFC 9457 problem with `status` and `code`, whose instance is the request id.
    fn assert_problem(&self, status: u16, code: &str) {
        assert_eq!(self.status.as_u16(), status, "body: {}", String::from_utf8_lossy(&self.bytes));
        assert_eq!(self.header("content-type"), Some("application/problem+json"));
        let body = self.json();
        assert_eq!(body["code"], code, "body: {body}");
        assert_eq!(body["status"], status);
        assert!(body["type"].as_str().unwrap().ends_with(code));
        assert!(body["title"].is_string() && body["detail"].is_string());
        assert_eq!(body["instance"].as_str(), self.header("x-request-id"), "instance is the request id");
        assert!(!body["instance"].as_str().unwrap().is_empty());
    }
}

impl Gateway {
    fn claims(&self, sub: &str, scope: &str) -> Value {
        json!({"iss": self.jwt.issuer, "aud": self.jwt.audience, "sub": sub, "scope": scope,
               "iat": now(), "nbf": now(), "exp": now() + 600})
    }

    fn kid(&self) -> String {
        devkeys::key_id(&self.key.public_key())
    }

    fn sign(&self, claims: &Value) -> String {
        sign_es256(&self.key, &self.kid(), claims)
    }

    fn token(&self, sub: &str) -> String {
        self.sign(&self.claims(sub, "payments:read payments:write"))
    }

    async fn send(&self, request: Request<Body>) -> Reply {
        self.send_from(request, IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1))).await
    }

    async fn send_from(&self, mut request: Request<Body>, ip: IpAddr) -> Reply {
        request.extensions_mut().insert(ConnectInfo(SocketAddr::new(ip, 40_000)));
        let response = self.app.clone().oneshot(request).await.unwrap();
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = response.into_body().collect().await.unwrap().to_bytes().to_vec();
        Reply { status, headers, bytes }
    }

    fn calls(&self) -> Vec<Call> {
        self.backend.calls.lock().unwrap().clone()
    }

    fn assert_no_backend_call(&self, case: &str) {
        assert_eq!(self.calls(), vec![], "{case}: the backend must not be called");
    }
}

fn sign_es256(key: &SecretKey, kid: &str, claims: &Value) -> String {
    let pem = key.to_pkcs8_pem(LineEnding::LF).unwrap();
    let mut header = Header::new(Algorithm::ES256);
    header.kid = Some(kid.to_owned());
    jsonwebtoken::encode(&header, claims, &EncodingKey::from_ec_pem(pem.as_bytes()).unwrap()).unwrap()
}

fn payment_body() -> Value {
    json!({"from_account": FROM, "to_account": TO, "amount": "10.50", "currency": "EUR"})
}

fn post(token: Option<&str>, body: impl Into<Body>) -> Request<Body> {
    let mut b = Request::post("/api/v1/payments").header(header::CONTENT_TYPE, "application/json");
    if let Some(t) = token {
        b = b.header(header::AUTHORIZATION, format!("Bearer {t}"));
    }
    b.body(body.into()).unwrap()
}

fn get(path: &str, token: Option<&str>) -> Request<Body> {
    let mut b = Request::get(path);
    if let Some(t) = token {
        b = b.header(header::AUTHORIZATION, format!("Bearer {t}"));
    }
    b.body(Body::empty()).unwrap()
}

fn balance_path(id: &str) -> String {
    format!("/api/v1/accounts/{id}/balance")
}

// ---------------------------------------------------------------------------------------------
// Happy paths

#[tokio::test]
async fn a_payment_is_accepted_with_location_and_the_subject_reaches_the_service() {
    let gw = gateway().await;
    let mut body = payment_body();
    body["amount"] = json!(10.5); // a JSON number, read exactly
    let reply = gw.send(post(Some(&gw.token("alice")), body.to_string())).await;
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{}", String::from_utf8_lossy(&reply.bytes));
    assert_eq!(reply.header("location"), Some(format!("/api/v1/payments/{PAYMENT}").as_str()));
    assert_eq!(reply.header("idempotent-replayed"), None);
    assert_eq!(
        reply.json(),
        json!({"payment_id": PAYMENT, "status": "PENDING", "amount": "10.50", "currency": "EUR",
               "from_account": FROM, "to_account": TO,
               "created_at": "2026-01-01T00:00:00Z", "updated_at": "2026-01-01T00:00:00Z"})
    );
    assert!(reply.header("ratelimit-limit").is_some() && reply.header("ratelimit-remaining").is_some());
    let calls = gw.calls();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].method, "InitiatePayment");
    assert_eq!(calls[0].subject.as_deref(), Some("alice"));
    assert!(calls[0].detail.contains("amount: \"10.50\""), "canonical amount text: {}", calls[0].detail);
}

#[tokio::test]
async fn reads_return_the_documented_fields() {
    let gw = gateway().await;
    let token = gw.token("alice");
    let reply = gw.send(get(&balance_path(FROM), Some(&token))).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.json(), json!({"account_id": FROM, "balance": "1000.00", "currency": "EUR"}));
    let reply = gw.send(get(&format!("/api/v1/payments/{PAYMENT}"), Some(&token))).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.json()["payment_id"], PAYMENT);
    assert_eq!(reply.json()["status"], "PENDING");
    let methods: Vec<_> = gw.calls().into_iter().map(|c| (c.method, c.subject.unwrap())).collect();
    assert_eq!(methods, vec![("GetBalance", "alice".to_owned()), ("GetPayment", "alice".to_owned())]);
}

#[tokio::test]
async fn a_replay_is_flagged_and_its_body_is_byte_identical() {
    let gw = gateway().await;
    let token = gw.token("alice");
    let request = || {
        let mut r = post(Some(&token), payment_body().to_string());
        r.headers_mut().insert("idempotency-key", "order-1".parse().unwrap());
        r
    };
    let first = gw.send(request()).await;
    *gw.backend.replay.lock().unwrap() = true;
    let second = gw.send(request()).await;
    assert_eq!((first.status, second.status), (StatusCode::ACCEPTED, StatusCode::ACCEPTED));
    assert_eq!(first.header("idempotent-replayed"), None);
    assert_eq!(second.header("idempotent-replayed"), Some("true"));
    assert_eq!(first.bytes, second.bytes);
    assert!(gw.calls().iter().all(|c| c.detail.contains("idempotency_key: \"order-1\"")));
}

#[tokio::test]
async fn an_empty_or_blank_idempotency_key_is_refused_never_taken_as_absent() {
    // A shell whose `$(uuidgen)` failed sends `Idempotency-Key:` with nothing after it: that client
    // asked for idempotency and must hear that its key is unusable, not get a payment without one.
    let gw = gateway().await;
    for blank in ["", " ", "\t", "   "] {
        let mut r = post(Some(&gw.token("alice")), payment_body().to_string());
        r.headers_mut().insert("idempotency-key", blank.parse().unwrap());
        gw.send(r).await.assert_problem(400, "invalid_idempotency_key");
        let mut body = payment_body();
        body["idempotency_key"] = json!(blank);
        gw.send(post(Some(&gw.token("alice")), body.to_string())).await.assert_problem(400, "invalid_idempotency_key");
    }
    gw.assert_no_backend_call("blank idempotency keys");
}

#[tokio::test]
async fn idempotency_key_header_and_body_must_agree() {
    let gw = gateway().await;
    let mut body = payment_body();
    body["idempotency_key"] = json!("order-1");
    let mut r = post(Some(&gw.token("alice")), body.to_string());
    r.headers_mut().insert("idempotency-key", "order-2".parse().unwrap());
    gw.send(r).await.assert_problem(400, "idempotency_key_mismatch");
    let mut r = post(Some(&gw.token("alice")), payment_body().to_string());
    r.headers_mut().insert("idempotency-key", "not a key!".parse().unwrap());
    gw.send(r).await.assert_problem(400, "invalid_idempotency_key");
    gw.assert_no_backend_call("bad idempotency keys");
    let reply = gw.send(post(Some(&gw.token("alice")), body.to_string())).await;
    assert_eq!(reply.status, StatusCode::ACCEPTED);
}

#[tokio::test]
async fn backend_errors_map_to_their_problems_without_internal_text() {
    let gw = gateway().await;
    let token = gw.token("alice");
    let cases = [
        (
            securepay_kit::status::status(
                Code::FailedPrecondition,
                "insufficient_funds",
                "the account cannot cover this amount",
            ),
            422,
            "insufficient_funds",
        ),
        (
            securepay_kit::status::status(Code::FailedPrecondition, "idempotency_key_reused", "key reused"),
            422,
            "idempotency_key_reused",
        ),
        (securepay_kit::status::status(Code::Aborted, "request_in_progress", "in flight"), 409, "request_in_progress"),
        (securepay_kit::status::status(Code::NotFound, "unknown_account", "no such account"), 404, "unknown_account"),
        (securepay_kit::status::unavailable(), 503, "service_unavailable"),
        (
            Status::internal("ERROR: duplicate key value violates unique constraint \"payments_pkey\""),
            502,
            "bad_gateway",
        ),
    ];
    for (status, http, code) in cases {
        *gw.backend.fail_with.lock().unwrap() = Some(status);
        let reply = gw.send(post(Some(&token), payment_body().to_string())).await;
        reply.assert_problem(http, code);
        assert!(!String::from_utf8_lossy(&reply.bytes).contains("constraint"));
    }
}

#[tokio::test]
async fn an_unreachable_backend_is_a_503_problem() {
    let dir = tempfile::tempdir().unwrap();
    let (key_path, jwks_path) = devkeys::ensure_dev_keys(dir.path()).unwrap();
    let config = GatewayConfig::default();
    let auth = Authenticator::from_jwks_file(&jwks_path, config.jwt.clone()).unwrap();
    // A port nobody listens on: bind, note, drop.
    let addr = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string();
    let app = securepay_gateway::router(AppState::new(config.clone(), auth, plaintext_backends(&addr), None));
    let key = devkeys::load_key(&key_path).unwrap();
    let token = devkeys::mint_token(&key, &config.jwt, "alice", "payments:read", 60).unwrap();
    let mut request = get(&balance_path(FROM), Some(&token));
    request.extensions_mut().insert(ConnectInfo(SocketAddr::from(([192, 0, 2, 9], 1))));
    let response = app.oneshot(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let body: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(body["code"], "service_unavailable");
    assert!(!body.to_string().to_lowercase().contains("refused"), "no transport text: {body}");
}

// ---------------------------------------------------------------------------------------------
// Authentication and authorization: 401/403 and nothing written

#[tokio::test]
async fn every_bad_token_is_refused_with_401_and_nothing_reaches_a_backend() {
    let gw = gateway().await;
    let other_key = SecretKey::random(&mut rand_core::OsRng);
    let public_pem = gw.key.public_key().to_public_key_pem(LineEnding::LF).unwrap();
    let jwks_text = std::fs::read(gw._dir.path().join(devkeys::JWKS_FILE)).unwrap();
    let b64 = |v: &Value| URL_SAFE_NO_PAD.encode(v.to_string());
    let with = |patch: Value| {
        let mut c = gw.claims("alice", "payments:read payments:write");
        for (k, v) in patch.as_object().unwrap() {
            if v.is_null() {
                c.as_object_mut().unwrap().remove(k);
            } else {
                c[k] = v.clone();
            }
        }
        c
    };
    let hs256 = |secret: &[u8]| {
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some(gw.kid());
        jsonwebtoken::encode(&header, &gw.claims("alice", "payments:write"), &EncodingKey::from_secret(secret)).unwrap()
    };
    let none_token = format!(
        "{}.{}.",
        b64(&json!({"alg": "none", "typ": "JWT", "kid": gw.kid()})),
        b64(&gw.claims("alice", "payments:read payments:write"))
    );
    let valid = gw.token("alice");
    let (head, rest) = valid.split_once('.').unwrap();
    let (payload, _) = rest.split_once('.').unwrap();
    let forged_payload = b64(&with(json!({"sub": "bob"})));
    let cases: Vec<(&str, Option<String>)> = vec![
        ("no token", None),
        ("expired", Some(gw.sign(&with(json!({"exp": now() - 120, "nbf": now() - 600}))))),
        ("not yet valid", Some(gw.sign(&with(json!({"nbf": now() + 300}))))),
        ("no exp", Some(gw.sign(&with(json!({"exp": null}))))),
        ("wrong issuer", Some(gw.sign(&with(json!({"iss": "https://evil.example"}))))),
        ("wrong audience", Some(gw.sign(&with(json!({"aud": "someone-else"}))))),
        (
            "bad signature (other key, same kid)",
            Some(sign_es256(&other_key, &gw.kid(), &gw.claims("alice", "payments:write"))),
        ),
        (
            "payload swapped under a valid signature",
            Some(format!("{head}.{forged_payload}.{}", valid.rsplit('.').next().unwrap())),
        ),
        ("unknown kid", Some(sign_es256(&gw.key, "other-kid", &gw.claims("alice", "payments:write")))),
        ("alg none", Some(none_token)),
        ("HS256 signed with the public key PEM", Some(hs256(public_pem.as_bytes()))),
        ("HS256 signed with the JWKS text", Some(hs256(&jwks_text))),
        ("garbage", Some("not.a.jwt".to_owned())),
        ("empty subject", Some(gw.sign(&with(json!({"sub": ""}))))),
    ];
    let _ = payload;
    for (case, token) in cases {
        let reply = gw.send(post(token.as_deref(), payment_body().to_string())).await;
        reply.assert_problem(401, "unauthorized");
        assert_eq!(reply.header("www-authenticate"), Some("Bearer error=\"invalid_token\""), "{case}");
        let reply = gw.send(get(&balance_path(FROM), token.as_deref())).await;
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{case}");
        gw.assert_no_backend_call(case);
    }
    // Within the leeway both limits still pass.
    let edge = gw.sign(&with(json!({"exp": now() - 5, "nbf": now() + 5})));
    assert_eq!(gw.send(get(&balance_path(FROM), Some(&edge))).await.status, StatusCode::OK);
}

#[tokio::test]
async fn a_missing_scope_is_403_and_nothing_is_written() {
    let gw = gateway().await;
    let read_only = gw.sign(&gw.claims("alice", "payments:read"));
    gw.send(post(Some(&read_only), payment_body().to_string())).await.assert_problem(403, "insufficient_scope");
    let write_only = gw.sign(&gw.claims("alice", "payments:write"));
    gw.send(get(&balance_path(FROM), Some(&write_only))).await.assert_problem(403, "insufficient_scope");
    let no_scope = gw.sign(&json!({"iss": gw.jwt.issuer, "aud": gw.jwt.audience, "sub": "alice", "exp": now() + 60}));
    gw.send(get(&format!("/api/v1/payments/{PAYMENT}"), Some(&no_scope)))
        .await
        .assert_problem(403, "insufficient_scope");
    gw.assert_no_backend_call("missing scope");
}

fn notifications_path(id: &str) -> String {
    format!("/api/v1/payments/{id}/notifications")
}

#[tokio::test]
async fn notifications_are_listed_only_after_the_payment_service_let_the_subject_read_the_payment() {
    let gw = gateway().await;
    let reply = gw.send(get(&notifications_path(PAYMENT), Some(&gw.token("alice")))).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", String::from_utf8_lossy(&reply.bytes));
    assert_eq!(reply.header("content-type"), Some("application/json"));
    let at = |second: &str| format!("2026-01-01T00:00:0{second}Z");
    assert_eq!(
        reply.json(),
        json!({"payment_id": PAYMENT, "notifications": [
            {"event_id": "0196f0c0-0000-7000-8000-000000000001", "kind": "initiated", "status": "PENDING",
             "amount": "10.50", "currency": "EUR", "from_account": FROM, "to_account": TO,
             "occurred_at": at("0"), "recorded_at": at("1")},
            {"event_id": "0196f0c0-0000-7000-8000-000000000002", "kind": "failed", "status": "FAILED",
             "failure_reason": "insufficient_funds", "amount": "10.50", "currency": "EUR",
             "from_account": FROM, "to_account": TO, "occurred_at": at("1"), "recorded_at": at("2")},
        ]})
    );
    let calls: Vec<_> = gw.calls().into_iter().map(|c| (c.method, c.subject.unwrap(), c.detail)).collect();
    assert_eq!(
        calls,
        [
            ("GetPayment", "alice".to_owned(), PAYMENT.to_owned()),
            ("ListNotifications", "alice".to_owned(), PAYMENT.to_owned())
        ],
        "the payment's object-level check first, as the verified subject"
    );
}

#[tokio::test]
async fn notifications_of_a_payment_the_subject_may_not_read_are_never_listed() {
    for (code, error, status) in
        [(Code::PermissionDenied, "forbidden", 403), (Code::NotFound, "payment_not_found", 404)]
    {
        let gw = gateway().await;
        *gw.backend.fail_with.lock().unwrap() = Some(securepay_kit::status::status(code, error, "not yours"));
        gw.send(get(&notifications_path(PAYMENT), Some(&gw.token("mallory")))).await.assert_problem(status, error);
        let methods: Vec<_> = gw.calls().into_iter().map(|c| c.method).collect();
        assert_eq!(methods, ["GetPayment"], "{error}: nothing is listed after a refusal");
    }
    let gw = gateway().await;
    gw.send(get(&notifications_path(PAYMENT), None)).await.assert_problem(401, "unauthorized");
    let write_only = gw.sign(&gw.claims("alice", "payments:write"));
    gw.send(get(&notifications_path(PAYMENT), Some(&write_only))).await.assert_problem(403, "insufficient_scope");
    for hostile in ["not-a-uuid", "..%2F..%2Fadmin", "%00", &"a".repeat(2_000)] {
        let reply = gw.send(get(&notifications_path(hostile), Some(&gw.token("alice")))).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{hostile:.40}: {}", String::from_utf8_lossy(&reply.bytes));
    }
    gw.assert_no_backend_call("no token, no scope, or a malformed id");
}

#[tokio::test]
async fn someone_elses_account_is_403_forbidden_from_the_owning_service() {
    let gw = gateway().await;
    *gw.backend.fail_with.lock().unwrap() = Some(securepay_kit::status::status(
        Code::PermissionDenied,
        "forbidden",
        "the caller does not own this account",
    ));
    let token = gw.token("mallory");
    gw.send(get(&balance_path(FROM), Some(&token))).await.assert_problem(403, "forbidden");
    gw.send(post(Some(&token), payment_body().to_string())).await.assert_problem(403, "forbidden");
    let calls = gw.calls();
    assert_eq!(calls.len(), 2);
    assert!(
        calls.iter().all(|c| c.subject.as_deref() == Some("mallory")),
        "the services decide on the verified subject"
    );
}

// ---------------------------------------------------------------------------------------------
// Hostile input: 4xx problem+json, nothing written

#[tokio::test]
async fn hostile_bodies_are_refused_before_any_backend_call() {
    let mut config = GatewayConfig::default();
    config.rate_limits.subject = quota(1000, 1000);
    let gw = gateway_with(config).await;
    let token = gw.token("alice");
    let with = |key: &str, value: Value| {
        let mut b = payment_body();
        b[key] = value;
        b.to_string()
    };
    let deep = format!(r#"{{"from_account":{}1{}}}"#, "[".repeat(64), "]".repeat(64));
    let cases: Vec<(&str, String, u16, &str)> = vec![
        ("oversized body", format!(r#"{{"from_account":"{}"}}"#, "a".repeat(20 * 1024)), 413, "payload_too_large"),
        ("deep JSON", deep, 400, "invalid_json"),
        ("very deep JSON", "[".repeat(10_000), 400, "invalid_json"),
        ("not JSON", "from_account=1".to_owned(), 400, "invalid_json"),
        ("trailing garbage", format!("{} x", payment_body()), 400, "invalid_json"),
        ("unknown field", with("evil", json!(1)), 400, "unknown_field"),
        ("duplicate field", r#"{"amount":"1","amount":"2","from_account":"a","to_account":"b","currency":"EUR"}"#.to_owned(), 400, "invalid_request"),
        ("missing field", json!({"from_account": FROM}).to_string(), 400, "invalid_request"),
        ("amount 1e400", with("amount", serde_json::from_str("1e400").unwrap()), 400, "invalid_amount"),
        ("amount 1e400 as text", r#"{"from_account":"3f2b8c1e-9d4a-4e7b-8f6a-2c1d0e9b7a65","to_account":"9a8b7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d","amount":1e400,"currency":"EUR"}"#.to_owned(), 400, "invalid_amount"),
        ("amount NaN", with("amount", json!("NaN")), 400, "invalid_amount"),
        ("amount Infinity", with("amount", json!("Infinity")), 400, "invalid_amount"),
        ("negative amount", with("amount", json!("-10.00")), 400, "invalid_amount"),
        ("negative number", with("amount", json!(-10)), 400, "invalid_amount"),
        ("zero", with("amount", json!("0.00")), 400, "invalid_amount"),
        ("too many decimals", with("amount", json!("10.001")), 400, "invalid_amount"),
        ("too many decimals JPY", json!({"from_account": FROM, "to_account": TO, "amount": "1.5", "currency": "JPY"}).to_string(), 400, "invalid_amount"),
        ("above the maximum", with("amount", json!("1000000000.00")), 400, "invalid_amount"),
        ("amount as object", with("amount", json!({"v": 1})), 400, "invalid_amount"),
        ("unsupported currency", with("currency", json!("XXX")), 400, "unsupported_currency"),
        ("SQL in from_account", with("from_account", json!("1' OR '1'='1")), 400, "invalid_account"),
        ("SQL in to_account", with("to_account", json!("x'; DROP TABLE accounts;--")), 400, "invalid_account"),
        ("SQL in payment_id", with("payment_id", json!("'; DELETE FROM payments;--")), 400, "invalid_payment_id"),
        ("same account", with("to_account", json!(FROM)), 400, "same_account"),
        ("SQL in idempotency key", with("idempotency_key", json!("k'; DROP TABLE idempotency;--")), 400, "invalid_idempotency_key"),
    ];
    for (case, body, status, code) in cases {
        let reply = gw.send(post(Some(&token), body)).await;
        assert_eq!(reply.status.as_u16(), status, "{case}: {}", String::from_utf8_lossy(&reply.bytes));
        reply.assert_problem(status, code);
        gw.assert_no_backend_call(case);
    }
}

#[tokio::test]
async fn hostile_requests_are_refused_before_any_backend_call() {
    let gw = gateway().await;
    let token = gw.token("alice");
    let wrong_type = Request::post("/api/v1/payments")
        .header(header::CONTENT_TYPE, "text/plain")
        .header(header::AUTHORIZATION, format!("Bearer {token}"))
        .body(Body::from(payment_body().to_string()))
        .unwrap();
    gw.send(wrong_type).await.assert_problem(415, "unsupported_media_type");
    let mut big_headers = post(Some(&token), payment_body().to_string());
    big_headers.headers_mut().insert("x-padding", "a".repeat(10 * 1024).parse().unwrap());
    gw.send(big_headers).await.assert_problem(431, "request_header_fields_too_large");
    let paths = [
        ("/api/v1/payments/1'%20OR%20'1'='1", "invalid_payment_id"),
        ("/api/v1/payments/%27%3B%20DROP%20TABLE%20payments%3B--", "invalid_payment_id"),
        ("/api/v1/accounts/1'%20OR%201=1/balance", "invalid_account"),
        ("/api/v1/accounts/00000000000000000000000000000000/balance", "invalid_account"),
    ];
    for (path, code) in paths {
        gw.send(get(path, Some(&token))).await.assert_problem(400, code);
    }
    gw.send(get("/api/v1/nothing", Some(&token))).await.assert_problem(404, "not_found");
    let delete = Request::delete("/api/v1/payments")
        .header(header::AUTHORIZATION, format!("Bearer {token}"))
        .body(Body::empty())
        .unwrap();
    gw.send(delete).await.assert_problem(405, "method_not_allowed");
    gw.assert_no_backend_call("hostile requests");
}

#[tokio::test]
async fn a_sane_request_id_is_echoed_and_an_insane_one_replaced() {
    let gw = gateway().await;
    let mut r = get("/health", None);
    r.headers_mut().insert("x-request-id", "req-123".parse().unwrap());
    assert_eq!(gw.send(r).await.header("x-request-id"), Some("req-123"));
    let mut r = get(&balance_path(FROM), None);
    r.headers_mut().insert("x-request-id", "<script>".parse().unwrap());
    let reply = gw.send(r).await;
    reply.assert_problem(401, "unauthorized");
    let id = reply.header("x-request-id").unwrap();
    assert!(uuid::Uuid::parse_str(id).is_ok(), "a fresh UUID, not {id}");
}

// ---------------------------------------------------------------------------------------------
// Rate limits

fn quota(per_second: u32, burst: u32) -> RateQuota {
    RateQuota { per_second: per_second.try_into().unwrap(), burst: burst.try_into().unwrap() }
}

#[tokio::test]
async fn a_burst_above_the_subject_limit_gets_429_and_below_it_none() {
    let mut config = GatewayConfig::default();
    config.rate_limits.subject = quota(1, 5);
    let gw = gateway_with(config).await;
    let alice = gw.token("alice");
    for i in 0..5u32 {
        let reply = gw.send(get(&balance_path(FROM), Some(&alice))).await;
        assert_eq!(reply.status, StatusCode::OK, "request {i} is within the burst");
        assert_eq!(reply.header("ratelimit-limit"), Some("5"));
        assert_eq!(reply.header("ratelimit-remaining"), Some((4 - i).to_string().as_str()));
    }
    let reply = gw.send(get(&balance_path(FROM), Some(&alice))).await;
    reply.assert_problem(429, "rate_limited");
    let retry_after: u64 = reply.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=1).contains(&retry_after), "one cell per second: retry after 1 s, not {retry_after}");
    assert_eq!(reply.header("ratelimit-remaining"), Some("0"));
    assert_eq!(gw.calls().len(), 5, "the refused request reached no backend");
    // Another subject has its own bucket.
    let bob = gw.token("bob");
    assert_eq!(gw.send(get(&balance_path(TO), Some(&bob))).await.status, StatusCode::OK);
}

#[tokio::test]
async fn a_burst_above_the_ip_limit_gets_429_before_authentication() {
    let mut config = GatewayConfig::default();
    config.rate_limits.ip = quota(1, 3);
    let gw = gateway_with(config).await;
    let ip = IpAddr::V4(Ipv4Addr::new(198, 51, 100, 7));
    for i in 0..3 {
        let reply = gw.send_from(get(&balance_path(FROM), None), ip).await;
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "request {i} is within the IP burst");
    }
    let reply = gw.send_from(get(&balance_path(FROM), None), ip).await;
    reply.assert_problem(429, "rate_limited");
    assert!(reply.header("retry-after").is_some());
    let other = IpAddr::V4(Ipv4Addr::new(198, 51, 100, 8));
    assert_eq!(gw.send_from(get(&balance_path(FROM), None), other).await.status, StatusCode::UNAUTHORIZED);
}

// ---------------------------------------------------------------------------------------------
// OpenAPI, dev keys and the token command

#[tokio::test]
async fn the_committed_openapi_document_matches_the_code_and_is_served() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("openapi.json");
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    let generated = api::openapi_json();
    assert!(
        committed == generated,
        "services/gateway/openapi.json is out of date; update it with:\n    cargo run -p securepay-gateway -- openapi > services/gateway/openapi.json"
    );
    let doc: Value = serde_json::from_str(&generated).unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3.1"));
    for p in ["/api/v1/payments", "/api/v1/payments/{id}", "/api/v1/accounts/{id}/balance"] {
        assert!(doc["paths"][p].is_object(), "{p} is documented");
    }
    let gw = gateway().await;
    let reply = gw.send(get("/api/v1/openapi.json", None)).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(String::from_utf8(reply.bytes).unwrap(), generated);
}

#[cfg(unix)]
#[tokio::test]
async fn the_dev_key_is_private_and_kept() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let (key, jwks) = devkeys::ensure_dev_keys(dir.path()).unwrap();
    assert_eq!(std::fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o600);
    let first = std::fs::read(&key).unwrap();
    let first_jwks = std::fs::read(&jwks).unwrap();
    devkeys::ensure_dev_keys(dir.path()).unwrap();
    assert_eq!(std::fs::read(&key).unwrap(), first, "an existing key is kept");
    assert_eq!(std::fs::read(&jwks).unwrap(), first_jwks);
    let jwks: Value = serde_json::from_slice(&first_jwks).unwrap();
    assert_eq!(jwks["keys"][0]["alg"], "ES256");
    assert!(jwks["keys"][0].get("d").is_none(), "the JWKS holds no private part");
}

#[tokio::test]
async fn a_token_from_the_token_command_is_accepted() {
    let exe = env!("CARGO_BIN_EXE_securepay-gateway");
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(exe).args(["dev-keys", "--dir"]).arg(dir.path()).output().unwrap();
    assert!(out.status.success(), "dev-keys: {}", String::from_utf8_lossy(&out.stderr));
    let out = std::process::Command::new(exe)
        .args(["token", "--sub", "alice", "--scope", "payments:read", "--key"])
        .arg(dir.path().join(devkeys::KEY_FILE))
        .env_remove("SECUREPAY_JWT_ISSUER")
        .env_remove("SECUREPAY_JWT_AUDIENCE")
        .output()
        .unwrap();
    assert!(out.status.success(), "token: {}", String::from_utf8_lossy(&out.stderr));
    let token = String::from_utf8(out.stdout).unwrap().trim().to_owned();

    let config = GatewayConfig::default();
    let auth = Authenticator::from_jwks_file(&dir.path().join(devkeys::JWKS_FILE), config.jwt.clone()).unwrap();
    let principal = auth.verify(&token).unwrap();
    assert_eq!(principal.subject.as_str(), "alice");
    assert!(principal.has_scope("payments:read") && !principal.has_scope("payments:write"));

    let (addr, backend) = start_backend().await;
    let backends = plaintext_backends(&addr.to_string());
    let app = securepay_gateway::router(AppState::new(config, auth, backends, None));
    let mut request = get(&balance_path(FROM), Some(&token));
    request.extensions_mut().insert(ConnectInfo(SocketAddr::from(([192, 0, 2, 3], 1))));
    assert_eq!(app.oneshot(request).await.unwrap().status(), StatusCode::OK);
    assert_eq!(backend.calls.lock().unwrap()[0].subject.as_deref(), Some("alice"));
}

/// Fail closed: without a Workload API there is no SVID, and without an SVID no gateway — one
/// line on stderr naming the cause, a failure exit status.
#[test]
fn the_binary_refuses_to_serve_without_an_svid() {
    let dir = tempfile::tempdir().unwrap();
    let (_, jwks_path) = devkeys::ensure_dev_keys(dir.path()).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_securepay-gateway"))
        .env_clear()
        .env("SECUREPAY_LISTEN_ADDR", "127.0.0.1:0")
        .env("SECUREPAY_PAYMENT_ADDR", "127.0.0.1:1")
        .env("SECUREPAY_ACCOUNT_ADDR", "127.0.0.1:1")
        .env("SECUREPAY_NOTIFICATION_ADDR", "127.0.0.1:1")
        .env("SECUREPAY_JWKS_PATH", &jwks_path)
        .env("RUST_LOG", "off")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    assert!(stderr.contains("SPIFFE_ENDPOINT_SOCKET is not set"), "names the cause: {stderr}");
}

/// The fakes behind the real mTLS transport, one per service identity (this test executable is
/// registered with SPIRE as the gateway and as each of the three services).
async fn start_mtls_backend(identity: &securepay_identity::x509::WorkloadIdentity, recorder: Arc<Recorder>) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let fake = Fake(recorder);
    let routes = tonic::service::Routes::new(payment::payment_service_server::PaymentServiceServer::new(fake.clone()))
        .add_service(account::account_service_server::AccountServiceServer::new(fake.clone()))
        .add_service(notification::notification_service_server::NotificationServiceServer::new(fake));
    let identity = identity.clone();
    tokio::spawn(async move {
        let server = tonic::transport::Server::builder();
        securepay_identity::grpc::serve(server, routes, listener, &identity, std::future::pending()).await.unwrap();
    });
    addr
}

/// `Backends::connect`: the gateway calls each service over mTLS with its own SVID (the services
/// see the verified peer `api-gateway`), and refuses a server that is not the service it dialled.
#[tokio::test]
async fn the_gateway_calls_the_services_over_mtls_as_itself() {
    use securepay_core::identity::ServiceIdentity;
    let Some(spire) = securepay_identity::testing::Spire::from_env() else { return };
    let gateway_id = spire.identity_of_this_test(ServiceIdentity::ApiGateway).await;
    let payment_id = spire.identity_of_this_test(ServiceIdentity::PaymentService).await;
    let account_id = spire.identity_of_this_test(ServiceIdentity::AccountService).await;
    let recorder = Arc::new(Recorder::default());
    let payment_addr = start_mtls_backend(&payment_id, recorder.clone()).await;
    let account_addr = start_mtls_backend(&account_id, recorder.clone()).await;
    let notification_id = spire.identity_of_this_test(ServiceIdentity::NotificationService).await;
    let notification_addr = start_mtls_backend(&notification_id, recorder.clone()).await;

    let dir = tempfile::tempdir().unwrap();
    let (key_path, jwks_path) = devkeys::ensure_dev_keys(dir.path()).unwrap();
    let config = GatewayConfig::default();
    let key = devkeys::load_key(&key_path).unwrap();
    let token = devkeys::mint_token(&key, &config.jwt, "alice", "payments:read payments:write", 60).unwrap();
    let app_with = |payment: &str, account: &str| {
        let auth = Authenticator::from_jwks_file(&jwks_path, config.jwt.clone()).unwrap();
        let addrs = securepay_gateway::Channels {
            payment: payment.to_owned(),
            account: account.to_owned(),
            notification: notification_addr.clone(),
        };
        let backends = Backends::connect(&addrs, &gateway_id).unwrap();
        securepay_gateway::router(AppState::new(config.clone(), auth, backends, None))
    };
    let send = |app: Router, mut request: Request<Body>| async move {
        request.extensions_mut().insert(ConnectInfo(SocketAddr::from(([192, 0, 2, 7], 1))));
        app.oneshot(request).await.unwrap().status()
    };

    let app = app_with(&payment_addr, &account_addr);
    assert_eq!(send(app.clone(), get(&balance_path(FROM), Some(&token))).await, StatusCode::OK);
    assert_eq!(send(app.clone(), post(Some(&token), payment_body().to_string())).await, StatusCode::ACCEPTED);
    assert_eq!(send(app, get(&notifications_path(PAYMENT), Some(&token))).await, StatusCode::OK);
    let calls = recorder.calls.lock().unwrap().clone();
    let seen: Vec<(&str, Option<&str>)> = calls.iter().map(|c| (c.method, c.peer.as_deref())).collect();
    assert_eq!(
        seen,
        [
            ("GetBalance", Some(GATEWAY_ID)),
            ("InitiatePayment", Some(GATEWAY_ID)),
            ("GetPayment", Some(GATEWAY_ID)),
            ("ListNotifications", Some(GATEWAY_ID)),
        ]
    );

    // The account service's address given as the payment service's: its SVID is not the payment
    // service's, so the gateway never sends it the call.
    let crossed = app_with(&account_addr, &payment_addr);
    assert_eq!(
        send(crossed.clone(), post(Some(&token), payment_body().to_string())).await,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(send(crossed, get(&balance_path(FROM), Some(&token))).await, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(recorder.calls.lock().unwrap().len(), 4, "no call reached a server with the wrong identity");
}

// ---------------------------------------------------------------------------------------------
// RS256, timeouts, metrics

fn rsa_fixture() -> (EncodingKey, Value) {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let pem = std::fs::read(dir.join("rsa-test-key.pem")).unwrap();
    let jwk: Value = serde_json::from_slice(&std::fs::read(dir.join("rsa-test-jwk.json")).unwrap()).unwrap();
    (EncodingKey::from_rsa_pem(&pem).unwrap(), jwk)
}

#[test]
fn rs256_is_accepted_and_a_key_only_verifies_its_own_algorithm() {
    let (rsa_key, rsa_jwk) = rsa_fixture();
    let ec_key = SecretKey::random(&mut rand_core::OsRng);
    let ec_jwk = devkeys::public_jwk(&ec_key.public_key());
    let ec_kid = devkeys::key_id(&ec_key.public_key());
    let jwks: jsonwebtoken::jwk::JwkSet = serde_json::from_value(json!({"keys": [rsa_jwk, ec_jwk]})).unwrap();
    let jwt = JwtConfig::default();
    let auth = Authenticator::from_jwks(&jwks, jwt.clone()).unwrap();
    let claims =
        json!({"iss": jwt.issuer, "aud": jwt.audience, "sub": "bob", "scope": "payments:read", "exp": now() + 60});
    let signed = |alg: Algorithm, kid: &str, key: &EncodingKey| {
        let mut header = Header::new(alg);
        header.kid = Some(kid.to_owned());
        jsonwebtoken::encode(&header, &claims, key).unwrap()
    };
    let ok = auth.verify(&signed(Algorithm::RS256, "rsa-test", &rsa_key)).unwrap();
    assert_eq!(ok.subject.as_str(), "bob");
    assert!(auth.verify(&sign_es256(&ec_key, &ec_kid, &claims)).is_ok());
    let refused = [
        ("RS384 with the RSA key", signed(Algorithm::RS384, "rsa-test", &rsa_key)),
        ("PS256 with the RSA key", signed(Algorithm::PS256, "rsa-test", &rsa_key)),
        ("RS256 naming the EC key", signed(Algorithm::RS256, &ec_kid, &rsa_key)),
        ("ES256 naming the RSA key", sign_es256(&ec_key, "rsa-test", &claims)),
        ("HS256 with the RSA JWK text", {
            let secret = serde_json::to_vec(&jwks.keys[0]).unwrap();
            signed(Algorithm::HS256, "rsa-test", &EncodingKey::from_secret(&secret))
        }),
    ];
    for (case, token) in refused {
        assert!(auth.verify(&token).is_err(), "{case} must be refused");
    }
}

#[test]
fn a_jwks_without_an_allowed_key_is_refused_at_start_up() {
    let (_, mut rsa_jwk) = rsa_fixture();
    rsa_jwk["alg"] = json!("RS512");
    let jwks: jsonwebtoken::jwk::JwkSet = serde_json::from_value(json!({"keys": [rsa_jwk]})).unwrap();
    assert!(Authenticator::from_jwks(&jwks, JwtConfig::default()).is_err());
}

#[tokio::test]
async fn a_request_that_outlives_its_budget_is_a_504_problem() {
    let config = GatewayConfig { request_timeout: std::time::Duration::from_millis(300), ..GatewayConfig::default() };
    let gw = gateway_with(config).await;
    *gw.backend.delay.lock().unwrap() = Some(std::time::Duration::from_secs(5));
    let reply = gw.send(get(&balance_path(FROM), Some(&gw.token("alice")))).await;
    assert!(
        reply.status == StatusCode::GATEWAY_TIMEOUT,
        "status {} body {}",
        reply.status,
        String::from_utf8_lossy(&reply.bytes)
    );
    reply.assert_problem(504, "gateway_timeout");
}

#[tokio::test]
async fn metrics_name_the_route_template_and_the_auth_failure_reason() {
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder).expect("only this test installs a recorder");
    let dir = tempfile::tempdir().unwrap();
    let (key_path, jwks_path) = devkeys::ensure_dev_keys(dir.path()).unwrap();
    let config = GatewayConfig::default();
    let auth = Authenticator::from_jwks_file(&jwks_path, config.jwt.clone()).unwrap();
    let (addr, _backend) = start_backend().await;
    let backends = plaintext_backends(&addr.to_string());
    let token =
        devkeys::mint_token(&devkeys::load_key(&key_path).unwrap(), &config.jwt, "alice", "payments:read", 60).unwrap();
    let app = securepay_gateway::router(AppState::new(config, auth, backends, Some(handle)));
    let send = |request: Request<Body>| {
        let app = app.clone();
        async move {
            let mut request = request;
            request.extensions_mut().insert(ConnectInfo(SocketAddr::from(([192, 0, 2, 4], 1))));
            app.oneshot(request).await.unwrap()
        }
    };
    assert_eq!(send(get(&balance_path(FROM), Some(&token))).await.status(), StatusCode::OK);
    assert_eq!(send(get(&balance_path(FROM), None)).await.status(), StatusCode::UNAUTHORIZED);
    let response = send(get("/metrics", None)).await;
    assert_eq!(response.status(), StatusCode::OK);
    let text = String::from_utf8(response.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap();
    // Other tests in this binary run concurrently and are recorded too: counts are at least ours.
    let count = |series: &str| -> u64 {
        text.lines()
            .find_map(|line| line.strip_prefix(series).and_then(|rest| rest.trim().parse::<f64>().ok()))
            .unwrap_or_else(|| panic!("missing {series} in:\n{text}")) as u64
    };
    let route = "/api/v1/accounts/{id}/balance";
    assert!(count(&format!(r#"securepay_http_requests_total{{service="gateway",route="{route}",status="200"}}"#)) >= 1);
    assert!(count(&format!(r#"securepay_http_requests_total{{service="gateway",route="{route}",status="401"}}"#)) >= 1);
    assert!(count(r#"securepay_auth_failures_total{reason="jwt_missing"}"#) >= 1);
    assert!(
        count(&format!(r#"securepay_http_request_duration_seconds_count{{service="gateway",route="{route}"}}"#)) >= 2
    );
}

/// TEST-ONLY transport: every client over one lazily connecting plaintext channel to the
/// in-process fakes at `addr` (the binary only ever uses `Backends::connect`, mTLS).
fn plaintext_backends(addr: &str) -> Backends {
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}")).unwrap().connect_lazy();
    Backends::new(securepay_gateway::Channels::one(channel), securepay_gateway::backends::CallInterceptor::none())
}
