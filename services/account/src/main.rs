//! securepay-account: the account service binary. Wires the real adapters (PostgreSQL, Redis,
//! Kafka) to the service logic of the `securepay_account` library and runs, until SIGINT/SIGTERM:
//! the gRPC server (`account.v1`), the settlement consumer, the account outbox relay and the admin
//! HTTP listener (`/health`, `/ready`, `/metrics`).
//!
//! gRPC is served over mTLS only (`securepay_identity::grpc::serve`) with this process's
//! X.509-SVID `spiffe://securepay.dev/account-service` from the SPIRE agent: a client must present
//! an SVID of the trust domain, and the handlers authorize each call by that verified peer. There
//! is no plaintext mode. Without an SVID within 30 s the service does not start (one line naming
//! the cause, exit status 1): it fails closed.
//!
//! Logs are JSON on stdout with trace ids; spans are exported over OTLP when
//! `OTEL_EXPORTER_OTLP_ENDPOINT` is set (`securepay_runtime::init_telemetry`).
//!
//! Configuration (environment):
//! - `SECUREPAY_LISTEN_ADDR` (gRPC, default `127.0.0.1:50051`), `SECUREPAY_ADMIN_ADDR` (default
//!   `127.0.0.1:9151`);
//! - `SECUREPAY_PG_ADDR`, `SECUREPAY_PG_DATABASE`, `SECUREPAY_SECRETS_DIR` (role `account_service`);
//! - `SECUREPAY_REDIS_URL`, `SECUREPAY_KAFKA_BROKERS`;
//! - `SECUREPAY_SETTLE_BATCH_LEN` (events per settlement transaction, default 64, at most 256);
//! - `SPIFFE_ENDPOINT_SOCKET` (required): the SPIRE agent's Workload API, `unix:///path/api.sock`;
//! - `OTEL_EXPORTER_OTLP_ENDPOINT` (optional), `RUST_LOG` (default `info`);
//! - `SECUREPAY_KAFKA_NAME_SUFFIX`: TESTS ONLY. Appended to every topic this process consumes or
//!   publishes and to its consumer group, so a test can run the binary against a shared broker
//!   without touching the production names. Unset in every deployment.

#[cfg(madsim)]
fn main() {}

#[cfg(not(madsim))]
#[tokio::main]
async fn main() -> std::process::ExitCode {
    securepay_runtime::exit_if_identity_subcommand().await;
    // Held until the service stopped, so the last spans are exported.
    let _telemetry = match securepay_runtime::init_telemetry("account-service") {
        Ok(guard) => guard,
        Err(error) => {
            eprintln!("securepay-account: {error:#}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match real::run().await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(service = "account", error = format!("{error:#}"), "account service cannot run");
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(not(madsim))]
mod real {
    use std::future::Future;
    use std::sync::Arc;
    use std::time::Duration;

    use anyhow::{Context as _, anyhow, bail};
    use async_trait::async_trait;
    use securepay_account::{AccountGrpc, SettlementConfig, Settler, run_settlement};
    use securepay_core::identity::ServiceIdentity;
    use securepay_core::topology::{consumer_group, topic};
    use securepay_identity::x509::WorkloadIdentity;
    use securepay_kafka::{KafkaConsumer, KafkaEventLog};
    use securepay_kit::relay::{RelayConfig, run_relay};
    use securepay_ports::{Clock, EventLog, OutgoingRecord, PortResult, RandomIds, SystemClock};
    use securepay_postgres::PgLedgerStore;
    use securepay_proto::account::v1::account_service_server::AccountServiceServer;
    use securepay_redis::{CALL_TIMEOUT_DEFAULT, Redis, RedisBalanceCache};
    use securepay_runtime::ReadyCheck;
    use tokio::sync::watch;

    const SERVICE: &str = securepay_account::SERVICE;
    /// Pooled PostgreSQL connections: gRPC reads, settlement, relay, readiness.
    const PG_CONNECTIONS_MAX: u32 = 16;
    /// Longest a gRPC call may take before it is answered `CANCELLED` (a stuck dependency must not
    /// pile up requests).
    const GRPC_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
    /// How long a readiness check of Kafka may wait for metadata.
    const KAFKA_READY_TIMEOUT: Duration = Duration::from_millis(1500);
    const NAME_SUFFIX_ENV: &str = "SECUREPAY_KAFKA_NAME_SUFFIX";
    const NAME_SUFFIX_LEN_MAX: usize = 64;
    const BATCH_LEN_ENV: &str = "SECUREPAY_SETTLE_BATCH_LEN";
    const BATCH_LEN_DEFAULT: usize = 64;

    /// TESTS ONLY (see the crate docs): publishes every record to `<topic><suffix>`.
    struct SuffixedTopics {
        inner: Arc<dyn EventLog>,
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

    fn name_suffix() -> anyhow::Result<String> {
        let suffix = std::env::var(NAME_SUFFIX_ENV).unwrap_or_default();
        let valid = suffix.len() <= NAME_SUFFIX_LEN_MAX
            && suffix.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if !valid {
            bail!("{NAME_SUFFIX_ENV} must be at most {NAME_SUFFIX_LEN_MAX} characters of [A-Za-z0-9._-]");
        }
        Ok(suffix)
    }

    fn batch_len() -> anyhow::Result<usize> {
        let Ok(text) = std::env::var(BATCH_LEN_ENV) else { return Ok(BATCH_LEN_DEFAULT) };
        let max = securepay_ports::ledger::SETTLE_BATCH_LEN_MAX;
        text.parse::<usize>()
            .ok()
            .filter(|n| (1..=max).contains(n))
            .ok_or_else(|| anyhow!("{BATCH_LEN_ENV} must be a whole number from 1 to {max}, not {text:?}"))
    }

    pub async fn run() -> anyhow::Result<()> {
        // Configuration first: every mistake is one line naming what to fix.
        let listen = securepay_runtime::addr_from_env("SECUREPAY_LISTEN_ADDR", "127.0.0.1:50051")?;
        let admin = securepay_runtime::addr_from_env("SECUREPAY_ADMIN_ADDR", "127.0.0.1:9151")?;
        let pg_options = securepay_postgres::service_options_from_env("account_service")?;
        let redis_url = securepay_runtime::required_env("SECUREPAY_REDIS_URL")?;
        let brokers = securepay_runtime::required_env("SECUREPAY_KAFKA_BROKERS")?;
        let suffix = name_suffix()?;
        let batch_len = batch_len()?;

        tracing::info!(service = SERVICE, version = env!("CARGO_PKG_VERSION"), %listen, %admin, batch_len, "starting");
        // The recorder first: the identity exports its SVID's expiry as soon as it has one.
        let metrics = securepay_runtime::install_metrics().context("cannot install the metrics recorder")?;
        securepay_kit::metrics::register_known_series(SERVICE);
        securepay_account::metrics::register_known_series();

        // Fail closed: no SVID, no service (the error names the agent and the SPIFFE ID).
        let identity = WorkloadIdentity::from_env(ServiceIdentity::AccountService).await?;
        tracing::info!(service = SERVICE, spiffe_id = ServiceIdentity::AccountService.spiffe_id(), "SVID obtained");
        if !suffix.is_empty() {
            tracing::warn!(
                service = SERVICE,
                suffix,
                "TESTS ONLY: {NAME_SUFFIX_ENV} renames every topic and the consumer group"
            );
        }

        let ledger = Arc::new(PgLedgerStore::connect(pg_options, PG_CONNECTIONS_MAX).await.map_err(|_| {
            anyhow!("cannot connect to PostgreSQL as account_service: check SECUREPAY_PG_ADDR, SECUREPAY_PG_DATABASE and the password file in SECUREPAY_SECRETS_DIR")
        })?);
        let redis = Redis::connect(&redis_url, CALL_TIMEOUT_DEFAULT)
            .map_err(|_| anyhow!("SECUREPAY_REDIS_URL is not a usable Redis URL (redis://host:port)"))?;
        // Balances are cached per database, so platforms sharing a Redis never answer for each other.
        let database = std::env::var("SECUREPAY_PG_DATABASE").unwrap_or_default();
        let cache = Arc::new(
            RedisBalanceCache::namespaced(redis.clone(), &database)
                .ok_or_else(|| anyhow!("SECUREPAY_PG_DATABASE must be a plain database name ([a-z0-9_])"))?,
        );
        let kafka = KafkaEventLog::new(&brokers)
            .map_err(|_| anyhow!("SECUREPAY_KAFKA_BROKERS is not a usable bootstrap list (host:port,...)"))?;
        let events: Arc<dyn EventLog> = if suffix.is_empty() {
            Arc::new(kafka.clone())
        } else {
            Arc::new(SuffixedTopics { inner: Arc::new(kafka.clone()), suffix: suffix.clone() })
        };
        let clock: Arc<dyn Clock> = Arc::new(SystemClock);

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
            tracing::info!(service = SERVICE, "shutdown requested: finishing the round in progress");
            let _ = stop_tx.send(true);
        });

        let checks = vec![
            ReadyCheck::new("postgresql", {
                let ledger = Arc::clone(&ledger);
                move || {
                    let ledger = Arc::clone(&ledger);
                    async move { ledger.ping().await.is_ok() }
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
        let service = AccountGrpc::new(Arc::clone(&ledger), Arc::clone(&cache), Arc::clone(&clock));
        let grpc_stopped = stopped();
        let grpc = async move {
            let server = tonic::transport::Server::builder().timeout(GRPC_REQUEST_TIMEOUT);
            let routes = tonic::service::Routes::new(AccountServiceServer::new(service));
            securepay_identity::grpc::serve(server, routes, grpc_listener, &identity, grpc_stopped).await
        };
        tracing::info!(%listen, "gRPC account.v1 listening (mTLS)");
        let grpc_task = tokio::spawn(grpc);

        let relay_task = tokio::spawn(run_relay(
            Arc::clone(&ledger) as Arc<dyn securepay_ports::Outbox>,
            events,
            RelayConfig::new(SERVICE),
            stopped(),
        ));

        let settler = Settler {
            ledger,
            cache,
            // The dead-letter topic is named in full (suffix included) by the configuration.
            dlq: Arc::new(kafka.clone()),
            ids: Arc::new(RandomIds),
            clock,
            config: SettlementConfig {
                batch_len,
                ..SettlementConfig::new(format!("{}{suffix}", topic::PAYMENT_INITIATED_DLQ))
            },
        };
        let consumed = format!("{}{suffix}", topic::PAYMENT_INITIATED);
        let group = format!("{}{suffix}", consumer_group::ACCOUNT_SERVICE);
        tracing::info!(topic = consumed, group, "settlement consumer starting");
        let join = || KafkaConsumer::new(&brokers, &group, &[consumed.as_str()]);
        run_settlement(&settler, join, stopped()).await;

        // Settlement returned: shutdown was requested. Let the others finish theirs.
        tracing::info!(service = SERVICE, "settlement stopped; waiting for the relay and listeners");
        finish("relay", relay_task).await;
        finish("grpc", async { grpc_task.await.map(|r| r.map_err(|e| anyhow!(e))) }).await;
        finish("admin", admin_task).await;
        tracing::info!(service = SERVICE, "stopped");
        Ok(())
    }

    /// Awaits a task at shutdown, logging (not failing on) what went wrong.
    async fn finish<T: FinishOutcome>(
        name: &'static str,
        task: impl Future<Output = Result<T, tokio::task::JoinError>>,
    ) {
        match task.await {
            Ok(outcome) => outcome.log(name),
            Err(error) => tracing::error!(task = name, %error, "task panicked"),
        }
    }

    trait FinishOutcome {
        fn log(self, name: &'static str);
    }

    impl FinishOutcome for () {
        fn log(self, _name: &'static str) {}
    }

    impl FinishOutcome for anyhow::Result<()> {
        fn log(self, name: &'static str) {
            if let Err(error) = self {
                tracing::error!(task = name, error = format!("{error:#}"), "task ended with an error");
            }
        }
    }
}
