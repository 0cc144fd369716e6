//! A receiver of redirect-session webhooks, shown in docs/WEBHOOKS.md ("Receiving webhooks:
//! verified examples"), checking the Standard Webhooks signature by hand. Not built by this
//! project; its Cargo.toml:
//!
//! ```toml
//! [dependencies]
//! axum = "0.8"
//! base64 = "0.22"
//! hmac = "0.12"
//! serde_json = "1"
//! sha2 = "0.10"
//! tokio = { version = "1", features = ["macros", "rt-multi-thread", "net"] }
//! ```
//!
//! ```sh
//! WEBHOOK_SECRET=whsec_... WEBHOOK_API_KEY=... PORT=8080 cargo run
//! ```
//!
//! It answers 204 to a verified delivery (to a repeat too: it was handled already), 401 when the
//! x-api-key or the signature is wrong, 400 when the signed body is no CloudEvent.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::Router;
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Timestamps further than this from the receiver's clock are refused (replays).
const TOLERANCE_SECS: i64 = 5 * 60;

struct Receiver {
    /// The base64-decoded part of the subscription's signingSecret after `whsec_`.
    key: Vec<u8>,
    /// The subscription's apiKey, sent back as x-api-key.
    api_key: String,
    /// The ids of the events handled so far; a real receiver keeps them in its database.
    seen: Mutex<HashSet<String>>,
}

/// Whether `body` carries a valid signature: `webhook-signature` holds one or more
/// space-separated `v1,<base64>` entries (two while a secret is rotated); one matching is enough.
fn verify(key: &[u8], headers: &HeaderMap, body: &[u8], now: i64) -> bool {
    let header = |name: &str| headers.get(name).and_then(|value| value.to_str().ok());
    let (Some(id), Some(timestamp), Some(signatures)) =
        (header("webhook-id"), header("webhook-timestamp"), header("webhook-signature"))
    else {
        return false;
    };
    match timestamp.parse::<i64>() {
        Ok(seconds) if (now - seconds).abs() <= TOLERANCE_SECS => {}
        _ => return false,
    }
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes a key of any length");
    mac.update(format!("{id}.{timestamp}.").as_bytes());
    mac.update(body);
    signatures
        .split(' ')
        .filter_map(|entry| entry.strip_prefix("v1,"))
        .filter_map(|signature| STANDARD.decode(signature).ok())
        // verify_slice compares in constant time.
        .any(|signature| mac.clone().verify_slice(&signature).is_ok())
}

/// Compares without stopping at the first difference.
fn same(given: &[u8], expected: &[u8]) -> bool {
    given.len() == expected.len() && given.iter().zip(expected).fold(0, |diff, (a, b)| diff | (a ^ b)) == 0
}

async fn receive(State(receiver): State<Arc<Receiver>>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |elapsed| elapsed.as_secs() as i64);
    let api_key = headers.get("x-api-key").map_or(&[][..], |value| value.as_bytes());
    // The raw bytes, before any JSON parsing: the signature is over them.
    if !same(api_key, receiver.api_key.as_bytes()) || !verify(&receiver.key, &headers, &body, now) {
        return StatusCode::UNAUTHORIZED;
    }
    // A CloudEvents 1.0 structured event: the whole event is the JSON body.
    let Ok(event) = serde_json::from_slice::<serde_json::Value>(&body) else {
        return StatusCode::BAD_REQUEST;
    };
    let (Some("1.0"), Some(id), Some(kind), Some(data)) =
        (event["specversion"].as_str(), event["id"].as_str(), event["type"].as_str(), event["data"].as_object())
    else {
        return StatusCode::BAD_REQUEST;
    };
    if !receiver.seen.lock().unwrap().insert(id.to_owned()) {
        return StatusCode::NO_CONTENT; // delivered again (at least once): handled already
    }
    // Queue the real work here (read data["state"], or GET the session) and answer at once.
    println!("{kind} {id}: session {} is {}", data["id"], data["state"]);
    StatusCode::NO_CONTENT
}

#[tokio::main]
async fn main() {
    let secret = std::env::var("WEBHOOK_SECRET").expect("WEBHOOK_SECRET (whsec_...)");
    let key =
        STANDARD.decode(secret.strip_prefix("whsec_").unwrap_or(&secret)).expect("WEBHOOK_SECRET is whsec_ and base64");
    let api_key = std::env::var("WEBHOOK_API_KEY").expect("WEBHOOK_API_KEY");
    let port = std::env::var("PORT").unwrap_or_else(|_| "8080".into());
    let receiver = Arc::new(Receiver { key, api_key, seen: Mutex::default() });
    let app = Router::new().route("/{*path}", post(receive)).layer(DefaultBodyLimit::max(1 << 20)).with_state(receiver);
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port.parse::<u16>().expect("PORT"))).await.unwrap();
    axum::serve(listener, app).await.unwrap();
}
