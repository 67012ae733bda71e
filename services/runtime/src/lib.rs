//! What every SecurePay service binary does the same way, written once: the `identity` subcommand,
//! structured JSON logs and OpenTelemetry trace export ([`telemetry`]), and waiting for a shutdown
//! signal.
//!
//! Architecture invariant: process plumbing only — no service logic, no ports. Real mode only.

pub mod admin;
pub mod telemetry;

pub use admin::{ReadyCheck, install_metrics};

/// Every service process allocates through mimalloc: under load glibc's malloc/free were 12 % of
/// the services' CPU samples (`perf`, README "Benchmark"), mostly small short-lived buffers of
/// requests, spans and records.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
pub use telemetry::{TelemetryGuard, init_telemetry};

/// `securepay-<service> identity`: prints this process's SVID as one JSON line and exits; exits
/// non-zero when the SPIRE agent issues none (the runner and the proof tests use it). Returns
/// when the process was started without the subcommand.
pub async fn exit_if_identity_subcommand() {
    if std::env::args().nth(1).as_deref() == Some(securepay_identity::IDENTITY_SUBCOMMAND) {
        std::process::exit(securepay_identity::identity_command().await);
    }
}

/// JSON logs on stdout, filtered by `RUST_LOG` (default `info`), without OpenTelemetry spans.
/// Services use [`init_telemetry`] instead, which adds trace ids to the logs and exports spans.
pub fn init_tracing() {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    tracing_subscriber::registry()
        .with(telemetry::env_filter())
        .with(telemetry::json_log_layer(std::io::stdout))
        .init();
}

/// Resolves on SIGINT or SIGTERM, so the service can drain and stop cleanly.
pub async fn shutdown_signal() -> std::io::Result<()> {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        result = tokio::signal::ctrl_c() => result,
        _ = terminate.recv() => Ok(()),
    }
}

/// A socket address from the environment variable `name`, or `default` when unset.
pub fn addr_from_env(name: &'static str, default: &str) -> anyhow::Result<std::net::SocketAddr> {
    let text = std::env::var(name).unwrap_or_else(|_| default.to_owned());
    text.parse().map_err(|_| anyhow::anyhow!("{name} must be an address like 127.0.0.1:8080, not {text:?}"))
}

/// A required environment variable, with an error naming it.
pub fn required_env(name: &'static str) -> anyhow::Result<String> {
    std::env::var(name).map_err(|_| anyhow::anyhow!("{name} is not set"))
}
