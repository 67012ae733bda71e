//! The event-log port on the real Kafka: [`KafkaEventLog`] (an idempotent `acks=all` producer) and
//! [`KafkaConsumer`] (a consumer-group member that commits only when told to).
//!
//! Promises kept (see `securepay_ports::event_log`): `publish` returns `Ok` only once the broker
//! acknowledged every record; a record's key picks its partition, so one key keeps its order; a
//! consumer never auto-commits, and `commit` is synchronous, so a crash before `commit` returns means
//! redelivery, never loss. rdkafka errors become [`PortError`]s in one place ([`unavailable`]): the
//! driver text goes to the log, never into `Display`.
//!
//! Every consumer exports its lag per partition (`securepay_consumer_lag_records`, see
//! `securepay_kit::metrics`) from librdkafka's statistics, on the thread that polls it.
//!
//! Architecture invariant: depends on the ports (and `kit`'s metric names) only; the simulator (`--cfg madsim`) never builds
//! rdkafka and uses `securepay_memory::MemoryEventLog` instead, checked by the same contract suite
//! (`tests/event_log_contract.rs`).

#[cfg(not(madsim))]
mod real;

#[cfg(not(madsim))]
pub use real::{KafkaConsumer, KafkaEventLog, PUBLISH_TIMEOUT};
