//! securepay-payment: see ARCHITECTURE.md for its role. The service logic grows with its issue; this
//! shell already starts, logs structured JSON and shuts down cleanly on SIGINT/SIGTERM.

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // `securepay-<service> identity`: print this process's SVID as one JSON line and exit; exits
    // non-zero when the SPIRE agent issues none (the runner and the proof tests use it).
    if std::env::args().nth(1).as_deref() == Some(securepay_identity::IDENTITY_SUBCOMMAND) {
        std::process::exit(securepay_identity::identity_command().await);
    }
    tracing_subscriber::fmt()
        .json()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    tracing::info!(service = "payment", version = env!("CARGO_PKG_VERSION"), "starting");
    shutdown_signal().await?;
    tracing::info!(service = "payment", "stopped");
    Ok(())
}

async fn shutdown_signal() -> std::io::Result<()> {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        result = tokio::signal::ctrl_c() => result,
        _ = terminate.recv() => Ok(()),
    }
}
