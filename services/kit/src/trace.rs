//! Trace context across process boundaries (SPEC §7, §8), written once for the four services.
//!
//! Every request is one OpenTelemetry trace: HTTP → gRPC → Kafka → consumers. A `tracing` span
//! becomes an OpenTelemetry span through the `tracing-opentelemetry` layer the binaries install
//! (`securepay_runtime::init_telemetry`); this module carries its context over the wire as W3C
//! `traceparent`/`tracestate`, using the process-wide propagator that the same call installs:
//!
//! - gRPC: [`inject_into_metadata`] on the client, [`extract_from_metadata`] on the server;
//! - Kafka / outbox headers ([`securepay_ports::Header`]): [`headers_for_span`] when the event is
//!   written, [`context_from_headers`] when it is consumed, [`publish_span`] + [`relay_headers`] in
//!   the outbox relay so that the publish is a span of the same trace;
//! - HTTP: [`extract_from_http`] at the gateway's edge.
//!
//! A remote context becomes a span's parent with [`set_parent`], which must be called before the
//! span is first entered (or instrumented and polled, or injected): the OpenTelemetry span is
//! started then, and its parent is fixed from that moment.
//!
//! The span names of SPEC §8 live in [`names`]; services name their spans with these constants.
//!
//! Promise: in simulation (`--cfg madsim`) and wherever no OpenTelemetry layer is installed, all of
//! this compiles and does nothing: injection adds no header, extraction yields an empty context.

use opentelemetry::Context;
use opentelemetry::propagation::{Extractor, Injector};
use securepay_ports::Header;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The span names of SPEC §8, one place. Use them as the name of `tracing` spans, e.g.
/// `tracing::info_span!(names::PAYMENT_INITIATE, payment_id = %id)`.
pub mod names {
    /// The gateway's span around one HTTP request (server kind; parent: the client's
    /// `traceparent`, if it sent one).
    pub const GATEWAY_REQUEST: &str = "gateway.request";
    /// The payment service's `InitiatePayment` handler (parent: from gRPC metadata).
    pub const PAYMENT_INITIATE: &str = "payment.initiate";
    /// The account service's balance check handler (parent: from gRPC metadata).
    pub const ACCOUNT_CHECK_BALANCE: &str = "account.check_balance";
    /// The Redis balance cache lookup inside the balance check.
    pub const CACHE_LOOKUP: &str = "cache.lookup";
    /// The PostgreSQL balance read inside the balance check (on a cache miss).
    pub const DB_BALANCE_READ: &str = "db.balance_read";
    /// The outbox relay publishing one `payment.initiated` event (see [`super::publish_span`]).
    pub const KAFKA_PUBLISH_PAYMENT_INITIATED: &str = "kafka.publish payment.initiated";
    /// The account service settling one consumed `payment.initiated` event (parent: from the
    /// record's headers).
    pub const ACCOUNT_SETTLE: &str = "account.settle";
    /// The notification service recording one consumed outcome event (parent: from the record's
    /// headers).
    pub const NOTIFICATION_RECORD: &str = "notification.record";

    /// Every span name of SPEC §8, in request order.
    pub const ALL: [&str; 8] = [
        GATEWAY_REQUEST,
        PAYMENT_INITIATE,
        ACCOUNT_CHECK_BALANCE,
        CACHE_LOOKUP,
        DB_BALANCE_READ,
        KAFKA_PUBLISH_PAYMENT_INITIATED,
        ACCOUNT_SETTLE,
        NOTIFICATION_RECORD,
    ];
}

/// The W3C trace-context header names this module writes.
pub const TRACEPARENT: &str = "traceparent";
pub const TRACESTATE: &str = "tracestate";

/// Makes the remote context `parent` the parent of `span`. Call it right after creating the span,
/// before it is entered, instrumented or injected. Without an OpenTelemetry layer (simulation,
/// tests without telemetry) it does nothing; an empty `parent` leaves the span a root.
pub fn set_parent(span: &tracing::Span, parent: Context) {
    // The only failures are "no OpenTelemetry layer" and "already started": the former is the
    // documented no-op, the latter a caller bug that must not break a payment — only tracing
    // loses a link.
    if let Err(error) = span.set_parent(parent) {
        tracing::debug!(%error, "trace parent not set");
    }
}

/// Writes `span`'s trace context into outgoing gRPC metadata (client side).
pub fn inject_into_metadata(span: &tracing::Span, metadata: &mut tonic::metadata::MetadataMap) {
    let cx = span.context();
    opentelemetry::global::get_text_map_propagator(|propagator| {
        propagator.inject_context(&cx, &mut MetadataInjector(metadata))
    });
}

/// The remote trace context of an incoming gRPC request (server side); empty when it carries none.
pub fn extract_from_metadata(metadata: &tonic::metadata::MetadataMap) -> Context {
    opentelemetry::global::get_text_map_propagator(|propagator| propagator.extract(&MetadataExtractor(metadata)))
}

/// The remote trace context of an incoming HTTP request (the gateway's edge); empty when it
/// carries none.
pub fn extract_from_http(headers: &http::HeaderMap) -> Context {
    opentelemetry::global::get_text_map_propagator(|propagator| propagator.extract(&HttpExtractor(headers)))
}

/// `span`'s trace context as event headers (`traceparent`, and `tracestate` when non-empty), to
/// store with an outbox event or attach to a Kafka record. Empty without an OpenTelemetry layer.
pub fn headers_for_span(span: &tracing::Span) -> Vec<Header> {
    let cx = span.context();
    let mut headers = HeaderInjector(Vec::new());
    opentelemetry::global::get_text_map_propagator(|propagator| propagator.inject_context(&cx, &mut headers));
    headers.0
}

/// [`headers_for_span`] of the current span.
pub fn headers_for_current_span() -> Vec<Header> {
    headers_for_span(&tracing::Span::current())
}

/// The trace context carried by a consumed record's headers; empty when they carry none.
pub fn context_from_headers(headers: &[Header]) -> Context {
    opentelemetry::global::get_text_map_propagator(|propagator| propagator.extract(&HeaderExtractor(headers)))
}

/// The outbox relay's span for publishing one event to `topic`, named `kafka.publish <topic>`
/// (e.g. [`names::KAFKA_PUBLISH_PAYMENT_INITIATED`]) and parented from the trace context the
/// event was written with (`event_headers`). Keep it alive until the broker acknowledged the
/// publish; publish the record with [`relay_headers`] so consumers become its children.
pub fn publish_span(topic: &str, event_headers: &[Header]) -> tracing::Span {
    let span = tracing::info_span!(
        "kafka.publish",
        otel.name = %format!("kafka.publish {topic}"),
        otel.kind = "producer",
        messaging.system = "kafka",
        messaging.destination.name = topic,
    );
    set_parent(&span, context_from_headers(event_headers));
    span
}

/// The headers to publish an event with: `event_headers` with the trace context replaced by
/// `publish`'s (see [`publish_span`]); other headers are kept in order. When `publish` has no
/// trace context (no OpenTelemetry layer), the event's own trace headers are kept.
pub fn relay_headers(event_headers: &[Header], publish: &tracing::Span) -> Vec<Header> {
    let trace = headers_for_span(publish);
    if trace.is_empty() {
        return event_headers.to_vec();
    }
    let mut headers: Vec<Header> = event_headers.iter().filter(|(name, _)| !is_trace_header(name)).cloned().collect();
    headers.extend(trace);
    headers
}

/// True for the W3C trace-context header names ([`TRACEPARENT`], [`TRACESTATE`]), in any case.
pub fn is_trace_header(name: &str) -> bool {
    name.eq_ignore_ascii_case(TRACEPARENT) || name.eq_ignore_ascii_case(TRACESTATE)
}

struct MetadataInjector<'a>(&'a mut tonic::metadata::MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        // The propagator only writes its own ASCII header names and values; anything else is
        // skipped rather than sent malformed.
        if let (Ok(key), Ok(value)) = (
            tonic::metadata::MetadataKey::from_bytes(key.as_bytes()),
            tonic::metadata::MetadataValue::try_from(value.as_str()),
        ) {
            self.0.insert(key, value);
        }
    }
}

struct MetadataExtractor<'a>(&'a tonic::metadata::MetadataMap);

impl Extractor for MetadataExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .filter_map(|key| match key {
                tonic::metadata::KeyRef::Ascii(key) => Some(key.as_str()),
                tonic::metadata::KeyRef::Binary(_) => None,
            })
            .collect()
    }
}

struct HttpExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HttpExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

struct HeaderInjector(Vec<Header>);

impl Injector for HeaderInjector {
    fn set(&mut self, key: &str, value: String) {
        self.0.retain(|(name, _)| !name.eq_ignore_ascii_case(key));
        self.0.push((key.to_owned(), value));
    }
}

struct HeaderExtractor<'a>(&'a [Header]);

impl Extractor for HeaderExtractor<'_> {
    /// Header names are case-insensitive; the last occurrence wins (Kafka allows repeats).
    fn get(&self, key: &str) -> Option<&str> {
        self.0.iter().rev().find(|(name, _)| name.eq_ignore_ascii_case(key)).map(|(_, value)| value.as_str())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|(name, _)| name.as_str()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn span_names_are_the_specs_eight_and_distinct() {
        let mut names = names::ALL.to_vec();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), 8);
        assert!(names::ALL.contains(&"kafka.publish payment.initiated"));
    }

    #[test]
    fn without_a_telemetry_layer_nothing_is_injected_and_nothing_extracted() {
        let span = tracing::info_span!("x");
        assert!(headers_for_span(&span).is_empty());
        let mut metadata = tonic::metadata::MetadataMap::new();
        inject_into_metadata(&span, &mut metadata);
        assert!(metadata.is_empty());
        let kept = vec![("traceparent".to_owned(), "00-abc".to_owned()), ("k".to_owned(), "v".to_owned())];
        assert_eq!(relay_headers(&kept, &span), kept, "the event's own headers are kept");
    }

    #[test]
    fn header_lookup_is_case_insensitive_and_last_wins() {
        let headers = vec![
            ("TraceParent".to_owned(), "first".to_owned()),
            ("other".to_owned(), "x".to_owned()),
            ("traceparent".to_owned(), "second".to_owned()),
        ];
        assert_eq!(HeaderExtractor(&headers).get("traceparent"), Some("second"));
        assert_eq!(HeaderExtractor(&headers).get("missing"), None);
    }
}
