//! securepay-gateway: the public HTTP edge (see the library docs and ARCHITECTURE.md).
//!
//! Subcommands: (none) or `serve` runs the gateway; `dev-keys --dir D` creates the development
//! signing key and JWKS; `token --key PEM --sub alice [--scope ..] [--ttl ..]` mints a development
//! token; `openapi` prints the OpenAPI document; `identity` prints this process's SVID.
//!
//! Serving calls the payment, account and notification services over mTLS only, with the gateway's X.509-SVID
//! (`spiffe://securepay.dev/api-gateway`) from the SPIRE agent; without one within 30 s the gateway
//! does not start (one line on stderr, exit status 1): it fails closed.
//!
//! Environment (serve): `SPIFFE_ENDPOINT_SOCKET` (required: the SPIRE agent's Workload API,
//! `unix:///path/api.sock`), `SECUREPAY_LISTEN_ADDR` (default 127.0.0.1:8080), `SECUREPAY_PAYMENT_ADDR`,
//! `SECUREPAY_ACCOUNT_ADDR` and `SECUREPAY_NOTIFICATION_ADDR` (host:port, required), `SECUREPAY_JWKS_PATH` (required),
//! `SECUREPAY_JWT_ISSUER` (default https://auth.securepay.dev), `SECUREPAY_JWT_AUDIENCE` (default
//! securepay-api), `SECUREPAY_RATE_LIMIT_IP_PER_S`/`_IP_BURST` (50/100),
//! `SECUREPAY_RATE_LIMIT_SUBJECT_PER_S`/`_SUBJECT_BURST` (10/20), `SECUREPAY_REQUEST_TIMEOUT_MS`
//! (10000), `RUST_LOG`, `OTEL_EXPORTER_OTLP_ENDPOINT` (optional: OTLP/gRPC trace export). The
//! `token` subcommand reads the issuer and audience variables too.
//! Demo subjects with seeded accounts: alice, bob, carol.

#[cfg(madsim)]
fn main() {}

#[cfg(not(madsim))]
mod real {
    use std::net::SocketAddr;
    use std::path::PathBuf;
    use std::time::Duration;

    use clap::{Parser, Subcommand};
    use securepay_core::identity::ServiceIdentity;
    use securepay_gateway::config::{JwtConfig, ProcessConfig};
    use securepay_gateway::{AppState, Authenticator, Backends, GatewayConfig, api, devkeys};
    use securepay_identity::x509::WorkloadIdentity;

    #[derive(Parser)]
    #[command(name = "securepay-gateway", about = "SecurePay public API gateway")]
    struct Cli {
        #[command(subcommand)]
        command: Option<Command>,
    }

    #[derive(Subcommand)]
    enum Command {
        /// Run the gateway (the default).
        Serve,
        /// Create (if missing) the development ES256 key pair: DIR/jwt-dev-key.pem and DIR/jwks.json.
        DevKeys {
            #[arg(long)]
            dir: PathBuf,
        },
        /// Print a development token signed with the dev key (iss/aud from SECUREPAY_JWT_ISSUER/_AUDIENCE).
        Token {
            #[arg(long)]
            key: PathBuf,
            #[arg(long)]
            sub: String,
            #[arg(long, default_value = "payments:read payments:write")]
            scope: String,
            /// Lifetime in seconds.
            #[arg(long, default_value_t = 3600)]
            ttl: i64,
        },
        /// Print the OpenAPI document (what services/gateway/openapi.json must contain).
        Openapi,
    }

    pub async fn main() -> anyhow::Result<()> {
        securepay_runtime::exit_if_identity_subcommand().await;
        match Cli::parse().command.unwrap_or(Command::Serve) {
            Command::DevKeys { dir } => {
                let (key, jwks) = devkeys::ensure_dev_keys(&dir)?;
                println!("{}\n{}", key.display(), jwks.display());
                Ok(())
            }
            Command::Token { key, sub, scope, ttl } => {
                anyhow::ensure!(ttl > 0, "--ttl must be positive");
                let jwt = GatewayConfig::from_env()?.jwt;
                let secret = devkeys::load_key(&key)?;
                println!("{}", devkeys::mint_token(&secret, &jwt, &sub, &scope, ttl)?);
                Ok(())
            }
            Command::Openapi => {
                print!("{}", api::openapi_json());
                Ok(())
            }
            Command::Serve => serve().await,
        }
    }

    async fn serve() -> anyhow::Result<()> {
        // JSON logs with trace ids, plus OTLP trace export when OTEL_EXPORTER_OTLP_ENDPOINT is set.
        // Held until serve returns, so the last spans are flushed after the requests drained. A
        // start-up error below is returned to `main`, which prints it as one line on stderr.
        let _telemetry = securepay_runtime::init_telemetry("api-gateway")?;
        let config = ProcessConfig::from_env()?;
        let jwt: JwtConfig = config.gateway.jwt.clone();
        let auth = Authenticator::from_jwks_file(&config.jwks_path, jwt)?;
        // Before the SVID is fetched, so its first expiry reading is exported.
        let metrics = securepay_runtime::install_metrics()?;
        securepay_gateway::register_known_series();
        // Fail closed: no SVID, no gateway (the error names the agent and the SPIFFE ID).
        let identity = WorkloadIdentity::from_env(ServiceIdentity::ApiGateway).await?;
        tracing::info!(service = "gateway", spiffe_id = ServiceIdentity::ApiGateway.spiffe_id(), "SVID obtained");
        let backends = Backends::connect(&config.backends, &identity)?;
        let state = AppState::new(config.gateway.clone(), auth, backends, Some(metrics));

        let janitor_state = state.clone();
        let janitor = tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(60)).await;
                janitor_state.limits.forget_idle();
            }
        });

        let listener = tokio::net::TcpListener::bind(config.listen_addr).await?;
        tracing::info!(service = "gateway", addr = %config.listen_addr, version = env!("CARGO_PKG_VERSION"), "listening");
        let app = securepay_gateway::router(state).into_make_service_with_connect_info::<SocketAddr>();
        axum::serve(listener, app)
            .with_graceful_shutdown(async {
                if let Err(error) = securepay_runtime::shutdown_signal().await {
                    tracing::error!(%error, "cannot wait for a shutdown signal");
                }
                tracing::info!(service = "gateway", "shutting down: draining requests in flight");
            })
            .await?;
        janitor.abort();
        tracing::info!(service = "gateway", "stopped");
        Ok(())
    }
}

#[cfg(not(madsim))]
#[tokio::main]
async fn main() -> std::process::ExitCode {
    match real::main().await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("securepay-gateway: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
