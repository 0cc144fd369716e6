//! What the webhook tests share besides the harness: a real receiver (an axum server on
//! 127.0.0.1:0 that records every request and answers from a script) and small helpers for the
//! subscriptions and deliveries API.
#![allow(dead_code)]

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::serve::ListenerExt;
use axum::Router;
use reqwest::Method as ApiMethod;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use uuid::Uuid;

use crate::common::{status_and_json, TestServer, BASE};

/// How long a test waits for the dispatcher: it polls once a second for retries nobody woke
/// it for, so several attempts take several seconds.
pub const DELIVERY_DEADLINE: Duration = Duration::from_secs(20);
const POLL: Duration = Duration::from_millis(20);

/// The `apiKey` subscriptions in these tests give for their callbacks.
pub const CALLBACK_KEY: &str = "callback-key_7Fq:9+/=";

/// What the receiver answers one request with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reply {
    Status(u16),
    /// This status with `Retry-After: <seconds>`.
    RetryAfter(u16, u64),
    /// This status with `Location: /elsewhere` (a redirect, which must not be followed).
    Redirect(u16),
    /// Never answers, until `Receiver::release_silenced` (then `503`).
    Silence,
    /// Holds the request until `Receiver::release_silenced`, then answers this status (a
    /// receiver that is down but accepts connections, and comes back).
    Held(u16),
    /// This status after this many milliseconds (a slow receiver).
    Delayed(u16, u64),
}

/// One request the receiver got.
#[derive(Clone, Debug)]
pub struct Received {
    pub method: Method,
    pub path: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Received {
    /// A header's value; panics when it is missing or not text.
    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .unwrap_or_else(|| panic!("no {name} header in {:?}", self.headers))
            .to_str()
            .expect("a text header")
    }

    /// The body as JSON.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("the body is not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
}

#[derive(Default)]
struct Log {
    received: Vec<Received>,
    script: VecDeque<Reply>,
    otherwise: Option<Reply>,
}

struct Shared {
    log: Mutex<Log>,
    connections: AtomicUsize,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    /// Turns true when silenced requests may answer.
    released: tokio::sync::watch::Sender<bool>,
}

impl Default for Shared {
    fn default() -> Self {
        Shared {
            log: Mutex::default(),
            connections: AtomicUsize::new(0),
            in_flight: AtomicUsize::new(0),
            max_in_flight: AtomicUsize::new(0),
            released: tokio::sync::watch::Sender::new(false),
        }
    }
}

/// Counts a request out of flight however its handler ends (also when the caller hangs up).
struct InFlight(Arc<Shared>);

impl InFlight {
    fn start(shared: &Arc<Shared>) -> InFlight {
        let now = shared.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        shared.max_in_flight.fetch_max(now, Ordering::SeqCst);
        InFlight(shared.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A webhook receiver on 127.0.0.1:0. It answers from its script first, then with its
/// fallback reply; it counts TCP connections as well as requests.
pub struct Receiver {
    pub port: u16,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn receive(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let _in_flight = InFlight::start(&shared);
    let reply = {
        let mut log = shared.log.lock().unwrap();
        log.received.push(Received { method, path: uri.path().to_owned(), headers, body });
        let otherwise = log.otherwise.unwrap_or(Reply::Status(204));
        log.script.pop_front().unwrap_or(otherwise)
    };
    match reply {
        Reply::Status(code) => status(code).into_response(),
        Reply::RetryAfter(code, seconds) => (status(code), [("retry-after", seconds.to_string())]).into_response(),
        Reply::Redirect(code) => (status(code), [("location", "/elsewhere")]).into_response(),
        Reply::Silence => held(&shared, 503).await,
        Reply::Held(code) => held(&shared, code).await,
        Reply::Delayed(code, millis) => {
            tokio::time::sleep(Duration::from_millis(millis)).await;
            status(code).into_response()
        }
    }
}

/// Answers `code` once the receiver's held requests are released.
async fn held(shared: &Shared, code: u16) -> Response {
    let mut released = shared.released.subscribe();
    let _ = released.wait_for(|released| *released).await;
    status(code).into_response()
}

fn status(code: u16) -> StatusCode {
    StatusCode::from_u16(code).expect("a valid status")
}

impl Receiver {
    /// A receiver that answers `script` in turn and `otherwise` after that.
    pub async fn scripted(script: &[Reply], otherwise: Reply) -> Receiver {
        let shared = Arc::new(Shared::default());
        {
            let mut log = shared.log.lock().unwrap();
            log.script = script.iter().copied().collect();
            log.otherwise = Some(otherwise);
        }
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("a free port for the receiver");
        let port = listener.local_addr().unwrap().port();
        let counted = shared.clone();
        let listener = listener.tap_io(move |_| {
            counted.connections.fetch_add(1, Ordering::SeqCst);
        });
        let app = Router::new().fallback(receive).with_state(shared.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Receiver { port, shared, task }
    }

    /// A receiver that always answers `status`.
    pub async fn answering(status: u16) -> Receiver {
        Self::scripted(&[], Reply::Status(status)).await
    }

    /// A receiver that holds every request until `release_silenced`, then answers `status`.
    pub async fn holding(status: u16) -> Receiver {
        Self::scripted(&[], Reply::Held(status)).await
    }

    /// A receiver that answers `status` after `delay`.
    pub async fn answering_after(status: u16, delay: Duration) -> Receiver {
        Self::scripted(&[], Reply::Delayed(status, delay.as_millis() as u64)).await
    }

    /// A receiver that never answers.
    pub async fn silent() -> Receiver {
        Self::scripted(&[], Reply::Silence).await
    }

    /// `http://127.0.0.1:<port>/hook`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/hook", self.port)
    }

    /// Every request so far.
    pub fn received(&self) -> Vec<Received> {
        self.shared.log.lock().unwrap().received.clone()
    }

    /// The `webhook-id` of every request so far, in arrival order.
    pub fn ids(&self) -> Vec<String> {
        self.received().iter().map(|request| request.header("webhook-id").to_owned()).collect()
    }

    /// TCP connections accepted so far.
    pub fn connections(&self) -> usize {
        self.shared.connections.load(Ordering::SeqCst)
    }

    /// Requests being answered right now (silenced ones included).
    pub fn in_flight(&self) -> usize {
        self.shared.in_flight.load(Ordering::SeqCst)
    }

    /// The most requests that were in flight at once.
    pub fn max_in_flight(&self) -> usize {
        self.shared.max_in_flight.load(Ordering::SeqCst)
    }

    /// Silenced and held requests, those waiting and those to come, answer from now on
    /// (silenced ones `503`, held ones their status).
    pub fn release_silenced(&self) {
        self.shared.released.send_replace(true);
    }

    /// From now on (once the script is used up) answer with `reply`.
    pub fn answer_from_now_on(&self, reply: Reply) {
        let mut log = self.shared.log.lock().unwrap();
        log.script.clear();
        log.otherwise = Some(reply);
    }

    /// Waits until at least `count` requests arrived; answers all of them.
    pub async fn wait_for_requests(&self, count: usize) -> Vec<Received> {
        let deadline = Instant::now() + DELIVERY_DEADLINE;
        loop {
            let received = self.received();
            if received.len() >= count {
                return received;
            }
            assert!(
                Instant::now() < deadline,
                "the receiver got {} of {count} requests in time: {:?}",
                received.len(),
                received.iter().map(|r| String::from_utf8_lossy(&r.body).into_owned()).collect::<Vec<_>>()
            );
            tokio::time::sleep(POLL).await;
        }
    }
}

/// The path of a subscription.
pub fn subscription_path(id: Uuid) -> String {
    format!("{BASE}/redirect-session-events/subscriptions/{id}")
}

/// The path of the subscriptions list.
pub fn subscriptions_path() -> String {
    format!("{BASE}/redirect-session-events/subscriptions")
}

/// The path of the deliveries list.
pub fn deliveries_path() -> String {
    format!("{BASE}/redirect-session-events/deliveries")
}

/// The path to redeliver a delivery.
pub fn redeliver_path(id: &str) -> String {
    format!("{BASE}/redirect-session-events/deliveries/{id}/redeliver")
}

/// A PUT/PATCH body.
pub fn subscription_body(callback_url: &str, api_key: &str, event_types: &[&str]) -> Value {
    json!({"callbackUrl": callback_url, "apiKey": api_key, "eventTypes": event_types})
}

/// `PUT` a subscription as the test merchant.
pub async fn put_subscription(server: &TestServer, id: Uuid, body: &Value) -> reqwest::Response {
    put_subscription_as(server, &server.api_key, id, body).await
}

/// `PUT` a subscription with the merchant key `key`.
pub async fn put_subscription_as(server: &TestServer, key: &str, id: Uuid, body: &Value) -> reqwest::Response {
    let url = format!("{}{}", server.url, subscription_path(id));
    server.client.put(url).header("x-api-key", key).json(body).send().await.unwrap()
}

/// Subscribes `callback_url` to `event_types` with `CALLBACK_KEY`; answers the id and the
/// signing secret.
pub async fn subscribe(server: &TestServer, callback_url: &str, event_types: &[&str]) -> (Uuid, String) {
    subscribe_as(server, &server.api_key, callback_url, event_types).await
}

/// Like `subscribe`, for the merchant with the key `key`.
pub async fn subscribe_as(server: &TestServer, key: &str, callback_url: &str, event_types: &[&str]) -> (Uuid, String) {
    let id = Uuid::new_v4();
    let body = subscription_body(callback_url, CALLBACK_KEY, event_types);
    let (status, body) = status_and_json(put_subscription_as(server, key, id, &body).await).await;
    assert_eq!(status, 201, "{body}");
    (id, body["signingSecret"].as_str().expect("a signing secret in the 201").to_owned())
}

/// `DELETE` a subscription; it must answer 200.
pub async fn unsubscribe(server: &TestServer, id: Uuid) {
    let response = server.request(ApiMethod::DELETE, &subscription_path(id)).send().await.unwrap();
    let (status, body) = status_and_json(response).await;
    assert_eq!(status, 200, "{body}");
}

/// The items of `GET …/deliveries?<query>` as the test merchant; it must answer 200.
pub async fn deliveries(server: &TestServer, query: &str) -> Vec<Value> {
    deliveries_as(server, &server.api_key, query).await
}

/// The items of `GET …/deliveries?<query>` with the merchant key `key`; it must answer 200.
pub async fn deliveries_as(server: &TestServer, key: &str, query: &str) -> Vec<Value> {
    let page = deliveries_page_as(server, key, query).await;
    page["items"].as_array().unwrap_or_else(|| panic!("no items: {page}")).clone()
}

/// The page of `GET …/deliveries?<query>` as the test merchant; it must answer 200.
pub async fn deliveries_page(server: &TestServer, query: &str) -> Value {
    deliveries_page_as(server, &server.api_key, query).await
}

async fn deliveries_page_as(server: &TestServer, key: &str, query: &str) -> Value {
    let url = format!("{}{}?{query}", server.url, deliveries_path());
    let response = server.client.get(url).header("x-api-key", key).send().await.unwrap();
    let (status, page) = status_and_json(response).await;
    assert_eq!(status, 200, "{page}");
    page
}

/// Waits until the one delivery of `subscription` satisfies `done`; answers it.
pub async fn wait_for_delivery(
    server: &TestServer,
    subscription: Uuid,
    what: &str,
    done: impl Fn(&Value) -> bool,
) -> Value {
    wait_for_delivery_as(server, &server.api_key, subscription, what, done).await
}

/// Like `wait_for_delivery`, listing with the merchant key `key`.
pub async fn wait_for_delivery_as(
    server: &TestServer,
    key: &str,
    subscription: Uuid,
    what: &str,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + DELIVERY_DEADLINE;
    loop {
        let items = deliveries_as(server, key, &format!("subscriptionId={subscription}")).await;
        if let [delivery] = items.as_slice() {
            if done(delivery) {
                return delivery.clone();
            }
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}; the deliveries are {items:?}");
        tokio::time::sleep(POLL).await;
    }
}

/// Whether a delivery is in `state`.
pub fn in_state(state: &'static str) -> impl Fn(&Value) -> bool {
    move |delivery| delivery["state"] == state
}

/// The status codes of a delivery's attempts (None where there was no answer).
pub fn attempt_statuses(delivery: &Value) -> Vec<Option<u64>> {
    attempts(delivery).iter().map(|a| a.get("statusCode").map(|s| s.as_u64().expect("a number"))).collect()
}

/// A delivery's attempts.
pub fn attempts(delivery: &Value) -> &Vec<Value> {
    delivery["attempts"].as_array().unwrap_or_else(|| panic!("no attempts array: {delivery}"))
}

/// The `v1,…` entries of a request's `webhook-signature`, and whether each verifies with `secret`.
pub fn verifying_entries(request: &Received, secret: &str) -> Vec<bool> {
    let key = redirect_sessions::webhooks::signature::secret_key(secret).expect("a usable secret");
    let timestamp: i64 = request.header("webhook-timestamp").parse().expect("webhook-timestamp is unix seconds");
    let (id, body) = (request.header("webhook-id"), &request.body);
    let verify = |entry| redirect_sessions::webhooks::signature::verify(&key, id, timestamp, body, entry);
    request.header("webhook-signature").split(' ').map(verify).collect()
}

/// The member names of a JSON object, in order.
pub fn members(body: &Value) -> Vec<&str> {
    body.as_object().unwrap_or_else(|| panic!("not an object: {body}")).keys().map(String::as_str).collect()
}

/// The `fieldName`s of a validation error body, in order.
pub fn field_names(error: &Value) -> Vec<String> {
    error["details"]["validationErrorReasons"]
        .as_array()
        .unwrap_or_else(|| panic!("no validationErrorReasons: {error}"))
        .iter()
        .map(|reason| reason["fieldName"].as_str().unwrap().to_owned())
        .collect()
}
