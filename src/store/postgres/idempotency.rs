//! Idempotency records on PostgreSQL (`crate::store::idempotency`): read in one round trip,
//! and kept in the transaction of the change they guard. Of two instances running the same
//! request at once, the second's insert waits for the first's commit, finds its record, and
//! rolls its own change back: it answers what the first kept.

use async_trait::async_trait;
use deadpool_postgres::{GenericClient, Transaction};
use tokio_postgres::types::Json;
use uuid::Uuid;

use super::{execute, query_opt, Client, PostgresStore, Result, Ts};
use crate::domain::time::Timestamp;
use crate::store::idempotency::{kept_first, Found, Guard, Guarded, IdempotencyKey, Kept, StoredResponse};
use crate::store::prelude::IdempotencyStore;
use crate::store::{rows, Merchant};

/// The record kept under `key`, as it decides for a request with `fingerprint`.
pub async fn lookup<C: GenericClient>(c: &C, key: IdempotencyKey, fingerprint: &[u8; 32]) -> Result<Option<Found>> {
    let row = query_opt(c, &rows::KEPT_BY_KEY, &[&key.merchant_id, &key.request_id]).await?;
    Ok(row.map(|row| rows::kept_at(&row, 0)).transpose()?.and_then(|kept| kept.decide(fingerprint)))
}

/// The merchant with this key and its idempotency record of `request_id`, in one round trip.
async fn merchant_and_kept(
    c: &mut Client,
    key_hash: [u8; 32],
    request_id: Uuid,
) -> Result<(Option<Merchant>, Option<Kept>)> {
    let Some(row) = query_opt(&*c, &rows::MERCHANT_AND_KEPT, &[&&key_hash[..], &request_id]).await? else {
        return Ok((None, None));
    };
    let (merchant, kept) = rows::merchant_and_kept(&row)?;
    Ok((Some(merchant), kept))
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
        rows::KEEP,
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
    kept_first(lookup(c, key, fingerprint).await?)
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

#[async_trait]
impl IdempotencyStore for PostgresStore {
    async fn merchant_and_kept(
        &self,
        key_hash: [u8; 32],
        request_id: Uuid,
    ) -> Result<(Option<Merchant>, Option<Kept>)> {
        self.run(move |c| Box::pin(merchant_and_kept(c, key_hash, request_id))).await
    }

    async fn idempotency_lookup(&self, key: IdempotencyKey, fingerprint: [u8; 32]) -> Result<Option<Found>> {
        self.run(move |c| Box::pin(async move { lookup(&*c, key, &fingerprint).await })).await
    }

    async fn idempotency_keep(
        &self,
        key: IdempotencyKey,
        fingerprint: [u8; 32],
        now: Timestamp,
        answer: StoredResponse,
    ) -> Result<Option<Found>> {
        self.run(move |c| Box::pin(keep_alone(c, key, fingerprint, now, answer))).await
    }
}
