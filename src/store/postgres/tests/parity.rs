//! The same use cases on SQLite and PostgreSQL read the same, line by line.

use super::*;

/// The same scenario on SQLite and PostgreSQL must read the same, line by line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_use_case_answers_as_the_sqlite_store_does() {
    let db = test_db!();
    let postgres = db.open().await;
    let dir = tempfile::tempdir().expect("a temporary directory");
    let sqlite = SqliteStore::open(&dir.path().join("parity.db"), true, ring()).await.expect("opens SQLite");
    let ids = Ids::new();
    let from_sqlite = scenario(&sqlite, &ids).await;
    let from_postgres = scenario(&postgres, &ids).await;
    for (line, (s, p)) in from_sqlite.iter().zip(&from_postgres).enumerate() {
        assert_eq!(s, p, "line {line} differs");
    }
    assert_eq!(from_sqlite.len(), from_postgres.len());
}

/// Fixed ids, so that both stores see the same inputs.
struct Ids {
    merchants: [Uuid; 2],
    customer: Uuid,
    subscriptions: [Uuid; 3],
    sessions: [Uuid; 5],
    request: Uuid,
    guarded: Uuid,
    /// Sessions and the test event of the subscription operations.
    later_sessions: [Uuid; 2],
    test_event: Uuid,
}

impl Ids {
    fn new() -> Self {
        let mut subscriptions = [Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7()];
        subscriptions.sort();
        Ids {
            merchants: [Uuid::now_v7(), Uuid::now_v7()],
            customer: Uuid::now_v7(),
            subscriptions,
            sessions: [Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7()],
            request: Uuid::now_v7(),
            guarded: Uuid::now_v7(),
            later_sessions: [Uuid::now_v7(), Uuid::now_v7()],
            test_event: Uuid::now_v7(),
        }
    }
}

/// Runs every use case and writes down what came back, leaving out ids the store makes.
async fn scenario(store: &impl Inspect, ids: &Ids) -> Vec<String> {
    let mut log = Vec::new();
    merchants_and_subscriptions(store, ids, &mut log).await;
    sessions(store, ids, &mut log).await;
    claims_and_attempts(store, &mut log).await;
    listing_and_redelivery(store, ids, &mut log).await;
    idempotency_keys_and_retention(store, ids, &mut log).await;
    operating_a_subscription(store, ids, &mut log).await;
    test_delivery_and_purge(store, ids, &mut log).await;
    log
}

/// The scenario's time: `ms` after `NOW`.
fn at(ms: u64) -> Timestamp {
    NOW.plus(Duration::from_millis(ms))
}

/// When the scenario's sessions are cancelled and expired.
fn later() -> Timestamp {
    at(2_000)
}

/// When the scenario operates a subscription: `ms` after its other steps.
fn op(ms: u64) -> Timestamp {
    at(200_000 + ms)
}

/// The scenario's dispatcher.
const OWNER: Uuid = Uuid::nil();

fn cancel_request(ids: &Ids, merchant: Uuid, session: Uuid, if_match: Option<&str>, now: Timestamp) -> CancelRequest {
    CancelRequest {
        merchant_id: merchant,
        session_id: session,
        if_match: if_match.map(str::to_owned),
        correlation_id: ids.request,
        now,
    }
}

fn shown(outcome: Result<ChangeSubscriptionOutcome, StoreError>) -> String {
    format!("{outcome:?}")
}

/// The deliveries of `list` as lines, sorted.
fn describe(list: Vec<crate::store::webhooks::DeliveryRecord>) -> Vec<String> {
    let mut lines: Vec<String> = list
        .iter()
        .map(|d| {
            format!(
                "{} {:?} {} {:?} {:?} {} {} {:?}",
                d.event_type.as_str(),
                d.session_id,
                d.subscription_id,
                d.state,
                d.next_attempt_on,
                d.created_on,
                d.last_modified_on,
                d.attempts
            )
        })
        .collect();
    lines.sort();
    lines
}

async fn merchants_and_subscriptions(store: &impl Inspect, ids: &Ids, log: &mut Vec<String>) {
    let [m1, m2] = ids.merchants;
    let [s1, s2, s3] = ids.subscriptions;
    for (i, id) in [m1, m2].into_iter().enumerate() {
        let merchant = Merchant { id, name: format!("m{i}"), disabled: false, created_on: at(i as u64) };
        store.create_merchant(merchant, [i as u8; 32]).await.expect("merchant");
    }
    log.push(format!("{:?}", store.merchant_by_key([1; 32]).await));
    log.push(format!("{:?}", store.rotate_merchant_key(m2, [9; 32]).await));
    log.push(format!("{:?}", store.rotate_merchant_key(Uuid::nil(), [8; 32]).await));
    log.push(format!("{:?}", store.disable_merchant(m2).await));
    log.push(format!("{:?}", store.merchant_by_key([9; 32]).await));
    log.push(format!("{:?}", store.list_merchants().await));
    store.create_customer(ids.customer, "+4915112345678".to_owned(), NOW).await.expect("customer");

    // Subscriptions.
    let sub1 = subscription(s1, m1, &ALL_EVENTS, at(1));
    let sub2 = subscription(s2, m1, &[EventType::RedirectSessionCancelled], at(2));
    let sub3 = subscription(s3, m2, &ALL_EVENTS, at(3));
    for record in [&sub1, &sub2, &sub3, &sub1] {
        log.push(match store.put_subscription(record.clone()).await.expect("puts") {
            PutSubscriptionOutcome::Created(r) => format!("created {r:?}"),
            PutSubscriptionOutcome::Exists(r) => format!("exists {r:?}"),
        });
    }
    log.push(format!("{:?}", store.get_subscription(s2).await));
    log.push(format!("{:?}", store.list_subscriptions(m1, None, 1).await));
    log.push(format!("{:?}", store.list_subscriptions(m1, Some((at(2), s2)), 1).await));
    let patched = SubscriptionSpec { api_key: "new-key".to_owned(), ..sub2.spec.clone() };
    log.push(shown(store.patch_subscription(m1, s2, patched.clone(), Some("\"5\"".to_owned()), at(4)).await));
    log.push(shown(store.patch_subscription(m2, s2, patched.clone(), None, at(4)).await));
    log.push(shown(store.patch_subscription(m1, Uuid::nil(), patched.clone(), None, at(4)).await));
    log.push(shown(store.patch_subscription(m1, s2, patched.clone(), Some("W/\"1\"".to_owned()), at(4)).await));
    log.push(shown(store.patch_subscription(m1, s2, patched.clone(), None, at(5)).await));
}

async fn sessions(store: &impl Inspect, ids: &Ids, log: &mut Vec<String>) {
    let [m1, m2] = ids.merchants;
    let [a, b, c, d, e] = ids.sessions;
    let ttl = Duration::from_secs(900);
    let sessions = [
        session(a, m1, spec_with(Some(ids.customer), "100.5"), at(10), ttl),
        session(b, m1, spec_with(None, "0.01"), at(11), ttl),
        session(c, m1, spec_with(Some(Uuid::nil()), "10000"), at(12), ttl),
        session(d, m1, new_customer_spec(), at(13), Duration::from_secs(1)),
        session(e, m2, spec_with(None, "42"), at(14), ttl),
        session(a, m1, spec_with(None, "1"), at(15), ttl),
        session(a, m2, spec_with(Some(ids.customer), "100.5"), at(15), ttl),
    ];
    for record in sessions {
        log.push(match store.create_session(record).await.expect("creates") {
            CreateOutcome::Created(s) => format!("created {s:?}"),
            CreateOutcome::Exists(s) => format!("exists {s:?}"),
            CreateOutcome::CustomerNotFound => "customer not found".to_owned(),
        });
    }
    let later = later();
    for filter in [
        SessionFilter { limit: 10, ..SessionFilter::default() },
        SessionFilter { limit: 1, ..SessionFilter::default() },
        SessionFilter { limit: 10, after: Some((at(11), b)), ..SessionFilter::default() },
        SessionFilter { limit: 10, state: Some(State::Expired), ..SessionFilter::default() },
        SessionFilter {
            limit: 10,
            state: Some(State::Created),
            created_from: Some(at(11)),
            ..SessionFilter::default()
        },
        SessionFilter { limit: 10, created_to: Some(at(11)), ..SessionFilter::default() },
    ] {
        let listed = store.list_sessions(m1, filter.clone(), later).await.expect("lists");
        log.push(format!("{filter:?} -> {:?}", listed.iter().map(|s| s.id).collect::<Vec<_>>()));
    }

    // Cancel and expire.
    let request = |merchant, session, if_match, now| cancel_request(ids, merchant, session, if_match, now);
    for r in [
        request(m2, a, None, later),
        request(m1, Uuid::nil(), None, later),
        request(m1, a, Some("\"2\""), later),
        request(m1, a, Some("\"0\", W/\"1\""), later),
        request(m1, a, None, later),
        request(m1, d, Some("\"1\""), later),
        request(m1, d, Some("\"1-expired\""), later),
        request(m1, d, None, later),
        request(m2, e, None, later),
    ] {
        log.push(format!("{:?}", store.cancel_session(r).await));
    }
    log.push(format!("{:?}", store.expire_due(later, 10).await));
    log.push(format!("{:?}", store.expire_due(later, 10).await));
    log.push(format!("{:?}", store.get_session(d).await));
    for session in [a, b, d, e] {
        let events = store.session_events(session).await.expect("events");
        log.push(format!("{:?}", events.iter().map(|e| e.1).collect::<Vec<_>>()));
    }
}

async fn claims_and_attempts(store: &impl Inspect, log: &mut Vec<String>) {
    let later = later();
    // Deliveries: claim, record, list, redeliver.
    let mut claimed = store.claim_deliveries(OWNER, later, at(60_000), 10, 100).await.expect("claims");
    claimed.sort_by(|x, y| (x.event_type.as_str(), &x.callback_url).cmp(&(y.event_type.as_str(), &y.callback_url)));
    for delivery in &claimed {
        log.push(format!(
            "claimed {} {} {} {} {} {} {} {}",
            delivery.event_type.as_str(),
            delivery.event_time,
            delivery.data,
            delivery.callback_url,
            delivery.api_key,
            delivery.signing_secret,
            delivery.attempts,
            delivery.retry_index
        ));
    }
    log.push(format!("{}", store.claim_deliveries(OWNER, later, at(60_000), 10, 100).await.expect("claims").len()));
    let steps = [NextStep::Delivered, NextStep::RetryAt(at(9_000)), NextStep::Failed];
    let outcomes: Vec<AttemptOutcome> = claimed
        .iter()
        .zip(steps.iter().cycle())
        .map(|(delivery, next)| AttemptOutcome {
            delivery_id: delivery.id,
            owner: OWNER,
            attempt: AttemptRecord {
                attempt: 1,
                started_on: at(2_100),
                duration_ms: 35,
                status: if *next == NextStep::Delivered { Some(204) } else { None },
                error: if *next == NextStep::Delivered { None } else { Some("connection refused".to_owned()) },
            },
            next: *next,
        })
        .collect();
    // A result for a delivery this owner does not hold changes nothing.
    let mut stale = outcomes.clone();
    stale.iter_mut().for_each(|o| o.owner = Uuid::max());
    store.record_attempts(stale, at(2_150), ONLY_GONE).await.expect("records");
    store.record_attempts(outcomes, at(2_200), ONLY_GONE).await.expect("records");
}

async fn listing_and_redelivery(store: &impl Inspect, ids: &Ids, log: &mut Vec<String>) {
    let [m1, m2] = ids.merchants;
    let [s1, s2, _] = ids.subscriptions;
    let all = DeliveryFilter { limit: 100, ..DeliveryFilter::default() };
    let listed = store.list_deliveries(m1, all.clone()).await.expect("lists");
    log.extend(describe(listed.clone()));
    log.push(format!(
        "{}",
        store.list_deliveries(m1, DeliveryFilter { limit: 1, ..all.clone() }).await.expect("lists").len()
    ));
    let only_s2 = DeliveryFilter { subscription_id: Some(s2), state: Some(DeliveryState::Pending), ..all.clone() };
    log.extend(describe(store.list_deliveries(m1, only_s2).await.expect("lists")));
    for delivery in &listed {
        let outcome = store.redeliver(m1, delivery.id, at(3_000)).await.expect("redelivers");
        log.push(match outcome {
            RedeliverOutcome::Queued(d) => format!("queued {:?} {:?} {}", d.state, d.next_attempt_on, d.attempts.len()),
            other => format!("{other:?}"),
        });
    }
    log.push(format!("{:?}", store.redeliver(m2, listed[0].id, at(3_000)).await));
    log.push(format!("{:?}", store.redeliver(m1, Uuid::nil(), at(3_000)).await));
    // Deleting a subscription cancels what is queued for it.
    log.push(shown(store.delete_subscription(m1, s1, Some("\"9\"".to_owned()), at(4_000)).await));
    log.push(shown(store.delete_subscription(m1, s1, None, at(4_000)).await));
    log.push(format!("{:?}", store.get_subscription(s1).await));
    log.extend(describe(store.list_deliveries(m1, all.clone()).await.expect("lists")));
    for delivery in store.list_deliveries(m1, all.clone()).await.expect("lists") {
        if delivery.subscription_id == s1 {
            log.push(format!("{:?}", store.redeliver(m1, delivery.id, at(5_000)).await));
        }
    }
    let claimed = store.claim_deliveries(Uuid::max(), at(9_000), at(70_000), 10, 100).await.expect("claims");
    store.release_claims(Uuid::max(), claimed.iter().map(|d| d.id).collect()).await.expect("releases");
    log.push(format!("{}", store.claim_deliveries(OWNER, at(9_000), at(70_000), 10, 100).await.expect("claims").len()));
}

async fn idempotency_keys_and_retention(store: &impl Inspect, ids: &Ids, log: &mut Vec<String>) {
    let [m1, m2] = ids.merchants;
    let all = DeliveryFilter { limit: 100, ..DeliveryFilter::default() };
    // Idempotency: kept answers, and a guarded write that keeps its answer with its change.
    let key = IdempotencyKey { merchant_id: m1, request_id: ids.request };
    let kept = |status: u16| StoredResponse {
        status,
        headers: vec![
            ("content-type".to_owned(), "application/json".to_owned()),
            ("etag".to_owned(), "\"1\"".to_owned()),
        ],
        body: b"{\"id\":1}\x00\xff".to_vec(),
        session: None,
    };
    log.push(format!("{:?}", store.idempotency_lookup(key, [1; 32]).await));
    log.push(format!("{:?}", store.idempotency_keep(key, [1; 32], at(62_000), kept(201)).await));
    log.push(format!("{:?}", store.idempotency_lookup(key, [1; 32]).await));
    log.push(format!("{:?}", store.idempotency_lookup(key, [2; 32]).await));
    log.push(format!("{:?}", store.idempotency_keep(key, [1; 32], at(63_000), kept(200)).await));
    let other = IdempotencyKey { merchant_id: m2, request_id: ids.request };
    log.push(format!("{:?}", store.idempotency_lookup(other, [1; 32]).await));
    let guard = |key: IdempotencyKey, fingerprint: [u8; 32]| Guard {
        key,
        fingerprint,
        now: at(64_000),
        answer: Box::new(|outcome: &CreateOutcome| StoredResponse {
            status: if matches!(outcome, CreateOutcome::Created(_)) { 201 } else { 200 },
            headers: Vec::new(),
            body: b"guarded".to_vec(),
            // A new session's answer is kept as a reference to it, and read back with its row.
            session: match outcome {
                CreateOutcome::Created(session) => Some(session.id),
                _ => None,
            },
        }),
        seal: None,
    };
    let guarded = IdempotencyKey { merchant_id: m2, request_id: Uuid::max() };
    for (id, fingerprint) in [(ids.guarded, [4; 32]), (ids.guarded, [4; 32]), (Uuid::max(), [5; 32])] {
        let record = session(id, m2, spec_with(None, "7"), at(64_000), Duration::from_secs(900));
        let outcome = store.create_session_guarded(record, Some(guard(guarded, fingerprint))).await.expect("creates");
        log.push(match outcome {
            Guarded::Ran(outcome, kept) => format!("ran {outcome:?} {kept:?}"),
            Guarded::Earlier(found) => format!("earlier {found:?}"),
        });
    }
    log.push(format!("{:?}", store.get_session(Uuid::max()).await));

    // Signing keys.
    let first = KeyPair { kid: "k1".to_owned(), secret: [1; 32] };
    let keys = store.signing_keys(first, NOW).await.expect("keys");
    log.push(format!("{} {:?}", keys.current.kid, keys.previous));
    let keys = store.signing_keys(KeyPair { kid: "k2".to_owned(), secret: [2; 32] }, NOW).await.expect("keys");
    log.push(format!("{} {:?}", keys.current.kid, keys.previous));
    store.rotate_signing_key(KeyPair { kid: "k3".to_owned(), secret: [3; 32] }, at(1)).await.expect("rotates");
    let keys = store.signing_keys(KeyPair { kid: "k4".to_owned(), secret: [4; 32] }, NOW).await.expect("keys");
    log.push(format!("{} {:?} {:?}", keys.current.kid, keys.current.secret, keys.previous));

    // Retention: nothing is old yet; then everything finished is.
    let keep = Retention { deliveries: Duration::from_secs(86_400), idempotency: Duration::from_secs(86_400) };
    log.push(format!("{:?}", store.purge(at(5_000), keep, 100).await));
    let gone = Retention { deliveries: Duration::ZERO, idempotency: Duration::ZERO };
    log.push(format!("{:?}", store.purge(at(100_000), gone, 2).await));
    log.push(format!("{:?}", store.purge(at(100_000), gone, 100).await));
    log.push(format!("{:?}", store.purge(at(100_000), gone, 100).await));
    log.extend(describe(store.list_deliveries(m1, all.clone()).await.expect("lists")));
}

async fn operating_a_subscription(store: &impl Inspect, ids: &Ids, log: &mut Vec<String>) {
    let [m1, m2] = ids.merchants;
    let [_, _, s3] = ids.subscriptions;
    let ttl = Duration::from_secs(900);
    // Operating a subscription: rotation, suspension, held deliveries, recovery, resumption,
    // test deliveries.
    let request = |merchant, session, if_match, now| cancel_request(ids, merchant, session, if_match, now);
    let by_m2 = DeliveryFilter { limit: 100, ..DeliveryFilter::default() };
    let hour = Duration::from_secs(3600);
    for (tag, grace) in [(Some("\"7\""), hour), (Some("\"1\""), hour), (None, hour)] {
        let rotation = SecretRotation { secret: format!("whsec_{grace:?}"), grace };
        let outcome = store.rotate_subscription_secret_guarded(change(m2, s3, tag, op(0)), rotation, None).await;
        log.push(format!("{:?}", outcome.map(ran)));
    }
    let [f, g] = ids.later_sessions;
    for (id, ms) in [(f, 1), (g, 5)] {
        store.create_session(session(id, m2, spec_with(None, "5"), op(ms), ttl)).await.expect("creates");
    }
    log.push(format!("{:?}", store.cancel_session(request(m2, f, None, op(2))).await));
    let mut claimed = store.claim_deliveries(OWNER, op(3), op(60_000), 10, 100).await.expect("claims");
    claimed.retain(|d| d.callback_url.ends_with(&s3.to_string()));
    for d in &claimed {
        log.push(format!(
            "claimed {} {} {:?} {}",
            d.event_type.as_str(),
            d.signing_secret,
            d.previous_secret,
            d.attempts
        ));
    }
    let gone: Vec<AttemptOutcome> = claimed
        .iter()
        .map(|d| AttemptOutcome {
            delivery_id: d.id,
            owner: OWNER,
            attempt: AttemptRecord { attempt: 1, started_on: op(4), duration_ms: 7, status: Some(410), error: None },
            next: NextStep::Failed,
        })
        .collect();
    log.push(format!("{:?}", store.record_attempts(gone, op(4), ONLY_GONE).await));
    log.push(format!("{:?}", store.get_subscription(s3).await));
    log.push(format!("{:?}", store.cancel_session(request(m2, g, None, op(6))).await));
    log.extend(describe(store.list_deliveries(m2, by_m2.clone()).await.expect("lists")));
    log.push(format!("{:?}", store.delivery_backlog(op(7)).await));
    let window = RecoverWindow { since: NOW, until: op(10), limit: 1 };
    for (merchant, tag) in [(m1, None), (m2, Some("\"1\"")), (m2, None), (m2, None)] {
        let outcome = store.recover_deliveries_guarded(change(merchant, s3, tag, op(8)), window, None).await;
        log.push(format!("{:?}", outcome.map(ran)));
    }
    log.push(format!("{:?}", store.resume_subscription_guarded(change(m2, s3, None, op(9)), None).await.map(ran)));
    log.push(format!("{:?}", store.resume_subscription_guarded(change(m2, s3, None, op(10)), None).await.map(ran)));
    log.extend(describe(store.list_deliveries(m2, by_m2.clone()).await.expect("lists")));
}

async fn test_delivery_and_purge(store: &impl Inspect, ids: &Ids, log: &mut Vec<String>) {
    let [m1, m2] = ids.merchants;
    let [_, s2, _] = ids.subscriptions;
    let all = DeliveryFilter { limit: 100, ..DeliveryFilter::default() };
    let by_m2 = DeliveryFilter { limit: 100, ..DeliveryFilter::default() };
    let test = TestDelivery {
        merchant_id: m1,
        subscription_id: s2,
        event_id: ids.test_event,
        time: op(11),
        data: format!("{{\"subscriptionId\":\"{s2}\"}}"),
        attempt: AttemptRecord {
            attempt: 1,
            started_on: op(11),
            duration_ms: 9,
            status: None,
            error: Some("refused".to_owned()),
        },
        delivered: false,
    };
    log.push(format!("{:?}", store.record_test_delivery_guarded(test, None).await.map(ran)));
    let only_s2 = DeliveryFilter { subscription_id: Some(s2), ..all };
    log.extend(describe(store.list_deliveries(m1, only_s2).await.expect("lists")));
    log.push(format!("{:?}", store.purge(op(500_000), gone_retention(), 100).await));
    log.extend(describe(store.list_deliveries(m2, by_m2).await.expect("lists")));
}
