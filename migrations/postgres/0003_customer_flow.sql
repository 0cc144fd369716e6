-- The customer's side of a session (docs/HOSTED.md): the same logical schema as
-- migrations/sqlite/0005_customer_flow.sql with native types.
ALTER TABLE sessions ADD COLUMN customer_id uuid;
ALTER TABLE sessions ADD COLUMN transaction_intent_id uuid;
UPDATE sessions
   SET customer_id = (spec ->> 'customerId')::uuid,
       transaction_intent_id = (spec ->> 'transactionIntentId')::uuid
 WHERE spec ? 'customerId' OR spec ? 'transactionIntentId';

ALTER TABLE customers ADD COLUMN first_name text;
ALTER TABLE customers ADD COLUMN last_name text;
CREATE INDEX customers_by_phone ON customers (phone, created_on);

-- One row per session whose customer asked for a code. code_hash is NULL once the code was used.
CREATE TABLE one_time_codes (
    session_id      uuid        PRIMARY KEY,
    phone           text        NOT NULL,
    code_hash       bytea,
    code_expires_on timestamptz NOT NULL,
    wrong_attempts  integer     NOT NULL,
    codes_sent      integer     NOT NULL,
    last_sent_on    timestamptz NOT NULL
);

CREATE INDEX one_time_codes_by_age ON one_time_codes (last_sent_on);

CREATE TABLE transaction_intents (
    id          uuid          PRIMARY KEY,
    merchant_id uuid          NOT NULL,
    session_id  uuid          NOT NULL,
    customer_id uuid          NOT NULL,
    flow        text          NOT NULL CHECK (flow IN ('PayIn', 'PayOut')),
    amount      numeric(12,2) NOT NULL CHECK (amount > 0),
    currency    text          NOT NULL,
    created_on  timestamptz   NOT NULL
);
