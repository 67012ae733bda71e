//! The notification service's metrics, through the `metrics` facade (the binary installs the
//! Prometheus recorder; without one, in tests and simulation, every call is a no-op).
//!
//! - `securepay_notifications_total{kind}`: notifications recorded for the first time;
//! - `securepay_notification_duplicates_total{kind}`: redelivered events that changed nothing;
//! - `securepay_notification_invalid_events_total{kind,reason}`: records skipped (committed past)
//!   because they could not be decoded or validated (`reason` from `securepay_proto::convert`), or
//!   because the store refused them (`reason="store_refused"`);
//! - `securepay_grpc_requests_total{service="notification",method,code}` and
//!   `securepay_grpc_request_duration_seconds{service,method}`: RED of the gRPC query (recorded by
//!   `securepay_kit::metrics::grpc_request`; the contract in
//!   `observability/prometheus/rules/securepay.rules.yml`).

use metrics::counter;
use securepay_core::identity::method;
use securepay_ports::NotificationKind;

pub const SERVICE: &str = "notification";
pub const NOTIFICATIONS: &str = "securepay_notifications_total";
pub const DUPLICATES: &str = "securepay_notification_duplicates_total";
pub const INVALID_EVENTS: &str = "securepay_notification_invalid_events_total";

pub fn recorded(kind: NotificationKind) {
    counter!(NOTIFICATIONS, "kind" => kind.as_str()).increment(1);
}

pub fn duplicate(kind: NotificationKind) {
    counter!(DUPLICATES, "kind" => kind.as_str()).increment(1);
}

pub fn invalid_event(kind: NotificationKind, reason: &'static str) {
    counter!(INVALID_EVENTS, "kind" => kind.as_str(), "reason" => reason).increment(1);
}

/// Exports the series with known labels at zero, so dashboards have data on an idle stack.
pub fn register_known_series() {
    for kind in NotificationKind::ALL {
        counter!(NOTIFICATIONS, "kind" => kind.as_str()).increment(0);
        counter!(DUPLICATES, "kind" => kind.as_str()).increment(0);
    }
    let code = format!("{:?}", tonic::Code::Ok); // as `securepay_kit::metrics::grpc_request` labels it
    counter!(securepay_kit::metrics::GRPC_REQUESTS, "service" => SERVICE, "method" => method::LIST_NOTIFICATIONS, "code" => code)
        .increment(0);
}
