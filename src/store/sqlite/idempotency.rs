//! Idempotency records on SQLite: read on a reader for the fast path, and written by the
//! writer in the transaction of the change they guard (`crate::store::idempotency`).

use rusqlite::{params, Connection, OptionalExtension, Row};

use super::worker::internal;
use crate::domain::time::Timestamp;
use crate::store::idempotency::{Found, Guard, Guarded, IdempotencyKey, Kept, StoredResponse};
use crate::store::StoreError;

/// The record kept under `key`, as it decides for a request with `fingerprint`.
pub(super) fn lookup(c: &Connection, key: IdempotencyKey, fingerprint: &[u8; 32]) -> Result<Option<Found>, StoreError> {
    let kept = c
        .prepare_cached(&format!("SELECT {KEPT_COLUMNS} FROM idempotency WHERE merchant_id = ?1 AND request_id = ?2"))
        .and_then(|mut s| {
            s.query_row(params![key.merchant_id.as_bytes(), key.request_id.as_bytes()], |row| kept_at(row, 0))
                .optional()
        })
        .map_err(|e| internal(&e))?;
    Ok(kept.and_then(|kept| kept.decide(fingerprint)))
}

/// The columns `kept_at` reads.
pub(super) const KEPT_COLUMNS: &str = "fingerprint, status, headers, body";

/// The kept record whose `KEPT_COLUMNS` start at column `at`.
pub(super) fn kept_at(row: &Row<'_>, at: usize) -> rusqlite::Result<Kept> {
    let answer = row.get::<_, Option<u16>>(at + 1)?.map(|status| -> rusqlite::Result<StoredResponse> {
        Ok(StoredResponse {
            status,
            headers: row
                .get::<_, Option<String>>(at + 2)?
                .and_then(|h| serde_json::from_str(&h).ok())
                .unwrap_or_default(),
            body: row.get::<_, Option<Vec<u8>>>(at + 3)?.unwrap_or_default(),
        })
    });
    Ok(Kept { fingerprint: row.get(at)?, answer: answer.transpose()? })
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
    let headers = serde_json::to_string(&answer.headers).map_err(|e| StoreError::Internal(e.to_string()))?;
    let kept = c
        .prepare_cached(
            "INSERT INTO idempotency (merchant_id, request_id, fingerprint, started_on, status, headers, body, completed_on)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?4)
             ON CONFLICT (merchant_id, request_id) DO UPDATE SET
                 fingerprint = excluded.fingerprint, started_on = excluded.started_on, status = excluded.status,
                 headers = excluded.headers, body = excluded.body, completed_on = excluded.completed_on
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
                answer.body
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
