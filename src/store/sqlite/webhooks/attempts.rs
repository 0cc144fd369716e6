//! Recording attempts: each delivery moves on, each receiver keeps its run of failures, and
//! subscriptions are suspended as the policy says.

use super::*;

/// Records attempts and moves their deliveries on, each only while its lease is still held;
/// keeps each receiver's run of failures (`failing_since`) and suspends subscriptions as
/// `policy` says, holding their pending deliveries. Answers the subscriptions it suspended.
pub fn record_attempts(
    c: &Connection,
    outcomes: &[AttemptOutcome],
    now: Timestamp,
    policy: SuspendPolicy,
) -> Result<Vec<Suspension>> {
    let mut attempt = c
        .prepare_cached(
            "INSERT OR IGNORE INTO delivery_attempts (delivery_id, attempt, started_on, duration_ms, status, error)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )
        .map_err(|e| internal(&e))?;
    let mut leased = c
        .prepare_cached(
            "SELECT d.subscription_id, s.state, s.failing_since
               FROM deliveries d JOIN subscriptions s ON s.id = d.subscription_id
              WHERE d.id = ?1 AND d.lease_owner = ?2 AND d.state = 'Pending'",
        )
        .map_err(|e| internal(&e))?;
    let mut update = c
        .prepare_cached(
            "UPDATE deliveries SET state = ?3, attempts = max(attempts, ?4), retry_index = retry_index + ?5,
                    next_attempt_on = ?6, lease_owner = NULL, lease_until = NULL, last_modified_on = ?7
              WHERE id = ?1 AND lease_owner = ?2 AND state = 'Pending'",
        )
        .map_err(|e| internal(&e))?;
    let mut suspensions = Vec::new();
    for outcome in outcomes {
        let a = &outcome.attempt;
        attempt
            .execute(params![
                outcome.delivery_id.as_bytes(),
                a.attempt,
                a.started_on.millis(),
                a.duration_ms,
                a.status,
                a.error
            ])
            .map_err(|e| internal(&e))?;
        let lease = leased
            .query_row(params![outcome.delivery_id.as_bytes(), outcome.owner.as_bytes()], |row| {
                Ok((row.get::<_, [u8; 16]>(0)?, row.get::<_, String>(1)? == "Suspended", row.get::<_, Option<i64>>(2)?))
            })
            .optional()
            .map_err(|e| internal(&e))?;
        // The lease is gone (another dispatcher sends it again): only the attempt is kept.
        let Some((subscription, mut suspended, failing_since)) = lease else {
            continue;
        };
        if outcome.next == NextStep::Delivered {
            // A success ends a run of failures (the usual case: there is none to end).
            if failing_since.is_some() {
                receiver_answered(c, &subscription)?;
            }
        } else {
            let since = failing_since.map_or(a.started_on, Timestamp::from_millis);
            if failing_since.is_none() {
                receiver_failing_since(c, &subscription, since)?;
            }
            if !suspended {
                if let Some(reason) = policy.decide(a.status, since, now) {
                    suspend(c, &subscription, reason, now)?;
                    suspensions.push(Suspension { subscription_id: Uuid::from_bytes(subscription), reason });
                    suspended = true;
                }
            }
        }
        let (state, retry_step, next) = match outcome.next {
            NextStep::Delivered => (DeliveryState::Delivered, 0, now),
            NextStep::Failed => (DeliveryState::Failed, 1, now),
            NextStep::RetryAt(_) if suspended => (DeliveryState::Held, 1, now),
            NextStep::RetryAt(at) => (DeliveryState::Pending, 1, at),
        };
        update
            .execute(params![
                outcome.delivery_id.as_bytes(),
                outcome.owner.as_bytes(),
                state.as_str(),
                a.attempt,
                retry_step,
                next.millis(),
                now.millis()
            ])
            .map_err(|e| internal(&e))?;
    }
    // Every outcome of the batch is applied first (a later one may have been delivered), then
    // what is still pending for a suspended subscription is held.
    for suspension in &suspensions {
        hold_pending(c, suspension.subscription_id, now)?;
    }
    Ok(suspensions)
}

/// The receiver of `subscription` answered 2xx: its run of failures is over.
pub(super) fn receiver_answered(c: &Connection, subscription: &[u8; 16]) -> Result<()> {
    c.prepare_cached("UPDATE subscriptions SET failing_since = NULL WHERE id = ?1")
        .and_then(|mut s| s.execute(params![subscription]))
        .map(drop)
        .map_err(|e| internal(&e))
}

/// The receiver of `subscription` began a run of failures at `since`.
pub(super) fn receiver_failing_since(c: &Connection, subscription: &[u8; 16], since: Timestamp) -> Result<()> {
    c.prepare_cached("UPDATE subscriptions SET failing_since = ?2 WHERE id = ?1 AND failing_since IS NULL")
        .and_then(|mut s| s.execute(params![subscription, since.millis()]))
        .map(drop)
        .map_err(|e| internal(&e))
}

/// Suspends `subscription` for `reason`.
pub(super) fn suspend(c: &Connection, subscription: &[u8; 16], reason: SuspendReason, now: Timestamp) -> Result<()> {
    c.prepare_cached(
        "UPDATE subscriptions SET state = 'Suspended', suspended_on = ?2, suspended_reason = ?3,
                version = version + 1, last_modified_on = ?2
          WHERE id = ?1",
    )
    .and_then(|mut s| s.execute(params![subscription, now.millis(), reason.as_str()]))
    .map(drop)
    .map_err(|e| internal(&e))
}

/// Holds the pending deliveries of a suspended subscription, leased ones too: the results of
/// their attempts in flight are then refused, and they go out again on resume.
pub(super) fn hold_pending(c: &Connection, subscription: Uuid, now: Timestamp) -> Result<()> {
    c.prepare_cached(
        "UPDATE deliveries INDEXED BY deliveries_due_by_subscription
            SET state = 'Held', lease_owner = NULL, lease_until = NULL, last_modified_on = ?2
          WHERE subscription_id = ?1 AND state = 'Pending'",
    )
    .and_then(|mut s| s.execute(params![subscription.as_bytes(), now.millis()]))
    .map(drop)
    .map_err(|e| internal(&e))
}
