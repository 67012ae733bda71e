//! Known bugs the simulator can plant in the platform, to prove its invariants are not blind
//! (issue 7, item 6). Each is off unless a test switches it on for one run
//! (`platform::run_seed(&plan, Some(bug))`); nothing here is reachable from a service binary.

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
}

impl PlantedBug {
    /// Every planted bug, in a fixed order.
    pub const ALL: [PlantedBug; 4] = [
        PlantedBug::TrustExpiredSvid,
        PlantedBug::SkipSettlementDedupe,
        PlantedBug::CommitOffsetBeforeDbCommit,
        PlantedBug::CacheDecidedDebit,
    ];

    /// The switch's name (snake_case), as reports and the README spell it.
    pub fn name(self) -> &'static str {
        match self {
            PlantedBug::TrustExpiredSvid => "trust_expired_svid",
            PlantedBug::SkipSettlementDedupe => "skip_settlement_dedupe",
            PlantedBug::CommitOffsetBeforeDbCommit => "commit_offset_before_db_commit",
            PlantedBug::CacheDecidedDebit => "cache_decided_debit",
        }
    }
}

impl fmt::Display for PlantedBug {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}
