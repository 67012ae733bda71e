//! securepay-gateway: see ARCHITECTURE.md for its role. The service logic grows with its issue; this
//! shell already starts, answers the `identity` subcommand, logs structured JSON and shuts down
//! cleanly on SIGINT/SIGTERM.

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    securepay_runtime::exit_if_identity_subcommand().await;
    securepay_runtime::init_tracing();
    tracing::info!(service = "gateway", version = env!("CARGO_PKG_VERSION"), "starting");
    securepay_runtime::shutdown_signal().await?;
    tracing::info!(service = "gateway", "stopped");
    Ok(())
}
