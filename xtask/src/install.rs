//! Getting tools onto the machine: Debian packages (what to install is `crate::system`'s list), tools cached
//! by version under `<cache>/tools/<name>-<version>/`, and system users for daemons that refuse
//! to run as root.

use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use anyhow::{Context as _, Result, bail};

use crate::ctx::Ctx;
use crate::process::run;

/// Marker written last into a cached tool directory: its presence means the install completed.
const COMPLETE_MARKER: &str = ".securepay-complete";

pub fn is_root() -> bool {
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// The first `name` on PATH (plus the sbin directories, which root's PATH may lack).
pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

/// `apt-get install -y --no-install-recommends`, non-interactive, after one `apt-get update` per run.
/// Package maintainer scripts must not start daemons on our ports: when the machine has no
/// `policy-rc.d` we put one in place for the duration of the install.
pub fn apt_install(packages: &[&str]) -> Result<()> {
    if !is_root() {
        bail!(
            "missing packages and not root: run `sudo apt-get install -y --no-install-recommends {}`",
            packages.join(" ")
        );
    }
    static UPDATED: OnceLock<()> = OnceLock::new();
    let apt = |args: &[&str]| -> Result<String> {
        run(Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["-o", "DPkg::Lock::Timeout=600", "-q"])
            .args(args))
    };
    if UPDATED.get().is_none() {
        apt(&["update"])?;
        let _ = UPDATED.set(());
    }
    let policy = Path::new("/usr/sbin/policy-rc.d");
    let placed_policy = !policy.exists();
    if placed_policy {
        std::fs::write(policy, "#!/bin/sh\n# placed by cargo xtask during apt-get install\nexit 101\n")?;
        crate::fsutil::set_mode(policy, 0o755)?;
    }
    let mut args = vec!["install", "-y", "--no-install-recommends"];
    args.extend_from_slice(packages);
    let result = apt(&args);
    if placed_policy {
        let _ = std::fs::remove_file(policy);
    }
    result.map(drop)
}

/// Returns `<cache>/tools/<name>-<version>`, building it with `build` first if it is not there.
///
/// `build` fills a fresh scratch directory; only a completed build is renamed into place, so an
/// interrupted install is redone next time and two concurrent runs cannot see half a tool.
pub fn cached_tool(
    ctx: &Ctx,
    component: &str,
    name: &str,
    version: &str,
    build: impl FnOnce(&Path) -> Result<()>,
) -> Result<PathBuf> {
    let dir = ctx.tool_dir(name, version);
    if dir.join(COMPLETE_MARKER).exists() {
        return Ok(dir);
    }
    ctx.progress.step(component, &format!("install {name} {version} into the tool cache"), || {
        let scratch = dir.with_file_name(format!("{name}-{version}.partial-{}", std::process::id()));
        if scratch.exists() {
            std::fs::remove_dir_all(&scratch)?;
        }
        std::fs::create_dir_all(&scratch).with_context(|| format!("creating {}", scratch.display()))?;
        build(&scratch).inspect_err(|_| {
            let _ = std::fs::remove_dir_all(&scratch);
        })?;
        std::fs::write(scratch.join(COMPLETE_MARKER), version)?;
        if dir.exists() {
            // A half-finished directory from an older layout, or another run won the race.
            if dir.join(COMPLETE_MARKER).exists() {
                std::fs::remove_dir_all(&scratch)?;
                return Ok(());
            }
            std::fs::remove_dir_all(&dir)?;
        }
        std::fs::rename(&scratch, &dir).with_context(|| format!("renaming into {}", dir.display()))
    })?;
    Ok(dir)
}

/// A system user that owns a daemon's data (PostgreSQL refuses to run as root).
pub struct SystemUser {
    pub name: &'static str,
    pub uid: u32,
    pub gid: u32,
    pub home: PathBuf,
}

/// Creates the system user `name` (home `/var/lib/<name>`, no login shell) if it does not exist.
pub fn ensure_system_user(name: &'static str) -> Result<SystemUser> {
    if lookup_user(name).is_none() {
        run(Command::new("useradd").args([
            "--system",
            "--user-group",
            "--create-home",
            "--home-dir",
            &format!("/var/lib/{name}"),
            "--shell",
            "/usr/sbin/nologin",
            name,
        ]))?;
    }
    let (uid, gid, home) = lookup_user(name).with_context(|| format!("user {name} missing after useradd"))?;
    Ok(SystemUser { name, uid, gid, home })
}

fn lookup_user(name: &str) -> Option<(u32, u32, PathBuf)> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        (fields.len() >= 6 && fields[0] == name)
            .then(|| Some((fields[2].parse().ok()?, fields[3].parse().ok()?, PathBuf::from(fields[5]))))
            .flatten()
    })
}

/// Whether every directory above `path` lets other users through (mode o+x), i.e. whether a
/// dedicated daemon user can execute what is stored there.
pub fn traversable_by_others(path: &Path) -> bool {
    path.ancestors().skip(1).all(|dir| std::fs::metadata(dir).is_ok_and(|m| m.mode() & 0o001 != 0))
}
