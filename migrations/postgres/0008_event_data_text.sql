-- An event's data is kept as the exact text its webhooks send (docs/DESIGN.md "Storage"):
-- `jsonb` kept members in an order of its own, and every read had to rebuild the text. Each
-- existing row is rewritten as the service writes it: compact JSON with the members in
-- `EventData`'s order (id, state, type, createdOn, lastModifiedOn, customerId,
-- transactionIntentId), any other member after them (a test event's one member,
-- subscriptionId). Their values are JSON strings, written by `jsonb` exactly as serde_json does.
CREATE FUNCTION pg_temp.event_data_text(data jsonb) RETURNS text LANGUAGE sql IMMUTABLE AS $$
    SELECT coalesce(
               '{' || string_agg(to_json(m.key)::text || ':' || m.value::text, ','
                                 ORDER BY coalesce(array_position(ARRAY['id', 'state', 'type', 'createdOn',
                                                                        'lastModifiedOn', 'customerId',
                                                                        'transactionIntentId'], m.key),
                                                   100 + m.ordinal)) || '}',
               '{}')
      FROM jsonb_each(data) WITH ORDINALITY AS m(key, value, ordinal)
$$;

ALTER TABLE events ALTER COLUMN data TYPE text USING pg_temp.event_data_text(data);

DROP FUNCTION pg_temp.event_data_text(jsonb);
