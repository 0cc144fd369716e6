//! The HTTP API: the router, its middleware stack, and one module per resource.

pub mod auth;
pub mod catalogue;
pub mod context;
pub mod deliveries;
pub mod docs;
pub mod extract;
pub mod health;
pub mod idempotency;
pub mod ratelimit;
pub mod sessions;
pub mod subscription_operations;
pub mod subscriptions;

use axum::middleware::{from_fn, from_fn_with_state};
use axum::routing::get;
use axum::Router;

use crate::app::AppState;
use crate::error::{ApiError, ErrorCode};

/// The base path of the merchant API.
pub const BASE: &str = "/customer-authentication-service/v1";

/// The whole service: merchant API (rate-limited by address, authenticated, rate-limited by
/// key, idempotent, in that order) and public endpoints, wrapped
/// in the request-context middleware (correlation id, error bodies, panics, metrics).
pub fn router(state: AppState) -> Router {
    let merchant = sessions::router()
        .merge(subscriptions::router())
        .merge(subscription_operations::router())
        .merge(deliveries::router())
        .layer(from_fn_with_state(state.clone(), idempotency::middleware))
        .layer(from_fn_with_state(state.clone(), ratelimit::by_key))
        .layer(from_fn_with_state(state.clone(), auth::middleware))
        .layer(from_fn_with_state(state.clone(), ratelimit::by_address));
    let mut public = Router::new().merge(health::router()).merge(docs::router()).merge(crate::hosted::router());
    if state.config.metrics_listen.is_none() {
        public = public.route("/metrics", get(health::get_metrics));
    }
    with_common_layers(merchant.merge(public), state)
}

/// `routes` with what every route shares: `404`/`405` answers, panic handling, the
/// correlation id, error rendering and metrics.
pub fn with_common_layers(routes: Router<AppState>, state: AppState) -> Router {
    routes
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(from_fn(context::catch_panic))
        .layer(from_fn_with_state(state.clone(), context::middleware))
        .with_state(state)
}

/// `/metrics` alone, for a separate metrics listener.
pub fn metrics_router(state: AppState) -> Router {
    Router::new().route("/metrics", get(health::get_metrics)).with_state(state)
}

async fn not_found() -> ApiError {
    ApiError::new(ErrorCode::NotFound, "No such route.")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(ErrorCode::MethodNotAllowed, "This route does not take this method.")
}
