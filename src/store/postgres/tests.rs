//! Tests against a real PostgreSQL server. Set `REDIRECT_SESSIONS_TEST_POSTGRES` to an admin
//! URL (e.g. `postgres://postgres@127.0.0.1:5432/postgres`); each test creates its own
//! database `rs_test_<uuid>` and drops it at the end. Without the variable each test prints
//! that it was skipped and passes. Two `PostgresStore`s (two pools, two LISTEN connections)
//! stand for two instances of the service.

use crate::store::prelude::*;
use std::collections::HashSet;
use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio_postgres::NoTls;
use uuid::Uuid;

use super::{PoolSettings, PostgresStore};
use crate::domain::event::EventType;
use crate::domain::intent::{Flow, Intent};
use crate::domain::otp::{hash_code, CodeCheck, OtpState};
use crate::domain::request::SessionSpec;
use crate::domain::session::State;
use crate::domain::subscription::{EventMask, SubscriptionSpec};
use crate::domain::time::Timestamp;
use crate::domain::token::KeyPair;
use crate::store::customer::{CodeEntered, CodeRecorded, CustomerStore, Finish, Step, StepOutcome};
use crate::store::sqlite::SqliteStore;
use crate::store::webhooks::{
    AttemptOutcome, AttemptRecord, ChangeSubscriptionOutcome, ClaimedDelivery, DeliveryFilter, DeliveryRecord,
    DeliveryState, NextStep, PutSubscriptionOutcome, RecoverOutcome, RecoverWindow, RedeliverOutcome, Retention,
    SecretRotation, SubscriptionChange, SubscriptionRecord, SubscriptionStatus, SuspendPolicy, SuspendReason,
    Suspension, TestDelivery,
};
use crate::store::{
    CancelOutcome, CancelRequest, CreateOutcome, Found, Guard, Guarded, IdempotencyKey, Merchant, SessionFilter,
    SessionRecord, Store, StoreError, StoredResponse,
};

const ENV: &str = "REDIRECT_SESSIONS_TEST_POSTGRES";

/// How long a wait may take before a test fails as hung: a safety net for an event that never
/// comes, never a bound on how fast it comes.
const HANG_GUARD: Duration = Duration::from_secs(120);

const SETTINGS: PoolSettings = PoolSettings {
    max_connections: 8,
    acquire_timeout: Duration::from_secs(5),
    connect_timeout: Duration::from_secs(5),
};

/// The secrets key of every store these tests open (one per test process).
fn ring() -> Arc<crate::secrets::KeyRing> {
    static RING: std::sync::LazyLock<Arc<crate::secrets::KeyRing>> = std::sync::LazyLock::new(|| {
        Arc::new(crate::secrets::KeyRing::new(crate::secrets::SecretKey::generate().expect("a key"), Vec::new()))
    });
    RING.clone()
}

/// A fixed instant: 2026-01-31T11:59:59.123Z.
const NOW: Timestamp = Timestamp::from_millis(1_769_860_799_123);

/// A database of its own for one test, dropped (with its connections) when this goes away.
struct TestDb {
    admin: String,
    name: String,
    url: String,
}

impl TestDb {
    /// `None` (after saying so where the test output shows it) when no server is configured.
    async fn create() -> Option<TestDb> {
        let Ok(admin) = std::env::var(ENV) else {
            // Straight to the stream: libtest hides `println!` output of passing tests.
            let _ = writeln!(std::io::stderr(), "skipped: {ENV} not set");
            return None;
        };
        let name = format!("rs_test_{}", Uuid::new_v4().simple());
        raw(&admin).await.batch_execute(&format!("CREATE DATABASE {name}")).await.expect("CREATE DATABASE");
        let mut url = url::Url::parse(&admin).expect("the admin URL parses");
        url.set_path(&format!("/{name}"));
        Some(TestDb { admin, name, url: url.to_string() })
    }

    async fn open(&self) -> PostgresStore {
        PostgresStore::open(&self.url, SETTINGS, true, ring()).await.expect("the store opens")
    }

    /// A plain connection to the test database, for looking behind the store's back.
    async fn sql(&self) -> tokio_postgres::Client {
        raw(&self.url).await
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let (admin, name) = (self.admin.clone(), self.name.clone());
        // Drop cannot await, and the test's runtime may be gone or panicking: use a thread
        // with a runtime of its own.
        let _ = std::thread::spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread().enable_all().build() else {
                return;
            };
            runtime.block_on(async {
                if let Ok((client, connection)) = tokio_postgres::connect(&admin, NoTls).await {
                    tokio::spawn(connection);
                    let _ = client.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).await;
                }
            });
        })
        .join();
    }
}

async fn raw(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, NoTls).await.expect("connects to PostgreSQL");
    tokio::spawn(connection);
    client
}

macro_rules! test_db {
    () => {
        match TestDb::create().await {
            Some(db) => db,
            None => return,
        }
    };
}

fn spec_with(customer: Option<Uuid>, amount: &str) -> SessionSpec {
    let mut spec = serde_json::json!({
        "type": "NewTransactionIntent",
        "transactionData": {
            "type": "PassthroughDeposit",
            "amount": serde_json::Number::from_string_unchecked(amount.to_owned()),
            "currency": "EUR",
            "externalReference": "order-1",
        },
        "locale": "de-DE",
    });
    if let Some(customer) = customer {
        spec["customerId"] = serde_json::json!(customer);
    }
    spec_of(spec)
}

/// The spec of a session with `fields` and the merchant URLs every test session shares.
fn spec_of(mut fields: serde_json::Value) -> SessionSpec {
    fields["redirectData"] = serde_json::json!({
        "successUrl": "https://shop.example/ok",
        "failureUrl": "https://shop.example/fail",
        "abortUrl": "https://shop.example/abort",
        "qrCodeSuccessUrl": "https://shop.example/qr",
    });
    serde_json::from_value(fields).expect("a valid spec")
}

fn new_customer_spec() -> SessionSpec {
    spec_of(serde_json::json!({
        "type": "NewCustomer",
        "locale": "en-GB",
    }))
}

fn session(id: Uuid, merchant_id: Uuid, spec: SessionSpec, created_on: Timestamp, ttl: Duration) -> SessionRecord {
    SessionRecord {
        id,
        merchant_id,
        state: State::Created,
        token: format!("token-{id}"),
        expires_on: created_on.plus(ttl),
        created_on,
        last_modified_on: created_on,
        last_correlation_id: id,
        version: 1,
        customer_id: spec.customer_id,
        transaction_intent_id: spec.transaction_intent_id,
        spec,
    }
}

fn subscription(id: Uuid, merchant_id: Uuid, events: &[EventType], created_on: Timestamp) -> SubscriptionRecord {
    let bits = events.iter().fold(0, |bits, e| bits | EventMask::of(*e).bits());
    SubscriptionRecord {
        id,
        merchant_id,
        spec: SubscriptionSpec {
            callback_url: format!("https://hooks.example/{id}"),
            api_key: format!("key-{id}"),
            event_types: EventMask::from_bits(bits),
        },
        signing_secret: "whsec_c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0LXM=".to_owned(),
        created_on,
        last_modified_on: created_on,
        version: 1,
        previous_secret: None,
        status: SubscriptionStatus::Active,
    }
}

/// Suspends for a `410 Gone` only, never for the time a receiver has failed.
const ONLY_GONE: SuspendPolicy = SuspendPolicy { failing_for: Duration::from_secs(10 * 365 * 86_400) };

async fn merchant(store: &dyn Store, created_on: Timestamp) -> Uuid {
    let id = Uuid::now_v7();
    let mut hash = [0u8; 32];
    hash[..16].copy_from_slice(id.as_bytes());
    let merchant = Merchant { id, name: format!("merchant {id}"), disabled: false, created_on };
    store.create_merchant(merchant, hash).await.expect("creates the merchant");
    id
}

fn cancel(merchant_id: Uuid, session_id: Uuid, now: Timestamp) -> CancelRequest {
    CancelRequest { merchant_id, session_id, if_match: None, correlation_id: Uuid::now_v7(), now }
}

const ALL_EVENTS: [EventType; 4] = [
    EventType::RedirectSessionCancelled,
    EventType::RedirectSessionExpired,
    EventType::RedirectSessionCompleted,
    EventType::RedirectSessionAborted,
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrations_apply_twice_and_from_two_instances_at_once() {
    let db = test_db!();
    let first = db.open().await;
    first.ready().await.expect("ready after migrating");
    drop(first);
    // Again on a migrated database, and from two instances starting together.
    let (a, b) = tokio::join!(
        PostgresStore::open(&db.url, SETTINGS, true, ring()),
        PostgresStore::open(&db.url, SETTINGS, true, ring())
    );
    let (a, b) = (a.expect("opens"), b.expect("opens"));
    a.ready().await.expect("ready");
    b.ready().await.expect("ready");
    let sql = db.sql().await;
    let versions: Vec<i32> = sql
        .query("SELECT version FROM refinery_schema_history ORDER BY version", &[])
        .await
        .expect("reads")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(versions, [1, 2, 3, 4, 5, 6, 7]);
    // Pooled connections carry the statement timeout that bounds every query.
    let timeout = a
        .run(|c| Box::pin(async move { Ok(c.query_one("SHOW statement_timeout", &[]).await?.get::<_, String>(0)) }))
        .await
        .expect("shows");
    assert_eq!(timeout, "10s");
    // At most one current signing key, whatever the code does.
    sql.batch_execute("INSERT INTO signing_keys VALUES ('a', '\\x00', '\\x00', now(), NULL)").await.expect("first");
    let second = sql.batch_execute("INSERT INTO signing_keys VALUES ('b', '\\x00', '\\x00', now(), NULL)").await;
    assert_eq!(second.expect_err("a second current key").code().map(|c| c.code()), Some("23505"));
}

/// Advisory locks held in this test's database (`pg_locks` shows those of every database).
const ADVISORY_LOCKS_HERE: &str = "SELECT count(*) FROM pg_locks
     WHERE locktype = 'advisory' AND database = (SELECT oid FROM pg_database WHERE datname = current_database())";

/// The versions refinery recorded as applied.
async fn history(sql: &tokio_postgres::Client) -> Vec<i32> {
    let rows = sql.query("SELECT version FROM refinery_schema_history ORDER BY version", &[]).await.expect("reads");
    rows.iter().map(|r| r.get(0)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_migrating_an_empty_database_at_once_apply_each_migration_once() {
    let db = test_db!();
    let (a, b, c) = tokio::join!(db.open(), db.open(), db.open());
    for store in [a, b, c] {
        store.ready().await.expect("ready");
    }
    assert_eq!(history(&db.sql().await).await, [1, 2, 3, 4, 5, 6, 7]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_of_the_old_runner_keeps_its_migrations_and_gets_the_rest() {
    let db = test_db!();
    let sql = db.sql().await;
    // What the hand-made runner before refinery left: migrations 1 to 5 recorded in
    // `schema_migrations`.
    sql.batch_execute(
        "CREATE TABLE schema_migrations (
             version    integer     PRIMARY KEY,
             name       text        NOT NULL,
             applied_on timestamptz NOT NULL DEFAULT now())",
    )
    .await
    .expect("creates");
    for (version, name, migration) in &super::schema::MIGRATIONS[..5] {
        sql.batch_execute(migration).await.expect("applies");
        let at = "2027-01-15T08:00:00.123456Z";
        sql.execute("INSERT INTO schema_migrations VALUES ($1, $2, $3::text::timestamptz)", &[version, name, &at])
            .await
            .expect("records");
    }
    let store = PostgresStore::open(&db.url, SETTINGS, false, ring()).await.expect("opens without migrating");
    let behind = store.ready().await.expect_err("behind").to_string();
    assert!(behind.contains("at migration 5, this build needs 7"), "{behind}");
    drop(store);
    db.open().await.ready().await.expect("migrated and ready");
    assert_eq!(history(&sql).await, [1, 2, 3, 4, 5, 6, 7]);
    let adopted = sql.query_one("SELECT name, applied_on FROM refinery_schema_history WHERE version = 3", &[]).await;
    let adopted = adopted.expect("reads");
    assert_eq!(adopted.get::<_, String>(0), "customer_flow");
    assert_eq!(adopted.get::<_, String>(1), "2027-01-15T08:00:00.123456Z");
    // Again: refinery reads the adopted rows back (their times, their checksums).
    db.open().await.ready().await.expect("ready again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_migration_leaves_nothing_of_itself_applied() {
    let db = test_db!();
    let store = PostgresStore::open(&db.url, SETTINGS, false, ring()).await.expect("opens without migrating");
    let migrations = vec![
        refinery::Migration::unapplied("V1__init", super::schema::MIGRATIONS[0].2).expect("named"),
        refinery::Migration::unapplied("V2__broken", "CREATE TABLE half (a int); INSERT INTO nowhere VALUES (1);")
            .expect("named"),
    ];
    let failed = store.run(move |c| Box::pin(async move { super::schema::run(c, &migrations).await })).await;
    let failed = failed.expect_err("the second fails").to_string();
    assert!(failed.contains("nowhere"), "{failed}");
    let sql = db.sql().await;
    assert_eq!(history(&sql).await, [1], "the first stays applied, in a transaction of its own");
    let half: Option<String> = sql.query_one("SELECT to_regclass('half')::text", &[]).await.expect("reads").get(0);
    assert_eq!(half, None, "nothing of the failed migration stays");
    let locks: i64 = sql.query_one(ADVISORY_LOCKS_HERE, &[]).await.expect("reads").get(0);
    assert_eq!(locks, 0, "the migration lock was given back");
    store.run(|c| Box::pin(super::schema::migrate(c))).await.expect("the rest applies");
    assert_eq!(history(&sql).await, [1, 2, 3, 4, 5, 6, 7]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_that_is_not_migrated_is_not_ready() {
    let db = test_db!();
    let store = PostgresStore::open(&db.url, SETTINGS, false, ring()).await.expect("opens without migrating");
    assert!(matches!(store.ready().await, Err(StoreError::Unavailable(_))));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_server_is_unavailable_without_hanging() {
    // Needs no server: nothing listens on port 1. The open must come back with Unavailable (the
    // refused connect), not hang; the generous timeout only keeps a hang from stalling the run.
    let open = PostgresStore::open("postgres://postgres@127.0.0.1:1/none", SETTINGS, true, ring());
    let result = tokio::time::timeout(HANG_GUARD, open).await.expect("opening an unreachable server hung");
    assert!(matches!(result, Err(StoreError::Unavailable(_))), "{:?}", result.err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_that_runs_too_long_is_unavailable_and_its_connection_is_closed() {
    let db = test_db!();
    let store = db.open().await;
    // The statement would sleep for an hour: no statement_timeout ends it, and the server does
    // not notice a closed socket while it runs. Only the cancel of the call's limit ends it.
    let result = store
        .run_within(Duration::from_millis(300), |c| {
            Box::pin(async move {
                c.batch_execute("SET statement_timeout = 0").await?;
                c.batch_execute("SELECT pg_sleep(3600)").await?;
                Ok(())
            })
        })
        .await;
    // The call's own limit gave up on it: its error, not one of the statement's.
    assert!(
        matches!(&result, Err(StoreError::Unavailable(message)) if message == "the database did not answer in time"),
        "{result:?}"
    );
    // The statement was cancelled and the connection closed, not handed to the next caller: the
    // server ends its session (the generous deadline only keeps a failure from hanging).
    let sql = db.sql().await;
    let deadline = std::time::Instant::now() + HANG_GUARD;
    loop {
        let row = sql
            .query_one(
                "SELECT count(*) FROM pg_stat_activity \
                  WHERE query = 'SELECT pg_sleep(3600)' AND datname = current_database()",
                &[],
            )
            .await
            .expect("counts");
        if row.get::<_, i64>(0) == 0 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the abandoned statement's session never ended");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    store.list_merchants().await.expect("the pool goes on with a fresh connection");

    // The server's own bound, statement_timeout, is a 503 too.
    let timed_out = store
        .run(|c| {
            Box::pin(async move {
                let tx = c.transaction().await?;
                tx.batch_execute("SET LOCAL statement_timeout = '50ms'; SELECT pg_sleep(5)").await?;
                Ok(())
            })
        })
        .await;
    assert!(matches!(timed_out, Err(StoreError::Unavailable(_))), "{timed_out:?}");
    // Whereas a plain SQL error is Internal.
    let broken =
        store.run(|c| Box::pin(async move { Ok(c.batch_execute("SELECT * FROM no_such_table").await?) })).await;
    assert!(matches!(broken, Err(StoreError::Internal(_))), "{broken:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timestamps_round_trip_to_the_millisecond() {
    let db = test_db!();
    let store = db.open().await;
    let instants =
        [NOW, Timestamp::from_millis(946_684_799_999), Timestamp::from_millis(-1), Timestamp::from_millis(1)];
    for at in instants {
        merchant(&store, at).await;
    }
    let mut stored: Vec<i64> =
        store.list_merchants().await.expect("lists").iter().map(|m| m.created_on.millis()).collect();
    let mut expected: Vec<i64> = instants.iter().map(|t| t.millis()).collect();
    stored.sort_unstable();
    expected.sort_unstable();
    assert_eq!(stored, expected);
}

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
                    count(*) FILTER (WHERE e.data ->> 'lastModifiedOn' = to_char(s.expires_on AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'))
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

/// Waits up to `within` for a wake-up.
async fn woken(notify: &Notify, within: Duration) -> bool {
    tokio::time::timeout(within, notify.notified()).await.is_ok()
}

/// Whether a wake-up is pending right now (taking it), without waiting for one.
fn wake_pending(notify: &Notify) -> bool {
    futures_util::FutureExt::now_or_never(notify.notified()).is_some()
}

/// A connection of the test's own that `LISTEN`s on the dispatchers' channel: it sees every
/// `NOTIFY` the stores send, in commit order, and can send a marker of its own.
struct Watch {
    client: tokio_postgres::Client,
    payloads: tokio::sync::mpsc::UnboundedReceiver<String>,
}

impl Watch {
    async fn start(url: &str) -> Watch {
        let (client, mut connection) = tokio_postgres::connect(url, NoTls).await.expect("connects");
        let (sender, payloads) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            // Polling the connection this way drives it and hands over the notifications.
            while let Some(message) = std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                match message {
                    Ok(tokio_postgres::AsyncMessage::Notification(n)) => {
                        let _ = sender.send(n.payload().to_owned());
                    }
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
        });
        client.batch_execute(&format!("LISTEN {}", super::listen::CHANNEL)).await.expect("listens");
        Watch { client, payloads }
    }

    /// The next notification's payload.
    async fn next(&mut self) -> String {
        let next = tokio::time::timeout(HANG_GUARD, self.payloads.recv()).await;
        next.expect("a notification came").expect("the watching connection is open")
    }

    /// Sends a marker `NOTIFY` and answers the payloads of every notification committed before
    /// it (PostgreSQL delivers them in commit order, the marker included).
    async fn before_marker(&mut self) -> Vec<String> {
        let marker = format!("marker {}", Uuid::now_v7());
        self.client.execute("SELECT pg_notify($1, $2)", &[&super::listen::CHANNEL, &marker]).await.expect("notifies");
        let mut before = Vec::new();
        loop {
            match self.next().await {
                payload if payload == marker => return before,
                payload => before.push(payload),
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queuing_on_one_instance_wakes_the_dispatcher_of_another() {
    let db = test_db!();
    let (a, b) = (db.open().await, db.open().await);
    let wake_b = b.deliveries_queued();
    // The listener wakes once when it starts listening; after that, only NOTIFY does.
    assert!(woken(&wake_b, HANG_GUARD).await, "B's listener connected");
    let mut watch = Watch::start(&db.url).await;

    let m = merchant(&a, NOW).await;
    a.put_subscription(subscription(Uuid::now_v7(), m, &ALL_EVENTS, NOW)).await.expect("subscribes");
    let s = session(Uuid::now_v7(), m, spec_with(None, "2"), NOW, Duration::from_secs(900));
    a.create_session(s.clone()).await.expect("creates");
    // Nothing was queued yet, and creating queues nothing: no NOTIFY came before the marker.
    assert_eq!(watch.before_marker().await, Vec::<String>::new(), "subscribing or creating sent a NOTIFY");
    // The marker is the one NOTIFY so far: B wakes for it, and for nothing else.
    assert!(woken(&wake_b, HANG_GUARD).await, "B heard the marker");
    assert!(!wake_pending(&wake_b), "B was woken by something other than a NOTIFY");

    a.cancel_session(cancel(m, s.id, NOW)).await.expect("cancels");
    assert_eq!(watch.next().await, "", "the cancel's commit sent a NOTIFY");
    assert!(woken(&wake_b, HANG_GUARD).await, "A's commit woke B");
    assert!(woken(&a.deliveries_queued(), HANG_GUARD).await, "and A's own dispatcher");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pool_and_the_listener_recover_when_the_server_drops_every_connection() {
    let db = test_db!();
    let (a, b) = (db.open().await, db.open().await);
    let wake_b = b.deliveries_queued();
    assert!(woken(&wake_b, HANG_GUARD).await, "B's listener connected");
    let m = merchant(&a, NOW).await;
    a.put_subscription(subscription(Uuid::now_v7(), m, &ALL_EVENTS, NOW)).await.expect("subscribes");
    a.list_merchants().await.expect("a pooled connection exists");

    // What a restart does to every session: terminated by the server (57P01).
    let admin = raw(&db.admin).await;
    admin
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
            &[&db.name],
        )
        .await
        .expect("terminates");

    // The first call may meet a dead connection (then it is Unavailable, never Internal);
    // soon calls succeed on fresh ones (the deadline only keeps a failure from hanging).
    let deadline = std::time::Instant::now() + HANG_GUARD;
    loop {
        match a.list_merchants().await {
            Ok(_) => break,
            Err(StoreError::Unavailable(error)) => {
                assert!(std::time::Instant::now() < deadline, "the pool never reconnected: {error}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(error) => panic!("a lost connection must be Unavailable: {error}"),
        }
    }
    // B's listener reconnects (and wakes once for what it may have missed), then hears A again.
    assert!(woken(&wake_b, HANG_GUARD).await, "B's listener reconnected");
    let s = session(Uuid::now_v7(), m, spec_with(None, "2"), NOW, Duration::from_secs(900));
    a.create_session(s.clone()).await.expect("creates");
    a.cancel_session(cancel(m, s.id, NOW)).await.expect("cancels");
    assert!(woken(&wake_b, HANG_GUARD).await, "A's commit woke B after the reconnect");
}

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
async fn scenario(store: &dyn Store, ids: &Ids) -> Vec<String> {
    let mut log = Vec::new();
    let at = |ms: u64| NOW.plus(Duration::from_millis(ms));
    let [m1, m2] = ids.merchants;
    let [s1, s2, s3] = ids.subscriptions;
    let [a, b, c, d, e] = ids.sessions;

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
    let change = |o: Result<ChangeSubscriptionOutcome, StoreError>| format!("{o:?}");
    log.push(change(store.patch_subscription(m1, s2, patched.clone(), Some("\"5\"".to_owned()), at(4)).await));
    log.push(change(store.patch_subscription(m2, s2, patched.clone(), None, at(4)).await));
    log.push(change(store.patch_subscription(m1, Uuid::nil(), patched.clone(), None, at(4)).await));
    log.push(change(store.patch_subscription(m1, s2, patched.clone(), Some("W/\"1\"".to_owned()), at(4)).await));
    log.push(change(store.patch_subscription(m1, s2, patched.clone(), None, at(5)).await));

    // Sessions.
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
    let later = at(2_000);
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
    let request = |merchant: Uuid, session: Uuid, if_match: Option<&str>, now: Timestamp| CancelRequest {
        merchant_id: merchant,
        session_id: session,
        if_match: if_match.map(str::to_owned),
        correlation_id: ids.request,
        now,
    };
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

    // Deliveries: claim, record, list, redeliver.
    let owner = Uuid::nil();
    let mut claimed = store.claim_deliveries(owner, later, at(60_000), 10, 100).await.expect("claims");
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
    log.push(format!("{}", store.claim_deliveries(owner, later, at(60_000), 10, 100).await.expect("claims").len()));
    let steps = [NextStep::Delivered, NextStep::RetryAt(at(9_000)), NextStep::Failed];
    let outcomes: Vec<AttemptOutcome> = claimed
        .iter()
        .zip(steps.iter().cycle())
        .map(|(delivery, next)| AttemptOutcome {
            delivery_id: delivery.id,
            owner,
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
    let describe = |list: Vec<crate::store::webhooks::DeliveryRecord>| {
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
    };
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
    log.push(change(store.delete_subscription(m1, s1, Some("\"9\"".to_owned()), at(4_000)).await));
    log.push(change(store.delete_subscription(m1, s1, None, at(4_000)).await));
    log.push(format!("{:?}", store.get_subscription(s1).await));
    log.extend(describe(store.list_deliveries(m1, all.clone()).await.expect("lists")));
    for delivery in store.list_deliveries(m1, all.clone()).await.expect("lists") {
        if delivery.subscription_id == s1 {
            log.push(format!("{:?}", store.redeliver(m1, delivery.id, at(5_000)).await));
        }
    }
    let claimed = store.claim_deliveries(Uuid::max(), at(9_000), at(70_000), 10, 100).await.expect("claims");
    store.release_claims(Uuid::max(), claimed.iter().map(|d| d.id).collect()).await.expect("releases");
    log.push(format!("{}", store.claim_deliveries(owner, at(9_000), at(70_000), 10, 100).await.expect("claims").len()));

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

    // Operating a subscription: rotation, suspension, held deliveries, recovery, resumption,
    // test deliveries.
    let op = |ms: u64| at(200_000 + ms);
    let sub_change = |merchant_id: Uuid, id: Uuid, if_match: Option<&str>, now: Timestamp| SubscriptionChange {
        merchant_id,
        id,
        if_match: if_match.map(str::to_owned),
        now,
    };
    let by_m2 = DeliveryFilter { limit: 100, ..DeliveryFilter::default() };
    let hour = Duration::from_secs(3600);
    for (tag, grace) in [(Some("\"7\""), hour), (Some("\"1\""), hour), (None, hour)] {
        let rotation = SecretRotation { secret: format!("whsec_{grace:?}"), grace };
        let outcome = store.rotate_subscription_secret_guarded(sub_change(m2, s3, tag, op(0)), rotation, None).await;
        log.push(format!("{:?}", outcome.map(ran)));
    }
    let [f, g] = ids.later_sessions;
    for (id, ms) in [(f, 1), (g, 5)] {
        store.create_session(session(id, m2, spec_with(None, "5"), op(ms), ttl)).await.expect("creates");
    }
    log.push(format!("{:?}", store.cancel_session(request(m2, f, None, op(2))).await));
    let mut claimed = store.claim_deliveries(owner, op(3), op(60_000), 10, 100).await.expect("claims");
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
            owner,
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
        let outcome = store.recover_deliveries_guarded(sub_change(merchant, s3, tag, op(8)), window, None).await;
        log.push(format!("{:?}", outcome.map(ran)));
    }
    log.push(format!("{:?}", store.resume_subscription_guarded(sub_change(m2, s3, None, op(9)), None).await.map(ran)));
    log.push(format!("{:?}", store.resume_subscription_guarded(sub_change(m2, s3, None, op(10)), None).await.map(ran)));
    log.extend(describe(store.list_deliveries(m2, by_m2.clone()).await.expect("lists")));
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
    log
}

fn gone_retention() -> Retention {
    Retention { deliveries: Duration::ZERO, idempotency: Duration::ZERO }
}

// ---------------------------------------------------------------------------------------------
// The customer's side (CustomerStore)

/// The key codes are hashed under in these tests.
const CODE_KEY: [u8; 32] = [3; 32];
const CODE: &str = "123456";

fn step(session_id: Uuid, now: Timestamp) -> Step {
    Step { session_id, correlation_id: Uuid::now_v7(), now }
}

fn right_code(session: Uuid) -> [u8; 32] {
    hash_code(&CODE_KEY, session, CODE)
}

fn wrong_code(session: Uuid) -> [u8; 32] {
    hash_code(&CODE_KEY, session, "000000")
}

fn registration_spec(first_name: &str, last_name: &str) -> SessionSpec {
    spec_of(serde_json::json!({
        "type": "NewCustomer",
        "customerData": {"firstName": first_name, "lastName": last_name, "phoneNumber": "+4915112345678"},
        "locale": "de-DE",
    }))
}

fn existing_intent_spec(customer: Uuid, intent: Uuid) -> SessionSpec {
    spec_of(serde_json::json!({
        "type": "ExistingTransactionIntent",
        "customerId": customer,
        "transactionIntentId": intent,
        "locale": "de-DE",
    }))
}

/// Creates the session, opens it and records a code sent to `phone`, all at `now`.
async fn with_code(store: &dyn Store, record: SessionRecord, phone: &str, now: Timestamp) -> Uuid {
    let id = record.id;
    assert!(matches!(store.create_session(record).await.expect("creates"), CreateOutcome::Created(_)));
    match store.open_session(step(id, now)).await.expect("opens") {
        StepOutcome::Done(s) => assert_eq!(s.state, State::Opened),
        other => panic!("expected Done, got {other:?}"),
    }
    let sent = OtpState::after_send(None, phone.to_owned(), right_code(id), now);
    assert_eq!(store.record_code(step(id, now), sent, 0).await.expect("records"), CodeRecorded::Recorded);
    id
}

/// `with_code`, then the right code: the session as it is after.
async fn authenticated(store: &dyn Store, record: SessionRecord, phone: &str, now: Timestamp) -> SessionRecord {
    let id = with_code(store, record, phone, now).await;
    match store.enter_code(step(id, now), right_code(id), Uuid::now_v7()).await.expect("enters") {
        CodeEntered::Authenticated(s) => s,
        other => panic!("expected Authenticated, got {other:?}"),
    }
}

/// Each event's type and `data` of one session, oldest first, read behind the store's back.
async fn event_rows(sql: &tokio_postgres::Client, session: Uuid) -> Vec<(String, serde_json::Value)> {
    sql.query("SELECT type, data FROM events WHERE session_id = $1 ORDER BY created_on, id", &[&session])
        .await
        .expect("reads events")
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect()
}

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
            &[&new_customer, &super::Ts(at)],
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

    // Another session with the same phone finds that customer; a session naming its customer
    // keeps it whatever phone the code went to.
    let again = session(Uuid::now_v7(), m, spec_with(None, "20"), NOW, Duration::from_secs(900));
    let again = authenticated(&store, again, phone, at).await;
    assert_eq!(again.customer_id, Some(new_customer));
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
    assert_eq!(events[0].1["customerId"], serde_json::json!(new_customer));
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
    assert_eq!(claimed[0].data, crate::store::event_data(&done, State::Completed, at).to_string());
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
    assert_eq!(events[0].1["transactionIntentId"], serde_json::json!(intent.id));
    assert_eq!(events[0].1["customerId"], serde_json::json!(signed_in.customer_id.expect("linked")));
    assert_eq!(events[0].1, crate::store::event_data(&done, State::Completed, at));
    let row = sql
        .query_one(
            "SELECT merchant_id, session_id, customer_id, flow, amount::text, currency, created_on = $2
               FROM transaction_intents WHERE id = $1",
            &[&intent.id, &super::Ts(at)],
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
    assert_eq!(claimed[0].data, crate::store::event_data(&done, State::Completed, at).to_string());

    // Giving up: from Opened (and Authenticated), not from Created.
    match store.finish(step(opened, at), Finish::GiveUp).await.expect("gives up") {
        StepOutcome::Done(s) => assert_eq!((s.state, s.version), (State::Aborted, 3)),
        other => panic!("expected Done, got {other:?}"),
    }
    let events = event_rows(&sql, opened).await;
    assert_eq!(events.iter().map(|e| e.0.as_str()).collect::<Vec<_>>(), ["RedirectSessionAborted"]);
    assert_eq!(events[0].1.get("customerId"), None, "no customer was linked");
    let created = session(Uuid::now_v7(), m, spec_with(None, "1"), NOW, Duration::from_secs(900));
    store.create_session(created.clone()).await.expect("creates");
    assert!(matches!(
        store.finish(step(created.id, at), Finish::GiveUp).await,
        Ok(StepOutcome::NotAllowed(_, State::Created))
    ));
    let intents: i64 = sql.query_one("SELECT count(*) FROM transaction_intents", &[]).await.expect("counts").get(0);
    assert_eq!(intents, 1);
}

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_code_entered_as_the_session_expires_never_both_authenticates_and_expires_it() {
    let db = test_db!();
    let (a, b) = (Arc::new(db.open().await), Arc::new(db.open().await));
    let sql = db.sql().await;
    let m = merchant(&*a, NOW).await;
    let ttl = Duration::from_secs(10);
    let expires_on = NOW.plus(ttl);
    let code_hash = |id: Uuid| {
        let sql = &sql;
        async move {
            let row = sql.query_one("SELECT code_hash FROM one_time_codes WHERE session_id = $1", &[&id]).await;
            row.expect("a code row").get::<_, Option<Vec<u8>>>(0)
        }
    };

    // Entered at the instant it expires: refused as Expired, nothing consumed or linked, even
    // before the sweep wrote the expiry down.
    let record = session(Uuid::now_v7(), m, spec_with(None, "1"), NOW, ttl);
    let id = with_code(&*a, record, "+4915199990004", NOW).await;
    let before = a.get_session(id).await.expect("reads").expect("exists");
    assert!(matches!(
        a.enter_code(step(id, expires_on), right_code(id), Uuid::now_v7()).await,
        Ok(CodeEntered::NotAllowed(_, State::Expired))
    ));
    assert_eq!(a.get_session(id).await.expect("reads"), Some(before));
    assert!(code_hash(id).await.is_some(), "the code was not used");

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
                assert_eq!(code_hash(id).await, None);
                // The sweep's event names the customer the sign-in linked.
                let data = &event_rows(&sql, id).await[0].1;
                assert_eq!(data, &crate::store::event_data(&stored, State::Expired, expires_on));
                assert_eq!(data["customerId"], serde_json::json!(s.customer_id.expect("linked")));
                signed_in += 1;
            }
            // Expired first: nothing of the sign-in happened.
            CodeEntered::NotAllowed(_, State::Expired) => {
                assert_eq!((stored.version, stored.customer_id), (3, None));
                assert!(code_hash(id).await.is_some(), "the code was not used");
                assert_eq!(event_rows(&sql, id).await[0].1.get("customerId"), None);
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

async fn customer_scenario(store: &dyn Store, ids: &[Uuid]) -> Vec<String> {
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

/// `n` cancelled sessions of merchant `m`, one event (and one delivery per subscription) each,
/// queued at `at`.
async fn cancelled_sessions(store: &PostgresStore, m: Uuid, n: usize, at: Timestamp) {
    for _ in 0..n {
        let s = session(Uuid::now_v7(), m, spec_with(None, "3"), at, Duration::from_secs(900));
        store.create_session(s.clone()).await.expect("creates");
        store.cancel_session(cancel(m, s.id, at)).await.expect("cancels");
    }
}

/// The subscription of each of `claimed`.
async fn claimed_subscriptions(
    sql: &tokio_postgres::Client,
    claimed: &[crate::store::webhooks::ClaimedDelivery],
) -> Vec<Uuid> {
    let ids: Vec<Uuid> = claimed.iter().map(|d| d.id).collect();
    let rows = sql
        .query("SELECT subscription_id FROM deliveries WHERE id = ANY($1) ORDER BY next_attempt_on, id", &[&ids])
        .await
        .expect("reads");
    rows.iter().map(|r| r.get(0)).collect()
}

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

fn change(merchant_id: Uuid, id: Uuid, if_match: Option<&str>, now: Timestamp) -> SubscriptionChange {
    SubscriptionChange { merchant_id, id, if_match: if_match.map(str::to_owned), now }
}

/// The outcome of a write that ran without a guard.
fn ran<O>(outcome: Guarded<O>) -> O {
    match outcome {
        Guarded::Ran(outcome, _) => outcome,
        Guarded::Earlier(found) => panic!("a write without a key found a kept record: {found:?}"),
    }
}

/// The record of a change that was done.
fn done(outcome: Result<Guarded<ChangeSubscriptionOutcome>, StoreError>) -> SubscriptionRecord {
    match ran(outcome.expect("answers")) {
        ChangeSubscriptionOutcome::Done(record) => record,
        other => panic!("not done: {other:?}"),
    }
}

fn rotation(secret: &str, grace: Duration) -> SecretRotation {
    SecretRotation { secret: secret.to_owned(), grace }
}

/// An attempt of the claimed `delivery` by `owner` started at `started_on`.
fn attempted(
    delivery: &ClaimedDelivery,
    owner: Uuid,
    started_on: Timestamp,
    status: Option<u16>,
    next: NextStep,
) -> AttemptOutcome {
    AttemptOutcome {
        delivery_id: delivery.id,
        owner,
        attempt: AttemptRecord {
            attempt: delivery.attempts + 1,
            started_on,
            duration_ms: 20,
            status,
            error: status.is_none().then(|| "connection refused".to_owned()),
        },
        next,
    }
}

/// The deliveries of one subscription, newest first.
async fn deliveries_of(store: &PostgresStore, m: Uuid, subscription: Uuid) -> Vec<DeliveryRecord> {
    let filter = DeliveryFilter { subscription_id: Some(subscription), limit: 1000, ..DeliveryFilter::default() };
    store.list_deliveries(m, filter).await.expect("lists")
}

fn in_state(deliveries: &[DeliveryRecord], state: DeliveryState) -> usize {
    deliveries.iter().filter(|d| d.state == state).count()
}

fn state_of(deliveries: &[DeliveryRecord], id: Uuid) -> DeliveryState {
    deliveries.iter().find(|d| d.id == id).expect("listed").state
}

/// The claimed deliveries of `subscription`, oldest event first.
async fn claimed_of(
    sql: &tokio_postgres::Client,
    claimed: &[ClaimedDelivery],
    subscription: Uuid,
) -> Vec<ClaimedDelivery> {
    let subscriptions = claimed_subscriptions(sql, claimed).await;
    let ids: Vec<Uuid> = sql
        .query(
            "SELECT id FROM deliveries WHERE id = ANY($1) ORDER BY next_attempt_on, id",
            &[&claimed.iter().map(|d| d.id).collect::<Vec<_>>()],
        )
        .await
        .expect("reads")
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut of: Vec<ClaimedDelivery> = ids
        .iter()
        .zip(&subscriptions)
        .filter(|(_, s)| **s == subscription)
        .map(|(id, _)| claimed.iter().find(|d| d.id == *id).expect("claimed").clone())
        .collect();
    of.sort_by_key(|d| (d.event_time, d.id));
    of
}

async fn failing_since(sql: &tokio_postgres::Client, subscription: Uuid) -> Option<Timestamp> {
    let row =
        sql.query_one("SELECT failing_since FROM subscriptions WHERE id = $1", &[&subscription]).await.expect("reads");
    super::ts_opt(&row, 0).expect("a time")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_signing_secret_keeps_signing_beside_the_new_one_until_it_expires() {
    let db = test_db!();
    let store = db.open().await;
    let sql = db.sql().await;
    let m = merchant(&store, NOW).await;
    let id = Uuid::now_v7();
    let original = subscription(id, m, &ALL_EVENTS, NOW);
    store.put_subscription(original.clone()).await.expect("subscribes");
    cancelled_sessions(&store, m, 1, NOW).await;
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
    let m = merchant(&store, NOW).await;
    let id = Uuid::now_v7();
    let original = subscription(id, m, &ALL_EVENTS, NOW);
    store.put_subscription(original.clone()).await.expect("subscribes");
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
async fn a_gone_receiver_is_suspended_and_its_deliveries_are_held() {
    let db = test_db!();
    let store = db.open().await;
    let sql = db.sql().await;
    let m = merchant(&store, NOW).await;
    let (gone, healthy) = (Uuid::now_v7(), Uuid::now_v7());
    for id in [gone, healthy] {
        store.put_subscription(subscription(id, m, &ALL_EVENTS, NOW)).await.expect("subscribes");
    }
    cancelled_sessions(&store, m, 3, NOW).await;
    let at = NOW.plus(Duration::from_secs(1));
    let lease = Duration::from_secs(60);
    let owner = Uuid::now_v7();
    let claimed = store.claim_deliveries(owner, at, at.plus(lease), 100, 100).await.expect("claims");
    assert_eq!(claimed.len(), 6);
    let (to_gone, to_healthy) = (claimed_of(&sql, &claimed, gone).await, claimed_of(&sql, &claimed, healthy).await);
    assert_eq!((to_gone.len(), to_healthy.len()), (3, 3));

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
    let m = merchant(&store, NOW).await;
    let id = Uuid::now_v7();
    let original = subscription(id, m, &ALL_EVENTS, NOW);
    store.put_subscription(original.clone()).await.expect("subscribes");
    cancelled_sessions(&store, m, 2, NOW).await;
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
            &[&claimed[1].id, &super::Ts(second(20))],
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
    let m = merchant(&store, NOW).await;
    let (gone, healthy) = (Uuid::now_v7(), Uuid::now_v7());
    for id in [gone, healthy] {
        store.put_subscription(subscription(id, m, &ALL_EVENTS, NOW)).await.expect("subscribes");
    }
    cancelled_sessions(&store, m, 2, NOW).await;
    let owner = Uuid::now_v7();
    let hour = Duration::from_secs(3600);
    let claimed = store.claim_deliveries(owner, NOW, NOW.plus(hour), 100, 100).await.expect("claims");
    let (to_gone, to_healthy) = (claimed_of(&sql, &claimed, gone).await, claimed_of(&sql, &claimed, healthy).await);
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
