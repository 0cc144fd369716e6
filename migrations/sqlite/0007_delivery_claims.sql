-- Claims keep each subscription within its cap of attempts in flight
-- (webhook_concurrency_per_subscription): they count the leases each subscription holds, and
-- behind one receiver's long backlog they look for due deliveries subscription by
-- subscription instead of reading the backlog.

-- Only leased deliveries are in it: few, whatever the size of the queue.
CREATE INDEX deliveries_leased ON deliveries (subscription_id, lease_until) WHERE lease_until IS NOT NULL;
-- The dispatcher's queue per subscription.
CREATE INDEX deliveries_due_by_subscription ON deliveries (subscription_id, next_attempt_on) WHERE state = 'Pending';
