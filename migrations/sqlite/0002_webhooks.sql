-- Webhooks: subscriptions, one delivery per event and matching subscription, and the log of
-- every attempt.

CREATE TABLE subscriptions (
    id               BLOB    PRIMARY KEY,
    merchant_id      BLOB    NOT NULL REFERENCES merchants (id),
    callback_url     TEXT    NOT NULL,
    api_key          TEXT    NOT NULL,
    event_mask       INTEGER NOT NULL,
    signing_secret   TEXT    NOT NULL,
    created_on       INTEGER NOT NULL,
    last_modified_on INTEGER NOT NULL,
    version          INTEGER NOT NULL
);

CREATE INDEX subscriptions_by_merchant ON subscriptions (merchant_id, created_on DESC, id DESC);

CREATE TABLE deliveries (
    id               BLOB    PRIMARY KEY,
    event_id         BLOB    NOT NULL REFERENCES events (id),
    subscription_id  BLOB    NOT NULL,
    merchant_id      BLOB    NOT NULL,
    state            TEXT    NOT NULL,
    attempts         INTEGER NOT NULL DEFAULT 0,
    retry_index      INTEGER NOT NULL DEFAULT 0,
    next_attempt_on  INTEGER NOT NULL,
    lease_owner      BLOB,
    lease_until      INTEGER,
    created_on       INTEGER NOT NULL,
    last_modified_on INTEGER NOT NULL
);

-- The dispatcher's queue: only pending deliveries are in it.
CREATE INDEX deliveries_due ON deliveries (next_attempt_on) WHERE state = 'Pending';
CREATE INDEX deliveries_by_merchant ON deliveries (merchant_id, created_on DESC, id DESC);
CREATE INDEX deliveries_by_subscription ON deliveries (subscription_id, created_on DESC, id DESC);
CREATE INDEX deliveries_by_event ON deliveries (event_id);

CREATE TABLE delivery_attempts (
    delivery_id BLOB    NOT NULL,
    attempt     INTEGER NOT NULL,
    started_on  INTEGER NOT NULL,
    duration_ms INTEGER NOT NULL,
    status      INTEGER,
    error       TEXT,
    PRIMARY KEY (delivery_id, attempt)
) WITHOUT ROWID;

CREATE INDEX events_by_age ON events (created_on);
