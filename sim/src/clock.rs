//! A service node's wall clock under the `clock_skew` fault: simulated time plus an offset the
//! harness sets and clears. Only the `Clock` port is skewed — timers (`tokio::time`) and the
//! issuer's clock are not — so SVID expiry checks, idempotency-key ages and recorded times on the
//! skewed node read a wrong "now", as on a host whose NTP is off.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use securepay_ports::Clock;
use time::OffsetDateTime;

/// `SimClock` + an adjustable offset. Clones share the offset; the harness keeps one per service
/// node, so a skew set before a restart is still there after it (the host's clock, not the process').
#[derive(Debug, Clone, Default)]
pub struct SkewedClock {
    offset_ms: Arc<AtomicI64>,
}

impl SkewedClock {
    pub fn new() -> SkewedClock {
        SkewedClock::default()
    }

    /// From now on, `now()` reads `offset_ms` away from true simulated time (0 heals).
    pub fn set_offset_ms(&self, offset_ms: i64) {
        self.offset_ms.store(offset_ms, Ordering::SeqCst);
    }

    pub fn offset_ms(&self) -> i64 {
        self.offset_ms.load(Ordering::SeqCst)
    }
}

impl Clock for SkewedClock {
    fn now(&self) -> OffsetDateTime {
        OffsetDateTime::from(std::time::SystemTime::now()) + time::Duration::milliseconds(self.offset_ms())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_offset_moves_the_reading_and_zero_heals() {
        let clock = SkewedClock::new();
        let shared = clock.clone();
        shared.set_offset_ms(3_600_000);
        let true_now = OffsetDateTime::now_utc();
        let skewed = clock.now();
        assert!(skewed - true_now >= time::Duration::minutes(59), "{skewed} vs {true_now}");
        shared.set_offset_ms(0);
        assert!(clock.now() - OffsetDateTime::now_utc() < time::Duration::minutes(1));
    }
}
