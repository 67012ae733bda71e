//! The telemetry the services install (`securepay_runtime::telemetry`) together with the
//! propagation helpers they call (`securepay_kit::trace`):
//!
//! - log lines carry the trace and span id of the span they are emitted in;
//! - one request crossing HTTP → gRPC → outbox → relay → Kafka → consumers in four "services"
//!   (each its own tracer provider and subscriber, linked only by the strings on the wire) arrives
//!   in the REAL Jaeger of the test platform as ONE trace with the eight SPEC §8 spans and the
//!   right parent of each.

use std::collections::BTreeMap;
use std::hash::{BuildHasher, Hasher};
use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::http_get;
use opentelemetry::trace::TraceContextExt;
use securepay_kit::trace::{self, names};
use securepay_runtime::telemetry;
use securepay_testkit::{component, var};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;

mod common;

/// A log sink the test can read back.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Captured {
    fn lines(&self) -> Vec<serde_json::Value> {
        let bytes = self.0.lock().unwrap().clone();
        String::from_utf8(bytes)
            .unwrap()
            .lines()
            .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}")))
            .collect()
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

/// The subscriber a service with `provider` installs, logging to `writer`.
fn dispatch<W>(provider: &opentelemetry_sdk::trace::SdkTracerProvider, writer: W) -> tracing::Dispatch
where
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    tracing::Dispatch::new(tracing_subscriber::registry().with(telemetry::log_and_trace_layers(provider, writer)))
}

/// 16 random bytes as hex (trace id) — unique per run, no extra dependency.
fn random_hex(bytes: usize) -> String {
    let mut out = String::new();
    while out.len() < bytes * 2 {
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos());
        hasher.write_u32(std::process::id());
        out.push_str(&format!("{:016x}", hasher.finish()));
    }
    out.truncate(bytes * 2);
    out
}

#[test]
fn a_log_line_inside_a_span_starts_with_that_spans_trace_and_span_ids() {
    telemetry::install_propagator();
    let provider = telemetry::tracer_provider("log-test", None);
    let logs = Captured::default();
    let remote_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let (trace_id, span_id, child_span_id) =
        tracing::dispatcher::with_default(&dispatch(&provider, logs.clone()), || {
            tracing::info!("before any span");
            let span = tracing::info_span!("consume", payment_id = "p-1");
            trace::set_parent(
                &span,
                trace::context_from_headers(&[(
                    "traceparent".into(),
                    format!("00-{remote_trace}-00f067aa0ba902b7-01"),
                )]),
            );
            let ids = span.context().span().span_context().clone();
            let child_span_id = {
                let _entered = span.enter();
                tracing::info!(amount = "10.00", "inside the span");
                let child = tracing::info_span!("step");
                let _child = child.enter();
                tracing::warn!("inside the child");
                child.context().span().span_context().span_id()
            };
            tracing::info!("after the span");
            (ids.trace_id().to_string(), ids.span_id().to_string(), child_span_id.to_string())
        });
    assert_eq!(trace_id, remote_trace, "the span continues the trace of the headers");

    let lines = logs.lines();
    assert_eq!(lines.len(), 4, "{lines:?}");
    let [before, inside, child, after] = &lines[..] else { unreachable!() };
    assert!(before.get("trace_id").is_none(), "no span, no trace id: {before}");
    assert!(after.get("trace_id").is_none(), "no span, no trace id: {after}");
    assert_eq!(inside["trace_id"], remote_trace, "{inside}");
    assert_eq!(inside["span_id"], span_id.as_str(), "{inside}");
    assert_eq!(inside["fields"]["message"], "inside the span", "the usual JSON line follows: {inside}");
    assert_eq!(inside["span"]["payment_id"], "p-1", "span fields are kept: {inside}");
    assert_eq!(child["trace_id"], remote_trace, "{child}");
    assert_eq!(child["span_id"], child_span_id.as_str(), "{child}");
    assert_ne!(child_span_id, span_id);
    assert_eq!(child["level"], "WARN");
}

#[test]
fn http_headers_and_event_headers_round_trip_the_w3c_context() {
    telemetry::install_propagator();
    let provider = telemetry::tracer_provider("propagation-test", None);
    tracing::dispatcher::with_default(&dispatch(&provider, io::sink), || {
        let mut http_headers = http::HeaderMap::new();
        http_headers.insert("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".parse().unwrap());
        let cx = trace::extract_from_http(&http_headers);
        assert_eq!(cx.span().span_context().trace_id().to_string(), "0af7651916cd43dd8448eb211c80319c");
        assert!(cx.span().span_context().is_remote());

        let span = tracing::info_span!(names::GATEWAY_REQUEST);
        trace::set_parent(&span, cx);
        let headers = trace::headers_for_span(&span);
        let traceparent = &headers.iter().find(|(name, _)| name == "traceparent").expect("traceparent written").1;
        let span_id = span.context().span().span_context().span_id().to_string();
        assert_eq!(traceparent, &format!("00-0af7651916cd43dd8448eb211c80319c-{span_id}-01"));

        let mut metadata = tonic::metadata::MetadataMap::new();
        trace::inject_into_metadata(&span, &mut metadata);
        let received = tonic::metadata::MetadataMap::from_headers(metadata.into_headers());
        let cx = trace::extract_from_metadata(&received);
        assert_eq!(cx.span().span_context().span_id().to_string(), span_id);

        assert!(!trace::extract_from_http(&http::HeaderMap::new()).span().span_context().is_valid());
        assert!(!trace::context_from_headers(&[]).span().span_context().is_valid());
    });
}

/// One span as Jaeger reports it.
#[derive(Debug)]
struct JaegerSpan {
    trace_id: String,
    span_id: String,
    parent: Option<String>,
    service: String,
}

/// The spans of trace `trace_id` by operation name, once Jaeger has all `expected` of them
/// (bounded wait: the collector ingests asynchronously).
async fn jaeger_trace(query_url: &str, trace_id: &str, expected: usize) -> BTreeMap<String, Vec<JaegerSpan>> {
    let url = format!("{}/api/traces/{trace_id}", query_url.trim_end_matches('/'));
    let mut last = String::new();
    for _ in 0..60 {
        match http_get(&url).await {
            Ok((200, body)) => {
                let json: serde_json::Value = serde_json::from_str(&body).expect("Jaeger answers JSON");
                let traces = json["data"].as_array().cloned().unwrap_or_default();
                assert!(traces.len() <= 1, "one trace id, one trace: {json}");
                if let Some(found) = traces.first() {
                    let spans = found["spans"].as_array().cloned().unwrap_or_default();
                    if spans.len() >= expected {
                        let mut by_name: BTreeMap<String, Vec<JaegerSpan>> = BTreeMap::new();
                        for span in spans {
                            let process = span["processID"].as_str().unwrap();
                            let parent = span["references"]
                                .as_array()
                                .into_iter()
                                .flatten()
                                .find(|r| r["refType"] == "CHILD_OF")
                                .map(|r| r["spanID"].as_str().unwrap().to_owned());
                            by_name.entry(span["operationName"].as_str().unwrap().to_owned()).or_default().push(
                                JaegerSpan {
                                    trace_id: span["traceID"].as_str().unwrap().to_owned(),
                                    span_id: span["spanID"].as_str().unwrap().to_owned(),
                                    parent,
                                    service: found["processes"][process]["serviceName"].as_str().unwrap().to_owned(),
                                },
                            );
                        }
                        return by_name;
                    }
                    last = format!("{} of {expected} spans so far", spans.len());
                }
            }
            Ok((status, body)) => last = format!("HTTP {status}: {}", body.chars().take(200).collect::<String>()),
            Err(error) => last = format!("query failed: {error}"),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    panic!("trace {trace_id} did not reach Jaeger at {query_url} within 30 s with {expected} spans; last: {last}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_request_is_one_trace_in_jaeger_across_grpc_and_kafka_headers() {
    let (Some(otlp), Some(query_url)) = (component(var::OTLP_GRPC), component(var::JAEGER_QUERY_URL)) else {
        return;
    };
    telemetry::install_propagator();
    let run = random_hex(6);
    let service = |name: &str| format!("securepay-test-{run}-{name}");
    let provider =
        |name: &str| telemetry::tracer_provider(&service(name), Some(telemetry::otlp_exporter(Some(&otlp)).unwrap()));
    let (gateway, payment, account, notification) =
        (provider("gateway"), provider("payment"), provider("account"), provider("notification"));

    // The client's own span: the gateway continues its trace.
    let trace_id = random_hex(16);
    let client_span_id = random_hex(8);
    let mut request_headers = http::HeaderMap::new();
    request_headers.insert("traceparent", format!("00-{trace_id}-{client_span_id}-01").parse().unwrap());

    // gateway: HTTP in, gRPC out. Only what travels on the wire passes between the "services".
    let to_payment = tracing::dispatcher::with_default(&dispatch(&gateway, io::sink), || {
        let span = tracing::info_span!(names::GATEWAY_REQUEST, otel.kind = "server");
        trace::set_parent(&span, trace::extract_from_http(&request_headers));
        let _entered = span.enter();
        let mut metadata = tonic::metadata::MetadataMap::new();
        trace::inject_into_metadata(&span, &mut metadata);
        metadata.into_headers()
    });

    // payment: gRPC in, gRPC out to account, outbox event headers written in the same span.
    let (to_account, outbox_headers) = tracing::dispatcher::with_default(&dispatch(&payment, io::sink), || {
        let span = tracing::info_span!(names::PAYMENT_INITIATE, otel.kind = "server");
        trace::set_parent(&span, trace::extract_from_metadata(&tonic::metadata::MetadataMap::from_headers(to_payment)));
        let _entered = span.enter();
        let mut metadata = tonic::metadata::MetadataMap::new();
        trace::inject_into_metadata(&tracing::Span::current(), &mut metadata);
        let mut outbox_headers = vec![("event-type".to_owned(), "payment.initiated".to_owned())];
        outbox_headers.extend(trace::headers_for_current_span());
        (metadata.into_headers(), outbox_headers)
    });

    // account: the balance check with its cache lookup and database read.
    tracing::dispatcher::with_default(&dispatch(&account, io::sink), || {
        let span = tracing::info_span!(names::ACCOUNT_CHECK_BALANCE, otel.kind = "server");
        trace::set_parent(&span, trace::extract_from_metadata(&tonic::metadata::MetadataMap::from_headers(to_account)));
        let _entered = span.enter();
        tracing::info_span!(names::CACHE_LOOKUP).in_scope(|| tracing::info!("cache miss"));
        tracing::info_span!(names::DB_BALANCE_READ).in_scope(|| tracing::info!("balance read"));
    });

    // payment's outbox relay: the publish is a span; the record carries its context.
    let record_headers = tracing::dispatcher::with_default(&dispatch(&payment, io::sink), || {
        let span = trace::publish_span("payment.initiated", &outbox_headers);
        let record_headers = trace::relay_headers(&outbox_headers, &span);
        drop(span); // acknowledged by the broker
        record_headers
    });
    assert_eq!(record_headers[0], ("event-type".to_owned(), "payment.initiated".to_owned()), "other headers kept");
    assert_eq!(record_headers.iter().filter(|(name, _)| name == "traceparent").count(), 1);

    // account: settles the consumed record; its outcome event carries the settle span's context.
    let outcome_headers = tracing::dispatcher::with_default(&dispatch(&account, io::sink), || {
        let span = tracing::info_span!(names::ACCOUNT_SETTLE, otel.kind = "consumer");
        trace::set_parent(&span, trace::context_from_headers(&record_headers));
        span.in_scope(trace::headers_for_current_span)
    });

    // notification: records the outcome.
    tracing::dispatcher::with_default(&dispatch(&notification, io::sink), || {
        let span = tracing::info_span!(names::NOTIFICATION_RECORD, otel.kind = "consumer");
        trace::set_parent(&span, trace::context_from_headers(&outcome_headers));
        span.in_scope(|| tracing::info!("recorded"));
    });

    for provider in [gateway, payment, account, notification] {
        tokio::task::spawn_blocking(move || provider.force_flush().expect("spans exported to Jaeger")).await.unwrap();
    }

    let spans = jaeger_trace(&query_url, &trace_id, names::ALL.len()).await;
    let names_found: Vec<&str> = spans.keys().map(String::as_str).collect();
    let mut names_expected = names::ALL.to_vec();
    names_expected.sort_unstable();
    assert_eq!(names_found, names_expected, "exactly the SPEC §8 spans");
    let one = |name: &str| -> &JaegerSpan {
        let found = &spans[name];
        assert_eq!(found.len(), 1, "one {name} span: {found:?}");
        assert_eq!(found[0].trace_id, trace_id);
        &found[0]
    };
    let expect = |name: &str, parent: Option<&str>, service_name: &str| {
        let span = one(name);
        assert_eq!(span.parent.as_deref(), parent, "parent of {name}: {span:?}");
        assert_eq!(span.service, service(service_name), "service of {name}");
    };
    let id = |name: &str| one(name).span_id.clone();
    expect(names::GATEWAY_REQUEST, Some(&client_span_id), "gateway");
    expect(names::PAYMENT_INITIATE, Some(&id(names::GATEWAY_REQUEST)), "payment");
    expect(names::ACCOUNT_CHECK_BALANCE, Some(&id(names::PAYMENT_INITIATE)), "account");
    expect(names::CACHE_LOOKUP, Some(&id(names::ACCOUNT_CHECK_BALANCE)), "account");
    expect(names::DB_BALANCE_READ, Some(&id(names::ACCOUNT_CHECK_BALANCE)), "account");
    expect(names::KAFKA_PUBLISH_PAYMENT_INITIATED, Some(&id(names::PAYMENT_INITIATE)), "payment");
    expect(names::ACCOUNT_SETTLE, Some(&id(names::KAFKA_PUBLISH_PAYMENT_INITIATED)), "account");
    expect(names::NOTIFICATION_RECORD, Some(&id(names::ACCOUNT_SETTLE)), "notification");
}
