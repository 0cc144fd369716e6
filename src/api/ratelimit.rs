//! The rate limits per client address and per API key (`crate::rate_limit::Limits`), two steps
//! of the merchant API's gate (`super::gate`): the address before authentication (no database
//! read for a client over its rate), the key after it.

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, Request};
use axum::response::{IntoResponse, Response};

use crate::error::{ApiError, ErrorCode};
use crate::state::AppState;
use crate::store::Merchant;

/// `429 TooManyRequests` for a client address over its rate, before anything else is done;
/// `None` lets the request on.
pub fn by_address(state: &AppState, request: &Request) -> Option<Response> {
    let ConnectInfo(peer) = request.extensions().get::<ConnectInfo<SocketAddr>>()?;
    state.limits.check_address(peer.ip()).err().map(too_many)
}

/// `429 TooManyRequests` for a merchant over its rate (after authentication, which names the
/// merchant); `None` lets the request on.
pub fn by_key(state: &AppState, request: &Request) -> Option<Response> {
    let merchant = request.extensions().get::<Merchant>()?;
    state.limits.check_key(merchant.id).err().map(too_many)
}

fn too_many(retry_after: u64) -> Response {
    ApiError::new(ErrorCode::TooManyRequests, "Too many requests; slow down.")
        .with_retry_after(retry_after)
        .into_response()
}
