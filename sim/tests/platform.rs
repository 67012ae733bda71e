//! The whole platform under every fault plan (issue 7): `securepay_sim::platform` runs each
//! (plan, seed) pair — the production services on the simulated infrastructure, a seeded
//! workload sent while the plan's faults play, healing, a bounded liveness phase — and checks
//! SPEC §6 at quiescence; this test sweeps the pairs and prints the report.
//!
//! Environment (all optional):
//! - `SECUREPAY_SIM_PLANS=a,b` — only these plans (default: every plan in `fault-plans/`);
//! - `MADSIM_TEST_SEED` (default 1) and `MADSIM_TEST_NUM` (default 3) — every plan runs seeds
//!   `SEED..SEED+NUM`; the README test command runs 50 per plan;
//! - `MADSIM_TEST_CHECK_DETERMINISM=1` — every pair runs twice and must draw the same randomness;
//! - `SECUREPAY_SIM_PLANT=<bug>` — plant a bug (`securepay_sim::planted`), to replay a catch;
//! - `SECUREPAY_SIM_WORKERS` (default: the machine's cores), `SECUREPAY_SIM_VERBOSE=1` (one line
//!   per seed).
//!
//! A failing seed prints the one command that replays it, e.g.
//! `SECUREPAY_SIM_PLANS=kill-account MADSIM_TEST_SEED=17 MADSIM_TEST_NUM=1 cargo sim --test platform every_plan_keeps_the_invariants`.
#![cfg(madsim)]

use securepay_sim::plan::{Plan, plan_names};
use securepay_sim::planted::PlantedBug;
use securepay_sim::platform::{Sweep, report, run_one, summary, sweep};
use securepay_sim::run::print_line;

fn env_u64(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(value) => value.parse().unwrap_or_else(|_| panic!("{name}={value:?} is not a number")),
        Err(_) => default,
    }
}

fn plans() -> Vec<Plan> {
    let names = match std::env::var("SECUREPAY_SIM_PLANS") {
        Ok(list) => list.split(',').map(str::trim).filter(|n| !n.is_empty()).map(str::to_owned).collect(),
        Err(_) => plan_names().unwrap_or_else(|e| panic!("{e}")),
    };
    names.iter().map(|name| Plan::named(name).unwrap_or_else(|e| panic!("{e}"))).collect()
}

fn planted() -> Option<PlantedBug> {
    let name = std::env::var("SECUREPAY_SIM_PLANT").ok()?;
    let bug = PlantedBug::ALL.into_iter().find(|bug| bug.name() == name);
    Some(bug.unwrap_or_else(|| panic!("SECUREPAY_SIM_PLANT={name:?}: not one of {:?}", PlantedBug::ALL)))
}

#[test]
fn every_plan_keeps_the_invariants() {
    let workers = std::thread::available_parallelism().map_or(1, usize::from);
    let config = Sweep {
        plans: plans(),
        first_seed: env_u64("MADSIM_TEST_SEED", 1),
        seeds: env_u64("MADSIM_TEST_NUM", 3),
        planted: planted(),
        workers: usize::try_from(env_u64("SECUREPAY_SIM_WORKERS", workers as u64)).expect("a small number"),
        check_determinism: std::env::var_os("MADSIM_TEST_CHECK_DETERMINISM").is_some(),
        stop_at_first_failure: false,
    };
    print_line(&format!(
        "platform: {} plans x seeds {}..={}{}{}",
        config.plans.len(),
        config.first_seed,
        config.first_seed + config.seeds - 1,
        config.planted.map(|bug| format!(", planted bug {bug}")).unwrap_or_default(),
        if config.check_determinism { ", each run twice (determinism check)" } else { "" },
    ));
    let runs = sweep(&config);
    if std::env::var_os("SECUREPAY_SIM_VERBOSE").is_some() || runs.len() == 1 {
        runs.iter().for_each(|run| print_line(&summary(run)));
    }
    print_line(&report(&runs));
    let failures: Vec<String> = runs.iter().filter(|r| r.result.is_err()).map(summary).collect();
    assert!(failures.is_empty(), "{} of {} seeds failed:\n{}", failures.len(), runs.len(), failures.join("\n"));
}

/// The replay command does what it says: the same (plan, seed, planted bug) fails again, with the
/// same message (which names that command).
#[test]
fn a_failing_seed_replays_the_same_failure() {
    if std::env::var_os("MADSIM_TEST_CHECK_DETERMINISM").is_some() {
        return; // not a seeded sweep: the determinism replays would only repeat it
    }
    let plan = Plan::named("svid-expiry").unwrap_or_else(|e| panic!("{e}"));
    let first = run_one(&plan, 1, Some(PlantedBug::TrustExpiredSvid), false);
    let again = run_one(&plan, 1, Some(PlantedBug::TrustExpiredSvid), false);
    let Err(message) = &first.result else { panic!("seed 1 of svid-expiry did not catch trust_expired_svid") };
    assert!(
        message.contains("SECUREPAY_SIM_PLANT=trust_expired_svid SECUREPAY_SIM_PLANS=svid-expiry MADSIM_TEST_SEED=1"),
        "the failure names its replay command: {message}"
    );
    assert_eq!(again.result.as_ref().err(), Some(message), "the replay fails the same way");
}
