//! Prometheus from Debian's `prometheus` package; its config is generated from
//! `xtask/templates/prometheus.yml` with every service's and component's metrics endpoint, and
//! the alert rules in `observability/prometheus/rules/*.yml` when that directory exists. Also the
//! `promtool` checks `cargo xtask test` runs on the repository's Prometheus files.

use std::process::Command;

use anyhow::{Context as _, Result};
use securepay_testkit::var;

use super::{Component, ScrapeTarget, registry};
use crate::ctx::{Ctx, Port};
use crate::install::which;
use crate::services::SERVICES;
use crate::{fsutil, net, process};

pub const PORT: Port = Port { key: "PROMETHEUS", dev: 9090 };
const TEMPLATE: &str = include_str!("../../templates/prometheus.yml");
const RULES_DIR: &str = "observability/prometheus/rules";
/// promtool unit tests of the alert rules (outside `RULES_DIR`, which Prometheus loads whole).
const RULE_TESTS_DIR: &str = "observability/prometheus/tests";
/// The Prometheus config compose runs (the runner's own is generated, and checked by Prometheus).
const COMPOSE_CONFIG: &str = "observability/prometheus/prometheus.yml";

/// The `promtool` commands that check the repository's Prometheus files, run from the workspace
/// root: every rule file parses, every unit test of the alerts passes, compose's config is valid.
pub fn promtool_checks(ctx: &Ctx) -> Result<Vec<Command>> {
    let promtool = which("promtool").context("promtool is not installed (Debian package prometheus)")?;
    let command = |args: &[&str], files: Vec<String>| {
        let mut cmd = Command::new(&promtool);
        cmd.args(args).args(files);
        cmd
    };
    Ok(vec![
        command(&["check", "rules"], yml_files(ctx, RULES_DIR)?),
        command(&["test", "rules"], yml_files(ctx, RULE_TESTS_DIR)?),
        command(&["check", "config"], vec![COMPOSE_CONFIG.to_string()]),
    ])
}

/// The `*.yml` files of `dir` (relative to the workspace root, sorted); an empty dir is an error.
fn yml_files(ctx: &Ctx, dir: &str) -> Result<Vec<String>> {
    let entries = std::fs::read_dir(ctx.root.join(dir)).with_context(|| format!("reading {dir}"))?;
    let mut files = Vec::new();
    for entry in entries {
        let name = entry?.file_name().to_string_lossy().into_owned();
        if name.ends_with(".yml") {
            files.push(format!("{dir}/{name}"));
        }
    }
    files.sort();
    anyhow::ensure!(!files.is_empty(), "no *.yml file in {dir}");
    Ok(files)
}

pub struct Prometheus;

impl Prometheus {
    fn targets(&self, ctx: &Ctx) -> Result<Vec<ScrapeTarget>> {
        let mut targets = vec![ScrapeTarget { job: "prometheus".into(), port: ctx.port(PORT)?, path: "/metrics" }];
        for c in registry() {
            targets.extend(c.scrape_targets(ctx)?);
        }
        for s in &SERVICES {
            targets.push(s.scrape_target(ctx)?);
        }
        Ok(targets)
    }

    /// The generated `prometheus.yml` (public for the test that checks it lists every service).
    pub fn render_config(&self, ctx: &Ctx) -> Result<String> {
        let scrape_configs: String = self
            .targets(ctx)?
            .iter()
            .map(|t| {
                format!(
                    "  - job_name: {job}\n    metrics_path: {path}\n    static_configs:\n      - targets: ['127.0.0.1:{port}']\n",
                    job = t.job,
                    path = t.path,
                    port = t.port
                )
            })
            .collect();
        let rules = ctx.root.join(RULES_DIR);
        let rule_files = if rules.is_dir() {
            format!("\n  - {}/*.yml", rules.display())
        } else {
            format!(" [] # none yet: {RULES_DIR}/ does not exist")
        };
        Ok(TEMPLATE
            .replace("{{profile}}", &ctx.profile.to_string())
            .replace("{{rule_files}}", &rule_files)
            .replace("{{scrape_configs}}\n", &scrape_configs))
    }
}

impl Component for Prometheus {
    fn name(&self) -> &'static str {
        "prometheus"
    }

    fn version(&self, _ctx: &Ctx) -> String {
        which("prometheus")
            .and_then(|bin| process::run(Command::new(bin).arg("--version")).ok())
            .and_then(|v| v.split_whitespace().nth(2).map(str::to_string))
            .unwrap_or_else(|| "2 (Debian)".to_string())
    }

    fn address(&self, ctx: &Ctx) -> Result<String> {
        Ok(format!("http://127.0.0.1:{}", ctx.port(PORT)?))
    }

    fn ports(&self, ctx: &Ctx) -> Result<Vec<u16>> {
        Ok(vec![ctx.port(PORT)?])
    }

    fn process_marker(&self) -> &'static str {
        "prometheus"
    }

    fn system_step(&self) -> Option<crate::system::Step> {
        Some(crate::system::Step::Prometheus)
    }

    fn install(&self, ctx: &Ctx) -> Result<()> {
        crate::system::ensure(ctx, crate::system::Step::Prometheus)
    }

    fn configure(&self, ctx: &Ctx) -> Result<()> {
        std::fs::create_dir_all(ctx.data_dir(self.name()))?;
        fsutil::write_atomic(&ctx.config_dir().join("prometheus.yml"), &self.render_config(ctx)?)
    }

    fn command(&self, ctx: &Ctx) -> Result<Command> {
        let mut cmd = Command::new(which("prometheus").context("prometheus is not installed")?);
        cmd.arg(format!("--config.file={}", ctx.config_dir().join("prometheus.yml").display()))
            .arg(format!("--storage.tsdb.path={}", ctx.data_dir(self.name()).display()))
            .arg(format!("--web.listen-address=127.0.0.1:{}", ctx.port(PORT)?))
            .arg("--storage.tsdb.retention.time=7d");
        Ok(cmd)
    }

    fn health(&self, ctx: &Ctx) -> Result<()> {
        net::http_ok(ctx.port(PORT)?, "/-/ready")
    }

    fn test_env(&self, ctx: &Ctx) -> Result<Vec<(&'static str, String)>> {
        Ok(vec![(var::PROMETHEUS_URL, self.address(ctx)?)])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ctx::Profile;

    #[test]
    fn the_generated_config_scrapes_every_service_and_prometheus() {
        let ctx = Ctx::new(Profile::Test).unwrap();
        let config = Prometheus.render_config(&ctx).unwrap();
        for s in &SERVICES {
            let port = s.http_port(&ctx).unwrap();
            assert!(config.contains(&format!("job_name: {}\n", s.name())), "{config}");
            assert!(config.contains(&format!("'127.0.0.1:{port}'")), "{config}");
        }
        assert!(config.contains("job_name: prometheus\n"));
        assert!(!config.contains("{{"), "unfilled placeholder: {config}");
    }
}
