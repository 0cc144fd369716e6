//! The customer's steps racing merchants, the sweep and each other, and on SQLite alike.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finish_and_a_cancel_racing_on_two_instances_have_one_winner() {
    let db = test_db!();
    let (a, b) = (Arc::new(db.open().await), Arc::new(db.open().await));
    let sql = db.sql().await;
    let m = merchant(&*a, NOW).await;
    a.put_subscription(subscription(Uuid::now_v7(), m, &ALL_EVENTS, NOW)).await.expect("subscribes");
    const SESSIONS: usize = 50;
    let mut sessions = Vec::new();
    for i in 0..SESSIONS {
        let record = session(Uuid::now_v7(), m, spec_with(None, "5"), NOW, Duration::from_secs(900));
        sessions.push(authenticated(&*a, record, &format!("+49151777{i:05}"), NOW).await.id);
    }
    let at = NOW.plus(Duration::from_secs(30));
    let races: Vec<_> = sessions
        .iter()
        .enumerate()
        .map(|(i, &id)| {
            let (a, b) = (a.clone(), b.clone());
            tokio::spawn(async move {
                let finish = if i % 2 == 0 {
                    Finish::CreateIntent(Intent { id: Uuid::now_v7(), flow: Flow::PayOut })
                } else {
                    Finish::Acknowledge
                };
                let (finished, cancelled) =
                    tokio::join!(a.finish(step(id, at), finish), b.cancel_session(cancel(m, id, at)));
                (id, finished.expect("finishes"), cancelled.expect("cancels"))
            })
        })
        .collect();
    let (mut completed, mut cancels, mut intents_made) = (0, 0, 0);
    for race in races {
        let (id, finished, cancelled) = race.await.expect("joins");
        let stored = a.get_session(id).await.expect("reads").expect("exists");
        match (finished, cancelled) {
            (StepOutcome::Done(s), CancelOutcome::InvalidTransition(State::Completed)) => {
                assert_eq!((s.state, &stored), (State::Completed, &s));
                intents_made += usize::from(s.transaction_intent_id.is_some());
                completed += 1;
            }
            (StepOutcome::NotAllowed(_, State::Cancelled), CancelOutcome::Cancelled(s)) => {
                assert_eq!(stored, s);
                assert_eq!((stored.state, stored.transaction_intent_id), (State::Cancelled, None));
                cancels += 1;
            }
            other => panic!("{id}: not exactly one winner: {other:?}"),
        }
        assert_eq!(stored.version, 4, "one change after signing in");
        let events = a.session_events(id).await.expect("events");
        let expected = match stored.state {
            State::Completed => EventType::RedirectSessionCompleted,
            _ => EventType::RedirectSessionCancelled,
        };
        assert_eq!(events.iter().map(|e| e.1).collect::<Vec<_>>(), [expected], "{id}");
    }
    assert_eq!(completed + cancels, SESSIONS);
    let _ = writeln!(std::io::stderr(), "{completed} finished first, {cancels} cancelled first");
    let intents: i64 = sql.query_one("SELECT count(*) FROM transaction_intents", &[]).await.expect("counts").get(0);
    assert_eq!(intents, intents_made as i64, "an intent only for a finish that won");
    let deliveries: i64 = sql.query_one("SELECT count(*) FROM deliveries", &[]).await.expect("counts").get(0);
    assert_eq!(deliveries, SESSIONS as i64);
}

/// The hash of the code the session's customer was sent, while it is unused.
async fn code_hash(sql: &tokio_postgres::Client, id: Uuid) -> Option<Vec<u8>> {
    let row = sql.query_one("SELECT code_hash FROM one_time_codes WHERE session_id = $1", &[&id]).await;
    row.expect("a code row").get(0)
}

/// Entered at the instant it expires: refused as Expired, nothing consumed or linked, even
/// before the sweep wrote the expiry down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_code_entered_at_the_instant_the_session_expires_is_refused_and_not_used() {
    let db = test_db!();
    let store = db.open().await;
    let sql = db.sql().await;
    let m = merchant(&store, NOW).await;
    let ttl = Duration::from_secs(10);
    let record = session(Uuid::now_v7(), m, spec_with(None, "1"), NOW, ttl);
    let id = with_code(&store, record, "+4915199990004", NOW).await;
    let before = store.get_session(id).await.expect("reads").expect("exists");
    assert!(matches!(
        store.enter_code(step(id, NOW.plus(ttl)), right_code(id), Uuid::now_v7()).await,
        Ok(CodeEntered::NotAllowed(_, State::Expired))
    ));
    assert_eq!(store.get_session(id).await.expect("reads"), Some(before));
    assert!(code_hash(&sql, id).await.is_some(), "the code was not used");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_code_entered_as_the_session_expires_never_both_authenticates_and_expires_it() {
    let db = test_db!();
    let (a, b) = (Arc::new(db.open().await), Arc::new(db.open().await));
    let sql = db.sql().await;
    let m = merchant(&*a, NOW).await;
    let ttl = Duration::from_secs(10);
    let expires_on = NOW.plus(ttl);

    // A millisecond before, on one instance, while the sweep runs on the other: whichever
    // commits first wins each session, and the other sees it.
    const SESSIONS: usize = 40;
    let mut ids = Vec::new();
    for i in 0..SESSIONS {
        let record = session(Uuid::now_v7(), m, spec_with(None, "1"), NOW, ttl);
        ids.push(with_code(&*a, record, &format!("+49151888{i:05}"), NOW).await);
    }
    let just_before = expires_on.minus(Duration::from_millis(1));
    let entries: Vec<_> = ids
        .iter()
        .map(|&id| {
            let a = a.clone();
            tokio::spawn(async move { (id, a.enter_code(step(id, just_before), right_code(id), Uuid::now_v7()).await) })
        })
        .collect();
    let sweeps = {
        let b = b.clone();
        tokio::spawn(async move {
            let mut expired = 0;
            loop {
                let n = b.expire_due(expires_on, 3).await.expect("sweeps");
                expired += n;
                if n == 0 && expired > 0 {
                    return expired;
                }
                tokio::task::yield_now().await;
            }
        })
    };
    let mut outcomes = Vec::new();
    for entry in entries {
        outcomes.push(entry.await.expect("joins"));
    }
    sweeps.await.expect("joins");
    // Sessions the sweep skipped while a sign-in held them are expired now.
    while b.expire_due(expires_on, 100).await.expect("sweeps") > 0 {}
    let (mut signed_in, mut too_late) = (0, 0);
    for (id, entered) in outcomes {
        let stored = a.get_session(id).await.expect("reads").expect("exists");
        assert_eq!(stored.state, State::Expired, "{id}");
        let events = a.session_events(id).await.expect("events");
        assert_eq!(events.iter().map(|e| e.1).collect::<Vec<_>>(), [EventType::RedirectSessionExpired], "{id}");
        match entered.expect("enters") {
            // Signed in first, expired after: the expiry came on top of the sign-in.
            CodeEntered::Authenticated(s) => {
                assert_eq!((s.state, s.version), (State::Authenticated, 3));
                assert_eq!((stored.version, stored.customer_id), (4, s.customer_id));
                assert!(s.customer_id.is_some());
                assert_eq!(code_hash(&sql, id).await, None);
                // The sweep's event names the customer the sign-in linked.
                let data = &event_rows(&sql, id).await[0].1;
                assert_eq!(data, &crate::store::event_data(&stored, State::Expired, expires_on));
                assert_eq!(json(data)["customerId"], serde_json::json!(s.customer_id.expect("linked")));
                signed_in += 1;
            }
            // Expired first: nothing of the sign-in happened.
            CodeEntered::NotAllowed(_, State::Expired) => {
                assert_eq!((stored.version, stored.customer_id), (3, None));
                assert!(code_hash(&sql, id).await.is_some(), "the code was not used");
                assert_eq!(json(&event_rows(&sql, id).await[0].1).get("customerId"), None);
                too_late += 1;
            }
            other => panic!("{id}: {other:?}"),
        }
    }
    let _ = writeln!(std::io::stderr(), "{signed_in} signed in first, {too_late} expired first");
    let customers: i64 = sql.query_one("SELECT count(*) FROM customers", &[]).await.expect("counts").get(0);
    assert_eq!(customers, signed_in as i64, "a customer only for a sign-in that won");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_sessions_registering_one_new_phone_at_once_link_the_same_customer() {
    let db = test_db!();
    let (a, b) = (Arc::new(db.open().await), Arc::new(db.open().await));
    let sql = db.sql().await;
    let m = merchant(&*a, NOW).await;
    const PHONES: usize = 20;
    let mut pairs = Vec::new();
    for i in 0..PHONES {
        let phone = format!("+49151666{i:05}");
        let x = with_code(
            &*a,
            session(Uuid::now_v7(), m, registration_spec("A", "B"), NOW, Duration::from_secs(900)),
            &phone,
            NOW,
        )
        .await;
        let y = with_code(
            &*b,
            session(Uuid::now_v7(), m, spec_with(None, "3"), NOW, Duration::from_secs(900)),
            &phone,
            NOW,
        )
        .await;
        pairs.push((x, y));
    }
    let at = NOW.plus(Duration::from_secs(1));
    let races: Vec<_> = pairs
        .into_iter()
        .map(|(x, y)| {
            let (a, b) = (a.clone(), b.clone());
            tokio::spawn(async move {
                tokio::join!(
                    a.enter_code(step(x, at), right_code(x), Uuid::now_v7()),
                    b.enter_code(step(y, at), right_code(y), Uuid::now_v7())
                )
            })
        })
        .collect();
    for race in races {
        match race.await.expect("joins") {
            (Ok(CodeEntered::Authenticated(x)), Ok(CodeEntered::Authenticated(y))) => {
                assert_eq!(x.state, State::Completed, "the registration completed");
                assert_eq!(y.state, State::Authenticated);
                assert!(x.customer_id.is_some());
                assert_eq!(x.customer_id, y.customer_id, "one customer for one phone");
            }
            other => panic!("{other:?}"),
        }
    }
    let row = sql.query_one("SELECT count(*), count(DISTINCT phone) FROM customers", &[]).await.expect("counts");
    assert_eq!((row.get::<_, i64>(0), row.get::<_, i64>(1)), (PHONES as i64, PHONES as i64));
}

/// The customer's steps on SQLite and PostgreSQL must read the same, line by line (and the
/// webhook bodies must be the same bytes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_customer_step_answers_as_the_sqlite_store_does() {
    let db = test_db!();
    let postgres = db.open().await;
    let dir = tempfile::tempdir().expect("a temporary directory");
    let sqlite = SqliteStore::open(&dir.path().join("parity.db"), true, ring()).await.expect("opens SQLite");
    let ids: Vec<Uuid> = (0..17).map(|_| Uuid::now_v7()).collect();
    let from_sqlite = customer_scenario(&sqlite, &ids).await;
    let from_postgres = customer_scenario(&postgres, &ids).await;
    for (line, (s, p)) in from_sqlite.iter().zip(&from_postgres).enumerate() {
        assert_eq!(s, p, "line {line} differs");
    }
    assert_eq!(from_sqlite.len(), from_postgres.len());
    let codes: i64 = db.sql().await.query_one("SELECT count(*) FROM one_time_codes", &[]).await.expect("counts").get(0);
    assert_eq!(codes, 0, "purged");
    let expired = from_postgres.iter().find(|line| line.starts_with("claimed RedirectSessionExpired"));
    let expired = expired.expect("the expiry was delivered");
    assert!(
        expired.ends_with(&format!(",\"customerId\":\"{}\",\"transactionIntentId\":\"{}\"}}", ids[2], ids[16])),
        "{expired}"
    );
}

async fn customer_scenario(store: &impl Inspect, ids: &[Uuid]) -> Vec<String> {
    let mut log = Vec::new();
    let at = |ms: u64| NOW.plus(Duration::from_millis(ms));
    let m = ids[0];
    let merchant = Merchant { id: m, name: "Parity Shop".to_owned(), disabled: false, created_on: NOW };
    store.create_merchant(merchant, [5; 32]).await.expect("merchant");
    store.put_subscription(subscription(ids[1], m, &ALL_EVENTS, NOW)).await.expect("subscribes");
    let named = ids[2];
    store.create_customer(named, "+4915100000001".to_owned(), NOW).await.expect("customer");
    let step_at = |session: Uuid, ms: u64, correlation: usize| Step {
        session_id: session,
        correlation_id: ids[correlation],
        now: at(ms),
    };
    let ttl = Duration::from_secs(900);
    let [pay, register, named_pay, give_up, late] = [ids[3], ids[4], ids[5], ids[6], ids[7]];
    for record in [
        session(pay, m, spec_with(None, "100.5"), at(1), ttl),
        session(register, m, registration_spec("Erika", "Mustermann"), at(2), ttl),
        session(named_pay, m, spec_with(Some(named), "7"), at(3), ttl),
        session(give_up, m, spec_with(None, "8"), at(4), ttl),
        // Expires by the clock; its event names the customer and the intent.
        session(late, m, existing_intent_spec(named, ids[16]), at(5), Duration::from_secs(1)),
    ] {
        store.create_session(record).await.expect("creates");
    }
    log.push(format!("{:?}", store.hosted_view(pay).await));
    log.push(format!("{:?}", store.hosted_view(Uuid::nil()).await));
    for session in [pay, register, named_pay, give_up, late, Uuid::nil()] {
        log.push(format!("{:?}", store.open_session(step_at(session, 10, 8)).await));
        log.push(format!("{:?}", store.open_session(step_at(session, 11, 9)).await));
    }
    log.push(format!("{:?}", store.open_session(step_at(late, 5_000, 9)).await));
    let phone = "+4915199990005";
    for (session, seen) in [(pay, 1), (pay, 0), (pay, 0), (register, 0), (named_pay, 0), (late, 0), (Uuid::nil(), 0)] {
        let sent = OtpState::after_send(None, phone.to_owned(), right_code(session), at(20));
        log.push(format!("{:?}", store.record_code(step_at(session, 20, 10), sent, seen).await));
    }
    log.push(format!("{:?}", store.enter_code(step_at(give_up, 30, 11), right_code(give_up), ids[12]).await));
    log.push(format!("{:?}", store.enter_code(step_at(pay, 30, 11), wrong_code(pay), ids[12]).await));
    log.push(format!("{:?}", store.hosted_view(pay).await));
    log.push(format!("{:?}", store.finish(step_at(pay, 35, 11), Finish::Acknowledge).await));
    log.push(format!("{:?}", store.enter_code(step_at(pay, 40, 11), right_code(pay), ids[12]).await));
    log.push(format!("{:?}", store.enter_code(step_at(pay, 41, 11), right_code(pay), ids[12]).await));
    log.push(format!("{:?}", store.enter_code(step_at(register, 42, 11), right_code(register), ids[13]).await));
    log.push(format!("{:?}", store.enter_code(step_at(named_pay, 43, 11), right_code(named_pay), ids[14]).await));
    log.push(format!("{:?}", store.enter_code(step_at(late, 5_000, 11), right_code(late), ids[14]).await));
    log.push(format!("{:?}", store.enter_code(step_at(pay, 44, 11), right_code(pay), ids[14]).await));
    let intent = Intent { id: ids[15], flow: Flow::PayIn };
    log.push(format!("{:?}", store.finish(step_at(pay, 50, 11), Finish::CreateIntent(intent.clone())).await));
    log.push(format!("{:?}", store.finish(step_at(pay, 51, 11), Finish::GiveUp).await));
    log.push(format!("{:?}", store.finish(step_at(named_pay, 52, 11), Finish::Acknowledge).await));
    log.push(format!("{:?}", store.finish(step_at(give_up, 53, 11), Finish::GiveUp).await));
    log.push(format!("{:?}", store.finish(step_at(register, 54, 11), Finish::GiveUp).await));
    for session in [pay, register, named_pay, give_up, late] {
        log.push(format!("{:?}", store.hosted_view(session).await));
        let events = store.session_events(session).await.expect("events");
        log.push(format!("{:?}", events.iter().map(|e| e.1).collect::<Vec<_>>()));
    }
    log.push(format!("{:?}", store.expire_due(at(10_000), 10).await));
    let mut claimed = store.claim_deliveries(Uuid::nil(), at(10_000), at(60_000), 100, 100).await.expect("claims");
    claimed.sort_by(|x, y| x.data.cmp(&y.data));
    for delivery in &claimed {
        log.push(format!("claimed {} {} {}", delivery.event_type.as_str(), delivery.event_time, delivery.data));
    }
    // Sign-in states go with the idempotency records' retention.
    let day = Duration::from_secs(86_400);
    log.push(format!("{:?}", store.purge(at(20_000), Retention { deliveries: day, idempotency: day }, 100).await));
    let codes_gone = Retention { deliveries: day, idempotency: Duration::ZERO };
    log.push(format!("{:?}", store.purge(at(20_000), codes_gone, 2).await));
    log.push(format!("{:?}", store.purge(at(20_000), codes_gone, 100).await));
    log.push(format!("{:?}", store.purge(at(20_000), codes_gone, 100).await));
    for session in [pay, register, named_pay] {
        log.push(format!("{:?}", store.hosted_view(session).await));
    }
    log
}

// ----- Delivery claims: the per-subscription cap, and dispatchers that are gone -----
