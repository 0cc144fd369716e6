//! Merchant authentication by `x-api-key`, with the one read the request needs beside the
//! merchant: a write's idempotency record (`kept_read`), or what a route asks for (the
//! one-session read: `super::sessions::authenticate_with_session`). It is one step of the
//! merchant API's gate (`super::gate`).

use axum::extract::Request;
use axum::http::Method;
use axum::response::{IntoResponse, Response};
use uuid::Uuid;

use super::context::RequestContext;
use crate::domain::key::key_hash;
use crate::error::{ApiError, ErrorCode};
use crate::state::AppState;
use crate::store::{Kept, Merchant, SessionRecord};

/// The header that carries the merchant's API key.
pub const API_KEY: &str = "x-api-key";

/// Authenticates the merchant, reading `read` in the same database read, and puts both in the
/// request's extensions; `401` (or the store's error) as the answer otherwise.
pub async fn authenticate_reading(state: &AppState, mut request: Request, read: Read) -> Result<Request, Response> {
    let key = request.headers().get(API_KEY).and_then(|v| v.to_str().ok());
    let (merchant, beside) = match authenticate(state, key, read).await {
        Ok(found) => found,
        Err(error) => return Err(error.into_response()),
    };
    request.extensions_mut().insert(merchant);
    match beside {
        Beside::Nothing => {}
        Beside::Session(session) => {
            request.extensions_mut().insert(*session);
        }
        Beside::Kept(kept) => {
            request.extensions_mut().insert(*kept);
        }
    }
    Ok(request)
}

/// What the request's one read fetches beside the merchant.
pub enum Read {
    Merchant,
    /// A `GET` of one session: the session.
    Session(Uuid),
    /// A write with an `x-request-id`: its idempotency record.
    Kept(Uuid),
}

/// What was read beside the merchant.
enum Beside {
    Nothing,
    Session(Box<SessionReadWithKey>),
    Kept(Box<KeptReadWithKey>),
}

/// The idempotency record of a write's `x-request-id`, read together with the merchant's key
/// (docs/DESIGN.md "Idempotency"): the idempotency middleware decides from it without a read
/// of its own.
#[derive(Clone, Debug)]
pub struct KeptReadWithKey {
    pub request_id: Uuid,
    pub kept: Option<Kept>,
}

/// The idempotency record of a write that carries an `x-request-id`; nothing more otherwise.
pub fn kept_read(request: &Request) -> Read {
    let mutating = !matches!(*request.method(), Method::GET | Method::HEAD | Method::OPTIONS);
    match request.extensions().get::<RequestContext>().and_then(|context| context.request_id) {
        Some(request_id) if mutating => Read::Kept(request_id),
        _ => Read::Merchant,
    }
}

/// The session a route names, read together with the merchant's key: the most frequent request
/// (`GET …/redirect-sessions/{id}`) then costs one database read (one transaction, or one round
/// trip) instead of two. The handler answers from it.
#[derive(Clone)]
pub struct SessionReadWithKey {
    pub id: Uuid,
    pub session: Option<SessionRecord>,
}

async fn authenticate(state: &AppState, key: Option<&str>, read: Read) -> Result<(Merchant, Beside), ApiError> {
    let unauthorized = || ApiError::new(ErrorCode::Unauthorized, "A valid x-api-key header is required.");
    let key = key.ok_or_else(unauthorized)?;
    if key.is_empty() || key.len() > 256 {
        return Err(unauthorized());
    }
    let hash = key_hash(key);
    let found = match read {
        Read::Merchant => state.store.merchant_by_key(hash).await.map(|merchant| (merchant, Beside::Nothing)),
        Read::Session(id) => state
            .store
            .merchant_and_session(hash, id)
            .await
            .map(|(merchant, session)| (merchant, Beside::Session(Box::new(SessionReadWithKey { id, session })))),
        Read::Kept(request_id) => state
            .store
            .merchant_and_kept(hash, request_id)
            .await
            .map(|(merchant, kept)| (merchant, Beside::Kept(Box::new(KeptReadWithKey { request_id, kept })))),
    };
    match found {
        Ok((Some(merchant), beside)) if !merchant.disabled => Ok((merchant, beside)),
        Ok(_) => Err(unauthorized()),
        Err(error) => Err(super::extract::store_error(error)),
    }
}
