//! Event subscriptions (docs/WEBHOOKS.md): create (PUT), replace (PATCH), delete, read, list.

use axum::body::Body;
use axum::extract::{RawQuery, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Json, Router};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use super::extract::{id_and_body, if_match, json_body, paginate, parse_query, path_id, store_error, RawPathParam};
use super::BASE;
use crate::app::AppState;
use crate::domain::event::EventType;
use crate::domain::subscription::{parse_subscription, SubscriptionRules, SubscriptionSpec};
use crate::domain::time::Timestamp;
use crate::domain::validate::Errors;
use crate::error::{ApiError, ErrorBody, ErrorCode};
use crate::store::webhooks::{ChangeSubscriptionOutcome, PutSubscriptionOutcome, SubscriptionRecord};
use crate::store::Merchant;
use crate::webhooks::signature::generate_secret;

const PATH: &str = "/redirect-session-events/subscriptions";

/// The routes of this resource.
pub fn router() -> Router<AppState> {
    Router::new().route(&format!("{BASE}{PATH}"), get(list_subscriptions)).route(
        &format!("{BASE}{PATH}/{{eventSubscriptionId}}"),
        get(get_subscription).put(create_subscription).patch(update_subscription).delete(delete_subscription),
    )
}

/// A subscription as every answer shows it; `signingSecret` only in the `201` of a create.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Subscription {
    pub id: Uuid,
    pub callback_url: String,
    pub event_types: Vec<EventType>,
    #[schema(value_type = String, format = DateTime)]
    pub created_on: Timestamp,
    #[schema(value_type = String, format = DateTime)]
    pub last_modified_on: Timestamp,
    /// `whsec_` + base64 of 32 bytes: the key of the `webhook-signature` HMAC. Shown once.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signing_secret: Option<String>,
}

/// The body of PUT and PATCH (documentation only; read by `domain::subscription`).
#[derive(Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[allow(dead_code)]
pub struct SubscriptionBody {
    /// Absolute `https` URL, at most 2048 characters, no user-info.
    #[schema(format = "uri", example = "https://merchant.example/webhooks")]
    callback_url: String,
    /// 1 to 128 characters of letters, digits and `= + / - : _`; sent back as `x-api-key`.
    #[schema(example = "merchant-webhook-key", pattern = "^[A-Za-z0-9=+/:_-]{1,128}$")]
    api_key: String,
    /// Non-empty, no duplicates.
    #[schema(value_type = std::collections::BTreeSet<EventType>, min_items = 1)]
    event_types: Vec<EventType>,
}

/// One page of subscriptions, newest first.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SubscriptionPage {
    pub items: Vec<Subscription>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

impl Subscription {
    fn of(record: SubscriptionRecord, with_secret: bool) -> Self {
        Subscription {
            id: record.id,
            callback_url: record.spec.callback_url,
            event_types: record.spec.event_types.types(),
            created_on: record.created_on,
            last_modified_on: record.last_modified_on,
            signing_secret: with_secret.then_some(record.signing_secret),
        }
    }
}

fn respond(status: StatusCode, record: SubscriptionRecord, with_secret: bool) -> Response {
    let etag = format!("\"{}\"", record.version);
    let id = record.id;
    let mut response = (status, Json(Subscription::of(record, with_secret))).into_response();
    let headers = response.headers_mut();
    if let Ok(value) = HeaderValue::from_str(&etag) {
        headers.insert(header::ETAG, value);
    }
    if status == StatusCode::CREATED {
        if let Ok(value) = HeaderValue::from_str(&format!("{BASE}{PATH}/{id}")) {
            headers.insert(header::LOCATION, value);
        }
    }
    if with_secret {
        // Kept encrypted if stored for an idempotent replay.
        response.extensions_mut().insert(super::idempotency::ShowsSecret);
    }
    response
}

fn not_found() -> ApiError {
    ApiError::new(ErrorCode::SubscriptionNotFound, "No event subscription has this id.")
}

fn other_merchant() -> ApiError {
    ApiError::new(ErrorCode::InvalidTriggeredBy, "The subscription belongs to another merchant.")
}

fn version_mismatch() -> ApiError {
    ApiError::new(ErrorCode::EntityVersionMismatch, "The subscription exists in another version.")
}

/// The id and the body of a PUT or PATCH, with every failing field reported at once.
async fn id_and_spec(
    state: &AppState,
    raw_id: &RawPathParam,
    headers: &HeaderMap,
    body: Body,
) -> Result<(Uuid, SubscriptionSpec), ApiError> {
    let id = path_id(raw_id, "eventSubscriptionId");
    let body = json_body(headers, body).await;
    let rules = SubscriptionRules { allow_private_callbacks: state.config.allow_private_callbacks };
    id_and_body(id, body.map(|body| parse_subscription(&body, rules)))
}

fn changed(outcome: ChangeSubscriptionOutcome) -> Result<Response, ApiError> {
    match outcome {
        ChangeSubscriptionOutcome::Done(record) => Ok(respond(StatusCode::OK, record, false)),
        ChangeSubscriptionOutcome::NotFound => Err(not_found()),
        ChangeSubscriptionOutcome::OtherMerchant => Err(other_merchant()),
        ChangeSubscriptionOutcome::VersionMismatch => Err(version_mismatch()),
    }
}

/// Subscribe to redirect-session events.
#[utoipa::path(
    put, path = "/customer-authentication-service/v1/redirect-session-events/subscriptions/{eventSubscriptionId}",
    tag = "Event subscriptions",
    params(
        ("eventSubscriptionId" = Uuid, Path, description = "Chosen by the merchant."),
        ("x-api-key" = String, Header, description = "The merchant's API key."),
        ("x-request-id" = Option<Uuid>, Header, nullable = false, description = "Idempotency key; reuse it only to retry."),
        ("If-Match" = Option<String>, Header, nullable = false, description = "ETag the existing subscription must have."),
    ),
    request_body(content = SubscriptionBody, content_type = "application/json"),
    responses(
        (status = 201, description = "Created; the only answer that shows `signingSecret`.", body = Subscription),
        (status = 200, description = "The same request again: unchanged.", body = Subscription),
        (status = 400, description = "Validation", body = ErrorBody),
        (status = 401, description = "Unauthorized", body = ErrorBody),
        (status = 409, description = "EntityVersionMismatch, RequestInProgress", body = ErrorBody),
        (status = 422, description = "RequestIdReused", body = ErrorBody),
    )
)]
pub async fn create_subscription(
    State(state): State<AppState>,
    Extension(merchant): Extension<Merchant>,
    raw_id: RawPathParam,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let (id, spec) = id_and_spec(&state, &raw_id, &headers, body).await?;
    let if_match = if_match(&headers)?;
    if if_match.is_some() && state.store.get_subscription(id).await.map_err(store_error)?.is_none() {
        return Err(version_mismatch());
    }
    let now = Timestamp::now();
    let record = SubscriptionRecord {
        id,
        merchant_id: merchant.id,
        spec: spec.clone(),
        signing_secret: generate_secret().map_err(|e| ApiError::internal(&e))?,
        created_on: now,
        last_modified_on: now,
        version: 1,
    };
    match state.store.put_subscription(record).await.map_err(store_error)? {
        PutSubscriptionOutcome::Created(record) => Ok(respond(StatusCode::CREATED, record, true)),
        PutSubscriptionOutcome::Exists(existing) => {
            let etag = format!("\"{}\"", existing.version);
            let same_version = if_match.as_deref().is_none_or(|tag| crate::store::etag_matches(tag, &etag));
            if existing.merchant_id == merchant.id && existing.spec == spec && same_version {
                Ok(respond(StatusCode::OK, existing, false))
            } else {
                Err(version_mismatch())
            }
        }
    }
}

/// Replace a subscription's callback URL, API key and event types.
#[utoipa::path(
    patch, path = "/customer-authentication-service/v1/redirect-session-events/subscriptions/{eventSubscriptionId}",
    tag = "Event subscriptions",
    params(
        ("eventSubscriptionId" = Uuid, Path),
        ("x-api-key" = String, Header, description = "The merchant's API key."),
        ("x-request-id" = Option<Uuid>, Header, nullable = false, description = "Idempotency key; reuse it only to retry."),
        ("If-Match" = Option<String>, Header, nullable = false, description = "ETag the subscription must have."),
    ),
    request_body(content = SubscriptionBody, content_type = "application/json"),
    responses(
        (status = 200, description = "Replaced.", body = Subscription),
        (status = 400, description = "Validation", body = ErrorBody),
        (status = 401, description = "Unauthorized", body = ErrorBody),
        (status = 403, description = "InvalidTriggeredBy", body = ErrorBody),
        (status = 404, description = "SubscriptionNotFound", body = ErrorBody),
        (status = 409, description = "EntityVersionMismatch, RequestInProgress", body = ErrorBody),
        (status = 422, description = "RequestIdReused", body = ErrorBody),
    )
)]
pub async fn update_subscription(
    State(state): State<AppState>,
    Extension(merchant): Extension<Merchant>,
    raw_id: RawPathParam,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let (id, spec) = id_and_spec(&state, &raw_id, &headers, body).await?;
    let if_match = if_match(&headers)?;
    changed(
        state.store.patch_subscription(merchant.id, id, spec, if_match, Timestamp::now()).await.map_err(store_error)?,
    )
}

/// Unsubscribe: removes the subscription and cancels its queued deliveries.
#[utoipa::path(
    delete, path = "/customer-authentication-service/v1/redirect-session-events/subscriptions/{eventSubscriptionId}",
    tag = "Event subscriptions",
    params(
        ("eventSubscriptionId" = Uuid, Path),
        ("x-api-key" = String, Header, description = "The merchant's API key."),
        ("x-request-id" = Option<Uuid>, Header, nullable = false, description = "Idempotency key; reuse it only to retry."),
        ("If-Match" = Option<String>, Header, nullable = false, description = "ETag the subscription must have."),
    ),
    responses(
        (status = 200, description = "Removed; the removed subscription.", body = Subscription),
        (status = 400, description = "Validation", body = ErrorBody),
        (status = 401, description = "Unauthorized", body = ErrorBody),
        (status = 403, description = "InvalidTriggeredBy", body = ErrorBody),
        (status = 404, description = "SubscriptionNotFound", body = ErrorBody),
        (status = 409, description = "EntityVersionMismatch", body = ErrorBody),
        (status = 422, description = "RequestIdReused", body = ErrorBody),
    )
)]
pub async fn delete_subscription(
    State(state): State<AppState>,
    Extension(merchant): Extension<Merchant>,
    raw_id: RawPathParam,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let id = path_id(&raw_id, "eventSubscriptionId")?;
    let if_match = if_match(&headers)?;
    changed(state.store.delete_subscription(merchant.id, id, if_match, Timestamp::now()).await.map_err(store_error)?)
}

/// Read a subscription.
#[utoipa::path(
    get, path = "/customer-authentication-service/v1/redirect-session-events/subscriptions/{eventSubscriptionId}",
    tag = "Event subscriptions",
    params(("eventSubscriptionId" = Uuid, Path), ("x-api-key" = String, Header, description = "The merchant's API key.")),
    responses(
        (status = 200, description = "The subscription; `ETag` header.", body = Subscription),
        (status = 400, description = "Validation", body = ErrorBody),
        (status = 401, description = "Unauthorized", body = ErrorBody),
        (status = 403, description = "InvalidTriggeredBy", body = ErrorBody),
        (status = 404, description = "SubscriptionNotFound", body = ErrorBody),
    )
)]
pub async fn get_subscription(
    State(state): State<AppState>,
    Extension(merchant): Extension<Merchant>,
    raw_id: RawPathParam,
) -> Result<Response, ApiError> {
    let id = path_id(&raw_id, "eventSubscriptionId")?;
    match state.store.get_subscription(id).await.map_err(store_error)? {
        None => Err(not_found()),
        Some(record) if record.merchant_id != merchant.id => Err(other_merchant()),
        Some(record) => Ok(respond(StatusCode::OK, record, false)),
    }
}

/// List the merchant's subscriptions, newest first.
#[utoipa::path(
    get, path = "/customer-authentication-service/v1/redirect-session-events/subscriptions",
    tag = "Event subscriptions",
    params(
        ("x-api-key" = String, Header, description = "The merchant's API key."),
        ("limit" = Option<usize>, Query, minimum = 1, maximum = 100, description = "1 to 100; default 20."),
        ("cursor" = Option<String>, Query, description = "`nextCursor` of the previous page."),
    ),
    responses(
        (status = 200, description = "One page.", body = SubscriptionPage),
        (status = 400, description = "Validation", body = ErrorBody),
        (status = 401, description = "Unauthorized", body = ErrorBody),
    )
)]
pub async fn list_subscriptions(
    State(state): State<AppState>,
    Extension(merchant): Extension<Merchant>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let mut errors = Errors::default();
    let page = parse_query(query.as_deref().unwrap_or(""), &mut errors, |_, _, _| false);
    errors.finish(|| ()).map_err(ApiError::validation)?;
    let mut records = state.store.list_subscriptions(merchant.id, page.after, page.limit).await.map_err(store_error)?;
    let next_cursor = paginate(&mut records, page.limit, |r| (r.created_on, r.id));
    let items = records.into_iter().map(|r| Subscription::of(r, false)).collect();
    Ok(Json(SubscriptionPage { items, next_cursor }).into_response())
}
