//! Start, stop and inspect any [`Component`]: the generic part of `up`, `down` and `status`.

use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};

use super::Component;
use crate::ctx::Ctx;
use crate::{fsutil, net, process};

/// How long `down` waits for a clean shutdown before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(30);
/// How long `down` waits for the ports to close once the process is gone.
const PORT_CLOSE_TIMEOUT: Duration = Duration::from_secs(10);
const HEALTH_POLL: Duration = Duration::from_millis(250);

/// Brings one component up (idempotent): a running, healthy instance is left alone.
pub fn up(ctx: &Ctx, c: &dyn Component) -> Result<()> {
    let name = c.name();
    let pid_file = ctx.pid_file(name);
    if let Some(pid) = process::running_pid(&pid_file, c.process_marker()) {
        ctx.progress.step(name, &format!("already running (pid {pid}), health"), || wait_healthy(ctx, c, None))?;
        return ctx.progress.step(name, "post-start checks", || c.after_start(ctx));
    }
    let _ = std::fs::remove_file(&pid_file);
    for port in c.ports(ctx)? {
        if net::port_open(port) {
            bail!(
                "{name}: port {port} is already in use by a process this profile did not start \
                 (see `ss -ltnp 'sport = :{port}'`); stop it or override the port (see `cargo xtask --help`)"
            );
        }
    }
    c.install(ctx)?;
    ctx.progress.step(name, "configure", || c.configure(ctx))?;
    let address = c.address(ctx)?;
    ctx.progress.step(name, &format!("start {} on {address}", c.version(ctx)), || {
        let mut cmd = c.command(ctx)?;
        let log = ctx.log_file(name);
        let mut child = process::spawn_detached(&mut cmd, &log, &pid_file)?;
        wait_healthy(ctx, c, Some(&mut child))
    })?;
    ctx.progress.step(name, "post-start setup", || c.after_start(ctx))
}

/// Polls the health check until it passes or the startup timeout runs out. With `child`, an early
/// exit of the process fails at once with the log's tail.
fn wait_healthy(ctx: &Ctx, c: &dyn Component, mut child: Option<&mut std::process::Child>) -> Result<()> {
    let deadline = Instant::now() + c.startup_timeout();
    loop {
        let last = match c.health(ctx) {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        if let Some(child) = child.as_deref_mut()
            && let Some(status) = child.try_wait()?
        {
            bail!(
                "{} exited during start ({status}); last log lines of {}:\n{}",
                c.name(),
                ctx.log_file(c.name()).display(),
                fsutil::tail(&ctx.log_file(c.name()), 20)
            );
        }
        if Instant::now() >= deadline {
            return Err(last).context(format!(
                "{} not healthy after {:?}; see {}",
                c.name(),
                c.startup_timeout(),
                ctx.log_file(c.name()).display()
            ));
        }
        std::thread::sleep(HEALTH_POLL);
    }
}

/// Stops one component if this profile started it; waits until its ports are closed.
pub fn down(ctx: &Ctx, c: &dyn Component) -> Result<()> {
    let name = c.name();
    let pid_file = ctx.pid_file(name);
    match process::running_pid(&pid_file, c.process_marker()) {
        Some(pid) => ctx.progress.step(name, &format!("stop pid {pid}"), || {
            process::stop(pid, c.process_marker(), c.stop_signal(), STOP_GRACE)?;
            wait_ports_closed(&c.ports(ctx)?)
        })?,
        None => ctx.progress.note(name, "not running"),
    }
    let _ = std::fs::remove_file(&pid_file);
    Ok(())
}

pub fn wait_ports_closed(ports: &[u16]) -> Result<()> {
    for &port in ports {
        if !process::wait_until(PORT_CLOSE_TIMEOUT, || !net::port_open(port)) {
            bail!("port {port} still accepts connections {PORT_CLOSE_TIMEOUT:?} after stop");
        }
    }
    Ok(())
}

/// One row of the status table.
pub struct StatusRow {
    pub name: String,
    pub address: String,
    pub pid: Option<u32>,
    pub health: String,
}

pub fn status(ctx: &Ctx, c: &dyn Component) -> StatusRow {
    let pid = process::running_pid(&ctx.pid_file(c.name()), c.process_marker());
    let health = match pid {
        None => "stopped".to_string(),
        Some(_) => match c.health(ctx) {
            Ok(()) => "healthy".to_string(),
            Err(e) => format!("UNHEALTHY: {e:#}"),
        },
    };
    StatusRow { name: c.name().to_string(), address: c.address(ctx).unwrap_or_else(|e| format!("{e:#}")), pid, health }
}
