//! `redirect-sessions migrate-data` (the real binary): a SQLite deployment made through the real
//! API — a merchant, a customer, sessions of all three types (one cancelled, one expired), an
//! idempotent request, two subscriptions, a delivered and a pending delivery — and through the
//! store's customer steps (as the hosted page takes them: a sign-in that links the known
//! customer and finishes with a transaction intent, a registration of a new customer with
//! names, a code sent and not entered yet) moves into a fresh PostgreSQL database, and a server
//! on PostgreSQL then answers exactly as the SQLite one did: the same bodies and ETags, the same
//! hosted-page views, the same idempotent replay, the same JWKS, the same subscriptions and
//! deliveries, and the pending delivery gets delivered; the code sent on SQLite is accepted on
//! PostgreSQL. A second move into the now non-empty database is refused and changes nothing;
//! bad arguments exit 2.
//!
//! Needs `REDIRECT_SESSIONS_TEST_POSTGRES` (an admin URL such as
//! `postgres://postgres@127.0.0.1:5432/postgres`); without it the test says it was skipped. The
//! in-process servers are this file's own (the shared harness picks its backend from the
//! environment; this test needs SQLite first and PostgreSQL after).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::common::binary::{command, Finished};
use crate::common::{session_path, TestDatabase, TestServer, BASE};
use crate::webhook_support::{Receiver, Reply};
use redirect_sessions::admin;
use redirect_sessions::config::Config;
use redirect_sessions::domain::intent::{Flow, Intent};
use redirect_sessions::domain::otp::{hash_code, CodeCheck, OtpState};
use redirect_sessions::domain::session::State;
use redirect_sessions::domain::time::Timestamp;
use redirect_sessions::secrets::SecretKey;
use redirect_sessions::store::customer::{CodeEntered, CodeRecorded, Finish, Step, StepOutcome};
use reqwest::Method;
use serde_json::{json, Value};
use uuid::Uuid;

const ENV: &str = "REDIRECT_SESSIONS_TEST_POSTGRES";
/// The same public URL for every server, so that `redirectUrl` and error links match.
const PUBLIC_URL: &str = "https://pay.example.com";
const SUBSCRIPTIONS: &str = "/customer-authentication-service/v1/redirect-session-events/subscriptions";
const DELIVERIES: &str = "/customer-authentication-service/v1/redirect-session-events/deliveries";
/// How long anything awaited may take before the test fails.
const DEADLINE: Duration = Duration::from_secs(30);
/// The tables migrate-data copies, in its order.
const TABLES: [&str; 11] = [
    "merchants",
    "customers",
    "sessions",
    "one_time_codes",
    "transaction_intents",
    "events",
    "idempotency",
    "signing_keys",
    "subscriptions",
    "deliveries",
    "delivery_attempts",
];

// ---------------------------------------------------------------------------------------------
// Harness: the shared in-process server, receiver and database, and what this test reads

/// A server over `database`, with the settings every server of the moved deployment shares
/// changed by `adjust`; the caller keeps the database.
async fn start(database: &TestDatabase, adjust: impl FnOnce(&mut Config)) -> TestServer {
    let mut config = Config::defaults();
    config.database_url = database.database_url();
    config.public_url = PUBLIC_URL.parse().unwrap();
    config.rate_limit_per_key = 0;
    config.rate_limit_per_ip = 0;
    config.allow_private_callbacks = true;
    // The same key on both sides: migrate-data copies the encrypted secrets as they are.
    config.secrets_key = Some(SecretKey::parse(crate::common::binary::SECRETS_KEY).unwrap());
    adjust(&mut config);
    TestServer::start_exactly(config).await
}

/// What this test asks a server, as the merchant with the key `key`.
trait Deployment {
    /// `GET path`: status, ETag and the exact body.
    async fn read(&self, path: &str, key: &str) -> Read;
    async fn json(&self, method: Method, path: &str, key: &str, body: Option<&Value>) -> (u16, Value);
    async fn deliveries(&self, key: &str) -> Vec<Value>;
}

impl Deployment for TestServer {
    async fn read(&self, path: &str, key: &str) -> Read {
        let response = self.request_as(Method::GET, path, key).send().await.unwrap();
        let status = response.status().as_u16();
        let etag = response.headers().get("etag").map(|v| v.to_str().unwrap().to_owned());
        Read { status, etag, body: String::from_utf8(response.bytes().await.unwrap().to_vec()).unwrap() }
    }

    async fn json(&self, method: Method, path: &str, key: &str, body: Option<&Value>) -> (u16, Value) {
        let mut request = self.request_as(method, path, key);
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}")))
    }

    async fn deliveries(&self, key: &str) -> Vec<Value> {
        let (status, body) = self.json(Method::GET, &format!("{DELIVERIES}?limit=100"), key, None).await;
        assert_eq!(status, 200, "{body}");
        body["items"].as_array().unwrap().clone()
    }
}

/// What a GET answered.
#[derive(Debug, PartialEq, Eq)]
struct Read {
    status: u16,
    etag: Option<String>,
    body: String,
}

/// Rows per table and a digest of every row of `database`, to show that nothing changed.
async fn fingerprint(database: &TestDatabase) -> Vec<(String, i64, String)> {
    let client = database.sql().await;
    let mut out = Vec::new();
    for table in TABLES {
        let row = client
            .query_one(
                &format!(
                    "SELECT count(*), coalesce(md5(string_agg(t::text, '|' ORDER BY t::text)), '') FROM {table} t"
                ),
                &[],
            )
            .await
            .unwrap();
        out.push((table.to_owned(), row.get(0), row.get(1)));
    }
    out
}

async fn run(args: &[&str]) -> Finished {
    let mut command = command(args);
    let output = tokio::task::spawn_blocking(move || command.output().expect("the binary runs")).await.unwrap();
    Finished {
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// Polls `check` until it answers `Some`, failing after the deadline.
async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Request bodies

fn redirect_data() -> Value {
    json!({
        "successUrl": "https://merchant.example/success",
        "failureUrl": "https://merchant.example/failure",
        "abortUrl": "https://merchant.example/abort",
        "qrCodeSuccessUrl": "https://merchant.example/qr"
    })
}

fn new_transaction_intent(amount: Value) -> Value {
    json!({
        "type": "NewTransactionIntent",
        "transactionData": {"type": "PassthroughWithdrawal", "amount": amount, "currency": "EUR",
                            "externalReference": "order-4711"},
        "redirectData": redirect_data(),
        "locale": "en-GB"
    })
}

fn subscription(callback_url: &str, event_types: &[&str]) -> Value {
    json!({"callbackUrl": callback_url, "apiKey": "callback-key", "eventTypes": event_types})
}

/// Everything a merchant can read, captured to compare servers.
#[derive(Debug, PartialEq, Eq)]
struct Snapshot {
    sessions: Vec<Read>,
    session_list: Read,
    subscriptions: Vec<Read>,
    subscription_list: Read,
    deliveries: Read,
    jwks: Read,
    replay: (u16, Option<String>, Vec<u8>),
    /// What the hosted page reads for each session (customer, intent, sign-in state).
    hosted: Vec<String>,
}

async fn snapshot(
    server: &TestServer,
    key: &str,
    sessions: &[Uuid],
    subscriptions: &[Uuid],
    replay: &Replay,
) -> Snapshot {
    let mut reads = Vec::new();
    for id in sessions {
        reads.push(server.read(&session_path(*id), key).await);
    }
    let mut subscription_reads = Vec::new();
    for id in subscriptions {
        subscription_reads.push(server.read(&format!("{SUBSCRIPTIONS}/{id}"), key).await);
    }
    let replayed = replay.send(server, key).await;
    let replayed = (
        replayed.status().as_u16(),
        replayed.headers().get("idempotent-replayed").map(|v| v.to_str().unwrap().to_owned()),
        replayed.bytes().await.unwrap().to_vec(),
    );
    Snapshot {
        sessions: reads,
        session_list: server.read(&format!("{BASE}/redirect-sessions?limit=100"), key).await,
        subscriptions: subscription_reads,
        subscription_list: server.read(&format!("{SUBSCRIPTIONS}?limit=100"), key).await,
        deliveries: server.read(&format!("{DELIVERIES}?limit=100"), key).await,
        jwks: server.read("/.well-known/jwks.json", key).await,
        replay: replayed,
        hosted: hosted_views(server, sessions).await,
    }
}

async fn hosted_views(server: &TestServer, sessions: &[Uuid]) -> Vec<String> {
    let mut views = Vec::new();
    for id in sessions {
        let view = server.state.store.hosted_view(*id).await.expect("the hosted view reads");
        views.push(format!("{view:?}"));
    }
    views
}

/// The key the one-time codes of this test are hashed under, and the code sent.
const CODE_KEY: [u8; 32] = [9; 32];
const CODE: &str = "123456";

fn customer_step(session_id: Uuid) -> Step {
    Step { session_id, correlation_id: Uuid::new_v4(), now: Timestamp::now() }
}

/// Opens the session and records a code sent to `phone`, as the hosted page does.
async fn send_code(server: &TestServer, id: Uuid, phone: &str) {
    let store = &server.state.store;
    let opened = store.open_session(customer_step(id)).await.unwrap();
    assert!(matches!(&opened, StepOutcome::Done(s) if s.state == State::Opened), "{opened:?}");
    let sent = OtpState::after_send(None, phone.to_owned(), hash_code(&CODE_KEY, id, CODE), Timestamp::now());
    assert_eq!(store.record_code(customer_step(id), sent, 0).await.unwrap(), CodeRecorded::Recorded);
}

/// The rows of the columns and tables of the customer flow, as comparable text: ids as hex,
/// times as Unix milliseconds, amounts in cents. `(SQLite query, PostgreSQL query)`.
const CUSTOMER_FLOW_ROWS: [(&str, &str, &str); 4] = [
    (
        "sessions",
        "SELECT lower(hex(id)) || '|' || CASE WHEN customer_id IS NULL THEN '-' ELSE lower(hex(customer_id)) END || '|'
                || CASE WHEN transaction_intent_id IS NULL THEN '-' ELSE lower(hex(transaction_intent_id)) END
           FROM sessions",
        "SELECT replace(id::text, '-', '') || '|' || coalesce(replace(customer_id::text, '-', ''), '-') || '|'
                || coalesce(replace(transaction_intent_id::text, '-', ''), '-')
           FROM sessions",
    ),
    (
        "customers",
        "SELECT lower(hex(id)) || '|' || phone || '|' || created_on || '|' || coalesce(first_name, '-') || '|'
                || coalesce(last_name, '-')
           FROM customers",
        "SELECT replace(id::text, '-', '') || '|' || phone || '|' || (extract(epoch FROM created_on) * 1000)::bigint
                || '|' || coalesce(first_name, '-') || '|' || coalesce(last_name, '-')
           FROM customers",
    ),
    (
        "one_time_codes",
        "SELECT lower(hex(session_id)) || '|' || phone || '|' || CASE WHEN code_hash IS NULL THEN '-' ELSE lower(hex(code_hash)) END || '|'
                || code_expires_on || '|' || wrong_attempts || '|' || codes_sent || '|' || last_sent_on
           FROM one_time_codes",
        "SELECT replace(session_id::text, '-', '') || '|' || phone || '|' || coalesce(encode(code_hash, 'hex'), '-')
                || '|' || (extract(epoch FROM code_expires_on) * 1000)::bigint || '|' || wrong_attempts || '|'
                || codes_sent || '|' || (extract(epoch FROM last_sent_on) * 1000)::bigint
           FROM one_time_codes",
    ),
    (
        "transaction_intents",
        "SELECT lower(hex(id)) || '|' || lower(hex(merchant_id)) || '|' || lower(hex(session_id)) || '|'
                || lower(hex(customer_id)) || '|' || flow || '|' || amount_cents || '|' || currency || '|' || created_on
           FROM transaction_intents",
        "SELECT replace(id::text, '-', '') || '|' || replace(merchant_id::text, '-', '') || '|'
                || replace(session_id::text, '-', '') || '|' || replace(customer_id::text, '-', '') || '|' || flow
                || '|' || (amount * 100)::bigint || '|' || currency || '|'
                || (extract(epoch FROM created_on) * 1000)::bigint
           FROM transaction_intents",
    ),
];

/// `id` as the queries of `CUSTOMER_FLOW_ROWS` write it.
fn hex(id: Uuid) -> String {
    id.simple().to_string()
}

fn hex_bytes(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn merchant_id(merchant: &Value) -> Uuid {
    merchant["merchantId"].as_str().expect("the merchant's id").parse().unwrap()
}

/// The idempotent request: a PUT with `x-request-id`, sent again to see it replayed.
struct Replay {
    session: Uuid,
    request_id: Uuid,
    body: Vec<u8>,
}

impl Replay {
    /// The idempotent create, sent (again) to `server`.
    async fn send(&self, server: &TestServer, key: &str) -> reqwest::Response {
        server
            .request_as(Method::PUT, &session_path(self.session), key)
            .header("x-request-id", self.request_id.to_string())
            .header("content-type", "application/json")
            .body(self.body.clone())
            .send()
            .await
            .unwrap()
    }
}

// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sqlite_deployment_moves_to_postgres_and_answers_identically() {
    let Ok(_) = std::env::var(ENV) else {
        // Straight to the stream: libtest hides `println!` output of passing tests.
        let _ = writeln!(std::io::stderr(), "skipped: {ENV} not set");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let sqlite_path = dir.path().join("deployment.db");
    let sqlite = TestDatabase::sqlite_at(&sqlite_path);
    let receivers = Receivers { delivered_to: Receiver::answering(200).await, failing: Receiver::answering(500).await };
    let shop = expire_one_on_sqlite(&sqlite, &receivers).await;
    let made = make_the_rest_on_sqlite(&sqlite, &receivers, shop).await;
    let target = TestDatabase::fresh_postgres().expect("a PostgreSQL server");
    let from = format!("sqlite://{}", sqlite_path.display());
    move_it(&sqlite_path, &from, &target, &made).await;
    answer_the_same_on_postgres(&target, &made).await;
    go_on_working_on_postgres(&target, &receivers, &made).await;
    refuse_moving_again(&target, &from, dir.path()).await;
}

/// The two receivers of the deployment's subscriptions.
struct Receivers {
    delivered_to: Receiver,
    failing: Receiver,
}

/// The deployment after stage 1: its merchant (and key), customer, subscriptions, and the
/// session that expired.
struct Shop {
    merchant: Value,
    key: String,
    customer: Uuid,
    sub_ok: Uuid,
    sub_failing: Uuid,
    expired: Uuid,
}

/// The deployment after stage 2, with what it answered on SQLite (`before`).
struct Made {
    shop: Shop,
    cancelled: Uuid,
    existing: Uuid,
    new_customer: Uuid,
    by_direction: Uuid,
    finished: Uuid,
    registered: Uuid,
    signing_in: Uuid,
    registered_customer: Uuid,
    intent: Intent,
    replay: Replay,
    sessions: [Uuid; 8],
    before: Snapshot,
    pending_id: String,
    pending_event: String,
}

/// On SQLite, with sessions living one second: one session expires and its event is
/// delivered.
async fn expire_one_on_sqlite(sqlite: &TestDatabase, receivers: &Receivers) -> Shop {
    let Receivers { delivered_to, failing } = receivers;
    let first = start(sqlite, |c| c.session_ttl = Duration::from_secs(1)).await;
    let merchant = admin::create_merchant(&first.state.store, "Moving Shop").await.unwrap();
    let key = merchant["apiKey"].as_str().unwrap().to_owned();
    let customer = admin::create_customer(&first.state.store, "+4915112345678").await.unwrap();
    let customer: Uuid = customer["customerId"].as_str().unwrap().parse().unwrap();
    let all_events =
        ["RedirectSessionCancelled", "RedirectSessionExpired", "RedirectSessionCompleted", "RedirectSessionAborted"];
    let (sub_ok, sub_failing) = (Uuid::new_v4(), Uuid::new_v4());
    let body = subscription(&delivered_to.url(), &all_events);
    let (status, created) = first.json(Method::PUT, &format!("{SUBSCRIPTIONS}/{sub_ok}"), &key, Some(&body)).await;
    assert_eq!(status, 201, "{created}");
    let body = subscription(&failing.url(), &["RedirectSessionCancelled"]);
    let (status, created) = first.json(Method::PUT, &format!("{SUBSCRIPTIONS}/{sub_failing}"), &key, Some(&body)).await;
    assert_eq!(status, 201, "{created}");

    let expired = Uuid::new_v4();
    let (status, body) =
        first.json(Method::PUT, &session_path(expired), &key, Some(&new_transaction_intent(json!(100.5)))).await;
    assert_eq!(status, 201, "{body}");
    // Until the sweep has recorded the expiry (ETag without `-expired`) and its event is
    // delivered, the moved copy could differ only because of timing.
    eventually("the expiry recorded", || async {
        let read = first.read(&session_path(expired), &key).await;
        let body: Value = serde_json::from_str(&read.body).unwrap();
        (body["state"] == "Expired" && !read.etag.as_deref().unwrap_or("-expired").contains("expired")).then_some(())
    })
    .await;
    eventually("the expiry delivered", || async {
        let deliveries = first.deliveries(&key).await;
        (deliveries.len() == 1 && deliveries[0]["state"] == "Delivered").then_some(())
    })
    .await;
    first.stop().await;
    Shop { merchant, key, customer, sub_ok, sub_failing, expired }
}

/// On SQLite again, sessions living 15 minutes, retries after 6 s: the other session
/// types, an idempotent create, a cancel delivered to one receiver and failing at the other.
async fn make_the_rest_on_sqlite(sqlite: &TestDatabase, receivers: &Receivers, shop: Shop) -> Made {
    let failing = &receivers.failing;
    let (key, customer, expired) = (shop.key.clone(), shop.customer, shop.expired);
    let (sub_ok, sub_failing) = (shop.sub_ok, shop.sub_failing);
    let second = start(sqlite, |c| c.webhook_retry_schedule = vec![Duration::from_secs(6)]).await;
    let (cancelled, existing, new_customer, by_direction) =
        (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    let mut with_customer = new_transaction_intent(json!(100.50));
    with_customer["customerId"] = json!(customer);
    let replay =
        Replay { session: cancelled, request_id: Uuid::new_v4(), body: serde_json::to_vec(&with_customer).unwrap() };
    let response = replay.send(&second, &key).await;
    assert_eq!(response.status(), 201);
    let first_answer = response.bytes().await.unwrap().to_vec();
    let bodies = [
        (
            existing,
            json!({"type": "ExistingTransactionIntent", "transactionIntentId": Uuid::new_v4(),
                   "customerId": customer, "redirectData": redirect_data(), "locale": "de"}),
        ),
        (
            new_customer,
            json!({"type": "NewCustomer", "redirectData": redirect_data(), "locale": "fr",
                   "customerData": {"firstName": "Erika", "lastName": "Mustermann", "email": "erika@example.com",
                                    "phoneNumber": "+4915112345678", "dateOfBirth": "1980-02-29"}}),
        ),
        (
            by_direction,
            json!({"type": "NewTransactionIntent",
                   "transactionData": {"direction": "MerchantToCustomer", "amount": 0.01, "currency": "EUR"},
                   "redirectData": redirect_data()}),
        ),
    ];
    for (id, body) in &bodies {
        let (status, answer) = second.json(Method::PUT, &session_path(*id), &key, Some(body)).await;
        assert_eq!(status, 201, "{answer}");
    }
    let (finished, registered, signing_in, registered_customer, intent) =
        customers_step_in(&second, &key, customer).await;
    cancel_delivered_once_and_failed_once(&second, &key, cancelled, (sub_ok, sub_failing)).await;
    let sessions = [expired, cancelled, existing, new_customer, by_direction, finished, registered, signing_in];
    let subscriptions = [sub_ok, sub_failing];
    let before = snapshot(&second, &key, &sessions, &subscriptions, &replay).await;
    second.stop().await;
    assert_eq!(before.replay, (201, Some("true".to_owned()), first_answer), "replayed on SQLite");
    assert!(before.sessions.iter().all(|r| r.status == 200 && r.etag.is_some()), "{before:?}");
    let pending: Vec<Value> = serde_json::from_str::<Value>(&before.deliveries.body).unwrap()["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["state"] == "Pending")
        .cloned()
        .collect();
    assert_eq!(pending.len(), 1, "{}", before.deliveries.body);
    let pending_id = pending[0]["id"].as_str().unwrap().to_owned();
    let pending_event = pending[0]["eventId"].as_str().unwrap().to_owned();
    assert_eq!(failing.ids(), vec![pending_event.clone()], "the failing receiver saw the event once");
    Made {
        shop,
        cancelled,
        existing,
        new_customer,
        by_direction,
        finished,
        registered,
        signing_in,
        registered_customer,
        intent,
        replay,
        sessions,
        before,
        pending_id,
        pending_event,
    }
}

/// The customer's side, through the store as the hosted page drives it: a sign-in with the
/// known customer's phone that finishes with a new intent, a registration of a new customer
/// (with names), and a code sent, entered wrongly once, and not yet entered rightly.
/// Answers the three sessions, the registered customer and the intent made.
async fn customers_step_in(second: &TestServer, key: &str, customer: Uuid) -> (Uuid, Uuid, Uuid, Uuid, Intent) {
    let (finished, registered, signing_in) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    let registration = json!({"type": "NewCustomer", "redirectData": redirect_data(), "locale": "de",
                               "customerData": {"firstName": "Max", "lastName": "Muster"}});
    for (id, body) in [
        (finished, new_transaction_intent(json!(100.5))),
        (registered, registration),
        (signing_in, new_transaction_intent(json!(3))),
    ] {
        let (status, answer) = second.json(Method::PUT, &session_path(id), key, Some(&body)).await;
        assert_eq!(status, 201, "{answer}");
    }
    let (registered_customer, intent) = (Uuid::new_v4(), Intent { id: Uuid::new_v4(), flow: Flow::PayOut });
    let store = &second.state.store;
    send_code(second, finished, "+4915112345678").await;
    match store.enter_code(customer_step(finished), hash_code(&CODE_KEY, finished, CODE), Uuid::new_v4()).await {
        Ok(CodeEntered::Authenticated(s)) => assert_eq!(s.customer_id, Some(customer), "the phone's customer"),
        other => panic!("{other:?}"),
    }
    match store.finish(customer_step(finished), Finish::CreateIntent(intent.clone())).await {
        Ok(StepOutcome::Done(s)) => {
            assert_eq!((s.state, s.transaction_intent_id), (State::Completed, Some(intent.id)))
        }
        other => panic!("{other:?}"),
    }
    send_code(second, registered, "+4917612345678").await;
    match store.enter_code(customer_step(registered), hash_code(&CODE_KEY, registered, CODE), registered_customer).await
    {
        Ok(CodeEntered::Authenticated(s)) => {
            assert_eq!((s.state, s.customer_id), (State::Completed, Some(registered_customer)))
        }
        other => panic!("{other:?}"),
    }
    send_code(second, signing_in, "+4915112345678").await;
    match store.enter_code(customer_step(signing_in), hash_code(&CODE_KEY, signing_in, "000000"), Uuid::new_v4()).await
    {
        Ok(CodeEntered::Refused(CodeCheck::Wrong { tries_left: 4 })) => {}
        other => panic!("{other:?}"),
    }
    (finished, registered, signing_in, registered_customer, intent)
}

/// Cancels `cancelled`: its event is delivered to the first subscription and fails once at the
/// second (pending a retry in about 6 s).
async fn cancel_delivered_once_and_failed_once(
    second: &TestServer,
    key: &str,
    cancelled: Uuid,
    subscriptions: (Uuid, Uuid),
) {
    let (sub_ok, sub_failing) = subscriptions;
    let (status, answer) = second.json(Method::POST, &format!("{}/cancel", session_path(cancelled)), key, None).await;
    assert_eq!((status, &answer["state"]), (200, &json!("Cancelled")), "{answer}");
    eventually("the cancel delivered and failed once", || async {
        let deliveries = second.deliveries(key).await;
        let of = |sub: Uuid| {
            deliveries
                .iter()
                .find(|d| d["subscriptionId"] == json!(sub) && d["eventType"] == "RedirectSessionCancelled")
                .cloned()
        };
        // The expiry, the two completions and the cancel, all delivered to the first receiver.
        let delivered_ok =
            deliveries.iter().filter(|d| d["subscriptionId"] == json!(sub_ok) && d["state"] == "Delivered").count();
        match (of(sub_ok), of(sub_failing)) {
            (Some(ok), Some(bad))
                if ok["state"] == "Delivered"
                    && bad["attempts"].as_array().map(Vec::len) == Some(1)
                    && delivered_ok == 4 =>
            {
                Some(())
            }
            _ => None,
        }
    })
    .await;
}

/// `migrate-data` moves the deployment into `target`: every row of every table, the customer
/// flow value for value, amounts and currencies beside the spec, no leases, the secrets as they
/// were sealed.
async fn move_it(sqlite_path: &Path, from: &str, target: &TestDatabase, made: &Made) {
    let Made { cancelled, finished, registered, signing_in, .. } = *made;
    let (customer, registered_customer) = (made.shop.customer, made.registered_customer);
    let (merchant, intent) = (&made.shop.merchant, &made.intent);
    let started = Instant::now();
    // The global --database-url is not for migrate-data: even an unusable one is ignored.
    let moved = run(&["migrate-data", "--from", from, "--to", target.url(), "--database-url", "mysql://ignored"]).await;
    assert_eq!(moved.code, Some(0), "{moved:?}");
    let _ = writeln!(std::io::stderr(), "migrate-data took {:?}", started.elapsed());
    let lines: Vec<&str> = moved.stdout.lines().collect();
    assert_eq!(lines.len(), 1, "one JSON line on stdout: {moved:?}");
    let summary: Value = serde_json::from_str(lines[0]).unwrap();
    assert_eq!(
        summary,
        json!({"merchants": 1, "customers": 2, "sessions": 8, "one_time_codes": 3, "transaction_intents": 1,
               "events": 4, "idempotency": 1, "signing_keys": 1, "subscriptions": 2, "deliveries": 5,
               "delivery_attempts": 5}),
        "{moved:?}"
    );
    let source = rusqlite::Connection::open(sqlite_path).unwrap();
    for table in TABLES {
        let rows: i64 = source.query_row(&format!("SELECT count(*) FROM {table}"), [], |r| r.get(0)).unwrap();
        assert_eq!(summary[table], json!(rows), "{table}: every row of the source");
    }
    // The customer flow's columns and tables, value for value.
    let sql = target.sql().await;
    let mut moved_rows = Vec::new();
    for (table, from_sqlite, from_postgres) in CUSTOMER_FLOW_ROWS {
        let mut was: Vec<String> = source
            .prepare(from_sqlite)
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        let mut is: Vec<String> = sql.query(from_postgres, &[]).await.unwrap().iter().map(|r| r.get(0)).collect();
        was.sort();
        is.sort();
        assert_eq!(was, is, "{table}: the same values");
        moved_rows.extend(is);
    }
    drop(source);
    for expected in [
        format!("{}|{}|{}", hex(finished), hex(customer), hex(intent.id)),
        format!("{}|{}|-", hex(registered), hex(registered_customer)),
        format!("{}|-|-", hex(signing_in)),
        format!("{}|{}|-", hex(cancelled), hex(customer)),
        format!("{}|+4917612345678|", hex(registered_customer)),
        "|Max|Muster".to_owned(),
        format!(
            "{}|{}|{}|{}|PayOut|10050|EUR|",
            hex(intent.id),
            hex(merchant_id(merchant)),
            hex(finished),
            hex(customer)
        ),
        format!("{}|+4915112345678|{}|", hex(signing_in), hex_bytes(&hash_code(&CODE_KEY, signing_in, CODE))),
        format!("{}|+4915112345678|-|", hex(finished)),
    ] {
        assert!(moved_rows.iter().any(|row| row.contains(&expected)), "{expected} in {moved_rows:#?}");
    }
    for table in TABLES {
        assert!(moved.stderr.contains(&format!("{table}: ")), "a progress line for {table}: {}", moved.stderr);
    }

    amounts_leases_and_secrets_as_moved(&sql, sqlite_path, made).await;
    drop(sql);
}

/// What only PostgreSQL has: the numeric amount beside the spec, and no leases; and the
/// secrets, moved encrypted exactly as they were (the same key opens them on both sides).
async fn amounts_leases_and_secrets_as_moved(sql: &tokio_postgres::Client, sqlite_path: &Path, made: &Made) {
    let Made { cancelled, existing, new_customer, by_direction, .. } = *made;
    let expired = made.shop.expired;
    let amounts: Vec<(String, Option<String>, Option<String>)> = sql
        .query("SELECT id::text, amount::text, currency FROM sessions", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let amount_of = |id: Uuid| {
        let row = amounts.iter().find(|(i, ..)| *i == id.to_string()).unwrap();
        (row.1.as_deref(), row.2.as_deref())
    };
    assert_eq!(amount_of(expired), (Some("100.50"), Some("EUR")));
    assert_eq!(amount_of(cancelled), (Some("100.50"), Some("EUR")));
    assert_eq!(amount_of(by_direction), (Some("0.01"), Some("EUR")));
    assert_eq!(amount_of(existing), (None, None));
    assert_eq!(amount_of(new_customer), (None, None));
    let leased: i64 = sql
        .query_one("SELECT count(*) FROM deliveries WHERE lease_owner IS NOT NULL OR lease_until IS NOT NULL", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(leased, 0, "leases are cleared");
    let sealed_on_sqlite: Vec<(String, String, String)> = {
        let source = rusqlite::Connection::open(sqlite_path).unwrap();
        let mut statement =
            source.prepare("SELECT lower(hex(id)), api_key, signing_secret FROM subscriptions ORDER BY 1").unwrap();
        let rows = statement.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?))).unwrap();
        rows.collect::<Result<_, _>>().unwrap()
    };
    let sealed_on_postgres: Vec<(String, String, String)> = sql
        .query("SELECT replace(id::text, '-', ''), api_key, signing_secret FROM subscriptions ORDER BY 1", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(sealed_on_sqlite.len(), 2);
    assert!(sealed_on_sqlite.iter().all(|(_, key, secret)| key.starts_with("v1:") && secret.starts_with("v1:")));
    assert_eq!(sealed_on_sqlite, sealed_on_postgres, "ciphertexts are copied as they are");
}

/// On PostgreSQL (dispatcher off, so nothing moves while comparing): the same answers.
async fn answer_the_same_on_postgres(target: &TestDatabase, made: &Made) {
    let (sessions, replay, before) = (&made.sessions, &made.replay, &made.before);
    let key = &made.shop.key;
    let subscriptions = [made.shop.sub_ok, made.shop.sub_failing];
    let third = start(target, |c| {
        c.webhook_dispatcher = false;
        c.expiry_sweep = false;
    })
    .await;
    let after = snapshot(&third, key, sessions, &subscriptions, replay).await;
    third.stop().await;
    for (index, (was, is)) in before.sessions.iter().zip(&after.sessions).enumerate() {
        assert_eq!(was, is, "session {} reads the same (body and ETag)", sessions[index]);
    }
    assert_eq!(before.replay, after.replay, "the idempotent replay is byte-identical");
    assert_eq!(before.jwks, after.jwks, "the same signing keys");
    assert_eq!(before.subscriptions, after.subscriptions, "the subscriptions read the same");
    assert_eq!(before.subscription_list, after.subscription_list, "the subscriptions list the same");
    assert_eq!(before.deliveries, after.deliveries, "the deliveries list the same");
    assert_eq!(before.session_list, after.session_list, "the sessions list the same");
    assert_eq!(before.hosted, after.hosted, "the hosted page reads the same");
    assert_eq!(*before, after);
}

/// With the dispatcher on and the receiver fixed, the pending delivery is delivered
/// (the same event), and nothing already delivered is sent again.
async fn go_on_working_on_postgres(target: &TestDatabase, receivers: &Receivers, made: &Made) {
    let Receivers { delivered_to, failing } = receivers;
    let (key, customer, signing_in) = (&made.shop.key, made.shop.customer, made.signing_in);
    let (pending_id, pending_event) = (&made.pending_id, &made.pending_event);
    failing.answer_from_now_on(Reply::Status(200));
    let delivered_before = delivered_to.ids();
    let fourth = start(target, |c| c.webhook_retry_schedule = vec![Duration::from_secs(6)]).await;
    let delivery = eventually("the pending delivery delivered on PostgreSQL", || async {
        let deliveries = fourth.deliveries(key).await;
        deliveries.into_iter().find(|d| d["id"] == json!(pending_id) && d["state"] == "Delivered")
    })
    .await;
    let statuses: Vec<Value> =
        delivery["attempts"].as_array().unwrap().iter().map(|a| a["statusCode"].clone()).collect();
    assert_eq!(statuses, [json!(500), json!(200)], "{delivery}");
    assert_eq!(delivery["eventId"], json!(pending_event), "{delivery}");
    assert_eq!(failing.ids(), [pending_event.clone(), pending_event.clone()], "the same event, attempted again");
    let bodies: Vec<_> = failing.received().into_iter().map(|request| request.body).collect();
    assert_eq!(bodies[0], bodies[1], "the same webhook body from SQLite and from PostgreSQL");
    assert_eq!(delivered_to.ids(), delivered_before, "nothing delivered is sent again");
    // The moved deployment goes on working: the code sent on SQLite signs in on PostgreSQL (its
    // wrong entry still counted), linking the phone's customer; and a new session.
    let store = &fourth.state.store;
    match store.enter_code(customer_step(signing_in), hash_code(&CODE_KEY, signing_in, "999999"), Uuid::new_v4()).await
    {
        Ok(CodeEntered::Refused(CodeCheck::Wrong { tries_left: 3 })) => {}
        other => panic!("{other:?}"),
    }
    match store.enter_code(customer_step(signing_in), hash_code(&CODE_KEY, signing_in, CODE), Uuid::new_v4()).await {
        Ok(CodeEntered::Authenticated(s)) => {
            assert_eq!((s.state, s.customer_id), (State::Authenticated, Some(customer)))
        }
        other => panic!("{other:?}"),
    }
    // The moved deployment goes on working: a new session on PostgreSQL.
    let (status, answer) =
        fourth.json(Method::PUT, &session_path(Uuid::new_v4()), key, Some(&new_transaction_intent(json!(7)))).await;
    assert_eq!(status, 201, "{answer}");
    fourth.stop().await;
}

/// Moving again into the now non-empty database is refused and changes nothing.
async fn refuse_moving_again(target: &TestDatabase, from: &str, dir: &Path) {
    let unchanged = fingerprint(target).await;
    let again = run(&["migrate-data", "--from", from, "--to", target.url()]).await;
    assert_eq!(again.code, Some(1), "{again:?}");
    assert_eq!(again.stdout, "", "{again:?}");
    let errors = again.error_lines();
    assert_eq!(errors.len(), 1, "one error line: {again:?}");
    assert!(errors[0].contains("not empty"), "{again:?}");
    assert_eq!(fingerprint(target).await, unchanged, "the refused move changed nothing");

    // A source that was never migrated is refused before the target is touched.
    let unmigrated = dir.join("unmigrated.db");
    rusqlite::Connection::open(&unmigrated).unwrap().execute_batch("CREATE TABLE other (x INTEGER)").unwrap();
    let unmigrated_url = format!("sqlite://{}", unmigrated.display());
    let refused = run(&["migrate-data", "--from", &unmigrated_url, "--to", target.url()]).await;
    assert_eq!(refused.code, Some(1), "{refused:?}");
    let errors = refused.error_lines();
    assert_eq!(errors.len(), 1, "{refused:?}");
    assert!(errors[0].contains(&format!("redirect-sessions migrate --database-url {unmigrated_url}")), "{refused:?}");
    assert_eq!(fingerprint(target).await, unchanged, "the refused move changed nothing");

    // Bad arguments: one line on stderr, exit code 2, nothing touched.
    bad_arguments_exit_2(from, target.url(), dir).await;
    assert_eq!(fingerprint(target).await, unchanged, "bad arguments changed nothing");
}

async fn bad_arguments_exit_2(from: &str, to: &str, dir: &Path) {
    let other_sqlite = format!("sqlite://{}", PathBuf::from(dir).join("other.db").display());
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["migrate-data"], "--from"),
        (vec!["migrate-data", "--to", to], "--from"),
        (vec!["migrate-data", "--from", from], "--to"),
        (vec!["migrate-data", "--from", to, "--to", to], "same"),
        (vec!["migrate-data", "--from", from, "--to", from], "same"),
        (vec!["migrate-data", "--from", to, "--to", "postgres://elsewhere/x"], "--from"),
        (vec!["migrate-data", "--from", from, "--to", &other_sqlite], "--to"),
        (vec!["migrate-data", "--from", "mysql://db/x", "--to", to], "--from"),
        (vec!["migrate-data", "--from", from, "--to", "mysql://u:hunter2@db/x"], "--to"),
    ];
    for (args, named) in cases {
        let finished = run(&args).await;
        assert_eq!(finished.code, Some(2), "{args:?}: {finished:?}");
        assert_eq!(finished.stdout, "", "{args:?}: {finished:?}");
        let lines: Vec<&str> = finished.stderr.lines().collect();
        assert_eq!(lines.len(), 1, "{args:?}: one line on stderr: {finished:?}");
        assert!(lines[0].starts_with("error:") && lines[0].contains(named), "{args:?}: {finished:?}");
        assert!(!lines[0].contains("hunter2"), "{args:?}: the password is not shown: {finished:?}");
    }
    assert!(!dir.join("other.db").exists(), "no bad argument created a file");
}

#[tokio::test]
async fn a_move_that_fails_in_the_middle_of_the_copy_leaves_the_target_empty_and_can_be_made_again() {
    let Ok(_) = std::env::var(ENV) else {
        let _ = writeln!(std::io::stderr(), "skipped: {ENV} not set");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let sqlite_path = dir.path().join("deployment.db");
    let server = start(&TestDatabase::sqlite_at(&sqlite_path), |_| {}).await;
    let merchant = admin::create_merchant(&server.state.store, "Half Moved Shop").await.unwrap();
    let key = merchant["apiKey"].as_str().unwrap().to_owned();
    let body = subscription("http://127.0.0.1:9/hook", &["RedirectSessionCancelled"]);
    let (status, _) = server.json(Method::PUT, &format!("{SUBSCRIPTIONS}/{}", Uuid::new_v4()), &key, Some(&body)).await;
    assert_eq!(status, 201);
    let session = Uuid::new_v4();
    let (status, _) =
        server.json(Method::PUT, &session_path(session), &key, Some(&new_transaction_intent(json!(10)))).await;
    assert_eq!(status, 201);
    let (status, _) = server.json(Method::POST, &format!("{}/cancel", session_path(session)), &key, None).await;
    assert_eq!(status, 200);
    server.stop().await;

    // A delivery in a state PostgreSQL refuses: the copy fails at `deliveries`, after the
    // merchants, sessions, events and subscriptions went in.
    let source = rusqlite::Connection::open(&sqlite_path).unwrap();
    assert_eq!(source.execute("UPDATE deliveries SET state = 'Bogus'", []).unwrap(), 1);
    let target = TestDatabase::fresh_postgres().expect("a PostgreSQL server");
    let from = format!("sqlite://{}", sqlite_path.display());
    let failed = run(&["migrate-data", "--from", &from, "--to", target.url()]).await;
    assert_eq!(failed.code, Some(1), "{failed:?}");
    assert_eq!(failed.error_lines().len(), 1, "one error line: {failed:?}");
    let counts = |fingerprint: Vec<(String, i64, String)>| -> Vec<(String, i64)> {
        fingerprint.into_iter().map(|(table, rows, _)| (table, rows)).filter(|(_, rows)| *rows > 0).collect()
    };
    assert_eq!(counts(fingerprint(&target).await), [], "nothing of the failed move is left in the target");

    // Repaired, the same move goes through: the target was left empty, not half filled.
    source.execute("UPDATE deliveries SET state = 'Pending'", []).unwrap();
    let moved = run(&["migrate-data", "--from", &from, "--to", target.url()]).await;
    assert_eq!(moved.code, Some(0), "{moved:?}");
    let moved = counts(fingerprint(&target).await);
    for table in ["merchants", "sessions", "events", "subscriptions", "deliveries"] {
        assert!(moved.iter().any(|(name, rows)| name == table && *rows >= 1), "{table}: {moved:?}");
    }
}
