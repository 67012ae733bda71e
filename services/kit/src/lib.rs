//! What the four services share and run the same way in production and in simulation:
//!
//! - [`caller`]: who is calling a gRPC method — the peer's SVID (put on the request by the
//!   transport: mTLS in production, the simulated issuer's interceptor in madsim, or the dev-only
//!   plaintext interceptor), authorized per method by `securepay_ports::authorize_peer`, plus the
//!   end-user subject the gateway vouches for.
//! - [`relay`]: the outbox relay (SPEC §6.4): unpublished outbox rows → event log → marked published.
//! - [`metrics`]: the metric names of the contract in `observability/prometheus/rules/`, recorded
//!   through the `metrics` facade (exported by the binaries; a no-op in simulation).
//! - [`trace`]: W3C trace context over gRPC metadata, HTTP and event headers, and the span names
//!   of SPEC §8 (a no-op without the binaries' OpenTelemetry layer, e.g. in simulation).
//!
//! Architecture invariant: depends on core and ports only (plus the madsim drop-ins); no real IO,
//! so the simulator links it unchanged.

pub mod caller;
pub mod metrics;
pub mod relay;
pub mod status;
pub mod trace;

pub use caller::{Caller, PeerSvid, authorize, with_subject};
pub use relay::{RelayConfig, relay_once, run_relay};
