//! The outbox: an event and its deliveries, queued in the transaction of the state change that
//! caused it (with the `NOTIFY` that wakes the dispatchers), and a test event with its one
//! attempt.

use super::*;

/// An event about to be written with the state change that caused it.
pub struct NewEvent {
    pub id: Uuid,
    pub merchant_id: Uuid,
    pub session_id: Uuid,
    pub kind: EventType,
    /// The JSON text stored and sent (`crate::store::event_data`).
    pub data: String,
}

/// Inserts `events` and queues one delivery per event and subscription of its merchant that
/// wants it, in the caller's transaction (`Held` for a suspended subscription); answers how
/// many deliveries became `Pending`. The subscriptions are read `FOR KEY SHARE`: a concurrent
/// `delete_subscription` (which locks its row `FOR UPDATE` first) either waits for this commit
/// and then cancels these deliveries too, or commits first and its subscription is no longer
/// matched here. Either way no delivery stays pending for a deleted subscription; and likewise
/// for suspending and resuming (see the module's comment).
pub async fn record_events(tx: &Transaction<'_>, events: &[NewEvent], now: Timestamp) -> Result<usize> {
    if events.is_empty() {
        return Ok(0);
    }
    let ids: Vec<Uuid> = events.iter().map(|e| e.id).collect();
    let merchants: Vec<Uuid> = events.iter().map(|e| e.merchant_id).collect();
    let sessions: Vec<Uuid> = events.iter().map(|e| e.session_id).collect();
    let kinds: Vec<&str> = events.iter().map(|e| e.kind.as_str()).collect();
    let data: Vec<&str> = events.iter().map(|e| e.data.as_str()).collect();
    execute(
        tx,
        "INSERT INTO events (id, merchant_id, session_id, type, data, created_on)
         SELECT id, merchant_id, session_id, type, data, $6
           FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::text[], $5::text[])
             AS e(id, merchant_id, session_id, type, data)",
        &[&ids, &merchants, &sessions, &kinds, &data, &Ts(now)],
    )
    .await?;

    let wanted = events.iter().fold(0, |mask, e| mask | EventMask::of(e.kind).bits());
    let mut distinct = merchants.clone();
    distinct.sort_unstable();
    distinct.dedup();
    // Locked in id order (see the module's comment); answered newest first, the order SQLite
    // reads them in (through its by-merchant index). A row locked `FOR UPDATE` meanwhile is
    // read again once free, so its `state` is the one committed.
    let subscriptions = query(
        tx,
        "WITH locked AS MATERIALIZED (
             SELECT id, merchant_id, event_mask, state, created_on FROM subscriptions
              WHERE merchant_id = ANY($1) AND (event_mask & $2) <> 0
              ORDER BY id
                FOR KEY SHARE
         )
         SELECT id, merchant_id, event_mask, state = 'Suspended' FROM locked ORDER BY created_on DESC, id DESC",
        &[&distinct, &mask_param(wanted)],
    )
    .await?
    .iter()
    .map(|row| Ok((row.try_get::<_, Uuid>(0)?, row.try_get::<_, Uuid>(1)?, row.try_get::<_, i32>(2)?, row.try_get(3)?)))
    .collect::<Result<Vec<(Uuid, Uuid, i32, bool)>>>()?;

    let (mut delivery_ids, mut event_ids, mut subscription_ids, mut merchant_ids, mut states) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for event in events {
        let bit = EventMask::of(event.kind).bits();
        for (subscription, merchant, mask, suspended) in &subscriptions {
            if *merchant == event.merchant_id && i64::from(*mask) & bit != 0 {
                delivery_ids.push(Uuid::now_v7());
                event_ids.push(event.id);
                subscription_ids.push(*subscription);
                merchant_ids.push(*merchant);
                states.push(if *suspended { DeliveryState::Held } else { DeliveryState::Pending }.as_str());
            }
        }
    }
    if delivery_ids.is_empty() {
        return Ok(0);
    }
    execute(
        tx,
        "INSERT INTO deliveries (id, event_id, subscription_id, merchant_id, state, next_attempt_on, created_on,
                                 last_modified_on)
         SELECT id, event_id, subscription_id, merchant_id, state, $6, $6, $6
           FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::uuid[], $5::text[])
             AS d(id, event_id, subscription_id, merchant_id, state)",
        &[&delivery_ids, &event_ids, &subscription_ids, &merchant_ids, &states, &Ts(now)],
    )
    .await?;
    let pending = states.iter().filter(|state| **state == DeliveryState::Pending.as_str()).count();
    if pending > 0 {
        notify_dispatchers(tx).await?;
    }
    Ok(pending)
}

/// Wakes every instance's dispatcher when the caller's transaction commits (PostgreSQL sends
/// notifications on commit only, and drops them on rollback).
pub(super) async fn notify_dispatchers(tx: &Transaction<'_>) -> Result<()> {
    execute(tx, "SELECT pg_notify($1, '')", &[&listen::CHANNEL]).await?;
    Ok(())
}

/// Records a test event (of no session), its finished delivery and its one attempt in one
/// transaction; under a guard, keeps the answer in the same transaction.
pub async fn record_test_delivery(
    c: &mut Client,
    test: TestDelivery,
    guard: Option<Guard<AttemptRecord>>,
) -> Result<Guarded<AttemptRecord>> {
    let int = |n: i64| i32::try_from(n).map_err(|_| internal(format!("{n} does not fit an integer column")));
    let delivery_id = Uuid::now_v7();
    let state = if test.delivered { DeliveryState::Delivered } else { DeliveryState::Failed };
    let finished = Timestamp::from_millis(test.time.millis().saturating_add(test.attempt.duration_ms.max(0)));
    let a = &test.attempt;
    let tx = c.transaction().await?;
    execute(
        &tx,
        "INSERT INTO events (id, merchant_id, session_id, type, data, created_on)
         VALUES ($1, $2, $3, $4, $5, $6)",
        &[
            &test.event_id,
            &test.merchant_id,
            &NO_SESSION,
            &EventKind::RedirectSessionTest.as_str(),
            &test.data,
            &Ts(test.time),
        ],
    )
    .await?;
    execute(
        &tx,
        "INSERT INTO deliveries (id, event_id, subscription_id, merchant_id, state, attempts, retry_index,
                                 next_attempt_on, created_on, last_modified_on)
         VALUES ($1, $2, $3, $4, $5, 1, 0, $6, $6, $7)",
        &[
            &delivery_id,
            &test.event_id,
            &test.subscription_id,
            &test.merchant_id,
            &state.as_str(),
            &Ts(test.time),
            &Ts(finished),
        ],
    )
    .await?;
    execute(
        &tx,
        "INSERT INTO delivery_attempts (delivery_id, attempt, started_on, duration_ms, status, error)
         VALUES ($1, $2, $3, $4, $5, $6)",
        &[&delivery_id, &int(a.attempt)?, &Ts(a.started_on), &a.duration_ms, &a.status.map(i32::from), &a.error],
    )
    .await?;
    Ok(finish(tx, guard, test.attempt, 0).await?.0)
}
