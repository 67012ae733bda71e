//! What the account service's integration tests share: the real components (a fresh PostgreSQL
//! database per test, Redis, Kafka with fresh topics per test), accounts opened through the
//! superuser pool, events encoded as the payment service encodes them, and bounded waits.
#![allow(dead_code, unreachable_pub)]

use std::collections::BTreeMap;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rust_decimal::Decimal;
use securepay_core::events::{PaymentInitiated, PaymentSettled};
use securepay_core::ids::{AccountId, EventId, PaymentId, Subject};
use securepay_core::money::{Amount, AmountPolicy, Currency};
use securepay_kafka::{KafkaConsumer, KafkaEventLog};
use securepay_ports::{ConsumedRecord, EventConsumer, OutgoingRecord};
use securepay_postgres::PgLedgerStore;
use securepay_postgres::testing::TestDb;
use securepay_redis::{CALL_TIMEOUT_DEFAULT, Redis, RedisBalanceCache};
use securepay_testkit::{component, var};
use sqlx::Row;
use sqlx::postgres::PgPoolOptions;
use time::OffsetDateTime;
use uuid::Uuid;

pub const PARTITIONS: i32 = 3;

/// The real components of one test.
pub struct Infra {
    pub db: TestDb,
    pub redis_url: String,
    pub brokers: String,
}

impl Infra {
    /// `None` (skip) when the components are not configured and not required.
    pub async fn new() -> Option<Infra> {
        let redis_url = component(var::REDIS_URL)?;
        let brokers = component(var::KAFKA_BROKERS)?;
        let db = TestDb::new().await?;
        Some(Infra { db, redis_url, brokers })
    }

    /// The store as the service uses it: every connection acts as the `account_service` role (its
    /// grants apply), via `SET ROLE` on the superuser's connections so that no role password — set
    /// cluster-wide by whichever test process ran last — is involved.
    pub async fn ledger(&self) -> Arc<PgLedgerStore> {
        let options = securepay_postgres::admin_options(&self.db.admin_url, &self.db.name).unwrap();
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .after_connect(|conn, _| {
                Box::pin(async move {
                    sqlx::Executor::execute(&mut *conn, "SET ROLE account_service").await?;
                    Ok(())
                })
            })
            .connect_with(options)
            .await
            .expect("connect as account_service");
        Arc::new(PgLedgerStore::new(pool))
    }

    pub fn cache(&self) -> Arc<RedisBalanceCache> {
        // Namespaced by the test database (as the binary does): demo account ids seeded into test
        // databases must never answer for the running platform's.
        let redis = Redis::connect(&self.redis_url, CALL_TIMEOUT_DEFAULT).unwrap();
        Arc::new(RedisBalanceCache::namespaced(redis, &self.db.name).expect("test database names are plain"))
    }

    pub fn event_log(&self) -> Arc<KafkaEventLog> {
        Arc::new(KafkaEventLog::new(&self.brokers).unwrap())
    }

    /// Opens an account with an opening balance (money enters only that way).
    pub async fn open(&self, owner: &str, currency: &str, opening: &str) -> AccountId {
        let id = Uuid::new_v4();
        sqlx::query(
            "INSERT INTO accounts.accounts (account_id, owner, currency, balance, opening_balance) \
             VALUES ($1, $2, $3, $4, $4)",
        )
        .bind(id)
        .bind(owner)
        .bind(currency)
        .bind(dec(opening))
        .execute(&self.db.pool)
        .await
        .unwrap();
        AccountId::from_uuid(id)
    }

    pub async fn balance(&self, id: AccountId) -> Decimal {
        sqlx::query_scalar("SELECT balance FROM accounts.accounts WHERE account_id = $1")
            .bind(id.as_uuid())
            .fetch_one(&self.db.pool)
            .await
            .unwrap()
    }

    /// Per currency: (sum of balances, sum of opening balances).
    pub async fn sums(&self) -> BTreeMap<String, (Decimal, Decimal)> {
        let rows = sqlx::query(
            "SELECT currency, sum(balance) AS b, sum(opening_balance) AS o FROM accounts.accounts GROUP BY currency",
        )
        .fetch_all(&self.db.pool)
        .await
        .unwrap();
        rows.iter()
            .map(|r| (r.get::<String, _>("currency"), (r.get::<Decimal, _>("b"), r.get::<Decimal, _>("o"))))
            .collect()
    }

    pub async fn count(&self, sql: &str) -> i64 {
        sqlx::query_scalar(sql).fetch_one(&self.db.pool).await.unwrap()
    }

    pub async fn processed(&self) -> i64 {
        self.count("SELECT count(*) FROM accounts.processed_events").await
    }

    /// Every outcome event in the account outbox, decoded, in commit order.
    pub async fn outbox(&self) -> Vec<PaymentSettled> {
        let rows = sqlx::query("SELECT topic, payload FROM accounts.outbox ORDER BY id")
            .fetch_all(&self.db.pool)
            .await
            .unwrap();
        rows.iter()
            .map(|r| {
                let topic: String = r.get("topic");
                let payload: Vec<u8> = r.get("payload");
                securepay_proto::convert::decode_settled(&topic, &payload, AmountPolicy { maximum: Decimal::MAX })
                    .expect("outbox payload decodes")
            })
            .collect()
    }

    /// Checks the ledger's invariants: per currency the balances sum to the opening balances; no
    /// balance is negative; every balance is its opening balance plus credits minus debits; every
    /// completed settlement has exactly one debit and one credit, every failed one none.
    pub async fn assert_books_balance(&self) {
        for (currency, (sum, opening)) in self.sums().await {
            assert_eq!(sum, opening, "conservation in {currency}");
        }
        let negative = self.count("SELECT count(*) FROM accounts.accounts WHERE balance < 0").await;
        assert_eq!(negative, 0, "no negative balance");
        let inconsistent = self
            .count(
                "SELECT count(*) FROM accounts.accounts a WHERE a.balance <> a.opening_balance \
                 + coalesce((SELECT sum(amount) FROM accounts.ledger_entries e WHERE e.account_id = a.account_id AND direction = 'CREDIT'), 0) \
                 - coalesce((SELECT sum(amount) FROM accounts.ledger_entries e WHERE e.account_id = a.account_id AND direction = 'DEBIT'), 0)",
            )
            .await;
        assert_eq!(inconsistent, 0, "every balance = opening + credits - debits");
        let completed = self.count("SELECT count(*) FROM accounts.processed_events WHERE outcome = 'COMPLETED'").await;
        let entries = self.count("SELECT count(*) FROM accounts.ledger_entries").await;
        assert_eq!(entries, 2 * completed, "two ledger rows per completed settlement, none otherwise");
        let failed_with_entries = self
            .count(
                "SELECT count(*) FROM accounts.processed_events p WHERE outcome = 'FAILED' \
                 AND EXISTS (SELECT 1 FROM accounts.ledger_entries e WHERE e.payment_id = p.payment_id)",
            )
            .await;
        assert_eq!(failed_with_entries, 0, "a failed settlement moves nothing");
    }
}

pub fn dec(text: &str) -> Decimal {
    Decimal::from_str(text).unwrap()
}

/// A fresh name for this test (topics, groups).
pub fn fresh(prefix: &str) -> String {
    format!("{prefix}.{}", Uuid::new_v4().simple())
}

pub async fn create_topics(brokers: &str, topics: &[&str]) {
    let admin: AdminClient<DefaultClientContext> =
        ClientConfig::new().set("bootstrap.servers", brokers).create().expect("admin client");
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let new: Vec<NewTopic<'_>> =
        topics.iter().map(|t| NewTopic::new(t, PARTITIONS, TopicReplication::Fixed(1))).collect();
    let created = admin.create_topics(&new, &options).await.expect("create_topics");
    assert!(created.iter().all(Result::is_ok), "{created:?}");
}

/// A `payment.initiated` event as the payment service writes it.
pub struct Payment {
    pub event_id: EventId,
    pub payment_id: PaymentId,
    pub from: AccountId,
    pub to: AccountId,
    pub amount: Amount,
    pub subject: Subject,
}

impl Payment {
    pub fn new(from: AccountId, to: AccountId, amount: &str, currency: &str, subject: &str) -> Payment {
        let currency = Currency::from_code(currency).unwrap();
        Payment {
            event_id: EventId::from_uuid(Uuid::new_v4()),
            payment_id: PaymentId::from_uuid(Uuid::new_v4()),
            from,
            to,
            amount: Amount::parse(amount, currency, AmountPolicy::default()).unwrap(),
            subject: Subject::parse(subject).unwrap(),
        }
    }

    pub fn payload(&self) -> Vec<u8> {
        securepay_proto::convert::encode_initiated(&PaymentInitiated {
            event_id: self.event_id,
            payment_id: self.payment_id,
            subject: self.subject.clone(),
            from: self.from,
            to: self.to,
            amount: self.amount,
            occurred_at: OffsetDateTime::now_utc(),
        })
    }

    pub fn record(&self, topic: &str) -> OutgoingRecord {
        OutgoingRecord {
            topic: topic.to_owned(),
            key: self.payment_id.to_string(),
            payload: self.payload(),
            headers: vec![(
                "traceparent".to_owned(),
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".to_owned(),
            )],
        }
    }
}

/// Waits until `done` holds, at most `within`; fails with `what` otherwise.
pub async fn wait_until<F, Fut>(within: Duration, what: &str, mut done: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    while !done().await {
        assert!(Instant::now() < deadline, "not within {within:?}: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Consumes `topics` with a fresh group until `count` records arrived (bounded).
pub async fn consume(brokers: &str, topics: &[&str], count: usize, within: Duration) -> Vec<ConsumedRecord> {
    let mut consumer = KafkaConsumer::new(brokers, &fresh("reader"), topics).unwrap();
    let deadline = Instant::now() + within;
    let mut out = Vec::new();
    while out.len() < count {
        assert!(Instant::now() < deadline, "only {} of {count} records on {topics:?} within {within:?}", out.len());
        out.extend(consumer.poll(count - out.len(), Duration::from_millis(500)).await.unwrap());
    }
    out
}

pub fn header<'a>(record: &'a ConsumedRecord, name: &str) -> Option<&'a str> {
    record.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}
