-- Claims keep each subscription within its cap of attempts in flight
-- (webhook_concurrency_per_subscription), and the claims of a dispatcher whose process is gone
-- are taken over at once. Same indexes as migrations/sqlite/0007_delivery_claims.sql.

-- Only leased deliveries are in it: few, whatever the size of the queue.
CREATE INDEX deliveries_leased ON deliveries (subscription_id, lease_until) WHERE lease_until IS NOT NULL;
-- The dispatcher's queue per subscription.
CREATE INDEX deliveries_due_by_subscription ON deliveries (subscription_id, next_attempt_on) WHERE state = 'Pending';

-- Every running dispatcher, registered while it holds its liveness lock (a session-level
-- advisory lock keyed by its owner id, on its instance's listening connection). A registered
-- owner whose lock is free is gone: its leases count as run out, and its row is removed once
-- it holds none. Owners that never registered keep plain lease semantics.
CREATE TABLE delivery_dispatchers (
    owner      uuid        PRIMARY KEY,
    started_on timestamptz NOT NULL DEFAULT now()
);
