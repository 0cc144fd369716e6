-- The customer's side of a session (docs/HOSTED.md): the customer and transaction intent a
-- session is linked to, one-time codes (only as keyed hashes), customers found by phone, and
-- the transaction intents finished sessions create.
ALTER TABLE sessions ADD COLUMN customer_id BLOB;
ALTER TABLE sessions ADD COLUMN transaction_intent_id BLOB;
UPDATE sessions
   SET customer_id = unhex(replace(json_extract(spec, '$.customerId'), '-', '')),
       transaction_intent_id = unhex(replace(json_extract(spec, '$.transactionIntentId'), '-', ''))
 WHERE json_extract(spec, '$.customerId') IS NOT NULL
    OR json_extract(spec, '$.transactionIntentId') IS NOT NULL;

ALTER TABLE customers ADD COLUMN first_name TEXT;
ALTER TABLE customers ADD COLUMN last_name TEXT;
CREATE INDEX customers_by_phone ON customers (phone, created_on);

-- One row per session whose customer asked for a code. code_hash is NULL once the code was used.
CREATE TABLE one_time_codes (
    session_id      BLOB    PRIMARY KEY,
    phone           TEXT    NOT NULL,
    code_hash       BLOB,
    code_expires_on INTEGER NOT NULL,
    wrong_attempts  INTEGER NOT NULL,
    codes_sent      INTEGER NOT NULL,
    last_sent_on    INTEGER NOT NULL
) WITHOUT ROWID;

CREATE INDEX one_time_codes_by_age ON one_time_codes (last_sent_on);

CREATE TABLE transaction_intents (
    id           BLOB    PRIMARY KEY,
    merchant_id  BLOB    NOT NULL,
    session_id   BLOB    NOT NULL,
    customer_id  BLOB    NOT NULL,
    flow         TEXT    NOT NULL,
    amount_cents INTEGER NOT NULL,
    currency     TEXT    NOT NULL,
    created_on   INTEGER NOT NULL
);
