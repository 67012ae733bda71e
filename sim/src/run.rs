//! What every simulation test shares: the seed, the command that replays it, invariant checks
//! that fail with that command, and the one summary line per seed.

use std::fmt::Display;
use std::io::Write as _;
use std::sync::Once;

/// The seed of the running simulation (`MADSIM_TEST_SEED`, or the one madsim drew).
pub fn seed() -> u64 {
    madsim::runtime::Handle::current().seed()
}

/// The one command that replays this seed of the test target `test` (e.g. `ledger_over_grpc`).
pub fn replay_command(test: &str) -> String {
    format!("MADSIM_TEST_SEED={} cargo sim --test {test}", seed())
}

/// Also prints the replay command when something other than a [`Checker`] panics (an assert in the
/// ledger model, a node's task). Call at the start of the test; installs the hook once per process
/// (madsim runs seeds, and the determinism check's second run, in the same process).
pub fn print_replay_command_on_panic(test: &'static str) {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            previous(info);
            let from_checker = info.payload().downcast_ref::<String>().is_some_and(|m| m.contains(REPLAY_PREFIX));
            if let (false, Ok(handle)) = (from_checker, madsim::runtime::Handle::try_current()) {
                print_line(&format!("{REPLAY_PREFIX}MADSIM_TEST_SEED={} cargo sim --test {test}", handle.seed()));
            }
        }));
    });
}

/// What precedes the replay command in a failure message.
pub const REPLAY_PREFIX: &str = "replay with: ";

/// Writes one line to stderr past the test harness's output capture, so a passing seed's summary
/// is seen too (libtest captures `print!`/`eprint!`, not writes to the stream).
pub fn print_line(line: &str) {
    // Losing a summary line to a closed stderr must not fail the run.
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

/// Checks invariants; the first broken one fails the run with the command that replays it.
#[derive(Debug)]
pub struct Checker {
    /// The replay command, when not the current seed of a `#[madsim::test]` target.
    replay: Option<String>,
    test: &'static str,
    checks: u64,
}

impl Checker {
    /// For a `#[madsim::test]` in target `test`: failures replay the current seed of it.
    pub fn new(test: &'static str) -> Checker {
        Checker { replay: None, test, checks: 0 }
    }

    /// Failures print `replay` as the command that replays them.
    pub fn with_replay(replay: String) -> Checker {
        Checker { replay: Some(replay), test: "", checks: 0 }
    }

    /// Fails the run with `what` (built only on failure) unless `holds`.
    #[track_caller]
    pub fn check<D: Display>(&mut self, holds: bool, what: impl FnOnce() -> D) {
        self.checks += 1;
        if !holds {
            let replay = self.replay.clone().unwrap_or_else(|| replay_command(self.test));
            panic!("invariant broken: {}\n{REPLAY_PREFIX}{replay}", what());
        }
    }

    /// How many checks were made (for the summary line).
    pub fn checks(&self) -> u64 {
        self.checks
    }
}

/// Seconds of REAL time since boot, for throughput lines (`None` where `/proc/uptime` is missing).
/// Inside the simulation `Instant` and `SystemTime` are simulated, and unsafe code is forbidden, so
/// the kernel's counter is read as a file (10 ms resolution; touches no simulated randomness).
pub fn wall_seconds() -> Option<f64> {
    let text = std::fs::read_to_string("/proc/uptime").ok()?;
    text.split_whitespace().next()?.parse().ok()
}
