//! Deterministic simulation of SecurePay under madsim.
//!
//! The same service logic and ports as production run on madsim nodes, talking over madsim-tonic,
//! while the harness injects faults drawn from the seed; every run is reproducible from its seed.
//! Build and run it only through the `cargo sim` alias (`--cfg madsim`, own target dir); the `sim`
//! feature refuses to compile without that cfg. Without the feature and the cfg this crate still
//! builds in the normal workspace build (the node code is plain tonic then), so it never rots.
//!
//! - [`plan`]: the fault-plan format of `fault-plans/*.toml` and the seeded [`plan::Schedule`].
//! - [`workload`]: the seeded client workload (accounts, payments, balance reads) as data.
//! - [`clock`]: the skewable `Clock` of a service node.
//! - [`spire`]: issuer-signed SVID tokens and the gRPC interceptors that carry them and turn them
//!   into `securepay_kit::PeerSvid`; under madsim also the issuer node, each node's `SvidSource`
//!   and the SVID invariant's server-side audit.
//! - [`remote`] (madsim only): infrastructure nodes (database, broker, cache) serving the in-memory
//!   twins over the simulated network, and the port clients service nodes use to reach them.
//! - [`http`] (madsim only): the gateway's axum router served over the simulated network.
//! - [`infra`] (madsim only): node addresses, the infrastructure of a run, the ports a service
//!   node connects, and the injector that plays a fault schedule.
//! - [`cluster`] (madsim only): the production service libraries on their nodes (the gateway's
//!   HTTP router included) and the workload's clients.
//! - [`edge`] (madsim only): the dev JWT issuer, the gateway's configuration, the clients' HTTP
//!   requests (hostile probes included) and how they read the answers.
//! - [`ledger_node`]: a ledger node's settlement RPC, backed by any `LedgerStore`.
//! - [`planted`]: the known bugs a test can plant to prove the invariants catch them.
//! - [`platform`] (madsim only): one seed of the whole platform under a plan with the SPEC §6
//!   checks, and the sweep over (plan, seed) pairs with its report.
//! - [`run`] (madsim only): what every simulation test shares — seed, replay command, summary.
//!
//! Architecture invariant: nothing here is linked into a service binary, and nothing here opens real
//! IO: stores are the in-memory twins of `securepay-memory`, randomness is `madsim::rand`.

#[cfg(all(feature = "sim", not(madsim)))]
compile_error!(
    "the `sim` feature needs `--cfg madsim`: run the simulator with `cargo sim` (and no RUSTFLAGS in the environment)"
);

pub mod clock;
#[cfg(madsim)]
pub mod cluster;
#[cfg(madsim)]
pub mod edge;
#[cfg(madsim)]
pub mod http;
#[cfg(madsim)]
pub mod infra;
pub mod ledger_node;
pub mod plan;
pub mod planted;
#[cfg(madsim)]
pub mod platform;
#[cfg(madsim)]
pub mod remote;
#[cfg(madsim)]
pub mod run;
pub mod spire;
pub mod workload;

/// Code generated from `proto/ledger_node.proto`.
#[allow(clippy::all, unreachable_pub, missing_docs)]
pub mod wire {
    tonic::include_proto!("securepay.sim.ledger_node.v1");
}
