//! The public edge in the whole-platform simulation: what the gateway node and the workload's
//! clients share (the development JWT issuer, the gateway's configuration), the HTTP requests a
//! client sends, and how it reads the gateway's answers.
//!
//! Promises:
//! - [`DevIssuer`] is a fixed ES256 key pair (no randomness): the gateway node trusts its JWKS;
//!   clients mint tokens with `iat`/`nbf`/`exp` from the simulated wall clock (the one the gateway
//!   checks them against) and a `jti` from the seed. [`DevIssuer::foreign`] is a key the gateway
//!   does not know.
//! - the gateway node checks token times on its own (skewable) clock ([`DevIssuer::authenticator_on`]):
//!   under a `clock_skew` of the gateway beyond the 30 s leeway it refuses (401) tokens the clients
//!   minted valid on the true clock; clients treat such a 401 as retryable (see `cluster`).
//! - [`gateway_config`] is the production default configuration (rate limits included): the
//!   simulation runs the gateway as it is shipped.
//! - [`read_payment`] classifies a `POST /api/v1/payments` answer the way a careful client must:
//!   accepted (2xx naming a payment), refused for good (any other 4xx, by its problem `code`), or
//!   retry with the same key (no reply, 5xx, 429 after its `Retry-After`, 409 `request_in_progress`).
//! - a [`Hostile`] probe is a request the edge must refuse with a given status and problem `code`
//!   before any backend call; each carries a well-formed payment under a fresh key, so one that
//!   got through would leave a payment no workload key names.

use std::time::{Duration, SystemTime};

use axum::http::{HeaderValue, Request, StatusCode, header};
use madsim::rand::{Rng, thread_rng};
use securepay_core::ids::{AccountId, Subject};
use securepay_gateway::auth::{SCOPE_READ, SCOPE_WRITE};
use securepay_gateway::config::{BODY_LIMIT_BYTES, GatewayConfig, JwtConfig};
use securepay_gateway::devkeys::{self, SecretKey, TokenSigner};
use securepay_gateway::edge::REQUEST_ID_HEADER;
use securepay_gateway::{Authenticator, api};
use securepay_ports::PortResult;

use crate::http::HttpResponse;
use crate::workload::Pay;

/// Lifetime of the tokens clients mint (longer than any run).
pub const TOKEN_TTL_S: i64 = 3600;

/// The gateway node's configuration: production's defaults.
pub fn gateway_config() -> GatewayConfig {
    GatewayConfig::default()
}

/// Seconds since the Unix epoch on the simulated wall clock.
pub fn unix_now() -> i64 {
    let since = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).expect("the simulated clock is after 1970");
    i64::try_from(since.as_secs()).expect("a sane time")
}

/// A development ES256 issuer with a fixed key (see the module docs).
#[derive(Clone)]
pub struct DevIssuer {
    key: SecretKey,
    signer: TokenSigner,
    jwt: JwtConfig,
}

impl std::fmt::Debug for DevIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DevIssuer").field("kid", &self.signer.kid()).finish()
    }
}

impl DevIssuer {
    fn with_key_byte(byte: u8) -> DevIssuer {
        let key = SecretKey::from_slice(&[byte; 32]).expect("a fixed non-zero scalar below the group order");
        let signer = TokenSigner::new(&key).expect("the dev key encodes");
        DevIssuer { key, signer, jwt: gateway_config().jwt }
    }

    /// The issuer the gateway node trusts.
    pub fn new() -> DevIssuer {
        DevIssuer::with_key_byte(0x5e)
    }

    /// A key the gateway does not know (its tokens must be refused).
    pub fn foreign() -> DevIssuer {
        DevIssuer::with_key_byte(0x7a)
    }

    /// The JWKS document (public key only) the gateway node loads.
    pub fn jwks_text(&self) -> String {
        serde_json::json!({"keys": [devkeys::public_jwk(&self.key.public_key())]}).to_string()
    }

    /// The gateway's authenticator for this issuer, on the OS (here: simulated) wall clock.
    pub fn authenticator(&self) -> Authenticator {
        Authenticator::from_jwks_text(&self.jwks_text(), self.jwt.clone()).expect("the dev JWKS is usable")
    }

    /// The gateway's authenticator checking token times on `clock` (the gateway node's skewable
    /// clock: a skew beyond the leeway makes it refuse tokens the clients believe valid).
    pub fn authenticator_on(&self, clock: std::sync::Arc<dyn securepay_ports::Clock>) -> Authenticator {
        self.authenticator().with_clock(clock)
    }

    /// A token for `subject` with `scope`, issued at `now` (Unix seconds) for `ttl_s`.
    pub fn token_at(&self, subject: &Subject, scope: &str, now: i64, ttl_s: i64) -> String {
        let jti = format!("{:032x}", thread_rng().r#gen::<u128>());
        self.signer.mint_at(&self.jwt, subject.as_str(), scope, now, ttl_s, &jti).expect("a dev token signs")
    }

    /// A token for `subject` with both scopes, valid from now for [`TOKEN_TTL_S`].
    pub fn token(&self, subject: &Subject) -> String {
        self.token_at(subject, &format!("{SCOPE_READ} {SCOPE_WRITE}"), unix_now(), TOKEN_TTL_S)
    }
}

impl Default for DevIssuer {
    fn default() -> Self {
        DevIssuer::new()
    }
}

/// The JSON body of `POST /api/v1/payments` for `pay` with `amount` (a decimal string; the key
/// travels in the `Idempotency-Key` header).
pub fn payment_body(pay: &Pay, amount: &str) -> Vec<u8> {
    serde_json::json!({
        "from_account": pay.from.to_string(),
        "to_account": pay.to.to_string(),
        "amount": amount,
        "currency": pay.amount.currency().code(),
    })
    .to_string()
    .into_bytes()
}

/// A request with the headers every client request carries: its request id (so the gateway
/// never draws one) and, when given, the bearer token.
fn request(method: &str, uri: &str, request_id: &str, token: Option<&str>, body: Vec<u8>) -> Request<Vec<u8>> {
    let mut builder = Request::builder().method(method).uri(uri).header(REQUEST_ID_HEADER, request_id);
    if let Some(token) = token {
        builder = builder.header(header::AUTHORIZATION, format!("Bearer {token}"));
    }
    if !body.is_empty() {
        builder = builder.header(header::CONTENT_TYPE, "application/json").header(header::CONTENT_LENGTH, body.len());
    }
    builder.body(body).expect("a valid request")
}

/// `POST /api/v1/payments` with `body` under idempotency key `key`.
pub fn create_payment(request_id: &str, token: Option<&str>, key: &str, body: Vec<u8>) -> Request<Vec<u8>> {
    let mut request = request("POST", "/api/v1/payments", request_id, token, body);
    if let Ok(value) = HeaderValue::from_str(key) {
        request.headers_mut().insert(api::IDEMPOTENCY_KEY_HEADER, value);
    }
    request
}

/// `GET /api/v1/payments/{id}`.
pub fn get_payment(request_id: &str, token: &str, payment_id: &str) -> Request<Vec<u8>> {
    request("GET", &format!("/api/v1/payments/{payment_id}"), request_id, Some(token), Vec::new())
}

/// `GET /api/v1/accounts/{id}/balance`.
pub fn get_balance(request_id: &str, token: &str, account: AccountId) -> Request<Vec<u8>> {
    request("GET", &format!("/api/v1/accounts/{account}/balance"), request_id, Some(token), Vec::new())
}

/// The problem `code` of an error answer (None when the body is not a problem document).
pub fn problem_code(response: &HttpResponse) -> Option<String> {
    let body: serde_json::Value = serde_json::from_slice(&response.body).ok()?;
    body.get("code")?.as_str().map(str::to_owned)
}

/// A JSON string field of a success body.
pub fn body_field(response: &HttpResponse, field: &str) -> Option<String> {
    let body: serde_json::Value = serde_json::from_slice(&response.body).ok()?;
    body.get(field)?.as_str().map(str::to_owned)
}

/// What a client makes of one answer to `POST /api/v1/payments`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PaymentAnswer {
    /// Accepted (first time or replayed): the payment id it named.
    Accepted(String),
    /// Refused for good: the problem code (or `http_<status>` without one).
    Refused(String),
    /// The platform did not decide: send the same request again, not before `after` if given.
    Retry { throttled: bool, after: Option<Duration> },
}

/// Classifies an answer (see the module docs).
pub fn read_payment(answer: &PortResult<HttpResponse>) -> PaymentAnswer {
    let Ok(response) = answer else { return PaymentAnswer::Retry { throttled: false, after: None } };
    let status = response.status;
    if status.is_success() {
        return match body_field(response, "payment_id") {
            Some(id) => PaymentAnswer::Accepted(id),
            // A success that names no payment is the gateway's bug: a definitive, visible label.
            None => PaymentAnswer::Refused(format!("success_without_payment_{}", status.as_u16())),
        };
    }
    let code = problem_code(response);
    if status == StatusCode::TOO_MANY_REQUESTS {
        let after = response
            .headers
            .get(header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .map(Duration::from_secs);
        return PaymentAnswer::Retry { throttled: true, after };
    }
    if status.is_server_error() || (status == StatusCode::CONFLICT && code.as_deref() == Some("request_in_progress")) {
        return PaymentAnswer::Retry { throttled: false, after: None };
    }
    PaymentAnswer::Refused(code.unwrap_or_else(|| format!("http_{}", status.as_u16())))
}

/// A copy of `request` (to send it again).
pub fn copy_request(request: &Request<Vec<u8>>) -> Request<Vec<u8>> {
    let mut copy = Request::new(request.body().clone());
    *copy.method_mut() = request.method().clone();
    *copy.uri_mut() = request.uri().clone();
    *copy.headers_mut() = request.headers().clone();
    copy
}

/// A request the edge must refuse, and how.
#[derive(Debug)]
pub struct Probe {
    pub name: &'static str,
    pub request: Request<Vec<u8>>,
    pub status: StatusCode,
    pub code: &'static str,
}

/// The kinds of hostile request (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hostile {
    NoToken,
    ExpiredToken,
    UnknownKeyToken,
    ForgedSignature,
    ReadOnlyToken,
    GarbageJson,
    OversizeBody,
    UnknownField,
    BadIdempotencyKey,
}

impl Hostile {
    pub const ALL: [Hostile; 9] = [
        Hostile::NoToken,
        Hostile::ExpiredToken,
        Hostile::UnknownKeyToken,
        Hostile::ForgedSignature,
        Hostile::ReadOnlyToken,
        Hostile::GarbageJson,
        Hostile::OversizeBody,
        Hostile::UnknownField,
        Hostile::BadIdempotencyKey,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Hostile::NoToken => "no_token",
            Hostile::ExpiredToken => "expired_token",
            Hostile::UnknownKeyToken => "unknown_key_token",
            Hostile::ForgedSignature => "forged_signature",
            Hostile::ReadOnlyToken => "read_only_token",
            Hostile::GarbageJson => "garbage_json",
            Hostile::OversizeBody => "oversize_body",
            Hostile::UnknownField => "unknown_field",
            Hostile::BadIdempotencyKey => "bad_idempotency_key",
        }
    }

    /// The documented refusal: status and problem code.
    pub fn expected(self) -> (StatusCode, &'static str) {
        match self {
            Hostile::NoToken | Hostile::ExpiredToken | Hostile::UnknownKeyToken | Hostile::ForgedSignature => {
                (StatusCode::UNAUTHORIZED, "unauthorized")
            }
            Hostile::ReadOnlyToken => (StatusCode::FORBIDDEN, "insufficient_scope"),
            Hostile::GarbageJson => (StatusCode::BAD_REQUEST, "invalid_json"),
            Hostile::OversizeBody => (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
            Hostile::UnknownField => (StatusCode::BAD_REQUEST, "unknown_field"),
            Hostile::BadIdempotencyKey => (StatusCode::BAD_REQUEST, "invalid_idempotency_key"),
        }
    }

    /// This probe as a request: otherwise the payment `pay` under the fresh key `key`, sent by
    /// `pay.subject`, whose good token is `valid`.
    pub fn probe(self, issuer: &DevIssuer, valid: &str, pay: &Pay, key: &str, request_id: &str) -> Probe {
        let body = payment_body(pay, &pay.amount.value().to_string());
        let both = format!("{SCOPE_READ} {SCOPE_WRITE}");
        let (token, key, body) = match self {
            Hostile::NoToken => (None, key.to_owned(), body),
            Hostile::ExpiredToken => {
                // Expired an hour ago: far beyond the leeway.
                (Some(issuer.token_at(&pay.subject, &both, unix_now() - 7200, 3600)), key.to_owned(), body)
            }
            Hostile::UnknownKeyToken => (Some(DevIssuer::foreign().token(&pay.subject)), key.to_owned(), body),
            Hostile::ForgedSignature => {
                // The same claims under the trusted kid, the signature's first character changed.
                let (signed, signature) = valid.rsplit_once('.').expect("a compact JWS");
                let first = if signature.starts_with('A') { 'B' } else { 'A' };
                (Some(format!("{signed}.{first}{}", &signature[1..])), key.to_owned(), body)
            }
            Hostile::ReadOnlyToken => {
                (Some(issuer.token_at(&pay.subject, SCOPE_READ, unix_now(), TOKEN_TTL_S)), key.to_owned(), body)
            }
            Hostile::GarbageJson => (Some(valid.to_owned()), key.to_owned(), b"{\"from_account\": ".to_vec()),
            Hostile::OversizeBody => {
                let mut oversize = body;
                oversize.pop(); // the closing brace
                oversize.extend_from_slice(b",\"padding\":\"");
                oversize.resize(BODY_LIMIT_BYTES + 512, b'x');
                oversize.extend_from_slice(b"\"}");
                (Some(valid.to_owned()), key.to_owned(), oversize)
            }
            Hostile::UnknownField => {
                let mut value: serde_json::Value = serde_json::from_slice(&body).expect("the body is JSON");
                value["memo"] = serde_json::Value::from("hello");
                (Some(valid.to_owned()), key.to_owned(), value.to_string().into_bytes())
            }
            Hostile::BadIdempotencyKey => (Some(valid.to_owned()), "not a valid key!".to_owned(), body),
        };
        let (status, code) = self.expected();
        Probe { name: self.name(), request: create_payment(request_id, token.as_deref(), &key, body), status, code }
    }
}
