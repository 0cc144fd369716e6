//! Operating a subscription (docs/WEBHOOKS.md "Operating a subscription"): rotate its signing
//! secret with an overlap, send it a test event, recover its failed deliveries by time window,
//! and resume it after a suspension.

use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::Extension;
use serde::Serialize;
use serde_json::Value;
use utoipa::ToSchema;
use uuid::Uuid;

use super::context::RequestContext;
use super::extract::{body_bytes, if_match, is_json, path_id, store_error, RawPathParam};
use super::idempotency::{error_answer, guarded_write, json_answer, Keep, Scope};
use super::subscriptions::{changed, not_found, other_merchant};
use crate::domain::event::EventKind;
use crate::domain::time::Timestamp;
use crate::domain::validate::{Errors, Object};
use crate::error::{ApiError, ErrorBody, ErrorCode};
use crate::state::AppState;
use crate::store::webhooks::{
    AttemptRecord, ChangeSubscriptionOutcome, ClaimedDelivery, RecoverOutcome, RecoverWindow, SecretRotation,
    SubscriptionChange, TestDelivery, RECOVER_AT_MOST, RECOVER_WINDOW_AT_MOST,
};
use crate::store::{Merchant, StoredResponse};
use crate::webhooks::dispatcher;
use crate::webhooks::signature::generate_secret;

/// The grace period of a rotation when the body names none: a day.
const DEFAULT_GRACE_SECONDS: u64 = 24 * 3600;
/// The longest grace period: a week.
const MAX_GRACE_SECONDS: u64 = 7 * 24 * 3600;

/// The body of a rotation (documentation only).
#[derive(ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[allow(dead_code)]
pub struct RotateSecretBody {
    /// How long the replaced secret keeps signing beside the new one: 0 to 604800 seconds
    /// (a week); default 86400 (a day). 0 stops it at once.
    #[schema(minimum = 0, maximum = 604800, default = 86400)]
    grace_period_seconds: Option<u64>,
}

/// The answer of a rotation: the new secret, shown this once.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RotatedSecret {
    /// `whsec_` + base64 of 32 bytes.
    pub signing_secret: String,
    /// Until then every delivery's `webhook-signature` carries `v1,<new> v1,<old>`.
    #[schema(value_type = String, format = DateTime)]
    pub previous_secret_expires_on: Timestamp,
}

/// The answer of a test send: what the receiver made of it.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TestResult {
    /// The receiver answered 2xx within the timeout.
    pub success: bool,
    /// The receiver's HTTP status, or null when it did not answer.
    pub status_code: Option<u16>,
    pub duration_ms: i64,
    /// Why the attempt failed, or null.
    pub error: Option<String>,
}

/// The body of a recovery (documentation only).
#[derive(ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[allow(dead_code)]
pub struct RecoverBody {
    /// RFC 3339; inclusive.
    #[schema(value_type = String, format = DateTime)]
    since: String,
    /// RFC 3339; exclusive; default now. At most 14 days after `since`.
    #[schema(value_type = Option<String>, format = DateTime)]
    until: Option<String>,
}

/// The answer of a recovery.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Recovered {
    /// Failed deliveries queued again (held instead while the subscription is suspended).
    pub queued: u64,
    /// More failed deliveries lie in the window than one recovery queues (100,000): send the
    /// same window again (with a new `x-request-id`) to queue the rest.
    pub more: bool,
}

/// An optional JSON body: `None` when empty (or whitespace) or `null`, `415` when not sent as
/// JSON, `400` when not JSON.
async fn optional_object(headers: &HeaderMap, body: Body) -> Result<Option<Value>, ApiError> {
    let bytes = body_bytes(body).await?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    if !is_json(headers) {
        return Err(ApiError::new(
            ErrorCode::UnsupportedMediaType,
            "A request body must be sent with Content-Type: application/json.",
        ));
    }
    match serde_json::from_slice(&bytes) {
        Ok(Value::Null) => Ok(None),
        Ok(value) => Ok(Some(value)),
        Err(error) => Err(ApiError::invalid_field("body", &format!("is not valid JSON ({error})"))),
    }
}

/// The grace period a rotation body asks for.
fn parse_grace(body: Option<&Value>) -> Result<Duration, ApiError> {
    let Some(body) = body else {
        return Ok(Duration::from_secs(DEFAULT_GRACE_SECONDS));
    };
    let mut errors = Errors::default();
    let seconds = Object::read(body, "", &["gracePeriodSeconds"], &mut errors).and_then(|object| {
        // A whole number, also when written with a zero fraction (`60.0`), as JSON Schema's
        // `integer` allows.
        let whole = |value: &Value| {
            value.as_u64().or_else(|| value.as_f64().filter(|f| f.fract() == 0.0 && *f >= 0.0).map(|f| f as u64))
        };
        object.optional_with("gracePeriodSeconds", &mut errors, |value| match whole(value) {
            Some(n) if n <= MAX_GRACE_SECONDS => Ok(n),
            _ => Err(format!("must be a whole number of seconds from 0 to {MAX_GRACE_SECONDS}")),
        })
    });
    errors.finish(|| Duration::from_secs(seconds.unwrap_or(DEFAULT_GRACE_SECONDS))).map_err(ApiError::validation)
}

/// The window a recovery body asks for, as of `now`.
fn parse_window(body: Option<&Value>, now: Timestamp) -> Result<RecoverWindow, ApiError> {
    let Some(body) = body else {
        return Err(ApiError::invalid_field("since", "is required"));
    };
    let mut errors = Errors::default();
    let instant = |value: &Value| match value.as_str().and_then(Timestamp::parse_rfc3339) {
        Some(at) => Ok(at),
        None => Err("must be an RFC 3339 date-time".to_owned()),
    };
    let (since, until) = match Object::read(body, "", &["since", "until"], &mut errors) {
        Some(object) => (
            object.required_with("since", &mut errors, instant),
            match object.has("until") {
                true => object.optional_with("until", &mut errors, instant),
                false => Some(now),
            },
        ),
        None => (None, None),
    };
    if let (Some(since), Some(until)) = (since, until) {
        if until <= since {
            errors.add("until", "must be after since");
        } else if until.since(since) > RECOVER_WINDOW_AT_MOST {
            errors.add("until", "must be at most 14 days after since");
        }
    }
    errors
        .finish(|| RecoverWindow { since: since.unwrap_or(now), until: until.unwrap_or(now), limit: RECOVER_AT_MOST })
        .map_err(ApiError::validation)
}

/// Rotate a subscription's signing secret, keeping the old one valid for a grace period.
#[utoipa::path(
    post, path = "/customer-authentication-service/v1/redirect-session-events/subscriptions/{eventSubscriptionId}/rotate-secret",
    tag = "Event subscriptions",
    params(
        ("eventSubscriptionId" = Uuid, Path),
        ("x-api-key" = String, Header, description = "The merchant's API key."),
        ("x-request-id" = Option<Uuid>, Header, nullable = false, description = "Idempotency key; reuse it only to retry."),
        ("If-Match" = Option<String>, Header, nullable = false, description = "ETag the subscription must have."),
    ),
    request_body(content = Option<RotateSecretBody>, content_type = "application/json"),
    responses(
        (status = 200, description = "Rotated; the only answer that shows the new secret. `ETag` of the subscription.", body = RotatedSecret),
        (status = 400, description = "Validation", body = ErrorBody),
        (status = 401, description = "Unauthorized", body = ErrorBody),
        (status = 403, description = "InvalidTriggeredBy", body = ErrorBody),
        (status = 404, description = "SubscriptionNotFound", body = ErrorBody),
        (status = 409, description = "EntityVersionMismatch, RequestInProgress", body = ErrorBody),
        (status = 422, description = "RequestIdReused", body = ErrorBody),
    )
)]
pub async fn rotate_secret(
    State(state): State<AppState>,
    Extension(merchant): Extension<Merchant>,
    Extension(context): Extension<RequestContext>,
    scope: Option<Extension<Scope>>,
    raw_id: RawPathParam,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let id = path_id(&raw_id, "eventSubscriptionId")?;
    let grace = parse_grace(optional_object(&headers, body).await?.as_ref())?;
    let change =
        SubscriptionChange { merchant_id: merchant.id, id, if_match: if_match(&headers)?, now: Timestamp::now() };
    let rotation = SecretRotation { secret: generate_secret().map_err(|e| ApiError::internal(&e))?, grace };
    let render = {
        let (state, correlation_id, now) = (state.clone(), context.correlation_id, change.now);
        let changed = changed(&state, correlation_id);
        move |outcome: &ChangeSubscriptionOutcome| match outcome {
            ChangeSubscriptionOutcome::Done(record) => {
                let rotated = RotatedSecret {
                    signing_secret: record.signing_secret.clone(),
                    previous_secret_expires_on: record.previous_secret.as_ref().map_or(now, |p| p.expires_on),
                };
                json_answer(StatusCode::OK, &rotated, Some(record.etag()), None)
            }
            other => changed(other),
        }
    };
    // The answer shows the new secret: kept encrypted.
    let write = |guard| state.store.rotate_subscription_secret_guarded(change, rotation, guard);
    guarded_write(&state, scope, Keep::Sealed, render, write, |_| {}).await
}

/// Send a signed test event to the subscription's receiver and answer how it went.
#[utoipa::path(
    post, path = "/customer-authentication-service/v1/redirect-session-events/subscriptions/{eventSubscriptionId}/test",
    tag = "Event subscriptions",
    params(
        ("eventSubscriptionId" = Uuid, Path),
        ("x-api-key" = String, Header, description = "The merchant's API key."),
        ("x-request-id" = Option<Uuid>, Header, nullable = false, description = "Idempotency key; reuse it only to retry."),
    ),
    responses(
        (status = 200, description = "Sent once (never retried); what the receiver answered. Recorded as a delivery of type `RedirectSessionTest`.", body = TestResult),
        (status = 400, description = "Validation", body = ErrorBody),
        (status = 401, description = "Unauthorized", body = ErrorBody),
        (status = 403, description = "InvalidTriggeredBy", body = ErrorBody),
        (status = 404, description = "SubscriptionNotFound", body = ErrorBody),
        (status = 409, description = "RequestInProgress", body = ErrorBody),
        (status = 422, description = "RequestIdReused", body = ErrorBody),
    )
)]
pub async fn send_test(
    State(state): State<AppState>,
    Extension(merchant): Extension<Merchant>,
    scope: Option<Extension<Scope>>,
    raw_id: RawPathParam,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let id = path_id(&raw_id, "eventSubscriptionId")?;
    super::extract::empty_body(&headers, body).await?;
    let subscription = match state.store.get_subscription(id).await.map_err(store_error)? {
        None => return Err(not_found()),
        Some(record) if record.merchant_id != merchant.id => return Err(other_merchant()),
        Some(record) => record,
    };
    let time = Timestamp::now();
    let data = serde_json::json!({ "subscriptionId": id }).to_string();
    let delivery = ClaimedDelivery {
        id: Uuid::now_v7(),
        event_id: Uuid::now_v7(),
        event_type: EventKind::RedirectSessionTest,
        event_time: time,
        data: data.clone(),
        callback_url: subscription.spec.callback_url.clone(),
        api_key: subscription.spec.api_key.clone(),
        previous_secret: subscription.previous_secret.as_ref().and_then(|p| p.signing_at(time)).map(str::to_owned),
        signing_secret: subscription.signing_secret.clone(),
        attempts: 0,
        retry_index: 0,
    };
    let (started, result) = dispatcher::send(&state.webhook_client, &delivery).await;
    let delivered = result.is_success();
    let attempt = AttemptRecord {
        attempt: 1,
        started_on: started,
        duration_ms: i64::try_from(result.duration.as_millis()).unwrap_or(i64::MAX),
        status: result.status,
        error: result.error.clone(),
    };
    let test = TestDelivery {
        merchant_id: merchant.id,
        subscription_id: id,
        event_id: delivery.event_id,
        time,
        data,
        attempt,
        delivered,
    };
    let render = move |attempt: &AttemptRecord| {
        let answer = TestResult {
            success: delivered,
            status_code: attempt.status,
            duration_ms: attempt.duration_ms,
            error: attempt.error.clone(),
        };
        json_answer(StatusCode::OK, &answer, None, None)
    };
    let write = |guard| state.store.record_test_delivery_guarded(test, guard);
    guarded_write(&state, scope, Keep::Clear, render, write, |_| {}).await
}

/// Queue again every failed delivery of the subscription whose event lies in a time window.
#[utoipa::path(
    post, path = "/customer-authentication-service/v1/redirect-session-events/subscriptions/{eventSubscriptionId}/recover",
    tag = "Event subscriptions",
    params(
        ("eventSubscriptionId" = Uuid, Path),
        ("x-api-key" = String, Header, description = "The merchant's API key."),
        ("x-request-id" = Option<Uuid>, Header, nullable = false, description = "Idempotency key; reuse it only to retry."),
    ),
    request_body(content = RecoverBody, content_type = "application/json"),
    responses(
        (status = 200, description = "How many were queued again, with a fresh retry schedule.", body = Recovered),
        (status = 400, description = "Validation", body = ErrorBody),
        (status = 401, description = "Unauthorized", body = ErrorBody),
        (status = 403, description = "InvalidTriggeredBy", body = ErrorBody),
        (status = 404, description = "SubscriptionNotFound", body = ErrorBody),
        (status = 409, description = "RequestInProgress", body = ErrorBody),
        (status = 422, description = "RequestIdReused", body = ErrorBody),
    )
)]
pub async fn recover(
    State(state): State<AppState>,
    Extension(merchant): Extension<Merchant>,
    Extension(context): Extension<RequestContext>,
    scope: Option<Extension<Scope>>,
    raw_id: RawPathParam,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let id = path_id(&raw_id, "eventSubscriptionId")?;
    let body = optional_object(&headers, body).await?;
    let now = Timestamp::now();
    let window = parse_window(body.as_ref(), now)?;
    let change = SubscriptionChange { merchant_id: merchant.id, id, if_match: None, now };
    let render = {
        let (state, correlation_id) = (state.clone(), context.correlation_id);
        move |outcome: &RecoverOutcome| -> StoredResponse {
            let error = match *outcome {
                RecoverOutcome::Queued { queued, more } => {
                    return json_answer(StatusCode::OK, &Recovered { queued, more }, None, None)
                }
                RecoverOutcome::NotFound => not_found(),
                RecoverOutcome::OtherMerchant => other_merchant(),
            };
            error_answer(&error, correlation_id, &state.public_url)
        }
    };
    let write = |guard| state.store.recover_deliveries_guarded(change, window, guard);
    guarded_write(&state, scope, Keep::Clear, render, write, |_| {}).await
}

/// Resume a suspended subscription: it is `Active` again and its held deliveries are sent.
#[utoipa::path(
    post, path = "/customer-authentication-service/v1/redirect-session-events/subscriptions/{eventSubscriptionId}/resume",
    tag = "Event subscriptions",
    params(
        ("eventSubscriptionId" = Uuid, Path),
        ("x-api-key" = String, Header, description = "The merchant's API key."),
        ("x-request-id" = Option<Uuid>, Header, nullable = false, description = "Idempotency key; reuse it only to retry."),
        ("If-Match" = Option<String>, Header, nullable = false, description = "ETag the subscription must have."),
    ),
    responses(
        (status = 200, description = "Active (an active subscription is answered as it is); `ETag` header.", body = super::subscriptions::Subscription),
        (status = 400, description = "Validation", body = ErrorBody),
        (status = 401, description = "Unauthorized", body = ErrorBody),
        (status = 403, description = "InvalidTriggeredBy", body = ErrorBody),
        (status = 404, description = "SubscriptionNotFound", body = ErrorBody),
        (status = 409, description = "EntityVersionMismatch, RequestInProgress", body = ErrorBody),
        (status = 422, description = "RequestIdReused", body = ErrorBody),
    )
)]
pub async fn resume(
    State(state): State<AppState>,
    Extension(merchant): Extension<Merchant>,
    Extension(context): Extension<RequestContext>,
    scope: Option<Extension<Scope>>,
    raw_id: RawPathParam,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let id = path_id(&raw_id, "eventSubscriptionId")?;
    super::extract::empty_body(&headers, body).await?;
    let change =
        SubscriptionChange { merchant_id: merchant.id, id, if_match: if_match(&headers)?, now: Timestamp::now() };
    let render = changed(&state, context.correlation_id);
    let write = |guard| state.store.resume_subscription_guarded(change, guard);
    guarded_write(&state, scope, Keep::Clear, render, write, |_| {}).await
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: Timestamp = Timestamp::from_millis(1_800_000_000_000);

    fn field_names(error: ApiError) -> Vec<String> {
        error.validation.iter().map(|e| e.field_name.clone()).collect()
    }

    #[test]
    fn a_rotation_without_a_body_overlaps_for_a_day_and_the_grace_period_is_bounded() {
        assert_eq!(parse_grace(None).unwrap(), Duration::from_secs(86_400));
        let grace = |body: Value| parse_grace(Some(&body));
        assert_eq!(grace(serde_json::json!({})).unwrap(), Duration::from_secs(86_400));
        assert_eq!(grace(serde_json::json!({"gracePeriodSeconds": 0})).unwrap(), Duration::ZERO);
        assert_eq!(grace(serde_json::json!({"gracePeriodSeconds": 604_800})).unwrap(), Duration::from_secs(604_800));
        let zero_fraction: Value = serde_json::from_str(r#"{"gracePeriodSeconds": 285.0}"#).unwrap();
        assert_eq!(grace(zero_fraction).unwrap(), Duration::from_secs(285), "an integer in JSON Schema's sense");
        for bad in [serde_json::json!(604_801), serde_json::json!(-1), serde_json::json!(1.5), serde_json::json!("60")]
        {
            let error = grace(serde_json::json!({ "gracePeriodSeconds": bad })).unwrap_err();
            assert_eq!(field_names(error), ["gracePeriodSeconds"], "{bad}");
        }
        assert_eq!(field_names(grace(serde_json::json!({"grace": 1})).unwrap_err()), ["grace"]);
    }

    #[test]
    fn a_recovery_window_runs_to_now_unless_told_and_spans_at_most_14_days() {
        let window = |body: Value| parse_window(Some(&body), NOW);
        let since = "2027-01-10T00:00:00Z";
        let open = window(serde_json::json!({ "since": since })).unwrap();
        assert_eq!((open.since, open.until, open.limit), (Timestamp::parse_rfc3339(since).unwrap(), NOW, 100_000));
        let closed = window(serde_json::json!({"since": since, "until": "2027-01-24T00:00:00Z"})).unwrap();
        assert_eq!(closed.until.since(closed.since), RECOVER_WINDOW_AT_MOST);
        let too_wide = window(serde_json::json!({"since": since, "until": "2027-01-24T00:00:00.001Z"}));
        assert_eq!(field_names(too_wide.unwrap_err()), ["until"]);
        let backwards = window(serde_json::json!({"since": since, "until": since}));
        assert_eq!(field_names(backwards.unwrap_err()), ["until"]);
        assert_eq!(field_names(window(serde_json::json!({"until": since})).unwrap_err()), ["since"]);
        assert_eq!(field_names(window(serde_json::json!({"since": "yesterday"})).unwrap_err()), ["since"]);
        assert_eq!(field_names(parse_window(None, NOW).unwrap_err()), ["since"]);
    }
}
