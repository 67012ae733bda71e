//! The public routes of SPEC §3 under `/api/v1`, their wire shapes and their OpenAPI description.
//!
//! Every request is validated at the edge with the domain core (ids, currency, amount, idempotency
//! key) and refused before any backend call; the backends validate again. Field names are those of
//! the reference implementation.

use axum::Extension;
use axum::extract::{Path, Request, State, rejection::PathRejection};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use securepay_core::idempotency::IdempotencyKey;
use securepay_core::ids::{AccountId, PaymentId};
use securepay_core::money::{Amount, Currency};
use securepay_proto::account::v1 as account;
use securepay_proto::notification::v1 as notification;
use securepay_proto::payment::v1 as payment;
use serde::{Deserialize, Serialize};
use time::format_description::well_known::Rfc3339;
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::{Modify, OpenApi, ToSchema};

use crate::AppState;
use crate::auth::{AuthFailure, Principal, SCOPE_READ, SCOPE_WRITE};
use crate::body::StrictJson;
use crate::problem::{self, Problem, ProblemDocument};

/// Response header telling that a POST was answered from the idempotency record.
pub const IDEMPOTENT_REPLAYED_HEADER: &str = "idempotent-replayed";
/// gRPC response metadata the payment service sets on a replayed response.
pub const IDEMPOTENT_REPLAYED_METADATA: &str = "x-securepay-idempotent-replayed";
pub const IDEMPOTENCY_KEY_HEADER: &str = "idempotency-key";

/// `POST /api/v1/payments` body.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreatePaymentRequest {
    /// Optional client-chosen payment id (UUID).
    #[schema(
        pattern = "^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$",
        example = "7b0e1f8a-3c5d-4e2f-9a1b-6c7d8e9f0a1b"
    )]
    pub payment_id: Option<String>,
    /// The payer's account (UUID), owned by the token's subject.
    #[schema(
        pattern = "^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$",
        example = "a11ce000-0000-4000-8000-000000000001"
    )]
    pub from_account: String,
    /// The payee's account (UUID), another account of the same currency.
    #[schema(
        pattern = "^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$",
        example = "b0b00000-0000-4000-8000-000000000001"
    )]
    pub to_account: String,
    /// A decimal string (`"10.50"`); a JSON number is accepted too and read exactly, never as a
    /// float. At most the currency's minor units of decimals; positive; at most the maximum.
    #[schema(schema_with = amount_schema)]
    pub amount: serde_json::Value,
    /// ISO 4217 alphabetic code of a supported currency.
    #[schema(pattern = "^[A-Z]{3}$", example = "EUR")]
    pub currency: String,
    /// Alternative to the `Idempotency-Key` header (both given must be equal).
    #[schema(pattern = "^[A-Za-z0-9._:-]{1,255}$", example = "order-1234")]
    pub idempotency_key: Option<String>,
}

/// `amount`: a decimal string, or a JSON number read exactly.
fn amount_schema() -> utoipa::openapi::schema::Schema {
    use utoipa::openapi::schema::{ObjectBuilder, OneOfBuilder, Type};
    OneOfBuilder::new()
        .item(ObjectBuilder::new().schema_type(Type::String).pattern(Some("^[0-9]+(\\.[0-9]+)?$")))
        .item(ObjectBuilder::new().schema_type(Type::Number).exclusive_minimum(Some(0.0)))
        .examples([serde_json::json!("10.50")])
        .build()
        .into()
}

/// A payment as the API shows it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct PaymentView {
    #[schema(example = "7b0e1f8a-3c5d-4e2f-9a1b-6c7d8e9f0a1b")]
    pub payment_id: String,
    /// `PENDING`, `COMPLETED` or `FAILED`.
    #[schema(example = "PENDING")]
    pub status: String,
    /// Stable code when `FAILED` (e.g. `insufficient_funds`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failure_reason: Option<String>,
    #[schema(example = "10.50")]
    pub amount: String,
    #[schema(example = "EUR")]
    pub currency: String,
    pub from_account: String,
    pub to_account: String,
    /// RFC 3339.
    #[schema(example = "2026-01-01T12:00:00Z")]
    pub created_at: String,
    /// RFC 3339.
    #[schema(example = "2026-01-01T12:00:00Z")]
    pub updated_at: String,
}

/// `GET /api/v1/accounts/{id}/balance`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct BalanceView {
    pub account_id: String,
    /// Decimal string in the currency's minor-unit precision.
    #[schema(example = "1000.00")]
    pub balance: String,
    #[schema(example = "EUR")]
    pub currency: String,
}

/// One notification of a payment: one per event of its flow.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct NotificationView {
    pub event_id: String,
    /// `initiated`, `completed` or `failed`.
    #[schema(example = "completed")]
    pub kind: String,
    /// The payment status the event announces: `PENDING`, `COMPLETED` or `FAILED`.
    #[schema(example = "COMPLETED")]
    pub status: String,
    /// Stable code when the payment `FAILED` (e.g. `insufficient_funds`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failure_reason: Option<String>,
    #[schema(example = "10.50")]
    pub amount: String,
    #[schema(example = "EUR")]
    pub currency: String,
    pub from_account: String,
    pub to_account: String,
    /// When the event happened (RFC 3339).
    #[schema(example = "2026-01-01T12:00:00Z")]
    pub occurred_at: String,
    /// When the notification service recorded it (RFC 3339).
    #[schema(example = "2026-01-01T12:00:00.1Z")]
    pub recorded_at: String,
}

/// `GET /api/v1/payments/{id}/notifications`: first recorded first.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct NotificationList {
    pub payment_id: String,
    pub notifications: Vec<NotificationView>,
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "SecurePay API",
        description = "Payments between accounts. Errors are RFC 9457 application/problem+json with a stable `code`.",
        license(name = "Apache-2.0"),
    ),
    paths(create_payment, get_payment, list_notifications, get_balance),
    components(schemas(CreatePaymentRequest, PaymentView, BalanceView, NotificationView, NotificationList, ProblemDocument)),
    modifiers(&BearerAuth),
    tags((name = "payments"), (name = "accounts")),
)]
pub struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        let mut scheme = Http::new(HttpAuthScheme::Bearer);
        scheme.bearer_format = Some("JWT".to_owned());
        scheme.description = Some(
            "ES256/RS256 JWT from the SecurePay issuer; scopes in `scope`: payments:write (POST), payments:read (GET)."
                .to_owned(),
        );
        components.add_security_scheme("bearer", SecurityScheme::Http(scheme));
    }
}

/// The OpenAPI document as served and as committed (`services/gateway/openapi.json`).
pub fn openapi_json() -> String {
    let mut text = ApiDoc::openapi().to_pretty_json().expect("the OpenAPI document serializes");
    text.push('\n');
    text
}

pub async fn serve_openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], openapi_json()).into_response()
}

fn bearer_token(headers: &HeaderMap) -> Result<&str, AuthFailure> {
    let value = headers.get(header::AUTHORIZATION).ok_or(AuthFailure::Missing)?;
    let text = value.to_str().map_err(|_| AuthFailure::Invalid)?;
    let (scheme, token) = text.split_once(' ').ok_or(AuthFailure::Invalid)?;
    if !scheme.eq_ignore_ascii_case("bearer") || token.trim().is_empty() {
        return Err(AuthFailure::Invalid);
    }
    Ok(token.trim())
}

/// Route layer of the `/api/v1` resources: verifies the bearer token (401), applies the
/// per-subject rate limit (429) and the scope of the method (403 `insufficient_scope`), then hands
/// the [`Principal`] to the handler. Nothing reaches a backend before this passed.
pub async fn authenticate(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    let principal = match bearer_token(req.headers()).and_then(|token| state.auth.verify(token)) {
        Ok(principal) => principal,
        Err(failure) => {
            securepay_kit::metrics::auth_failure(failure.reason());
            return Problem::unauthorized().into_response();
        }
    };
    let verdict = state.limits.subject.check(&principal.subject.as_str().to_owned());
    if !verdict.allowed {
        return verdict.rejection();
    }
    let scope = if req.method() == Method::GET || req.method() == Method::HEAD { SCOPE_READ } else { SCOPE_WRITE };
    let mut response = if principal.has_scope(scope) {
        req.extensions_mut().insert(principal);
        next.run(req).await
    } else {
        securepay_kit::metrics::auth_failure("scope_missing");
        Problem::new(StatusCode::FORBIDDEN, "insufficient_scope", format!("the token lacks the scope {scope}"))
            .into_response()
    };
    verdict.apply_headers(response.headers_mut());
    response
}

fn timestamp(ts: Option<&prost_types::Timestamp>) -> Option<String> {
    let ts = ts?;
    let nanos = i128::from(ts.seconds) * 1_000_000_000 + i128::from(ts.nanos);
    time::OffsetDateTime::from_unix_timestamp_nanos(nanos).ok()?.format(&Rfc3339).ok()
}

fn bad_gateway() -> Problem {
    Problem::new(StatusCode::BAD_GATEWAY, "bad_gateway", "the request could not be completed")
}

/// A backend payment as the API shows it; a malformed one is the platform's fault (502).
fn payment_view(p: payment::Payment) -> Result<PaymentView, Problem> {
    let status = match payment::PaymentStatus::try_from(p.status) {
        Ok(payment::PaymentStatus::Pending) => "PENDING",
        Ok(payment::PaymentStatus::Completed) => "COMPLETED",
        Ok(payment::PaymentStatus::Failed) => "FAILED",
        _ => return Err(bad_gateway()),
    };
    let money = p.amount.ok_or_else(bad_gateway)?;
    let created_at = timestamp(p.created_at.as_ref()).ok_or_else(bad_gateway)?;
    let updated_at = timestamp(p.updated_at.as_ref()).unwrap_or_else(|| created_at.clone());
    Ok(PaymentView {
        payment_id: p.payment_id,
        status: status.to_owned(),
        failure_reason: Some(p.failure_reason).filter(|r| !r.is_empty()),
        amount: money.amount,
        currency: money.currency,
        from_account: p.from_account,
        to_account: p.to_account,
        created_at,
        updated_at,
    })
}

/// Every backend call is built here: the verified subject, the deadline, and the trace context of
/// the current (`gateway.request`) span as `traceparent`, so the service's span continues the trace.
fn grpc_request<T>(message: T, principal: &Principal, state: &AppState) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    securepay_kit::with_subject(&mut request, &principal.subject);
    securepay_kit::trace::inject_into_metadata(&tracing::Span::current(), request.metadata_mut());
    // Leave the edge time to answer with the backend's verdict before its own timeout fires.
    request.set_timeout(state.config.request_timeout.mul_f64(0.9));
    request
}

fn json<T: Serialize>(status: StatusCode, value: &T) -> Response {
    let body = serde_json::to_vec(value).expect("API views serialize");
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// The idempotency key from the header or the body; both given must agree.
fn idempotency_key(headers: &HeaderMap, body: Option<&str>) -> Result<Option<IdempotencyKey>, Problem> {
    let invalid = || {
        Problem::bad_request(
            "invalid_idempotency_key",
            "idempotency key must be 1 to 255 characters of letters, digits, '-', '_', '.', ':'",
        )
    };
    let header = match headers.get(IDEMPOTENCY_KEY_HEADER) {
        Some(v) => Some(v.to_str().map_err(|_| invalid())?),
        None => None,
    };
    let text = match (header, body) {
        (Some(h), Some(b)) if h != b => {
            return Err(Problem::bad_request(
                "idempotency_key_mismatch",
                "the Idempotency-Key header and the idempotency_key field differ",
            ));
        }
        (Some(k), _) | (None, Some(k)) => k,
        (None, None) => return Ok(None),
    };
    if text.trim().is_empty() {
        // Never "no key": the client asked for idempotency (e.g. a failed `$(uuidgen)` in a shell).
        return Err(Problem::bad_request(
            "invalid_idempotency_key",
            "the idempotency key is empty: send a key (a UUID, say) or leave the header and field out",
        ));
    }
    IdempotencyKey::parse(text).map(Some).map_err(|_| invalid())
}

fn account_id(text: &str, field: &str) -> Result<AccountId, Problem> {
    AccountId::parse(text).map_err(|_| Problem::bad_request("invalid_account", format!("{field} must be a UUID")))
}

fn payment_id(text: &str) -> Result<PaymentId, Problem> {
    PaymentId::parse(text).map_err(|_| Problem::bad_request("invalid_payment_id", "payment_id must be a UUID"))
}

fn path_id(path: Result<Path<String>, PathRejection>) -> Result<String, Problem> {
    path.map(|Path(id)| id).map_err(|_| Problem::bad_request("invalid_request", "the path is not valid"))
}

/// Initiate a payment. Idempotent per (subject, idempotency key): a replay answers the first
/// response again with `Idempotent-Replayed: true`.
#[utoipa::path(
    post,
    path = "/api/v1/payments",
    tag = "payments",
    request_body(content = CreatePaymentRequest, content_type = "application/json"),
    params(("Idempotency-Key" = Option<String>, Header, description = "Idempotency key (or the body field idempotency_key)", pattern = "^[A-Za-z0-9._:-]{1,255}$")),
    responses(
        (status = 202, description = "Accepted for settlement", body = PaymentView,
            headers(("Location" = String, description = "/api/v1/payments/{payment_id}"),
                    ("Idempotent-Replayed" = String, description = "true when this is a replay"))),
        (status = 400, description = "Invalid request (invalid_json, unknown_field, invalid_amount, unsupported_currency, invalid_account, same_account, ...)", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 401, description = "unauthorized", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 403, description = "forbidden, insufficient_scope", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 404, description = "unknown_account", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 409, description = "request_in_progress", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 413, description = "payload_too_large", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 415, description = "unsupported_media_type", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 422, description = "insufficient_funds, idempotency_key_reused, currency_mismatch", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 429, description = "rate_limited", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 503, description = "service_unavailable", body = ProblemDocument, content_type = "application/problem+json"),
    ),
    security(("bearer" = ["payments:write"])),
)]
pub async fn create_payment(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    headers: HeaderMap,
    StrictJson(body): StrictJson<CreatePaymentRequest>,
) -> Result<Response, Problem> {
    let currency = Currency::from_code(&body.currency).map_err(|e| Problem::bad_request(e.code(), e.to_string()))?;
    let amount = Amount::from_json(&body.amount, currency, state.config.amount_policy)
        .map_err(|e| Problem::bad_request(e.code(), e.to_string()))?;
    let from = account_id(&body.from_account, "from_account")?;
    let to = account_id(&body.to_account, "to_account")?;
    if from == to {
        return Err(Problem::bad_request("same_account", "from_account and to_account must differ"));
    }
    let id = body.payment_id.as_deref().map(payment_id).transpose()?;
    let key = idempotency_key(&headers, body.idempotency_key.as_deref())?;

    let message = payment::InitiatePaymentRequest {
        payment_id: id.map(|id| id.to_string()).unwrap_or_default(),
        from_account: from.to_string(),
        to_account: to.to_string(),
        amount: Some(payment::Money { amount: amount.to_string(), currency: currency.code().to_owned() }),
        idempotency_key: key.map(|k| k.as_str().to_owned()).unwrap_or_default(),
    };
    let request = grpc_request(message, &principal, &state);
    let response =
        state.backends.payment.clone().initiate_payment(request).await.map_err(|s| problem::from_status(&s))?;
    let replayed_metadata =
        response.metadata().get(IDEMPOTENT_REPLAYED_METADATA).and_then(|v| v.to_str().ok()) == Some("true");
    let reply = response.into_inner();
    let replayed = replayed_metadata || reply.replayed;
    let view = payment_view(reply.payment.ok_or_else(bad_gateway)?)?;
    let location = PaymentId::parse(&view.payment_id)
        .ok()
        .and_then(|id| HeaderValue::from_str(&format!("/api/v1/payments/{id}")).ok())
        .ok_or_else(bad_gateway)?;
    let mut response = json(StatusCode::ACCEPTED, &view);
    response.headers_mut().insert(header::LOCATION, location);
    if replayed {
        response.headers_mut().insert(IDEMPOTENT_REPLAYED_HEADER, HeaderValue::from_static("true"));
    }
    Ok(response)
}

/// Read one payment (only the subject that initiated it; the payment service decides).
#[utoipa::path(
    get,
    path = "/api/v1/payments/{id}",
    tag = "payments",
    params(("id" = String, Path, description = "Payment id (UUID)", pattern = "^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")),
    responses(
        (status = 200, description = "The payment", body = PaymentView),
        (status = 400, description = "invalid_payment_id", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 401, description = "unauthorized", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 403, description = "forbidden, insufficient_scope", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 404, description = "payment_not_found", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 429, description = "rate_limited", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 503, description = "service_unavailable", body = ProblemDocument, content_type = "application/problem+json"),
    ),
    security(("bearer" = ["payments:read"])),
)]
pub async fn get_payment(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Response, Problem> {
    let id = payment_id(&path_id(path)?)?;
    let request = grpc_request(payment::GetPaymentRequest { payment_id: id.to_string() }, &principal, &state);
    let reply = state.backends.payment.clone().get_payment(request).await.map_err(|s| problem::from_status(&s))?;
    Ok(json(StatusCode::OK, &payment_view(reply.into_inner())?))
}

/// A backend notification as the API shows it; a malformed one is the platform's fault (502).
fn notification_view(n: notification::Notification) -> Result<NotificationView, Problem> {
    Ok(NotificationView {
        occurred_at: timestamp(n.occurred_at.as_ref()).ok_or_else(bad_gateway)?,
        recorded_at: timestamp(n.recorded_at.as_ref()).ok_or_else(bad_gateway)?,
        event_id: n.event_id,
        kind: n.kind,
        status: n.status,
        failure_reason: Some(n.failure_reason).filter(|r| !r.is_empty()),
        amount: n.amount,
        currency: n.currency,
        from_account: n.from_account,
        to_account: n.to_account,
    })
}

/// List a payment's notifications, under the payment's own object-level authorization: the
/// payment service decides, as for `GET /api/v1/payments/{id}`, before anything is read.
#[utoipa::path(
    get,
    path = "/api/v1/payments/{id}/notifications",
    tag = "payments",
    params(("id" = String, Path, description = "Payment id (UUID)", pattern = "^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")),
    responses(
        (status = 200, description = "The payment's notifications, first recorded first", body = NotificationList),
        (status = 400, description = "invalid_payment_id", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 401, description = "unauthorized", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 403, description = "forbidden, insufficient_scope", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 404, description = "payment_not_found", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 429, description = "rate_limited", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 503, description = "service_unavailable", body = ProblemDocument, content_type = "application/problem+json"),
    ),
    security(("bearer" = ["payments:read"])),
)]
pub async fn list_notifications(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Response, Problem> {
    let id = payment_id(&path_id(path)?)?;
    // Object-level authorization first: the payment service shows the payment only to the subject
    // allowed to read it (403/404 otherwise), and nothing is listed unless it did.
    let request = grpc_request(payment::GetPaymentRequest { payment_id: id.to_string() }, &principal, &state);
    state.backends.payment.clone().get_payment(request).await.map_err(|s| problem::from_status(&s))?;
    let request =
        grpc_request(notification::ListNotificationsRequest { payment_id: id.to_string() }, &principal, &state);
    let reply =
        state.backends.notification.clone().list_notifications(request).await.map_err(|s| problem::from_status(&s))?;
    let notifications =
        reply.into_inner().notifications.into_iter().map(notification_view).collect::<Result<Vec<_>, _>>()?;
    Ok(json(StatusCode::OK, &NotificationList { payment_id: id.to_string(), notifications }))
}

/// Read the balance of one of the caller's accounts.
#[utoipa::path(
    get,
    path = "/api/v1/accounts/{id}/balance",
    tag = "accounts",
    params(("id" = String, Path, description = "Account id (UUID)", pattern = "^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")),
    responses(
        (status = 200, description = "The balance", body = BalanceView),
        (status = 400, description = "invalid_account", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 401, description = "unauthorized", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 403, description = "forbidden, insufficient_scope", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 404, description = "unknown_account", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 429, description = "rate_limited", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 503, description = "service_unavailable", body = ProblemDocument, content_type = "application/problem+json"),
    ),
    security(("bearer" = ["payments:read"])),
)]
pub async fn get_balance(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Response, Problem> {
    let id = account_id(&path_id(path)?, "account id")?;
    let request = grpc_request(account::GetBalanceRequest { account_id: id.to_string() }, &principal, &state);
    let reply = state.backends.account.clone().get_balance(request).await.map_err(|s| problem::from_status(&s))?;
    let b = reply.into_inner();
    Ok(json(StatusCode::OK, &BalanceView { account_id: b.account_id, balance: b.balance, currency: b.currency }))
}
