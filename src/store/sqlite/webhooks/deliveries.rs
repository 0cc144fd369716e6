//! Deliveries with their attempts: read, list, redeliver, the backlog, and retention.

use super::*;

pub(super) const DELIVERY_COLUMNS: &str =
    "d.id, d.event_id, e.type, e.session_id, d.subscription_id, d.merchant_id, d.state,
     d.next_attempt_on, d.created_on, d.last_modified_on";

pub(super) fn delivery_from_row(row: &Row<'_>) -> rusqlite::Result<DeliveryRecord> {
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

pub(super) fn with_attempts(c: &Connection, mut delivery: DeliveryRecord) -> Result<DeliveryRecord> {
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
    let finished = format!(
        "SELECT id FROM deliveries WHERE {} AND last_modified_on < ?1 ORDER BY id LIMIT ?2",
        *FINISHED_DELIVERY
    );
    let mut removed = run(&format!("DELETE FROM delivery_attempts WHERE delivery_id IN ({finished})"))?;
    removed += run(&format!("DELETE FROM deliveries WHERE id IN ({finished})"))?;
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
