//! Known bugs the simulator can plant in the platform, to prove its invariants are not blind
//! (issue 7, item 6). Each is off unless a test switches it on for one run
//! (`platform::run_seed(&plan, Some(bug))`); nothing here is reachable from a service binary.
//!
//! Where each lives: `trust_expired_svid` in the simulated SVID interceptor (`spire`); the other
//! six in the production libraries behind their cargo feature `planted-bugs`, which only this
//! crate's madsim-only dependency lines enable (no production build compiles them) and which is
//! off at run time unless [`crate::infra::Infra::planted`] names the bug:
//! `skip_settlement_dedupe` in the ledger twin the database node serves
//! (`MemoryLedgerStore::plant_skip_dedupe`), `fresh_key_unchecked` in its payment twin
//! (`MemoryPaymentStore::plant_fresh_key_unchecked`), `commit_offset_before_db_commit` and
//! `cache_decided_debit` in the account service's settlement (`SettlementConfig::planted`, see
//! `plant_settlement`; the latter settles through `LedgerStore::settle_funds_checked_by_caller`),
//! `ack_batch_before_commit` in the payment service's outcome consumer
//! (`securepay_payment::consumer::PlantedBugs`, see `plant_outcome_consumer`), and
//! `group_commit_ignores_failure` in its group commit (`GroupCommitConfig::planted_ignore_failure`,
//! see `plant_service`).

use std::fmt;

/// One planted bug and the plan most likely to expose it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PlantedBug {
    /// Servers accept an expired SVID as if it were valid (the SVID invariant must catch it).
    TrustExpiredSvid,
    /// Settlement applies a redelivered `payment.initiated` again instead of recognising it.
    SkipSettlementDedupe,
    /// The settlement consumer commits its offsets BEFORE the settlement's database commit.
    CommitOffsetBeforeDbCommit,
    /// The debit is decided by the cached balance instead of the database's conditional debit.
    CacheDecidedDebit,
    /// The payment service's outcome consumer commits a batch's offsets BEFORE the batch's store
    /// transaction (a kill between loses the batch's outcomes).
    AckBatchBeforeCommit,
    /// The payment service's group commit answers a batch whose transaction failed as committed
    /// (clients are told 201 for payments that were never written).
    GroupCommitIgnoresFailure,
    /// The payment store writes a key's record on a payment insert without looking for one the
    /// key already has (a duplicate the Redis fast path missed writes a second payment).
    FreshKeyUnchecked,
}

impl PlantedBug {
    /// Every planted bug, in a fixed order.
    pub const ALL: [PlantedBug; 7] = [
        PlantedBug::TrustExpiredSvid,
        PlantedBug::SkipSettlementDedupe,
        PlantedBug::CommitOffsetBeforeDbCommit,
        PlantedBug::CacheDecidedDebit,
        PlantedBug::AckBatchBeforeCommit,
        PlantedBug::GroupCommitIgnoresFailure,
        PlantedBug::FreshKeyUnchecked,
    ];

    /// The switch's name (snake_case), as reports and the README spell it.
    pub fn name(self) -> &'static str {
        match self {
            PlantedBug::TrustExpiredSvid => "trust_expired_svid",
            PlantedBug::SkipSettlementDedupe => "skip_settlement_dedupe",
            PlantedBug::CommitOffsetBeforeDbCommit => "commit_offset_before_db_commit",
            PlantedBug::CacheDecidedDebit => "cache_decided_debit",
            PlantedBug::AckBatchBeforeCommit => "ack_batch_before_commit",
            PlantedBug::GroupCommitIgnoresFailure => "group_commit_ignores_failure",
            PlantedBug::FreshKeyUnchecked => "fresh_key_unchecked",
        }
    }
}

impl fmt::Display for PlantedBug {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// `config` (the account service's settlement configuration) for a run with `planted`: the
/// settlement's planted switch is on when the run plants [`PlantedBug::CommitOffsetBeforeDbCommit`]
/// or [`PlantedBug::CacheDecidedDebit`] (the `planted-bugs` feature exists only in the madsim build).
#[cfg(madsim)]
pub fn plant_settlement(
    mut config: securepay_account::SettlementConfig,
    planted: Option<PlantedBug>,
) -> securepay_account::SettlementConfig {
    config.planted = securepay_account::PlantedBugs {
        commit_offsets_first: planted == Some(PlantedBug::CommitOffsetBeforeDbCommit),
        cache_decides_debit: planted == Some(PlantedBug::CacheDecidedDebit),
    };
    config
}

/// `config` (the payment service's outcome consumer configuration) for a run with `planted`: its
/// planted switch is on when the run plants [`PlantedBug::AckBatchBeforeCommit`].
#[cfg(madsim)]
pub fn plant_outcome_consumer(
    mut config: securepay_payment::ConsumerConfig,
    planted: Option<PlantedBug>,
) -> securepay_payment::ConsumerConfig {
    config.planted = securepay_payment::consumer::PlantedBugs {
        ack_batch_before_commit: planted == Some(PlantedBug::AckBatchBeforeCommit),
    };
    config
}

/// `config` (the payment service's configuration) for a run with `planted`: its group commit's
/// planted switch is on when the run plants [`PlantedBug::GroupCommitIgnoresFailure`].
#[cfg(madsim)]
pub fn plant_service(
    mut config: securepay_payment::ServiceConfig,
    planted: Option<PlantedBug>,
) -> securepay_payment::ServiceConfig {
    config.group_commit.planted_ignore_failure = planted == Some(PlantedBug::GroupCommitIgnoresFailure);
    config
}
