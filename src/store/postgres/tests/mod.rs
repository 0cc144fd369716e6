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

use super::{listen, PoolSettings, PostgresStore, Ts};
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
    CancelOutcome, CancelRequest, CreateOutcome, Found, Guard, Guarded, IdempotencyKey, Inspect, Merchant,
    SessionFilter, SessionRecord, Store, StoreError, StoredResponse,
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

// After `test_db!`, which they use.
mod claims;
mod connections;
mod customer;
mod customer_races;
mod instances;
mod parity;
mod subscriptions;
mod suspension;
mod wakeups;

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

/// Each event's type and `data` (the text stored) of one session, oldest first, read behind the
/// store's back.
async fn event_rows(sql: &tokio_postgres::Client, session: Uuid) -> Vec<(String, String)> {
    sql.query("SELECT type, data FROM events WHERE session_id = $1 ORDER BY created_on, id", &[&session])
        .await
        .expect("reads events")
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect()
}

/// `text` parsed as JSON.
fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).expect("JSON")
}

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

/// Waits up to `within` for a wake-up.
async fn woken(notify: &Notify, within: Duration) -> bool {
    tokio::time::timeout(within, notify.notified()).await.is_ok()
}

/// Whether a wake-up is pending right now (taking it), without waiting for one.
fn wake_pending(notify: &Notify) -> bool {
    futures_util::FutureExt::now_or_never(notify.notified()).is_some()
}

/// Two subscriptions to every event of a merchant, one to a receiver that will be gone, one to
/// a healthy receiver, each with a delivery of `sessions` cancelled sessions claimed by
/// `owner` at `at` until `until`.
struct TwoReceivers {
    m: Uuid,
    gone: Uuid,
    healthy: Uuid,
    to_gone: Vec<ClaimedDelivery>,
    to_healthy: Vec<ClaimedDelivery>,
}

async fn two_receivers(
    db: &TestDb,
    store: &PostgresStore,
    sessions: usize,
    owner: Uuid,
    at: Timestamp,
    until: Timestamp,
) -> TwoReceivers {
    let sql = db.sql().await;
    let m = merchant(store, NOW).await;
    let (gone, healthy) = (Uuid::now_v7(), Uuid::now_v7());
    for id in [gone, healthy] {
        store.put_subscription(subscription(id, m, &ALL_EVENTS, NOW)).await.expect("subscribes");
    }
    cancelled_sessions(store, m, sessions, NOW).await;
    let claimed = store.claim_deliveries(owner, at, until, 100, 100).await.expect("claims");
    assert_eq!(claimed.len(), 2 * sessions);
    let (to_gone, to_healthy) = (claimed_of(&sql, &claimed, gone).await, claimed_of(&sql, &claimed, healthy).await);
    assert_eq!((to_gone.len(), to_healthy.len()), (sessions, sessions));
    TwoReceivers { m, gone, healthy, to_gone, to_healthy }
}

/// A merchant with one subscription to every event (answered as put) and `sessions` cancelled
/// sessions at `NOW`, one delivery each.
async fn subscribed(store: &PostgresStore, sessions: usize) -> (Uuid, SubscriptionRecord) {
    let m = merchant(store, NOW).await;
    let original = subscription(Uuid::now_v7(), m, &ALL_EVENTS, NOW);
    store.put_subscription(original.clone()).await.expect("subscribes");
    cancelled_sessions(store, m, sessions, NOW).await;
    (m, original)
}
