//! The test harness: a real server on port 0 over a fresh database, a merchant with its key,
//! and small helpers to call the API. Each test binary includes this module.
//!
//! The backend comes from `REDIRECT_SESSIONS_TEST_BACKEND`: `sqlite` (the default) or
//! `postgres`. With `postgres`, every `TestDatabase` is a database of its own, `rs_test_<uuid>`,
//! created through the admin URL in `REDIRECT_SESSIONS_TEST_POSTGRES` and dropped (with its
//! connections) when the test is done with it — also when the test panicked.
#![allow(dead_code)]

pub mod binary;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use redirect_sessions::admin;
use redirect_sessions::app;
use redirect_sessions::config::{Config, DatabaseUrl};
use redirect_sessions::domain::event::EventType;
use redirect_sessions::secrets::SecretKey;
use redirect_sessions::state::AppState;
use redirect_sessions::store::DynStore;
use reqwest::{Client, Method, RequestBuilder, Response};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_postgres::NoTls;
use uuid::Uuid;

/// The merchant API's base path.
pub const BASE: &str = "/customer-authentication-service/v1";

/// The path of one session.
pub fn session_path(id: impl std::fmt::Display) -> String {
    format!("{BASE}/redirect-sessions/{id}")
}

/// The path that cancels one session.
pub fn cancel_path(id: impl std::fmt::Display) -> String {
    format!("{BASE}/redirect-sessions/{id}/cancel")
}

/// Which backend the integration tests run on: `sqlite` (default) or `postgres`.
pub const BACKEND_ENV: &str = "REDIRECT_SESSIONS_TEST_BACKEND";
/// The admin URL of the PostgreSQL server tests create their databases on.
pub const POSTGRES_ENV: &str = "REDIRECT_SESSIONS_TEST_POSTGRES";

/// The storage backend under test.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// The backend `REDIRECT_SESSIONS_TEST_BACKEND` names; a value other than `sqlite` or
/// `postgres` fails the test rather than silently testing the wrong thing.
pub fn backend() -> Backend {
    match std::env::var(BACKEND_ENV) {
        Err(_) => Backend::Sqlite,
        Ok(value) => match value.trim() {
            "" | "sqlite" => Backend::Sqlite,
            "postgres" => Backend::Postgres,
            other => panic!("{BACKEND_ENV}={other:?}: expected `sqlite` or `postgres`"),
        },
    }
}

/// Whether the tests run on PostgreSQL.
pub fn on_postgres() -> bool {
    backend() == Backend::Postgres
}

/// The PostgreSQL admin URL, when one is configured.
pub fn postgres_admin_url() -> Option<String> {
    std::env::var(POSTGRES_ENV).ok().filter(|url| !url.trim().is_empty())
}

/// Says that (and why) a test does not run, where the test output shows it: libtest hides
/// what passing tests print through `println!`/`eprintln!`, so this writes to the stream.
pub fn skip(why: &str) {
    let _ = writeln!(std::io::stderr(), "skipped: {why}");
}

fn required_admin_url() -> String {
    postgres_admin_url().unwrap_or_else(|| {
        panic!("{BACKEND_ENV}=postgres needs {POSTGRES_ENV}, e.g. postgres://postgres@127.0.0.1:5432/postgres")
    })
}

/// Runs `work` to its end on a runtime of its own in a thread of its own, so that it can be
/// called from synchronous tests, from inside a test's runtime, and from `Drop`.
fn on_own_runtime<T: Send + 'static>(work: impl std::future::Future<Output = T> + Send + 'static) -> T {
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime");
        runtime.block_on(work)
    })
    .join()
    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

/// A plain connection to PostgreSQL at `url` (its connection task runs on the current runtime).
pub async fn connect_postgres(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to PostgreSQL ({POSTGRES_ENV}): {e}"));
    tokio::spawn(connection);
    client
}

async fn drop_postgres_database(admin: &str, name: &str) -> Result<(), tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(admin, NoTls).await?;
    let connection = tokio::spawn(connection);
    let dropped = client.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).await;
    drop(client);
    let _ = connection.await;
    dropped
}

enum Kind {
    /// A SQLite file; the directory (when owned) goes with the value.
    Sqlite { path: PathBuf, _dir: Option<tempfile::TempDir> },
    /// A database of its own on the PostgreSQL server; `dropped` once removed.
    Postgres { admin: String, name: String, dropped: bool },
}

/// A fresh, empty database of the backend under test, removed when this goes away.
pub struct TestDatabase {
    url: String,
    kind: Kind,
    /// The secrets key servers over this database use (`test_config`): random, one per
    /// database, so that a restarted server reads what the first one wrote.
    secrets_key: SecretKey,
}

impl TestDatabase {
    /// A fresh database of the backend under test (from async code).
    pub async fn create() -> TestDatabase {
        match backend() {
            Backend::Sqlite => {
                let dir = tempfile::tempdir().expect("a temporary directory");
                let path = dir.path().join("test.db");
                Self::sqlite(path, Some(dir))
            }
            Backend::Postgres => Self::create_postgres(required_admin_url()).await,
        }
    }

    /// A fresh database of the backend under test (from anywhere, also synchronous tests).
    pub fn fresh() -> TestDatabase {
        match backend() {
            Backend::Sqlite => {
                let dir = tempfile::tempdir().expect("a temporary directory");
                let path = dir.path().join("test.db");
                Self::sqlite(path, Some(dir))
            }
            Backend::Postgres => {
                let admin = required_admin_url();
                on_own_runtime(Self::create_postgres(admin))
            }
        }
    }

    /// The SQLite file `path`, whatever the backend under test (its directory belongs to the
    /// caller).
    pub fn sqlite_at(path: &Path) -> TestDatabase {
        Self::sqlite(path.to_owned(), None)
    }

    /// On SQLite the file `path` (its directory belongs to the caller); on PostgreSQL a fresh
    /// database as from `fresh`.
    pub fn fresh_at(path: &Path) -> TestDatabase {
        match backend() {
            Backend::Sqlite => Self::sqlite(path.to_owned(), None),
            Backend::Postgres => Self::fresh(),
        }
    }

    /// A fresh PostgreSQL database regardless of the backend under test (for tests that only
    /// make sense on PostgreSQL); `None` when no server is configured.
    pub fn fresh_postgres() -> Option<TestDatabase> {
        postgres_admin_url().map(|admin| on_own_runtime(Self::create_postgres(admin)))
    }

    fn sqlite(path: PathBuf, dir: Option<tempfile::TempDir>) -> TestDatabase {
        TestDatabase {
            url: format!("sqlite://{}", path.display()),
            kind: Kind::Sqlite { path, _dir: dir },
            secrets_key: new_secrets_key(),
        }
    }

    async fn create_postgres(admin: String) -> TestDatabase {
        let name = format!("rs_test_{}", Uuid::new_v4().simple());
        let client = connect_postgres(&admin).await;
        client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap_or_else(|e| panic!("CREATE DATABASE {name}: {e}"));
        let mut url = url::Url::parse(&admin).unwrap_or_else(|e| panic!("{POSTGRES_ENV} is not a URL: {e}"));
        url.set_path(&format!("/{name}"));
        TestDatabase {
            url: url.to_string(),
            kind: Kind::Postgres { admin, name, dropped: false },
            secrets_key: new_secrets_key(),
        }
    }

    /// The key that encrypts this database's secrets (`secrets_key`).
    pub fn secrets_key(&self) -> SecretKey {
        self.secrets_key.clone()
    }

    /// The URL to give `--database-url`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The setting for a `Config`.
    pub fn database_url(&self) -> DatabaseUrl {
        match &self.kind {
            Kind::Sqlite { path, .. } => DatabaseUrl::Sqlite { path: path.clone() },
            Kind::Postgres { .. } => DatabaseUrl::Postgres(self.url.clone()),
        }
    }

    /// The SQLite file, when this is one.
    pub fn sqlite_path(&self) -> Option<&Path> {
        match &self.kind {
            Kind::Sqlite { path, .. } => Some(path),
            Kind::Postgres { .. } => None,
        }
    }

    /// The PostgreSQL database's name, when this is one.
    pub fn postgres_name(&self) -> Option<&str> {
        match &self.kind {
            Kind::Sqlite { .. } => None,
            Kind::Postgres { name, .. } => Some(name),
        }
    }

    pub fn is_postgres(&self) -> bool {
        matches!(self.kind, Kind::Postgres { .. })
    }

    /// A plain connection to this PostgreSQL database, for looking behind the service's back.
    pub async fn sql(&self) -> tokio_postgres::Client {
        assert!(self.is_postgres(), "sql() is for PostgreSQL databases");
        connect_postgres(&self.url).await
    }

    /// The first column of every row `query` answers, as text (PostgreSQL only; callable from
    /// synchronous tests).
    pub fn query_text(&self, query: &str) -> Vec<String> {
        assert!(self.is_postgres(), "query_text() is for PostgreSQL databases");
        let (url, query) = (self.url.clone(), query.to_owned());
        on_own_runtime(async move {
            let client = connect_postgres(&url).await;
            let rows = client.query(&query, &[]).await.unwrap_or_else(|e| panic!("{query}: {e}"));
            rows.iter().map(|row| row.get::<_, Option<String>>(0).unwrap_or_default()).collect()
        })
    }

    /// Whether the service's schema is there: the SQLite file exists, or the PostgreSQL
    /// database has tables.
    pub fn is_migrated(&self) -> bool {
        match &self.kind {
            Kind::Sqlite { path, .. } => path.is_file(),
            Kind::Postgres { .. } => !self
                .query_text("SELECT table_name::text FROM information_schema.tables WHERE table_schema = 'public'")
                .is_empty(),
        }
    }

    /// Removes the database now (from async code); `Drop` does the same from anywhere.
    pub async fn remove(mut self) {
        if let Kind::Postgres { admin, name, dropped } = &mut self.kind {
            if let Err(error) = drop_postgres_database(admin, name).await {
                let _ = writeln!(std::io::stderr(), "could not drop the test database {name}: {error}");
            }
            *dropped = true;
        }
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        if let Kind::Postgres { admin, name, dropped: false } = &self.kind {
            // Drop cannot await, and the test's runtime may be busy, gone or panicking: use a
            // runtime of its own on a thread of its own.
            let (admin, name) = (admin.clone(), name.clone());
            let result = std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().ok()?;
                runtime.block_on(drop_postgres_database(&admin, &name)).err().map(|e| (name, e.to_string()))
            })
            .join();
            if let Ok(Some((name, error))) = result {
                let _ = writeln!(std::io::stderr(), "could not drop the test database {name}: {error}");
            }
        }
    }
}

/// A fresh database of the backend under test for the real binary: its `--database-url`, and
/// the guard that removes it.
pub fn fresh_database_url() -> (String, TestDatabase) {
    let database = TestDatabase::fresh();
    (database.url().to_owned(), database)
}

/// A running server and what a test needs to talk to it.
pub struct TestServer {
    pub url: String,
    pub client: Client,
    pub state: AppState,
    /// The key of a merchant created at start.
    pub api_key: String,
    pub merchant_id: Uuid,
    database: Option<TestDatabase>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<std::io::Result<()>>>,
}

/// The settings tests start from: `database`, no rate limits, http redirect URLs and private
/// callbacks allowed.
pub fn test_config(database: &TestDatabase) -> Config {
    let mut config = Config::defaults();
    config.database_url = database.database_url();
    config.rate_limit_per_key = 0;
    config.rate_limit_per_ip = 0;
    config.allow_http_redirect_urls = true;
    config.allow_private_callbacks = true;
    config.secrets_key = Some(database.secrets_key());
    config
}

/// A fresh random secrets key.
pub fn new_secrets_key() -> SecretKey {
    SecretKey::generate().expect("a random key")
}

impl TestServer {
    /// A server with the test settings over a fresh database.
    pub async fn start() -> TestServer {
        Self::start_with(|_| {}).await
    }

    /// A server over a fresh database with the test settings changed by `adjust`.
    pub async fn start_with(adjust: impl FnOnce(&mut Config)) -> TestServer {
        let database = TestDatabase::create().await;
        let mut config = test_config(&database);
        adjust(&mut config);
        Self::start_on(config, database).await
    }

    /// A server over `database` (fresh, or kept from a stopped server for restart tests), with
    /// `config` (whose database URL should be `database`'s), and a merchant of its own.
    pub async fn start_on(mut config: Config, database: TestDatabase) -> TestServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("a free port");
        config.public_url = format!("http://{}", listener.local_addr().unwrap()).parse().unwrap();
        let mut server = Self::launch(listener, config, Some(database)).await;
        let created = admin::create_merchant(&server.state.store, "Test Shop").await.expect("a merchant");
        server.api_key = created["apiKey"].as_str().unwrap().to_owned();
        server.merchant_id = created["merchantId"].as_str().unwrap().parse().unwrap();
        server
    }

    /// A server with exactly `config` (on a free port; `public_url` as given) over a database
    /// the caller keeps, with no merchant of its own (`api_key` is empty): for tests that run
    /// one deployment through several servers.
    pub async fn start_exactly(config: Config) -> TestServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("a free port");
        Self::launch(listener, config, None).await
    }

    async fn launch(listener: TcpListener, mut config: Config, database: Option<TestDatabase>) -> TestServer {
        let address = listener.local_addr().unwrap();
        config.listen = address;
        let state = AppState::open(config).await.expect("the service starts");
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(app::serve(state.clone(), listener, async move {
            let _ = stopped.await;
        }));
        TestServer {
            url: format!("http://{address}"),
            client: Client::new(),
            state,
            api_key: String::new(),
            merchant_id: Uuid::nil(),
            database,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Stops the server gracefully, waits for it, and removes its database (if it has one).
    pub async fn stop(mut self) {
        self.shut_down().await;
        let database = self.database.take();
        drop(self); // the store and its connections first
        if let Some(database) = database {
            database.remove().await;
        }
    }

    /// Stops the server gracefully and waits for it; answers its database for a restart.
    pub async fn stop_keeping_database(mut self) -> TestDatabase {
        self.shut_down().await;
        self.database.take().expect("the server has its database until it stops")
        // `self` (and with it the store and its connections) goes away here.
    }

    async fn shut_down(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.expect("the server task ends").expect("the server stops cleanly");
        }
    }

    /// The database behind the server.
    pub fn database(&self) -> &TestDatabase {
        self.database.as_ref().expect("the server has its database until it stops")
    }

    /// The store behind the server.
    pub fn store(&self) -> &DynStore {
        &self.state.store
    }

    /// The types of a session's events, oldest first, read from the database itself: the
    /// store has no use case that lists them (docs/DESIGN.md).
    pub async fn event_types(&self, session: Uuid) -> Vec<EventType> {
        const SQLITE: &str = "SELECT type FROM events WHERE session_id = ?1 ORDER BY created_on, id";
        const POSTGRES: &str = "SELECT type FROM events WHERE session_id = $1 ORDER BY created_on, id";
        let names: Vec<String> = match &self.state.config.database_url {
            DatabaseUrl::Sqlite { path } => {
                let flags = rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY;
                let connection = rusqlite::Connection::open_with_flags(path, flags).expect("the database opens");
                let mut statement = connection.prepare(SQLITE).expect("the events table");
                let rows = statement.query_map([session.as_bytes()], |row| row.get(0)).expect("the events");
                rows.map(|row| row.expect("an event type")).collect()
            }
            DatabaseUrl::Postgres(url) => {
                let rows = connect_postgres(url).await.query(POSTGRES, &[&session]).await.expect("the events");
                rows.iter().map(|row| row.get(0)).collect()
            }
        };
        names.iter().map(|name| EventType::parse(name).unwrap_or_else(|| panic!("unknown event type {name}"))).collect()
    }
    /// Another merchant; answers its key and id.
    pub async fn another_merchant(&self) -> (String, Uuid) {
        let created = admin::create_merchant(self.store(), "Other Shop").await.expect("the admin command works");
        (created["apiKey"].as_str().unwrap().to_owned(), created["merchantId"].as_str().unwrap().parse().unwrap())
    }

    /// A customer known to the service.
    pub async fn customer(&self) -> Uuid {
        let created = admin::create_customer(self.store(), "+4915112345678").await.expect("the admin command works");
        created["customerId"].as_str().unwrap().parse().unwrap()
    }

    /// A request to `path` (relative to the server) with the merchant's key.
    pub fn request(&self, method: Method, path: &str) -> RequestBuilder {
        self.client.request(method, format!("{}{path}", self.url)).header("x-api-key", &self.api_key)
    }

    /// A request to `path` (relative to the server) with the API key `key`.
    pub fn request_as(&self, method: Method, path: &str, key: &str) -> RequestBuilder {
        self.client.request(method, format!("{}{path}", self.url)).header("x-api-key", key)
    }

    /// `PUT` a session with `body` as the test merchant.
    pub async fn put_session(&self, id: Uuid, body: &Value) -> Response {
        self.request(Method::PUT, &format!("{BASE}/redirect-sessions/{id}")).json(body).send().await.unwrap()
    }

    /// `GET` a session as the test merchant.
    pub async fn get_session(&self, id: Uuid) -> Response {
        self.request(Method::GET, &format!("{BASE}/redirect-sessions/{id}")).send().await.unwrap()
    }

    /// `POST …/cancel` as the test merchant.
    pub async fn cancel_session(&self, id: Uuid) -> Response {
        self.request(Method::POST, &format!("{BASE}/redirect-sessions/{id}/cancel")).send().await.unwrap()
    }

    /// Creates a session with `new_transaction_intent()` and answers its id.
    /// The value of one series on `/metrics` (its name with any labels), if it is there.
    pub async fn metric(&self, series: &str) -> Option<f64> {
        let text = self.client.get(format!("{}/metrics", self.url)).send().await.unwrap().text().await.unwrap();
        text.lines().find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    pub async fn created_session(&self) -> Uuid {
        let id = Uuid::new_v4();
        let response = self.put_session(id, &new_transaction_intent()).await;
        assert_eq!(response.status(), 201, "{}", response.text().await.unwrap());
        id
    }
}

/// A valid `NewTransactionIntent` body.
pub fn new_transaction_intent() -> Value {
    json!({
        "type": "NewTransactionIntent",
        "transactionData": {"type": "PassthroughWithdrawal", "amount": 100.5, "currency": "EUR"},
        "redirectData": {
            "successUrl": "https://merchant.example/success",
            "failureUrl": "https://merchant.example/failure",
            "abortUrl": "https://merchant.example/abort",
            "qrCodeSuccessUrl": "https://merchant.example/qr"
        },
        "locale": "en-GB"
    })
}

/// A response's status and JSON body.
pub async fn status_and_json(response: Response) -> (u16, Value) {
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    let body = serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}"));
    (status, body)
}

/// Asserts an error answer: status, code, and the documented error body (a JSON body whose
/// `details` is always an object: `{}`, or only the members that apply).
pub async fn assert_error(response: Response, status: u16, code: &str) -> Value {
    let correlation = response.headers().get("x-correlation-id").map(|v| v.to_str().unwrap().to_owned());
    let content_type = response.headers().get("content-type").map(|v| v.to_str().unwrap().to_owned());
    let (actual, body) = status_and_json(response).await;
    assert_eq!((actual, body["code"].as_str().unwrap_or("")), (status, code), "{body}");
    assert_eq!(content_type.as_deref(), Some("application/json"), "{body}");
    assert_eq!(body["correlationId"].as_str(), correlation.as_deref(), "correlationId is x-correlation-id");
    assert!(body["moreInfo"].as_str().unwrap().ends_with(&format!("/docs/errors#{code}")), "{body}");
    let details = body["details"].as_object().unwrap_or_else(|| panic!("`details` must be an object: {body}"));
    for (member, value) in details {
        match member.as_str() {
            "validationErrorReasons" => {
                assert_eq!(code, "Validation", "only Validation lists reasons: {body}");
                assert!(value.as_array().is_some_and(|reasons| !reasons.is_empty()), "{body}");
            }
            other => panic!("`details` has an undocumented member {other}: {body}"),
        }
    }
    if code == "Validation" {
        assert!(details.contains_key("validationErrorReasons"), "Validation names the failing fields: {body}");
    }
    body
}

/// Waits until `check` holds, polling, or fails after `within`.
pub async fn eventually<F, Fut>(within: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    loop {
        if check().await {
            return;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
