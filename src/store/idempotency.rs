//! What both backends share about idempotency records (docs/DESIGN.md "Idempotency"): the
//! key, the kept answer, the guard a write carries, and the one decision a found record makes.
//!
//! A record is written once, complete, in the transaction of the change it guards (or, for
//! an answer that changed nothing, on its own): there is no "in progress" row to write first
//! and finish later, so a request costs one durable commit, and a crash leaves either the
//! change with its answer or neither.

use std::sync::Arc;

use super::sealing::idempotency_row;
use uuid::Uuid;

use super::{Merchant, StoreError};
pub use crate::domain::idempotency::{Found, IdempotencyKey, Kept, Replay, StoredResponse};
use crate::domain::time::Timestamp;
use crate::secrets::{Column, KeyRing};

/// Renders the answer to keep for a write's outcome. It runs inside the write's transaction
/// (on SQLite, on the writer thread), so it must be quick and must not block.
pub type Answer<O> = Box<dyn Fn(&O) -> StoredResponse + Send>;

/// The idempotency key a write runs under, and how its answer is rendered: the backend keeps
/// the answer in the transaction that makes the change.
pub struct Guard<O> {
    pub key: IdempotencyKey,
    pub fingerprint: [u8; 32],
    pub now: Timestamp,
    pub answer: Answer<O>,
    /// The answer shows a secret (a new subscription's signing secret): its body is kept
    /// encrypted under these keys (docs/DESIGN.md "Secrets at rest").
    pub seal: Option<Arc<KeyRing>>,
}

/// What a guard keeps for an outcome.
pub struct Rendered {
    pub key: IdempotencyKey,
    pub fingerprint: [u8; 32],
    pub now: Timestamp,
    /// The answer for the client.
    pub answer: StoredResponse,
    /// The answer as kept: `answer`, its body sealed when it shows a secret.
    pub kept: StoredResponse,
}

/// What a guarded (or unguarded) write came to.
#[derive(Debug)]
pub enum Guarded<O> {
    /// It ran; under a guard, the answer kept with it.
    Ran(O, Option<StoredResponse>),
    /// A request with the same key was kept first (another instance, or a race the request
    /// lost); nothing was changed.
    Earlier(Found),
}

impl<O> Guard<O> {
    /// Renders the answer to keep for `outcome`.
    pub fn render(&self, outcome: &O) -> Result<Rendered, StoreError> {
        let answer = (self.answer)(outcome);
        if answer.session.is_some() {
            // Kept as the reference alone; a replay rebuilds the bytes.
            let kept = StoredResponse { headers: Vec::new(), body: Vec::new(), ..answer.clone() };
            return Ok(Rendered { key: self.key, fingerprint: self.fingerprint, now: self.now, answer, kept });
        }
        let mut kept = answer.clone();
        if let Some(ring) = &self.seal {
            let row = idempotency_row(self.key.merchant_id, self.key.request_id);
            kept.body = ring
                .seal(Column::IdempotentBody, &row, &answer.body)
                .map_err(|e| StoreError::Internal(e.to_string()))?
                .into_bytes();
        }
        Ok(Rendered { key: self.key, fingerprint: self.fingerprint, now: self.now, answer, kept })
    }
}

/// Idempotency records: read one, keep an answer that changed nothing, and the read every
/// write with an `x-request-id` starts with.
#[async_trait::async_trait]
pub trait IdempotencyStore: Send + Sync + 'static {
    /// `merchant_by_key` and the idempotency record of `request_id` (of that merchant) read
    /// together, at one point in time and in one step: every write with an `x-request-id`.
    async fn merchant_and_kept(
        &self,
        key_hash: [u8; 32],
        request_id: Uuid,
    ) -> Result<(Option<Merchant>, Option<Kept>), StoreError>;

    /// The record kept under `key`, as it decides for a request with `fingerprint` (a read).
    async fn idempotency_lookup(&self, key: IdempotencyKey, fingerprint: [u8; 32])
        -> Result<Option<Found>, StoreError>;

    /// Keeps the answer to a request that changed nothing (one write of its own), unless a
    /// record was kept first under `key`: then answers that one.
    async fn idempotency_keep(
        &self,
        key: IdempotencyKey,
        fingerprint: [u8; 32],
        now: Timestamp,
        answer: StoredResponse,
    ) -> Result<Option<Found>, StoreError>;
}

/// What `KEEP` (`crate::store::rows`) came to when it wrote nothing: the record kept first
/// under the key, read back (`found`).
pub(crate) fn kept_first(found: Option<Found>) -> Result<Option<Found>, StoreError> {
    match found {
        Some(found) => Ok(Some(found)),
        None => Err(StoreError::Internal("an idempotency record conflicted but cannot be read".to_owned())),
    }
}
