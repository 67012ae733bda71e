//! securepay-payment: the payment service binary. Wires the real adapters (PostgreSQL, Redis,
//! Kafka, the account service over gRPC) to the `securepay_payment` library and runs, until
//! SIGINT/SIGTERM: the gRPC server (`payment.v1`), the outbox relay, the outcome consumer, the
//! idempotency purge and the admin HTTP listener (`/health`, `/ready`, `/metrics`).
//!
//! gRPC is mTLS only, both ways (`securepay_identity::grpc`): the server requires a client SVID
//! of the trust domain (handlers authorize per method), and the account service is dialled
//! accepting only its exact SPIFFE ID. Without this process's SVID (`SPIFFE_ENDPOINT_SOCKET`,
//! waited for at most 30 s) the service does not start: fail closed. Spans are exported when
//! `OTEL_EXPORTER_OTLP_ENDPOINT` is set (`securepay_runtime::init_telemetry`).
//!
//! Configuration (environment):
//! - `SECUREPAY_LISTEN_ADDR` (gRPC, default `127.0.0.1:8081`), `SECUREPAY_ADMIN_ADDR` (default
//!   `127.0.0.1:9181`);
//! - `SECUREPAY_ACCOUNT_ADDR` (`host:port` of the account service's gRPC);
//! - `SECUREPAY_PG_ADDR`, `SECUREPAY_PG_DATABASE`, `SECUREPAY_SECRETS_DIR` (role `payment_service`);
//! - `SECUREPAY_REDIS_URL`, `SECUREPAY_KAFKA_BROKERS`;
//! - `SECUREPAY_AMOUNT_MAX` (largest amount of one payment, default `1000000`);
//! - `SPIFFE_ENDPOINT_SOCKET` (the SPIRE agent's Workload API, `unix:///…/api.sock`);
//! - `SECUREPAY_KAFKA_NAME_SUFFIX`: TESTS ONLY. Appended to every topic this process consumes or
//!   publishes and to its consumer group (as the account service does), so a test can run both
//!   binaries against a shared broker without touching the production names;
//! - `SECUREPAY_FAILPOINT=crash_after_commit`: TESTS ONLY. Aborts the process right after a
//!   payment's database commit, before anything is published — the crash the outbox must survive.
//!   Unset in every deployment; any other value refuses to start.

#[cfg(madsim)]
fn main() {}

#[cfg(not(madsim))]
#[tokio::main]
async fn main() -> std::process::ExitCode {
    securepay_runtime::exit_if_identity_subcommand().await;
    // Held until the service stopped, so the last spans are exported.
    let _telemetry = match securepay_runtime::init_telemetry("payment-service") {
        Ok(guard) => guard,
        Err(error) => {
            eprintln!("securepay-payment: {error:#}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match real::run().await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(service = "payment", error = format!("{error:#}"), "payment service cannot run");
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(not(madsim))]
mod real {
    use std::sync::Arc;
    use std::time::Duration;

    use anyhow::{Context as _, anyhow, bail};
    use async_trait::async_trait;
    use securepay_core::identity::ServiceIdentity;
    use securepay_core::money::{AmountPolicy, parse_decimal_text};
    use securepay_core::topology::{consumer_group, topic};
    use securepay_identity::grpc;
    use securepay_identity::x509::WorkloadIdentity;
    use securepay_kafka::{KafkaConsumer, KafkaEventLog};
    use securepay_kit::relay::{RelayConfig, run_relay};
    use securepay_payment::{
        AccountClient, AccountClientConfig, ConsumerConfig, PaymentService, ServiceConfig, run_outcome_consumer,
    };
    use securepay_ports::{
        Clock, ConsumedRecord, EventConsumer, EventLog, Ids, OutgoingRecord, PortResult, RandomIds, SystemClock,
        TopicPartitionOffset,
    };
    use securepay_postgres::PgPaymentStore;
    use securepay_proto::payment::v1::payment_service_server::PaymentServiceServer;
    use securepay_redis::{CALL_TIMEOUT_DEFAULT, Redis, RedisIdempotencyStore};
    use securepay_runtime::ReadyCheck;
    use tokio::sync::watch;

    const SERVICE: &str = "payment";
    /// Pooled PostgreSQL connections: gRPC requests, relay, consumer, purge, readiness.
    const PG_CONNECTIONS_MAX: u32 = 16;
    const KAFKA_READY_TIMEOUT: Duration = Duration::from_millis(1500);
    /// How often idempotency records past their retention are purged.
    const PURGE_EVERY: Duration = Duration::from_secs(600);
    const NAME_SUFFIX_ENV: &str = "SECUREPAY_KAFKA_NAME_SUFFIX";
    const NAME_SUFFIX_LEN_MAX: usize = 64;
    const FAILPOINT_ENV: &str = "SECUREPAY_FAILPOINT";
    const AMOUNT_MAX_ENV: &str = "SECUREPAY_AMOUNT_MAX";
    /// Largest request message accepted (a payment request is well under 1 KiB).
    const REQUEST_LEN_MAX: usize = 16 * 1024;
    /// A gRPC call still running after this is cancelled (a duplicate waits at most 10 s for the
    /// first request with its key; the account client gives up after about 3 s).
    const GRPC_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

    /// TESTS ONLY (see the crate docs): publishes every record to `<topic><suffix>`.
    struct SuffixedTopics {
        inner: KafkaEventLog,
        suffix: String,
    }

    #[async_trait]
    impl EventLog for SuffixedTopics {
        async fn publish(&self, records: &[OutgoingRecord]) -> PortResult<()> {
            let renamed: Vec<OutgoingRecord> = records
                .iter()
                .map(|r| OutgoingRecord { topic: format!("{}{}", r.topic, self.suffix), ..r.clone() })
                .collect();
            self.inner.publish(&renamed).await
        }
    }

    /// TESTS ONLY: consumes `<topic><suffix>` and shows the records under their production topic
    /// names (the outcome decoder goes by topic), committing under the suffixed names.
    struct SuffixedConsumer {
        inner: KafkaConsumer,
        suffix: String,
    }

    #[async_trait]
    impl EventConsumer for SuffixedConsumer {
        async fn poll(&mut self, max_records: usize, wait: Duration) -> PortResult<Vec<ConsumedRecord>> {
            let mut records = self.inner.poll(max_records, wait).await?;
            for record in &mut records {
                if let Some(name) = record.position.topic.strip_suffix(self.suffix.as_str()) {
                    record.position.topic = name.to_owned();
                }
            }
            Ok(records)
        }

        async fn commit(&mut self, positions: &[TopicPartitionOffset]) -> PortResult<()> {
            let renamed: Vec<TopicPartitionOffset> = positions
                .iter()
                .map(|p| TopicPartitionOffset { topic: format!("{}{}", p.topic, self.suffix), ..p.clone() })
                .collect();
            self.inner.commit(&renamed).await
        }
    }

    fn name_suffix() -> anyhow::Result<String> {
        let suffix = std::env::var(NAME_SUFFIX_ENV).unwrap_or_default();
        let valid = suffix.len() <= NAME_SUFFIX_LEN_MAX
            && suffix.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if !valid {
            bail!("{NAME_SUFFIX_ENV} must be at most {NAME_SUFFIX_LEN_MAX} characters of [A-Za-z0-9._-]");
        }
        Ok(suffix)
    }

    fn crash_after_commit() -> anyhow::Result<bool> {
        match std::env::var(FAILPOINT_ENV).as_deref() {
            Err(_) | Ok("") => Ok(false),
            Ok("crash_after_commit") => Ok(true),
            Ok(other) => bail!("{FAILPOINT_ENV} knows only crash_after_commit (tests only), not {other:?}"),
        }
    }

    fn amount_policy() -> anyhow::Result<AmountPolicy> {
        let Ok(text) = std::env::var(AMOUNT_MAX_ENV) else { return Ok(AmountPolicy::default()) };
        let maximum = parse_decimal_text(&text)
            .ok()
            .filter(|m| !m.is_zero())
            .ok_or_else(|| anyhow!("{AMOUNT_MAX_ENV} must be a positive decimal like 1000000, not {text:?}"))?;
        Ok(AmountPolicy { maximum })
    }

    pub async fn run() -> anyhow::Result<()> {
        // Configuration first: every mistake is one line naming what to fix.
        let listen = securepay_runtime::addr_from_env("SECUREPAY_LISTEN_ADDR", "127.0.0.1:8081")?;
        let admin = securepay_runtime::addr_from_env("SECUREPAY_ADMIN_ADDR", "127.0.0.1:9181")?;
        let account_addr = securepay_runtime::required_env("SECUREPAY_ACCOUNT_ADDR")?;
        let pg_options = securepay_postgres::service_options_from_env("payment_service")?;
        let redis_url = securepay_runtime::required_env("SECUREPAY_REDIS_URL")?;
        let brokers = securepay_runtime::required_env("SECUREPAY_KAFKA_BROKERS")?;
        let suffix = name_suffix()?;
        let crash_after_commit = crash_after_commit()?;
        let amount_policy = amount_policy()?;

        tracing::info!(service = SERVICE, version = env!("CARGO_PKG_VERSION"), %listen, %admin, "starting");
        if !suffix.is_empty() {
            tracing::warn!(
                service = SERVICE,
                suffix,
                "TESTS ONLY: {NAME_SUFFIX_ENV} renames every topic and the consumer group"
            );
        }
        if crash_after_commit {
            tracing::warn!(
                service = SERVICE,
                "TESTS ONLY: {FAILPOINT_ENV}=crash_after_commit aborts after the next payment commit"
            );
        }

        // The recorder first: the identity exports its SVID's expiry as soon as it has one.
        let metrics = securepay_runtime::install_metrics().context("cannot install the metrics recorder")?;
        securepay_payment::metrics::register_known_series();

        // No SVID, no service: the identity error is the one line saying why.
        let identity = WorkloadIdentity::from_env(ServiceIdentity::PaymentService).await?;
        tracing::info!(service = SERVICE, spiffe_id = ServiceIdentity::PaymentService.spiffe_id(), "SVID obtained");

        let store = Arc::new(PgPaymentStore::connect(pg_options, PG_CONNECTIONS_MAX).await.map_err(|_| {
            anyhow!("cannot connect to PostgreSQL as payment_service: check SECUREPAY_PG_ADDR, SECUREPAY_PG_DATABASE and the password file in SECUREPAY_SECRETS_DIR")
        })?);
        let redis = Redis::connect(&redis_url, CALL_TIMEOUT_DEFAULT)
            .map_err(|_| anyhow!("SECUREPAY_REDIS_URL is not a usable Redis URL (redis://host:port)"))?;
        let fast = Arc::new(RedisIdempotencyStore::new(redis.clone()));
        let kafka = KafkaEventLog::new(&brokers)
            .map_err(|_| anyhow!("SECUREPAY_KAFKA_BROKERS is not a usable bootstrap list (host:port,...)"))?;
        let events: Arc<dyn EventLog> = if suffix.is_empty() {
            Arc::new(kafka.clone())
        } else {
            Arc::new(SuffixedTopics { inner: kafka.clone(), suffix: suffix.clone() })
        };
        let clock: Arc<dyn Clock> = Arc::new(SystemClock);
        let ids: Arc<dyn Ids> = Arc::new(RandomIds);
        let account_channel = grpc::channel(&account_addr, ServiceIdentity::AccountService, &identity)
            .map_err(|error| anyhow!("SECUREPAY_ACCOUNT_ADDR: {error}"))?;
        let accounts = Arc::new(AccountClient::new(account_channel, AccountClientConfig::default(), ids.clone()));
        let service = Arc::new(PaymentService::new(
            store.clone(),
            fast,
            accounts,
            clock.clone(),
            ids,
            ServiceConfig { amount_policy, crash_after_commit, ..ServiceConfig::default() },
        ));

        // One shutdown signal, watched by every task.
        let (stop_tx, stop_rx) = watch::channel(false);
        let stopped = move || {
            let mut rx = stop_rx.clone();
            async move {
                let _ = rx.wait_for(|stop| *stop).await;
            }
        };
        tokio::spawn(async move {
            if let Err(error) = securepay_runtime::shutdown_signal().await {
                tracing::error!(%error, "cannot listen for shutdown signals; stopping");
            }
            tracing::info!(service = SERVICE, "shutdown requested");
            let _ = stop_tx.send(true);
        });

        let checks = vec![
            ReadyCheck::new("postgresql", {
                let store = store.clone();
                move || {
                    let store = store.clone();
                    async move { store.ping().await.is_ok() }
                }
            }),
            ReadyCheck::new("redis", move || {
                let redis = redis.clone();
                async move { redis.ping().await.is_ok() }
            }),
            ReadyCheck::new("kafka", {
                let kafka = kafka.clone();
                move || {
                    let kafka = kafka.clone();
                    async move { kafka.reachable(KAFKA_READY_TIMEOUT).await }
                }
            }),
        ];
        let admin_listener = tokio::net::TcpListener::bind(admin)
            .await
            .map_err(|_| anyhow!("cannot listen on SECUREPAY_ADMIN_ADDR {admin}: is the port free?"))?;
        drop(admin_listener); // checked early for a clear message; `serve` binds it again
        let admin_task = tokio::spawn(securepay_runtime::admin::serve(admin, metrics, checks, stopped()));

        let grpc_listener = tokio::net::TcpListener::bind(listen)
            .await
            .map_err(|_| anyhow!("cannot listen on SECUREPAY_LISTEN_ADDR {listen}: is the port free?"))?;
        let routes = tonic::service::Routes::new(
            PaymentServiceServer::from_arc(service.clone()).max_decoding_message_size(REQUEST_LEN_MAX),
        );
        let grpc_task = {
            let server = tonic::transport::Server::builder().timeout(GRPC_REQUEST_TIMEOUT);
            let (identity, grpc_stopped) = (identity.clone(), stopped());
            tokio::spawn(async move { grpc::serve(server, routes, grpc_listener, &identity, grpc_stopped).await })
        };
        tracing::info!(%listen, "gRPC payment.v1 listening (mTLS)");

        let relay_task = tokio::spawn(run_relay(
            store.clone() as Arc<dyn securepay_ports::Outbox>,
            events,
            RelayConfig::new(SERVICE),
            stopped(),
        ));
        let purge_task = {
            let service = service.clone();
            let stop = stopped();
            tokio::spawn(async move { service.run_purge(PURGE_EVERY, stop).await })
        };

        let group = format!("{}{suffix}", consumer_group::PAYMENT_SERVICE);
        let topics: Vec<String> =
            [topic::PAYMENT_COMPLETED, topic::PAYMENT_FAILED].iter().map(|t| format!("{t}{suffix}")).collect();
        let topic_refs: Vec<&str> = topics.iter().map(String::as_str).collect();
        let consumer = KafkaConsumer::new(&brokers, &group, &topic_refs)
            .map_err(|_| anyhow!("cannot create the outcome consumer on SECUREPAY_KAFKA_BROKERS"))?;
        tracing::info!(?topics, group, "outcome consumer starting");
        let consumer = SuffixedConsumer { inner: consumer, suffix };
        let config = ConsumerConfig { amount_policy, ..ConsumerConfig::default() };
        run_outcome_consumer(store, consumer, clock, config, stopped()).await;

        tracing::info!(service = SERVICE, "consumer stopped; waiting for the relay and listeners");
        let _ = relay_task.await;
        let _ = purge_task.await;
        match grpc_task.await {
            Ok(Err(error)) => tracing::error!(%error, "gRPC server ended with an error"),
            Err(error) => tracing::error!(%error, "gRPC task panicked"),
            Ok(Ok(())) => {}
        }
        match admin_task.await {
            Ok(Err(error)) => tracing::error!(error = format!("{error:#}"), "admin listener ended with an error"),
            Err(error) => tracing::error!(%error, "admin task panicked"),
            Ok(Ok(())) => {}
        }
        tracing::info!(service = SERVICE, "stopped");
        Ok(())
    }
}
