//! The PostgreSQL side of webhooks: the outbox (events and their deliveries, queued in the
//! state change's transaction, with a `NOTIFY`), subscriptions, claiming with leases and
//! `SKIP LOCKED`, recording attempts, and retention.
//!
//! Lock order, so that writers on different instances never wait on each other in a cycle:
//! a subscription row before its deliveries, several subscriptions in id order, and several
//! deliveries in id order.
//!
//! A subscription's `state` is changed only under a `FOR UPDATE` lock on its row (suspending,
//! resuming, deleting), which conflicts with the `FOR KEY SHARE` that queuing an event takes:
//! so a delivery is queued either before the change (and the change holds or queues it with
//! the others) or after it (and sees the new state), never `Pending` for a suspended one nor
//! `Held` for an active one.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use deadpool_postgres::{GenericClient, Transaction};
use tokio_postgres::types::Json;
use tokio_postgres::Row;
use uuid::Uuid;

use super::idempotency::finish;
use super::{
    execute, int8, internal, listen, parse_event_kind, query, query_one, query_opt, ts, ts_opt, Client, Result, Sql, Ts,
};
use crate::domain::event::{EventKind, EventType};
use crate::domain::subscription::{EventMask, SubscriptionSpec};
use crate::domain::time::Timestamp;
use crate::secrets::KeyRing;
use crate::store::sealing::{open_claimed, open_subscription, seal_api_key, seal_signing_secret};
use crate::store::webhooks::{
    decide_redelivery, AttemptOutcome, AttemptRecord, Backlog, ChangeSubscriptionOutcome, ClaimPicker, ClaimedDelivery,
    DeliveryFilter, DeliveryRecord, DeliveryState, NextStep, PreviousSecret, PutSubscriptionOutcome, RecoverOutcome,
    RecoverWindow, RedeliverDecision, RedeliverOutcome, Retention, SecretRotation, SubscriptionChange,
    SubscriptionRecord, SubscriptionStatus, SuspendPolicy, SuspendReason, Suspension, TestDelivery, NO_SESSION,
};
use crate::store::{etag_matches, Guard, Guarded};

/// An event about to be written with the state change that caused it.
pub struct NewEvent {
    pub id: Uuid,
    pub merchant_id: Uuid,
    pub session_id: Uuid,
    pub kind: EventType,
    pub data: serde_json::Value,
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
    let data: Vec<Json<&serde_json::Value>> = events.iter().map(|e| Json(&e.data)).collect();
    execute(
        tx,
        "INSERT INTO events (id, merchant_id, session_id, type, data, created_on)
         SELECT id, merchant_id, session_id, type, data, $6
           FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::text[], $5::jsonb[])
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
async fn notify_dispatchers(tx: &Transaction<'_>) -> Result<()> {
    execute(tx, "SELECT pg_notify($1, '')", &[&listen::CHANNEL]).await?;
    Ok(())
}

/// An event mask as the `integer` column holds it.
fn mask_param(bits: i64) -> i32 {
    i32::try_from(bits).unwrap_or(0)
}

const SUBSCRIPTION_COLUMNS: &str = "id, merchant_id, callback_url, api_key, event_mask, signing_secret, created_on,
     last_modified_on, version, previous_secret, previous_secret_expires_on, state, suspended_on, suspended_reason";

fn subscription_from_row(row: &Row) -> Result<SubscriptionRecord> {
    let previous_secret = match (row.try_get::<_, Option<String>>(9)?, ts_opt(row, 10)?) {
        (Some(secret), Some(expires_on)) => Some(PreviousSecret { secret, expires_on }),
        _ => None,
    };
    let state: &str = row.try_get(11)?;
    let reason: Option<&str> = row.try_get(13)?;
    let status = SubscriptionStatus::from_columns(state, ts_opt(row, 12)?, reason)
        .ok_or_else(|| internal(format!("subscription state {state} with reason {reason:?}")))?;
    Ok(SubscriptionRecord {
        id: row.try_get(0)?,
        merchant_id: row.try_get(1)?,
        spec: SubscriptionSpec {
            callback_url: row.try_get(2)?,
            api_key: row.try_get(3)?,
            event_types: EventMask::from_bits(i64::from(row.try_get::<_, i32>(4)?)),
        },
        signing_secret: row.try_get(5)?,
        created_on: ts(row, 6)?,
        last_modified_on: ts(row, 7)?,
        version: row.try_get(8)?,
        previous_secret,
        status,
    })
}

async fn load_subscription<C: GenericClient>(c: &C, id: Uuid, lock: &str) -> Result<Option<SubscriptionRecord>> {
    let sql = format!("SELECT {SUBSCRIPTION_COLUMNS} FROM subscriptions WHERE id = $1 {lock}");
    query_opt(c, &sql, &[&id]).await?.as_ref().map(subscription_from_row).transpose()
}

/// The subscription with this id, of any merchant, as stored (sealed).
pub async fn get_subscription(c: &mut Client, id: Uuid) -> Result<Option<SubscriptionRecord>> {
    load_subscription(&*c, id, "").await
}

/// Inserts the subscription (its secrets sealed in `sealed`, in clear in `record`) unless its
/// id exists; under a guard, keeps the answer in the same transaction.
pub async fn put_subscription(
    c: &mut Client,
    ring: Arc<KeyRing>,
    record: SubscriptionRecord,
    sealed: SubscriptionRecord,
    guard: Option<Guard<PutSubscriptionOutcome>>,
) -> Result<Guarded<PutSubscriptionOutcome>> {
    let tx = c.transaction().await?;
    let outcome = match put_in(&tx, sealed).await? {
        PutSubscriptionOutcome::Created(_) => PutSubscriptionOutcome::Created(record),
        PutSubscriptionOutcome::Exists(existing) => PutSubscriptionOutcome::Exists(open_subscription(&ring, existing)?),
    };
    Ok(finish(tx, guard, outcome, 0).await?.0)
}

async fn put_in(tx: &Transaction<'_>, record: SubscriptionRecord) -> Result<PutSubscriptionOutcome> {
    let (suspended_on, reason) = match record.status {
        SubscriptionStatus::Active => (None, None),
        SubscriptionStatus::Suspended { since, reason } => (Some(Ts(since)), Some(reason.as_str())),
    };
    // A subscription deleted between the insert and the read is inserted again.
    for _ in 0..3 {
        let inserted = execute(
            tx,
            &format!(
                "INSERT INTO subscriptions ({SUBSCRIPTION_COLUMNS})
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)
                 ON CONFLICT (id) DO NOTHING"
            ),
            &[
                &record.id,
                &record.merchant_id,
                &record.spec.callback_url,
                &record.spec.api_key,
                &mask_param(record.spec.event_types.bits()),
                &record.signing_secret,
                &Ts(record.created_on),
                &Ts(record.last_modified_on),
                &record.version,
                &record.previous_secret.as_ref().map(|p| p.secret.as_str()),
                &record.previous_secret.as_ref().map(|p| Ts(p.expires_on)),
                &record.status.state(),
                &suspended_on,
                &reason,
            ],
        )
        .await?;
        if inserted == 1 {
            return Ok(PutSubscriptionOutcome::Created(record));
        }
        if let Some(existing) = load_subscription(tx, record.id, "").await? {
            return Ok(PutSubscriptionOutcome::Exists(existing));
        }
    }
    Err(internal("the subscription kept vanishing"))
}

/// A merchant's subscriptions, newest first, `limit + 1` at most.
pub async fn list_subscriptions(
    c: &mut Client,
    merchant_id: Uuid,
    after: Option<(Timestamp, Uuid)>,
    limit: usize,
) -> Result<Vec<SubscriptionRecord>> {
    let mut sql = Sql::new(&format!("SELECT {SUBSCRIPTION_COLUMNS} FROM subscriptions WHERE merchant_id = "));
    let merchant = sql.bind(merchant_id);
    sql.push(&merchant);
    if let Some((time, id)) = after {
        let (time, id) = (sql.bind(Ts(time)), sql.bind(id));
        sql.push(&format!(" AND (created_on, id) < ({time}, {id})"));
    }
    let limit = sql.bind(int8(limit + 1));
    sql.push(&format!(" ORDER BY created_on DESC, id DESC LIMIT {limit}"));
    sql.query(&*c).await?.iter().map(subscription_from_row).collect()
}

/// The merchant's subscription locked with `lock`, or why it cannot be changed.
async fn owned_subscription(
    tx: &Transaction<'_>,
    change: &SubscriptionChange,
    lock: &str,
) -> Result<std::result::Result<SubscriptionRecord, ChangeSubscriptionOutcome>> {
    Ok(match load_subscription(tx, change.id, lock).await? {
        None => Err(ChangeSubscriptionOutcome::NotFound),
        Some(s) if s.merchant_id != change.merchant_id => Err(ChangeSubscriptionOutcome::OtherMerchant),
        Some(s) if change.if_match.as_deref().is_some_and(|tag| !etag_matches(tag, &format!("\"{}\"", s.version))) => {
            Err(ChangeSubscriptionOutcome::VersionMismatch)
        }
        Some(s) => Ok(s),
    })
}

/// Replaces all three fields of a merchant's subscription, resuming it when suspended (its
/// held deliveries are then queued); answers the record opened and how many deliveries it
/// queued. The row is locked before the `If-Match` check, so of two PATCHes with the same tag
/// only the first succeeds.
pub async fn patch_subscription(
    c: &mut Client,
    ring: Arc<KeyRing>,
    change: SubscriptionChange,
    spec: SubscriptionSpec,
    guard: Option<Guard<ChangeSubscriptionOutcome>>,
) -> Result<(Guarded<ChangeSubscriptionOutcome>, usize)> {
    let tx = c.transaction().await?;
    let (outcome, queued) = patch_in(&tx, &ring, &change, spec).await?;
    finish(tx, guard, outcome, queued).await
}

async fn patch_in(
    tx: &Transaction<'_>,
    ring: &KeyRing,
    change: &SubscriptionChange,
    spec: SubscriptionSpec,
) -> Result<(ChangeSubscriptionOutcome, usize)> {
    let (id, now) = (change.id, change.now);
    let mut record = match owned_subscription(tx, change, "FOR NO KEY UPDATE").await? {
        Ok(record) => open_subscription(ring, record)?,
        Err(outcome) => return Ok((outcome, 0)),
    };
    let queued = resume_in(tx, &mut record, now).await?;
    if record.spec != spec {
        let sealed_key = seal_api_key(ring, id, &spec.api_key)?;
        execute(
            tx,
            "UPDATE subscriptions SET callback_url = $2, api_key = $3, event_mask = $4, last_modified_on = $5,
                    version = version + 1
              WHERE id = $1",
            &[&id, &spec.callback_url, &sealed_key, &mask_param(spec.event_types.bits()), &Ts(now)],
        )
        .await?;
        record.spec = spec;
        record.last_modified_on = now;
        record.version += 1;
    }
    Ok((ChangeSubscriptionOutcome::Done(record), queued))
}

/// Resumes `record` (read under a lock) when it is suspended: active again, its run of
/// failures forgotten, its held deliveries pending now (with a `NOTIFY`); answers how many it
/// queued (0 for an active one, which stays as it is). The row is locked `FOR UPDATE` first
/// (see the module's comment).
async fn resume_in(tx: &Transaction<'_>, record: &mut SubscriptionRecord, now: Timestamp) -> Result<usize> {
    if record.status == SubscriptionStatus::Active {
        return Ok(0);
    }
    execute(tx, "SELECT 1 FROM subscriptions WHERE id = $1 FOR UPDATE", &[&record.id]).await?;
    execute(
        tx,
        "UPDATE subscriptions SET state = 'Active', suspended_on = NULL, suspended_reason = NULL,
                failing_since = NULL, version = version + 1, last_modified_on = $2
          WHERE id = $1",
        &[&record.id, &Ts(now)],
    )
    .await?;
    let queued = execute(
        tx,
        "WITH held AS MATERIALIZED (
             SELECT id FROM deliveries WHERE subscription_id = $1 AND state = 'Held' ORDER BY id FOR NO KEY UPDATE)
         UPDATE deliveries d SET state = 'Pending', next_attempt_on = $2, lease_owner = NULL, lease_until = NULL,
                last_modified_on = $2
           FROM held WHERE d.id = held.id",
        &[&record.id, &Ts(now)],
    )
    .await?;
    if queued > 0 {
        notify_dispatchers(tx).await?;
    }
    record.status = SubscriptionStatus::Active;
    record.version += 1;
    record.last_modified_on = now;
    Ok(usize::try_from(queued).unwrap_or(usize::MAX))
}

/// Resumes a merchant's suspended subscription and queues its held deliveries (an active one
/// is answered as it is); answers the record opened and how many deliveries it queued.
pub async fn resume_subscription(
    c: &mut Client,
    ring: Arc<KeyRing>,
    change: SubscriptionChange,
    guard: Option<Guard<ChangeSubscriptionOutcome>>,
) -> Result<(Guarded<ChangeSubscriptionOutcome>, usize)> {
    let tx = c.transaction().await?;
    let (outcome, queued) = match owned_subscription(&tx, &change, "FOR NO KEY UPDATE").await? {
        Ok(record) => {
            let mut record = open_subscription(&ring, record)?;
            let queued = resume_in(&tx, &mut record, change.now).await?;
            (ChangeSubscriptionOutcome::Done(record), queued)
        }
        Err(outcome) => (outcome, 0),
    };
    finish(tx, guard, outcome, queued).await
}

/// Makes `rotation.secret` a merchant's subscription's signing secret. The replaced one is
/// copied as it is sealed (same column and row) and keeps signing for the grace period; with
/// none, no earlier secret signs any more. Answers the record opened.
pub async fn rotate_secret(
    c: &mut Client,
    ring: Arc<KeyRing>,
    change: SubscriptionChange,
    rotation: SecretRotation,
    guard: Option<Guard<ChangeSubscriptionOutcome>>,
) -> Result<Guarded<ChangeSubscriptionOutcome>> {
    let tx = c.transaction().await?;
    let outcome = rotate_in(&tx, &ring, &change, &rotation).await?;
    Ok(finish(tx, guard, outcome, 0).await?.0)
}

async fn rotate_in(
    tx: &Transaction<'_>,
    ring: &KeyRing,
    change: &SubscriptionChange,
    rotation: &SecretRotation,
) -> Result<ChangeSubscriptionOutcome> {
    let (id, now) = (change.id, change.now);
    let mut record = match owned_subscription(tx, change, "FOR NO KEY UPDATE").await? {
        Ok(record) => open_subscription(ring, record)?,
        Err(outcome) => return Ok(outcome),
    };
    let overlap = !rotation.grace.is_zero();
    let expires_on = now.plus(rotation.grace);
    let sealed = seal_signing_secret(ring, id, &rotation.secret)?;
    // The right-hand sides read the row as it was: the replaced secret, not the new one.
    execute(
        tx,
        "UPDATE subscriptions
            SET previous_secret = CASE WHEN $3 THEN signing_secret END,
                previous_secret_expires_on = CASE WHEN $3 THEN $4::timestamptz END,
                signing_secret = $2, version = version + 1, last_modified_on = $5
          WHERE id = $1",
        &[&id, &sealed, &overlap, &Ts(expires_on), &Ts(now)],
    )
    .await?;
    let replaced = std::mem::replace(&mut record.signing_secret, rotation.secret.clone());
    record.previous_secret = overlap.then_some(PreviousSecret { secret: replaced, expires_on });
    record.version += 1;
    record.last_modified_on = now;
    Ok(ChangeSubscriptionOutcome::Done(record))
}

/// Queues again up to `window.limit` failed deliveries of a merchant's subscription whose
/// event lies in `[since, until)`, oldest first, with a fresh retry schedule (held while it is
/// suspended); answers what it came to and how many became pending.
pub async fn recover(
    c: &mut Client,
    change: SubscriptionChange,
    window: RecoverWindow,
    guard: Option<Guard<RecoverOutcome>>,
) -> Result<(Guarded<RecoverOutcome>, usize)> {
    let tx = c.transaction().await?;
    let (outcome, queued) = recover_in(&tx, &change, window).await?;
    finish(tx, guard, outcome, queued).await
}

async fn recover_in(
    tx: &Transaction<'_>,
    change: &SubscriptionChange,
    window: RecoverWindow,
) -> Result<(RecoverOutcome, usize)> {
    // The lock makes a concurrent suspension (`FOR UPDATE`) wait, so the state read here holds
    // until the commit.
    let subscription = match owned_subscription(tx, change, "FOR NO KEY UPDATE").await? {
        Ok(record) => record,
        Err(ChangeSubscriptionOutcome::OtherMerchant) => return Ok((RecoverOutcome::OtherMerchant, 0)),
        // `RecoverOutcome` has no answer of its own for a tag that does not match.
        Err(_) => return Ok((RecoverOutcome::NotFound, 0)),
    };
    let state = match subscription.status {
        SubscriptionStatus::Active => DeliveryState::Pending,
        SubscriptionStatus::Suspended { .. } => DeliveryState::Held,
    };
    // A delivery is created in the transaction of its event, with its time: the window is read
    // over `deliveries_by_subscription`. One more than the limit is read to tell whether more
    // are left; those taken are locked in id order and checked again under their lock.
    let row = query_one(
        tx,
        "WITH chosen AS MATERIALIZED (
             SELECT id, created_on FROM deliveries
              WHERE subscription_id = $1 AND created_on >= $2 AND created_on < $3 AND state = 'Failed'
              ORDER BY created_on, id LIMIT $5
         ), taken AS MATERIALIZED (
             SELECT d.id FROM deliveries d
              WHERE d.id IN (SELECT id FROM chosen ORDER BY created_on, id LIMIT $4) AND d.state = 'Failed'
              ORDER BY d.id FOR NO KEY UPDATE
         ), queued AS (
             UPDATE deliveries d SET state = $6, retry_index = 0, next_attempt_on = $7, lease_owner = NULL,
                    lease_until = NULL, last_modified_on = $7
               FROM taken WHERE d.id = taken.id
             RETURNING 1
         )
         SELECT (SELECT count(*) FROM chosen), (SELECT count(*) FROM queued)",
        &[
            &change.id,
            &Ts(window.since),
            &Ts(window.until),
            &int8(window.limit),
            &int8(window.limit.saturating_add(1)),
            &state.as_str(),
            &Ts(change.now),
        ],
    )
    .await?;
    let (chosen, queued): (i64, i64) = (row.try_get(0)?, row.try_get(1)?);
    let more = usize::try_from(chosen).unwrap_or(usize::MAX) > window.limit;
    let queued = u64::try_from(queued).unwrap_or(0);
    let pending = if state == DeliveryState::Pending { usize::try_from(queued).unwrap_or(usize::MAX) } else { 0 };
    if pending > 0 {
        notify_dispatchers(tx).await?;
    }
    Ok((RecoverOutcome::Queued { queued, more }, pending))
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
    // `data` goes in as text: the server parses it, and `event_data_text` writes it back.
    execute(
        &tx,
        "INSERT INTO events (id, merchant_id, session_id, type, data, created_on)
         VALUES ($1, $2, $3, $4, $5::text::jsonb, $6)",
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

/// Removes a merchant's subscription and cancels its queued and held deliveries (see
/// `record_events` for why the subscription is locked `FOR UPDATE` first); answers the removed
/// record opened.
pub async fn delete_subscription(
    c: &mut Client,
    ring: Arc<KeyRing>,
    change: SubscriptionChange,
    guard: Option<Guard<ChangeSubscriptionOutcome>>,
) -> Result<Guarded<ChangeSubscriptionOutcome>> {
    let tx = c.transaction().await?;
    let outcome = delete_in(&tx, &ring, &change).await?;
    Ok(finish(tx, guard, outcome, 0).await?.0)
}

async fn delete_in(
    tx: &Transaction<'_>,
    ring: &KeyRing,
    change: &SubscriptionChange,
) -> Result<ChangeSubscriptionOutcome> {
    let (id, now) = (change.id, change.now);
    let record = match owned_subscription(tx, change, "FOR UPDATE").await? {
        Ok(record) => open_subscription(ring, record)?,
        Err(outcome) => return Ok(outcome),
    };
    execute(
        tx,
        "WITH doomed AS MATERIALIZED (
             SELECT id FROM deliveries WHERE subscription_id = $1 AND state IN ('Pending', 'Held')
              ORDER BY id FOR NO KEY UPDATE)
         UPDATE deliveries d SET state = 'Cancelled', lease_owner = NULL, lease_until = NULL, last_modified_on = $2
           FROM doomed WHERE d.id = doomed.id",
        &[&id, &Ts(now)],
    )
    .await?;
    execute(tx, "DELETE FROM subscriptions WHERE id = $1", &[&id]).await?;
    Ok(ChangeSubscriptionOutcome::Done(record))
}

/// Rounds of choosing and taking in one claim, when other instances took some candidates.
const CLAIM_ROUNDS: usize = 3;

/// Up to `limit` due deliveries to claim next, oldest due first, leaving out `passed` and
/// every delivery that would take its subscription past `per_subscription` unexpired leases.
/// Read without locks; `lease_candidates` checks each again under its lock.
///
/// First the head of the due queue (`deliveries_due`, as many as wanted) with the leases its
/// subscriptions hold. When that head holds deliveries of subscriptions at their cap — one
/// slow receiver's backlog, say — the rest is looked for subscription by subscription: one
/// index seek per subscription with pending deliveries (`deliveries_due_by_subscription`) and
/// the first due deliveries of each that has room, so that the cost follows the number of
/// subscriptions, never the length of a backlog.
async fn claimable<C: GenericClient>(
    c: &C,
    now: Timestamp,
    limit: usize,
    per_subscription: usize,
    passed: &[Uuid],
) -> Result<Vec<Uuid>> {
    if limit == 0 {
        return Ok(Vec::new());
    }
    let head = query(
        c,
        "WITH due AS (
             SELECT id, subscription_id, next_attempt_on FROM deliveries
              WHERE state = 'Pending' AND next_attempt_on <= $1 AND (lease_until IS NULL OR lease_until <= $1)
                AND id <> ALL($3)
              ORDER BY next_attempt_on LIMIT $2
         ), leased AS (
             SELECT l.subscription_id, count(*) AS n FROM deliveries l
              WHERE l.lease_until > $1 AND l.state = 'Pending'
                AND l.subscription_id IN (SELECT subscription_id FROM due)
              GROUP BY l.subscription_id
         )
         SELECT due.id, due.subscription_id, COALESCE(leased.n, 0)
           FROM due LEFT JOIN leased USING (subscription_id)
          ORDER BY due.next_attempt_on, due.id",
        &[&Ts(now), &int8(limit), &passed],
    )
    .await?;
    let mut leases = HashMap::new();
    for row in &head {
        leases.insert(row.try_get::<_, Uuid>(1)?, usize::try_from(row.try_get::<_, i64>(2)?).unwrap_or(0));
    }
    let mut picker = ClaimPicker::new(leases, per_subscription, limit);
    for row in &head {
        picker.offer(row.try_get(0)?, row.try_get(1)?);
    }
    if picker.is_full() || head.len() < limit || picker.passed_over() == 0 {
        return Ok(picker.into_picked());
    }
    let rows = query(
        c,
        "WITH RECURSIVE pending (subscription_id) AS (
             (SELECT subscription_id FROM deliveries WHERE state = 'Pending' ORDER BY subscription_id LIMIT 1)
             UNION ALL
             SELECT (SELECT d.subscription_id FROM deliveries d
                      WHERE d.state = 'Pending' AND d.subscription_id > p.subscription_id
                      ORDER BY d.subscription_id LIMIT 1)
               FROM pending p WHERE p.subscription_id IS NOT NULL
         ), leased AS (
             SELECT subscription_id, count(*) AS n FROM deliveries
              WHERE lease_until > $1 AND state = 'Pending' GROUP BY subscription_id
         )
         SELECT first.id
           FROM pending p LEFT JOIN leased l ON l.subscription_id = p.subscription_id
          CROSS JOIN LATERAL (
              SELECT d.id, d.next_attempt_on FROM deliveries d
               WHERE d.subscription_id = p.subscription_id AND d.state = 'Pending' AND d.next_attempt_on <= $1
                 AND (d.lease_until IS NULL OR d.lease_until <= $1) AND d.id <> ALL($4)
               ORDER BY d.next_attempt_on LIMIT LEAST(GREATEST($3 - COALESCE(l.n, 0), 0), $2)
          ) first
          WHERE p.subscription_id IS NOT NULL
          ORDER BY first.next_attempt_on, first.id LIMIT $2",
        &[&Ts(now), &int8(limit), &int8(per_subscription), &passed],
    )
    .await?;
    rows.iter().map(|row| Ok(row.try_get(0)?)).collect()
}

/// Leases those of `candidates` still due and free to `owner` until `lease_until`; answers
/// them with what is needed to send them (the replaced signing secret while it still signs at
/// `now`). `SKIP LOCKED` lets dispatchers on several instances
/// claim at once without waiting on each other, and a row claimed by another in the meantime
/// is re-checked under its lock (its lease no longer due) and passed over: no delivery is
/// claimed twice.
async fn lease_candidates(
    c: &mut Client,
    owner: Uuid,
    now: Timestamp,
    lease_until: Timestamp,
    candidates: &[Uuid],
) -> Result<Vec<Row>> {
    query(
        &*c,
        "WITH due AS MATERIALIZED (
             SELECT id FROM deliveries
              WHERE id = ANY($4) AND state = 'Pending' AND next_attempt_on <= $3
                AND (lease_until IS NULL OR lease_until <= $3)
              ORDER BY id
                FOR UPDATE SKIP LOCKED
         ), claimed AS (
             UPDATE deliveries d SET lease_owner = $1, lease_until = $2 FROM due WHERE d.id = due.id
             RETURNING d.id, d.event_id, d.subscription_id, d.attempts, d.retry_index, d.next_attempt_on
         )
         SELECT c.id, c.event_id, e.type, e.created_on, e.data, s.callback_url, s.api_key, s.signing_secret,
                c.attempts, c.retry_index, s.id,
                CASE WHEN s.previous_secret_expires_on > $3 THEN s.previous_secret END
           FROM claimed c JOIN events e ON e.id = c.event_id JOIN subscriptions s ON s.id = c.subscription_id
          ORDER BY c.next_attempt_on, c.id",
        &[&owner, &Ts(lease_until), &Ts(now), &candidates],
    )
    .await
}

/// Ends the leases of registered dispatchers that are gone: a registered owner whose liveness
/// lock (`listen.rs`) no session holds died with its process or lost its connection, so its
/// leases count as run out from now on. Its registration goes once it holds no unexpired
/// lease (in a later call: this statement does not see its own changes). Rows someone has
/// locked are left for the next call. Answers how many deliveries it freed.
pub async fn free_orphaned_leases(c: &mut Client, now: Timestamp) -> Result<u64> {
    static SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        format!(
            "WITH gone AS MATERIALIZED (
                 SELECT owner FROM delivery_dispatchers WHERE pg_try_advisory_xact_lock_shared({})
             ), orphaned AS MATERIALIZED (
                 SELECT d.id FROM deliveries d JOIN gone g ON g.owner = d.lease_owner
                  WHERE d.lease_until > $1
                  ORDER BY d.id FOR NO KEY UPDATE OF d SKIP LOCKED
             ), freed AS (
                 UPDATE deliveries d SET lease_until = $1 FROM orphaned o WHERE d.id = o.id RETURNING 1
             ), forgotten AS (
                 DELETE FROM delivery_dispatchers w USING gone g
                  WHERE w.owner = g.owner
                    AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.lease_owner = g.owner AND d.lease_until > $1)
                 RETURNING 1
             )
             SELECT (SELECT count(*) FROM freed), (SELECT count(*) FROM forgotten)",
            listen::owner_lock_key("owner")
        )
    });
    let freed: i64 = query_one(&*c, &SQL, &[&Ts(now)]).await?.try_get(0)?;
    Ok(u64::try_from(freed).unwrap_or(0))
}

/// Claims up to `limit` due deliveries for `owner` until `lease_until`, with what is needed to
/// send them, leaving out subscriptions that would then hold more than `per_subscription`
/// unexpired leases (`claimable`); no delivery is claimed twice (`lease_candidates`). The API key
/// and signing secret are opened with `ring`; a delivery whose secrets do not open is left
/// out (and logged): its lease runs out and it is claimed again later.
pub async fn claim_deliveries(
    c: &mut Client,
    ring: Arc<KeyRing>,
    owner: Uuid,
    now: Timestamp,
    lease_until: Timestamp,
    limit: usize,
    per_subscription: usize,
) -> Result<Vec<ClaimedDelivery>> {
    // Candidates are chosen without locks (`claimable`); taking them locks each and checks it
    // again, so one that another instance took in between is passed over, and left out when
    // the next round chooses again.
    let mut rows = Vec::new();
    let mut lost: Vec<Uuid> = Vec::new();
    for _ in 0..CLAIM_ROUNDS {
        let candidates = claimable(&*c, now, limit.saturating_sub(rows.len()), per_subscription, &lost).await?;
        if candidates.is_empty() {
            break;
        }
        let taken = lease_candidates(c, owner, now, lease_until, &candidates).await?;
        let got = taken.iter().map(|row| row.try_get(0)).collect::<std::result::Result<HashSet<Uuid>, _>>()?;
        lost.extend(candidates.iter().filter(|id| !got.contains(id)));
        rows.extend(taken);
        if got.len() == candidates.len() || rows.len() >= limit {
            break;
        }
    }
    let mut claimed = Vec::with_capacity(rows.len());
    for row in &rows {
        let delivery = {
            let Json(data): Json<serde_json::Value> = row.try_get(4)?;
            ClaimedDelivery {
                id: row.try_get(0)?,
                event_id: row.try_get(1)?,
                event_type: parse_event_kind(row.try_get(2)?)?,
                event_time: ts(row, 3)?,
                data: event_data_text(&data),
                callback_url: row.try_get(5)?,
                api_key: row.try_get(6)?,
                signing_secret: row.try_get(7)?,
                previous_secret: row.try_get(11)?,
                attempts: i64::from(row.try_get::<_, i32>(8)?),
                retry_index: i64::from(row.try_get::<_, i32>(9)?),
            }
        };
        match open_claimed(&ring, row.try_get(10)?, delivery) {
            Ok(delivery) => claimed.push(delivery),
            Err(error) => tracing::error!(%error, "a claimed delivery cannot be sent"),
        }
    }
    Ok(claimed)
}

/// The event's `data` as compact JSON text with its members in the order the SQLite store
/// writes them. `jsonb` keeps its own key order, and the text is signed and sent verbatim, so
/// this keeps webhook bodies byte-identical across backends.
fn event_data_text(data: &serde_json::Value) -> String {
    // As `crate::store::event_data` builds it: the optional members come last.
    const ORDER: [&str; 7] =
        ["id", "state", "type", "createdOn", "lastModifiedOn", "customerId", "transactionIntentId"];
    let serde_json::Value::Object(members) = data else {
        return data.to_string();
    };
    let mut ordered = serde_json::Map::new();
    for key in ORDER {
        if let Some(value) = members.get(key) {
            ordered.insert(key.to_owned(), value.clone());
        }
    }
    for (key, value) in members {
        if !ordered.contains_key(key) {
            ordered.insert(key.clone(), value.clone());
        }
    }
    serde_json::Value::Object(ordered).to_string()
}

/// A subscription's receiver while a batch of attempts is recorded.
struct Receiver {
    suspended: bool,
    /// As stored, and as the batch leaves it.
    failing_since: (Option<Timestamp>, Option<Timestamp>),
    /// Set when the batch suspends it.
    suspend: Option<SuspendReason>,
}

/// Records attempts and moves their deliveries on, each only while `owner` still holds its
/// lease (a dispatcher whose lease ran out cannot overwrite the new owner's work). Keeps each
/// receiver's run of failures (`failing_since`: when its current run of failed attempts began)
/// and suspends subscriptions as `policy` says: their pending deliveries are then held, leased
/// ones too (whose results are then refused: they go out again on resume), and a delivery to
/// retry becomes held instead of pending. Answers the subscriptions it suspended and how many
/// deliveries it queued. One transaction of a few statements, whatever the batch size.
pub async fn record_attempts(
    c: &mut Client,
    outcomes: Vec<AttemptOutcome>,
    now: Timestamp,
    policy: SuspendPolicy,
) -> Result<(Vec<Suspension>, usize)> {
    if outcomes.is_empty() {
        return Ok((Vec::new(), 0));
    }
    let int = |n: i64| i32::try_from(n).map_err(|_| internal(format!("{n} does not fit an integer column")));
    let mut attempt_rows = (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for outcome in &outcomes {
        let a = &outcome.attempt;
        attempt_rows.0.push(outcome.delivery_id);
        attempt_rows.1.push(int(a.attempt)?);
        attempt_rows.2.push(Ts(a.started_on));
        attempt_rows.3.push(a.duration_ms);
        attempt_rows.4.push(a.status.map(i32::from));
        attempt_rows.5.push(a.error.clone());
    }
    // SQLite applies outcomes one by one, and the first for a delivery clears its lease, so a
    // later one for the same delivery changes nothing: keep only the first per delivery.
    let mut seen = HashSet::new();
    let firsts: Vec<&AttemptOutcome> = outcomes.iter().filter(|o| seen.insert(o.delivery_id)).collect();
    let ids: Vec<Uuid> = firsts.iter().map(|o| o.delivery_id).collect();
    let owners: Vec<Uuid> = firsts.iter().map(|o| o.owner).collect();

    let tx = c.transaction().await?;
    execute(
        &tx,
        "INSERT INTO delivery_attempts (delivery_id, attempt, started_on, duration_ms, status, error)
         SELECT * FROM unnest($1::uuid[], $2::int4[], $3::timestamptz[], $4::int8[], $5::int4[], $6::text[])
         ON CONFLICT DO NOTHING",
        &[&attempt_rows.0, &attempt_rows.1, &attempt_rows.2, &attempt_rows.3, &attempt_rows.4, &attempt_rows.5],
    )
    .await?;
    // In lock order: the subscriptions (their state and run of failures, in id order), then the
    // deliveries whose lease `owner` still holds (in id order). `UNION ALL` runs its branches in
    // turn. A delivery's subscription never changes, so it is read before its row is locked.
    let rows = query(
        &tx,
        "WITH receivers AS MATERIALIZED (
             SELECT id, state = 'Suspended' AS suspended, failing_since FROM subscriptions
              WHERE id IN (SELECT subscription_id FROM deliveries WHERE id = ANY($1))
              ORDER BY id FOR NO KEY UPDATE
         ), leased AS MATERIALIZED (
             SELECT d.id, d.subscription_id FROM deliveries d
               JOIN unnest($1::uuid[], $2::uuid[]) AS o(id, owner) ON o.id = d.id
              WHERE d.lease_owner = o.owner AND d.state = 'Pending'
              ORDER BY d.id FOR NO KEY UPDATE OF d
         )
         SELECT NULL::uuid, id, suspended, failing_since FROM receivers
         UNION ALL
         SELECT id, subscription_id, NULL, NULL FROM leased",
        &[&ids, &owners],
    )
    .await?;
    let mut receivers: HashMap<Uuid, Receiver> = HashMap::new();
    let mut leased: HashMap<Uuid, Uuid> = HashMap::new();
    for row in &rows {
        let subscription: Uuid = row.try_get(1)?;
        match row.try_get::<_, Option<Uuid>>(0)? {
            Some(delivery) => {
                leased.insert(delivery, subscription);
            }
            None => {
                let failing_since = ts_opt(row, 3)?;
                let suspended = row.try_get(2)?;
                receivers.insert(
                    subscription,
                    Receiver { suspended, failing_since: (failing_since, failing_since), suspend: None },
                );
            }
        }
    }

    // In the order recorded, as SQLite does: a success ends a run of failures; a failure
    // starts one or goes on with it, and may suspend the subscription.
    let mut suspensions = Vec::new();
    for outcome in &firsts {
        let Some(receiver) = leased.get(&outcome.delivery_id).and_then(|s| receivers.get_mut(s).map(|r| (s, r))) else {
            // The lease is gone (another dispatcher sends it again): only the attempt is kept.
            continue;
        };
        let (subscription, receiver) = receiver;
        if outcome.next == NextStep::Delivered {
            receiver.failing_since.1 = None;
            continue;
        }
        let since = *receiver.failing_since.1.get_or_insert(outcome.attempt.started_on);
        if !receiver.suspended {
            if let Some(reason) = policy.decide(outcome.attempt.status, since, now) {
                receiver.suspended = true;
                receiver.suspend = Some(reason);
                suspensions.push(Suspension { subscription_id: *subscription, reason });
            }
        }
    }

    let mut moves = (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut queued = 0;
    for outcome in firsts.iter().filter(|o| leased.contains_key(&o.delivery_id)) {
        let suspended =
            leased.get(&outcome.delivery_id).and_then(|s| receivers.get(s)).is_some_and(|receiver| receiver.suspended);
        let (state, retry_step, next) = match outcome.next {
            NextStep::Delivered => (DeliveryState::Delivered, 0, now),
            NextStep::Failed => (DeliveryState::Failed, 1, now),
            NextStep::RetryAt(_) if suspended => (DeliveryState::Held, 1, now),
            NextStep::RetryAt(at) => (DeliveryState::Pending, 1, at),
        };
        queued += usize::from(state == DeliveryState::Pending);
        moves.0.push(outcome.delivery_id);
        moves.1.push(outcome.owner);
        moves.2.push(state.as_str());
        moves.3.push(int(outcome.attempt.attempt)?);
        moves.4.push(retry_step);
        moves.5.push(Ts(next));
    }
    let mut changed = (Vec::new(), Vec::new(), Vec::new());
    for (id, receiver) in &receivers {
        if receiver.suspend.is_some() || receiver.failing_since.0 != receiver.failing_since.1 {
            changed.0.push(*id);
            changed.1.push(receiver.failing_since.1.map(Ts));
            changed.2.push(receiver.suspend.map(SuspendReason::as_str));
        }
    }
    let mut suspended: Vec<Uuid> = suspensions.iter().map(|s| s.subscription_id).collect();
    suspended.sort_unstable();
    if !suspended.is_empty() {
        // Changing the state takes `FOR UPDATE` (see the module's comment): events being
        // queued for these subscriptions commit first, and their deliveries are held below.
        execute(&tx, "SELECT 1 FROM subscriptions WHERE id = ANY($1) ORDER BY id FOR UPDATE", &[&suspended]).await?;
    }
    execute(
        &tx,
        "WITH outcome AS (
             SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::int4[], $5::int4[], $6::timestamptz[])
               AS o(id, owner, state, attempt, retry_step, next_attempt_on)
         ), moved AS (
             UPDATE deliveries d
                SET state = o.state, attempts = GREATEST(d.attempts, o.attempt),
                    retry_index = d.retry_index + o.retry_step, next_attempt_on = o.next_attempt_on,
                    lease_owner = NULL, lease_until = NULL, last_modified_on = $7
               FROM outcome o
              WHERE d.id = o.id AND d.lease_owner = o.owner AND d.state = 'Pending'
             RETURNING 1
         ), receivers AS (
             UPDATE subscriptions s
                SET failing_since = r.failing_since,
                    state = CASE WHEN r.reason IS NULL THEN s.state ELSE 'Suspended' END,
                    suspended_on = CASE WHEN r.reason IS NULL THEN s.suspended_on ELSE $7 END,
                    suspended_reason = COALESCE(r.reason, s.suspended_reason),
                    version = s.version + CASE WHEN r.reason IS NULL THEN 0 ELSE 1 END,
                    last_modified_on = CASE WHEN r.reason IS NULL THEN s.last_modified_on ELSE $7 END
               FROM unnest($8::uuid[], $9::timestamptz[], $10::text[]) AS r(id, failing_since, reason)
              WHERE s.id = r.id
             RETURNING 1
         )
         SELECT (SELECT count(*) FROM moved), (SELECT count(*) FROM receivers)",
        &[&moves.0, &moves.1, &moves.2, &moves.3, &moves.4, &moves.5, &Ts(now), &changed.0, &changed.1, &changed.2],
    )
    .await?;
    if !suspended.is_empty() {
        execute(
            &tx,
            "WITH held AS MATERIALIZED (
                 SELECT id FROM deliveries WHERE subscription_id = ANY($1) AND state = 'Pending'
                  ORDER BY id FOR NO KEY UPDATE)
             UPDATE deliveries d SET state = 'Held', lease_owner = NULL, lease_until = NULL, last_modified_on = $2
               FROM held WHERE d.id = held.id",
            &[&suspended, &Ts(now)],
        )
        .await?;
    }
    if queued > 0 {
        notify_dispatchers(&tx).await?;
    }
    tx.commit().await?;
    Ok((suspensions, queued))
}

/// Gives up `owner`'s leases on deliveries it claimed but did not attempt.
pub async fn release_claims(c: &mut Client, owner: Uuid, ids: Vec<Uuid>) -> Result<()> {
    if ids.is_empty() {
        return Ok(());
    }
    execute(
        &*c,
        "WITH held AS MATERIALIZED (
             SELECT id FROM deliveries WHERE id = ANY($1) AND lease_owner = $2 ORDER BY id FOR NO KEY UPDATE)
         UPDATE deliveries d SET lease_owner = NULL, lease_until = NULL FROM held WHERE d.id = held.id",
        &[&ids, &owner],
    )
    .await?;
    Ok(())
}

const DELIVERY_COLUMNS: &str = "d.id, d.event_id, e.type, e.session_id, d.subscription_id, d.merchant_id, d.state,
     d.next_attempt_on, d.created_on, d.last_modified_on";

fn delivery_from_row(row: &Row) -> Result<DeliveryRecord> {
    let state: &str = row.try_get(6)?;
    let state = DeliveryState::parse(state).ok_or_else(|| internal(format!("unknown delivery state {state}")))?;
    Ok(DeliveryRecord {
        id: row.try_get(0)?,
        event_id: row.try_get(1)?,
        event_type: parse_event_kind(row.try_get(2)?)?,
        session_id: Some(row.try_get::<_, Uuid>(3)?).filter(|id| *id != NO_SESSION),
        subscription_id: row.try_get(4)?,
        merchant_id: row.try_get(5)?,
        state,
        next_attempt_on: if state == DeliveryState::Pending { ts_opt(row, 7)? } else { None },
        created_on: ts(row, 8)?,
        last_modified_on: ts(row, 9)?,
        attempts: Vec::new(),
    })
}

/// Fills in the attempts of `deliveries` with one query.
async fn with_attempts<C: GenericClient>(c: &C, mut deliveries: Vec<DeliveryRecord>) -> Result<Vec<DeliveryRecord>> {
    if deliveries.is_empty() {
        return Ok(deliveries);
    }
    let ids: Vec<Uuid> = deliveries.iter().map(|d| d.id).collect();
    let rows = query(
        c,
        "SELECT delivery_id, attempt, started_on, duration_ms, status, error FROM delivery_attempts
          WHERE delivery_id = ANY($1) ORDER BY delivery_id, attempt",
        &[&ids],
    )
    .await?;
    let mut attempts: HashMap<Uuid, Vec<AttemptRecord>> = HashMap::new();
    for row in &rows {
        let status = row
            .try_get::<_, Option<i32>>(4)?
            .map(|s| u16::try_from(s).map_err(|_| internal(format!("stored status {s}"))))
            .transpose()?;
        attempts.entry(row.try_get(0)?).or_default().push(AttemptRecord {
            attempt: i64::from(row.try_get::<_, i32>(1)?),
            started_on: ts(row, 2)?,
            duration_ms: row.try_get(3)?,
            status,
            error: row.try_get(5)?,
        });
    }
    for delivery in &mut deliveries {
        delivery.attempts = attempts.remove(&delivery.id).unwrap_or_default();
    }
    Ok(deliveries)
}

/// One delivery with its attempts, of any merchant; with `lock`, locked until the
/// transaction ends.
async fn get_delivery<C: GenericClient>(c: &C, id: Uuid, lock: &str) -> Result<Option<DeliveryRecord>> {
    let sql = format!(
        "SELECT {DELIVERY_COLUMNS} FROM deliveries d JOIN events e ON e.id = d.event_id WHERE d.id = $1 {lock}"
    );
    let Some(delivery) = query_opt(c, &sql, &[&id]).await?.as_ref().map(delivery_from_row).transpose()? else {
        return Ok(None);
    };
    Ok(with_attempts(c, vec![delivery]).await?.pop())
}

/// A merchant's deliveries with their attempts, newest first, `limit + 1` at most.
pub async fn list_deliveries(c: &mut Client, merchant_id: Uuid, filter: DeliveryFilter) -> Result<Vec<DeliveryRecord>> {
    let mut sql = Sql::new(&format!(
        "SELECT {DELIVERY_COLUMNS} FROM deliveries d JOIN events e ON e.id = d.event_id WHERE d.merchant_id = "
    ));
    let merchant = sql.bind(merchant_id);
    sql.push(&merchant);
    if let Some(subscription) = filter.subscription_id {
        let subscription = sql.bind(subscription);
        sql.push(&format!(" AND d.subscription_id = {subscription}"));
    }
    if let Some(state) = filter.state {
        sql.push(&format!(" AND d.state = '{}'", state.as_str()));
    }
    if let Some((time, id)) = filter.after {
        let (time, id) = (sql.bind(Ts(time)), sql.bind(id));
        sql.push(&format!(" AND (d.created_on, d.id) < ({time}, {id})"));
    }
    let limit = sql.bind(int8(filter.limit + 1));
    sql.push(&format!(" ORDER BY d.created_on DESC, d.id DESC LIMIT {limit}"));
    // The deliveries and their attempts from one snapshot: read apart, an attempt recorded
    // between the two reads would show beside the delivery as it was before it.
    let tx = c
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await?;
    let deliveries = sql.query(&tx).await?.iter().map(delivery_from_row).collect::<Result<Vec<_>>>()?;
    let deliveries = with_attempts(&tx, deliveries).await?;
    tx.commit().await?;
    Ok(deliveries)
}

/// Queues a `Failed` (or `Delivered`) delivery again with a fresh retry schedule (held while
/// its subscription is suspended); under a guard, keeps the answer in the same transaction.
/// Answers how many deliveries became pending.
pub async fn redeliver(
    c: &mut Client,
    merchant_id: Uuid,
    id: Uuid,
    now: Timestamp,
    guard: Option<Guard<RedeliverOutcome>>,
) -> Result<(Guarded<RedeliverOutcome>, usize)> {
    let tx = c.transaction().await?;
    let outcome = redeliver_in(&tx, merchant_id, id, now).await?;
    let queued = usize::from(matches!(&outcome, RedeliverOutcome::Queued(d) if d.state == DeliveryState::Pending));
    finish(tx, guard, outcome, queued).await
}

async fn redeliver_in(tx: &Transaction<'_>, merchant_id: Uuid, id: Uuid, now: Timestamp) -> Result<RedeliverOutcome> {
    let delivery = match decide_redelivery(get_delivery(tx, id, "FOR NO KEY UPDATE OF d").await?, merchant_id) {
        RedeliverDecision::Requeue(delivery) => delivery,
        RedeliverDecision::Answer(answer) => return Ok(answer),
    };
    // A delivery whose subscription is gone can never be sent again; one whose subscription is
    // suspended is held until it is resumed. The key-share lock makes a concurrent unsubscribe,
    // suspension or resumption (`FOR UPDATE`) wait and then treat this delivery with the others.
    let state = match query_opt(
        tx,
        "SELECT state = 'Suspended' FROM subscriptions WHERE id = $1 FOR KEY SHARE",
        &[&delivery.subscription_id],
    )
    .await?
    {
        None => return Ok(RedeliverOutcome::Cancelled),
        Some(row) if row.try_get::<_, bool>(0)? => DeliveryState::Held,
        Some(_) => DeliveryState::Pending,
    };
    execute(
        tx,
        "UPDATE deliveries SET state = $3, retry_index = 0, next_attempt_on = $2, lease_owner = NULL,
                lease_until = NULL, last_modified_on = $2
          WHERE id = $1",
        &[&id, &Ts(now), &state.as_str()],
    )
    .await?;
    if state == DeliveryState::Pending {
        notify_dispatchers(tx).await?;
    }
    let queued = get_delivery(tx, id, "").await?.ok_or_else(|| internal("the delivery vanished while locked"))?;
    Ok(RedeliverOutcome::Queued(queued))
}

/// The pending deliveries and the oldest due one at `now`, read over the due index, and the
/// held ones, over theirs.
pub async fn backlog(c: &mut Client, now: Timestamp) -> Result<Backlog> {
    let row = query_one(
        &*c,
        "SELECT count(*), min(next_attempt_on) FILTER (WHERE next_attempt_on <= $1),
                (SELECT count(*) FROM deliveries WHERE state = 'Held')
           FROM deliveries WHERE state = 'Pending'",
        &[&Ts(now)],
    )
    .await?;
    Ok(Backlog {
        pending: row.try_get::<_, i64>(0)?.max(0) as u64,
        oldest_due: ts_opt(&row, 1)?,
        held: row.try_get::<_, i64>(2)?.max(0) as u64,
    })
}

/// Deletes up to `batch` finished deliveries (with their attempts) and events older than the
/// retention (never a held delivery, nor the event it carries), and idempotency records and one-time-code states older than theirs; answers how
/// many rows went. Finished deliveries go in id order as on SQLite; `SKIP LOCKED` lets purges
/// on several instances run side by side.
pub async fn purge(c: &mut Client, now: Timestamp, retention: Retention, batch: usize) -> Result<usize> {
    let cutoff = Ts(now.minus(retention.deliveries));
    let batch = int8(batch);
    let tx = c.transaction().await?;
    let deliveries = query_one(
        &tx,
        "WITH doomed AS MATERIALIZED (
             SELECT id FROM deliveries WHERE state NOT IN ('Pending', 'Held') AND last_modified_on < $1
              ORDER BY id LIMIT $2 FOR UPDATE SKIP LOCKED
         ), attempts AS (
             DELETE FROM delivery_attempts a USING doomed WHERE a.delivery_id = doomed.id RETURNING 1
         ), gone AS (
             DELETE FROM deliveries d USING doomed WHERE d.id = doomed.id RETURNING 1
         )
         SELECT (SELECT count(*) FROM attempts) + (SELECT count(*) FROM gone)",
        &[&cutoff, &batch],
    )
    .await?
    .try_get::<_, i64>(0)?;
    // A statement of its own, so that it sees the deliveries just deleted (as SQLite does).
    let events = execute(
        &tx,
        "WITH doomed AS MATERIALIZED (
             SELECT e.id FROM events e
              WHERE e.created_on < $1 AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.event_id = e.id)
              ORDER BY e.created_on LIMIT $2 FOR UPDATE OF e SKIP LOCKED)
         DELETE FROM events e USING doomed WHERE e.id = doomed.id",
        &[&cutoff, &batch],
    )
    .await?;
    let idempotency = execute(
        &tx,
        "WITH doomed AS MATERIALIZED (
             SELECT merchant_id, request_id FROM idempotency WHERE started_on < $1
              ORDER BY started_on LIMIT $2 FOR UPDATE SKIP LOCKED)
         DELETE FROM idempotency i USING doomed
          WHERE i.merchant_id = doomed.merchant_id AND i.request_id = doomed.request_id",
        &[&Ts(now.minus(retention.idempotency)), &batch],
    )
    .await?;
    // A session lives at most a day, so a day after its last code a sign-in state is history
    // (as on SQLite). A row a sign-in holds is left for the next purge.
    let codes = execute(
        &tx,
        "WITH doomed AS MATERIALIZED (
             SELECT session_id FROM one_time_codes WHERE last_sent_on < $1
              ORDER BY last_sent_on LIMIT $2 FOR UPDATE SKIP LOCKED)
         DELETE FROM one_time_codes o USING doomed WHERE o.session_id = doomed.session_id",
        &[&Ts(now.minus(retention.idempotency)), &batch],
    )
    .await?;
    tx.commit().await?;
    let removed = u64::try_from(deliveries).unwrap_or(0) + events + idempotency + codes;
    Ok(usize::try_from(removed).unwrap_or(usize::MAX))
}
