//! Rendering the hosted page: the step a session is at, error pages without a session, and the
//! answer when the store fails.

use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::Response;
use uuid::Uuid;

use super::browser::{browser_language, language, view, Browser, NONCE_LEN};
use super::page::{other, respond, Header, Link, Page, Step};
use super::qr;
use super::texts::{fill, money, Texts};
use crate::domain::intent::{qr_text, Flow, Purpose};
use crate::domain::otp::{self, MAX_CODES};
use crate::domain::request::{RedirectData, SessionType};
use crate::domain::session::State as SessionState;
use crate::domain::time::Timestamp;
use crate::state::AppState;
use crate::store::customer::HostedView;
use crate::store::StoreError;

/// The page of the session as it is now, read again after a step changed (or refused) it.
pub(super) async fn rerender(
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
pub(super) fn render(
    view: &HostedView,
    headers: &HeaderMap,
    csrf: &str,
    message: Option<String>,
    status: StatusCode,
) -> Response {
    render_step(view, headers, csrf, message, None, status)
}

/// `render`, or with `step` in place of the session's own (the page around it stays).
pub(super) fn render_step(
    view: &HostedView,
    headers: &HeaderMap,
    csrf: &str,
    message: Option<String>,
    step: Option<Step>,
    status: StatusCode,
) -> Response {
    let now = Timestamp::now();
    let lang = language(headers, view);
    let t = lang.texts();
    let session = &view.session;
    let spec = &session.spec;
    let merchant = view.merchant_name.as_str();
    let live = !session.effective_state(now).is_terminal() && csrf.len() == NONCE_LEN;
    let mut message = message;
    let step = match step {
        Some(step) => step,
        None => step_of(view, t, now, &mut message),
    };
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
    respond(status, &page, &redirect_origins(&spec.redirect_data))
}

/// The merchant's origins, where a form on the page may end up (`respond`'s `form_targets`).
fn redirect_origins(urls: &RedirectData) -> Vec<String> {
    let mut origins: Vec<String> = [&urls.success_url, &urls.failure_url, &urls.abort_url, &urls.qr_code_success_url]
        .into_iter()
        .filter_map(|url| url::Url::parse(url).ok())
        .map(|url| url.origin().ascii_serialization())
        .collect();
    origins.sort();
    origins.dedup();
    origins
}

/// The step a session shows when no action forced one; says in `message` why a code is gone.
fn step_of(view: &HostedView, t: &'static Texts, now: Timestamp, message: &mut Option<String>) -> Step {
    let session = &view.session;
    let spec = &session.spec;
    let urls = &spec.redirect_data;
    let merchant = view.merchant_name.as_str();
    let back =
        |url: &str, label: &str| Some(Link { url: url.to_owned(), label: fill(label, &[("merchant", merchant)]) });
    let outcome = |text: String, link| Step::Outcome { text, back: link };
    let payment_code = |intent: Uuid, flow: Flow, done_form: bool, link| {
        let text = qr_text(intent, flow);
        Step::PaymentCode { svg: qr::svg(&text).unwrap_or_default(), text, done_form, back: link }
    };
    match session.effective_state(now) {
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
                // A code that is still there but no longer good: say why a new one is needed.
                if let Some(otp) = previous.as_ref().filter(|otp| otp.code_hash.is_some()) {
                    let why = if now >= otp.code_expires_on { t.code_expired } else { t.code_used_up };
                    message.get_or_insert_with(|| why.to_owned());
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
}

/// An error page without a session (an invalid link, no cookie): German unless the browser
/// prefers English.
pub(super) fn error_page(
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
pub(super) fn unavailable(headers: &HeaderMap, error: StoreError) -> Response {
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

/// Where the browser goes after a payment code: `qrCodeSuccessUrl` (required at create; older
/// sessions got `successUrl` filled in).
pub(super) fn qr_success_url(urls: &RedirectData) -> &str {
    &urls.qr_code_success_url
}
