//! Progress output: one line per step, with the time since the command started and the step's
//! own duration, so a slow first start shows where its minutes go.

use std::io::Write as _;
use std::time::Instant;

use anyhow::Result;

pub struct Progress {
    started: Instant,
}

impl Progress {
    pub fn new() -> Progress {
        Progress { started: Instant::now() }
    }

    /// Runs `f` as one step of `component`, printing `[ 12.3s] kafka      format storage ... ok (2.1s)`.
    /// The closure must not print; subprocess output goes to log files or into the error.
    pub fn step<T>(&self, component: &str, what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
        let step_started = Instant::now();
        eprint!("{} {component:<21}{what} ... ", self.stamp());
        let _ = std::io::stderr().flush();
        let result = f();
        let took = step_started.elapsed().as_secs_f64();
        match &result {
            Ok(_) => eprintln!("ok ({took:.1}s)"),
            Err(_) => eprintln!("FAILED ({took:.1}s)"),
        }
        result
    }

    /// A line that is not a timed step: `[  0.4s] redis        already running (pid 123)`.
    pub fn note(&self, component: &str, what: &str) {
        eprintln!("{} {component:<21}{what}", self.stamp());
    }

    pub fn elapsed_secs(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    fn stamp(&self) -> String {
        format!("[{:>6.1}s]", self.elapsed_secs())
    }
}
