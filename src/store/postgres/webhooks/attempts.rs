//! Recording attempts: each delivery moves on, each receiver keeps its run of failures, and
//! subscriptions are suspended as the policy says.

use super::*;

/// A subscription's receiver while a batch of attempts is recorded: when its run of failures
/// began as stored, the receiver as the batch leaves it, and the reason the batch suspends it.
pub(super) struct Batched {
    stored_since: Option<Timestamp>,
    receiver: Receiver,
    suspend: Option<SuspendReason>,
}

/// The receivers of a batch's deliveries by subscription, and the subscription of each delivery
/// whose lease its owner still holds.
type Locked = (HashMap<Uuid, Batched>, HashMap<Uuid, Uuid>);

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
    // SQLite applies outcomes one by one, and the first for a delivery clears its lease, so a
    // later one for the same delivery changes nothing: keep only the first per delivery.
    let mut seen = HashSet::new();
    let firsts: Vec<&AttemptOutcome> = outcomes.iter().filter(|o| seen.insert(o.delivery_id)).collect();
    let tx = c.transaction().await?;
    insert_attempts(&tx, &outcomes).await?;
    let (mut receivers, leased) = lock_receivers_and_leases(&tx, &firsts).await?;
    // In the order recorded, as SQLite applies them.
    let mut suspensions = Vec::new();
    for outcome in &firsts {
        let Some((subscription, batched)) =
            leased.get(&outcome.delivery_id).and_then(|s| receivers.get_mut(s).map(|r| (*s, r)))
        else {
            // The lease is gone (another dispatcher sends it again): only the attempt is kept.
            continue;
        };
        if let Some(reason) = batched.receiver.attempted(outcome, policy, now) {
            batched.suspend = Some(reason);
            suspensions.push(Suspension { subscription_id: subscription, reason });
        }
    }
    let mut suspended: Vec<Uuid> = suspensions.iter().map(|s| s.subscription_id).collect();
    suspended.sort_unstable();
    if !suspended.is_empty() {
        // Changing the state takes `FOR UPDATE` (see the module's comment): events being
        // queued for these subscriptions commit first, and their deliveries are held below.
        execute(&tx, "SELECT 1 FROM subscriptions WHERE id = ANY($1) ORDER BY id FOR UPDATE", &[&suspended]).await?;
    }
    let queued = move_on(&tx, &firsts, &(receivers, leased), now).await?;
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

fn int(n: i64) -> Result<i32> {
    i32::try_from(n).map_err(|_| internal(format!("{n} does not fit an integer column")))
}

/// Keeps every attempt of the batch (one already kept is left as it is).
async fn insert_attempts(tx: &Transaction<'_>, outcomes: &[AttemptOutcome]) -> Result<()> {
    let mut rows = (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for outcome in outcomes {
        let a = &outcome.attempt;
        rows.0.push(outcome.delivery_id);
        rows.1.push(int(a.attempt)?);
        rows.2.push(Ts(a.started_on));
        rows.3.push(a.duration_ms);
        rows.4.push(a.status.map(i32::from));
        rows.5.push(a.error.clone());
    }
    execute(
        tx,
        "INSERT INTO delivery_attempts (delivery_id, attempt, started_on, duration_ms, status, error)
         SELECT * FROM unnest($1::uuid[], $2::int4[], $3::timestamptz[], $4::int8[], $5::int4[], $6::text[])
         ON CONFLICT DO NOTHING",
        &[&rows.0, &rows.1, &rows.2, &rows.3, &rows.4, &rows.5],
    )
    .await
    .map(drop)
}

/// Locks, in lock order, the receivers of the batch's deliveries (their state and run of
/// failures, in id order), then the deliveries whose lease their owner still holds (in id
/// order). `UNION ALL` runs its branches in turn. A delivery's subscription never changes, so
/// it is read before its row is locked.
async fn lock_receivers_and_leases(tx: &Transaction<'_>, firsts: &[&AttemptOutcome]) -> Result<Locked> {
    let ids: Vec<Uuid> = firsts.iter().map(|o| o.delivery_id).collect();
    let owners: Vec<Uuid> = firsts.iter().map(|o| o.owner).collect();
    let rows = query(
        tx,
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
    let (mut receivers, mut leased) = (HashMap::new(), HashMap::new());
    for row in &rows {
        let subscription: Uuid = row.try_get(1)?;
        match row.try_get::<_, Option<Uuid>>(0)? {
            Some(delivery) => {
                leased.insert(delivery, subscription);
            }
            None => {
                let failing_since = ts_opt(row, 3)?;
                let receiver = Receiver { suspended: row.try_get(2)?, failing_since };
                receivers.insert(subscription, Batched { stored_since: failing_since, receiver, suspend: None });
            }
        }
    }
    Ok((receivers, leased))
}

/// Moves each delivery whose lease is still held on (`delivery_moves`) and writes down what
/// the batch did to each receiver; answers how many deliveries became pending.
async fn move_on(tx: &Transaction<'_>, firsts: &[&AttemptOutcome], locked: &Locked, now: Timestamp) -> Result<usize> {
    let (receivers, leased) = locked;
    let mut moves = (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut queued = 0;
    for outcome in firsts {
        let Some(subscription) = leased.get(&outcome.delivery_id) else { continue };
        let suspended = receivers.get(subscription).is_some_and(|batched| batched.receiver.suspended);
        let (state, retry_step, next) = delivery_moves(outcome.next, suspended, now);
        queued += usize::from(state == DeliveryState::Pending);
        moves.0.push(outcome.delivery_id);
        moves.1.push(outcome.owner);
        moves.2.push(state.as_str());
        moves.3.push(int(outcome.attempt.attempt)?);
        moves.4.push(retry_step);
        moves.5.push(Ts(next));
    }
    let mut changed = (Vec::new(), Vec::new(), Vec::new());
    for (id, batched) in receivers {
        if batched.suspend.is_some() || batched.stored_since != batched.receiver.failing_since {
            changed.0.push(*id);
            changed.1.push(batched.receiver.failing_since.map(Ts));
            changed.2.push(batched.suspend.map(SuspendReason::as_str));
        }
    }
    execute(
        tx,
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
    Ok(queued)
}
