-- The expiry sweep's index with its condition written as comparisons. SQLite evaluates an
-- index's condition on every insert and update of a session, and codes an IN list of three
-- values as a temporary table, created and freed each time; comparisons cost nothing.
-- Queries that want this index repeat the condition exactly (`LIVE` in the store).
DROP INDEX sessions_due;
CREATE INDEX sessions_due ON sessions (expires_on)
    WHERE state = 'Created' OR state = 'Opened' OR state = 'Authenticated';
