//! End-to-end: the whole stack the runner started (`cargo xtask test` brings up the test platform
//! WITH the four services), driven only through the public gateway, as a client would. Checks the
//! 8-step flow (SPEC §6) and its guarantees on real PostgreSQL, Redis, Kafka, SPIRE and Jaeger.
//!
//! The demo accounts are shared by every run on one test platform, so the assertions are about
//! deltas, never absolute balances.

use std::str::FromStr;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use rust_decimal::Decimal;
use securepay_testkit::{component, var};
use serde_json::{Value, json};
use uuid::Uuid;

const ALICE_EUR: &str = "a11ce000-0000-4000-8000-000000000001";
const BOB_EUR: &str = "b0b00000-0000-4000-8000-000000000001";
const BOB_TRY: &str = "b0b00000-0000-4000-8000-000000000002";
const ALICE_TRY: &str = "a11ce000-0000-4000-8000-000000000002";
const CAROL_EUR: &str = "ca201000-0000-4000-8000-000000000001";

/// How long a payment may take to reach its terminal state on the test platform.
const SETTLE_WAIT: Duration = Duration::from_secs(60);

/// The account service's balance-cache TTL (`securepay_account::grpc::CACHE_TTL_S`).
const BALANCE_CACHE_TTL: Duration = Duration::from_secs(5);

/// The eight spans of SPEC §8, one trace per request.
const SPANS: [&str; 8] = [
    "gateway.request",
    "payment.initiate",
    "account.check_balance",
    "cache.lookup",
    "db.balance_read",
    "kafka.publish payment.initiated",
    "account.settle",
    "notification.record",
];

/// The spans the outcome of a COMPLETED payment adds to the request's trace (the account outbox
/// writes the `account.settle` span's `traceparent` into the outcome event): the account relay's
/// publish, then the payment service's and the notification service's consumers, both its children.
const OUTCOME_PUBLISH: &str = "kafka.publish payment.completed";
const OUTCOME_SPANS: [&str; 2] = [OUTCOME_PUBLISH, "payment.outcome"];

struct Stack {
    gateway: String,
    notification_admin: String,
    jaeger: String,
    key: String,
    http: Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
}

struct Reply {
    status: u16,
    headers: hyper::HeaderMap,
    body: Value,
}

impl Stack {
    fn new() -> Option<Stack> {
        Some(Stack {
            gateway: component(var::GATEWAY_URL)?,
            notification_admin: component(var::NOTIFICATION_ADMIN_URL)?,
            jaeger: component(var::JAEGER_QUERY_URL)?,
            key: component(var::JWT_DEV_KEY)?,
            http: Client::builder(TokioExecutor::new()).build_http(),
        })
    }

    /// A token for `sub` minted by the gateway's own dev-token command from the platform's dev key.
    fn token(&self, sub: &str) -> String {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        let output = std::process::Command::new(root.join("target/debug/securepay-gateway"))
            .args(["token", "--key", &self.key, "--sub", sub])
            .output()
            .expect("run securepay-gateway token");
        assert!(output.status.success(), "token: {}", String::from_utf8_lossy(&output.stderr));
        String::from_utf8(output.stdout).unwrap().trim().to_owned()
    }

    async fn call(
        &self,
        method: &str,
        url: &str,
        token: Option<&str>,
        headers: &[(&str, &str)],
        body: Option<Value>,
    ) -> Reply {
        let mut request = hyper::Request::builder().method(method).uri(url);
        if let Some(token) = token {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let bytes = match body {
            Some(body) => {
                request = request.header("content-type", "application/json");
                Bytes::from(body.to_string())
            }
            None => Bytes::new(),
        };
        let response = self.http.request(request.body(Full::new(bytes)).unwrap()).await.expect("HTTP call");
        let (parts, body) = response.into_parts();
        let bytes = body.collect().await.expect("body").to_bytes();
        let body = if bytes.is_empty() { Value::Null } else { serde_json::from_slice(&bytes).unwrap_or(Value::Null) };
        Reply { status: parts.status.as_u16(), headers: parts.headers, body }
    }

    async fn balance(&self, token: &str, account: &str) -> Decimal {
        let url = format!("{}/api/v1/accounts/{account}/balance", self.gateway);
        let reply = self.call("GET", &url, Some(token), &[], None).await;
        assert_eq!(reply.status, 200, "balance of {account}: {}", reply.body);
        Decimal::from_str(reply.body["balance"].as_str().expect("balance is a decimal string")).unwrap()
    }

    async fn pay(
        &self,
        token: &str,
        from: &str,
        to: &str,
        amount: &str,
        currency: &str,
        extra: &[(&str, &str)],
    ) -> Reply {
        let key = Uuid::new_v4().to_string();
        let mut headers = vec![("idempotency-key", key.as_str())];
        headers.extend_from_slice(extra);
        let body = json!({"from_account": from, "to_account": to, "amount": amount, "currency": currency});
        self.call("POST", &format!("{}/api/v1/payments", self.gateway), Some(token), &headers, Some(body)).await
    }

    /// Polls the payment until it is COMPLETED or FAILED.
    async fn settled(&self, token: &str, id: &str) -> Value {
        let url = format!("{}/api/v1/payments/{id}", self.gateway);
        let started = Instant::now();
        loop {
            let reply = self.call("GET", &url, Some(token), &[], None).await;
            assert_eq!(reply.status, 200, "GET payment {id}: {}", reply.body);
            if reply.body["status"] != "PENDING" {
                return reply.body;
            }
            assert!(started.elapsed() < SETTLE_WAIT, "payment {id} still PENDING after {SETTLE_WAIT:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The payment's notifications through the gateway, once `expected` arrived (or the wait ran out).
    async fn notifications(&self, token: &str, id: &str, expected: usize) -> Vec<Value> {
        let url = format!("{}/api/v1/payments/{id}/notifications", self.gateway);
        let started = Instant::now();
        loop {
            let reply = self.call("GET", &url, Some(token), &[], None).await;
            assert_eq!(reply.status, 200, "notifications of {id}: {}", reply.body);
            let list = reply.body["notifications"].as_array().cloned().unwrap_or_default();
            if list.len() >= expected || started.elapsed() > SETTLE_WAIT {
                return list;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The spans of one trace in Jaeger (its JSON), once all `SPANS` and `OUTCOME_SPANS` and the
    /// completed event's `notification.record` arrived (or the wait ran out).
    async fn trace_spans(&self, trace_id: &str) -> Vec<Value> {
        let url = format!("{}/api/traces/{trace_id}", self.jaeger);
        let started = Instant::now();
        loop {
            let reply = self.call("GET", &url, None, &[], None).await;
            let spans = reply.body["data"][0]["spans"].as_array().cloned().unwrap_or_default();
            let names = span_names(&spans);
            let all = SPANS.iter().chain(&OUTCOME_SPANS).all(|s| names.contains(s));
            if (all && completed_notification(&spans).is_some()) || started.elapsed() > Duration::from_secs(45) {
                return spans;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

/// The scenarios share the demo accounts and assert exact balance deltas, so they run one after
/// the other in one test.
#[tokio::test]
async fn the_payment_flow_end_to_end() {
    let Some(stack) = Stack::new() else { return };
    a_payment_settles_with_one_notification_per_event_and_one_trace(&stack).await;
    unaffordable_payments_fail_with_insufficient_funds_and_move_nothing(&stack).await;
}

/// One payment through the gateway: accepted (202 + Location), settled COMPLETED, balances moved
/// by exactly the amount, one notification per event, and one trace in Jaeger with all 8 spans
/// and the outcome's consumers, children of the settlement's outcome publish.
async fn a_payment_settles_with_one_notification_per_event_and_one_trace(stack: &Stack) {
    let (alice, bob) = (stack.token("alice"), stack.token("bob"));
    let (alice_before, bob_before) = (stack.balance(&alice, ALICE_EUR).await, stack.balance(&bob, BOB_EUR).await);
    // Those reads cached both balances (cache-aside, 5 s TTL). Let the entries expire so the
    // payment's balance check misses the cache and reads PostgreSQL: the trace then shows every
    // step of the flow, `db.balance_read` included.
    tokio::time::sleep(BALANCE_CACHE_TTL + Duration::from_millis(500)).await;

    let trace_id = Uuid::new_v4().simple().to_string();
    let traceparent = format!("00-{trace_id}-{}-01", &Uuid::new_v4().simple().to_string()[..16]);
    let reply = stack.pay(&alice, ALICE_EUR, BOB_EUR, "1.25", "EUR", &[("traceparent", &traceparent)]).await;
    assert_eq!(reply.status, 202, "{}", reply.body);
    assert_eq!(reply.body["status"], "PENDING");
    let id = reply.body["payment_id"].as_str().expect("payment_id").to_owned();
    assert_eq!(reply.headers["location"], format!("/api/v1/payments/{id}").as_str());

    let payment = stack.settled(&alice, &id).await;
    assert_eq!(payment["status"], "COMPLETED", "{payment}");
    assert_eq!(payment["amount"], "1.25");
    assert_eq!(stack.balance(&alice, ALICE_EUR).await, alice_before - Decimal::new(125, 2));
    assert_eq!(stack.balance(&bob, BOB_EUR).await, bob_before + Decimal::new(125, 2));

    let notifications = stack.notifications(&alice, &id, 2).await;
    let kinds: Vec<&str> = notifications.iter().filter_map(|n| n["kind"].as_str()).collect();
    assert_eq!(kinds.len(), 2, "one notification per event (initiated, completed): {notifications:?}");
    assert!(kinds.contains(&"initiated") && kinds.contains(&"completed"), "{kinds:?}");
    notifications_are_only_for_the_payments_parties(stack, &id, &bob).await;

    let spans = stack.trace_spans(&trace_id).await;
    let names = span_names(&spans);
    let missing: Vec<&str> = SPANS.iter().chain(&OUTCOME_SPANS).copied().filter(|s| !names.contains(s)).collect();
    assert!(missing.is_empty(), "trace {trace_id} lacks {missing:?}; has {names:?}");
    // The outcome continues the request's trace from its settlement, not a trace of its own.
    let named = |name: &str| spans.iter().find(|s| s["operationName"] == name).expect("checked above");
    let outcome_consumers = [
        named("payment.outcome"),
        completed_notification(&spans).expect("a notification.record of the completed event"),
    ];
    assert_eq!(parent_name(&spans, named(OUTCOME_PUBLISH)), Some("account.settle"), "trace {trace_id}");
    for consumer in outcome_consumers {
        assert_eq!(parent_name(&spans, consumer), Some(OUTCOME_PUBLISH), "trace {trace_id}: {consumer}");
    }
}

/// The operation names of Jaeger spans.
fn span_names(spans: &[Value]) -> Vec<&str> {
    spans.iter().filter_map(|s| s["operationName"].as_str()).collect()
}

/// The `notification.record` span of the completed event (its `kind` attribute), if any.
fn completed_notification(spans: &[Value]) -> Option<&Value> {
    spans.iter().find(|s| {
        let tags = s["tags"].as_array().map(Vec::as_slice).unwrap_or_default();
        s["operationName"] == "notification.record"
            && tags.iter().any(|t| t["key"] == "kind" && t["value"] == "completed")
    })
}

/// The operation name of `span`'s parent (its `CHILD_OF` reference) among `spans`.
fn parent_name<'a>(spans: &'a [Value], span: &Value) -> Option<&'a str> {
    let references = span["references"].as_array()?;
    let parent = references.iter().find(|r| r["refType"] == "CHILD_OF")?["spanID"].as_str()?;
    spans.iter().find(|s| s["spanID"] == parent)?["operationName"].as_str()
}

/// The payment's notifications are read under the payment's own object-level authorization: a
/// subject the payment service does not show the payment to (the payee, a stranger) is refused
/// exactly as for the payment, no token is 401, and the notification service serves no data on
/// its own HTTP port.
async fn notifications_are_only_for_the_payments_parties(stack: &Stack, id: &str, payee: &str) {
    let url = format!("{}/api/v1/payments/{id}/notifications", stack.gateway);
    let payment_url = format!("{}/api/v1/payments/{id}", stack.gateway);
    for token in [payee.to_owned(), stack.token("carol")] {
        let payment = stack.call("GET", &payment_url, Some(&token), &[], None).await;
        let listed = stack.call("GET", &url, Some(&token), &[], None).await;
        assert!([403, 404].contains(&listed.status), "another subject: {} {}", listed.status, listed.body);
        assert_eq!(
            (listed.status, &listed.body["code"]),
            (payment.status, &payment.body["code"]),
            "as for the payment"
        );
        assert_eq!(listed.body.get("notifications"), None, "nothing listed: {}", listed.body);
    }
    let anonymous = stack.call("GET", &url, None, &[], None).await;
    assert_eq!(anonymous.status, 401, "no token: {}", anonymous.body);
    let direct = format!("{}/api/v1/notifications?payment_id={id}", stack.notification_admin);
    let direct = stack.call("GET", &direct, None, &[], None).await;
    assert_eq!(direct.status, 404, "the notification service's HTTP port serves no data: {}", direct.body);
}

/// Unaffordable payments move nothing: refused up front when the balance plainly cannot cover
/// them; and when two payments each pass the advisory check but only one is affordable, exactly
/// one completes and the other ends FAILED with `insufficient_funds` (or is refused up front if
/// the first already settled) — the payer is never overdrawn.
async fn unaffordable_payments_fail_with_insufficient_funds_and_move_nothing(stack: &Stack) {
    let (alice, bob, carol) = (stack.token("alice"), stack.token("bob"), stack.token("carol"));

    let bob_try = stack.balance(&bob, BOB_TRY).await;
    let alice_try = stack.balance(&alice, ALICE_TRY).await;
    let too_much = (bob_try + Decimal::ONE).to_string();
    let reply = stack.pay(&bob, BOB_TRY, ALICE_TRY, &too_much, "TRY", &[]).await;
    assert_eq!(reply.status, 422, "{}", reply.body);
    assert_eq!(reply.body["code"], "insufficient_funds");
    assert_eq!(reply.headers["content-type"], "application/problem+json");
    assert_eq!(stack.balance(&bob, BOB_TRY).await, bob_try);
    assert_eq!(stack.balance(&alice, ALICE_TRY).await, alice_try);

    // Carol's balance covers one of two concurrent payments of 60 % of it, not both.
    let carol_before = stack.balance(&carol, CAROL_EUR).await;
    let amount = (carol_before * Decimal::new(6, 1)).trunc_with_scale(2);
    assert!(amount > Decimal::ZERO, "carol's test balance is exhausted ({carol_before}); restart the test platform");
    let text = amount.to_string();
    let (first, second) = tokio::join!(
        stack.pay(&carol, CAROL_EUR, ALICE_EUR, &text, "EUR", &[]),
        stack.pay(&carol, CAROL_EUR, BOB_EUR, &text, "EUR", &[]),
    );
    let mut outcomes = Vec::new();
    for reply in [first, second] {
        match reply.status {
            202 => {
                let id = reply.body["payment_id"].as_str().unwrap().to_owned();
                let payment = stack.settled(&carol, &id).await;
                outcomes.push(match payment["status"].as_str() {
                    Some("COMPLETED") => "completed".to_owned(),
                    _ => format!("failed:{}", payment["failure_reason"].as_str().unwrap_or("")),
                });
            }
            422 => outcomes.push(format!("refused:{}", reply.body["code"].as_str().unwrap_or(""))),
            other => panic!("unexpected {other}: {}", reply.body),
        }
    }
    assert_eq!(outcomes.iter().filter(|o| *o == "completed").count(), 1, "{outcomes:?}");
    assert!(
        outcomes.iter().any(|o| o == "failed:insufficient_funds" || o == "refused:insufficient_funds"),
        "{outcomes:?}"
    );
    assert_eq!(stack.balance(&carol, CAROL_EUR).await, carol_before - amount, "exactly one debit");
}
