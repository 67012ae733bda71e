//! Logs and traces of a service binary (SPEC §8), installed once by [`init_telemetry`]:
//!
//! - JSON log lines on stdout, filtered by `RUST_LOG` (default `info`). A line emitted inside a
//!   span starts with the top-level fields `trace_id` and `span_id` of that span's OpenTelemetry
//!   context, so a log line leads to its trace in Jaeger.
//! - Every `tracing` span the span filter lets through becomes an OpenTelemetry span
//!   (`tracing-opentelemetry`). The span filter is its own variable, [`TRACE_FILTER_VAR`]
//!   (`SECUREPAY_TRACE_FILTER`, same directive syntax, default `info`, which keeps the SPEC §8
//!   spans): `RUST_LOG` quiets the logs, never the traces ([`Filters`], per-layer). Spans are exported in
//!   batches over OTLP/gRPC when `OTEL_EXPORTER_OTLP_ENDPOINT` (or
//!   `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set; the other standard `OTEL_EXPORTER_OTLP_*`
//!   variables (timeout, headers, compression) apply. The resource's `service.name` is the
//!   service's name. Without an endpoint nothing is exported, but spans still get ids, so logs
//!   carry trace ids and incoming trace context is passed on.
//! - The W3C TraceContext propagator as the process-wide propagator, which
//!   `securepay_kit::trace` uses to carry context over gRPC, HTTP and Kafka headers.
//!
//! [`filtered_layers`] builds the same layers with any writer, tracer provider and [`Filters`], so
//! tests check exactly what the binaries install.

use std::time::Duration;

use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing::Subscriber;
use tracing_subscriber::Layer;
use tracing_subscriber::filter::{EnvFilter, FilterExt, LevelFilter, Targets};
use tracing_subscriber::fmt::format::{self, FormatEvent, FormatFields, Writer};
use tracing_subscriber::fmt::{FmtContext, MakeWriter};
use tracing_subscriber::layer::Filter;
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
/// gRPC exporter runs on it. Fails when [`TRACE_FILTER_VAR`] or the OTLP configuration is
/// invalid, when called outside a tokio runtime, or when a global subscriber is already installed.
pub fn init_telemetry(service: &'static str) -> anyhow::Result<TelemetryGuard> {
    let filters = Filters::from_env()?;
    let exporter = if otlp_endpoint_configured() { Some(otlp_exporter(None)?) } else { None };
    let provider = tracer_provider(service, exporter);
    install_propagator();
    tracing_subscriber::registry()
        .with(filtered_layers(&provider, std::io::stdout, filters))
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
pub fn env_filter() -> EnvFilter {
    log_filter(std::env::var("RUST_LOG").ok())
}

fn log_filter(rust_log: Option<String>) -> EnvFilter {
    rust_log.and_then(|directives| EnvFilter::try_new(directives).ok()).unwrap_or_else(|| EnvFilter::new("info"))
}

/// The variable that chooses which spans become OpenTelemetry spans (`EnvFilter` directives,
/// e.g. `info` or `info,securepay_account=debug`); `RUST_LOG` does not affect them.
pub const TRACE_FILTER_VAR: &str = "SECUREPAY_TRACE_FILTER";

/// The span filter when [`TRACE_FILTER_VAR`] is unset or empty: every SPEC §8 span is `info`.
pub const TRACE_FILTER_DEFAULT: &str = "info";

/// The two independent filters of [`filtered_layers`]: `logs` for the JSON log lines, `spans`
/// for the OpenTelemetry spans.
#[derive(Debug)]
pub struct Filters {
    pub logs: EnvFilter,
    pub spans: EnvFilter,
}

impl Filters {
    /// [`Filters::from_vars`] of the process environment.
    pub fn from_env() -> anyhow::Result<Filters> {
        Filters::from_vars(|name| std::env::var(name).ok())
    }

    /// `logs` from `RUST_LOG` (`info` when unset or invalid, as [`env_filter`]); `spans` from
    /// [`TRACE_FILTER_VAR`] ([`TRACE_FILTER_DEFAULT`] when unset or empty). An invalid span filter
    /// is an error naming the variable: a typo must not switch tracing off unnoticed.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> anyhow::Result<Filters> {
        let spans = match var(TRACE_FILTER_VAR).filter(|value| !value.trim().is_empty()) {
            None => EnvFilter::new(TRACE_FILTER_DEFAULT),
            Some(value) => EnvFilter::try_new(&value).map_err(|error| {
                anyhow::anyhow!("{TRACE_FILTER_VAR}={value:?} is not a tracing filter ({error}); try `info`")
            })?,
        };
        Ok(Filters { logs: log_filter(var("RUST_LOG")), spans })
    }
}

/// What [`init_telemetry`] installs: [`log_and_trace_layers`] with `filters.logs` on the log
/// lines and `filters.spans` on the OpenTelemetry spans, each filtering only its own layer.
pub fn filtered_layers<S, W>(
    provider: &SdkTracerProvider,
    writer: W,
    filters: Filters,
) -> impl Layer<S> + Send + Sync + 'static
where
    S: Subscriber + for<'span> LookupSpan<'span> + Send + Sync,
    W: for<'writer> MakeWriter<'writer> + Send + Sync + 'static,
{
    // A `Vec` of boxed layers, not `and_then`: combined with `and_then`, a stricter span filter
    // also dropped `info` log lines (tests/trace_filter.rs); in a `Vec` each filter keeps to its
    // own layer.
    let layers: Vec<Box<dyn Layer<S> + Send + Sync>> =
        vec![json_log_layer(writer).with_filter(filters.logs).boxed(), span_layer(provider, filters.spans).boxed()];
    layers
}

/// The layers every service installs, unfiltered (tests add their own filter; the binaries get
/// [`filtered_layers`]): JSON log lines (with `trace_id`/`span_id`) to `writer`, and OpenTelemetry
/// spans through `provider`. The spans of the exporter's own transport (h2, hyper, tonic, tower)
/// are not traced, so exporting never feeds itself.
pub fn log_and_trace_layers<S, W>(provider: &SdkTracerProvider, writer: W) -> impl Layer<S> + Send + Sync + 'static
where
    S: Subscriber + for<'span> LookupSpan<'span> + Send + Sync,
    W: for<'writer> MakeWriter<'writer> + Send + Sync + 'static,
{
    json_log_layer(writer).and_then(span_layer(provider, LevelFilter::TRACE))
}

/// OpenTelemetry spans through `provider`, of what `filter` lets through, never of the exporter's
/// own transport.
fn span_layer<S, F>(provider: &SdkTracerProvider, filter: F) -> impl Layer<S> + Send + Sync + 'static
where
    S: Subscriber + for<'span> LookupSpan<'span> + Send + Sync,
    F: Filter<S> + Send + Sync + 'static,
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
    tracing_opentelemetry::layer().with_tracer(provider.tracer(SCOPE)).with_filter(transport.and(filter))
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
