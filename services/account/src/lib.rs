//! The account service's logic: it holds the money (SPEC §2, §6.3, §6.5).
//!
//! - [`grpc`]: `securepay.account.v1.AccountService` — `CheckBalance` (the payment service's
//!   advisory pre-check) and `GetBalance` (the owner's read through the gateway). Every call is
//!   authorized per method by the transport's peer SVID (`securepay_kit::authorize`) and per object
//!   (only the account's owner); balances are read cache-aside (Redis, then PostgreSQL) and are
//!   advisory only.
//! - [`settlement`]: the `payment.initiated` consumer. Each batch of events is settled in ONE store
//!   transaction (dedupe, conditional debit, credit, ledger rows, outcome event in the outbox);
//!   records that cannot be decoded or that the store refuses go to the dead-letter topic with their
//!   reason; offsets are committed only after the store committed and the dead letters are durable;
//!   the cache is invalidated after every settlement.
//! - [`metrics`]: the account-local metric names (the shared ones are in `securepay_kit::metrics`).
//!
//! The outbox relay is `securepay_kit::relay::run_relay` over the ledger store's outbox.
//!
//! Transport and tracing: the binary serves [`grpc`] over mTLS only
//! (`securepay_identity::grpc::serve`, which puts the verified peer on each request) and installs
//! OpenTelemetry (`securepay_runtime::init_telemetry`); the handlers and the consumer continue the
//! caller's trace from gRPC metadata and Kafka headers (`securepay_kit::trace`).
//!
//! Architecture invariant: written against the ports only (core, ports, proto, kit, tokio/tonic as
//! madsim drop-ins), so the simulator runs this exact code; the binary (`main.rs`) wires the real
//! adapters. The cache never decides a debit: only `LedgerStore::settle` does.

pub mod grpc;
pub mod metrics;
pub mod settlement;

pub use grpc::{AccountGrpc, CACHE_TTL_S};
#[cfg(feature = "planted-bugs")]
pub use settlement::PlantedBugs;
pub use settlement::{Round, SettlementConfig, Settler, Shutdown, run_settlement};

/// The service's name in metric labels and logs.
pub const SERVICE: &str = "account";
