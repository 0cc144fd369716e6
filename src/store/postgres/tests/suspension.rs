//! Suspending a failing receiver, holding its deliveries, and resuming.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gone_receiver_is_suspended_and_its_deliveries_are_held() {
    let db = test_db!();
    let store = db.open().await;
    let sql = db.sql().await;
    let at = NOW.plus(Duration::from_secs(1));
    let lease = Duration::from_secs(60);
    let owner = Uuid::now_v7();
    let TwoReceivers { m, gone, healthy, to_gone, to_healthy } =
        two_receivers(&db, &store, 3, owner, at, at.plus(lease)).await;

    // One 410 suspends the subscription: its delivery to retry is held, one failed for good stays
    // failed, and its other pending deliveries, leased ones too, are held. Other subscriptions
    // go on.
    let retry = NextStep::RetryAt(at.plus(lease));
    let suspensions = store
        .record_attempts(
            vec![
                attempted(&to_gone[0], owner, at, Some(410), retry),
                attempted(&to_gone[1], owner, at, Some(500), NextStep::Failed),
                attempted(&to_healthy[0], owner, at, Some(500), retry),
            ],
            at,
            ONLY_GONE,
        )
        .await
        .expect("records");
    assert_eq!(suspensions, [Suspension { subscription_id: gone, reason: SuspendReason::ReceiverGone }]);
    let record = store.get_subscription(gone).await.expect("reads").expect("exists");
    assert_eq!(record.status, SubscriptionStatus::Suspended { since: at, reason: SuspendReason::ReceiverGone });
    assert_eq!((record.version, record.last_modified_on), (2, at));
    assert_eq!(
        store.get_subscription(healthy).await.expect("reads").expect("exists").status,
        SubscriptionStatus::Active
    );
    let listed = deliveries_of(&store, m, gone).await;
    assert_eq!(
        [to_gone[0].id, to_gone[1].id, to_gone[2].id].map(|id| state_of(&listed, id)),
        [DeliveryState::Held, DeliveryState::Failed, DeliveryState::Held]
    );
    assert!(listed.iter().all(|d| d.next_attempt_on.is_none()), "only pending deliveries are due");
    assert_eq!(listed.iter().find(|d| d.id == to_gone[0].id).expect("listed").attempts.len(), 1);
    let leases: i64 = sql
        .query_one("SELECT count(*) FROM deliveries WHERE subscription_id = $1 AND lease_owner IS NOT NULL", &[&gone])
        .await
        .expect("counts")
        .get(0);
    assert_eq!(leases, 0, "the held deliveries' leases are void");
    assert_eq!(in_state(&deliveries_of(&store, m, healthy).await, DeliveryState::Pending), 3);

    // The result of an attempt whose lease the suspension voided is kept, and changes nothing.
    let late = store
        .record_attempts(vec![attempted(&to_gone[2], owner, at, Some(204), NextStep::Delivered)], at, ONLY_GONE)
        .await
        .expect("records");
    assert!(late.is_empty());
    let listed = deliveries_of(&store, m, gone).await;
    assert_eq!(state_of(&listed, to_gone[2].id), DeliveryState::Held);
    assert_eq!(listed.iter().find(|d| d.id == to_gone[2].id).expect("listed").attempts.len(), 1);

    // New events: held for the suspended subscription, pending for the other.
    cancelled_sessions(&store, m, 1, at).await;
    assert_eq!(in_state(&deliveries_of(&store, m, gone).await, DeliveryState::Held), 3);
    assert_eq!(in_state(&deliveries_of(&store, m, healthy).await, DeliveryState::Pending), 4);
    // Held deliveries are never claimed, and are counted apart.
    let later = at.plus(lease).plus(Duration::from_secs(1));
    let backlog = store.delivery_backlog(later).await.expect("counts");
    assert_eq!((backlog.pending, backlog.held), (4, 3));
    let claimed = store.claim_deliveries(Uuid::now_v7(), later, later.plus(lease), 100, 100).await.expect("claims");
    assert_eq!(claimed_subscriptions(&sql, &claimed).await, [healthy; 4]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_failing_for_long_enough_is_suspended() {
    let db = test_db!();
    let store = db.open().await;
    let sql = db.sql().await;
    let policy = SuspendPolicy { failing_for: Duration::from_secs(600) };
    let minutes = |n: u64| NOW.plus(Duration::from_secs(60 * n));
    let m = merchant(&store, NOW).await;
    let id = Uuid::now_v7();
    store.put_subscription(subscription(id, m, &ALL_EVENTS, NOW)).await.expect("subscribes");
    cancelled_sessions(&store, m, 3, NOW).await;
    let owner = Uuid::now_v7();
    let claimed = store.claim_deliveries(owner, NOW, minutes(60), 100, 100).await.expect("claims");
    let claimed = claimed_of(&sql, &claimed, id).await;
    assert_eq!(claimed.len(), 3);

    // A failure begins a run of failures, a success ends it.
    let first = attempted(&claimed[0], owner, NOW, Some(500), NextStep::RetryAt(minutes(1)));
    assert!(store.record_attempts(vec![first], NOW, policy).await.expect("records").is_empty());
    assert_eq!(failing_since(&sql, id).await, Some(NOW));
    let delivered = attempted(&claimed[1], owner, NOW, Some(204), NextStep::Delivered);
    assert!(store.record_attempts(vec![delivered], NOW, policy).await.expect("records").is_empty());
    assert_eq!(failing_since(&sql, id).await, None);

    // A new run, not yet long enough…
    let retried = store.claim_deliveries(owner, minutes(1), minutes(60), 100, 100).await.expect("claims");
    assert_eq!(retried.iter().map(|d| d.id).collect::<Vec<_>>(), [claimed[0].id]);
    let second = attempted(&retried[0], owner, minutes(1), None, NextStep::RetryAt(minutes(20)));
    assert!(store.record_attempts(vec![second], minutes(1), policy).await.expect("records").is_empty());
    assert_eq!(failing_since(&sql, id).await, Some(minutes(1)));
    assert_eq!(store.get_subscription(id).await.expect("reads").expect("exists").status, SubscriptionStatus::Active);
    // …then long enough: suspended, the delivery to retry held, and so is the one pending.
    let third = attempted(&claimed[2], owner, minutes(11), Some(503), NextStep::RetryAt(minutes(30)));
    let suspensions = store.record_attempts(vec![third], minutes(11), policy).await.expect("records");
    assert_eq!(suspensions, [Suspension { subscription_id: id, reason: SuspendReason::ReceiverFailing }]);
    let record = store.get_subscription(id).await.expect("reads").expect("exists");
    assert_eq!(
        record.status,
        SubscriptionStatus::Suspended { since: minutes(11), reason: SuspendReason::ReceiverFailing }
    );
    let listed = deliveries_of(&store, m, id).await;
    assert_eq!(
        claimed.iter().map(|d| state_of(&listed, d.id)).collect::<Vec<_>>(),
        [DeliveryState::Held, DeliveryState::Delivered, DeliveryState::Held]
    );
    // New events of a suspended subscription are held.
    cancelled_sessions(&store, m, 1, minutes(12)).await;
    assert_eq!(in_state(&deliveries_of(&store, m, id).await, DeliveryState::Held), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resuming_queues_the_held_deliveries_and_a_patch_resumes_too() {
    let db = test_db!();
    let store = db.open().await;
    let sql = db.sql().await;
    let (m, original) = subscribed(&store, 2).await;
    let id = original.id;
    let owner = Uuid::now_v7();
    let hour = Duration::from_secs(3600);
    let claimed = store.claim_deliveries(owner, NOW, NOW.plus(hour), 100, 100).await.expect("claims");
    let gone = attempted(&claimed[0], owner, NOW, Some(410), NextStep::RetryAt(NOW.plus(hour)));
    assert_eq!(store.record_attempts(vec![gone], NOW, ONLY_GONE).await.expect("records").len(), 1);
    assert_eq!(in_state(&deliveries_of(&store, m, id).await, DeliveryState::Held), 2);

    let at = NOW.plus(Duration::from_secs(60));
    for (merchant, subscription, tag, expected) in [
        (Uuid::now_v7(), id, None, "OtherMerchant"),
        (m, Uuid::now_v7(), None, "NotFound"),
        (m, id, Some("\"1\""), "VersionMismatch"),
    ] {
        let outcome = store.resume_subscription_guarded(change(merchant, subscription, tag, at), None).await;
        assert_eq!(format!("{:?}", ran(outcome.expect("answers"))), expected);
    }
    let wake = store.deliveries_queued();
    let resumed = done(store.resume_subscription_guarded(change(m, id, Some("\"2\""), at), None).await);
    assert_eq!((resumed.status, resumed.version, resumed.last_modified_on), (SubscriptionStatus::Active, 3, at));
    assert_eq!(resumed.spec, original.spec);
    assert_eq!(store.get_subscription(id).await.expect("reads"), Some(resumed.clone()));
    assert!(wake_pending(&wake) || woken(&wake, HANG_GUARD).await, "the dispatcher is woken");
    let listed = deliveries_of(&store, m, id).await;
    assert!(listed.iter().all(|d| d.state == DeliveryState::Pending && d.next_attempt_on == Some(at)), "{listed:?}");
    assert_eq!(failing_since(&sql, id).await, None);
    let claimed = store.claim_deliveries(owner, at, at.plus(hour), 100, 100).await.expect("claims");
    assert_eq!(claimed.len(), 2, "due at once");

    // An active subscription is answered as it is.
    let again = done(store.resume_subscription_guarded(change(m, id, None, at.plus(hour)), None).await);
    assert_eq!(again, resumed);

    // A PATCH of a suspended subscription resumes it, even with the same fields.
    let gone = attempted(&claimed[0], owner, at, Some(410), NextStep::RetryAt(at.plus(hour)));
    assert_eq!(store.record_attempts(vec![gone], at, ONLY_GONE).await.expect("records").len(), 1);
    assert_eq!(in_state(&deliveries_of(&store, m, id).await, DeliveryState::Held), 2);
    let later = at.plus(Duration::from_secs(1));
    let patched = match store.patch_subscription(m, id, original.spec.clone(), None, later).await.expect("patches") {
        ChangeSubscriptionOutcome::Done(record) => record,
        other => panic!("not patched: {other:?}"),
    };
    assert_eq!((patched.status, patched.version, patched.last_modified_on), (SubscriptionStatus::Active, 5, later));
    let listed = deliveries_of(&store, m, id).await;
    assert!(listed.iter().all(|d| d.state == DeliveryState::Pending && d.next_attempt_on == Some(later)));
}
