//! Redirect sessions: create (PUT), read, list, cancel — the handlers, their request and
//! response types, and their routes.

use axum::body::Body;
use axum::extract::{RawQuery, Request, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::Serialize;
use utoipa::ToSchema;
use uuid::Uuid;

use super::auth::{Read, SessionReadWithKey};
use super::context::RequestContext;
use super::extract::{
    empty_body, id_and_body, if_match, json_body, paginate, parse_query, path_id, store_error, RawPathParam, Taken,
};
use super::idempotency::{error_answer, guarded_write, json_answer, Keep, Scope};
use super::{gate, BASE};
use crate::domain::request::{
    parse_create_session, CustomerData, RedirectData, RequestRules, SessionType, TransactionData,
};
use crate::domain::session::State as SessionState;
use crate::domain::time::Timestamp;
use crate::domain::token::Claims;
use crate::domain::validate::{parse_uuid, Errors};
use crate::error::{ApiError, ErrorBody, ErrorCode};
use crate::state::AppState;
use crate::store::{
    CancelOutcome, CancelRequest, CreateOutcome, Merchant, SessionFilter, SessionRecord, StoredResponse,
};

/// A redirect session, as create, read, cancel and list answer it.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RedirectSession {
    pub id: Uuid,
    #[serde(rename = "type")]
    pub kind: SessionType,
    pub state: SessionState,
    pub merchant_id: Uuid,
    /// The customer: the one named at create, or the one linked when the customer authenticated
    /// on the hosted page (an existing customer with that phone, or one registered then).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub customer_id: Option<Uuid>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub customer_data: Option<CustomerData>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub transaction_data: Option<TransactionData>,
    /// The transaction intent: the one named at create (`ExistingTransactionIntent`), or the one
    /// the session created when the customer confirmed (`NewTransactionIntent`, `Completed`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub transaction_intent_id: Option<Uuid>,
    pub redirect_data: RedirectData,
    /// `ll` or `ll-RR`; `de-DE` unless English or German was asked for.
    pub locale: String,
    /// The signed token (EdDSA JWT) the customer's browser carries to the hosted page.
    pub token: String,
    /// The hosted page: `<public-url>/pay`.
    pub redirect_url: String,
    #[schema(value_type = String, format = DateTime)]
    pub expires_on: Timestamp,
    #[schema(value_type = String, format = DateTime)]
    pub created_on: Timestamp,
    #[schema(value_type = String, format = DateTime)]
    pub last_modified_on: Timestamp,
    pub last_correlation_id: Uuid,
}

impl RedirectSession {
    /// The representation of `session` at `now`.
    pub fn of(session: SessionRecord, now: Timestamp, public_url: &str) -> Self {
        let state = session.effective_state(now);
        // Expired by the clock but not yet swept: it changed at `expiresOn` (as the sweep will
        // record it), so the representation is the same before and after the sweep.
        let last_modified_on = if state != session.state { session.expires_on } else { session.last_modified_on };
        let spec = session.spec;
        RedirectSession {
            id: session.id,
            kind: spec.kind,
            state,
            merchant_id: session.merchant_id,
            customer_id: session.customer_id,
            customer_data: spec.customer_data,
            transaction_data: spec.transaction_data,
            transaction_intent_id: session.transaction_intent_id,
            redirect_data: spec.redirect_data,
            locale: spec.locale,
            token: session.token,
            redirect_url: format!("{public_url}/pay"),
            expires_on: session.expires_on,
            created_on: session.created_on,
            last_modified_on,
            last_correlation_id: session.last_correlation_id,
        }
    }
}

/// The create-session body: one of three shapes chosen by `type` (documentation only; the
/// body is read by `domain::request::parse_create_session`, which reports every failing field).
#[derive(ToSchema)]
#[serde(tag = "type", rename_all_fields = "camelCase")]
#[allow(dead_code)]
pub enum CreateRedirectSession {
    /// Send the customer to create a QR code (cash) or pay from the wallet.
    // utoipa 5 ignores `rename_all_fields`; each variant names its fields as the body does.
    #[serde(rename_all = "camelCase")]
    NewTransactionIntent {
        customer_id: Option<Uuid>,
        customer_data: Option<CustomerData>,
        transaction_data: TransactionData,
        redirect_data: RedirectData,
        locale: Option<String>,
    },
    /// Send the customer to view or cancel an existing QR code.
    #[serde(rename_all = "camelCase")]
    ExistingTransactionIntent {
        transaction_intent_id: Uuid,
        customer_id: Option<Uuid>,
        redirect_data: RedirectData,
        locale: Option<String>,
    },
    /// Send the customer to register.
    #[serde(rename_all = "camelCase")]
    NewCustomer { customer_data: Option<CustomerData>, redirect_data: RedirectData, locale: Option<String> },
}

/// One page of sessions, newest first.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RedirectSessionPage {
    pub items: Vec<RedirectSession>,
    /// Pass as `cursor` to get the next page; absent on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

/// The answer showing `session` at `now`: its representation, `ETag`, and for a new session
/// its `Location`.
fn session_answer(status: StatusCode, session: SessionRecord, now: Timestamp, public_url: &str) -> StoredResponse {
    let etag = session.etag(now);
    let location = (status == StatusCode::CREATED).then(|| format!("{BASE}/redirect-sessions/{}", session.id));
    json_answer(status, &RedirectSession::of(session, now, public_url), Some(etag), location)
}

/// `session_answer` kept as a reference to the session (`StoredResponse::session`): a `201`
/// shows the session as created, a `200` the session as it stands, which must be terminal.
fn referring_answer(status: StatusCode, session: SessionRecord, now: Timestamp, public_url: &str) -> StoredResponse {
    let id = session.id;
    StoredResponse { session: Some(id), ..session_answer(status, session, now, public_url) }
}

/// The answer a kept reference stands for, rebuilt from the session's row: the same bytes
/// `referring_answer` sent (`request_id`: the create's `x-request-id`, its correlation id).
/// The redirect URL is the one the session was created under (its token's issuer), even if
/// the service has moved to another public URL since.
pub fn rebuilt_answer(status: u16, session: SessionRecord, request_id: Uuid, public_url: &str) -> StoredResponse {
    let issuer = crate::domain::token::issuer_unchecked(&session.token);
    let public_url = issuer.as_deref().unwrap_or(public_url);
    if status == StatusCode::CREATED.as_u16() {
        let created_on = session.created_on;
        return session_answer(StatusCode::CREATED, session.as_created(request_id), created_on, public_url);
    }
    let now = session.last_modified_on;
    session_answer(StatusCode::from_u16(status).unwrap_or(StatusCode::OK), session, now, public_url)
}

fn version_mismatch() -> ApiError {
    ApiError::new(ErrorCode::EntityVersionMismatch, "The redirect session exists in another version.")
}

/// Create a redirect session.
#[utoipa::path(
    put,
    path = "/customer-authentication-service/v1/redirect-sessions/{redirectSessionId}",
    tag = "Redirect sessions",
    params(
        ("redirectSessionId" = Uuid, Path, description = "Chosen by the merchant."),
        ("x-api-key" = String, Header, description = "The merchant's API key."),
        ("x-request-id" = Option<Uuid>, Header, nullable = false, description = "Idempotency key; reuse it only to retry."),
        ("If-Match" = Option<String>, Header, nullable = false, description = "ETag the existing session must have."),
    ),
    request_body(content = CreateRedirectSession, content_type = "application/json"),
    responses(
        (status = 201, description = "Created.", body = RedirectSession),
        (status = 200, description = "The same request again: the current session, unchanged.", body = RedirectSession),
        (status = 400, description = "Validation", body = ErrorBody),
        (status = 401, description = "Unauthorized", body = ErrorBody),
        (status = 404, description = "CustomerNotFound", body = ErrorBody),
        (status = 409, description = "EntityVersionMismatch, RequestInProgress", body = ErrorBody),
        (status = 413, description = "PayloadTooLarge", body = ErrorBody),
        (status = 415, description = "UnsupportedMediaType", body = ErrorBody),
        (status = 422, description = "RequestIdReused", body = ErrorBody),
    )
)]
pub async fn create_redirect_session(
    State(state): State<AppState>,
    Extension(merchant): Extension<Merchant>,
    Extension(context): Extension<RequestContext>,
    scope: Option<Extension<Scope>>,
    raw_id: RawPathParam,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let id = path_id(&raw_id, "redirectSessionId");
    let body = json_body(&headers, body).await;
    let now = Timestamp::now();
    let rules = RequestRules { allow_http_redirect_urls: state.config.allow_http_redirect_urls };
    let (id, spec) = id_and_body(id, body.map(|body| parse_create_session(&body, rules, now)))?;
    let if_match = if_match(&headers)?;
    if if_match.is_some() && state.store.get_session(id).await.map_err(store_error)?.is_none() {
        return Err(version_mismatch());
    }

    let expires_on = now.plus(state.config.session_ttl);
    let claims = Claims::for_session(&state.public_url, id, merchant.id, spec.customer_id, now, expires_on);
    let session = SessionRecord {
        id,
        merchant_id: merchant.id,
        token: state.keyring().sign(&claims),
        customer_id: spec.customer_id,
        transaction_intent_id: spec.transaction_intent_id,
        spec,
        state: SessionState::Created,
        expires_on,
        created_on: now,
        last_modified_on: now,
        last_correlation_id: context.correlation_id,
        version: 1,
    };
    let render = {
        let (state, spec, merchant_id, correlation_id) =
            (state.clone(), session.spec.clone(), merchant.id, context.correlation_id);
        move |outcome: &CreateOutcome| {
            let public_url = &state.public_url;
            match outcome {
                CreateOutcome::Created(session) => {
                    referring_answer(StatusCode::CREATED, session.clone(), now, public_url)
                }
                CreateOutcome::Exists(existing) => {
                    let same_version = if_match.as_deref().is_none_or(|tag| existing.matches(tag, now));
                    if existing.merchant_id == merchant_id && existing.spec == spec && same_version {
                        session_answer(StatusCode::OK, existing.clone(), now, public_url)
                    } else {
                        error_answer(&version_mismatch(), correlation_id, public_url)
                    }
                }
                CreateOutcome::CustomerNotFound => error_answer(
                    &ApiError::new(ErrorCode::CustomerNotFound, "The customerId is not a known customer."),
                    correlation_id,
                    public_url,
                ),
            }
        }
    };
    let write = |guard| state.store.create_session_guarded(session, guard);
    guarded_write(&state, scope, Keep::Clear, render, write, |outcome| {
        if let CreateOutcome::Created(_) = outcome {
            state.metrics.session_created();
        }
    })
    .await
}

/// Read a redirect session.
#[utoipa::path(
    get,
    path = "/customer-authentication-service/v1/redirect-sessions/{redirectSessionId}",
    tag = "Redirect sessions",
    params(
        ("redirectSessionId" = Uuid, Path),
        ("x-api-key" = String, Header, description = "The merchant's API key."),
    ),
    responses(
        (status = 200, description = "The session; `ETag` header.", body = RedirectSession),
        (status = 400, description = "Validation", body = ErrorBody),
        (status = 401, description = "Unauthorized", body = ErrorBody),
        (status = 403, description = "InvalidTriggeredBy: another merchant's session", body = ErrorBody),
        (status = 404, description = "RedirectSessionNotFound", body = ErrorBody),
    )
)]
pub async fn get_redirect_session(
    State(state): State<AppState>,
    Extension(merchant): Extension<Merchant>,
    read: Taken<SessionReadWithKey>,
    raw_id: RawPathParam,
) -> Result<Response, ApiError> {
    let id = path_id(&raw_id, "redirectSessionId")?;
    let now = Timestamp::now();
    let session = match read {
        Taken(Some(read)) if read.id == id => read.session,
        _ => state.store.get_session(id).await.map_err(store_error)?,
    };
    match session {
        None => Err(not_found()),
        Some(session) if session.merchant_id != merchant.id => Err(other_merchant()),
        Some(session) => Ok(session_answer(StatusCode::OK, session, now, &state.public_url).into_response()),
    }
}

/// The gate of the one-session route (`super::gate`, as a layer of this route only): a `GET`
/// reads the session together with the merchant's key, so the read costs one database read; a
/// `PUT` reads what every write reads.
pub async fn authenticate_with_session(
    State(state): State<AppState>,
    raw_id: RawPathParam,
    request: Request,
    next: Next,
) -> Response {
    match raw_id.0.as_deref().and_then(|raw| parse_uuid(raw).ok()) {
        Some(id) if request.method() == Method::GET => gate::pass(&state, request, next, Read::Session(id)).await,
        _ => gate::middleware(State(state), request, next).await,
    }
}

fn not_found() -> ApiError {
    ApiError::new(ErrorCode::RedirectSessionNotFound, "No redirect session has this id.")
}

fn other_merchant() -> ApiError {
    ApiError::new(ErrorCode::InvalidTriggeredBy, "The redirect session belongs to another merchant.")
}

/// Cancel a redirect session.
#[utoipa::path(
    post,
    path = "/customer-authentication-service/v1/redirect-sessions/{redirectSessionId}/cancel",
    tag = "Redirect sessions",
    params(
        ("redirectSessionId" = Uuid, Path),
        ("x-api-key" = String, Header, description = "The merchant's API key."),
        ("x-request-id" = Option<Uuid>, Header, nullable = false, description = "Idempotency key; reuse it only to retry."),
        ("If-Match" = Option<String>, Header, nullable = false, description = "ETag the session must have."),
    ),
    responses(
        (status = 200, description = "Cancelled (now or before).", body = RedirectSession),
        (status = 400, description = "Validation, InvalidRedirectSessionStateTransition, InvalidTriggeredBy", body = ErrorBody),
        (status = 401, description = "Unauthorized", body = ErrorBody),
        (status = 404, description = "RedirectSessionNotFound", body = ErrorBody),
        (status = 409, description = "EntityVersionMismatch, RequestInProgress", body = ErrorBody),
        (status = 422, description = "RequestIdReused", body = ErrorBody),
    )
)]
pub async fn cancel_redirect_session(
    State(state): State<AppState>,
    Extension(merchant): Extension<Merchant>,
    Extension(context): Extension<RequestContext>,
    scope: Option<Extension<Scope>>,
    raw_id: RawPathParam,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let id = path_id(&raw_id, "redirectSessionId")?;
    empty_body(&headers, body).await?;
    let now = Timestamp::now();
    let request = CancelRequest {
        merchant_id: merchant.id,
        session_id: id,
        if_match: if_match(&headers)?,
        correlation_id: context.correlation_id,
        now,
    };
    let render = {
        let (state, correlation_id) = (state.clone(), context.correlation_id);
        move |outcome: &CancelOutcome| {
            let error = match outcome {
                // Cancelled is terminal: the session stays as this answer shows it.
                CancelOutcome::Cancelled(session) | CancelOutcome::AlreadyCancelled(session) => {
                    return referring_answer(StatusCode::OK, session.clone(), now, &state.public_url)
                }
                CancelOutcome::NotFound => not_found(),
                CancelOutcome::OtherMerchant => other_merchant().with_status(StatusCode::BAD_REQUEST),
                CancelOutcome::InvalidTransition(from) => ApiError::new(
                    ErrorCode::InvalidRedirectSessionStateTransition,
                    format!("A redirect session in state {} cannot be cancelled.", from.as_str()),
                ),
                CancelOutcome::VersionMismatch => version_mismatch(),
            };
            error_answer(&error, correlation_id, &state.public_url)
        }
    };
    let write = |guard| state.store.cancel_session_guarded(request, guard);
    guarded_write(&state, scope, Keep::Clear, render, write, |outcome| {
        if let CancelOutcome::Cancelled(_) = outcome {
            state.metrics.sessions_cancelled(1);
            tracing::debug!(session.id = %id, merchant.id = %merchant.id, "redirect session cancelled");
        }
    })
    .await
}

/// List the merchant's redirect sessions, newest first.
#[utoipa::path(
    get,
    path = "/customer-authentication-service/v1/redirect-sessions",
    tag = "Redirect sessions",
    params(
        ("x-api-key" = String, Header, description = "The merchant's API key."),
        ("state" = Option<SessionState>, Query, description = "Only sessions in this (effective) state."),
        ("createdFrom" = Option<String>, Query, format = DateTime, description = "RFC 3339; inclusive."),
        ("createdTo" = Option<String>, Query, format = DateTime, description = "RFC 3339; exclusive."),
        ("limit" = Option<usize>, Query, minimum = 1, maximum = 100, description = "1 to 100; default 20."),
        ("cursor" = Option<String>, Query, description = "`nextCursor` of the previous page."),
    ),
    responses(
        (status = 200, description = "One page.", body = RedirectSessionPage),
        (status = 400, description = "Validation", body = ErrorBody),
        (status = 401, description = "Unauthorized", body = ErrorBody),
    )
)]
pub async fn list_redirect_sessions(
    State(state): State<AppState>,
    Extension(merchant): Extension<Merchant>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let filter = parse_list_query(query.as_deref().unwrap_or(""))?;
    let limit = filter.limit;
    let now = Timestamp::now();
    let mut sessions = state.store.list_sessions(merchant.id, filter, now).await.map_err(store_error)?;
    let next_cursor = paginate(&mut sessions, limit, |s| (s.created_on, s.id));
    let items = sessions.into_iter().map(|s| RedirectSession::of(s, now, &state.public_url)).collect();
    Ok(Json(RedirectSessionPage { items, next_cursor }).into_response())
}

fn parse_list_query(query: &str) -> Result<SessionFilter, ApiError> {
    let mut errors = Errors::default();
    let mut filter = SessionFilter::default();
    let page = parse_query(query, &mut errors, |name, value, errors| {
        match name {
            "state" => match SessionState::parse(value) {
                Some(state) => filter.state = Some(state),
                None => errors.add(
                    "state",
                    "must be one of Created, Opened, Authenticated, Completed, Aborted, Cancelled, Expired",
                ),
            },
            "createdFrom" | "createdTo" => match Timestamp::parse_rfc3339(value) {
                Some(at) if name == "createdFrom" => filter.created_from = Some(at),
                Some(at) => filter.created_to = Some(at),
                None => errors.add(name, "must be an RFC 3339 date-time such as 2026-01-31T11:59:59.123Z"),
            },
            _ => return false,
        }
        true
    });
    filter.limit = page.limit;
    filter.after = page.after;
    errors.finish(|| filter).map_err(ApiError::validation)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_bad_query_parameter_is_reported() {
        let error = parse_list_query("state=Nope&limit=0&createdFrom=yesterday&colour=red").unwrap_err();
        let names: Vec<_> = error.validation.iter().map(|f| f.field_name.as_str()).collect();
        assert_eq!(names, ["state", "limit", "createdFrom", "colour"]);
    }
}
