//! The four SecurePay services as the runner sees them: one table of ports (SPEC §2), how to
//! build and start them, and their rows in the status table.
//!
//! Services are built (`cargo build [--release] -p ...`, release in the dev profile unless `up
//! --debug`, debug in the test profile) into `target/<debug|release>/` and started with their
//! listen addresses and every component's [`Component::service_env`] in the environment.
//!
//! [`Component::service_env`]: crate::components::Component::service_env

use std::process::Command;
use std::time::Duration;

use anyhow::{Context as _, Result};
use securepay_core::identity::ServiceIdentity;
use securepay_testkit::var;

use crate::components::lifecycle::{StatusRow, wait_ports_closed};
use crate::components::{ScrapeTarget, registry};
use crate::ctx::{BuildMode, Ctx, Port};
use crate::{net, process};

/// The name of the services' background build in `up`'s progress view.
pub const BUILD: &str = "services";

/// How long `up` waits for every started service to answer `/ready` (dependencies reachable).
const SERVICE_READY_WAIT: Duration = Duration::from_secs(60);

pub struct Service {
    pub identity: ServiceIdentity,
    /// The port clients call (HTTP for the gateway, gRPC over mTLS for the others).
    pub main: Port,
    /// The admin HTTP port (`/health`, `/metrics`) for gRPC services; `None`: served on `main`.
    pub admin: Option<Port>,
}

/// SPEC §2. Admin ports are ours: payment 9181, account 9151, notification 8083 (its gRPC query on
/// 50052); test profile: +10000.
pub const SERVICES: [Service; 4] = [
    Service { identity: ServiceIdentity::ApiGateway, main: Port { key: "GATEWAY", dev: 8080 }, admin: None },
    Service {
        identity: ServiceIdentity::PaymentService,
        main: Port { key: "PAYMENT", dev: 8081 },
        admin: Some(Port { key: "PAYMENT_ADMIN", dev: 9181 }),
    },
    Service {
        identity: ServiceIdentity::AccountService,
        main: Port { key: "ACCOUNT", dev: 50051 },
        admin: Some(Port { key: "ACCOUNT_ADMIN", dev: 9151 }),
    },
    Service {
        identity: ServiceIdentity::NotificationService,
        main: Port { key: "NOTIFICATION", dev: 50052 },
        admin: Some(Port { key: "NOTIFICATION_ADMIN", dev: 8083 }),
    },
];

impl Service {
    /// `api-gateway`, `payment-service`, ...: the SPIFFE ID's path, also the Prometheus job name.
    pub fn name(&self) -> &'static str {
        let id = self.identity.spiffe_id();
        id.rsplit('/').next().unwrap_or(id)
    }

    pub fn binary(&self) -> &'static str {
        self.identity.binary()
    }

    /// The HTTP port serving `/health` and `/metrics`.
    pub fn http_port(&self, ctx: &Ctx) -> Result<u16> {
        ctx.port(self.admin.unwrap_or(self.main))
    }

    pub fn address(&self, ctx: &Ctx) -> Result<String> {
        let main = ctx.port(self.main)?;
        Ok(match self.admin {
            Some(admin) => format!("127.0.0.1:{main} (admin :{})", ctx.port(admin)?),
            None => format!("127.0.0.1:{main}"),
        })
    }

    pub fn scrape_target(&self, ctx: &Ctx) -> Result<ScrapeTarget> {
        Ok(ScrapeTarget { job: self.name().to_string(), port: self.http_port(ctx)?, path: "/metrics" })
    }

    fn pid_name(&self) -> String {
        format!("svc-{}", self.name())
    }

    /// The environment a service starts with: its own listen addresses, its peers' addresses and
    /// every component's `service_env`.
    fn env(&self, ctx: &Ctx) -> Result<Vec<(String, String)>> {
        let mut env = vec![
            ("SECUREPAY_PROFILE".to_string(), ctx.profile.to_string()),
            ("SECUREPAY_LISTEN_ADDR".to_string(), format!("127.0.0.1:{}", ctx.port(self.main)?)),
            ("RUST_LOG".to_string(), std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into())),
        ];
        if let Some(admin) = self.admin {
            env.push(("SECUREPAY_ADMIN_ADDR".into(), format!("127.0.0.1:{}", ctx.port(admin)?)));
        }
        // Where each service listens: SECUREPAY_GATEWAY_ADDR, SECUREPAY_PAYMENT_ADDR, ...
        for peer in &SERVICES {
            env.push((format!("SECUREPAY_{}_ADDR", peer.main.key), format!("127.0.0.1:{}", ctx.port(peer.main)?)));
        }
        for c in registry() {
            env.extend(c.service_env(ctx)?.into_iter().map(|(k, v)| (k.to_string(), v)));
        }
        if self.identity == ServiceIdentity::ApiGateway {
            env.push(("SECUREPAY_JWKS_PATH".into(), jwks_path(ctx).display().to_string()));
        }
        // Head sampling at the gateway (OpenTelemetry's standard variables, read by the SDK); the
        // services behind it follow the caller's decision, carried in `traceparent`.
        env.push(("OTEL_TRACES_SAMPLER".into(), "parentbased_traceidratio".into()));
        env.push(("OTEL_TRACES_SAMPLER_ARG".into(), trace_sample_ratio(ctx)?.to_string()));
        Ok(env)
    }
}

/// The share of requests whose traces are exported: `SECUREPAY_TRACE_SAMPLE_RATIO`, else 10 % in
/// the dev profile (exporting every span at full rate costs more CPU than the payment itself) and
/// 100 % in the test profile (the end-to-end test follows one payment's whole trace).
pub fn trace_sample_ratio(ctx: &Ctx) -> Result<f64> {
    const VAR: &str = "SECUREPAY_TRACE_SAMPLE_RATIO";
    match std::env::var(VAR) {
        Ok(text) if !text.trim().is_empty() => {
            let ratio: f64 = text.trim().parse().with_context(|| format!("{VAR}={text} is not a number"))?;
            anyhow::ensure!((0.0..=1.0).contains(&ratio), "{VAR}={text} must be between 0 and 1");
            Ok(ratio)
        }
        _ => Ok(match ctx.profile {
            crate::ctx::Profile::Dev => 0.1,
            crate::ctx::Profile::Test => 1.0,
        }),
    }
}

/// `cargo build [--release] -p <each service>` into the workspace's `target/`; the output goes to
/// `logs/services-build.log`. After `up`'s background build this is an incremental no-op.
pub fn build(ctx: &Ctx) -> Result<()> {
    crate::system::ensure(ctx, crate::system::Step::Build)?;
    ctx.progress.step("services", &format!("cargo build ({}) of the four services", ctx.build), || {
        let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        cmd.current_dir(&ctx.root).args(["build", "--quiet"]);
        if ctx.build == BuildMode::Release {
            cmd.arg("--release");
        }
        for s in &SERVICES {
            cmd.args(["-p", s.binary()]);
        }
        process::run_logged(&mut cmd, &ctx.log_file("services-build"))
    })
}

/// Starts each service that is not running, then waits until every started one answers `/ready`
/// (its database, cache and broker reachable). A service that exits fails `up` with its log tail.
pub fn up(ctx: &Ctx) -> Result<()> {
    ctx.wait_build(BUILD)?;
    build(ctx)?;
    dev_keys(ctx)?;
    let mut started = Vec::new();
    for s in &SERVICES {
        let pid_file = ctx.pid_file(&s.pid_name());
        if let Some(pid) = process::running_pid(&pid_file, s.binary()) {
            let bin = ctx.service_binary(s.binary());
            if process::executable(pid).is_some_and(|exe| exe == bin) {
                ctx.progress.note(s.name(), &format!("already running (pid {pid})"));
                continue;
            }
            // Started from the other build (`up --debug` after a release `up`, or the reverse):
            // its SPIRE entry now names the other path, so it must be restarted.
            ctx.progress.step(s.name(), &format!("restart pid {pid} as the {} build", ctx.build), || {
                process::stop(pid, s.binary(), "TERM", Duration::from_secs(15))
            })?;
        }
        let port = s.http_port(ctx)?;
        if net::port_open(port) {
            anyhow::bail!("{}: port {port} is already in use by a process this profile did not start", s.name());
        }
        let child = ctx.progress.step(s.name(), &format!("start {}", s.address(ctx)?), || {
            let bin = ctx.service_binary(s.binary());
            let mut cmd = Command::new(&bin);
            cmd.current_dir(&ctx.root).envs(s.env(ctx)?);
            process::spawn_detached(&mut cmd, &ctx.log_file(s.name()), &pid_file)
                .with_context(|| format!("starting {}", bin.display()))
        })?;
        started.push((s, port, child));
    }
    if started.is_empty() {
        return Ok(());
    }
    let wait = format!("wait until the services are ready ({} s at most)", SERVICE_READY_WAIT.as_secs());
    ctx.progress.step("services", &wait, || {
        let ready = |port: u16| service_ready(port);
        process::wait_until(SERVICE_READY_WAIT, || {
            started.iter_mut().all(|(_, port, child)| ready(*port) || !matches!(child.try_wait(), Ok(None)))
        });
        for (s, port, child) in &mut started {
            if let Some(status) = child.try_wait()? {
                anyhow::bail!(
                    "{} exited at start ({status}):\n{}",
                    s.name(),
                    crate::fsutil::tail(&ctx.log_file(s.name()), 20)
                );
            }
            if !ready(*port) {
                let answer = net::http_get(*port, "/ready").map(|(code, body)| format!("{code} {body}"));
                anyhow::bail!(
                    "{} is not ready after {} s: {}\n{}",
                    s.name(),
                    SERVICE_READY_WAIT.as_secs(),
                    answer.unwrap_or_else(|e| format!("{e:#}")),
                    crate::fsutil::tail(&ctx.log_file(s.name()), 20)
                );
            }
        }
        Ok(())
    })
}

/// Where the end-to-end tests find the running services (`securepay_testkit::var`).
pub fn test_env(ctx: &Ctx) -> Result<Vec<(String, String)>> {
    let url = |port: Port| -> Result<String> { Ok(format!("http://127.0.0.1:{}", ctx.port(port)?)) };
    let [gateway, payment, account, notification] = &SERVICES;
    Ok(vec![
        (var::GATEWAY_URL.into(), url(gateway.main)?),
        (var::NOTIFICATION_ADMIN_URL.into(), url(notification.admin.expect("notification has an admin port"))?),
        (var::PAYMENT_ADMIN_URL.into(), url(payment.admin.expect("payment has an admin port"))?),
        (var::ACCOUNT_ADMIN_URL.into(), url(account.admin.expect("account has an admin port"))?),
        (var::JWT_DEV_KEY.into(), dev_key_path(ctx).display().to_string()),
    ])
}

/// The development JWT signing key (ES256, PKCS#8) the gateway's `token` command mints with.
pub fn dev_key_path(ctx: &Ctx) -> std::path::PathBuf {
    ctx.secrets_dir().join("jwt-dev-key.pem")
}

/// The JWKS with the dev key's public half, which the gateway verifies tokens against.
fn jwks_path(ctx: &Ctx) -> std::path::PathBuf {
    ctx.secrets_dir().join("jwks.json")
}

/// Creates the development key pair once (`securepay-gateway dev-keys`); kept across restarts so
/// minted tokens stay valid.
fn dev_keys(ctx: &Ctx) -> Result<()> {
    if dev_key_path(ctx).exists() && jwks_path(ctx).exists() {
        return Ok(());
    }
    ctx.progress.step("api-gateway", "create the development JWT key pair", || {
        let bin = ctx.service_binary(ServiceIdentity::ApiGateway.binary());
        let mut cmd = Command::new(bin);
        cmd.arg("dev-keys").arg("--dir").arg(ctx.secrets_dir());
        process::run(&mut cmd).map(drop)
    })
}

/// `/ready` answers 200 (a service without a readiness endpoint: `/health`).
fn service_ready(port: u16) -> bool {
    match net::http_get(port, "/ready") {
        Ok((200, _)) => true,
        Ok((404, _)) => net::http_ok(port, "/health").is_ok(),
        _ => false,
    }
}

pub fn down(ctx: &Ctx) -> Result<()> {
    for s in SERVICES.iter().rev() {
        let pid_file = ctx.pid_file(&s.pid_name());
        match process::running_pid(&pid_file, s.binary()) {
            Some(pid) => ctx.progress.step(s.name(), &format!("stop pid {pid}"), || {
                process::stop(pid, s.binary(), "TERM", Duration::from_secs(15))?;
                let mut ports = vec![ctx.port(s.main)?];
                ports.extend(s.admin.map(|p| ctx.port(p)).transpose()?);
                wait_ports_closed(&ports)
            })?,
            None => ctx.progress.note(s.name(), "not running"),
        }
        let _ = std::fs::remove_file(&pid_file);
    }
    Ok(())
}

pub fn status(ctx: &Ctx, s: &Service) -> StatusRow {
    let pid = process::running_pid(&ctx.pid_file(&s.pid_name()), s.binary());
    let health = match (pid, s.http_port(ctx)) {
        (None, _) => "not started".to_string(),
        (Some(_), Ok(port)) if net::port_open(port) => match net::http_ok(port, "/health") {
            Ok(()) => "healthy".to_string(),
            Err(e) => format!("UNHEALTHY: {e:#}"),
        },
        (Some(_), _) => "running, no HTTP listener yet".to_string(),
    };
    StatusRow { name: s.name().to_string(), address: s.address(ctx).unwrap_or_else(|e| format!("{e:#}")), pid, health }
}
