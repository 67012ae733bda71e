//! Ids and clock for the twins: seeded under madsim, real outside it.

use std::time::SystemTime;

use securepay_ports::{Clock, Ids};
use time::OffsetDateTime;
use uuid::Uuid;

/// Random v4 UUIDs from `madsim::rand`: the simulation's seeded RNG under `--cfg madsim` (the same
/// seed mints the same ids), the thread's OS-seeded RNG otherwise. Never `getrandom` directly: it
/// bypasses madsim and would make a run irreproducible.
#[derive(Debug, Clone, Copy, Default)]
pub struct SeededIds;

impl Ids for SeededIds {
    fn uuid(&self) -> Uuid {
        let bytes: [u8; 16] = madsim::rand::random();
        uuid::Builder::from_random_bytes(bytes).into_uuid()
    }
}

/// `SystemTime::now()`, which madsim simulates (it starts somewhere in 2022 and moves with
/// simulated time); the OS clock outside simulation.
#[derive(Debug, Clone, Copy, Default)]
pub struct SimClock;

impl Clock for SimClock {
    fn now(&self) -> OffsetDateTime {
        OffsetDateTime::from(SystemTime::now())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_version_4_and_do_not_repeat() {
        let a = SeededIds.uuid();
        let b = SeededIds.uuid();
        assert_ne!(a, b);
        assert_eq!(a.get_version_num(), 4);
    }

    #[test]
    fn the_clock_reads_a_plausible_utc_time() {
        assert!(SimClock.now().year() >= 2022);
    }
}
