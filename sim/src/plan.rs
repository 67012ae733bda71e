//! Fault plans: the declarative TOML files in `fault-plans/` (format in `fault-plans/README.md`),
//! parsed and validated here, and the [`Schedule`] a plan turns into for one seed.
//!
//! Promises:
//! - [`Plan::parse`] accepts exactly the documented format: unknown keys, unknown fault kinds,
//!   empty or inverted ranges, probabilities outside `[0, 1]`, a partition of a node from itself,
//!   two entries aimed at the same target and a swarm asking for more faults than it lists are
//!   refused with an error naming the file's problem (never a panic);
//! - [`Schedule::draw`] is a pure function of the plan and the random numbers it is given: under
//!   madsim pass `madsim::rand::thread_rng()` and the same seed gives the same timeline. Every
//!   fault that starts in the safety phase stops by its end (the liveness phase runs healed); the
//!   episodes of one entry never overlap; events come sorted by time (ties keep draw order).
//!
//! This module is plain Rust (no madsim API), so it builds and is unit-tested in the normal build.

use std::collections::BTreeSet;
use std::fmt;
use std::path::Path;
use std::time::Duration;

use madsim::rand::Rng;
use serde::Deserialize;

/// Longest safety phase or liveness bound a plan may ask for (simulated time).
pub const PHASE_MS_MAX: u64 = 600_000;
/// Most fault entries in one plan.
pub const FAULTS_MAX: usize = 64;
/// Most events a schedule may hold: a plan whose gaps are so short it would exceed this is refused.
pub const EVENTS_MAX: usize = 20_000;
/// The SVID lifetime when a plan does not name one.
pub const SVID_TTL_MS_DEFAULT: u64 = 10_000;

/// A node of the simulated cluster, as plans name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Node {
    Gateway,
    Payment,
    Account,
    Notification,
    /// The PostgreSQL-like store (ledger, payments, idempotency truth, notifications).
    Database,
    /// The Kafka-like broker.
    Broker,
    /// The Redis-like cache (balances, idempotency fast path).
    Cache,
    /// The SPIRE-like SVID issuer.
    Spire,
}

impl Node {
    pub const ALL: [Node; 8] = [
        Node::Gateway,
        Node::Payment,
        Node::Account,
        Node::Notification,
        Node::Database,
        Node::Broker,
        Node::Cache,
        Node::Spire,
    ];
    pub const SERVICES: [Node; 4] = [Node::Gateway, Node::Payment, Node::Account, Node::Notification];

    /// The name plans use.
    pub const fn name(self) -> &'static str {
        match self {
            Node::Gateway => "gateway",
            Node::Payment => "payment",
            Node::Account => "account",
            Node::Notification => "notification",
            Node::Database => "database",
            Node::Broker => "broker",
            Node::Cache => "cache",
            Node::Spire => "spire",
        }
    }

    pub const fn is_service(self) -> bool {
        matches!(self, Node::Gateway | Node::Payment | Node::Account | Node::Notification)
    }
}

impl fmt::Display for Node {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An inclusive range of milliseconds, written `[min, max]` in a plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "[u64; 2]")]
pub struct MsRange {
    pub min: u64,
    pub max: u64,
}

impl TryFrom<[u64; 2]> for MsRange {
    type Error = String;

    fn try_from([min, max]: [u64; 2]) -> Result<MsRange, String> {
        if min > max {
            return Err(format!("range [{min}, {max}] is inverted"));
        }
        if max > PHASE_MS_MAX {
            return Err(format!("range [{min}, {max}] exceeds {PHASE_MS_MAX} ms"));
        }
        Ok(MsRange { min, max })
    }
}

impl MsRange {
    fn draw<R: Rng + ?Sized>(self, rng: &mut R) -> u64 {
        rng.gen_range(self.min..=self.max)
    }
}

/// How often an episodic fault recurs and how long each episode lasts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Episodes {
    /// Quiet time before each episode (drawn per episode).
    pub gap_ms: MsRange,
    /// Length of each episode (drawn per episode).
    pub duration_ms: MsRange,
}

/// One fault entry of a plan (`[[fault]]` with a `kind`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum FaultSpec {
    /// Messages between `a` and `b` (both directions) are dropped during each episode.
    Partition { a: Node, b: Node, gap_ms: MsRange, duration_ms: MsRange },
    /// `node` is killed (in-memory state and in-flight work lost) and restarted after the down time.
    Kill { node: Node, gap_ms: MsRange, down_ms: MsRange },
    /// The broker refuses every publish, poll and commit during each episode.
    BrokerOutage { gap_ms: MsRange, duration_ms: MsRange },
    /// The database refuses every call during each episode (committed state survives).
    DatabaseOutage { gap_ms: MsRange, duration_ms: MsRange },
    /// The cache refuses every call during each episode (its entries survive).
    CacheOutage { gap_ms: MsRange, duration_ms: MsRange },
    /// During each episode the cache acknowledges balance invalidations but loses them, so it keeps
    /// serving balances a settlement should have dropped (until their TTL ends them).
    StaleCache { gap_ms: MsRange, duration_ms: MsRange },
    /// During the safety phase each delivered record is delivered twice with this probability.
    DuplicateDeliveries { probability: f64 },
    /// During the safety phase each delivery from the broker is held back up to `max_ms`.
    Delay { max_ms: u64 },
    /// Forced rebalances of consumer groups (all groups, or `group` only) at drawn moments.
    Rebalance {
        gap_ms: MsRange,
        #[serde(default)]
        group: Option<String>,
    },
    /// A service's wall clock runs off by a drawn offset in `[-max_ms, max_ms]` during each episode
    /// (`node` chosen per episode among the services unless given).
    ClockSkew {
        max_ms: u64,
        gap_ms: MsRange,
        duration_ms: MsRange,
        #[serde(default)]
        node: Option<Node>,
    },
    /// The SVID issuer is unreachable for the SVID TTL plus a drawn `beyond_ttl_ms`, so every SVID
    /// minted before expires during the episode.
    SvidIssuerOutage { gap_ms: MsRange, beyond_ttl_ms: MsRange },
}

/// `[swarm]`: draw a random subset of the listed faults per seed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Swarm {
    /// How many of the listed faults one seed gets, `[min, max]`.
    pub pick: [usize; 2],
}

/// A parsed, validated fault plan.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// How long faults are injected (simulated time).
    pub safety_ms: u64,
    /// After healing, every accepted payment must be terminal within this much simulated time.
    pub liveness_ms: u64,
    /// Lifetime of the SVIDs the simulated issuer mints.
    #[serde(default = "svid_ttl_ms_default")]
    pub svid_ttl_ms: u64,
    #[serde(default)]
    pub swarm: Option<Swarm>,
    #[serde(default, rename = "fault")]
    pub faults: Vec<FaultSpec>,
}

fn svid_ttl_ms_default() -> u64 {
    SVID_TTL_MS_DEFAULT
}

/// Why a plan was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("cannot read {path}: {reason}")]
    Read { path: String, reason: String },
    #[error("{0}")]
    Syntax(String),
    #[error("invalid plan: {0}")]
    Invalid(String),
}

impl Plan {
    /// Parses and validates a plan's TOML text.
    pub fn parse(text: &str) -> Result<Plan, PlanError> {
        let plan: Plan = toml::from_str(text).map_err(|e| PlanError::Syntax(e.to_string()))?;
        plan.validate()?;
        Ok(plan)
    }

    /// Reads, parses and validates a plan file.
    pub fn load(path: &Path) -> Result<Plan, PlanError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| PlanError::Read { path: path.display().to_string(), reason: e.to_string() })?;
        Plan::parse(&text).map_err(|e| match e {
            PlanError::Syntax(m) => PlanError::Syntax(format!("{}: {m}", path.display())),
            PlanError::Invalid(m) => PlanError::Invalid(format!("{}: {m}", path.display())),
            other => other,
        })
    }

    /// The plan called `name` in the repository's `fault-plans/` directory.
    pub fn named(name: &str) -> Result<Plan, PlanError> {
        Plan::load(&plans_dir().join(format!("{name}.toml")))
    }

    fn validate(&self) -> Result<(), PlanError> {
        let invalid = |m: String| Err(PlanError::Invalid(m));
        if self.name.is_empty() || !self.name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            return invalid(format!("name {:?} must be lowercase kebab-case", self.name));
        }
        for (what, ms) in
            [("safety_ms", self.safety_ms), ("liveness_ms", self.liveness_ms), ("svid_ttl_ms", self.svid_ttl_ms)]
        {
            if ms == 0 || ms > PHASE_MS_MAX {
                return invalid(format!("{what} = {ms} must be in 1..={PHASE_MS_MAX}"));
            }
        }
        if self.faults.len() > FAULTS_MAX {
            return invalid(format!("{} faults, at most {FAULTS_MAX}", self.faults.len()));
        }
        let mut targets = BTreeSet::new();
        for (index, fault) in self.faults.iter().enumerate() {
            let at = |m: String| PlanError::Invalid(format!("fault #{} ({}): {m}", index + 1, fault.kind()));
            fault.validate().map_err(at)?;
            if !targets.insert(fault.target()) {
                return Err(at(format!("a second entry aimed at {}", fault.target())));
            }
        }
        if let Some(Swarm { pick: [min, max] }) = self.swarm
            && (min == 0 || min > max || max > self.faults.len())
        {
            return invalid(format!(
                "swarm.pick = [{min}, {max}] must satisfy 1 <= min <= max <= {} (the faults listed)",
                self.faults.len()
            ));
        }
        Ok(())
    }

    pub fn safety(&self) -> Duration {
        Duration::from_millis(self.safety_ms)
    }

    pub fn liveness(&self) -> Duration {
        Duration::from_millis(self.liveness_ms)
    }

    pub fn svid_ttl(&self) -> Duration {
        Duration::from_millis(self.svid_ttl_ms)
    }
}

/// The repository's `fault-plans/` directory.
pub fn plans_dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join("fault-plans")
}

/// The names of every plan in `fault-plans/`, sorted.
pub fn plan_names() -> Result<Vec<String>, PlanError> {
    let dir = plans_dir();
    let read = |e: std::io::Error| PlanError::Read { path: dir.display().to_string(), reason: e.to_string() };
    let mut names = Vec::new();
    for entry in std::fs::read_dir(&dir).map_err(read)? {
        let path = entry.map_err(read)?.path();
        if path.extension().is_some_and(|e| e == "toml")
            && let Some(stem) = path.file_stem().and_then(|s| s.to_str())
        {
            names.push(stem.to_owned());
        }
    }
    names.sort();
    Ok(names)
}

impl FaultSpec {
    /// The kind as written in a plan.
    pub fn kind(&self) -> &'static str {
        match self {
            FaultSpec::Partition { .. } => "partition",
            FaultSpec::Kill { .. } => "kill",
            FaultSpec::BrokerOutage { .. } => "broker_outage",
            FaultSpec::DatabaseOutage { .. } => "database_outage",
            FaultSpec::CacheOutage { .. } => "cache_outage",
            FaultSpec::StaleCache { .. } => "stale_cache",
            FaultSpec::DuplicateDeliveries { .. } => "duplicate_deliveries",
            FaultSpec::Delay { .. } => "delay",
            FaultSpec::Rebalance { .. } => "rebalance",
            FaultSpec::ClockSkew { .. } => "clock_skew",
            FaultSpec::SvidIssuerOutage { .. } => "svid_issuer_outage",
        }
    }

    /// What the entry aims at: two entries with one target would fight over it.
    fn target(&self) -> String {
        match self {
            FaultSpec::Partition { a, b, .. } => {
                let (x, y) = if a <= b { (a, b) } else { (b, a) };
                format!("the link {x}-{y}")
            }
            FaultSpec::Kill { node, .. } => format!("node {node}"),
            FaultSpec::ClockSkew { node: Some(node), .. } => format!("the clock of {node}"),
            FaultSpec::ClockSkew { node: None, .. } => "the service clocks".to_owned(),
            FaultSpec::Rebalance { group, .. } => {
                format!("rebalances of {}", group.as_deref().unwrap_or("every group"))
            }
            other => other.kind().to_owned(),
        }
    }

    fn validate(&self) -> Result<(), String> {
        let positive = |what: &str, r: &MsRange| {
            if r.min == 0 {
                Err(format!("{what} must not include 0 (a zero gap or episode is meaningless)"))
            } else {
                Ok(())
            }
        };
        match self {
            FaultSpec::Partition { a, b, gap_ms, duration_ms } => {
                if a == b {
                    return Err(format!("partition of {a} from itself"));
                }
                positive("gap_ms", gap_ms)?;
                positive("duration_ms", duration_ms)
            }
            FaultSpec::Kill { gap_ms, down_ms, .. } => {
                positive("gap_ms", gap_ms)?;
                positive("down_ms", down_ms)
            }
            FaultSpec::BrokerOutage { gap_ms, duration_ms }
            | FaultSpec::DatabaseOutage { gap_ms, duration_ms }
            | FaultSpec::CacheOutage { gap_ms, duration_ms }
            | FaultSpec::StaleCache { gap_ms, duration_ms } => {
                positive("gap_ms", gap_ms)?;
                positive("duration_ms", duration_ms)
            }
            FaultSpec::DuplicateDeliveries { probability } => {
                if (0.0..=1.0).contains(probability) {
                    Ok(())
                } else {
                    Err(format!("probability {probability} is outside [0, 1]"))
                }
            }
            FaultSpec::Delay { max_ms } => {
                if (1..=PHASE_MS_MAX).contains(max_ms) {
                    Ok(())
                } else {
                    Err(format!("max_ms {max_ms} must be in 1..={PHASE_MS_MAX}"))
                }
            }
            FaultSpec::Rebalance { gap_ms, group } => {
                if group.as_deref() == Some("") {
                    return Err("group must not be empty".to_owned());
                }
                positive("gap_ms", gap_ms)
            }
            FaultSpec::ClockSkew { max_ms, gap_ms, duration_ms, node } => {
                if let Some(node) = node
                    && !node.is_service()
                {
                    return Err(format!("clock skew of {node}: only services read a skewed clock"));
                }
                if *max_ms == 0 || *max_ms > PHASE_MS_MAX {
                    return Err(format!("max_ms {max_ms} must be in 1..={PHASE_MS_MAX}"));
                }
                positive("gap_ms", gap_ms)?;
                positive("duration_ms", duration_ms)
            }
            FaultSpec::SvidIssuerOutage { gap_ms, .. } => positive("gap_ms", gap_ms),
        }
    }
}

/// A fault as it is switched on or off.
#[derive(Debug, Clone, PartialEq)]
pub enum Fault {
    Partition {
        a: Node,
        b: Node,
    },
    /// Start = kill, Stop = restart.
    Kill {
        node: Node,
    },
    BrokerOutage,
    DatabaseOutage,
    CacheOutage,
    /// Balance invalidations lost while on.
    StaleCache,
    DuplicateDeliveries {
        probability: f64,
    },
    Delay {
        max: Duration,
    },
    /// Instantaneous ([`Action::Trigger`]).
    Rebalance {
        group: Option<String>,
    },
    /// `offset_ms` is added to `node`'s wall clock while on.
    ClockSkew {
        node: Node,
        offset_ms: i64,
    },
    SvidIssuerOutage,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Start,
    Stop,
    /// An instantaneous fault (a forced rebalance).
    Trigger,
}

/// At `at` (from the start of the run): `action` the `fault`. `entry` is the index of the plan's
/// fault entry it comes from, so a Start and its Stop can be paired.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub at: Duration,
    pub action: Action,
    pub fault: Fault,
    pub entry: usize,
}

/// The timeline of fault events of one plan for one seed.
#[derive(Debug, Clone, PartialEq)]
pub struct Schedule {
    /// The plan's entries this seed uses (all of them unless the plan is a swarm).
    pub entries: Vec<usize>,
    pub events: Vec<Event>,
    pub safety: Duration,
}

impl Schedule {
    /// Draws the timeline of `plan` from `rng` (see the module promises).
    pub fn draw<R: Rng + ?Sized>(plan: &Plan, rng: &mut R) -> Result<Schedule, PlanError> {
        let entries: Vec<usize> = match plan.swarm {
            None => (0..plan.faults.len()).collect(),
            Some(Swarm { pick: [min, max] }) => {
                let count = rng.gen_range(min..=max);
                let mut pool: Vec<usize> = (0..plan.faults.len()).collect();
                let mut picked = Vec::with_capacity(count);
                for _ in 0..count {
                    picked.push(pool.remove(rng.gen_range(0..pool.len())));
                }
                picked.sort_unstable();
                picked
            }
        };
        let safety = plan.safety_ms;
        let mut events = Vec::new();
        for &entry in &entries {
            let spec = &plan.faults[entry];
            let mut push = |at: u64, action: Action, fault: Fault| -> Result<(), PlanError> {
                if events.len() >= EVENTS_MAX {
                    return Err(PlanError::Invalid(format!(
                        "plan {} draws more than {EVENTS_MAX} events: gaps too short for the safety phase",
                        plan.name
                    )));
                }
                events.push(Event { at: Duration::from_millis(at), action, fault, entry });
                Ok(())
            };
            // One episode after another: gap, then [start, stop), stop clipped to the safety end.
            let mut episodes = |gap: MsRange,
                                length: &mut dyn FnMut(&mut R) -> u64,
                                fault: &mut dyn FnMut(&mut R) -> Fault,
                                push: &mut dyn FnMut(u64, Action, Fault) -> Result<(), PlanError>|
             -> Result<(), PlanError> {
                let mut t = 0_u64;
                loop {
                    t += gap.draw(rng);
                    if t >= safety {
                        return Ok(());
                    }
                    let stop = (t + length(rng)).min(safety);
                    let f = fault(rng);
                    push(t, Action::Start, f.clone())?;
                    push(stop, Action::Stop, f)?;
                    t = stop;
                }
            };
            match spec {
                FaultSpec::Partition { a, b, gap_ms, duration_ms } => episodes(
                    *gap_ms,
                    &mut |r| duration_ms.draw(r),
                    &mut |_| Fault::Partition { a: *a, b: *b },
                    &mut push,
                )?,
                FaultSpec::Kill { node, gap_ms, down_ms } => {
                    episodes(*gap_ms, &mut |r| down_ms.draw(r), &mut |_| Fault::Kill { node: *node }, &mut push)?
                }
                FaultSpec::BrokerOutage { gap_ms, duration_ms } => {
                    episodes(*gap_ms, &mut |r| duration_ms.draw(r), &mut |_| Fault::BrokerOutage, &mut push)?
                }
                FaultSpec::DatabaseOutage { gap_ms, duration_ms } => {
                    episodes(*gap_ms, &mut |r| duration_ms.draw(r), &mut |_| Fault::DatabaseOutage, &mut push)?
                }
                FaultSpec::CacheOutage { gap_ms, duration_ms } => {
                    episodes(*gap_ms, &mut |r| duration_ms.draw(r), &mut |_| Fault::CacheOutage, &mut push)?
                }
                FaultSpec::StaleCache { gap_ms, duration_ms } => {
                    episodes(*gap_ms, &mut |r| duration_ms.draw(r), &mut |_| Fault::StaleCache, &mut push)?
                }
                FaultSpec::DuplicateDeliveries { probability } => {
                    let fault = Fault::DuplicateDeliveries { probability: *probability };
                    push(0, Action::Start, fault.clone())?;
                    push(safety, Action::Stop, fault)?;
                }
                FaultSpec::Delay { max_ms } => {
                    let fault = Fault::Delay { max: Duration::from_millis(*max_ms) };
                    push(0, Action::Start, fault.clone())?;
                    push(safety, Action::Stop, fault)?;
                }
                FaultSpec::Rebalance { gap_ms, group } => {
                    let mut t = 0_u64;
                    loop {
                        t += gap_ms.draw(rng);
                        if t >= safety {
                            break;
                        }
                        push(t, Action::Trigger, Fault::Rebalance { group: group.clone() })?;
                    }
                }
                FaultSpec::ClockSkew { max_ms, gap_ms, duration_ms, node } => {
                    let max = i64::try_from(*max_ms).expect("validated <= PHASE_MS_MAX");
                    episodes(
                        *gap_ms,
                        &mut |r| duration_ms.draw(r),
                        &mut |r| {
                            let node = node.unwrap_or_else(|| Node::SERVICES[r.gen_range(0..Node::SERVICES.len())]);
                            Fault::ClockSkew { node, offset_ms: r.gen_range(-max..=max) }
                        },
                        &mut push,
                    )?
                }
                FaultSpec::SvidIssuerOutage { gap_ms, beyond_ttl_ms } => {
                    let ttl = plan.svid_ttl_ms;
                    episodes(
                        *gap_ms,
                        &mut |r| ttl + beyond_ttl_ms.draw(r),
                        &mut |_| Fault::SvidIssuerOutage,
                        &mut push,
                    )?
                }
            }
        }
        // Stable: at equal times, an entry's Stop stays before its next Start.
        events.sort_by_key(|e| e.at);
        Ok(Schedule { entries, events, safety: plan.safety() })
    }

    /// The kinds this seed uses, for the report line.
    pub fn kinds(&self, plan: &Plan) -> Vec<&'static str> {
        let mut kinds: Vec<&'static str> = self.entries.iter().map(|&i| plan.faults[i].kind()).collect();
        kinds.sort_unstable();
        kinds.dedup();
        kinds
    }
}

#[cfg(test)]
mod tests {
    use madsim::rand::RngCore;

    use super::*;

    /// SplitMix64: a tiny seeded generator that works in both builds (madsim's own RNG needs a
    /// running simulation; the normal build's `rand` has no seeded generator enabled here).
    struct SplitMix(u64);

    impl RngCore for SplitMix {
        fn next_u32(&mut self) -> u32 {
            (self.next_u64() >> 32) as u32
        }
        fn next_u64(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }
        fn fill_bytes(&mut self, dest: &mut [u8]) {
            for chunk in dest.chunks_mut(8) {
                let bytes = self.next_u64().to_le_bytes();
                chunk.copy_from_slice(&bytes[..chunk.len()]);
            }
        }
        fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), madsim::rand::Error> {
            self.fill_bytes(dest);
            Ok(())
        }
    }

    const MIXED: &str = r#"
        name = "mixed"
        safety_ms = 10000
        liveness_ms = 20000
        svid_ttl_ms = 3000

        [[fault]]
        kind = "partition"
        a = "payment"
        b = "broker"
        gap_ms = [100, 2000]
        duration_ms = [100, 3000]

        [[fault]]
        kind = "kill"
        node = "account"
        gap_ms = [500, 4000]
        down_ms = [100, 2000]

        [[fault]]
        kind = "rebalance"
        gap_ms = [300, 900]

        [[fault]]
        kind = "duplicate_deliveries"
        probability = 0.1

        [[fault]]
        kind = "clock_skew"
        max_ms = 5000
        gap_ms = [1000, 3000]
        duration_ms = [500, 2000]

        [[fault]]
        kind = "svid_issuer_outage"
        gap_ms = [1000, 2000]
        beyond_ttl_ms = [1, 1000]
    "#;

    fn refused(text: &str) -> String {
        match Plan::parse(text) {
            Ok(plan) => panic!("accepted: {plan:?}"),
            Err(e) => e.to_string(),
        }
    }

    const HEAD: &str = "name = \"p\"\nsafety_ms = 1000\nliveness_ms = 1000\n";

    #[test]
    fn every_committed_plan_parses_and_draws() {
        let names = plan_names().unwrap();
        for required in [
            "partition-broker",
            "partition-database",
            "partition-gateway-payment",
            "kill-gateway",
            "kill-payment",
            "kill-account",
            "kill-notification",
            "broker-outage",
            "database-outage",
            "cache-faults",
            "duplicates-and-delays",
            "rebalance",
            "clock-skew",
            "svid-expiry",
            "swarm",
        ] {
            assert!(names.iter().any(|n| n == required), "fault-plans/{required}.toml is missing");
        }
        for name in names {
            let plan = Plan::named(&name).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(plan.name, name, "a plan's name is its file name");
            assert!(!plan.faults.is_empty(), "{name} injects nothing");
            for seed in 0..20 {
                let schedule = Schedule::draw(&plan, &mut SplitMix(seed)).unwrap();
                assert!(
                    schedule.events.iter().all(|e| e.at <= plan.safety()),
                    "{name}: an event past the safety phase"
                );
            }
        }
    }

    #[test]
    fn a_mixed_plan_parses_into_its_entries() {
        let plan = Plan::parse(MIXED).unwrap();
        assert_eq!(plan.faults.len(), 6);
        assert_eq!(plan.svid_ttl(), Duration::from_millis(3000));
        assert_eq!(
            plan.faults[1],
            FaultSpec::Kill {
                node: Node::Account,
                gap_ms: MsRange { min: 500, max: 4000 },
                down_ms: MsRange { min: 100, max: 2000 }
            }
        );
        assert_eq!(Plan::parse(HEAD).unwrap().svid_ttl_ms, SVID_TTL_MS_DEFAULT);
    }

    #[test]
    fn malformed_plans_are_refused_with_the_reason() {
        let fault = |body: &str| format!("{HEAD}[[fault]]\n{body}\n");
        let cases = [
            (format!("{HEAD}colour = \"red\""), "unknown field `colour`"),
            (fault("kind = \"meteor\"\ngap_ms = [1, 2]"), "unknown variant `meteor`"),
            (fault("kind = \"broker_outage\"\ngap_ms = [5, 2]\nduration_ms = [1, 2]"), "inverted"),
            (fault("kind = \"broker_outage\"\ngap_ms = [0, 2]\nduration_ms = [1, 2]"), "must not include 0"),
            (
                fault("kind = \"kill\"\nnode = \"mainframe\"\ngap_ms = [1, 2]\ndown_ms = [1, 2]"),
                "unknown variant `mainframe`",
            ),
            (
                fault("kind = \"partition\"\na = \"broker\"\nb = \"broker\"\ngap_ms = [1, 2]\nduration_ms = [1, 2]"),
                "from itself",
            ),
            (fault("kind = \"duplicate_deliveries\"\nprobability = 1.5"), "outside [0, 1]"),
            (fault("kind = \"delay\""), "missing field `max_ms`"),
            (fault("kind = \"delay\"\nmax_ms = 10\nextra = 1"), "unknown field `extra`"),
            (
                fault("kind = \"clock_skew\"\nnode = \"broker\"\nmax_ms = 1\ngap_ms = [1, 2]\nduration_ms = [1, 2]"),
                "only services",
            ),
            (format!("{HEAD}[swarm]\npick = [1, 2]\n[[fault]]\nkind = \"delay\"\nmax_ms = 5\n"), "swarm.pick"),
            ("name = \"Bad Name\"\nsafety_ms = 1\nliveness_ms = 1\n".to_owned(), "kebab-case"),
            ("name = \"p\"\nsafety_ms = 0\nliveness_ms = 1\n".to_owned(), "safety_ms = 0"),
        ];
        for (text, expected) in cases {
            let error = refused(&text);
            assert!(error.contains(expected), "{error:?} should mention {expected:?}");
        }
        let twice = fault("kind = \"kill\"\nnode = \"payment\"\ngap_ms = [1, 2]\ndown_ms = [1, 2]");
        let twice =
            format!("{twice}[[fault]]\nkind = \"kill\"\nnode = \"payment\"\ngap_ms = [1, 2]\ndown_ms = [1, 2]\n");
        assert!(refused(&twice).contains("second entry aimed at node payment"));
    }

    #[test]
    fn cache_faults_parse_validate_and_draw_as_episodes() {
        let plan = Plan::parse(&format!(
            "{HEAD}[[fault]]\nkind = \"cache_outage\"\ngap_ms = [10, 100]\nduration_ms = [5, 50]\n\
             [[fault]]\nkind = \"stale_cache\"\ngap_ms = [10, 100]\nduration_ms = [50, 200]\n\
             [[fault]]\nkind = \"partition\"\na = \"account\"\nb = \"cache\"\ngap_ms = [10, 100]\nduration_ms = [5, 50]\n"
        ))
        .unwrap();
        let range = |min, max| MsRange { min, max };
        assert_eq!(plan.faults[0], FaultSpec::CacheOutage { gap_ms: range(10, 100), duration_ms: range(5, 50) });
        assert_eq!(plan.faults[1], FaultSpec::StaleCache { gap_ms: range(10, 100), duration_ms: range(50, 200) });
        assert_eq!(
            plan.faults.iter().map(FaultSpec::kind).collect::<Vec<_>>(),
            ["cache_outage", "stale_cache", "partition"]
        );
        for seed in 0..50 {
            let schedule = Schedule::draw(&plan, &mut SplitMix(seed)).unwrap();
            assert_eq!(schedule.kinds(&plan), ["cache_outage", "partition", "stale_cache"], "seed {seed}");
            for fault in [Fault::CacheOutage, Fault::StaleCache] {
                let events: Vec<&Event> = schedule.events.iter().filter(|e| e.fault == fault).collect();
                assert!(!events.is_empty(), "seed {seed}: no {fault:?}");
                for pair in events.chunks(2) {
                    let [start, stop] = pair else { panic!("seed {seed}: unpaired {fault:?}") };
                    assert_eq!((start.action, stop.action), (Action::Start, Action::Stop));
                    assert!(start.at < stop.at && stop.at <= plan.safety());
                }
            }
        }
        let fault = |body: &str| format!("{HEAD}[[fault]]\n{body}\n");
        for (text, expected) in [
            (fault("kind = \"cache_outage\"\ngap_ms = [0, 2]\nduration_ms = [1, 2]"), "must not include 0"),
            (fault("kind = \"stale_cache\"\ngap_ms = [1, 2]\nduration_ms = [0, 2]"), "must not include 0"),
            (fault("kind = \"stale_cache\"\ngap_ms = [1, 2]"), "missing field `duration_ms`"),
            (fault("kind = \"cache_outage\"\ngap_ms = [1, 2]\nduration_ms = [3, 2]"), "inverted"),
            (
                fault("kind = \"stale_cache\"\ngap_ms = [1, 2]\nduration_ms = [1, 2]\nnode = \"cache\""),
                "unknown field `node`",
            ),
        ] {
            let error = refused(&text);
            assert!(error.contains(expected), "{error:?} should mention {expected:?}");
        }
        let twice = "kind = \"stale_cache\"\ngap_ms = [1, 2]\nduration_ms = [1, 2]";
        assert!(
            refused(&format!("{HEAD}[[fault]]\n{twice}\n[[fault]]\n{twice}\n"))
                .contains("second entry aimed at stale_cache")
        );
    }

    #[test]
    fn a_schedule_is_a_function_of_the_seed() {
        let plan = Plan::parse(MIXED).unwrap();
        let a = Schedule::draw(&plan, &mut SplitMix(7)).unwrap();
        assert_eq!(a, Schedule::draw(&plan, &mut SplitMix(7)).unwrap());
        assert_ne!(a, Schedule::draw(&plan, &mut SplitMix(8)).unwrap());
    }

    #[test]
    fn episodes_heal_by_the_end_of_the_safety_phase_and_never_overlap_per_entry() {
        let plan = Plan::parse(MIXED).unwrap();
        for seed in 0..200 {
            let schedule = Schedule::draw(&plan, &mut SplitMix(seed)).unwrap();
            assert!(schedule.events.windows(2).all(|w| w[0].at <= w[1].at), "sorted");
            for entry in 0..plan.faults.len() {
                let mut on = false;
                for event in schedule.events.iter().filter(|e| e.entry == entry) {
                    assert!(event.at <= plan.safety());
                    match event.action {
                        Action::Start => {
                            assert!(!on, "seed {seed}: entry {entry} starts twice");
                            on = true;
                        }
                        Action::Stop => {
                            assert!(on, "seed {seed}: entry {entry} stops while off");
                            on = false;
                        }
                        Action::Trigger => assert!(matches!(event.fault, Fault::Rebalance { .. })),
                    }
                }
                assert!(!on, "seed {seed}: entry {entry} still on after the safety phase");
            }
            for event in &schedule.events {
                if let Fault::ClockSkew { node, offset_ms } = event.fault {
                    assert!(node.is_service() && offset_ms.abs() <= 5000);
                }
            }
        }
    }

    #[test]
    fn an_issuer_outage_outlasts_the_svid_ttl() {
        let plan = Plan::parse(MIXED).unwrap();
        for seed in 0..100 {
            let schedule = Schedule::draw(&plan, &mut SplitMix(seed)).unwrap();
            let outages: Vec<&Event> = schedule.events.iter().filter(|e| e.fault == Fault::SvidIssuerOutage).collect();
            for pair in outages.chunks(2) {
                let [start, stop] = pair else { panic!("unpaired outage") };
                // Unless clipped by the end of the safety phase, an outage lasts longer than the TTL.
                if stop.at < plan.safety() {
                    assert!(stop.at - start.at > plan.svid_ttl(), "seed {seed}: {start:?} .. {stop:?}");
                }
            }
        }
    }

    #[test]
    fn a_swarm_draws_a_different_mix_per_seed_within_its_bounds() {
        let plan = Plan::parse(&format!("{MIXED}\n[swarm]\npick = [2, 4]\n")).unwrap();
        let mut mixes = BTreeSet::new();
        for seed in 0..100 {
            let schedule = Schedule::draw(&plan, &mut SplitMix(seed)).unwrap();
            assert!((2..=4).contains(&schedule.entries.len()));
            assert!(schedule.events.iter().all(|e| schedule.entries.contains(&e.entry)));
            mixes.insert(schedule.entries.clone());
        }
        assert!(mixes.len() > 10, "only {} different mixes in 100 seeds", mixes.len());
    }

    #[test]
    fn gaps_too_short_for_the_phase_are_refused_at_draw_time() {
        let plan = Plan::parse(
            "name = \"p\"\nsafety_ms = 600000\nliveness_ms = 1\n[[fault]]\nkind = \"rebalance\"\ngap_ms = [1, 1]\n",
        )
        .unwrap();
        let error = Schedule::draw(&plan, &mut SplitMix(1)).unwrap_err().to_string();
        assert!(error.contains("gaps too short"), "{error}");
    }
}
