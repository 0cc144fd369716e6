//! `x-request-id` idempotency (docs/DESIGN.md "Idempotency") for every mutating merchant
//! request: the first answer is kept and replayed byte for byte.
//!
//! The middleware answers a request whose key is kept already (a read) and otherwise lets it
//! run under a `Scope`. A handler that writes passes the scope to the store as a `Guard`, and
//! the store keeps the answer in the transaction of the change; an answer that changed nothing
//! the middleware keeps itself. A duplicate arriving while the first runs in this process
//! waits for it and replays its answer (`409 RequestInProgress` after `IN_PROGRESS_WAIT`); one
//! running in another instance is settled by the database (`crate::store::idempotency`).

use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::http::{header, HeaderName, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use super::auth::KeptReadWithKey;
use super::context::RequestContext;
use super::extract::{body_bytes, store_error};
use crate::domain::time::Timestamp;
use crate::error::{ApiError, ErrorCode, PendingError};
use crate::secrets::{is_sealed_bytes, Column};
use crate::state::{AppState, Claim};
use crate::store::idempotency::Replay;
use crate::store::sealing::idempotency_row;
use crate::store::{Found, Guard, Guarded, IdempotencyKey, Kept, Merchant, StoredResponse};

/// How long a duplicate waits for the first request with its key (running in this process)
/// before it is answered `409 RequestInProgress`.
pub const IN_PROGRESS_WAIT: Duration = Duration::from_secs(2);

/// The response headers that are part of a kept answer.
const KEPT_HEADERS: [HeaderName; 3] = [header::CONTENT_TYPE, header::LOCATION, header::ETAG];

/// `idempotent-replayed: true` marks a replayed answer.
pub static REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");

/// A response extension: the answer was kept by the write that made it (or is a replay).
#[derive(Clone, Copy, Debug)]
struct Answered;

/// The key a request runs under: a request extension the middleware sets for handlers.
#[derive(Clone, Copy, Debug)]
pub struct Scope {
    pub key: IdempotencyKey,
    pub fingerprint: [u8; 32],
}

impl Scope {
    /// The guard for the store write whose answer `answer` renders.
    pub fn guard<O>(self, answer: impl Fn(&O) -> StoredResponse + Send + 'static) -> Guard<O> {
        Guard {
            key: self.key,
            fingerprint: self.fingerprint,
            now: Timestamp::now(),
            answer: Box::new(answer),
            seal: None,
        }
    }

    /// The guard for a store write whose answer shows a secret: kept encrypted.
    pub fn guard_sealed<O>(self, state: &AppState, answer: impl Fn(&O) -> StoredResponse + Send + 'static) -> Guard<O> {
        Guard { seal: Some(state.store.secrets()), ..self.guard(answer) }
    }
}

/// Runs the request at most once per (merchant, `x-request-id`): the gate's last step
/// (`super::gate`), after authentication.
pub async fn run(state: &AppState, request: Request, next: Next) -> Response {
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

    let (mut parts, body) = request.into_parts();
    let bytes = match body_bytes(body).await {
        Ok(bytes) => bytes,
        Err(error) => return error.into_response(),
    };
    let fingerprint = fingerprint(&parts.method, parts.uri.path_and_query().map_or("", |p| p.as_str()), &bytes);
    let read_with_key = parts.extensions.remove::<KeptReadWithKey>().filter(|read| read.request_id == request_id);
    let _claim = match claim(state, key, fingerprint, read_with_key.map(|read| read.kept)).await {
        Ok(claim) => claim,
        Err(answer) => return answer,
    };
    let scope = Scope { key, fingerprint };
    parts.extensions.insert(scope);
    let mut response = next.run(Request::from_parts(parts, Body::from(bytes))).await;
    if response.extensions().get::<Answered>().is_some() || !is_kept(&response) {
        return response;
    }
    // An answer that changed nothing (decided before any write): kept on its own. Rendered
    // now, so the kept bytes are exactly what the client receives.
    if let Some(PendingError(error)) = response.extensions_mut().remove::<PendingError>() {
        response = error.render(context.correlation_id, &state.public_url);
    }
    let (parts, body) = response.into_parts();
    let Ok(body) = axum::body::to_bytes(body, usize::MAX).await else {
        return ApiError::internal(&"a response body could not be read").into_response();
    };
    let answer = StoredResponse {
        status: parts.status.as_u16(),
        headers: KEPT_HEADERS
            .iter()
            .filter_map(|name| {
                let value = parts.headers.get(name)?.to_str().ok()?;
                Some((name.as_str().to_owned(), value.to_owned()))
            })
            .collect(),
        body: body.to_vec(),
        session: None,
    };
    match state.store.idempotency_keep(key, fingerprint, Timestamp::now(), answer).await {
        Ok(None) => Response::from_parts(parts, Body::from(body)),
        Ok(Some(found)) => answer_found(state, key, found),
        Err(error) => {
            // The answer stands; a retry runs again, which every such answer allows.
            tracing::warn!(%error, "could not keep an idempotent answer");
            Response::from_parts(parts, Body::from(body))
        }
    }
}

/// Holds `key` for this request; or, when the key is kept already or held too long by another
/// request, the answer. `read` is the record as read with the merchant's key, when it was.
async fn claim(
    state: &AppState,
    key: IdempotencyKey,
    fingerprint: [u8; 32],
    mut read: Option<Option<Kept>>,
) -> Result<Claim, Response> {
    let deadline = tokio::time::Instant::now() + IN_PROGRESS_WAIT;
    loop {
        let found = match read.take() {
            Some(kept) => Ok(kept.and_then(|kept| kept.decide(&fingerprint))),
            None => state.store.idempotency_lookup(key, fingerprint).await,
        };
        match found {
            Err(error) => return Err(store_error(error).into_response()),
            Ok(Some(found)) => return Err(answer_found(state, key, found)),
            Ok(None) => {}
        }
        let mut running = match state.in_flight.claim(key) {
            Ok(claim) => return Ok(claim),
            Err(running) => running,
        };
        // `changed` fails when the holder is gone: then look again.
        if tokio::time::timeout_at(deadline, running.changed()).await.is_err() {
            return Err(ApiError::new(
                ErrorCode::RequestInProgress,
                "A request with this x-request-id is still being executed; retry later.",
            )
            .into_response());
        }
    }
}

/// How a write's answer is kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Keep {
    Clear,
    /// It shows a secret (a signing secret): kept encrypted.
    Sealed,
}

/// Runs the store write `write` under the request's key when it has one (the guard it gets
/// keeps the answer `render` makes in the write's transaction) and responds as `respond` does.
pub async fn guarded_write<O, R, W, F>(
    state: &AppState,
    scope: Option<axum::Extension<Scope>>,
    keep: Keep,
    render: R,
    write: W,
    ran: impl FnOnce(&O),
) -> Result<Response, ApiError>
where
    R: Fn(&O) -> StoredResponse + Clone + Send + 'static,
    W: FnOnce(Option<Guard<O>>) -> F,
    F: std::future::Future<Output = Result<Guarded<O>, crate::store::StoreError>>,
{
    let scope = scope.map(|axum::Extension(scope)| scope);
    let guard = scope.map(|scope| match keep {
        Keep::Clear => scope.guard(render.clone()),
        Keep::Sealed => scope.guard_sealed(state, render.clone()),
    });
    let guarded = write(guard).await.map_err(store_error)?;
    Ok(respond(state, scope, guarded, render, ran))
}

/// The response of a write run under `scope` (or without a key): the answer the write kept,
/// or the one `render` makes of its outcome, or the answer kept first by an earlier request.
/// `ran` sees the outcome of a write that ran.
pub fn respond<O>(
    state: &AppState,
    scope: Option<Scope>,
    guarded: Guarded<O>,
    render: impl FnOnce(&O) -> StoredResponse,
    ran: impl FnOnce(&O),
) -> Response {
    match (guarded, scope) {
        (Guarded::Ran(outcome, kept), _) => {
            ran(&outcome);
            let is_kept = kept.is_some();
            let mut response = kept.unwrap_or_else(|| render(&outcome)).into_response();
            if is_kept {
                response.extensions_mut().insert(Answered);
            }
            response
        }
        (Guarded::Earlier(found), Some(scope)) => answer_found(state, scope.key, found),
        (Guarded::Earlier(_), None) => ApiError::internal(&"a write without a key lost to a kept one").into_response(),
    }
}

/// The kept answer as a response, or `RequestIdReused`.
fn answer_found(state: &AppState, key: IdempotencyKey, found: Found) -> Response {
    let Replay { mut answer, session } = match found {
        Found::Replay(replay) => *replay,
        Found::Reused => {
            return ApiError::new(
                ErrorCode::RequestIdReused,
                "This x-request-id was already used for a different request.",
            )
            .into_response()
        }
    };
    if answer.session.is_some() {
        // Kept as a reference to the session: the same bytes, rebuilt from its row.
        let Some(session) = session else {
            return ApiError::internal(&"a kept answer refers to a session that is gone").into_response();
        };
        answer = super::sessions::rebuilt_answer(answer.status, session, key.request_id, &state.public_url);
    } else if is_sealed_bytes(&answer.body) {
        let row = idempotency_row(key.merchant_id, key.request_id);
        let text = String::from_utf8_lossy(&answer.body).into_owned();
        match state.store.secrets().open(Column::IdempotentBody, &row, &text) {
            Ok(body) => answer.body = body,
            Err(error) => return ApiError::internal(&error).into_response(),
        }
    }
    let mut response = answer.into_response();
    response.headers_mut().insert(REPLAYED.clone(), HeaderValue::from_static("true"));
    response.extensions_mut().insert(Answered);
    response
}

/// A JSON answer: `body` serialised, with its entity tag and location when it has them.
pub fn json_answer(
    status: StatusCode,
    body: &impl serde::Serialize,
    etag: Option<String>,
    location: Option<String>,
) -> StoredResponse {
    let mut headers = vec![(header::CONTENT_TYPE.as_str().to_owned(), "application/json".to_owned())];
    headers.extend(etag.map(|tag| (header::ETAG.as_str().to_owned(), tag)));
    headers.extend(location.map(|path| (header::LOCATION.as_str().to_owned(), path)));
    // A session's answer is about 1.2 KB: room for it at once, not grown by doubling.
    let mut bytes = Vec::with_capacity(2048);
    serde_json::to_writer(&mut bytes, body).expect("answers serialise");
    let body = bytes;
    StoredResponse { status: status.as_u16(), headers, body, session: None }
}

/// An error as a kept answer: the bytes `ApiError::render` sends.
pub fn error_answer(error: &ApiError, correlation_id: Uuid, public_url: &str) -> StoredResponse {
    let mut headers = vec![(header::CONTENT_TYPE.as_str().to_owned(), "application/json".to_owned())];
    if let Some(seconds) = error.retry_after {
        headers.push((header::RETRY_AFTER.as_str().to_owned(), seconds.to_string()));
    }
    StoredResponse {
        status: error.status.as_u16(),
        headers,
        body: error.body(correlation_id, public_url),
        session: None,
    }
}

impl IntoResponse for StoredResponse {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut response = (status, self.body).into_response();
        let headers = response.headers_mut();
        for (name, value) in self.headers {
            if let (Ok(name), Ok(value)) = (HeaderName::try_from(name), HeaderValue::try_from(value)) {
                headers.insert(name, value);
            }
        }
        response
    }
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

/// Successes and business outcomes are kept; malformed requests, authentication and rate
/// limits, and server errors are not, so that a corrected or later retry runs.
fn is_kept(response: &Response) -> bool {
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
