//! Claiming due deliveries with leases (`SKIP LOCKED`), freeing orphaned leases, and giving
//! claims back.

use super::*;

/// Rounds of choosing and taking in one claim, when other instances took some candidates.
pub(super) const CLAIM_ROUNDS: usize = 3;

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
pub(super) async fn claimable<C: GenericClient>(
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
pub(super) async fn lease_candidates(
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
        let delivery = ClaimedDelivery {
            id: row.try_get(0)?,
            event_id: row.try_get(1)?,
            event_type: parse_event_kind(row.try_get(2)?)?,
            event_time: ts(row, 3)?,
            data: row.try_get(4)?,
            callback_url: row.try_get(5)?,
            api_key: row.try_get(6)?,
            signing_secret: row.try_get(7)?,
            previous_secret: row.try_get(11)?,
            attempts: i64::from(row.try_get::<_, i32>(8)?),
            retry_index: i64::from(row.try_get::<_, i32>(9)?),
        };
        match open_claimed(&ring, row.try_get(10)?, delivery) {
            Ok(delivery) => claimed.push(delivery),
            Err(error) => tracing::error!(%error, "a claimed delivery cannot be sent"),
        }
    }
    Ok(claimed)
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
