//! The merchant API's gate: what every merchant request passes before its handler, in this
//! order — the client address's rate limit, authentication by `x-api-key` (with the one read
//! the request needs beside the merchant), the merchant's rate limit, and `x-request-id`
//! idempotency.
//!
//! The steps run in one middleware layer rather than one layer each: every axum middleware
//! layer boxes its future and clones the services inside it on every request, and on the
//! merchant's hottest requests those four layers cost more than the rate limits themselves
//! (docs/BENCHMARKS.md "The merchant API's gate in one layer").

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;

use super::auth::{self, Read};
use super::{idempotency, ratelimit};
use crate::state::AppState;

/// The gate of every merchant route but the one-session route (which reads its session with
/// the key: `super::sessions::authenticate_with_session`).
pub async fn middleware(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let read = auth::kept_read(&request);
    pass(&state, request, next, read).await
}

/// Runs the gate's steps, authenticating with the read `read`, then the rest of the request;
/// the first step that refuses answers instead.
pub async fn pass(state: &AppState, request: Request, next: Next, read: Read) -> Response {
    if let Some(refused) = ratelimit::by_address(state, &request) {
        return refused;
    }
    let request = match auth::authenticate_reading(state, request, read).await {
        Ok(request) => request,
        Err(refused) => return refused,
    };
    if let Some(refused) = ratelimit::by_key(state, &request) {
        return refused;
    }
    idempotency::run(state, request, next).await
}
