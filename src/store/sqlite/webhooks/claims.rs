//! Claiming due deliveries with leases, voiding the leases of a process that is gone, and
//! giving claims back.

use super::*;

/// How many due deliveries of subscriptions at their cap a claim passes over, walking the due
/// queue in order, before it looks subscription by subscription instead.
pub(super) const PASS_OVER_AT_MOST: usize = 256;

/// The due queue, oldest first (`deliveries_due`).
pub(super) const DUE: &str = "SELECT id, subscription_id FROM deliveries
      WHERE state = 'Pending' AND next_attempt_on <= ?1 AND (lease_until IS NULL OR lease_until <= ?1)
      ORDER BY next_attempt_on";
/// Unexpired leases per subscription (`deliveries_leased` holds only leased rows).
pub(super) const LEASES: &str = "SELECT subscription_id, count(*) FROM deliveries
      WHERE lease_until > ?1 AND state = 'Pending' GROUP BY subscription_id";
/// The next subscription with pending deliveries after `?1` (`deliveries_due_by_subscription`).
pub(super) const NEXT_SUBSCRIPTION: &str = "SELECT subscription_id FROM deliveries
      WHERE state = 'Pending' AND subscription_id > ?1 ORDER BY subscription_id LIMIT 1";
/// The first `?3` due deliveries of one subscription (`deliveries_due_by_subscription`).
pub(super) const FIRST_DUE: &str = "SELECT id, next_attempt_on FROM deliveries
      WHERE subscription_id = ?1 AND state = 'Pending' AND next_attempt_on <= ?2
        AND (lease_until IS NULL OR lease_until <= ?2)
      ORDER BY next_attempt_on LIMIT ?3";
/// Voids the leases of every owner but `?1` (`deliveries_leased`).
pub(super) const VOID_OTHER_LEASES: &str = "UPDATE deliveries SET lease_owner = NULL, lease_until = NULL
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
pub(super) fn lease_due(
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
pub(super) fn leases_per_subscription(
    c: &Connection,
    now: Timestamp,
) -> Result<std::collections::HashMap<Uuid, usize>> {
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
pub(super) fn due_by_subscription(
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

pub(super) fn bad_column(index: usize) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(index, rusqlite::types::Type::Text, "unexpected value".into())
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

#[cfg(test)]
mod claim_tests {
    use std::time::Duration;

    use super::*;

    const NOW: Timestamp = Timestamp::from_millis(1_800_000_000_000);

    /// A migrated database whose deliveries need no events or subscriptions.
    fn database() -> (Connection, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let connection = crate::store::sqlite::connect(&dir.path().join("d.db"), true).unwrap();
        crate::store::sqlite::schema::migrate(&connection).unwrap();
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
