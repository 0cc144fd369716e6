//! Sessions on PostgreSQL: create, read, list, cancel, expire, each state change with its event.
//! Each function is one use case on one pooled connection; the ones that decide on a row lock
//! it first, so concurrent instances take turns on it.

use std::sync::LazyLock;

use async_trait::async_trait;
use deadpool_postgres::{GenericClient, Transaction};
use tokio_postgres::types::Json;
use tokio_postgres::types::ToSql;
use tokio_postgres::Row;
use uuid::Uuid;

use super::idempotency::{finish, lookup};
use super::webhooks::{record_events, NewEvent};
use super::{execute, int8, internal, query, query_opt, Client, PostgresStore, Result, Sql, Ts};
use crate::domain::event::EventType;
use crate::domain::session::{State, LIVE_STATES};
use crate::domain::time::Timestamp;
use crate::store::idempotency::Rendered;
use crate::store::prelude::SessionStore;
use crate::store::rows::{self, session_columns_of, LIVE, SESSION_COLUMNS};
use crate::store::{
    decide_cancel, CancelDecision, CancelOutcome, CancelRequest, CreateOutcome, Guard, Guarded, Merchant,
    SessionFilter, SessionRecord, StoreError,
};

fn session_from_row(row: &Row) -> Result<SessionRecord> {
    rows::session(row)
}

/// The session with this id; with `lock`, locked until the transaction ends, as the latest
/// committed version (READ COMMITTED re-reads a row it had to wait for).
pub(super) async fn load_session<C: GenericClient>(c: &C, id: Uuid, lock: bool) -> Result<Option<SessionRecord>> {
    let row = if lock {
        query_opt(c, &format!("SELECT {SESSION_COLUMNS} FROM sessions WHERE id = $1 FOR NO KEY UPDATE"), &[&id]).await?
    } else {
        query_opt(c, &format!("SELECT {SESSION_COLUMNS} FROM sessions WHERE id = $1"), &[&id]).await?
    };
    row.as_ref().map(session_from_row).transpose()
}

/// One statement inserts the session only when its id is free and its customer (if any) is
/// known. When nothing was inserted, the row that holds the id decides (`Exists`, as SQLite
/// checks the id before the customer); without one, the customer was unknown.
pub async fn create_session(
    c: &mut Client,
    session: SessionRecord,
    guard: Option<Guard<CreateOutcome>>,
) -> Result<Guarded<CreateOutcome>> {
    let Some(guard) = guard else {
        return Ok(Guarded::Ran(decide_create(&*c, session).await?, None));
    };
    // The answer a new session gets is known before the write: one statement inserts the
    // session and keeps that answer (one round trip). Should another request have kept a
    // record under the key, the statement fails whole and that record is answered.
    // Otherwise (the id taken, the customer unknown, or an old record without an answer) one
    // transaction decides, and keeps its answer.
    let created = CreateOutcome::Created(session.clone());
    let rendered = guard.render(&created)?;
    match create_in(&*c, &session, Some(&rendered)).await {
        Ok(Some(created)) => return Ok(Guarded::Ran(created, Some(rendered.answer))),
        Ok(None) => {}
        Err(KeptFirst) => {
            if let Some(found) = lookup(&*c, guard.key, &guard.fingerprint).await? {
                return Ok(Guarded::Earlier(found));
            }
            // A record an earlier version left without an answer: the transaction below
            // replaces it (`finish` keeps over such a record).
        }
        Err(Failed(error)) => return Err(error),
    }
    let tx = c.transaction().await?;
    let outcome = decide_create(&tx, session).await?;
    Ok(finish(tx, Some(guard), outcome, 0).await?.0)
}

/// Why a create statement did not insert.
enum CreateError {
    /// A record is kept under the idempotency key already (another request's).
    KeptFirst,
    Failed(StoreError),
}
use CreateError::{Failed, KeptFirst};

/// One statement inserts the session only when its id is free and its customer (if any) is
/// known, and with `kept` keeps that answer under its key. `None` when nothing was inserted.
async fn create_in<C: GenericClient>(
    c: &C,
    session: &SessionRecord,
    kept: Option<&Rendered>,
) -> std::result::Result<Option<CreateOutcome>, CreateError> {
    static INSERT: &str =
        "INSERT INTO sessions (id, merchant_id, state, spec, amount, currency, token, expires_on, created_on,
                               last_modified_on, last_correlation_id, version, customer_id, transaction_intent_id)
         SELECT $1::uuid, $2::uuid, $3::text, $4::jsonb, $5::text::numeric(12,2), $6::text, $7::text,
                $8::timestamptz, $9::timestamptz, $10::timestamptz, $11::uuid, $12::bigint, $14::uuid, $15::uuid
          WHERE $13::uuid IS NULL OR EXISTS (SELECT 1 FROM customers WHERE id = $13)
         ON CONFLICT (id) DO NOTHING";
    static INSERT_AND_KEEP: LazyLock<String> = LazyLock::new(|| {
        format!(
            "WITH inserted AS ({INSERT} RETURNING 1),
                  kept AS (INSERT INTO idempotency (merchant_id, request_id, fingerprint, started_on, status, headers,
                                                    body, completed_on, session_id)
                           SELECT $2, $16::uuid, $17::bytea, $9, $18::integer, $19::jsonb, $20::bytea, $9, $21::uuid
                             FROM inserted)
             SELECT count(*) FROM inserted"
        )
    });
    let transaction = session.spec.transaction_data.as_ref();
    let amount = transaction.map(|t| t.amount.to_string());
    let currency = transaction.map(|t| t.currency.code());
    let spec = Json(&session.spec);
    let expires_on = Ts(session.expires_on);
    let created_on = Ts(session.created_on);
    let last_modified_on = Ts(session.last_modified_on);
    let state = session.state.as_str();
    let mut params: Vec<&(dyn ToSql + Sync)> = vec![
        &session.id,
        &session.merchant_id,
        &state,
        &spec,
        &amount,
        &currency,
        &session.token,
        &expires_on,
        &created_on,
        &last_modified_on,
        &session.last_correlation_id,
        &session.version,
        &session.spec.customer_id,
        &session.customer_id,
        &session.transaction_intent_id,
    ];
    let fingerprint = kept.map(|kept| &kept.fingerprint[..]);
    let status = kept.map(|kept| i32::from(kept.kept.status));
    // An answer kept as a session reference keeps no headers and no body.
    let by_value = kept.filter(|kept| kept.kept.session.is_none());
    let headers = by_value.map(|kept| Json(&kept.kept.headers));
    let body = by_value.map(|kept| &kept.kept.body[..]);
    let reference = kept.and_then(|kept| kept.kept.session);
    let inserted = match kept {
        None => c.execute(INSERT, &params).await,
        Some(kept) => {
            params.extend([
                &kept.key.request_id as &(dyn ToSql + Sync),
                &fingerprint,
                &status,
                &headers,
                &body,
                &reference,
            ]);
            c.query_one(INSERT_AND_KEEP.as_str(), &params).await.map(|row| row.get::<_, i64>(0) as u64)
        }
    };
    match inserted {
        Ok(1) => Ok(Some(CreateOutcome::Created(session.clone()))),
        Ok(_) => Ok(None),
        Err(error) if is_kept_first(&error) => Err(KeptFirst),
        Err(error) => Err(Failed(error.into())),
    }
}

/// Whether `error` is the unique violation of an idempotency key kept first.
fn is_kept_first(error: &tokio_postgres::Error) -> bool {
    error.as_db_error().is_some_and(|db| {
        *db.code() == tokio_postgres::error::SqlState::UNIQUE_VIOLATION && db.table() == Some("idempotency")
    })
}

/// What a create that inserted nothing came to: the row that holds the id decides (`Exists`,
/// as SQLite checks the id before the customer); without one, the customer was unknown.
async fn decide_create<C: GenericClient>(c: &C, session: SessionRecord) -> Result<CreateOutcome> {
    if let Some(created) = create_in(c, &session, None).await.map_err(|error| match error {
        Failed(error) => error,
        KeptFirst => internal("a create without a key conflicted on one"),
    })? {
        return Ok(created);
    }
    match load_session(c, session.id, false).await? {
        Some(existing) => Ok(CreateOutcome::Exists(existing)),
        None if session.spec.customer_id.is_some() => Ok(CreateOutcome::CustomerNotFound),
        // Sessions are never deleted, so a conflict always leaves a row to read.
        None => Err(internal("a session was neither inserted nor found")),
    }
}

pub async fn get_session(c: &mut Client, id: Uuid) -> Result<Option<SessionRecord>> {
    load_session(&*c, id, false).await
}

/// The merchant with this key and the session with this id, in one round trip.
pub async fn merchant_and_session(
    c: &mut Client,
    key_hash: [u8; 32],
    id: Uuid,
) -> Result<(Option<Merchant>, Option<SessionRecord>)> {
    let Some(row) = query_opt(&*c, &rows::MERCHANT_AND_SESSION, &[&&key_hash[..], &id]).await? else {
        return Ok((None, None));
    };
    let (merchant, session) = rows::merchant_and_session(&row)?;
    Ok((Some(merchant), session))
}

pub async fn list_sessions(
    c: &mut Client,
    merchant_id: Uuid,
    filter: SessionFilter,
    now: Timestamp,
) -> Result<Vec<SessionRecord>> {
    let mut sql = Sql::new(&format!("SELECT {SESSION_COLUMNS} FROM sessions WHERE merchant_id = "));
    let merchant = sql.bind(merchant_id);
    sql.push(&merchant);
    // The effective state: a live session past its expiry is Expired.
    match filter.state {
        None => {}
        Some(State::Expired) => {
            let now = sql.bind(Ts(now));
            sql.push(&format!(" AND (state = 'Expired' OR ({} AND expires_on <= {now}))", *LIVE));
        }
        Some(state) if LIVE_STATES.contains(&state) => {
            let now = sql.bind(Ts(now));
            sql.push(&format!(" AND state = '{}' AND expires_on > {now}", state.as_str()));
        }
        Some(state) => sql.push(&format!(" AND state = '{}'", state.as_str())),
    }
    if let Some(from) = filter.created_from {
        let from = sql.bind(Ts(from));
        sql.push(&format!(" AND created_on >= {from}"));
    }
    if let Some(to) = filter.created_to {
        let to = sql.bind(Ts(to));
        sql.push(&format!(" AND created_on < {to}"));
    }
    if let Some((time, id)) = filter.after {
        let (time, id) = (sql.bind(Ts(time)), sql.bind(id));
        sql.push(&format!(" AND (created_on, id) < ({time}, {id})"));
    }
    let limit = sql.bind(int8(filter.limit + 1));
    sql.push(&format!(" ORDER BY created_on DESC, id DESC LIMIT {limit}"));
    sql.query(&*c).await?.iter().map(session_from_row).collect()
}

/// Cancels in one short transaction: lock the row, decide with the domain rules exactly as the
/// SQLite store does, then the conditional update, the event and its deliveries. Concurrent
/// cancels (and the sweep) wait for the lock and then see the winner's committed row.
pub async fn cancel_session(
    c: &mut Client,
    request: CancelRequest,
    guard: Option<Guard<CancelOutcome>>,
) -> Result<(Guarded<CancelOutcome>, usize)> {
    let tx = c.transaction().await?;
    let (outcome, queued) = cancel_in(&tx, request).await?;
    finish(tx, guard, outcome, queued).await
}

async fn cancel_in(tx: &Transaction<'_>, request: CancelRequest) -> Result<(CancelOutcome, usize)> {
    let session = load_session(tx, request.session_id, true).await?;
    match decide_cancel(session, &request) {
        CancelDecision::Answer(outcome) => Ok((outcome, 0)),
        CancelDecision::Change(session, to) => {
            let Some(queued) = change_state(tx, &session, to, request.correlation_id, request.now).await? else {
                // Cannot happen while the row is locked; kept as the same guard as SQLite's.
                return Ok((CancelOutcome::VersionMismatch, 0));
            };
            Ok((CancelOutcome::Cancelled(session.changed(to, request.now, request.correlation_id)), queued))
        }
    }
}

/// Moves a live session to `to` with one conditional update (writing its customer and intent
/// as `session` has them), inserts its event and queues its deliveries (with the `NOTIFY` that
/// wakes the dispatchers when this transaction commits); `None` when the condition no longer
/// held. Mirrors SQLite's `change_state`, including dating an expiry at `expiresOn`.
pub(super) async fn change_state(
    tx: &Transaction<'_>,
    session: &SessionRecord,
    to: State,
    correlation_id: Uuid,
    now: Timestamp,
) -> Result<Option<usize>> {
    let (changed_on, require_unexpired) = if to == State::Expired { (session.expires_on, false) } else { (now, true) };
    static UPDATE: LazyLock<String> = LazyLock::new(|| {
        format!(
            "UPDATE sessions SET state = $2, version = version + 1, last_modified_on = $3, last_correlation_id = $4,
                    customer_id = $8, transaction_intent_id = $9
              WHERE id = $1 AND version = $5 AND {} AND (NOT $6 OR expires_on > $7)",
            *LIVE
        )
    });
    let changed = execute(
        tx,
        &UPDATE,
        &[
            &session.id,
            &to.as_str(),
            &Ts(changed_on),
            &correlation_id,
            &session.version,
            &require_unexpired,
            &Ts(now),
            &session.customer_id,
            &session.transaction_intent_id,
        ],
    )
    .await?;
    if changed == 0 {
        return Ok(None);
    }
    let Some(kind) = EventType::for_state(to) else {
        return Ok(Some(0));
    };
    let event = NewEvent {
        id: Uuid::now_v7(),
        merchant_id: session.merchant_id,
        session_id: session.id,
        kind,
        data: crate::store::event_data(session, to, changed_on),
    };
    record_events(tx, &[event], now).await.map(Some)
}

/// Expires up to `batch` due sessions in one statement: `SKIP LOCKED` lets two sweeps (on two
/// instances) share the work without waiting on each other, and a row a cancel committed
/// meanwhile is re-checked under its lock and left alone. Each expiry is dated `expiresOn`, its
/// event written in the same transaction. Answers (expired, deliveries queued).
pub async fn expire_due(c: &mut Client, now: Timestamp, batch: usize) -> Result<(usize, usize)> {
    // The sessions as they were written (state and version as the sweep changed them; the
    // event needs only what an expiry does not change: id, type, customer, intent, times).
    static SQL: LazyLock<String> = LazyLock::new(|| {
        format!(
            "WITH due AS MATERIALIZED (
                 SELECT id FROM sessions
                  WHERE {} AND expires_on <= $1
                  ORDER BY expires_on LIMIT $2
                    FOR UPDATE SKIP LOCKED)
             UPDATE sessions s SET state = 'Expired', version = s.version + 1, last_modified_on = s.expires_on
               FROM due WHERE s.id = due.id
             RETURNING {}",
            *LIVE,
            session_columns_of("s")
        )
    });
    let tx = c.transaction().await?;
    let rows = query(&tx, &SQL, &[&Ts(now), &int8(batch)]).await?;
    let mut expired = rows.iter().map(session_from_row).collect::<Result<Vec<_>>>()?;
    // Events in the order the sweep took the sessions (as SQLite writes them), so their
    // time-ordered ids follow the expiries.
    expired.sort_by_key(|session| (session.expires_on, session.id));
    let events: Vec<NewEvent> = expired
        .iter()
        .map(|session| NewEvent {
            id: Uuid::now_v7(),
            merchant_id: session.merchant_id,
            session_id: session.id,
            kind: EventType::RedirectSessionExpired,
            data: crate::store::event_data(session, State::Expired, session.expires_on),
        })
        .collect();
    let queued = record_events(&tx, &events, now).await?;
    tx.commit().await?;
    Ok((expired.len(), queued))
}

#[cfg(test)]
fn parse_event_type(text: &str) -> Result<EventType> {
    EventType::parse(text).ok_or_else(|| internal(format!("unknown event type {text}")))
}

#[cfg(test)]
async fn session_events(c: &mut Client, session_id: Uuid) -> Result<Vec<(Uuid, EventType)>> {
    let rows =
        query(&*c, "SELECT id, type FROM events WHERE session_id = $1 ORDER BY created_on, id", &[&session_id]).await?;
    rows.iter().map(|row| Ok((row.try_get(0)?, parse_event_type(row.try_get(1)?)?))).collect()
}

// The `SessionStore` of this backend.
#[async_trait]
impl SessionStore for PostgresStore {
    async fn create_session_guarded(
        &self,
        session: SessionRecord,
        guard: Option<Guard<CreateOutcome>>,
    ) -> Result<Guarded<CreateOutcome>> {
        self.run(move |c| Box::pin(create_session(c, session, guard))).await
    }

    async fn get_session(&self, id: Uuid) -> Result<Option<SessionRecord>> {
        self.run(move |c| Box::pin(get_session(c, id))).await
    }

    async fn merchant_and_session(
        &self,
        key_hash: [u8; 32],
        id: Uuid,
    ) -> Result<(Option<Merchant>, Option<SessionRecord>)> {
        self.run(move |c| Box::pin(merchant_and_session(c, key_hash, id))).await
    }

    async fn list_sessions(
        &self,
        merchant_id: Uuid,
        filter: SessionFilter,
        now: Timestamp,
    ) -> Result<Vec<SessionRecord>> {
        self.run(move |c| Box::pin(list_sessions(c, merchant_id, filter, now))).await
    }

    async fn cancel_session_guarded(
        &self,
        request: CancelRequest,
        guard: Option<Guard<CancelOutcome>>,
    ) -> Result<Guarded<CancelOutcome>> {
        let (outcome, queued) = self.run(move |c| Box::pin(cancel_session(c, request, guard))).await?;
        self.queued_deliveries(queued);
        Ok(outcome)
    }

    async fn expire_due(&self, now: Timestamp, batch: usize) -> Result<usize> {
        let (expired, queued) = self.run(move |c| Box::pin(expire_due(c, now, batch))).await?;
        self.queued_deliveries(queued);
        Ok(expired)
    }
}

#[cfg(test)]
#[async_trait]
impl crate::store::Inspect for PostgresStore {
    async fn session_events(&self, session_id: Uuid) -> Result<Vec<(Uuid, EventType)>> {
        self.run(move |c| Box::pin(session_events(c, session_id))).await
    }
}
