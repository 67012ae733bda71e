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

/// Fresh identifiers. Promise: never repeats within a process lifetime (real: random v4/v7 UUIDs;
/// simulated: drawn from the seeded RNG, so the same seed mints the same ids).
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

/// Random v4 UUIDs from the OS: the production [`Ids`].
#[derive(Debug, Clone, Copy, Default)]
pub struct RandomIds;

impl Ids for RandomIds {
    fn uuid(&self) -> Uuid {
        Uuid::new_v4()
    }
}
