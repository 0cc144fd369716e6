// The browser-test harness: the real server over a temporary SQLite database, a merchant (its
// checkout page and return pages), an OTP receiver, a webhook receiver and Chromium.
//
// Everything listens on 127.0.0.1. The server binary is REDIRECT_SESSIONS_BIN (scripts/e2e sets
// it), else target/debug/redirect-sessions; the browser is E2E_CHROMIUM, else /usr/bin/chromium.

import { spawn, execFile } from 'node:child_process';
import { randomUUID } from 'node:crypto';
import { mkdtemp, mkdir, rm } from 'node:fs/promises';
import http from 'node:http';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';

import { chromium } from 'playwright-core';

export const REPO_ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
export const BIN = process.env.REDIRECT_SESSIONS_BIN || path.join(REPO_ROOT, 'target', 'debug', 'redirect-sessions');
export const CHROMIUM = process.env.E2E_CHROMIUM || '/usr/bin/chromium';
export const SCREENSHOTS = path.join(REPO_ROOT, 'target', 'e2e-screenshots');
export const API_PATH = '/customer-authentication-service/v1';
export const MERCHANT_NAME = 'Demo Shop';
/** Every screenshot is taken at both sizes. */
export const VIEWPORTS = [
    { width: 390, height: 844 },
    { width: 1280, height: 800 },
];
/** How long any single wait (a page, a code, a webhook) may take. */
export const WAIT_MS = 10_000;
/** The hosted page's HTML plus its CSS must stay under this. */
export const MAX_PAGE_BYTES = 30 * 1024;

const CHROMIUM_ARGS = [
    '--headless',
    '--no-sandbox',
    '--disable-gpu',
    '--disable-quic',
    '--no-first-run',
    '--disable-background-networking',
    '--disable-component-update',
    '--disable-sync',
];

const execFileAsync = promisify(execFile);

/** A port that was free a moment ago (the server needs it before it starts: --public-url). */
export async function freePort() {
    const server = net.createServer();
    await new Promise((resolve, reject) => {
        server.once('error', reject);
        server.listen(0, '127.0.0.1', resolve);
    });
    const { port } = server.address();
    await new Promise((resolve) => server.close(resolve));
    return port;
}

/** Polls `check` (async, truthy = done) until it answers or `ms` pass; then throws `what`. */
export async function waitFor(what, check, ms = WAIT_MS, every = 50) {
    const deadline = Date.now() + ms;
    for (;;) {
        const value = await check();
        if (value) return value;
        if (Date.now() > deadline) throw new Error(`timed out after ${ms} ms waiting for ${what}`);
        await new Promise((resolve) => setTimeout(resolve, every));
    }
}

/** Runs a one-shot admin command of the binary and parses its JSON output. */
async function admin(databaseUrl, ...args) {
    try {
        const { stdout } = await execFileAsync(BIN, [...args, '--database-url', databaseUrl], { timeout: 30_000 });
        return JSON.parse(stdout.trim().split('\n').pop());
    } catch (error) {
        throw new Error(`${path.basename(BIN)} ${args.join(' ')} failed: ${error.stderr || error.message}`);
    }
}

/** Reads a request body. */
function readBody(request) {
    return new Promise((resolve, reject) => {
        const chunks = [];
        request.on('data', (chunk) => chunks.push(chunk));
        request.on('end', () => resolve(Buffer.concat(chunks).toString('utf8')));
        request.on('error', reject);
    });
}

/** An HTTP server on 127.0.0.1 and a free port; resolves to { server, port, url, close }. */
async function listen(handler) {
    const server = http.createServer((request, response) => {
        Promise.resolve(handler(request, response)).catch((error) => {
            response.statusCode = 500;
            response.end(String(error));
        });
    });
    await new Promise((resolve, reject) => {
        server.once('error', reject);
        server.listen(0, '127.0.0.1', resolve);
    });
    const { port } = server.address();
    return {
        server,
        port,
        url: `http://127.0.0.1:${port}`,
        close: () =>
            new Promise((resolve) => {
                server.closeAllConnections?.();
                server.close(() => resolve());
            }),
    };
}

const escapeHtml = (text) =>
    String(text).replace(/[&<>"']/g, (c) => ({ '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' })[c]);
/** JSON for a <script> element: no `</script>` or `<!--` can end it early. */
const scriptJson = (value) => JSON.stringify(value).replace(/</g, '\\u003c');

/**
 * The OTP receiver: the service's `http` sender POSTs {redirectSessionId, phone, code, locale,
 * message} here. `status` is what it answers (200 unless a test changes it).
 */
async function startOtpReceiver() {
    const otp = { messages: [], status: 200 };
    const server = await listen(async (request, response) => {
        const body = await readBody(request);
        if (request.method !== 'POST' || new URL(request.url, 'http://x').pathname !== '/otp') {
            response.statusCode = 404;
            return response.end();
        }
        let message;
        try {
            message = JSON.parse(body);
        } catch {
            message = { unparsable: body };
        }
        otp.messages.push({ ...message, receivedAt: Date.now() });
        response.statusCode = otp.status;
        response.setHeader('content-type', 'application/json');
        response.end('{}');
    });
    otp.http = server;
    otp.url = `${server.url}/otp`;
    /** The messages sent for one session so far. */
    otp.forSession = (sessionId) => otp.messages.filter((m) => m.redirectSessionId === sessionId);
    /** Waits for message number `index` (0-based) of a session and resolves to it. */
    otp.waitForMessage = (sessionId, index = 0) =>
        waitFor(`OTP message #${index + 1} for session ${sessionId}`, () => otp.forSession(sessionId)[index]);
    return otp;
}

/** The webhook receiver: records every CloudEvent POSTed to /hooks and answers 200. */
async function startWebhookReceiver() {
    const hooks = { events: [] };
    const server = await listen(async (request, response) => {
        const body = await readBody(request);
        if (request.method !== 'POST' || new URL(request.url, 'http://x').pathname !== '/hooks') {
            response.statusCode = 404;
            return response.end();
        }
        let event;
        try {
            event = JSON.parse(body);
        } catch {
            event = { unparsable: body };
        }
        hooks.events.push({ event, apiKey: request.headers['x-api-key'], receivedAt: Date.now() });
        response.statusCode = 200;
        response.end();
    });
    hooks.http = server;
    hooks.url = `${server.url}/hooks`;
    hooks.apiKey = 'hook-key';
    /** Waits for an event of `type` about session `sessionId`. */
    hooks.waitForEvent = (sessionId, type) =>
        waitFor(`webhook ${type} for session ${sessionId}`, () =>
            hooks.events.map((e) => e.event).find((e) => e.type === type && e.data?.id === sessionId),
        );
    return hooks;
}

/**
 * The merchant's web site: `/checkout/<sessionId>` is the page with the `#pay` button (mode `js`,
 * the default: the helper script; `form`: a plain HTML form POSTing `token`; `link`: a link to
 * `redirectUrl?token=…`), and `/success`, `/failure`, `/abort`, `/qr-done` are return pages.
 */
async function startMerchantSite(serviceUrl) {
    const site = { sessions: new Map(), landings: [] };
    const server = await listen(async (request, response) => {
        const url = new URL(request.url, 'http://x');
        response.setHeader('content-type', 'text/html; charset=utf-8');
        response.setHeader('cache-control', 'no-store');
        const checkout = url.pathname.match(/^\/checkout\/([0-9a-f-]{36})$/);
        if (request.method === 'GET' && checkout && site.sessions.has(checkout[1])) {
            const { token, redirectUrl } = site.sessions.get(checkout[1]);
            const mode = url.searchParams.get('mode') || 'js';
            let handover;
            if (mode === 'form') {
                handover = `<form method="post" action="${escapeHtml(redirectUrl)}">
<input type="hidden" name="token" value="${escapeHtml(token)}">
<button id="pay" type="submit">Pay with Zastrpay</button></form>
<script>document.body.dataset.ready = '1';</script>`;
            } else if (mode === 'link') {
                const href = `${redirectUrl}?token=${encodeURIComponent(token)}`;
                handover = `<a id="pay" href="${escapeHtml(href)}">Pay with Zastrpay</a>
<script>document.body.dataset.ready = '1';</script>`;
            } else {
                handover = `<button id="pay" type="button">Pay with Zastrpay</button>
<script type="module">
import { redirect } from ${scriptJson(`${serviceUrl}/static/redirect-session.js`)};
const session = ${scriptJson({ token, redirectUrl })};
document.querySelector('#pay').addEventListener('click', () => redirect(session));
document.body.dataset.ready = '1';
</script>`;
            }
            response.end(`<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>${MERCHANT_NAME} – checkout</title></head>
<body style="font-family: sans-serif; margin: 2rem">
<h1>${MERCHANT_NAME}</h1><p>Your basket: 1 × Something nice</p>
${handover}
</body></html>`);
            return;
        }
        const landing = url.pathname.match(/^\/(success|failure|abort|qr-done)$/);
        if (landing) {
            site.landings.push({ page: landing[1], method: request.method, query: url.search, referer: request.headers.referer });
            response.end(`<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>${MERCHANT_NAME} – ${landing[1]}</title></head>
<body style="font-family: sans-serif; margin: 2rem"><h1>${MERCHANT_NAME}</h1>
<p>Back at the shop: <strong id="landing">${landing[1]}</strong></p></body></html>`);
            return;
        }
        if (url.pathname === '/favicon.ico') {
            response.statusCode = 204;
            return response.end();
        }
        response.statusCode = 404;
        response.end('<!doctype html><title>not found</title><p>not found</p>');
    });
    site.http = server;
    site.url = server.url;
    site.origin = server.url;
    site.redirectData = {
        successUrl: `${server.url}/success`,
        failureUrl: `${server.url}/failure`,
        abortUrl: `${server.url}/abort`,
        qrCodeSuccessUrl: `${server.url}/qr-done`,
    };
    return site;
}

/** Starts the server and waits until /health/ready answers 200. */
async function startService(dir, databaseUrl, otpUrl, extraArgs = []) {
    const port = await freePort();
    const url = `http://127.0.0.1:${port}`;
    const args = [
        'serve',
        '--database-url', databaseUrl,
        '--listen', `127.0.0.1:${port}`,
        '--public-url', url,
        '--allow-http-redirect-urls',
        '--allow-private-callbacks',
        '--webhook-retry-schedule', '1s',
        '--otp-sender', 'http',
        '--otp-http-url', otpUrl,
        ...extraArgs,
    ];
    const child = spawn(BIN, args, { cwd: dir, stdio: ['ignore', 'pipe', 'pipe'] });
    const log = [];
    const collect = (stream) => {
        let rest = '';
        stream.setEncoding('utf8');
        stream.on('data', (text) => {
            const lines = (rest + text).split('\n');
            rest = lines.pop();
            log.push(...lines);
        });
    };
    collect(child.stdout);
    collect(child.stderr);
    let exited = null;
    const exit = new Promise((resolve) => child.on('exit', (code, signal) => resolve((exited = { code, signal }))));
    const killOnExit = () => child.kill('SIGKILL');
    process.on('exit', killOnExit);
    const service = {
        url,
        origin: url,
        api: `${url}${API_PATH}`,
        log,
        async stop() {
            process.off('exit', killOnExit);
            if (exited) return;
            child.kill('SIGTERM');
            const timer = setTimeout(() => child.kill('SIGKILL'), 5_000);
            await exit;
            clearTimeout(timer);
        },
    };
    try {
        await waitFor(
            'the service to answer /health/ready',
            async () => {
                if (exited) {
                    throw new Error(`the service exited (${JSON.stringify(exited)}) before it was ready:\n${log.join('\n')}`);
                }
                try {
                    const response = await fetch(`${url}/health/ready`);
                    return response.status === 200;
                } catch {
                    return false;
                }
            },
            20_000,
        );
    } catch (error) {
        await service.stop();
        throw error;
    }
    return service;
}

/** The events the webhook receiver subscribes to unless told otherwise. */
const EVENT_TYPES = ['RedirectSessionCompleted', 'RedirectSessionAborted', 'RedirectSessionCancelled'];

/**
 * The whole environment, once per test file: `env.close()` ends everything it started.
 * `serveArgs` are added to `serve` (e.g. a short --session-ttl).
 */
export async function startEnvironment({ serveArgs = [], eventTypes = EVENT_TYPES } = {}) {
    const dir = await mkdtemp(path.join(os.tmpdir(), 'rs-e2e-'));
    const databaseUrl = `sqlite://${dir}/db.sqlite`;
    const started = [];
    const env = {
        dir,
        databaseUrl,
        async close() {
            for (const stop of started.reverse()) {
                await stop().catch(() => {});
            }
            await rm(dir, { recursive: true, force: true });
        },
    };
    try {
        await mkdir(SCREENSHOTS, { recursive: true });
        env.merchant = await admin(databaseUrl, 'merchant', 'create', '--name', MERCHANT_NAME);
        env.otp = await startOtpReceiver();
        started.push(() => env.otp.http.close());
        env.hooks = await startWebhookReceiver();
        started.push(() => env.hooks.http.close());
        env.service = await startService(dir, databaseUrl, env.otp.url, serveArgs);
        started.push(() => env.service.stop());
        env.site = await startMerchantSite(env.service.url);
        started.push(() => env.site.http.close());
        env.browser = await chromium.launch({ executablePath: CHROMIUM, args: CHROMIUM_ARGS, headless: true });
        started.push(() => env.browser.close());
        env.api = new MerchantApi(env.service.api, env.merchant.apiKey);
        const subscription = await env.api.put(`/redirect-session-events/subscriptions/${randomUUID()}`, {
            callbackUrl: env.hooks.url,
            apiKey: env.hooks.apiKey,
            eventTypes,
        });
        if (subscription.status !== 201) {
            throw new Error(`subscribing to webhooks answered ${subscription.status}: ${JSON.stringify(subscription.body)}`);
        }
    } catch (error) {
        await env.close();
        throw error;
    }
    /** A customer known to the service (`customer create`). */
    env.createCustomer = (phone) => admin(databaseUrl, 'customer', 'create', '--phone', phone);
    return env;
}

/** The merchant's backend: the API with its key. */
export class MerchantApi {
    constructor(base, apiKey) {
        this.base = base;
        this.apiKey = apiKey;
    }

    async request(method, path, body) {
        const headers = { 'x-api-key': this.apiKey };
        if (method !== 'GET') headers['x-request-id'] = randomUUID();
        if (body !== undefined) headers['content-type'] = 'application/json';
        const response = await fetch(`${this.base}${path}`, {
            method,
            headers,
            body: body === undefined ? undefined : JSON.stringify(body),
        });
        const text = await response.text();
        let json;
        try {
            json = text ? JSON.parse(text) : undefined;
        } catch {
            json = text;
        }
        return { status: response.status, body: json };
    }

    put(path, body) {
        return this.request('PUT', path, body);
    }

    /** Creates a session; resolves to the 201 body (with `id`, `token`, `redirectUrl`). */
    async createSession(spec) {
        const id = randomUUID();
        const { status, body } = await this.put(`/redirect-sessions/${id}`, spec);
        if (status !== 201) throw new Error(`creating a session answered ${status}: ${JSON.stringify(body)}`);
        return { ...body, id: body.id ?? id };
    }

    async getSession(id) {
        const { status, body } = await this.request('GET', `/redirect-sessions/${id}`);
        if (status !== 200) throw new Error(`reading session ${id} answered ${status}: ${JSON.stringify(body)}`);
        return body;
    }

    async cancel(id) {
        return this.request('POST', `/redirect-sessions/${id}/cancel`);
    }
}

/** The origin of a URL, or '' for one without (about:blank, data:). */
function originOf(url) {
    try {
        const { origin } = new URL(url);
        return origin === 'null' ? '' : origin;
    } catch {
        return '';
    }
}

/** What is wrong with the security headers of a hosted HTML answer ([] when nothing). */
export function headerProblems(headers) {
    const problems = [];
    const csp = headers['content-security-policy'];
    if (!csp) {
        problems.push('no content-security-policy');
    } else {
        if (/unsafe-inline/.test(csp)) problems.push(`content-security-policy allows 'unsafe-inline': ${csp}`);
        if (!/frame-ancestors\s+'none'/.test(csp)) problems.push(`content-security-policy lacks frame-ancestors 'none': ${csp}`);
    }
    if ((headers['referrer-policy'] || '').trim() !== 'no-referrer') {
        problems.push(`referrer-policy is ${JSON.stringify(headers['referrer-policy'])}, not no-referrer`);
    }
    if (!/no-store/.test(headers['cache-control'] || '')) {
        problems.push(`cache-control is ${JSON.stringify(headers['cache-control'])}, without no-store`);
    }
    return problems;
}

/**
 * One customer's browser (a fresh context) in one scenario, watching everything the hosted page
 * does: the headers of every hosted HTML answer, every request it makes, CSP violations and
 * script errors. `step()` takes the screenshots and checks the page on screen.
 */
export class Visit {
    static async open(env, scenario) {
        const context = await env.browser.newContext({ viewport: VIEWPORTS[0], deviceScaleFactor: 1 });
        context.setDefaultTimeout(WAIT_MS);
        context.setDefaultNavigationTimeout(WAIT_MS);
        const page = await context.newPage();
        return new Visit(env, scenario, context, page);
    }

    constructor(env, scenario, context, page) {
        this.env = env;
        this.scenario = scenario;
        this.context = context;
        this.page = page;
        this.service = env.service.origin;
        /** Everything wrong seen so far; `step()` fails on the first one. */
        this.problems = [];
        /** Every request URL, in order (for failure messages). */
        this.requests = [];
        /** Bodies of the service's stylesheets by URL (byte length). */
        this.stylesheetBytes = new Map();
        /** The last HTML document the main frame showed from the service. */
        this.document = null;
        this.responses = [];
        this.steps = 0;

        page.on('request', (request) => this.#onRequest(request));
        page.on('response', (response) => this.#onResponse(response));
        page.on('console', (message) => {
            if (/Content Security Policy|Refused to/i.test(message.text())) {
                this.problems.push(`on ${page.url()}: console ${message.type()}: ${message.text()}`);
            }
        });
        page.on('pageerror', (error) => {
            if (originOf(page.url()) === this.service) this.problems.push(`script error on ${page.url()}: ${error.message}`);
        });
    }

    #onRequest(request) {
        const url = request.url();
        this.requests.push(`${request.method()} ${url}`);
        const target = originOf(url);
        if (target === this.service || /^(data|blob):/.test(url)) return;
        let from = '';
        try {
            from = originOf(request.frame().url());
        } catch {
            // a request without a frame (service worker): judged by its target alone
        }
        if (request.isNavigationRequest()) {
            // Leaving the hosted page is allowed only back to the merchant's own pages.
            const chain = [];
            for (let r = request.redirectedFrom(); r; r = r.redirectedFrom()) chain.push(originOf(r.url()));
            const fromHosted = from === this.service || chain.includes(this.service);
            if (fromHosted && target !== this.env.site.origin) {
                this.problems.push(`the hosted page navigated to a foreign origin: ${url}`);
            }
        } else if (from === this.service) {
            this.problems.push(`the hosted page requested another origin: ${request.resourceType()} ${url}`);
        }
    }

    #onResponse(response) {
        const url = response.url();
        if (originOf(url) !== this.service) return;
        const request = response.request();
        const record = { url, status: response.status(), type: request.resourceType(), method: request.method() };
        this.responses.push(record);
        const entry = (async () => {
            const headers = await response.allHeaders();
            record.headers = headers;
            const isHtml = /^text\/html/.test(headers['content-type'] || '');
            if (isHtml) {
                for (const problem of headerProblems(headers)) {
                    this.problems.push(`${request.method()} ${new URL(url).pathname}${new URL(url).search} (${response.status()}): ${problem}`);
                }
            }
            if (response.status() >= 300 && response.status() < 400) return;
            if (request.resourceType() === 'stylesheet') {
                this.stylesheetBytes.set(url, (await response.body()).length);
            } else if (isHtml && request.isNavigationRequest() && request.frame() === this.page.mainFrame()) {
                record.bytes = (await response.body()).length;
            }
        })().catch(() => {});
        record.ready = entry;
        if (request.isNavigationRequest() && request.frame() === this.page.mainFrame()) this.document = record;
    }

    /** The last answer from the service whose path is `pathname` (for status checks). */
    lastResponse(pathname) {
        return [...this.responses].reverse().find((r) => new URL(r.url).pathname === pathname);
    }

    /** Fails with everything recorded as wrong so far. */
    assertNoProblems(where) {
        if (this.problems.length) {
            throw new Error(`${this.scenario} ${where}:\n  ${this.problems.join('\n  ')}`);
        }
    }

    /**
     * Waits for the next main-frame navigation that `action` starts (a submit, a click on a
     * link), then for the new page to load.
     */
    async navigate(action) {
        const committed = this.page.waitForEvent('framenavigated', { predicate: (frame) => frame === this.page.mainFrame() });
        await action();
        await committed;
        await this.page.waitForLoadState('load');
    }

    /** Submits `form` with its submit button and waits for the page that answers. */
    async submit(form) {
        const button = this.page.locator(`${form} :is(button:not([type]), button[type=submit], input[type=submit])`).first();
        await this.navigate(() => button.click());
    }

    /**
     * Screenshots of the current page at every size, and, when it is a hosted page, the checks
     * every hosted page must pass: headers (recorded as it arrived), no foreign requests, the
     * language, POST forms with a CSRF field, the language links, and HTML + CSS under 30 KB.
     */
    async step(name, { hosted = true, lang, languageLinks = true } = {}) {
        const page = this.page;
        this.steps += 1;
        const number = String(this.steps).padStart(2, '0');
        await page.waitForLoadState('load');
        for (const viewport of VIEWPORTS) {
            await page.setViewportSize(viewport);
            await page.screenshot({
                path: path.join(SCREENSHOTS, `${this.scenario}-${number}-${name}-${viewport.width}.png`),
                fullPage: true,
            });
        }
        await page.setViewportSize(VIEWPORTS[0]);
        if (!hosted) {
            this.assertNoProblems(`at step ${name}`);
            return;
        }
        const where = `${this.scenario} at step ${name} (${page.url()})`;
        if (originOf(page.url()) !== this.service) {
            throw new Error(`${where}: expected a hosted page on ${this.service}`);
        }
        const document = this.document;
        if (!document || originOf(document.url) !== this.service) {
            throw new Error(`${where}: no HTML answer from the service recorded`);
        }
        await document.ready;
        const facts = await page.evaluate(() => ({
            lang: document.documentElement.lang,
            forms: [...document.forms].map((form) => ({
                id: form.id,
                method: (form.getAttribute('method') || 'get').toLowerCase(),
                csrf: [...form.querySelectorAll('input[name="csrf"]')].map((input) => ({ type: input.type, value: input.value })),
            })),
            links: [...document.querySelectorAll('a[id^="lang-"]')].map((a) => ({ id: a.id, href: a.href })),
            stylesheets: [...document.querySelectorAll('link[rel~="stylesheet"]')].map((link) => link.href),
        }));
        const failures = [];
        if (lang && !new RegExp(`^${lang}(-|$)`, 'i').test(facts.lang)) {
            failures.push(`<html lang="${facts.lang}">, expected "${lang}"`);
        }
        for (const form of facts.forms) {
            const name = form.id ? `form#${form.id}` : 'a form without id';
            if (form.method !== 'post') failures.push(`${name} has method ${form.method}, expected post`);
            if (!form.csrf.some((input) => input.type === 'hidden' && input.value)) {
                failures.push(`${name} has no hidden csrf input with a value`);
            }
        }
        if (languageLinks) {
            const other = /^de/i.test(facts.lang) ? 'en' : 'de';
            const link = facts.links.find((l) => l.id === `lang-${other}`);
            if (!link) {
                failures.push(`no a#lang-${other}`);
            } else {
                const href = new URL(link.href);
                if (href.origin !== this.service || href.pathname !== '/pay' || href.searchParams.get('lang') !== other) {
                    failures.push(`a#lang-${other} links to ${link.href}, expected /pay?lang=${other}`);
                }
            }
        }
        for (const stylesheet of facts.stylesheets) {
            if (!this.stylesheetBytes.has(stylesheet)) {
                await waitFor(`stylesheet ${stylesheet}`, () => this.stylesheetBytes.has(stylesheet), 2_000).catch(() => {});
            }
        }
        const css = facts.stylesheets.reduce((sum, href) => sum + (this.stylesheetBytes.get(href) ?? 0), 0);
        const total = (document.bytes ?? 0) + css;
        if (document.bytes === undefined) failures.push('the HTML body could not be read');
        if (total >= MAX_PAGE_BYTES) {
            failures.push(`HTML ${document.bytes} B + CSS ${css} B = ${total} B, not under ${MAX_PAGE_BYTES} B`);
        }
        this.sizes = [...(this.sizes ?? []), { step: name, html: document.bytes, css }];
        this.problems.push(...failures.map((f) => `at step ${name}: ${f}`));
        this.assertNoProblems(`at step ${name} (${page.url()})`);
    }

    async close() {
        await this.context.close().catch(() => {});
    }
}

/** A six-digit code that is not `code`. */
export function wrongCode(code) {
    return String((Number(code) + 1) % 1_000_000).padStart(6, '0');
}

/** Runs `body(visit)` in a fresh browser context, closed however it ends. */
export async function withVisit(env, scenario, body) {
    const visit = await Visit.open(env, scenario);
    try {
        return await body(visit);
    } finally {
        await visit.close();
    }
}
