//! The SQLite side of webhooks: subscriptions, queuing deliveries in the event's transaction,
//! claiming with leases, recording attempts, and retention. Each function runs inside a job
//! of the writer or a reader (see `worker.rs`).

use rusqlite::{params, Connection, OptionalExtension, Row};
use uuid::Uuid;

use super::uuid_at;
use super::worker::internal;
use crate::domain::event::{EventKind, EventType};
use crate::domain::subscription::{EventMask, SubscriptionSpec};
use crate::domain::time::Timestamp;
use crate::secrets::KeyRing;
use crate::store::sealing::{open_claimed, open_subscription, seal_api_key, seal_signing_secret};
use crate::store::webhooks::{
    decide_redelivery, AttemptOutcome, AttemptRecord, Backlog, ChangeSubscriptionOutcome, ClaimedDelivery,
    DeliveryFilter, DeliveryRecord, DeliveryState, NextStep, PreviousSecret, PutSubscriptionOutcome, RecoverOutcome,
    RecoverWindow, RedeliverDecision, RedeliverOutcome, Retention, SecretRotation, SubscriptionChange,
    SubscriptionRecord, SubscriptionStatus, SuspendPolicy, SuspendReason, Suspension, TestDelivery, NO_SESSION,
};
use crate::store::{etag_matches, StoreError};

type Result<T> = std::result::Result<T, StoreError>;

const SUBSCRIPTION_COLUMNS: &str = "id, merchant_id, callback_url, api_key, event_mask, signing_secret, created_on,
     last_modified_on, version, previous_secret, previous_secret_expires_on, state, suspended_on, suspended_reason";

fn subscription_from_row(row: &Row<'_>) -> rusqlite::Result<SubscriptionRecord> {
    let previous = match (row.get::<_, Option<String>>(9)?, row.get::<_, Option<i64>>(10)?) {
        (Some(secret), Some(expires_on)) => {
            Some(PreviousSecret { secret, expires_on: Timestamp::from_millis(expires_on) })
        }
        _ => None,
    };
    let state: String = row.get(11)?;
    let suspended_on = row.get::<_, Option<i64>>(12)?.map(Timestamp::from_millis);
    let reason: Option<String> = row.get(13)?;
    let status =
        SubscriptionStatus::from_columns(&state, suspended_on, reason.as_deref()).ok_or_else(|| bad_column(11))?;
    Ok(SubscriptionRecord {
        id: uuid_at(row, 0)?,
        merchant_id: uuid_at(row, 1)?,
        spec: SubscriptionSpec {
            callback_url: row.get(2)?,
            api_key: row.get(3)?,
            event_types: EventMask::from_bits(row.get(4)?),
        },
        signing_secret: row.get(5)?,
        created_on: Timestamp::from_millis(row.get(6)?),
        last_modified_on: Timestamp::from_millis(row.get(7)?),
        version: row.get(8)?,
        previous_secret: previous,
        status,
    })
}

/// The subscription with this id, of any merchant, as stored (sealed).
pub fn get_subscription(c: &Connection, id: Uuid) -> Result<Option<SubscriptionRecord>> {
    c.prepare_cached(&format!("SELECT {SUBSCRIPTION_COLUMNS} FROM subscriptions WHERE id = ?1"))
        .and_then(|mut s| s.query_row(params![id.as_bytes()], subscription_from_row).optional())
        .map_err(|e| internal(&e))
}

/// Inserts the subscription unless its id exists.
pub fn put_subscription(c: &Connection, record: SubscriptionRecord) -> Result<PutSubscriptionOutcome> {
    if let Some(existing) = get_subscription(c, record.id)? {
        return Ok(PutSubscriptionOutcome::Exists(existing));
    }
    let (suspended_on, reason) = match record.status {
        SubscriptionStatus::Active => (None, None),
        SubscriptionStatus::Suspended { since, reason } => (Some(since.millis()), Some(reason.as_str())),
    };
    c.prepare_cached(&format!(
        "INSERT INTO subscriptions ({SUBSCRIPTION_COLUMNS})
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)"
    ))
    .and_then(|mut s| {
        s.execute(params![
            record.id.as_bytes(),
            record.merchant_id.as_bytes(),
            record.spec.callback_url,
            record.spec.api_key,
            record.spec.event_types.bits(),
            record.signing_secret,
            record.created_on.millis(),
            record.last_modified_on.millis(),
            record.version,
            record.previous_secret.as_ref().map(|p| p.secret.as_str()),
            record.previous_secret.as_ref().map(|p| p.expires_on.millis()),
            record.status.state(),
            suspended_on,
            reason
        ])
    })
    .map_err(|e| internal(&e))?;
    Ok(PutSubscriptionOutcome::Created(record))
}

/// A merchant's subscriptions, newest first, `limit + 1` at most.
pub fn list_subscriptions(
    c: &Connection,
    merchant_id: Uuid,
    after: Option<(Timestamp, Uuid)>,
    limit: usize,
) -> Result<Vec<SubscriptionRecord>> {
    let (after_time, after_id) = after.map(|(t, id)| (t.millis(), *id.as_bytes())).unwrap_or((i64::MAX, [0xff; 16]));
    let mut statement = c
        .prepare_cached(&format!(
            "SELECT {SUBSCRIPTION_COLUMNS} FROM subscriptions WHERE merchant_id = ?1 AND (created_on, id) < (?2, ?3)
              ORDER BY created_on DESC, id DESC LIMIT ?4"
        ))
        .map_err(|e| internal(&e))?;
    let rows = statement
        .query_map(params![merchant_id.as_bytes(), after_time, after_id, (limit + 1) as i64], subscription_from_row)
        .map_err(|e| internal(&e))?;
    rows.collect::<rusqlite::Result<Vec<_>>>().map_err(|e| internal(&e))
}

fn owned_subscription(
    c: &Connection,
    merchant_id: Uuid,
    id: Uuid,
    if_match: Option<&str>,
) -> Result<std::result::Result<SubscriptionRecord, ChangeSubscriptionOutcome>> {
    Ok(match get_subscription(c, id)? {
        None => Err(ChangeSubscriptionOutcome::NotFound),
        Some(s) if s.merchant_id != merchant_id => Err(ChangeSubscriptionOutcome::OtherMerchant),
        Some(s) if if_match.is_some_and(|tag| !etag_matches(tag, &format!("\"{}\"", s.version))) => {
            Err(ChangeSubscriptionOutcome::VersionMismatch)
        }
        Some(s) => Ok(s),
    })
}

/// Replaces all three fields of a merchant's subscription, resuming it when suspended;
/// answers the record opened and how many held deliveries it queued.
pub fn patch_subscription(
    c: &Connection,
    ring: &KeyRing,
    change: &SubscriptionChange,
    spec: SubscriptionSpec,
) -> Result<(ChangeSubscriptionOutcome, usize)> {
    let (id, now) = (change.id, change.now);
    let mut record = match owned_subscription(c, change.merchant_id, id, change.if_match.as_deref())? {
        Ok(record) => open_subscription(ring, record)?,
        Err(outcome) => return Ok((outcome, 0)),
    };
    let queued = resume_held(c, &mut record, now)?;
    if record.spec == spec {
        return Ok((ChangeSubscriptionOutcome::Done(record), queued));
    }
    let sealed_key = seal_api_key(ring, id, &spec.api_key)?;
    c.prepare_cached(
        "UPDATE subscriptions SET callback_url = ?2, api_key = ?3, event_mask = ?4, last_modified_on = ?5,
                version = version + 1
          WHERE id = ?1",
    )
    .and_then(|mut s| {
        s.execute(params![id.as_bytes(), spec.callback_url, sealed_key, spec.event_types.bits(), now.millis()])
    })
    .map_err(|e| internal(&e))?;
    record.spec = spec;
    record.last_modified_on = now;
    record.version += 1;
    Ok((ChangeSubscriptionOutcome::Done(record), queued))
}

/// Removes a merchant's subscription and cancels its queued deliveries; answers the removed
/// record opened.
pub fn delete_subscription(
    c: &Connection,
    ring: &KeyRing,
    change: &SubscriptionChange,
) -> Result<ChangeSubscriptionOutcome> {
    let (id, now) = (change.id, change.now);
    let record = match owned_subscription(c, change.merchant_id, id, change.if_match.as_deref())? {
        Ok(record) => open_subscription(ring, record)?,
        Err(outcome) => return Ok(outcome),
    };
    c.execute(
        "UPDATE deliveries SET state = 'Cancelled', lease_owner = NULL, lease_until = NULL, last_modified_on = ?2
          WHERE subscription_id = ?1 AND state IN ('Pending', 'Held')",
        params![id.as_bytes(), now.millis()],
    )
    .and_then(|_| c.execute("DELETE FROM subscriptions WHERE id = ?1", params![id.as_bytes()]))
    .map_err(|e| internal(&e))?;
    Ok(ChangeSubscriptionOutcome::Done(record))
}

/// Resumes `record` (opened) when it is suspended: active again, with its held deliveries
/// pending now; answers how many it queued (0 for an active one, which stays as it is).
fn resume_held(c: &Connection, record: &mut SubscriptionRecord, now: Timestamp) -> Result<usize> {
    if record.status == SubscriptionStatus::Active {
        return Ok(0);
    }
    c.prepare_cached(
        "UPDATE subscriptions SET state = 'Active', suspended_on = NULL, suspended_reason = NULL,
                failing_since = NULL, version = version + 1, last_modified_on = ?2
          WHERE id = ?1",
    )
    .and_then(|mut s| s.execute(params![record.id.as_bytes(), now.millis()]))
    .map_err(|e| internal(&e))?;
    let queued = c
        .prepare_cached(
            "UPDATE deliveries INDEXED BY deliveries_held
                SET state = 'Pending', next_attempt_on = ?2, lease_owner = NULL, lease_until = NULL,
                    last_modified_on = ?2
              WHERE subscription_id = ?1 AND state = 'Held'",
        )
        .and_then(|mut s| s.execute(params![record.id.as_bytes(), now.millis()]))
        .map_err(|e| internal(&e))?;
    record.status = SubscriptionStatus::Active;
    record.version += 1;
    record.last_modified_on = now;
    Ok(queued)
}

/// Resumes a merchant's suspended subscription and queues its held deliveries; answers the
/// record opened and how many it queued.
pub fn resume_subscription(
    c: &Connection,
    ring: &KeyRing,
    change: &SubscriptionChange,
) -> Result<(ChangeSubscriptionOutcome, usize)> {
    let mut record = match owned_subscription(c, change.merchant_id, change.id, change.if_match.as_deref())? {
        Ok(record) => open_subscription(ring, record)?,
        Err(outcome) => return Ok((outcome, 0)),
    };
    let queued = resume_held(c, &mut record, change.now)?;
    Ok((ChangeSubscriptionOutcome::Done(record), queued))
}

/// Makes `rotation.secret` a merchant's subscription's signing secret; the replaced one keeps
/// signing for the grace period. Answers the record opened.
pub fn rotate_secret(
    c: &Connection,
    ring: &KeyRing,
    change: &SubscriptionChange,
    rotation: &SecretRotation,
) -> Result<ChangeSubscriptionOutcome> {
    let (id, now) = (change.id, change.now);
    let mut record = match owned_subscription(c, change.merchant_id, id, change.if_match.as_deref())? {
        Ok(record) => open_subscription(ring, record)?,
        Err(outcome) => return Ok(outcome),
    };
    let overlap = !rotation.grace.is_zero();
    let expires_on = now.plus(rotation.grace);
    let sealed = seal_signing_secret(ring, id, &rotation.secret)?;
    c.prepare_cached(
        "UPDATE subscriptions
            SET previous_secret = CASE WHEN ?3 THEN signing_secret END,
                previous_secret_expires_on = CASE WHEN ?3 THEN ?4 END,
                signing_secret = ?2, version = version + 1, last_modified_on = ?5
          WHERE id = ?1",
    )
    .and_then(|mut s| s.execute(params![id.as_bytes(), sealed, overlap, expires_on.millis(), now.millis()]))
    .map_err(|e| internal(&e))?;
    let replaced = std::mem::replace(&mut record.signing_secret, rotation.secret.clone());
    record.previous_secret = overlap.then_some(PreviousSecret { secret: replaced, expires_on });
    record.version += 1;
    record.last_modified_on = now;
    Ok(ChangeSubscriptionOutcome::Done(record))
}

/// Queues again the failed deliveries of a merchant's subscription whose event lies in the
/// window (held while it is suspended); answers what it came to and how many became pending.
pub fn recover(c: &Connection, change: &SubscriptionChange, window: RecoverWindow) -> Result<(RecoverOutcome, usize)> {
    let subscription = match owned_subscription(c, change.merchant_id, change.id, change.if_match.as_deref())? {
        Ok(record) => record,
        Err(ChangeSubscriptionOutcome::OtherMerchant) => return Ok((RecoverOutcome::OtherMerchant, 0)),
        Err(_) => return Ok((RecoverOutcome::NotFound, 0)),
    };
    let state = match subscription.status {
        SubscriptionStatus::Active => DeliveryState::Pending,
        SubscriptionStatus::Suspended { .. } => DeliveryState::Held,
    };
    // A delivery is created in the transaction of its event, with its time.
    let ids: Vec<[u8; 16]> = c
        .prepare_cached(
            "SELECT id FROM deliveries INDEXED BY deliveries_by_subscription
              WHERE subscription_id = ?1 AND created_on >= ?2 AND created_on < ?3 AND state = 'Failed'
              ORDER BY created_on, id LIMIT ?4",
        )
        .and_then(|mut s| {
            s.query_map(
                params![change.id.as_bytes(), window.since.millis(), window.until.millis(), window.limit as i64 + 1],
                |row| row.get(0),
            )?
            .collect()
        })
        .map_err(|e| internal(&e))?;
    let more = ids.len() > window.limit;
    let mut requeue = c
        .prepare_cached(
            "UPDATE deliveries SET state = ?2, retry_index = 0, next_attempt_on = ?3, lease_owner = NULL,
                    lease_until = NULL, last_modified_on = ?3
              WHERE id = ?1",
        )
        .map_err(|e| internal(&e))?;
    let ids = &ids[..ids.len().min(window.limit)];
    for id in ids {
        requeue.execute(params![id, state.as_str(), change.now.millis()]).map_err(|e| internal(&e))?;
    }
    let pending = if state == DeliveryState::Pending { ids.len() } else { 0 };
    Ok((RecoverOutcome::Queued { queued: ids.len() as u64, more }, pending))
}

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

/// How many due deliveries of subscriptions at their cap a claim passes over, walking the due
/// queue in order, before it looks subscription by subscription instead.
const PASS_OVER_AT_MOST: usize = 256;

/// The due queue, oldest first (`deliveries_due`).
const DUE: &str = "SELECT id, subscription_id FROM deliveries
      WHERE state = 'Pending' AND next_attempt_on <= ?1 AND (lease_until IS NULL OR lease_until <= ?1)
      ORDER BY next_attempt_on";
/// Unexpired leases per subscription (`deliveries_leased` holds only leased rows).
const LEASES: &str = "SELECT subscription_id, count(*) FROM deliveries
      WHERE lease_until > ?1 AND state = 'Pending' GROUP BY subscription_id";
/// The next subscription with pending deliveries after `?1` (`deliveries_due_by_subscription`).
const NEXT_SUBSCRIPTION: &str = "SELECT subscription_id FROM deliveries
      WHERE state = 'Pending' AND subscription_id > ?1 ORDER BY subscription_id LIMIT 1";
/// The first `?3` due deliveries of one subscription (`deliveries_due_by_subscription`).
const FIRST_DUE: &str = "SELECT id, next_attempt_on FROM deliveries
      WHERE subscription_id = ?1 AND state = 'Pending' AND next_attempt_on <= ?2
        AND (lease_until IS NULL OR lease_until <= ?2)
      ORDER BY next_attempt_on LIMIT ?3";
/// Voids the leases of every owner but `?1` (`deliveries_leased`).
const VOID_OTHER_LEASES: &str = "UPDATE deliveries SET lease_owner = NULL, lease_until = NULL
      WHERE lease_until IS NOT NULL AND (lease_owner IS NULL OR lease_owner <> ?1)";

/// Leases up to `limit` due deliveries to `owner` until `lease_until`, oldest due first,
/// leaving out subscriptions that already hold `per_subscription` unexpired leases; answers
/// their ids.
///
/// It walks the due queue (`deliveries_due`) as long as it passes over few deliveries of
/// subscriptions at their cap. Behind a long backlog of one slow receiver it turns to the
/// subscriptions instead: one seek per subscription with pending deliveries
/// (`deliveries_due_by_subscription`) and the first due deliveries of each that has room, so
/// that the cost follows the number of subscriptions, not the length of a backlog.
fn lease_due(
    c: &Connection,
    owner: Uuid,
    now: Timestamp,
    lease_until: Timestamp,
    limit: usize,
    per_subscription: usize,
) -> Result<Vec<[u8; 16]>> {
    if limit == 0 {
        return Ok(Vec::new());
    }
    let leased = leases_per_subscription(c, now)?;
    let mut picker = crate::store::webhooks::ClaimPicker::new(leased.clone(), per_subscription, limit);
    let mut due = c.prepare_cached(DUE).map_err(|e| internal(&e))?;
    let mut rows = due.query(params![now.millis()]).map_err(|e| internal(&e))?;
    let mut walked_enough = true;
    while let Some(row) = rows.next().map_err(|e| internal(&e))? {
        if picker.is_full() {
            break;
        }
        if picker.passed_over() >= PASS_OVER_AT_MOST {
            walked_enough = false;
            break;
        }
        picker.offer(uuid_at(row, 0).map_err(|e| internal(&e))?, uuid_at(row, 1).map_err(|e| internal(&e))?);
    }
    drop(rows);
    let ids = if walked_enough {
        picker.into_picked()
    } else {
        due_by_subscription(c, now, &leased, per_subscription, limit)?
    };

    let mut lease = c
        .prepare_cached("UPDATE deliveries SET lease_owner = ?2, lease_until = ?3 WHERE id = ?1")
        .map_err(|e| internal(&e))?;
    for id in &ids {
        lease.execute(params![id.as_bytes(), owner.as_bytes(), lease_until.millis()]).map_err(|e| internal(&e))?;
    }
    Ok(ids.into_iter().map(Uuid::into_bytes).collect())
}

/// Unexpired leases per subscription.
fn leases_per_subscription(c: &Connection, now: Timestamp) -> Result<std::collections::HashMap<Uuid, usize>> {
    let mut statement = c.prepare_cached(LEASES).map_err(|e| internal(&e))?;
    let rows = statement
        .query_map(params![now.millis()], |row| Ok((uuid_at(row, 0)?, row.get::<_, i64>(1)?)))
        .map_err(|e| internal(&e))?;
    let mut leased = std::collections::HashMap::new();
    for row in rows {
        let (subscription, n) = row.map_err(|e| internal(&e))?;
        leased.insert(subscription, usize::try_from(n).unwrap_or(0));
    }
    Ok(leased)
}

/// The oldest due deliveries, at most `limit`, of every subscription with room under its cap
/// (`leased` are the leases each holds), found subscription by subscription: a backlog at its
/// cap is skipped without being read.
fn due_by_subscription(
    c: &Connection,
    now: Timestamp,
    leased: &std::collections::HashMap<Uuid, usize>,
    per_subscription: usize,
    limit: usize,
) -> Result<Vec<Uuid>> {
    let mut next_subscription = c.prepare_cached(NEXT_SUBSCRIPTION).map_err(|e| internal(&e))?;
    let mut first_due = c.prepare_cached(FIRST_DUE).map_err(|e| internal(&e))?;
    // Blobs compare bytewise, and the empty blob sorts before every id.
    let mut after: Vec<u8> = Vec::new();
    let mut candidates: Vec<(i64, Uuid)> = Vec::new();
    while let Some(subscription) = next_subscription
        .query_row(params![after], |row| row.get::<_, [u8; 16]>(0))
        .optional()
        .map_err(|e| internal(&e))?
    {
        after = subscription.to_vec();
        let held = leased.get(&Uuid::from_bytes(subscription)).copied().unwrap_or(0);
        let room = per_subscription.max(1).saturating_sub(held).min(limit);
        if room == 0 {
            continue;
        }
        let rows = first_due
            .query_map(params![subscription, now.millis(), room as i64], |row| Ok((row.get(1)?, uuid_at(row, 0)?)))
            .map_err(|e| internal(&e))?;
        for row in rows {
            candidates.push(row.map_err(|e| internal(&e))?);
        }
    }
    candidates.sort_unstable();
    candidates.truncate(limit);
    Ok(candidates.into_iter().map(|(_, id)| id).collect())
}

/// Voids every lease not held by `owner`: one process owns the file, so a lease of another
/// owner belongs to a process that is gone. Answers how many deliveries it freed.
pub fn void_other_leases(c: &Connection, owner: Uuid) -> Result<usize> {
    c.prepare_cached(VOID_OTHER_LEASES).and_then(|mut s| s.execute(params![owner.as_bytes()])).map_err(|e| internal(&e))
}

/// Claims up to `limit` due deliveries for `owner` until `lease_until`, at most
/// `per_subscription` leased per subscription (`lease_due`), with their
/// subscription's API key and signing secret opened with `ring`. A delivery whose secrets do
/// not open is left out (and logged); its lease runs out and it is claimed again later.
pub fn claim_deliveries(
    c: &Connection,
    ring: &KeyRing,
    owner: Uuid,
    now: Timestamp,
    lease_until: Timestamp,
    limit: usize,
    per_subscription: usize,
) -> Result<Vec<ClaimedDelivery>> {
    let ids = lease_due(c, owner, now, lease_until, limit, per_subscription)?;
    let mut details = c
        .prepare_cached(
            "SELECT d.id, d.event_id, e.type, e.created_on, e.data, s.callback_url, s.api_key, s.signing_secret,
                    d.attempts, d.retry_index, s.id,
                    CASE WHEN s.previous_secret_expires_on > ?2 THEN s.previous_secret END
               FROM deliveries d JOIN events e ON e.id = d.event_id JOIN subscriptions s ON s.id = d.subscription_id
              WHERE d.id = ?1",
        )
        .map_err(|e| internal(&e))?;
    let mut claimed = Vec::with_capacity(ids.len());
    for id in ids {
        let delivery = details
            .query_row(params![id, now.millis()], |row| {
                let kind: String = row.get(2)?;
                let delivery = ClaimedDelivery {
                    id: uuid_at(row, 0)?,
                    event_id: uuid_at(row, 1)?,
                    event_type: EventKind::parse(&kind).ok_or_else(|| bad_column(2))?,
                    event_time: Timestamp::from_millis(row.get(3)?),
                    data: row.get(4)?,
                    callback_url: row.get(5)?,
                    api_key: row.get(6)?,
                    signing_secret: row.get(7)?,
                    previous_secret: row.get(11)?,
                    attempts: row.get(8)?,
                    retry_index: row.get(9)?,
                };
                Ok((uuid_at(row, 10)?, delivery))
            })
            .optional()
            .map_err(|e| internal(&e))?;
        let Some((subscription, delivery)) = delivery else {
            continue;
        };
        match open_claimed(ring, subscription, delivery) {
            Ok(delivery) => claimed.push(delivery),
            Err(error) => tracing::error!(%error, "a claimed delivery cannot be sent"),
        }
    }
    Ok(claimed)
}

fn bad_column(index: usize) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(index, rusqlite::types::Type::Text, "unexpected value".into())
}

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
fn receiver_answered(c: &Connection, subscription: &[u8; 16]) -> Result<()> {
    c.prepare_cached("UPDATE subscriptions SET failing_since = NULL WHERE id = ?1")
        .and_then(|mut s| s.execute(params![subscription]))
        .map(drop)
        .map_err(|e| internal(&e))
}

/// The receiver of `subscription` began a run of failures at `since`.
fn receiver_failing_since(c: &Connection, subscription: &[u8; 16], since: Timestamp) -> Result<()> {
    c.prepare_cached("UPDATE subscriptions SET failing_since = ?2 WHERE id = ?1 AND failing_since IS NULL")
        .and_then(|mut s| s.execute(params![subscription, since.millis()]))
        .map(drop)
        .map_err(|e| internal(&e))
}

/// Suspends `subscription` for `reason`.
fn suspend(c: &Connection, subscription: &[u8; 16], reason: SuspendReason, now: Timestamp) -> Result<()> {
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
fn hold_pending(c: &Connection, subscription: Uuid, now: Timestamp) -> Result<()> {
    c.prepare_cached(
        "UPDATE deliveries INDEXED BY deliveries_due_by_subscription
            SET state = 'Held', lease_owner = NULL, lease_until = NULL, last_modified_on = ?2
          WHERE subscription_id = ?1 AND state = 'Pending'",
    )
    .and_then(|mut s| s.execute(params![subscription.as_bytes(), now.millis()]))
    .map(drop)
    .map_err(|e| internal(&e))
}

/// Gives up `owner`'s leases on deliveries it claimed but did not attempt.
pub fn release_claims(c: &Connection, owner: Uuid, ids: &[Uuid]) -> Result<()> {
    let mut statement = c
        .prepare_cached(
            "UPDATE deliveries SET lease_owner = NULL, lease_until = NULL WHERE id = ?1 AND lease_owner = ?2",
        )
        .map_err(|e| internal(&e))?;
    for id in ids {
        statement.execute(params![id.as_bytes(), owner.as_bytes()]).map_err(|e| internal(&e))?;
    }
    Ok(())
}

const DELIVERY_COLUMNS: &str = "d.id, d.event_id, e.type, e.session_id, d.subscription_id, d.merchant_id, d.state,
     d.next_attempt_on, d.created_on, d.last_modified_on";

fn delivery_from_row(row: &Row<'_>) -> rusqlite::Result<DeliveryRecord> {
    let kind: String = row.get(2)?;
    let state: String = row.get(6)?;
    let state = DeliveryState::parse(&state).ok_or_else(|| bad_column(6))?;
    Ok(DeliveryRecord {
        id: uuid_at(row, 0)?,
        event_id: uuid_at(row, 1)?,
        event_type: EventKind::parse(&kind).ok_or_else(|| bad_column(2))?,
        session_id: Some(uuid_at(row, 3)?).filter(|id| *id != NO_SESSION),
        subscription_id: uuid_at(row, 4)?,
        merchant_id: uuid_at(row, 5)?,
        state,
        next_attempt_on: (state == DeliveryState::Pending)
            .then(|| row.get(7).map(Timestamp::from_millis))
            .transpose()?,
        created_on: Timestamp::from_millis(row.get(8)?),
        last_modified_on: Timestamp::from_millis(row.get(9)?),
        attempts: Vec::new(),
    })
}

fn with_attempts(c: &Connection, mut delivery: DeliveryRecord) -> Result<DeliveryRecord> {
    let mut statement = c
        .prepare_cached(
            "SELECT attempt, started_on, duration_ms, status, error FROM delivery_attempts
              WHERE delivery_id = ?1 ORDER BY attempt",
        )
        .map_err(|e| internal(&e))?;
    delivery.attempts = statement
        .query_map(params![delivery.id.as_bytes()], |row| {
            Ok(AttemptRecord {
                attempt: row.get(0)?,
                started_on: Timestamp::from_millis(row.get(1)?),
                duration_ms: row.get(2)?,
                status: row.get(3)?,
                error: row.get(4)?,
            })
        })
        .and_then(|rows| rows.collect())
        .map_err(|e| internal(&e))?;
    Ok(delivery)
}

/// One delivery with its attempts, of any merchant.
pub fn get_delivery(c: &Connection, id: Uuid) -> Result<Option<DeliveryRecord>> {
    let delivery = c
        .prepare_cached(&format!(
            "SELECT {DELIVERY_COLUMNS} FROM deliveries d JOIN events e ON e.id = d.event_id WHERE d.id = ?1"
        ))
        .and_then(|mut s| s.query_row(params![id.as_bytes()], delivery_from_row).optional())
        .map_err(|e| internal(&e))?;
    delivery.map(|d| with_attempts(c, d)).transpose()
}

/// A merchant's deliveries with their attempts, newest first, `limit + 1` at most.
pub fn list_deliveries(c: &Connection, merchant_id: Uuid, filter: &DeliveryFilter) -> Result<Vec<DeliveryRecord>> {
    let (after_time, after_id) =
        filter.after.map(|(t, id)| (t.millis(), *id.as_bytes())).unwrap_or((i64::MAX, [0xff; 16]));
    let mut statement = c
        .prepare_cached(&format!(
            "SELECT {DELIVERY_COLUMNS} FROM deliveries d JOIN events e ON e.id = d.event_id
              WHERE d.merchant_id = ?1 AND (?2 IS NULL OR d.subscription_id = ?2) AND (?3 IS NULL OR d.state = ?3)
                AND (d.created_on, d.id) < (?4, ?5)
              ORDER BY d.created_on DESC, d.id DESC LIMIT ?6"
        ))
        .map_err(|e| internal(&e))?;
    let deliveries: Vec<DeliveryRecord> = statement
        .query_map(
            params![
                merchant_id.as_bytes(),
                filter.subscription_id.map(|id| *id.as_bytes()),
                filter.state.map(DeliveryState::as_str),
                after_time,
                after_id,
                (filter.limit + 1) as i64
            ],
            delivery_from_row,
        )
        .and_then(|rows| rows.collect())
        .map_err(|e| internal(&e))?;
    deliveries.into_iter().map(|d| with_attempts(c, d)).collect()
}

/// Queues a `Failed` (or `Delivered`) delivery again with a fresh retry schedule.
pub fn redeliver(c: &Connection, merchant_id: Uuid, id: Uuid, now: Timestamp) -> Result<RedeliverOutcome> {
    let delivery = match decide_redelivery(get_delivery(c, id)?, merchant_id) {
        RedeliverDecision::Requeue(delivery) => delivery,
        RedeliverDecision::Answer(answer) => return Ok(answer),
    };
    // A delivery whose subscription is gone can never be sent again; one whose subscription is
    // suspended is held until it is resumed.
    let state = match get_subscription(c, delivery.subscription_id)? {
        None => return Ok(RedeliverOutcome::Cancelled),
        Some(s) if s.status != SubscriptionStatus::Active => DeliveryState::Held,
        Some(_) => DeliveryState::Pending,
    };
    c.execute(
        "UPDATE deliveries SET state = ?3, retry_index = 0, next_attempt_on = ?2, lease_owner = NULL,
                lease_until = NULL, last_modified_on = ?2
          WHERE id = ?1",
        params![id.as_bytes(), now.millis(), state.as_str()],
    )
    .map_err(|e| internal(&e))?;
    Ok(RedeliverOutcome::Queued(get_delivery(c, id)?.expect("it was just read")))
}

/// The pending deliveries and the oldest due one at `now`, read over the due index.
pub fn backlog(c: &Connection, now: Timestamp) -> Result<Backlog> {
    c.prepare_cached(
        "SELECT count(*), min(CASE WHEN next_attempt_on <= ?1 THEN next_attempt_on END),
                (SELECT count(*) FROM deliveries INDEXED BY deliveries_held WHERE state = 'Held')
           FROM deliveries INDEXED BY deliveries_due WHERE state = 'Pending'",
    )
    .and_then(|mut s| {
        s.query_row(params![now.millis()], |row| {
            Ok(Backlog {
                pending: row.get::<_, i64>(0)?.max(0) as u64,
                oldest_due: row.get::<_, Option<i64>>(1)?.map(Timestamp::from_millis),
                held: row.get::<_, i64>(2)?.max(0) as u64,
            })
        })
    })
    .map_err(|e| internal(&e))
}

/// Deletes up to `batch` finished deliveries (with their attempts) and events older than the
/// retention, and idempotency records older than theirs; answers how many rows went.
pub fn purge(c: &Connection, now: Timestamp, retention: Retention, batch: usize) -> Result<usize> {
    let cutoff = now.minus(retention.deliveries).millis();
    let batch = batch as i64;
    let run = |sql: &str| c.execute(sql, params![cutoff, batch]).map_err(|e| internal(&e));
    let mut removed = run("DELETE FROM delivery_attempts WHERE delivery_id IN (
             SELECT id FROM deliveries WHERE state NOT IN ('Pending', 'Held') AND last_modified_on < ?1 ORDER BY id LIMIT ?2)")?;
    removed += run("DELETE FROM deliveries WHERE id IN (
             SELECT id FROM deliveries WHERE state NOT IN ('Pending', 'Held') AND last_modified_on < ?1 ORDER BY id LIMIT ?2)")?;
    removed += run("DELETE FROM events WHERE id IN (
             SELECT e.id FROM events e WHERE e.created_on < ?1
                AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.event_id = e.id) LIMIT ?2)")?;
    let idempotency_cutoff = now.minus(retention.idempotency).millis();
    removed += c
        .execute(
            "DELETE FROM idempotency WHERE (merchant_id, request_id) IN (
                 SELECT merchant_id, request_id FROM idempotency WHERE started_on < ?1 LIMIT ?2)",
            params![idempotency_cutoff, batch],
        )
        .map_err(|e| internal(&e))?;
    // A session lives at most a day, so a day after its last code a sign-in state is history.
    removed += c
        .execute(
            "DELETE FROM one_time_codes WHERE session_id IN (
                 SELECT session_id FROM one_time_codes WHERE last_sent_on < ?1 LIMIT ?2)",
            params![idempotency_cutoff, batch],
        )
        .map_err(|e| internal(&e))?;
    Ok(removed)
}

#[cfg(test)]
mod claim_tests {
    use std::time::Duration;

    use super::*;

    const NOW: Timestamp = Timestamp::from_millis(1_800_000_000_000);

    /// A migrated database whose deliveries need no events or subscriptions.
    fn database() -> (Connection, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let mut connection = super::super::connect(&dir.path().join("d.db"), true).unwrap();
        super::super::schema::migrate(&mut connection).unwrap();
        connection.execute_batch("PRAGMA foreign_keys = OFF").unwrap();
        (connection, dir)
    }

    /// `n` pending deliveries of `subscription`, due one a millisecond from `first_due_on`.
    fn queue(c: &Connection, subscription: Uuid, n: usize, first_due_on: i64) -> Vec<Uuid> {
        let mut insert = c
            .prepare(
                "INSERT INTO deliveries (id, event_id, subscription_id, merchant_id, state, next_attempt_on,
                                         created_on, last_modified_on)
                 VALUES (?1, ?2, ?3, ?4, 'Pending', ?5, ?5, ?5)",
            )
            .unwrap();
        (0..n)
            .map(|i| {
                let id = Uuid::now_v7();
                let due_on = first_due_on + i as i64;
                let event = Uuid::new_v4();
                let row = params![id.as_bytes(), event.as_bytes(), subscription.as_bytes(), [0u8; 16], due_on];
                insert.execute(row).unwrap();
                id
            })
            .collect()
    }

    fn claim(c: &Connection, owner: Uuid, at: Timestamp, limit: usize, per_subscription: usize) -> Vec<Uuid> {
        let until = at.plus(Duration::from_secs(60));
        lease_due(c, owner, at, until, limit, per_subscription).unwrap().into_iter().map(Uuid::from_bytes).collect()
    }

    #[test]
    fn a_claim_keeps_each_subscription_within_its_cap_counting_the_leases_it_holds() {
        let (c, _dir) = database();
        let (slow, other) = (Uuid::now_v7(), Uuid::now_v7());
        let backlog = queue(&c, slow, 5, NOW.millis() - 1_000);
        let others = queue(&c, other, 3, NOW.millis() - 500);
        let owner = Uuid::now_v7();
        assert_eq!(claim(&c, owner, NOW, 10, 2), [backlog[0], backlog[1], others[0], others[1]], "oldest due first");
        assert_eq!(claim(&c, Uuid::now_v7(), NOW, 10, 2), Vec::<Uuid>::new(), "both hold their two");
        assert_eq!(claim(&c, owner, NOW, 10, 3), [backlog[2], others[2]], "a larger cap has room for one more each");
        // Once the leases run out they count no more.
        let later = NOW.plus(Duration::from_secs(61));
        assert_eq!(claim(&c, owner, later, 10, 2), [backlog[0], backlog[1], others[0], others[1]]);
    }

    #[test]
    fn behind_a_long_backlog_at_its_cap_a_claim_still_finds_the_other_subscriptions() {
        let (c, _dir) = database();
        let slow = Uuid::now_v7();
        let backlog = queue(&c, slow, 3 * PASS_OVER_AT_MOST, NOW.millis() - 100_000);
        let (one, two) = (Uuid::now_v7(), Uuid::now_v7());
        let ones = queue(&c, one, 5, NOW.millis() - 2_000);
        let twos = queue(&c, two, 5, NOW.millis() - 1_000);
        let owner = Uuid::now_v7();
        let first = claim(&c, owner, NOW, 100, 4);
        let expected: Vec<Uuid> = backlog[..4].iter().chain(&ones[..4]).chain(&twos[..4]).copied().collect();
        assert_eq!(first, expected, "the cap, oldest due first, the backlog's first four included");
        // With the backlog at its cap from the start, the claim looks subscription by subscription.
        let second = claim(&c, owner, NOW, 100, 5);
        assert_eq!(second, [backlog[4], ones[4], twos[4]]);
        assert_eq!(claim(&c, owner, NOW, 100, 5), Vec::<Uuid>::new());
        // The limit holds there too, oldest due first.
        assert_eq!(claim(&c, owner, NOW, 2, 7), [backlog[5], backlog[6]]);
    }

    #[test]
    fn a_start_voids_every_lease_but_the_new_owners() {
        let (c, _dir) = database();
        let subscription = Uuid::now_v7();
        let queued = queue(&c, subscription, 3, NOW.millis() - 1_000);
        let (gone, me) = (Uuid::now_v7(), Uuid::now_v7());
        assert_eq!(claim(&c, gone, NOW, 2, 16), queued[..2]);
        assert_eq!(claim(&c, me, NOW, 1, 16), queued[2..]);
        assert_eq!(void_other_leases(&c, me).unwrap(), 2);
        assert_eq!(claim(&c, me, NOW, 10, 16), queued[..2], "free at once, long before the leases ran out");
        assert_eq!(void_other_leases(&c, me).unwrap(), 0, "its own leases are kept");
    }

    #[test]
    fn claims_read_through_their_indexes() {
        let (c, _dir) = database();
        let plan = |sql: &str| -> String {
            let mut statement = c.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
            let params = vec![rusqlite::types::Value::Null; statement.parameter_count()];
            let rows = statement.query_map(rusqlite::params_from_iter(params), |r| r.get::<_, String>(3)).unwrap();
            rows.map(|row| row.unwrap()).collect::<Vec<_>>().join("; ")
        };
        for (sql, index) in [
            (DUE, "deliveries_due"),
            (LEASES, "deliveries_leased"),
            (NEXT_SUBSCRIPTION, "deliveries_due_by_subscription"),
            (FIRST_DUE, "deliveries_due_by_subscription"),
            (VOID_OTHER_LEASES, "deliveries_leased"),
        ] {
            let plan = plan(sql);
            let words: Vec<&str> = plan.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).collect();
            let used = words.windows(2).any(|pair| pair == ["INDEX", index]);
            assert!(used, "{sql}: {plan}");
            assert!(!plan.contains("TEMP B-TREE"), "{sql}: {plan}");
        }
    }
}
