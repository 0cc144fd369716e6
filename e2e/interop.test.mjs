// Interop of the webhook receiver examples (examples/webhooks/receiver.py and receiver.mjs, shown
// in docs/WEBHOOKS.md, "Receiving webhooks: verified examples") with the real server: each runs
// as a child process, verifies the signature with its language's Standard Webhooks library and
// parses the event with its CloudEvents SDK. Covers a cancelled session, the subscription's test
// delivery, and a secret rotation (both signatures during the overlap; the old secret refused
// after a rotation without one).
//
// No browser: the server is started here (over a temporary SQLite database, with a merchant),
// not by the harness's startEnvironment. Run with scripts/e2e, or on its own after
// `npm ci --prefix e2e` and `cargo build`:
//
//     REDIRECT_SESSIONS_BIN=target/debug/redirect-sessions node --test e2e/interop.test.mjs
//
// The Python receiver needs `python3 -m pip install -r examples/webhooks/requirements.txt`:
// without it, it is left out and a test says why (skipped; with CI=true, failed). The Node
// receiver finds its packages in e2e/node_modules through NODE_PATH.

import assert from 'node:assert/strict';
import { execFile, spawn, spawnSync } from 'node:child_process';
import { randomUUID } from 'node:crypto';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { createRequire } from 'node:module';
import http from 'node:http';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { after, before, describe, test } from 'node:test';

import { API_PATH, BIN, MERCHANT_NAME, MerchantApi, REPO_ROOT, freePort, waitFor } from './lib/harness.mjs';
import { newTransactionIntent } from './lib/steps.mjs';

const require = createRequire(import.meta.url);
const { Webhook } = require('standardwebhooks');

const TIMEOUT = 60_000;
const EXAMPLES = path.join(REPO_ROOT, 'examples', 'webhooks');
const NODE_MODULES = path.join(REPO_ROOT, 'e2e', 'node_modules');
const SUBSCRIPTIONS = '/redirect-session-events/subscriptions';

/** The receivers, by kind: how to run each. */
const RECEIVERS = {
    python: { command: 'python3', file: path.join(EXAMPLES, 'receiver.py') },
    node: { command: process.execPath, file: path.join(EXAMPLES, 'receiver.mjs') },
};

/** Why receiver.py cannot run here ('' when it can). */
const pythonMissing = (() => {
    const check = spawnSync('python3', ['-c', 'import standardwebhooks, cloudevents.core.bindings.http'], { encoding: 'utf8' });
    if (check.status === 0) return '';
    const why = check.error ? check.error.message : check.stderr.trim().split('\n').pop();
    return `python3 cannot import the receiver's packages (${why}); python3 -m pip install -r examples/webhooks/requirements.txt`;
})();
const KINDS = pythonMissing ? ['node'] : ['python', 'node'];

/**
 * One receiver example as a child process on 127.0.0.1:`port`; `requests` are the JSON lines it
 * printed, one per request it answered.
 */
class Receiver {
    static running = new Set();

    static async start(kind, { port, secret, apiKey, label = kind }) {
        const { command, file } = RECEIVERS[kind];
        const child = spawn(command, [file], {
            cwd: REPO_ROOT,
            env: { ...process.env, WEBHOOK_SECRET: secret, WEBHOOK_API_KEY: apiKey, PORT: String(port), NODE_PATH: NODE_MODULES },
            stdio: ['ignore', 'pipe', 'pipe'],
        });
        const receiver = new Receiver(label, child, port);
        Receiver.running.add(receiver);
        try {
            await waitFor(`${label} to listen on port ${port}`, async () => {
                if (receiver.exited) throw new Error(`${label} exited (${JSON.stringify(receiver.exited)}):\n${receiver.stderr}`);
                return connects(port);
            });
        } catch (error) {
            await receiver.stop();
            throw error;
        }
        return receiver;
    }

    constructor(label, child, port) {
        this.label = label;
        this.child = child;
        this.url = `http://127.0.0.1:${port}/webhooks/redirect-sessions`;
        this.requests = [];
        this.stderr = '';
        this.exited = null;
        this.exit = new Promise((resolve) => child.on('exit', (code, signal) => resolve((this.exited = { code, signal }))));
        let rest = '';
        child.stdout.setEncoding('utf8');
        child.stdout.on('data', (text) => {
            const lines = (rest + text).split('\n');
            rest = lines.pop();
            for (const line of lines.filter(Boolean)) {
                try {
                    this.requests.push(JSON.parse(line));
                } catch {
                    this.requests.push({ unparsable: line });
                }
            }
        });
        child.stderr.setEncoding('utf8');
        child.stderr.on('data', (text) => (this.stderr += text));
    }

    /** Waits for a request line that satisfies `predicate`; resolves to it. */
    waitForRequest(what, predicate) {
        return waitFor(`${this.label} to print ${what}`, () => {
            if (this.exited) throw new Error(`${this.label} exited (${JSON.stringify(this.exited)}):\n${this.stderr}`);
            return this.requests.find(predicate);
        }).catch((error) => {
            error.message += `\n${this.label} printed:\n${this.requests.map((r) => JSON.stringify(r)).join('\n')}\n${this.stderr}`;
            throw error;
        });
    }

    /** Waits for the verified delivery of a `type` event about session `sessionId`. */
    waitForSessionEvent(type, sessionId) {
        return this.waitForRequest(`a verified ${type} of session ${sessionId}`, (r) => r.verified && r.type === type && r.data?.id === sessionId);
    }

    async stop() {
        Receiver.running.delete(this);
        if (this.exited) return;
        this.child.kill('SIGTERM');
        const timer = setTimeout(() => this.child.kill('SIGKILL'), 5_000);
        await this.exit;
        clearTimeout(timer);
    }
}

process.on('exit', () => {
    for (const receiver of Receiver.running) receiver.child.kill('SIGKILL');
});

/** Whether something accepts connections on 127.0.0.1:`port`. */
function connects(port) {
    return new Promise((resolve) => {
        const socket = net.connect(port, '127.0.0.1');
        socket.once('connect', () => {
            socket.destroy();
            resolve(true);
        });
        socket.once('error', () => resolve(false));
    });
}

/**
 * A callback URL that hands every delivery, byte for byte, to several receivers (`targets`, set
 * later) and answers 204 when all of them answered 204, else 502. `requests` keeps what came in.
 */
async function startTee() {
    const tee = { targets: [], requests: [] };
    const server = http.createServer(async (request, response) => {
        const chunks = [];
        for await (const chunk of request) chunks.push(chunk);
        const body = Buffer.concat(chunks);
        tee.requests.push({ headers: request.headers, body });
        const headers = Object.fromEntries(
            Object.entries(request.headers).filter(([name]) => !['host', 'connection', 'content-length', 'transfer-encoding'].includes(name)),
        );
        const statuses = await Promise.all(
            tee.targets.map((target) =>
                fetch(target.url, { method: 'POST', headers, body }).then(
                    (answer) => answer.status,
                    () => 0,
                ),
            ),
        );
        response.writeHead(statuses.every((status) => status === 204) ? 204 : 502).end();
    });
    await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
    tee.url = `http://127.0.0.1:${server.address().port}/webhooks/redirect-sessions`;
    tee.close = () => new Promise((resolve) => server.close(resolve));
    return tee;
}

let env;
let tee;
/** kind → { subscription: { id, secret, apiKey, eventTypes }, receiver }. */
const subscribed = {};

/** Subscribes `callbackUrl` to RedirectSessionCancelled; resolves to the subscription with its signing secret. */
async function subscribe(callbackUrl) {
    const id = randomUUID();
    const spec = { callbackUrl, apiKey: `interop-${randomUUID()}`, eventTypes: ['RedirectSessionCancelled'] };
    const { status, body } = await env.api.put(`${SUBSCRIPTIONS}/${id}`, spec);
    assert.equal(status, 201, `subscribing ${callbackUrl} answered ${status}: ${JSON.stringify(body)}`);
    assert.match(body.signingSecret ?? '', /^whsec_[A-Za-z0-9+/]{43}=$/, 'signingSecret');
    return { id, secret: body.signingSecret, ...spec };
}

/** Points `subscription` at `callbackUrl` (PATCH replaces all three fields; the secret stays). */
async function repoint(subscription, callbackUrl) {
    const { apiKey, eventTypes } = subscription;
    const { status, body } = await env.api.request('PATCH', `${SUBSCRIPTIONS}/${subscription.id}`, { callbackUrl, apiKey, eventTypes });
    assert.equal(status, 200, `PATCH of the subscription answered ${status}: ${JSON.stringify(body)}`);
}

/** A new session, cancelled; resolves to it. */
async function cancelledSession() {
    const session = await newTransactionIntent(env);
    const cancel = await env.api.cancel(session.id);
    assert.equal(cancel.status, 200, `cancel answered ${cancel.status}: ${JSON.stringify(cancel.body)}`);
    return session;
}

/** POST …/{id}/test; resolves to its 200 answer. */
async function testDelivery(subscription) {
    const { status, body } = await env.api.request('POST', `${SUBSCRIPTIONS}/${subscription.id}/test`);
    assert.equal(status, 200, `the test delivery answered ${status}: ${JSON.stringify(body)}`);
    assert.equal(typeof body.durationMs, 'number', `durationMs: ${JSON.stringify(body)}`);
    return body;
}

/** POST …/{id}/rotate-secret; resolves to its 200 answer. */
async function rotate(subscription, gracePeriodSeconds) {
    const { status, body } = await env.api.request('POST', `${SUBSCRIPTIONS}/${subscription.id}/rotate-secret`, { gracePeriodSeconds });
    assert.equal(status, 200, `rotate-secret answered ${status}: ${JSON.stringify(body)}`);
    assert.match(body.signingSecret ?? '', /^whsec_[A-Za-z0-9+/]{43}=$/, 'signingSecret');
    assert.ok(!Number.isNaN(Date.parse(body.previousSecretExpiresOn)), `previousSecretExpiresOn: ${JSON.stringify(body)}`);
    return body;
}

/**
 * The server over a temporary SQLite database, with a merchant, and nothing else (no browser,
 * unlike the harness's startEnvironment): { api, site: { redirectData }, log, close }. Flags as
 * in the harness: http and loopback callbacks allowed, a 1 s retry.
 */
async function startServer() {
    const dir = await mkdtemp(path.join(os.tmpdir(), 'rs-interop-'));
    const databaseUrl = `sqlite://${dir}/db.sqlite`;
    let child;
    const server = {
        log: [],
        async close() {
            process.off('exit', kill);
            if (child && child.exitCode === null && child.signalCode === null) {
                const exit = new Promise((resolve) => child.once('exit', resolve));
                child.kill('SIGTERM');
                const timer = setTimeout(() => child.kill('SIGKILL'), 5_000);
                await exit;
                clearTimeout(timer);
            }
            await rm(dir, { recursive: true, force: true });
        },
    };
    const kill = () => child?.kill('SIGKILL');
    try {
        const { stdout } = await promisify(execFile)(BIN, ['merchant', 'create', '--name', MERCHANT_NAME, '--database-url', databaseUrl], {
            timeout: 30_000,
        });
        const merchant = JSON.parse(stdout.trim().split('\n').pop());
        const port = await freePort();
        const url = `http://127.0.0.1:${port}`;
        child = spawn(
            BIN,
            ['serve', '--database-url', databaseUrl, '--listen', `127.0.0.1:${port}`, '--public-url', url,
                '--allow-http-redirect-urls', '--allow-private-callbacks', '--webhook-retry-schedule', '1s'],
            { cwd: dir, stdio: ['ignore', 'pipe', 'pipe'] },
        );
        process.on('exit', kill);
        for (const stream of [child.stdout, child.stderr]) {
            stream.setEncoding('utf8');
            stream.on('data', (text) => server.log.push(text));
        }
        await waitFor(
            'the service to answer /health/ready',
            async () => {
                if (child.exitCode !== null || child.signalCode !== null) {
                    throw new Error(`the service exited before it was ready:\n${server.log.join('')}`);
                }
                return fetch(`${url}/health/ready`).then((answer) => answer.status === 200, () => false);
            },
            20_000,
        );
        server.api = new MerchantApi(`${url}${API_PATH}`, merchant.apiKey);
        // Where the customer would go back to: never visited here.
        const back = (page) => `${url}/shop/${page}`;
        server.site = { redirectData: { successUrl: back('success'), failureUrl: back('failure'), abortUrl: back('abort'), qrCodeSuccessUrl: back('qr-done') } };
    } catch (error) {
        await server.close();
        throw error;
    }
    return server;
}

test('docs: WEBHOOKS.md shows every receiver example verbatim', async () => {
    const docs = await readFile(path.join(REPO_ROOT, 'docs', 'WEBHOOKS.md'), 'utf8');
    for (const [file, language] of [['receiver.py', 'python'], ['receiver.mjs', 'js'], ['receiver.rs', 'rust']]) {
        const text = await readFile(path.join(EXAMPLES, file), 'utf8');
        assert.ok(docs.includes(`\`\`\`${language}\n${text}\`\`\`\n`), `docs/WEBHOOKS.md lacks examples/webhooks/${file} verbatim in a \`\`\`${language} block`);
    }
});

test('receiver.py has its packages', (t) => {
    if (!pythonMissing) return;
    if (process.env.CI === 'true') assert.fail(pythonMissing);
    t.skip(pythonMissing);
});

describe('the receivers against the service', () => {
    before(async () => {
        env = await startServer();
        tee = await startTee();
        for (const kind of KINDS) {
            // The secret comes with the 201 of the subscription, so the receiver starts after it.
            const port = await freePort();
            const subscription = await subscribe(`http://127.0.0.1:${port}/webhooks/redirect-sessions`);
            const receiver = await Receiver.start(kind, { port, secret: subscription.secret, apiKey: subscription.apiKey });
            subscribed[kind] = { subscription, receiver };
        }
    }, { timeout: TIMEOUT });

    after(async () => {
        for (const receiver of [...Receiver.running]) await receiver.stop();
        await tee?.close();
        await env?.close();
    });

    test('cancelled: every receiver verifies and parses the RedirectSessionCancelled delivery', { timeout: TIMEOUT }, async () => {
        const session = await cancelledSession();
        for (const kind of KINDS) {
            const { receiver } = subscribed[kind];
            const line = await receiver.waitForSessionEvent('RedirectSessionCancelled', session.id);
            assert.equal(line.data.state, 'Cancelled', `${kind}: ${JSON.stringify(line)}`);
            assert.equal(line.data.type, 'NewTransactionIntent', `${kind}: ${JSON.stringify(line)}`);
            assert.deepEqual(
                receiver.requests.filter((r) => !r.verified),
                [],
                `${kind} refused a delivery signed with its own secret`,
            );
        }
    });

    test('test delivery: POST …/test reaches every receiver, which verifies a RedirectSessionTest', { timeout: TIMEOUT }, async () => {
        for (const kind of KINDS) {
            const { subscription, receiver } = subscribed[kind];
            const answer = await testDelivery(subscription);
            assert.equal(answer.success, true, `${kind}: ${JSON.stringify(answer)}`);
            assert.equal(answer.statusCode, 204, `${kind}: ${JSON.stringify(answer)}`);
            assert.equal(answer.error, null, `${kind}: ${JSON.stringify(answer)}`);
            await receiver.waitForRequest(
                'a verified RedirectSessionTest',
                (r) => r.verified && r.type === 'RedirectSessionTest' && r.data?.subscriptionId === subscription.id,
            );
        }
    });

    test('rotation: during the overlap one delivery verifies with the old and with the new secret; without one, the old secret is refused', { timeout: TIMEOUT }, async () => {
        const { subscription } = subscribed[KINDS[0]];
        const oldSecret = subscription.secret;
        const rotated = await rotate(subscription, 3600);
        assert.notEqual(rotated.signingSecret, oldSecret);
        assert.ok(Date.parse(rotated.previousSecretExpiresOn) > Date.now(), `previousSecretExpiresOn ${rotated.previousSecretExpiresOn} is not ahead`);
        const newSecret = rotated.signingSecret;

        // Receivers of every kind with the old secret and with the new one, all behind the tee: each
        // gets the very bytes the service sent.
        const receivers = [];
        for (const kind of KINDS) {
            for (const [which, secret] of [['old', oldSecret], ['new', newSecret]]) {
                const port = await freePort();
                receivers.push(await Receiver.start(kind, { port, secret, apiKey: subscription.apiKey, label: `${kind} (${which} secret)` }));
            }
        }
        tee.targets = receivers;
        await repoint(subscription, tee.url);

        const session = await cancelledSession();
        for (const receiver of receivers) {
            await receiver.waitForSessionEvent('RedirectSessionCancelled', session.id);
        }
        const delivered = tee.requests.find((r) => JSON.parse(r.body).data?.id === session.id);
        const entries = delivered.headers['webhook-signature'].split(' ');
        assert.equal(entries.length, 2, `webhook-signature during the overlap: ${delivered.headers['webhook-signature']}`);
        // The first entry is the new secret's, the second the old one's; each alone verifies.
        for (const [entry, secret] of [[entries[0], newSecret], [entries[1], oldSecret]]) {
            assert.doesNotThrow(() => new Webhook(secret).verify(delivered.body, { ...delivered.headers, 'webhook-signature': entry }));
        }
        const delivery = await waitFor('the delivery of the overlap to be Delivered', async () => {
            const { status, body } = await env.api.request('GET', `/redirect-session-events/deliveries?subscriptionId=${subscription.id}`);
            assert.equal(status, 200, `deliveries answered ${status}: ${JSON.stringify(body)}`);
            return body.items.find((d) => d.redirectSessionId === session.id && d.state === 'Delivered');
        });
        assert.equal(delivery.attempts.at(-1).statusCode, 204, JSON.stringify(delivery));
        const overlapTest = await testDelivery(subscription);
        assert.deepEqual([overlapTest.success, overlapTest.statusCode], [true, 204], `the test delivery during the overlap: ${JSON.stringify(overlapTest)}`);

        // A rotation without overlap: only the newest secret signs. A receiver with the secret it
        // replaced (the "new" one above) answers 401, which the test delivery reports; one with
        // the newest secret accepts.
        const immediate = await rotate(subscription, 0);
        const replaced = receivers.find((r) => r.label === `${KINDS[0]} (new secret)`);
        await repoint(subscription, replaced.url);
        const refused = await testDelivery(subscription);
        assert.equal(refused.success, false, JSON.stringify(refused));
        assert.equal(refused.statusCode, 401, JSON.stringify(refused));
        await replaced.waitForRequest('a refused delivery', (r) => r.verified === false);

        const port = await freePort();
        const newest = await Receiver.start(KINDS[0], { port, secret: immediate.signingSecret, apiKey: subscription.apiKey, label: `${KINDS[0]} (newest secret)` });
        await repoint(subscription, newest.url);
        const accepted = await testDelivery(subscription);
        assert.deepEqual([accepted.success, accepted.statusCode], [true, 204], `the test delivery with the newest secret: ${JSON.stringify(accepted)}`);
        await newest.waitForRequest('a verified RedirectSessionTest', (r) => r.verified && r.type === 'RedirectSessionTest');
    });
});
