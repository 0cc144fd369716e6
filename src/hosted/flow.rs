//! The hosted page's handlers: arriving with the token, sending and checking the one-time code,
//! finishing and giving up. Each POST checks the browser's cookie and CSRF token, takes one
//! store step (a conditional state change, so it races a merchant's cancel or the clock with
//! exactly one winner), and answers `303` to the next page (post/redirect/get) or re-renders
//! the page with what went wrong.

use axum::body::Body;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::Extension;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use uuid::Uuid;

use super::browser::{
    browser, expect, field, language, read_form, secure, see_other, view, Posted, COOKIE, LANG_COOKIE,
};
use super::page::{Link, Step};
use super::render::{error_page, qr_success_url, render, render_step, rerender, unavailable};
use super::texts::{fill, Lang};
use super::PAY_PATH;
use crate::api::context::RequestContext;
use crate::code_sender::Outgoing;
use crate::domain::intent::{Flow, Intent};
use crate::domain::otp::{self, CodeCheck, OtpState, SendRefusal};
use crate::domain::request::SessionType;
use crate::domain::session::State as SessionState;
use crate::domain::time::Timestamp;
use crate::domain::token::TokenError;
use crate::metrics::Hosted;
use crate::state::AppState;
use crate::store::customer::{CodeEntered, CodeRecorded, Finish, Step as StoreStep, StepOutcome};
use crate::store::StoreError;

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
pub async fn send_code(posted: Posted) -> Response {
    let Posted { state, context, headers, browser, form, view } = posted;
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
pub async fn verify_code(posted: Posted) -> Response {
    let Posted { state, context, headers, browser, form, view } = posted;
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
pub async fn confirm(posted: Posted) -> Response {
    finish(posted, SessionType::NewTransactionIntent).await
}

/// `POST /pay/done`: an `ExistingTransactionIntent` session whose code the customer has seen
/// completes, and the browser returns to the merchant.
pub async fn done(posted: Posted) -> Response {
    finish(posted, SessionType::ExistingTransactionIntent).await
}

/// `POST /pay/abort`: the customer gives up; `Aborted`, and back to the merchant's `abortUrl`.
pub async fn abort(posted: Posted) -> Response {
    let Posted { state, context, headers, browser, view, .. } = posted;
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

async fn finish(posted: Posted, kind: SessionType) -> Response {
    let Posted { state, context, headers, browser, view, .. } = posted;
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
