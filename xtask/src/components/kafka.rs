//! Apache Kafka 4.x, single-node KRaft (broker + controller in one JVM), from Maven Central jars
//! on Java 17, with the SPEC §7 topics created from `securepay_core::topology::topic::ALL`.
//!
//! Install: a throwaway pom depending on `kafka_2.13`, `kafka-tools` (TopicCommand) and a log4j2
//! slf4j binding; `mvn dependency:copy-dependencies` puts the runtime jars into the tool cache.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use securepay_core::topology::topic;
use securepay_testkit::var;

use super::Component;
use crate::ctx::{Ctx, Port};
use crate::install::cached_tool;
use crate::{fsutil, net, process};

pub const VERSION: &str = "4.4.0";
pub const PORT: Port = Port { key: "KAFKA", dev: 9092 };
pub const CONTROLLER_PORT: Port = Port { key: "KAFKA_CONTROLLER", dev: 9093 };
/// Partitions per topic: enough for a consumer group to show rebalancing, small for one machine.
const TOPIC_PARTITIONS: u32 = 3;
const LOG4J_VERSION: &str = "2.25.3";
const SLF4J_VERSION: &str = "2.0.17";
/// The broker's heap: Kafka's default 1 GiB is more than a single-node dev broker needs.
const HEAP: &[&str] = &["-Xms256m", "-Xmx768m"];

pub struct Kafka;

impl Kafka {
    fn libs(&self, ctx: &Ctx) -> PathBuf {
        ctx.tool_dir("kafka", VERSION).join("libs")
    }

    fn java(&self, ctx: &Ctx) -> Command {
        let mut cmd = Command::new("java");
        cmd.args(HEAP)
            .arg(format!("-Dlog4j2.configurationFile={}", ctx.config_dir().join("kafka-log4j2.properties").display()))
            .arg("-cp")
            .arg(format!("{}/*", self.libs(ctx).display()));
        cmd
    }

    fn properties(&self, ctx: &Ctx) -> PathBuf {
        ctx.config_dir().join("kafka.properties")
    }

    /// Topics whose first partition is not in the log dir yet (no JVM needed to find out).
    fn missing_topics(&self, ctx: &Ctx) -> Vec<&'static str> {
        let data = ctx.data_dir(self.name());
        topic::ALL.into_iter().filter(|t| !data.join(format!("{t}-0")).is_dir()).collect()
    }
}

impl Component for Kafka {
    fn name(&self) -> &'static str {
        "kafka"
    }

    fn version(&self, _ctx: &Ctx) -> String {
        VERSION.to_string()
    }

    fn address(&self, ctx: &Ctx) -> Result<String> {
        Ok(format!("127.0.0.1:{} (controller :{})", ctx.port(PORT)?, ctx.port(CONTROLLER_PORT)?))
    }

    fn ports(&self, ctx: &Ctx) -> Result<Vec<u16>> {
        Ok(vec![ctx.port(PORT)?, ctx.port(CONTROLLER_PORT)?])
    }

    fn process_marker(&self) -> &'static str {
        "kafka.Kafka"
    }

    fn system_step(&self) -> Option<crate::system::Step> {
        Some(crate::system::Step::Kafka)
    }

    fn install(&self, ctx: &Ctx) -> Result<()> {
        crate::system::ensure(ctx, crate::system::Step::Kafka)?;
        let maven_repo = ctx.cache.join("maven-repo");
        cached_tool(ctx, self.name(), "kafka", VERSION, |dir| {
            std::fs::write(dir.join("pom.xml"), pom())?;
            process::run(
                Command::new("mvn")
                    .current_dir(dir)
                    .args(["-B", "-q"])
                    .arg(format!("-Dmaven.repo.local={}", maven_repo.display()))
                    .args(["dependency:copy-dependencies", "-DincludeScope=runtime"])
                    .arg(format!("-DoutputDirectory={}", dir.join("libs").display())),
            )?;
            if !dir.join(format!("libs/kafka_2.13-{VERSION}.jar")).is_file() {
                bail!("mvn finished but kafka_2.13-{VERSION}.jar is not in {}", dir.join("libs").display());
            }
            Ok(())
        })
        .map(drop)
    }

    fn configure(&self, ctx: &Ctx) -> Result<()> {
        let data = ctx.data_dir(self.name());
        std::fs::create_dir_all(&data)?;
        let (port, controller) = (ctx.port(PORT)?, ctx.port(CONTROLLER_PORT)?);
        fsutil::write_atomic(&self.properties(ctx), &server_properties(&data, port, controller))?;
        fsutil::write_atomic(&ctx.config_dir().join("kafka-log4j2.properties"), LOG4J2)?;
        if data.join("meta.properties").is_file() {
            return Ok(());
        }
        process::run(
            self.java(ctx)
                .args(["kafka.tools.StorageTool", "format", "--standalone", "--ignore-formatted"])
                // One argument: a base64url id may start with `-` (1 in 64), which the tool's
                // parser would otherwise read as an option (CI failed on such an id).
                .arg(format!("--cluster-id={}", cluster_id()?))
                .arg("--config")
                .arg(self.properties(ctx)),
        )
        .context("formatting the KRaft storage")
        .map(drop)
    }

    fn command(&self, ctx: &Ctx) -> Result<Command> {
        let mut cmd = self.java(ctx);
        cmd.args(["-XX:+UseG1GC", "-Djava.awt.headless=true", "kafka.Kafka"]).arg(self.properties(ctx));
        Ok(cmd)
    }

    fn health(&self, ctx: &Ctx) -> Result<()> {
        net::kafka_api_versions(ctx.port(PORT)?)
    }

    fn startup_timeout(&self) -> Duration {
        Duration::from_secs(120)
    }

    /// Creates the missing topics, one TopicCommand JVM each, in parallel.
    fn after_start(&self, ctx: &Ctx) -> Result<()> {
        let bootstrap = format!("127.0.0.1:{}", ctx.port(PORT)?);
        let children: Vec<_> = self
            .missing_topics(ctx)
            .into_iter()
            .map(|t| {
                let mut cmd = self.java(ctx);
                cmd.args(["org.apache.kafka.tools.TopicCommand", "--bootstrap-server", &bootstrap])
                    .args(["--create", "--if-not-exists", "--topic", t, "--replication-factor", "1"])
                    .args(["--partitions", &TOPIC_PARTITIONS.to_string()]);
                (t, std::thread::spawn(move || process::run(&mut cmd)))
            })
            .collect();
        for (t, child) in children {
            child
                .join()
                .map_err(|_| anyhow::anyhow!("topic thread panicked"))?
                .with_context(|| format!("creating topic {t}"))?;
        }
        // The partition directories appear once the broker has applied the metadata.
        if !process::wait_until(Duration::from_secs(30), || self.missing_topics(ctx).is_empty()) {
            bail!(
                "topics {:?} still have no partition 0 in {}",
                self.missing_topics(ctx),
                ctx.data_dir("kafka").display()
            );
        }
        Ok(())
    }

    fn test_env(&self, ctx: &Ctx) -> Result<Vec<(&'static str, String)>> {
        Ok(vec![(var::KAFKA_BROKERS, format!("127.0.0.1:{}", ctx.port(PORT)?))])
    }

    fn service_env(&self, ctx: &Ctx) -> Result<Vec<(&'static str, String)>> {
        Ok(vec![("SECUREPAY_KAFKA_BROKERS", format!("127.0.0.1:{}", ctx.port(PORT)?))])
    }
}

fn pom() -> String {
    let dep = |group: &str, artifact: &str, version: &str| {
        format!(
            "    <dependency><groupId>{group}</groupId><artifactId>{artifact}</artifactId><version>{version}</version></dependency>\n"
        )
    };
    format!(
        "<project xmlns=\"http://maven.apache.org/POM/4.0.0\">\n  <modelVersion>4.0.0</modelVersion>\n  \
         <groupId>dev.securepay.xtask</groupId><artifactId>kafka-runtime</artifactId><version>1</version>\n  \
         <packaging>pom</packaging>\n  <dependencies>\n{}{}{}{}{}  </dependencies>\n</project>\n",
        dep("org.apache.kafka", "kafka_2.13", VERSION),
        dep("org.apache.kafka", "kafka-tools", VERSION),
        // Some transitive dependency pins slf4j 1.7, which cannot see the slf4j2 binding.
        dep("org.slf4j", "slf4j-api", SLF4J_VERSION),
        dep("org.apache.logging.log4j", "log4j-slf4j2-impl", LOG4J_VERSION),
        dep("org.apache.logging.log4j", "log4j-core", LOG4J_VERSION),
    )
}

/// Single-node KRaft (INFRA-NOTES): broker + controller, loopback only, replication factors 1.
fn server_properties(data: &Path, port: u16, controller: u16) -> String {
    format!(
        "# generated by cargo xtask; edits are overwritten on the next `up`\n\
         process.roles=broker,controller\n\
         node.id=1\n\
         controller.quorum.bootstrap.servers=127.0.0.1:{controller}\n\
         listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller}\n\
         advertised.listeners=PLAINTEXT://127.0.0.1:{port}\n\
         controller.listener.names=CONTROLLER\n\
         inter.broker.listener.name=PLAINTEXT\n\
         listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT\n\
         log.dirs={data}\n\
         num.partitions={TOPIC_PARTITIONS}\n\
         auto.create.topics.enable=false\n\
         offsets.topic.replication.factor=1\n\
         offsets.topic.num.partitions=3\n\
         transaction.state.log.replication.factor=1\n\
         transaction.state.log.min.isr=1\n\
         share.coordinator.state.topic.replication.factor=1\n\
         share.coordinator.state.topic.min.isr=1\n\
         group.initial.rebalance.delay.ms=0\n",
        data = data.display(),
    )
}

const LOG4J2: &str = "# generated by cargo xtask\n\
status = warn\n\
appender.console.type = Console\n\
appender.console.name = STDOUT\n\
appender.console.layout.type = PatternLayout\n\
appender.console.layout.pattern = [%d] %p %m (%c)%n\n\
rootLogger.level = info\n\
rootLogger.appenderRef.stdout.ref = STDOUT\n\
logger.kafka.name = org.apache.kafka\n\
logger.kafka.level = warn\n\
logger.state.name = state.change.logger\n\
logger.state.level = warn\n";

/// A KRaft cluster id: 16 random bytes, base64url without padding (what `random-uuid` prints).
fn cluster_id() -> Result<String> {
    const B64: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let bytes = fsutil::random_bytes::<16>()?;
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().fold(0u32, |acc, b| (acc << 8) | u32::from(*b)) << (8 * (3 - chunk.len()));
        for i in 0..=chunk.len() {
            out.push(B64[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_ids_are_22_base64url_characters_like_random_uuid() {
        let id = cluster_id().unwrap();
        assert_eq!(id.len(), 22, "{id}");
        assert!(id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'), "{id}");
        assert_ne!(id, cluster_id().unwrap());
    }

    #[test]
    fn the_broker_listens_on_loopback_only() {
        let props = server_properties(Path::new("/tmp/k"), 19092, 19093);
        for line in props.lines().filter(|l| l.contains("://")) {
            assert!(!line.contains("0.0.0.0") && line.contains("127.0.0.1"), "{line}");
        }
    }
}
