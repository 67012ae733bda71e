//! The open-loop schedule and the payment plan.
//!
//! Open loop: payment `i` is due at `start + i / rate`, whatever the server does. A slow server
//! does not slow the generator down (that would hide the latency it causes — coordinated
//! omission); payments that cannot be sent because the client's concurrency limit is reached are
//! counted as offered but not sent, and POST latency is measured from the due time.
//!
//! The plan (who pays whom how much) comes from a seeded RNG, so a run is reproducible.

use std::time::Duration;

use rand::rngs::SmallRng;
use rand::{Rng as _, SeedableRng as _};

/// When each payment of a run is due, relative to the run's start.
#[derive(Debug, Clone, Copy)]
pub struct Schedule {
    rate: f64,
    total: u64,
}

impl Schedule {
    /// `rate` payments per second for `duration`: `floor(rate × duration)` payments.
    pub fn new(rate: f64, duration: Duration) -> Schedule {
        assert!(rate.is_finite() && rate > 0.0, "rate must be positive");
        let total = (rate * duration.as_secs_f64()).floor() as u64;
        Schedule { rate, total }
    }

    pub fn total(&self) -> u64 {
        self.total
    }

    /// The offset from the start at which payment `i` is due. Computed from `i`, never by
    /// accumulating intervals, so there is no drift over long runs.
    pub fn due(&self, i: u64) -> Duration {
        Duration::from_secs_f64(i as f64 / self.rate)
    }

    /// How many payments are due by `elapsed` (all `i` with `due(i) <= elapsed`), at most `total`.
    pub fn due_by(&self, elapsed: Duration) -> u64 {
        let n = (elapsed.as_secs_f64() * self.rate).floor() as u64 + 1;
        // Correct float rounding at the boundary in both directions.
        let mut n = n.min(self.total);
        while n > 0 && self.due(n - 1) > elapsed {
            n -= 1;
        }
        while n < self.total && self.due(n) <= elapsed {
            n += 1;
        }
        n
    }
}

/// One planned payment: indices into the seeded accounts and an amount in cents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Planned {
    pub index: u64,
    pub payer: usize,
    pub payee: usize,
    pub amount_minor: i64,
    /// Deliberately more than the payer can hold: must end FAILED insufficient_funds (or be
    /// refused at the POST with that code), never COMPLETED.
    pub unaffordable: bool,
}

/// Draws payments: payer and payee uniformly among `accounts` (always two different ones),
/// ordinary amounts uniform in `[min, max]` cents, and with probability `unaffordable_share` the
/// fixed `unaffordable_minor` amount.
pub struct Planner {
    rng: SmallRng,
    accounts: usize,
    amount_minor: (i64, i64),
    unaffordable_share: f64,
    unaffordable_minor: i64,
    next: u64,
}

impl Planner {
    pub fn new(
        seed: u64,
        accounts: usize,
        amount_minor: (i64, i64),
        unaffordable_share: f64,
        unaffordable_minor: i64,
    ) -> Planner {
        assert!(accounts >= 2, "a payment needs two accounts");
        assert!(0 < amount_minor.0 && amount_minor.0 <= amount_minor.1, "amount range");
        assert!((0.0..=1.0).contains(&unaffordable_share), "share in [0, 1]");
        Planner {
            rng: SmallRng::seed_from_u64(seed),
            accounts,
            amount_minor,
            unaffordable_share,
            unaffordable_minor,
            next: 0,
        }
    }

    pub fn next_payment(&mut self) -> Planned {
        let payer = self.rng.random_range(0..self.accounts);
        // Uniform among the others: skip over the payer.
        let mut payee = self.rng.random_range(0..self.accounts - 1);
        if payee >= payer {
            payee += 1;
        }
        let unaffordable = self.rng.random_bool(self.unaffordable_share);
        let amount_minor = if unaffordable {
            self.unaffordable_minor
        } else {
            self.rng.random_range(self.amount_minor.0..=self.amount_minor.1)
        };
        let index = self.next;
        self.next += 1;
        Planned { index, payer, payee, amount_minor, unaffordable }
    }
}

/// `1234` cents → `"12.34"` (EUR has two minor units).
pub fn format_minor(minor: i64) -> String {
    format!("{}.{:02}", minor / 100, minor % 100)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payments_are_spread_evenly_and_never_drift() {
        let s = Schedule::new(3.0, Duration::from_secs(10));
        assert_eq!(s.total(), 30);
        assert_eq!(s.due(0), Duration::ZERO);
        assert_eq!(s.due(3), Duration::from_secs(1));
        assert_eq!(s.due(29), Duration::from_secs_f64(29.0 / 3.0));
        // A million payments at 1000/s: the last one is due at exactly 999.999 s.
        let s = Schedule::new(1000.0, Duration::from_secs(1000));
        assert_eq!(s.total(), 1_000_000);
        assert_eq!(s.due(999_999), Duration::from_secs_f64(999.999));
    }

    #[test]
    fn due_by_counts_exactly_the_payments_whose_time_has_come() {
        let s = Schedule::new(4.0, Duration::from_secs(2));
        assert_eq!(s.due_by(Duration::ZERO), 1);
        assert_eq!(s.due_by(Duration::from_millis(249)), 1);
        assert_eq!(s.due_by(Duration::from_millis(250)), 2);
        assert_eq!(s.due_by(Duration::from_millis(1999)), 8);
        // Never more than the run holds, however late the generator wakes up.
        assert_eq!(s.due_by(Duration::from_secs(60)), 8);
        let fractional = Schedule::new(0.5, Duration::from_secs(5));
        assert_eq!(fractional.total(), 2);
        assert_eq!(fractional.due_by(Duration::from_millis(1999)), 1);
        assert_eq!(fractional.due_by(Duration::from_secs(2)), 2);
    }

    #[test]
    fn the_plan_is_reproducible_and_never_pays_oneself() {
        let draw = |seed| {
            let mut p = Planner::new(seed, 3, (100, 2000), 0.25, 50_000_000);
            (0..2000).map(|_| p.next_payment()).collect::<Vec<_>>()
        };
        let (a, b, c) = (draw(7), draw(7), draw(8));
        assert_eq!(a, b, "the same seed gives the same run");
        assert_ne!(a, c, "another seed gives another run");
        for (i, p) in a.iter().enumerate() {
            assert_eq!(p.index, i as u64);
            assert_ne!(p.payer, p.payee);
            assert!(p.payer < 3 && p.payee < 3);
            if p.unaffordable {
                assert_eq!(p.amount_minor, 50_000_000);
            } else {
                assert!((100..=2000).contains(&p.amount_minor));
            }
        }
        let unaffordable = a.iter().filter(|p| p.unaffordable).count();
        assert!((400..600).contains(&unaffordable), "share 0.25 of 2000, got {unaffordable}");
        for payee in 0..3 {
            assert!(a.iter().any(|p| p.payee == payee), "every account is paid sometimes");
        }
    }

    #[test]
    fn amounts_are_printed_with_two_decimals() {
        assert_eq!(format_minor(100), "1.00");
        assert_eq!(format_minor(1234), "12.34");
        assert_eq!(format_minor(5), "0.05");
        assert_eq!(format_minor(100_000_000), "1000000.00");
    }
}
