//! Webhook deliveries: list them with their attempts, and redeliver one.

use axum::body::Body;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::Serialize;
use utoipa::ToSchema;
use uuid::Uuid;

use super::context::RequestContext;
use super::extract::{empty_body, paginate, parse_query, path_id, store_error, RawPathParam};
use super::idempotency::{error_answer, guarded_write, json_answer, Keep, Scope};
use crate::domain::event::EventKind;
use crate::domain::time::Timestamp;
use crate::domain::validate::{parse_uuid, Errors};
use crate::error::{ApiError, ErrorBody, ErrorCode};
use crate::state::AppState;
use crate::store::webhooks::{AttemptRecord, DeliveryFilter, DeliveryRecord, DeliveryState, RedeliverOutcome};
use crate::store::Merchant;

/// One attempt to deliver.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Attempt {
    pub attempt: i64,
    #[schema(value_type = String, format = DateTime)]
    pub started_on: Timestamp,
    pub duration_ms: i64,
    /// The receiver's HTTP status, when it answered.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status_code: Option<u16>,
    /// Why the attempt failed, when it did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A delivery of one event to one subscription.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Delivery {
    pub id: Uuid,
    /// The event id: `webhook-id` and `x-request-id` of every attempt.
    pub event_id: Uuid,
    /// `RedirectSessionTest` for a test event (`POST …/subscriptions/{id}/test`).
    pub event_type: EventKind,
    /// The session the event is about; absent for a test event.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redirect_session_id: Option<Uuid>,
    pub subscription_id: Uuid,
    pub state: DeliveryState,
    /// When the next attempt is due (pending deliveries only).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub next_attempt_on: Option<Timestamp>,
    #[schema(value_type = String, format = DateTime)]
    pub created_on: Timestamp,
    #[schema(value_type = String, format = DateTime)]
    pub last_modified_on: Timestamp,
    pub attempts: Vec<Attempt>,
}

/// One page of deliveries, newest first.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeliveryPage {
    pub items: Vec<Delivery>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

impl From<DeliveryRecord> for Delivery {
    fn from(record: DeliveryRecord) -> Self {
        Delivery {
            id: record.id,
            event_id: record.event_id,
            event_type: record.event_type,
            redirect_session_id: record.session_id,
            subscription_id: record.subscription_id,
            state: record.state,
            next_attempt_on: record.next_attempt_on,
            created_on: record.created_on,
            last_modified_on: record.last_modified_on,
            attempts: record.attempts.into_iter().map(Attempt::from).collect(),
        }
    }
}

impl From<AttemptRecord> for Attempt {
    fn from(record: AttemptRecord) -> Self {
        Attempt {
            attempt: record.attempt,
            started_on: record.started_on,
            duration_ms: record.duration_ms,
            status_code: record.status,
            error: record.error,
        }
    }
}

/// List the merchant's webhook deliveries with their attempts, newest first.
#[utoipa::path(
    get, path = "/customer-authentication-service/v1/redirect-session-events/deliveries",
    tag = "Event subscriptions",
    params(
        ("x-api-key" = String, Header, description = "The merchant's API key."),
        ("subscriptionId" = Option<Uuid>, Query, description = "Only this subscription's deliveries."),
        ("state" = Option<DeliveryState>, Query, description = "Only deliveries in this state."),
        ("limit" = Option<usize>, Query, minimum = 1, maximum = 100, description = "1 to 100; default 20."),
        ("cursor" = Option<String>, Query, description = "`nextCursor` of the previous page."),
    ),
    responses(
        (status = 200, description = "One page.", body = DeliveryPage),
        (status = 400, description = "Validation", body = ErrorBody),
        (status = 401, description = "Unauthorized", body = ErrorBody),
    )
)]
pub async fn list_deliveries(
    State(state): State<AppState>,
    Extension(merchant): Extension<Merchant>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let mut errors = Errors::default();
    let mut filter = DeliveryFilter::default();
    let page = parse_query(query.as_deref().unwrap_or(""), &mut errors, |name, value, errors| {
        match name {
            "subscriptionId" => match parse_uuid(value) {
                Ok(id) => filter.subscription_id = Some(id),
                Err(message) => errors.add(name, message),
            },
            "state" => match DeliveryState::parse(value) {
                Some(delivery_state) => filter.state = Some(delivery_state),
                None => errors.add(name, "must be one of Pending, Delivered, Failed, Cancelled, Held"),
            },
            _ => return false,
        }
        true
    });
    errors.finish(|| ()).map_err(ApiError::validation)?;
    filter.limit = page.limit;
    filter.after = page.after;
    let mut records = state.store.list_deliveries(merchant.id, filter).await.map_err(store_error)?;
    let next_cursor = paginate(&mut records, page.limit, |r| (r.created_on, r.id));
    let items = records.into_iter().map(Delivery::from).collect();
    Ok(Json(DeliveryPage { items, next_cursor }).into_response())
}

/// Queue a failed (or delivered) delivery again, with a fresh retry schedule.
#[utoipa::path(
    post, path = "/customer-authentication-service/v1/redirect-session-events/deliveries/{deliveryId}/redeliver",
    tag = "Event subscriptions",
    params(
        ("deliveryId" = Uuid, Path),
        ("x-api-key" = String, Header, description = "The merchant's API key."),
        ("x-request-id" = Option<Uuid>, Header, nullable = false, description = "Idempotency key; reuse it only to retry."),
    ),
    responses(
        (status = 200, description = "Queued (or already queued).", body = Delivery),
        (status = 400, description = "Validation", body = ErrorBody),
        (status = 401, description = "Unauthorized", body = ErrorBody),
        (status = 403, description = "InvalidTriggeredBy", body = ErrorBody),
        (status = 404, description = "DeliveryNotFound", body = ErrorBody),
        (status = 409, description = "EntityVersionMismatch: the delivery was cancelled with its subscription", body = ErrorBody),
        (status = 422, description = "RequestIdReused", body = ErrorBody),
    )
)]
pub async fn redeliver(
    State(state): State<AppState>,
    Extension(merchant): Extension<Merchant>,
    Extension(context): Extension<RequestContext>,
    scope: Option<Extension<Scope>>,
    raw_id: RawPathParam,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let id = path_id(&raw_id, "deliveryId")?;
    empty_body(&headers, body).await?;
    let render = {
        let (state, correlation_id) = (state.clone(), context.correlation_id);
        move |outcome: &RedeliverOutcome| {
            let error = match outcome {
                RedeliverOutcome::Queued(record) => {
                    return json_answer(StatusCode::OK, &Delivery::from(record.clone()), None, None)
                }
                RedeliverOutcome::NotFound => ApiError::new(ErrorCode::DeliveryNotFound, "No delivery has this id."),
                RedeliverOutcome::OtherMerchant => {
                    ApiError::new(ErrorCode::InvalidTriggeredBy, "The delivery belongs to another merchant.")
                }
                RedeliverOutcome::Cancelled => ApiError::new(
                    ErrorCode::EntityVersionMismatch,
                    "The delivery was cancelled with its subscription and cannot be redelivered.",
                ),
            };
            error_answer(&error, correlation_id, &state.public_url)
        }
    };
    let write = |guard| state.store.redeliver_guarded(merchant.id, id, Timestamp::now(), guard);
    guarded_write(&state, scope, Keep::Clear, render, write, |_| {}).await
}
