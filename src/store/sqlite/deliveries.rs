//! Webhook deliveries: the `DeliveryStore` of the SQLite store.

use super::*;

#[async_trait]
impl DeliveryStore for SqliteStore {
    async fn recover_deliveries_guarded(
        &self,
        change: SubscriptionChange,
        window: RecoverWindow,
        guard: Option<Guard<RecoverOutcome>>,
    ) -> Result<Guarded<RecoverOutcome>, StoreError> {
        let recover = move |c: &Connection| webhooks::recover(c, &change, window);
        let (outcome, queued) = self.writer.run_undoable(move |c| idempotency::guarded(c, guard, recover)).await?;
        self.queued_deliveries(queued);
        Ok(outcome)
    }

    async fn record_test_delivery_guarded(
        &self,
        test: TestDelivery,
        guard: Option<Guard<AttemptRecord>>,
    ) -> Result<Guarded<AttemptRecord>, StoreError> {
        let record = move |c: &Connection| {
            webhooks::record_test_delivery(c, &test)?;
            Ok((test.attempt, 0))
        };
        Ok(self.writer.run_undoable(move |c| idempotency::guarded(c, guard, record)).await?.0)
    }

    async fn dispatcher_started(&self, owner: Uuid) -> Result<usize, StoreError> {
        self.writer.run(move |c| webhooks::void_other_leases(c, owner)).await
    }

    async fn dispatcher_stopped(&self, _owner: Uuid) {}

    async fn claim_deliveries(
        &self,
        owner: Uuid,
        now: Timestamp,
        lease_until: Timestamp,
        limit: usize,
        per_subscription: usize,
    ) -> Result<Vec<ClaimedDelivery>, StoreError> {
        let ring = self.secrets.clone();
        self.writer
            .run(move |c| webhooks::claim_deliveries(c, &ring, owner, now, lease_until, limit, per_subscription))
            .await
    }

    async fn record_attempts(
        &self,
        outcomes: Vec<AttemptOutcome>,
        now: Timestamp,
        policy: SuspendPolicy,
    ) -> Result<Vec<Suspension>, StoreError> {
        let retries = outcomes.iter().any(|o| matches!(o.next, crate::store::webhooks::NextStep::RetryAt(_)));
        let suspensions = self.writer.run(move |c| webhooks::record_attempts(c, &outcomes, now, policy)).await?;
        self.queued_deliveries(usize::from(retries));
        Ok(suspensions)
    }

    async fn release_claims(&self, owner: Uuid, ids: Vec<Uuid>) -> Result<(), StoreError> {
        self.writer.run(move |c| webhooks::release_claims(c, owner, &ids)).await
    }

    async fn list_deliveries(
        &self,
        merchant_id: Uuid,
        filter: DeliveryFilter,
    ) -> Result<Vec<DeliveryRecord>, StoreError> {
        // The deliveries and their attempts from one snapshot (one read transaction): read
        // apart, an attempt recorded between the reads would show beside the delivery as it
        // was before it.
        self.readers
            .run(move |c| {
                let snapshot = c.unchecked_transaction().map_err(|e| internal(&e))?;
                let deliveries = webhooks::list_deliveries(&snapshot, merchant_id, &filter)?;
                snapshot.finish().map_err(|e| internal(&e))?;
                Ok(deliveries)
            })
            .await
    }

    async fn redeliver_guarded(
        &self,
        merchant_id: Uuid,
        id: Uuid,
        now: Timestamp,
        guard: Option<Guard<RedeliverOutcome>>,
    ) -> Result<Guarded<RedeliverOutcome>, StoreError> {
        let redeliver = move |c: &Connection| {
            let outcome = webhooks::redeliver(c, merchant_id, id, now)?;
            let queued = usize::from(matches!(outcome, RedeliverOutcome::Queued(_)));
            Ok((outcome, queued))
        };
        let (outcome, queued) = self.writer.run_undoable(move |c| idempotency::guarded(c, guard, redeliver)).await?;
        self.queued_deliveries(queued);
        Ok(outcome)
    }

    async fn delivery_backlog(&self, now: Timestamp) -> Result<Backlog, StoreError> {
        self.readers.run(move |c| webhooks::backlog(c, now)).await
    }

    async fn purge(&self, now: Timestamp, retention: Retention, batch: usize) -> Result<usize, StoreError> {
        self.writer.run(move |c| webhooks::purge(c, now, retention, batch)).await
    }

    fn deliveries_queued(&self) -> Arc<Notify> {
        self.queued.clone()
    }
}
