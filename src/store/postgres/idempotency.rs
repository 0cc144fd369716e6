//! Idempotency records on PostgreSQL (`crate::store::idempotency`): read in one round trip,
//! and kept in the transaction of the change they guard. Of two instances running the same
//! request at once, the second's insert waits for the first's commit, finds its record, and
//! rolls its own change back: it answers what the first kept.

use std::sync::LazyLock;

use deadpool_postgres::{GenericClient, Transaction};
use tokio_postgres::types::Json;
use tokio_postgres::Row;

use super::sessions::{session_at, SESSION_COLUMNS};
use super::{execute, internal, query_opt, Client, Result, Ts};
use crate::domain::time::Timestamp;
use crate::store::idempotency::{Found, Guard, Guarded, IdempotencyKey, Kept, StoredResponse};

/// The record kept under `key`, as it decides for a request with `fingerprint`.
pub async fn lookup<C: GenericClient>(c: &C, key: IdempotencyKey, fingerprint: &[u8; 32]) -> Result<Option<Found>> {
    static SQL: LazyLock<String> = LazyLock::new(|| {
        format!("SELECT {} FROM idempotency i {KEPT_JOIN} WHERE i.merchant_id = $1 AND i.request_id = $2", *KEPT_SELECT)
    });
    let row = query_opt(c, &SQL, &[&key.merchant_id, &key.request_id]).await?;
    Ok(row.map(|row| kept_at(&row, 0)).transpose()?.and_then(|kept| kept.decide(fingerprint)))
}

/// The columns `kept_at` reads: the record `i` and the session `s` its answer refers to.
pub static KEPT_SELECT: LazyLock<String> = LazyLock::new(|| {
    let session = SESSION_COLUMNS.split(", ").map(|column| format!("s.{column}")).collect::<Vec<_>>();
    format!("i.fingerprint, i.status, i.headers, i.body, i.session_id, {}", session.join(", "))
});

/// Joins the session a record `i` refers to, as `s`.
pub const KEPT_JOIN: &str = "LEFT JOIN sessions s ON s.id = i.session_id";

/// The kept record whose `KEPT_SELECT` columns start at column `at`.
pub fn kept_at(row: &Row, at: usize) -> Result<Kept> {
    let answer = match row.try_get::<_, Option<i32>>(at + 1)? {
        None => None,
        Some(status) => {
            let headers: Option<Json<serde_json::Value>> = row.try_get(at + 2)?;
            Some(StoredResponse {
                status: u16::try_from(status).map_err(|_| internal(format!("stored status {status}")))?,
                headers: headers.and_then(|Json(h)| serde_json::from_value(h).ok()).unwrap_or_default(),
                body: row.try_get::<_, Option<Vec<u8>>>(at + 3)?.unwrap_or_default(),
                session: row.try_get(at + 4)?,
            })
        }
    };
    let session = match row.try_get::<_, Option<uuid::Uuid>>(at + 5)? {
        None => None,
        Some(_) => Some(session_at(row, at + 5)?),
    };
    Ok(Kept { fingerprint: row.try_get(at)?, answer, session })
}

/// Keeps the complete record (over one an earlier version left without an answer), unless a
/// record with an answer is kept already: then answers that one.
async fn keep<C: GenericClient>(
    c: &C,
    key: IdempotencyKey,
    fingerprint: &[u8; 32],
    now: Timestamp,
    answer: &StoredResponse,
) -> Result<Option<Found>> {
    // An answer kept as a session reference keeps no headers and no body.
    let (headers, body) = match answer.session {
        Some(_) => (None, None),
        None => (Some(Json(&answer.headers)), Some(&answer.body)),
    };
    let kept = execute(
        c,
        "INSERT INTO idempotency (merchant_id, request_id, fingerprint, started_on, status, headers, body,
                                  completed_on, session_id)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $4, $8)
         ON CONFLICT (merchant_id, request_id) DO UPDATE SET
             fingerprint = excluded.fingerprint, started_on = excluded.started_on, status = excluded.status,
             headers = excluded.headers, body = excluded.body, completed_on = excluded.completed_on,
             session_id = excluded.session_id
          WHERE idempotency.status IS NULL",
        &[
            &key.merchant_id,
            &key.request_id,
            &&fingerprint[..],
            &Ts(now),
            &i32::from(answer.status),
            &headers,
            &body,
            &answer.session,
        ],
    )
    .await?;
    if kept == 1 {
        return Ok(None);
    }
    match lookup(c, key, fingerprint).await? {
        Some(found) => Ok(Some(found)),
        None => Err(internal("an idempotency record conflicted but cannot be read")),
    }
}

/// `Store::idempotency_keep`: one statement of its own.
pub async fn keep_alone(
    c: &mut Client,
    key: IdempotencyKey,
    fingerprint: [u8; 32],
    now: Timestamp,
    answer: StoredResponse,
) -> Result<Option<Found>> {
    keep(&*c, key, &fingerprint, now, &answer).await
}

/// Ends the transaction of a write that came to `outcome` (having queued `queued`
/// deliveries): without a guard it commits; with one it keeps the answer first, or, when a
/// record was kept first, rolls the write back and answers that record.
pub async fn finish<O>(
    tx: Transaction<'_>,
    guard: Option<Guard<O>>,
    outcome: O,
    queued: usize,
) -> Result<(Guarded<O>, usize)> {
    let Some(guard) = guard else {
        tx.commit().await?;
        return Ok((Guarded::Ran(outcome, None), queued));
    };
    let rendered = guard.render(&outcome)?;
    if let Some(found) = keep(&tx, rendered.key, &rendered.fingerprint, rendered.now, &rendered.kept).await? {
        tx.rollback().await?;
        return Ok((Guarded::Earlier(found), 0));
    }
    tx.commit().await?;
    Ok((Guarded::Ran(outcome, Some(rendered.answer)), queued))
}

// The `IdempotencyStore` of this backend, written with the backend's own names.
use super::*;

#[async_trait]
impl IdempotencyStore for PostgresStore {
    async fn merchant_and_kept(
        &self,
        key_hash: [u8; 32],
        request_id: Uuid,
    ) -> Result<(Option<Merchant>, Option<Kept>)> {
        self.run(move |c| Box::pin(sessions::merchant_and_kept(c, key_hash, request_id))).await
    }

    async fn idempotency_lookup(&self, key: IdempotencyKey, fingerprint: [u8; 32]) -> Result<Option<Found>> {
        self.run(move |c| Box::pin(async move { idempotency::lookup(&*c, key, &fingerprint).await })).await
    }

    async fn idempotency_keep(
        &self,
        key: IdempotencyKey,
        fingerprint: [u8; 32],
        now: Timestamp,
        answer: StoredResponse,
    ) -> Result<Option<Found>> {
        self.run(move |c| Box::pin(idempotency::keep_alone(c, key, fingerprint, now, answer))).await
    }
}
