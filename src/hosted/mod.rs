//! The hosted page (docs/HOSTED.md): where a session's `redirectUrl` takes the customer's
//! browser to authenticate with a one-time code and finish or give up. Server-rendered HTML that
//! needs no JavaScript, in German and English, plus the merchant's helper script.

mod browser;
mod flow;
mod page;
mod qr;
mod render;
mod texts;

use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;

use crate::state::AppState;

pub use crate::config::PAY_PATH;

/// The routes of the hosted page and its static files.
pub fn router() -> Router<AppState> {
    Router::new()
        .route(PAY_PATH, get(flow::show).post(flow::arrive_by_form))
        .route("/pay/code", post(flow::send_code))
        .route("/pay/verify", post(flow::verify_code))
        .route("/pay/confirm", post(flow::confirm))
        .route("/pay/done", post(flow::done))
        .route("/pay/abort", post(flow::abort))
        .route("/static/pay.css", get(stylesheet))
        .route("/static/redirect-session.js", get(helper_script))
}

const STYLESHEET: &str = include_str!("static/pay.css");
const HELPER_SCRIPT: &str = include_str!("static/redirect-session.js");

async fn stylesheet() -> Response {
    asset("text/css; charset=utf-8", STYLESHEET, false)
}

/// The merchant's helper, loaded by merchant pages of any origin as a module script (which a
/// browser fetches with CORS).
async fn helper_script() -> Response {
    asset("text/javascript; charset=utf-8", HELPER_SCRIPT, true)
}

fn asset(content_type: &'static str, body: &'static str, cross_origin: bool) -> Response {
    let mut response = body.into_response();
    let headers: &mut HeaderMap = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("public, max-age=3600"));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    if cross_origin {
        headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, HeaderValue::from_static("*"));
    }
    response
}
