-- Schema `notifications`: owned by the notification service (SPEC §6.7).
-- One notification per event: `notifications_event_id_unique` makes redelivery a no-op
-- (INSERT ... ON CONFLICT (event_id) DO NOTHING).

CREATE SCHEMA notifications;
REVOKE ALL ON SCHEMA notifications FROM PUBLIC;
GRANT USAGE ON SCHEMA notifications TO notification_service;

ALTER DEFAULT PRIVILEGES IN SCHEMA notifications
    GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO notification_service;
ALTER DEFAULT PRIVILEGES IN SCHEMA notifications GRANT USAGE, SELECT ON SEQUENCES TO notification_service;

DO $$
BEGIN
    EXECUTE format('ALTER ROLE notification_service IN DATABASE %I SET search_path = notifications',
                   current_database());
END
$$;

CREATE TABLE notifications.notifications (
    id         bigserial   NOT NULL,
    event_id   uuid        NOT NULL,
    payment_id uuid        NOT NULL,
    kind       text        NOT NULL,
    payload    jsonb       NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT notifications_pkey PRIMARY KEY (id),
    CONSTRAINT notifications_event_id_unique UNIQUE (event_id),
    CONSTRAINT notifications_kind_known
        CHECK (kind IN ('payment.initiated', 'payment.completed', 'payment.failed')),
    CONSTRAINT notifications_payload_object CHECK (jsonb_typeof(payload) = 'object'),
    CONSTRAINT notifications_payload_bounded CHECK (pg_column_size(payload) <= 65536)
);
-- `GET /api/v1/notifications?payment_id=`.
CREATE INDEX notifications_payment_idx ON notifications.notifications (payment_id, id);

-- A notification records what happened; it is not rewritten.
REVOKE UPDATE, TRUNCATE ON notifications.notifications FROM notification_service;
