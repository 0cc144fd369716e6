//! Operating a subscription: secret rotation, recovery, test deliveries, retention.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_signing_secret_keeps_signing_beside_the_new_one_until_it_expires() {
    let db = test_db!();
    let store = db.open().await;
    let sql = db.sql().await;
    let (m, original) = subscribed(&store, 1).await;
    let id = original.id;
    let sealed_before: String =
        sql.query_one("SELECT signing_secret FROM subscriptions WHERE id = $1", &[&id]).await.expect("reads").get(0);

    let at = NOW.plus(Duration::from_secs(1));
    let grace = Duration::from_secs(3600);
    for (merchant, subscription, tag, expected) in [
        (Uuid::now_v7(), id, None, "OtherMerchant"),
        (m, Uuid::now_v7(), None, "NotFound"),
        (m, id, Some("\"2\""), "VersionMismatch"),
    ] {
        let outcome = store
            .rotate_subscription_secret_guarded(
                change(merchant, subscription, tag, at),
                rotation("whsec_x", grace),
                None,
            )
            .await
            .expect("answers");
        assert_eq!(format!("{:?}", ran(outcome)), expected);
    }
    let rotated = done(
        store
            .rotate_subscription_secret_guarded(change(m, id, Some("\"1\""), at), rotation("whsec_new", grace), None)
            .await,
    );
    assert_eq!(rotated.signing_secret, "whsec_new");
    let previous =
        crate::store::webhooks::PreviousSecret { secret: original.signing_secret.clone(), expires_on: at.plus(grace) };
    assert_eq!(rotated.previous_secret, Some(previous));
    assert_eq!((rotated.version, rotated.last_modified_on, rotated.status), (2, at, SubscriptionStatus::Active));
    assert_eq!(store.get_subscription(id).await.expect("reads"), Some(rotated.clone()));
    // The replaced secret is copied as it was sealed; neither is ever stored in clear.
    let row = sql
        .query_one("SELECT previous_secret, signing_secret FROM subscriptions WHERE id = $1", &[&id])
        .await
        .expect("reads");
    assert_eq!(row.get::<_, String>(0), sealed_before);
    assert!(!row.get::<_, String>(1).contains("whsec_new"));

    // Deliveries are signed with both while the replaced one signs, and not from its expiry on.
    let owner = Uuid::now_v7();
    let lease = Duration::from_secs(60);
    let claimed = store.claim_deliveries(owner, at, at.plus(lease), 10, 10).await.expect("claims");
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0].signing_secret, "whsec_new");
    assert_eq!(claimed[0].previous_secret.as_deref(), Some(original.signing_secret.as_str()));
    store.release_claims(owner, vec![claimed[0].id]).await.expect("releases");
    let expiry = at.plus(grace);
    let claimed = store.claim_deliveries(owner, expiry, expiry.plus(lease), 10, 10).await.expect("claims");
    assert_eq!((claimed.len(), claimed[0].previous_secret.as_deref()), (1, None));
    store.release_claims(owner, vec![claimed[0].id]).await.expect("releases");

    // Without a grace period the replaced secret stops signing at once, and so does the one an
    // earlier rotation replaced.
    let later = at.plus(Duration::from_secs(2));
    let again = done(
        store
            .rotate_subscription_secret_guarded(
                change(m, id, None, later),
                rotation("whsec_newer", Duration::ZERO),
                None,
            )
            .await,
    );
    assert_eq!((again.signing_secret.as_str(), &again.previous_secret, again.version), ("whsec_newer", &None, 3));
    let cleared: bool = sql
        .query_one(
            "SELECT previous_secret IS NULL AND previous_secret_expires_on IS NULL FROM subscriptions WHERE id = $1",
            &[&id],
        )
        .await
        .expect("reads")
        .get(0);
    assert!(cleared);
    let claimed = store.claim_deliveries(owner, later, later.plus(lease), 10, 10).await.expect("claims");
    assert_eq!(claimed.len(), 1);
    assert_eq!((claimed[0].signing_secret.as_str(), claimed[0].previous_secret.as_deref()), ("whsec_newer", None));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotating_the_secrets_key_seals_the_replaced_signing_secret_again_too() {
    use crate::secrets::{KeyRing, SecretKey};
    let db = test_db!();
    let (old, new) = (SecretKey::generate().expect("a key"), SecretKey::generate().expect("a key"));
    let open = |ring: KeyRing| PostgresStore::open(&db.url, SETTINGS, true, Arc::new(ring));
    let store = open(KeyRing::new(old.clone(), Vec::new())).await.expect("opens");
    let (m, original) = subscribed(&store, 0).await;
    let id = original.id;
    let grace = Duration::from_secs(3600);
    done(store.rotate_subscription_secret_guarded(change(m, id, None, NOW), rotation("whsec_new", grace), None).await);
    cancelled_sessions(&store, m, 1, NOW).await;
    drop(store);

    let rotating = open(KeyRing::new(new.clone(), vec![old])).await.expect("opens with both keys");
    assert_eq!(rotating.rotate_secrets().await.expect("rotates").subscriptions, 1);
    drop(rotating);
    // With the new key alone (opening checks that every secret opens), the replaced one too.
    let store = open(KeyRing::new(new, Vec::new())).await.expect("every secret opens with the new key");
    let record = store.get_subscription(id).await.expect("reads").expect("exists");
    assert_eq!(record.previous_secret.map(|p| p.secret), Some(original.signing_secret.clone()));
    let claimed = store.claim_deliveries(Uuid::now_v7(), NOW, NOW.plus(grace), 10, 10).await.expect("claims");
    assert_eq!(claimed.len(), 1, "its secrets open");
    assert_eq!(claimed[0].previous_secret.as_deref(), Some(original.signing_secret.as_str()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovering_queues_the_failed_deliveries_of_a_window_oldest_first() {
    let db = test_db!();
    let store = db.open().await;
    let sql = db.sql().await;
    let m = merchant(&store, NOW).await;
    let id = Uuid::now_v7();
    store.put_subscription(subscription(id, m, &ALL_EVENTS, NOW)).await.expect("subscribes");
    let second = |n: u64| NOW.plus(Duration::from_secs(n));
    // Five events a second apart; every delivery fails for good but the third.
    for n in 0..5 {
        cancelled_sessions(&store, m, 1, second(n)).await;
    }
    let owner = Uuid::now_v7();
    let claimed = store.claim_deliveries(owner, second(10), second(70), 100, 100).await.expect("claims");
    let claimed = claimed_of(&sql, &claimed, id).await;
    assert_eq!(claimed.iter().map(|d| d.event_time).collect::<Vec<_>>(), (0..5).map(second).collect::<Vec<_>>());
    let outcomes = claimed
        .iter()
        .enumerate()
        .map(|(n, d)| match n {
            2 => attempted(d, owner, second(10), Some(204), NextStep::Delivered),
            _ => attempted(d, owner, second(10), Some(500), NextStep::Failed),
        })
        .collect();
    store.record_attempts(outcomes, second(10), ONLY_GONE).await.expect("records");
    let states = || async {
        let listed = deliveries_of(&store, m, id).await;
        claimed.iter().map(|d| state_of(&listed, d.id)).collect::<Vec<_>>()
    };
    use DeliveryState::{Delivered, Failed, Held, Pending};
    assert_eq!(states().await, [Failed, Failed, Delivered, Failed, Failed]);

    // [1 s, 4 s): the failed ones of the second and fourth events, one at a time.
    let window = |limit: usize| RecoverWindow { since: second(1), until: second(4), limit };
    let recover = |merchant: Uuid, subscription: Uuid, window: RecoverWindow, now: Timestamp| {
        let store = &store;
        async move {
            ran(store
                .recover_deliveries_guarded(change(merchant, subscription, None, now), window, None)
                .await
                .expect("answers"))
        }
    };
    assert_eq!(recover(Uuid::now_v7(), id, window(1), second(20)).await, RecoverOutcome::OtherMerchant);
    assert_eq!(recover(m, Uuid::now_v7(), window(1), second(20)).await, RecoverOutcome::NotFound);
    let stale_tag = store
        .recover_deliveries_guarded(change(m, id, Some("\"9\""), second(20)), window(1), None)
        .await
        .expect("answers");
    assert!(!matches!(ran(stale_tag), RecoverOutcome::Queued { .. }), "an If-Match that does not match");
    let wake = store.deliveries_queued();
    assert_eq!(recover(m, id, window(1), second(20)).await, RecoverOutcome::Queued { queued: 1, more: true });
    assert!(wake_pending(&wake) || woken(&wake, HANG_GUARD).await, "the dispatcher is woken");
    assert_eq!(states().await, [Failed, Pending, Delivered, Failed, Failed]);
    let listed = deliveries_of(&store, m, id).await;
    assert_eq!(listed.iter().find(|d| d.id == claimed[1].id).expect("listed").next_attempt_on, Some(second(20)));
    let row = sql
        .query_one(
            "SELECT retry_index, lease_owner IS NULL, last_modified_on = $2 FROM deliveries WHERE id = $1",
            &[&claimed[1].id, &Ts(second(20))],
        )
        .await
        .expect("reads");
    assert_eq!((row.get::<_, i32>(0), row.get::<_, bool>(1), row.get::<_, bool>(2)), (0, true, true));
    assert_eq!(recover(m, id, window(1), second(21)).await, RecoverOutcome::Queued { queued: 1, more: false });
    assert_eq!(states().await, [Failed, Pending, Delivered, Pending, Failed]);
    assert_eq!(recover(m, id, window(10), second(22)).await, RecoverOutcome::Queued { queued: 0, more: false });

    // While the subscription is suspended, recovered deliveries are held.
    let retried = store.claim_deliveries(owner, second(30), second(90), 100, 100).await.expect("claims");
    assert_eq!(retried.len(), 2);
    let gone = attempted(&retried[0], owner, second(30), Some(410), NextStep::RetryAt(second(90)));
    assert_eq!(store.record_attempts(vec![gone], second(30), ONLY_GONE).await.expect("records").len(), 1);
    let all = RecoverWindow { since: NOW, until: second(5), limit: 10 };
    assert_eq!(recover(m, id, all, second(40)).await, RecoverOutcome::Queued { queued: 2, more: false });
    assert_eq!(states().await, [Held, Held, Delivered, Held, Held]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_test_delivery_is_recorded_with_its_one_attempt_and_belongs_to_no_session() {
    let db = test_db!();
    let store = db.open().await;
    let m = merchant(&store, NOW).await;
    let id = Uuid::now_v7();
    store.put_subscription(subscription(id, m, &ALL_EVENTS, NOW)).await.expect("subscribes");
    let data = format!("{{\"subscriptionId\":\"{id}\"}}");
    let attempt = AttemptRecord { attempt: 1, started_on: NOW, duration_ms: 12, status: Some(401), error: None };
    let test = TestDelivery {
        merchant_id: m,
        subscription_id: id,
        event_id: Uuid::now_v7(),
        time: NOW,
        data: data.clone(),
        attempt: attempt.clone(),
        delivered: false,
    };
    assert_eq!(ran(store.record_test_delivery_guarded(test.clone(), None).await.expect("records")), attempt);
    let listed = deliveries_of(&store, m, id).await;
    assert_eq!(listed.len(), 1);
    let delivery = &listed[0];
    assert_eq!(
        (delivery.event_id, delivery.event_type, delivery.session_id, delivery.state, delivery.next_attempt_on),
        (test.event_id, crate::domain::event::EventKind::RedirectSessionTest, None, DeliveryState::Failed, None)
    );
    assert_eq!((delivery.created_on, delivery.last_modified_on), (NOW, NOW.plus(Duration::from_millis(12))));
    assert_eq!(delivery.attempts, std::slice::from_ref(&attempt));
    // Never retried…
    let later = NOW.plus(Duration::from_secs(60));
    assert!(store
        .claim_deliveries(Uuid::now_v7(), later, later.plus(later.since(NOW)), 10, 10)
        .await
        .expect("claims")
        .is_empty());
    // …but redelivered on request, with its data as written.
    match store.redeliver(m, delivery.id, later).await.expect("redelivers") {
        RedeliverOutcome::Queued(queued) => assert_eq!(queued.state, DeliveryState::Pending),
        other => panic!("not queued: {other:?}"),
    }
    let claimed = store
        .claim_deliveries(Uuid::now_v7(), later, later.plus(Duration::from_secs(60)), 10, 10)
        .await
        .expect("claims");
    assert_eq!(claimed.len(), 1);
    assert_eq!(
        (claimed[0].event_type, claimed[0].event_time, claimed[0].data.as_str()),
        (crate::domain::event::EventKind::RedirectSessionTest, NOW, data.as_str())
    );

    // Under a guard the answer is kept with it; a second run of the same request records nothing.
    let guard = || Guard {
        key: IdempotencyKey { merchant_id: m, request_id: Uuid::max() },
        fingerprint: [7; 32],
        now: later,
        answer: Box::new(|attempt: &AttemptRecord| StoredResponse {
            status: 200,
            headers: Vec::new(),
            body: format!("{:?}", attempt.status).into_bytes(),
            session: None,
        }),
        seal: None,
    };
    let delivered = AttemptRecord { status: Some(204), started_on: later, ..attempt.clone() };
    let test =
        TestDelivery { event_id: Uuid::now_v7(), time: later, attempt: delivered.clone(), delivered: true, ..test };
    match store.record_test_delivery_guarded(test.clone(), Some(guard())).await.expect("records") {
        Guarded::Ran(outcome, Some(kept)) => {
            assert_eq!(outcome, delivered);
            assert_eq!(kept.body, b"Some(204)");
        }
        other => panic!("not run under its guard: {other:?}"),
    }
    let replay = TestDelivery { event_id: Uuid::now_v7(), ..test };
    let again = store.record_test_delivery_guarded(replay, Some(guard())).await.expect("answers");
    assert!(matches!(again, Guarded::Earlier(Found::Replay(_))), "{again:?}");
    let listed = deliveries_of(&store, m, id).await;
    assert_eq!(listed.len(), 2);
    assert_eq!(in_state(&listed, DeliveryState::Delivered), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purging_keeps_held_deliveries_and_their_events() {
    let db = test_db!();
    let store = db.open().await;
    let sql = db.sql().await;
    let owner = Uuid::now_v7();
    let hour = Duration::from_secs(3600);
    let TwoReceivers { m, gone, healthy, to_gone, to_healthy } =
        two_receivers(&db, &store, 2, owner, NOW, NOW.plus(hour)).await;
    let mut outcomes = vec![attempted(&to_gone[0], owner, NOW, Some(410), NextStep::RetryAt(NOW.plus(hour)))];
    outcomes.extend(to_healthy.iter().map(|d| attempted(d, owner, NOW, Some(204), NextStep::Delivered)));
    assert_eq!(store.record_attempts(outcomes, NOW, ONLY_GONE).await.expect("records").len(), 1);

    let everything = Retention { deliveries: Duration::ZERO, idempotency: Duration::ZERO };
    let far = NOW.plus(Duration::from_secs(400 * 86_400));
    assert!(store.purge(far, everything, 100).await.expect("purges") >= 4, "the delivered ones and their attempts");
    assert!(deliveries_of(&store, m, healthy).await.is_empty());
    let held = deliveries_of(&store, m, gone).await;
    assert_eq!(in_state(&held, DeliveryState::Held), 2);
    assert_eq!(held.iter().map(|d| d.attempts.len()).sum::<usize>(), 1, "with their attempts");
    let events: Vec<Uuid> = held.iter().map(|d| d.event_id).collect();
    let kept: i64 =
        sql.query_one("SELECT count(*) FROM events WHERE id = ANY($1)", &[&events]).await.expect("counts").get(0);
    assert_eq!(kept, 2, "and their events");
    assert_eq!(store.purge(far, everything, 100).await.expect("purges"), 0);

    // Resumed, they are sent with their events.
    done(store.resume_subscription_guarded(change(m, gone, None, far), None).await);
    let claimed = store.claim_deliveries(owner, far, far.plus(hour), 100, 100).await.expect("claims");
    assert_eq!(claimed.len(), 2);
}
