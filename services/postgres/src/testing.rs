//! Test support (feature `testing`, for integration tests only): a fresh migrated database per
//! test (random name, dropped on drop, even by panic) on the cluster of
//! `SECUREPAY_TEST_PG_ADMIN_URL`, the service roles' passwords for this test process, and the
//! environment a service binary needs to run against that database.

use std::str::FromStr;

use crate::{MIGRATOR, RolePasswords, admin_options, create_database_if_missing, set_role_passwords};
use securepay_testkit::{component, var};
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, Executor};
use uuid::Uuid;

/// A database of its own, dropped on drop.
pub struct TestDb {
    pub admin_url: String,
    pub name: String,
    /// Superuser pool on the test database: writes as the migrations' owner, bypassing grants,
    /// so only the constraints stand in the way.
    pub pool: PgPool,
}

impl TestDb {
    /// A fresh, migrated database. `None` when no PostgreSQL is configured and the runner does not
    /// require one (the test is skipped).
    pub async fn new() -> Option<TestDb> {
        let admin_url = component(var::PG_ADMIN_URL)?;
        let name = format!("securepay_test_{}", Uuid::new_v4().simple());
        create_database_if_missing(&admin_url, &name).await.expect("create test database");
        let pool = PgPoolOptions::new()
            .max_connections(4)
            .connect_with(admin_options(&admin_url, &name).unwrap())
            .await
            .expect("connect to test database");
        let db = TestDb { admin_url, name, pool };
        MIGRATOR.run(&db.pool).await.expect("apply migrations");
        Some(db)
    }

    /// Connection options for a service role on this database.
    pub async fn role_options(&self, role: &str) -> PgConnectOptions {
        let passwords = role_passwords(&self.admin_url).await;
        let (_, password) = passwords.by_role().into_iter().find(|(r, _)| *r == role).expect("known role");
        PgConnectOptions::from_str(&self.admin_url).unwrap().database(&self.name).username(role).password(password)
    }

    pub async fn connect_as(&self, role: &str) -> PgConnection {
        self.role_options(role).await.connect().await.unwrap_or_else(|e| panic!("{role} cannot log in: {e}"))
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        // Drop runs outside async; a helper thread with its own runtime does the DROP DATABASE.
        let (admin_url, name) = (self.admin_url.clone(), self.name.clone());
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            runtime.block_on(async {
                let mut conn = admin_options(&admin_url, "postgres").unwrap().connect().await?;
                let sql = format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)");
                conn.execute(sql.as_str()).await?;
                conn.close().await
            })
        })
        .join();
        if !matches!(dropped, Ok(Ok(()))) {
            eprintln!("could not drop test database {}: {dropped:?}", self.name);
        }
    }
}

impl TestDb {
    /// The environment a service binary needs to use this database as `role` (see
    /// `service_options_from_env`): address, database name, and a secrets directory holding the
    /// role's password file. Keep the returned directory alive as long as the service runs.
    pub async fn service_env(&self, role: &str) -> (Vec<(String, String)>, tempfile::TempDir) {
        let options = PgConnectOptions::from_str(&self.admin_url).unwrap();
        let passwords = role_passwords(&self.admin_url).await;
        let (_, password) = passwords.by_role().into_iter().find(|(r, _)| *r == role).expect("known role");
        let secrets = tempfile::tempdir().expect("secrets dir");
        std::fs::write(secrets.path().join(format!("pg-role-{role}")), password).unwrap();
        let env = vec![
            ("SECUREPAY_PG_ADDR".to_owned(), format!("{}:{}", options.get_host(), options.get_port())),
            ("SECUREPAY_PG_DATABASE".to_owned(), self.name.clone()),
            ("SECUREPAY_SECRETS_DIR".to_owned(), secrets.path().display().to_string()),
        ];
        (env, secrets)
    }

    /// Seeds the demo accounts (`DEMO_ACCOUNTS`) into this database.
    pub async fn seed_demo(&self) {
        crate::seed_demo(&self.admin_url, &self.name).await.expect("seed demo accounts");
    }
}

/// The passwords of the service roles on the test cluster. Role passwords are cluster-wide, so
/// tests must not invent their own while other processes log in: they use the ones the runner set
/// when it started the cluster (`$SECUREPAY_TEST_STATE_DIR/secrets/pg-role-<role>`). Only without
/// a runner state dir (a cluster started some other way) are fresh ones set, once per process.
pub async fn role_passwords(admin_url: &str) -> &'static RolePasswords {
    static PASSWORDS: tokio::sync::OnceCell<RolePasswords> = tokio::sync::OnceCell::const_new();
    PASSWORDS
        .get_or_init(|| async {
            if let Some(passwords) = runner_passwords() {
                return passwords;
            }
            let fresh = || format!("test-{}", Uuid::new_v4().simple());
            let passwords =
                RolePasswords { payment_service: fresh(), account_service: fresh(), notification_service: fresh() };
            let mut conn = admin_options(admin_url, "postgres").unwrap().connect().await.unwrap();
            set_role_passwords(&mut conn, &passwords).await.expect("set role passwords");
            passwords
        })
        .await
}

fn runner_passwords() -> Option<RolePasswords> {
    let secrets = std::path::PathBuf::from(std::env::var(securepay_testkit::var::STATE_DIR).ok()?).join("secrets");
    let read = |role: &str| std::fs::read_to_string(secrets.join(format!("pg-role-{role}"))).ok();
    Some(RolePasswords {
        payment_service: read("payment_service")?.trim_end().to_owned(),
        account_service: read("account_service")?.trim_end().to_owned(),
        notification_service: read("notification_service")?.trim_end().to_owned(),
    })
}
