-- One login role per service, each limited to its own schema (SPEC §7).
--
-- Roles are cluster-wide while this migration runs once per database, and the tests run it in many
-- databases at the same time: creation is idempotent and tolerates a concurrent creator. The roles
-- get no password here; `securepay_postgres::setup` sets one from the runner's secrets, so a fresh
-- cluster never has a service role anyone can log in as.
--
-- Attributes are only changed when they differ, because ALTER ROLE from many sessions at once fails
-- with "tuple concurrently updated".
DO $$
DECLARE
    role_name text;
BEGIN
    FOREACH role_name IN ARRAY ARRAY['payment_service', 'account_service', 'notification_service'] LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = role_name) THEN
            BEGIN
                EXECUTE format(
                    'CREATE ROLE %I LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOINHERIT NOREPLICATION NOBYPASSRLS',
                    role_name);
            EXCEPTION WHEN duplicate_object OR unique_violation THEN
                NULL; -- created by a concurrent migration of another database
            END;
        END IF;
        IF EXISTS (
            SELECT 1 FROM pg_catalog.pg_roles
            WHERE rolname = role_name
              AND (NOT rolcanlogin OR rolsuper OR rolcreatedb OR rolcreaterole OR rolinherit
                   OR rolreplication OR rolbypassrls)
        ) THEN
            EXECUTE format(
                'ALTER ROLE %I LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOINHERIT NOREPLICATION NOBYPASSRLS',
                role_name);
        END IF;
    END LOOP;
END
$$;

-- Nobody but the owner (the migrating admin) may use or create in `public`; sqlx keeps its
-- `_sqlx_migrations` bookkeeping there, out of the services' sight.
REVOKE ALL ON SCHEMA public FROM PUBLIC;

-- Only the three services may connect to this database, and none may create temporary tables.
DO $$
BEGIN
    EXECUTE format('REVOKE ALL ON DATABASE %I FROM PUBLIC', current_database());
    EXECUTE format('GRANT CONNECT ON DATABASE %I TO payment_service, account_service, notification_service',
                   current_database());
END
$$;
