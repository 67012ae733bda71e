//! The payment service binary against the REAL components: a fresh PostgreSQL database per test,
//! Redis, Kafka (topics renamed per test with `SECUREPAY_KAFKA_NAME_SUFFIX`) and the real
//! account-service binary (`cargo build -p securepay-account` first; it must sit next to this
//! crate's binary in the target directory). One test per "done when" bullet of the issue.
//!
//! The binaries speak gRPC over mTLS only: the test platform's real SPIRE issues their SVIDs
//! (entries for the binaries at the paths run here are registered by the test), and the test
//! itself calls the payment service as the API gateway (this test executable is registered as
//! `spiffe://securepay.dev/api-gateway`).

mod support;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::str::FromStr;
use std::time::{Duration, Instant};

use prost::Message as _;
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rust_decimal::Decimal;
use securepay_core::events::PaymentSettled;
use securepay_core::identity::ServiceIdentity;
use securepay_core::ids::{EventId, PaymentId, Subject};
use securepay_core::payment::{FailureReason, Outcome, PaymentStatus, Transition};
use securepay_core::topology::topic;
use securepay_identity::grpc;
use securepay_identity::x509::WorkloadIdentity;
use securepay_kafka::{KafkaConsumer, KafkaEventLog};
use securepay_kit::caller::claimed::ClientInterceptor;
use securepay_kit::status::error_code;
use securepay_kit::with_subject;
use securepay_payment::REPLAYED_METADATA;
use securepay_ports::{EventConsumer, EventLog, OutgoingRecord, PaymentStore, PortError};
use securepay_postgres::PgPaymentStore;
use securepay_postgres::testing::TestDb;
use securepay_proto::payment::v1 as wire;
use securepay_proto::payment::v1::payment_service_client::PaymentServiceClient;
use securepay_testkit::{component, var};
use sqlx::postgres::PgPoolOptions;
use support::Spire;
use tonic::Code;
use tonic::transport::Endpoint;
use uuid::Uuid;

const ALICE_EUR: &str = "a11ce000-0000-4000-8000-000000000001";
const BOB_EUR: &str = "b0b00000-0000-4000-8000-000000000001";
/// Generous bounds for a shared 2-core machine; a test fails with a message when one is exceeded.
const START_BOUND: Duration = Duration::from_secs(60);
const SETTLE_BOUND: Duration = Duration::from_secs(90);

/// A service process, killed (and reaped) on drop.
struct Service {
    name: &'static str,
    child: Child,
}

impl Service {
    /// Starts `exe` with `env` and waits until `ready` accepts TCP connections.
    async fn start(name: &'static str, exe: PathBuf, env: &[(String, String)], ready: SocketAddr) -> Service {
        assert!(exe.exists(), "{} is missing: build it first (cargo build -p securepay-{name})", exe.display());
        let logs = if std::env::var_os("SECUREPAY_TEST_SERVICE_LOGS").is_some() { Stdio::inherit } else { Stdio::null };
        let child = Command::new(&exe)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("RUST_LOG", "warn")
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(logs())
            .stderr(logs())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        let mut service = Service { name, child };
        let started = Instant::now();
        while tokio::net::TcpStream::connect(ready).await.is_err() {
            if let Some(status) = service.child.try_wait().unwrap() {
                panic!("{name} exited during start-up with {status} (set SECUREPAY_TEST_SERVICE_LOGS=1 to see why)");
            }
            assert!(started.elapsed() < START_BOUND, "{name} did not listen on {ready} within {START_BOUND:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        service
    }

    /// Waits (bounded) for the process to exit on its own.
    async fn exited(&mut self) -> std::process::ExitStatus {
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(started.elapsed() < START_BOUND, "{} did not exit", self.name);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
}

fn binary(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_securepay-payment")).with_file_name(name)
}

/// One test's world: database, broker topics, and the environment both binaries share.
struct World {
    db: TestDb,
    redis_url: String,
    brokers: String,
    suffix: String,
    /// The services' secrets directories, alive as long as the world.
    secrets: Vec<tempfile::TempDir>,
    /// The admin address of the service started last.
    admin: Option<SocketAddr>,
    spire: Spire,
    /// This test as the API gateway: the identity its gRPC clients present.
    gateway: WorkloadIdentity,
}

impl World {
    async fn new() -> Option<World> {
        let spire = Spire::from_env()?;
        spire.ensure_registered(
            std::path::Path::new(env!("CARGO_BIN_EXE_securepay-payment")),
            ServiceIdentity::PaymentService,
        );
        let account = binary("securepay-account");
        assert!(
            account.exists(),
            "{} is missing: build it first (cargo build -p securepay-account)",
            account.display()
        );
        spire.ensure_registered(&account, ServiceIdentity::AccountService);
        let gateway = spire.identity_of_this_test(ServiceIdentity::ApiGateway).await;
        let redis_url = component(var::REDIS_URL)?;
        let brokers = component(var::KAFKA_BROKERS)?;
        let db = TestDb::new().await?;
        db.seed_demo().await;
        let suffix = format!("-t{}", Uuid::new_v4().simple());
        let names: Vec<String> = topic::ALL.iter().map(|t| format!("{t}{suffix}")).collect();
        let admin: AdminClient<DefaultClientContext> =
            ClientConfig::new().set("bootstrap.servers", &brokers).create().expect("kafka admin client");
        let new: Vec<NewTopic<'_>> = names.iter().map(|t| NewTopic::new(t, 3, TopicReplication::Fixed(1))).collect();
        let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
        let created = admin.create_topics(&new, &options).await.expect("create topics");
        assert!(created.iter().all(Result::is_ok), "{created:?}");
        Some(World { db, redis_url, brokers, suffix, secrets: Vec::new(), admin: None, spire, gateway })
    }

    async fn env(&mut self, role: &str, listen: SocketAddr, redis_url: &str) -> Vec<(String, String)> {
        let admin = free_addr();
        self.admin = Some(admin);
        let (mut env, secrets) = self.db.service_env(role).await;
        self.secrets.push(secrets);
        env.extend([
            ("SPIFFE_ENDPOINT_SOCKET".to_owned(), self.spire.endpoint.clone()),
            ("SECUREPAY_LISTEN_ADDR".to_owned(), listen.to_string()),
            ("SECUREPAY_ADMIN_ADDR".to_owned(), admin.to_string()),
            ("SECUREPAY_REDIS_URL".to_owned(), redis_url.to_owned()),
            ("SECUREPAY_KAFKA_BROKERS".to_owned(), self.brokers.clone()),
            ("SECUREPAY_KAFKA_NAME_SUFFIX".to_owned(), self.suffix.clone()),
        ]);
        env
    }

    /// The real account service; returns it and its gRPC address.
    async fn account(&mut self) -> (Service, SocketAddr) {
        let listen = free_addr();
        let redis_url = self.redis_url.clone();
        let env = self.env("account_service", listen, &redis_url).await;
        (Service::start("account", binary("securepay-account"), &env, listen).await, listen)
    }

    /// The payment service binary; `extra` overrides (Redis URL, failpoint).
    async fn payment(&mut self, account: SocketAddr, listen: SocketAddr, extra: &[(&str, &str)]) -> Service {
        let redis_url = self.redis_url.clone();
        let mut env = self.env("payment_service", listen, &redis_url).await;
        env.push(("SECUREPAY_ACCOUNT_ADDR".to_owned(), account.to_string()));
        for (k, v) in extra {
            env.retain(|(key, _)| key != k);
            env.push(((*k).to_owned(), (*v).to_owned()));
        }
        Service::start("payment", PathBuf::from(env!("CARGO_BIN_EXE_securepay-payment")), &env, listen).await
    }

    /// `GET path` on the admin listener of the service started last: (status, body).
    async fn admin_get(&self, path: &str) -> (u16, String) {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let addr = self.admin.expect("a service was started");
        let started = Instant::now();
        let mut stream = loop {
            match tokio::net::TcpStream::connect(addr).await {
                Ok(stream) => break stream,
                Err(_) => assert!(started.elapsed() < START_BOUND, "admin listener {addr} never came up"),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut text = String::new();
        stream.read_to_string(&mut text).await.unwrap();
        let status = text.split(' ').nth(1).and_then(|s| s.parse().ok()).expect("an HTTP status line");
        (status, text)
    }

    async fn count(&self, sql: &str) -> i64 {
        sqlx::query_scalar(sql).fetch_one(&self.db.pool).await.unwrap()
    }

    async fn balance(&self, account: &str) -> Decimal {
        sqlx::query_scalar("SELECT balance FROM accounts.accounts WHERE account_id = $1")
            .bind(Uuid::parse_str(account).unwrap())
            .fetch_one(&self.db.pool)
            .await
            .unwrap()
    }

    /// The store as the service uses it (role `payment_service`, via SET ROLE on superuser
    /// connections so no cluster-wide role password is involved).
    async fn store(&self) -> PgPaymentStore {
        let options = securepay_postgres::admin_options(&self.db.admin_url, &self.db.name).unwrap();
        let pool = PgPoolOptions::new()
            .max_connections(2)
            .after_connect(|conn, _| {
                Box::pin(async move {
                    sqlx::Executor::execute(&mut *conn, "SET ROLE payment_service").await?;
                    Ok(())
                })
            })
            .connect_with(options)
            .await
            .unwrap();
        PgPaymentStore::new(pool)
    }
}

type Client = PaymentServiceClient<grpc::ResendingChannel>;

impl World {
    /// A payment.v1 client over mTLS as the API gateway, accepting only the payment service.
    fn client(&self, addr: SocketAddr) -> Client {
        let channel = grpc::channel(&addr.to_string(), ServiceIdentity::PaymentService, &self.gateway).unwrap();
        PaymentServiceClient::new(channel)
    }
}

fn as_subject<T>(message: T, subject: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    with_subject(&mut request, &Subject::parse(subject).unwrap());
    request
}

/// An idempotency key unique to this run: Redis is shared by every test and run.
fn key(name: &str) -> String {
    format!("{name}-{}", Uuid::new_v4().simple())
}

fn pay(amount: &str, key: &str) -> wire::InitiatePaymentRequest {
    wire::InitiatePaymentRequest {
        payment_id: String::new(),
        from_account: ALICE_EUR.into(),
        to_account: BOB_EUR.into(),
        amount: Some(wire::Money { amount: amount.into(), currency: "EUR".into() }),
        idempotency_key: key.into(),
    }
}

/// Initiates; returns the body's bytes and whether it was a replay.
async fn initiate(
    client: &mut Client,
    request: wire::InitiatePaymentRequest,
) -> Result<(Vec<u8>, bool), tonic::Status> {
    let response = client.initiate_payment(as_subject(request, "alice")).await?;
    let replayed = response.metadata().get(REPLAYED_METADATA).is_some();
    Ok((response.into_inner().encode_to_vec(), replayed))
}

fn payment_id(bytes: &[u8]) -> String {
    wire::InitiatePaymentResponse::decode(bytes).unwrap().payment.unwrap().payment_id
}

async fn get(client: &mut Client, id: &str, subject: &str) -> Result<wire::Payment, tonic::Status> {
    client
        .get_payment(as_subject(wire::GetPaymentRequest { payment_id: id.into() }, subject))
        .await
        .map(|r| r.into_inner())
}

async fn wait_for_status(client: &mut Client, id: &str, status: wire::PaymentStatus) -> wire::Payment {
    let started = Instant::now();
    loop {
        if let Ok(payment) = get(client, id, "alice").await
            && payment.status == status as i32
        {
            return payment;
        }
        assert!(started.elapsed() < SETTLE_BOUND, "payment {id} did not reach {status:?} within {SETTLE_BOUND:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Records keyed `payment_id` on `payment.initiated` (this test's name): waits for the first, then
/// keeps reading for `linger` to catch any duplicate.
async fn initiated_on_kafka(world: &World, payment_id: &str, linger: Duration) -> usize {
    initiated_records(world, payment_id, linger).await.len()
}

/// The headers of every `payment.initiated` record keyed `payment_id` (see [`initiated_on_kafka`]).
async fn initiated_records(world: &World, payment_id: &str, linger: Duration) -> Vec<Vec<(String, String)>> {
    let group = format!("observer-{}", Uuid::new_v4().simple());
    let name = format!("{}{}", topic::PAYMENT_INITIATED, world.suffix);
    let mut consumer = KafkaConsumer::new(&world.brokers, &group, &[name.as_str()]).unwrap();
    let started = Instant::now();
    let mut seen = Vec::new();
    let mut first_at = None;
    loop {
        for record in consumer.poll(100, Duration::from_millis(500)).await.unwrap() {
            if record.key == payment_id {
                let traceparent = record.headers.iter().find(|(k, _)| k == "traceparent").map(|(_, v)| v.as_str());
                assert!(
                    traceparent.is_some_and(|t| t.len() == 55 && t.starts_with("00-")),
                    "W3C trace context in the headers: {:?}",
                    record.headers
                );
                seen.push(record.headers.clone());
                first_at.get_or_insert_with(Instant::now);
            }
        }
        match first_at {
            Some(at) if at.elapsed() >= linger => return seen,
            None => assert!(started.elapsed() < SETTLE_BOUND, "payment.initiated for {payment_id} never published"),
            _ => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn fifty_concurrent_identical_requests_make_one_payment_and_one_event() {
    let Some(mut world) = World::new().await else { return };
    let (_account, account_addr) = world.account().await;
    let listen = free_addr();
    let _payment = world.payment(account_addr, listen, &[]).await;
    let client = world.client(listen);

    let k = key("order-50");
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let (mut client, k) = (client.clone(), k.clone());
            tokio::spawn(async move { initiate(&mut client, pay("10.50", &k)).await })
        })
        .collect();
    let mut bodies = Vec::new();
    for task in tasks {
        bodies.push(task.await.unwrap().expect("every identical request is served"));
    }
    assert_eq!(bodies.iter().filter(|(_, replayed)| !replayed).count(), 1, "exactly one executed");
    assert!(bodies.windows(2).all(|w| w[0].0 == w[1].0), "every response body is byte-identical");
    assert_eq!(world.count("SELECT count(*) FROM payments.transactions").await, 1);
    assert_eq!(world.count("SELECT count(*) FROM payments.outbox").await, 1);

    let mut c = client.clone();
    let reused = initiate(&mut c, pay("10.51", &k)).await.unwrap_err();
    assert_eq!((reused.code(), error_code(&reused)), (Code::FailedPrecondition, Some("idempotency_key_reused")));

    // The fast path holds the completed record, self-consistent (fingerprint twice, then the
    // body). With it gone (a flush), PostgreSQL answers the same bytes and refills it.
    let redis = redis::Client::open(world.redis_url.as_str()).unwrap();
    let mut conn = redis.get_multiplexed_async_connection().await.unwrap();
    let redis_key = securepay_redis::idempotency_key(
        &Subject::parse("alice").unwrap(),
        &securepay_core::idempotency::IdempotencyKey::parse(&k).unwrap(),
    );
    let cached: Vec<u8> = redis::cmd("GET").arg(&redis_key).query_async(&mut conn).await.unwrap();
    assert_eq!(cached.first(), Some(&b'C'), "completed in Redis");
    assert_eq!(cached[1..33], cached[33..65], "the embedded fingerprint is the record's");
    assert_eq!(cached[65..], bodies[0].0[..], "Redis holds the first body");
    let _: i64 = redis::cmd("DEL").arg(&redis_key).query_async(&mut conn).await.unwrap();
    let (again, replayed) = initiate(&mut c, pay("10.50", &k)).await.unwrap();
    assert!(replayed);
    assert_eq!(again, bodies[0].0, "PostgreSQL replays the same bytes");
    let refilled: Vec<u8> = redis::cmd("GET").arg(&redis_key).query_async(&mut conn).await.unwrap();
    assert_eq!(refilled, cached, "the fast path is refilled from the truth");

    let id = payment_id(&bodies[0].0);
    assert_eq!(initiated_on_kafka(&world, &id, Duration::from_secs(3)).await, 1, "one event on the broker");
    let settled = wait_for_status(&mut c, &id, wire::PaymentStatus::Completed).await;
    let causes: Vec<&str> = settled.transitions.iter().map(|t| t.cause.as_str()).collect();
    assert_eq!(causes, ["accepted", "settled"], "GET shows the history");
    assert_eq!(world.balance(ALICE_EUR).await, Decimal::from_str("989.50").unwrap(), "debited once");
    assert_eq!(world.balance(BOB_EUR).await, Decimal::from_str("510.50").unwrap(), "credited once");

    let forbidden = get(&mut c, &id, "bob").await.unwrap_err();
    assert_eq!((forbidden.code(), error_code(&forbidden)), (Code::PermissionDenied, Some("forbidden")));
    let missing = get(&mut c, &Uuid::new_v4().to_string(), "alice").await.unwrap_err();
    assert_eq!((missing.code(), error_code(&missing)), (Code::NotFound, Some("payment_not_found")));

    // The store itself refuses what the table forbids, whatever the caller believes.
    let store = world.store().await;
    let pid = PaymentId::parse(&id).unwrap();
    let now = time::OffsetDateTime::now_utc();
    for from in [PaymentStatus::Completed, PaymentStatus::Pending] {
        let t = Transition { from, to: PaymentStatus::Failed, cause: "insufficient_funds".into(), at: now };
        let refused = store.record_transition(pid, &t, Some("insufficient_funds")).await.unwrap_err();
        assert_eq!(refused, PortError::Refused { rule: "illegal_transition" }, "from {from}");
    }
    assert_eq!(store.get(pid).await.unwrap().unwrap().status, PaymentStatus::Completed);

    let (ready, body) = world.admin_get("/ready").await;
    assert_eq!(ready, 200, "{body}");
    let (_, metrics) = world.admin_get("/metrics").await;
    for series in [
        "securepay_payments_total{status=\"PENDING\"} 1",
        "securepay_payments_total{status=\"COMPLETED\"} 1",
        "securepay_payment_transitions_total{from=\"PENDING\",to=\"COMPLETED\"} 1",
        "securepay_illegal_transitions_total 0",
        "securepay_outbox_lag_events{service=\"payment\"} 0",
        "securepay_settlement_duration_seconds_count 1",
    ] {
        assert!(metrics.contains(series), "/metrics lacks {series}:\n{metrics}");
    }

    // A contradicting outcome on the bus: refused by the transition table, counted, skipped (the
    // partition keeps flowing), and the payment stays COMPLETED.
    let stored = store.get(pid).await.unwrap().unwrap();
    let contradicting = PaymentSettled {
        event_id: EventId::from_uuid(Uuid::new_v4()),
        payment_id: pid,
        from: stored.from,
        to: stored.to,
        amount: stored.amount,
        outcome: Outcome::Failed(FailureReason::InsufficientFunds),
        occurred_at: now,
    };
    let record = OutgoingRecord {
        topic: format!("{}{}", topic::PAYMENT_FAILED, world.suffix),
        key: id.clone(),
        payload: securepay_proto::convert::encode_settled(&contradicting),
        headers: vec![],
    };
    KafkaEventLog::new(&world.brokers).unwrap().publish(&[record]).await.unwrap();
    let started = Instant::now();
    while !world.admin_get("/metrics").await.1.contains("securepay_illegal_transitions_total 1") {
        assert!(started.elapsed() < SETTLE_BOUND, "the contradicting outcome was never counted");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (body, _) = initiate(&mut c, pay("1.00", &key("order-after"))).await.unwrap();
    wait_for_status(&mut c, &payment_id(&body), wire::PaymentStatus::Completed).await;
    assert_eq!(get(&mut c, &id, "alice").await.unwrap().status, wire::PaymentStatus::Completed as i32);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_crash_between_commit_and_publish_still_publishes_and_settles_once() {
    let Some(mut world) = World::new().await else { return };
    let (_account, account_addr) = world.account().await;
    let listen = free_addr();
    let mut crashing = world.payment(account_addr, listen, &[("SECUREPAY_FAILPOINT", "crash_after_commit")]).await;
    let mut c = world.client(listen);
    let k = key("order-crash");
    let lost = initiate(&mut c, pay("25.00", &k)).await;
    assert!(lost.is_err(), "the process died before answering");
    assert!(!crashing.exited().await.success(), "the failpoint aborted the process");
    assert_eq!(world.count("SELECT count(*) FROM payments.transactions").await, 1, "the commit happened");
    assert_eq!(world.count("SELECT count(*) FROM payments.outbox WHERE published_at IS NULL").await, 1, "unpublished");
    drop(crashing);

    let listen = free_addr();
    let _payment = world.payment(account_addr, listen, &[]).await;
    let mut c = world.client(listen);
    let (body, replayed) = initiate(&mut c, pay("25.00", &k)).await.expect("the retry is answered");
    assert!(replayed, "the committed first response is replayed, nothing executes twice");
    let id = payment_id(&body);
    wait_for_status(&mut c, &id, wire::PaymentStatus::Completed).await;
    assert_eq!(world.balance(ALICE_EUR).await, Decimal::from_str("975.00").unwrap(), "money moved once");
    assert_eq!(world.count("SELECT count(*) FROM accounts.ledger_entries").await, 2);
    assert_eq!(world.count("SELECT count(*) FROM payments.transactions").await, 1);
    assert_eq!(world.count("SELECT count(*) FROM payments.outbox WHERE published_at IS NULL").await, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn with_redis_unreachable_postgresql_keeps_idempotency() {
    let Some(mut world) = World::new().await else { return };
    let (_account, account_addr) = world.account().await;
    let listen = free_addr();
    let closed = format!("redis://{}", free_addr());
    let _payment = world.payment(account_addr, listen, &[("SECUREPAY_REDIS_URL", closed.as_str())]).await;
    let client = world.client(listen);
    let k = key("order-noredis");
    let tasks: Vec<_> = (0..10)
        .map(|_| {
            let (mut client, k) = (client.clone(), k.clone());
            tokio::spawn(async move { initiate(&mut client, pay("1.00", &k)).await })
        })
        .collect();
    let mut bodies = Vec::new();
    for task in tasks {
        bodies.push(task.await.unwrap().expect("served without Redis"));
    }
    assert_eq!(bodies.iter().filter(|(_, replayed)| !replayed).count(), 1);
    assert!(bodies.windows(2).all(|w| w[0].0 == w[1].0));
    let mut c = client.clone();
    let reused = initiate(&mut c, pay("2.00", &k)).await.unwrap_err();
    assert_eq!(error_code(&reused), Some("idempotency_key_reused"));
    assert_eq!(world.count("SELECT count(*) FROM payments.transactions").await, 1);
    assert_eq!(world.count("SELECT count(*) FROM payments.outbox").await, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn with_the_account_service_down_requests_fail_fast_and_nothing_is_written() {
    let Some(mut world) = World::new().await else { return };
    let listen = free_addr();
    let _payment = world.payment(free_addr(), listen, &[]).await;
    let mut c = world.client(listen);

    let started = Instant::now();
    let down = initiate(&mut c, pay("5.00", &key("order-down"))).await.unwrap_err();
    let took = started.elapsed();
    assert_eq!((down.code(), error_code(&down)), (Code::Unavailable, Some("account_service_unavailable")));
    assert!(took < Duration::from_secs(10), "fails within the client's bound, took {took:?}");

    let hostile = [
        pay("1e400", &key("h-1")),
        pay("NaN", &key("h-2")),
        pay("-5", &key("h-3")),
        pay("1.001", &key("h-4")),
        pay("0", &key("h-5")),
        pay("99999999999999999999999999999999999", &key("h-6")),
        wire::InitiatePaymentRequest {
            from_account: "'; DROP TABLE payments.transactions; --".into(),
            ..pay("1", &key("h-7"))
        },
        wire::InitiatePaymentRequest { payment_id: "1 OR 1=1".into(), ..pay("1", &key("h-8")) },
        wire::InitiatePaymentRequest { to_account: ALICE_EUR.into(), ..pay("1", &key("h-9")) },
        wire::InitiatePaymentRequest { idempotency_key: "key with spaces".into(), ..pay("1", "") },
        wire::InitiatePaymentRequest {
            amount: Some(wire::Money { amount: "1".into(), currency: "EU'R".into() }),
            ..pay("1", &key("h-10"))
        },
    ];
    for request in hostile {
        let refused = initiate(&mut c, request.clone()).await.unwrap_err();
        assert_eq!(refused.code(), Code::InvalidArgument, "{request:?}");
        assert!(error_code(&refused).is_some(), "a stable code for {request:?}");
    }
    assert_eq!(world.count("SELECT count(*) FROM payments.transactions").await, 0, "nothing written");
    assert_eq!(world.count("SELECT count(*) FROM payments.outbox").await, 0);
    assert_eq!(world.count("SELECT count(*) FROM payments.idempotency_keys").await, 0, "every claim released");
}

#[tokio::test(flavor = "multi_thread")]
async fn two_instances_with_two_relays_settle_every_payment_exactly_once() {
    let Some(mut world) = World::new().await else { return };
    let (_account, account_addr) = world.account().await;
    let (a, b) = (free_addr(), free_addr());
    let _first = world.payment(account_addr, a, &[]).await;
    let _second = world.payment(account_addr, b, &[]).await;
    let clients = [world.client(a), world.client(b)];
    let mut ids = Vec::new();
    for n in 0..10 {
        let mut c = clients[n % 2].clone();
        let (body, replayed) = initiate(&mut c, pay("1.00", &key("order-two"))).await.unwrap();
        assert!(!replayed);
        ids.push(payment_id(&body));
    }
    let mut c = clients[0].clone();
    for id in &ids {
        wait_for_status(&mut c, id, wire::PaymentStatus::Completed).await;
    }
    assert_eq!(world.count("SELECT count(*) FROM accounts.processed_events").await, 10, "one settlement each");
    assert_eq!(world.count("SELECT count(*) FROM accounts.ledger_entries").await, 20);
    assert_eq!(world.balance(ALICE_EUR).await, Decimal::from_str("990.00").unwrap(), "each debited once");
    assert_eq!(world.count("SELECT count(*) FROM payments.outbox WHERE published_at IS NULL").await, 0);
}

/// A TCP forwarder to a real component that the test can cut: stopping it is the component
/// going away for the service behind it (the shared Redis itself must stay up for other tests).
struct Cuttable {
    addr: SocketAddr,
    tasks: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

impl Cuttable {
    async fn start(target: String) -> Cuttable {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let tasks = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let conns = tasks.clone();
        let accept = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let target = target.clone();
                let conn = tokio::spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                conns.lock().unwrap().push(conn);
            }
        });
        tasks.lock().unwrap().push(accept);
        Cuttable { addr, tasks }
    }

    /// Closes the listener and every forwarded connection.
    fn cut(&self) {
        for task in self.tasks.lock().unwrap().drain(..) {
            task.abort();
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_and_the_account_service_stopping_under_a_running_service() {
    let Some(mut world) = World::new().await else { return };
    let (mut account, account_addr) = world.account().await;
    let redis_target = world.redis_url.trim_start_matches("redis://").trim_end_matches('/').to_owned();
    let redis = Cuttable::start(redis_target).await;
    let listen = free_addr();
    let via = format!("redis://{}", redis.addr);
    let _payment = world.payment(account_addr, listen, &[("SECUREPAY_REDIS_URL", via.as_str())]).await;
    let mut c = world.client(listen);

    let k = key("order-cut");
    let (first, replayed) = initiate(&mut c, pay("3.00", &k)).await.unwrap();
    assert!(!replayed);
    redis.cut();
    let (again, replayed) = initiate(&mut c, pay("3.00", &k)).await.expect("served with Redis gone");
    assert!(replayed);
    assert_eq!(again, first, "PostgreSQL replays the same bytes");
    let reused = initiate(&mut c, pay("4.00", &k)).await.unwrap_err();
    assert_eq!(error_code(&reused), Some("idempotency_key_reused"));
    let (_, replayed) = initiate(&mut c, pay("4.00", &key("order-cut-new"))).await.expect("new keys still work");
    assert!(!replayed);
    assert_eq!(world.count("SELECT count(*) FROM payments.transactions").await, 2);

    let _ = account.child.kill();
    account.exited().await;
    let started = Instant::now();
    let down = initiate(&mut c, pay("5.00", &key("order-no-account"))).await.unwrap_err();
    assert_eq!((down.code(), error_code(&down)), (Code::Unavailable, Some("account_service_unavailable")));
    assert!(started.elapsed() < Duration::from_secs(10), "failed within the client's bound");
    assert_eq!(world.count("SELECT count(*) FROM payments.transactions").await, 2, "nothing written");
    assert_eq!(
        world.count("SELECT count(*) FROM payments.idempotency_keys WHERE state = 'IN_FLIGHT'").await,
        0,
        "claim released"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn plaintext_grpc_is_refused_and_only_mtls_is_served() {
    let Some(mut world) = World::new().await else { return };
    let listen = free_addr();
    let _payment = world.payment(free_addr(), listen, &[]).await;

    // A plaintext caller, even one claiming the gateway's identity the old development way, never
    // reaches a handler: the listener completes only mTLS handshakes.
    let channel = Endpoint::from_shared(format!("http://{listen}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .connect_lazy();
    let mut plain = PaymentServiceClient::with_interceptor(channel, ClientInterceptor(ServiceIdentity::ApiGateway));
    let unknown = Uuid::new_v4().to_string();
    let mut request = as_subject(wire::GetPaymentRequest { payment_id: unknown.clone() }, "alice");
    request.set_timeout(Duration::from_secs(10));
    let refused = plain.get_payment(request).await.expect_err("plaintext must not be served");
    assert_eq!(error_code(&refused), None, "no handler answered a plaintext call: {refused:?}");
    assert_ne!(refused.code(), Code::NotFound, "{refused:?}");
    let mut request = as_subject(pay("1.00", &key("order-plain")), "alice");
    request.set_timeout(Duration::from_secs(10));
    let refused = plain.initiate_payment(request).await.expect_err("plaintext must not be served");
    assert_eq!(error_code(&refused), None, "{refused:?}");
    assert_eq!(world.count("SELECT count(*) FROM payments.transactions").await, 0, "nothing written");
    assert_eq!(world.count("SELECT count(*) FROM payments.idempotency_keys").await, 0, "nothing claimed");

    // The same listener serves the gateway over mTLS: the handler answers (not found).
    let mut c = world.client(listen);
    let missing = get(&mut c, &unknown, "alice").await.unwrap_err();
    assert_eq!((missing.code(), error_code(&missing)), (Code::NotFound, Some("payment_not_found")));
}

#[tokio::test(flavor = "multi_thread")]
async fn the_callers_trace_continues_into_the_outbox_event() {
    let Some(mut world) = World::new().await else { return };
    let (_account, account_addr) = world.account().await;
    let listen = free_addr();
    // `RUST_LOG` filters spans as well as logs in `securepay_runtime::init_telemetry`: at `warn`
    // (the other tests' level) the info-level `payment.initiate` span would not exist.
    let _payment = world.payment(account_addr, listen, &[("RUST_LOG", "info")]).await;
    let mut c = world.client(listen);

    let (trace_id, caller_span) = ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7");
    let mut request = as_subject(pay("2.00", &key("order-traced")), "alice");
    request.metadata_mut().insert("traceparent", format!("00-{trace_id}-{caller_span}-01").parse().unwrap());
    let id = payment_id(&c.initiate_payment(request).await.unwrap().into_inner().encode_to_vec());
    let records = initiated_records(&world, &id, Duration::from_millis(500)).await;
    let traceparent = records[0].iter().find(|(k, _)| k == "traceparent").map(|(_, v)| v.clone()).unwrap();
    let parts: Vec<&str> = traceparent.split('-').collect();
    assert_eq!(parts[1], trace_id, "the event continues the caller's trace: {traceparent}");
    assert_ne!(parts[2], caller_span, "under a span of this service, not the caller's: {traceparent}");

    // The caller's sampling decision is honoured, which only the OpenTelemetry span context does
    // (the service's fallback header always says sampled): the event carries the real span.
    let unsampled = "5bf92f3577b34da6a3ce929d0e0e4737";
    let mut request = as_subject(pay("2.00", &key("order-unsampled")), "alice");
    request.metadata_mut().insert("traceparent", format!("00-{unsampled}-{caller_span}-00").parse().unwrap());
    let id = payment_id(&c.initiate_payment(request).await.unwrap().into_inner().encode_to_vec());
    let records = initiated_records(&world, &id, Duration::from_millis(500)).await;
    let traceparent = records[0].iter().find(|(k, _)| k == "traceparent").map(|(_, v)| v.clone()).unwrap();
    assert!(
        traceparent.starts_with(&format!("00-{unsampled}-")) && traceparent.ends_with("-00"),
        "the caller's unsampled trace continues unsampled: {traceparent}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn without_an_svid_the_binary_refuses_to_start() {
    let Some(mut world) = World::new().await else { return };
    let mut env = world.env("payment_service", free_addr(), &world.redis_url.clone()).await;
    env.retain(|(k, _)| k != "SPIFFE_ENDPOINT_SOCKET");
    env.push(("SECUREPAY_ACCOUNT_ADDR".to_owned(), free_addr().to_string()));
    let out = Command::new(env!("CARGO_BIN_EXE_securepay-payment"))
        .env_clear()
        .env("RUST_LOG", "info")
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .output()
        .expect("the binary runs");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!out.status.success(), "started without an SVID:\n{text}");
    assert!(text.contains("SPIFFE_ENDPOINT_SOCKET"), "the refusal names what to set:\n{text}");
}
