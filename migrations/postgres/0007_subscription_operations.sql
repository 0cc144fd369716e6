-- Operating a subscription (docs/WEBHOOKS.md "Operating a subscription"): signing-secret
-- rotation with an overlap, suspension of a failing receiver with its deliveries held, and
-- recovery of failed deliveries by time window. Same logical schema as
-- migrations/sqlite/0010_subscription_operations.sql.

-- The secret the last rotation replaced (sealed like signing_secret, under the same column
-- and row), signing beside the new one until previous_secret_expires_on.
ALTER TABLE subscriptions ADD COLUMN previous_secret text;
ALTER TABLE subscriptions ADD COLUMN previous_secret_expires_on timestamptz;
ALTER TABLE subscriptions ADD COLUMN state text NOT NULL DEFAULT 'Active'
    CHECK (state IN ('Active', 'Suspended'));
ALTER TABLE subscriptions ADD COLUMN suspended_on timestamptz;
ALTER TABLE subscriptions ADD COLUMN suspended_reason text;
-- When the receiver's current run of failed attempts began; NULL after a success.
ALTER TABLE subscriptions ADD COLUMN failing_since timestamptz;

ALTER TABLE deliveries DROP CONSTRAINT deliveries_state_check;
ALTER TABLE deliveries ADD CONSTRAINT deliveries_state_check
    CHECK (state IN ('Pending', 'Delivered', 'Failed', 'Cancelled', 'Held'));

-- Retention: only finished deliveries are in it (held ones are not finished).
DROP INDEX deliveries_finished;
CREATE INDEX deliveries_finished ON deliveries (last_modified_on) WHERE state NOT IN ('Pending', 'Held');

-- Deliveries in state 'Held' (their subscription is suspended), found by subscription when it
-- is resumed, and counted for /metrics.
CREATE INDEX deliveries_held ON deliveries (subscription_id) WHERE state = 'Held';
