//! securepay-payment: the payment service's logic, written against the ports so it runs the same
//! on real adapters (`main.rs`) and in the simulator.
//!
//! - [`service`]: payment.v1 InitiatePayment / GetPayment — authorize, validate, idempotency,
//!   balance pre-check, then ONE store transaction (payment + outbox event + idempotency
//!   completion), shared by concurrent accepts through [`group_commit`].
//! - [`idempotency`]: how the PostgreSQL truth and the Redis fast path are consulted (SPEC §6.1).
//! - [`accounts`]: the account-service port and its gRPC client (deadline, jittered retries,
//!   [`breaker`]).
//! - [`consumer`]: `payment.completed` / `payment.failed` → terminal state, idempotently.
//! - [`validate`], [`wire`], [`error`]: wire → domain, domain → wire, refusals → status, each once.
//! - [`trace`]: the deterministic `traceparent` an outbox event carries when no OpenTelemetry layer
//!   is installed (simulation); with one, events carry the real span context
//!   (`securepay_kit::trace`). [`metrics`]: what is counted.
//!
//! The outbox relay is `securepay_kit::relay` (the same for both money services).

pub mod accounts;
pub mod breaker;
pub mod consumer;
pub mod error;
pub mod group_commit;
pub mod idempotency;
pub mod metrics;
pub mod service;
pub mod trace;
pub mod validate;
pub mod wire;

pub use accounts::{
    AccountClient, AccountClientConfig, AccountError, Accounts, BalanceCheck, NoInterceptor, plaintext_channel,
};
pub use consumer::{ConsumerConfig, run_outcome_consumer};
pub use error::ServiceError;
pub use service::{PaymentService, REPLAYED_METADATA, ServiceConfig};
