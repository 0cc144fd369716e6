//! The HTTP API: the router, its middleware stack, and one module per resource.

pub mod auth;
pub mod catalogue;
pub mod context;
pub mod deliveries;
pub mod docs;
pub mod extract;
pub mod gate;
pub mod health;
pub mod idempotency;
pub mod ratelimit;
pub mod sessions;
pub mod subscription_operations;
pub mod subscriptions;

use axum::middleware::from_fn_with_state;
use axum::routing::get;
use axum::Router;
use tower_http::catch_panic::CatchPanicLayer;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::error::{ApiError, ErrorCode};
use crate::state::AppState;

/// The base path of the merchant API.
pub const BASE: &str = "/customer-authentication-service/v1";

/// The merchant API: every route with its OpenAPI operation, declared once (by the handler's
/// `#[utoipa::path]`), so the router and the document cannot drift apart.
pub fn merchant_api() -> OpenApiRouter<AppState> {
    one_session_api().merge(other_merchant_api())
}

/// The one-session path, authenticated by its own layer (`sessions::authenticate_with_session`).
fn one_session_api() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(sessions::get_redirect_session, sessions::create_redirect_session))
}

fn other_merchant_api() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(sessions::list_redirect_sessions))
        .routes(routes!(sessions::cancel_redirect_session))
        .routes(routes!(subscriptions::list_subscriptions))
        .routes(routes!(
            subscriptions::get_subscription,
            subscriptions::create_subscription,
            subscriptions::update_subscription,
            subscriptions::delete_subscription
        ))
        .routes(routes!(subscription_operations::rotate_secret))
        .routes(routes!(subscription_operations::send_test))
        .routes(routes!(subscription_operations::recover))
        .routes(routes!(subscription_operations::resume))
        .routes(routes!(deliveries::list_deliveries))
        .routes(routes!(deliveries::redeliver))
}

/// The public operations in the document: health checks and the token keys (`/metrics` is
/// routed where `metrics_listen` says, and documented by `docs`).
pub fn public_api() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(health::get_live))
        .routes(routes!(health::get_ready))
        .routes(routes!(health::get_jwks))
}

/// The whole service: merchant API (behind its gate: rate-limited by address, authenticated,
/// rate-limited by key, idempotent, in that order) and public endpoints, wrapped
/// in the request-context middleware (correlation id, error bodies, panics, metrics).
pub fn router(state: AppState) -> Router {
    let (one_session, _) = one_session_api().split_for_parts();
    let (others, _) = other_merchant_api().split_for_parts();
    let merchant = one_session
        .layer(from_fn_with_state(state.clone(), sessions::authenticate_with_session))
        .merge(others.layer(from_fn_with_state(state.clone(), gate::middleware)));
    let (public, _) = public_api().split_for_parts();
    let mut public = public.merge(docs::router()).merge(crate::hosted::router());
    if state.config.metrics_listen.is_none() {
        public = public.route("/metrics", get(health::get_metrics));
    }
    with_common_layers(merchant.merge(public), state)
}

/// `routes` with what every route shares: `404`/`405` answers, panic handling (tower-http's
/// `CatchPanicLayer`, inside the context middleware that renders its `500`), the correlation id,
/// error rendering and metrics.
pub fn with_common_layers(routes: Router<AppState>, state: AppState) -> Router {
    routes
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(CatchPanicLayer::custom(context::panic_response))
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
