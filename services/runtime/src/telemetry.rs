//! Logs and traces of a service binary (SPEC §8), installed once by [`init_telemetry`]:
//!
//! - JSON log lines on stdout, filtered by `RUST_LOG` (default `info`). A line emitted inside a
//!   span starts with the top-level fields `trace_id` and `span_id` of that span's OpenTelemetry
//!   context, so a log line leads to its trace in Jaeger.
//! - Every `tracing` span becomes an OpenTelemetry span (`tracing-opentelemetry`), exported in
//!   batches over OTLP/gRPC when `OTEL_EXPORTER_OTLP_ENDPOINT` (or
//!   `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set; the other standard `OTEL_EXPORTER_OTLP_*`
//!   variables (timeout, headers, compression) apply. The resource's `service.name` is the
//!   service's name. Without an endpoint nothing is exported, but spans still get ids, so logs
//!   carry trace ids and incoming trace context is passed on.
//! - The W3C TraceContext propagator as the process-wide propagator, which
//!   `securepay_kit::trace` uses to carry context over gRPC, HTTP and Kafka headers.
//!
//! [`log_and_trace_layers`] builds the same layers with any writer and tracer provider, so tests
//! check exactly what the binaries install.

use std::time::Duration;

use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing::Subscriber;
use tracing_subscriber::Layer;
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::fmt::format::{self, FormatEvent, FormatFields, Writer};
use tracing_subscriber::fmt::{FmtContext, MakeWriter};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;

/// How long dropping a [`TelemetryGuard`] may wait for the last spans to be exported.
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);

/// The instrumentation scope name of the services' spans.
const SCOPE: &str = "securepay";

/// Keeps the tracer provider of [`init_telemetry`] alive; dropping it exports the spans still
/// buffered and shuts the exporter down (bounded by [`SHUTDOWN_TIMEOUT`]). Keep it in `main`
/// until the service has drained.
#[must_use = "dropping the guard stops trace export"]
pub struct TelemetryGuard {
    provider: SdkTracerProvider,
}

impl TelemetryGuard {
    /// The provider spans are exported through (e.g. to flush in a test).
    pub fn provider(&self) -> &SdkTracerProvider {
        &self.provider
    }
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Err(error) = self.provider.shutdown_with_timeout(SHUTDOWN_TIMEOUT) {
            // Logs still work: the subscriber outlives the provider.
            tracing::warn!(%error, "trace export did not shut down cleanly");
        }
    }
}

/// Installs JSON logs, OpenTelemetry spans (exported by OTLP when configured, see the module
/// docs) and the W3C propagator for the service `service` (e.g. `payment-service`), once per
/// process. Call it first thing inside the multi-threaded tokio runtime (`#[tokio::main]`): the
/// gRPC exporter runs on it. Fails when the OTLP configuration is invalid, when called outside
/// a tokio runtime, or when a global subscriber is already installed.
pub fn init_telemetry(service: &'static str) -> anyhow::Result<TelemetryGuard> {
    let exporter = if otlp_endpoint_configured() { Some(otlp_exporter(None)?) } else { None };
    let provider = tracer_provider(service, exporter);
    install_propagator();
    tracing_subscriber::registry()
        .with(env_filter())
        .with(log_and_trace_layers(&provider, std::io::stdout))
        .try_init()
        .map_err(|_| anyhow::anyhow!("a global tracing subscriber is already installed"))?;
    Ok(TelemetryGuard { provider })
}

/// True when the standard environment names an OTLP endpoint for traces.
fn otlp_endpoint_configured() -> bool {
    ["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT"]
        .iter()
        .any(|name| std::env::var(name).is_ok_and(|value| !value.trim().is_empty()))
}

/// An OTLP/gRPC span exporter to `endpoint` (e.g. `http://127.0.0.1:4317`), or to the endpoint of
/// the standard environment when `None`. Must be called inside a tokio runtime.
pub fn otlp_exporter(endpoint: Option<&str>) -> anyhow::Result<opentelemetry_otlp::SpanExporter> {
    if tokio::runtime::Handle::try_current().is_err() {
        anyhow::bail!("the OTLP exporter must be built inside the tokio runtime");
    }
    let mut builder = opentelemetry_otlp::SpanExporter::builder().with_tonic();
    if let Some(endpoint) = endpoint {
        builder = builder.with_endpoint(endpoint);
    }
    builder.build().map_err(|error| anyhow::anyhow!("OTLP exporter: {error}"))
}

/// A tracer provider whose spans carry the resource `service.name = service` and, given an
/// exporter, are exported by a batch processor (which runs on its own thread).
pub fn tracer_provider(service: &str, exporter: Option<opentelemetry_otlp::SpanExporter>) -> SdkTracerProvider {
    let resource = Resource::builder().with_service_name(service.to_owned()).build();
    let builder = SdkTracerProvider::builder().with_resource(resource);
    match exporter {
        Some(exporter) => builder.with_batch_exporter(exporter).build(),
        None => builder.build(),
    }
}

/// Makes W3C TraceContext (`traceparent`, `tracestate`) the process-wide propagator.
pub fn install_propagator() {
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
}

/// `RUST_LOG`, or `info` when unset or invalid.
pub fn env_filter() -> tracing_subscriber::EnvFilter {
    tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"))
}

/// The layers every service installs: JSON log lines (with `trace_id`/`span_id`) to `writer`, and
/// OpenTelemetry spans through `provider`. The spans of the exporter's own transport (h2, hyper,
/// tonic, tower) are not traced, so exporting never feeds itself.
pub fn log_and_trace_layers<S, W>(provider: &SdkTracerProvider, writer: W) -> impl Layer<S> + Send + Sync + 'static
where
    S: Subscriber + for<'span> LookupSpan<'span> + Send + Sync,
    W: for<'writer> MakeWriter<'writer> + Send + Sync + 'static,
{
    let transport = Targets::new()
        .with_default(LevelFilter::TRACE)
        .with_target("h2", LevelFilter::OFF)
        .with_target("hyper", LevelFilter::OFF)
        .with_target("hyper_util", LevelFilter::OFF)
        .with_target("tonic", LevelFilter::OFF)
        .with_target("tower", LevelFilter::OFF)
        .with_target("opentelemetry", LevelFilter::OFF)
        .with_target("opentelemetry_sdk", LevelFilter::OFF)
        .with_target("opentelemetry_otlp", LevelFilter::OFF);
    let spans = tracing_opentelemetry::layer().with_tracer(provider.tracer(SCOPE)).with_filter(transport);
    json_log_layer(writer).and_then(spans)
}

/// JSON logs only (no spans, no trace ids): [`crate::init_tracing`]'s layer.
pub(crate) fn json_log_layer<S, W>(writer: W) -> impl Layer<S> + Send + Sync + 'static
where
    S: Subscriber + for<'span> LookupSpan<'span>,
    W: for<'writer> MakeWriter<'writer> + Send + Sync + 'static,
{
    let json = format::format().json();
    tracing_subscriber::fmt::layer().json().event_format(WithTraceIds(json)).with_writer(writer)
}

/// A JSON event format that puts the current OpenTelemetry span's `trace_id` and `span_id` first.
/// The context is the one `tracing-opentelemetry` activates while a span is entered.
struct WithTraceIds<F>(F);

impl<S, N, F> FormatEvent<S, N> for WithTraceIds<F>
where
    S: Subscriber + for<'span> LookupSpan<'span>,
    N: for<'writer> FormatFields<'writer> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        let cx = opentelemetry::Context::current();
        let span = cx.span();
        let ids = span.span_context();
        if !ids.is_valid() {
            return self.0.format_event(ctx, writer, event);
        }
        let mut line = String::new();
        self.0.format_event(ctx, Writer::new(&mut line), event)?;
        match line.strip_prefix('{') {
            // Trace and span ids are hex, so they need no escaping.
            Some(rest) => {
                write!(writer, "{{\"trace_id\":\"{}\",\"span_id\":\"{}\",{rest}", ids.trace_id(), ids.span_id())
            }
            None => writer.write_str(&line),
        }
    }
}
