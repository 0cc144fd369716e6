//! Subscriptions: create, read, list, replace, remove, rotate the secret, suspend and resume,
//! and recover failed deliveries.

use super::*;

/// An event mask as the `integer` column holds it.
pub(super) fn mask_param(bits: i64) -> i32 {
    i32::try_from(bits).unwrap_or(0)
}

pub(super) const SUBSCRIPTION_COLUMNS: &str =
    "id, merchant_id, callback_url, api_key, event_mask, signing_secret, created_on,
     last_modified_on, version, previous_secret, previous_secret_expires_on, state, suspended_on, suspended_reason";

pub(super) fn subscription_from_row(row: &Row) -> Result<SubscriptionRecord> {
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

pub(super) async fn load_subscription<C: GenericClient>(
    c: &C,
    id: Uuid,
    lock: &str,
) -> Result<Option<SubscriptionRecord>> {
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

pub(super) async fn put_in(tx: &Transaction<'_>, record: SubscriptionRecord) -> Result<PutSubscriptionOutcome> {
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
pub(super) async fn owned_subscription(
    tx: &Transaction<'_>,
    change: &SubscriptionChange,
    lock: &str,
) -> Result<std::result::Result<SubscriptionRecord, ChangeSubscriptionOutcome>> {
    let found = load_subscription(tx, change.id, lock).await?;
    Ok(crate::domain::webhooks::owned(found, change.merchant_id, change.if_match.as_deref()))
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

pub(super) async fn patch_in(
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
pub(super) async fn resume_in(tx: &Transaction<'_>, record: &mut SubscriptionRecord, now: Timestamp) -> Result<usize> {
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

pub(super) async fn rotate_in(
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

pub(super) async fn recover_in(
    tx: &Transaction<'_>,
    change: &SubscriptionChange,
    window: RecoverWindow,
) -> Result<(RecoverOutcome, usize)> {
    // The lock makes a concurrent suspension (`FOR UPDATE`) wait, so the state read here holds
    // until the commit.
    let state = match recovered_state(owned_subscription(tx, change, "FOR NO KEY UPDATE").await?) {
        Ok(state) => state,
        Err(answer) => return Ok((answer, 0)),
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

pub(super) async fn delete_in(
    tx: &Transaction<'_>,
    ring: &KeyRing,
    change: &SubscriptionChange,
) -> Result<ChangeSubscriptionOutcome> {
    let (id, now) = (change.id, change.now);
    let record = match owned_subscription(tx, change, "FOR UPDATE").await? {
        Ok(record) => open_subscription(ring, record)?,
        Err(outcome) => return Ok(outcome),
    };
    static CANCEL: LazyLock<String> = LazyLock::new(|| {
        format!(
            "WITH doomed AS MATERIALIZED (
                 SELECT id FROM deliveries WHERE subscription_id = $1 AND {}
                  ORDER BY id FOR NO KEY UPDATE)
             UPDATE deliveries d
                SET state = 'Cancelled', lease_owner = NULL, lease_until = NULL, last_modified_on = $2
               FROM doomed WHERE d.id = doomed.id",
            *OPEN_DELIVERY
        )
    });
    execute(tx, &CANCEL, &[&id, &Ts(now)]).await?;
    execute(tx, "DELETE FROM subscriptions WHERE id = $1", &[&id]).await?;
    Ok(ChangeSubscriptionOutcome::Done(record))
}
