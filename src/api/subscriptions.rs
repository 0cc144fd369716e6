//! Event subscriptions (docs/WEBHOOKS.md): create (PUT), replace (PATCH), delete, read, list.

use axum::body::Body;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use super::context::RequestContext;
use super::extract::{id_and_body, if_match, json_body, paginate, parse_query, path_id, store_error, RawPathParam};
use super::idempotency::{error_answer, guarded_write, json_answer, Keep, Scope};
use super::BASE;
use crate::domain::event::EventType;
use crate::domain::subscription::{parse_subscription, SubscriptionRules, SubscriptionSpec};
use crate::domain::time::Timestamp;
use crate::domain::validate::Errors;
use crate::error::{ApiError, ErrorBody, ErrorCode};
use crate::state::AppState;
use crate::store::webhooks::{
    ChangeSubscriptionOutcome, PutSubscriptionOutcome, SubscriptionChange, SubscriptionRecord, SubscriptionStatus,
    SuspendReason,
};
use crate::store::{Merchant, StoredResponse};
use crate::webhooks::signature::generate_secret;

const PATH: &str = "/redirect-session-events/subscriptions";

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
    /// `Suspended`: its receiver failed for too long or answered `410 Gone`; new deliveries
    /// are held until it is resumed (`POST …/resume` or a `PATCH`).
    pub state: SubscriptionState,
    /// When it was suspended (suspended subscriptions only).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub suspended_on: Option<Timestamp>,
    /// Why it was suspended (suspended subscriptions only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub suspended_reason: Option<SuspendReason>,
    /// `whsec_` + base64 of 32 bytes: the key of the `webhook-signature` HMAC. Shown once.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signing_secret: Option<String>,
}

/// Whether a subscription's deliveries are attempted.
#[derive(Clone, Copy, Serialize, ToSchema)]
pub enum SubscriptionState {
    Active,
    Suspended,
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
        let (state, suspended_on, suspended_reason) = match record.status {
            SubscriptionStatus::Active => (SubscriptionState::Active, None, None),
            SubscriptionStatus::Suspended { since, reason } => {
                (SubscriptionState::Suspended, Some(since), Some(reason))
            }
        };
        Subscription {
            id: record.id,
            callback_url: record.spec.callback_url,
            event_types: record.spec.event_types.types(),
            created_on: record.created_on,
            last_modified_on: record.last_modified_on,
            state,
            suspended_on,
            suspended_reason,
            signing_secret: with_secret.then_some(record.signing_secret),
        }
    }
}

/// The answer showing `record` (with its signing secret only when `with_secret`): its
/// representation, `ETag`, and for a new subscription its `Location`.
pub(super) fn subscription_answer(status: StatusCode, record: SubscriptionRecord, with_secret: bool) -> StoredResponse {
    let etag = record.etag();
    let location = (status == StatusCode::CREATED).then(|| format!("{BASE}{PATH}/{}", record.id));
    json_answer(status, &Subscription::of(record, with_secret), Some(etag), location)
}

pub(super) fn not_found() -> ApiError {
    ApiError::new(ErrorCode::SubscriptionNotFound, "No event subscription has this id.")
}

pub(super) fn other_merchant() -> ApiError {
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

/// Renders what a PATCH, DELETE or resume came to.
pub(super) fn changed(
    state: &AppState,
    correlation_id: Uuid,
) -> impl Fn(&ChangeSubscriptionOutcome) -> StoredResponse + Clone {
    let state = state.clone();
    move |outcome| {
        let error = match outcome {
            ChangeSubscriptionOutcome::Done(record) => {
                return subscription_answer(StatusCode::OK, record.clone(), false)
            }
            ChangeSubscriptionOutcome::NotFound => not_found(),
            ChangeSubscriptionOutcome::OtherMerchant => other_merchant(),
            ChangeSubscriptionOutcome::VersionMismatch => version_mismatch(),
        };
        error_answer(&error, correlation_id, &state.public_url)
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
    Extension(context): Extension<RequestContext>,
    scope: Option<Extension<Scope>>,
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
        previous_secret: None,
        status: SubscriptionStatus::Active,
    };
    let render = {
        let (state, merchant_id, correlation_id) = (state.clone(), merchant.id, context.correlation_id);
        move |outcome: &PutSubscriptionOutcome| match outcome {
            PutSubscriptionOutcome::Created(record) => subscription_answer(StatusCode::CREATED, record.clone(), true),
            PutSubscriptionOutcome::Exists(existing) => {
                let etag = existing.etag();
                let same_version = if_match.as_deref().is_none_or(|tag| crate::store::etag_matches(tag, &etag));
                if existing.merchant_id == merchant_id && existing.spec == spec && same_version {
                    subscription_answer(StatusCode::OK, existing.clone(), false)
                } else {
                    error_answer(&version_mismatch(), correlation_id, &state.public_url)
                }
            }
        }
    };
    // The new subscription's answer shows its signing secret: kept encrypted.
    let write = |guard| state.store.put_subscription_guarded(record, guard);
    guarded_write(&state, scope, Keep::Sealed, render, write, |_| {}).await
}

/// Replace a subscription's callback URL, API key and event types; resumes a suspended one.
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
    Extension(context): Extension<RequestContext>,
    scope: Option<Extension<Scope>>,
    raw_id: RawPathParam,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let (id, spec) = id_and_spec(&state, &raw_id, &headers, body).await?;
    let change =
        SubscriptionChange { merchant_id: merchant.id, id, if_match: if_match(&headers)?, now: Timestamp::now() };
    let render = changed(&state, context.correlation_id);
    let write = |guard| state.store.patch_subscription_guarded(change, spec, guard);
    guarded_write(&state, scope, Keep::Clear, render, write, |_| {}).await
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
    Extension(context): Extension<RequestContext>,
    scope: Option<Extension<Scope>>,
    raw_id: RawPathParam,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let id = path_id(&raw_id, "eventSubscriptionId")?;
    let change =
        SubscriptionChange { merchant_id: merchant.id, id, if_match: if_match(&headers)?, now: Timestamp::now() };
    let render = changed(&state, context.correlation_id);
    let write = |guard| state.store.delete_subscription_guarded(change, guard);
    guarded_write(&state, scope, Keep::Clear, render, write, |_| {}).await
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
        Some(record) => Ok(subscription_answer(StatusCode::OK, record, false).into_response()),
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
