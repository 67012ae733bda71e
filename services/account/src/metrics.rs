//! Account-local metrics, recorded through the `metrics` facade (a no-op without a recorder).
//!
//! - `securepay_settlements_total{result}` (`securepay_kit::metrics::SETTLEMENTS`): one per settled
//!   `payment.initiated` event; `result` = `completed`, a failure reason (`insufficient_funds`,
//!   `unknown_account`, `currency_mismatch`) or `duplicate` (already settled, nothing moved).
//! - `securepay_account_settle_batch_duration_seconds`: one store transaction of a batch, retries
//!   included.
//! - `securepay_account_settle_batch_events`: events per settled batch.
//! - `securepay_account_cache_invalidation_failures_total`: invalidations Redis did not take (the
//!   short TTL then bounds how long a stale balance is served).
//! - The gRPC RED series of both methods are exported from start-up (`register_grpc_method`).
//! - Dead letters: `securepay_dead_letters_total{topic,reason}` (`securepay_kit::metrics::dead_letter`).

use std::time::Duration;

use metrics::{counter, histogram};
use securepay_core::identity::method;
use securepay_core::ledger::Settled;
use securepay_core::payment::Outcome;

use crate::SERVICE;

pub const SETTLE_BATCH_DURATION: &str = "securepay_account_settle_batch_duration_seconds";
pub const SETTLE_BATCH_EVENTS: &str = "securepay_account_settle_batch_events";
pub const CACHE_INVALIDATION_FAILURES: &str = "securepay_account_cache_invalidation_failures_total";

/// The `result` label of one settlement.
pub fn settlement_result(settled: Settled) -> &'static str {
    match settled {
        Settled::Duplicate(_) => "duplicate",
        Settled::New(Outcome::Completed) => "completed",
        Settled::New(Outcome::Failed(reason)) => reason.code(),
    }
}

pub fn settled(settled: Settled) {
    counter!(securepay_kit::metrics::SETTLEMENTS, "result" => settlement_result(settled)).increment(1);
}

pub fn settle_batch(events: usize, elapsed: Duration) {
    histogram!(SETTLE_BATCH_DURATION).record(elapsed.as_secs_f64());
    histogram!(SETTLE_BATCH_EVENTS).record(events as f64);
}

pub fn cache_invalidation_failed() {
    counter!(CACHE_INVALIDATION_FAILURES).increment(1);
}

/// Exports the account's series with known labels at zero, so dashboards have data when idle.
pub fn register_known_series() {
    for result in ["completed", "insufficient_funds", "unknown_account", "currency_mismatch", "duplicate"] {
        counter!(securepay_kit::metrics::SETTLEMENTS, "result" => result).increment(0);
    }
    counter!(CACHE_INVALIDATION_FAILURES).increment(0);
    for method in [method::CHECK_BALANCE, method::GET_BALANCE] {
        securepay_kit::metrics::register_grpc_method(SERVICE, method);
    }
}
