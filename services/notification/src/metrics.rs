//! The notification service's metrics, through the `metrics` facade (the binary installs the
//! Prometheus recorder; without one, in tests and simulation, every call is a no-op).
//!
//! - `securepay_notifications_total{kind}`: notifications recorded for the first time;
//! - `securepay_notification_duplicates_total{kind}`: redelivered events that changed nothing;
//! - `securepay_notification_invalid_events_total{kind,reason}`: records skipped (committed past)
//!   because they could not be decoded or validated (`reason` from `securepay_proto::convert`), or
//!   because the store refused them (`reason="store_refused"`);
//! - `securepay_http_requests_total{service="notification",route,status}` and
//!   `securepay_http_request_duration_seconds{service,route}`: RED of the HTTP API (the contract in
//!   `observability/prometheus/rules/securepay.rules.yml`).

use std::time::Duration;

use metrics::{counter, histogram};
use securepay_ports::NotificationKind;

pub const SERVICE: &str = "notification";
pub const NOTIFICATIONS: &str = "securepay_notifications_total";
pub const DUPLICATES: &str = "securepay_notification_duplicates_total";
pub const INVALID_EVENTS: &str = "securepay_notification_invalid_events_total";
pub const HTTP_REQUESTS: &str = "securepay_http_requests_total";
pub const HTTP_REQUEST_DURATION: &str = "securepay_http_request_duration_seconds";

/// The one route of the API, as its metric label.
pub const ROUTE_NOTIFICATIONS: &str = "/api/v1/notifications";

pub fn recorded(kind: NotificationKind) {
    counter!(NOTIFICATIONS, "kind" => kind.as_str()).increment(1);
}

pub fn duplicate(kind: NotificationKind) {
    counter!(DUPLICATES, "kind" => kind.as_str()).increment(1);
}

pub fn invalid_event(kind: NotificationKind, reason: &'static str) {
    counter!(INVALID_EVENTS, "kind" => kind.as_str(), "reason" => reason).increment(1);
}

/// One served HTTP request (RED). `route` is the matched route template, never the raw path.
pub fn http_request(route: &'static str, status: u16, elapsed: Duration) {
    counter!(HTTP_REQUESTS, "service" => SERVICE, "route" => route, "status" => status.to_string()).increment(1);
    histogram!(HTTP_REQUEST_DURATION, "service" => SERVICE, "route" => route).record(elapsed.as_secs_f64());
}

/// Exports the series with known labels at zero, so dashboards have data on an idle stack.
pub fn register_known_series() {
    for kind in NotificationKind::ALL {
        counter!(NOTIFICATIONS, "kind" => kind.as_str()).increment(0);
        counter!(DUPLICATES, "kind" => kind.as_str()).increment(0);
    }
    for status in ["200", "400"] {
        counter!(HTTP_REQUESTS, "service" => SERVICE, "route" => ROUTE_NOTIFICATIONS, "status" => status).increment(0);
    }
}
