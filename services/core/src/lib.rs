//! The pure domain of SecurePay: money, ids, idempotency, the payment state machine, the ledger
//! model, events, identities and the shared names of the topology.
//!
//! Architecture invariant: no IO, no async, no clock reads, no randomness. Everything here is a
//! deterministic function of its inputs, which is what lets proptest and the simulator hammer it.
//! Time and ids come in as arguments, from the ports.

pub mod events;
pub mod idempotency;
pub mod identity;
pub mod ids;
pub mod ledger;
pub mod money;
pub mod payment;
pub mod topology;
