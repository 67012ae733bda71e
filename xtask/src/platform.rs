//! `up`, `down`, `status` and `logs` over the whole platform: the components of
//! [`registry`] in order, then the four services.

use std::time::Duration;

use anyhow::{Context as _, Result, bail};

use crate::builds::{Builds, Job};
use crate::components::{Component, jaeger, lifecycle, registry, spire};
use crate::ctx::{BuildMode, Ctx, Profile};
use crate::services::{self, SERVICES};
use crate::system::{self, Step};

/// Which parts of the platform a command acts on (`--only pg,redis`); empty = everything.
pub struct Selection {
    only: Vec<String>,
}

/// The `--only` name that selects the four services.
const SERVICES_NAME: &str = "services";

impl Selection {
    pub fn parse(only: &[String]) -> Result<Selection> {
        let known: Vec<&str> = registry().iter().map(|c| c.name()).chain(std::iter::once(SERVICES_NAME)).collect();
        for name in only {
            if !known.contains(&name.as_str()) {
                bail!("unknown component {name:?}; known: {}", known.join(", "));
            }
        }
        Ok(Selection { only: only.to_vec() })
    }

    pub fn all() -> Selection {
        Selection { only: Vec::new() }
    }

    fn includes(&self, name: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|n| n == name)
    }

    fn components(&self) -> Vec<Box<dyn Component>> {
        registry().into_iter().filter(|c| self.includes(c.name())).collect()
    }

    /// The system-package steps of what is selected (`system::NEEDS`).
    fn system_steps(&self) -> Vec<Step> {
        let mut steps = Vec::new();
        for c in self.components() {
            steps.extend(c.system_step());
        }
        if self.includes(SERVICES_NAME) || self.includes("spire-agent") {
            steps.push(Step::Build);
        }
        steps
    }
}

/// One `up` or `down` of a profile at a time: two at once (say `cargo xtask test` in two
/// terminals) would race to start the same service — the loser's pid file names a process that
/// exited on a busy port, and the next `up` refuses the survivor as not its own. Held until the
/// returned file is dropped; the kernel releases it if xtask dies.
fn exclusive(ctx: &Ctx) -> Result<std::fs::File> {
    let path = ctx.state.join("run").join("platform.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => {
            ctx.progress.step("platform", "wait for another `cargo xtask up/down` of this profile", || {
                file.lock().with_context(|| format!("locking {}", path.display()))
            })?;
            Ok(file)
        }
        Err(std::fs::TryLockError::Error(e)) => Err(e).with_context(|| format!("locking {}", path.display())),
    }
}

pub fn up(ctx: &Ctx, selection: &Selection) -> Result<()> {
    ctx.create_state_dirs()?;
    let _one_at_a_time = exclusive(ctx)?;
    eprintln!(
        "SecurePay platform, profile {} ({} build of the services): state {}, tool cache {}",
        ctx.profile,
        ctx.build,
        ctx.state.display(),
        ctx.cache.display()
    );
    // Every Debian package the selected steps need, in one apt-get run before any step starts.
    system::ensure_all(ctx, &selection.system_steps())?;
    std::thread::scope(|scope| {
        ctx.set_builds(Builds::start(scope, ctx, build_jobs(ctx, selection)));
        let result = start_in_order(ctx, selection);
        if let Err(e) = &result {
            eprintln!("\nerror: {e:#}");
            eprintln!(
                "what is up keeps running; `cargo xtask down` stops it. Background builds run to the end \
                 so that the next `up` resumes where this one stopped (nothing built is built twice)."
            );
        }
        // Even when every step passed: a build nobody waited for must finish before `up` returns.
        let builds = ctx.wait_all_builds();
        result.and(builds)
    })?;
    eprintln!("platform up in {:.1}s\n", ctx.progress.elapsed_secs());
    print_status(ctx);
    if ctx.profile == Profile::Dev && selection.includes(SERVICES_NAME) {
        print_first_payment(ctx);
    }
    Ok(())
}

/// The components in registry order, then the services; each waits for the build it needs.
fn start_in_order(ctx: &Ctx, selection: &Selection) -> Result<()> {
    for c in selection.components() {
        lifecycle::up(ctx, c.as_ref()).with_context(|| format!("`cargo xtask logs {}` shows its log", c.name()))?;
    }
    if selection.includes(SERVICES_NAME) {
        services::up(ctx)?;
    }
    Ok(())
}

/// The long builds this `up` needs that are not done yet, started at once side by side.
fn build_jobs<'a>(ctx: &'a Ctx, selection: &Selection) -> Vec<Job<'a>> {
    let mut jobs = Vec::new();
    let wants_spire = selection.includes("spire-server") || selection.includes("spire-agent");
    if wants_spire && !spire::installed(ctx) {
        jobs.push(Job {
            name: spire::BUILD,
            timing_key: format!("spire-{}", spire::VERSION),
            default_estimate: Duration::from_secs(20 * 60),
            run: Box::new(move || spire::install_spire(ctx, spire::BUILD)),
        });
    }
    if selection.includes("jaeger") && !jaeger::installed(ctx) {
        jobs.push(Job {
            name: jaeger::BUILD,
            timing_key: format!("jaeger-{}", jaeger::VERSION),
            default_estimate: Duration::from_secs(10 * 60),
            run: Box::new(move || jaeger::install(ctx, jaeger::BUILD)),
        });
    }
    // The agent's post-start step runs every service binary to prove its SVID.
    if selection.includes(SERVICES_NAME) || selection.includes("spire-agent") {
        jobs.push(Job {
            name: services::BUILD,
            timing_key: format!("services-{}", ctx.build),
            default_estimate: Duration::from_secs(match ctx.build {
                BuildMode::Debug => 4 * 60,
                BuildMode::Release => 8 * 60,
            }),
            run: Box::new(move || services::build(ctx)),
        });
    }
    jobs
}

pub fn down(ctx: &Ctx, selection: &Selection) -> Result<()> {
    ctx.create_state_dirs()?;
    let _one_at_a_time = exclusive(ctx)?;
    if selection.includes(SERVICES_NAME) {
        services::down(ctx)?;
    }
    let mut first_error = None;
    for c in selection.components().iter().rev() {
        // Keep stopping the rest: one stuck component must not leave the others running.
        if let Err(e) = lifecycle::down(ctx, c.as_ref()) {
            eprintln!("error: {e:#}");
            first_error.get_or_insert(e);
        }
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

pub fn print_status(ctx: &Ctx) {
    let mut rows: Vec<_> = registry().iter().map(|c| lifecycle::status(ctx, c.as_ref())).collect();
    rows.extend(SERVICES.iter().map(|s| services::status(ctx, s)));
    let width = |f: &dyn Fn(&lifecycle::StatusRow) -> usize, min: usize| rows.iter().map(f).max().unwrap_or(0).max(min);
    let name_w = width(&|r| r.name.len(), 9);
    let addr_w = width(&|r| r.address.len(), 7);
    println!("{:<name_w$}  {:<addr_w$}  {:>7}  health", "component", "address", "pid");
    for r in &rows {
        let pid = r.pid.map_or_else(|| "-".to_string(), |p| p.to_string());
        println!("{:<name_w$}  {:<addr_w$}  {pid:>7}  {}", r.name, r.address, r.health);
    }
    println!("(profile {}, state {})", ctx.profile, ctx.state.display());
}

fn print_first_payment(ctx: &Ctx) {
    let gateway = ctx.port(SERVICES[0].main).unwrap_or(8080);
    let prometheus = ctx.port(crate::components::prometheus::PORT).unwrap_or(9090);
    let demo = &securepay_postgres::DEMO_ACCOUNTS;
    println!("\nDemo accounts (database {}):", crate::components::postgres::DATABASE);
    for a in demo {
        println!("  {}  owner {:<6} {} {}", a.account_id, a.owner, a.opening_balance(), a.currency);
    }
    let (from, to) = (demo[0], demo[2]);
    let key = crate::services::dev_key_path(ctx);
    let jaeger = ctx.port(crate::components::jaeger::QUERY_PORT).unwrap_or(16686);
    let gw = format!("http://127.0.0.1:{gateway}");
    println!(
        "\nSend a payment ({} pays {} 10.50 {}):\n\
         \n  TOKEN=$(target/{}/securepay-gateway token --key {} --sub {})\n\
         \x20 curl -sS -X POST {gw}/api/v1/payments -H \"Authorization: Bearer $TOKEN\" \\\n\
         \x20   -H \"Idempotency-Key: $(cat /proc/sys/kernel/random/uuid)\" -H 'Content-Type: application/json' \\\n\
         \x20   -d '{{\"from_account\":\"{}\",\"to_account\":\"{}\",\"amount\":\"10.50\",\"currency\":\"{}\"}}'\n\
         \x20 curl -sS {gw}/api/v1/payments/<payment_id> -H \"Authorization: Bearer $TOKEN\"\n\
         \x20 curl -sS {gw}/api/v1/accounts/{}/balance -H \"Authorization: Bearer $TOKEN\"\n\
         \x20 curl -sS {gw}/api/v1/payments/<payment_id>/notifications -H \"Authorization: Bearer $TOKEN\"\n\
         \x20 traces: http://127.0.0.1:{jaeger}/api/traces?service=api-gateway  metrics: http://127.0.0.1:{prometheus}\n",
        from.owner,
        to.owner,
        from.currency,
        ctx.build,
        key.display(),
        from.owner,
        from.account_id,
        to.account_id,
        from.currency,
        from.account_id,
    );
}

pub fn logs(ctx: &Ctx, name: &str, tail: Option<usize>) -> Result<()> {
    let known: Vec<&str> = registry().iter().map(|c| c.name()).chain(SERVICES.iter().map(|s| s.name())).collect();
    if !known.contains(&name) {
        bail!("unknown component {name:?}; known: {}", known.join(", "));
    }
    let path = ctx.log_file(name);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) => bail!("no log at {}: {e} (was it ever started in profile {}?)", path.display(), ctx.profile),
    };
    match tail {
        Some(n) => println!("{}", crate::fsutil::tail(&path, n)),
        None => print!("{text}"),
    }
    Ok(())
}
