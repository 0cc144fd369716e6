//! The outbox: the deliveries of an event, queued in the transaction that records it, and a
//! test event with its one attempt.

use super::*;

/// Records a test event, its finished delivery and its one attempt.
pub fn record_test_delivery(c: &Connection, test: &TestDelivery) -> Result<()> {
    let delivery_id = Uuid::now_v7();
    let state = if test.delivered { DeliveryState::Delivered } else { DeliveryState::Failed };
    let finished = test.time.millis() + test.attempt.duration_ms;
    let a = &test.attempt;
    c.prepare_cached(
        "INSERT INTO events (id, merchant_id, session_id, type, data, created_on) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )
    .and_then(|mut s| {
        s.execute(params![
            test.event_id.as_bytes(),
            test.merchant_id.as_bytes(),
            NO_SESSION.as_bytes(),
            EventKind::RedirectSessionTest.as_str(),
            test.data,
            test.time.millis()
        ])
    })
    .and_then(|_| {
        c.prepare_cached(
            "INSERT INTO deliveries (id, event_id, subscription_id, merchant_id, state, attempts, next_attempt_on,
                                     created_on, last_modified_on)
             VALUES (?1, ?2, ?3, ?4, ?5, 1, ?6, ?6, ?7)",
        )?
        .execute(params![
            delivery_id.as_bytes(),
            test.event_id.as_bytes(),
            test.subscription_id.as_bytes(),
            test.merchant_id.as_bytes(),
            state.as_str(),
            test.time.millis(),
            finished
        ])
    })
    .and_then(|_| {
        c.prepare_cached(
            "INSERT INTO delivery_attempts (delivery_id, attempt, started_on, duration_ms, status, error)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )?
        .execute(params![
            delivery_id.as_bytes(),
            a.attempt,
            a.started_on.millis(),
            a.duration_ms,
            a.status,
            a.error
        ])
    })
    .map(drop)
    .map_err(|e| internal(&e))
}

/// Queues one delivery of `event_id` per subscription of the merchant that wants `event`;
/// answers how many. Runs in the transaction that inserts the event.
pub fn queue_deliveries(
    c: &Connection,
    event_id: Uuid,
    merchant_id: Uuid,
    event: EventType,
    now: Timestamp,
) -> Result<usize> {
    // A suspended subscription's deliveries are held, not attempted.
    let subscriptions: Vec<([u8; 16], String)> = c
        .prepare_cached(
            "SELECT id, CASE state WHEN 'Suspended' THEN 'Held' ELSE 'Pending' END FROM subscriptions
              WHERE merchant_id = ?1 AND (event_mask & ?2) != 0",
        )
        .and_then(|mut s| {
            s.query_map(params![merchant_id.as_bytes(), EventMask::of(event).bits()], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect()
        })
        .map_err(|e| internal(&e))?;
    let mut insert = c
        .prepare_cached(
            "INSERT INTO deliveries (id, event_id, subscription_id, merchant_id, state, next_attempt_on, created_on,
                                     last_modified_on)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6, ?6)",
        )
        .map_err(|e| internal(&e))?;
    for (subscription, state) in &subscriptions {
        insert
            .execute(params![
                Uuid::now_v7().as_bytes(),
                event_id.as_bytes(),
                subscription,
                merchant_id.as_bytes(),
                state,
                now.millis()
            ])
            .map_err(|e| internal(&e))?;
    }
    Ok(subscriptions.iter().filter(|(_, state)| state == "Pending").count())
}
