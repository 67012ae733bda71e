//! What every SecurePay service binary does the same way, written once: the `identity` subcommand,
//! structured JSON logs, and waiting for a shutdown signal. Tracing export (OTLP) joins it here.
//!
//! Architecture invariant: process plumbing only — no service logic, no ports. Real mode only.

pub mod admin;

pub use admin::{ReadyCheck, install_metrics};

/// `securepay-<service> identity`: prints this process's SVID as one JSON line and exits; exits
/// non-zero when the SPIRE agent issues none (the runner and the proof tests use it). Returns
/// when the process was started without the subcommand.
pub async fn exit_if_identity_subcommand() {
    if std::env::args().nth(1).as_deref() == Some(securepay_identity::IDENTITY_SUBCOMMAND) {
        std::process::exit(securepay_identity::identity_command().await);
    }
}

/// JSON logs on stdout, filtered by `RUST_LOG` (default `info`).
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt().json().with_env_filter(filter).init();
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
