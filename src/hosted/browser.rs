//! The browser's side of the hosted page: its cookie (the CSRF nonce and the session token), the
//! checked form POST every step starts from, the language it reads, and redirects.

use axum::body::{to_bytes, Body};
use axum::extract::{FromRequest, Request};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use super::page::secure_headers;
use super::render::{error_page, render, unavailable};
use super::texts::Lang;
use crate::api::context::RequestContext;
use crate::domain::token::{Claims, Expect, TokenError};
use crate::state::AppState;
use crate::store::customer::HostedView;
use crate::store::StoreError;

/// The cookie that carries the browser's CSRF nonce and the session token: `<nonce>.<token>`.
pub(super) const COOKIE: &str = "rs_pay";
/// The customer's choice of language, when they switched it.
pub(super) const LANG_COOKIE: &str = "rs_lang";
/// The CSRF nonce: 16 random bytes, base64url.
pub(super) const NONCE_LEN: usize = 22;
/// Forms are a few short fields.
pub(super) const MAX_FORM_BYTES: usize = 4 * 1024;

/// The browser's session on the page, from its cookie.
pub(super) struct Browser {
    pub(super) nonce: String,
    pub(super) claims: Claims,
}

/// A customer's form POST, checked before any handler runs: a urlencoded form, from a browser
/// with a valid cookie whose CSRF nonce the form carries, about a session that exists. A form
/// without the right nonce is answered with the page as it is now (`403`) and changes nothing.
pub struct Posted {
    pub(super) state: AppState,
    pub(super) context: RequestContext,
    pub(super) headers: HeaderMap,
    pub(super) browser: Browser,
    pub(super) form: Vec<(String, String)>,
    pub(super) view: HostedView,
}

impl FromRequest<AppState> for Posted {
    type Rejection = Response;

    async fn from_request(request: Request, state: &AppState) -> Result<Self, Response> {
        let (parts, body) = request.into_parts();
        let headers = parts.headers;
        // Set by the request-context middleware around every route.
        let context = parts.extensions.get::<RequestContext>().copied().unwrap_or_else(RequestContext::fresh);
        let form = read_form(&headers, body).await.map_err(|status| error_page(&headers, status, |t| t.stale_form))?;
        let no_session = |headers: &HeaderMap| error_page(headers, StatusCode::BAD_REQUEST, |t| t.no_session);
        let Some(browser) = browser(state, &headers) else { return Err(no_session(&headers)) };
        let view = match view(state, &browser.claims).await {
            Ok(Some(view)) => view,
            Ok(None) => return Err(no_session(&headers)),
            Err(error) => return Err(unavailable(&headers, error)),
        };
        let csrf_ok = field(&form, "csrf").is_some_and(|sent| same(sent.as_bytes(), browser.nonce.as_bytes()));
        if !csrf_ok {
            let t = language(&headers, &view).texts();
            let message = Some(t.stale_form.to_owned());
            return Err(render(&view, &headers, &browser.nonce, message, StatusCode::FORBIDDEN));
        }
        Ok(Posted { state: state.clone(), context, headers, browser, form, view })
    }
}

/// `303 See Other` to `location`, optionally setting a cookie.
pub(super) fn see_other(location: &str, cookie: Option<String>) -> Response {
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
pub(super) async fn view(state: &AppState, claims: &Claims) -> Result<Option<HostedView>, StoreError> {
    let view = state.store.hosted_view(claims.sid).await?;
    Ok(view.filter(|view| view.session.merchant_id == claims.merch_id))
}

/// What a token must be here: issued by this service for its hosted page.
pub(super) fn expect(state: &AppState) -> Expect<'_> {
    Expect { issuer: &state.public_url, audience: &state.pay_url }
}

/// `; Secure` when the public URL is https.
pub(super) fn secure(state: &AppState) -> &'static str {
    if state.public_url.starts_with("https://") {
        "; Secure"
    } else {
        ""
    }
}

/// The browser's cookie, checked: a token of ours whose signature holds. Its expiry does not
/// matter here (the cookie expires with the session; the session's state says what happened).
pub(super) fn browser(state: &AppState, headers: &HeaderMap) -> Option<Browser> {
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
pub(super) fn cookie<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
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
pub(super) fn language(headers: &HeaderMap, view: &HostedView) -> Lang {
    cookie(headers, LANG_COOKIE).and_then(Lang::parse).unwrap_or_else(|| Lang::of_locale(&view.session.spec.locale))
}

/// The language of a page without a session: the switch, else English when the browser
/// prefers it, else German.
pub(super) fn browser_language(headers: &HeaderMap) -> Lang {
    if let Some(lang) = cookie(headers, LANG_COOKIE).and_then(Lang::parse) {
        return lang;
    }
    let accept = headers.get(header::ACCEPT_LANGUAGE).and_then(|v| v.to_str().ok()).unwrap_or("");
    Lang::of_locale(accept.trim_start())
}

/// A urlencoded form body, or the status to answer: `415` for another type, `413` past the
/// limit, `400` for a body that is not a form.
pub(super) async fn read_form(headers: &HeaderMap, body: Body) -> Result<Vec<(String, String)>, StatusCode> {
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
pub(super) fn field<'f>(form: &'f [(String, String)], name: &str) -> Option<&'f str> {
    form.iter().find(|(key, _)| key == name).map(|(_, value)| value.as_str())
}

/// Compares two secrets in constant time.
pub(super) fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
