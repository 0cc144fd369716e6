// The steps the scenarios share: creating sessions, arriving from the merchant's page, the
// phone and code steps, and coming back to the shop. Each takes the Visit (or the environment)
// it works on.

import assert from 'node:assert/strict';

import { waitFor } from './harness.mjs';

/** A NewTransactionIntent session of `type` (a deposit unless told). */
export function newTransactionIntent(env, { type = 'PassthroughDeposit', amount = 123.45, locale, customerId } = {}) {
    return env.api.createSession({
        type: 'NewTransactionIntent',
        ...(customerId ? { customerId } : {}),
        transactionData: { type, amount, currency: 'EUR' },
        redirectData: env.site.redirectData,
        ...(locale ? { locale } : {}),
    });
}

/** The URL of the page the browser shows, parsed. */
export const here = (visit) => new URL(visit.page.url());

/** Asserts the browser is back on the merchant's `page` (success, failure, abort, qr-done). */
export async function assertBackAtShop(visit, page) {
    const { env } = visit;
    const url = here(visit);
    assert.equal(url.href, `${env.site.url}/${page}`, `expected the merchant's /${page} exactly as given, the browser shows ${url}`);
    assert.equal((await visit.page.locator('#landing').textContent()).trim(), page);
    const landing = env.site.landings.at(-1);
    assert.equal(landing.method, 'GET', `the browser came back to /${page} with ${landing.method}`);
    assert.equal(landing.referer, undefined, `the hosted page leaked a Referer to the merchant: ${landing.referer}`);
    await visit.step('back-at-shop', { hosted: false });
}

/** Asserts the session reads `state`; answers the session. */
export async function assertState(env, session, state) {
    const read = await env.api.getSession(session.id);
    assert.equal(read.state, state, `session ${session.id} is ${read.state}, expected ${state}`);
    return read;
}

/**
 * The customer on the merchant's checkout page clicks `#pay` and arrives on the hosted page:
 * mode `js` (the helper script), `form` (plain HTML form POST) or `link` (GET with ?token=).
 */
export async function arrive(visit, session, { mode = 'js' } = {}) {
    const { env, page } = visit;
    env.site.sessions.set(session.id, { token: session.token, redirectUrl: session.redirectUrl });
    await page.goto(`${env.site.url}/checkout/${session.id}?mode=${mode}`);
    if (mode === 'js') {
        const script = await waitFor('the merchant page to request /static/redirect-session.js', () =>
            visit.lastResponse('/static/redirect-session.js'),
        );
        await script.ready;
        assert.equal(script.status, 200, `/static/redirect-session.js answered ${script.status}`);
        assert.equal(script.headers['access-control-allow-origin'], '*', '/static/redirect-session.js needs Access-Control-Allow-Origin: *');
        assert.match(script.headers['content-type'] ?? '', /javascript/, '/static/redirect-session.js content-type');
    }
    await page.locator('body[data-ready]').waitFor({ state: 'attached' });
    if (mode === 'js') {
        assert.equal(
            await page.evaluate(() => typeof globalThis.RedirectSessions?.redirect),
            'function',
            'the helper script should set globalThis.RedirectSessions.redirect',
        );
    }
    await visit.step('merchant', { hosted: false });
    await visit.navigate(() => page.click('#pay'));
    const url = here(visit);
    assert.equal(`${url.origin}${url.pathname}${url.search}`, `${env.service.url}/pay`, 'arrival should end on /pay without the token');
    const cookies = await visit.context.cookies(`${env.service.url}/pay`);
    assert.ok(cookies.length > 0, 'arrival should set a cookie');
    assert.ok(cookies.every((cookie) => cookie.httpOnly), `every cookie of the hosted page should be HttpOnly: ${cookies.map((c) => c.name)}`);
    assert.equal(await page.evaluate(() => document.cookie), '', 'the hosted page cookie is readable from script');
    await assertState(env, session, 'Opened');
}

/** The phone step of a session without a customer: a labelled phone field. */
export async function expectPhoneStep(visit, lang) {
    const { page } = visit;
    const phone = page.locator('form#send-code input#phone');
    await phone.waitFor();
    assert.equal(await phone.getAttribute('name'), 'phone');
    assert.ok(
        await phone.evaluate((input) => input.labels.length > 0 || input.hasAttribute('aria-label') || input.hasAttribute('aria-labelledby')),
        'input#phone has no label',
    );
    await visit.step('phone', { lang });
}

/** Sends the code (with `phone` typed, unless the customer is known) and reads it from the OTP receiver. */
export async function sendCode(visit, session, { phone, expectPhone, lang, index = 0 }) {
    const { env } = visit;
    if (phone !== undefined) await visit.page.fill('form#send-code input#phone', phone);
    await visit.submit('form#send-code');
    const message = await env.otp.waitForMessage(session.id, index);
    assert.match(String(message.code), /^\d{6}$/, `the OTP code ${message.code} is not six digits`);
    assert.equal(message.phone, expectPhone, 'the phone number the code went to');
    assert.ok(String(message.message ?? '').includes(message.code), 'the SMS text should contain the code');
    await visit.page.locator('form#verify-code input#code').waitFor();
    assert.equal(await visit.page.locator('input#code').getAttribute('name'), 'code');
    await visit.step('code', { lang });
    return message.code;
}

/** Types `code` into the code step and submits it. */
export async function enterCode(visit, code) {
    await visit.page.fill('form#verify-code input#code', code);
    await visit.submit('form#verify-code');
}
