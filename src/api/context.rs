//! The outermost middleware: the correlation id, rendering `ApiError`s into the error body, and
//! request metrics; and the answer to a panic, for tower-http's `CatchPanicLayer` inside it.
//!
//! tower-http's request-id layers do not replace `RequestContext`: they keep whatever the client
//! sent and echo it under the same header name, while docs/API.md wants an `x-request-id` that
//! is a UUID (anything else flagged, and answered `400` on merchant routes) and every answer to
//! carry `x-correlation-id`.

use std::any::Any;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderName, HeaderValue, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use uuid::Uuid;

use crate::error::{ApiError, PendingError};
use crate::state::AppState;

/// `x-request-id`: the merchant's id for this request.
pub static REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// `x-correlation-id`: on every response.
pub static CORRELATION_ID: HeaderName = HeaderName::from_static("x-correlation-id");

/// What every handler and middleware may know about the request.
#[derive(Clone, Copy, Debug)]
pub struct RequestContext {
    /// The merchant's `x-request-id`, or one the server made.
    pub correlation_id: Uuid,
    /// The merchant's `x-request-id` when it sent a valid one.
    pub request_id: Option<Uuid>,
    /// The merchant sent an `x-request-id` that is not a UUID.
    pub request_id_invalid: bool,
}

impl RequestContext {
    /// A context with a server-made correlation id (a request the middleware did not see).
    pub fn fresh() -> Self {
        RequestContext { correlation_id: Uuid::now_v7(), request_id: None, request_id_invalid: false }
    }

    fn of(request: &Request) -> Self {
        match request.headers().get(&REQUEST_ID) {
            None => RequestContext { correlation_id: Uuid::now_v7(), request_id: None, request_id_invalid: false },
            Some(value) => match value.to_str().ok().and_then(|v| crate::domain::validate::parse_uuid(v).ok()) {
                Some(id) => RequestContext { correlation_id: id, request_id: Some(id), request_id_invalid: false },
                None => RequestContext { correlation_id: Uuid::now_v7(), request_id: None, request_id_invalid: true },
            },
        }
    }
}

/// Sets up the request context, renders pending errors, adds `x-correlation-id`, and records
/// metrics.
pub async fn middleware(State(state): State<AppState>, mut request: Request, next: Next) -> Response {
    let started = Instant::now();
    let context = RequestContext::of(&request);
    request.extensions_mut().insert(context);
    let method = metric_method(request.method());
    let route = request.extensions().get::<MatchedPath>().map(|p| p.as_str().to_owned());

    let mut response = next.run(request).await;
    if let Some(PendingError(error)) = response.extensions_mut().remove::<PendingError>() {
        response = error.render(context.correlation_id, &state.public_url);
    }
    if let Ok(value) = HeaderValue::from_str(&context.correlation_id.to_string()) {
        response.headers_mut().insert(CORRELATION_ID.clone(), value);
    }
    state.metrics.record_request(
        method,
        route.as_deref().unwrap_or("unmatched"),
        response.status().as_u16(),
        started.elapsed(),
    );
    response
}

/// The answer to a panic in a handler, for tower-http's `CatchPanicLayer` (which sits inside
/// `middleware`): `500 GeneralErrorOccurred`, rendered by `middleware` like every other error.
/// The panic is logged once, here; its message is never sent.
pub fn panic_response(panic: Box<dyn Any + Send + 'static>) -> Response {
    let cause = panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".to_owned());
    ApiError::internal(&format!("handler panicked: {cause}")).into_response()
}

/// The method as a metric label; unknown methods share one label so clients cannot grow the
/// number of series without bound.
fn metric_method(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::PUT => "PUT",
        Method::POST => "POST",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "OTHER",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorCode;

    #[test]
    fn a_panic_becomes_a_pending_500_general_error_without_its_message() {
        for panic in [Box::new("boom") as Box<dyn Any + Send>, Box::new(String::from("boom")), Box::new(42)] {
            let mut response = panic_response(panic);
            assert_eq!(response.status(), 500);
            let PendingError(error) = response.extensions_mut().remove::<PendingError>().expect("a pending error");
            assert_eq!(error.code, ErrorCode::GeneralErrorOccurred);
            assert!(!error.message.contains("boom"), "{}", error.message);
        }
    }
}
