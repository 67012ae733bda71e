//! The dependency policy (`deny.toml`): `cargo deny check bans licenses sources`, the offline
//! checks (crates.io only, permissive licences only, one version of each crypto crate).
//!
//! cargo-deny is built from crates.io (`cargo install --locked`, so its own lock file decides its
//! dependencies) into the tool cache, `<cache>/tools/cargo-deny-<version>/bin/cargo-deny`, once per
//! version: a fresh machine that reaches crates.io needs nothing else. Advisories need the RustSec
//! database from the network and are not part of the test command (README → Testing).

use std::path::PathBuf;
use std::process::{Command, ExitCode};

use anyhow::{Context as _, Result};

use crate::ctx::Ctx;
use crate::install::cached_tool;
use crate::process::run_logged;

/// The cargo-deny release the policy is checked with (builds on the workspace's Rust ≥ 1.88).
pub const VERSION: &str = "0.20.2";

/// The cached cargo-deny binary, built first if it is not there (≈ 2 min on 2 cores).
pub fn install(ctx: &Ctx) -> Result<PathBuf> {
    let log = ctx.log_file("cargo-deny-build");
    if let Some(dir) = log.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let dir = cached_tool(ctx, "cargo-deny", "cargo-deny", VERSION, |scratch| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args(["install", "cargo-deny", "--locked", "--version", VERSION, "--root"])
            .arg(scratch)
            .arg("--target-dir")
            .arg(scratch.join("target"))
            // Upstream releases with fat LTO and one codegen unit: minutes more on 2 cores for a
            // tool that runs for a second. Same code, same checks.
            .env("CARGO_PROFILE_RELEASE_LTO", "false")
            .env("CARGO_PROFILE_RELEASE_CODEGEN_UNITS", "16")
            .env_remove("RUSTFLAGS");
        run_logged(&mut cmd, &log).with_context(|| format!("building cargo-deny {VERSION} (log {})", log.display()))?;
        // The build directory is scratch too: only the binary is kept.
        std::fs::remove_dir_all(scratch.join("target")).context("removing cargo-deny's build directory")
    })?;
    Ok(dir.join("bin").join("cargo-deny"))
}

/// The checks that need no network, as the test command runs them.
pub const OFFLINE_CHECKS: [&str; 3] = ["bans", "licenses", "sources"];

/// `cargo-deny --offline check bans licenses sources` in the workspace, with the cached binary.
pub fn check_command(ctx: &Ctx) -> Result<Command> {
    let mut cmd = Command::new(install(ctx)?);
    cmd.current_dir(&ctx.root).args(["--offline", "check"]).args(OFFLINE_CHECKS);
    Ok(cmd)
}

/// `cargo xtask deny [CHECK...]`: offline unless the advisories are asked for (they fetch the
/// RustSec database).
pub fn run(ctx: &Ctx, checks: &[String]) -> Result<ExitCode> {
    let mut cmd = Command::new(install(ctx)?);
    cmd.current_dir(&ctx.root);
    if !checks.iter().any(|c| c == "advisories") {
        cmd.arg("--offline");
    }
    let status = cmd.arg("check").args(checks).status().context("running cargo-deny")?;
    Ok(if status.success() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}
