//! The checker is not blind (issue 7, item 6): each planted bug (`securepay_sim::planted`) is
//! switched on and its plan swept over seeds 1..=50 until a seed breaks the invariant that bug
//! must break; the test fails if none does, or if the run fails on some other invariant.
//!
//! Run: `cargo sim --test planted` (each hunt prints the seed that caught its bug).
#![cfg(madsim)]

use securepay_sim::plan::Plan;
use securepay_sim::planted::PlantedBug;
use securepay_sim::platform::{Sweep, sweep};
use securepay_sim::run::print_line;

/// The bound: each planted bug is caught within this many seeds.
const SEEDS: u64 = 50;

/// Sweeps `plan` with `bug` planted until a seed fails; that failure must mention `expected`.
fn hunt(bug: PlantedBug, plan: &str, expected: &str) {
    if std::env::var_os("MADSIM_TEST_CHECK_DETERMINISM").is_some() {
        print_line(&format!("planted/{bug}: skipped in determinism replays"));
        return;
    }
    let config = Sweep {
        plans: vec![Plan::named(plan).unwrap_or_else(|e| panic!("{e}"))],
        first_seed: 1,
        seeds: SEEDS,
        planted: Some(bug),
        // One worker: the first failing seed is then the lowest, the same on every machine.
        workers: 1,
        check_determinism: false,
        stop_at_first_failure: true,
    };
    let runs = sweep(&config);
    let Some(caught) = runs.iter().find(|run| run.result.is_err()) else {
        panic!("the planted bug {bug} was not caught within {SEEDS} seeds of plan {plan}");
    };
    let message = caught.result.as_ref().err().cloned().unwrap_or_default();
    assert!(message.contains(expected), "{bug}: seed {} failed, but not with {expected:?}: {message}", caught.seed);
    print_line(&format!("planted/{bug}: caught by plan {plan} on seed {} ({expected})", caught.seed));
}

#[test]
fn planted_trust_expired_svid_is_caught() {
    hunt(PlantedBug::TrustExpiredSvid, "svid-expiry", "served without a valid SVID");
}

#[test]
fn planted_skip_settlement_dedupe_is_caught() {
    hunt(PlantedBug::SkipSettlementDedupe, "duplicates-and-delays", "has 4 ledger rows");
}

#[test]
fn planted_commit_offset_before_db_commit_is_caught() {
    hunt(PlantedBug::CommitOffsetBeforeDbCommit, "kill-account", "ledger verdict None");
}

#[test]
fn planted_cache_decided_debit_is_caught() {
    hunt(PlantedBug::CacheDecidedDebit, "cache-faults", "is at -");
}

#[test]
fn planted_ack_batch_before_commit_is_caught() {
    hunt(PlantedBug::AckBatchBeforeCommit, "kill-payment", "(ledger verdict Some(");
}

#[test]
fn planted_group_commit_ignores_failure_is_caught() {
    hunt(PlantedBug::GroupCommitIgnoresFailure, "partition-database", ", the store has {}");
}

#[test]
fn planted_fresh_key_unchecked_is_caught() {
    hunt(PlantedBug::FreshKeyUnchecked, "cache-faults", "idempotency keys");
}
