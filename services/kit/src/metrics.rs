//! The metric names of the contract at the top of `observability/prometheus/rules/securepay.rules.yml`,
//! recorded through the `metrics` facade. The binaries install a Prometheus recorder and serve it on
//! `/metrics`; without a recorder (tests, simulation) every call is a no-op.

use std::time::Duration;

use metrics::{counter, gauge, histogram};

pub const GRPC_REQUESTS: &str = "securepay_grpc_requests_total";
pub const GRPC_REQUEST_DURATION: &str = "securepay_grpc_request_duration_seconds";
pub const PAYMENTS: &str = "securepay_payments_total";
pub const SETTLEMENT_DURATION: &str = "securepay_settlement_duration_seconds";
pub const ILLEGAL_TRANSITIONS: &str = "securepay_illegal_transitions_total";
pub const OUTBOX_LAG: &str = "securepay_outbox_lag_events";
pub const CONSUMER_LAG: &str = "securepay_consumer_lag_records";
pub const AUTH_FAILURES: &str = "securepay_auth_failures_total";
pub const DEAD_LETTERS: &str = "securepay_dead_letters_total";
pub const SETTLEMENTS: &str = "securepay_settlements_total";

/// One served gRPC call (RED).
pub fn grpc_request(service: &'static str, method: &'static str, code: tonic::Code, elapsed: Duration) {
    let code = format!("{code:?}");
    counter!(GRPC_REQUESTS, "service" => service, "method" => method, "code" => code).increment(1);
    histogram!(GRPC_REQUEST_DURATION, "service" => service, "method" => method).record(elapsed.as_secs_f64());
}

/// Exports a served gRPC method's RED series before its first call (its `Ok` count at 0, its latency
/// histogram with empty buckets), so `rate()` over them has samples from start-up.
pub fn register_grpc_method(service: &'static str, method: &'static str) {
    let code = format!("{:?}", tonic::Code::Ok); // as `grpc_request` labels it
    counter!(GRPC_REQUESTS, "service" => service, "method" => method, "code" => code).increment(0);
    // Taking the handle registers the histogram; the Prometheus exporter renders it from then on.
    let _ = histogram!(GRPC_REQUEST_DURATION, "service" => service, "method" => method);
}

/// A refused caller (`reason` e.g. `svid_missing`, `peer_not_allowed`, `object_forbidden`).
pub fn auth_failure(reason: &'static str) {
    counter!(AUTH_FAILURES, "reason" => reason).increment(1);
}

/// Outbox rows not yet published, as last seen by the relay.
pub fn outbox_lag(service: &'static str, events: usize) {
    gauge!(OUTBOX_LAG, "service" => service).set(events as f64);
}

/// Records of one partition the consumer `group` has not committed past (high watermark − committed
/// offset), as last reported by the consumer's client.
pub fn consumer_lag(group: &str, topic: &str, partition: i32, records: i64) {
    let (group, topic, partition) = (group.to_owned(), topic.to_owned(), partition.to_string());
    gauge!(CONSUMER_LAG, "group" => group, "topic" => topic, "partition" => partition).set(records as f64);
}

/// A record sent to a dead-letter topic instead of being processed.
pub fn dead_letter(topic: &'static str, reason: &'static str) {
    counter!(DEAD_LETTERS, "topic" => topic, "reason" => reason).increment(1);
}

/// Exports every series with known labels at zero, so dashboards have data on an idle stack.
pub fn register_known_series(service: &'static str) {
    for reason in ["svid_missing", "svid_expired", "peer_unknown", "peer_not_allowed", "subject_missing"] {
        counter!(AUTH_FAILURES, "reason" => reason).increment(0);
    }
    gauge!(OUTBOX_LAG, "service" => service).set(0.0);
}
