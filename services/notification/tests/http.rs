//! The HTTP API over the REAL PostgreSQL store (fresh database per test), served on a real socket:
//! the listing's exact JSON, and hostile `payment_id` values answered with a 400 problem — and the
//! real binary, started as the runner starts it (topics and group suffixed), recording an event
//! published to Kafka and answering `/health`, `/ready`, the API and `/metrics`, then stopping
//! cleanly on SIGTERM.
#![cfg(not(madsim))]

mod common;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use securepay_core::ids::PaymentId;
use securepay_core::payment::{FailureReason, Outcome};
use securepay_kafka::KafkaEventLog;
use securepay_memory::MemoryNotificationStore;
use securepay_notification::Topics;
use securepay_ports::EventLog;
use securepay_ports::{Notification, NotificationStore, Recorded};
use securepay_postgres::PgNotificationStore;
use securepay_postgres::testing::TestDb;
use securepay_testkit::{component, var};
use serde_json::json;
use time::OffsetDateTime;
use uuid::Uuid;

/// The API router over a fresh database's store, on an ephemeral port.
async fn serve() -> Option<(TestDb, PgNotificationStore, SocketAddr)> {
    let db = TestDb::new().await?;
    let store = PgNotificationStore::connect(db.role_options("notification_service").await, 2)
        .await
        .expect("notification_service logs in");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = securepay_notification::http::router(Arc::new(store.clone()));
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    Some((db, store, addr))
}

fn recorded_at() -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(1_800_000_100).unwrap().replace_nanosecond(250_000).unwrap()
}

#[tokio::test]
async fn a_payments_notifications_are_listed_exactly_in_recording_order() {
    let Some((_db, store, addr)) = serve().await else { return };
    let payment = PaymentId::from_uuid(Uuid::new_v4());
    let first = initiated(payment, "10.50");
    let outcome = settled(&first, Outcome::Failed(FailureReason::InsufficientFunds));
    for event in [&first, &outcome] {
        let n = Notification::from_event(event, recorded_at());
        assert_eq!(store.record(&n).await, Ok(Recorded::New));
    }
    let n = store.for_payment(payment, 10).await.unwrap();

    let answer = http_get(addr, &format!("/api/v1/notifications?payment_id={payment}")).await.unwrap();

    assert_eq!((answer.status, answer.content_type.as_str()), (200, "application/json"), "{}", answer.body);
    let expected = json!({
        "payment_id": payment.to_string(),
        "notifications": [
            {
                "event_id": first.event_id().to_string(),
                "kind": "initiated",
                "status": "PENDING",
                "amount": "10.50",
                "currency": "EUR",
                "from_account": n[0].from.to_string(),
                "to_account": n[0].to.to_string(),
                "occurred_at": "2027-01-15T08:00:00.000000005Z",
                "recorded_at": "2027-01-15T08:01:40.00025Z",
            },
            {
                "event_id": outcome.event_id().to_string(),
                "kind": "failed",
                "status": "FAILED",
                "failure_reason": "insufficient_funds",
                "amount": "10.50",
                "currency": "EUR",
                "from_account": n[0].from.to_string(),
                "to_account": n[0].to.to_string(),
                "occurred_at": "2027-01-15T08:00:01.000000005Z",
                "recorded_at": "2027-01-15T08:01:40.00025Z",
            },
        ],
    });
    assert_eq!(answer.json(), expected);
}

#[tokio::test]
async fn an_unknown_payment_has_an_empty_list() {
    let Some((_db, _store, addr)) = serve().await else { return };
    let payment = PaymentId::from_uuid(Uuid::new_v4());

    let answer = http_get(addr, &format!("/api/v1/notifications?payment_id={payment}")).await.unwrap();

    assert_eq!(answer.status, 200);
    assert_eq!(answer.json(), json!({ "payment_id": payment.to_string(), "notifications": [] }));
}

#[tokio::test]
async fn hostile_payment_ids_are_a_400_problem_that_echoes_nothing() {
    let Some((db, store, addr)) = serve().await else { return };
    let known = PaymentId::from_uuid(Uuid::new_v4());
    store.record(&Notification::from_event(&initiated(known, "1.00"), recorded_at())).await.unwrap();
    let ten_kb = "a".repeat(10 * 1024);
    let hostile = [
        "'; DROP TABLE notifications.notifications; --".to_owned(),
        "../../../etc/passwd".to_owned(),
        ten_kb.clone(),
        String::new(),
        "not-a-uuid".to_owned(),
        format!("{{{known}}}"),
        format!("{known} OR 1=1"),
        known.to_string().replace('-', ""),
        "\u{0000}".to_owned(),
        "<script>alert(1)</script>".to_owned(),
    ];
    let mut targets: Vec<String> =
        hostile.iter().map(|v| format!("/api/v1/notifications?payment_id={}", percent_encode(v))).collect();
    targets.push("/api/v1/notifications".to_owned());
    targets.push(format!("/api/v1/notifications?payment_id={known}&payment_id={known}"));
    targets.push("/api/v1/notifications?payment_id=%ZZ".to_owned());

    for target in &targets {
        let answer = http_get(addr, target).await.unwrap();
        let shown = &target[..target.len().min(80)];
        assert_eq!(answer.status, 400, "{shown}: {}", answer.body);
        assert_eq!(answer.content_type, "application/problem+json", "{shown}");
        let body = answer.json();
        assert_eq!(
            body,
            json!({
                "type": "https://securepay.dev/problems/invalid_payment_id",
                "title": "Bad Request",
                "status": 400,
                "detail": "query parameter payment_id must be one UUID like 3f2b8c1e-9d4a-4e7b-8f6a-2c1d0e9b7a65",
                "code": "invalid_payment_id",
            }),
            "{shown}"
        );
    }
    let rows: i64 =
        sqlx::query_scalar("SELECT count(*) FROM notifications.notifications").fetch_one(&db.pool).await.unwrap();
    assert_eq!(rows, 1, "the table is intact");
    let answer = http_get(addr, &format!("/api/v1/notifications?payment_id={known}")).await.unwrap();
    assert_eq!(answer.json()["notifications"].as_array().map(Vec::len), Some(1));
}

#[tokio::test]
async fn unknown_routes_and_methods_are_problems_too() {
    let Some((_db, _store, addr)) = serve().await else { return };

    let answer = http_get(addr, "/api/v1/notifications/../../admin").await.unwrap();

    assert_eq!(answer.status, 404);
    assert_eq!(answer.content_type, "application/problem+json");
    assert_eq!(answer.json()["code"], "not_found");
}

/// The store being down is a 503 problem naming no internals (on the twin: an outage cannot be
/// injected into the shared PostgreSQL).
#[tokio::test]
async fn a_store_outage_is_a_503_problem() {
    let store = MemoryNotificationStore::new();
    store.set_available(false);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = securepay_notification::http::router(Arc::new(store));
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let payment = PaymentId::from_uuid(Uuid::new_v4());

    let answer = http_get(addr, &format!("/api/v1/notifications?payment_id={payment}")).await.unwrap();

    assert_eq!((answer.status, answer.content_type.as_str()), (503, "application/problem+json"));
    assert_eq!(
        answer.json(),
        json!({
            "type": "https://securepay.dev/problems/service_unavailable",
            "title": "Service Unavailable",
            "status": 503,
            "detail": "the service is unavailable; retry later",
            "code": "service_unavailable",
        })
    );
}

// ---------------------------------------------------------------------------------------------
// The real binary.

/// Kills the child if the test fails before it stopped it.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

async fn wait_for_status(addr: SocketAddr, target: &str, status: u16) -> HttpAnswer {
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Ok(answer) = http_get(addr, target).await
            && answer.status == status
        {
            return answer;
        }
        assert!(Instant::now() < deadline, "{target} did not answer {status} within {PATIENCE:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_records_logs_and_serves_health_readiness_the_api_and_metrics_and_stops_on_sigterm() {
    let Some(brokers) = component(var::KAFKA_BROKERS) else { return };
    let Some(db) = TestDb::new().await else { return };
    let (env, _secrets) = db.service_env("notification_service").await;
    let suffix = format!(".test-{}", Uuid::new_v4().simple());
    let topics = Topics {
        initiated: format!("payment.initiated{suffix}"),
        completed: format!("payment.completed{suffix}"),
        failed: format!("payment.failed{suffix}"),
    };
    create_topics(&brokers, &topics).await;
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let log_path = std::env::temp_dir().join(format!("securepay-notification-{}.log", Uuid::new_v4().simple()));
    let child = Command::new(env!("CARGO_BIN_EXE_securepay-notification"))
        .envs(env)
        .env("SECUREPAY_KAFKA_BROKERS", &brokers)
        .env("SECUREPAY_LISTEN_ADDR", addr.to_string())
        .env("SECUREPAY_KAFKA_NAME_SUFFIX", &suffix)
        .env("RUST_LOG", "info")
        .stdout(Stdio::from(std::fs::File::create(&log_path).expect("log file")))
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start the binary");
    let mut child = ChildGuard(child);

    let health = wait_for_status(addr, "/health", 200).await;
    assert_eq!(health.json(), json!({ "status": "ok" }));
    let ready = wait_for_status(addr, "/ready", 200).await;
    assert_eq!(ready.json()["status"], "ready");

    // End to end through the binary's consumer: an event published to its (suffixed) topic is listed.
    let payment = PaymentId::from_uuid(Uuid::new_v4());
    let event = initiated(payment, "42.00");
    let log = KafkaEventLog::new(&brokers).expect("producer");
    log.publish(&[record_of(&event, &topics)]).await.expect("publish");
    let target = format!("/api/v1/notifications?payment_id={payment}");
    let mut listed = http_get(addr, &target).await.unwrap();
    let deadline = Instant::now() + PATIENCE;
    while listed.json()["notifications"].as_array().is_none_or(Vec::is_empty) {
        assert!(Instant::now() < deadline, "the published event was not listed within {PATIENCE:?}: {}", listed.body);
        tokio::time::sleep(Duration::from_millis(200)).await;
        listed = http_get(addr, &target).await.unwrap();
    }
    assert_eq!(listed.status, 200, "{}", listed.body);
    assert_eq!(listed.json()["notifications"][0]["event_id"], event.event_id().to_string());
    assert_eq!(listed.json()["notifications"][0]["amount"], "42.00");
    let refused = http_get(addr, "/api/v1/notifications?payment_id=..%2F").await.unwrap();
    assert_eq!((refused.status, refused.content_type.as_str()), (400, "application/problem+json"));

    let metrics = http_get(addr, "/metrics").await.unwrap();
    assert_eq!(metrics.status, 200);
    for series in [
        r#"securepay_http_requests_total{service="notification",route="/api/v1/notifications",status="200"}"#,
        r#"securepay_http_requests_total{service="notification",route="/api/v1/notifications",status="400"} 1"#,
        r#"securepay_notifications_total{kind="initiated"} 1"#,
        "securepay_http_request_duration_seconds_bucket",
    ] {
        assert!(metrics.body.contains(series), "/metrics lacks {series}:\n{}", metrics.body);
    }

    let pid = child.0.id().to_string();
    let signalled = Command::new("kill").args(["-TERM", &pid]).status().expect("kill -TERM");
    assert!(signalled.success());
    let deadline = Instant::now() + PATIENCE;
    let status = loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "the binary did not stop within {PATIENCE:?} of SIGTERM");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(status.success(), "clean exit after SIGTERM: {status}");

    // The new notification was logged as ONE structured JSON line with its fields.
    let log = std::fs::read_to_string(&log_path).unwrap();
    let _ = std::fs::remove_file(&log_path);
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("a log line that is not JSON ({e}): {l}")))
        .collect();
    let fields = |line: &serde_json::Value| line.get("fields").cloned().unwrap_or_else(|| line.clone());
    let recorded: Vec<serde_json::Value> = lines
        .iter()
        .map(fields)
        .filter(|f| f["message"] == "notification recorded" && f["event_id"] == event.event_id().to_string())
        .collect();
    assert_eq!(recorded.len(), 1, "one log line for the new notification:\n{log}");
    let line = &recorded[0];
    assert_eq!(
        [&line["payment_id"], &line["kind"], &line["amount"], &line["currency"]],
        [&json!(payment.to_string()), &json!("initiated"), &json!("42.00"), &json!("EUR")]
    );
    assert!(!log.contains("password"), "no secret in the log");
}
