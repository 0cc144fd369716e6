//! Delivery claims: the per-subscription cap, and dispatchers that are gone.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_keep_each_subscription_within_its_cap_also_behind_a_long_backlog() {
    let db = test_db!();
    let store = db.open().await;
    let sql = db.sql().await;
    let (slow_merchant, other_merchant) = (merchant(&store, NOW).await, merchant(&store, NOW).await);
    let (slow, other) = (Uuid::now_v7(), Uuid::now_v7());
    store.put_subscription(subscription(slow, slow_merchant, &ALL_EVENTS, NOW)).await.expect("subscribes");
    store.put_subscription(subscription(other, other_merchant, &ALL_EVENTS, NOW)).await.expect("subscribes");
    // The slow subscription's backlog is due before the other's deliveries.
    cancelled_sessions(&store, slow_merchant, 30, NOW).await;
    cancelled_sessions(&store, other_merchant, 5, NOW.plus(Duration::from_secs(1))).await;
    let at = NOW.plus(Duration::from_secs(2));
    let until = at.plus(Duration::from_secs(60));
    let owner = Uuid::now_v7();

    // The head of the queue is all backlog: the claim looks subscription by subscription.
    let first = store.claim_deliveries(owner, at, until, 10, 4).await.expect("claims");
    assert_eq!(claimed_subscriptions(&sql, &first).await, [vec![slow; 4], vec![other; 4]].concat());
    // The leases held count, whoever holds them.
    assert!(store.claim_deliveries(Uuid::now_v7(), at, until, 10, 4).await.expect("claims").is_empty());
    let second = store.claim_deliveries(Uuid::now_v7(), at, until, 10, 5).await.expect("claims");
    assert_eq!(claimed_subscriptions(&sql, &second).await, [slow, other], "room for one more each");
    assert!(store.claim_deliveries(owner, at, until, 10, 5).await.expect("claims").is_empty());
    // A larger cap, and the limit.
    let third = store.claim_deliveries(owner, at, until, 3, 10).await.expect("claims");
    assert_eq!(claimed_subscriptions(&sql, &third).await, [slow; 3]);
    // Once the leases run out they count no more.
    let later = until.plus(Duration::from_secs(1));
    let fourth =
        store.claim_deliveries(owner, later, later.plus(Duration::from_secs(60)), 100, 2).await.expect("claims");
    assert_eq!(claimed_subscriptions(&sql, &fourth).await, [slow, slow, other, other]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_claims_of_a_registered_dispatcher_whose_instance_is_gone_are_free_within_seconds() {
    let db = test_db!();
    let (a, b) = (db.open().await, db.open().await);
    let sql = db.sql().await;
    let m = merchant(&a, NOW).await;
    a.put_subscription(subscription(Uuid::now_v7(), m, &ALL_EVENTS, NOW)).await.expect("subscribes");
    let now = Timestamp::now();
    cancelled_sessions(&a, m, 4, now).await;
    let lease = Duration::from_secs(600);

    // Instance A's dispatcher claims two for ten minutes; a tool that never registered, one.
    let dead = Uuid::now_v7();
    assert_eq!(a.dispatcher_started(dead).await.expect("starts"), 0);
    let held = |owner: Uuid| {
        let sql = &sql;
        async move {
            let query = "SELECT count(*) FROM deliveries WHERE lease_owner = $1 AND lease_until > now()";
            sql.query_one(query, &[&owner]).await.expect("counts").get::<_, i64>(0)
        }
    };
    let now = Timestamp::now();
    assert_eq!(a.claim_deliveries(dead, now, now.plus(lease), 2, 16).await.expect("claims").len(), 2);
    let tool = Uuid::now_v7();
    assert_eq!(a.claim_deliveries(tool, now, now.plus(lease), 1, 16).await.expect("claims").len(), 1);
    let registered = "SELECT count(*) FROM delivery_dispatchers WHERE owner = $1";
    assert_eq!(sql.query_one(registered, &[&dead]).await.expect("reads").get::<_, i64>(0), 1);

    // While A lives, B takes none of them (only the one nobody claimed).
    let live = Uuid::now_v7();
    assert_eq!(b.dispatcher_started(live).await.expect("starts"), 0);
    let now = Timestamp::now();
    assert_eq!(b.claim_deliveries(live, now, now.plus(lease), 10, 16).await.expect("claims").len(), 1);
    assert_eq!((held(dead).await, held(tool).await), (2, 1));

    // A goes (its connections with it): B frees and takes A's claims while their leases still
    // run (the tool's lease, taken with them, is still held afterwards), not when they run out.
    // The deadline, far below the lease, only keeps a failure from hanging.
    drop(a);
    let deadline = std::time::Instant::now() + HANG_GUARD;
    let mut taken = 0;
    while taken < 2 {
        assert!(std::time::Instant::now() < deadline, "B took only {taken} of A's two claims");
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = Timestamp::now();
        taken += b.claim_deliveries(live, now, now.plus(lease), 10, 16).await.expect("claims").len();
    }
    assert_eq!((held(dead).await, held(tool).await, held(live).await), (0, 1, 3));
    // The registration goes once A holds nothing; B's stays, and goes when it stops.
    let deadline = std::time::Instant::now() + HANG_GUARD;
    while sql.query_one(registered, &[&dead]).await.expect("reads").get::<_, i64>(0) > 0 {
        assert!(std::time::Instant::now() < deadline, "A's registration stayed");
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = Timestamp::now();
        b.claim_deliveries(live, now, now.plus(lease), 10, 16).await.expect("claims");
    }
    assert_eq!(sql.query_one(registered, &[&live]).await.expect("reads").get::<_, i64>(0), 1);
    b.dispatcher_stopped(live).await;
    let deadline = std::time::Instant::now() + HANG_GUARD;
    while sql.query_one(registered, &[&live]).await.expect("reads").get::<_, i64>(0) > 0 {
        assert!(std::time::Instant::now() < deadline, "B's registration stayed after it stopped");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_record_an_earlier_version_left_without_an_answer_does_not_block_a_create() {
    // Before answers were kept with their change, a record was written first without one; a
    // crash could leave it. The create it guarded runs on a retry, and its answer replaces it.
    let db = test_db!();
    let store = db.open().await;
    let m = merchant(&store, NOW).await;
    let key = IdempotencyKey { merchant_id: m, request_id: Uuid::now_v7() };
    db.sql()
        .await
        .execute(
            "INSERT INTO idempotency (merchant_id, request_id, fingerprint, started_on) VALUES ($1, $2, $3, now())",
            &[&m, &key.request_id, &&[9u8; 32][..]],
        )
        .await
        .expect("an old record");
    let answer = StoredResponse { status: 201, headers: Vec::new(), body: b"created".to_vec(), session: None };
    let kept = answer.clone();
    let guard = Guard { key, fingerprint: [9; 32], now: NOW, answer: Box::new(move |_| kept.clone()), seal: None };
    let record = session(Uuid::now_v7(), m, spec_with(None, "1"), NOW, Duration::from_secs(900));
    let outcome = store.create_session_guarded(record, Some(guard)).await.expect("creates");
    assert!(matches!(&outcome, Guarded::Ran(CreateOutcome::Created(_), Some(_))), "{outcome:?}");
    match store.idempotency_lookup(key, [9; 32]).await.expect("reads") {
        Some(Found::Replay(replay)) => assert_eq!(replay.answer, answer),
        other => panic!("the answer did not replace the old record: {other:?}"),
    }
}

// ----- Operating a subscription: secret rotation, suspension, resumption, recovery, tests -----
