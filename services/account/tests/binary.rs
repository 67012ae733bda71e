//! The real `securepay-account` binary against the real components (PostgreSQL, Redis, Kafka and
//! SPIRE): it refuses to start without an SVID, serves gRPC over mTLS only (a plaintext client is
//! refused before any handler runs; an SVID-holding caller is served), serves `/health`, `/ready`,
//! `/metrics`, settles what the payment service publishes, relays the outcome events to Kafka,
//! dead-letters garbage — and when SIGKILLed in the middle of settling and restarted, loses nothing
//! and duplicates nothing.
//!
//! The binary under test is registered with the test platform's SPIRE server by its path
//! (`unix:path` selector) as `spiffe://securepay.dev/account-service`, and started with
//! `SPIFFE_ENDPOINT_SOCKET` naming the test agent. Each test runs it with
//! `SECUREPAY_KAFKA_NAME_SUFFIX` (TESTS ONLY) so its topics and consumer group are its own on the
//! shared broker.
#![cfg(not(madsim))]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Infra, Payment, consume, create_topics, dec, wait_until};
use securepay_account::settlement::DLQ_REASON_HEADER;
use securepay_core::identity::ServiceIdentity;
use securepay_core::ids::AccountId;
use securepay_core::ids::Subject;
use securepay_core::topology::topic;
use securepay_identity::testing::Spire;
use securepay_kafka::KafkaConsumer;
use securepay_ports::{EventConsumer, EventLog, OutgoingRecord};
use securepay_proto::account::v1::GetBalanceRequest;
use securepay_proto::account::v1::account_service_client::AccountServiceClient;
use uuid::Uuid;

const PATIENCE: Duration = Duration::from_secs(90);

/// A port that was free a moment ago.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// One configured instance of the service (restartable with the same configuration).
struct Service {
    env: Vec<(String, String)>,
    admin: u16,
    grpc: u16,
    log_dir: tempfile::TempDir,
    _secrets: tempfile::TempDir,
    suffix: String,
    runs: usize,
}

impl Service {
    async fn new(infra: &Infra, spire: &Spire, batch_len: usize) -> Service {
        spire.ensure_registered(
            std::path::Path::new(env!("CARGO_BIN_EXE_securepay-account")),
            ServiceIdentity::AccountService,
        );
        let suffix = format!(".test-{}", Uuid::new_v4().simple());
        let topics: Vec<String> = topic::ALL.iter().map(|t| format!("{t}{suffix}")).collect();
        let names: Vec<&str> = topics.iter().map(String::as_str).collect();
        create_topics(&infra.brokers, &names).await;
        let (mut env, secrets) = infra.db.service_env("account_service").await;
        let (admin, grpc) = (free_port(), free_port());
        env.extend([
            ("SECUREPAY_LISTEN_ADDR".to_owned(), format!("127.0.0.1:{grpc}")),
            ("SECUREPAY_ADMIN_ADDR".to_owned(), format!("127.0.0.1:{admin}")),
            ("SECUREPAY_REDIS_URL".to_owned(), infra.redis_url.clone()),
            ("SECUREPAY_KAFKA_BROKERS".to_owned(), infra.brokers.clone()),
            ("SPIFFE_ENDPOINT_SOCKET".to_owned(), spire.endpoint.clone()),
            ("SECUREPAY_KAFKA_NAME_SUFFIX".to_owned(), suffix.clone()),
            ("SECUREPAY_SETTLE_BATCH_LEN".to_owned(), batch_len.to_string()),
            ("RUST_LOG".to_owned(), "info".to_owned()),
        ]);
        Service { env, admin, grpc, log_dir: tempfile::tempdir().unwrap(), _secrets: secrets, suffix, runs: 0 }
    }

    fn topic(&self, name: &str) -> String {
        format!("{name}{}", self.suffix)
    }

    async fn spawn(&mut self) -> Child {
        self.runs += 1;
        let log = std::fs::File::create(self.log_dir.path().join(format!("run-{}.log", self.runs))).unwrap();
        Command::new(env!("CARGO_BIN_EXE_securepay-account"))
            .env_clear()
            .envs(self.env.iter().cloned())
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("spawn securepay-account")
    }

    fn logs(&self) -> String {
        let mut all = String::new();
        for run in 1..=self.runs {
            let text = std::fs::read_to_string(self.log_dir.path().join(format!("run-{run}.log"))).unwrap_or_default();
            all.push_str(&format!("--- run {run} ---\n{text}"));
        }
        all
    }

    /// Waits until `/ready` answers 200; fails with the service's log otherwise.
    async fn wait_ready(&self, child: &mut Child) {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                panic!("the service exited ({status}) before it was ready:\n{}", self.logs());
            }
            if matches!(http_get(self.admin, "/ready"), Some((200, _))) {
                return;
            }
            assert!(Instant::now() < deadline, "not ready within {PATIENCE:?}:\n{}", self.logs());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// `GET path` on the admin port: (status, body), or `None` when nothing answers.
fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let status = response.split(' ').nth(1)?.parse().ok()?;
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    Some((status, body))
}

fn sigterm(child: &Child) {
    let status = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(status.success());
}

/// Waits for `child` to exit (bounded); returns whether it exited successfully.
async fn exit_success(child: &mut Child, logs: impl Fn() -> String) -> bool {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status.success();
        }
        assert!(Instant::now() < deadline, "did not stop within 30 s of SIGTERM:\n{}", logs());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The SPIRE of the test platform and the other components; `None` (skip) when absent.
async fn platform() -> Option<(Infra, Spire)> {
    let spire = Spire::from_env()?;
    Some((Infra::new().await?, spire))
}

/// Fail closed: without a Workload API there is no SVID, and without an SVID no service — one
/// error line naming the cause, a failure exit status, and no gRPC listener.
#[tokio::test]
async fn it_refuses_to_start_without_an_svid() {
    let Some((infra, spire)) = platform().await else { return };
    let mut service = Service::new(&infra, &spire, 8).await;
    service.env.retain(|(k, _)| k != "SPIFFE_ENDPOINT_SOCKET");
    let mut child = service.spawn().await;
    assert!(!exit_success(&mut child, || service.logs()).await, "it must not run without an SVID");
    let logs = service.logs();
    let errors: Vec<&str> = logs.lines().filter(|l| l.contains("\"level\":\"ERROR\"")).collect();
    assert_eq!(errors.len(), 1, "one error line: {logs}");
    assert!(errors[0].contains("SPIFFE_ENDPOINT_SOCKET is not set"), "names the cause: {logs}");
    assert!(TcpStream::connect(("127.0.0.1", service.grpc)).is_err(), "no gRPC listener was opened");
}

/// gRPC is mTLS only: a plaintext client is refused at the transport (no handler runs, so the
/// RED series of the method stays at zero), while the gateway's SVID gets its answer.
#[tokio::test]
async fn grpc_is_mtls_only() {
    let Some((infra, spire)) = platform().await else { return };
    let alice = infra.open("alice", "EUR", "30.00").await;
    let mut service = Service::new(&infra, &spire, 8).await;
    let mut child = service.spawn().await;
    service.wait_ready(&mut child).await;
    let addr = format!("127.0.0.1:{}", service.grpc);
    let request = || {
        let mut request = tonic::Request::new(GetBalanceRequest { account_id: alice.to_string() });
        request.set_timeout(Duration::from_secs(10));
        securepay_kit::with_subject(&mut request, &Subject::parse("alice").unwrap());
        request
    };

    let plaintext = tonic::transport::Channel::from_shared(format!("http://{addr}")).unwrap().connect_lazy();
    let refused = AccountServiceClient::new(plaintext).get_balance(request()).await;
    assert!(refused.is_err(), "a plaintext call must fail: {refused:?}");
    let (_, metrics) = http_get(service.admin, "/metrics").unwrap();
    let handled = metrics
        .lines()
        .filter(|l| l.starts_with("securepay_grpc_requests_total") && l.contains("GetBalance"))
        .collect::<Vec<_>>();
    assert!(!handled.is_empty() && handled.iter().all(|l| l.ends_with(" 0")), "no handler ran: {handled:?}");
    wait_until(PATIENCE, "the refused handshake is counted", || async {
        let (_, metrics) = http_get(service.admin, "/metrics").unwrap_or_default();
        metrics.lines().any(|l| {
            l.starts_with("securepay_auth_failures_total") && l.contains("tls_handshake_failed") && !l.ends_with(" 0")
        })
    })
    .await;

    let gateway = spire.identity_of_this_test(ServiceIdentity::ApiGateway).await;
    let channel = securepay_identity::grpc::channel(&addr, ServiceIdentity::AccountService, &gateway).unwrap();
    let balance = AccountServiceClient::new(channel).get_balance(request()).await;
    let balance = balance.unwrap_or_else(|e| panic!("the gateway's SVID is served: {e:?}\n{}", service.logs()));
    assert_eq!(balance.into_inner().balance, "30.00");

    sigterm(&child);
    assert!(exit_success(&mut child, || service.logs()).await, "clean exit:\n{}", service.logs());
}

#[tokio::test]
async fn a_missing_setting_is_one_line_naming_it() {
    let Some((infra, spire)) = platform().await else { return };
    let mut service = Service::new(&infra, &spire, 8).await;
    service.env.retain(|(k, _)| k != "SECUREPAY_REDIS_URL");
    let mut child = service.spawn().await;
    assert!(!exit_success(&mut child, || service.logs()).await);
    let logs = service.logs();
    assert!(logs.contains("SECUREPAY_REDIS_URL is not set"), "{logs}");
}

/// Issue bullets: a garbage message lands in the DLQ and the next good message is still settled;
/// the outcome is relayed to Kafka; /health, /ready and /metrics answer; SIGTERM stops it cleanly.
#[tokio::test]
async fn the_binary_settles_relays_dead_letters_and_reports() {
    let Some((infra, spire)) = platform().await else { return };
    let alice = infra.open("alice", "EUR", "30.00").await;
    let bob = infra.open("bob", "EUR", "0.00").await;
    let mut service = Service::new(&infra, &spire, 8).await;
    let mut child = service.spawn().await;
    service.wait_ready(&mut child).await;
    assert_eq!(http_get(service.admin, "/health").map(|(s, _)| s), Some(200));

    let initiated = service.topic(topic::PAYMENT_INITIATED);
    let good = Payment::new(alice, bob, "12.34", "EUR", "alice");
    let garbage = OutgoingRecord {
        topic: initiated.clone(),
        key: good.payment_id.to_string(),
        payload: b"garbage".to_vec(),
        headers: vec![],
    };
    infra.event_log().publish(&[garbage, good.record(&initiated)]).await.unwrap();

    let settled = tokio::time::timeout(PATIENCE, async {
        while infra.processed().await < 1 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    assert!(settled.await.is_ok(), "the good payment was not settled:\n{}", service.logs());
    let dlq = service.topic(topic::PAYMENT_INITIATED_DLQ);
    let letters = consume(&infra.brokers, &[&dlq], 1, PATIENCE).await;
    assert_eq!(letters[0].payload, b"garbage");
    let completed = service.topic(topic::PAYMENT_COMPLETED);
    let outcomes = consume(&infra.brokers, &[&completed], 1, PATIENCE).await;
    assert_eq!(outcomes[0].key, good.payment_id.to_string(), "outcome relayed, keyed by payment id");
    assert_eq!(infra.balance(bob).await, dec("12.34"));

    let (status, metrics) = http_get(service.admin, "/metrics").unwrap();
    assert_eq!(status, 200);
    let dead_letters = metrics
        .lines()
        .find(|l| l.starts_with("securepay_dead_letters_total") && l.contains("reason=\"undecodable\""))
        .unwrap_or_else(|| panic!("no dead-letter series:\n{metrics}"));
    assert!(dead_letters.ends_with(" 1"), "{dead_letters}");
    assert!(metrics.contains("securepay_settlements_total{result=\"completed\"} 1"), "{metrics}");
    assert!(
        metrics.lines().any(|l| l.starts_with("securepay_grpc_requests_total") && l.contains("GetBalance")),
        "RED series exported before any call: {metrics}"
    );
    assert_eq!(header(&letters[0]), Some("undecodable"));

    sigterm(&child);
    assert!(exit_success(&mut child, || service.logs()).await, "clean exit on SIGTERM:\n{}", service.logs());
    infra.assert_books_balance().await;
}

/// `/health` says the process is alive; `/ready` answers 503 naming the dependency that is down.
#[tokio::test]
async fn ready_names_the_dependency_that_is_down() {
    let Some((infra, spire)) = platform().await else { return };
    let mut service = Service::new(&infra, &spire, 8).await;
    for (name, value) in &mut service.env {
        if name == "SECUREPAY_REDIS_URL" {
            *value = "redis://127.0.0.1:1".to_owned(); // nothing listens there
        }
    }
    let mut child = service.spawn().await;
    wait_until(PATIENCE, "the admin listener answers", || async { http_get(service.admin, "/health").is_some() }).await;
    assert_eq!(http_get(service.admin, "/health").map(|(s, _)| s), Some(200));
    let (status, body) = http_get(service.admin, "/ready").unwrap();
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("\"failing\":[\"redis\"]"), "only redis is failing: {body}");
    sigterm(&child);
    assert!(exit_success(&mut child, || service.logs()).await, "clean exit:\n{}", service.logs());
}

fn header(record: &securepay_ports::ConsumedRecord) -> Option<&str> {
    common::header(record, DLQ_REASON_HEADER)
}

/// Issue bullet: killing the service (SIGKILL) in the middle of settling and restarting it loses
/// and duplicates nothing.
#[tokio::test]
async fn sigkill_mid_settlement_then_restart_loses_and_duplicates_nothing() {
    let Some((infra, spire)) = platform().await else { return };
    let mut payers = Vec::new();
    for i in 0..20 {
        payers.push(infra.open(&format!("payer{i}"), "EUR", "60.00").await);
    }
    let mut payees = Vec::new();
    for i in 0..5 {
        payees.push(infra.open(&format!("payee{i}"), "EUR", "0.00").await);
    }
    const N: usize = 600;
    // Amounts 1.00..=13.00: some payers run dry, so both outcomes occur.
    let payments: Vec<Payment> = (0..N)
        .map(|i| {
            let amount = format!("{}.00", 1 + (i * 7) % 13);
            Payment::new(payers[i % payers.len()], payees[(i / 3) % payees.len()], &amount, "EUR", "x")
        })
        .collect();
    let mut service = Service::new(&infra, &spire, 4).await;
    let initiated = service.topic(topic::PAYMENT_INITIATED);
    let records: Vec<OutgoingRecord> = payments.iter().map(|p| p.record(&initiated)).collect();
    let log = infra.event_log();
    for chunk in records.chunks(100) {
        log.publish(chunk).await.unwrap();
    }

    // Three SIGKILLs while settling (each after more events were settled), then a final run.
    let mut kills = Vec::new();
    for progress in [1, 25, 60] {
        let mut run = service.spawn().await;
        let target = infra.processed().await + progress;
        wait_until(PATIENCE, "settlement moving", || async { infra.processed().await >= target }).await;
        run.kill().unwrap(); // SIGKILL
        run.wait().unwrap();
        kills.push(infra.processed().await);
    }
    eprintln!("SIGKILLed after {kills:?} of {N} settlements");
    let at_kill = *kills.last().unwrap();
    assert!(
        (at_kill as usize) < N,
        "everything was settled before the last kill ({kills:?}); the test needs more events to kill mid-way"
    );

    let mut second = service.spawn().await;
    service.wait_ready(&mut second).await;
    wait_until(PATIENCE, "all payments settled after the restart", || async { infra.processed().await == N as i64 })
        .await;
    wait_until(PATIENCE, "every outcome relayed", || async {
        infra.count("SELECT count(*) FROM accounts.outbox WHERE published_at IS NULL").await == 0
    })
    .await;
    sigterm(&second);
    assert!(exit_success(&mut second, || service.logs()).await, "clean exit:\n{}", service.logs());

    // Nothing lost, nothing duplicated: one processed row, one outcome event per payment.
    let wanted: BTreeSet<_> = payments.iter().map(|p| p.payment_id).collect();
    let outcomes = infra.outbox().await;
    assert_eq!(outcomes.len(), N, "one outcome event per payment (killed at {kills:?} of {N})");
    let settled: BTreeSet<_> = outcomes.iter().map(|o| o.payment_id).collect();
    assert_eq!(settled, wanted);
    let completed = outcomes.iter().filter(|o| o.outcome.status().as_str() == "COMPLETED").count();
    assert!(completed > 0 && completed < N, "both outcomes occur: {completed} of {N} completed");
    // Per payment, the ledger agrees with its outcome (two rows if completed, none if failed).
    infra.assert_books_balance().await;
    let debits: BTreeMap<AccountId, rust_decimal::Decimal> = {
        let mut d = BTreeMap::new();
        for o in outcomes.iter().filter(|o| o.outcome.status().as_str() == "COMPLETED") {
            *d.entry(o.from).or_default() += o.amount.value();
        }
        d
    };
    for payer in &payers {
        let spent = debits.get(payer).copied().unwrap_or_default();
        assert_eq!(infra.balance(*payer).await, dec("60.00") - spent, "payer balance = opening - completed debits");
    }

    // The relay published every outcome at least once, and nothing that is not in the outbox.
    let outbox_events: BTreeSet<String> = outcomes.iter().map(|o| o.event_id.to_string()).collect();
    let outcome_topics = [service.topic(topic::PAYMENT_COMPLETED), service.topic(topic::PAYMENT_FAILED)];
    let names: Vec<&str> = outcome_topics.iter().map(String::as_str).collect();
    let mut reader = KafkaConsumer::new(&infra.brokers, &common::fresh("reader"), &names).unwrap();
    let mut relayed = BTreeSet::new();
    let deadline = Instant::now() + PATIENCE;
    while relayed.len() < N {
        assert!(Instant::now() < deadline, "only {} of {N} outcomes relayed within {PATIENCE:?}", relayed.len());
        for record in reader.poll(N, Duration::from_millis(500)).await.unwrap() {
            let id = event_id(&record.position.topic, &record.payload, &service.suffix);
            assert!(outbox_events.contains(&id), "relayed an event that is not in the outbox: {id}");
            relayed.insert(id);
        }
    }
    assert_eq!(relayed, outbox_events);
}

/// The event id of a relayed outcome record.
fn event_id(topic_name: &str, payload: &[u8], suffix: &str) -> String {
    let topic_name = topic_name.strip_suffix(suffix).expect("suffixed topic");
    let policy = securepay_core::money::AmountPolicy { maximum: rust_decimal::Decimal::MAX };
    securepay_proto::convert::decode_settled(topic_name, payload, policy).expect("outcome decodes").event_id.to_string()
}
