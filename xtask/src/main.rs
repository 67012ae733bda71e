//! `cargo xtask`: the SecurePay platform runner (install, start, stop, inspect) and the test command.
//!
//! Code map:
//! - `main.rs`     — the command line;
//! - `platform.rs` — `up`, `down`, `status`, `logs` over all components and services;
//! - `test.rs`     — `cargo xtask test`: test platform up, clippy, tests, simulation, tear-down;
//!   `cargo xtask sim`: the whole-platform simulation sweep with its controls as flags;
//! - `load/`       — `cargo xtask load`: the load generator against a running platform;
//! - `bench/`      — `cargo xtask bench`: pgbench baseline + a ramp of load steps, table/JSON/SVG;
//! - `deny.rs`     — `cargo xtask deny`: the dependency policy with cargo-deny from the tool cache;
//! - `components/` — one file per infrastructure process (PostgreSQL, Redis, Kafka, Prometheus,
//!   ...); see `components/mod.rs` for how to add one;
//! - `services.rs` — the four SecurePay services and their port table;
//! - `ctx.rs` (profiles, state dirs, ports), `install.rs` (apt, tool cache, system users),
//!   `process.rs` (detached processes, pid files), `net.rs` (health probes),
//!   `progress.rs` (step lines with timings), `fsutil.rs` (secrets, atomic writes).
//!
//! Architecture invariant: xtask is automation only — no service depends on it, and it depends
//! only on `securepay-core` (names of topics, schemas, identities) and `securepay-testkit` (the
//! env-var contract with the tests).

use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};

mod apifuzz;
mod bench;
mod builds;
mod components;
mod ctx;
mod deny;
mod fsutil;
mod install;
mod load;
mod net;
mod platform;
mod process;
mod progress;
mod services;
mod system;
mod test;

use ctx::{BuildMode, Ctx, Profile};

/// The SecurePay platform runner: real PostgreSQL 16, Redis 7, Kafka 4 (KRaft), Prometheus (and
/// SPIRE, Jaeger) plus the four services, on loopback, without Docker.
///
/// State lives in `.securepay/` (profile dev) or `.securepay-test/` (profile test) in the
/// workspace root; installs are cached in `${SECUREPAY_CACHE:-~/.cache/securepay}/tools/`.
/// Ports: SPEC's for dev, +10000 for test; override any with `SECUREPAY_<KEY>_PORT` (dev) or
/// `SECUREPAY_TEST_<KEY>_PORT` (test), keys: PG, REDIS, KAFKA, KAFKA_CONTROLLER, PROMETHEUS,
/// SPIRE_SERVER (8181: 8081 is payment's), OTLP_GRPC, OTLP_HTTP, JAEGER_QUERY, JAEGER_QUERY_GRPC,
/// JAEGER_METRICS, GATEWAY, PAYMENT, PAYMENT_ADMIN, ACCOUNT, ACCOUNT_ADMIN, NOTIFICATION.
#[derive(Parser)]
#[command(name = "cargo xtask", bin_name = "cargo xtask", version)]
struct Cli {
    /// Which platform instance to act on.
    #[arg(long, global = true, value_enum, default_value = "dev")]
    profile: Profile,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install what is missing, start every component (then the services), wait until healthy.
    Up {
        /// Only these, comma-separated: pg, redis, kafka, prometheus, ..., services.
        #[arg(long, value_delimiter = ',')]
        only: Vec<String>,
        /// Build and run debug binaries of the services (fast to compile, slow to run); the
        /// default is release. Remembered: later commands of this profile use the same binaries.
        #[arg(long, conflicts_with = "release")]
        debug: bool,
        /// Build and run release binaries (the default; undoes an earlier `--debug`).
        #[arg(long)]
        release: bool,
    },
    /// Stop what this profile started (by pid file) and wait until its ports are closed.
    Down {
        /// Only these, comma-separated (as for `up`).
        #[arg(long, value_delimiter = ',')]
        only: Vec<String>,
    },
    /// Print the status table: component, address, pid, health.
    Status,
    /// Print a component's (or service's) log.
    Logs {
        /// pg, redis, kafka, prometheus, ..., api-gateway, payment-service, ...
        component: String,
        /// Only the last N lines.
        #[arg(long, short = 'n')]
        tail: Option<usize>,
    },
    /// Drive payments at a fixed rate through a running platform's gateway and report throughput,
    /// latency, errors and conservation (load accounts `load-user-*` are seeded as test data).
    Load(load::Args),
    /// Measure the running platform (SPEC §11): pgbench TPC-B on its PostgreSQL, then a ramp of
    /// load steps until payments stop settling or the latency goal breaks; table, JSON and SVG
    /// in `<state dir>/bench/`.
    Bench(bench::Args),
    /// Run everything CI runs: test platform up, clippy, tests, simulation; always tears down.
    Test(test::Args),
    /// Run the whole-platform simulation: fault plans x seeds, with the per-plan report
    /// (`cargo sim --test platform` with the flags turned into its environment).
    Sim(test::SimArgs),
    /// Check the dependency policy (deny.toml) with cargo-deny from the tool cache (built on first
    /// use); default: the offline checks the test command runs. `deny advisories` needs the
    /// RustSec advisory database from the network.
    Deny {
        /// cargo-deny checks: bans, licenses, sources, advisories.
        #[arg(default_values_t = ["bans".to_string(), "licenses".to_string(), "sources".to_string()])]
        checks: Vec<String>,
    },
}

/// The load generator runs on the machine it measures: mimalloc keeps its share small.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Test(args) => return test::run(args),
        Command::Sim(args) => return test::sim(&args),
        _ => {}
    }
    let mut ctx = Ctx::new(cli.profile)?;
    match cli.command {
        Command::Up { only, debug, release } => {
            let selection = platform::Selection::parse(&only)?;
            if debug {
                ctx.set_build_mode(BuildMode::Debug)?;
            } else if release || ctx.profile == Profile::Dev {
                // Without a flag the dev profile keeps what the last `up` chose (release at first).
                let keep = ctx.build;
                ctx.set_build_mode(if release { BuildMode::Release } else { keep })?;
            }
            platform::up(&ctx, &selection)?
        }
        Command::Down { only } => platform::down(&ctx, &platform::Selection::parse(&only)?)?,
        Command::Status => platform::print_status(&ctx),
        Command::Logs { component, tail } => platform::logs(&ctx, &component, tail)?,
        Command::Load(args) => return load::run(&ctx, args),
        Command::Bench(args) => return bench::run(&ctx, args),
        Command::Deny { checks } => return deny::run(&ctx, &checks),
        Command::Test(_) | Command::Sim(_) => unreachable!("handled above"),
    }
    Ok(ExitCode::SUCCESS)
}
