//! The platform's infrastructure components and the one shape they all share.
//!
//! A component is a single long-running process that `up` installs (cached), configures (in the
//! profile's state dir), spawns detached, health-waits and post-processes (topics, migrations);
//! `down` stops it by its pid file; `status` health-checks it. Everything generic — pid files,
//! logs, port checks, waits, progress lines — lives in [`lifecycle`] and the framework modules, so a
//! component file only says what is specific to it.
//!
//! # Adding a component (SPIRE, Jaeger, ...)
//! 1. Write `components/<name>.rs` with a unit struct implementing [`Component`]. Copy the shape of
//!    `redis.rs` (smallest) or `kafka.rs` (tool cache + post-start step). One process per component:
//!    SPIRE is two (`spire-server`, `spire-agent`), each its own struct.
//! 2. Declare its ports as [`Port`](crate::ctx::Port) constants (dev = SPEC port; the test profile adds
//!    10000, or override per port with `SECUREPAY_<KEY>_PORT` / `SECUREPAY_TEST_<KEY>_PORT`).
//! 3. Add it to [`registry`] in start order. Components that services need at start (SPIRE agent)
//!    go before the services automatically; Prometheus stays last because it collects
//!    every component's [`Component::scrape_targets`].
//! 4. Export what tests need via [`Component::test_env`] (the `securepay_testkit::var` names) and
//!    what services need via [`Component::service_env`] (e.g. `SPIFFE_ENDPOINT_SOCKET`,
//!    `OTEL_EXPORTER_OTLP_ENDPOINT`).
//!
//! Installs go through [`crate::install::cached_tool`] (Go tools: build into the scratch dir it
//! hands you) or declare Debian packages in [`crate::system::NEEDS`] and return their step from
//! [`Component::system_step`]; sub-steps report via `ctx.progress.step`.

use std::process::Command;
use std::time::Duration;

use anyhow::Result;

use crate::ctx::Ctx;

pub mod jaeger;
pub mod kafka;
pub mod lifecycle;
pub mod postgres;
pub mod prometheus;
pub mod redis;
pub mod spire;

/// Every infrastructure component, in start order (`down` stops in reverse).
pub fn registry() -> Vec<Box<dyn Component>> {
    vec![
        Box::new(postgres::Postgres),
        Box::new(redis::Redis),
        Box::new(kafka::Kafka),
        Box::new(spire::SpireServer),
        Box::new(spire::SpireAgent),
        Box::new(jaeger::Jaeger),
        Box::new(prometheus::Prometheus),
    ]
}

/// One Prometheus scrape target on loopback.
pub struct ScrapeTarget {
    pub job: String,
    pub port: u16,
    pub path: &'static str,
}

/// What is specific to one infrastructure process. All methods must be idempotent: `up` runs
/// `install`, `configure` and `after_start` on every invocation that finds the component stopped,
/// and `after_start` also when it is already running.
pub trait Component {
    /// Short name used on the command line (`--only pg`), for pid/log files and data dirs.
    fn name(&self) -> &'static str;
    /// The version that is installed and run (for the status table and cache keys).
    fn version(&self, ctx: &Ctx) -> String;
    /// What a client connects to, for the status table (`127.0.0.1:5432`).
    fn address(&self, ctx: &Ctx) -> Result<String>;
    /// Every port it listens on: must be free before start, are waited closed after stop.
    fn ports(&self, ctx: &Ctx) -> Result<Vec<u16>>;
    /// A substring of the process's command line, so a recycled pid is never mistaken for ours.
    fn process_marker(&self) -> &'static str;

    /// The Debian packages it needs, as a step of `system::NEEDS` (installed before `install`).
    fn system_step(&self) -> Option<crate::system::Step> {
        None
    }
    /// Installs binaries if missing (tool cache). Shared by all profiles.
    fn install(&self, ctx: &Ctx) -> Result<()>;
    /// Writes config and initialises the data dir in the profile's state dir.
    fn configure(&self, ctx: &Ctx) -> Result<()>;
    /// The command that runs the process in the foreground; the framework detaches it.
    fn command(&self, ctx: &Ctx) -> Result<Command>;
    /// `Ok` when the component serves requests; the error says why not.
    fn health(&self, ctx: &Ctx) -> Result<()>;
    /// How long a fresh start may take to become healthy.
    fn startup_timeout(&self) -> Duration {
        Duration::from_secs(60)
    }
    /// Work that needs the running process: topics, migrations, registration entries.
    fn after_start(&self, _ctx: &Ctx) -> Result<()> {
        Ok(())
    }
    /// The signal that asks for a clean, fast shutdown (PostgreSQL: `INT`).
    fn stop_signal(&self) -> &'static str {
        "TERM"
    }
    /// `securepay_testkit::var` names and values, exported by `cargo xtask test`.
    fn test_env(&self, _ctx: &Ctx) -> Result<Vec<(&'static str, String)>> {
        Ok(Vec::new())
    }
    /// Environment the four services get from this component.
    fn service_env(&self, _ctx: &Ctx) -> Result<Vec<(&'static str, String)>> {
        Ok(Vec::new())
    }
    /// Metrics endpoints Prometheus should scrape.
    fn scrape_targets(&self, _ctx: &Ctx) -> Result<Vec<ScrapeTarget>> {
        Ok(Vec::new())
    }
}
