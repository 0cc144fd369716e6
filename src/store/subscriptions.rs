//! Event subscriptions: create, read, list, replace, remove, rotate the secret, resume.

use async_trait::async_trait;
use uuid::Uuid;

use super::idempotency::{Guard, Guarded};
use super::webhooks::*;
use super::*;
use crate::domain::subscription::SubscriptionSpec;
use crate::domain::time::Timestamp;

#[async_trait]
pub trait SubscriptionStore: Send + Sync + 'static {
    /// Inserts the subscription unless its id exists; under a guard, keeps the answer in the
    /// same transaction (`idempotency`).
    async fn put_subscription_guarded(
        &self,
        record: SubscriptionRecord,
        guard: Option<Guard<PutSubscriptionOutcome>>,
    ) -> Result<Guarded<PutSubscriptionOutcome>, StoreError>;

    /// `put_subscription_guarded` without an idempotency key.
    async fn put_subscription(&self, record: SubscriptionRecord) -> Result<PutSubscriptionOutcome, StoreError> {
        ran(self.put_subscription_guarded(record, None).await?)
    }

    async fn get_subscription(&self, id: Uuid) -> Result<Option<SubscriptionRecord>, StoreError>;

    /// A merchant's subscriptions, newest first, `limit + 1` at most.
    async fn list_subscriptions(
        &self,
        merchant_id: Uuid,
        after: Option<(Timestamp, Uuid)>,
        limit: usize,
    ) -> Result<Vec<SubscriptionRecord>, StoreError>;

    /// Replaces all three fields, and resumes a suspended subscription (as
    /// `resume_subscription_guarded` does); under a guard, keeps the answer in the same
    /// transaction.
    async fn patch_subscription_guarded(
        &self,
        change: SubscriptionChange,
        spec: SubscriptionSpec,
        guard: Option<Guard<ChangeSubscriptionOutcome>>,
    ) -> Result<Guarded<ChangeSubscriptionOutcome>, StoreError>;

    /// `patch_subscription_guarded` without an idempotency key.
    async fn patch_subscription(
        &self,
        merchant_id: Uuid,
        id: Uuid,
        spec: SubscriptionSpec,
        if_match: Option<String>,
        now: Timestamp,
    ) -> Result<ChangeSubscriptionOutcome, StoreError> {
        let change = SubscriptionChange { merchant_id, id, if_match, now };
        ran(self.patch_subscription_guarded(change, spec, None).await?)
    }

    /// Removes it and cancels its queued and held deliveries; under a guard, keeps the answer in the
    /// same transaction.
    async fn delete_subscription_guarded(
        &self,
        change: SubscriptionChange,
        guard: Option<Guard<ChangeSubscriptionOutcome>>,
    ) -> Result<Guarded<ChangeSubscriptionOutcome>, StoreError>;

    /// `delete_subscription_guarded` without an idempotency key.
    async fn delete_subscription(
        &self,
        merchant_id: Uuid,
        id: Uuid,
        if_match: Option<String>,
        now: Timestamp,
    ) -> Result<ChangeSubscriptionOutcome, StoreError> {
        let change = SubscriptionChange { merchant_id, id, if_match, now };
        ran(self.delete_subscription_guarded(change, None).await?)
    }

    /// Makes `rotation.secret` the signing secret; the one it replaces keeps signing for
    /// `rotation.grace` (not at all when zero, and a secret replaced earlier stops at once).
    /// Answers the record opened, with `previous_secret` set while it signs; under a guard,
    /// keeps the answer in the same transaction.
    async fn rotate_subscription_secret_guarded(
        &self,
        change: SubscriptionChange,
        rotation: SecretRotation,
        guard: Option<Guard<ChangeSubscriptionOutcome>>,
    ) -> Result<Guarded<ChangeSubscriptionOutcome>, StoreError>;

    /// Makes a suspended subscription active again and queues its held deliveries (an active
    /// one is answered as it is); under a guard, keeps the answer in the same transaction.
    async fn resume_subscription_guarded(
        &self,
        change: SubscriptionChange,
        guard: Option<Guard<ChangeSubscriptionOutcome>>,
    ) -> Result<Guarded<ChangeSubscriptionOutcome>, StoreError>;
}
