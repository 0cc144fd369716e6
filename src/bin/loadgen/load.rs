//! Load: requests on many keep-alive connections, the requests the scenarios send, and what
//! they measured.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use uuid::Uuid;

use crate::server::Server;
use crate::{Args, BASE};

/// What one scenario measured.
pub(crate) struct Stats {
    pub(crate) name: String,
    pub(crate) requests: usize,
    pub(crate) errors: usize,
    pub(crate) elapsed: Duration,
    pub(crate) latencies_us: Vec<u32>,
    /// CPU time the server processes used during the scenario, when measured. Steadier than
    /// requests/s on a machine the load generator shares.
    pub(crate) server_cpu: Option<Duration>,
}

impl Stats {
    pub(crate) fn rate(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64()
    }

    pub(crate) fn percentile_ms(&self, p: f64) -> f64 {
        if self.latencies_us.is_empty() {
            return 0.0;
        }
        let index = ((self.latencies_us.len() as f64 * p).ceil() as usize).clamp(1, self.latencies_us.len()) - 1;
        f64::from(self.latencies_us[index]) / 1000.0
    }
}

pub(crate) type MakeRequest = Arc<dyn Fn(usize) -> Option<Request<Full<Bytes>>> + Send + Sync>;

/// The answer a scenario counts as done; any other is an error.
#[derive(Clone, Copy)]
pub(crate) struct Expect {
    pub(crate) status: u16,
    /// Whether the answer is a stored one replayed (`idempotent-replayed: true`).
    pub(crate) replayed: bool,
}

impl Expect {
    /// `status`, from a request the server executed (not a replay).
    pub(crate) const fn status(status: u16) -> Expect {
        Expect { status, replayed: false }
    }

    fn met_by<B>(self, response: &hyper::Response<B>) -> bool {
        let replayed = response.headers().get("idempotent-replayed").is_some_and(|value| value == "true");
        response.status() == self.status && replayed == self.replayed
    }
}

/// Runs `make` on `connections` connections for `duration` (or until it answers `None`).
pub(crate) async fn load(
    name: &str,
    targets: &[SocketAddr],
    connections: usize,
    duration: Duration,
    expect: Expect,
    make: MakeRequest,
) -> Stats {
    eprintln!("{name}…");
    let sequence = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let deadline = started + duration;
    let workers: Vec<_> = (0..connections)
        .map(|worker| {
            let (make, sequence) = (make.clone(), sequence.clone());
            let address = targets[worker % targets.len()];
            tokio::spawn(async move {
                let (mut done, mut errors, mut latencies) = (0usize, 0usize, Vec::new());
                let mut sender = None;
                while Instant::now() < deadline {
                    if sender.is_none() {
                        sender = connect(address).await;
                        if sender.is_none() {
                            errors += 1;
                            tokio::time::sleep(Duration::from_millis(10)).await;
                            continue;
                        }
                    }
                    let Some(request) = make(sequence.fetch_add(1, Ordering::Relaxed)) else { break };
                    let sent = Instant::now();
                    let answer = sender.as_mut().expect("connected").send_request(request).await;
                    match answer {
                        Ok(response) => {
                            let met = expect.met_by(&response);
                            let _ = response.into_body().collect().await;
                            latencies.push(sent.elapsed().as_micros().min(u32::MAX as u128) as u32);
                            if met {
                                done += 1;
                            } else {
                                errors += 1;
                            }
                        }
                        Err(_) => {
                            errors += 1;
                            sender = None;
                        }
                    }
                }
                (done, errors, latencies)
            })
        })
        .collect();
    let mut stats = Stats {
        name: name.to_owned(),
        requests: 0,
        errors: 0,
        elapsed: Duration::ZERO,
        latencies_us: Vec::new(),
        server_cpu: None,
    };
    for worker in workers {
        let (done, errors, latencies) = worker.await.expect("a worker finishes");
        stats.requests += done;
        stats.errors += errors;
        stats.latencies_us.extend(latencies);
    }
    stats.elapsed = started.elapsed().min(duration.max(Duration::from_millis(1)));
    stats.latencies_us.sort_unstable();
    stats
}

pub(crate) async fn connect(address: SocketAddr) -> Option<hyper::client::conn::http1::SendRequest<Full<Bytes>>> {
    let stream = TcpStream::connect(address).await.ok()?;
    let _ = stream.set_nodelay(true);
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.ok()?;
    tokio::spawn(connection);
    Some(sender)
}

/// A merchant API request; `request_id` goes out as its `x-request-id`.
pub(crate) fn request(
    method: Method,
    address: SocketAddr,
    path: &str,
    key: &str,
    body: Option<Bytes>,
    request_id: Option<Uuid>,
) -> Request<Full<Bytes>> {
    let mut builder =
        Request::builder().method(method).uri(path).header("host", address.to_string()).header("x-api-key", key);
    if body.is_some() {
        builder = builder.header("content-type", "application/json");
    }
    if let Some(request_id) = request_id {
        builder = builder.header("x-request-id", request_id.to_string());
    }
    builder.body(Full::new(body.unwrap_or_default())).expect("a valid request")
}

const SESSION_BODY: &str = r#"{"type":"NewTransactionIntent","transactionData":{"type":"PassthroughWithdrawal","amount":100.5,"currency":"EUR","externalReference":"bench-0001"},"redirectData":{"successUrl":"https://shop.example/ok","failureUrl":"https://shop.example/failed","abortUrl":"https://shop.example/aborted","qrCodeSuccessUrl":"https://shop.example/qr"},"locale":"de-DE"}"#;

/// Creates session `id` with `SESSION_BODY`: the same bytes every time, so a replay matches.
pub(crate) fn create_request(
    address: SocketAddr,
    key: &str,
    id: Uuid,
    request_id: Option<Uuid>,
) -> Request<Full<Bytes>> {
    let body = Some(Bytes::from_static(SESSION_BODY.as_bytes()));
    request(Method::PUT, address, &format!("{BASE}/redirect-sessions/{id}"), key, body, request_id)
}

pub(crate) fn cancel_request(
    address: SocketAddr,
    key: &str,
    id: Uuid,
    request_id: Option<Uuid>,
) -> Request<Full<Bytes>> {
    request(Method::POST, address, &format!("{BASE}/redirect-sessions/{id}/cancel"), key, None, request_id)
}

/// How a row says whether its writes carry an `x-request-id`.
pub(crate) fn header_label(request_id: bool) -> &'static str {
    if request_id {
        "x-request-id"
    } else {
        "no x-request-id"
    }
}

/// A session a create made, with the `x-request-id` the create carried.
#[derive(Clone, Copy)]
pub(crate) struct Created {
    pub(crate) id: Uuid,
    pub(crate) request_id: Option<Uuid>,
}

/// Creates sessions with fresh ids, each with a fresh `x-request-id` when `request_id`;
/// answers the stats and the sessions created.
pub(crate) async fn create_sessions(
    name: &str,
    server: &Server,
    key: &str,
    connections: usize,
    duration: Duration,
    limit: usize,
    request_id: bool,
) -> (Stats, Vec<Created>) {
    let sessions: Vec<Created> =
        (0..limit).map(|_| Created { id: Uuid::new_v4(), request_id: request_id.then(Uuid::new_v4) }).collect();
    let (address, key, list) = (server.first(), key.to_owned(), Arc::new(sessions));
    let make: MakeRequest = {
        let list = list.clone();
        Arc::new(move |n| list.get(n).map(|session| create_request(address, &key, session.id, session.request_id)))
    };
    let stats = server.measured(load(name, &server.addresses, connections, duration, Expect::status(201), make)).await;
    let created = list.iter().take(stats.requests + stats.errors).copied().collect();
    (stats, created)
}

/// Creates `n` sessions (with an `x-request-id` each when `request_id`) and arrives on the
/// hosted page with each token as a browser does (a form POST); answers the cookies the page
/// handed out.
pub(crate) async fn arrived_browsers(address: SocketAddr, key: &str, n: usize, request_id: bool) -> Vec<String> {
    let mut sender = connect(address).await.expect("the server answers");
    let mut cookies = Vec::with_capacity(n);
    for _ in 0..n {
        let create = create_request(address, key, Uuid::new_v4(), request_id.then(Uuid::new_v4));
        sender.ready().await.expect("the connection stays open");
        let response = sender.send_request(create).await.expect("created");
        let body = response.into_body().collect().await.expect("a body").to_bytes();
        let session: serde_json::Value = serde_json::from_slice(&body).expect("a session");
        let token = session["token"].as_str().expect("a token");
        let form = url::form_urlencoded::Serializer::new(String::new()).append_pair("token", token).finish();
        let arrival = Request::builder()
            .method(Method::POST)
            .uri("/pay")
            .header("host", address.to_string())
            .header("content-type", "application/x-www-form-urlencoded")
            .body(Full::new(Bytes::from(form)))
            .expect("valid");
        sender.ready().await.expect("the connection stays open");
        let response = sender.send_request(arrival).await.expect("arrived");
        assert_eq!(response.status(), 303, "arriving on the hosted page");
        let cookie = response.headers()["set-cookie"].to_str().expect("ASCII");
        cookies.push(cookie.split(';').next().expect("a cookie").to_owned());
        let _ = response.into_body().collect().await;
    }
    cookies
}

/// Cancels each of `sessions` once, in the order of `spread`, each cancel with a fresh
/// `x-request-id` when `request_id`; notes in `sent`, when given, when each was sent.
pub(crate) fn cancels(
    address: SocketAddr,
    key: &str,
    sessions: Vec<Created>,
    request_id: bool,
    sent: Option<Arc<Mutex<HashMap<String, Instant>>>>,
) -> MakeRequest {
    let key = key.to_owned();
    Arc::new(move |n| {
        let session = sessions.get(spread(n, sessions.len()))?;
        if let Some(sent) = &sent {
            sent.lock().expect("not poisoned").insert(session.id.to_string(), Instant::now());
        }
        Some(cancel_request(address, &key, session.id, request_id.then(Uuid::new_v4)))
    })
}

/// The `n`th of `len` sessions in an order that jumps across the whole set (each one once):
/// reads and cancels then touch old and new sessions alike, not the pages just written in
/// creation order. `n` past the end stays past it.
pub(crate) fn spread(n: usize, len: usize) -> usize {
    // A stride coprime with `len` visits every index once.
    const STRIDES: [usize; 3] = [2_654_435_761, 1_000_003, 7];
    match STRIDES.iter().find(|&&stride| len > 0 && gcd(stride % len, len) == 1) {
        Some(&stride) if n < len => ((n as u128 * stride as u128) % len as u128) as usize,
        _ => n,
    }
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// One scenario whose requests all answer as `expect` says, on every instance, measured.
pub(crate) async fn scenario(server: &Server, args: &Args, name: &str, expect: Expect, make: MakeRequest) -> Stats {
    server.measured(load(name, &server.addresses, args.connections, args.duration, expect, make)).await
}
