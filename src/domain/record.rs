//! The records the service keeps (merchants, redirect sessions) and the decisions made on them:
//! entity tags, what a cancel does, the session as its create answered it, the payload of a
//! session's event. Both backends and the handlers use these, so they cannot disagree. No I/O.

use uuid::Uuid;

use super::request::SessionSpec;
use super::session::{effective_state, State};
use super::time::Timestamp;

/// A merchant: the owner of sessions and subscriptions, known by the hash of its API key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Merchant {
    pub id: Uuid,
    pub name: String,
    pub disabled: bool,
    pub created_on: Timestamp,
}

/// A redirect session as stored. `state` is the stored state; readers use `effective_state`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionRecord {
    pub id: Uuid,
    pub merchant_id: Uuid,
    pub spec: SessionSpec,
    pub state: State,
    pub token: String,
    pub expires_on: Timestamp,
    pub created_on: Timestamp,
    pub last_modified_on: Timestamp,
    pub last_correlation_id: Uuid,
    pub version: i64,
    /// The customer: the one the merchant named at create, or the one the hosted page linked.
    pub customer_id: Option<Uuid>,
    /// The transaction intent: the one the merchant named, or the one the session created.
    pub transaction_intent_id: Option<Uuid>,
}

impl SessionRecord {
    /// The state as every reader and writer must see it at `now`.
    pub fn effective_state(&self, now: Timestamp) -> State {
        effective_state(self.state, self.expires_on, now)
    }

    /// The entity tag of the representation at `now`. It changes with every write and when
    /// the session expires by the clock (so the tag changes whenever the representation does).
    pub fn etag(&self, now: Timestamp) -> String {
        if self.effective_state(now) != self.state {
            format!("\"{}-expired\"", self.version)
        } else {
            format!("\"{}\"", self.version)
        }
    }

    /// Whether an `If-Match` header value matches this session at `now`.
    pub fn matches(&self, if_match: &str, now: Timestamp) -> bool {
        etag_matches(if_match, &self.etag(now))
    }
}

/// Whether an `If-Match` header value (`*`, or a list of tags) matches the entity tag `current`.
pub fn etag_matches(if_match: &str, current: &str) -> bool {
    if_match
        .split(',')
        .map(str::trim)
        .any(|tag| tag == "*" || tag == current || tag.strip_prefix("W/") == Some(current))
}

/// What creating a session came to.
#[derive(Debug)]
pub enum CreateOutcome {
    /// The session is new.
    Created(SessionRecord),
    /// A session with this id already exists (of this or another merchant); nothing changed.
    Exists(SessionRecord),
    /// The spec names a customer the service does not know; nothing changed.
    CustomerNotFound,
}

/// A merchant's request to cancel a session.
#[derive(Clone, Debug)]
pub struct CancelRequest {
    pub merchant_id: Uuid,
    pub session_id: Uuid,
    pub if_match: Option<String>,
    pub correlation_id: Uuid,
    pub now: Timestamp,
}

/// What cancelling came to.
#[derive(Debug)]
pub enum CancelOutcome {
    /// This request moved the session to `Cancelled` and recorded the event.
    Cancelled(SessionRecord),
    /// It was already cancelled; nothing changed.
    AlreadyCancelled(SessionRecord),
    NotFound,
    OtherMerchant,
    /// The session is in a state cancel cannot leave (terminal, or expired by the clock).
    InvalidTransition(State),
    /// `If-Match` did not match.
    VersionMismatch,
}

/// What a cancel request does to the session it names, decided from the row as read (under
/// whatever lock the backend holds) with the domain's state machine. Both backends use it, so
/// they cannot disagree.
#[derive(Debug)]
pub enum CancelDecision {
    /// Answer this without writing.
    Answer(CancelOutcome),
    /// Move the session to this state (and record the event).
    Change(SessionRecord, State),
}

/// Decides a cancel of `session` (`None`: no such id).
pub fn decide_cancel(session: Option<SessionRecord>, request: &CancelRequest) -> CancelDecision {
    use crate::domain::session::{transition, Action, Transition};
    let Some(session) = session else {
        return CancelDecision::Answer(CancelOutcome::NotFound);
    };
    if session.merchant_id != request.merchant_id {
        return CancelDecision::Answer(CancelOutcome::OtherMerchant);
    }
    if request.if_match.as_deref().is_some_and(|tag| !session.matches(tag, request.now)) {
        return CancelDecision::Answer(CancelOutcome::VersionMismatch);
    }
    let from = session.effective_state(request.now);
    match transition(from, Action::Cancel) {
        Ok(Transition::Unchanged) => CancelDecision::Answer(CancelOutcome::AlreadyCancelled(session)),
        Err(_) => CancelDecision::Answer(CancelOutcome::InvalidTransition(from)),
        Ok(Transition::To(to)) => CancelDecision::Change(session, to),
    }
}

impl SessionRecord {
    /// This session as its create wrote it (under the request `correlation_id`): what the
    /// create's `201` showed, whatever happened to the session since.
    pub fn as_created(mut self, correlation_id: Uuid) -> SessionRecord {
        self.state = State::Created;
        self.version = 1;
        self.last_modified_on = self.created_on;
        self.last_correlation_id = correlation_id;
        self.customer_id = self.spec.customer_id;
        self.transaction_intent_id = self.spec.transaction_intent_id;
        self
    }

    /// This session after a state change written at `now` by the request `correlation_id`.
    pub fn changed(mut self, to: State, now: Timestamp, correlation_id: Uuid) -> SessionRecord {
        self.state = to;
        self.version += 1;
        self.last_modified_on = now;
        self.last_correlation_id = correlation_id;
        self
    }
}

/// The `data` of a session's event: the session as it is after the change, with the customer
/// and the intent when known. Both backends store exactly its JSON, webhooks send it, and the
/// OpenAPI event catalogue describes it (`api::catalogue`).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct EventData {
    /// The redirect session.
    pub id: Uuid,
    pub state: State,
    #[serde(rename = "type")]
    pub kind: crate::domain::request::SessionType,
    #[schema(value_type = String, format = DateTime)]
    pub created_on: Timestamp,
    /// When it changed: the event's time.
    #[schema(value_type = String, format = DateTime)]
    pub last_modified_on: Timestamp,
    /// The customer named at create, or the one who authenticated on the hosted page; absent
    /// when there is none.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub customer_id: Option<Uuid>,
    /// The intent named at create, or the one the customer's confirmation created; absent
    /// when there is none.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub transaction_intent_id: Option<Uuid>,
}

/// The `data` of the event of `session` moving to `to` at `changed_on`: the JSON text both
/// backends store and webhooks send as it is.
pub fn event_data(session: &SessionRecord, to: State, changed_on: Timestamp) -> String {
    let data = EventData {
        id: session.id,
        state: to,
        kind: session.spec.kind,
        created_on: session.created_on,
        last_modified_on: changed_on,
        customer_id: session.customer_id,
        transaction_intent_id: session.transaction_intent_id,
    };
    serde_json::to_string(&data).expect("event data serialises")
}
