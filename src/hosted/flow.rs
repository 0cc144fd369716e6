//! The hosted page's handlers: arriving with the token, sending and checking the one-time code,
//! finishing and giving up. Each POST checks the browser's cookie and CSRF token, takes one
//! store step (a conditional state change, so it races a merchant's cancel or the clock with
//! exactly one winner), and answers `303` to the next page (post/redirect/get) or re-renders
//! the page with what went wrong.

use axum::body::{to_bytes, Body};
use axum::extract::{RawQuery, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use uuid::Uuid;

use super::page::{other, respond, secure_headers, Header, Link, Page, Step};
use super::sender::Outgoing;
use super::texts::{fill, money, Lang};
use super::{qr, PAY_PATH};
use crate::api::context::RequestContext;
use crate::app::AppState;
use crate::domain::intent::{qr_text, Flow, Intent, Purpose};
use crate::domain::otp::{self, CodeCheck, OtpState, SendRefusal, MAX_CODES};
use crate::domain::request::SessionType;
use crate::domain::session::State as SessionState;
use crate::domain::time::Timestamp;
use crate::domain::token::{Claims, Expect, TokenError};
use crate::metrics::Hosted;
use crate::store::customer::{CodeEntered, CodeRecorded, Finish, HostedView, Step as StoreStep, StepOutcome};
use crate::store::StoreError;

/// The cookie that carries the browser's CSRF nonce and the session token: `<nonce>.<token>`.
const COOKIE: &str = "rs_pay";
/// The customer's choice of language, when they switched it.
const LANG_COOKIE: &str = "rs_lang";
/// The CSRF nonce: 16 random bytes, base64url.
const NONCE_LEN: usize = 22;
/// Forms are a few short fields.
const MAX_FORM_BYTES: usize = 4 * 1024;

/// The browser's session on the page, from its cookie.
struct Browser {
    nonce: String,
    claims: Claims,
}

/// `GET /pay`: an arrival (`?token=`), a language switch (`?lang=`), or the current step.
pub async fn show(
    State(state): State<AppState>,
    Extension(context): Extension<RequestContext>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    let pairs: Vec<(String, String)> =
        url::form_urlencoded::parse(query.as_deref().unwrap_or("").as_bytes()).into_owned().collect();
    if let Some((_, token)) = pairs.iter().find(|(name, _)| name == "token") {
        return arrive(&state, &headers, token, context).await;
    }
    if let Some((_, lang)) = pairs.iter().find(|(name, _)| name == "lang") {
        let Some(lang) = Lang::parse(lang) else {
            return error_page(&headers, StatusCode::BAD_REQUEST, |t| t.invalid_link);
        };
        let cookie = format!(
            "{LANG_COOKIE}={}; Path={PAY_PATH}; Max-Age=86400; HttpOnly; SameSite=Lax{}",
            lang.code(),
            secure(&state)
        );
        return see_other(PAY_PATH, Some(cookie));
    }
    let Some(browser) = browser(&state, &headers) else {
        return error_page(&headers, StatusCode::BAD_REQUEST, |t| t.no_session);
    };
    match view(&state, &browser.claims).await {
        Ok(Some(view)) => render(&view, &headers, &browser.nonce, None, StatusCode::OK),
        Ok(None) => error_page(&headers, StatusCode::BAD_REQUEST, |t| t.no_session),
        Err(error) => unavailable(&headers, error),
    }
}

/// `POST /pay` with the form field `token`: how the merchant's helper script arrives.
pub async fn arrive_by_form(
    State(state): State<AppState>,
    Extension(context): Extension<RequestContext>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let form = match read_form(&headers, body).await {
        Ok(form) => form,
        Err(status) => return error_page(&headers, status, |t| t.invalid_link),
    };
    match field(&form, "token") {
        Some(token) => arrive(&state, &headers, token, context).await,
        None => error_page(&headers, StatusCode::BAD_REQUEST, |t| t.invalid_link),
    }
}

/// Checks the token, opens the session (`Created` → `Opened`, once) and hands the browser its
/// cookie, then sends it to the clean `/pay`: the token leaves the address bar and the history.
async fn arrive(state: &AppState, headers: &HeaderMap, token: &str, context: RequestContext) -> Response {
    let claims = match state.keyring().verify(token, expect(state)) {
        Ok(claims) => claims,
        Err(TokenError::Expired(claims)) => {
            // A genuine link whose time has passed: say so, and offer the way back. No cookie,
            // no form: whatever the session's state, this link cannot move it.
            return match view(state, &claims).await {
                Ok(Some(view)) => {
                    let t = language(headers, &view).texts();
                    let expired = Step::Outcome {
                        text: format!("{} {}", t.expired_link, t.start_again),
                        back: Some(Link {
                            url: view.session.spec.redirect_data.failure_url.clone(),
                            label: fill(t.back_to, &[("merchant", &view.merchant_name)]),
                        }),
                    };
                    render_step(&view, headers, "", None, Some(expired), StatusCode::GONE)
                }
                Ok(None) => error_page(headers, StatusCode::GONE, |t| t.expired_link),
                Err(error) => unavailable(headers, error),
            };
        }
        Err(_) => return error_page(headers, StatusCode::BAD_REQUEST, |t| t.invalid_link),
    };
    match view(state, &claims).await {
        Ok(Some(_)) => {}
        Ok(None) => return error_page(headers, StatusCode::BAD_REQUEST, |t| t.invalid_link),
        Err(error) => return unavailable(headers, error),
    }
    let now = Timestamp::now();
    let step = StoreStep { session_id: claims.sid, correlation_id: context.correlation_id, now };
    let session = match state.store.open_session(step).await {
        Ok(StepOutcome::Done(session)) => {
            state.metrics.hosted(Hosted::Arrival);
            session
        }
        Ok(StepOutcome::NotAllowed(session, _)) => session,
        Ok(StepOutcome::NotFound) => return error_page(headers, StatusCode::BAD_REQUEST, |t| t.invalid_link),
        Err(error) => return unavailable(headers, error),
    };
    let mut nonce = [0u8; 16];
    if getrandom::getrandom(&mut nonce).is_err() {
        return unavailable(headers, StoreError::Internal("no randomness for the CSRF nonce".into()));
    }
    let max_age = ((session.expires_on.millis() - now.millis()) / 1000).max(60);
    let cookie = format!(
        "{COOKIE}={}.{token}; Path={PAY_PATH}; Max-Age={max_age}; HttpOnly; SameSite=Lax{}",
        URL_SAFE_NO_PAD.encode(nonce),
        secure(state)
    );
    see_other(PAY_PATH, Some(cookie))
}

/// `POST /pay/code`: sends a one-time code to the session's customer or to the typed phone.
pub async fn send_code(
    State(state): State<AppState>,
    Extension(context): Extension<RequestContext>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let (browser, form, view) = match posted(&state, &headers, body).await {
        Ok(posted) => posted,
        Err(response) => return response,
    };
    let now = Timestamp::now();
    let lang = language(&headers, &view);
    let t = lang.texts();
    let again = |message: String, status| render(&view, &headers, &browser.nonce, Some(message), status);
    if view.session.effective_state(now) != SessionState::Opened {
        return render(&view, &headers, &browser.nonce, None, StatusCode::CONFLICT);
    }
    // The phone: the session's customer's; else the one typed (always answered "sent", whether
    // or not it belongs to a customer); a resend goes where the last code went.
    let phone = match (&view.customer_phone, field(&form, "phone"), &view.otp) {
        (Some(known), _, _) => known.clone(),
        (None, Some(typed), _) => match otp::parse_phone(typed) {
            Some(phone) => phone,
            None => return again(t.bad_phone.to_owned(), StatusCode::BAD_REQUEST),
        },
        (None, None, Some(previous)) => previous.phone.clone(),
        (None, None, None) => return again(t.bad_phone.to_owned(), StatusCode::BAD_REQUEST),
    };
    match otp::may_send(view.otp.as_ref(), now) {
        Ok(()) => {}
        Err(SendRefusal::TooSoon { wait_seconds }) => {
            let message = fill(t.too_soon, &[("n", &wait_seconds.to_string())]);
            return again(message, StatusCode::TOO_MANY_REQUESTS);
        }
        Err(SendRefusal::NoCodesLeft) => return again(t.no_codes_left.to_owned(), StatusCode::TOO_MANY_REQUESTS),
    }
    let Ok(code) = otp::generate_code() else {
        return unavailable(&headers, StoreError::Internal("no randomness for a one-time code".into()));
    };
    let session_id = view.session.id;
    let message = fill(t.sms, &[("merchant", &view.merchant_name), ("code", &code)]);
    let outgoing = Outgoing {
        redirect_session_id: session_id,
        phone: &phone,
        code: &code,
        locale: &view.session.spec.locale,
        message: &message,
    };
    if let Err(error) = state.code_sender.send(&outgoing).await {
        // Nothing was recorded: the customer may simply try again.
        tracing::warn!(session.id = %session_id, error = %error.0, "a one-time code could not be sent");
        state.metrics.hosted(Hosted::CodeFailed);
        return again(t.send_failed.to_owned(), StatusCode::BAD_GATEWAY);
    }
    let hash = otp::hash_code(state.keyring().code_key(), session_id, &code);
    let seen = view.otp.as_ref().map_or(0, |o| o.codes_sent);
    let next = OtpState::after_send(view.otp.as_ref(), phone, hash, now);
    let step = StoreStep { session_id, correlation_id: context.correlation_id, now };
    match state.store.record_code(step, next, seen).await {
        Ok(CodeRecorded::Recorded) => {
            state.metrics.hosted(Hosted::CodeSent);
            see_other(PAY_PATH, None)
        }
        Ok(CodeRecorded::Raced) => see_other(PAY_PATH, None),
        Ok(CodeRecorded::NotAllowed(_) | CodeRecorded::NotFound) => {
            rerender(&state, &headers, &browser, None, StatusCode::CONFLICT).await
        }
        Err(error) => unavailable(&headers, error),
    }
}

/// `POST /pay/verify`: checks the code; right → `Authenticated` (a registration → `Completed`
/// and back to the merchant's `successUrl`).
pub async fn verify_code(
    State(state): State<AppState>,
    Extension(context): Extension<RequestContext>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let (browser, form, view) = match posted(&state, &headers, body).await {
        Ok(posted) => posted,
        Err(response) => return response,
    };
    let t = language(&headers, &view).texts();
    let Some(code) = field(&form, "code").and_then(otp::entered_code) else {
        return render(&view, &headers, &browser.nonce, Some(t.bad_code.to_owned()), StatusCode::BAD_REQUEST);
    };
    let session_id = view.session.id;
    let hash = otp::hash_code(state.keyring().code_key(), session_id, &code);
    let step = StoreStep { session_id, correlation_id: context.correlation_id, now: Timestamp::now() };
    match state.store.enter_code(step, hash, Uuid::now_v7()).await {
        Ok(CodeEntered::Authenticated(session)) => {
            state.metrics.hosted(Hosted::Authentication);
            if session.state == SessionState::Completed {
                state.metrics.hosted(Hosted::Completion);
                return see_other(&session.spec.redirect_data.success_url, None);
            }
            see_other(PAY_PATH, None)
        }
        Ok(CodeEntered::Refused(check)) => {
            state.metrics.hosted(Hosted::CodeWrong);
            let message = match check {
                CodeCheck::Wrong { tries_left } => fill(t.wrong_code, &[("n", &tries_left.to_string())]),
                CodeCheck::Expired => t.code_expired.to_owned(),
                CodeCheck::TooManyTries => t.code_used_up.to_owned(),
                CodeCheck::NoCode | CodeCheck::Right => t.no_code.to_owned(),
            };
            rerender(&state, &headers, &browser, Some(message), StatusCode::BAD_REQUEST).await
        }
        Ok(CodeEntered::NotAllowed(..) | CodeEntered::NotFound) => {
            rerender(&state, &headers, &browser, None, StatusCode::CONFLICT).await
        }
        Err(error) => unavailable(&headers, error),
    }
}

/// `POST /pay/confirm`: a `NewTransactionIntent` session creates its intent and completes; the
/// page then shows the payment code.
pub async fn confirm(
    State(state): State<AppState>,
    Extension(context): Extension<RequestContext>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    finish(state, context, headers, body, SessionType::NewTransactionIntent).await
}

/// `POST /pay/done`: an `ExistingTransactionIntent` session whose code the customer has seen
/// completes, and the browser returns to the merchant.
pub async fn done(
    State(state): State<AppState>,
    Extension(context): Extension<RequestContext>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    finish(state, context, headers, body, SessionType::ExistingTransactionIntent).await
}

/// `POST /pay/abort`: the customer gives up; `Aborted`, and back to the merchant's `abortUrl`.
pub async fn abort(
    State(state): State<AppState>,
    Extension(context): Extension<RequestContext>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let (browser, _, view) = match posted(&state, &headers, body).await {
        Ok(posted) => posted,
        Err(response) => return response,
    };
    let step = StoreStep { session_id: view.session.id, correlation_id: context.correlation_id, now: Timestamp::now() };
    match state.store.finish(step, Finish::GiveUp).await {
        Ok(StepOutcome::Done(session)) => {
            state.metrics.hosted(Hosted::Abort);
            see_other(&session.spec.redirect_data.abort_url, None)
        }
        Ok(_) => rerender(&state, &headers, &browser, None, StatusCode::CONFLICT).await,
        Err(error) => unavailable(&headers, error),
    }
}

async fn finish(
    state: AppState,
    context: RequestContext,
    headers: HeaderMap,
    body: Body,
    kind: SessionType,
) -> Response {
    let (browser, _, view) = match posted(&state, &headers, body).await {
        Ok(posted) => posted,
        Err(response) => return response,
    };
    let spec = &view.session.spec;
    let finish = match (kind, spec.kind, &spec.transaction_data) {
        (SessionType::NewTransactionIntent, SessionType::NewTransactionIntent, Some(data)) => {
            Finish::CreateIntent(Intent { id: Uuid::now_v7(), flow: Flow::of(data) })
        }
        (SessionType::ExistingTransactionIntent, SessionType::ExistingTransactionIntent, _) => Finish::Acknowledge,
        // A form of another flow (a stale tab): show where this session is.
        _ => return render(&view, &headers, &browser.nonce, None, StatusCode::CONFLICT),
    };
    let step = StoreStep { session_id: view.session.id, correlation_id: context.correlation_id, now: Timestamp::now() };
    match state.store.finish(step, finish).await {
        Ok(StepOutcome::Done(session)) => {
            state.metrics.hosted(Hosted::Completion);
            if kind == SessionType::ExistingTransactionIntent {
                see_other(qr_success_url(&session.spec.redirect_data), None)
            } else {
                see_other(PAY_PATH, None)
            }
        }
        Ok(_) => rerender(&state, &headers, &browser, None, StatusCode::CONFLICT).await,
        Err(error) => unavailable(&headers, error),
    }
}

/// What every POST shares: a form, from a browser with a valid cookie whose CSRF nonce the form
/// carries, about a session that exists. A form without the right nonce is answered with the
/// page as it is now (and changes nothing).
async fn posted(
    state: &AppState,
    headers: &HeaderMap,
    body: Body,
) -> Result<(Browser, Vec<(String, String)>, HostedView), Response> {
    let form = read_form(headers, body).await.map_err(|status| error_page(headers, status, |t| t.stale_form))?;
    let browser =
        browser(state, headers).ok_or_else(|| error_page(headers, StatusCode::BAD_REQUEST, |t| t.no_session))?;
    let view = match view(state, &browser.claims).await {
        Ok(Some(view)) => view,
        Ok(None) => return Err(error_page(headers, StatusCode::BAD_REQUEST, |t| t.no_session)),
        Err(error) => return Err(unavailable(headers, error)),
    };
    let csrf_ok = field(&form, "csrf").is_some_and(|sent| same(sent.as_bytes(), browser.nonce.as_bytes()));
    if !csrf_ok {
        let t = language(headers, &view).texts();
        return Err(render(&view, headers, &browser.nonce, Some(t.stale_form.to_owned()), StatusCode::FORBIDDEN));
    }
    Ok((browser, form, view))
}

/// The page of the session as it is now, read again after a step changed (or refused) it.
async fn rerender(
    state: &AppState,
    headers: &HeaderMap,
    browser: &Browser,
    message: Option<String>,
    status: StatusCode,
) -> Response {
    match view(state, &browser.claims).await {
        Ok(Some(view)) => render(&view, headers, &browser.nonce, message, status),
        Ok(None) => error_page(headers, StatusCode::BAD_REQUEST, |t| t.no_session),
        Err(error) => unavailable(headers, error),
    }
}

/// Renders the step the session is at, with an optional message.
fn render(view: &HostedView, headers: &HeaderMap, csrf: &str, message: Option<String>, status: StatusCode) -> Response {
    render_step(view, headers, csrf, message, None, status)
}

/// `render`, or with `step` in place of the session's own (the page around it stays).
fn render_step(
    view: &HostedView,
    headers: &HeaderMap,
    csrf: &str,
    message: Option<String>,
    step: Option<Step>,
    status: StatusCode,
) -> Response {
    let forced = step;
    let now = Timestamp::now();
    let lang = language(headers, view);
    let t = lang.texts();
    let session = &view.session;
    let spec = &session.spec;
    let urls = &spec.redirect_data;
    let merchant = view.merchant_name.as_str();
    let current = session.effective_state(now);
    let live = !current.is_terminal();
    let back =
        |url: &str, label: &str| Some(Link { url: url.to_owned(), label: fill(label, &[("merchant", merchant)]) });
    let outcome = |text: String, link| Step::Outcome { text, back: link };
    let payment_code = |intent: Uuid, flow: Flow, done_form: bool, link| {
        let text = qr_text(intent, flow);
        Step::PaymentCode { svg: qr::svg(&text).unwrap_or_default(), text, done_form, back: link }
    };
    let mut message = message;
    let step = if let Some(step) = forced {
        step
    } else {
        match current {
            SessionState::Created | SessionState::Opened => match &view.otp {
                Some(otp) if otp.has_live_code(now) => Step::Code {
                    note: fill(t.code_sent, &[("phone", &otp::mask_phone(&otp.phone))]),
                    can_resend: otp.codes_sent < MAX_CODES,
                },
                Some(otp) if otp.codes_sent >= MAX_CODES => {
                    message.get_or_insert_with(|| t.no_codes_left.to_owned());
                    Step::Blocked
                }
                previous => {
                    if let Some(otp) = previous {
                        let why = if otp.code_hash.is_none() {
                            t.no_code
                        } else if now >= otp.code_expires_on {
                            t.code_expired
                        } else {
                            t.code_used_up
                        };
                        if otp.code_hash.is_some() {
                            message.get_or_insert_with(|| why.to_owned());
                        }
                    }
                    match &view.customer_phone {
                        Some(phone) => {
                            Step::KnownPhone { note: t.code_to_known.to_owned(), masked: otp::mask_phone(phone) }
                        }
                        None => Step::Phone,
                    }
                }
            },
            SessionState::Authenticated => match (spec.kind, session.transaction_intent_id) {
                (SessionType::NewTransactionIntent, _) => Step::Confirm,
                (SessionType::ExistingTransactionIntent, Some(intent)) => {
                    payment_code(intent, view.intent_flow.unwrap_or(Flow::PayIn), true, None)
                }
                _ => outcome(t.completed.to_owned(), back(&urls.success_url, t.back_to)),
            },
            SessionState::Completed => match (spec.kind, session.transaction_intent_id) {
                (SessionType::NewTransactionIntent, Some(intent)) => {
                    let flow = spec.transaction_data.as_ref().map_or(Flow::PayIn, Flow::of);
                    payment_code(intent, flow, false, back(qr_success_url(urls), t.continue_to))
                }
                (SessionType::ExistingTransactionIntent, _) => {
                    outcome(t.completed.to_owned(), back(qr_success_url(urls), t.back_to))
                }
                _ => outcome(t.completed.to_owned(), back(&urls.success_url, t.back_to)),
            },
            SessionState::Aborted => outcome(t.aborted.to_owned(), back(&urls.abort_url, t.back_to)),
            SessionState::Cancelled => {
                outcome(fill(t.cancelled, &[("merchant", merchant)]), back(&urls.abort_url, t.back_to))
            }
            SessionState::Expired => outcome(t.expired.to_owned(), back(&urls.failure_url, t.back_to)),
        }
    };
    let live = live && csrf.len() == NONCE_LEN;
    let minutes_left = (session.expires_on.millis() - now.millis() + 59_999) / 60_000;
    let header = Header {
        with_merchant: fill(t.with_merchant, &[("merchant", merchant)]),
        purpose: t.purpose(Purpose::of(spec)),
        amount: spec.transaction_data.as_ref().map(|data| money(data.amount.cents(), lang)),
        time_left: live.then(|| fill(t.time_left, &[("n", &minutes_left.to_string())])),
    };
    let page = Page {
        t,
        lang: lang.code(),
        other_lang: other(lang).code(),
        header: Some(header),
        csrf: csrf.to_owned(),
        message,
        abort_label: live.then(|| fill(t.abort, &[("merchant", merchant)])),
        step,
        switch_language: csrf.len() == NONCE_LEN,
    };
    let mut targets: Vec<String> =
        [Some(&urls.success_url), Some(&urls.failure_url), Some(&urls.abort_url), urls.qr_code_success_url.as_ref()]
            .into_iter()
            .flatten()
            .filter_map(|url| url::Url::parse(url).ok())
            .map(|url| url.origin().ascii_serialization())
            .collect();
    targets.sort();
    targets.dedup();
    respond(status, &page, &targets)
}

/// An error page without a session (an invalid link, no cookie): German unless the browser
/// prefers English.
fn error_page(
    headers: &HeaderMap,
    status: StatusCode,
    text: impl Fn(&super::texts::Texts) -> &'static str,
) -> Response {
    let lang = browser_language(headers);
    let t = lang.texts();
    let page = Page::error(lang, format!("{} {}", text(t), t.start_again));
    respond(status, &page, &[])
}

/// The store failed: `503` (with `Retry-After`) when the database is unreachable, else `500`;
/// logged once.
fn unavailable(headers: &HeaderMap, error: StoreError) -> Response {
    let status = match &error {
        StoreError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        StoreError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
    };
    tracing::error!(%error, "the hosted page could not be served");
    let lang = browser_language(headers);
    let mut response = respond(status, &Page::error(lang, lang.texts().unavailable.to_owned()), &[]);
    if status == StatusCode::SERVICE_UNAVAILABLE {
        response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
    }
    response
}

/// `303 See Other` to `location`, optionally setting a cookie.
fn see_other(location: &str, cookie: Option<String>) -> Response {
    let mut response = StatusCode::SEE_OTHER.into_response();
    let headers = response.headers_mut();
    if let Ok(value) = HeaderValue::from_str(location) {
        headers.insert(header::LOCATION, value);
    }
    if let Some(value) = cookie.and_then(|c| HeaderValue::from_str(&c).ok()) {
        headers.insert(header::SET_COOKIE, value);
    }
    secure_headers(headers);
    response
}

/// The session and its page data, if the session exists and belongs to the token's merchant.
async fn view(state: &AppState, claims: &Claims) -> Result<Option<HostedView>, StoreError> {
    let view = state.store.hosted_view(claims.sid).await?;
    Ok(view.filter(|view| view.session.merchant_id == claims.merch_id))
}

/// What a token must be here: issued by this service for its hosted page.
fn expect(state: &AppState) -> Expect<'_> {
    Expect { issuer: &state.public_url, audience: &state.pay_url }
}

/// `; Secure` when the public URL is https.
fn secure(state: &AppState) -> &'static str {
    if state.public_url.starts_with("https://") {
        "; Secure"
    } else {
        ""
    }
}

/// The browser's cookie, checked: a token of ours whose signature holds. Its expiry does not
/// matter here (the cookie expires with the session; the session's state says what happened).
fn browser(state: &AppState, headers: &HeaderMap) -> Option<Browser> {
    let value = cookie(headers, COOKIE)?;
    let (nonce, token) = value.split_once('.')?;
    let claims = match state.keyring().verify(token, expect(state)) {
        Ok(claims) => claims,
        Err(TokenError::Expired(claims)) => *claims,
        Err(_) => return None,
    };
    (nonce.len() == NONCE_LEN).then(|| Browser { nonce: nonce.to_owned(), claims })
}

/// The value of the cookie `name`.
fn cookie<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(key, _)| *key == name)
        .map(|(_, value)| value)
}

/// The page's language: the customer's switch, else the session's locale.
fn language(headers: &HeaderMap, view: &HostedView) -> Lang {
    cookie(headers, LANG_COOKIE).and_then(Lang::parse).unwrap_or_else(|| Lang::of_locale(&view.session.spec.locale))
}

/// The language of a page without a session: the switch, else English when the browser
/// prefers it, else German.
fn browser_language(headers: &HeaderMap) -> Lang {
    if let Some(lang) = cookie(headers, LANG_COOKIE).and_then(Lang::parse) {
        return lang;
    }
    let accept = headers.get(header::ACCEPT_LANGUAGE).and_then(|v| v.to_str().ok()).unwrap_or("");
    Lang::of_locale(accept.trim_start())
}

/// A urlencoded form body, or the status to answer: `415` for another type, `413` past the
/// limit, `400` for a body that is not a form.
async fn read_form(headers: &HeaderMap, body: Body) -> Result<Vec<(String, String)>, StatusCode> {
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    let essence = content_type.split(';').next().unwrap_or("").trim();
    if !essence.eq_ignore_ascii_case("application/x-www-form-urlencoded") {
        return Err(StatusCode::UNSUPPORTED_MEDIA_TYPE);
    }
    let bytes = to_bytes(body, MAX_FORM_BYTES).await.map_err(|_| StatusCode::PAYLOAD_TOO_LARGE)?;
    if std::str::from_utf8(&bytes).is_err() {
        return Err(StatusCode::BAD_REQUEST);
    }
    Ok(url::form_urlencoded::parse(&bytes).into_owned().collect())
}

/// The first value of a form field.
fn field<'f>(form: &'f [(String, String)], name: &str) -> Option<&'f str> {
    form.iter().find(|(key, _)| key == name).map(|(_, value)| value.as_str())
}

/// Where the browser goes after a payment code: `qrCodeSuccessUrl`, or `successUrl` without one.
fn qr_success_url(urls: &crate::domain::request::RedirectData) -> &str {
    urls.qr_code_success_url.as_deref().unwrap_or(&urls.success_url)
}

/// Compares two secrets in constant time.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
