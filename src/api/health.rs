//! Health checks, the token signing keys (JWKS) and Prometheus metrics.

use std::time::Duration;

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;

use crate::domain::time::Timestamp;
use crate::error::{ApiError, ErrorBody};
use crate::metrics::DeliveryBacklog;
use crate::state::AppState;

/// A health answer.
#[derive(Serialize, ToSchema)]
pub struct Health {
    /// `ok`.
    pub status: &'static str,
}

/// The process is up.
#[utoipa::path(get, path = "/health/live", tag = "Operations",
    responses((status = 200, description = "Alive.", body = Health)))]
pub async fn get_live() -> Json<Health> {
    Json(Health { status: "ok" })
}

/// The database is reachable and migrated.
#[utoipa::path(get, path = "/health/ready", tag = "Operations",
    responses(
        (status = 200, description = "Ready.", body = Health),
        (status = 503, description = "ServiceUnavailable", body = ErrorBody),
    ))]
pub async fn get_ready(State(state): State<AppState>) -> Result<Json<Health>, ApiError> {
    match state.store.ready().await {
        Ok(()) => Ok(Json(Health { status: "ok" })),
        Err(error) => {
            tracing::warn!(%error, "not ready");
            Err(ApiError::unavailable("The database is not reachable or not migrated."))
        }
    }
}

/// The public keys that verify session tokens: the current key and the previous ones.
#[utoipa::path(get, path = "/.well-known/jwks.json", tag = "Tokens",
    responses((status = 200, description = "A JSON Web Key Set (RFC 7517) of Ed25519 keys.", body = Object)))]
pub async fn get_jwks(State(state): State<AppState>) -> Response {
    let jwks = state.keyring().jwks();
    ([(header::CACHE_CONTROL, "public, max-age=300")], Json(jwks)).into_response()
}

/// Prometheus metrics.
#[utoipa::path(get, path = "/metrics", tag = "Operations",
    responses((status = 200, description = "Prometheus text format 0.0.4.", content_type = "text/plain")))]
pub async fn get_metrics(State(state): State<AppState>) -> Response {
    // The backlog is one read of the database; while the database cannot be read, the gauges
    // are left out of the scrape (absent, not zero) and the rest is answered.
    let now = Timestamp::now();
    let backlog = match state.store.delivery_backlog(now).await {
        Ok(backlog) => Some(DeliveryBacklog {
            pending: backlog.pending,
            oldest_due: backlog.oldest_due.map_or(Duration::ZERO, |due| now.since(due)),
            held: backlog.held,
        }),
        Err(error) => {
            tracing::warn!(%error, "could not read the delivery backlog for /metrics");
            None
        }
    };
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        state.metrics.render(Some(state.store.stats()), backlog),
    )
        .into_response()
}
