//! The pure domain of SecurePay.
//!
//! Architecture invariant: no IO, no async, no clock reads, no randomness. Everything here is a
//! deterministic function of its inputs, which is what lets proptest and the simulator hammer it.
//! Time and ids come in as arguments, from the ports.

pub mod identity;
pub mod topology;
