//! `securepay-notification`: the notification service's process (SPEC §2).
//!
//! Wires the real adapters into the library: `PgNotificationStore` (role `notification_service`,
//! `SECUREPAY_PG_ADDR` / `SECUREPAY_PG_DATABASE` / `SECUREPAY_SECRETS_DIR`), a `KafkaConsumer` in
//! `notification-service-group` on the three payment topics (`SECUREPAY_KAFKA_BROKERS`), the
//! `notification.v1` gRPC query over mTLS only (`SECUREPAY_LISTEN_ADDR`, default 127.0.0.1:50052;
//! only the API gateway may call it — clients read notifications through the gateway) and the admin
//! HTTP listener (`SECUREPAY_ADMIN_ADDR`, default 127.0.0.1:8083: `/health`, `/ready` — PostgreSQL
//! answers a query and the Kafka brokers a metadata request — and `/metrics`; no data). Without an
//! SVID (`SPIFFE_ENDPOINT_SOCKET`, the SPIRE agent's Workload API) within 30 s it does not start:
//! it fails closed. JSON logs; the `identity` subcommand; SIGINT/SIGTERM stop the listeners, let
//! the consumer finish and commit its batch, then exit.
//!
//! Also read: `SECUREPAY_AMOUNT_MAX` (largest valid amount of an event, default `1000000`, as the
//! payment service) and `SECUREPAY_KAFKA_NAME_SUFFIX`: TESTS ONLY, appended to the three topics and
//! to the consumer group (as the payment and account services do), so a test can run the binaries
//! against a shared broker without touching the production names.

#[cfg(madsim)]
fn main() {}

#[cfg(not(madsim))]
#[tokio::main]
async fn main() -> anyhow::Result<()> {
    real::main().await
}

#[cfg(not(madsim))]
mod real {
    use std::sync::Arc;

    use anyhow::{Context as _, anyhow, bail};
    use securepay_core::identity::ServiceIdentity;
    use securepay_core::money::{AmountPolicy, parse_decimal_text};
    use securepay_identity::x509::WorkloadIdentity;
    use securepay_kafka::{KafkaConsumer, KafkaEventLog};
    use securepay_notification::{ConsumerConfig, NotificationGrpc, Topics, metrics, run_consumer};
    use securepay_ports::{Clock, SystemClock};
    use securepay_postgres::PgNotificationStore;
    use securepay_proto::notification::v1::notification_service_server::NotificationServiceServer;
    use securepay_runtime::ReadyCheck;

    const DEFAULT_LISTEN_ADDR: &str = "127.0.0.1:50052";
    const DEFAULT_ADMIN_ADDR: &str = "127.0.0.1:8083";
    /// Connections of the store's pool: the consumer writes one at a time, the query reads.
    const PG_CONNECTIONS_MAX: u32 = 8;
    /// A gRPC call that takes longer is answered DEADLINE_EXCEEDED.
    const GRPC_REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

    /// How long the readiness check waits for the brokers' metadata.
    const KAFKA_READY_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(1500);
    const AMOUNT_MAX_ENV: &str = "SECUREPAY_AMOUNT_MAX";
    const NAME_SUFFIX_ENV: &str = "SECUREPAY_KAFKA_NAME_SUFFIX";
    const NAME_SUFFIX_LEN_MAX: usize = 64;

    fn amount_policy() -> anyhow::Result<AmountPolicy> {
        let Ok(text) = std::env::var(AMOUNT_MAX_ENV) else { return Ok(AmountPolicy::default()) };
        let maximum = parse_decimal_text(&text)
            .ok()
            .filter(|m| !m.is_zero())
            .ok_or_else(|| anyhow!("{AMOUNT_MAX_ENV} must be a positive decimal like 1000000, not {text:?}"))?;
        Ok(AmountPolicy { maximum })
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

    /// Production's consumer configuration, with the test-only name suffix applied.
    fn consumer_config() -> anyhow::Result<ConsumerConfig> {
        let suffix = name_suffix()?;
        let production = ConsumerConfig::default();
        if !suffix.is_empty() {
            tracing::warn!(
                service = metrics::SERVICE,
                suffix,
                "TESTS ONLY: {NAME_SUFFIX_ENV} renames every topic and the consumer group"
            );
        }
        let t = &production.topics;
        Ok(ConsumerConfig {
            topics: Topics {
                initiated: format!("{}{suffix}", t.initiated),
                completed: format!("{}{suffix}", t.completed),
                failed: format!("{}{suffix}", t.failed),
            },
            group: format!("{}{suffix}", production.group),
            amount_policy: amount_policy()?,
            ..production
        })
    }

    pub async fn main() -> anyhow::Result<()> {
        securepay_runtime::exit_if_identity_subcommand().await;
        // JSON logs, plus OTLP trace export when OTEL_EXPORTER_OTLP_ENDPOINT is set; flushed on drop.
        let _telemetry = securepay_runtime::init_telemetry("notification-service")?;
        tracing::info!(service = metrics::SERVICE, version = env!("CARGO_PKG_VERSION"), "starting");
        let metrics_handle = securepay_runtime::install_metrics()?;
        metrics::register_known_series();

        let listen = securepay_runtime::addr_from_env("SECUREPAY_LISTEN_ADDR", DEFAULT_LISTEN_ADDR)?;
        let admin = securepay_runtime::addr_from_env("SECUREPAY_ADMIN_ADDR", DEFAULT_ADMIN_ADDR)?;
        let brokers = securepay_runtime::required_env("SECUREPAY_KAFKA_BROKERS")?;
        let pg_options = securepay_postgres::service_options_from_env("notification_service")?;
        let config = consumer_config()?;
        // Fail closed: no SVID, no service (the error names the agent and the SPIFFE ID).
        let identity = WorkloadIdentity::from_env(ServiceIdentity::NotificationService).await?;
        tracing::info!(spiffe_id = ServiceIdentity::NotificationService.spiffe_id(), "SVID obtained");
        let store = PgNotificationStore::connect(pg_options, PG_CONNECTIONS_MAX)
            .await
            .context("cannot connect to PostgreSQL as notification_service")?;
        let store = Arc::new(store);
        let mut consumer = KafkaConsumer::new(&brokers, &config.group, &config.topics.all())
            .context("cannot create the Kafka consumer")?;

        // Readiness asks the brokers for metadata, as the account service does.
        let kafka = KafkaEventLog::new(&brokers).context("cannot create the Kafka client")?;
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let until_stopped = {
            let stopped = stopped.clone();
            move || {
                let mut stopped = stopped.clone();
                async move {
                    let _ = stopped.wait_for(|stop| *stop).await;
                }
            }
        };
        tokio::spawn(async move {
            if let Err(error) = securepay_runtime::shutdown_signal().await {
                tracing::error!(%error, "cannot wait for shutdown signals; stopping");
            }
            tracing::info!("shutdown requested: finishing the current batch");
            let _ = stop.send(true);
        });
        let consumer_task = {
            let store = Arc::clone(&store);
            tokio::spawn(async move {
                run_consumer(&*store, &mut consumer, &SystemClock, &config, stopped).await;
            })
        };

        let checks = vec![
            ReadyCheck::new("postgresql", {
                let store = Arc::clone(&store);
                move || {
                    let store = Arc::clone(&store);
                    async move { store.ping().await }
                }
            }),
            ReadyCheck::new("kafka", move || {
                let kafka = kafka.clone();
                async move { kafka.reachable(KAFKA_READY_TIMEOUT).await }
            }),
        ];
        let admin_listener = tokio::net::TcpListener::bind(admin)
            .await
            .with_context(|| format!("cannot listen on SECUREPAY_ADMIN_ADDR {admin}: is the port free?"))?;
        drop(admin_listener); // checked early for a clear message; `serve` binds it again
        let admin_task = tokio::spawn(securepay_runtime::admin::serve(admin, metrics_handle, checks, until_stopped()));

        let grpc_listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("cannot listen on SECUREPAY_LISTEN_ADDR {listen}: is the port free?"))?;
        let clock: Arc<dyn Clock> = Arc::new(SystemClock);
        let service = NotificationGrpc::new(Arc::clone(&store), clock);
        let grpc_stopped = until_stopped();
        let grpc_task = tokio::spawn(async move {
            let server = tonic::transport::Server::builder().timeout(GRPC_REQUEST_TIMEOUT);
            let routes = tonic::service::Routes::new(NotificationServiceServer::new(service));
            securepay_identity::grpc::serve(server, routes, grpc_listener, &identity, grpc_stopped).await
        });
        tracing::info!(%listen, "gRPC notification.v1 listening (mTLS)");

        consumer_task.await.context("consumer task failed")?;
        grpc_task.await.context("gRPC task failed")?.map_err(|e| anyhow!("gRPC server failed: {e}"))?;
        admin_task.await.context("admin task failed")?.context("admin HTTP failed")?;
        tracing::info!(service = metrics::SERVICE, "stopped");
        Ok(())
    }
}
