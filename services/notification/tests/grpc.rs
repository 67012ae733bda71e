//! `notification.v1` over the REAL PostgreSQL store (fresh database per test), served in process
//! with test-claimed peers (`securepay_kit::caller::claimed`, the same allow-list as real SVIDs):
//! the listing's exact fields, hostile payment ids refused with `invalid_payment_id`, every caller
//! but the API gateway refused — and the real binary, started as the runner starts it (its SVID
//! from the test platform's SPIRE, topics and group suffixed), recording an event published to
//! Kafka, answering the query over mTLS to the gateway only, serving no data on its HTTP port,
//! and stopping cleanly on SIGTERM.
#![cfg(not(madsim))]

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use securepay_core::identity::ServiceIdentity;
use securepay_core::ids::{PaymentId, Subject};
use securepay_core::payment::{FailureReason, Outcome};
use securepay_identity::testing::Spire;
use securepay_kafka::KafkaEventLog;
use securepay_kit::caller::claimed;
use securepay_memory::MemoryNotificationStore;
use securepay_notification::{NotificationGrpc, Topics};
use securepay_ports::{EventLog, Notification, NotificationStore, Recorded};
use securepay_postgres::PgNotificationStore;
use securepay_postgres::testing::TestDb;
use securepay_proto::notification::v1::notification_service_client::NotificationServiceClient;
use securepay_proto::notification::v1::notification_service_server::NotificationServiceServer;
use securepay_proto::notification::v1::{ListNotificationsRequest, ListNotificationsResponse};
use securepay_testkit::{component, var};
use serde_json::json;
use time::OffsetDateTime;
use tonic::Code;
use tonic::transport::Channel;
use uuid::Uuid;

/// `store` served over gRPC on an ephemeral port, callers' identities claimed (tests only).
async fn serve<S: NotificationStore>(store: S) -> Channel {
    let incoming = tonic::transport::server::TcpIncoming::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = incoming.local_addr().unwrap();
    let service = NotificationGrpc::new(Arc::new(store), Arc::new(SystemClock));
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(NotificationServiceServer::with_interceptor(service, claimed::ServerInterceptor))
            .serve_with_incoming(incoming),
    );
    Channel::from_shared(format!("http://{addr}")).unwrap().connect_lazy()
}

/// `ListNotifications(payment_id)` as `caller` (claimed) acting for `subject`.
async fn list(
    channel: &Channel,
    caller: Option<ServiceIdentity>,
    subject: Option<&str>,
    payment_id: &str,
) -> Result<ListNotificationsResponse, tonic::Status> {
    let mut request = tonic::Request::new(ListNotificationsRequest { payment_id: payment_id.to_owned() });
    if let Some(subject) = subject {
        securepay_kit::with_subject(&mut request, &Subject::parse(subject).unwrap());
    }
    match caller {
        Some(identity) => {
            let mut client =
                NotificationServiceClient::with_interceptor(channel.clone(), claimed::ClientInterceptor(identity));
            client.list_notifications(request).await.map(tonic::Response::into_inner)
        }
        None => NotificationServiceClient::new(channel.clone())
            .list_notifications(request)
            .await
            .map(tonic::Response::into_inner),
    }
}

async fn as_gateway(channel: &Channel, payment_id: &str) -> Result<ListNotificationsResponse, tonic::Status> {
    list(channel, Some(ServiceIdentity::ApiGateway), Some("alice"), payment_id).await
}

fn recorded_at() -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(1_800_000_100).unwrap().replace_nanosecond(250_000).unwrap()
}

async fn pg_store() -> Option<(TestDb, PgNotificationStore)> {
    let db = TestDb::new().await?;
    let store = PgNotificationStore::connect(db.role_options("notification_service").await, 2)
        .await
        .expect("notification_service logs in");
    Some((db, store))
}

#[tokio::test]
async fn a_payments_notifications_are_listed_exactly_in_recording_order() {
    let Some((_db, store)) = pg_store().await else { return };
    let payment = PaymentId::from_uuid(Uuid::new_v4());
    let first = initiated(payment, "10.50");
    let outcome = settled(&first, Outcome::Failed(FailureReason::InsufficientFunds));
    for event in [&first, &outcome] {
        assert_eq!(store.record(&Notification::from_event(event, recorded_at())).await, Ok(Recorded::New));
    }
    let stored = store.for_payment(payment, 10).await.unwrap();
    let channel = serve(store).await;

    let answer = as_gateway(&channel, &payment.to_string()).await.unwrap();

    assert_eq!(answer.payment_id, payment.to_string());
    let seen: Vec<_> = answer
        .notifications
        .iter()
        .map(|n| {
            let at = |t: &Option<prost_types::Timestamp>| t.as_ref().map(|t| (t.seconds, t.nanos));
            json!([
                n.event_id,
                n.kind,
                n.status,
                n.failure_reason,
                n.amount,
                n.currency,
                n.from_account,
                n.to_account,
                at(&n.occurred_at),
                at(&n.recorded_at)
            ])
        })
        .collect();
    let (from, to) = (stored[0].from.to_string(), stored[0].to.to_string());
    assert_eq!(
        seen,
        [
            json!([
                first.event_id().to_string(),
                "initiated",
                "PENDING",
                "",
                "10.50",
                "EUR",
                from,
                to,
                [1_800_000_000, 5],
                [1_800_000_100, 250_000]
            ]),
            json!([
                outcome.event_id().to_string(),
                "failed",
                "FAILED",
                "insufficient_funds",
                "10.50",
                "EUR",
                from,
                to,
                [1_800_000_001, 5],
                [1_800_000_100, 250_000]
            ]),
        ]
    );
}

#[tokio::test]
async fn an_unknown_payment_has_an_empty_list() {
    let Some((_db, store)) = pg_store().await else { return };
    let channel = serve(store).await;
    let payment = PaymentId::from_uuid(Uuid::new_v4());

    let answer = as_gateway(&channel, &payment.to_string()).await.unwrap();

    assert_eq!((answer.payment_id, answer.notifications.len()), (payment.to_string(), 0));
}

#[tokio::test]
async fn hostile_payment_ids_are_refused_with_a_stable_code_that_echoes_nothing() {
    let Some((db, store)) = pg_store().await else { return };
    let known = PaymentId::from_uuid(Uuid::new_v4());
    store.record(&Notification::from_event(&initiated(known, "1.00"), recorded_at())).await.unwrap();
    let channel = serve(store).await;
    let hostile = [
        "'; DROP TABLE notifications.notifications; --".to_owned(),
        "../../../etc/passwd".to_owned(),
        "a".repeat(10 * 1024),
        String::new(),
        "not-a-uuid".to_owned(),
        format!("{{{known}}}"),
        format!("{known} OR 1=1"),
        "\u{0000}".to_owned(),
        "<script>alert(1)</script>".to_owned(),
    ];
    for id in &hostile {
        let status = as_gateway(&channel, id).await.unwrap_err();
        let shown = &id[..id.len().min(40)];
        assert_eq!(status.code(), Code::InvalidArgument, "{shown:?}");
        assert_eq!(securepay_kit::status::error_code(&status), Some("invalid_payment_id"), "{shown:?}");
        assert_eq!(status.message(), "the payment id must be a UUID", "{shown:?}: nothing echoed");
    }
    let rows: i64 =
        sqlx::query_scalar("SELECT count(*) FROM notifications.notifications").fetch_one(&db.pool).await.unwrap();
    assert_eq!(rows, 1, "the table is intact");
    assert_eq!(as_gateway(&channel, &known.to_string()).await.unwrap().notifications.len(), 1);
}

/// SPEC §2: only `api-gateway` may call the query, and only for an end-user subject.
#[tokio::test]
async fn every_caller_but_the_gateway_is_refused() {
    let store = MemoryNotificationStore::new();
    let payment = PaymentId::from_uuid(Uuid::new_v4());
    store.record(&Notification::from_event(&initiated(payment, "3.00"), recorded_at())).await.unwrap();
    let channel = serve(store).await;
    let id = payment.to_string();
    for peer in [ServiceIdentity::PaymentService, ServiceIdentity::AccountService, ServiceIdentity::NotificationService]
    {
        let status = list(&channel, Some(peer), Some("alice"), &id).await.unwrap_err();
        assert_eq!(status.code(), Code::PermissionDenied, "{peer}");
    }
    assert_eq!(list(&channel, None, Some("alice"), &id).await.unwrap_err().code(), Code::Unauthenticated, "no SVID");
    let no_subject = list(&channel, Some(ServiceIdentity::ApiGateway), None, &id).await.unwrap_err();
    assert_eq!(no_subject.code(), Code::Unauthenticated, "no subject");
    assert_eq!(as_gateway(&channel, &id).await.unwrap().notifications.len(), 1, "the gateway is served");
}

/// The store being down is UNAVAILABLE naming no internals (on the twin: an outage cannot be
/// injected into the shared PostgreSQL).
#[tokio::test]
async fn a_store_outage_is_unavailable() {
    let store = MemoryNotificationStore::new();
    store.set_available(false);
    let channel = serve(store).await;

    let status = as_gateway(&channel, &Uuid::new_v4().to_string()).await.unwrap_err();

    assert_eq!(status.code(), Code::Unavailable);
    assert_eq!(securepay_kit::status::error_code(&status), Some("service_unavailable"));
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
async fn the_binary_records_answers_the_gateway_over_mtls_only_serves_no_data_over_http_and_stops_on_sigterm() {
    let Some(brokers) = component(var::KAFKA_BROKERS) else { return };
    let Some(spire) = Spire::from_env() else { return };
    let Some(db) = TestDb::new().await else { return };
    let binary = env!("CARGO_BIN_EXE_securepay-notification");
    spire.ensure_registered(Path::new(binary), ServiceIdentity::NotificationService);
    let (env, _secrets) = db.service_env("notification_service").await;
    let suffix = format!(".test-{}", Uuid::new_v4().simple());
    let topics = Topics {
        initiated: format!("payment.initiated{suffix}"),
        completed: format!("payment.completed{suffix}"),
        failed: format!("payment.failed{suffix}"),
    };
    create_topics(&brokers, &topics).await;
    let grpc: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let log_path = std::env::temp_dir().join(format!("securepay-notification-{}.log", Uuid::new_v4().simple()));
    let child = Command::new(binary)
        .envs(env)
        .env("SECUREPAY_KAFKA_BROKERS", &brokers)
        .env("SECUREPAY_LISTEN_ADDR", grpc.to_string())
        .env("SECUREPAY_ADMIN_ADDR", admin.to_string())
        .env("SECUREPAY_KAFKA_NAME_SUFFIX", &suffix)
        .env("SPIFFE_ENDPOINT_SOCKET", &spire.endpoint)
        .env("RUST_LOG", "info")
        .stdout(Stdio::from(std::fs::File::create(&log_path).expect("log file")))
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start the binary");
    let mut child = ChildGuard(child);

    let health = wait_for_status(admin, "/health", 200).await;
    assert_eq!(health.json(), json!({ "status": "ok" }));
    let ready = wait_for_status(admin, "/ready", 200).await;
    assert_eq!(ready.json()["status"], "ready");

    // End to end through the binary's consumer: an event published to its (suffixed) topic is
    // listed to the gateway, over mTLS.
    let payment = PaymentId::from_uuid(Uuid::new_v4());
    let event = initiated(payment, "42.00");
    let log = KafkaEventLog::new(&brokers).expect("producer");
    log.publish(&[record_of(&event, &topics)]).await.expect("publish");
    let gateway = spire.identity_of_this_test(ServiceIdentity::ApiGateway).await;
    let channel = securepay_identity::grpc::channel(&grpc.to_string(), ServiceIdentity::NotificationService, &gateway)
        .expect("an mTLS channel");
    let mut client = NotificationServiceClient::new(channel);
    let query = || {
        let mut request = tonic::Request::new(ListNotificationsRequest { payment_id: payment.to_string() });
        securepay_kit::with_subject(&mut request, &Subject::parse("alice").unwrap());
        request
    };
    let deadline = Instant::now() + PATIENCE;
    let listed = loop {
        let answer = client.list_notifications(query()).await.expect("the gateway is served").into_inner();
        if !answer.notifications.is_empty() {
            break answer;
        }
        assert!(Instant::now() < deadline, "the published event was not listed within {PATIENCE:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(listed.notifications[0].event_id, event.event_id().to_string());
    assert_eq!(listed.notifications[0].amount, "42.00");

    // Another workload of the trust domain, holding a valid SVID, is refused per method.
    let payment_service = spire.identity_of_this_test(ServiceIdentity::PaymentService).await;
    let channel =
        securepay_identity::grpc::channel(&grpc.to_string(), ServiceIdentity::NotificationService, &payment_service)
            .expect("an mTLS channel");
    let refused = NotificationServiceClient::new(channel).list_notifications(query()).await.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);
    // A plaintext client never reaches a handler.
    let plaintext = Channel::from_shared(format!("http://{grpc}")).unwrap().connect_lazy();
    assert!(NotificationServiceClient::new(plaintext).list_notifications(query()).await.is_err());
    // The HTTP port carries health and metrics only: the old data route is gone.
    let gone = http_get(admin, &format!("/api/v1/notifications?payment_id={payment}")).await.unwrap();
    assert_eq!(gone.status, 404, "{}", gone.body);

    let metrics = http_get(admin, "/metrics").await.unwrap();
    assert_eq!(metrics.status, 200);
    let method = "/securepay.notification.v1.NotificationService/ListNotifications";
    for series in [
        format!(r#"securepay_grpc_requests_total{{service="notification",method="{method}",code="Ok"}}"#),
        format!(
            r#"securepay_grpc_requests_total{{service="notification",method="{method}",code="PermissionDenied"}} 1"#
        ),
        r#"securepay_notifications_total{kind="initiated"} 1"#.to_owned(),
        r#"securepay_auth_failures_total{reason="peer_not_allowed"} 1"#.to_owned(),
    ] {
        assert!(metrics.body.contains(&series), "/metrics lacks {series}:\n{}", metrics.body);
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
