//! Slow and greedy clients (docs/OPERATIONS.md "Slow and greedy clients"): headers trickled a
//! byte at a time and bodies that never finish are cut off after `http_header_timeout` and
//! `http_body_timeout` while other clients are served, and connections beyond
//! `http_max_connections` wait until one closes. Raw TCP, so the test controls every byte.

use std::io::ErrorKind;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::common::*;
use reqwest::Method;
use tokio::net::TcpStream;
use uuid::Uuid;

/// How often a slow client sends its next byte.
const TRICKLE: Duration = Duration::from_millis(200);
/// How long a well-behaved request may take here before the test fails.
const ANSWER_DEADLINE: Duration = Duration::from_secs(10);

/// Writes all of `bytes` (tokio's `io-util` is not among the crate's features).
async fn write_all(stream: &TcpStream, mut bytes: &[u8]) -> std::io::Result<()> {
    while !bytes.is_empty() {
        stream.writable().await?;
        match stream.try_write(bytes) {
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Reads what has arrived (waiting for something): `Ok(0)` at EOF.
async fn read_some(stream: &TcpStream, buffer: &mut [u8]) -> std::io::Result<usize> {
    loop {
        stream.readable().await?;
        match stream.try_read(buffer) {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
}

/// What the server sent on a connection before it ended it.
#[derive(Debug)]
struct CutOff {
    received: String,
}

/// Sends `head` at once, then `trickle` one byte every `TRICKLE` (repeating its last byte when
/// it runs out), until the server ends the connection (EOF or reset) or `give_up` has passed.
/// `started` is counted up once the first byte is out.
async fn trickle(
    address: SocketAddr,
    head: &[u8],
    trickle: &[u8],
    started: &AtomicUsize,
    give_up: Duration,
) -> Option<CutOff> {
    let stream = TcpStream::connect(address).await.expect("the server accepts connections");
    write_all(&stream, head).await.expect("the first bytes go out");
    let mut pending = trickle.iter().copied().chain(std::iter::repeat(*trickle.last().unwrap_or(&b'a')));
    if head.is_empty() {
        let first = [pending.next().unwrap()];
        write_all(&stream, &first).await.expect("the first byte goes out");
    }
    started.fetch_add(1, Ordering::SeqCst);
    let until = tokio::time::Instant::now() + give_up;
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + TRICKLE, TRICKLE);
    let mut received = Vec::new();
    let mut buffer = [0u8; 4096];
    loop {
        tokio::select! {
            read = read_some(&stream, &mut buffer) => match read {
                Ok(0) | Err(_) => return Some(CutOff { received: String::from_utf8_lossy(&received).into_owned() }),
                Ok(n) => received.extend_from_slice(&buffer[..n]),
            },
            _ = tick.tick() => {
                // A failed write means the server is gone; the read above says so next.
                let _ = write_all(&stream, &[pending.next().unwrap()]).await;
            }
            () = tokio::time::sleep_until(until) => return None,
        }
    }
}

/// The server's address.
fn address_of(server: &TestServer) -> SocketAddr {
    server.url.trim_start_matches("http://").parse().unwrap()
}

/// Reads one response (head and `content-length` body) from a kept-alive connection.
async fn read_response(stream: &TcpStream) -> std::io::Result<String> {
    let mut received = Vec::new();
    let mut buffer = [0u8; 4096];
    loop {
        if let Some(end) = received.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&received[..end]).to_ascii_lowercase();
            let length = head
                .lines()
                .find_map(|line| line.strip_prefix("content-length:"))
                .map_or(0, |value| value.trim().parse::<usize>().unwrap());
            if received.len() >= end + 4 + length {
                return Ok(String::from_utf8_lossy(&received).into_owned());
            }
        }
        match read_some(stream, &mut buffer).await? {
            0 => return Err(std::io::Error::new(ErrorKind::UnexpectedEof, "the connection ended mid-answer")),
            n => received.extend_from_slice(&buffer[..n]),
        }
    }
}

const LIVE: &[u8] = b"GET /health/live HTTP/1.1\r\nhost: test\r\n\r\n";

/// Ordinary requests: liveness and a session create, each answered within the deadline.
async fn ordinary_requests(server: &TestServer) {
    let live = tokio::time::timeout(ANSWER_DEADLINE, server.client.get(format!("{}/health/live", server.url)).send())
        .await
        .expect("GET /health/live is answered in time")
        .unwrap();
    assert_eq!(live.status(), 200);
    let created = tokio::time::timeout(ANSWER_DEADLINE, server.put_session(Uuid::new_v4(), &new_transaction_intent()))
        .await
        .expect("a session create is answered in time");
    assert_eq!(created.status(), 201, "{}", created.text().await.unwrap());
}

#[tokio::test]
async fn clients_that_trickle_their_headers_are_cut_off_while_others_are_served() {
    const SLOW: usize = 200;
    let header_timeout = Duration::from_secs(2);
    let server = TestServer::start_with(|config| {
        config.http_header_timeout = header_timeout;
        config.http_body_timeout = Duration::from_secs(1);
    })
    .await;
    let address = address_of(&server);
    let started = Arc::new(AtomicUsize::new(0));
    let cut_off = Arc::new(AtomicUsize::new(0));
    // A header that never ends: `x-slow: aaaa…`, one byte per TRICKLE.
    let give_up = header_timeout * 10;
    let clients: Vec<_> = (0..SLOW)
        .map(|_| {
            let (started, cut_off) = (started.clone(), cut_off.clone());
            tokio::spawn(async move {
                let head = b"GET /health/live HTTP/1.1\r\nhost: test\r\nx-slow: ";
                let outcome = trickle(address, &head[..1], &head[1..], &started, give_up).await;
                cut_off.fetch_add(1, Ordering::SeqCst);
                outcome
            })
        })
        .collect();
    eventually(ANSWER_DEADLINE, "every slow client to have started", || {
        let started = started.clone();
        async move { started.load(Ordering::SeqCst) == SLOW }
    })
    .await;

    // While they hang on, everyone else is answered.
    let mut rounds_while_all_hang_on = 0;
    loop {
        let before = cut_off.load(Ordering::SeqCst);
        ordinary_requests(&server).await;
        if before == 0 && cut_off.load(Ordering::SeqCst) == 0 {
            rounds_while_all_hang_on += 1;
        }
        if cut_off.load(Ordering::SeqCst) > 0 || rounds_while_all_hang_on >= 5 {
            break;
        }
    }
    assert!(rounds_while_all_hang_on > 0, "no ordinary request was answered while the slow clients hung on");

    // Every slow client is cut off by the server: none is still connected when it would give
    // up itself (after ten header timeouts of trickling).
    for client in clients {
        let outcome = client.await.unwrap();
        assert!(outcome.is_some(), "a slow client was still connected after {give_up:?}");
    }
    // And the server is still fine.
    ordinary_requests(&server).await;
    server.stop().await;
}

#[tokio::test]
async fn a_body_that_does_not_arrive_in_time_is_answered_408_and_the_connection_closed() {
    let body_timeout = Duration::from_secs(1);
    let server = TestServer::start_with(|config| {
        config.http_header_timeout = Duration::from_secs(30);
        config.http_body_timeout = body_timeout;
    })
    .await;
    let address = address_of(&server);
    let started = AtomicUsize::new(0);
    let api_head = format!(
        "PUT {BASE}/redirect-sessions/{} HTTP/1.1\r\nhost: test\r\nx-api-key: {}\r\n\
         content-type: application/json\r\ncontent-length: 1000\r\n\r\n",
        Uuid::new_v4(),
        server.api_key
    );
    let form_head = "POST /pay HTTP/1.1\r\nhost: test\r\ncontent-type: application/x-www-form-urlencoded\r\n\
                     content-length: 1000\r\n\r\n";
    for (what, head, body) in [
        ("a session create", api_head.as_str(), "{\"type\": \"NewTransactionIntent\" "),
        ("a hosted page form", form_head, "token=aaaa"),
    ] {
        let outcome = trickle(address, head.as_bytes(), body.as_bytes(), &started, body_timeout * 10).await;
        let cut_off = outcome.unwrap_or_else(|| panic!("{what} trickled slowly was not cut off"));
        assert!(cut_off.received.starts_with("HTTP/1.1 408 "), "{what}: {cut_off:?}");
        assert!(cut_off.received.to_ascii_lowercase().contains("\r\nconnection: close\r\n"), "{what}: {cut_off:?}");
        // The documented error body, like every other error answer.
        let body = cut_off.received.split("\r\n\r\n").nth(1).unwrap_or_default();
        let error: serde_json::Value = serde_json::from_str(body).unwrap_or_else(|_| panic!("{what}: {body}"));
        assert_eq!(
            (error["code"].as_str(), &error["details"]),
            (Some("RequestTimeout"), &serde_json::json!({})),
            "{what}"
        );
    }
    // Nothing was created by the cut-off request, and the server still answers.
    let (status, page) =
        status_and_json(server.request(Method::GET, &format!("{BASE}/redirect-sessions")).send().await.unwrap()).await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(page["items"].as_array().map(Vec::len), Some(0), "{page}");
    ordinary_requests(&server).await;
    server.stop().await;
}

#[tokio::test]
async fn connections_beyond_the_limit_wait_until_one_closes() {
    const LIMIT: usize = 5;
    let server = TestServer::start_with(|config| {
        config.http_max_connections = LIMIT;
        config.http_header_timeout = Duration::from_secs(60);
    })
    .await;
    let address = address_of(&server);
    // LIMIT kept-alive connections, each served once: every slot is taken.
    let mut held = Vec::new();
    for _ in 0..LIMIT {
        let stream = TcpStream::connect(address).await.unwrap();
        write_all(&stream, LIVE).await.unwrap();
        let answer = tokio::time::timeout(ANSWER_DEADLINE, read_response(&stream)).await.unwrap().unwrap();
        assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
        held.push(stream);
    }
    // One more: it connects (the kernel queues it) but is not served…
    let waiting = TcpStream::connect(address).await.unwrap();
    write_all(&waiting, LIVE).await.unwrap();
    let early = tokio::time::timeout(Duration::from_secs(1), read_response(&waiting)).await;
    assert!(early.is_err(), "a connection beyond the limit was served: {early:?}");
    // … until one of the others closes.
    drop(held.remove(0));
    let answer = tokio::time::timeout(ANSWER_DEADLINE, read_response(&waiting))
        .await
        .expect("the waiting connection is served once a slot is free")
        .unwrap();
    assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
    // The held connections are still served too.
    write_all(&held[0], LIVE).await.unwrap();
    let again = tokio::time::timeout(ANSWER_DEADLINE, read_response(&held[0])).await.unwrap().unwrap();
    assert!(again.starts_with("HTTP/1.1 200 "), "{again}");
    drop(held);
    drop(waiting);
    server.stop().await;
}

#[tokio::test]
async fn the_metrics_listener_cuts_off_slow_clients_too() {
    // A free port for the metrics listener (bound and released; nothing else takes it this fast).
    let metrics_address = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let header_timeout = Duration::from_secs(1);
    let server = TestServer::start_with(|config| {
        config.metrics_listen = Some(metrics_address);
        config.http_header_timeout = header_timeout;
    })
    .await;
    // The metrics listener is bound once the server task runs.
    eventually(
        ANSWER_DEADLINE,
        "the metrics listener",
        || async move { TcpStream::connect(metrics_address).await.is_ok() },
    )
    .await;
    let started = AtomicUsize::new(0);
    let head = b"GET /metrics HTTP/1.1\r\nhost: test\r\nx-slow: ";
    let outcome = trickle(metrics_address, &head[..1], &head[1..], &started, header_timeout * 10).await;
    assert!(outcome.is_some(), "a slow client of the metrics listener was not cut off");
    let metrics = server.client.get(format!("http://{metrics_address}/metrics")).send().await.unwrap();
    assert_eq!(metrics.status(), 200);
    server.stop().await;
}
