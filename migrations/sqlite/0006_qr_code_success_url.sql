-- `redirectData.qrCodeSuccessUrl` became required. Sessions created without it meant "go back
-- to successUrl", so that is what they get, said explicitly. The representation changes, so
-- the version (and with it the ETag) moves too.
UPDATE sessions
   SET spec = json_set(spec, '$.redirectData.qrCodeSuccessUrl', json_extract(spec, '$.redirectData.successUrl')),
       version = version + 1
 WHERE json_type(spec, '$.redirectData.qrCodeSuccessUrl') IS NOT 'text';
