//! Detached processes tracked by pid files: spawn, is-it-ours, stop.
//!
//! A pid file alone is not proof: after a reboot the pid may belong to someone else. So a pid
//! counts as ours only while `/proc/<pid>/cmdline` still contains the component's marker
//! (e.g. `kafka.Kafka`). `down` never signals anything else.

use std::fs::OpenOptions;
use std::os::unix::process::CommandExt as _;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};

/// Spawns `cmd` detached from the terminal (own process group: Ctrl-C in the shell does not reach
/// it), stdout+stderr appended to `log`, and records its pid in `pid_file`.
/// The `Child` is returned so the caller can notice an early exit while waiting for health.
pub fn spawn_detached(cmd: &mut Command, log: &Path, pid_file: &Path) -> Result<Child> {
    let out =
        OpenOptions::new().create(true).append(true).open(log).with_context(|| format!("opening {}", log.display()))?;
    let err = out.try_clone()?;
    let child = cmd
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .process_group(0)
        .spawn()
        .with_context(|| format!("spawning {:?}", cmd.get_program()))?;
    std::fs::write(pid_file, format!("{}\n", child.id())).with_context(|| format!("writing {}", pid_file.display()))?;
    Ok(child)
}

/// The pid in `pid_file` if that process is alive and its command line contains `marker`.
pub fn running_pid(pid_file: &Path, marker: &str) -> Option<u32> {
    let pid: u32 = std::fs::read_to_string(pid_file).ok()?.trim().parse().ok()?;
    is_ours(pid, marker).then_some(pid)
}

/// Whether `pid` is alive (not a zombie) and runs something whose command line contains `marker`.
pub fn is_ours(pid: u32, marker: &str) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return false };
    // The state is the first field after the parenthesised command name.
    let state = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().next());
    if matches!(state, Some("Z") | Some("X") | None) {
        return false;
    }
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else { return false };
    String::from_utf8_lossy(&cmdline).replace('\0', " ").contains(marker)
}

/// Sends `signal` (a name such as `TERM` or `INT`) to `pid`.
pub fn signal(pid: u32, signal: &str) -> Result<()> {
    let status = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .stderr(Stdio::null())
        .status()
        .context("running kill")?;
    if !status.success() {
        bail!("kill -{signal} {pid} failed");
    }
    Ok(())
}

/// Stops a process of ours: `signal`, wait up to `grace`, then SIGKILL. Returns once it is gone.
pub fn stop(pid: u32, marker: &str, stop_signal: &str, grace: Duration) -> Result<()> {
    if !is_ours(pid, marker) {
        return Ok(());
    }
    // The process may exit between the check and the signal; that is success.
    let _ = signal(pid, stop_signal);
    if wait_until(grace, || !is_ours(pid, marker)) {
        return Ok(());
    }
    let _ = signal(pid, "KILL");
    if wait_until(Duration::from_secs(10), || !is_ours(pid, marker)) {
        return Ok(());
    }
    bail!("pid {pid} survived SIGKILL")
}

/// Polls `done` every 100 ms until it holds (true) or `limit` passes (false).
pub fn wait_until(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Runs a short command to completion; on failure the error carries its output's tail.
pub fn run(cmd: &mut Command) -> Result<String> {
    let output = cmd.stdin(Stdio::null()).output().with_context(|| format!("running {:?}", cmd.get_program()))?;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let both = format!("{stdout}\n{stderr}");
        let lines: Vec<&str> = both.lines().filter(|l| !l.trim().is_empty()).collect();
        bail!("{cmd:?} failed ({}):\n{}", output.status, lines[lines.len().saturating_sub(25)..].join("\n"));
    }
    Ok(stdout)
}

/// Runs a long command with its output appended to `log`; on failure the error carries the log's tail.
pub fn run_logged(cmd: &mut Command, log: &Path) -> Result<()> {
    let out = OpenOptions::new().create(true).append(true).open(log)?;
    let status = cmd
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .status()
        .with_context(|| format!("spawning {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed ({status}); last lines of {}:\n{}", log.display(), crate::fsutil::tail(log, 20));
    }
    Ok(())
}

/// The executable a running process was started from (`/proc/<pid>/exe`).
pub fn executable(pid: u32) -> Option<std::path::PathBuf> {
    std::fs::read_link(format!("/proc/{pid}/exe")).ok()
}
