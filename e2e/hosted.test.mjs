// End-to-end tests of the hosted page (/pay) in Chromium: a merchant's checkout page hands the
// customer over, the customer goes through the steps, the browser comes back to the merchant, and
// the merchant's backend learns the outcome by webhook and by reading the session.
//
// Run with scripts/e2e (it builds the server and sets REDIRECT_SESSIONS_BIN). Screenshots of every
// page land in target/e2e-screenshots/<scenario>-<step>-<width>.png.

import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { after, before, test } from 'node:test';

import { MERCHANT_NAME, startEnvironment, withVisit, wrongCode } from './lib/harness.mjs';
import { arrive, assertBackAtShop, assertState, enterCode, expectPhoneStep, newTransactionIntent, sendCode } from './lib/steps.mjs';

const TIMEOUT = 60_000;
let env;

before(async () => {
    env = await startEnvironment();
}, { timeout: TIMEOUT });

after(async () => {
    await env?.close();
});

test('deposit-en: English deposit: phone, code, confirm, QR code, back to the shop; webhook Completed', { timeout: TIMEOUT }, async () => {
    const session = await newTransactionIntent(env, { locale: 'en-US' });
    assert.equal(session.redirectUrl, `${env.service.url}/pay`);
    await withVisit(env, 'deposit-en', async (visit) => {
        const { page } = visit;
        await arrive(visit, session);
        await expectPhoneStep(visit, 'en');
        const code = await sendCode(visit, session, { phone: '0151 23456789', expectPhone: '+4915123456789', lang: 'en' });
        await enterCode(visit, code);
        await page.locator('form#confirm').waitFor();
        await visit.step('confirm', { lang: 'en' });
        await visit.submit('form#confirm');
        await page.locator('#qr-code svg').waitFor();
        const read = await env.api.getSession(session.id);
        assert.ok(read.transactionIntentId, `the session has no transactionIntentId after confirming: ${JSON.stringify(read)}`);
        assert.equal(
            (await page.locator('#qr-text').textContent()).trim(),
            `ZASTRPAY:V1/T:TI/ID:${read.transactionIntentId.toUpperCase()}/DIR:D`,
        );
        assert.equal(await page.locator('a#back').getAttribute('href'), env.site.redirectData.qrCodeSuccessUrl);
        await visit.step('qr', { lang: 'en' });
        await visit.navigate(() => page.click('a#back'));
        await assertBackAtShop(visit, 'qr-done');
        const event = await env.hooks.waitForEvent(session.id, 'RedirectSessionCompleted');
        assert.ok(event.data.customerId, `the Completed event has no data.customerId: ${JSON.stringify(event)}`);
        assert.equal(event.data.transactionIntentId, read.transactionIntentId);
        const final = await assertState(env, session, 'Completed');
        assert.equal(final.customerId, event.data.customerId);
        assert.equal(final.transactionIntentId, read.transactionIntentId);
    });
});

test('abort-de: German page, language switch, the customer gives up; webhook Aborted', { timeout: TIMEOUT }, async () => {
    const session = await newTransactionIntent(env, { type: 'PassthroughWithdrawal', amount: 50, locale: 'de-DE' });
    await withVisit(env, 'abort-de', async (visit) => {
        const { page } = visit;
        await arrive(visit, session);
        await expectPhoneStep(visit, 'de');
        await visit.navigate(() => page.click('a#lang-en'));
        await page.locator('form#send-code input#phone').waitFor();
        await visit.step('english', { lang: 'en' });
        await visit.navigate(() => page.click('a#lang-de'));
        await page.locator('form#send-code input#phone').waitFor();
        await visit.step('german-again', { lang: 'de' });
        const abort = page.locator('form#abort :is(button:not([type]), button[type=submit], input[type=submit])').first();
        const label = (await abort.textContent()) || (await abort.getAttribute('value')) || '';
        assert.ok(label.includes(MERCHANT_NAME), `the abort button should name the merchant, it says ${JSON.stringify(label.trim())}`);
        await visit.submit('form#abort');
        await assertBackAtShop(visit, 'abort');
        await env.hooks.waitForEvent(session.id, 'RedirectSessionAborted');
        await assertState(env, session, 'Aborted');
        assert.equal(env.otp.forSession(session.id).length, 0, 'no code should have been sent');
    });
});

test('cancelled: the merchant cancels while the customer holds a code; the page explains', { timeout: TIMEOUT }, async () => {
    const session = await newTransactionIntent(env, { locale: 'en-GB' });
    await withVisit(env, 'cancelled', async (visit) => {
        const { page } = visit;
        await arrive(visit, session, { mode: 'form' });
        await expectPhoneStep(visit, 'en');
        const code = await sendCode(visit, session, { phone: '+49 151 11122233', expectPhone: '+4915111122233', lang: 'en' });
        const cancel = await env.api.cancel(session.id);
        assert.equal(cancel.status, 200, `cancel answered ${cancel.status}: ${JSON.stringify(cancel.body)}`);
        await assertState(env, session, 'Cancelled');
        await enterCode(visit, code);
        await page.locator('#outcome').waitFor();
        assert.ok((await page.locator('#outcome').textContent()).trim(), '#outcome is empty');
        assert.equal(await page.locator('a#back').getAttribute('href'), env.site.redirectData.abortUrl);
        await visit.step('outcome', { lang: 'en' });
        await assertState(env, session, 'Cancelled');
        await env.hooks.waitForEvent(session.id, 'RedirectSessionCancelled');
        await visit.navigate(() => page.click('a#back'));
        await assertBackAtShop(visit, 'abort');
        await assertState(env, session, 'Cancelled');
    });
});

test('register-de: NewCustomer registration in German, arriving by link; back on successUrl', { timeout: TIMEOUT }, async () => {
    const session = await env.api.createSession({
        type: 'NewCustomer',
        customerData: { firstName: 'Erika', lastName: 'Mustermann' },
        redirectData: env.site.redirectData,
        locale: 'de-DE',
    });
    await withVisit(env, 'register-de', async (visit) => {
        await arrive(visit, session, { mode: 'link' });
        await expectPhoneStep(visit, 'de');
        const code = await sendCode(visit, session, { phone: '0160 5551234', expectPhone: '+491605551234', lang: 'de' });
        await enterCode(visit, code);
        await assertBackAtShop(visit, 'success');
        const read = await assertState(env, session, 'Completed');
        assert.ok(read.customerId, `the completed registration has no customerId: ${JSON.stringify(read)}`);
        const event = await env.hooks.waitForEvent(session.id, 'RedirectSessionCompleted');
        assert.equal(event.data.customerId, read.customerId);
    });
});

test('known-customer: existing intent for a known customer (default German): masked phone, QR code, done', { timeout: TIMEOUT }, async () => {
    const { customerId } = await env.createCustomer('+4915112345678');
    const transactionIntentId = randomUUID();
    const session = await env.api.createSession({
        type: 'ExistingTransactionIntent',
        transactionIntentId,
        customerId,
        redirectData: env.site.redirectData,
    });
    await withVisit(env, 'known-customer', async (visit) => {
        const { page } = visit;
        await arrive(visit, session);
        await page.locator('form#send-code').waitFor();
        assert.equal(await page.locator('form#send-code input#phone').count(), 0, 'a known customer should not be asked for the phone');
        const masked = (await page.locator('#masked-phone').textContent()).trim();
        assert.match(masked, /^\+49\b.*78$/, `#masked-phone shows ${JSON.stringify(masked)}`);
        assert.ok(!masked.replace(/\s/g, '').includes('15112345678'), `#masked-phone shows the whole number: ${masked}`);
        await visit.step('known-phone', { lang: 'de' });
        const code = await sendCode(visit, session, { expectPhone: '+4915112345678', lang: 'de' });
        await enterCode(visit, code);
        await page.locator('#qr-code svg').waitFor();
        await page.locator('form#done').waitFor();
        if (await page.locator('#qr-text').count()) {
            const text = (await page.locator('#qr-text').textContent()).trim();
            assert.ok(text.includes(`/ID:${transactionIntentId.toUpperCase()}/`), `#qr-text ${text} is not the given intent`);
        }
        await visit.step('qr', { lang: 'de' });
        await visit.submit('form#done');
        await assertBackAtShop(visit, 'qr-done');
        const read = await assertState(env, session, 'Completed');
        assert.equal(read.customerId, customerId);
        assert.equal(read.transactionIntentId, transactionIntentId);
        const event = await env.hooks.waitForEvent(session.id, 'RedirectSessionCompleted');
        assert.equal(event.data.customerId, customerId);
        assert.equal(event.data.transactionIntentId, transactionIntentId);
    });
});

test('wrong-code: a wrong code shows a message; the right one still works (a withdrawal: DIR:W)', { timeout: TIMEOUT }, async () => {
    const session = await newTransactionIntent(env, { type: 'PassthroughWithdrawal', amount: 20, locale: 'en-US' });
    await withVisit(env, 'wrong-code', async (visit) => {
        const { page } = visit;
        await arrive(visit, session);
        await expectPhoneStep(visit, 'en');
        const code = await sendCode(visit, session, { phone: '015199988877', expectPhone: '+4915199988877', lang: 'en' });
        await enterCode(visit, wrongCode(code));
        await page.locator('form#verify-code input#code').waitFor();
        const message = page.locator('.message');
        await message.first().waitFor();
        assert.ok(
            await message.first().evaluate((element) => element.closest('[role="alert"]') !== null || element.querySelector('[role="alert"]') !== null),
            'the wrong-code .message should have role="alert"',
        );
        assert.ok((await message.first().textContent()).trim(), 'the .message is empty');
        await visit.step('wrong-code', { lang: 'en' });
        await assertState(env, session, 'Opened');
        await enterCode(visit, code);
        await page.locator('form#confirm').waitFor();
        await visit.step('confirm', { lang: 'en' });
        await visit.submit('form#confirm');
        await page.locator('#qr-code svg').waitFor();
        const read = await env.api.getSession(session.id);
        assert.equal(
            (await page.locator('#qr-text').textContent()).trim(),
            `ZASTRPAY:V1/T:TI/ID:${read.transactionIntentId?.toUpperCase()}/DIR:W`,
            'a withdrawal pays out: DIR:W',
        );
        await visit.step('qr', { lang: 'en' });
    });
});

test('bad-token: a garbage token, by GET and by POST, is a 4xx page with #error', { timeout: TIMEOUT }, async () => {
    await withVisit(env, 'bad-token', async (visit) => {
        const { page } = visit;
        const response = await page.goto(`${env.service.url}/pay?token=garbage`);
        assert.ok(response.status() >= 400 && response.status() < 500, `GET /pay?token=garbage answered ${response.status()}`);
        await page.locator('#error').waitFor();
        assert.ok((await page.locator('#error').textContent()).trim(), '#error is empty');
        await visit.step('get', { languageLinks: false });

        const fake = { id: randomUUID(), token: 'garbage', redirectUrl: `${env.service.url}/pay` };
        env.site.sessions.set(fake.id, fake);
        await page.goto(`${env.site.url}/checkout/${fake.id}?mode=form`);
        await visit.navigate(() => page.click('#pay'));
        const post = visit.lastResponse('/pay');
        assert.equal(post.method, 'POST');
        assert.ok(post.status >= 400 && post.status < 500, `POST /pay with a garbage token answered ${post.status}`);
        await page.locator('#error').waitFor();
        await visit.step('post', { languageLinks: false });
    });
});
