-- Events are looked up by session only by tests and operators' investigations, rarely; an
-- index keyed by random session ids costs every state change a write of a page of its own (a
-- random page of the index), which showed as a third of a cancel's WAL writes. Without it,
-- such a lookup reads the events table.
DROP INDEX events_by_session;
