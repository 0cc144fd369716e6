//! Webhook deliveries: claiming and recording attempts, listing, redelivery, recovery, test
//! events, the backlog and retention.

use std::sync::Arc;

use async_trait::async_trait;
use tokio::sync::Notify;
use uuid::Uuid;

use super::idempotency::{Guard, Guarded};
use super::webhooks::*;
use super::*;
use crate::domain::time::Timestamp;

#[async_trait]
pub trait DeliveryStore: Send + Sync + 'static {
    /// Queues again up to `window.limit` `Failed` deliveries of the subscription whose event
    /// lies in the window (held instead while it is suspended), with a fresh retry schedule;
    /// under a guard, keeps the answer in the same transaction.
    async fn recover_deliveries_guarded(
        &self,
        change: SubscriptionChange,
        window: RecoverWindow,
        guard: Option<Guard<RecoverOutcome>>,
    ) -> Result<Guarded<RecoverOutcome>, StoreError>;

    /// Records a test event, its delivery (`Delivered` or `Failed`, never retried) and its one
    /// attempt; under a guard, keeps the answer in the same transaction.
    async fn record_test_delivery_guarded(
        &self,
        test: TestDelivery,
        guard: Option<Guard<AttemptRecord>>,
    ) -> Result<Guarded<AttemptRecord>, StoreError>;

    /// Announces a dispatcher that is about to claim deliveries as `owner`, and frees the
    /// leases of dispatchers that are gone; answers how many deliveries it freed. SQLite (one
    /// process owns the file): every lease of another owner is void. PostgreSQL: `owner` holds
    /// a liveness lock until `dispatcher_stopped` or its process ends, and the leases of a
    /// dispatcher whose lock is free count as run out.
    async fn dispatcher_started(&self, owner: Uuid) -> Result<usize, StoreError>;

    /// The dispatcher `owner` has stopped claiming and recording.
    async fn dispatcher_stopped(&self, owner: Uuid);

    /// Leases up to `limit` due deliveries to `owner` until `lease_until`, leaving out
    /// subscriptions that would then hold more than `per_subscription` unexpired leases.
    async fn claim_deliveries(
        &self,
        owner: Uuid,
        now: Timestamp,
        lease_until: Timestamp,
        limit: usize,
        per_subscription: usize,
    ) -> Result<Vec<ClaimedDelivery>, StoreError>;

    /// Records attempts (in one transaction) and moves their deliveries on; keeps track of
    /// how long each receiver has failed and suspends subscriptions as `policy` says (their
    /// pending deliveries are then held). Answers the subscriptions it suspended.
    async fn record_attempts(
        &self,
        outcomes: Vec<AttemptOutcome>,
        now: Timestamp,
        policy: SuspendPolicy,
    ) -> Result<Vec<Suspension>, StoreError>;

    /// Gives up leases on deliveries that were claimed but not attempted.
    async fn release_claims(&self, owner: Uuid, ids: Vec<Uuid>) -> Result<(), StoreError>;

    /// A merchant's deliveries with their attempts, newest first, `limit + 1` at most.
    async fn list_deliveries(
        &self,
        merchant_id: Uuid,
        filter: DeliveryFilter,
    ) -> Result<Vec<DeliveryRecord>, StoreError>;

    /// Queues a failed or delivered delivery again; under a guard, keeps the answer in the
    /// same transaction.
    async fn redeliver_guarded(
        &self,
        merchant_id: Uuid,
        id: Uuid,
        now: Timestamp,
        guard: Option<Guard<RedeliverOutcome>>,
    ) -> Result<Guarded<RedeliverOutcome>, StoreError>;

    /// `redeliver_guarded` without an idempotency key.
    async fn redeliver(&self, merchant_id: Uuid, id: Uuid, now: Timestamp) -> Result<RedeliverOutcome, StoreError> {
        ran(self.redeliver_guarded(merchant_id, id, now, None).await?)
    }

    /// The pending deliveries and the oldest due one at `now` (one read over the due index).
    async fn delivery_backlog(&self, now: Timestamp) -> Result<webhooks::Backlog, StoreError>;

    /// Deletes up to `batch` rows of each kind past their retention; answers how many went.
    async fn purge(&self, now: Timestamp, retention: Retention, batch: usize) -> Result<usize, StoreError>;

    /// Notified after a commit that queued deliveries (wakes the dispatcher).
    fn deliveries_queued(&self) -> Arc<Notify>;
}
