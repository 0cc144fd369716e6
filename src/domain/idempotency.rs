//! Idempotency records (docs/DESIGN.md "Idempotency"): the key, the kept answer, and the one
//! decision a found record makes. The store keeps them (`crate::store::idempotency`).

use uuid::Uuid;

use super::record::SessionRecord;

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
