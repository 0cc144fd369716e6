//! Deliveries with their attempts: read, list, redeliver, the backlog, and retention.

use super::*;

pub(super) const DELIVERY_COLUMNS: &str =
    "d.id, d.event_id, e.type, e.session_id, d.subscription_id, d.merchant_id, d.state,
     d.next_attempt_on, d.created_on, d.last_modified_on";

pub(super) fn delivery_from_row(row: &Row) -> Result<DeliveryRecord> {
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
pub(super) async fn with_attempts<C: GenericClient>(
    c: &C,
    mut deliveries: Vec<DeliveryRecord>,
) -> Result<Vec<DeliveryRecord>> {
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
pub(super) async fn get_delivery<C: GenericClient>(c: &C, id: Uuid, lock: &str) -> Result<Option<DeliveryRecord>> {
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

pub(super) async fn redeliver_in(
    tx: &Transaction<'_>,
    merchant_id: Uuid,
    id: Uuid,
    now: Timestamp,
) -> Result<RedeliverOutcome> {
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
    static SQL: LazyLock<String> = LazyLock::new(|| {
        format!(
            "WITH doomed AS MATERIALIZED (
                 SELECT id FROM deliveries WHERE {} AND last_modified_on < $1
                  ORDER BY id LIMIT $2 FOR UPDATE SKIP LOCKED
             ), attempts AS (
                 DELETE FROM delivery_attempts a USING doomed WHERE a.delivery_id = doomed.id RETURNING 1
             ), gone AS (
                 DELETE FROM deliveries d USING doomed WHERE d.id = doomed.id RETURNING 1
             )
             SELECT (SELECT count(*) FROM attempts) + (SELECT count(*) FROM gone)",
            *FINISHED_DELIVERY
        )
    });
    let deliveries = query_one(&tx, &SQL, &[&cutoff, &batch]).await?.try_get::<_, i64>(0)?;
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
