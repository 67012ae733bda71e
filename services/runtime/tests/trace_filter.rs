//! `RUST_LOG` filters the log lines only; which spans are exported is `SECUREPAY_TRACE_FILTER`'s
//! (`telemetry::Filters`). Each case builds the layers `init_telemetry` installs
//! (`telemetry::filtered_layers`) from a given environment, exports to memory and logs to a buffer.

use std::io;
use std::sync::{Arc, Mutex};

use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use securepay_kit::trace::names;
use securepay_runtime::telemetry::{self, Filters, TRACE_FILTER_VAR};
use tracing_subscriber::layer::SubscriberExt;

/// A log sink the test reads back.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Captured {
    fn lines(&self) -> Vec<serde_json::Value> {
        let bytes = self.0.lock().unwrap().clone();
        String::from_utf8(bytes).unwrap().lines().map(|line| serde_json::from_str(line).unwrap()).collect()
    }
}

impl io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
    type Writer = Captured;

    fn make_writer(&'a self) -> Captured {
        self.clone()
    }
}

/// Runs a settle span with an info and a warn line in it under the layers `init_telemetry`
/// builds from `env`; returns the exported spans and the log lines.
fn run_with(env: &[(&str, &str)]) -> (Vec<SpanData>, Vec<serde_json::Value>) {
    let env: Vec<(String, String)> = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    let filters = Filters::from_vars(|name| env.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())).unwrap();
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder().with_simple_exporter(exporter.clone()).build();
    let logs = Captured::default();
    let subscriber = tracing_subscriber::registry().with(telemetry::filtered_layers(&provider, logs.clone(), filters));
    tracing::subscriber::with_default(subscriber, || {
        tracing::info_span!(names::ACCOUNT_SETTLE).in_scope(|| {
            tracing::info!("settled");
            tracing::warn!("cache refresh failed");
        });
    });
    provider.force_flush().unwrap();
    (exporter.get_finished_spans().unwrap(), logs.lines())
}

fn messages(lines: &[serde_json::Value]) -> Vec<&str> {
    lines.iter().filter_map(|line| line["fields"]["message"].as_str()).collect()
}

#[test]
fn rust_log_warn_quiets_the_logs_and_still_exports_the_spans() {
    let (spans, lines) = run_with(&[("RUST_LOG", "warn")]);
    let names: Vec<&str> = spans.iter().map(|s| s.name.as_ref()).collect();
    assert_eq!(names, [names::ACCOUNT_SETTLE], "the span is exported under RUST_LOG=warn");
    assert_eq!(messages(&lines), ["cache refresh failed"], "only the warning is logged");
    let trace_id = spans[0].span_context.trace_id().to_string();
    assert_eq!(lines[0]["trace_id"], trace_id.as_str(), "the warning still leads to its trace");
}

#[test]
fn the_trace_filter_chooses_the_spans_and_leaves_the_logs_alone() {
    let (spans, lines) = run_with(&[("RUST_LOG", "info"), (TRACE_FILTER_VAR, "warn")]);
    assert!(spans.is_empty(), "an info span is not exported under {TRACE_FILTER_VAR}=warn: {spans:?}");
    assert_eq!(messages(&lines), ["settled", "cache refresh failed"]);

    let (spans, _) = run_with(&[]);
    assert_eq!(spans.len(), 1, "exported by default");
}

#[test]
fn an_invalid_trace_filter_is_refused_naming_the_variable() {
    let error = Filters::from_vars(|name| (name == TRACE_FILTER_VAR).then(|| "info,=[".to_owned())).unwrap_err();
    assert!(error.to_string().starts_with("SECUREPAY_TRACE_FILTER="), "{error}");
}
