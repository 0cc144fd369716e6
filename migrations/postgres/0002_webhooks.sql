-- Webhooks: subscriptions, one delivery per event and matching subscription, and the log of
-- every attempt. Same logical schema as migrations/sqlite/0002_webhooks.sql.

CREATE TABLE subscriptions (
    id               uuid        PRIMARY KEY,
    merchant_id      uuid        NOT NULL REFERENCES merchants (id),
    callback_url     text        NOT NULL,
    api_key          text        NOT NULL,
    event_mask       integer     NOT NULL,
    signing_secret   text        NOT NULL,
    created_on       timestamptz NOT NULL,
    last_modified_on timestamptz NOT NULL,
    version          bigint      NOT NULL
);

CREATE INDEX subscriptions_by_merchant ON subscriptions (merchant_id, created_on DESC, id DESC);

CREATE TABLE deliveries (
    id               uuid        PRIMARY KEY,
    event_id         uuid        NOT NULL REFERENCES events (id),
    subscription_id  uuid        NOT NULL,
    merchant_id      uuid        NOT NULL,
    state            text        NOT NULL CHECK (state IN ('Pending', 'Delivered', 'Failed', 'Cancelled')),
    attempts         integer     NOT NULL DEFAULT 0,
    retry_index      integer     NOT NULL DEFAULT 0,
    next_attempt_on  timestamptz NOT NULL,
    lease_owner      uuid,
    lease_until      timestamptz,
    created_on       timestamptz NOT NULL,
    last_modified_on timestamptz NOT NULL
);

-- The dispatcher's queue: only pending deliveries are in it.
CREATE INDEX deliveries_due ON deliveries (next_attempt_on) WHERE state = 'Pending';
-- Retention: only finished deliveries are in it.
CREATE INDEX deliveries_finished ON deliveries (last_modified_on) WHERE state <> 'Pending';
CREATE INDEX deliveries_by_merchant ON deliveries (merchant_id, created_on DESC, id DESC);
CREATE INDEX deliveries_by_subscription ON deliveries (subscription_id, created_on DESC, id DESC);
CREATE INDEX deliveries_by_event ON deliveries (event_id);

CREATE TABLE delivery_attempts (
    delivery_id uuid        NOT NULL,
    attempt     integer     NOT NULL,
    started_on  timestamptz NOT NULL,
    duration_ms bigint      NOT NULL,
    status      integer,
    error       text,
    PRIMARY KEY (delivery_id, attempt)
);

CREATE INDEX events_by_age ON events (created_on);
