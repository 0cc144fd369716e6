-- Idempotency records in insertion order, found through a slim index on their key
-- (docs/BENCHMARKS.md "Idempotency records"). Keyed by the merchant's random x-request-id, a
-- table clustered on that key scatters every insert, and every look-up, over a tree of big
-- rows (the kept answer is about 1.3 KB); here the rows are appended, and the key index holds
-- about ninety entries per page, so a look-up and an insert touch few, mostly cached pages.
ALTER TABLE idempotency RENAME TO idempotency_clustered;
DROP INDEX idempotency_by_age;
CREATE TABLE idempotency (
    merchant_id  BLOB    NOT NULL,
    request_id   BLOB    NOT NULL,
    fingerprint  BLOB    NOT NULL,
    started_on   INTEGER NOT NULL,
    status       INTEGER,
    headers      TEXT,
    body         BLOB,
    completed_on INTEGER
);
INSERT INTO idempotency
    SELECT merchant_id, request_id, fingerprint, started_on, status, headers, body, completed_on
      FROM idempotency_clustered ORDER BY started_on;
DROP TABLE idempotency_clustered;
CREATE UNIQUE INDEX idempotency_by_key ON idempotency (merchant_id, request_id);
CREATE INDEX idempotency_by_age ON idempotency (started_on)
