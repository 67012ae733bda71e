//! compose.yaml cannot run on our machines (no Docker engine), so this test reads it — with the SPIRE
//! compose configs and the observability configs it mounts — and checks that it describes the same
//! platform as SPEC §2/§7/§8 and the names in `securepay_core` (identities, topics, schemas). Nothing
//! here starts a process or opens a socket.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use securepay_core::identity::ServiceIdentity;
use securepay_core::topology::{self, topic};
use serde_norway::Value;

/// The platform's long-running components (SPEC §1 layout, seed table).
const INFRASTRUCTURE: [&str; 8] =
    ["postgres", "redis", "kafka", "spire-server", "spire-agent", "jaeger", "prometheus", "grafana"];
/// compose service name → the binary its image runs (`ServiceIdentity::binary`).
const SECUREPAY_SERVICES: [(&str, ServiceIdentity); 4] = [
    ("gateway", ServiceIdentity::ApiGateway),
    ("payment", ServiceIdentity::PaymentService),
    ("account", ServiceIdentity::AccountService),
    ("notification", ServiceIdentity::NotificationService),
];
/// Containers that do their job and exit 0; everything else must keep running and be healthy.
const ONE_SHOTS: [&str; 4] = ["kafka-init", "spire-init", "db-setup", "gateway-dev-keys"];
/// compose service → the PostgreSQL login role it runs as (one per schema of `topology::SCHEMAS`).
const DB_ROLES: [(&str, &str); 3] =
    [("payment", "payment_service"), ("account", "account_service"), ("notification", "notification_service")];
/// Where every container finds its password files (`SECUREPAY_SECRETS_DIR`).
const SECRETS_DIR: &str = "/run/secrets";
/// SPEC §2 and the seed's port table: compose service → port published on the host. The
/// notification service publishes nothing: clients read notifications through the gateway.
const PUBLISHED_PORTS: [(&str, u16); 9] = [
    ("gateway", 8080),
    ("payment", 8081),
    ("account", 50051),
    ("postgres", 5432),
    ("redis", 6379),
    ("kafka", 9092),
    ("jaeger", 16686),
    ("prometheus", 9090),
    ("grafana", 3000),
];
/// The seed's SPIRE server port, kept inside its container.
const SPIRE_SERVER_PORT: u16 = 8081;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask/ has a parent").to_path_buf()
}

fn read(relative: &str) -> String {
    let path = root().join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

fn yaml(relative: &str) -> Value {
    serde_norway::from_str(&read(relative)).unwrap_or_else(|e| panic!("{relative} is not valid YAML: {e}"))
}

fn json(relative: &str) -> serde_json::Value {
    serde_json::from_str(&read(relative)).unwrap_or_else(|e| panic!("{relative} is not valid JSON: {e}"))
}

fn compose() -> Value {
    yaml("compose.yaml")
}

fn services(compose: &Value) -> BTreeMap<String, Value> {
    let services = compose["services"].as_mapping().expect("compose.yaml has a `services` mapping");
    services
        .iter()
        .map(|(name, body)| (name.as_str().expect("service names are strings").to_string(), body.clone()))
        .collect()
}

fn service<'a>(services: &'a BTreeMap<String, Value>, name: &str) -> &'a Value {
    services.get(name).unwrap_or_else(|| panic!("compose.yaml has no service `{name}`"))
}

fn long_running(services: &BTreeMap<String, Value>) -> impl Iterator<Item = (&String, &Value)> {
    services.iter().filter(|(name, _)| !ONE_SHOTS.contains(&name.as_str()))
}

/// A service's environment, from either compose form (mapping or `KEY=value` list).
fn environment(service: &Value) -> BTreeMap<String, String> {
    match &service["environment"] {
        Value::Mapping(map) => map
            .iter()
            .map(|(k, v)| {
                let value = match v {
                    Value::String(s) => s.clone(),
                    Value::Number(n) => n.to_string(),
                    Value::Bool(b) => b.to_string(),
                    other => panic!("environment value {other:?} is not a scalar"),
                };
                (k.as_str().expect("environment keys are strings").to_string(), value)
            })
            .collect(),
        Value::Sequence(items) => key_value_list(items),
        _ => BTreeMap::new(),
    }
}

/// Compose's list form of a mapping: `["KEY=value", ...]`.
fn key_value_list(items: &[Value]) -> BTreeMap<String, String> {
    items
        .iter()
        .filter_map(|item| item.as_str()?.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn labels(service: &Value) -> BTreeMap<String, String> {
    match &service["labels"] {
        Value::Mapping(map) => map
            .iter()
            .map(|(k, v)| (k.as_str().unwrap_or_default().to_string(), v.as_str().unwrap_or_default().to_string()))
            .collect(),
        Value::Sequence(items) => key_value_list(items),
        _ => BTreeMap::new(),
    }
}

/// `(host port, container port)` of each published port, short (`[ip:]host:container`) or long syntax.
fn published_ports(service: &Value) -> Vec<(u16, u16)> {
    let Some(ports) = service["ports"].as_sequence() else {
        return Vec::new();
    };
    ports
        .iter()
        .map(|port| match port {
            Value::String(spec) => {
                let spec = spec.split('/').next().unwrap_or(spec);
                let parts: Vec<&str> = spec.rsplitn(3, ':').collect();
                let container: u16 = parts[0].parse().unwrap_or_else(|_| panic!("bad port spec {spec}"));
                let host: u16 =
                    parts.get(1).map_or(container, |h| h.parse().unwrap_or_else(|_| panic!("bad port spec {spec}")));
                (host, container)
            }
            Value::Mapping(_) => {
                let number = |v: &Value| -> u16 {
                    match v {
                        Value::Number(n) => n.as_u64().and_then(|n| u16::try_from(n).ok()),
                        Value::String(s) => s.parse().ok(),
                        _ => None,
                    }
                    .unwrap_or_else(|| panic!("bad port {v:?}"))
                };
                (number(&port["published"]), number(&port["target"]))
            }
            other => panic!("bad port entry {other:?}"),
        })
        .collect()
}

/// The port of a `host:port` listen address.
fn port_of(address: &str) -> u16 {
    address.rsplit(':').next().and_then(|p| p.parse().ok()).unwrap_or_else(|| panic!("`{address}` is not host:port"))
}

/// A file compose copies into a container (`configs:` or `secrets:` of a service, long or short form).
#[derive(Debug)]
struct FileMount {
    source: String,
    target: String,
    uid: Option<String>,
    mode: Option<u64>,
}

fn file_mounts(service: &Value) -> Vec<FileMount> {
    let mut mounts = Vec::new();
    for (key, default_dir) in [("configs", ""), ("secrets", SECRETS_DIR)] {
        for item in service[key].as_sequence().into_iter().flatten() {
            let (source, target, uid, mode) = match item {
                Value::String(source) => (source.clone(), None, None, None),
                Value::Mapping(_) => (
                    item["source"].as_str().expect("a mount has a source").to_string(),
                    item["target"].as_str().map(str::to_string),
                    item["uid"].as_str().map(str::to_string),
                    file_mode(&item["mode"]),
                ),
                other => panic!("bad {key} entry {other:?}"),
            };
            let target = target.unwrap_or_else(|| format!("{default_dir}/{source}"));
            mounts.push(FileMount { source, target, uid, mode });
        }
    }
    mounts
}

/// A mount's `mode`. Compose reads YAML 1.1 integers, so `0400` is octal (and our YAML parser hands it
/// over as the string "0400"); `0o400` and `256` mean the same.
fn file_mode(mode: &Value) -> Option<u64> {
    match mode {
        Value::Number(n) => n.as_u64(),
        Value::String(s) if s.starts_with('0') && s.len() > 1 => {
            u64::from_str_radix(s.trim_start_matches("0o").trim_start_matches('0'), 8).ok()
        }
        _ => None,
    }
}

/// The uid of the Dockerfile's `USER uid:gid`: who the service images run as.
fn image_uid() -> String {
    let dockerfile = read("Dockerfile");
    let user = dockerfile.lines().find_map(|line| line.strip_prefix("USER ")).expect("the Dockerfile sets a USER");
    user.split(':').next().unwrap_or(user).trim().to_string()
}

/// The command of a one-shot as one text (compose list or string form).
fn command_text(service: &Value) -> String {
    match &service["command"] {
        Value::Sequence(argv) => argv.iter().filter_map(Value::as_str).collect::<Vec<_>>().join(" "),
        Value::String(command) => command.clone(),
        _ => String::new(),
    }
}

/// The SPIFFE ID's path: `api-gateway` for `spiffe://securepay.dev/api-gateway`.
fn spiffe_path(identity: ServiceIdentity) -> &'static str {
    identity.spiffe_id().rsplit('/').next().unwrap_or_default()
}

fn build_arg_service(service: &Value) -> Option<&str> {
    service["build"]["args"]["SERVICE"].as_str()
}

/// The docker label selectors (`label:<key>:<value>`) of each registration entry, by SPIFFE ID.
fn registration_entries() -> BTreeMap<String, Vec<String>> {
    let entries = json("spire/compose/entries.json");
    let entries = entries["entries"].as_array().expect("entries.json has an `entries` array");
    let mut by_id = BTreeMap::new();
    for entry in entries {
        let id = entry["spiffe_id"].as_str().expect("every entry has a spiffe_id").to_string();
        let selectors = entry["selectors"]
            .as_array()
            .expect("every entry has selectors")
            .iter()
            .map(|s| format!("{}:{}", s["type"].as_str().unwrap_or_default(), s["value"].as_str().unwrap_or_default()))
            .collect();
        assert!(by_id.insert(id.clone(), selectors).is_none(), "two registration entries for {id}");
    }
    by_id
}

#[test]
fn compose_defines_every_platform_component_the_four_services_and_the_init_one_shots() {
    let services = services(&compose());
    let expected = INFRASTRUCTURE.iter().chain(&ONE_SHOTS).copied().chain(SECUREPAY_SERVICES.iter().map(|(n, _)| *n));
    let missing: Vec<&str> = expected.filter(|name| !services.contains_key(*name)).collect();
    assert!(missing.is_empty(), "compose.yaml lacks services {missing:?}");
}

#[test]
fn each_securepay_service_is_built_from_the_dockerfile_for_its_own_binary() {
    let services = services(&compose());
    let dockerfile = read("Dockerfile");
    for (name, identity) in SECUREPAY_SERVICES {
        let service = service(&services, name);
        assert_eq!(build_arg_service(service), Some(identity.binary()), "{name}: build.args.SERVICE");
        assert!(dockerfile.contains(identity.binary()), "Dockerfile does not accept SERVICE={}", identity.binary());
    }
}

#[test]
fn published_ports_match_spec_and_seed() {
    let services = services(&compose());
    for (name, port) in PUBLISHED_PORTS {
        let ports = published_ports(service(&services, name));
        assert!(ports.contains(&(port, port)), "{name} must publish {port}:{port}, publishes {ports:?}");
    }
    let notification = published_ports(service(&services, "notification"));
    assert!(notification.is_empty(), "notification must publish no port (the gateway fronts it): {notification:?}");
    let mut owners: BTreeMap<u16, Vec<&str>> = BTreeMap::new();
    for (name, body) in &services {
        for (host, _) in published_ports(body) {
            owners.entry(host).or_default().push(name);
        }
    }
    let clashes: Vec<_> = owners.iter().filter(|(_, names)| names.len() > 1).collect();
    assert!(clashes.is_empty(), "host ports published twice: {clashes:?}");
}

#[test]
fn spire_server_keeps_the_seed_port_8081_inside_its_container_and_does_not_publish_it() {
    let services = services(&compose());
    assert!(published_ports(service(&services, "spire-server")).is_empty(), "spire-server must not publish ports");
    let server_conf = read("spire/compose/server.conf");
    assert!(server_conf.contains(&format!("bind_port = \"{SPIRE_SERVER_PORT}\"")), "server.conf: bind_port");
    let agent_conf = read("spire/compose/agent.conf");
    assert!(agent_conf.contains(&format!("server_port = \"{SPIRE_SERVER_PORT}\"")), "agent.conf: server_port");
    assert!(agent_conf.contains("server_address = \"spire-server\""), "agent.conf: server_address");
}

#[test]
fn every_long_running_service_has_a_healthcheck() {
    let services = services(&compose());
    for (name, body) in long_running(&services) {
        let check = &body["healthcheck"];
        assert_ne!(check["disable"].as_bool(), Some(true), "{name}: healthcheck disabled");
        let test = match &check["test"] {
            Value::Sequence(argv) => argv.iter().filter_map(Value::as_str).collect::<Vec<_>>().join(" "),
            Value::String(command) => command.clone(),
            _ => String::new(),
        };
        assert!(!test.trim().is_empty() && test != "NONE", "{name} has no healthcheck test");
    }
}

#[test]
fn one_shots_run_once_and_long_running_services_restart() {
    let services = services(&compose());
    for name in ONE_SHOTS {
        assert_eq!(service(&services, name)["restart"].as_str(), Some("no"), "{name}: restart");
    }
    for (name, body) in long_running(&services) {
        assert_eq!(body["restart"].as_str(), Some("unless-stopped"), "{name}: restart");
    }
}

#[test]
fn dependencies_wait_for_healthy_services_and_completed_one_shots() {
    let services = services(&compose());
    for (name, body) in &services {
        match &body["depends_on"] {
            Value::Null => continue,
            Value::Mapping(deps) => {
                for (dep, spec) in deps {
                    let dep = dep.as_str().expect("dependency names are strings");
                    assert!(services.contains_key(dep), "{name} depends on unknown service {dep}");
                    let expected =
                        if ONE_SHOTS.contains(&dep) { "service_completed_successfully" } else { "service_healthy" };
                    assert_eq!(spec["condition"].as_str(), Some(expected), "{name} → {dep}: condition");
                }
            }
            other => {
                panic!("{name}: depends_on must use the long form with conditions, got {other:?}")
            }
        }
    }
}

#[test]
fn securepay_services_start_after_their_infrastructure_and_callees() {
    let services = services(&compose());
    let deps = |name: &str| -> BTreeSet<String> {
        service(&services, name)["depends_on"]
            .as_mapping()
            .map(|m| m.keys().filter_map(|k| k.as_str().map(str::to_string)).collect())
            .unwrap_or_default()
    };
    let required: [(&str, &[&str]); 8] = [
        ("gateway", &["gateway-dev-keys", "spire-agent", "jaeger", "payment", "account"]),
        ("payment", &["postgres", "db-setup", "redis", "kafka-init", "spire-agent", "jaeger", "account"]),
        ("account", &["postgres", "db-setup", "redis", "kafka-init", "spire-agent", "jaeger"]),
        ("notification", &["postgres", "db-setup", "kafka-init", "spire-agent", "jaeger"]),
        ("spire-agent", &["spire-server", "spire-init"]),
        ("spire-init", &["spire-server"]),
        ("kafka-init", &["kafka"]),
        ("db-setup", &["postgres"]),
    ];
    for (name, needs) in required {
        let have = deps(name);
        let missing: Vec<_> = needs.iter().filter(|d| !have.contains(**d)).collect();
        assert!(missing.is_empty(), "{name} does not wait for {missing:?}");
    }
}

#[test]
fn registration_entries_name_exactly_the_four_service_identities() {
    let entries = registration_entries();
    let named: BTreeSet<&str> = entries.keys().map(String::as_str).collect();
    let expected: BTreeSet<&str> = ServiceIdentity::ALL.iter().map(|s| s.spiffe_id()).collect();
    assert_eq!(named, expected);
    for (id, selectors) in &entries {
        assert!(!selectors.is_empty(), "{id}: no selectors");
        assert!(
            selectors.iter().all(|s| s.starts_with("docker:label:")),
            "{id}: selectors {selectors:?} are not docker labels"
        );
    }
}

#[test]
fn each_service_container_carries_the_label_its_registration_entry_selects() {
    let services = services(&compose());
    let entries = registration_entries();
    for (name, identity) in SECUREPAY_SERVICES {
        let labels = labels(service(&services, name));
        let selectors = &entries[identity.spiffe_id()];
        for selector in selectors {
            let (key, value) = selector
                .strip_prefix("docker:label:")
                .and_then(|kv| kv.split_once(':'))
                .unwrap_or_else(|| panic!("{selector} is not docker:label:<key>:<value>"));
            assert_eq!(labels.get(key).map(String::as_str), Some(value), "{name} must carry label {key}={value}");
        }
        // No service may carry another identity's label: that would hand it the other SVID too.
        for other in ServiceIdentity::ALL.into_iter().filter(|o| *o != identity) {
            for selector in &entries[other.spiffe_id()] {
                let kv = selector.trim_start_matches("docker:label:");
                let carried = kv.split_once(':').is_some_and(|(k, v)| labels.get(k).map(String::as_str) == Some(v));
                assert!(!carried, "{name} carries {selector}, the selector of {}", other.spiffe_id());
            }
        }
    }
}

#[test]
fn spire_init_registers_the_entries_file_and_the_agent_attests_docker_workloads() {
    let init_dockerfile = read("spire/compose/init.Dockerfile");
    assert!(init_dockerfile.contains("entries.json"), "spire-init image does not ship entries.json");
    let init_script = read("spire/compose/init.sh");
    assert!(
        init_script.contains("entry create") && init_script.contains("-data"),
        "init.sh must create the entries from the file"
    );
    let parents: BTreeSet<String> = json("spire/compose/entries.json")["entries"]
        .as_array()
        .expect("entries array")
        .iter()
        .map(|e| e["parent_id"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(parents.len(), 1, "all workloads hang off the one compose agent: {parents:?}");
    let parent = parents.into_iter().next().unwrap_or_default();
    assert!(init_script.contains(&parent), "init.sh must alias the agent's join token to {parent}");
    assert!(read("spire/compose/agent.conf").contains("WorkloadAttestor \"docker\""), "agent.conf: docker attestor");
    let services = services(&compose());
    let agent_volumes = format!("{:?}", service(&services, "spire-agent")["volumes"]);
    assert!(agent_volumes.contains("/var/run/docker.sock"), "the docker attestor needs the Docker socket");
    assert_eq!(
        service(&services, "spire-agent")["pid"].as_str(),
        Some("host"),
        "the docker attestor needs the host PID namespace"
    );
}

#[test]
fn every_service_gets_the_agent_socket_and_nothing_else_from_spire() {
    let services = services(&compose());
    let agent = service(&services, "spire-agent");
    let agent_socket_volume = agent["volumes"]
        .as_sequence()
        .expect("spire-agent volumes")
        .iter()
        .filter_map(Value::as_str)
        .find(|v| v.ends_with(":/run/spire/agent-sockets"))
        .and_then(|v| v.split(':').next())
        .expect("spire-agent puts its socket in a volume at /run/spire/agent-sockets");
    for (name, _) in SECUREPAY_SERVICES {
        let body = service(&services, name);
        let env = environment(body);
        assert_eq!(
            env.get("SPIFFE_ENDPOINT_SOCKET").map(String::as_str),
            Some("unix:///run/spire/agent-sockets/api.sock"),
            "{name}: SPIFFE_ENDPOINT_SOCKET"
        );
        let volumes: Vec<&str> =
            body["volumes"].as_sequence().map(|v| v.iter().filter_map(Value::as_str).collect()).unwrap_or_default();
        assert!(
            volumes.contains(&format!("{agent_socket_volume}:/run/spire/agent-sockets:ro").as_str()),
            "{name} must mount the agent socket volume read-only, has {volumes:?}"
        );
        assert!(
            !volumes.iter().any(|v| v.starts_with("spire-server-socket")),
            "{name} must not reach the SPIRE server's admin socket"
        );
    }
}

#[test]
fn kafka_init_creates_exactly_the_topics_of_the_topology() {
    let services = services(&compose());
    let env = environment(service(&services, "kafka-init"));
    let listed: Vec<&str> =
        env.get("SECUREPAY_TOPICS").expect("kafka-init: SECUREPAY_TOPICS").split_whitespace().collect();
    let created: BTreeSet<&str> = listed.iter().copied().collect();
    assert_eq!(created.len(), listed.len(), "a topic is listed twice: {listed:?}");
    assert_eq!(created, topic::ALL.into_iter().collect::<BTreeSet<_>>());
    let command = format!("{:?}", service(&services, "kafka-init")["command"]);
    assert!(
        command.contains("$$SECUREPAY_TOPICS") && command.contains("--create"),
        "kafka-init must create every listed topic"
    );
}

#[test]
fn each_database_service_finds_postgres_and_reads_only_its_own_role_password_file() {
    let compose = compose();
    let services = services(&compose);
    let roles: BTreeSet<&str> = DB_ROLES.iter().map(|(_, role)| *role).collect();
    assert_eq!(roles, topology::SCHEMAS.iter().map(|(_, role)| *role).collect(), "one service per schema role");
    let database =
        environment(service(&services, "postgres")).get("POSTGRES_DB").cloned().expect("postgres: POSTGRES_DB");
    let uid = image_uid();
    for (name, role) in DB_ROLES {
        let body = service(&services, name);
        let env = environment(body);
        assert_eq!(
            env.get("SECUREPAY_PG_ADDR").map(String::as_str),
            Some("postgres:5432"),
            "{name}: SECUREPAY_PG_ADDR"
        );
        assert_eq!(env.get("SECUREPAY_PG_DATABASE"), Some(&database), "{name}: SECUREPAY_PG_DATABASE");
        assert_eq!(
            env.get("SECUREPAY_SECRETS_DIR").map(String::as_str),
            Some(SECRETS_DIR),
            "{name}: SECUREPAY_SECRETS_DIR"
        );
        let passwords: Vec<FileMount> =
            file_mounts(body).into_iter().filter(|m| m.source.starts_with("pg-role-")).collect();
        assert_eq!(passwords.len(), 1, "{name} must get exactly one role password, gets {passwords:?}");
        let mount = &passwords[0];
        assert_eq!(mount.source, format!("pg-role-{role}"), "{name} must get the password of {role} only");
        // securepay_postgres::service_options_from_env reads $SECUREPAY_SECRETS_DIR/pg-role-<role>.
        assert_eq!(mount.target, format!("{SECRETS_DIR}/pg-role-{role}"), "{name}: password file path");
        assert_eq!(mount.uid.as_deref(), Some(uid.as_str()), "{name}: the service's uid must own its password file");
        assert_eq!(mount.mode, Some(0o400), "{name}: the password file must be mode 0400");
        // The password's dev-only default must pass securepay_postgres's bounds; the variable overrides it.
        let source = compose["configs"][mount.source.as_str()]["content"]
            .as_str()
            .or_else(|| compose["secrets"][mount.source.as_str()]["environment"].as_str())
            .unwrap_or_else(|| panic!("{} is not defined at the top level", mount.source));
        if let Some((_, default)) =
            source.strip_prefix("${").and_then(|s| s.strip_suffix('}')).and_then(|s| s.split_once(":-"))
        {
            assert!(
                (securepay_postgres::PASSWORD_LEN_MIN..=securepay_postgres::PASSWORD_LEN_MAX).contains(&default.len()),
                "{}: the default password must be {} to {} characters",
                mount.source,
                securepay_postgres::PASSWORD_LEN_MIN,
                securepay_postgres::PASSWORD_LEN_MAX
            );
        }
    }
    for (name, body) in &services {
        if DB_ROLES.iter().any(|(n, _)| n == name) || name == "db-setup" {
            continue;
        }
        let leaked: Vec<_> = file_mounts(body).into_iter().filter(|m| m.source.starts_with("pg-role-")).collect();
        assert!(leaked.is_empty(), "{name} must not get a database password: {leaked:?}");
        assert!(!environment(body).contains_key("SECUREPAY_PG_ADDR"), "{name} has no database");
    }
}

#[test]
fn no_service_has_a_plaintext_switch_a_database_url_or_migrates() {
    let compose = compose();
    let services = services(&compose);
    for (name, body) in &services {
        for key in environment(body).keys() {
            assert!(
                !matches!(
                    key.as_str(),
                    "SECUREPAY_DATABASE_URL" | "SECUREPAY_DATABASE_SCHEMA" | "SECUREPAY_MIGRATION_DATABASE_URL"
                ),
                "{name}: {key} is gone (SECUREPAY_PG_ADDR/_DATABASE/SECRETS_DIR replace it; db-setup migrates)"
            );
        }
    }
    for (name, _) in SECUREPAY_SERVICES {
        for (key, value) in environment(service(&services, name)) {
            for word in ["PLAINTEXT", "INSECURE"] {
                assert!(
                    !key.contains(word) && !value.to_uppercase().contains(word),
                    "{name}: {key}={value} — the services speak mTLS only, there is no plaintext switch"
                );
            }
        }
    }
    assert!(compose["configs"]["postgres-service-roles"].is_null(), "db-setup sets the role passwords now");
}

#[test]
fn db_setup_migrates_in_order_sets_every_role_password_and_seeds_the_demo_accounts_idempotently() {
    let services = services(&compose());
    let body = service(&services, "db-setup");
    assert_eq!(body["image"].as_str(), Some("postgres:16"), "db-setup runs psql from the official image");
    let volumes: Vec<&str> =
        body["volumes"].as_sequence().map(|v| v.iter().filter_map(Value::as_str).collect()).unwrap_or_default();
    assert!(volumes.contains(&"./migrations:/migrations:ro"), "db-setup must mount ./migrations read-only");
    let sql_files = std::fs::read_dir(root().join("migrations"))
        .expect("migrations/")
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|f| f.ends_with(".sql"))
        .count();
    assert!(sql_files > 0, "migrations/ has no .sql file");

    let env = environment(body);
    let postgres_env = environment(service(&services, "postgres"));
    assert_eq!(env.get("PGHOST").map(String::as_str), Some("postgres"), "db-setup: PGHOST");
    assert_eq!(env.get("PGDATABASE"), postgres_env.get("POSTGRES_DB"), "db-setup: PGDATABASE");
    assert_eq!(env.get("PGUSER"), postgres_env.get("POSTGRES_USER"), "db-setup: PGUSER is the superuser");
    assert_eq!(env.get("PGPASSWORD"), postgres_env.get("POSTGRES_PASSWORD"), "db-setup: the superuser's password");

    let script = command_text(body);
    for needle in [
        "ON_ERROR_STOP=1",
        // Bash sorts the glob by name (LC_ALL=C): the order sqlx applies them in.
        "LC_ALL=C",
        "/migrations/*.sql",
        "--single-transaction",
        // Idempotent across `up`s: applied files are recorded and skipped.
        "public.securepay_compose_migrations",
        "ALTER ROLE %I PASSWORD %L",
        "ON CONFLICT (account_id) DO NOTHING",
    ] {
        assert!(script.contains(needle), "db-setup's script lacks `{needle}`");
    }
    let mounts = file_mounts(body);
    for (_, role) in topology::SCHEMAS {
        assert!(script.contains(role), "db-setup does not set the password of {role}");
        assert!(
            mounts
                .iter()
                .any(|m| m.source == format!("pg-role-{role}") && m.target == format!("{SECRETS_DIR}/pg-role-{role}")),
            "db-setup must read {SECRETS_DIR}/pg-role-{role}: {mounts:?}"
        );
    }
    for account in securepay_postgres::DEMO_ACCOUNTS {
        let balance = account.opening_balance();
        let row =
            format!("('{}', '{}', '{}', {balance}, {balance})", account.account_id, account.owner, account.currency);
        assert!(script.contains(&row), "db-setup does not seed {row} (securepay_postgres::DEMO_ACCOUNTS)");
    }
    assert_eq!(
        script.matches("-4000-8000-").count(),
        securepay_postgres::DEMO_ACCOUNTS.len(),
        "db-setup seeds exactly DEMO_ACCOUNTS"
    );
}

#[test]
fn the_gateway_verifies_tokens_with_the_jwks_of_the_dev_keys_one_shot() {
    let services = services(&compose());
    let keys = service(&services, "gateway-dev-keys");
    let gateway = service(&services, "gateway");
    assert_eq!(
        build_arg_service(keys),
        Some(ServiceIdentity::ApiGateway.binary()),
        "gateway-dev-keys runs the gateway's own binary"
    );
    assert_eq!(keys["image"], gateway["image"], "gateway-dev-keys and the gateway share one image");
    assert!(labels(keys).is_empty(), "gateway-dev-keys must carry no workload label (it needs no SVID)");
    let argv: Vec<&str> = keys["command"].as_sequence().expect("command").iter().filter_map(Value::as_str).collect();
    let ["dev-keys", "--dir", dir] = argv[..] else {
        panic!("gateway-dev-keys must run `dev-keys --dir DIR`, runs {argv:?}");
    };
    let keys_volume = keys["volumes"]
        .as_sequence()
        .expect("gateway-dev-keys volumes")
        .iter()
        .filter_map(Value::as_str)
        .find_map(|v| v.strip_suffix(&format!(":{dir}")))
        .expect("gateway-dev-keys writes DIR in a named volume");
    let gateway_volumes = format!("{:?}", gateway["volumes"]);
    assert!(
        gateway_volumes.contains(&format!("{keys_volume}:{dir}:ro")),
        "the gateway must mount {keys_volume} at {dir} read-only"
    );
    assert_eq!(
        environment(gateway).get("SECUREPAY_JWKS_PATH"),
        Some(&format!("{dir}/jwks.json")),
        "gateway: SECUREPAY_JWKS_PATH"
    );
    assert!(
        read("compose.yaml").contains(&format!(
            "docker compose exec gateway securepay-gateway token --key {dir}/jwt-dev-key.pem --sub alice"
        )),
        "compose.yaml must say how to mint a token"
    );
    assert!(
        read("Dockerfile").contains(&format!("install -d -o {uid} -g {uid} -m 0750 {dir}", uid = image_uid())),
        "the image's {dir} must belong to the service uid, so the fresh volume is writable"
    );
}

#[test]
fn only_the_four_services_carry_a_workload_label() {
    let services = services(&compose());
    for (name, body) in &services {
        if SECUREPAY_SERVICES.iter().any(|(n, _)| n == name) {
            continue;
        }
        assert!(
            !labels(body).contains_key("dev.securepay.workload"),
            "{name} carries a workload label: it would be handed a service's SVID"
        );
    }
}

#[test]
fn prometheus_config_parses_and_scrapes_every_service_every_5s() {
    let prometheus = yaml("observability/prometheus/prometheus.yml");
    assert_eq!(prometheus["global"]["scrape_interval"].as_str(), Some("5s"));
    let jobs: BTreeMap<String, (Vec<String>, String)> = prometheus["scrape_configs"]
        .as_sequence()
        .expect("scrape_configs")
        .iter()
        .map(|job| {
            let targets = job["static_configs"]
                .as_sequence()
                .into_iter()
                .flatten()
                .flat_map(|sc| sc["targets"].as_sequence().cloned().unwrap_or_default())
                .filter_map(|t| t.as_str().map(str::to_string))
                .collect();
            let path = job["metrics_path"].as_str().unwrap_or("/metrics").to_string();
            (job["job_name"].as_str().expect("job_name").to_string(), (targets, path))
        })
        .collect();
    let services = services(&compose());
    for (name, identity) in SECUREPAY_SERVICES {
        let env = environment(service(&services, name));
        // gRPC services serve /metrics on their admin port; HTTP services on their listen port.
        let address = env
            .get("SECUREPAY_ADMIN_ADDR")
            .or_else(|| env.get("SECUREPAY_LISTEN_ADDR"))
            .unwrap_or_else(|| panic!("{name}: no SECUREPAY_ADMIN_ADDR / SECUREPAY_LISTEN_ADDR"));
        let target = format!("{name}:{}", port_of(address));
        let job = spiffe_path(identity);
        let (targets, path) = jobs.get(job).unwrap_or_else(|| panic!("prometheus.yml has no job {job}"));
        assert_eq!(targets, &vec![target.clone()], "job {job} must scrape {target}");
        assert_eq!(path, "/metrics", "job {job}: metrics_path");
    }
}

#[test]
fn healthchecks_probe_the_ports_the_services_listen_on() {
    let services = services(&compose());
    for (name, _) in SECUREPAY_SERVICES {
        let body = service(&services, name);
        let env = environment(body);
        let http =
            env.get("SECUREPAY_ADMIN_ADDR").or_else(|| env.get("SECUREPAY_LISTEN_ADDR")).expect("listen address");
        let test = format!("{:?}", body["healthcheck"]["test"]);
        assert!(
            test.contains(&format!(":{}/health", port_of(http))),
            "{name}: healthcheck {test} must probe /health on {http}"
        );
    }
}

#[test]
fn alert_rules_parse_and_cover_failures_lag_svid_expiry_auth_and_down_services() {
    let prometheus = yaml("observability/prometheus/prometheus.yml");
    let rule_files: Vec<&str> =
        prometheus["rule_files"].as_sequence().expect("rule_files").iter().filter_map(Value::as_str).collect();
    assert_eq!(rule_files, ["rules/*.yml"], "compose mounts observability/prometheus/rules at rules/");
    let rules = yaml("observability/prometheus/rules/securepay.rules.yml");
    let mut exprs = BTreeMap::new();
    for group in rules["groups"].as_sequence().expect("groups") {
        for rule in group["rules"].as_sequence().expect("rules") {
            let alert = rule["alert"].as_str().expect("every rule is an alert").to_string();
            let expr = rule["expr"].as_str().expect("expr").to_string();
            assert!(rule["annotations"]["summary"].as_str().is_some(), "{alert}: summary");
            assert!(rule["labels"]["severity"].as_str().is_some(), "{alert}: severity");
            assert!(exprs.insert(alert.clone(), expr).is_none(), "alert {alert} defined twice");
        }
    }
    for metric in [
        "securepay_payments_total",
        "securepay_outbox_lag_events",
        "securepay_consumer_lag_records",
        "securepay_svid_expiry_timestamp_seconds",
        "securepay_auth_failures_total",
        "up{",
    ] {
        assert!(exprs.values().any(|e| e.contains(metric)), "no alert on {metric}");
    }
    let down = exprs.values().find(|e| e.starts_with("up{")).expect("a service-down alert");
    for identity in ServiceIdentity::ALL {
        assert!(down.contains(spiffe_path(identity)), "the service-down alert misses {}", spiffe_path(identity));
    }
}

/// Every `securepay_*` metric name in `text` (a `_bucket`/`_sum`/`_count` suffix kept as written).
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("securepay_") {
        let tail = &rest[at..];
        let end = tail.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(tail.len());
        names.insert(tail[..end].to_string());
        rest = &tail[end..];
    }
    names
}

/// The panels of a dashboard, including those nested in collapsed rows.
fn panels(dashboard: &serde_json::Value) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    for panel in dashboard["panels"].as_array().into_iter().flatten() {
        out.push(panel.clone());
        out.extend(panel["panels"].as_array().into_iter().flatten().cloned());
    }
    out
}

fn dashboard_files() -> Vec<String> {
    let dir = root().join("observability/grafana/dashboards");
    let mut files: Vec<String> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
        .filter(|name| name.ends_with(".json"))
        .map(|name| format!("observability/grafana/dashboards/{name}"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no dashboard JSON in {}", dir.display());
    files
}

#[test]
fn every_dashboard_parses_and_every_panel_has_a_query_on_the_provisioned_datasource() {
    let datasources = yaml("observability/grafana/provisioning/datasources/prometheus.yml");
    let uid = datasources["datasources"][0]["uid"].as_str().expect("the datasource has a uid").to_string();
    assert_eq!(datasources["datasources"][0]["url"].as_str(), Some("http://prometheus:9090"));
    for file in dashboard_files() {
        let dashboard = json(&file);
        assert!(dashboard["uid"].as_str().is_some_and(|u| !u.is_empty()), "{file}: uid");
        let panels: Vec<_> = panels(&dashboard).into_iter().filter(|p| p["type"] != "row").collect();
        assert!(!panels.is_empty(), "{file}: no panels");
        for panel in panels {
            let title = panel["title"].as_str().unwrap_or("?");
            let targets = panel["targets"].as_array().map(Vec::as_slice).unwrap_or_default();
            assert!(!targets.is_empty(), "{file}: panel {title} has no target");
            for target in targets {
                let expr = target["expr"].as_str().unwrap_or_default();
                assert!(!expr.trim().is_empty(), "{file}: panel {title} has a target without expr");
                let ds = if target["datasource"].is_null() { &panel["datasource"] } else { &target["datasource"] };
                assert_eq!(ds["uid"].as_str(), Some(uid.as_str()), "{file}: panel {title} queries another datasource");
            }
        }
    }
}

#[test]
fn dashboards_query_only_metrics_of_the_documented_contract() {
    let contract = metric_names(&read("observability/prometheus/rules/securepay.rules.yml"));
    for file in dashboard_files() {
        let dashboard = json(&file);
        for panel in panels(&dashboard) {
            for target in panel["targets"].as_array().into_iter().flatten() {
                for metric in metric_names(target["expr"].as_str().unwrap_or_default()) {
                    assert!(
                        contract.contains(&metric),
                        "{file}: {metric} is not in the metric contract of securepay.rules.yml"
                    );
                }
            }
        }
    }
}

#[test]
fn grafana_provisions_the_datasource_and_the_dashboards_compose_mounts() {
    let provider = yaml("observability/grafana/provisioning/dashboards/securepay.yml");
    let path = provider["providers"][0]["options"]["path"].as_str().expect("dashboard provider path");
    let services = services(&compose());
    let volumes: Vec<&str> = service(&services, "grafana")["volumes"]
        .as_sequence()
        .expect("grafana volumes")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        volumes.contains(&format!("./observability/grafana/dashboards:{path}:ro").as_str()),
        "grafana must mount the dashboards at {path}"
    );
    assert!(
        volumes.contains(&"./observability/grafana/provisioning:/etc/grafana/provisioning:ro"),
        "grafana provisioning mount"
    );
}
