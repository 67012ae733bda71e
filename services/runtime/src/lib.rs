//! What every SecurePay service binary does the same way, written once: the `identity` subcommand,
//! structured JSON logs, and waiting for a shutdown signal. Tracing export (OTLP) joins it here.
//!
//! Architecture invariant: process plumbing only — no service logic, no ports.

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
