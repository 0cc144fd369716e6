//! Idempotency records on SQLite: read on a reader for the fast path, and written by the
//! writer in the transaction of the change they guard (`crate::store::idempotency`).

use rusqlite::{params, Connection, OptionalExtension};

use super::worker::internal;
use crate::domain::time::Timestamp;
use crate::store::idempotency::{Found, Guard, Guarded, IdempotencyKey, StoredResponse};
use crate::store::StoreError;

/// The record kept under `key`, as it decides for a request with `fingerprint`.
pub(super) fn lookup(c: &Connection, key: IdempotencyKey, fingerprint: &[u8; 32]) -> Result<Option<Found>, StoreError> {
    let row = c
        .prepare_cached(
            "SELECT fingerprint, status, headers, body FROM idempotency WHERE merchant_id = ?1 AND request_id = ?2",
        )
        .and_then(|mut s| {
            s.query_row(params![key.merchant_id.as_bytes(), key.request_id.as_bytes()], |row| {
                Ok((
                    row.get::<_, Vec<u8>>(0)?,
                    row.get::<_, Option<u16>>(1)?,
                    row.get::<_, Option<String>>(2)?,
                    row.get::<_, Option<Vec<u8>>>(3)?,
                ))
            })
            .optional()
        })
        .map_err(|e| internal(&e))?;
    Ok(row.and_then(|(kept, status, headers, body)| {
        let answer = status.map(|status| StoredResponse {
            status,
            headers: headers.and_then(|h| serde_json::from_str(&h).ok()).unwrap_or_default(),
            body: body.unwrap_or_default(),
        });
        Found::decide(&kept, fingerprint, answer)
    }))
}

/// Writes the complete record (over one an earlier version left without an answer).
pub(super) fn keep(
    c: &Connection,
    key: IdempotencyKey,
    fingerprint: &[u8; 32],
    now: Timestamp,
    answer: &StoredResponse,
) -> Result<(), StoreError> {
    let headers = serde_json::to_string(&answer.headers).map_err(|e| StoreError::Internal(e.to_string()))?;
    c.prepare_cached(
        "INSERT INTO idempotency (merchant_id, request_id, fingerprint, started_on, status, headers, body, completed_on)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?4)
         ON CONFLICT (merchant_id, request_id) DO UPDATE SET
             fingerprint = excluded.fingerprint, started_on = excluded.started_on, status = excluded.status,
             headers = excluded.headers, body = excluded.body, completed_on = excluded.completed_on",
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
    .map(drop)
    .map_err(|e| internal(&e))
}

/// Keeps an answer that changed nothing, unless a record was kept first (then that one).
pub(super) fn keep_alone(
    c: &Connection,
    key: IdempotencyKey,
    fingerprint: &[u8; 32],
    now: Timestamp,
    answer: &StoredResponse,
) -> Result<Option<Found>, StoreError> {
    if let Some(found) = lookup(c, key, fingerprint)? {
        return Ok(Some(found));
    }
    keep(c, key, fingerprint, now, answer)?;
    Ok(None)
}

/// Runs the write `job` (answering its outcome and how many deliveries it queued) under
/// `guard`, inside the writer's transaction: a request kept first is answered as such without
/// running the job; otherwise the job's answer is kept in the same transaction as its change.
/// The writer is the only one, so nothing can come between the look and the write.
pub(super) fn guarded<O>(
    c: &Connection,
    guard: Option<Guard<O>>,
    job: impl FnOnce(&Connection) -> Result<(O, usize), StoreError>,
) -> Result<(Guarded<O>, usize), StoreError> {
    if let Some(guard) = &guard {
        if let Some(found) = lookup(c, guard.key, &guard.fingerprint)? {
            return Ok((Guarded::Earlier(found), 0));
        }
    }
    let (outcome, queued) = job(c)?;
    let Some(guard) = guard else {
        return Ok((Guarded::Ran(outcome, None), queued));
    };
    let rendered = guard.render(&outcome)?;
    keep(c, rendered.key, &rendered.fingerprint, rendered.now, &rendered.kept)?;
    Ok((Guarded::Ran(outcome, Some(rendered.answer)), queued))
}
