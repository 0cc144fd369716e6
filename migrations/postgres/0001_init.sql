-- Redirect sessions on PostgreSQL: the same logical schema as migrations/sqlite/0001_init.sql
-- with native types: uuid ids, timestamptz times (written with millisecond precision),
-- jsonb for the merchant's normalised request, exact numeric money, bytea for hashes and keys.
-- Applied in one transaction under an advisory lock (see src/store/postgres/schema.rs).

CREATE TABLE merchants (
    id           uuid        PRIMARY KEY,
    name         text        NOT NULL,
    api_key_hash bytea       NOT NULL UNIQUE,
    disabled     boolean     NOT NULL DEFAULT false,
    created_on   timestamptz NOT NULL
);

CREATE TABLE customers (
    id         uuid        PRIMARY KEY,
    phone      text        NOT NULL,
    created_on timestamptz NOT NULL
);

CREATE TABLE sessions (
    id                  uuid          PRIMARY KEY,
    merchant_id         uuid          NOT NULL REFERENCES merchants (id),
    state               text          NOT NULL CHECK (state IN ('Created', 'Opened', 'Authenticated',
                                                                'Completed', 'Aborted', 'Cancelled', 'Expired')),
    spec                jsonb         NOT NULL,
    -- Copied from spec.transactionData for reporting and queries; NULL when the session has
    -- no transaction. The spec stays the source of truth for the representation.
    amount              numeric(12,2) CHECK (amount > 0),
    currency            text,
    token               text          NOT NULL,
    expires_on          timestamptz   NOT NULL,
    created_on          timestamptz   NOT NULL,
    last_modified_on    timestamptz   NOT NULL,
    last_correlation_id uuid          NOT NULL,
    version             bigint        NOT NULL,
    CHECK ((amount IS NULL) = (currency IS NULL))
);

-- Listing a merchant's sessions newest first, with cursor paging on (created_on, id).
CREATE INDEX sessions_by_merchant ON sessions (merchant_id, created_on DESC, id DESC);

-- The expiry sweep: only live sessions are in this index.
CREATE INDEX sessions_due ON sessions (expires_on)
    WHERE state IN ('Created', 'Opened', 'Authenticated');

-- The outbox: one row per state change that merchants may be told about.
CREATE TABLE events (
    id          uuid        PRIMARY KEY,
    merchant_id uuid        NOT NULL,
    session_id  uuid        NOT NULL,
    type        text        NOT NULL,
    data        jsonb       NOT NULL,
    created_on  timestamptz NOT NULL
);

CREATE INDEX events_by_session ON events (session_id, created_on, id);

-- x-request-id records: status IS NULL while the first request is still running.
CREATE TABLE idempotency (
    merchant_id  uuid        NOT NULL,
    request_id   uuid        NOT NULL,
    fingerprint  bytea       NOT NULL,
    started_on   timestamptz NOT NULL,
    status       integer,
    headers      jsonb,
    body         bytea,
    completed_on timestamptz,
    PRIMARY KEY (merchant_id, request_id)
);

CREATE INDEX idempotency_by_age ON idempotency (started_on);

CREATE TABLE signing_keys (
    kid        text        PRIMARY KEY,
    secret     bytea       NOT NULL,
    public     bytea       NOT NULL,
    created_on timestamptz NOT NULL,
    retired_on timestamptz
);

-- At most one current key: concurrent first starts of several instances insert with
-- ON CONFLICT DO NOTHING against this index, so they all end up with the same key.
CREATE UNIQUE INDEX signing_keys_one_current ON signing_keys ((true)) WHERE retired_on IS NULL;
