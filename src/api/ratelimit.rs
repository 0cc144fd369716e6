//! Token-bucket rate limits per client address and per API key, each its own middleware layer
//! of the merchant API: the address before authentication (no database read for a client over
//! its rate), the key after it. They are per instance: with N instances behind a load balancer
//! a client may get up to N times the rate.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::Instant;

use axum::extract::{ConnectInfo, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use uuid::Uuid;

use crate::error::{ApiError, ErrorCode};
use crate::state::AppState;
use crate::store::Merchant;

/// Both limits. A rate of 0 turns a limit off.
pub struct Limits {
    per_key: Option<Buckets<Uuid>>,
    per_address: Option<Buckets<IpAddr>>,
}

impl Limits {
    /// Limits of `per_key` and `per_address` requests per second, each with a burst of twice
    /// that.
    pub fn new(per_key: u32, per_address: u32) -> Self {
        Limits {
            per_key: (per_key > 0).then(|| Buckets::new(per_key)),
            per_address: (per_address > 0).then(|| Buckets::new(per_address)),
        }
    }

    /// `Err(seconds to wait)` when the merchant is over its limit.
    pub fn check_key(&self, merchant: Uuid) -> Result<(), u64> {
        self.per_key.as_ref().map_or(Ok(()), |b| b.take(merchant))
    }

    /// `Err(seconds to wait)` when the address is over its limit.
    pub fn check_address(&self, address: IpAddr) -> Result<(), u64> {
        self.per_address.as_ref().map_or(Ok(()), |b| b.take(address))
    }
}

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

struct Buckets<K> {
    rate: f64,
    burst: f64,
    buckets: Mutex<HashMap<K, (f64, Instant)>>,
}

/// Buckets idle long enough to be full again are dropped once the map grows this big.
const PRUNE_AT: usize = 100_000;

impl<K: Hash + Eq + Copy> Buckets<K> {
    fn new(rate: u32) -> Self {
        let rate = f64::from(rate);
        Buckets { rate, burst: rate * 2.0, buckets: Mutex::new(HashMap::new()) }
    }

    fn take(&self, key: K) -> Result<(), u64> {
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if buckets.len() >= PRUNE_AT {
            let full_after = self.burst / self.rate;
            buckets.retain(|_, (_, at)| now.duration_since(*at).as_secs_f64() < full_after);
        }
        let (tokens, at) = buckets.entry(key).or_insert((self.burst, now));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * self.rate).min(self.burst);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            Err(((1.0 - *tokens) / self.rate).ceil().max(1.0) as u64)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_of_twice_the_rate_passes_and_the_next_request_waits() {
        let limits = Limits::new(5, 0);
        let merchant = Uuid::nil();
        for _ in 0..10 {
            assert_eq!(limits.check_key(merchant), Ok(()));
        }
        assert_eq!(limits.check_key(merchant), Err(1));
        assert_eq!(limits.check_key(Uuid::max()), Ok(()), "other keys have their own bucket");
    }

    #[test]
    fn a_rate_of_zero_turns_the_limit_off() {
        let limits = Limits::new(0, 0);
        for _ in 0..10_000 {
            assert_eq!(limits.check_key(Uuid::nil()), Ok(()));
            assert_eq!(limits.check_address(IpAddr::from([127, 0, 0, 1])), Ok(()));
        }
    }
}
