//! The rate limits per client address and per API key (`crate::rate_limit::Limits`), each its
//! own middleware layer of the merchant API: the address before authentication (no database
//! read for a client over its rate), the key after it.

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::error::{ApiError, ErrorCode};
use crate::state::AppState;
use crate::store::Merchant;

/// `429 TooManyRequests` for a client address over its rate, before anything else is done.
pub async fn by_address(State(state): State<AppState>, request: Request, next: Next) -> Response {
    if let Some(ConnectInfo(peer)) = request.extensions().get::<ConnectInfo<SocketAddr>>() {
        if let Err(retry_after) = state.limits.check_address(peer.ip()) {
            return too_many(retry_after).into_response();
        }
    }
    next.run(request).await
}

/// `429 TooManyRequests` for a merchant over its rate (after `auth`, which names the merchant).
pub async fn by_key(State(state): State<AppState>, request: Request, next: Next) -> Response {
    if let Some(merchant) = request.extensions().get::<Merchant>() {
        if let Err(retry_after) = state.limits.check_key(merchant.id) {
            return too_many(retry_after).into_response();
        }
    }
    next.run(request).await
}

fn too_many(retry_after: u64) -> ApiError {
    ApiError::new(ErrorCode::TooManyRequests, "Too many requests; slow down.").with_retry_after(retry_after)
}
