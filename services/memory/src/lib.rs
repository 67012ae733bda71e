//! In-memory twins of the ports: what the simulator runs the services against, and what plain
//! unit tests use when a real PostgreSQL would only slow them down.
//!
//! Each twin keeps the promises its trait documents (the same contract as the real adapter) and
//! nothing more. They work both inside madsim (`--cfg madsim`: seeded randomness, simulated time)
//! and outside it (OS entropy and clock).
//!
//! Crash semantics: a twin's state lives wherever its value lives. A store created inside a madsim
//! node dies with the node. A store created by the simulator and handed to the node (it is `Clone`,
//! clones share state) survives a node kill/restart, like a database survives its client: that is
//! the "durable" half. Only what a call committed is in it — a batch is all or nothing — so a crash
//! can never leave half a settlement behind. [`MemoryLedgerStore::snapshot`] /
//! [`MemoryLedgerStore::restore`] model a disk that is copied and brought back.
//!
//! Architecture invariant: depends on the domain core, the ports and the wire types only; no real
//! IO, no threads, no `HashMap` iteration that could make a simulation run depend on hash order.

pub mod balance_cache;
pub mod event_log;
pub mod idempotency;
pub mod ledger;
pub mod notifications;
mod outbox;
pub mod payments;
pub mod runtime;

pub use balance_cache::MemoryBalanceCache;
pub use event_log::{MemoryConsumer, MemoryEventLog};
pub use idempotency::MemoryIdempotencyStore;
pub use ledger::{LedgerSnapshot, MemoryLedgerStore};
pub use notifications::MemoryNotificationStore;
pub use payments::{MemoryPaymentStore, PaymentSnapshot};
pub use runtime::{SeededIds, SimClock};
