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
    let mut suspensions = Vec::new();
    for outcome in outcomes {
        if let Some(suspension) = record_attempt(c, outcome, now, policy)? {
            suspensions.push(suspension);
        }
    }
    // Every outcome of the batch is applied first (a later one may have been delivered), then
    // what is still pending for a suspended subscription is held.
    for suspension in &suspensions {
        hold_pending(c, suspension.subscription_id, now)?;
    }
    Ok(suspensions)
}

/// Records one attempt and, while its lease is still held, moves its delivery on and its
/// receiver's run of failures (`Receiver::attempted`); answers the suspension it caused.
fn record_attempt(
    c: &Connection,
    outcome: &AttemptOutcome,
    now: Timestamp,
    policy: SuspendPolicy,
) -> Result<Option<Suspension>> {
    let a = &outcome.attempt;
    c.prepare_cached(
        "INSERT OR IGNORE INTO delivery_attempts (delivery_id, attempt, started_on, duration_ms, status, error)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )
    .and_then(|mut s| {
        s.execute(params![
            outcome.delivery_id.as_bytes(),
            a.attempt,
            a.started_on.millis(),
            a.duration_ms,
            a.status,
            a.error
        ])
    })
    .map_err(|e| internal(&e))?;
    let lease = c
        .prepare_cached(
            "SELECT d.subscription_id, s.state, s.failing_since
               FROM deliveries d JOIN subscriptions s ON s.id = d.subscription_id
              WHERE d.id = ?1 AND d.lease_owner = ?2 AND d.state = 'Pending'",
        )
        .and_then(|mut s| {
            s.query_row(params![outcome.delivery_id.as_bytes(), outcome.owner.as_bytes()], |row| {
                let failing_since = row.get::<_, Option<i64>>(2)?.map(Timestamp::from_millis);
                let suspended = row.get::<_, String>(1)? == "Suspended";
                Ok((uuid_at(row, 0)?, Receiver { suspended, failing_since }))
            })
            .optional()
        })
        .map_err(|e| internal(&e))?;
    // The lease is gone (another dispatcher sends it again): only the attempt is kept.
    let Some((subscription, mut receiver)) = lease else {
        return Ok(None);
    };
    let before = receiver.failing_since;
    let suspend = receiver.attempted(outcome, policy, now);
    if receiver.failing_since != before {
        set_failing_since(c, subscription, receiver.failing_since)?;
    }
    if let Some(reason) = suspend {
        suspend_subscription(c, subscription, reason, now)?;
    }
    let (state, retry_step, next) = delivery_moves(outcome.next, receiver.suspended, now);
    c.prepare_cached(
        "UPDATE deliveries SET state = ?3, attempts = max(attempts, ?4), retry_index = retry_index + ?5,
                next_attempt_on = ?6, lease_owner = NULL, lease_until = NULL, last_modified_on = ?7
          WHERE id = ?1 AND lease_owner = ?2 AND state = 'Pending'",
    )
    .and_then(|mut s| {
        s.execute(params![
            outcome.delivery_id.as_bytes(),
            outcome.owner.as_bytes(),
            state.as_str(),
            a.attempt,
            retry_step,
            next.millis(),
            now.millis()
        ])
    })
    .map_err(|e| internal(&e))?;
    Ok(suspend.map(|reason| Suspension { subscription_id: subscription, reason }))
}

/// Keeps when the receiver of `subscription` began its current run of failures (`None`: it
/// answered, the run is over).
fn set_failing_since(c: &Connection, subscription: Uuid, since: Option<Timestamp>) -> Result<()> {
    c.prepare_cached("UPDATE subscriptions SET failing_since = ?2 WHERE id = ?1")
        .and_then(|mut s| s.execute(params![subscription.as_bytes(), since.map(Timestamp::millis)]))
        .map(drop)
        .map_err(|e| internal(&e))
}

/// Suspends `subscription` for `reason`.
fn suspend_subscription(c: &Connection, subscription: Uuid, reason: SuspendReason, now: Timestamp) -> Result<()> {
    c.prepare_cached(
        "UPDATE subscriptions SET state = 'Suspended', suspended_on = ?2, suspended_reason = ?3,
                version = version + 1, last_modified_on = ?2
          WHERE id = ?1",
    )
    .and_then(|mut s| s.execute(params![subscription.as_bytes(), now.millis(), reason.as_str()]))
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
