//! Time and identifiers. Services never read the OS clock or entropy directly: in simulation both
//! come from the seed, which is what makes a run reproducible.

use securepay_core::ids::{EventId, PaymentId};
use time::OffsetDateTime;
use uuid::Uuid;

/// Wall-clock time. Monotonic waits use the runtime's timers (`tokio::time`, simulated by madsim).
pub trait Clock: Send + Sync + 'static {
    /// Now, in UTC. Not guaranteed monotonic (real clocks step; the simulator injects skew).
    fn now(&self) -> OffsetDateTime;
}

/// Fresh identifiers. Promise: never repeats within a process lifetime (real: time-ordered v7
/// UUIDs; simulated: drawn from the seeded RNG, so the same seed mints the same ids).
pub trait Ids: Send + Sync + 'static {
    fn uuid(&self) -> Uuid;

    fn payment_id(&self) -> PaymentId {
        PaymentId::from_uuid(self.uuid())
    }

    fn event_id(&self) -> EventId {
        EventId::from_uuid(self.uuid())
    }
}

/// The OS wall clock: the production [`Clock`] (under madsim `now_utc` reads simulated time).
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> OffsetDateTime {
        OffsetDateTime::now_utc()
    }
}

/// UUIDv7 (RFC 9562: 48-bit Unix milliseconds, then 74 random bits from the OS): the production
/// [`Ids`]. Time-ordered ids go in at the right edge of every b-tree that indexes them (payments,
/// events, notifications, ledger rows), where random v4 ids made each insert touch a random page
/// of an ever larger index — more buffer misses and more full-page images in the WAL as the
/// tables grow.
#[derive(Debug, Clone, Copy, Default)]
pub struct RandomIds;

impl Ids for RandomIds {
    fn uuid(&self) -> Uuid {
        Uuid::now_v7()
    }
}
