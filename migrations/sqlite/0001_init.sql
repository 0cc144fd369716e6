-- Redirect sessions on SQLite: ids are 16-byte UUID blobs, times are Unix milliseconds (UTC),
-- money lives in the session's canonical JSON spec as an exact decimal.

CREATE TABLE merchants (
    id           BLOB    PRIMARY KEY,
    name         TEXT    NOT NULL,
    api_key_hash BLOB    NOT NULL UNIQUE,
    disabled     INTEGER NOT NULL DEFAULT 0,
    created_on   INTEGER NOT NULL
);

CREATE TABLE customers (
    id         BLOB    PRIMARY KEY,
    phone      TEXT    NOT NULL,
    created_on INTEGER NOT NULL
);

CREATE TABLE sessions (
    id                  BLOB    PRIMARY KEY,
    merchant_id         BLOB    NOT NULL REFERENCES merchants (id),
    state               TEXT    NOT NULL,
    spec                TEXT    NOT NULL,
    token               TEXT    NOT NULL,
    expires_on          INTEGER NOT NULL,
    created_on          INTEGER NOT NULL,
    last_modified_on    INTEGER NOT NULL,
    last_correlation_id BLOB    NOT NULL,
    version             INTEGER NOT NULL
);

-- Listing a merchant's sessions newest first, with cursor paging on (created_on, id).
CREATE INDEX sessions_by_merchant ON sessions (merchant_id, created_on DESC, id DESC);

-- The expiry sweep: only live sessions are in this index.
CREATE INDEX sessions_due ON sessions (expires_on)
    WHERE state IN ('Created', 'Opened', 'Authenticated');

-- The outbox: one row per state change that merchants may be told about.
CREATE TABLE events (
    id          BLOB    PRIMARY KEY,
    merchant_id BLOB    NOT NULL,
    session_id  BLOB    NOT NULL,
    type        TEXT    NOT NULL,
    data        TEXT    NOT NULL,
    created_on  INTEGER NOT NULL
);

CREATE INDEX events_by_session ON events (session_id);

-- x-request-id records: status IS NULL while the first request is still running.
CREATE TABLE idempotency (
    merchant_id  BLOB    NOT NULL,
    request_id   BLOB    NOT NULL,
    fingerprint  BLOB    NOT NULL,
    started_on   INTEGER NOT NULL,
    status       INTEGER,
    headers      TEXT,
    body         BLOB,
    completed_on INTEGER,
    PRIMARY KEY (merchant_id, request_id)
) WITHOUT ROWID;

CREATE INDEX idempotency_by_age ON idempotency (started_on);

CREATE TABLE signing_keys (
    kid        TEXT    PRIMARY KEY,
    secret     BLOB    NOT NULL,
    public     BLOB    NOT NULL,
    created_on INTEGER NOT NULL,
    retired_on INTEGER
);
