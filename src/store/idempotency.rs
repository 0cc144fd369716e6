//! What both backends share about idempotency records (docs/DESIGN.md "Idempotency"): the
//! key, the kept answer, the guard a write carries, and the one decision a found record makes.
//!
//! A record is written once, complete, in the transaction of the change it guards (or, for
//! an answer that changed nothing, on its own): there is no "in progress" row to write first
//! and finish later, so a request costs one durable commit, and a crash leaves either the
//! change with its answer or neither.

use std::sync::Arc;

use uuid::Uuid;

use super::sealing::idempotency_row;
use super::{SessionRecord, StoreError};
use crate::domain::time::Timestamp;
use crate::secrets::{Column, KeyRing};

/// An idempotency key: the merchant's request id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct IdempotencyKey {
    pub merchant_id: Uuid,
    pub request_id: Uuid,
}

/// A response kept under an idempotency key, replayed byte for byte.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// The answer shows this redirect session, and is kept as this reference instead of its
    /// bytes (headers and body are not kept): a `201` shows the session as it was created, a
    /// `200` the session as it stands, which must be terminal (nothing changes it any more).
    /// A replay rebuilds the same bytes from the session's row.
    pub session: Option<Uuid>,
}

/// A kept record as read: the fingerprint of its request, and its answer (`None` in a record
/// an earlier version left without one).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Kept {
    pub fingerprint: Vec<u8>,
    pub answer: Option<StoredResponse>,
    /// The row of the session the answer refers to (`StoredResponse::session`), read with it.
    pub session: Option<SessionRecord>,
}

impl Kept {
    /// What this record says to a request with `fingerprint`. A record without an answer
    /// (left by a version that wrote one before the change) decides nothing: the request runs,
    /// and its answer replaces it.
    pub fn decide(self, fingerprint: &[u8; 32]) -> Option<Found> {
        if self.fingerprint != fingerprint {
            return Some(Found::Reused);
        }
        let answer = self.answer?;
        Some(Found::Replay(Box::new(Replay { answer, session: self.session })))
    }
}

/// What a kept record says to a request that carries its key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Found {
    /// The same request was answered before: answer this again.
    Replay(Box<Replay>),
    /// The key was used for a different request.
    Reused,
}

/// A kept answer to replay, with the session row it refers to (when it refers to one).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Replay {
    pub answer: StoredResponse,
    pub session: Option<SessionRecord>,
}

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
