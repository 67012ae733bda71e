//! A small circuit breaker. Closed: calls pass, consecutive failures are counted; at `threshold`
//! it opens. Open: calls fail fast until `cool_down` has passed, then it is half-open. Half-open:
//! exactly one probe call passes; its success closes the circuit, its failure opens it again.
//!
//! Time is passed in (`tokio::time::Instant`, simulated under madsim), so the state machine is a
//! pure function of its calls and is tested without sleeping.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Closed { failures: u32 },
    Open { until: Instant },
    HalfOpen { probing: bool },
}

#[derive(Debug)]
pub struct CircuitBreaker {
    threshold: u32,
    cool_down: Duration,
    state: Mutex<State>,
}

impl CircuitBreaker {
    pub fn new(threshold: u32, cool_down: Duration) -> CircuitBreaker {
        assert!(threshold > 0, "a breaker that opens on zero failures never lets a call through");
        CircuitBreaker { threshold, cool_down, state: Mutex::new(State::Closed { failures: 0 }) }
    }

    /// Whether a call may be made now. In half-open, `true` only for the single probe.
    pub fn allow(&self, now: Instant) -> bool {
        let mut state = self.lock();
        match *state {
            State::Closed { .. } => true,
            State::Open { until } if now >= until => {
                *state = State::HalfOpen { probing: true };
                true
            }
            State::Open { .. } => false,
            State::HalfOpen { probing: true } => false,
            State::HalfOpen { probing: false } => {
                *state = State::HalfOpen { probing: true };
                true
            }
        }
    }

    /// The dependency answered (any answer, even a refusal, shows it is up).
    pub fn on_success(&self) {
        *self.lock() = State::Closed { failures: 0 };
    }

    /// The dependency was unreachable or too slow.
    pub fn on_failure(&self, now: Instant) {
        let mut state = self.lock();
        *state = match *state {
            State::Closed { failures } if failures + 1 < self.threshold => State::Closed { failures: failures + 1 },
            _ => State::Open { until: now + self.cool_down },
        };
    }

    /// `true` while calls are refused without trying (for logs and metrics).
    pub fn is_open(&self) -> bool {
        matches!(*self.lock(), State::Open { .. })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_threshold_consecutive_failures_and_fails_fast() {
        let b = CircuitBreaker::new(3, Duration::from_secs(5));
        let t0 = Instant::now();
        for _ in 0..2 {
            assert!(b.allow(t0));
            b.on_failure(t0);
        }
        b.on_success();
        for _ in 0..2 {
            b.on_failure(t0);
        }
        assert!(b.allow(t0), "a success reset the count");
        b.on_failure(t0);
        assert!(b.is_open());
        assert!(!b.allow(t0 + Duration::from_secs(4)));
    }

    #[test]
    fn half_open_lets_one_probe_through_and_its_result_decides() {
        let b = CircuitBreaker::new(1, Duration::from_secs(5));
        let t0 = Instant::now();
        b.on_failure(t0);
        let later = t0 + Duration::from_secs(5);
        assert!(b.allow(later), "the probe");
        assert!(!b.allow(later), "only one probe at a time");
        b.on_failure(later);
        assert!(!b.allow(later + Duration::from_secs(1)), "a failed probe reopens");
        let again = later + Duration::from_secs(5);
        assert!(b.allow(again));
        b.on_success();
        assert!(b.allow(again) && b.allow(again), "closed after a good probe");
    }
}
