//! No secret reaches the log (docs/OPERATIONS.md "Health and metrics"): the real binary at the
//! most talkative log level goes through a whole life — a merchant, a webhook subscription,
//! sessions, the hosted page with a one-time code sent over the `http` sender (once failing),
//! webhook deliveries (once failing) — and then none of the secrets it handled appears in
//! anything it printed.

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::common::binary::{address_in, command, run, DEADLINE};
use crate::common::{fresh_database_url, new_transaction_intent, BASE};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::Router;
use reqwest::Client;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use uuid::Uuid;

/// The most talkative filter: everything at debug, this crate at trace.
const LOG: &str = "debug,redirect_sessions=trace";
/// The bearer token of the one-time-code gateway.
const OTP_TOKEN: &str = "otp-gateway-token_Hk29fQx7Lm";
/// The `apiKey` the subscription gives for its callbacks.
const SUBSCRIPTION_KEY: &str = "callback-secret_Vb83:Wq+/=Jt";
/// The customer's phone as typed, and as the service reads it.
const PHONE_TYPED: &str = "0151 23456789";
const PHONE: &str = "+4915123456789";

// ---------------------------------------------------------------------------------------------
// Receivers: the code gateway and the webhook endpoint (each fails its first request)
// ---------------------------------------------------------------------------------------------

#[derive(Default)]
struct Received {
    /// Code gateway requests: (authorization, body).
    codes: Mutex<Vec<(Option<String>, Value)>>,
    /// Webhook requests: (x-api-key, body, answered status).
    callbacks: Mutex<Vec<(Option<String>, Value, u16)>>,
    code_calls: AtomicUsize,
    callback_calls: AtomicUsize,
}

fn header(headers: &HeaderMap, name: &str) -> Option<String> {
    headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned)
}

async fn receive_code(State(received): State<Arc<Received>>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let body = serde_json::from_slice(&body).expect("the code gateway gets JSON");
    received.codes.lock().unwrap().push((header(&headers, "authorization"), body));
    // The first code fails to go out: the failure path logs too.
    match received.code_calls.fetch_add(1, Ordering::SeqCst) {
        0 => StatusCode::INTERNAL_SERVER_ERROR,
        _ => StatusCode::OK,
    }
}

async fn receive_callback(State(received): State<Arc<Received>>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let body = serde_json::from_slice(&body).expect("a callback is JSON");
    // The first callback fails: the retry path logs too.
    let status = match received.callback_calls.fetch_add(1, Ordering::SeqCst) {
        0 => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::OK,
    };
    received.callbacks.lock().unwrap().push((header(&headers, "x-api-key"), body, status.as_u16()));
    status
}

/// Both receivers on one `127.0.0.1:0` server; answers its base URL.
async fn start_receivers(received: Arc<Received>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let app =
        Router::new().route("/otp", post(receive_code)).route("/hook", post(receive_callback)).with_state(received);
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    format!("http://{address}")
}

// ---------------------------------------------------------------------------------------------
// The binary, with stdout and stderr both captured
// ---------------------------------------------------------------------------------------------

/// A running `serve` whose every output line (stdout and stderr) is kept; killed when dropped.
struct Captured {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    readers: Vec<JoinHandle<()>>,
    url: String,
}

impl Captured {
    async fn start(mut command: Command) -> Captured {
        command.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = command.spawn().expect("the binary starts");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let readers = vec![
            collect(child.stdout.take().unwrap(), lines.clone()),
            collect(child.stderr.take().unwrap(), lines.clone()),
        ];
        let mut captured = Captured { child, lines, readers, url: String::new() };
        let deadline = Instant::now() + DEADLINE;
        loop {
            // The API listener's line: other lines say "listening" too (the metrics listener, and
            // on PostgreSQL the wake-up channel), but only this one names an address.
            let listening = captured
                .lines()
                .into_iter()
                .filter(|l| l.contains("listening") && !l.contains("metrics"))
                .find_map(|l| address_in(&l));
            if let Some(address) = listening {
                captured.url = format!("http://{address}");
                return captured;
            }
            if let Some(status) = captured.child.try_wait().unwrap() {
                panic!("serve exited with {status} before listening: {:?}", captured.lines());
            }
            assert!(Instant::now() < deadline, "serve did not log `listening`: {:?}", captured.lines());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    /// SIGTERM, then waits for the exit and for the last line of both streams.
    async fn stop(mut self) -> Vec<String> {
        let signalled = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status().unwrap();
        assert!(signalled.success());
        let deadline = Instant::now() + DEADLINE;
        while self.child.try_wait().unwrap().is_none() {
            assert!(Instant::now() < deadline, "serve did not stop: {:?}", self.lines());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        for reader in self.readers.drain(..) {
            reader.join().unwrap();
        }
        self.lines()
    }
}

impl Drop for Captured {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

fn collect(pipe: impl Read + Send + 'static, lines: Arc<Mutex<Vec<String>>>) -> JoinHandle<()> {
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines() {
            match line {
                Ok(line) => lines.lock().unwrap().push(line),
                Err(_) => break,
            }
        }
    })
}

// ---------------------------------------------------------------------------------------------
// The customer's browser
// ---------------------------------------------------------------------------------------------

struct Browser {
    client: Client,
    base: String,
    /// `<nonce>.<token>`, the value of `rs_pay`.
    cookie: String,
    csrf: String,
}

fn form(fields: &[(&str, &str)]) -> String {
    url::form_urlencoded::Serializer::new(String::new()).extend_pairs(fields).finish()
}

impl Browser {
    /// Arrives with `token` the way the merchant's helper does (`POST /pay`), then reads the page.
    async fn arrive(base: &str, token: &str) -> Browser {
        let client = Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
        let arrived = client
            .post(format!("{base}/pay"))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(form(&[("token", token)]))
            .send()
            .await
            .unwrap();
        assert_eq!(arrived.status(), 303);
        let set = arrived.headers().get("set-cookie").expect("a cookie").to_str().unwrap();
        let cookie = set.split(';').next().unwrap().strip_prefix("rs_pay=").expect("the rs_pay cookie").to_owned();
        let page = client.get(format!("{base}/pay")).header("cookie", format!("rs_pay={cookie}")).send().await.unwrap();
        assert_eq!(page.status(), 200);
        let html = page.text().await.unwrap();
        let marker = "name=\"csrf\" value=\"";
        let start = html.find(marker).unwrap_or_else(|| panic!("no csrf field: {html}")) + marker.len();
        let csrf = html[start..].split('"').next().unwrap().to_owned();
        Browser { client, base: base.to_owned(), cookie, csrf }
    }

    /// Submits a form of the page with the CSRF token; answers the status.
    async fn submit(&self, path: &str, fields: &[(&str, &str)]) -> u16 {
        let mut all = vec![("csrf", self.csrf.as_str())];
        all.extend_from_slice(fields);
        let response = self
            .client
            .post(format!("{}{path}", self.base))
            .header("cookie", format!("rs_pay={}", self.cookie))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(form(&all))
            .send()
            .await
            .unwrap();
        response.status().as_u16()
    }
}

// ---------------------------------------------------------------------------------------------
// The test
// ---------------------------------------------------------------------------------------------

/// Where `secret` appears in `lines`: as a substring, or for a purely numeric secret (the
/// one-time code) as a number of its own, so that a timestamp's digits do not count.
fn leaks<'l>(lines: &'l [String], secret: &str) -> Vec<&'l String> {
    let numeric = secret.bytes().all(|b| b.is_ascii_digit());
    lines
        .iter()
        .filter(|line| {
            line.match_indices(secret).any(|(at, _)| {
                if !numeric {
                    return true;
                }
                let before = line[..at].chars().next_back();
                let after = line[at + secret.len()..].chars().next();
                !before.is_some_and(|c| c.is_ascii_alphanumeric()) && !after.is_some_and(|c| c.is_ascii_alphanumeric())
            })
        })
        .collect()
}

async fn put_session(client: &Client, base: &str, key: &str) -> (Uuid, String) {
    let id = Uuid::new_v4();
    let created = client
        .put(format!("{base}{BASE}/redirect-sessions/{id}"))
        .header("x-api-key", key)
        .json(&new_transaction_intent())
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    let body: Value = created.json().await.unwrap();
    (id, body["token"].as_str().expect("a token").to_owned())
}

#[tokio::test]
async fn no_secret_reaches_the_log_even_at_trace() {
    let (database_url, _database) = fresh_database_url();
    let received = Arc::new(Received::default());
    let receivers = start_receivers(received.clone()).await;
    let (merchant_key, mut output) = create_merchant(&database_url);
    let served = Captured::start(serve_talkatively(&database_url, &receivers)).await;
    let base = served.url.clone();
    let client = Client::new();
    let signing_secret = subscribe(&client, &base, &merchant_key, &receivers).await;

    // A session the customer pays on the hosted page.
    let (paid, paid_token) = put_session(&client, &base, &merchant_key).await;
    let browser = Browser::arrive(&base, &paid_token).await;
    assert_eq!(browser.submit("/pay/code", &[("phone", PHONE_TYPED)]).await, 502, "the gateway fails once");
    assert_eq!(browser.submit("/pay/code", &[("phone", PHONE_TYPED)]).await, 303);
    let codes = codes_sent(&received, paid);
    let code = codes.last().unwrap().clone();
    let wrong = if code == "000000" { "111111" } else { "000000" };
    assert_eq!(browser.submit("/pay/verify", &[("code", wrong)]).await, 400);
    assert_eq!(browser.submit("/pay/verify", &[("code", &code)]).await, 303);
    assert_eq!(browser.submit("/pay/confirm", &[]).await, 303);

    // Another session, cancelled by the merchant; and a read of one that does not exist.
    let (cancelled, cancelled_token) = put_session(&client, &base, &merchant_key).await;
    let cancel = client
        .post(format!("{base}{BASE}/redirect-sessions/{cancelled}/cancel"))
        .header("x-api-key", &merchant_key)
        .send()
        .await
        .unwrap();
    assert_eq!(cancel.status(), 200);
    let missing = client
        .get(format!("{base}{BASE}/redirect-sessions/{}", Uuid::new_v4()))
        .header("x-api-key", &merchant_key)
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    wait_for_deliveries(&received, &served, &[paid, cancelled]).await;

    output.extend(served.stop().await);
    // The filter was really that talkative: debug lines of the crate are there.
    for expected in ["webhook delivered", "redirect session cancelled", "webhook attempt failed; will retry"] {
        assert!(output.iter().any(|l| l.contains(expected)), "no {expected:?} line in {output:#?}");
    }
    assert!(output.iter().any(|l| l.contains("a one-time code could not be sent")), "{output:#?}");

    let signature_of = |token: &str| token.rsplit('.').next().unwrap().to_owned();
    let mut secrets = vec![
        ("the merchant API key", merchant_key.clone()),
        ("the subscription's apiKey", SUBSCRIPTION_KEY.to_owned()),
        ("the signing secret", signing_secret.clone()),
        ("the signing secret's key", signing_secret.trim_start_matches("whsec_").to_owned()),
        ("a session token", paid_token.clone()),
        ("a session token's signature", signature_of(&paid_token)),
        ("a session token", cancelled_token.clone()),
        ("a session token's signature", signature_of(&cancelled_token)),
        ("the cookie", browser.cookie.clone()),
        ("the CSRF nonce", browser.csrf.clone()),
        ("the one-time code gateway's token", OTP_TOKEN.to_owned()),
        ("the customer's phone", PHONE.to_owned()),
    ];
    secrets.extend(codes.iter().map(|code| ("a one-time code", code.clone())));
    secrets.extend(harness_secrets_keys().into_iter().map(|key| ("the secrets key", key)));
    let found: Vec<String> = secrets
        .iter()
        .flat_map(|(what, secret)| leaks(&output, secret).into_iter().map(move |line| format!("{what}: {line}")))
        .collect();
    assert!(found.is_empty(), "secrets in the log:\n{}", found.join("\n"));
}

/// A merchant, from the CLI at the test's log level: its key (the one thing it prints on
/// stdout, on purpose) and what it logged.
fn create_merchant(database_url: &str) -> (String, Vec<String>) {
    let mut create = command(&["merchant", "create", "--name", "Leak Check Shop", "--database-url", database_url]);
    create.env("REDIRECT_SESSIONS_LOG", LOG);
    let created = run(create);
    assert_eq!(created.code, Some(0), "{created:?}");
    let merchant_key = created.single_json_line()["apiKey"].as_str().unwrap().to_owned();
    (merchant_key, created.stderr.lines().map(str::to_owned).collect())
}

/// `serve` logging everything, sending codes to the test's gateway and retrying webhooks fast.
fn serve_talkatively(database_url: &str, receivers: &str) -> Command {
    let otp_url = format!("{receivers}/otp");
    let mut serve = command(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--database-url",
        database_url,
        "--log",
        LOG,
        "--otp-sender",
        "http",
        "--otp-http-url",
        &otp_url,
        "--otp-http-token",
        OTP_TOKEN,
        "--allow-private-callbacks",
        "--allow-http-redirect-urls",
        "--webhook-retry-schedule",
        "1s,1s,1s",
    ]);
    serve.env("RUST_LOG", "trace");
    serve
}

/// A subscription to the test's receiver; answers its signing secret (shown in the 201 only).
async fn subscribe(client: &Client, base: &str, merchant_key: &str, receivers: &str) -> String {
    let subscription = client
        .put(format!("{base}{BASE}/redirect-session-events/subscriptions/{}", Uuid::new_v4()))
        .header("x-api-key", merchant_key)
        .json(&json!({
            "callbackUrl": format!("{receivers}/hook"),
            "apiKey": SUBSCRIPTION_KEY,
            "eventTypes": ["RedirectSessionCancelled", "RedirectSessionCompleted"]
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(subscription.status(), 201);
    let subscription: Value = subscription.json().await.unwrap();
    subscription["signingSecret"].as_str().expect("a signing secret").to_owned()
}

/// The codes the gateway got for `session`, each sent with the gateway's token to the phone.
fn codes_sent(received: &Received, session: Uuid) -> Vec<String> {
    let sent = received.codes.lock().unwrap();
    assert_eq!(sent.len(), 2);
    for (authorization, body) in sent.iter() {
        assert_eq!(authorization.as_deref(), Some(format!("Bearer {OTP_TOKEN}").as_str()));
        assert_eq!(body["phone"], PHONE);
        assert_eq!(body["redirectSessionId"], session.to_string());
    }
    sent.iter().map(|(_, body)| body["code"].as_str().unwrap().to_owned()).collect()
}

/// Waits until the events of every session in `sessions` were delivered (a first attempt
/// fails and is retried), each with the subscription's key.
async fn wait_for_deliveries(received: &Received, served: &Captured, sessions: &[Uuid]) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let delivered: Vec<String> = received
            .callbacks
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, _, status)| *status == 200)
            .map(|(key, body, _)| {
                assert_eq!(key.as_deref(), Some(SUBSCRIPTION_KEY));
                body["data"]["id"].as_str().unwrap().to_owned()
            })
            .collect();
        if sessions.iter().all(|id| delivered.contains(&id.to_string())) {
            return;
        }
        assert!(Instant::now() < deadline, "the webhooks were not delivered: {:?}", served.lines());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The keys that encrypt secrets at rest, when the harness gives the binary some.
fn harness_secrets_keys() -> Vec<String> {
    command(&[])
        .get_envs()
        .filter_map(|(name, value)| Some((name.to_str()?.to_owned(), value?.to_str()?.to_owned())))
        .filter(|(name, _)| name.starts_with("REDIRECT_SESSIONS_SECRETS"))
        .map(|(_, value)| value)
        .collect()
}
