//! securepay-payment: see ARCHITECTURE.md for its role. The service logic grows with its issue; this
//! shell already starts, logs structured JSON and shuts down cleanly on SIGINT/SIGTERM.

#[tokio::main]
async fn main() -> anyhow::Result<()> {
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
