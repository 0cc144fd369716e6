//! Subscriptions: create, read, list, replace, remove, rotate the secret, suspend and resume,
//! and recover failed deliveries.

use super::*;

pub(super) const SUBSCRIPTION_COLUMNS: &str =
    "id, merchant_id, callback_url, api_key, event_mask, signing_secret, created_on,
     last_modified_on, version, previous_secret, previous_secret_expires_on, state, suspended_on, suspended_reason";

pub(super) fn subscription_from_row(row: &Row<'_>) -> rusqlite::Result<SubscriptionRecord> {
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

pub(super) fn owned_subscription(
    c: &Connection,
    merchant_id: Uuid,
    id: Uuid,
    if_match: Option<&str>,
) -> Result<std::result::Result<SubscriptionRecord, ChangeSubscriptionOutcome>> {
    Ok(crate::domain::webhooks::owned(get_subscription(c, id)?, merchant_id, if_match))
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
        &format!(
            "UPDATE deliveries SET state = 'Cancelled', lease_owner = NULL, lease_until = NULL, last_modified_on = ?2
              WHERE subscription_id = ?1 AND {}",
            *OPEN_DELIVERY
        ),
        params![id.as_bytes(), now.millis()],
    )
    .and_then(|_| c.execute("DELETE FROM subscriptions WHERE id = ?1", params![id.as_bytes()]))
    .map_err(|e| internal(&e))?;
    Ok(ChangeSubscriptionOutcome::Done(record))
}

/// Resumes `record` (opened) when it is suspended: active again, with its held deliveries
/// pending now; answers how many it queued (0 for an active one, which stays as it is).
pub(super) fn resume_held(c: &Connection, record: &mut SubscriptionRecord, now: Timestamp) -> Result<usize> {
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
    let owned = owned_subscription(c, change.merchant_id, change.id, change.if_match.as_deref())?;
    let state = match recovered_state(owned) {
        Ok(state) => state,
        Err(answer) => return Ok((answer, 0)),
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
