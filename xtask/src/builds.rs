//! The long builds of a first start, side by side: SPIRE and Jaeger (Go, from source, into the
//! tool cache) and the four services (cargo), each on its own thread from the first second of
//! `up`, while the components that need none of them (PostgreSQL, Redis, Kafka) install and start.
//! A step that needs a build waits for it ([`Builds::wait`]); nothing built is built twice (the
//! Go tools are cached by version, cargo is incremental), so a second `up` after a failure resumes.
//!
//! While builds run, one progress line every [`VIEW_EVERY`] says where each stands, with an ETA
//! from the previous build of the same thing (`<cache>/build-times.txt`), e.g.
//! `[ 300.0s] building             spire 5:00 of ≈19:30 · jaeger done in 7:40 · services 5:00 of ≈6:00`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::Scope;
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow};

use crate::ctx::Ctx;

/// How often the one progress view is printed while any build runs.
const VIEW_EVERY: Duration = Duration::from_secs(30);

/// One build running in the background.
struct Build {
    name: &'static str,
    started: Instant,
    /// The previous duration of this build (same version/profile), for the ETA.
    previous: Option<Duration>,
    result: Mutex<Option<Result<(), String>>>,
    finished: Condvar,
    took: Mutex<Option<Duration>>,
}

/// A build to start: its name in the progress view, its key in the timing file, and the work.
pub struct Job<'a> {
    pub name: &'static str,
    /// Key of the previous-duration record: the tool and version, or the cargo profile.
    pub timing_key: String,
    /// Used when no earlier build of this key was timed on this machine.
    pub default_estimate: Duration,
    pub run: Box<dyn FnOnce() -> Result<()> + Send + 'a>,
}

/// The running builds of one `up`.
pub struct Builds {
    builds: Vec<Arc<Build>>,
}

impl Builds {
    /// Starts every job on its own scoped thread, plus the progress view.
    pub fn start<'scope, 'env>(scope: &'scope Scope<'scope, 'env>, ctx: &'env Ctx, jobs: Vec<Job<'env>>) -> Builds {
        let timings = ctx.cache.join("build-times.txt");
        let known = read_timings(&timings);
        let mut builds = Vec::new();
        for job in jobs {
            let last = known.get(&job.timing_key).copied();
            let previous = last.or(Some(job.default_estimate));
            let build = Arc::new(Build {
                name: job.name,
                started: Instant::now(),
                previous,
                result: Mutex::new(None),
                finished: Condvar::new(),
                took: Mutex::new(None),
            });
            ctx.progress.note(
                job.name,
                &match last {
                    Some(last) => format!("build started in the background (took {} last time)", clock(last)),
                    None => format!(
                        "build started in the background (first build here: ≈{} on 2 cores)",
                        clock(job.default_estimate)
                    ),
                },
            );
            let (b, key, file, run) = (build.clone(), job.timing_key, timings.clone(), job.run);
            scope.spawn(move || {
                let result = run().map_err(|e| format!("{e:#}"));
                let took = b.started.elapsed();
                if result.is_ok() {
                    record_timing(&file, &key, took);
                }
                *b.took.lock().unwrap_or_else(|e| e.into_inner()) = Some(took);
                ctx.progress.note(
                    b.name,
                    &match &result {
                        Ok(()) => format!("build done in {}", clock(took)),
                        Err(_) => format!("build FAILED after {}", clock(took)),
                    },
                );
                *b.result.lock().unwrap_or_else(|e| e.into_inner()) = Some(result);
                b.finished.notify_all();
            });
            builds.push(build);
        }
        if !builds.is_empty() {
            let watched = builds.clone();
            scope.spawn(move || view(ctx, &watched));
        }
        Builds { builds }
    }

    /// Blocks until build `name` finished; its error if it failed. A build never started is `Ok`.
    pub fn wait(&self, name: &str) -> Result<()> {
        let Some(build) = self.builds.iter().find(|b| b.name == name) else { return Ok(()) };
        let mut result = build.result.lock().unwrap_or_else(|e| e.into_inner());
        while result.is_none() {
            result = build.finished.wait(result).unwrap_or_else(|e| e.into_inner());
        }
        match result.as_ref() {
            Some(Ok(())) => Ok(()),
            Some(Err(e)) => Err(anyhow!("the {name} build failed: {e}")),
            None => unreachable!("loop exits only with a result"),
        }
    }

    /// Waits for every build (the scope would anyway) and returns the first failure.
    pub fn wait_all(&self) -> Result<()> {
        let mut first = None;
        for b in &self.builds {
            if let Err(e) = self.wait(b.name) {
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    }
}

/// Prints the one progress view every [`VIEW_EVERY`] until every build has finished.
fn view(ctx: &Ctx, builds: &[Arc<Build>]) {
    let mut next = Instant::now() + VIEW_EVERY;
    loop {
        let done = builds.iter().all(|b| b.result.lock().is_ok_and(|r| r.is_some()));
        if done {
            return;
        }
        if Instant::now() >= next {
            let parts: Vec<String> = builds.iter().map(|b| describe(b)).collect();
            ctx.progress.note("building", &parts.join(" · "));
            next += VIEW_EVERY;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn describe(b: &Build) -> String {
    if let Some(took) = *b.took.lock().unwrap_or_else(|e| e.into_inner()) {
        return format!("{} done in {}", b.name, clock(took));
    }
    let elapsed = b.started.elapsed();
    match b.previous {
        Some(previous) if previous > elapsed => {
            let percent = elapsed.as_secs_f64() / previous.as_secs_f64() * 100.0;
            format!("{} {} of ≈{} ({percent:.0}%)", b.name, clock(elapsed), clock(previous))
        }
        Some(_) => format!("{} {} (longer than last time)", b.name, clock(elapsed)),
        None => format!("{} {}", b.name, clock(elapsed)),
    }
}

/// `m:ss`.
fn clock(d: Duration) -> String {
    let secs = d.as_secs();
    format!("{}:{:02}", secs / 60, secs % 60)
}

/// `<key> <seconds>` per line; the last record of a key wins.
fn read_timings(file: &PathBuf) -> BTreeMap<String, Duration> {
    let text = std::fs::read_to_string(file).unwrap_or_default();
    parse_timings(&text)
}

fn parse_timings(text: &str) -> BTreeMap<String, Duration> {
    text.lines()
        .filter_map(|line| {
            let (key, secs) = line.rsplit_once(' ')?;
            Some((key.to_string(), Duration::from_secs_f64(secs.parse::<f64>().ok()?.max(0.0))))
        })
        .collect()
}

fn record_timing(file: &PathBuf, key: &str, took: Duration) {
    let mut timings = read_timings(file);
    timings.insert(key.to_string(), took);
    let text: String = timings.iter().map(|(k, d)| format!("{k} {:.1}\n", d.as_secs_f64())).collect();
    if let Some(dir) = file.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    let _ = crate::fsutil::write_atomic(file, &text);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_record_of_a_key_wins_and_garbage_is_ignored() {
        let t = parse_timings("spire-1.13.3 1170.5\njunk\nservices-release 300\nspire-1.13.3 94.0\n");
        assert_eq!(t["spire-1.13.3"], Duration::from_secs(94));
        assert_eq!(t["services-release"], Duration::from_secs(300));
        assert_eq!(t.len(), 2);
    }

    #[test]
    fn the_view_shows_elapsed_against_the_previous_duration() {
        let b = Build {
            name: "spire",
            started: Instant::now() - Duration::from_secs(300),
            previous: Some(Duration::from_secs(1200)),
            result: Mutex::new(None),
            finished: Condvar::new(),
            took: Mutex::new(None),
        };
        let text = describe(&b);
        assert!(text.starts_with("spire 5:0"), "{text}");
        assert!(text.contains("of ≈20:00"), "{text}");
        *b.took.lock().unwrap() = Some(Duration::from_secs(460));
        assert_eq!(describe(&b), "spire done in 7:40");
    }
}
