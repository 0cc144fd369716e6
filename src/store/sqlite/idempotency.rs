//! Idempotency records on SQLite: read on a reader for the fast path, and written by the
//! writer in the transaction of the change they guard (`crate::store::idempotency`).

use std::sync::LazyLock;

use rusqlite::{params, Connection, OptionalExtension, Row};

use super::worker::internal;
use super::{optional_uuid_at, session_at, SESSION_COLUMNS};
use crate::domain::time::Timestamp;
use crate::store::idempotency::{Found, Guard, Guarded, IdempotencyKey, Kept, StoredResponse};
use crate::store::StoreError;

/// The record kept under `key`, as it decides for a request with `fingerprint`.
pub(super) fn lookup(c: &Connection, key: IdempotencyKey, fingerprint: &[u8; 32]) -> Result<Option<Found>, StoreError> {
    static SQL: LazyLock<String> = LazyLock::new(|| {
        format!("SELECT {} FROM idempotency i {KEPT_JOIN} WHERE i.merchant_id = ?1 AND i.request_id = ?2", *KEPT_SELECT)
    });
    let kept = c
        .prepare_cached(&SQL)
        .and_then(|mut s| {
            s.query_row(params![key.merchant_id.as_bytes(), key.request_id.as_bytes()], |row| kept_at(row, 0))
                .optional()
        })
        .map_err(|e| internal(&e))?;
    Ok(kept.and_then(|kept| kept.decide(fingerprint)))
}

/// The columns `kept_at` reads: the record `i` and the session `s` its answer refers to.
pub(super) static KEPT_SELECT: LazyLock<String> = LazyLock::new(|| {
    let session = SESSION_COLUMNS.split(", ").map(|column| format!("s.{column}")).collect::<Vec<_>>();
    format!("i.fingerprint, i.status, i.headers, i.body, i.session_id, {}", session.join(", "))
});

/// Joins the session a record `i` refers to, as `s`.
pub(super) const KEPT_JOIN: &str = "LEFT JOIN sessions s ON s.id = i.session_id";

/// The kept record whose `KEPT_SELECT` columns start at column `at`.
pub(super) fn kept_at(row: &Row<'_>, at: usize) -> rusqlite::Result<Kept> {
    let answer = row.get::<_, Option<u16>>(at + 1)?.map(|status| -> rusqlite::Result<StoredResponse> {
        Ok(StoredResponse {
            status,
            headers: row
                .get::<_, Option<String>>(at + 2)?
                .and_then(|h| serde_json::from_str(&h).ok())
                .unwrap_or_default(),
            body: row.get::<_, Option<Vec<u8>>>(at + 3)?.unwrap_or_default(),
            session: optional_uuid_at(row, at + 4)?,
        })
    });
    let session = match row.get_ref(at + 5)? {
        rusqlite::types::ValueRef::Null => None,
        _ => Some(session_at(row, at + 5)?),
    };
    Ok(Kept { fingerprint: row.get(at)?, answer: answer.transpose()?, session })
}

/// Writes the complete record (over one an earlier version left without an answer), unless
/// a record with an answer is kept under `key`: then answers that one. Also
/// `Store::idempotency_keep`, for an answer that changed nothing.
pub(super) fn keep(
    c: &Connection,
    key: IdempotencyKey,
    fingerprint: &[u8; 32],
    now: Timestamp,
    answer: &StoredResponse,
) -> Result<Option<Found>, StoreError> {
    // An answer kept as a session reference keeps no headers and no body.
    let (headers, body) = match answer.session {
        Some(_) => (None, None),
        None => {
            let headers = serde_json::to_string(&answer.headers).map_err(|e| StoreError::Internal(e.to_string()))?;
            (Some(headers), Some(&answer.body))
        }
    };
    let kept = c
        .prepare_cached(
            "INSERT INTO idempotency (merchant_id, request_id, fingerprint, started_on, status, headers, body,
                                      completed_on, session_id)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?4, ?8)
             ON CONFLICT (merchant_id, request_id) DO UPDATE SET
                 fingerprint = excluded.fingerprint, started_on = excluded.started_on, status = excluded.status,
                 headers = excluded.headers, body = excluded.body, completed_on = excluded.completed_on,
                 session_id = excluded.session_id
              WHERE idempotency.status IS NULL",
        )
        .and_then(|mut s| {
            s.execute(params![
                key.merchant_id.as_bytes(),
                key.request_id.as_bytes(),
                fingerprint,
                now.millis(),
                answer.status,
                headers,
                body,
                answer.session.map(|id| *id.as_bytes())
            ])
        })
        .map_err(|e| internal(&e))?;
    if kept == 1 {
        return Ok(None);
    }
    match lookup(c, key, fingerprint)? {
        Some(found) => Ok(Some(found)),
        None => Err(StoreError::Internal("an idempotency record conflicted but cannot be read".to_owned())),
    }
}

/// Runs the write `job` (answering its outcome and how many deliveries it queued) under
/// `guard`, as a job of the writer (`Writer::run_undoable`): the answer is kept in the same
/// transaction as the change. Should a record be kept under the key already, the job's change
/// is undone and that record answered. (The request holds its key in this process, and one
/// process owns the file, so that happens only to a caller that skipped the look-up.)
pub(super) fn guarded<O>(
    c: &Connection,
    guard: Option<Guard<O>>,
    job: impl FnOnce(&Connection) -> Result<(O, usize), StoreError>,
) -> Result<((Guarded<O>, usize), bool), StoreError> {
    let (outcome, queued) = job(c)?;
    let Some(guard) = guard else {
        return Ok(((Guarded::Ran(outcome, None), queued), true));
    };
    let rendered = guard.render(&outcome)?;
    match keep(c, rendered.key, &rendered.fingerprint, rendered.now, &rendered.kept)? {
        None => Ok(((Guarded::Ran(outcome, Some(rendered.answer)), queued), true)),
        Some(found) => Ok(((Guarded::Earlier(found), 0), false)),
    }
}

// The `IdempotencyStore` of this backend, written with the backend's own names.
use super::*;

#[async_trait]
impl IdempotencyStore for SqliteStore {
    async fn merchant_and_kept(
        &self,
        key_hash: [u8; 32],
        request_id: Uuid,
    ) -> Result<(Option<Merchant>, Option<Kept>), StoreError> {
        static SQL: LazyLock<String> = LazyLock::new(|| {
            format!(
                "SELECT m.id, m.name, m.disabled, m.created_on, {}
                   FROM merchants m LEFT JOIN idempotency i ON i.merchant_id = m.id AND i.request_id = ?2
                        {}
                  WHERE m.api_key_hash = ?1",
                *idempotency::KEPT_SELECT,
                idempotency::KEPT_JOIN
            )
        });
        self.point_reads
            .run(move |c| {
                let mut statement = c.prepare_cached(&SQL).map_err(|e| internal(&e))?;
                let found = statement
                    .query_row(params![key_hash, request_id.as_bytes()], |row| {
                        let merchant = merchant_from_row(row)?;
                        let kept = match row.get_ref(4)? {
                            rusqlite::types::ValueRef::Null => None,
                            _ => Some(idempotency::kept_at(row, 4)?),
                        };
                        Ok((merchant, kept))
                    })
                    .optional()
                    .map_err(|e| internal(&e))?;
                Ok(found.map_or((None, None), |(merchant, kept)| (Some(merchant), kept)))
            })
            .await
    }

    async fn idempotency_lookup(
        &self,
        key: IdempotencyKey,
        fingerprint: [u8; 32],
    ) -> Result<Option<Found>, StoreError> {
        self.point_reads.run(move |c| idempotency::lookup(c, key, &fingerprint)).await
    }

    async fn idempotency_keep(
        &self,
        key: IdempotencyKey,
        fingerprint: [u8; 32],
        now: Timestamp,
        answer: StoredResponse,
    ) -> Result<Option<Found>, StoreError> {
        self.writer.run(move |c| idempotency::keep(c, key, &fingerprint, now, &answer)).await
    }
}
