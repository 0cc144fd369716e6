//! The hosted page's one template and the model it renders: a header about the session, one
//! step, and the way out. The template (templates/page.html) is checked at compile time.

use askama::Template;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use super::texts::{Lang, Texts};

/// What the page shows below its header.
pub enum Step {
    /// The customer types the phone a code goes to.
    Phone,
    /// The code goes to the session's customer, whose phone is shown masked in `note`.
    KnownPhone { note: String, masked: String },
    /// A code was sent (`note` says where): enter it, or ask for another one while codes are left.
    Code { note: String, can_resend: bool },
    /// Authenticated: confirm the summary to create the payment code.
    Confirm,
    /// A payment code as a QR code, with the way on: a "done" form (an existing intent, not
    /// completed yet) or a link (completed).
    PaymentCode { svg: String, text: String, done_form: bool, back: Option<Link> },
    /// Past the limits: the customer can only give up.
    Blocked,
    /// The session is over (or this page cannot go on): why, and a link back when there is one.
    Outcome { text: String, back: Option<Link> },
}

/// A link back to the merchant.
pub struct Link {
    pub url: String,
    pub label: String,
}

/// The whole page.
#[derive(Template)]
#[template(path = "page.html")]
pub struct Page {
    pub t: &'static Texts,
    pub lang: &'static str,
    pub other_lang: &'static str,
    /// `None` on pages that are not about a session (an invalid link).
    pub header: Option<Header>,
    pub csrf: String,
    /// An alert above the step (a wrong code, a failed send, …).
    pub message: Option<String>,
    pub step: Step,
    /// "Cancel and return to …", on every step before completion.
    pub abort_label: Option<String>,
    /// The language switch, only where there is a session to come back to.
    pub switch_language: bool,
}

/// What the session is about, at the top of the page.
pub struct Header {
    /// "with Demo Shop".
    pub with_merchant: String,
    pub purpose: &'static str,
    pub amount: Option<String>,
    pub time_left: Option<String>,
}

impl Page {
    /// A page without a session: an error that explains and offers no form.
    pub fn error(lang: Lang, text: String) -> Page {
        Page {
            t: lang.texts(),
            lang: lang.code(),
            other_lang: other(lang).code(),
            header: None,
            csrf: String::new(),
            message: None,
            step: Step::Outcome { text, back: None },
            abort_label: None,
            switch_language: false,
        }
    }
}

/// The other of the two languages.
pub fn other(lang: Lang) -> Lang {
    match lang {
        Lang::De => Lang::En,
        Lang::En => Lang::De,
    }
}

/// A rendered page with the headers every hosted page carries. `form_targets` are the origins
/// a form on this page may end up at (the merchant's, for the final redirect): a browser applies
/// `form-action` to the redirects after a form POST too.
pub fn respond(status: StatusCode, page: &Page, form_targets: &[String]) -> Response {
    match page.render() {
        Ok(html) => {
            let mut response = (status, html).into_response();
            let headers = response.headers_mut();
            headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8"));
            let csp = format!(
                "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'{}; \
                 frame-ancestors 'none'; base-uri 'none'",
                form_targets.iter().map(|origin| format!(" {origin}")).collect::<String>()
            );
            if let Ok(value) = HeaderValue::from_str(&csp) {
                headers.insert(header::CONTENT_SECURITY_POLICY, value);
            }
            secure_headers(headers);
            response
        }
        Err(error) => {
            tracing::error!(%error, "the hosted page could not be rendered");
            (StatusCode::INTERNAL_SERVER_ERROR, "The page could not be shown.").into_response()
        }
    }
}

/// The headers of every hosted answer, pages and redirects alike.
pub fn secure_headers(headers: &mut axum::http::HeaderMap) {
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    if !headers.contains_key(header::CONTENT_SECURITY_POLICY) {
        headers.insert(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static("default-src 'none'; frame-ancestors 'none'; base-uri 'none'"),
        );
    }
}
