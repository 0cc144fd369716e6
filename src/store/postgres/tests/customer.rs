//! The customer's side (`CustomerStore`): arriving, codes, registering, finishing.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn arriving_opens_a_session_once_without_an_event() {
    let db = test_db!();
    let store = db.open().await;
    let m = merchant(&store, NOW).await;
    let record = session(Uuid::now_v7(), m, spec_with(None, "10"), NOW, Duration::from_secs(900));
    store.create_session(record.clone()).await.expect("creates");

    let first = step(record.id, NOW.plus(Duration::from_secs(1)));
    let opened = match store.open_session(first.clone()).await.expect("opens") {
        StepOutcome::Done(s) => s,
        other => panic!("expected Done, got {other:?}"),
    };
    assert_eq!((opened.state, opened.version), (State::Opened, 2));
    assert_eq!((opened.last_modified_on, opened.last_correlation_id), (first.now, first.correlation_id));
    assert_eq!(store.get_session(record.id).await.expect("reads"), Some(opened.clone()));
    // Arriving again answers the session as it is and writes nothing.
    match store.open_session(step(record.id, NOW.plus(Duration::from_secs(2)))).await.expect("opens") {
        StepOutcome::Done(s) => assert_eq!(s, opened),
        other => panic!("expected Done, got {other:?}"),
    }
    assert_eq!(store.get_session(record.id).await.expect("reads"), Some(opened));
    assert!(store.session_events(record.id).await.expect("events").is_empty(), "opening records no event");

    assert!(matches!(store.open_session(step(Uuid::now_v7(), NOW)).await, Ok(StepOutcome::NotFound)));
    // Cancelled, or expired by the clock: not allowed, nothing written.
    let cancelled = session(Uuid::now_v7(), m, spec_with(None, "10"), NOW, Duration::from_secs(900));
    store.create_session(cancelled.clone()).await.expect("creates");
    store.cancel_session(cancel(m, cancelled.id, NOW)).await.expect("cancels");
    assert!(matches!(
        store.open_session(step(cancelled.id, NOW)).await,
        Ok(StepOutcome::NotAllowed(_, State::Cancelled))
    ));
    let late = session(Uuid::now_v7(), m, spec_with(None, "10"), NOW, Duration::from_secs(1));
    store.create_session(late.clone()).await.expect("creates");
    assert!(matches!(
        store.open_session(step(late.id, NOW.plus(Duration::from_secs(1)))).await,
        Ok(StepOutcome::NotAllowed(_, State::Expired))
    ));
    assert_eq!(store.get_session(late.id).await.expect("reads"), Some(late));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn codes_are_counted_and_the_right_one_links_one_customer_per_phone() {
    let db = test_db!();
    let store = db.open().await;
    let sql = db.sql().await;
    let m = merchant(&store, NOW).await;
    let phone = "+4915199990001";
    let record = session(Uuid::now_v7(), m, spec_with(None, "10"), NOW, Duration::from_secs(900));
    let id = record.id;
    store.create_session(record).await.expect("creates");
    let sent = OtpState::after_send(None, phone.to_owned(), right_code(id), NOW);

    // Not before the customer arrived; then only against the state the caller saw.
    assert_eq!(
        store.record_code(step(id, NOW), sent.clone(), 0).await.expect("records"),
        CodeRecorded::NotAllowed(State::Created)
    );
    assert_eq!(
        store.record_code(step(Uuid::now_v7(), NOW), sent.clone(), 0).await.expect("records"),
        CodeRecorded::NotFound
    );
    store.open_session(step(id, NOW)).await.expect("opens");
    assert!(matches!(
        store.enter_code(step(id, NOW), right_code(id), Uuid::now_v7()).await,
        Ok(CodeEntered::Refused(CodeCheck::NoCode))
    ));
    assert_eq!(store.record_code(step(id, NOW), sent.clone(), 1).await.expect("records"), CodeRecorded::Raced);
    assert_eq!(store.record_code(step(id, NOW), sent.clone(), 0).await.expect("records"), CodeRecorded::Recorded);
    assert_eq!(store.record_code(step(id, NOW), sent.clone(), 0).await.expect("records"), CodeRecorded::Raced);

    // Wrong entries are counted (and committed), each telling how many are left.
    let at = NOW.plus(Duration::from_secs(5));
    for left in [4, 3] {
        match store.enter_code(step(id, at), wrong_code(id), Uuid::now_v7()).await.expect("enters") {
            CodeEntered::Refused(CodeCheck::Wrong { tries_left }) => assert_eq!(tries_left, left),
            other => panic!("expected Wrong, got {other:?}"),
        }
    }
    let view = store.hosted_view(id).await.expect("reads").expect("exists");
    let otp = view.otp.expect("a code was sent");
    assert_eq!((otp.wrong_attempts, otp.codes_sent, otp.code_hash), (2, 1, Some(right_code(id))));
    assert_eq!(view.session.state, State::Opened);
    assert_eq!(view.customer_phone, None);

    // The right one: Authenticated, linked to a customer registered with this phone.
    let new_customer = Uuid::now_v7();
    let signed_in = match store.enter_code(step(id, at), right_code(id), new_customer).await.expect("enters") {
        CodeEntered::Authenticated(s) => s,
        other => panic!("expected Authenticated, got {other:?}"),
    };
    assert_eq!(
        (signed_in.state, signed_in.version, signed_in.customer_id),
        (State::Authenticated, 3, Some(new_customer))
    );
    assert_eq!(store.get_session(id).await.expect("reads"), Some(signed_in.clone()));
    let row = sql
        .query_one(
            "SELECT phone, first_name, last_name, created_on = $2 FROM customers WHERE id = $1",
            &[&new_customer, &Ts(at)],
        )
        .await
        .expect("the customer was registered");
    assert_eq!(
        (
            row.get::<_, String>(0),
            row.get::<_, Option<String>>(1),
            row.get::<_, Option<String>>(2),
            row.get::<_, bool>(3)
        ),
        (phone.to_owned(), None, None, true)
    );
    // The code is used up: it signs in once.
    let view = store.hosted_view(id).await.expect("reads").expect("exists");
    assert_eq!(view.otp.expect("still there").code_hash, None);
    assert_eq!(view.customer_phone.as_deref(), Some(phone));
    assert!(matches!(
        store.enter_code(step(id, at), right_code(id), Uuid::now_v7()).await,
        Ok(CodeEntered::NotAllowed(_, State::Authenticated))
    ));
    assert!(store.session_events(id).await.expect("events").is_empty(), "signing in records no event");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_phone_signs_in_as_one_customer_and_five_wrong_entries_use_a_code_up() {
    let db = test_db!();
    let store = db.open().await;
    let sql = db.sql().await;
    let m = merchant(&store, NOW).await;
    let phone = "+4915199990001";
    let at = NOW.plus(Duration::from_secs(5));
    let first = session(Uuid::now_v7(), m, spec_with(None, "10"), NOW, Duration::from_secs(900));
    let first = authenticated(&store, first, phone, at).await;
    assert!(first.customer_id.is_some());

    // Another session with the same phone finds that customer; a session naming its customer
    // keeps it whatever phone the code went to.
    let again = session(Uuid::now_v7(), m, spec_with(None, "20"), NOW, Duration::from_secs(900));
    let again = authenticated(&store, again, phone, at).await;
    assert_eq!(again.customer_id, first.customer_id);
    let named = Uuid::now_v7();
    store.create_customer(named, "+4915100000000".to_owned(), NOW).await.expect("customer");
    let naming = session(Uuid::now_v7(), m, spec_with(Some(named), "30"), NOW, Duration::from_secs(900));
    assert_eq!(authenticated(&store, naming, phone, at).await.customer_id, Some(named));
    let customers: i64 =
        sql.query_one("SELECT count(*) FROM customers WHERE phone = $1", &[&phone]).await.expect("counts").get(0);
    assert_eq!(customers, 1);

    // Five wrong entries use a code up, even for the right code after them.
    let exhausted = session(Uuid::now_v7(), m, spec_with(None, "40"), NOW, Duration::from_secs(900));
    let exhausted = with_code(&store, exhausted, phone, NOW).await;
    for _ in 0..5 {
        store.enter_code(step(exhausted, at), wrong_code(exhausted), Uuid::now_v7()).await.expect("enters");
    }
    assert!(matches!(
        store.enter_code(step(exhausted, at), right_code(exhausted), Uuid::now_v7()).await,
        Ok(CodeEntered::Refused(CodeCheck::TooManyTries))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registration_completes_with_one_event_naming_the_new_customer() {
    let db = test_db!();
    let store = db.open().await;
    let sql = db.sql().await;
    let m = merchant(&store, NOW).await;
    store.put_subscription(subscription(Uuid::now_v7(), m, &ALL_EVENTS, NOW)).await.expect("subscribes");
    let record = session(Uuid::now_v7(), m, registration_spec("Erika", "Mustermann"), NOW, Duration::from_secs(900));
    let id = with_code(&store, record, "+4915199990002", NOW).await;
    let new_customer = Uuid::now_v7();
    let at = NOW.plus(Duration::from_secs(3));
    let done = match store.enter_code(step(id, at), right_code(id), new_customer).await.expect("enters") {
        CodeEntered::Authenticated(s) => s,
        other => panic!("expected Authenticated, got {other:?}"),
    };
    assert_eq!((done.state, done.version, done.customer_id), (State::Completed, 4, Some(new_customer)));
    assert_eq!(store.get_session(id).await.expect("reads"), Some(done.clone()));
    let events = event_rows(&sql, id).await;
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0].0, "RedirectSessionCompleted");
    assert_eq!(events[0].1, crate::store::event_data(&done, State::Completed, at));
    assert_eq!(json(&events[0].1)["customerId"], serde_json::json!(new_customer));
    let row = sql
        .query_one("SELECT phone, first_name, last_name FROM customers WHERE id = $1", &[&new_customer])
        .await
        .expect("registered");
    assert_eq!(
        (row.get::<_, String>(0), row.get::<_, Option<String>>(1), row.get::<_, Option<String>>(2)),
        ("+4915199990002".to_owned(), Some("Erika".to_owned()), Some("Mustermann".to_owned()))
    );
    // The webhook body has the members in the order SQLite writes them, the customer last.
    let claimed =
        store.claim_deliveries(Uuid::now_v7(), at, at.plus(Duration::from_secs(60)), 10, 100).await.expect("claims");
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0].data, crate::store::event_data(&done, State::Completed, at));
    assert!(claimed[0].data.ends_with(&format!(",\"customerId\":\"{new_customer}\"}}")), "{}", claimed[0].data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finishing_creates_the_intent_and_giving_up_aborts() {
    let db = test_db!();
    let store = db.open().await;
    let sql = db.sql().await;
    let m = merchant(&store, NOW).await;
    store.put_subscription(subscription(Uuid::now_v7(), m, &ALL_EVENTS, NOW)).await.expect("subscribes");
    let phone = "+4915199990003";
    let at = NOW.plus(Duration::from_secs(10));
    let intent = Intent { id: Uuid::now_v7(), flow: Flow::PayIn };

    // Not before the customer signed in.
    let opened = session(Uuid::now_v7(), m, spec_with(None, "100.50"), NOW, Duration::from_secs(900));
    let opened = with_code(&store, opened, phone, NOW).await;
    assert!(matches!(
        store.finish(step(opened, at), Finish::CreateIntent(intent.clone())).await,
        Ok(StepOutcome::NotAllowed(_, State::Opened))
    ));
    assert!(matches!(store.finish(step(Uuid::now_v7(), at), Finish::Acknowledge).await, Ok(StepOutcome::NotFound)));

    let record = session(Uuid::now_v7(), m, spec_with(None, "100.50"), NOW, Duration::from_secs(900));
    let signed_in = authenticated(&store, record, phone, NOW).await;
    let finishing = step(signed_in.id, at);
    let done = match store.finish(finishing.clone(), Finish::CreateIntent(intent.clone())).await.expect("finishes") {
        StepOutcome::Done(s) => s,
        other => panic!("expected Done, got {other:?}"),
    };
    assert_eq!((done.state, done.version, done.transaction_intent_id), (State::Completed, 4, Some(intent.id)));
    assert_eq!((done.last_modified_on, done.last_correlation_id), (at, finishing.correlation_id));
    assert_eq!(store.get_session(done.id).await.expect("reads"), Some(done.clone()));
    let events = event_rows(&sql, done.id).await;
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0].0, "RedirectSessionCompleted");
    assert_eq!(json(&events[0].1)["transactionIntentId"], serde_json::json!(intent.id));
    assert_eq!(json(&events[0].1)["customerId"], serde_json::json!(signed_in.customer_id.expect("linked")));
    assert_eq!(events[0].1, crate::store::event_data(&done, State::Completed, at));
    let row = sql
        .query_one(
            "SELECT merchant_id, session_id, customer_id, flow, amount::text, currency, created_on = $2
               FROM transaction_intents WHERE id = $1",
            &[&intent.id, &Ts(at)],
        )
        .await
        .expect("the intent was recorded");
    assert_eq!(
        (
            row.get::<_, Uuid>(0),
            row.get::<_, Uuid>(1),
            row.get::<_, Uuid>(2),
            row.get::<_, String>(3),
            row.get::<_, String>(4),
            row.get::<_, String>(5),
            row.get::<_, bool>(6)
        ),
        (
            m,
            done.id,
            signed_in.customer_id.expect("linked"),
            "PayIn".to_owned(),
            "100.50".to_owned(),
            "EUR".to_owned(),
            true
        )
    );
    let view = store.hosted_view(done.id).await.expect("reads").expect("exists");
    assert_eq!((view.intent_flow, view.merchant_name), (Some(Flow::PayIn), format!("merchant {m}")));
    // Finishing twice changes nothing.
    assert!(matches!(
        store.finish(step(done.id, at), Finish::Acknowledge).await,
        Ok(StepOutcome::NotAllowed(_, State::Completed))
    ));
    let claimed =
        store.claim_deliveries(Uuid::now_v7(), at, at.plus(Duration::from_secs(60)), 10, 100).await.expect("claims");
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0].data, crate::store::event_data(&done, State::Completed, at));

    // Giving up: from Opened (and Authenticated), not from Created.
    match store.finish(step(opened, at), Finish::GiveUp).await.expect("gives up") {
        StepOutcome::Done(s) => assert_eq!((s.state, s.version), (State::Aborted, 3)),
        other => panic!("expected Done, got {other:?}"),
    }
    let events = event_rows(&sql, opened).await;
    assert_eq!(events.iter().map(|e| e.0.as_str()).collect::<Vec<_>>(), ["RedirectSessionAborted"]);
    assert_eq!(json(&events[0].1).get("customerId"), None, "no customer was linked");
    let created = session(Uuid::now_v7(), m, spec_with(None, "1"), NOW, Duration::from_secs(900));
    store.create_session(created.clone()).await.expect("creates");
    assert!(matches!(
        store.finish(step(created.id, at), Finish::GiveUp).await,
        Ok(StepOutcome::NotAllowed(_, State::Created))
    ));
    let intents: i64 = sql.query_one("SELECT count(*) FROM transaction_intents", &[]).await.expect("counts").get(0);
    assert_eq!(intents, 1);
}
