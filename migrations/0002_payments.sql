-- Schema `payments`: owned by the payment service (SPEC §6.1, §6.2, §6.4).
--
-- Every constraint is named: the adapter maps a violation to a typed error by constraint name.
-- Amounts are unconstrained `numeric` with an explicit scale CHECK, so an amount with too many
-- decimals is REJECTED; `numeric(p, s)` would silently round it. Never a float.

CREATE SCHEMA payments;
REVOKE ALL ON SCHEMA payments FROM PUBLIC;
GRANT USAGE ON SCHEMA payments TO payment_service;

-- Tables created later in this schema by the migrating role are usable by the service.
ALTER DEFAULT PRIVILEGES IN SCHEMA payments GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO payment_service;
ALTER DEFAULT PRIVILEGES IN SCHEMA payments GRANT USAGE, SELECT ON SEQUENCES TO payment_service;

DO $$
BEGIN
    EXECUTE format('ALTER ROLE payment_service IN DATABASE %I SET search_path = payments', current_database());
END
$$;

CREATE TABLE payments.transactions (
    payment_id     uuid        NOT NULL,
    subject        text        NOT NULL,
    from_account   uuid        NOT NULL,
    to_account     uuid        NOT NULL,
    amount         numeric     NOT NULL,
    currency       char(3)     NOT NULL,
    status         text        NOT NULL DEFAULT 'PENDING',
    failure_reason text,
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT transactions_pkey PRIMARY KEY (payment_id),
    CONSTRAINT transactions_subject_bounded CHECK (length(subject) BETWEEN 1 AND 128),
    CONSTRAINT transactions_amount_positive CHECK (amount > 0),
    -- 3 decimals covers every ISO 4217 currency we settle (BHD, KWD, ...); the domain core checks
    -- the exact minor units of each currency. The upper bound keeps every value a rust_decimal.
    CONSTRAINT transactions_amount_scale CHECK (min_scale(amount) <= 3 AND amount < 1e18),
    CONSTRAINT transactions_currency_format CHECK (currency ~ '^[A-Z]{3}$'),
    CONSTRAINT transactions_distinct_accounts CHECK (from_account <> to_account),
    CONSTRAINT transactions_status_known CHECK (status IN ('PENDING', 'COMPLETED', 'FAILED')),
    CONSTRAINT transactions_failure_reason_iff_failed CHECK ((status = 'FAILED') = (failure_reason IS NOT NULL)),
    CONSTRAINT transactions_failure_reason_bounded CHECK (length(failure_reason) BETWEEN 1 AND 64)
);
-- Object-level authorization reads payments by the accounts they touch (SPEC §5).
CREATE INDEX transactions_from_account_idx ON payments.transactions (from_account, created_at);
CREATE INDEX transactions_to_account_idx ON payments.transactions (to_account, created_at);
CREATE INDEX transactions_subject_idx ON payments.transactions (subject, created_at);

-- THE transition table of the database, the same pairs as `securepay_core::payment::TRANSITIONS`.
-- Each row is one recorded status change; a payment leaves each state at most once.
CREATE TABLE payments.transitions (
    id          bigserial   NOT NULL,
    payment_id  uuid        NOT NULL,
    from_status text        NOT NULL,
    to_status   text        NOT NULL,
    cause       text        NOT NULL,
    at          timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT transitions_pkey PRIMARY KEY (id),
    CONSTRAINT transitions_payment_fkey FOREIGN KEY (payment_id) REFERENCES payments.transactions (payment_id),
    CONSTRAINT transitions_legal
        CHECK ((from_status, to_status) IN (('PENDING', 'COMPLETED'), ('PENDING', 'FAILED'))),
    CONSTRAINT transitions_cause_bounded CHECK (length(cause) BETWEEN 1 AND 128),
    CONSTRAINT transitions_once_per_state UNIQUE (payment_id, from_status)
);

-- The store rejects an illegal status change even when service code is wrong:
-- * a payment is born PENDING;
-- * a status change must be a legal pair AND already be recorded in `transitions` in the same
--   transaction (protocol: INSERT the transition row, then UPDATE the status);
-- * what was agreed at creation (who, from, to, how much, which currency, when) never changes.
-- Violations raise check_violation with a constraint name, like the CHECKs above.
CREATE FUNCTION payments.transactions_guard() RETURNS trigger
    LANGUAGE plpgsql
    SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        IF NEW.status <> 'PENDING' THEN
            RAISE EXCEPTION 'payment % must be created PENDING, not %', NEW.payment_id, NEW.status
                USING ERRCODE = 'check_violation', CONSTRAINT = 'transactions_created_pending',
                      SCHEMA = 'payments', TABLE = 'transactions';
        END IF;
        RETURN NEW;
    END IF;

    IF (NEW.payment_id, NEW.subject, NEW.from_account, NEW.to_account, NEW.amount, NEW.currency, NEW.created_at)
       IS DISTINCT FROM
       (OLD.payment_id, OLD.subject, OLD.from_account, OLD.to_account, OLD.amount, OLD.currency, OLD.created_at)
    THEN
        RAISE EXCEPTION 'payment % : only status, failure_reason and updated_at may change', OLD.payment_id
            USING ERRCODE = 'check_violation', CONSTRAINT = 'transactions_immutable',
                  SCHEMA = 'payments', TABLE = 'transactions';
    END IF;

    IF NEW.status IS DISTINCT FROM OLD.status THEN
        IF (OLD.status, NEW.status) NOT IN (('PENDING', 'COMPLETED'), ('PENDING', 'FAILED')) THEN
            RAISE EXCEPTION 'illegal payment transition % -> % for payment %', OLD.status, NEW.status, OLD.payment_id
                USING ERRCODE = 'check_violation', CONSTRAINT = 'transactions_legal_transition',
                      SCHEMA = 'payments', TABLE = 'transactions';
        END IF;
        IF NOT EXISTS (
            SELECT 1 FROM payments.transitions t
            WHERE t.payment_id = OLD.payment_id AND t.from_status = OLD.status AND t.to_status = NEW.status
        ) THEN
            RAISE EXCEPTION 'transition % -> % of payment % is not recorded in payments.transitions',
                  OLD.status, NEW.status, OLD.payment_id
                USING ERRCODE = 'check_violation', CONSTRAINT = 'transactions_transition_recorded',
                      SCHEMA = 'payments', TABLE = 'transactions';
        END IF;
    ELSIF NEW.failure_reason IS DISTINCT FROM OLD.failure_reason THEN
        RAISE EXCEPTION 'failure_reason of payment % changes only with its transition to FAILED', OLD.payment_id
            USING ERRCODE = 'check_violation', CONSTRAINT = 'transactions_immutable',
                  SCHEMA = 'payments', TABLE = 'transactions';
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER transactions_guard
    BEFORE INSERT OR UPDATE ON payments.transactions
    FOR EACH ROW EXECUTE FUNCTION payments.transactions_guard();

-- The other half of "history and status agree": a recorded transition must have been applied to
-- the payment by the time the transaction commits.
CREATE FUNCTION payments.transitions_applied() RETURNS trigger
    LANGUAGE plpgsql
    SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF NOT EXISTS (
        SELECT 1 FROM payments.transactions p WHERE p.payment_id = NEW.payment_id AND p.status = NEW.to_status
    ) THEN
        RAISE EXCEPTION 'transition % -> % of payment % was recorded but not applied',
              NEW.from_status, NEW.to_status, NEW.payment_id
            USING ERRCODE = 'check_violation', CONSTRAINT = 'transitions_applied',
                  SCHEMA = 'payments', TABLE = 'transitions';
    END IF;
    RETURN NULL;
END
$$;

CREATE CONSTRAINT TRIGGER transitions_applied
    AFTER INSERT ON payments.transitions
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW EXECUTE FUNCTION payments.transitions_applied();

-- Idempotency truth (SPEC §6.1): one row per (subject, key), Stripe semantics.
-- The row is claimed IN_FLIGHT with a lease (`locked_until`), so a request whose process died can
-- be retried after the lease ends; COMPLETED stores the first response byte for byte.
CREATE TABLE payments.idempotency_keys (
    subject             text        NOT NULL,
    key                 text        NOT NULL,
    request_fingerprint bytea       NOT NULL,
    state               text        NOT NULL,
    locked_until        timestamptz,
    response            bytea,
    payment_id          uuid,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now(),
    expires_at          timestamptz NOT NULL DEFAULT now() + interval '24 hours',
    CONSTRAINT idempotency_keys_pkey PRIMARY KEY (subject, key),
    CONSTRAINT idempotency_keys_subject_bounded CHECK (length(subject) BETWEEN 1 AND 128),
    CONSTRAINT idempotency_keys_key_format CHECK (key ~ '^[A-Za-z0-9._:-]{1,255}$'),
    CONSTRAINT idempotency_keys_fingerprint_sha256 CHECK (octet_length(request_fingerprint) = 32),
    CONSTRAINT idempotency_keys_state_known CHECK (state IN ('IN_FLIGHT', 'COMPLETED')),
    CONSTRAINT idempotency_keys_lease_iff_in_flight CHECK ((state = 'IN_FLIGHT') = (locked_until IS NOT NULL)),
    CONSTRAINT idempotency_keys_response_iff_completed CHECK ((state = 'COMPLETED') = (response IS NOT NULL)),
    CONSTRAINT idempotency_keys_response_bounded CHECK (octet_length(response) <= 65536),
    -- Keys are kept at least 24 h (SPEC §6.1).
    CONSTRAINT idempotency_keys_kept_24h CHECK (expires_at >= created_at + interval '24 hours'),
    -- One key names one payment and one payment has at most one key.
    CONSTRAINT idempotency_keys_payment_unique UNIQUE (payment_id),
    CONSTRAINT idempotency_keys_payment_fkey FOREIGN KEY (payment_id)
        REFERENCES payments.transactions (payment_id) DEFERRABLE INITIALLY DEFERRED
);
CREATE INDEX idempotency_keys_expires_at_idx ON payments.idempotency_keys (expires_at);

-- Transactional outbox (SPEC §6.4): written in the payment's transaction, published by a relay.
CREATE TABLE payments.outbox (
    id           bigserial   NOT NULL,
    event_id     uuid        NOT NULL,
    topic        text        NOT NULL,
    key          text        NOT NULL,
    payload      bytea       NOT NULL,
    headers      jsonb       NOT NULL DEFAULT '{}',
    created_at   timestamptz NOT NULL DEFAULT now(),
    published_at timestamptz,
    CONSTRAINT outbox_pkey PRIMARY KEY (id),
    CONSTRAINT outbox_event_id_unique UNIQUE (event_id),
    CONSTRAINT outbox_topic_known CHECK (topic IN ('payment.initiated')),
    CONSTRAINT outbox_key_bounded CHECK (length(key) BETWEEN 1 AND 128),
    CONSTRAINT outbox_payload_bounded CHECK (octet_length(payload) BETWEEN 1 AND 1048576),
    CONSTRAINT outbox_headers_object CHECK (jsonb_typeof(headers) = 'object')
);
-- The relay's queue: only what is still to publish, in write order.
CREATE INDEX outbox_unpublished_idx ON payments.outbox (id) WHERE published_at IS NULL;

-- Money history is never deleted, and recorded transitions are never rewritten.
REVOKE DELETE, TRUNCATE ON payments.transactions FROM payment_service;
REVOKE UPDATE, DELETE, TRUNCATE ON payments.transitions FROM payment_service;
