//! Idempotency records on SQLite: read on a reader for the fast path, and written by the
//! writer in the transaction of the change they guard (`crate::store::idempotency`).

use std::sync::LazyLock;

use async_trait::async_trait;
use rusqlite::{params, Connection, OptionalExtension};
use uuid::Uuid;

use super::worker::internal;
use super::SqliteStore;
use crate::domain::time::Timestamp;
use crate::store::idempotency::{kept_first, Found, Guard, Guarded, IdempotencyKey, Kept, StoredResponse};
use crate::store::prelude::IdempotencyStore;
use crate::store::rows;
use crate::store::{Merchant, StoreError};

/// The record kept under `key`, as it decides for a request with `fingerprint`.
pub(super) fn lookup(c: &Connection, key: IdempotencyKey, fingerprint: &[u8; 32]) -> Result<Option<Found>, StoreError> {
    static SQL: LazyLock<String> = LazyLock::new(|| rows::numbered(&rows::KEPT_BY_KEY));
    let kept = c
        .prepare_cached(&SQL)
        .and_then(|mut s| {
            s.query_row(params![key.merchant_id.as_bytes(), key.request_id.as_bytes()], |row| rows::kept_at(row, 0))
                .optional()
        })
        .map_err(|e| internal(&e))?;
    Ok(kept.and_then(|kept| kept.decide(fingerprint)))
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
    static KEEP: LazyLock<String> = LazyLock::new(|| rows::numbered(rows::KEEP));
    let kept = c
        .prepare_cached(&KEEP)
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
    kept_first(lookup(c, key, fingerprint)?)
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

#[async_trait]
impl IdempotencyStore for SqliteStore {
    async fn merchant_and_kept(
        &self,
        key_hash: [u8; 32],
        request_id: Uuid,
    ) -> Result<(Option<Merchant>, Option<Kept>), StoreError> {
        static SQL: LazyLock<String> = LazyLock::new(|| rows::numbered(&rows::MERCHANT_AND_KEPT));
        self.point_reads
            .run(move |c| {
                let mut statement = c.prepare_cached(&SQL).map_err(|e| internal(&e))?;
                let found = statement
                    .query_row(params![key_hash, request_id.as_bytes()], |row| rows::merchant_and_kept(row))
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
        self.point_reads.run(move |c| lookup(c, key, &fingerprint)).await
    }

    async fn idempotency_keep(
        &self,
        key: IdempotencyKey,
        fingerprint: [u8; 32],
        now: Timestamp,
        answer: StoredResponse,
    ) -> Result<Option<Found>, StoreError> {
        self.writer.run(move |c| keep(c, key, &fingerprint, now, &answer)).await
    }
}
