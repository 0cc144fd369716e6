//! Webhook deliveries: the `DeliveryStore` of the PostgreSQL store.

use super::*;

#[async_trait]
impl DeliveryStore for PostgresStore {
    async fn recover_deliveries_guarded(
        &self,
        change: SubscriptionChange,
        window: RecoverWindow,
        guard: Option<Guard<RecoverOutcome>>,
    ) -> Result<Guarded<RecoverOutcome>> {
        let (outcome, queued) = self.run(move |c| Box::pin(webhooks::recover(c, change, window, guard))).await?;
        self.queued_deliveries(queued);
        Ok(outcome)
    }

    async fn record_test_delivery_guarded(
        &self,
        test: TestDelivery,
        guard: Option<Guard<AttemptRecord>>,
    ) -> Result<Guarded<AttemptRecord>> {
        self.run(move |c| Box::pin(webhooks::record_test_delivery(c, test, guard))).await
    }

    async fn dispatcher_started(&self, owner: Uuid) -> Result<usize> {
        let liveness = self.listener.liveness();
        liveness.register(owner);
        if !liveness.held_within(owner, OPERATION_TIMEOUT).await {
            tracing::warn!(dispatcher.id = %owner, "no liveness lock yet; the dispatcher claims once it holds one");
        }
        // The claims of a dispatcher that is gone (an earlier process of this instance, say) are
        // free from the first claim on.
        let now = Timestamp::now();
        let freed = self.run(move |c| Box::pin(webhooks::free_orphaned_leases(c, now))).await?;
        Ok(usize::try_from(freed).unwrap_or(usize::MAX))
    }

    async fn dispatcher_stopped(&self, owner: Uuid) {
        self.listener.liveness().unregister(owner);
    }

    async fn claim_deliveries(
        &self,
        owner: Uuid,
        now: Timestamp,
        lease_until: Timestamp,
        limit: usize,
        per_subscription: usize,
    ) -> Result<Vec<ClaimedDelivery>> {
        let liveness = self.listener.liveness();
        if !liveness.may_claim(owner) {
            // Without its liveness lock others may be taking this dispatcher's deliveries over.
            tracing::debug!(dispatcher.id = %owner, "no liveness lock; not claiming");
            return Ok(Vec::new());
        }
        let free_orphans = liveness.orphans_due(now);
        let ring = self.secrets.clone();
        let (freed, claimed) = self
            .run(move |c| {
                Box::pin(async move {
                    let freed = if free_orphans { webhooks::free_orphaned_leases(c, now).await? } else { 0 };
                    let claimed =
                        webhooks::claim_deliveries(c, ring, owner, now, lease_until, limit, per_subscription).await?;
                    Ok((freed, claimed))
                })
            })
            .await?;
        if freed > 0 {
            tracing::info!(deliveries = freed, "took over deliveries claimed by a dispatcher that is gone");
        }
        Ok(claimed)
    }

    async fn record_attempts(
        &self,
        outcomes: Vec<AttemptOutcome>,
        now: Timestamp,
        policy: SuspendPolicy,
    ) -> Result<Vec<Suspension>> {
        let (suspensions, queued) =
            self.run(move |c| Box::pin(webhooks::record_attempts(c, outcomes, now, policy))).await?;
        self.queued_deliveries(queued);
        Ok(suspensions)
    }

    async fn release_claims(&self, owner: Uuid, ids: Vec<Uuid>) -> Result<()> {
        self.run(move |c| Box::pin(webhooks::release_claims(c, owner, ids))).await
    }

    async fn list_deliveries(&self, merchant_id: Uuid, filter: DeliveryFilter) -> Result<Vec<DeliveryRecord>> {
        self.run(move |c| Box::pin(webhooks::list_deliveries(c, merchant_id, filter))).await
    }

    async fn redeliver_guarded(
        &self,
        merchant_id: Uuid,
        id: Uuid,
        now: Timestamp,
        guard: Option<Guard<RedeliverOutcome>>,
    ) -> Result<Guarded<RedeliverOutcome>> {
        let (outcome, queued) =
            self.run(move |c| Box::pin(webhooks::redeliver(c, merchant_id, id, now, guard))).await?;
        self.queued_deliveries(queued);
        Ok(outcome)
    }

    async fn delivery_backlog(&self, now: Timestamp) -> Result<Backlog> {
        self.run(move |c| Box::pin(webhooks::backlog(c, now))).await
    }

    async fn purge(&self, now: Timestamp, retention: Retention, batch: usize) -> Result<usize> {
        self.run(move |c| Box::pin(webhooks::purge(c, now, retention, batch))).await
    }

    fn deliveries_queued(&self) -> Arc<Notify> {
        self.queued.clone()
    }
}
