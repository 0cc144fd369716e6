// The hosted page when a session runs out of time while the customer is on it: a server of its
// own with a 6-second session time to live (the setting is per server).

import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';

import { startEnvironment, waitFor, withVisit } from './lib/harness.mjs';
import { arrive, assertBackAtShop, assertState, expectPhoneStep, newTransactionIntent } from './lib/steps.mjs';

const TIMEOUT = 60_000;
let env;

before(async () => {
    env = await startEnvironment({ serveArgs: ['--session-ttl', '6s'], eventTypes: ['RedirectSessionExpired'] });
}, { timeout: TIMEOUT });

after(async () => {
    await env?.close();
});

test('expired: the session runs out while the customer types; the page explains, back to failureUrl', { timeout: TIMEOUT }, async () => {
    const session = await newTransactionIntent(env, { locale: 'en-US' });
    await withVisit(env, 'expired', async (visit) => {
        const { page } = visit;
        await arrive(visit, session, { mode: 'link' });
        await expectPhoneStep(visit, 'en');
        await waitFor(`session ${session.id} to expire`, async () => (await env.api.getSession(session.id)).state === 'Expired');
        await page.fill('form#send-code input#phone', '0151 23456789');
        await visit.submit('form#send-code');
        await page.locator('#outcome').waitFor();
        assert.ok((await page.locator('#outcome').textContent()).trim(), '#outcome is empty');
        assert.equal(await page.locator('a#back').getAttribute('href'), env.site.redirectData.failureUrl);
        assert.equal(await page.locator('form#abort').count(), 0, 'an expired session offers no abort');
        assert.equal(env.otp.forSession(session.id).length, 0, 'no code should go out for an expired session');
        await visit.step('outcome', { lang: 'en' });
        await env.hooks.waitForEvent(session.id, 'RedirectSessionExpired');
        await visit.navigate(() => page.click('a#back'));
        await assertBackAtShop(visit, 'failure');
        await assertState(env, session, 'Expired');
    });
});
