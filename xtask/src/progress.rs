//! Progress output: one line per step, with the time since the command started and the step's
//! own duration, so a slow first start shows where its minutes go.
//!
//! Steps may run on several threads at once (the background builds of [`crate::builds`]): a step
//! line is written as `… what ... ` and completed with `ok (2.1s)` when nothing else was printed in
//! between; otherwise the result goes on a line of its own that repeats the step's name.

use std::io::Write as _;
use std::sync::Mutex;
use std::time::Instant;

use anyhow::Result;

pub struct Progress {
    started: Instant,
    /// Which step's line is open (printed without its result yet), so other output closes it first.
    open: Mutex<Option<u64>>,
    next_id: Mutex<u64>,
}

impl Progress {
    pub fn new() -> Progress {
        Progress { started: Instant::now(), open: Mutex::new(None), next_id: Mutex::new(0) }
    }

    /// Runs `f` as one step of `component`, printing `[ 12.3s] kafka      format storage ... ok (2.1s)`.
    /// The closure must not print; subprocess output goes to log files or into the error.
    pub fn step<T>(&self, component: &str, what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
        let id = {
            let mut next = self.next_id.lock().unwrap_or_else(|e| e.into_inner());
            *next += 1;
            *next
        };
        let step_started = Instant::now();
        {
            let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
            if open.is_some() {
                eprintln!();
            }
            eprint!("{} {component:<21}{what} ... ", self.stamp());
            let _ = std::io::stderr().flush();
            *open = Some(id);
        }
        let result = f();
        let took = step_started.elapsed().as_secs_f64();
        let word = if result.is_ok() { "ok" } else { "FAILED" };
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if *open == Some(id) {
            eprintln!("{word} ({took:.1}s)");
        } else {
            if open.is_some() {
                eprintln!();
            }
            eprintln!("{} {component:<21}{what} ... {word} ({took:.1}s)", self.stamp());
        }
        *open = None;
        result
    }

    /// A line that is not a timed step: `[  0.4s] redis        already running (pid 123)`.
    pub fn note(&self, component: &str, what: &str) {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if open.take().is_some() {
            eprintln!();
        }
        eprintln!("{} {component:<21}{what}", self.stamp());
    }

    pub fn elapsed_secs(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    fn stamp(&self) -> String {
        format!("[{:>6.1}s]", self.elapsed_secs())
    }
}
