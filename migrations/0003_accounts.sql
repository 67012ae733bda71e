-- Schema `accounts`: owned by the account service, the one that holds the money (SPEC §6.3, §6.5).
--
-- Settlement of one payment is ONE transaction: insert its `processed_events` row (the dedupe),
-- debit the payer only if funds suffice, credit the payee, insert one DEBIT and one CREDIT
-- ledger row, insert the outcome event into `accounts.outbox`. The constraints below are the last
-- guard if service code gets any of that wrong:
-- * `accounts_balance_non_negative`: no account ever goes below zero (no double-spend);
-- * `processed_events_pkey` / `processed_events_payment_unique`: an event, and a payment, is
--   settled at most once, however often Kafka redelivers it;
-- * `ledger_entries_one_per_direction`: at most one debit and one credit per payment;
-- * `ledger_entries_balanced` (checked at commit): a payment's ledger rows are exactly one debit
--   and one credit of the same amount and currency on two different accounts, and belong to a
--   settlement whose outcome is COMPLETED;
-- * `ledger_entries_account_fkey`: ledger rows name an existing account, in that account's currency.
--
-- Seeded/opening balances: `opening_balance` is what an account held when it was created (demo
-- seed, or 0). Conservation holds from then on: per account,
--   balance = opening_balance + sum(CREDIT) - sum(DEBIT)
-- and per currency the sum of balances equals the sum of opening balances.

CREATE SCHEMA accounts;
REVOKE ALL ON SCHEMA accounts FROM PUBLIC;
GRANT USAGE ON SCHEMA accounts TO account_service;

ALTER DEFAULT PRIVILEGES IN SCHEMA accounts GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO account_service;
ALTER DEFAULT PRIVILEGES IN SCHEMA accounts GRANT USAGE, SELECT ON SEQUENCES TO account_service;

DO $$
BEGIN
    EXECUTE format('ALTER ROLE account_service IN DATABASE %I SET search_path = accounts', current_database());
END
$$;

CREATE TABLE accounts.accounts (
    account_id      uuid        NOT NULL,
    owner           text        NOT NULL,
    currency        char(3)     NOT NULL,
    balance         numeric     NOT NULL,
    opening_balance numeric     NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT accounts_pkey PRIMARY KEY (account_id),
    -- Target of the ledger's (account, currency) foreign key.
    CONSTRAINT accounts_account_currency_unique UNIQUE (account_id, currency),
    CONSTRAINT accounts_owner_bounded CHECK (length(owner) BETWEEN 1 AND 128),
    CONSTRAINT accounts_currency_format CHECK (currency ~ '^[A-Z]{3}$'),
    CONSTRAINT accounts_balance_non_negative CHECK (balance >= 0),
    CONSTRAINT accounts_balance_scale CHECK (min_scale(balance) <= 3 AND balance < 1e24),
    CONSTRAINT accounts_opening_balance_non_negative CHECK (opening_balance >= 0),
    CONSTRAINT accounts_opening_balance_scale CHECK (min_scale(opening_balance) <= 3 AND opening_balance < 1e24)
);
-- Object-level authorization: a subject sees the accounts it owns (SPEC §5).
CREATE INDEX accounts_owner_idx ON accounts.accounts (owner);

-- Dedupe of `payment.initiated` deliveries and the settlement verdict of each payment.
CREATE TABLE accounts.processed_events (
    event_id       uuid        NOT NULL,
    payment_id     uuid        NOT NULL,
    outcome        text        NOT NULL,
    failure_reason text,
    processed_at   timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT processed_events_pkey PRIMARY KEY (event_id),
    CONSTRAINT processed_events_payment_unique UNIQUE (payment_id),
    CONSTRAINT processed_events_outcome_known CHECK (outcome IN ('COMPLETED', 'FAILED')),
    CONSTRAINT processed_events_failure_reason_iff_failed CHECK ((outcome = 'FAILED') = (failure_reason IS NOT NULL)),
    CONSTRAINT processed_events_failure_reason_bounded CHECK (length(failure_reason) BETWEEN 1 AND 64)
);

-- Double-entry ledger: append-only.
CREATE TABLE accounts.ledger_entries (
    id         bigserial   NOT NULL,
    payment_id uuid        NOT NULL,
    account_id uuid        NOT NULL,
    direction  text        NOT NULL,
    amount     numeric     NOT NULL,
    currency   char(3)     NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT ledger_entries_pkey PRIMARY KEY (id),
    CONSTRAINT ledger_entries_direction_known CHECK (direction IN ('DEBIT', 'CREDIT')),
    CONSTRAINT ledger_entries_amount_positive CHECK (amount > 0),
    CONSTRAINT ledger_entries_amount_scale CHECK (min_scale(amount) <= 3 AND amount < 1e18),
    CONSTRAINT ledger_entries_currency_format CHECK (currency ~ '^[A-Z]{3}$'),
    CONSTRAINT ledger_entries_one_per_direction UNIQUE (payment_id, direction),
    CONSTRAINT ledger_entries_account_fkey FOREIGN KEY (account_id, currency)
        REFERENCES accounts.accounts (account_id, currency),
    -- Deferred: the settlement may write its ledger rows before its processed_events row.
    CONSTRAINT ledger_entries_settlement_fkey FOREIGN KEY (payment_id)
        REFERENCES accounts.processed_events (payment_id) DEFERRABLE INITIALLY DEFERRED
);
CREATE INDEX ledger_entries_account_idx ON accounts.ledger_entries (account_id, id);

CREATE FUNCTION accounts.ledger_entries_balanced() RETURNS trigger
    LANGUAGE plpgsql
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    debit        record;
    credit       record;
    has_debit    boolean;
    has_credit   boolean;
    outcome_text text;
BEGIN
    SELECT e.account_id, e.amount, e.currency INTO debit
        FROM accounts.ledger_entries e WHERE e.payment_id = NEW.payment_id AND e.direction = 'DEBIT';
    has_debit := FOUND;
    SELECT e.account_id, e.amount, e.currency INTO credit
        FROM accounts.ledger_entries e WHERE e.payment_id = NEW.payment_id AND e.direction = 'CREDIT';
    has_credit := FOUND;
    IF NOT (has_debit AND has_credit)
       OR debit.amount <> credit.amount
       OR debit.currency <> credit.currency
       OR debit.account_id = credit.account_id
    THEN
        RAISE EXCEPTION 'ledger of payment % is not one debit and one credit of the same amount on two accounts',
              NEW.payment_id
            USING ERRCODE = 'check_violation', CONSTRAINT = 'ledger_entries_balanced',
                  SCHEMA = 'accounts', TABLE = 'ledger_entries';
    END IF;
    SELECT p.outcome INTO outcome_text FROM accounts.processed_events p WHERE p.payment_id = NEW.payment_id;
    IF outcome_text IS DISTINCT FROM 'COMPLETED' THEN
        RAISE EXCEPTION 'ledger rows of payment % without a COMPLETED settlement', NEW.payment_id
            USING ERRCODE = 'check_violation', CONSTRAINT = 'ledger_entries_balanced',
                  SCHEMA = 'accounts', TABLE = 'ledger_entries';
    END IF;
    RETURN NULL;
END
$$;

CREATE CONSTRAINT TRIGGER ledger_entries_balanced
    AFTER INSERT ON accounts.ledger_entries
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW EXECUTE FUNCTION accounts.ledger_entries_balanced();

-- Outcome events (`payment.completed` / `payment.failed`), written in the settlement transaction.
CREATE TABLE accounts.outbox (
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
    CONSTRAINT outbox_topic_known CHECK (topic IN ('payment.completed', 'payment.failed')),
    CONSTRAINT outbox_key_bounded CHECK (length(key) BETWEEN 1 AND 128),
    CONSTRAINT outbox_payload_bounded CHECK (octet_length(payload) BETWEEN 1 AND 1048576),
    CONSTRAINT outbox_headers_object CHECK (jsonb_typeof(headers) = 'object')
);
CREATE INDEX outbox_unpublished_idx ON accounts.outbox (id) WHERE published_at IS NULL;

-- Accounts are never deleted and only their balance moves; ledger and settlements are append-only.
REVOKE UPDATE, DELETE, TRUNCATE ON accounts.accounts FROM account_service;
GRANT UPDATE (balance, updated_at) ON accounts.accounts TO account_service;
REVOKE UPDATE, DELETE, TRUNCATE ON accounts.ledger_entries FROM account_service;
REVOKE UPDATE, DELETE, TRUNCATE ON accounts.processed_events FROM account_service;
