-- A kept answer that shows a redirect session (a create's 201, a cancel's 200) keeps the
-- session's id instead of its ~1.2 KB of JSON: the answer is rebuilt from the session's row
-- on a replay (docs/DESIGN.md "Idempotency"). `body` and `headers` stay NULL for those.
ALTER TABLE idempotency ADD COLUMN session_id uuid
