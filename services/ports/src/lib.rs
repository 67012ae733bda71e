//! The IO ports: the small traits SecurePay's services are written against.
//!
//! Each port has a real adapter (PostgreSQL, Redis, Kafka, SPIRE, the OS clock) and a simulated
//! twin (in memory, on madsim's simulated time and seeded randomness). One contract test suite per
//! port runs against both. Every trait states what it promises — atomicity, ordering, delivery —
//! because those promises, not the implementations, are what the money guarantees rest on.
//!
//! Architecture invariant: this crate depends on the domain core only. No adapter, no runtime, no
//! wire format: a port speaks domain types.

pub mod clock;
pub mod error;
pub mod event_log;
pub mod idempotency;
pub mod identity;
pub mod ledger;
pub mod notifications;
pub mod outbox;
pub mod payments;

pub use clock::{Clock, Ids, RandomIds, SystemClock};
pub use error::{PortError, PortResult};
pub use event_log::{ConsumedRecord, EventConsumer, EventLog, Header, OutgoingRecord, TopicPartitionOffset};
pub use idempotency::IdempotencyStore;
pub use identity::{PeerRefusal, Svid, SvidSource, authorize_peer};
pub use ledger::{AccountView, BalanceCache, CachedBalance, LedgerStore, SettlementRequest, SettlementResult};
pub use notifications::{Notification, NotificationKind, NotificationStore, Recorded};
pub use outbox::{Outbox, OutboxEvent};
pub use payments::{IdempotencyCompletion, NewPayment, PaymentStore, TransitionRecord};
