//! Proof that the runner's real components work as the services will use them: PostgreSQL with
//! one role per schema, Redis, Kafka with consumer groups, Prometheus with its targets.
//!
//! Run by `cargo xtask test` (which exports `securepay_testkit::var::*`); under a bare `cargo test`
//! each test says it was skipped. Under `SECUREPAY_INFRA_REQUIRED=1` a missing component fails.

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::Message as _;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer as _};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer as _};
use securepay_core::identity::ServiceIdentity;
use securepay_core::topology::SCHEMAS;
use securepay_testkit::{component, var};

/// The database and secrets layout the runner's PostgreSQL component creates
/// (`xtask/src/components/postgres.rs`).
const DATABASE: &str = "securepay";
fn role_password(role: &str) -> String {
    let state = PathBuf::from(component(var::STATE_DIR).expect("STATE_DIR is set with PG_ADMIN_URL"));
    let path = state.join("secrets").join(format!("pg-role-{role}"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).trim().to_string()
}

fn pg_port(admin_url: &str) -> u16 {
    let host_port = admin_url.rsplit('@').next().unwrap().split('/').next().unwrap();
    host_port.rsplit(':').next().unwrap().parse().unwrap()
}

#[test]
fn postgres_16_answers_the_superuser() {
    let Some(admin_url) = component(var::PG_ADMIN_URL) else { return };
    let mut client = postgres::Client::connect(&admin_url, postgres::NoTls).expect("superuser connects");
    let version: String = client.query_one("SHOW server_version", &[]).unwrap().get(0);
    assert!(version.starts_with("16."), "server_version = {version}");
    let listen: String = client.query_one("SHOW listen_addresses", &[]).unwrap().get(0);
    assert_eq!(listen, "127.0.0.1", "PostgreSQL must listen on loopback only");
}

#[test]
fn each_service_role_can_touch_only_its_own_schema() {
    let Some(admin_url) = component(var::PG_ADMIN_URL) else { return };
    let admin_db_url = format!("{}/{DATABASE}", admin_url.rsplit_once('/').unwrap().0);
    let mut admin = postgres::Client::connect(&admin_db_url, postgres::NoTls)
        .unwrap_or_else(|e| panic!("database {DATABASE} (created by the runner's migrations): {e:?}"));
    let port = pg_port(&admin_url);
    // Role passwords are cluster-wide and other test binaries on this cluster set their own
    // (services/postgres/tests); put the runner's back so this checks the platform as `up` left it.
    for (_, role) in SCHEMAS {
        let password = role_password(role).replace('\'', "''");
        admin.batch_execute(&format!("ALTER ROLE {role} PASSWORD '{password}'")).unwrap();
    }

    for (own_schema, role) in SCHEMAS {
        let url = format!("postgres://{role}:{}@127.0.0.1:{port}/{DATABASE}", role_password(role));
        let mut service = postgres::Client::connect(&url, postgres::NoTls)
            .unwrap_or_else(|e| panic!("{role} logs in with the runner's password: {e:?}"));
        for (schema, _) in SCHEMAS {
            let tables: Vec<String> = admin
                .query("SELECT tablename FROM pg_tables WHERE schemaname = $1", &[&schema])
                .unwrap()
                .iter()
                .map(|row| row.get(0))
                .collect();
            assert!(!tables.is_empty(), "schema {schema} has tables after the migrations");
            for table in tables {
                let read = service.simple_query(&format!("SELECT * FROM {schema}.{table} LIMIT 0"));
                if schema == own_schema {
                    read.unwrap_or_else(|e| panic!("{role} reads its own {schema}.{table}: {e:?}"));
                } else {
                    let err = read.expect_err(&format!("{role} must not read {schema}.{table}"));
                    assert_eq!(err.code(), Some(&postgres::error::SqlState::INSUFFICIENT_PRIVILEGE), "{err}");
                }
            }
        }
        let err = service
            .simple_query("CREATE TABLE public.intruder (id int)")
            .expect_err(&format!("{role} must not create tables in public"));
        assert_eq!(err.code(), Some(&postgres::error::SqlState::INSUFFICIENT_PRIVILEGE), "{err}");
    }
}

/// One RESP command over a fresh connection; returns the raw reply.
fn redis(port: u16, args: &[&str]) -> String {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("redis accepts connections");
    stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut request = format!("*{}\r\n", args.len());
    for a in args {
        request.push_str(&format!("${}\r\n{a}\r\n", a.len()));
    }
    stream.write_all(request.as_bytes()).unwrap();
    let mut buf = [0u8; 512];
    let n = stream.read(&mut buf).unwrap();
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[test]
fn redis_answers_ping_set_get() {
    let Some(url) = component(var::REDIS_URL) else { return };
    let port: u16 = url.rsplit(':').next().unwrap().trim_end_matches('/').parse().unwrap();
    assert_eq!(redis(port, &["PING"]), "+PONG\r\n");
    let key = format!("xtask:proof:{}", std::process::id());
    assert_eq!(redis(port, &["SET", &key, "settled", "EX", "60"]), "+OK\r\n");
    assert_eq!(redis(port, &["GET", &key]), "$7\r\nsettled\r\n");
    assert_eq!(redis(port, &["DEL", &key]), ":1\r\n");
}

#[test]
fn kafka_message_produced_with_rdkafka_is_consumed_by_a_consumer_group() {
    let Some(brokers) = component(var::KAFKA_BROKERS) else { return };
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    let run = format!("{}-{nanos}", std::process::id());
    // A topic of its own: the proof must not leave junk in the platform's payment topics.
    let topic = format!("xtask.proof.{run}");
    let admin: AdminClient<DefaultClientContext> =
        ClientConfig::new().set("bootstrap.servers", &brokers).create().expect("admin client");
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let created = futures_executor::block_on(
        admin.create_topics(&[NewTopic::new(&topic, 3, TopicReplication::Fixed(1))], &options),
    )
    .expect("create_topics");
    assert!(created.iter().all(Result::is_ok), "{created:?}");

    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("enable.idempotence", "true")
        .create()
        .expect("producer");
    let key = format!("payment-{run}");
    producer
        .send(BaseRecord::to(&topic).key(&key).payload("payment.initiated proof"))
        .map_err(|(e, _)| e)
        .expect("enqueue");
    producer.flush(Duration::from_secs(30)).expect("the broker acknowledges the message");

    let group = format!("xtask-proof-group-{run}");
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("group.id", &group)
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    consumer.subscribe(&[&topic]).expect("subscribe");
    let deadline = Instant::now() + Duration::from_secs(60);
    let received = loop {
        assert!(Instant::now() < deadline, "no message consumed by group {group} within 60 s");
        match consumer.poll(Duration::from_millis(500)) {
            Some(Ok(m)) if m.key() == Some(key.as_bytes()) => {
                consumer.commit_message(&m, CommitMode::Sync).expect("commit offset");
                break m.payload().map(|p| String::from_utf8_lossy(p).into_owned());
            }
            Some(Ok(_)) | None => {}
            Some(Err(e)) => panic!("consumer error: {e}"),
        }
    };
    assert_eq!(received.as_deref(), Some("payment.initiated proof"));
    assert!(!consumer.assignment().unwrap().elements().is_empty(), "the group assigned partitions");
    drop(consumer);
    let _ = futures_executor::block_on(admin.delete_topics(&[&topic], &options));
}

#[test]
fn prometheus_reports_its_targets_including_every_service() {
    let Some(url) = component(var::PROMETHEUS_URL) else { return };
    let port: u16 = url.rsplit(':').next().unwrap().trim_end_matches('/').parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let targets = http_get_json(port, "/api/v1/targets");
        assert_eq!(targets["status"], "success", "{targets}");
        let active = targets["data"]["activeTargets"].as_array().expect("activeTargets");
        let job_health = |job: &str| {
            active.iter().find(|t| t["labels"]["job"] == job).map(|t| t["health"].as_str().unwrap_or("").to_string())
        };
        // Services may not run in the test profile: listed is what we check, not up. Right after
        // start-up the target list can still be empty, hence the retries.
        let service_jobs_listed =
            ServiceIdentity::ALL.iter().all(|s| job_health(s.spiffe_id().rsplit('/').next().unwrap()).is_some());
        if service_jobs_listed && job_health("prometheus").as_deref() == Some("up") {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "every service job listed and Prometheus's own target up within 30 s: {active:?}"
        );
        std::thread::sleep(Duration::from_secs(1));
    }
}

fn http_get_json(port: u16, path: &str) -> serde_json::Value {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("prometheus accepts connections");
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(stream, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").expect("HTTP response");
    assert!(head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"), "{head}");
    serde_json::from_str(body).expect("JSON body")
}
