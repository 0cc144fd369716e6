//! Several instances on one PostgreSQL database (docs/OPERATIONS.md "Several instances on PostgreSQL", docs/DESIGN.md "PostgreSQL backend"):
//! two real `redirect-sessions serve` processes share one database, and every guarantee a
//! single instance gives holds across them — sessions, idempotency, cancel races, the expiry
//! sweep, and webhook deliveries, also when one instance is killed with claims in flight (the
//! other takes them over within seconds, not when their leases run out), and a receiver that
//! never answers holds at most its per-subscription cap on each instance.
//!
//! These tests only make sense on PostgreSQL: without `REDIRECT_SESSIONS_TEST_POSTGRES` each
//! prints `skipped: …` and passes. Each test has a database of its own, dropped at the end.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::binary::{command, Served};
use crate::common::*;
use crate::webhook_support::Receiver;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use axum::Router;
use futures_util::future::join_all;
use reqwest::Method;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use uuid::Uuid;

/// How long a process may take to start, and a poll for a condition may take, before a test fails.
const DEADLINE: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(20);
const PUBLIC_URL: &str = "https://pay.example.com";
const CANCELLED: &str = "RedirectSessionCancelled";
const EXPIRED: &str = "RedirectSessionExpired";

// ---------------------------------------------------------------------------------------------
// Two instances
// ---------------------------------------------------------------------------------------------

/// A running `serve` process with a name; killed (SIGKILL) when dropped, so a failing test
/// leaves no process behind.
struct Instance {
    name: &'static str,
    served: Served,
}

impl Instance {
    /// Spawns `serve` on a free port over `database_url` with the test allowances and `args`;
    /// `start` must then be awaited for its `listening` line. Its connections carry the
    /// application name `name`, so that the test can tell them apart in `pg_stat_activity`.
    fn spawn(name: &'static str, database_url: &str, args: &[&str]) -> Instance {
        let url = format!("{database_url}?application_name={name}");
        let mut all = vec![
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--database-url",
            &url,
            "--database-max-connections",
            "8",
            "--allow-private-callbacks",
            "--allow-http-redirect-urls",
            "--rate-limit-per-key",
            "0",
            // Behind one load balancer, instances share the public URL (redirectUrl, token issuer).
            "--public-url",
            PUBLIC_URL,
        ];
        all.extend(args);
        Instance { name, served: Served::spawn(name, command(&all)) }
    }

    /// Waits for the `listening` line and takes the address from it.
    async fn start(self) -> Instance {
        Instance { name: self.name, served: self.served.listening().await }
    }

    fn lines(&self) -> Vec<String> {
        self.served.lines()
    }

    /// The id the dispatcher leases deliveries under (from its `webhook dispatcher started` line).
    async fn dispatcher_id(&self) -> Uuid {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let started = self.lines().into_iter().find(|l| l.contains("webhook dispatcher started"));
            if let Some(line) = started {
                let id = line
                    .split_whitespace()
                    .find_map(|word| word.strip_prefix("dispatcher.id="))
                    .unwrap_or_else(|| panic!("no dispatcher.id in {line:?}"));
                return id.trim_matches('"').parse().unwrap_or_else(|e| panic!("{id}: {e}"));
            }
            assert!(Instant::now() < deadline, "{}: no dispatcher started: {:?}", self.name, self.lines());
            tokio::time::sleep(POLL).await;
        }
    }

    fn request(&self, method: Method, path: &str, key: &str) -> reqwest::RequestBuilder {
        self.served.request(method, path, key)
    }

    /// A request and its whole answer.
    async fn call(&self, method: Method, path: &str, key: &str, body: Option<&Value>) -> Answer {
        let mut request = self.request(method, path, key);
        if let Some(body) = body {
            request = request.json(body);
        }
        Answer::of(request.send().await.unwrap()).await
    }

    async fn put_session(&self, key: &str, id: Uuid) -> Answer {
        self.call(Method::PUT, &session_path(id), key, Some(&new_transaction_intent())).await
    }

    async fn get_session(&self, key: &str, id: Uuid) -> Answer {
        self.call(Method::GET, &session_path(id), key, None).await
    }

    async fn cancel_session(&self, key: &str, id: Uuid) -> Answer {
        self.call(Method::POST, &format!("{}/cancel", session_path(id)), key, None).await
    }

    /// The value of a counter on `/metrics`.
    async fn counter(&self, name: &str) -> u64 {
        let text =
            self.served.client.get(format!("{}/metrics", self.served.url)).send().await.unwrap().text().await.unwrap();
        text.lines()
            .find_map(|line| line.strip_prefix(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no {name} in the metrics of {}:\n{text}", self.name))
            .parse()
            .expect("a counter is a number")
    }

    /// SIGKILL, as a crash; waits until the process is gone.
    fn kill_9(&mut self) {
        self.served.kill_9();
    }
}

/// A whole answer: status, the replay header, the body bytes.
#[derive(Clone, Debug)]
struct Answer {
    status: u16,
    replayed: bool,
    body: Vec<u8>,
}

impl Answer {
    async fn of(response: reqwest::Response) -> Answer {
        let status = response.status().as_u16();
        let replayed = response.headers().get("idempotent-replayed").is_some_and(|v| v == "true");
        Answer { status, replayed, body: response.bytes().await.unwrap().to_vec() }
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    fn code(&self) -> String {
        self.json()["code"].as_str().unwrap_or_default().to_owned()
    }
}

/// Two instances on one fresh PostgreSQL database with one merchant. Field order matters: the
/// processes go before their database is dropped.
struct Pair {
    a: Instance,
    b: Instance,
    key: String,
    merchant_id: Uuid,
    database: TestDatabase,
}

impl Pair {
    /// `None` (after saying so) when no PostgreSQL server is configured.
    async fn start(args: &[&str]) -> Option<Pair> {
        let Some(database) = TestDatabase::fresh_postgres() else {
            skip(&format!("{POSTGRES_ENV} not set; several instances need PostgreSQL"));
            return None;
        };
        let url = database.url().to_owned();
        let created = {
            let url = url.clone();
            tokio::task::spawn_blocking(move || {
                command(&["merchant", "create", "--name", "Two Instance Shop", "--database-url", &url])
                    .output()
                    .expect("merchant create runs")
            })
            .await
            .unwrap()
        };
        assert!(created.status.success(), "{created:?}");
        let merchant: Value = serde_json::from_slice(&created.stdout).expect("merchant create prints JSON");
        // Both start at once.
        let (a, b) = (Instance::spawn("instance_a", &url, args), Instance::spawn("instance_b", &url, args));
        let (a, b) = (a.start().await, b.start().await);
        Some(Pair {
            a,
            b,
            key: merchant["apiKey"].as_str().unwrap().to_owned(),
            merchant_id: merchant["merchantId"].as_str().unwrap().parse().unwrap(),
            database,
        })
    }

    /// Instance `i % 2`: spreads work over both.
    fn either(&self, i: usize) -> &Instance {
        if i % 2 == 0 {
            &self.a
        } else {
            &self.b
        }
    }

    /// Creates `n` sessions, alternating between the instances, all at once.
    async fn create_sessions(&self, n: usize) -> Vec<Uuid> {
        let ids: Vec<Uuid> = (0..n).map(|_| Uuid::new_v4()).collect();
        let answers = join_all(ids.iter().enumerate().map(|(i, id)| self.either(i).put_session(&self.key, *id))).await;
        for answer in &answers {
            assert_eq!(answer.status, 201, "{}", String::from_utf8_lossy(&answer.body));
        }
        ids
    }

    /// Subscribes `url` to `event_types` (through instance A).
    async fn subscribe(&self, url: &str, event_types: &[&str]) -> Uuid {
        let id = Uuid::new_v4();
        let body = json!({"callbackUrl": url, "apiKey": "callback-key", "eventTypes": event_types});
        let path = format!("{BASE}/redirect-session-events/subscriptions/{id}");
        let answer = self.a.call(Method::PUT, &path, &self.key, Some(&body)).await;
        assert_eq!(answer.status, 201, "{}", String::from_utf8_lossy(&answer.body));
        id
    }

    /// The events of type `kind` per session, from the `events` table.
    async fn events_per_session(&self, sql: &tokio_postgres::Client, kind: &str) -> HashMap<Uuid, i64> {
        let rows = sql
            .query("SELECT session_id, count(*) FROM events WHERE type = $1 GROUP BY session_id", &[&kind])
            .await
            .unwrap();
        rows.iter().map(|row| (row.get(0), row.get(1))).collect()
    }
}

/// One number from SQL.
async fn count(sql: &tokio_postgres::Client, query: &str) -> i64 {
    sql.query_one(query, &[]).await.unwrap_or_else(|e| panic!("{query}: {e}")).get(0)
}

/// Waits until `check` holds, polling, or fails after `within` saying `what`.
async fn until<F, Fut>(within: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(POLL).await;
    }
}

// ---------------------------------------------------------------------------------------------
// What the shared webhook receiver got, as these tests count it
// ---------------------------------------------------------------------------------------------

/// The event ids a receiver got, in arrival order.
fn event_ids(receiver: &Receiver) -> Vec<Uuid> {
    receiver.ids().iter().map(|id| id.parse().expect("a webhook-id with a UUID")).collect()
}

/// How often each event id arrived.
fn receipts(receiver: &Receiver) -> BTreeMap<Uuid, usize> {
    let mut receipts = BTreeMap::new();
    for id in event_ids(receiver) {
        *receipts.entry(id).or_default() += 1;
    }
    receipts
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_created_on_one_instance_are_read_listed_and_cancelled_on_the_other() {
    let Some(pair) = Pair::start(&[]).await else { return };
    let key = &pair.key;
    let mut created = Vec::new();
    for (i, (creator, other)) in [(&pair.a, &pair.b), (&pair.b, &pair.a)].into_iter().cycle().take(6).enumerate() {
        let id = Uuid::new_v4();
        let answer = creator.put_session(key, id).await;
        assert_eq!(answer.status, 201, "#{i}: {}", String::from_utf8_lossy(&answer.body));
        assert_eq!(answer.json()["merchantId"], pair.merchant_id.to_string());
        let read = other.get_session(key, id).await;
        assert_eq!(read.status, 200, "{}", String::from_utf8_lossy(&read.body));
        assert_eq!(read.json(), answer.json(), "the other instance reads what the first created");
        // A repeated PUT on the other instance is the same session (and token).
        let again = other.put_session(key, id).await;
        assert_eq!((again.status, again.json()), (200, answer.json()));
        created.push((id, creator, other));
    }

    // Both list every session, newest first, identically.
    let list = format!("{BASE}/redirect-sessions");
    let from_a = pair.a.call(Method::GET, &list, key, None).await;
    let from_b = pair.b.call(Method::GET, &list, key, None).await;
    assert_eq!((from_a.status, from_b.status), (200, 200));
    let listed: BTreeSet<String> =
        from_a.json()["items"].as_array().unwrap().iter().map(|s| s["id"].as_str().unwrap().to_owned()).collect();
    assert_eq!(listed, created.iter().map(|(id, ..)| id.to_string()).collect(), "{}", from_a.json());
    assert_eq!(from_a.json()["items"], from_b.json()["items"]);

    // Both publish the same signing keys: the key lives in the database.
    let jwks = "/.well-known/jwks.json";
    let (from_a, from_b) =
        (pair.a.call(Method::GET, jwks, key, None).await, pair.b.call(Method::GET, jwks, key, None).await);
    assert_eq!(from_a.json(), from_b.json());

    // Cancelled on the other instance; the creator sees it, and a second cancel there is a no-op.
    for (id, creator, other) in &created {
        let cancelled = other.cancel_session(key, *id).await;
        assert_eq!((cancelled.status, &cancelled.json()["state"]), (200, &json!("Cancelled")));
        let read = creator.get_session(key, *id).await;
        assert_eq!(read.json(), cancelled.json(), "the creator reads the cancel");
        let again = creator.cancel_session(key, *id).await;
        assert_eq!((again.status, again.json()), (200, cancelled.json()));
    }
    let sql = pair.database.sql().await;
    let events = pair.events_per_session(&sql, CANCELLED).await;
    assert_eq!(events.len(), created.len(), "{events:?}");
    assert!(events.values().all(|n| *n == 1), "one event per session: {events:?}");
    assert_eq!(count(&sql, "SELECT count(*) FROM events").await, created.len() as i64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_request_id_sent_to_both_instances_at_once_executes_once() {
    let Some(pair) = Pair::start(&[]).await else { return };
    let key = &pair.key;
    let body = new_transaction_intent();
    let (mut in_progress, mut replayed) = (0, 0);
    const ROUNDS: usize = 20;
    let mut sessions = Vec::new();
    for round in 0..ROUNDS {
        let (id, put_id, cancel_id) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        for (request_id, method, path, body, executed) in [
            (put_id, Method::PUT, session_path(id), Some(&body), 201),
            (cancel_id, Method::POST, format!("{}/cancel", session_path(id)), None, 200),
        ] {
            let send = |instance: &Instance| {
                let mut request =
                    instance.request(method.clone(), &path, key).header("x-request-id", request_id.to_string());
                if let Some(body) = body {
                    request = request.json(body);
                }
                async move { Answer::of(request.send().await.unwrap()).await }
            };
            let (from_a, from_b) = tokio::join!(send(&pair.a), send(&pair.b));
            let answers = [from_a, from_b];
            let ran: Vec<usize> = (0..2).filter(|&i| answers[i].status == executed && !answers[i].replayed).collect();
            assert_eq!(ran.len(), 1, "round {round} {method}: exactly one executes: {answers:?}");
            let (first, other_index) = (&answers[ran[0]], 1 - ran[0]);
            let other = &answers[other_index];
            if other.status == 409 {
                assert_eq!(other.code(), "RequestInProgress", "round {round} {method}: {other:?}");
                in_progress += 1;
                // Safe to retry: the retry replays the first answer.
                let retried = send([&pair.a, &pair.b][other_index]).await;
                assert!(retried.replayed, "round {round} {method}: {retried:?}");
                assert_eq!((retried.status, &retried.body), (first.status, &first.body));
            } else {
                assert!(other.replayed, "round {round} {method}: the other is a replay: {other:?}");
                assert_eq!((other.status, &other.body), (first.status, &first.body), "byte for byte");
                replayed += 1;
            }
        }
        sessions.push(id);
    }
    let _ = writeln_stderr(&format!("{in_progress} answers were RequestInProgress, {replayed} replays"));

    let sql = pair.database.sql().await;
    assert_eq!(count(&sql, "SELECT count(*) FROM sessions").await, ROUNDS as i64, "one session per round");
    assert_eq!(
        count(&sql, "SELECT count(*) FROM sessions WHERE state = 'Cancelled' AND version = 2").await,
        ROUNDS as i64
    );
    let events = pair.events_per_session(&sql, CANCELLED).await;
    assert_eq!(events.keys().copied().collect::<BTreeSet<_>>(), sessions.iter().copied().collect());
    assert!(events.values().all(|n| *n == 1), "one event per session: {events:?}");
    assert_eq!(count(&sql, "SELECT count(*) FROM events").await, ROUNDS as i64);
    let created = pair.a.counter("redirect_sessions_created_total").await
        + pair.b.counter("redirect_sessions_created_total").await;
    assert_eq!(created, ROUNDS as u64, "each session was created by one instance");
}

fn writeln_stderr(text: &str) -> std::io::Result<()> {
    use std::io::Write;
    writeln!(std::io::stderr(), "{text}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_cancels_over_both_instances_change_the_state_once() {
    let Some(pair) = Pair::start(&[]).await else { return };
    let sessions = pair.create_sessions(4).await;
    let pair = &pair;
    let cancels = sessions.iter().flat_map(|id| (0..50).map(move |i| (*id, i)));
    let answers =
        join_all(cancels.map(|(id, i)| async move { (id, pair.either(i).cancel_session(&pair.key, id).await) })).await;
    let mut bodies: HashMap<Uuid, BTreeSet<Vec<u8>>> = HashMap::new();
    for (id, answer) in &answers {
        assert_eq!(answer.status, 200, "{}", String::from_utf8_lossy(&answer.body));
        assert_eq!(answer.json()["state"], "Cancelled");
        bodies.entry(*id).or_default().insert(answer.body.clone());
    }
    for (id, distinct) in &bodies {
        assert_eq!(distinct.len(), 1, "all 50 answers for {id} show the one cancelled session");
    }

    let sql = pair.database.sql().await;
    let events = pair.events_per_session(&sql, CANCELLED).await;
    assert_eq!(events.keys().copied().collect::<BTreeSet<_>>(), sessions.iter().copied().collect());
    assert!(events.values().all(|n| *n == 1), "one event per session: {events:?}");
    assert_eq!(count(&sql, "SELECT count(*) FROM events").await, sessions.len() as i64);
    assert_eq!(
        count(&sql, "SELECT count(*) FROM sessions WHERE state = 'Cancelled' AND version = 2").await,
        sessions.len() as i64,
        "one state change each"
    );
    let cancelled = pair.a.counter("redirect_sessions_cancelled_total").await
        + pair.b.counter("redirect_sessions_cancelled_total").await;
    assert_eq!(cancelled, sessions.len() as u64, "each session was cancelled by one request");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_expiry_sweeps_of_both_instances_record_each_expiry_once() {
    let Some(pair) = Pair::start(&["--session-ttl", "1s"]).await else { return };
    const SESSIONS: i64 = 100;
    // Created in waves over about two seconds, so that expiries fall due across several ticks
    // of both sweeps.
    let mut sessions = Vec::new();
    for _ in 0..10 {
        sessions.extend(pair.create_sessions(SESSIONS as usize / 10).await);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let sql = pair.database.sql().await;
    until(DEADLINE, "every session to be recorded as Expired", || async {
        count(&sql, "SELECT count(*) FROM sessions WHERE state = 'Expired'").await == SESSIONS
    })
    .await;

    let events = pair.events_per_session(&sql, EXPIRED).await;
    assert_eq!(events.keys().copied().collect::<BTreeSet<_>>(), sessions.iter().copied().collect());
    assert!(events.values().all(|n| *n == 1), "one event per session: {events:?}");
    assert_eq!(count(&sql, "SELECT count(*) FROM events").await, SESSIONS, "no other events");
    assert_eq!(count(&sql, "SELECT count(*) FROM sessions WHERE version = 2").await, SESSIONS, "written once");
    let (by_a, by_b) = (
        pair.a.counter("redirect_sessions_expired_total").await,
        pair.b.counter("redirect_sessions_expired_total").await,
    );
    assert_eq!(by_a + by_b, SESSIONS as u64, "each expiry was recorded by one sweep (A {by_a}, B {by_b})");
    let _ = writeln_stderr(&format!("instance A recorded {by_a} expiries, instance B {by_b}"));
}

/// Per-instance webhook concurrency in the delivery tests: more requests in flight at the
/// receiver than this prove that both dispatchers were sending at once.
const CONCURRENCY: &str = "4";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_dispatchers_share_the_deliveries_and_each_is_made_once() {
    let Some(pair) = Pair::start(&["--webhook-concurrency", CONCURRENCY]).await else { return };
    let receiver = Receiver::answering_after(204, Duration::from_millis(100)).await;
    pair.subscribe(&receiver.url(), &[CANCELLED]).await;
    const SESSIONS: usize = 200;
    let sessions = pair.create_sessions(SESSIONS).await;
    let cancels =
        join_all(sessions.iter().enumerate().map(|(i, id)| pair.either(i + 1).cancel_session(&pair.key, *id)));
    for answer in cancels.await {
        assert_eq!(answer.status, 200, "{}", String::from_utf8_lossy(&answer.body));
    }

    let sql = pair.database.sql().await;
    until(Duration::from_secs(60), "every delivery to be recorded as Delivered", || async {
        count(&sql, "SELECT count(*) FROM deliveries WHERE state = 'Delivered'").await == SESSIONS as i64
    })
    .await;
    let events: BTreeSet<Uuid> =
        sql.query("SELECT id FROM events", &[]).await.unwrap().iter().map(|row| row.get(0)).collect();
    assert_eq!(events.len(), SESSIONS);
    let receipts = receipts(&receiver);
    assert_eq!(receipts.keys().copied().collect::<BTreeSet<_>>(), events, "every event arrived");
    assert!(receipts.values().all(|n| *n == 1), "no event was sent twice: {receipts:?}");
    assert_eq!(count(&sql, "SELECT count(*) FROM deliveries").await, SESSIONS as i64);
    assert_eq!(count(&sql, "SELECT count(*) FROM deliveries WHERE attempts = 1").await, SESSIONS as i64);
    assert_eq!(
        count(&sql, "SELECT count(*) FROM delivery_attempts WHERE status = 204").await,
        SESSIONS as i64,
        "one attempt per delivery"
    );
    let limit: usize = CONCURRENCY.parse().unwrap();
    let _ = writeln_stderr(&format!("at most {} requests were in flight at once", receiver.max_in_flight()));
    assert!(
        receiver.max_in_flight() > limit,
        "at most {limit} requests were in flight at once ({}), so only one dispatcher was sending",
        receiver.max_in_flight()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_claimed_by_a_killed_instance_are_made_by_the_other_within_seconds_not_when_the_lease_runs_out() {
    let Some(mut pair) = Pair::start(&["--webhook-concurrency", CONCURRENCY]).await else { return };
    // The receiver is down (it accepts and never answers) while A dies holding its claims.
    let receiver = Receiver::holding(204).await;
    pair.subscribe(&receiver.url(), &[CANCELLED]).await;
    let dead = pair.a.dispatcher_id().await;
    const SESSIONS: usize = 100;
    let sessions = pair.create_sessions(SESSIONS).await;
    let cancels = join_all(sessions.iter().enumerate().map(|(i, id)| pair.either(i).cancel_session(&pair.key, *id)));
    for answer in cancels.await {
        assert_eq!(answer.status, 200, "{}", String::from_utf8_lossy(&answer.body));
    }

    // Kill A while its attempts hang.
    let sql = pair.database.sql().await;
    let held_by_a = format!("SELECT count(*) FROM deliveries WHERE state = 'Pending' AND lease_owner = '{dead}'");
    let limit: i64 = CONCURRENCY.parse().unwrap();
    until(DEADLINE, "instance A to claim deliveries", || async { count(&sql, &held_by_a).await == limit }).await;
    let orphans: HashMap<Uuid, i64> = sql
        .query(
            "SELECT id, (extract(epoch FROM lease_until) * 1000)::bigint FROM deliveries
              WHERE state = 'Pending' AND lease_owner = $1",
            &[&dead],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    assert_eq!(orphans.len(), CONCURRENCY.parse::<usize>().unwrap(), "instance A holds claims");
    pair.a.kill_9();
    let killed = Instant::now();
    // The receiver is back.
    receiver.release_silenced();

    // B delivers everything, A's claims included. That it did not wait for A's leases is
    // checked below on each orphan: its successful attempt started before its lease ran out.
    until(DEADLINE, "instance B to deliver everything, instance A's claims included", || async {
        count(&sql, "SELECT count(*) FROM deliveries WHERE state = 'Delivered'").await == SESSIONS as i64
    })
    .await;
    let _ = writeln_stderr(&format!(
        "instance A died holding {} claims; everything was delivered {:?} after the kill",
        orphans.len(),
        killed.elapsed()
    ));
    assert!(pair.b.lines().iter().any(|l| l.contains("took over deliveries claimed by a dispatcher that is gone")));

    // Every event arrived; a delivery lost with A arrived once more than recorded.
    let rows = sql
        .query(
            "SELECT d.id, d.event_id, d.attempts,
                    (SELECT (extract(epoch FROM min(a.started_on)) * 1000)::bigint
                       FROM delivery_attempts a WHERE a.delivery_id = d.id AND a.status BETWEEN 200 AND 299)
               FROM deliveries d",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), SESSIONS);
    let receipts = receipts(&receiver);
    for row in rows {
        let (delivery, event, attempts, succeeded): (Uuid, Uuid, i32, Option<i64>) =
            (row.get(0), row.get(1), row.get(2), row.get(3));
        let received = receipts.get(&event).copied().unwrap_or(0);
        assert!(received >= 1, "event {event} never arrived");
        let lost = usize::from(orphans.contains_key(&delivery));
        assert!(
            received <= attempts as usize + lost,
            "event {event} arrived {received} times, but {attempts} attempts were recorded (orphan: {lost})"
        );
        if let Some(lease_until) = orphans.get(&delivery) {
            let succeeded = succeeded.expect("a successful attempt");
            assert!(succeeded < *lease_until, "{delivery} was sent again at {succeeded}, when its lease ran out");
        }
    }
    // A is no longer registered once it holds nothing.
    until(DEADLINE, "instance A's registration to go", || async {
        count(&sql, &format!("SELECT count(*) FROM delivery_dispatchers WHERE owner = '{dead}'")).await == 0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_that_never_answers_holds_at_most_its_cap_on_each_instance_and_the_others_are_served() {
    const PER_SUBSCRIPTION: usize = 3;
    let args = ["--webhook-concurrency", "8", "--webhook-concurrency-per-subscription", "3"];
    let Some(pair) = Pair::start(&args).await else { return };
    let silent = Receiver::holding(204).await;
    let healthy = Receiver::answering(204).await;
    let silent_subscription = pair.subscribe(&silent.url(), &[CANCELLED]).await;
    // Another merchant's receiver.
    let other = {
        let url = pair.database.url().to_owned();
        tokio::task::spawn_blocking(move || {
            command(&["merchant", "create", "--name", "Other Shop", "--database-url", &url])
                .output()
                .expect("merchant create runs")
        })
        .await
        .unwrap()
    };
    assert!(other.status.success(), "{other:?}");
    let other: Value = serde_json::from_slice(&other.stdout).expect("merchant create prints JSON");
    let other_key = other["apiKey"].as_str().unwrap().to_owned();
    let body = json!({"callbackUrl": healthy.url(), "apiKey": "callback-key", "eventTypes": [CANCELLED]});
    let path = format!("{BASE}/redirect-session-events/subscriptions/{}", Uuid::new_v4());
    let answer = pair.b.call(Method::PUT, &path, &other_key, Some(&body)).await;
    assert_eq!(answer.status, 201, "{}", String::from_utf8_lossy(&answer.body));

    // The first merchant's backlog, all due before the other merchant's events.
    const BACKLOG: usize = 200;
    let sessions = pair.create_sessions(BACKLOG).await;
    for answer in
        join_all(sessions.iter().enumerate().map(|(i, id)| pair.either(i).cancel_session(&pair.key, *id))).await
    {
        assert_eq!(answer.status, 200, "{}", String::from_utf8_lossy(&answer.body));
    }
    let sql = pair.database.sql().await;
    let leased = format!(
        "SELECT count(*) FROM deliveries WHERE subscription_id = '{silent_subscription}' AND lease_until > now()"
    );
    until(DEADLINE, "the silent receiver's subscription to reach its cap", || async {
        count(&sql, &leased).await >= PER_SUBSCRIPTION as i64
    })
    .await;

    const HEALTHY_EVENTS: usize = 10;
    let ids: Vec<Uuid> = (0..HEALTHY_EVENTS).map(|_| Uuid::new_v4()).collect();
    for (i, id) in ids.iter().enumerate() {
        assert_eq!(pair.either(i).put_session(&other_key, *id).await.status, 201);
        assert_eq!(pair.either(i + 1).cancel_session(&other_key, *id).await.status, 200);
    }
    until(DEADLINE, "the healthy receiver to get every event", || async { healthy.received().len() >= HEALTHY_EVENTS })
        .await;
    // They arrived while every attempt at the silent receiver was still held: none had ended
    // (by its timeout) and been recorded, so no slot had to be freed for them.
    let ended = format!(
        "SELECT count(*) FROM delivery_attempts a JOIN deliveries d ON d.id = a.delivery_id
          WHERE d.subscription_id = '{silent_subscription}'"
    );
    assert_eq!(count(&sql, &ended).await, 0, "an attempt at the silent receiver ended before the others arrived");
    let limit = PER_SUBSCRIPTION * 2;
    assert!(
        silent.max_in_flight() <= limit,
        "{} requests in flight at once at the silent receiver, more than {PER_SUBSCRIPTION} per instance",
        silent.max_in_flight()
    );
    assert!(count(&sql, &leased).await <= limit as i64);
    // Let the held requests finish, so that the instances stop without waiting for the timeout.
    silent.release_silenced();
}

// ---------------------------------------------------------------------------------------------
// The hosted page on one instance, the merchant's cancel on the other
// ---------------------------------------------------------------------------------------------

const HOSTED_COMPLETED: &str = "RedirectSessionCompleted";

/// An SMS gateway on 127.0.0.1:0 for the `http` one-time-code sender: records every code.
struct CodeGateway {
    port: u16,
    sent: Arc<Mutex<Vec<Value>>>,
    task: JoinHandle<()>,
}

impl Drop for CodeGateway {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn gateway_code(State(sent): State<Arc<Mutex<Vec<Value>>>>, body: axum::body::Bytes) -> StatusCode {
    let body: Value = serde_json::from_slice(&body).expect("the sender posts JSON");
    sent.lock().unwrap().push(body);
    StatusCode::OK
}

impl CodeGateway {
    async fn start() -> CodeGateway {
        let sent = Arc::new(Mutex::new(Vec::new()));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("a free port for the gateway");
        let port = listener.local_addr().unwrap().port();
        let app = Router::new().route("/otp", post(gateway_code)).with_state(sent.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        CodeGateway { port, sent, task }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/otp", self.port)
    }

    /// The last code sent for `session`.
    fn code(&self, session: Uuid) -> Option<String> {
        let sent = self.sent.lock().unwrap();
        let last = sent.iter().rev().find(|body| body["redirectSessionId"] == session.to_string());
        last.map(|body| body["code"].as_str().expect("a code").to_owned())
    }
}

/// One answer of the hosted page: status and `Location`.
#[derive(Debug)]
struct PageAnswer {
    status: u16,
    location: Option<String>,
    set_cookie: Option<String>,
    body: String,
}

impl PageAnswer {
    async fn of(response: reqwest::Response) -> PageAnswer {
        let header = |name: &str| response.headers().get(name).map(|v| v.to_str().unwrap().to_owned());
        let (status, location, set_cookie) = (response.status().as_u16(), header("location"), header("set-cookie"));
        PageAnswer { status, location, set_cookie, body: response.text().await.unwrap() }
    }
}

/// A customer's browser on one instance's hosted page: its own cookie, no redirects followed.
struct PayBrowser {
    client: reqwest::Client,
    base: String,
    cookie: String,
}

impl PayBrowser {
    /// `GET /pay?token=…`, which must answer 303 with the cookie.
    async fn arrive(instance: &Instance, token: &str) -> PayBrowser {
        let client = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
        let base = instance.served.url.clone();
        let query = url::form_urlencoded::Serializer::new(String::new()).append_pair("token", token).finish();
        let answer = PageAnswer::of(client.get(format!("{base}/pay?{query}")).send().await.unwrap()).await;
        assert_eq!((answer.status, answer.location.as_deref()), (303, Some("/pay")), "{answer:?}");
        let set = answer.set_cookie.expect("the arrival sets the cookie");
        let cookie = set.split(';').next().unwrap().to_owned();
        assert!(cookie.starts_with("rs_pay="), "{set}");
        assert!(set.contains("; Secure"), "the public URL is https: {set}");
        PayBrowser { client, base, cookie }
    }

    /// Submits a form with the CSRF token.
    async fn submit(&self, path: &str, fields: &[(&str, &str)]) -> PageAnswer {
        let csrf = self.cookie.strip_prefix("rs_pay=").unwrap().split_once('.').unwrap().0;
        let body = url::form_urlencoded::Serializer::new(String::new())
            .append_pair("csrf", csrf)
            .extend_pairs(fields)
            .finish();
        let request = self
            .client
            .post(format!("{}{path}", self.base))
            .header("cookie", &self.cookie)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(body);
        PageAnswer::of(request.send().await.unwrap()).await
    }
}

/// The customer's steps on instance A, in order, until one is not `303 /pay`; before the step
/// numbered `cancel_at` it tells the merchant to cancel, so that the two race. Answers every
/// step taken with its answer.
async fn customer_journey(
    a: &Instance,
    gateway: &CodeGateway,
    id: Uuid,
    token: &str,
    phone: &str,
    cancel_at: usize,
    go: tokio::sync::oneshot::Sender<()>,
) -> Vec<(&'static str, PageAnswer)> {
    let browser = PayBrowser::arrive(a, token).await;
    let mut go = Some(go);
    let mut steps = Vec::new();
    for (i, step) in ["code", "verify", "confirm"].into_iter().enumerate() {
        if i == cancel_at {
            let _ = go.take().expect("one go").send(());
        }
        let answer = match step {
            "code" => browser.submit("/pay/code", &[("phone", phone)]).await,
            "verify" => {
                let code = gateway.code(id).expect("a code was sent");
                browser.submit("/pay/verify", &[("code", &code)]).await
            }
            _ => browser.submit("/pay/confirm", &[]).await,
        };
        let on = answer.status == 303 && answer.location.as_deref() == Some("/pay");
        steps.push((step, answer));
        if !on {
            break;
        }
    }
    steps
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_customer_finishing_on_one_instance_races_the_merchant_cancelling_on_the_other_with_one_winner() {
    let gateway = CodeGateway::start().await;
    let url = gateway.url();
    let Some(pair) = Pair::start(&["--otp-sender", "http", "--otp-http-url", &url]).await else { return };
    const SESSIONS: usize = 21;
    let ids = pair.create_sessions(SESSIONS).await;
    let mut tokens = Vec::new();
    for id in &ids {
        let read = pair.a.get_session(&pair.key, *id).await;
        assert_eq!(read.status, 200);
        tokens.push(read.json()["token"].as_str().unwrap().to_owned());
    }

    let pair = &pair;
    let gateway = &gateway;
    let outcomes = join_all(ids.iter().zip(&tokens).enumerate().map(|(i, (id, token))| async move {
        let (go, went) = tokio::sync::oneshot::channel();
        let phone = format!("+49151400000{i:02}");
        // The cancel lands around the sending of the code, its entry or the confirmation.
        let journey = customer_journey(&pair.a, gateway, *id, token, &phone, i % 3, go);
        let cancel = async {
            let _ = went.await;
            pair.b.cancel_session(&pair.key, *id).await
        };
        let (steps, cancelled) = tokio::join!(journey, cancel);
        (*id, steps, cancelled)
    }))
    .await;

    let sql = pair.database.sql().await;
    let completed_events = pair.events_per_session(&sql, HOSTED_COMPLETED).await;
    let cancelled_events = pair.events_per_session(&sql, CANCELLED).await;
    let (mut completed, mut cancelled) = (0, 0);
    let mut lost_at: BTreeMap<&str, usize> = BTreeMap::new();
    for (id, steps, cancel) in &outcomes {
        let session = pair.b.get_session(&pair.key, *id).await.json();
        let (last_step, last) = steps.last().expect("at least one step");
        let events = (completed_events.get(id).copied(), cancelled_events.get(id).copied());
        match session["state"].as_str() {
            Some("Completed") => {
                completed += 1;
                assert_eq!(events, (Some(1), None), "{id}: {session}");
                assert_eq!(steps.len(), 3, "{id}: {steps:?}");
                assert!(steps.iter().all(|(_, a)| a.status == 303), "{id}: {steps:?}");
                assert_eq!(cancel.status, 400, "{}", String::from_utf8_lossy(&cancel.body));
                assert_eq!(cancel.code(), "InvalidRedirectSessionStateTransition");
                assert!(session["transactionIntentId"].is_string(), "{session}");
            }
            Some("Cancelled") => {
                cancelled += 1;
                *lost_at.entry(last_step).or_default() += 1;
                assert_eq!(events, (None, Some(1)), "{id}: {session}");
                assert_eq!(cancel.status, 200, "{}", String::from_utf8_lossy(&cancel.body));
                assert_eq!(last.status, 409, "{id}: the losing step {last_step}: {last:?}");
                assert!(last.body.contains("id=\"outcome\""), "{id}: {last:?}");
                assert!(steps[..steps.len() - 1].iter().all(|(_, a)| a.status == 303), "{id}: {steps:?}");
                assert!(session.get("transactionIntentId").is_none(), "{session}");
            }
            _ => panic!("{id} ended neither Completed nor Cancelled: {session}"),
        }
    }
    assert_eq!(completed_events.len() + cancelled_events.len(), SESSIONS, "one event per session");
    assert_eq!(count(&sql, "SELECT count(*) FROM events").await, SESSIONS as i64, "no other events");
    let _ = writeln_stderr(&format!("{completed} completed, {cancelled} cancelled (the customer lost at {lost_at:?})"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_and_a_suspension_made_through_one_instance_hold_for_the_dispatchers_of_both() {
    use crate::webhook_support::{verifying_entries, Reply};
    let Some(pair) = Pair::start(&["--webhook-retry-schedule", "100ms,100ms,100ms"]).await else { return };
    let receiver = Receiver::answering(204).await;
    let id = Uuid::new_v4();
    let path = format!("{BASE}/redirect-session-events/subscriptions/{id}");
    let body = json!({"callbackUrl": receiver.url(), "apiKey": "callback-key", "eventTypes": [CANCELLED]});
    let created = pair.a.call(Method::PUT, &path, &pair.key, Some(&body)).await;
    assert_eq!(created.status, 201, "{}", String::from_utf8_lossy(&created.body));
    let old = created.json()["signingSecret"].as_str().unwrap().to_owned();

    // Rotated through B: whichever dispatcher sends, both signatures come.
    let rotate = json!({"gracePeriodSeconds": 3600});
    let rotated = pair.b.call(Method::POST, &format!("{path}/rotate-secret"), &pair.key, Some(&rotate)).await;
    assert_eq!(rotated.status, 200, "{}", String::from_utf8_lossy(&rotated.body));
    let new = rotated.json()["signingSecret"].as_str().unwrap().to_owned();
    const FIRST: usize = 20;
    for (i, session) in pair.create_sessions(FIRST).await.into_iter().enumerate() {
        assert_eq!(pair.either(i).cancel_session(&pair.key, session).await.status, 200);
    }
    for request in receiver.wait_for_requests(FIRST).await {
        assert_eq!(verifying_entries(&request, &new), [true, false]);
        assert_eq!(verifying_entries(&request, &old), [false, true]);
    }

    // A 410 seen by one dispatcher suspends the subscription for both: every later event is held.
    receiver.answer_from_now_on(Reply::Status(410));
    let session = pair.create_sessions(1).await[0];
    assert_eq!(pair.a.cancel_session(&pair.key, session).await.status, 200);
    for instance in [&pair.a, &pair.b] {
        until(DEADLINE, "the suspension to show on both instances", || async {
            let read = instance.call(Method::GET, &path, &pair.key, None).await.json();
            read["state"] == "Suspended" && read["suspendedReason"] == "ReceiverGone"
        })
        .await;
    }
    const LATER: usize = 10;
    for (i, session) in pair.create_sessions(LATER).await.into_iter().enumerate() {
        assert_eq!(pair.either(i).cancel_session(&pair.key, session).await.status, 200);
    }
    let sql = pair.database.sql().await;
    assert_eq!(count(&sql, "SELECT count(*) FROM deliveries WHERE state = 'Held'").await, 1 + LATER as i64);
    assert_eq!(receiver.received().len(), FIRST + 1, "nothing is sent while suspended");

    // Resumed through B: both dispatchers send the held deliveries, once each.
    receiver.answer_from_now_on(Reply::Status(204));
    let resumed = pair.b.call(Method::POST, &format!("{path}/resume"), &pair.key, None).await;
    assert_eq!((resumed.status, &resumed.json()["state"]), (200, &json!("Active")));
    until(DEADLINE, "the held deliveries to be delivered", || async {
        count(&sql, "SELECT count(*) FROM deliveries WHERE state = 'Delivered'").await == (FIRST + 1 + LATER) as i64
    })
    .await;
    assert_eq!(receiver.received().len(), FIRST + 1 + LATER + 1, "the one that got 410 came again, once");
}
