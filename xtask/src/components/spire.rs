//! SPIRE v1.13.3 server and agent, built from source as Go tools into the tool cache, with the four
//! workload registration entries of SPEC §2 (see `spire/entries.md`).
//!
//! Two components, started in this order: `spire-server` (loopback TCP for the agent, admin unix
//! socket for the runner) and `spire-agent` (Workload API unix socket for the services). Each
//! agent start attests with a fresh single-use join token aliased to [`AGENT_ID`], the parent of
//! every workload entry, so the entries outlive agent restarts.
//!
//! The server listens on 8181 (dev) / 18181 (test), not the seed's 8081: on one host 8081 is
//! payment-service's port (SPEC §2). compose.yaml keeps 8081 inside its own container.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use securepay_core::identity::{ServiceIdentity, TRUST_DOMAIN};
use securepay_testkit::var;

use super::Component;
use crate::ctx::{Ctx, Port};
use crate::install::{cached_tool, which};
use crate::{fsutil, process};

pub const VERSION: &str = "1.13.3";
/// The name of SPIRE's background build in `up`'s progress view.
pub const BUILD: &str = "spire";
/// Not 8081: that is payment-service's port on this host.
pub const SERVER_PORT: Port = Port { key: "SPIRE_SERVER", dev: 8181 };
/// The agent's alias SPIFFE ID (`token generate -spiffeID`), parent of the workload entries.
pub const AGENT_ID: &str = "spiffe://securepay.dev/node/local-agent";
const SERVER_TEMPLATE: &str = include_str!("../../../spire/server.conf");
const AGENT_TEMPLATE: &str = include_str!("../../../spire/agent.conf");
/// A join token only has to live until the agent that was just configured attests.
const JOIN_TOKEN_TTL_SECS: u32 = 600;
/// How long after registration every service binary must get its SVID (agent sync is ~5 s).
const SVID_READY_TIMEOUT: Duration = Duration::from_secs(60);
/// The oldest Go with `go get -tool` (1.24); SPIRE 1.13 and Jaeger 1.75 need at least that.
const GO_MINOR_MIN: u32 = 24;

fn bin(ctx: &Ctx, name: &str) -> PathBuf {
    ctx.tool_dir("spire", VERSION).join("bin").join(name)
}

fn run_dir(ctx: &Ctx) -> PathBuf {
    ctx.state.join("run")
}

/// The server's admin API socket (`-socketPath` of every `spire-server` command).
pub fn server_socket(ctx: &Ctx) -> PathBuf {
    run_dir(ctx).join("spire-server/private/api.sock")
}

/// The agent's Workload API socket (`SPIFFE_ENDPOINT_SOCKET=unix://<this>`).
pub fn agent_socket(ctx: &Ctx) -> PathBuf {
    run_dir(ctx).join("spire-agent/public/api.sock")
}

fn bundle_path(ctx: &Ctx) -> PathBuf {
    ctx.config_dir().join("spire-bundle.pem")
}

fn join_token_path(ctx: &Ctx) -> PathBuf {
    ctx.secrets_dir().join("spire-join-token")
}

/// Where the runner (and `cargo build`) puts a service binary: the `unix:path` selector's value.
pub fn service_binary(ctx: &Ctx, service: ServiceIdentity) -> PathBuf {
    ctx.service_binary(service.binary())
}

/// Replaces every `{{key}}` of a template; a placeholder left over is a bug in the template.
fn render(template: &str, values: &[(&str, String)]) -> Result<String> {
    let mut out = template.to_string();
    for (key, value) in values {
        out = out.replace(&format!("{{{{{key}}}}}"), value);
    }
    if let Some(at) = out.find("{{") {
        bail!("unfilled placeholder in SPIRE template: {}", &out[at..out.len().min(at + 40)]);
    }
    Ok(out)
}

/// Builds Go `packages` at `version` into `<cache>/tools/<name>-<version>/bin` (SPEC §10): a small
/// tools module (`go get -tool <pkg>@<version>`), then `go install` with GOBIN in the scratch dir.
/// Cached: a completed build is never redone. Output goes to `logs/<name>-build.log`.
pub fn go_tool(ctx: &Ctx, component: &str, name: &str, version: &str, packages: &[&str]) -> Result<PathBuf> {
    let dir = ctx.tool_dir(name, version);
    if !dir.join(".securepay-complete").exists() {
        check_go()?;
        ctx.progress.note(
            component,
            &format!(
                "building {name} {version} from source with Go (log {})",
                ctx.log_file(&format!("{name}-build")).display()
            ),
        );
    }
    let log = ctx.log_file(&format!("{name}-build"));
    cached_tool(ctx, component, name, version, |scratch| {
        let module = scratch.join("mod");
        std::fs::create_dir_all(&module)?;
        let go = |args: &[&str]| {
            let mut cmd = Command::new("go");
            cmd.current_dir(&module).args(args).env("GOBIN", scratch.join("bin")).env("CGO_ENABLED", "1");
            process::run_logged(&mut cmd, &log)
        };
        go(&["mod", "init", &format!("securepay.local/tools/{name}")])?;
        for package in packages {
            go(&["get", "-tool", &format!("{package}@v{version}")])?;
        }
        let mut install = vec!["install"];
        install.extend_from_slice(packages);
        go(&install)
    })
}

fn check_go() -> Result<()> {
    let Some(go) = which("go") else {
        bail!("Go 1.{GO_MINOR_MIN}+ is needed to build SPIRE and Jaeger (https://go.dev/dl/); `go` is not on PATH")
    };
    let version = process::run(Command::new(go).arg("env").arg("GOVERSION"))?;
    let minor = version.trim().strip_prefix("go1.").and_then(|rest| rest.split('.').next()?.parse::<u32>().ok());
    match minor {
        Some(m) if m >= GO_MINOR_MIN => Ok(()),
        _ => bail!("Go 1.{GO_MINOR_MIN}+ is needed to build SPIRE and Jaeger; found {}", version.trim()),
    }
}

fn server_cli(ctx: &Ctx, args: &[&str]) -> Result<String> {
    let mut cmd = Command::new(bin(ctx, "spire-server"));
    cmd.args(args).arg("-socketPath").arg(server_socket(ctx));
    process::run(&mut cmd)
}

/// Whether the SPIRE binaries are in the tool cache (no build needed).
pub fn installed(ctx: &Ctx) -> bool {
    ctx.tool_dir("spire", VERSION).join(".securepay-complete").exists()
}

/// Builds SPIRE into the tool cache unless it is there (`up` runs this as a background build).
pub fn install_spire(ctx: &Ctx, component: &str) -> Result<()> {
    go_tool(
        ctx,
        component,
        "spire",
        VERSION,
        &["github.com/spiffe/spire/cmd/spire-server", "github.com/spiffe/spire/cmd/spire-agent"],
    )
    .map(drop)
}

pub struct SpireServer;

impl Component for SpireServer {
    fn name(&self) -> &'static str {
        "spire-server"
    }

    fn version(&self, _ctx: &Ctx) -> String {
        VERSION.to_string()
    }

    fn address(&self, ctx: &Ctx) -> Result<String> {
        Ok(format!("127.0.0.1:{} (admin {})", ctx.port(SERVER_PORT)?, server_socket(ctx).display()))
    }

    fn ports(&self, ctx: &Ctx) -> Result<Vec<u16>> {
        Ok(vec![ctx.port(SERVER_PORT)?])
    }

    fn process_marker(&self) -> &'static str {
        "spire-server"
    }

    fn install(&self, ctx: &Ctx) -> Result<()> {
        ctx.wait_build(BUILD)?;
        install_spire(ctx, self.name())
    }

    fn configure(&self, ctx: &Ctx) -> Result<()> {
        let data = ctx.data_dir(self.name());
        std::fs::create_dir_all(&data)?;
        let socket = server_socket(ctx);
        let socket_dir = socket.parent().context("server socket has no directory")?;
        std::fs::create_dir_all(socket_dir)?;
        fsutil::set_mode(socket_dir, 0o700)?;
        let conf = render(
            SERVER_TEMPLATE,
            &[
                ("server_port", ctx.port(SERVER_PORT)?.to_string()),
                ("server_socket", socket.display().to_string()),
                ("trust_domain", TRUST_DOMAIN.to_string()),
                ("data_dir", data.display().to_string()),
                ("agent_id", AGENT_ID.to_string()),
            ],
        )?;
        fsutil::write_atomic(&ctx.config_dir().join("spire-server.conf"), &conf)
    }

    fn command(&self, ctx: &Ctx) -> Result<Command> {
        let mut cmd = Command::new(bin(ctx, "spire-server"));
        cmd.arg("run").arg("-config").arg(ctx.config_dir().join("spire-server.conf"));
        Ok(cmd)
    }

    fn health(&self, ctx: &Ctx) -> Result<()> {
        server_cli(ctx, &["healthcheck"]).map(drop)
    }

    fn test_env(&self, ctx: &Ctx) -> Result<Vec<(&'static str, String)>> {
        Ok(vec![
            (var::SPIRE_SERVER_SOCKET, server_socket(ctx).display().to_string()),
            (var::TOOLS_BIN, bin(ctx, "").display().to_string()),
        ])
    }
}

pub struct SpireAgent;

impl SpireAgent {
    /// A fresh single-use join token aliased to [`AGENT_ID`]; aliases of older tokens are deleted.
    fn join_token(&self, ctx: &Ctx) -> Result<String> {
        let ttl = JOIN_TOKEN_TTL_SECS.to_string();
        let out = server_cli(ctx, &["token", "generate", "-spiffeID", AGENT_ID, "-ttl", &ttl, "-output", "json"])?;
        let parsed: serde_json::Value = serde_json::from_str(&out).context("parsing `token generate` output")?;
        let token = parsed["value"].as_str().context("`token generate` returned no value")?.to_string();
        for entry in entries(ctx, AGENT_ID)? {
            if !id_of(&entry["parent_id"]).ends_with(&format!("/join_token/{token}")) {
                delete_entry(ctx, &entry)?;
            }
        }
        Ok(token)
    }

    /// SPEC §2 entries, idempotent: a right entry is kept, anything else for the ID is replaced.
    fn register(&self, ctx: &Ctx) -> Result<()> {
        for service in ServiceIdentity::ALL {
            let selector = format!("path:{}", service_binary(ctx, service).display());
            let mut have_right_one = false;
            for entry in entries(ctx, service.spiffe_id())? {
                let selectors = entry["selectors"].as_array().cloned().unwrap_or_default();
                let right = id_of(&entry["parent_id"]) == AGENT_ID
                    && selectors.len() == 1
                    && selectors[0]["type"] == "unix"
                    && selectors[0]["value"] == selector.as_str();
                if right && !have_right_one {
                    have_right_one = true;
                } else {
                    delete_entry(ctx, &entry)?;
                }
            }
            if !have_right_one {
                server_cli(
                    ctx,
                    &[
                        "entry",
                        "create",
                        "-parentID",
                        AGENT_ID,
                        "-spiffeID",
                        service.spiffe_id(),
                        "-selector",
                        &format!("unix:{selector}"),
                    ],
                )?;
            }
        }
        Ok(())
    }

    /// Every service binary asks the agent for its SVID (`<binary> identity`) until it gets one
    /// with its own SPIFFE ID: proof that the entries reached the agent.
    fn wait_for_svids(&self, ctx: &Ctx) -> Result<()> {
        let endpoint = format!("unix://{}", agent_socket(ctx).display());
        for service in ServiceIdentity::ALL {
            let binary = service_binary(ctx, service);
            let mut last = String::new();
            let got = process::wait_until(SVID_READY_TIMEOUT, || {
                let mut cmd = Command::new(&binary);
                cmd.arg("identity").env("SPIFFE_ENDPOINT_SOCKET", &endpoint);
                match process::run(&mut cmd) {
                    Ok(out) if out.contains(&format!("\"spiffe_id\":\"{}\"", service.spiffe_id())) => true,
                    Ok(out) => {
                        last = out;
                        false
                    }
                    Err(e) => {
                        last = format!("{e:#}");
                        false
                    }
                }
            });
            if !got {
                bail!("{} got no SVID for {} within {SVID_READY_TIMEOUT:?}: {last}", binary.display(), service);
            }
        }
        Ok(())
    }
}

/// `spire-server entry show -spiffeID <id>`, as JSON entries.
fn entries(ctx: &Ctx, spiffe_id: &str) -> Result<Vec<serde_json::Value>> {
    let out = server_cli(ctx, &["entry", "show", "-spiffeID", spiffe_id, "-output", "json"])?;
    let parsed: serde_json::Value = serde_json::from_str(&out).context("parsing `entry show` output")?;
    Ok(parsed["entries"].as_array().cloned().unwrap_or_default())
}

fn delete_entry(ctx: &Ctx, entry: &serde_json::Value) -> Result<()> {
    let id = entry["id"].as_str().context("entry without id")?;
    server_cli(ctx, &["entry", "delete", "-entryID", id]).map(drop)
}

/// `{"trust_domain": "securepay.dev", "path": "/x"}` → `spiffe://securepay.dev/x`.
fn id_of(id: &serde_json::Value) -> String {
    format!("spiffe://{}{}", id["trust_domain"].as_str().unwrap_or_default(), id["path"].as_str().unwrap_or_default())
}

impl Component for SpireAgent {
    fn name(&self) -> &'static str {
        "spire-agent"
    }

    fn version(&self, _ctx: &Ctx) -> String {
        VERSION.to_string()
    }

    fn address(&self, ctx: &Ctx) -> Result<String> {
        Ok(format!("unix://{}", agent_socket(ctx).display()))
    }

    /// The agent listens only on its unix socket.
    fn ports(&self, _ctx: &Ctx) -> Result<Vec<u16>> {
        Ok(Vec::new())
    }

    fn process_marker(&self) -> &'static str {
        "spire-agent"
    }

    fn install(&self, ctx: &Ctx) -> Result<()> {
        ctx.wait_build(BUILD)?;
        install_spire(ctx, self.name())
    }

    /// Needs a running server: the trust bundle and the join token come from it.
    fn configure(&self, ctx: &Ctx) -> Result<()> {
        SpireServer
            .health(ctx)
            .context("spire-agent needs a running spire-server (`cargo xtask up --only spire-server,spire-agent`)")?;
        // Memory key manager: every start attests anew, nothing in the data dir is reusable.
        let data = ctx.data_dir(self.name());
        if data.exists() {
            std::fs::remove_dir_all(&data)?;
        }
        std::fs::create_dir_all(&data)?;
        let socket = agent_socket(ctx);
        std::fs::create_dir_all(socket.parent().context("agent socket has no directory")?)?;
        let _ = std::fs::remove_file(&socket);
        fsutil::write_atomic(&bundle_path(ctx), &server_cli(ctx, &["bundle", "show", "-format", "pem"])?)?;
        let token = self.join_token(ctx)?;
        let token_path = join_token_path(ctx);
        fsutil::write_atomic(&token_path, &token)?;
        fsutil::set_mode(&token_path, 0o600)?;
        let conf = render(
            AGENT_TEMPLATE,
            &[
                ("data_dir", data.display().to_string()),
                ("server_port", ctx.port(SERVER_PORT)?.to_string()),
                ("agent_socket", socket.display().to_string()),
                ("trust_domain", TRUST_DOMAIN.to_string()),
                ("trust_bundle", bundle_path(ctx).display().to_string()),
            ],
        )?;
        fsutil::write_atomic(&ctx.config_dir().join("spire-agent.conf"), &conf)
    }

    fn command(&self, ctx: &Ctx) -> Result<Command> {
        let mut cmd = Command::new(bin(ctx, "spire-agent"));
        cmd.arg("run")
            .arg("-config")
            .arg(ctx.config_dir().join("spire-agent.conf"))
            .arg("-joinTokenFile")
            .arg(join_token_path(ctx));
        Ok(cmd)
    }

    fn health(&self, ctx: &Ctx) -> Result<()> {
        let mut cmd = Command::new(bin(ctx, "spire-agent"));
        cmd.arg("healthcheck").arg("-socketPath").arg(agent_socket(ctx));
        process::run(&mut cmd).map(drop)
    }

    fn after_start(&self, ctx: &Ctx) -> Result<()> {
        // The entries name the binaries' paths and `wait_for_svids` runs them.
        ctx.wait_build(crate::services::BUILD)?;
        crate::services::build(ctx)?;
        self.register(ctx)?;
        self.wait_for_svids(ctx)
    }

    fn test_env(&self, ctx: &Ctx) -> Result<Vec<(&'static str, String)>> {
        Ok(vec![(var::SPIRE_AGENT_SOCKET, agent_socket(ctx).display().to_string())])
    }

    fn service_env(&self, ctx: &Ctx) -> Result<Vec<(&'static str, String)>> {
        Ok(vec![("SPIFFE_ENDPOINT_SOCKET", self.address(ctx)?)])
    }
}
