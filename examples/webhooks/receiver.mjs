// A receiver of redirect-session webhooks, shown in docs/WEBHOOKS.md ("Receiving webhooks:
// verified examples").
//
// node:http, plus two npm packages: standardwebhooks checks the signature, cloudevents parses
// the event.
//
//     WEBHOOK_SECRET=whsec_... WEBHOOK_API_KEY=... PORT=8080 node receiver.mjs
//
// It answers 204 to a verified delivery (to a repeat too: it was handled already), 401 when the
// x-api-key or the signature is wrong, 400 when the signed body is no CloudEvent, and prints one
// JSON line per request: {"verified": ..., "id": ..., "type": ..., "data": ...}.

import { timingSafeEqual } from 'node:crypto';
import http from 'node:http';
import { createRequire } from 'node:module';

// Both packages are CommonJS. require() finds them in a node_modules beside this file or above
// it, or in NODE_PATH (which import ignores).
const require = createRequire(import.meta.url);
const { Webhook } = require('standardwebhooks');
const { HTTP } = require('cloudevents');

const webhook = new Webhook(process.env.WEBHOOK_SECRET); // the subscription's signingSecret, whsec_...
const apiKey = Buffer.from(process.env.WEBHOOK_API_KEY); // the subscription's apiKey
const host = process.env.HOST || '127.0.0.1';
const port = Number(process.env.PORT || 8080);
const MAX_BODY = 1 << 20;

// The ids of the events handled so far. Delivery is at least once: a repeat is answered 204 and
// not handled again. A real receiver keeps them in its database (a unique key), not in memory.
const seen = new Set();

function answer(response, status, line) {
    console.log(JSON.stringify(line));
    response.writeHead(status).end();
}

function sameKey(given) {
    const bytes = Buffer.from(given ?? '');
    return bytes.length === apiKey.length && timingSafeEqual(bytes, apiKey);
}

async function receive(request, response) {
    if (Number(request.headers['content-length'] ?? 0) > MAX_BODY) {
        response.setHeader('connection', 'close');
        return answer(response, 413, { verified: false, error: 'body too large' });
    }
    const chunks = [];
    let size = 0;
    for await (const chunk of request) {
        size += chunk.length;
        if (size > MAX_BODY) return request.destroy();
        chunks.push(chunk);
    }
    const body = Buffer.concat(chunks); // the raw bytes: the signature is over them
    const id = request.headers['webhook-id'];
    try {
        if (!sameKey(request.headers['x-api-key'])) throw new Error('wrong x-api-key');
        // Checks webhook-timestamp (five minutes either way) and accepts the body if any of the
        // space-separated v1 signatures matches (two while a secret is rotated).
        webhook.verify(body, request.headers, { jsonParse: false });
    } catch (error) {
        return answer(response, 401, { verified: false, id, error: error.message });
    }
    let event;
    try {
        // A structured CloudEvent: the whole event is the JSON body. It comes as
        // application/json; the SDK takes a message as structured by its CloudEvents media type.
        event = HTTP.toEvent({ headers: { 'content-type': 'application/cloudevents+json' }, body: body.toString('utf8') });
        event.validate(); // toEvent does not
    } catch (error) {
        return answer(response, 400, { verified: true, id, error: error.message });
    }
    const duplicate = seen.has(event.id);
    seen.add(event.id);
    // Queue the real work here (read data.state, or GET the session) and answer at once.
    answer(response, 204, { verified: true, id: event.id, type: event.type, data: event.data, duplicate });
}

const server = http.createServer((request, response) => {
    if (request.method !== 'POST') return response.writeHead(405, { allow: 'POST' }).end();
    receive(request, response).catch((error) => {
        console.error(error);
        if (!response.headersSent) response.writeHead(500).end();
    });
});
server.listen(port, host, () => console.error(`listening on http://${host}:${server.address().port}`));
