-- Operating a subscription (docs/WEBHOOKS.md "Operating a subscription"): signing-secret
-- rotation with an overlap, suspension of a failing receiver with its deliveries held, and
-- recovery of failed deliveries by time window.

-- The secret the last rotation replaced (sealed like signing_secret, under the same column
-- and row), signing beside the new one until previous_secret_expires_on.
ALTER TABLE subscriptions ADD COLUMN previous_secret TEXT;
ALTER TABLE subscriptions ADD COLUMN previous_secret_expires_on INTEGER;
-- 'Active' or 'Suspended' (with suspended_on and suspended_reason).
ALTER TABLE subscriptions ADD COLUMN state TEXT NOT NULL DEFAULT 'Active';
ALTER TABLE subscriptions ADD COLUMN suspended_on INTEGER;
ALTER TABLE subscriptions ADD COLUMN suspended_reason TEXT;
-- When the receiver's current run of failed attempts began; NULL after a success.
ALTER TABLE subscriptions ADD COLUMN failing_since INTEGER;

-- Deliveries in state 'Held' (their subscription is suspended), found by subscription when it
-- is resumed, and counted for /metrics.
CREATE INDEX deliveries_held ON deliveries (subscription_id) WHERE state = 'Held';
