//! `cargo xtask test`: the one test command (README, CI).
//!
//! 1. brings up the infrastructure in the TEST profile (own ports, own state dir: a developer's
//!    running dev platform is never touched);
//! 2. exports `securepay_testkit::var::*` and `SECUREPAY_INFRA_REQUIRED=1`, so an integration test
//!    whose component is missing fails instead of skipping;
//! 3. runs clippy, `cargo deny check bans licenses sources` (deny.toml), the `promtool` checks of
//!    the alert rules and their unit tests, `cargo test --workspace`, then the madsim simulation
//!    tests;
//! 4. always tears the test platform down (also after a failure, Ctrl-C or SIGTERM), prints one
//!    summary line per stage and exits non-zero if any stage failed.

use std::path::Path;
use std::process::{Command, ExitCode};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Instant;

use anyhow::{Context, Result};
use securepay_testkit::var;

use crate::components::registry;
use crate::ctx::{Ctx, Profile};
use crate::platform::{self, Selection};

#[derive(clap::Args)]
pub struct Args {
    /// Skip `cargo clippy --workspace --all-targets -- -D warnings`.
    #[arg(long)]
    skip_clippy: bool,
    /// Skip `cargo test --workspace`.
    #[arg(long)]
    skip_unit: bool,
    /// Skip the API fuzzing (schemathesis against the running test gateway).
    #[arg(long)]
    skip_api_fuzz: bool,
    /// Skip the deterministic simulation tests (`cargo sim`).
    #[arg(long)]
    skip_sim: bool,
    /// Leave the test platform running afterwards (faster reruns; `cargo xtask --profile test down`).
    #[arg(long)]
    keep_up: bool,
    /// Extra arguments for `cargo test` (with `-p`/`--package`, `--workspace` is dropped).
    #[arg(last = true)]
    cargo_test_args: Vec<String>,
}

/// `cargo xtask sim`: the controls of the platform sweep (`sim/tests/platform.rs`).
#[derive(clap::Args)]
pub struct SimArgs {
    /// Only these fault plans (comma-separated names from `fault-plans/`); default: every plan.
    #[arg(long, value_delimiter = ',')]
    plan: Vec<String>,
    /// The first seed.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Seeds per plan (`--seed`, `--seed + 1`, ...).
    #[arg(long, default_value_t = 5)]
    seeds: u64,
    /// Plant a known bug: trust_expired_svid, skip_settlement_dedupe,
    /// commit_offset_before_db_commit, cache_decided_debit, ack_batch_before_commit,
    /// group_commit_ignores_failure or fresh_key_unchecked.
    #[arg(long)]
    plant: Option<String>,
    /// Run every (plan, seed) twice and fail if the two runs differ.
    #[arg(long)]
    check_determinism: bool,
    /// One summary line per seed.
    #[arg(long)]
    verbose: bool,
}

/// Runs the platform sweep as `args` say; its exit status is the sweep's.
pub fn sim(args: &SimArgs) -> Result<ExitCode> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().context("xtask lives in the workspace")?;
    let mut cmd = sim_command(&cargo);
    cmd.current_dir(root)
        .args(["--test", "platform", PLATFORM_SWEEP])
        .env("MADSIM_TEST_SEED", args.seed.to_string())
        .env("MADSIM_TEST_NUM", args.seeds.to_string());
    if !args.plan.is_empty() {
        cmd.env("SECUREPAY_SIM_PLANS", args.plan.join(","));
    }
    if let Some(bug) = &args.plant {
        cmd.env("SECUREPAY_SIM_PLANT", bug);
    }
    if args.check_determinism {
        cmd.env("MADSIM_TEST_CHECK_DETERMINISM", "1");
    }
    if args.verbose {
        cmd.env("SECUREPAY_SIM_VERBOSE", "1");
    }
    let status = cmd.status().context("running cargo test for the simulator")?;
    Ok(if status.success() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

enum Outcome {
    Passed,
    Failed(String),
    Skipped(&'static str),
}

struct Stage {
    name: &'static str,
    outcome: Outcome,
    secs: f64,
}

pub fn run(args: Args) -> Result<ExitCode> {
    let ctx = Ctx::new(Profile::Test)?;
    let interrupted = Arc::new(AtomicBool::new(false));
    let current_child = Arc::new(AtomicU32::new(0));
    {
        let (interrupted, current_child) = (interrupted.clone(), current_child.clone());
        ctrlc::set_handler(move || {
            interrupted.store(true, Ordering::SeqCst);
            // SIGINT from a terminal reaches the stage's cargo too; SIGTERM (CI) only reaches us.
            let pid = current_child.load(Ordering::SeqCst);
            if pid != 0 {
                let _ = crate::process::signal(pid, "TERM");
            }
        })?;
    }

    let mut stages = Vec::new();
    let started = Instant::now();
    timed(&mut stages, "build prerequisites", || build_prerequisites(&ctx).map_err(|e| format!("{e:#}")));
    // Everything, the four services included: the end-to-end tests (xtask/tests/e2e.rs) drive the
    // stack through the gateway; the other integration tests start what they need themselves.
    let platform_up =
        timed(&mut stages, "test platform up", || platform::up(&ctx, &Selection::all()).map_err(|e| format!("{e:#}")));

    let env = if platform_up { test_env(&ctx)? } else { Vec::new() };
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let runner = StageRunner { ctx: &ctx, env: &env, interrupted: &interrupted, current_child: &current_child };

    if args.skip_clippy {
        skip(&mut stages, "fmt + clippy", "--skip-clippy");
    } else {
        let mut fmt = Command::new(&cargo);
        fmt.args(["fmt", "--all", "--check"]);
        let mut clippy = Command::new(&cargo);
        clippy.args(["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"]);
        runner.stage(&mut stages, "fmt + clippy", vec![fmt, clippy]);
    }

    // The dependency policy (deny.toml), offline: seconds, once cargo-deny is in the tool cache.
    match crate::deny::check_command(&ctx) {
        Ok(deny) => runner.stage(&mut stages, "cargo deny", vec![deny]),
        Err(e) => {
            timed(&mut stages, "cargo deny", || Err(format!("{e:#}")));
        }
    }

    // Seconds, and independent of the platform: the alert rules parse and their unit tests pass.
    match crate::system::ensure(&ctx, crate::system::Step::Prometheus)
        .and_then(|()| crate::components::prometheus::promtool_checks(&ctx))
    {
        Ok(commands) => runner.stage(&mut stages, "promtool", commands),
        Err(e) => {
            timed(&mut stages, "promtool", || Err(format!("{e:#}")));
        }
    }

    if args.skip_unit {
        skip(&mut stages, "cargo test", "--skip-unit");
    } else if !platform_up {
        skip(&mut stages, "cargo test", "the test platform did not come up");
    } else {
        let mut cmd = Command::new(&cargo);
        cmd.arg("test");
        if !args.cargo_test_args.iter().any(|a| a == "-p" || a.starts_with("--package")) {
            cmd.arg("--workspace");
        }
        cmd.args(&args.cargo_test_args);
        runner.stage(&mut stages, "cargo test", vec![cmd]);
    }

    if args.skip_api_fuzz {
        skip(&mut stages, "api fuzzing", "--skip-api-fuzz");
    } else if !platform_up {
        skip(&mut stages, "api fuzzing", "the test platform did not come up");
    } else if !interrupted.load(Ordering::SeqCst) {
        timed(&mut stages, "api fuzzing", || crate::apifuzz::run(&ctx).map_err(|e| format!("{e:#}")));
    }

    if args.skip_sim {
        skip(&mut stages, "simulation", "--skip-sim");
        skip(&mut stages, "simulation determinism", "--skip-sim");
    } else {
        let first_seed: u64 = env_or("MADSIM_TEST_SEED", 1)?;
        let seed_count: u64 = env_or("MADSIM_TEST_NUM", 20)?;
        let seeds_per_plan: u64 = env_or("SECUREPAY_SIM_SEEDS_PER_PLAN", 50)?;
        let determinism_seeds: u64 = env_or("SECUREPAY_SIM_DETERMINISM_SEEDS", 2)?;
        // Every simulation test but the platform sweep, over the seed range; then the sweep: every
        // fault plan over its own seed range, with the per-plan report.
        let mut others = sim_command(&cargo);
        others.env("MADSIM_TEST_SEED", first_seed.to_string()).env("MADSIM_TEST_NUM", seed_count.to_string()).args([
            "--",
            "--skip",
            PLATFORM_SWEEP,
        ]);
        let mut platform = sim_command(&cargo);
        platform
            .args(["--test", "platform", PLATFORM_SWEEP])
            .env("MADSIM_TEST_SEED", "1")
            .env("MADSIM_TEST_NUM", seeds_per_plan.to_string());
        runner.stage(&mut stages, "simulation", vec![others, platform]);
        // madsim's determinism check runs only the first seed of MADSIM_TEST_NUM (0.2.34), so
        // each seed of the other tests gets its own run, replayed twice and compared; the platform
        // sweep checks its first seeds of EVERY plan the same way, in one run.
        let mut replays: Vec<Command> = (first_seed..first_seed + seed_count)
            .map(|seed| {
                let mut cmd = sim_command(&cargo);
                cmd.args(["--quiet"])
                    .env("MADSIM_TEST_SEED", seed.to_string())
                    .env("MADSIM_TEST_NUM", "1")
                    .env("MADSIM_TEST_CHECK_DETERMINISM", "1")
                    .args(["--", "--skip", PLATFORM_SWEEP]);
                cmd
            })
            .collect();
        let mut platform = sim_command(&cargo);
        platform
            .args(["--quiet", "--test", "platform", PLATFORM_SWEEP])
            .env("MADSIM_TEST_SEED", "1")
            .env("MADSIM_TEST_NUM", determinism_seeds.to_string())
            .env("MADSIM_TEST_CHECK_DETERMINISM", "1");
        replays.push(platform);
        runner.stage(&mut stages, "simulation determinism", replays);
    }

    if args.keep_up && !interrupted.load(Ordering::SeqCst) {
        eprintln!("test platform left running (--keep-up); stop it with `cargo xtask --profile test down`");
    } else {
        timed(&mut stages, "test platform down", || {
            platform::down(&ctx, &Selection::all()).map_err(|e| format!("{e:#}"))
        });
    }

    Ok(summary(&stages, started, interrupted.load(Ordering::SeqCst)))
}

/// Native build dependencies of the workspace (`system::NEEDS`, step `build`), before clippy and
/// the test build need them.
fn build_prerequisites(ctx: &Ctx) -> Result<()> {
    crate::system::ensure(ctx, crate::system::Step::Build)
}

/// The testkit variables for every component, plus the state dir and `INFRA_REQUIRED=1`.
fn test_env(ctx: &Ctx) -> Result<Vec<(String, String)>> {
    let mut env = vec![
        (var::INFRA_REQUIRED.to_string(), "1".to_string()),
        (var::STATE_DIR.to_string(), ctx.state.display().to_string()),
    ];
    for c in registry() {
        env.extend(c.test_env(ctx)?.into_iter().map(|(k, v)| (k.to_string(), v)));
    }
    env.extend(crate::services::test_env(ctx)?);
    Ok(env)
}

struct StageRunner<'a> {
    ctx: &'a Ctx,
    env: &'a [(String, String)],
    interrupted: &'a AtomicBool,
    current_child: &'a AtomicU32,
}

impl StageRunner<'_> {
    /// Runs the commands in order as one stage; the first failure fails the stage.
    fn stage(&self, stages: &mut Vec<Stage>, name: &'static str, commands: Vec<Command>) {
        if self.interrupted.load(Ordering::SeqCst) {
            return skip(stages, name, "interrupted");
        }
        timed(stages, name, || {
            for mut cmd in commands {
                if self.interrupted.load(Ordering::SeqCst) {
                    return Err("interrupted".into());
                }
                eprintln!("\n==> {name}: {}", describe(&cmd));
                cmd.current_dir(&self.ctx.root).envs(self.env.iter().map(|(k, v)| (k, v)));
                let mut child = cmd.spawn().map_err(|e| format!("spawning cargo: {e}"))?;
                self.current_child.store(child.id(), Ordering::SeqCst);
                let status = child.wait().map_err(|e| format!("waiting for cargo: {e}"));
                self.current_child.store(0, Ordering::SeqCst);
                match status? {
                    s if s.success() => {}
                    s => return Err(format!("`{}` exited with {s}", describe(&cmd))),
                }
            }
            Ok(())
        });
    }
}

/// The platform sweep's test (`sim/tests/platform.rs`): it reads its seeds per plan from
/// `MADSIM_TEST_NUM`, so the other simulation tests run without it and it runs on its own.
const PLATFORM_SWEEP: &str = "every_plan_keeps_the_invariants";

/// `cargo sim`, spelled out: `--cfg madsim` in its own target dir, without the caller's RUSTFLAGS
/// (which would silently replace the cfg).
fn sim_command(cargo: &str) -> Command {
    let mut cmd = Command::new(cargo);
    cmd.args(["test", "-p", "securepay-sim", "--features", "sim"])
        .args(["--config", "target.'cfg(all())'.rustflags=['--cfg','madsim']", "--target-dir", "target/sim"])
        .args(["--profile", "sim"])
        .env_remove("RUSTFLAGS");
    cmd
}

/// A numeric setting from the environment, or its default.
fn env_or(name: &str, default: u64) -> Result<u64> {
    match std::env::var(name) {
        Ok(text) => text.parse().with_context(|| format!("{name} must be a whole number, got {text:?}")),
        Err(_) => Ok(default),
    }
}

fn timed(stages: &mut Vec<Stage>, name: &'static str, f: impl FnOnce() -> Result<(), String>) -> bool {
    let started = Instant::now();
    let outcome = match f() {
        Ok(()) => Outcome::Passed,
        Err(e) => {
            eprintln!("stage {name} failed: {e}");
            Outcome::Failed(e)
        }
    };
    let passed = matches!(outcome, Outcome::Passed);
    stages.push(Stage { name, outcome, secs: started.elapsed().as_secs_f64() });
    passed
}

fn skip(stages: &mut Vec<Stage>, name: &'static str, why: &'static str) {
    stages.push(Stage { name, outcome: Outcome::Skipped(why), secs: 0.0 });
}

fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

fn summary(stages: &[Stage], started: Instant, interrupted: bool) -> ExitCode {
    let failed = stages.iter().filter(|s| matches!(s.outcome, Outcome::Failed(_))).count();
    eprintln!("\n==> summary ({:.0}s)", started.elapsed().as_secs_f64());
    for s in stages {
        let (word, detail) = match &s.outcome {
            Outcome::Passed => ("passed", String::new()),
            Outcome::Failed(why) => ("FAILED", format!("  ({})", why.lines().next().unwrap_or_default())),
            Outcome::Skipped(why) => ("skipped", format!("  ({why})")),
        };
        eprintln!("  {:<24} {word:<8} {:>7.1}s{detail}", s.name, s.secs);
    }
    let passed = stages.iter().filter(|s| matches!(s.outcome, Outcome::Passed)).count();
    let skipped = stages.len() - passed - failed;
    // The plain closing line CI reads: "stages: N passed, N failed, N skipped".
    eprintln!("stages: {passed} passed, {failed} failed, {skipped} skipped");
    if interrupted {
        eprintln!("interrupted");
        return ExitCode::from(130);
    }
    if failed > 0 { ExitCode::FAILURE } else { ExitCode::SUCCESS }
}
