//! Event subscriptions: the `SubscriptionStore` of the SQLite store.

use super::*;

#[async_trait]
impl SubscriptionStore for SqliteStore {
    async fn put_subscription_guarded(
        &self,
        record: SubscriptionRecord,
        guard: Option<Guard<PutSubscriptionOutcome>>,
    ) -> Result<Guarded<PutSubscriptionOutcome>, StoreError> {
        let sealed = seal_subscription(&self.secrets, record.clone())?;
        let ring = self.secrets.clone();
        let put = move |c: &Connection| {
            let outcome = match webhooks::put_subscription(c, sealed)? {
                PutSubscriptionOutcome::Created(_) => PutSubscriptionOutcome::Created(record),
                PutSubscriptionOutcome::Exists(existing) => {
                    PutSubscriptionOutcome::Exists(open_subscription(&ring, existing)?)
                }
            };
            Ok((outcome, 0))
        };
        Ok(self.writer.run_undoable(move |c| idempotency::guarded(c, guard, put)).await?.0)
    }

    async fn get_subscription(&self, id: Uuid) -> Result<Option<SubscriptionRecord>, StoreError> {
        let stored = self.point_reads.run(move |c| webhooks::get_subscription(c, id)).await?;
        stored.map(|record| open_subscription(&self.secrets, record)).transpose()
    }

    async fn list_subscriptions(
        &self,
        merchant_id: Uuid,
        after: Option<(Timestamp, Uuid)>,
        limit: usize,
    ) -> Result<Vec<SubscriptionRecord>, StoreError> {
        let stored = self.readers.run(move |c| webhooks::list_subscriptions(c, merchant_id, after, limit)).await?;
        stored.into_iter().map(|record| open_subscription(&self.secrets, record)).collect()
    }

    async fn patch_subscription_guarded(
        &self,
        change: SubscriptionChange,
        spec: SubscriptionSpec,
        guard: Option<Guard<ChangeSubscriptionOutcome>>,
    ) -> Result<Guarded<ChangeSubscriptionOutcome>, StoreError> {
        let ring = self.secrets.clone();
        let patch = move |c: &Connection| webhooks::patch_subscription(c, &ring, &change, spec);
        let (outcome, queued) = self.writer.run_undoable(move |c| idempotency::guarded(c, guard, patch)).await?;
        self.queued_deliveries(queued);
        Ok(outcome)
    }

    async fn delete_subscription_guarded(
        &self,
        change: SubscriptionChange,
        guard: Option<Guard<ChangeSubscriptionOutcome>>,
    ) -> Result<Guarded<ChangeSubscriptionOutcome>, StoreError> {
        let ring = self.secrets.clone();
        let delete = move |c: &Connection| Ok((webhooks::delete_subscription(c, &ring, &change)?, 0));
        Ok(self.writer.run_undoable(move |c| idempotency::guarded(c, guard, delete)).await?.0)
    }

    async fn rotate_subscription_secret_guarded(
        &self,
        change: SubscriptionChange,
        rotation: SecretRotation,
        guard: Option<Guard<ChangeSubscriptionOutcome>>,
    ) -> Result<Guarded<ChangeSubscriptionOutcome>, StoreError> {
        let ring = self.secrets.clone();
        let rotate = move |c: &Connection| Ok((webhooks::rotate_secret(c, &ring, &change, &rotation)?, 0));
        Ok(self.writer.run_undoable(move |c| idempotency::guarded(c, guard, rotate)).await?.0)
    }

    async fn resume_subscription_guarded(
        &self,
        change: SubscriptionChange,
        guard: Option<Guard<ChangeSubscriptionOutcome>>,
    ) -> Result<Guarded<ChangeSubscriptionOutcome>, StoreError> {
        let ring = self.secrets.clone();
        let resume = move |c: &Connection| webhooks::resume_subscription(c, &ring, &change);
        let (outcome, queued) = self.writer.run_undoable(move |c| idempotency::guarded(c, guard, resume)).await?;
        self.queued_deliveries(queued);
        Ok(outcome)
    }
}
