//! Sessions: create, read, list, cancel, expire, and the merchant-and-session read.

use async_trait::async_trait;
use uuid::Uuid;

use super::idempotency::{Guard, Guarded};
use super::*;
use crate::domain::time::Timestamp;

#[async_trait]
pub trait SessionStore: Send + Sync + 'static {
    /// Inserts the session unless its id exists (checking the customer first); under a
    /// guard, keeps the answer in the same transaction (`idempotency`).
    async fn create_session_guarded(
        &self,
        session: SessionRecord,
        guard: Option<Guard<CreateOutcome>>,
    ) -> Result<Guarded<CreateOutcome>, StoreError>;

    /// `create_session_guarded` without an idempotency key.
    async fn create_session(&self, session: SessionRecord) -> Result<CreateOutcome, StoreError> {
        ran(self.create_session_guarded(session, None).await?)
    }

    async fn get_session(&self, id: Uuid) -> Result<Option<SessionRecord>, StoreError>;

    /// `merchant_by_key` and `get_session` read together, at one point in time and in one
    /// step (one transaction or round trip): the merchant API's most frequent request.
    async fn merchant_and_session(
        &self,
        key_hash: [u8; 32],
        id: Uuid,
    ) -> Result<(Option<Merchant>, Option<SessionRecord>), StoreError>;

    /// `limit + 1` at most, so the caller knows whether another page follows.
    async fn list_sessions(
        &self,
        merchant_id: Uuid,
        filter: SessionFilter,
        now: Timestamp,
    ) -> Result<Vec<SessionRecord>, StoreError>;

    /// One conditional write: cancels and records the event, or says why not; under a guard,
    /// keeps the answer in the same transaction (`idempotency`).
    async fn cancel_session_guarded(
        &self,
        request: CancelRequest,
        guard: Option<Guard<CancelOutcome>>,
    ) -> Result<Guarded<CancelOutcome>, StoreError>;

    /// `cancel_session_guarded` without an idempotency key.
    async fn cancel_session(&self, request: CancelRequest) -> Result<CancelOutcome, StoreError> {
        ran(self.cancel_session_guarded(request, None).await?)
    }

    /// Records `Expired` and its event for up to `batch` sessions whose time has passed;
    /// answers how many it expired.
    async fn expire_due(&self, now: Timestamp, batch: usize) -> Result<usize, StoreError>;
}
