//! Where a profile keeps its state, which ports it uses and where the tool cache is.
//!
//! One profile = one state directory = one set of ports, so `cargo xtask test` (profile `test`)
//! can run while a developer's platform (profile `dev`) is up, and never touches it.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, bail};

use crate::progress::Progress;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Profile {
    /// The developer's platform: SPEC ports, state in `.securepay/`.
    Dev,
    /// The tests' platform: SPEC ports + 10000, state in `.securepay-test/`.
    Test,
}

impl std::fmt::Display for Profile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Profile::Dev => "dev",
            Profile::Test => "test",
        })
    }
}

impl Profile {
    fn state_dir_name(self) -> &'static str {
        match self {
            Profile::Dev => ".securepay",
            Profile::Test => ".securepay-test",
        }
    }

    /// Added to every SPEC port so the two profiles never collide.
    pub fn port_offset(self) -> u16 {
        match self {
            Profile::Dev => 0,
            Profile::Test => 10_000,
        }
    }

    /// Prefix of the port override variables: `SECUREPAY_PG_PORT` (dev), `SECUREPAY_TEST_PG_PORT` (test).
    fn env_prefix(self) -> &'static str {
        match self {
            Profile::Dev => "SECUREPAY_",
            Profile::Test => "SECUREPAY_TEST_",
        }
    }
}

/// A port the platform listens on. The dev value is SPEC's; every port can be overridden by env.
#[derive(Debug, Clone, Copy)]
pub struct Port {
    /// Upper-case key of the override variable: `PG` → `SECUREPAY_PG_PORT`.
    pub key: &'static str,
    pub dev: u16,
}

/// How the services are compiled. `up` in the dev profile runs release builds (the platform's
/// numbers are release numbers); `up --debug` keeps the fast debug loop; the test profile is
/// always debug (`cargo test` builds debug anyway).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BuildMode {
    Debug,
    Release,
}

impl BuildMode {
    /// The cargo profile directory under `target/`.
    pub fn dir(self) -> &'static str {
        match self {
            BuildMode::Debug => "debug",
            BuildMode::Release => "release",
        }
    }
}

impl std::fmt::Display for BuildMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.dir())
    }
}

/// Everything a command needs to know about the profile it runs in.
pub struct Ctx {
    pub profile: Profile,
    /// The workspace root (the parent of `xtask/`).
    pub root: PathBuf,
    /// `.securepay/` or `.securepay-test/` in the workspace root.
    pub state: PathBuf,
    /// `${SECUREPAY_CACHE:-$HOME/.cache/securepay}`: installs shared by all profiles and clones.
    pub cache: PathBuf,
    pub progress: Progress,
    /// How the services are built and which binaries run (and get SVIDs).
    pub build: BuildMode,
    /// The background builds of the running `up` (none outside `up`).
    builds: std::sync::OnceLock<crate::builds::Builds>,
}

impl Ctx {
    pub fn new(profile: Profile) -> Result<Ctx> {
        let root =
            Path::new(env!("CARGO_MANIFEST_DIR")).parent().context("xtask has no parent directory")?.to_path_buf();
        let cache = match std::env::var_os("SECUREPAY_CACHE") {
            Some(dir) if !dir.is_empty() => PathBuf::from(dir),
            _ => {
                let home = std::env::var_os("HOME").context("HOME is not set; set SECUREPAY_CACHE")?;
                PathBuf::from(home).join(".cache/securepay")
            }
        };
        let state = root.join(profile.state_dir_name());
        let build = match profile {
            Profile::Test => BuildMode::Debug,
            // What the last `up` chose (so `load`, `bench`, `status` use the binaries that run).
            Profile::Dev => match std::fs::read_to_string(state.join("run/build-mode")).as_deref().map(str::trim) {
                Ok("debug") => BuildMode::Debug,
                _ => BuildMode::Release,
            },
        };
        Ok(Ctx { profile, root, state, cache, progress: Progress::new(), build, builds: std::sync::OnceLock::new() })
    }

    /// Chooses the build mode for this `up` and remembers it for the commands that follow.
    pub fn set_build_mode(&mut self, build: BuildMode) -> Result<()> {
        anyhow::ensure!(
            self.profile == Profile::Dev || build == BuildMode::Debug,
            "the test profile runs debug builds only"
        );
        self.build = build;
        std::fs::create_dir_all(self.state.join("run"))?;
        crate::fsutil::write_atomic(&self.state.join("run/build-mode"), build.dir())
    }

    /// Where cargo puts `binary` in this build mode: `target/<debug|release>/<binary>`. The SPIRE
    /// entries name this path (`unix:path`), so only these binaries get the services' SVIDs.
    pub fn service_binary(&self, binary: &str) -> PathBuf {
        self.root.join("target").join(self.build.dir()).join(binary)
    }

    /// Hands the running `up`'s background builds to the steps that wait for them.
    pub fn set_builds(&self, builds: crate::builds::Builds) {
        let _ = self.builds.set(builds);
    }

    /// Waits for every background build of this `up`; the first failure.
    pub fn wait_all_builds(&self) -> Result<()> {
        match self.builds.get() {
            Some(builds) => builds.wait_all(),
            None => Ok(()),
        }
    }

    /// Waits for background build `name` if this `up` started one (`Ok` otherwise).
    pub fn wait_build(&self, name: &str) -> Result<()> {
        match self.builds.get() {
            Some(builds) => builds.wait(name),
            None => Ok(()),
        }
    }

    /// Creates the state directory layout (idempotent). `secrets/` is 0700.
    pub fn create_state_dirs(&self) -> Result<()> {
        for sub in ["data", "logs", "run", "config", "secrets"] {
            std::fs::create_dir_all(self.state.join(sub))
                .with_context(|| format!("creating {}", self.state.join(sub).display()))?;
        }
        crate::fsutil::set_mode(&self.secrets_dir(), 0o700)
    }

    pub fn data_dir(&self, component: &str) -> PathBuf {
        self.state.join("data").join(component)
    }

    pub fn log_file(&self, component: &str) -> PathBuf {
        self.state.join("logs").join(format!("{component}.log"))
    }

    pub fn pid_file(&self, component: &str) -> PathBuf {
        self.state.join("run").join(format!("{component}.pid"))
    }

    pub fn config_dir(&self) -> PathBuf {
        self.state.join("config")
    }

    pub fn secrets_dir(&self) -> PathBuf {
        self.state.join("secrets")
    }

    /// `<cache>/tools/<name>-<version>`; see [`crate::install::cached_tool`].
    pub fn tool_dir(&self, name: &str, version: &str) -> PathBuf {
        self.cache.join("tools").join(format!("{name}-{version}"))
    }

    /// The port for this profile: the override variable if set, else SPEC's port + the profile offset.
    pub fn port(&self, port: Port) -> Result<u16> {
        let var = format!("{}{}_PORT", self.profile.env_prefix(), port.key);
        match std::env::var(&var) {
            Ok(value) if !value.is_empty() => {
                value.parse().with_context(|| format!("{var}={value} is not a port number"))
            }
            _ => match port.dev.checked_add(self.profile.port_offset()) {
                Some(p) => Ok(p),
                None => bail!("{var}: default port {} + offset overflows; set {var}", port.dev),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_test_profile_never_shares_a_port_or_state_dir_with_dev() {
        const SPEC: Port = Port { key: "XTASK_SELFTEST", dev: 5432 };
        let (dev, test) = (Ctx::new(Profile::Dev).unwrap(), Ctx::new(Profile::Test).unwrap());
        assert_eq!(dev.port(SPEC).unwrap(), 5432);
        assert_eq!(test.port(SPEC).unwrap(), 15432);
        assert_ne!(dev.state, test.state);
    }
}
