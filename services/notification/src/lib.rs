//! The notification service (SPEC §2, §6.7): one notification per event of the payment flow.
//!
//! - [`consumer`]: the consumer loop on `payment.initiated`, `payment.completed` and
//!   `payment.failed` (group `notification-service-group`). Each record is decoded by its topic,
//!   recorded in the [`NotificationStore`](securepay_ports::NotificationStore) (deduplicated by event
//!   id, so redelivery is harmless), each NEW notification logged as one structured line, and the
//!   offsets committed only after the store write. Invalid records are logged, counted and committed
//!   past; a store outage is retried with capped backoff and never committed past.
//! - [`grpc`]: `notification.v1.NotificationService/ListNotifications`, the query behind the
//!   gateway's `GET /api/v1/payments/{id}/notifications` (only the API gateway may call it). The
//!   binary serves it over mTLS; its HTTP port carries only the admin routes (`/health`, `/ready`,
//!   `/metrics`), never data.
//! - [`metrics`]: this service's metric names.
//!
//! Architecture invariant: the consumer and query logic depend on core, ports and proto only (plus the
//! madsim drop-ins), so the simulator runs it against the in-memory twins unchanged.

pub mod consumer;
pub mod grpc;
pub mod metrics;

pub use consumer::{ConsumerConfig, Topics, run_consumer};
pub use grpc::NotificationGrpc;
