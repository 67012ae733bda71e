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
