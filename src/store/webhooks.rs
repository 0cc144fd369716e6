//! The records of webhooks that the `Store` speaks in: subscriptions, deliveries, attempts.

use std::collections::HashMap;
use std::time::Duration;

use uuid::Uuid;

use crate::domain::event::EventType;
use crate::domain::subscription::SubscriptionSpec;
use crate::domain::time::Timestamp;

/// A subscription as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubscriptionRecord {
    pub id: Uuid,
    pub merchant_id: Uuid,
    pub spec: SubscriptionSpec,
    pub signing_secret: String,
    pub created_on: Timestamp,
    pub last_modified_on: Timestamp,
    pub version: i64,
}

/// What creating a subscription came to.
#[derive(Debug)]
pub enum PutSubscriptionOutcome {
    Created(SubscriptionRecord),
    /// A subscription with this id exists (of this or another merchant); nothing changed.
    Exists(SubscriptionRecord),
}

/// The deliveries waiting to be sent, in all instances (for `/metrics`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backlog {
    /// Deliveries in state `Pending` (due, or scheduled for a retry).
    pub pending: u64,
    /// When the oldest due one became due (`None` when none is due at the time asked).
    pub oldest_due: Option<Timestamp>,
}

/// A merchant's request to replace or remove one of its subscriptions.
#[derive(Clone, Debug)]
pub struct SubscriptionChange {
    pub merchant_id: Uuid,
    pub id: Uuid,
    /// The `If-Match` header, when sent.
    pub if_match: Option<String>,
    pub now: Timestamp,
}

/// What replacing or removing a subscription came to.
#[derive(Debug)]
pub enum ChangeSubscriptionOutcome {
    /// Done; the record after a PATCH, or the removed record after a DELETE.
    Done(SubscriptionRecord),
    NotFound,
    OtherMerchant,
    VersionMismatch,
}

/// Where a delivery is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, utoipa::ToSchema)]
pub enum DeliveryState {
    Pending,
    Delivered,
    Failed,
    Cancelled,
}

impl DeliveryState {
    /// All states.
    pub const ALL: [DeliveryState; 4] =
        [DeliveryState::Pending, DeliveryState::Delivered, DeliveryState::Failed, DeliveryState::Cancelled];

    /// The stored and JSON name.
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryState::Pending => "Pending",
            DeliveryState::Delivered => "Delivered",
            DeliveryState::Failed => "Failed",
            DeliveryState::Cancelled => "Cancelled",
        }
    }

    /// The state named `text`.
    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.as_str() == text)
    }
}

/// One attempt to deliver.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AttemptRecord {
    pub attempt: i64,
    pub started_on: Timestamp,
    pub duration_ms: i64,
    pub status: Option<u16>,
    pub error: Option<String>,
}

/// A delivery with its attempts, for the deliveries API.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeliveryRecord {
    pub id: Uuid,
    pub event_id: Uuid,
    pub event_type: EventType,
    pub session_id: Uuid,
    pub subscription_id: Uuid,
    pub merchant_id: Uuid,
    pub state: DeliveryState,
    pub next_attempt_on: Option<Timestamp>,
    pub created_on: Timestamp,
    pub last_modified_on: Timestamp,
    pub attempts: Vec<AttemptRecord>,
}

/// Which of a merchant's deliveries to list, newest first.
#[derive(Clone, Debug, Default)]
pub struct DeliveryFilter {
    pub subscription_id: Option<Uuid>,
    pub state: Option<DeliveryState>,
    pub after: Option<(Timestamp, Uuid)>,
    pub limit: usize,
}

/// A delivery claimed by a dispatcher: everything needed to send it.
#[derive(Clone, Debug)]
pub struct ClaimedDelivery {
    pub id: Uuid,
    pub event_id: Uuid,
    pub event_type: EventType,
    pub event_time: Timestamp,
    /// The event's `data` member, as JSON text.
    pub data: String,
    pub callback_url: String,
    pub api_key: String,
    pub signing_secret: String,
    /// Attempts made before this one.
    pub attempts: i64,
    /// Position in the retry schedule.
    pub retry_index: i64,
}

/// Chooses which due deliveries a claim takes: in the order offered, at most `limit`, and no
/// subscription beyond `per_subscription` leases counting those it already holds. So one
/// receiver that never answers holds at most `per_subscription` of a dispatcher's slots, and
/// the claim goes on to other subscriptions' deliveries behind its backlog.
#[derive(Debug)]
pub struct ClaimPicker {
    /// Leases held per subscription: those counted before the claim plus those picked.
    leased: HashMap<Uuid, usize>,
    per_subscription: usize,
    limit: usize,
    picked: Vec<Uuid>,
    passed_over: usize,
}

impl ClaimPicker {
    /// A picker for up to `limit` deliveries; `leased` are the unexpired leases per subscription.
    pub fn new(leased: HashMap<Uuid, usize>, per_subscription: usize, limit: usize) -> Self {
        ClaimPicker { leased, per_subscription: per_subscription.max(1), limit, picked: Vec::new(), passed_over: 0 }
    }

    /// Offers one due delivery of `subscription`; answers whether it was taken.
    pub fn offer(&mut self, delivery: Uuid, subscription: Uuid) -> bool {
        if self.is_full() {
            return false;
        }
        let leased = self.leased.entry(subscription).or_default();
        if *leased >= self.per_subscription {
            self.passed_over += 1;
            return false;
        }
        *leased += 1;
        self.picked.push(delivery);
        true
    }

    /// Whether `limit` deliveries have been taken.
    pub fn is_full(&self) -> bool {
        self.picked.len() >= self.limit
    }

    /// How many offered deliveries were passed over because their subscription was at its cap.
    pub fn passed_over(&self) -> usize {
        self.passed_over
    }

    /// The deliveries taken, in the order offered.
    pub fn into_picked(self) -> Vec<Uuid> {
        self.picked
    }
}

/// What one attempt came to, as the dispatcher records it.
#[derive(Clone, Debug)]
pub struct AttemptOutcome {
    pub delivery_id: Uuid,
    pub owner: Uuid,
    pub attempt: AttemptRecord,
    /// `None` when delivered or failed for good; else when to try again.
    pub next: NextStep,
}

/// What happens to a delivery after an attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NextStep {
    Delivered,
    RetryAt(Timestamp),
    Failed,
}

/// What asking to redeliver came to.
#[derive(Debug)]
pub enum RedeliverOutcome {
    /// Queued again (or already queued).
    Queued(DeliveryRecord),
    NotFound,
    OtherMerchant,
    /// Cancelled deliveries (their subscription is gone) cannot be redelivered.
    Cancelled,
}

/// What a redelivery comes to, decided from the delivery alone.
pub enum RedeliverDecision {
    /// Nothing changes; answer this.
    Answer(RedeliverOutcome),
    /// A `Failed` or `Delivered` delivery to queue again, once its subscription is known to
    /// still exist.
    Requeue(DeliveryRecord),
}

/// Decides a redelivery of `delivery` (`None`: no such id) for `merchant_id`.
pub fn decide_redelivery(delivery: Option<DeliveryRecord>, merchant_id: Uuid) -> RedeliverDecision {
    let answer = RedeliverDecision::Answer;
    let Some(delivery) = delivery else {
        return answer(RedeliverOutcome::NotFound);
    };
    if delivery.merchant_id != merchant_id {
        return answer(RedeliverOutcome::OtherMerchant);
    }
    match delivery.state {
        DeliveryState::Cancelled => answer(RedeliverOutcome::Cancelled),
        DeliveryState::Pending => answer(RedeliverOutcome::Queued(delivery)),
        DeliveryState::Failed | DeliveryState::Delivered => RedeliverDecision::Requeue(delivery),
    }
}

/// How long records are kept.
#[derive(Clone, Copy, Debug)]
pub struct Retention {
    /// Finished deliveries, their attempts and their events.
    pub deliveries: Duration,
    /// Idempotency records, and the one-time-code state of sessions (a session lives at most a day).
    pub idempotency: Duration,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(n: usize) -> Vec<Uuid> {
        (0..n).map(|_| Uuid::new_v4()).collect()
    }

    #[test]
    fn a_claim_takes_no_subscription_past_its_cap_and_goes_on_to_the_others() {
        let (slow, healthy) = (Uuid::new_v4(), Uuid::new_v4());
        let mut picker = ClaimPicker::new(HashMap::from([(slow, 2)]), 3, 10);
        let backlog = ids(5);
        let others = ids(2);
        let taken: Vec<bool> = backlog.iter().map(|d| picker.offer(*d, slow)).collect();
        assert_eq!(taken, [true, false, false, false, false], "two held already, the cap is three");
        for d in &others {
            assert!(picker.offer(*d, healthy));
        }
        assert_eq!(picker.passed_over(), 4);
        assert_eq!(picker.into_picked(), [backlog[0], others[0], others[1]]);
    }

    #[test]
    fn a_claim_stops_at_its_limit() {
        let subscription = Uuid::new_v4();
        let mut picker = ClaimPicker::new(HashMap::new(), 100, 2);
        let offered = ids(3);
        assert!(picker.offer(offered[0], subscription) && picker.offer(offered[1], subscription));
        assert!(picker.is_full());
        assert!(!picker.offer(offered[2], subscription));
        assert_eq!(picker.passed_over(), 0, "not passed over for the cap");
        assert_eq!(picker.into_picked(), offered[..2]);
    }
}
