//! The hosted page (`/pay`) end to end: a customer's browser — plain HTTP that keeps its own
//! cookie and CSRF token and does not follow redirects — against a real server, with one-time
//! codes delivered to a gateway in the test (the `http` sender). The merchant's view of each
//! session is read through the merchant API, its events from the store.

use std::fmt;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::common::*;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::Router;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use futures_util::future::join_all;
use redirect_sessions::config::{Config, OtpSender};
use redirect_sessions::domain::otp;
use redirect_sessions::domain::token::{Claims, KeyPair, Keyring};
use reqwest::{Client, Method};
use serde_json::{json, Value};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use uuid::Uuid;

/// The bearer token the code gateway expects.
const GATEWAY_TOKEN: &str = "t0k3n";
/// The phone of `server.customer()`.
const KNOWN_PHONE: &str = "+4915112345678";
const SUCCESS_URL: &str = "https://merchant.example/success";
const FAILURE_URL: &str = "https://merchant.example/failure";
const ABORT_URL: &str = "https://merchant.example/abort";
const QR_SUCCESS_URL: &str = "https://shop.example.org/qr-done";
const COMPLETED: &str = "RedirectSessionCompleted";
const CANCELLED: &str = "RedirectSessionCancelled";
const EXPIRED: &str = "RedirectSessionExpired";
const ABORTED: &str = "RedirectSessionAborted";

// ---------------------------------------------------------------------------------------------
// The code gateway: where the `http` sender posts one-time codes
// ---------------------------------------------------------------------------------------------

/// One code the service posted to the gateway.
#[derive(Clone, Debug)]
struct Sent {
    body: Value,
    authorization: Option<String>,
    /// What the gateway answered.
    answered: u16,
}

impl Sent {
    fn code(&self) -> String {
        self.body["code"].as_str().unwrap_or_else(|| panic!("no code in {}", self.body)).to_owned()
    }
}

struct GatewayLog {
    sent: Mutex<Vec<Sent>>,
    status: AtomicU16,
}

/// An SMS gateway on 127.0.0.1:0 that records every request and answers a configurable status.
struct Gateway {
    port: u16,
    log: Arc<GatewayLog>,
    task: JoinHandle<()>,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn gateway_receive(State(log): State<Arc<GatewayLog>>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let answered = log.status.load(Ordering::SeqCst);
    let body = serde_json::from_slice(&body).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into()));
    let authorization = headers.get("authorization").and_then(|v| v.to_str().ok()).map(str::to_owned);
    log.sent.lock().unwrap().push(Sent { body, authorization, answered });
    StatusCode::from_u16(answered).expect("a valid status")
}

impl Gateway {
    /// A gateway that accepts every code (200).
    async fn start() -> Gateway {
        let log = Arc::new(GatewayLog { sent: Mutex::new(Vec::new()), status: AtomicU16::new(200) });
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("a free port for the gateway");
        let port = listener.local_addr().unwrap().port();
        let app = Router::new().route("/otp", post(gateway_receive)).with_state(log.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Gateway { port, log, task }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/otp", self.port)
    }

    /// From now on answer `status`.
    fn answer(&self, status: u16) {
        self.log.status.store(status, Ordering::SeqCst);
    }

    fn sent(&self) -> Vec<Sent> {
        self.log.sent.lock().unwrap().clone()
    }

    /// The codes posted for `session`, in order.
    fn sent_for(&self, session: Uuid) -> Vec<Sent> {
        self.sent().into_iter().filter(|s| s.body["redirectSessionId"] == session.to_string()).collect()
    }

    /// The last code the gateway accepted for `session`.
    fn code(&self, session: Uuid) -> String {
        let sent = self.sent_for(session);
        let accepted = sent.iter().rev().find(|s| s.answered == 200);
        accepted.unwrap_or_else(|| panic!("no code was accepted for {session}: {sent:?}")).code()
    }
}

/// A server whose codes go to `gateway` with the bearer token, with `adjust` on top.
async fn server_with(gateway: &Gateway, adjust: impl FnOnce(&mut Config)) -> TestServer {
    let url: url::Url = gateway.url().parse().unwrap();
    TestServer::start_with(move |config| {
        config.otp_sender = OtpSender::Http { url, token: Some(GATEWAY_TOKEN.to_owned()) };
        adjust(config);
    })
    .await
}

async fn server(gateway: &Gateway) -> TestServer {
    server_with(gateway, |_| {}).await
}

// ---------------------------------------------------------------------------------------------
// Answers and the bits of HTML the tests look at
// ---------------------------------------------------------------------------------------------

/// A whole answer of the server.
struct Answer {
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: String,
}

impl fmt::Debug for Answer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (location {:?}) {}", self.status, self.header("location"), self.body)
    }
}

impl Answer {
    async fn of(response: reqwest::Response) -> Answer {
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        Answer { status, headers, body: response.text().await.unwrap() }
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.to_str().expect("a text header"))
    }

    /// Asserts `303 See Other` to `location`.
    fn assert_see_other(&self, location: &str) {
        assert_eq!((self.status, self.header("location")), (303, Some(location)), "{self:?}");
    }

    /// Asserts an HTML page with `status`.
    fn assert_page(&self, status: u16) {
        assert_eq!(self.status, status, "{self:?}");
        assert_eq!(self.header("content-type"), Some("text/html; charset=utf-8"), "{self:?}");
    }

    /// Asserts an HTML page with `status` that shows the element `id`.
    fn assert_page_with(&self, status: u16, id: &str) {
        self.assert_page(status);
        assert!(self.has(id), "no id={id:?} in {self:?}");
    }

    fn has(&self, id: &str) -> bool {
        self.body.contains(&format!("id=\"{id}\""))
    }

    /// The start tag of the element `id`.
    fn tag(&self, id: &str) -> &str {
        let at = self.body.find(&format!("id=\"{id}\"")).unwrap_or_else(|| panic!("no id={id:?} in {self:?}"));
        let start = self.body[..at].rfind('<').unwrap();
        let end = at + self.body[at..].find('>').unwrap();
        &self.body[start..=end]
    }

    /// An attribute of the element `id`, unescaped.
    fn attr(&self, id: &str, name: &str) -> String {
        let tag = self.tag(id);
        let needle = format!(" {name}=\"");
        let at = tag.find(&needle).unwrap_or_else(|| panic!("no {name} in {tag}")) + needle.len();
        unescape(&tag[at..at + tag[at..].find('"').unwrap()])
    }

    /// The text right inside the element `id` (up to the next tag), unescaped.
    fn text(&self, id: &str) -> String {
        let at = self.body.find(&format!("id=\"{id}\"")).unwrap_or_else(|| panic!("no id={id:?} in {self:?}"));
        text_after(&self.body[at..])
    }

    /// The page's alert (`.message`), if it shows one.
    fn message(&self) -> Option<String> {
        self.body.find("class=\"message\"").map(|at| text_after(&self.body[at..]))
    }

    /// Where the page's `id="back"` link goes.
    fn back(&self) -> String {
        self.attr("back", "href")
    }

    /// The `lang` of the page's `<html>`.
    fn lang(&self) -> String {
        let at = self.body.find("<html lang=\"").unwrap_or_else(|| panic!("no <html lang> in {self:?}")) + 12;
        self.body[at..at + self.body[at..].find('"').unwrap()].to_owned()
    }
}

fn text_after(from_tag: &str) -> String {
    let start = from_tag.find('>').unwrap() + 1;
    let end = start + from_tag[start..].find('<').unwrap();
    unescape(from_tag[start..end].trim())
}

fn unescape(text: &str) -> String {
    text.replace("&quot;", "\"")
        .replace("&#39;", "'")
        .replace("&#x27;", "'")
        .replace("&#x2f;", "/")
        .replace("&#47;", "/")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&amp;", "&")
}

// ---------------------------------------------------------------------------------------------
// A customer's browser
// ---------------------------------------------------------------------------------------------

/// A browser on the hosted page: its own cookie (`rs_pay`), redirects not followed.
struct Browser {
    client: Client,
    base: String,
    /// `rs_pay=<nonce>.<token>`, once set.
    cookie: Option<String>,
}

fn no_redirects() -> Client {
    Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap()
}

fn form(fields: &[(&str, &str)]) -> String {
    url::form_urlencoded::Serializer::new(String::new()).extend_pairs(fields).finish()
}

impl Browser {
    fn new(base: &str) -> Browser {
        Browser { client: no_redirects(), base: base.to_owned(), cookie: None }
    }

    /// The CSRF nonce of the cookie.
    fn csrf(&self) -> String {
        let cookie = self.cookie.as_deref().expect("the browser has its cookie");
        let value = cookie.strip_prefix("rs_pay=").unwrap();
        value.split_once('.').unwrap().0.to_owned()
    }

    /// Keeps the `rs_pay` cookie an answer sets.
    fn keep_cookie(&mut self, answer: &Answer) {
        if let Some(set) = answer.header("set-cookie") {
            let pair = set.split(';').next().unwrap().trim();
            if pair.starts_with("rs_pay=") {
                self.cookie = Some(pair.to_owned());
            }
        }
    }

    fn with_cookie(&self, request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.cookie {
            Some(cookie) => request.header("cookie", cookie),
            None => request,
        }
    }

    /// `GET /pay?token=…`.
    async fn arrive(&mut self, token: &str) -> Answer {
        let url = format!("{}/pay?{}", self.base, form(&[("token", token)]));
        let answer = Answer::of(self.with_cookie(self.client.get(url)).send().await.unwrap()).await;
        self.keep_cookie(&answer);
        answer
    }

    /// `POST /pay` with the form field `token` (the merchant's helper script).
    async fn arrive_by_form(&mut self, token: &str) -> Answer {
        let answer = self.post_raw("/pay", "application/x-www-form-urlencoded", form(&[("token", token)])).await;
        self.keep_cookie(&answer);
        answer
    }

    /// `GET /pay`: the current step.
    async fn page(&self) -> Answer {
        let request = self.client.get(format!("{}/pay", self.base));
        Answer::of(self.with_cookie(request).send().await.unwrap()).await
    }

    /// A POST with this body and content type, with the cookie (when there is one).
    async fn post_raw(&self, path: &str, content_type: &str, body: String) -> Answer {
        let request = self.client.post(format!("{}{path}", self.base)).header("content-type", content_type).body(body);
        Answer::of(self.with_cookie(request).send().await.unwrap()).await
    }

    /// Submits a form of the page: `fields` and the CSRF token.
    async fn submit(&self, path: &str, fields: &[(&str, &str)]) -> Answer {
        let csrf = self.csrf();
        let mut all = vec![("csrf", csrf.as_str())];
        all.extend_from_slice(fields);
        self.post_raw(path, "application/x-www-form-urlencoded", form(&all)).await
    }

    async fn send_code(&self, phone: Option<&str>) -> Answer {
        match phone {
            Some(phone) => self.submit("/pay/code", &[("phone", phone)]).await,
            None => self.submit("/pay/code", &[]).await,
        }
    }

    async fn verify(&self, code: &str) -> Answer {
        self.submit("/pay/verify", &[("code", code)]).await
    }

    async fn confirm(&self) -> Answer {
        self.submit("/pay/confirm", &[]).await
    }

    async fn done(&self) -> Answer {
        self.submit("/pay/done", &[]).await
    }

    async fn abort(&self) -> Answer {
        self.submit("/pay/abort", &[]).await
    }
}

// ---------------------------------------------------------------------------------------------
// Sessions through the merchant API
// ---------------------------------------------------------------------------------------------

/// A session as created.
struct Created {
    id: Uuid,
    token: String,
}

async fn create(server: &TestServer, body: &Value) -> Created {
    let id = Uuid::new_v4();
    let (status, created) = status_and_json(server.put_session(id, body).await).await;
    assert_eq!(status, 201, "{created}");
    assert_eq!(created["state"], "Created");
    assert_eq!(created["redirectUrl"], format!("{}/pay", server.url));
    Created { id, token: created["token"].as_str().unwrap().to_owned() }
}

/// The session as the merchant reads it.
async fn read(server: &TestServer, id: Uuid) -> Value {
    let (status, session) = status_and_json(server.get_session(id).await).await;
    assert_eq!(status, 200, "{session}");
    session
}

/// The types of the session's events, oldest first.
async fn events(server: &TestServer, id: Uuid) -> Vec<&'static str> {
    server.event_types(id).await.into_iter().map(|kind| kind.as_str()).collect()
}

fn uuid_of(value: &Value) -> Uuid {
    value.as_str().unwrap_or_else(|| panic!("not a UUID: {value}")).parse().unwrap()
}

/// `new_transaction_intent()` with `qrCodeSuccessUrl`.
fn with_qr_success_url(mut body: Value) -> Value {
    body["redirectData"]["qrCodeSuccessUrl"] = json!(QR_SUCCESS_URL);
    body
}

/// A session of `body` whose customer arrived (`Opened`).
async fn opened(server: &TestServer, body: &Value) -> (Created, Browser) {
    let created = create(server, body).await;
    let mut browser = Browser::new(&server.url);
    browser.arrive(&created.token).await.assert_see_other("/pay");
    (created, browser)
}

/// … with a code sent to `phone` (`None`: the session's customer's); answers the code.
async fn code_sent(
    server: &TestServer,
    gateway: &Gateway,
    body: &Value,
    phone: Option<&str>,
) -> (Created, Browser, String) {
    let (created, browser) = opened(server, body).await;
    browser.send_code(phone).await.assert_see_other("/pay");
    let code = gateway.code(created.id);
    (created, browser, code)
}

/// … and the code entered (`Authenticated`).
async fn authenticated(server: &TestServer, gateway: &Gateway, body: &Value, phone: &str) -> (Created, Browser) {
    let (created, browser, code) = code_sent(server, gateway, body, Some(phone)).await;
    browser.verify(&code).await.assert_see_other("/pay");
    (created, browser)
}

/// A code that is not `code`.
fn wrong(code: &str) -> String {
    format!("{:06}", (code.parse::<u32>().unwrap() + 1) % 1_000_000)
}

fn now_millis() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as i64
}

fn millis_of(timestamp: &Value) -> i64 {
    let text = timestamp.as_str().unwrap_or_else(|| panic!("not a timestamp: {timestamp}"));
    (OffsetDateTime::parse(text, &Rfc3339).unwrap().unix_timestamp_nanos() / 1_000_000) as i64
}

/// The claims of a token (not checked).
fn claims_of(token: &str) -> Claims {
    let payload = token.split('.').nth(1).expect("a compact JWT");
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap()
}

// ---------------------------------------------------------------------------------------------
// Arriving
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn arriving_by_form_or_by_link_sets_the_cookie_redirects_to_pay_and_opens_the_session_once() {
    let gateway = Gateway::start().await;
    let server = server(&gateway).await;
    let by_form = create(&server, &new_transaction_intent()).await;
    let by_link = create(&server, &new_transaction_intent()).await;

    let mut first = Browser::new(&server.url);
    let arrived = first.arrive_by_form(&by_form.token).await;
    let mut second = Browser::new(&server.url);
    let arrived_by_link = second.arrive(&by_link.token).await;
    for (answer, created) in [(&arrived, &by_form), (&arrived_by_link, &by_link)] {
        answer.assert_see_other("/pay");
        let set = answer.header("set-cookie").unwrap_or_else(|| panic!("no cookie: {answer:?}"));
        let attributes: Vec<&str> = set.split(';').map(str::trim).collect();
        let value = attributes[0].strip_prefix("rs_pay=").unwrap_or_else(|| panic!("{set}"));
        let (nonce, token) = value.split_once('.').unwrap();
        assert_eq!(nonce.len(), 22, "{set}");
        assert!(URL_SAFE_NO_PAD.decode(nonce).is_ok_and(|n| n.len() == 16), "{set}");
        assert_eq!(token, created.token);
        for attribute in ["HttpOnly", "SameSite=Lax", "Path=/pay"] {
            assert!(attributes.contains(&attribute), "{attribute} in {set}");
        }
        assert!(!attributes.iter().any(|a| a.eq_ignore_ascii_case("secure")), "no Secure over http: {set}");
        assert!(attributes.iter().any(|a| a.starts_with("Max-Age=")), "{set}");
        let session = read(&server, created.id).await;
        assert_eq!(session["state"], "Opened", "{session}");
    }
    assert_ne!(first.csrf(), second.csrf(), "every arrival has a nonce of its own");

    // The page at /pay, without the token in the address.
    let page = first.page().await;
    page.assert_page_with(200, "send-code");
    assert!(page.has("phone") && page.has("abort"), "{page:?}");
    assert_eq!(page.attr("send-code", "action"), "/pay/code");
    assert!(page.body.contains(&format!("name=\"csrf\" value=\"{}\"", first.csrf())), "{page:?}");
    assert!(!page.body.contains(&by_form.token), "the token is not on the page");

    // Arriving again, either way, keeps the session Opened and records nothing.
    let before = (read(&server, by_form.id).await, read(&server, by_link.id).await);
    let mut third = Browser::new(&server.url);
    third.arrive(&by_form.token).await.assert_see_other("/pay");
    first.arrive_by_form(&by_form.token).await.assert_see_other("/pay");
    second.arrive_by_form(&by_link.token).await.assert_see_other("/pay");
    let after = (read(&server, by_form.id).await, read(&server, by_link.id).await);
    assert_eq!(after, before, "arriving again changes nothing");
    for created in [&by_form, &by_link] {
        assert_eq!(events(&server, created.id).await, Vec::<&str>::new());
    }
    // The counter counts browsers that arrived with a valid token, first or again: 2 + 3.
    assert_eq!(server.metric("redirect_sessions_hosted_arrivals_total").await, Some(5.0));
}

/// A token of the test's choosing, signed by the server's key.
fn signed(server: &TestServer, claims: &Claims) -> String {
    server.state.keyring().sign(claims)
}

#[tokio::test]
async fn bad_tokens_get_an_error_page_and_change_nothing() {
    let gateway = Gateway::start().await;
    let server = server(&gateway).await;
    let created = create(&server, &new_transaction_intent()).await;
    let claims = claims_of(&created.token);
    let parts: Vec<&str> = created.token.split('.').collect();

    // Another merchant, and one of its sessions.
    let (other_key, other_merchant) = server.another_merchant().await;
    let theirs = Uuid::new_v4();
    let response = server
        .request_as(Method::PUT, &format!("{BASE}/redirect-sessions/{theirs}"), &other_key)
        .json(&new_transaction_intent())
        .send()
        .await
        .unwrap();
    let (status, their_session) = status_and_json(response).await;
    assert_eq!(status, 201, "{their_session}");

    let mut signature = URL_SAFE_NO_PAD.decode(parts[2]).unwrap();
    signature[0] ^= 1;
    let tampered_signature = format!("{}.{}.{}", parts[0], parts[1], URL_SAFE_NO_PAD.encode(&signature));
    let mut tampered_claims = claims.clone();
    tampered_claims.sid = theirs;
    let tampered_payload =
        format!("{}.{}.{}", parts[0], URL_SAFE_NO_PAD.encode(serde_json::to_vec(&tampered_claims).unwrap()), parts[2]);
    let none_header = json!({"alg": "none", "typ": "JWT", "kid": server.state.keyring().current_kid()});
    let alg_none = format!("{}.{}.", URL_SAFE_NO_PAD.encode(none_header.to_string()), parts[1]);
    let stranger = Keyring::new(&KeyPair::generate().unwrap(), &[]).sign(&claims);
    let other_audience = signed(&server, &Claims { aud: "https://elsewhere.example/pay".into(), ..claims.clone() });
    let other_issuer = signed(
        &server,
        &Claims {
            iss: "https://elsewhere.example".into(),
            aud: "https://elsewhere.example/pay".into(),
            ..claims.clone()
        },
    );
    let other_merchants_claim = signed(&server, &Claims { merch_id: other_merchant, ..claims.clone() });
    let their_session_our_merchant = signed(&server, &Claims { sid: theirs, ..claims.clone() });
    let unknown_session = signed(&server, &Claims { sid: Uuid::new_v4(), ..claims.clone() });

    let bad = [
        ("garbage", "not-a-token".to_owned()),
        ("an empty token", String::new()),
        ("a tampered signature", tampered_signature),
        ("a tampered payload", tampered_payload),
        ("alg none", alg_none),
        ("a stranger's key", stranger),
        ("another audience", other_audience),
        ("another issuer", other_issuer),
        ("a merchId that is not the session's merchant", other_merchants_claim),
        ("another merchant's session", their_session_our_merchant),
        ("an unknown session", unknown_session),
    ];
    let before = read(&server, created.id).await;
    for (what, token) in &bad {
        let mut browser = Browser::new(&server.url);
        for answer in [browser.arrive(token).await, browser.arrive_by_form(token).await] {
            answer.assert_page_with(400, "error");
            assert!(!answer.has("outcome") && !answer.has("send-code"), "{what}: {answer:?}");
            assert_eq!(answer.header("set-cookie"), None, "{what}: no cookie");
        }
        assert!(browser.cookie.is_none());
    }
    assert_eq!(read(&server, created.id).await, before, "the session is as it was");
    assert_eq!(before["state"], "Created");
    assert_eq!(events(&server, created.id).await, Vec::<&str>::new());
    let response =
        server.request_as(Method::GET, &format!("{BASE}/redirect-sessions/{theirs}"), &other_key).send().await.unwrap();
    let (_, theirs_now) = status_and_json(response).await;
    assert_eq!(theirs_now["state"], "Created", "{theirs_now}");
    assert_eq!(server.metric("redirect_sessions_hosted_arrivals_total").await, Some(0.0));
}

#[tokio::test]
async fn a_token_whose_exp_has_passed_is_answered_410_with_the_way_back_to_the_failure_url() {
    let gateway = Gateway::start().await;
    let server = server(&gateway).await;
    let created = create(&server, &new_transaction_intent()).await;
    let mut claims = claims_of(&created.token);
    claims.iat -= 600;
    claims.exp = claims.iat + 60;
    let expired = signed(&server, &claims);
    let before = read(&server, created.id).await;

    let mut browser = Browser::new(&server.url);
    for answer in [browser.arrive(&expired).await, browser.arrive_by_form(&expired).await] {
        answer.assert_page_with(410, "back");
        assert_eq!(answer.back(), FAILURE_URL);
        assert_eq!(answer.header("set-cookie"), None, "{answer:?}");
        assert!(!answer.has("send-code") && !answer.has("abort"), "no form on a 410: {answer:?}");
    }
    assert_eq!(read(&server, created.id).await, before, "the session is as it was");
    assert_eq!(events(&server, created.id).await, Vec::<&str>::new());
}

#[tokio::test]
async fn the_link_of_an_expired_session_is_answered_410_with_the_way_back_to_the_failure_url() {
    let gateway = Gateway::start().await;
    let server = server_with(&gateway, |config| config.session_ttl = Duration::from_secs(1)).await;
    let created = create(&server, &new_transaction_intent()).await;
    let exp = claims_of(&created.token).exp;
    // The token's `exp` is whole seconds; it is refused once that second has passed.
    eventually(Duration::from_secs(10), "the token to expire", || async { now_millis() / 1000 > exp }).await;
    assert_eq!(read(&server, created.id).await["state"], "Expired");

    let mut browser = Browser::new(&server.url);
    for answer in [browser.arrive(&created.token).await, browser.arrive_by_form(&created.token).await] {
        answer.assert_page_with(410, "outcome");
        assert_eq!(answer.back(), FAILURE_URL);
        assert_eq!(answer.header("set-cookie"), None, "{answer:?}");
        assert!(!answer.has("abort"), "{answer:?}");
    }
    assert_eq!(read(&server, created.id).await["state"], "Expired");
    assert_eq!(server.metric("redirect_sessions_hosted_arrivals_total").await, Some(0.0));
}

// ---------------------------------------------------------------------------------------------
// The whole flow
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_new_transaction_intent_is_authenticated_by_code_confirmed_and_shown_as_a_qr_code() {
    let gateway = Gateway::start().await;
    let server = server(&gateway).await;
    let hook = crate::webhook_support::Receiver::answering(204).await;
    crate::webhook_support::subscribe(&server, &hook.url(), &[COMPLETED]).await;
    let (created, browser) = opened(&server, &new_transaction_intent()).await;
    let id = created.id;

    // The phone typed nationally; the code goes to it in E.164, with the bearer token.
    browser.send_code(Some("0151 23456789")).await.assert_see_other("/pay");
    let sent = gateway.sent();
    assert_eq!(sent.len(), 1, "{sent:?}");
    let body = &sent[0].body;
    assert_eq!(body["redirectSessionId"], id.to_string(), "{body}");
    assert_eq!(body["phone"], "+4915123456789", "{body}");
    assert_eq!(body["locale"], "en-GB", "{body}");
    let code = sent[0].code();
    assert!(code.len() == 6 && code.bytes().all(|b| b.is_ascii_digit()), "{body}");
    assert!(body["message"].as_str().unwrap().contains(&code), "the message carries the code: {body}");
    assert_eq!(sent[0].authorization.as_deref(), Some("Bearer t0k3n"));

    let page = browser.page().await;
    page.assert_page_with(200, "verify-code");
    assert!(page.has("code"), "{page:?}");
    assert_eq!(page.attr("verify-code", "action"), "/pay/verify");
    assert!(!page.body.contains(&code), "the page does not show the code");

    // A wrong code: four tries left; nothing changes.
    let refused = browser.verify(&wrong(&code)).await;
    refused.assert_page_with(400, "verify-code");
    let message = refused.message().unwrap_or_else(|| panic!("no message: {refused:?}"));
    assert!(message.contains("4 tries left"), "{message}");
    assert_eq!(read(&server, id).await["state"], "Opened");

    // The right one (typed with a space): Authenticated, linked to a new customer.
    browser.verify(&format!("{} {}", &code[..3], &code[3..])).await.assert_see_other("/pay");
    let session = read(&server, id).await;
    assert_eq!(session["state"], "Authenticated", "{session}");
    let customer = uuid_of(&session["customerId"]);
    assert!(session.get("transactionIntentId").is_none(), "{session}");
    let page = browser.page().await;
    page.assert_page_with(200, "confirm");
    assert_eq!(page.attr("confirm", "action"), "/pay/confirm");
    assert!(page.has("abort"), "{page:?}");

    // Confirmed: Completed with a new intent, shown as a payment code.
    browser.confirm().await.assert_see_other("/pay");
    let session = read(&server, id).await;
    assert_eq!(session["state"], "Completed", "{session}");
    assert_eq!(uuid_of(&session["customerId"]), customer);
    let intent = uuid_of(&session["transactionIntentId"]);
    let page = browser.page().await;
    page.assert_page_with(200, "qr-code");
    let expected = format!("ZASTRPAY:V1/T:TI/ID:{}/DIR:W", intent.hyphenated().to_string().to_uppercase());
    assert_eq!(page.text("qr-text"), expected);
    assert!(page.tag("qr-code").starts_with("<div"), "{}", page.tag("qr-code"));
    assert!(page.body.contains("<svg"), "an inline QR code: {page:?}");
    assert_eq!(page.back(), new_transaction_intent()["redirectData"]["qrCodeSuccessUrl"], "on to qrCodeSuccessUrl");
    assert!(!page.has("abort") && !page.has("done") && !page.has("confirm"), "{page:?}");
    assert_eq!(events(&server, id).await, [COMPLETED]);

    // One webhook, naming the customer and the intent.
    let received = hook.wait_for_requests(1).await;
    assert_eq!(received.len(), 1);
    let event = received[0].json();
    assert_eq!(event["type"], COMPLETED, "{event}");
    assert_eq!(event["data"]["id"], id.to_string(), "{event}");
    assert_eq!(event["data"]["state"], "Completed", "{event}");
    assert_eq!(event["data"]["customerId"], customer.to_string(), "{event}");
    assert_eq!(event["data"]["transactionIntentId"], intent.to_string(), "{event}");

    // Confirming again changes nothing.
    let again = browser.confirm().await;
    again.assert_page_with(409, "qr-code");
    assert_eq!(read(&server, id).await, session);
    assert_eq!(events(&server, id).await, [COMPLETED]);
    assert_eq!(hook.received().len(), 1);
}

#[tokio::test]
async fn the_payment_code_page_leads_on_to_the_qr_code_success_url_when_there_is_one() {
    let gateway = Gateway::start().await;
    let server = server(&gateway).await;
    let body = with_qr_success_url(new_transaction_intent());
    let (created, browser) = authenticated(&server, &gateway, &body, "+4915122223333").await;
    browser.confirm().await.assert_see_other("/pay");
    let page = browser.page().await;
    page.assert_page_with(200, "qr-text");
    assert_eq!(page.back(), QR_SUCCESS_URL);
    let session = read(&server, created.id).await;
    assert_eq!(session["state"], "Completed");
    assert!(page.text("qr-text").contains(&session["transactionIntentId"].as_str().unwrap().to_uppercase()));
}

#[tokio::test]
async fn the_same_phone_links_the_same_customer_and_a_named_customer_gets_the_code_on_their_phone() {
    let gateway = Gateway::start().await;
    let server = server(&gateway).await;

    // A new phone: registered once, found again however it is typed.
    let (first, _) = authenticated(&server, &gateway, &new_transaction_intent(), "+49 151 99887766").await;
    let (second, _) = authenticated(&server, &gateway, &new_transaction_intent(), "0151 998-877-66").await;
    let customer = read(&server, first.id).await["customerId"].clone();
    assert!(customer.is_string(), "{customer}");
    assert_eq!(read(&server, second.id).await["customerId"], customer, "the same customer");

    // The phone of a customer the service knows links that customer.
    let known = server.customer().await;
    let (typed, _) = authenticated(&server, &gateway, &new_transaction_intent(), "0151 12345678").await;
    assert_eq!(uuid_of(&read(&server, typed.id).await["customerId"]), known);

    // A session naming its customer: the code goes to their phone, shown masked, typed by nobody.
    let mut body = new_transaction_intent();
    body["customerId"] = json!(known);
    let (named, browser) = opened(&server, &body).await;
    let page = browser.page().await;
    page.assert_page_with(200, "masked-phone");
    assert_eq!(page.text("masked-phone"), "+49 •••• ••78");
    assert!(!page.has("phone"), "no phone field: {page:?}");
    assert!(!page.body.contains(KNOWN_PHONE) && !page.body.contains("12345678"), "{page:?}");
    // A phone slipped into the form does not redirect the code.
    browser.send_code(Some("+4915100000000")).await.assert_see_other("/pay");
    let sent = gateway.sent_for(named.id);
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert_eq!(sent[0].body["phone"], KNOWN_PHONE);
    let page = browser.page().await;
    page.assert_page_with(200, "verify-code");
    assert!(page.body.contains("••78") && !page.body.contains(KNOWN_PHONE), "{page:?}");
    browser.verify(&sent[0].code()).await.assert_see_other("/pay");
    let session = read(&server, named.id).await;
    assert_eq!((session["state"].as_str(), uuid_of(&session["customerId"])), (Some("Authenticated"), known));
}

// ---------------------------------------------------------------------------------------------
// Limits
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_second_code_within_thirty_seconds_is_refused_with_429() {
    let gateway = Gateway::start().await;
    let server = server(&gateway).await;
    let (created, browser, code) =
        code_sent(&server, &gateway, &new_transaction_intent(), Some("+4915144445555")).await;
    let page = browser.page().await;
    page.assert_page_with(200, "send-code"); // the resend form
    let again = browser.send_code(None).await;
    again.assert_page_with(429, "verify-code");
    let message = again.message().unwrap_or_else(|| panic!("no message: {again:?}"));
    assert!(message.starts_with("Please wait "), "{message}");
    let retyped = browser.send_code(Some("+4915144445555")).await;
    retyped.assert_page(429);
    assert_eq!(gateway.sent().len(), 1, "one code went out");
    // The first code still works.
    browser.verify(&code).await.assert_see_other("/pay");
    assert_eq!(read(&server, created.id).await["state"], "Authenticated");
}

#[tokio::test]
async fn five_wrong_entries_use_the_code_up_so_the_right_one_is_refused_after_them() {
    let gateway = Gateway::start().await;
    let server = server(&gateway).await;
    let (created, browser, code) =
        code_sent(&server, &gateway, &new_transaction_intent(), Some("+4915144445555")).await;
    let wrong = wrong(&code);
    for left in (0..5).rev() {
        let refused = browser.verify(&wrong).await;
        refused.assert_page(400);
        let message = refused.message().unwrap_or_else(|| panic!("no message: {refused:?}"));
        if left > 0 {
            assert!(message.contains(&left.to_string()), "{left} left: {message}");
        }
    }
    let refused = browser.verify(&code).await;
    refused.assert_page(400);
    let message = refused.message().unwrap_or_else(|| panic!("no message: {refused:?}"));
    assert!(message.starts_with("Too many wrong entries"), "the code is used up: {message}");
    assert!(!refused.has("verify-code"), "the used-up code cannot be entered again: {refused:?}");
    let session = read(&server, created.id).await;
    assert_eq!(session["state"], "Opened", "{session}");
    assert!(session.get("customerId").is_none(), "{session}");
    assert_eq!(events(&server, created.id).await, Vec::<&str>::new());
    assert_eq!(server.metric("redirect_sessions_hosted_codes_wrong_total").await, Some(6.0));
    assert_eq!(server.metric("redirect_sessions_hosted_authentications_total").await, Some(0.0));
}

/// The stored sign-in state of `session`: the phone and the code hash (`None` when there is
/// no row, `Some(None)` when the hash was cleared).
async fn stored_code(server: &TestServer, session: Uuid) -> Option<(String, Option<Vec<u8>>)> {
    let database = server.database();
    if database.is_postgres() {
        let sql = database.sql().await;
        let rows =
            sql.query("SELECT phone, code_hash FROM one_time_codes WHERE session_id = $1", &[&session]).await.unwrap();
        rows.first().map(|row| (row.get::<_, String>(0), row.get::<_, Option<Vec<u8>>>(1)))
    } else {
        let path = database.sqlite_path().unwrap().to_owned();
        tokio::task::spawn_blocking(move || {
            let db = rusqlite::Connection::open_with_flags(&path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
            db.busy_timeout(Duration::from_secs(5)).unwrap();
            let mut query = db.prepare("SELECT phone, code_hash FROM one_time_codes WHERE session_id = ?1").unwrap();
            let mut rows = query.query([session.as_bytes().to_vec()]).unwrap();
            rows.next()
                .unwrap()
                .map(|row| (row.get::<_, String>(0).unwrap(), row.get::<_, Option<Vec<u8>>>(1).unwrap()))
        })
        .await
        .unwrap()
    }
}

#[tokio::test]
async fn a_failed_send_is_answered_502_records_nothing_and_may_be_retried_at_once() {
    let gateway = Gateway::start().await;
    let server = server(&gateway).await;
    let (created, browser) = opened(&server, &new_transaction_intent()).await;
    gateway.answer(500);
    let failed = browser.send_code(Some("+4915166667777")).await;
    failed.assert_page_with(502, "send-code");
    assert!(failed.message().is_some(), "{failed:?}");
    assert_eq!(gateway.sent().len(), 1, "the gateway was asked");
    assert_eq!(stored_code(&server, created.id).await, None, "nothing recorded");
    assert_eq!(read(&server, created.id).await["state"], "Opened");
    assert_eq!(server.metric("redirect_sessions_hosted_codes_failed_total").await, Some(1.0));
    assert_eq!(server.metric("redirect_sessions_hosted_codes_sent_total").await, Some(0.0));

    // Fixed; the next send goes out at once (no 30 s wait after a failure) and works.
    gateway.answer(200);
    browser.send_code(Some("+4915166667777")).await.assert_see_other("/pay");
    let sent = gateway.sent();
    assert_eq!(sent.len(), 2);
    assert_ne!(sent[0].code(), sent[1].code(), "a new code");
    browser.verify(&sent[1].code()).await.assert_see_other("/pay");
    assert_eq!(read(&server, created.id).await["state"], "Authenticated");
    assert_eq!(server.metric("redirect_sessions_hosted_codes_failed_total").await, Some(1.0));
    assert_eq!(server.metric("redirect_sessions_hosted_codes_sent_total").await, Some(1.0));
}

#[tokio::test]
async fn codes_are_stored_only_as_a_keyed_hash() {
    let gateway = Gateway::start().await;
    let server = server(&gateway).await;
    let (created, _browser, code) =
        code_sent(&server, &gateway, &new_transaction_intent(), Some("+4915188889999")).await;
    let (phone, hash) = stored_code(&server, created.id).await.expect("a row for the session");
    assert_eq!(phone, "+4915188889999");
    let hash = hash.expect("a code in force");
    assert_eq!(hash.len(), 32, "{hash:?}");
    let expected = otp::hash_code(server.state.keyring().code_key(), created.id, &code);
    assert_eq!(hash, expected, "HMAC-SHA256 under the code key, bound to the session");
    assert!(!String::from_utf8_lossy(&hash).contains(&code));
    // Nowhere in the row as text.
    let database = server.database();
    let row_text = if database.is_postgres() {
        let sql = database.sql().await;
        let row = sql
            .query_one("SELECT one_time_codes::text FROM one_time_codes WHERE session_id = $1", &[&created.id])
            .await
            .unwrap();
        row.get::<_, String>(0)
    } else {
        let path = database.sqlite_path().unwrap().to_owned();
        let id = created.id;
        tokio::task::spawn_blocking(move || {
            let db = rusqlite::Connection::open_with_flags(&path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
            db.busy_timeout(Duration::from_secs(5)).unwrap();
            db.query_row(
                "SELECT phone || ' ' || hex(code_hash) || ' ' || typeof(code_hash) || ' ' || code_expires_on || ' ' || \
                 wrong_attempts || ' ' || codes_sent || ' ' || last_sent_on FROM one_time_codes WHERE session_id = ?1",
                [id.as_bytes().to_vec()],
                |row| row.get::<_, String>(0),
            )
            .unwrap()
        })
        .await
        .unwrap()
    };
    assert!(!row_text.contains(&code), "the code {code} is in the row: {row_text}");
    if !database.is_postgres() {
        assert!(row_text.contains(" blob "), "{row_text}");
    }
}

// ---------------------------------------------------------------------------------------------
// CSRF and forms
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn forms_without_the_csrf_token_or_the_cookie_or_of_another_type_change_nothing() {
    let gateway = Gateway::start().await;
    let server = server(&gateway).await;
    let (created, browser) = opened(&server, &new_transaction_intent()).await;
    let id = created.id;
    let before = read(&server, id).await;
    let form_type = "application/x-www-form-urlencoded";
    let other_nonce = URL_SAFE_NO_PAD.encode([7u8; 16]);

    // Another browser of the same session has a nonce of its own.
    let mut elsewhere = Browser::new(&server.url);
    elsewhere.arrive(&created.token).await.assert_see_other("/pay");
    let elsewhere = elsewhere.csrf();
    for path in ["/pay/code", "/pay/verify", "/pay/confirm", "/pay/done", "/pay/abort"] {
        for csrf in [None, Some(""), Some(other_nonce.as_str()), Some(elsewhere.as_str())] {
            let mut fields = vec![("phone", "+4915177778888"), ("code", "123456")];
            if let Some(csrf) = csrf {
                fields.push(("csrf", csrf));
            }
            let answer = browser.post_raw(path, form_type, form(&fields)).await;
            answer.assert_page(403);
            assert!(answer.has("send-code") && answer.message().is_some(), "{path} {csrf:?}: {answer:?}");
        }
        // No cookie: nothing to go on.
        let cookieless = Browser::new(&server.url);
        let csrf = browser.csrf();
        let answer = cookieless.post_raw(path, form_type, form(&[("csrf", &csrf), ("phone", "+4915177778888")])).await;
        answer.assert_page_with(400, "error");
        // A cookie that is not ours.
        let mut forged = Browser::new(&server.url);
        forged.cookie = Some(format!("rs_pay={csrf}.not-a-token"));
        forged.submit(path, &[("phone", "+4915177778888")]).await.assert_page_with(400, "error");
        // Another content type.
        for content_type in ["application/json", "text/plain", "multipart/form-data; boundary=x"] {
            let body = json!({"csrf": csrf, "phone": "+4915177778888"}).to_string();
            let answer = browser.post_raw(path, content_type, body).await;
            answer.assert_page_with(415, "error");
        }
    }
    assert_eq!(gateway.sent().len(), 0, "no code went out");
    assert_eq!(read(&server, id).await, before, "nothing changed");
    assert_eq!(events(&server, id).await, Vec::<&str>::new());

    // With its token the same form works.
    browser.send_code(Some("+4915177778888")).await.assert_see_other("/pay");
    let code = gateway.code(id);
    let forged = browser.post_raw("/pay/verify", form_type, form(&[("csrf", &other_nonce), ("code", &code)])).await;
    forged.assert_page_with(403, "verify-code");
    assert_eq!(read(&server, id).await["state"], "Opened");
    browser.verify(&code).await.assert_see_other("/pay");
    let forged = browser.post_raw("/pay/confirm", form_type, form(&[("csrf", &other_nonce)])).await;
    forged.assert_page_with(403, "confirm");
    let forged = browser.post_raw("/pay/abort", form_type, form(&[("csrf", &other_nonce)])).await;
    forged.assert_page_with(403, "confirm");
    assert_eq!(read(&server, id).await["state"], "Authenticated");
    assert_eq!(events(&server, id).await, Vec::<&str>::new());
}

// ---------------------------------------------------------------------------------------------
// The other session types
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_new_customer_is_registered_by_code_and_sent_straight_back_to_the_success_url() {
    let gateway = Gateway::start().await;
    let server = server(&gateway).await;
    let body = json!({
        "type": "NewCustomer",
        "customerData": {"firstName": "Erika", "lastName": "Mustermann"},
        "redirectData": {
            "successUrl": SUCCESS_URL, "failureUrl": FAILURE_URL, "abortUrl": ABORT_URL,
            "qrCodeSuccessUrl": QR_SUCCESS_URL
        },
        "locale": "de-DE"
    });
    let (created, browser) = opened(&server, &body).await;
    let page = browser.page().await;
    page.assert_page_with(200, "send-code");
    assert_eq!(page.lang(), "de");
    assert!(page.has("lang-en"), "the switch to English: {page:?}");
    browser.send_code(Some("0171 5550123")).await.assert_see_other("/pay");
    let sent = gateway.sent_for(created.id);
    assert_eq!(
        (sent[0].body["phone"].as_str(), sent[0].body["locale"].as_str()),
        (Some("+491715550123"), Some("de-DE"))
    );
    browser.verify(&sent[0].code()).await.assert_see_other(SUCCESS_URL);

    let session = read(&server, created.id).await;
    assert_eq!(session["state"], "Completed", "{session}");
    uuid_of(&session["customerId"]);
    assert!(session.get("transactionIntentId").is_none(), "{session}");
    assert_eq!(events(&server, created.id).await, [COMPLETED]);
    let page = browser.page().await;
    page.assert_page_with(200, "outcome");
    assert_eq!(page.lang(), "de");
    assert_eq!(page.back(), SUCCESS_URL);
    assert_eq!(server.metric("redirect_sessions_hosted_completions_total").await, Some(1.0));
}

#[tokio::test]
async fn an_existing_transaction_intent_shows_its_code_and_done_leads_to_the_qr_code_success_url() {
    let gateway = Gateway::start().await;
    let server = server(&gateway).await;
    let intent = Uuid::new_v4();
    let body = json!({
        "type": "ExistingTransactionIntent",
        "transactionIntentId": intent,
        "redirectData": {
            "successUrl": SUCCESS_URL, "failureUrl": FAILURE_URL, "abortUrl": ABORT_URL,
            "qrCodeSuccessUrl": QR_SUCCESS_URL
        },
        "locale": "en"
    });
    let (created, browser) = authenticated(&server, &gateway, &body, "+4915155556666").await;
    let page = browser.page().await;
    page.assert_page_with(200, "qr-code");
    assert!(page.has("done") && page.tag("done").starts_with("<form"), "{page:?}");
    assert_eq!(page.attr("done", "action"), "/pay/done");
    let text = page.text("qr-text");
    let prefix = format!("ZASTRPAY:V1/T:TI/ID:{}/DIR:", intent.hyphenated().to_string().to_uppercase());
    assert!(text.starts_with(&prefix), "{text}");
    assert!(!page.has("confirm"), "{page:?}");
    // Confirm is the other flow's form: refused, nothing changes.
    browser.confirm().await.assert_page(409);
    assert_eq!(read(&server, created.id).await["state"], "Authenticated");

    browser.done().await.assert_see_other(QR_SUCCESS_URL);
    let session = read(&server, created.id).await;
    assert_eq!(session["state"], "Completed", "{session}");
    assert_eq!(uuid_of(&session["transactionIntentId"]), intent);
    uuid_of(&session["customerId"]);
    assert_eq!(events(&server, created.id).await, [COMPLETED]);
}

#[tokio::test]
async fn giving_up_aborts_the_session_once_and_returns_to_the_abort_url() {
    let gateway = Gateway::start().await;
    let server = server(&gateway).await;
    let (created, browser) = opened(&server, &new_transaction_intent()).await;
    let page = browser.page().await;
    assert_eq!(page.attr("abort", "action"), "/pay/abort");
    browser.abort().await.assert_see_other(ABORT_URL);
    let session = read(&server, created.id).await;
    assert_eq!(session["state"], "Aborted", "{session}");
    assert_eq!(events(&server, created.id).await, [ABORTED]);

    let again = browser.abort().await;
    again.assert_page_with(409, "outcome");
    assert_eq!(again.back(), ABORT_URL);
    assert!(!again.has("abort"), "{again:?}");
    assert_eq!(read(&server, created.id).await, session);
    assert_eq!(events(&server, created.id).await, [ABORTED]);
    // Nothing else moves it either.
    browser.send_code(Some("+4915100001111")).await.assert_page_with(409, "outcome");
    assert_eq!(gateway.sent().len(), 0);

    // An authenticated customer may give up too.
    let (created, browser) = authenticated(&server, &gateway, &new_transaction_intent(), "+4915100002222").await;
    browser.abort().await.assert_see_other(ABORT_URL);
    assert_eq!(read(&server, created.id).await["state"], "Aborted");
    assert_eq!(events(&server, created.id).await, [ABORTED]);
    assert_eq!(server.metric("redirect_sessions_hosted_aborts_total").await, Some(2.0));
}

// ---------------------------------------------------------------------------------------------
// Races with the merchant and the clock
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_code_entered_after_the_merchant_cancelled_is_answered_409_with_the_way_back() {
    let gateway = Gateway::start().await;
    let server = server(&gateway).await;
    let (created, browser, code) =
        code_sent(&server, &gateway, &new_transaction_intent(), Some("+4915112121212")).await;
    let (status, cancelled) = status_and_json(server.cancel_session(created.id).await).await;
    assert_eq!((status, cancelled["state"].as_str()), (200, Some("Cancelled")));

    let answer = browser.verify(&code).await;
    answer.assert_page_with(409, "outcome");
    assert_eq!(answer.back(), ABORT_URL);
    assert!(!answer.has("abort") && !answer.has("verify-code"), "{answer:?}");
    let session = read(&server, created.id).await;
    assert_eq!(session, cancelled, "still as cancelled");
    assert!(session.get("customerId").is_none(), "{session}");
    assert_eq!(events(&server, created.id).await, [CANCELLED]);
    browser.page().await.assert_page_with(200, "outcome");
}

#[tokio::test]
async fn a_code_entered_after_the_session_expired_is_answered_409_with_the_way_back_to_the_failure_url() {
    let gateway = Gateway::start().await;
    let server = server_with(&gateway, |config| config.session_ttl = Duration::from_secs(2)).await;
    let (created, browser, code) =
        code_sent(&server, &gateway, &new_transaction_intent(), Some("+4915113131313")).await;
    let id = created.id;
    eventually(Duration::from_secs(10), "the session to expire", || async {
        read(&server, id).await["state"] == "Expired"
    })
    .await;

    let answer = browser.verify(&code).await;
    answer.assert_page_with(409, "outcome");
    assert_eq!(answer.back(), FAILURE_URL);
    let session = read(&server, id).await;
    assert_eq!(session["state"], "Expired");
    assert!(session.get("customerId").is_none(), "{session}");
    eventually(Duration::from_secs(10), "the expiry to be recorded", || async {
        !events(&server, id).await.is_empty()
    })
    .await;
    assert_eq!(events(&server, id).await, [EXPIRED]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn confirm_racing_the_merchant_cancel_has_exactly_one_winner() {
    let gateway = Gateway::start().await;
    let server = server(&gateway).await;
    const SESSIONS: usize = 20;
    let mut ready = Vec::new();
    for i in 0..SESSIONS {
        let phone = format!("+49151200000{i:02}");
        ready.push(authenticated(&server, &gateway, &new_transaction_intent(), &phone).await);
    }
    let server = &server;
    let outcomes = join_all(ready.iter().map(|(created, browser)| async move {
        let (confirmed, cancelled) = tokio::join!(browser.confirm(), server.cancel_session(created.id));
        (created.id, confirmed, status_and_json(cancelled).await)
    }))
    .await;
    let (mut completed, mut cancelled) = (0, 0);
    for (id, confirmed, (cancel_status, cancel_body)) in outcomes {
        let session = read(server, id).await;
        match session["state"].as_str() {
            Some("Completed") => {
                completed += 1;
                confirmed.assert_see_other("/pay");
                assert_eq!(cancel_status, 400, "{cancel_body}");
                assert_eq!(cancel_body["code"], "InvalidRedirectSessionStateTransition", "{cancel_body}");
                uuid_of(&session["transactionIntentId"]);
                assert_eq!(events(server, id).await, [COMPLETED]);
            }
            Some("Cancelled") => {
                cancelled += 1;
                assert_eq!((cancel_status, &cancel_body["state"]), (200, &json!("Cancelled")), "{cancel_body}");
                confirmed.assert_page_with(409, "outcome");
                assert_eq!(confirmed.back(), ABORT_URL);
                assert!(session.get("transactionIntentId").is_none(), "{session}");
                assert_eq!(events(server, id).await, [CANCELLED]);
            }
            _ => panic!("{id} ended neither Completed nor Cancelled: {session}"),
        }
    }
    let _ = std::io::Write::write_all(
        &mut std::io::stderr(),
        format!("{completed} completed, {cancelled} cancelled\n").as_bytes(),
    );
    assert_eq!(server.metric("redirect_sessions_hosted_completions_total").await, Some(completed as f64));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_code_entered_as_the_session_expires_authenticates_before_or_is_refused_after() {
    let gateway = Gateway::start().await;
    let server = server_with(&gateway, |config| config.session_ttl = Duration::from_secs(3)).await;
    const SESSIONS: i64 = 12;
    let mut ready = Vec::new();
    for i in 0..SESSIONS {
        let phone = format!("+49151300000{i:02}");
        let (created, browser, code) = code_sent(&server, &gateway, &new_transaction_intent(), Some(&phone)).await;
        let expires_on = millis_of(&read(&server, created.id).await["expiresOn"]);
        ready.push((created.id, browser, code, expires_on, (i - SESSIONS / 2) * 25));
    }
    let server = &server;
    // Each code is entered around its session's expiry, from 150 ms before to 125 ms after.
    let answers = join_all(ready.iter().map(|(id, browser, code, expires_on, offset)| async move {
        let wait = expires_on + offset - now_millis();
        if wait > 0 {
            tokio::time::sleep(Duration::from_millis(wait as u64)).await;
        }
        let answer = browser.verify(code).await;
        let right_after = read(server, *id).await;
        (*id, *expires_on, answer, right_after)
    }))
    .await;
    let mut authenticated = 0;
    for (id, expires_on, answer, right_after) in &answers {
        // Whatever the page said, the merchant never sees Authenticated past expiresOn.
        if right_after["state"] == "Authenticated" {
            assert!(millis_of(&right_after["lastModifiedOn"]) < *expires_on, "{right_after}");
        }
        eventually(Duration::from_secs(10), "the expiry to be recorded", || async {
            !events(server, *id).await.is_empty()
        })
        .await;
        let session = read(server, *id).await;
        assert_eq!(session["state"], "Expired", "{session}");
        assert_eq!(events(server, *id).await, [EXPIRED], "one event: {session}");
        match answer.status {
            303 => {
                authenticated += 1;
                answer.assert_see_other("/pay");
                uuid_of(&session["customerId"]);
            }
            409 => {
                answer.assert_page_with(409, "outcome");
                assert_eq!(answer.back(), FAILURE_URL);
                assert!(session.get("customerId").is_none(), "refused, yet linked: {session}");
            }
            _ => panic!("{id}: {answer:?}"),
        }
    }
    let _ = std::io::Write::write_all(
        &mut std::io::stderr(),
        format!("{authenticated} of {SESSIONS} authenticated before they expired\n").as_bytes(),
    );
    assert_eq!(server.metric("redirect_sessions_hosted_authentications_total").await, Some(authenticated as f64));
}

// ---------------------------------------------------------------------------------------------
// Headers, size, the helper script, metrics
// ---------------------------------------------------------------------------------------------

fn assert_secure_headers(answer: &Answer, what: &str) {
    let csp = answer.header("content-security-policy").unwrap_or_else(|| panic!("{what}: no CSP: {answer:?}"));
    assert!(!csp.contains("unsafe-inline") && !csp.contains("unsafe-eval"), "{what}: {csp}");
    assert!(csp.contains("frame-ancestors 'none'"), "{what}: {csp}");
    assert_eq!(answer.header("referrer-policy"), Some("no-referrer"), "{what}");
    assert_eq!(answer.header("cache-control"), Some("no-store"), "{what}");
    assert_eq!(answer.header("x-content-type-options"), Some("nosniff"), "{what}");
}

/// The `form-action` sources of a page's CSP.
fn form_action(answer: &Answer) -> Vec<String> {
    let csp = answer.header("content-security-policy").unwrap();
    let directive = csp.split(';').map(str::trim).find(|d| d.starts_with("form-action "));
    let directive = directive.unwrap_or_else(|| panic!("no form-action in {csp}"));
    directive.split_whitespace().skip(1).map(str::to_owned).collect()
}

#[tokio::test]
async fn every_answer_of_the_page_carries_the_security_headers_and_the_page_stays_small() {
    let gateway = Gateway::start().await;
    let server = server(&gateway).await;
    let css = Answer::of(server.client.get(format!("{}/static/pay.css", server.url)).send().await.unwrap()).await;
    assert_eq!(css.status, 200);
    assert!(css.header("content-type").unwrap().starts_with("text/css"), "{css:?}");

    let body = with_qr_success_url(new_transaction_intent());
    let created = create(&server, &body).await;
    let mut browser = Browser::new(&server.url);
    let mut answers = vec![("arrival", browser.arrive(&created.token).await)];
    let phone_page = browser.page().await;
    answers.push((
        "forged csrf",
        browser.post_raw("/pay/abort", "application/x-www-form-urlencoded", String::new()).await,
    ));
    answers.push(("no cookie", Browser::new(&server.url).page().await));
    answers.push(("bad token", Browser::new(&server.url).arrive("x").await));
    answers.push(("415", browser.post_raw("/pay/code", "text/plain", String::new()).await));
    answers.push(("send", browser.send_code(Some("+4915114141414")).await));
    let code_page = browser.page().await;
    answers.push(("wrong code", browser.verify(&wrong(&gateway.code(created.id))).await));
    answers.push(("verify", browser.verify(&gateway.code(created.id)).await));
    answers.push(("confirm", browser.confirm().await));
    let qr_page = browser.page().await;
    answers.push(("again", browser.confirm().await));
    let switched = browser.client.get(format!("{}/pay?lang=de", server.url)).send().await.unwrap();
    answers.push(("lang", Answer::of(switched).await));
    for (what, page) in [("phone step", &phone_page), ("code step", &code_page), ("payment code", &qr_page)] {
        page.assert_page(200);
        assert_secure_headers(page, what);
        // Forms may end at the merchant's origins (a browser applies form-action to the
        // redirect after a POST), and nowhere else.
        let mut sources = form_action(page);
        sources.sort();
        assert_eq!(sources, ["'self'", "https://merchant.example", "https://shop.example.org"], "{what}");
        assert!(!page.body.contains("<script") && !page.body.contains("style="), "{what}: no inline code");
        let size = page.body.len() + css.body.len();
        assert!(size < 30 * 1024, "{what}: page and stylesheet are {size} bytes");
        let _ = std::io::Write::write_all(&mut std::io::stderr(), format!("{what}: {size} bytes\n").as_bytes());
    }
    for (what, answer) in &answers {
        assert_secure_headers(answer, what);
    }
    assert_eq!(form_action(&answers[1].1).len(), 3, "a refused form's page allows the same targets");
    assert_eq!(answers.iter().find(|(w, _)| *w == "no cookie").map(|(_, a)| a.status), Some(400));

    let script =
        Answer::of(server.client.get(format!("{}/static/redirect-session.js", server.url)).send().await.unwrap()).await;
    assert_eq!(script.status, 200, "{script:?}");
    assert!(script.header("content-type").unwrap().starts_with("text/javascript"), "{script:?}");
    assert_eq!(script.header("access-control-allow-origin"), Some("*"));
    assert!(script.body.contains("export function redirect"), "{}", script.body);
}

#[tokio::test]
async fn the_metrics_count_what_happens_on_the_page() {
    let gateway = Gateway::start().await;
    let server = server(&gateway).await;
    // One session all the way, with a wrong code on the way; one given up.
    let (created, browser, code) =
        code_sent(&server, &gateway, &new_transaction_intent(), Some("+4915115151515")).await;
    browser.verify(&wrong(&code)).await.assert_page(400);
    browser.verify(&code).await.assert_see_other("/pay");
    browser.confirm().await.assert_see_other("/pay");
    assert_eq!(read(&server, created.id).await["state"], "Completed");
    let (_, other) = opened(&server, &new_transaction_intent()).await;
    other.abort().await.assert_see_other(ABORT_URL);
    // Refused steps count nothing.
    other.abort().await.assert_page(409);
    Browser::new(&server.url).arrive("garbage").await.assert_page(400);

    for (name, expected) in [
        ("arrivals", 2),
        ("codes_sent", 1),
        ("codes_failed", 0),
        ("codes_wrong", 1),
        ("authentications", 1),
        ("completions", 1),
        ("aborts", 1),
    ] {
        let name = format!("redirect_sessions_hosted_{name}_total");
        assert_eq!(server.metric(&name).await, Some(expected as f64), "{name}");
    }
}

#[tokio::test]
async fn the_language_switch_changes_the_page_and_keeps_the_session() {
    let gateway = Gateway::start().await;
    let server = server(&gateway).await;
    let (created, mut browser) = opened(&server, &new_transaction_intent()).await;
    let page = browser.page().await;
    assert_eq!(page.lang(), "en");
    assert_eq!(page.attr("lang-de", "href"), "/pay?lang=de");
    let switched = Answer::of(browser.client.get(format!("{}/pay?lang=de", server.url)).send().await.unwrap()).await;
    switched.assert_see_other("/pay");
    let set = switched.header("set-cookie").unwrap().to_owned();
    assert!(set.starts_with("rs_lang=de;") && set.contains("HttpOnly") && set.contains("Path=/pay"), "{set}");
    let pay = browser.cookie.clone().unwrap();
    browser.cookie = Some(format!("{pay}; rs_lang=de"));
    let page = browser.page().await;
    page.assert_page_with(200, "lang-en");
    assert_eq!(page.lang(), "de");
    browser.cookie = Some(pay);
    assert_eq!(read(&server, created.id).await["state"], "Opened");
    Answer::of(browser.client.get(format!("{}/pay?lang=fr", server.url)).send().await.unwrap())
        .await
        .assert_page_with(400, "error");
}

#[tokio::test]
async fn a_code_is_good_only_for_its_own_session() {
    let gateway = Gateway::start().await;
    let server = server(&gateway).await;
    let phone = Some("+4915116161616");
    let (first, first_browser, first_code) = code_sent(&server, &gateway, &new_transaction_intent(), phone).await;
    let (second, second_browser, second_code) = code_sent(&server, &gateway, &new_transaction_intent(), phone).await;
    assert_ne!(first_code, second_code, "a fresh code per session (one in a million to be equal)");
    // Each browser's cookie names its session: the other's code is wrong there.
    second_browser.verify(&first_code).await.assert_page_with(400, "verify-code");
    first_browser.verify(&second_code).await.assert_page_with(400, "verify-code");
    assert_eq!(read(&server, first.id).await["state"], "Opened");
    assert_eq!(read(&server, second.id).await["state"], "Opened");
    first_browser.verify(&first_code).await.assert_see_other("/pay");
    second_browser.verify(&second_code).await.assert_see_other("/pay");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_tabs_sending_a_code_at_once_record_one_code_that_works() {
    let gateway = Gateway::start().await;
    let server = server(&gateway).await;
    let (created, browser) = opened(&server, &new_transaction_intent()).await;
    let phone = Some("+4915117171717");
    let (one, other) = tokio::join!(browser.send_code(phone), browser.send_code(phone));
    let answers = [&one, &other];
    let sent = gateway.sent_for(created.id);
    // Both may have passed the check before either was recorded; then both codes went out and
    // the first recorded wins. Or the second saw the first and was told to wait.
    let statuses: Vec<u16> = answers.iter().map(|a| a.status).collect();
    match statuses.as_slice() {
        [303, 303] => assert_eq!(sent.len(), 2, "{sent:?}"),
        [303, 429] | [429, 303] => assert_eq!(sent.len(), 1, "{sent:?}"),
        _ => panic!("{answers:?}"),
    }
    for answer in answers.iter().filter(|a| a.status == 303) {
        answer.assert_see_other("/pay");
    }
    assert_eq!(server.metric("redirect_sessions_hosted_codes_sent_total").await, Some(1.0), "one code recorded");
    // Exactly one of the codes is the one in force.
    let codes: Vec<String> = sent.iter().map(Sent::code).collect();
    let hash = stored_code(&server, created.id).await.expect("a row").1.expect("a code in force");
    let in_force: Vec<&String> = codes
        .iter()
        .filter(|code| otp::hash_code(server.state.keyring().code_key(), created.id, code)[..] == hash[..])
        .collect();
    assert_eq!(in_force.len(), 1, "{codes:?}");
    browser.verify(in_force[0]).await.assert_see_other("/pay");
    assert_eq!(read(&server, created.id).await["state"], "Authenticated");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_code_submitted_twice_at_once_authenticates_once() {
    let gateway = Gateway::start().await;
    let server = server(&gateway).await;
    let (created, browser, code) =
        code_sent(&server, &gateway, &new_transaction_intent(), Some("+4915118181818")).await;
    let (one, other) = tokio::join!(browser.verify(&code), browser.verify(&code));
    let (won, lost) = if one.status == 303 { (one, other) } else { (other, one) };
    won.assert_see_other("/pay");
    // The other finds the session authenticated (409) or the code used (400).
    assert!(matches!(lost.status, 400 | 409), "{lost:?}");
    lost.assert_page(lost.status);
    let session = read(&server, created.id).await;
    assert_eq!(session["state"], "Authenticated", "{session}");
    assert_eq!(server.metric("redirect_sessions_hosted_authentications_total").await, Some(1.0));
    // One customer was registered: the next session with the phone links that one.
    let (next, _) = authenticated(&server, &gateway, &new_transaction_intent(), "+4915118181818").await;
    assert_eq!(read(&server, next.id).await["customerId"], session["customerId"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn customers_signing_in_with_the_same_new_phone_at_once_become_one_customer() {
    let gateway = Gateway::start().await;
    let server = server(&gateway).await;
    const SESSIONS: usize = 10;
    let phone = "+4915119191919";
    let mut ready = Vec::new();
    for _ in 0..SESSIONS {
        ready.push(code_sent(&server, &gateway, &new_transaction_intent(), Some(phone)).await);
    }
    let answers = join_all(ready.iter().map(|(_, browser, code)| browser.verify(code))).await;
    for answer in &answers {
        answer.assert_see_other("/pay");
    }
    let mut customers = Vec::new();
    for (created, ..) in &ready {
        customers.push(read(&server, created.id).await["customerId"].clone());
    }
    assert!(customers[0].is_string(), "{customers:?}");
    assert!(customers.iter().all(|c| *c == customers[0]), "one customer for one phone: {customers:?}");
}
