//! The decisions both store backends take on what they read, written once: whether a merchant
//! may change a subscription (`owned`), where recovered deliveries go (`recovered_state`), and
//! what an attempt does to its receiver's run of failures and to its delivery (`Receiver`,
//! `delivery_moves`).

use uuid::Uuid;

use super::{
    AttemptOutcome, ChangeSubscriptionOutcome, DeliveryState, NextStep, RecoverOutcome, SubscriptionRecord,
    SubscriptionStatus, SuspendPolicy, SuspendReason,
};
use crate::domain::record::etag_matches;
use crate::domain::time::Timestamp;

/// Whether `merchant_id` may change the subscription as read (`found`, under whatever lock the
/// backend holds) with the `If-Match` it sent; else what the change answers. Both backends use
/// it, so they cannot disagree.
#[allow(clippy::result_large_err)] // Moved once, into the answer; boxing would gain nothing.
pub fn owned(
    found: Option<SubscriptionRecord>,
    merchant_id: Uuid,
    if_match: Option<&str>,
) -> Result<SubscriptionRecord, ChangeSubscriptionOutcome> {
    match found {
        None => Err(ChangeSubscriptionOutcome::NotFound),
        Some(s) if s.merchant_id != merchant_id => Err(ChangeSubscriptionOutcome::OtherMerchant),
        Some(s) if if_match.is_some_and(|tag| !etag_matches(tag, &s.etag())) => {
            Err(ChangeSubscriptionOutcome::VersionMismatch)
        }
        Some(s) => Ok(s),
    }
}

/// Where recovering moves the failed deliveries of the subscription `owned` answered (`owned`):
/// back to `Pending`, or `Held` while it is suspended; or what recovering answers instead
/// (`RecoverOutcome` has no answer of its own for a tag that does not match).
#[allow(clippy::result_large_err)] // As `owned`.
pub fn recovered_state(
    owned: Result<SubscriptionRecord, ChangeSubscriptionOutcome>,
) -> Result<DeliveryState, RecoverOutcome> {
    match owned {
        Ok(record) => Ok(match record.status {
            SubscriptionStatus::Active => DeliveryState::Pending,
            SubscriptionStatus::Suspended { .. } => DeliveryState::Held,
        }),
        Err(ChangeSubscriptionOutcome::OtherMerchant) => Err(RecoverOutcome::OtherMerchant),
        Err(_) => Err(RecoverOutcome::NotFound),
    }
}

/// A subscription's receiver as a batch of attempts finds it: whether it is suspended, and
/// when its current run of failed attempts began. Both backends apply each attempt with
/// `attempted` and `delivery_moves`, so they cannot disagree.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Receiver {
    pub suspended: bool,
    pub failing_since: Option<Timestamp>,
}

impl Receiver {
    /// Applies one attempt (in the order recorded): a success ends the run of failures; a
    /// failure starts one or goes on with it, and suspends the subscription when `policy` says
    /// so (answered with the reason, once).
    pub fn attempted(
        &mut self,
        outcome: &AttemptOutcome,
        policy: SuspendPolicy,
        now: Timestamp,
    ) -> Option<SuspendReason> {
        if outcome.next == NextStep::Delivered {
            self.failing_since = None;
            return None;
        }
        let since = *self.failing_since.get_or_insert(outcome.attempt.started_on);
        if self.suspended {
            return None;
        }
        let reason = policy.decide(outcome.attempt.status, since, now)?;
        self.suspended = true;
        Some(reason)
    }
}

/// Where an attempted delivery goes next (its receiver `suspended` or not): its state, how far
/// its retry schedule moves, and when it is due.
pub fn delivery_moves(next: NextStep, suspended: bool, now: Timestamp) -> (DeliveryState, i32, Timestamp) {
    match next {
        NextStep::Delivered => (DeliveryState::Delivered, 0, now),
        NextStep::Failed => (DeliveryState::Failed, 1, now),
        NextStep::RetryAt(_) if suspended => (DeliveryState::Held, 1, now),
        NextStep::RetryAt(at) => (DeliveryState::Pending, 1, at),
    }
}
