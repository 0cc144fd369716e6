-- `redirectData.qrCodeSuccessUrl` became required. Sessions created without it meant "go back
-- to successUrl", so that is what they get, said explicitly. The representation changes, so
-- the version (and with it the ETag) moves too.
UPDATE sessions
   SET spec = jsonb_set(spec, '{redirectData,qrCodeSuccessUrl}', spec #> '{redirectData,successUrl}'),
       version = version + 1
 WHERE jsonb_typeof(spec #> '{redirectData,qrCodeSuccessUrl}') IS DISTINCT FROM 'string';
