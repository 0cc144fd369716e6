//! `x-request-id` idempotency (docs/DESIGN.md "Idempotency") for every mutating merchant request: the first
//! outcome is stored and replayed byte for byte; see `docs/DESIGN.md`.

use std::panic::AssertUnwindSafe;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderName, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use futures_util::FutureExt;
use sha2::{Digest, Sha256};

use super::context::RequestContext;
use super::extract::{body_bytes, store_error};
use crate::app::AppState;
use crate::domain::time::Timestamp;
use crate::error::{ApiError, ErrorCode, PendingError};
use crate::secrets::{is_sealed_bytes, Column};
use crate::store::sealing::idempotency_row;
use crate::store::{IdempotencyBegin, IdempotencyKey, Merchant, StoredResponse};

/// An in-progress record older than this belongs to a request whose process died; a retry
/// takes it over. Longer than any request may run.
pub const IN_PROGRESS_LEASE: Duration = Duration::from_secs(60);

/// The response headers that are part of a stored outcome.
const KEPT_HEADERS: [HeaderName; 3] = [header::CONTENT_TYPE, header::LOCATION, header::ETAG];

/// `idempotent-replayed: true` marks a replayed answer.
pub static REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");

/// A response extension: the body shows a secret (a new subscription's signing secret), so
/// it is stored encrypted (`crate::secrets`, docs/DESIGN.md "Secrets at rest").
#[derive(Clone, Copy, Debug)]
pub struct ShowsSecret;

/// Runs the request at most once per (merchant, `x-request-id`).
pub async fn middleware(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let context = *request.extensions().get::<RequestContext>().expect("context middleware runs first");
    if context.request_id_invalid {
        return ApiError::invalid_field("x-request-id", "must be a UUID").into_response();
    }
    let mutating = !matches!(*request.method(), Method::GET | Method::HEAD | Method::OPTIONS);
    let (Some(request_id), true) = (context.request_id, mutating) else {
        return next.run(request).await;
    };
    let merchant = request.extensions().get::<Merchant>().expect("auth middleware runs first").id;
    let key = IdempotencyKey { merchant_id: merchant, request_id };

    let (parts, body) = request.into_parts();
    let bytes = match body_bytes(body).await {
        Ok(bytes) => bytes,
        Err(error) => return error.into_response(),
    };
    let fingerprint = fingerprint(&parts.method, parts.uri.path_and_query().map_or("", |p| p.as_str()), &bytes);

    match state.store.idempotency_begin(key, fingerprint, Timestamp::now(), IN_PROGRESS_LEASE).await {
        Err(error) => return store_error(error).into_response(),
        Ok(IdempotencyBegin::Replay(stored)) => return replay(&state, key, stored),
        Ok(IdempotencyBegin::InProgress) => {
            return ApiError::new(
                ErrorCode::RequestInProgress,
                "A request with this x-request-id is still being executed; retry later.",
            )
            .into_response()
        }
        Ok(IdempotencyBegin::Reused) => {
            return ApiError::new(
                ErrorCode::RequestIdReused,
                "This x-request-id was already used for a different request.",
            )
            .into_response()
        }
        Ok(IdempotencyBegin::Proceed) => {}
    }

    let run = AssertUnwindSafe(next.run(Request::from_parts(parts, Body::from(bytes)))).catch_unwind().await;
    let mut response = match run {
        Ok(response) => response,
        Err(panic) => {
            // A panic is a server error: forget the record so a retry runs, then let the panic
            // go on to the layer that answers it.
            if let Err(error) = state.store.idempotency_release(key).await {
                tracing::warn!(%error, "could not release an idempotency record; it expires with its lease");
            }
            std::panic::resume_unwind(panic);
        }
    };
    if !is_stored(&response) {
        if let Err(error) = state.store.idempotency_release(key).await {
            tracing::warn!(%error, "could not release an idempotency record; it expires with its lease");
        }
        return response;
    }
    // Render a pending error now, so the stored bytes are exactly what the client receives.
    if let Some(PendingError(error)) = response.extensions_mut().remove::<PendingError>() {
        response = error.render(context.correlation_id, &state.public_url);
    }
    let (parts, body) = response.into_parts();
    let Ok(body) = axum::body::to_bytes(body, usize::MAX).await else {
        return ApiError::internal(&"a response body could not be read").into_response();
    };
    let kept = if parts.extensions.get::<ShowsSecret>().is_some() {
        let row = idempotency_row(key.merchant_id, key.request_id);
        match state.store.secrets().seal(Column::IdempotentBody, &row, &body) {
            Ok(sealed) => sealed.into_bytes(),
            Err(error) => {
                // Not kept rather than kept in clear; a retry runs again.
                tracing::warn!(%error, "could not encrypt an idempotent outcome");
                if let Err(error) = state.store.idempotency_release(key).await {
                    tracing::warn!(%error, "could not release an idempotency record; it expires with its lease");
                }
                return Response::from_parts(parts, Body::from(body));
            }
        }
    } else {
        body.to_vec()
    };
    let stored = StoredResponse {
        status: parts.status.as_u16(),
        headers: KEPT_HEADERS
            .iter()
            .filter_map(|name| {
                let value = parts.headers.get(name)?.to_str().ok()?;
                Some((name.as_str().to_owned(), value.to_owned()))
            })
            .collect(),
        body: kept,
    };
    if let Err(error) = state.store.idempotency_finish(key, stored, Timestamp::now()).await {
        // The outcome stands; a retry after the lease runs again, which every operation allows.
        tracing::warn!(%error, "could not store an idempotent outcome");
    }
    Response::from_parts(parts, Body::from(body))
}

/// SHA-256 of method, path with query, and the exact body bytes.
fn fingerprint(method: &Method, path_and_query: &str, body: &[u8]) -> [u8; 32] {
    let mut hash = Sha256::new();
    hash.update(method.as_str().as_bytes());
    hash.update(b"\n");
    hash.update(path_and_query.as_bytes());
    hash.update(b"\n");
    hash.update(body);
    hash.finalize().into()
}

/// Successes and business outcomes are stored; malformed requests, authentication and rate
/// limits, and server errors are not, so that a corrected or later retry runs.
fn is_stored(response: &Response) -> bool {
    let status = response.status();
    if status.is_success() {
        return true;
    }
    if status.is_server_error() {
        return false;
    }
    match response.extensions().get::<PendingError>() {
        Some(PendingError(error)) => !matches!(
            error.code,
            ErrorCode::Validation
                | ErrorCode::Unauthorized
                | ErrorCode::PayloadTooLarge
                | ErrorCode::UnsupportedMediaType
                | ErrorCode::TooManyRequests
                | ErrorCode::RequestInProgress
                | ErrorCode::RequestIdReused
        ),
        None => false,
    }
}

fn replay(state: &AppState, key: IdempotencyKey, mut stored: StoredResponse) -> Response {
    if is_sealed_bytes(&stored.body) {
        let row = idempotency_row(key.merchant_id, key.request_id);
        let text = String::from_utf8_lossy(&stored.body).into_owned();
        match state.store.secrets().open(Column::IdempotentBody, &row, &text) {
            Ok(body) => stored.body = body,
            Err(error) => return ApiError::internal(&error).into_response(),
        }
    }
    let status = StatusCode::from_u16(stored.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = (status, stored.body).into_response();
    let headers = response.headers_mut();
    for (name, value) in stored.headers {
        if let (Ok(name), Ok(value)) = (HeaderName::try_from(name), HeaderValue::try_from(value)) {
            headers.insert(name, value);
        }
    }
    headers.insert(REPLAYED.clone(), HeaderValue::from_static("true"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fingerprint_covers_method_path_and_body() {
        let base = fingerprint(&Method::PUT, "/a", b"{}");
        assert_eq!(base, fingerprint(&Method::PUT, "/a", b"{}"));
        assert_ne!(base, fingerprint(&Method::POST, "/a", b"{}"));
        assert_ne!(base, fingerprint(&Method::PUT, "/b", b"{}"));
        assert_ne!(base, fingerprint(&Method::PUT, "/a", b"{ }"));
    }
}
