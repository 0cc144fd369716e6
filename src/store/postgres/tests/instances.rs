//! Two instances at once: every race is settled inside PostgreSQL.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_are_created_once_read_and_listed_with_a_cursor() {
    let db = test_db!();
    let store = db.open().await;
    let m = merchant(&store, NOW).await;
    let other = merchant(&store, NOW).await;
    let customer = Uuid::now_v7();
    store.create_customer(customer, "+4915112345678".to_owned(), NOW).await.expect("customer");

    let first = session(Uuid::now_v7(), m, spec_with(Some(customer), "100.50"), NOW, Duration::from_secs(900));
    assert!(matches!(store.create_session(first.clone()).await, Ok(CreateOutcome::Created(_))));
    match store.create_session(first.clone()).await {
        Ok(CreateOutcome::Exists(existing)) => assert_eq!(existing, first),
        other => panic!("expected Exists, got {other:?}"),
    }
    // Another merchant's PUT of the same id sees it exists (the API answers 409).
    let mut stolen = first.clone();
    stolen.merchant_id = other;
    assert!(matches!(store.create_session(stolen).await, Ok(CreateOutcome::Exists(s)) if s.merchant_id == m));
    let unknown = session(Uuid::now_v7(), m, spec_with(Some(Uuid::now_v7()), "1"), NOW, Duration::from_secs(900));
    assert!(matches!(store.create_session(unknown.clone()).await, Ok(CreateOutcome::CustomerNotFound)));
    assert_eq!(store.get_session(unknown.id).await.expect("reads"), None);
    assert_eq!(store.get_session(first.id).await.expect("reads"), Some(first.clone()));

    // Money is exact in its own columns; sessions without a transaction have none.
    let plain = session(Uuid::now_v7(), m, new_customer_spec(), NOW.plus(Duration::from_millis(1)), Duration::ZERO);
    assert!(matches!(store.create_session(plain.clone()).await, Ok(CreateOutcome::Created(_))));
    let sql = db.sql().await;
    let money = |id: Uuid| {
        let sql = &sql;
        async move {
            let row = sql.query_one("SELECT amount::text, currency FROM sessions WHERE id = $1", &[&id]).await;
            let row = row.expect("reads");
            (row.get::<_, Option<String>>(0), row.get::<_, Option<String>>(1))
        }
    };
    assert_eq!(money(first.id).await, (Some("100.50".to_owned()), Some("EUR".to_owned())));
    assert_eq!(money(plain.id).await, (None, None));

    // Five more, a millisecond apart, then page through all seven newest first.
    for i in 0..5u64 {
        let created = NOW.plus(Duration::from_millis(10 + i));
        let record = session(Uuid::now_v7(), m, spec_with(None, "5"), created, Duration::from_secs(900));
        store.create_session(record).await.expect("creates");
    }
    let mut seen = Vec::new();
    let mut after = None;
    loop {
        let filter = SessionFilter { after, limit: 3, ..SessionFilter::default() };
        let mut page = store.list_sessions(m, filter, NOW).await.expect("lists");
        let more = page.len() > 3;
        page.truncate(3);
        after = page.last().map(|s| (s.created_on, s.id));
        seen.extend(page);
        if !more {
            break;
        }
    }
    assert_eq!(seen.len(), 7);
    assert!(seen.windows(2).all(|w| (w[0].created_on, w[0].id) > (w[1].created_on, w[1].id)), "newest first");
    // `plain` had no time to live: it is Expired for readers, the others are Created.
    let expired = SessionFilter { state: Some(State::Expired), limit: 10, ..SessionFilter::default() };
    let ids: Vec<Uuid> = store
        .list_sessions(m, expired, NOW.plus(Duration::from_millis(2)))
        .await
        .expect("lists")
        .iter()
        .map(|s| s.id)
        .collect();
    assert_eq!(ids, [plain.id]);
    let created = SessionFilter { state: Some(State::Created), limit: 10, ..SessionFilter::default() };
    assert_eq!(store.list_sessions(m, created, NOW.plus(Duration::from_millis(2))).await.expect("lists").len(), 6);
    let window = SessionFilter {
        created_from: Some(NOW.plus(Duration::from_millis(11))),
        created_to: Some(NOW.plus(Duration::from_millis(13))),
        limit: 10,
        ..SessionFilter::default()
    };
    assert_eq!(store.list_sessions(m, window, NOW).await.expect("lists").len(), 2);
    assert!(store
        .list_sessions(other, SessionFilter { limit: 10, ..SessionFilter::default() }, NOW)
        .await
        .expect("lists")
        .is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_cancels_on_two_instances_change_the_session_once() {
    let db = test_db!();
    let (a, b) = (Arc::new(db.open().await), Arc::new(db.open().await));
    let m = merchant(&*a, NOW).await;
    a.put_subscription(subscription(Uuid::now_v7(), m, &ALL_EVENTS, NOW)).await.expect("subscribes");
    let target = session(Uuid::now_v7(), m, spec_with(None, "10"), NOW, Duration::from_secs(900));
    a.create_session(target.clone()).await.expect("creates");

    let tasks: Vec<_> = (0..50)
        .map(|i| {
            let store: Arc<PostgresStore> = if i % 2 == 0 { a.clone() } else { b.clone() };
            let request = cancel(m, target.id, NOW.plus(Duration::from_secs(1)));
            tokio::spawn(async move { store.cancel_session(request).await })
        })
        .collect();
    let (mut cancelled, mut already) = (0, 0);
    for task in tasks {
        match task.await.expect("joins").expect("no store error") {
            CancelOutcome::Cancelled(_) => cancelled += 1,
            CancelOutcome::AlreadyCancelled(s) => {
                assert_eq!(s.state, State::Cancelled);
                already += 1;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!((cancelled, already), (1, 49));
    let events = b.session_events(target.id).await.expect("events");
    assert_eq!(events.iter().map(|e| e.1).collect::<Vec<_>>(), [EventType::RedirectSessionCancelled]);
    let stored = b.get_session(target.id).await.expect("reads").expect("exists");
    assert_eq!((stored.state, stored.version), (State::Cancelled, 2));
    let deliveries = a.list_deliveries(m, DeliveryFilter { limit: 10, ..DeliveryFilter::default() }).await;
    assert_eq!(deliveries.expect("lists").len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_sweeps_on_two_instances_expire_each_session_once() {
    let db = test_db!();
    let (a, b) = (Arc::new(db.open().await), Arc::new(db.open().await));
    let m = merchant(&*a, NOW).await;
    a.put_subscription(subscription(Uuid::now_v7(), m, &[EventType::RedirectSessionExpired], NOW))
        .await
        .expect("subscribes");
    const SESSIONS: usize = 200;
    for i in 0..SESSIONS as u64 {
        let ttl = Duration::from_millis(1_000 + i);
        a.create_session(session(Uuid::now_v7(), m, spec_with(None, "1"), NOW, ttl)).await.expect("creates");
    }
    // One that is not due yet stays alone.
    let later = session(Uuid::now_v7(), m, spec_with(None, "1"), NOW, Duration::from_secs(3600));
    a.create_session(later.clone()).await.expect("creates");

    let sweep = |store: Arc<PostgresStore>| {
        tokio::spawn(async move {
            let mut total = 0;
            loop {
                let expired = store.expire_due(NOW.plus(Duration::from_secs(60)), 7).await.expect("sweeps");
                if expired == 0 {
                    return total;
                }
                total += expired;
            }
        })
    };
    let (x, y) = tokio::join!(sweep(a.clone()), sweep(b.clone()));
    let (x, y) = (x.expect("joins"), y.expect("joins"));
    assert_eq!(x + y, SESSIONS, "each session expired by exactly one sweep ({x} + {y})");

    let sql = db.sql().await;
    let row = sql
        .query_one(
            "SELECT count(*), count(DISTINCT session_id),
                    count(*) FILTER (WHERE e.data::jsonb ->> 'lastModifiedOn' = to_char(s.expires_on AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'))
               FROM events e JOIN sessions s ON s.id = e.session_id WHERE e.type = 'RedirectSessionExpired'",
            &[],
        )
        .await
        .expect("counts");
    let counts: (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
    assert_eq!(counts, (SESSIONS as i64, SESSIONS as i64, SESSIONS as i64), "one event each, dated expiresOn");
    let row = sql
        .query_one(
            "SELECT count(*) FROM sessions WHERE state = 'Expired' AND last_modified_on = expires_on AND version = 2",
            &[],
        )
        .await
        .expect("counts");
    assert_eq!(row.get::<_, i64>(0), SESSIONS as i64);
    let deliveries: i64 = sql.query_one("SELECT count(*) FROM deliveries", &[]).await.expect("counts").get(0);
    assert_eq!(deliveries, SESSIONS as i64);
    assert_eq!(a.get_session(later.id).await.expect("reads").expect("exists").state, State::Created);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_request_id_from_two_instances_runs_once_and_both_answer_alike() {
    // Twenty guarded cancels of one session under one key, split over two instances: one
    // runs (one event), every other answers the answer it kept.
    let db = test_db!();
    let (a, b) = (Arc::new(db.open().await), Arc::new(db.open().await));
    let m = merchant(&*a, NOW).await;
    let id = Uuid::now_v7();
    a.create_session(session(id, m, spec_with(None, "5"), NOW, Duration::from_secs(900))).await.expect("creates");
    let key = IdempotencyKey { merchant_id: m, request_id: Uuid::now_v7() };
    let tasks: Vec<_> = (0..20)
        .map(|i| {
            let store = if i % 2 == 0 { a.clone() } else { b.clone() };
            let request = CancelRequest {
                merchant_id: m,
                session_id: id,
                if_match: None,
                correlation_id: key.request_id,
                now: NOW,
            };
            let guard = Guard {
                key,
                fingerprint: [7; 32],
                now: NOW,
                answer: Box::new(move |outcome: &CancelOutcome| StoredResponse {
                    status: 200,
                    headers: Vec::new(),
                    body: format!("{i} {}", matches!(outcome, CancelOutcome::Cancelled(_))).into_bytes(),
                    session: None,
                }),
                seal: None,
            };
            tokio::spawn(async move { store.cancel_session_guarded(request, Some(guard)).await })
        })
        .collect();
    let mut kept = Vec::new();
    let mut replayed = Vec::new();
    for task in tasks {
        match task.await.expect("joins").expect("no store error") {
            Guarded::Ran(outcome, answer) => {
                assert!(matches!(outcome, CancelOutcome::Cancelled(_)), "the one that ran cancelled: {outcome:?}");
                kept.push(answer.expect("kept"));
            }
            Guarded::Earlier(Found::Replay(replay)) => replayed.push(replay.answer),
            Guarded::Earlier(found) => panic!("the same request was refused: {found:?}"),
        }
    }
    assert_eq!(kept.len(), 1, "exactly one ran");
    assert!(replayed.iter().all(|answer| *answer == kept[0]), "every other answers what it kept");
    assert_eq!(a.session_events(id).await.expect("events").len(), 1, "one cancel event");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_from_two_instances_never_overlap_and_expired_leases_move_on() {
    let db = test_db!();
    let (a, b) = (Arc::new(db.open().await), Arc::new(db.open().await));
    let m = merchant(&*a, NOW).await;
    for _ in 0..2 {
        a.put_subscription(subscription(Uuid::now_v7(), m, &ALL_EVENTS, NOW)).await.expect("subscribes");
    }
    for _ in 0..30 {
        let s = session(Uuid::now_v7(), m, spec_with(None, "3"), NOW, Duration::from_secs(900));
        a.create_session(s.clone()).await.expect("creates");
        a.cancel_session(cancel(m, s.id, NOW)).await.expect("cancels");
    }
    let lease_until = NOW.plus(Duration::from_secs(60));
    let claim = |store: Arc<PostgresStore>, owner: Uuid| {
        tokio::spawn(async move {
            let mut ids = Vec::new();
            loop {
                let claimed = store.claim_deliveries(owner, NOW, lease_until, 7, 100).await.expect("claims");
                if claimed.is_empty() {
                    return ids;
                }
                ids.extend(claimed.iter().map(|d| d.id));
            }
        })
    };
    let (owner_a, owner_b) = (Uuid::now_v7(), Uuid::now_v7());
    let (x, y) = tokio::join!(claim(a.clone(), owner_a), claim(b.clone(), owner_b));
    let (x, y) = (x.expect("joins"), y.expect("joins"));
    let (set_x, set_y): (HashSet<Uuid>, HashSet<Uuid>) = (x.iter().copied().collect(), y.iter().copied().collect());
    assert_eq!(set_x.len() + set_y.len(), x.len() + y.len(), "nobody claimed one delivery twice");
    assert!(set_x.is_disjoint(&set_y), "no delivery claimed by both");
    assert_eq!(set_x.len() + set_y.len(), 60);

    // While the leases hold nothing is claimable; once they run out, the other owner gets
    // them. (Either owner may have claimed all sixty: `first` is one that claimed some.)
    let (first, (owner_first, owner_second), second) =
        if set_x.is_empty() { (set_y, (owner_b, owner_a), a.clone()) } else { (set_x, (owner_a, owner_b), b.clone()) };
    assert!(second
        .claim_deliveries(owner_second, NOW.plus(Duration::from_secs(30)), lease_until, 100, 100)
        .await
        .expect("claims")
        .is_empty());
    let after = NOW.plus(Duration::from_secs(61));
    let taken = second
        .claim_deliveries(owner_second, after, after.plus(Duration::from_secs(60)), 100, 100)
        .await
        .expect("claims");
    let taken_ids: HashSet<Uuid> = taken.iter().map(|d| d.id).collect();
    assert!(first.is_subset(&taken_ids), "the first owner's expired leases went to the second");

    // The first owner's late result does not touch the second's claim; the second's does.
    let one = *first.iter().next().expect("one of them claimed some");
    let outcome = |owner: Uuid, attempt: i64| AttemptOutcome {
        delivery_id: one,
        owner,
        attempt: AttemptRecord { attempt, started_on: after, duration_ms: 12, status: Some(200), error: None },
        next: NextStep::Delivered,
    };
    a.record_attempts(vec![outcome(owner_first, 1)], after, ONLY_GONE).await.expect("records");
    let pending = |store: Arc<PostgresStore>| async move {
        let filter = DeliveryFilter { state: Some(DeliveryState::Pending), limit: 100, ..DeliveryFilter::default() };
        store.list_deliveries(m, filter).await.expect("lists").len()
    };
    assert_eq!(pending(a.clone()).await, 60);
    b.record_attempts(vec![outcome(owner_second, 2)], after, ONLY_GONE).await.expect("records");
    assert_eq!(pending(a.clone()).await, 59);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signing_keys_from_two_instances_agree_and_rotations_take_turns() {
    let db = test_db!();
    let (a, b) = (Arc::new(db.open().await), Arc::new(db.open().await));
    let tasks: Vec<_> = (0..10)
        .map(|i| {
            let store = if i % 2 == 0 { a.clone() } else { b.clone() };
            tokio::spawn(async move {
                let candidate = KeyPair::generate().expect("a key");
                store.signing_keys(candidate, NOW).await
            })
        })
        .collect();
    let mut kids = HashSet::new();
    for task in tasks {
        kids.insert(task.await.expect("joins").expect("keys").current.kid);
    }
    assert_eq!(kids.len(), 1, "every instance signs with the same key");
    let first = kids.into_iter().next().expect("one kid");

    let (x, y) = tokio::join!(
        a.rotate_signing_key(KeyPair::generate().expect("a key"), NOW.plus(Duration::from_secs(1))),
        b.rotate_signing_key(KeyPair::generate().expect("a key"), NOW.plus(Duration::from_secs(2)))
    );
    x.expect("rotates");
    y.expect("rotates");
    let keys = a.signing_keys(KeyPair::generate().expect("a key"), NOW).await.expect("keys");
    assert_eq!(keys.previous.len(), 2);
    assert!(keys.previous.iter().any(|(kid, _)| *kid == first));
    assert!(keys.previous.iter().all(|(kid, _)| *kid != keys.current.kid));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_and_the_sweep_racing_on_two_instances_record_one_end_per_session() {
    let db = test_db!();
    let (a, b) = (Arc::new(db.open().await), Arc::new(db.open().await));
    let m = merchant(&*a, NOW).await;
    a.put_subscription(subscription(Uuid::now_v7(), m, &ALL_EVENTS, NOW)).await.expect("subscribes");
    let mut ids = Vec::new();
    for _ in 0..40 {
        let s = session(Uuid::now_v7(), m, spec_with(None, "1"), NOW, Duration::from_secs(10));
        a.create_session(s.clone()).await.expect("creates");
        ids.push(s.id);
    }
    // The merchant's clock says the sessions are live, the sweep's says they are due: both
    // are right in their own instant, and whichever commits first wins each session.
    let cancels = {
        let (a, ids) = (a.clone(), ids.clone());
        tokio::spawn(async move {
            let mut cancelled = 0;
            for id in ids {
                match a.cancel_session(cancel(m, id, NOW.plus(Duration::from_secs(9)))).await.expect("cancels") {
                    CancelOutcome::Cancelled(_) => cancelled += 1,
                    CancelOutcome::InvalidTransition(State::Expired) => {}
                    other => panic!("unexpected {other:?}"),
                }
            }
            cancelled
        })
    };
    let sweeps = {
        let b = b.clone();
        tokio::spawn(async move {
            let mut expired = 0;
            loop {
                let n = b.expire_due(NOW.plus(Duration::from_secs(11)), 3).await.expect("sweeps");
                if n == 0 {
                    return expired;
                }
                expired += n;
            }
        })
    };
    let (cancelled, expired) = (cancels.await.expect("joins"), sweeps.await.expect("joins"));
    let expired = expired + b.expire_due(NOW.plus(Duration::from_secs(11)), 100).await.expect("sweeps");
    assert_eq!(cancelled + expired, ids.len(), "{cancelled} cancelled + {expired} expired");
    for id in ids {
        let events = a.session_events(id).await.expect("events");
        let state = a.get_session(id).await.expect("reads").expect("exists").state;
        let expected = match state {
            State::Cancelled => EventType::RedirectSessionCancelled,
            State::Expired => EventType::RedirectSessionExpired,
            other => panic!("left in {other:?}"),
        };
        assert_eq!(events.iter().map(|e| e.1).collect::<Vec<_>>(), [expected]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_of_concurrent_creates_on_two_instances_wins() {
    let db = test_db!();
    let (a, b) = (Arc::new(db.open().await), Arc::new(db.open().await));
    let m = merchant(&*a, NOW).await;
    let record = session(Uuid::now_v7(), m, spec_with(None, "7.5"), NOW, Duration::from_secs(900));
    let sub = subscription(Uuid::now_v7(), m, &ALL_EVENTS, NOW);
    let tasks: Vec<_> = (0..20)
        .map(|i| {
            let store = if i % 2 == 0 { a.clone() } else { b.clone() };
            let (record, sub) = (record.clone(), sub.clone());
            tokio::spawn(async move {
                let created = matches!(store.create_session(record).await, Ok(CreateOutcome::Created(_)));
                let subscribed = matches!(store.put_subscription(sub).await, Ok(PutSubscriptionOutcome::Created(_)));
                (created, subscribed)
            })
        })
        .collect();
    let (mut sessions, mut subscriptions) = (0, 0);
    for task in tasks {
        let (created, subscribed) = task.await.expect("joins");
        sessions += usize::from(created);
        subscriptions += usize::from(subscribed);
    }
    assert_eq!((sessions, subscriptions), (1, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_subscription_while_events_are_queued_leaves_nothing_pending_for_it() {
    let db = test_db!();
    let (a, b) = (Arc::new(db.open().await), Arc::new(db.open().await));
    let m = merchant(&*a, NOW).await;
    let doomed = Uuid::now_v7();
    a.put_subscription(subscription(doomed, m, &ALL_EVENTS, NOW)).await.expect("subscribes");
    let mut ids = Vec::new();
    for _ in 0..60 {
        let s = session(Uuid::now_v7(), m, spec_with(None, "1"), NOW, Duration::from_secs(900));
        a.create_session(s.clone()).await.expect("creates");
        ids.push(s.id);
    }
    let cancels: Vec<_> = ids
        .chunks(10)
        .enumerate()
        .map(|(i, chunk)| {
            let store = if i % 2 == 0 { a.clone() } else { b.clone() };
            let chunk = chunk.to_vec();
            tokio::spawn(async move {
                for id in chunk {
                    store.cancel_session(cancel(m, id, NOW)).await.expect("cancels");
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let deleted = b.delete_subscription(m, doomed, None, NOW).await.expect("deletes");
    assert!(matches!(deleted, ChangeSubscriptionOutcome::Done(_)));
    for task in cancels {
        task.await.expect("joins");
    }
    let sql = db.sql().await;
    let row = sql
        .query_one(
            "SELECT count(*) FILTER (WHERE state = 'Pending'), count(*) FROM deliveries WHERE subscription_id = $1",
            &[&doomed],
        )
        .await
        .expect("counts");
    let (pending, all): (i64, i64) = (row.get(0), row.get(1));
    assert_eq!(pending, 0, "of {all} deliveries queued for the deleted subscription");
}
