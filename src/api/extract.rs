//! Reading the parts of a request that can be wrong — body, path ids, headers — into typed
//! values, or into the documented error.

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderMap};
use serde_json::Value;
use uuid::Uuid;

use crate::domain::validate::parse_uuid;
use crate::error::{ApiError, ErrorCode};
use crate::store::StoreError;

/// The largest request body accepted: 64 KiB.
pub const MAX_BODY: usize = 64 * 1024;

/// A storage failure as an answer: `503` (with `Retry-After`) when the database is
/// unavailable, else `500`.
pub fn store_error(error: StoreError) -> ApiError {
    match error {
        StoreError::Unavailable(why) => {
            tracing::warn!(%why, "database unavailable");
            ApiError::unavailable("The service is temporarily unavailable; retry shortly.")
        }
        StoreError::Internal(_) => ApiError::internal(&error),
    }
}

/// A path id that must be a UUID; `fieldName` is the path parameter's name.
pub fn path_id(raw: &str, parameter: &str) -> Result<Uuid, ApiError> {
    parse_uuid(raw).map_err(|message| ApiError::invalid_field(parameter, &message))
}

/// Reads the whole body, answering `413 PayloadTooLarge` past `MAX_BODY`.
pub async fn body_bytes(body: Body) -> Result<Bytes, ApiError> {
    axum::body::to_bytes(body, MAX_BODY)
        .await
        .map_err(|_| ApiError::new(ErrorCode::PayloadTooLarge, "The request body is larger than 64 KiB."))
}

/// Whether the request declares a JSON body (`application/json`, any parameters).
pub fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|media| media.trim().eq_ignore_ascii_case("application/json"))
}

/// A JSON body: `415` without a JSON content type, `413` when too large, `400` when not JSON.
pub async fn json_body(headers: &HeaderMap, body: Body) -> Result<Value, ApiError> {
    if !is_json(headers) {
        return Err(ApiError::new(
            ErrorCode::UnsupportedMediaType,
            "The request body must be sent with Content-Type: application/json.",
        ));
    }
    let bytes = body_bytes(body).await?;
    serde_json::from_slice(&bytes)
        .map_err(|error| ApiError::invalid_field("body", &format!("is not valid JSON ({error})")))
}

/// A body that must be empty (or `{}`), for actions such as cancel.
pub async fn empty_body(headers: &HeaderMap, body: Body) -> Result<(), ApiError> {
    let bytes = body_bytes(body).await?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(());
    }
    if !is_json(headers) {
        return Err(ApiError::new(
            ErrorCode::UnsupportedMediaType,
            "A request body must be sent with Content-Type: application/json.",
        ));
    }
    match serde_json::from_slice::<Value>(&bytes) {
        Ok(Value::Object(map)) if map.is_empty() => Ok(()),
        _ => Err(ApiError::invalid_field("body", "must be empty")),
    }
}

/// The `If-Match` header, when sent.
pub fn if_match(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    match headers.get(header::IF_MATCH) {
        None => Ok(None),
        Some(value) => value
            .to_str()
            .map(|v| Some(v.to_owned()))
            .map_err(|_| ApiError::invalid_field("If-Match", "must be an entity tag such as \"3\"")),
    }
}
