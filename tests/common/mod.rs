//! The test harness: a real server on port 0 over a fresh database, a merchant with its key,
//! and small helpers to call the API. Each test binary includes this module.
#![allow(dead_code)]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use redirect_sessions::admin;
use redirect_sessions::app::{self, AppState};
use redirect_sessions::config::{Config, DatabaseUrl};
use redirect_sessions::store::DynStore;
use reqwest::{Client, Method, RequestBuilder, Response};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use uuid::Uuid;

/// The merchant API's base path.
pub const BASE: &str = "/customer-authentication-service/v1";

/// A running server and what a test needs to talk to it.
pub struct TestServer {
    pub url: String,
    pub client: Client,
    pub state: AppState,
    /// The key of a merchant created at start.
    pub api_key: String,
    pub merchant_id: Uuid,
    pub database: PathBuf,
    _dir: Option<tempfile::TempDir>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<std::io::Result<()>>>,
}

/// The settings tests start from: a fresh SQLite database, no rate limits, http redirect
/// URLs and private callbacks allowed.
pub fn test_config(database: &std::path::Path) -> Config {
    let mut config = Config::defaults();
    config.database_url = DatabaseUrl::Sqlite { path: database.to_owned() };
    config.rate_limit_per_key = 0;
    config.rate_limit_per_ip = 0;
    config.allow_http_redirect_urls = true;
    config.allow_private_callbacks = true;
    config
}

impl TestServer {
    /// A server with the test settings.
    pub async fn start() -> TestServer {
        Self::start_with(|_| {}).await
    }

    /// A server with the test settings changed by `adjust`.
    pub async fn start_with(adjust: impl FnOnce(&mut Config)) -> TestServer {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let database = dir.path().join("test.db");
        let mut config = test_config(&database);
        adjust(&mut config);
        let mut server = Self::start_on(config, database).await;
        server._dir = Some(dir);
        server
    }

    /// A server over an existing database file (for restart tests), with `config`.
    pub async fn start_on(mut config: Config, database: PathBuf) -> TestServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("a free port");
        let address = listener.local_addr().unwrap();
        config.listen = address;
        config.public_url = format!("http://{address}").parse().unwrap();
        let state = AppState::open(config).await.expect("the service starts");
        let created = admin::create_merchant(&state.store, "Test Shop").await.expect("a merchant");
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(app::serve(state.clone(), listener, async move {
            let _ = stopped.await;
        }));
        TestServer {
            url: format!("http://{address}"),
            client: Client::new(),
            state,
            api_key: created["apiKey"].as_str().unwrap().to_owned(),
            merchant_id: created["merchantId"].as_str().unwrap().parse().unwrap(),
            database,
            _dir: None,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Stops the server gracefully and waits for it.
    pub async fn stop(mut self) -> (PathBuf, Option<tempfile::TempDir>) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.expect("the server task ends").expect("the server stops cleanly");
        }
        (self.database.clone(), self._dir.take())
    }

    /// The store behind the server.
    pub fn store(&self) -> &DynStore {
        &self.state.store
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
            "abortUrl": "https://merchant.example/abort"
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

/// Asserts an error answer: status, code, and the documented error body.
pub async fn assert_error(response: Response, status: u16, code: &str) -> Value {
    let correlation = response.headers().get("x-correlation-id").map(|v| v.to_str().unwrap().to_owned());
    let (actual, body) = status_and_json(response).await;
    assert_eq!((actual, body["code"].as_str().unwrap_or("")), (status, code), "{body}");
    assert_eq!(body["correlationId"].as_str(), correlation.as_deref(), "correlationId is x-correlation-id");
    assert!(body["moreInfo"].as_str().unwrap().ends_with(&format!("/docs/errors#{code}")), "{body}");
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
