//! The payment service's metrics (names from `securepay_kit::metrics`, the contract of
//! `observability/`): payments by status, transitions by pair, illegal transitions, settlement
//! latency, and outcome events that could not be used.

use metrics::{counter, histogram};
use securepay_core::identity::method;
use securepay_core::payment::PaymentStatus;
use securepay_kit::metrics::{ILLEGAL_TRANSITIONS, PAYMENTS, SETTLEMENT_DURATION};

/// Transitions persisted, by `from`/`to`.
pub const TRANSITIONS: &str = "securepay_payment_transitions_total";
/// Consumed outcome events that were skipped (undecodable, unknown payment), by reason.
pub const INVALID_EVENTS: &str = "securepay_invalid_events_total";

/// A payment entered `status` (PENDING on accept, COMPLETED/FAILED on settlement).
pub fn payment_status(status: PaymentStatus) {
    counter!(PAYMENTS, "status" => status.as_str()).increment(1);
}

pub fn transition(from: PaymentStatus, to: PaymentStatus) {
    counter!(TRANSITIONS, "from" => from.as_str(), "to" => to.as_str()).increment(1);
}

/// A transition refused by the state machine (in the domain or by the store); unlabelled, as the
/// contract says.
pub fn illegal_transition() {
    counter!(ILLEGAL_TRANSITIONS).increment(1);
}

pub fn settlement(seconds: f64) {
    histogram!(SETTLEMENT_DURATION).record(seconds.max(0.0));
}

pub fn invalid_event(topic: &str, reason: &'static str) {
    counter!(INVALID_EVENTS, "topic" => topic.to_owned(), "reason" => reason).increment(1);
}

/// Every series with known labels at zero, so dashboards have data on an idle service.
pub fn register_known_series() {
    securepay_kit::metrics::register_known_series("payment");
    for status in PaymentStatus::ALL {
        counter!(PAYMENTS, "status" => status.as_str()).increment(0);
    }
    for (from, to) in securepay_core::payment::TRANSITIONS {
        counter!(TRANSITIONS, "from" => from.as_str(), "to" => to.as_str()).increment(0);
    }
    counter!(ILLEGAL_TRANSITIONS).increment(0);
    // Taking the handle registers the histogram: its buckets are exported (at 0) before the first
    // settlement, so the first settlement already moves its rate.
    let _ = histogram!(SETTLEMENT_DURATION);
    for method in [method::INITIATE_PAYMENT, method::GET_PAYMENT] {
        securepay_kit::metrics::register_grpc_method("payment", method);
    }
}
