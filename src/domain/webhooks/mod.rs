//! The records of webhooks — subscriptions, deliveries, attempts — and the rules on them (which
//! deliveries a claim takes, what a redelivery or a failing receiver comes to), which both
//! backends and the handlers share.

mod decisions;

use std::collections::HashMap;
use std::time::Duration;

use uuid::Uuid;

use crate::domain::event::EventKind;
use crate::domain::subscription::SubscriptionSpec;
use crate::domain::time::Timestamp;

pub use decisions::{delivery_moves, owned, recovered_state, Receiver};

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
    /// The secret the last rotation replaced, still signing beside the new one until it expires.
    pub previous_secret: Option<PreviousSecret>,
    pub status: SubscriptionStatus,
}

impl SubscriptionRecord {
    /// The entity tag of the subscription's representation: it changes with every write.
    pub fn etag(&self) -> String {
        format!("\"{}\"", self.version)
    }
}

/// A replaced signing secret during its overlap with the new one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PreviousSecret {
    pub secret: String,
    pub expires_on: Timestamp,
}

impl PreviousSecret {
    /// The secret while it still signs at `now`.
    pub fn signing_at(&self, now: Timestamp) -> Option<&str> {
        (now < self.expires_on).then_some(self.secret.as_str())
    }
}

/// Whether deliveries of a subscription are attempted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SubscriptionStatus {
    Active,
    /// New deliveries are held (never attempted, never dropped) until it is resumed.
    Suspended {
        since: Timestamp,
        reason: SuspendReason,
    },
}

/// Why a subscription was suspended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, utoipa::ToSchema)]
pub enum SuspendReason {
    /// The receiver answered `410 Gone`.
    ReceiverGone,
    /// The receiver answered nothing but failures for `webhook_suspend_after`.
    ReceiverFailing,
}

impl SuspendReason {
    /// All reasons.
    pub const ALL: [SuspendReason; 2] = [SuspendReason::ReceiverGone, SuspendReason::ReceiverFailing];

    /// The stored and JSON name.
    pub fn as_str(self) -> &'static str {
        match self {
            SuspendReason::ReceiverGone => "ReceiverGone",
            SuspendReason::ReceiverFailing => "ReceiverFailing",
        }
    }

    /// The reason named `text`.
    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.as_str() == text)
    }
}

impl SubscriptionStatus {
    /// From the stored columns `state`, `suspended_on` and `suspended_reason`; `None` when they
    /// do not make sense together.
    pub fn from_columns(state: &str, since: Option<Timestamp>, reason: Option<&str>) -> Option<Self> {
        match (state, since, reason.and_then(SuspendReason::parse)) {
            ("Active", _, _) => Some(SubscriptionStatus::Active),
            ("Suspended", Some(since), Some(reason)) => Some(SubscriptionStatus::Suspended { since, reason }),
            _ => None,
        }
    }

    /// The stored `state`.
    pub fn state(self) -> &'static str {
        match self {
            SubscriptionStatus::Active => "Active",
            SubscriptionStatus::Suspended { .. } => "Suspended",
        }
    }
}

/// When the dispatcher suspends a subscription: after a `410 Gone`, or when its receiver has
/// answered nothing but failures for `failing_for`.
#[derive(Clone, Copy, Debug)]
pub struct SuspendPolicy {
    pub failing_for: Duration,
}

impl SuspendPolicy {
    /// Whether an attempt that failed with `status` at `now`, the receiver failing since
    /// `failing_since` (this attempt included), suspends the subscription, and why.
    pub fn decide(&self, status: Option<u16>, failing_since: Timestamp, now: Timestamp) -> Option<SuspendReason> {
        if status == Some(410) {
            Some(SuspendReason::ReceiverGone)
        } else if now.millis() - failing_since.millis() >= self.failing_for.as_millis() as i64 {
            Some(SuspendReason::ReceiverFailing)
        } else {
            None
        }
    }
}

/// A subscription the dispatcher suspended while recording attempts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Suspension {
    pub subscription_id: Uuid,
    pub reason: SuspendReason,
}

/// A new signing secret and how long the one it replaces keeps signing.
#[derive(Clone, Debug)]
pub struct SecretRotation {
    /// In clear; the store seals it.
    pub secret: String,
    pub grace: Duration,
}

/// The session id stored with a test event, which belongs to no session (the events table
/// requires one): read back as `None`.
pub const NO_SESSION: Uuid = Uuid::nil();

/// The most failed deliveries one recovery queues; the answer says when more are left.
pub const RECOVER_AT_MOST: usize = 100_000;
/// The widest window one recovery covers.
pub const RECOVER_WINDOW_AT_MOST: Duration = Duration::from_secs(14 * 24 * 3600);

/// Which failed deliveries of a subscription to queue again: those whose event lies in
/// `[since, until)`, at most `limit`.
#[derive(Clone, Copy, Debug)]
pub struct RecoverWindow {
    pub since: Timestamp,
    pub until: Timestamp,
    pub limit: usize,
}

/// What a recovery came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecoverOutcome {
    /// `queued` deliveries are pending again (held, while the subscription is suspended);
    /// `more` when the window holds further failed deliveries beyond the limit.
    Queued {
        queued: u64,
        more: bool,
    },
    NotFound,
    OtherMerchant,
}

/// A test event sent to a subscription, with its one attempt: recorded as a delivery that is
/// never retried.
#[derive(Clone, Debug)]
pub struct TestDelivery {
    pub merchant_id: Uuid,
    pub subscription_id: Uuid,
    pub event_id: Uuid,
    pub time: Timestamp,
    /// The event's `data` member, as JSON text.
    pub data: String,
    pub attempt: AttemptRecord,
    /// Whether the receiver answered 2xx.
    pub delivered: bool,
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
    /// Deliveries in state `Held` (their subscription is suspended).
    pub held: u64,
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
    /// Kept while its subscription is suspended; pending again when it is resumed.
    Held,
}

impl DeliveryState {
    /// All states.
    pub const ALL: [DeliveryState; 5] = [
        DeliveryState::Pending,
        DeliveryState::Delivered,
        DeliveryState::Failed,
        DeliveryState::Cancelled,
        DeliveryState::Held,
    ];

    /// The stored and JSON name.
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryState::Pending => "Pending",
            DeliveryState::Delivered => "Delivered",
            DeliveryState::Failed => "Failed",
            DeliveryState::Cancelled => "Cancelled",
            DeliveryState::Held => "Held",
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
    pub event_type: EventKind,
    /// `None` for a test event.
    pub session_id: Option<Uuid>,
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
    pub event_type: EventKind,
    pub event_time: Timestamp,
    /// The event's `data` member, as JSON text.
    pub data: String,
    pub callback_url: String,
    pub api_key: String,
    pub signing_secret: String,
    /// The secret a rotation replaced, while it still signs (at the time of the claim).
    pub previous_secret: Option<String>,
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
        DeliveryState::Pending | DeliveryState::Held => answer(RedeliverOutcome::Queued(delivery)),
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
