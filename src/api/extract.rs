//! Reading the parts of a request that can be wrong — body, path ids, headers — into typed
//! values, or into the documented error.

use axum::body::{Body, Bytes};
use axum::extract::path::ErrorKind;
use axum::extract::rejection::PathRejection;
use axum::extract::{FromRequestParts, Path};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde_json::Value;
use uuid::Uuid;

use crate::domain::time::Timestamp;
use crate::domain::validate::{parse_uuid, Errors, FieldError};
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

/// The one path parameter of a route, percent-decoded, or `None` when it does not decode to
/// UTF-8 (`%FF%FE`). Used instead of axum's `Path`, whose rejection is a `text/plain` answer:
/// a parameter that is not UTF-8 is a malformed id like any other, reported by `path_id` as
/// `400 Validation` naming the parameter (and, on a PUT, together with the body's faults).
#[derive(Clone, Debug)]
pub struct RawPathParam(pub Option<String>);

impl<S: Send + Sync> FromRequestParts<S> for RawPathParam {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match Path::<String>::from_request_parts(parts, state).await {
            Ok(Path(raw)) => Ok(RawPathParam(Some(raw))),
            Err(PathRejection::FailedToDeserializePathParams(error))
                if matches!(error.kind(), ErrorKind::InvalidUtf8InPathParam { .. }) =>
            {
                Ok(RawPathParam(None))
            }
            // A route without exactly one parameter: a mistake in the router, not the request.
            Err(rejection) => Err(ApiError::internal(&format!("path parameter: {}", rejection.body_text()))),
        }
    }
}

/// A request extension a middleware left for the handler, moved out of the request rather than
/// cloned as axum's `Extension` does (a session read with the key carries its whole row).
#[derive(Debug)]
pub struct Taken<T>(pub Option<T>);

impl<S: Send + Sync, T: Send + Sync + 'static> FromRequestParts<S> for Taken<T> {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        Ok(Taken(parts.extensions.remove::<T>()))
    }
}

/// A path id that must be a UUID; `fieldName` is the path parameter's name.
pub fn path_id(raw: &RawPathParam, parameter: &str) -> Result<Uuid, ApiError> {
    let invalid = |message: String| ApiError::invalid_field(parameter, &message);
    let raw = raw.0.as_deref().ok_or_else(|| invalid("must be a UUID".to_owned()))?;
    parse_uuid(raw).map_err(invalid)
}

/// Joins a path id and a parsed body so that a bad id is reported together with every
/// failing body field; a body that could not be read at all (413, 415, not JSON) wins alone.
pub fn id_and_body<T>(
    id: Result<Uuid, ApiError>,
    body: Result<Result<T, Vec<FieldError>>, ApiError>,
) -> Result<(Uuid, T), ApiError> {
    match (id, body) {
        (Ok(id), Ok(Ok(value))) => Ok((id, value)),
        (id, body) => {
            let mut fields = id.err().map(|e| e.validation).unwrap_or_default();
            match body {
                Err(error) if fields.is_empty() => return Err(error),
                Err(error) => fields.extend(error.validation),
                Ok(Err(more)) => fields.extend(more),
                Ok(Ok(_)) => {}
            }
            Err(ApiError::validation(fields))
        }
    }
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

/// The default and the largest page size of every list.
pub const DEFAULT_LIMIT: usize = 20;
pub const MAX_LIMIT: usize = 100;

/// The paging part of a list query.
#[derive(Clone, Copy, Debug)]
pub struct Page {
    pub limit: usize,
    /// Only items older than this (created, id) position.
    pub after: Option<(Timestamp, Uuid)>,
}

/// Reads a list query: `limit` and `cursor` here, every other parameter through `other`,
/// which answers `false` for a name it does not know. Unknown and repeated parameters are
/// errors, as unknown body fields are.
pub fn parse_query(query: &str, errors: &mut Errors, mut other: impl FnMut(&str, &str, &mut Errors) -> bool) -> Page {
    let mut page = Page { limit: DEFAULT_LIMIT, after: None };
    let mut seen: Vec<String> = Vec::new();
    for (name, value) in url::form_urlencoded::parse(query.as_bytes()) {
        if seen.iter().any(|n| *n == name) {
            errors.add(&name, "must be given at most once");
            continue;
        }
        seen.push(name.to_string());
        match &*name {
            "limit" => match value.parse::<usize>() {
                Ok(limit) if (1..=MAX_LIMIT).contains(&limit) => page.limit = limit,
                _ => errors.add("limit", "must be a whole number from 1 to 100"),
            },
            "cursor" => match decode_cursor(&value) {
                Some(after) => page.after = Some(after),
                None => errors.add("cursor", "is not a cursor this service gave out"),
            },
            _ => {
                if !other(&name, &value, errors) {
                    errors.add(&name, "is not a known query parameter");
                }
            }
        }
    }
    page
}

/// The cursor that continues a list after the item (created, id).
pub fn encode_cursor(created_on: Timestamp, id: Uuid) -> String {
    URL_SAFE_NO_PAD.encode(format!("{}:{id}", created_on.millis()))
}

fn decode_cursor(text: &str) -> Option<(Timestamp, Uuid)> {
    let decoded = String::from_utf8(URL_SAFE_NO_PAD.decode(text).ok()?).ok()?;
    let (millis, id) = decoded.split_once(':')?;
    Some((Timestamp::from_millis(millis.parse().ok()?), parse_uuid(id).ok()?))
}

/// Cuts a `limit + 1` result to `limit` and answers the cursor of the next page, if any.
pub fn paginate<T>(items: &mut Vec<T>, limit: usize, key: impl Fn(&T) -> (Timestamp, Uuid)) -> Option<String> {
    if items.len() <= limit {
        return None;
    }
    items.truncate(limit);
    items.last().map(|last| {
        let (created_on, id) = key(last);
        encode_cursor(created_on, id)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cursor_round_trips() {
        let id = Uuid::now_v7();
        let cursor = encode_cursor(Timestamp::from_millis(42), id);
        assert_eq!(decode_cursor(&cursor), Some((Timestamp::from_millis(42), id)));
        assert_eq!(decode_cursor("garbage!"), None);
    }

    #[test]
    fn repeated_and_unknown_parameters_are_errors() {
        let mut errors = Errors::default();
        parse_query("limit=5&limit=6&x=1", &mut errors, |_, _, _| false);
        let names: Vec<_> = errors.finish(|| ()).unwrap_err().into_iter().map(|e| e.field_name).collect();
        assert_eq!(names, ["limit", "x"]);
    }
}
