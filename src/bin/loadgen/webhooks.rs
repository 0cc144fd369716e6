//! The webhook scenarios: a local receiver, deliveries drained and timed, and `recover`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::routing::post;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request};
use uuid::Uuid;

use crate::load::{
    cancel_request, cancels, connect, create_sessions, header_label, load, request, Expect, MakeRequest, Stats,
};
use crate::report::row;
use crate::server::Server;
use crate::{Args, BASE};

/// When each session's event first arrived at a receiver.
type Arrivals = Arc<Mutex<HashMap<String, Instant>>>;

/// A webhook receiver answering 204 that records when each session's event arrived.
async fn receiver() -> (SocketAddr, Arrivals) {
    let (address, arrivals, _) = switchable_receiver().await;
    (address, arrivals)
}

/// Like `receiver`, answering with the status in the returned cell (204 at first).
async fn switchable_receiver() -> (SocketAddr, Arrivals, Arc<AtomicU16>) {
    let arrivals: Arrivals = Arc::default();
    let answer = Arc::new(AtomicU16::new(204));
    let (seen, status) = (arrivals.clone(), answer.clone());
    let app = axum::Router::new().route(
        "/hook",
        post(move |body: Bytes| {
            let (seen, status) = (seen.clone(), status.clone());
            async move {
                let at = Instant::now();
                // The session id follows `"data":{"id":"`; finding it beats parsing the event.
                let text = String::from_utf8_lossy(&body);
                if let Some(id) = text.split(r#""data":{"id":""#).nth(1).and_then(|rest| rest.get(..36)) {
                    seen.lock().expect("not poisoned").entry(id.to_owned()).or_insert(at);
                }
                axum::http::StatusCode::from_u16(status.load(Ordering::Relaxed)).expect("a status")
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("a port");
    let address = listener.local_addr().expect("an address");
    tokio::spawn(async move { axum::serve(listener, app).await });
    (address, arrivals, answer)
}

/// Subscribes `hook` to cancellations; answers the subscription's id.
async fn subscribe(server: &Server, key: &str, hook: SocketAddr) -> Uuid {
    let id = Uuid::new_v4();
    let subscription =
        format!(r#"{{"callbackUrl":"http://{hook}/hook","apiKey":"bench","eventTypes":["RedirectSessionCancelled"]}}"#);
    let path = format!("{BASE}/redirect-session-events/subscriptions/{id}");
    let put = request(Method::PUT, server.first(), &path, key, Some(Bytes::from(subscription)), None);
    let mut sender = connect(server.first()).await.expect("connects");
    let status = sender.send_request(put).await.expect("subscribes").status();
    assert_eq!(status, 201, "subscribing the receiver");
    id
}

/// A counter or gauge of the first instance's `/metrics`.
async fn metric(server: &Server, series: &str) -> f64 {
    let get = Request::builder()
        .uri("/metrics")
        .header("host", server.first().to_string())
        .body(Full::default())
        .expect("valid");
    let mut sender = connect(server.first()).await.expect("connects");
    let body = sender.send_request(get).await.expect("answers").into_body().collect().await.expect("a body");
    let text = String::from_utf8_lossy(&body.to_bytes()).into_owned();
    text.lines().find_map(|line| line.strip_prefix(&format!("{series} "))?.parse().ok()).unwrap_or(0.0)
}

/// How many deliveries the `recover` scenario makes fail and recovers in one request.
const RECOVERED: usize = 100_000;

/// `recover`: `RECOVERED` deliveries fail for good, then one recovery queues them all again
/// and they drain to the receiver, which answers 204 from then on.
pub(crate) async fn recover(server: &mut Server, key: &str, args: &Args, rows: &mut Vec<String>) {
    let (hook, arrivals, answer) = switchable_receiver().await;
    let subscription = subscribe(server, key, hook).await;
    // One retry a millisecond later: every delivery fails for good after two attempts.
    server.restart(&args.server, &["--webhook-retry-schedule", "1ms", "--webhook-concurrency-per-subscription", "256"]);
    answer.store(500, Ordering::Relaxed);
    let since = Instant::now();
    let wall_since = redirect_sessions::domain::time::Timestamp::now();
    let (_, sessions) = create_sessions(
        "create (to fail)",
        server,
        key,
        args.connections,
        Duration::from_secs(3600),
        RECOVERED,
        args.request_id,
    )
    .await;
    let make = cancels(server.first(), key, sessions, args.request_id, None);
    let cancelled = load(
        "cancel (to fail)",
        &server.addresses,
        args.connections,
        Duration::from_secs(3600),
        Expect::status(200),
        make,
    )
    .await;
    let failed_series = "redirect_sessions_webhook_deliveries_failed_total";
    let deadline = Instant::now() + Duration::from_secs(1200);
    while (metric(server, failed_series).await as usize) < cancelled.requests && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!("{} deliveries failed for good in {:?}", cancelled.requests, since.elapsed());

    answer.store(204, Ordering::Relaxed);
    arrivals.lock().expect("not poisoned").clear();
    let window = format!(r#"{{"since":"{wall_since}"}}"#);
    let path = format!("{BASE}/redirect-session-events/subscriptions/{subscription}/recover");
    let post = request(Method::POST, server.first(), &path, key, Some(Bytes::from(window)), Some(Uuid::new_v4()));
    let mut sender = connect(server.first()).await.expect("connects");
    let started = Instant::now();
    let response = sender.send_request(post).await.expect("recovers");
    let answered = started.elapsed();
    let body = response.into_body().collect().await.expect("a body").to_bytes();
    let recovered: serde_json::Value = serde_json::from_slice(&body).expect("a JSON answer");
    let queued = recovered["queued"].as_u64().unwrap_or(0) as usize;
    let deadline = Instant::now() + Duration::from_secs(600);
    while arrivals.lock().expect("not poisoned").len() < queued && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let drained = arrivals.lock().expect("not poisoned").len();
    let last = arrivals.lock().expect("not poisoned").values().max().copied().unwrap_or(started);
    rows.push(row(
        &Stats {
            name: format!("recover: one POST …/recover queues {queued} failed deliveries ({recovered})"),
            requests: 1,
            errors: usize::from(queued != cancelled.requests),
            elapsed: answered,
            latencies_us: vec![answered.as_micros() as u32],
            server_cpu: None,
        },
        None,
    ));
    rows.push(row(
        &Stats {
            name: format!("recover: drain the {queued} recovered deliveries (from the POST)"),
            requests: drained,
            errors: queued - drained,
            elapsed: last.saturating_duration_since(started),
            latencies_us: Vec::new(),
            server_cpu: None,
        },
        None,
    ));
    server.restart(&args.server, &[]);
}

/// `webhooks`: the receiver's own ceiling, a backlog drained, deliveries end to end under load,
/// and the delay of one delivery at a time.
pub(crate) async fn webhooks(server: &mut Server, key: &str, args: &Args, rows: &mut Vec<String>) {
    let (hook, arrivals) = receiver().await;
    // The receiver's own ceiling, measured by posting to it directly.
    let event = Bytes::from(r#"{"specversion":"1.0","data":{"id":"ceiling"}}"#);
    let make: MakeRequest =
        Arc::new(move |_| Some(request(Method::POST, hook, "/hook", "-", Some(event.clone()), None)));
    let ceiling =
        load("receiver ceiling (POST 204)", &[hook], args.connections, args.duration, Expect::status(204), make).await;
    rows.push(row(&ceiling, None));

    subscribe(server, key, hook).await;
    drain_backlog(server, key, args, &arrivals, &ceiling, rows).await;
    // The rows below measure the server's defaults again.
    server.restart(&args.server, &[]);
    let idle = idle_delivery(server, key, args, &arrivals).await;
    let (cancelled, deliveries) = end_to_end(server, key, args, &arrivals).await;
    rows.push(row(&cancelled, None));
    rows.push(row(&deliveries, Some(&ceiling)));
    rows.push(row(&idle, None).replace(&format!("{:.0}", idle.rate()), "—"));
}

/// Drain: queue deliveries with the dispatcher off, then start it and time the backlog.
async fn drain_backlog(
    server: &mut Server,
    key: &str,
    args: &Args,
    arrivals: &Arrivals,
    ceiling: &Stats,
    rows: &mut Vec<String>,
) {
    server.restart(&args.server, &["--no-webhook-dispatcher"]);
    let (_, backlog) = create_sessions(
        "create (for the backlog)",
        server,
        key,
        args.connections,
        args.duration,
        100_000,
        args.request_id,
    )
    .await;
    let make = cancels(server.first(), key, backlog, args.request_id, None);
    let queued = load(
        &format!("cancel (queues a delivery each, {})", header_label(args.request_id)),
        &server.addresses,
        args.connections,
        Duration::from_secs(3600),
        Expect::status(200),
        make,
    )
    .await;
    rows.push(row(&queued, None));
    arrivals.lock().expect("not poisoned").clear();
    let started = Instant::now();
    // The backlog's deliveries all go to one subscription: the server's default limit of
    // attempts in flight per subscription (16) would be what the drain measures.
    let drain_flags = ["--webhook-concurrency-per-subscription", "256"];
    server.restart(&args.server, &drain_flags);
    let deadline = Instant::now() + Duration::from_secs(300);
    while arrivals.lock().expect("not poisoned").len() < queued.requests && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let drained = arrivals.lock().expect("not poisoned").len();
    let last = arrivals.lock().expect("not poisoned").values().max().copied().unwrap_or(started);
    let drain = Stats {
        name: format!("deliveries: drain a backlog of {} (incl. restart; {})", queued.requests, drain_flags.join(" ")),
        requests: drained,
        errors: queued.requests - drained,
        elapsed: last.saturating_duration_since(started),
        latencies_us: Vec::new(),
        server_cpu: None,
    };
    rows.push(row(&drain, Some(ceiling)));
}

/// Idle latency: one cancel at a time, waiting for its delivery.
async fn idle_delivery(server: &Server, key: &str, args: &Args, arrivals: &Arrivals) -> Stats {
    let mut sender = connect(server.first()).await.expect("connects");
    let (_, idle) =
        create_sessions("create (for webhooks)", server, key, 4, Duration::from_secs(60), 200, args.request_id).await;
    let mut idle_delays = Vec::new();
    for session in &idle {
        let cancel = cancel_request(server.first(), key, session.id, args.request_id.then(Uuid::new_v4));
        let response = sender.send_request(cancel).await.expect("cancels");
        let acknowledged = Instant::now();
        let _ = response.into_body().collect().await;
        let id = session.id.to_string();
        let arrived = loop {
            if let Some(at) = arrivals.lock().expect("not poisoned").get(&id).copied() {
                break at;
            }
            tokio::time::sleep(Duration::from_micros(200)).await;
        };
        idle_delays.push(arrived.saturating_duration_since(acknowledged).as_micros() as u32);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    idle_delays.sort_unstable();
    Stats {
        name: "commit → delivery, idle (one at a time)".to_owned(),
        requests: idle_delays.len(),
        errors: 0,
        elapsed: Duration::from_secs(1),
        latencies_us: idle_delays,
        server_cpu: None,
    }
}

/// Throughput: cancel many sessions as fast as possible and count deliveries per second.
/// Answers the cancels' stats and the deliveries'.
async fn end_to_end(server: &Server, key: &str, args: &Args, arrivals: &Arrivals) -> (Stats, Stats) {
    let (_, sessions) = create_sessions(
        "create (for webhooks)",
        server,
        key,
        args.connections,
        args.duration,
        400_000,
        args.request_id,
    )
    .await;
    arrivals.lock().expect("not poisoned").clear();
    let acknowledged: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let make = cancels(server.first(), key, sessions, args.request_id, Some(acknowledged.clone()));
    let started = Instant::now();
    let cancelled = load(
        &format!("cancel (with a subscriber, {})", header_label(args.request_id)),
        &server.addresses,
        args.connections,
        args.duration,
        Expect::status(200),
        make,
    )
    .await;
    let expected = cancelled.requests;
    let deadline = Instant::now() + Duration::from_secs(120);
    while arrivals.lock().expect("not poisoned").len() < expected && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let arrived = arrivals.lock().expect("not poisoned").clone();
    let last = arrived.values().max().copied().unwrap_or(started);
    let acks = acknowledged.lock().expect("not poisoned");
    let mut delays: Vec<u32> = arrived
        .iter()
        .filter_map(|(id, at)| Some(at.saturating_duration_since(*acks.get(id)?).as_micros() as u32))
        .collect();
    delays.sort_unstable();
    let deliveries = Stats {
        name: "deliveries end to end (cancel → receiver)".to_owned(),
        requests: arrived.len(),
        errors: expected.saturating_sub(arrived.len()),
        elapsed: last.saturating_duration_since(started),
        latencies_us: delays,
        server_cpu: None,
    };
    (cancelled, deliveries)
}
