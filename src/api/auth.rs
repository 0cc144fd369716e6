//! Merchant authentication by `x-api-key`, and the per-key and per-address rate limits.

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};

use crate::app::AppState;
use crate::error::{ApiError, ErrorCode};
use crate::store::Merchant;

/// The header that carries the merchant's API key.
pub const API_KEY: &str = "x-api-key";

/// The stored form of an API key. Keys are 32 random bytes, so a plain SHA-256 (rather than
/// a slow password hash) is enough: nobody can guess their way through 2^256 inputs.
pub fn key_hash(api_key: &str) -> [u8; 32] {
    Sha256::digest(api_key.as_bytes()).into()
}

/// Authenticates the merchant, applies the rate limits, and puts the `Merchant` in the
/// request's extensions.
pub async fn middleware(State(state): State<AppState>, mut request: Request, next: Next) -> Response {
    if let Some(ConnectInfo(peer)) = request.extensions().get::<ConnectInfo<SocketAddr>>() {
        if let Err(retry_after) = state.limits.check_address(peer.ip()) {
            return too_many(retry_after).into_response();
        }
    }
    let key = request.headers().get(API_KEY).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let merchant = match authenticate(&state, key).await {
        Ok(merchant) => merchant,
        Err(error) => return error.into_response(),
    };
    if let Err(retry_after) = state.limits.check_key(merchant.id) {
        return too_many(retry_after).into_response();
    }
    request.extensions_mut().insert(merchant);
    next.run(request).await
}

async fn authenticate(state: &AppState, key: Option<String>) -> Result<Merchant, ApiError> {
    let unauthorized = || ApiError::new(ErrorCode::Unauthorized, "A valid x-api-key header is required.");
    let key = key.ok_or_else(unauthorized)?;
    if key.is_empty() || key.len() > 256 {
        return Err(unauthorized());
    }
    match state.store.merchant_by_key(key_hash(&key)).await {
        Ok(Some(merchant)) if !merchant.disabled => Ok(merchant),
        Ok(_) => Err(unauthorized()),
        Err(error) => Err(super::extract::store_error(error)),
    }
}

fn too_many(retry_after: u64) -> ApiError {
    ApiError::new(ErrorCode::TooManyRequests, "Too many requests; slow down.").with_retry_after(retry_after)
}
