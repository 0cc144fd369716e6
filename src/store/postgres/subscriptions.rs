//! Event subscriptions: the `SubscriptionStore` of the PostgreSQL store.

use super::*;

#[async_trait]
impl SubscriptionStore for PostgresStore {
    async fn put_subscription_guarded(
        &self,
        record: SubscriptionRecord,
        guard: Option<Guard<PutSubscriptionOutcome>>,
    ) -> Result<Guarded<PutSubscriptionOutcome>> {
        let (ring, sealed) = (self.secrets.clone(), seal_subscription(&self.secrets, record.clone())?);
        self.run(move |c| Box::pin(webhooks::put_subscription(c, ring, record, sealed, guard))).await
    }

    async fn get_subscription(&self, id: Uuid) -> Result<Option<SubscriptionRecord>> {
        let stored = self.run(move |c| Box::pin(webhooks::get_subscription(c, id))).await?;
        stored.map(|record| open_subscription(&self.secrets, record)).transpose()
    }

    async fn list_subscriptions(
        &self,
        merchant_id: Uuid,
        after: Option<(Timestamp, Uuid)>,
        limit: usize,
    ) -> Result<Vec<SubscriptionRecord>> {
        let stored = self.run(move |c| Box::pin(webhooks::list_subscriptions(c, merchant_id, after, limit))).await?;
        stored.into_iter().map(|record| open_subscription(&self.secrets, record)).collect()
    }

    async fn patch_subscription_guarded(
        &self,
        change: SubscriptionChange,
        spec: SubscriptionSpec,
        guard: Option<Guard<ChangeSubscriptionOutcome>>,
    ) -> Result<Guarded<ChangeSubscriptionOutcome>> {
        let ring = self.secrets.clone();
        let (outcome, queued) =
            self.run(move |c| Box::pin(webhooks::patch_subscription(c, ring, change, spec, guard))).await?;
        self.queued_deliveries(queued);
        Ok(outcome)
    }

    async fn delete_subscription_guarded(
        &self,
        change: SubscriptionChange,
        guard: Option<Guard<ChangeSubscriptionOutcome>>,
    ) -> Result<Guarded<ChangeSubscriptionOutcome>> {
        let ring = self.secrets.clone();
        self.run(move |c| Box::pin(webhooks::delete_subscription(c, ring, change, guard))).await
    }

    async fn rotate_subscription_secret_guarded(
        &self,
        change: SubscriptionChange,
        rotation: SecretRotation,
        guard: Option<Guard<ChangeSubscriptionOutcome>>,
    ) -> Result<Guarded<ChangeSubscriptionOutcome>> {
        let ring = self.secrets.clone();
        self.run(move |c| Box::pin(webhooks::rotate_secret(c, ring, change, rotation, guard))).await
    }

    async fn resume_subscription_guarded(
        &self,
        change: SubscriptionChange,
        guard: Option<Guard<ChangeSubscriptionOutcome>>,
    ) -> Result<Guarded<ChangeSubscriptionOutcome>> {
        let ring = self.secrets.clone();
        let (outcome, queued) =
            self.run(move |c| Box::pin(webhooks::resume_subscription(c, ring, change, guard))).await?;
        self.queued_deliveries(queued);
        Ok(outcome)
    }
}
