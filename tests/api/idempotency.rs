//! Idempotency by `x-request-id` (docs/DESIGN.md "Idempotency"): the first outcome is kept and replayed byte for
//! byte, a reused id for another request is refused, a duplicate of a request still running
//! waits for it (or is told it is in progress), and records are per merchant and survive a
//! restart.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::common::*;
use axum::http::StatusCode;
use axum::middleware::from_fn_with_state;
use redirect_sessions::api::{gate, with_common_layers};
use redirect_sessions::domain::event::EventType;
use redirect_sessions::error::ApiError;
use redirect_sessions::store::{Found, IdempotencyKey};
use reqwest::{Method, Response};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use uuid::Uuid;

fn bytes_of(body: &Value) -> Vec<u8> {
    serde_json::to_vec(body).unwrap()
}

/// What the service fingerprints: SHA-256 of `METHOD\nPATH_AND_QUERY\nBODY`.
fn fingerprint(method: &str, path_and_query: &str, body: &[u8]) -> [u8; 32] {
    let mut hash = Sha256::new();
    hash.update(method.as_bytes());
    hash.update(b"\n");
    hash.update(path_and_query.as_bytes());
    hash.update(b"\n");
    hash.update(body);
    hash.finalize().into()
}

/// A PUT of exactly `body` with `x-request-id`, as the merchant whose key is `api_key`.
async fn put_raw(server: &TestServer, api_key: &str, id: Uuid, request_id: Uuid, body: &[u8]) -> Response {
    server
        .request_as(Method::PUT, &session_path(id), api_key)
        .header("x-request-id", request_id.to_string())
        .header("content-type", "application/json")
        .body(body.to_vec())
        .send()
        .await
        .unwrap()
}

async fn put_with_request_id(server: &TestServer, id: Uuid, request_id: Uuid, body: &[u8]) -> Response {
    put_raw(server, &server.api_key, id, request_id, body).await
}

async fn cancel_with_request_id(server: &TestServer, id: Uuid, request_id: Uuid) -> Response {
    server.request(Method::POST, &cancel_path(id)).header("x-request-id", request_id.to_string()).send().await.unwrap()
}

/// Status, the headers that matter here, and the exact body bytes.
struct Answer {
    status: u16,
    replayed: Option<String>,
    location: Option<String>,
    content_type: Option<String>,
    correlation: Option<String>,
    etag: Option<String>,
    body: Vec<u8>,
}

async fn answer(response: Response) -> Answer {
    let header = |name: &str| response.headers().get(name).map(|v| v.to_str().unwrap().to_owned());
    let (replayed, location, content_type, correlation, etag) = (
        header("idempotent-replayed"),
        header("location"),
        header("content-type"),
        header("x-correlation-id"),
        header("etag"),
    );
    let status = response.status().as_u16();
    let body = response.bytes().await.unwrap().to_vec();
    Answer { status, replayed, location, content_type, correlation, etag, body }
}

fn json_of(bytes: &[u8]) -> Value {
    serde_json::from_slice(bytes).unwrap_or_else(|_| panic!("not JSON: {}", String::from_utf8_lossy(bytes)))
}

async fn events_of(server: &TestServer, id: Uuid) -> Vec<EventType> {
    server.event_types(id).await
}

#[tokio::test]
async fn the_same_put_again_replays_the_first_answer_byte_for_byte() {
    let server = TestServer::start().await;
    let (id, request_id, body) = (Uuid::new_v4(), Uuid::new_v4(), bytes_of(&new_transaction_intent()));

    let first = answer(put_with_request_id(&server, id, request_id, &body).await).await;
    assert_eq!(first.status, 201, "{}", String::from_utf8_lossy(&first.body));
    assert_eq!(first.replayed, None, "a first execution is not a replay");

    let again = answer(put_with_request_id(&server, id, request_id, &body).await).await;
    assert_eq!(again.status, 201, "the stored status, not the 200 of a repeated PUT");
    assert_eq!(again.replayed.as_deref(), Some("true"));
    assert_eq!(again.body, first.body, "byte-identical body");
    assert_eq!(again.location, first.location);
    assert_eq!(again.location, Some(session_path(id)));
    assert_eq!((&again.etag, first.etag.is_some()), (&first.etag, true));
    assert_eq!(again.content_type.as_deref(), Some("application/json"));
    assert_eq!(again.correlation, Some(request_id.to_string()));
    server.stop().await;
}

#[tokio::test]
async fn a_replayed_put_is_not_executed_again_even_after_the_session_changed() {
    let server = TestServer::start().await;
    let (id, request_id, body) = (Uuid::new_v4(), Uuid::new_v4(), bytes_of(&new_transaction_intent()));
    let first = answer(put_with_request_id(&server, id, request_id, &body).await).await;
    assert_eq!(first.status, 201);
    let (status, cancelled) = status_and_json(server.cancel_session(id).await).await;
    assert_eq!((status, cancelled["state"].as_str()), (200, Some("Cancelled")));

    // Executing the PUT again would answer 200 with the cancelled session.
    let again = answer(put_with_request_id(&server, id, request_id, &body).await).await;
    assert_eq!((again.status, again.replayed.as_deref()), (201, Some("true")));
    assert_eq!(again.body, first.body);
    assert_eq!(json_of(&again.body)["state"], "Created");
    server.stop().await;
}

#[tokio::test]
async fn a_replayed_cancel_answers_the_same_bytes_and_records_no_second_event() {
    let server = TestServer::start().await;
    let id = server.created_session().await;
    let request_id = Uuid::new_v4();

    let first = answer(cancel_with_request_id(&server, id, request_id).await).await;
    assert_eq!(first.status, 200, "{}", String::from_utf8_lossy(&first.body));
    assert_eq!(json_of(&first.body)["state"], "Cancelled");
    assert_eq!(json_of(&first.body)["lastCorrelationId"], request_id.to_string());
    assert_eq!(events_of(&server, id).await, [EventType::RedirectSessionCancelled]);

    let again = answer(cancel_with_request_id(&server, id, request_id).await).await;
    assert_eq!((again.status, again.replayed.as_deref()), (200, Some("true")));
    assert_eq!(again.body, first.body);
    assert_eq!(events_of(&server, id).await, [EventType::RedirectSessionCancelled], "no second event");
    server.stop().await;
}

#[tokio::test]
async fn a_stored_business_error_is_replayed_even_after_the_resource_appeared() {
    let server = TestServer::start().await;
    let (id, request_id) = (Uuid::new_v4(), Uuid::new_v4());
    let first = cancel_with_request_id(&server, id, request_id).await;
    let first_body = assert_error(first, 404, "RedirectSessionNotFound").await;

    let response = server.put_session(id, &new_transaction_intent()).await;
    assert_eq!(response.status(), 201);

    let again = cancel_with_request_id(&server, id, request_id).await;
    assert_eq!(again.headers().get("idempotent-replayed").map(|v| v.to_str().unwrap()), Some("true"));
    let again_body = assert_error(again, 404, "RedirectSessionNotFound").await;
    assert_eq!(again_body, first_body);
    let (_, session) = status_and_json(server.get_session(id).await).await;
    assert_eq!(session["state"], "Created", "the replayed cancel did not run");
    assert!(events_of(&server, id).await.is_empty());
    server.stop().await;
}

#[tokio::test]
async fn the_same_request_id_with_a_different_body_is_refused_as_reused() {
    let server = TestServer::start().await;
    let (id, request_id) = (Uuid::new_v4(), Uuid::new_v4());
    let body = bytes_of(&new_transaction_intent());
    let first = answer(put_with_request_id(&server, id, request_id, &body).await).await;
    assert_eq!(first.status, 201);

    let mut other = new_transaction_intent();
    other["transactionData"]["amount"] = json!(20);
    let response = put_with_request_id(&server, id, request_id, &bytes_of(&other)).await;
    assert_eq!(response.headers().get("idempotent-replayed"), None);
    let error = assert_error(response, 422, "RequestIdReused").await;
    assert_eq!(error["correlationId"], request_id.to_string());

    // Even the same JSON written with other bytes is another request.
    let mut spaced = body.clone();
    spaced.push(b' ');
    assert_error(put_with_request_id(&server, id, request_id, &spaced).await, 422, "RequestIdReused").await;

    // The stored outcome is untouched.
    let again = answer(put_with_request_id(&server, id, request_id, &body).await).await;
    assert_eq!((again.status, again.replayed.as_deref()), (201, Some("true")));
    assert_eq!(again.body, first.body);
    let (_, session) = status_and_json(server.get_session(id).await).await;
    assert_eq!(session["transactionData"]["amount"], json!(100.5));
    server.stop().await;
}

#[tokio::test]
async fn the_same_request_id_on_another_path_or_method_is_refused_as_reused() {
    let server = TestServer::start().await;
    let (id, request_id, body) = (Uuid::new_v4(), Uuid::new_v4(), bytes_of(&new_transaction_intent()));
    assert_eq!(put_with_request_id(&server, id, request_id, &body).await.status(), 201);

    let other_id = Uuid::new_v4();
    assert_error(put_with_request_id(&server, other_id, request_id, &body).await, 422, "RequestIdReused").await;
    assert_error(server.get_session(other_id).await, 404, "RedirectSessionNotFound").await;

    assert_error(cancel_with_request_id(&server, id, request_id).await, 422, "RequestIdReused").await;
    let (_, session) = status_and_json(server.get_session(id).await).await;
    assert_eq!(session["state"], "Created", "the refused cancel did not run");
    assert!(events_of(&server, id).await.is_empty());
    server.stop().await;
}

/// A merchant route wired like the real ones whose handler, on its first call, holds until
/// the test releases it, then answers `200 done`; later calls answer `200 again`.
struct HeldRoute {
    caller: Caller,
    entered: Arc<tokio::sync::Notify>,
    release: Arc<tokio::sync::Notify>,
    calls: Arc<AtomicUsize>,
}

async fn held_route(server: &TestServer) -> HeldRoute {
    let (entered, release, calls) =
        (Arc::new(tokio::sync::Notify::new()), Arc::new(tokio::sync::Notify::new()), Arc::new(AtomicUsize::new(0)));
    let handler = {
        let (entered, release, calls) = (entered.clone(), release.clone(), calls.clone());
        move || {
            let (entered, release, calls) = (entered.clone(), release.clone(), calls.clone());
            async move {
                if calls.fetch_add(1, Ordering::SeqCst) > 0 {
                    return (StatusCode::OK, "again");
                }
                entered.notify_one();
                release.notified().await;
                (StatusCode::OK, "done")
            }
        }
    };
    let url = serve_merchant_route(server, axum::routing::put(handler)).await;
    let caller = Caller { client: server.client.clone(), api_key: server.api_key.clone(), url };
    HeldRoute { caller, entered, release, calls }
}

impl HeldRoute {
    /// Sends `body` under `request_id` in the background.
    fn put_in_background(&self, request_id: Uuid, body: &'static str) -> tokio::task::JoinHandle<Response> {
        let caller = self.caller.clone();
        tokio::spawn(async move { caller.put(request_id, body).await })
    }

    /// Sends the first request under `request_id` in the background, and returns once the
    /// handler holds it.
    async fn first_running(&self, request_id: Uuid) -> tokio::task::JoinHandle<Response> {
        let first = self.put_in_background(request_id, "{}");
        self.entered.notified().await;
        first
    }
}

/// Serves `route` at `/route` behind the merchant API's gate and the common layers; answers its URL.
async fn serve_merchant_route(
    server: &TestServer,
    route: axum::routing::MethodRouter<redirect_sessions::state::AppState>,
) -> String {
    let state = server.state.clone();
    let routes = axum::Router::new().route("/route", route).layer(from_fn_with_state(state.clone(), gate::middleware));
    let app = with_common_layers(routes, state);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{address}/route")
}

/// Calls a stand-in route as the test server's merchant.
#[derive(Clone)]
struct Caller {
    client: reqwest::Client,
    api_key: String,
    url: String,
}

impl Caller {
    async fn put(&self, request_id: Uuid, body: &'static str) -> Response {
        let request = self.client.put(&self.url).header("x-api-key", &self.api_key).body(body);
        request.header("x-request-id", request_id.to_string()).send().await.unwrap()
    }
}

/// Waits until `n` duplicates wait for the request holding `key`.
async fn until_waiting(server: &TestServer, key: IdempotencyKey, n: usize) {
    for _ in 0..2_000 {
        if server.state.in_flight.waiting(key) == n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("{n} duplicates never waited");
}

#[tokio::test]
async fn a_duplicate_arriving_while_the_first_runs_waits_and_replays_its_answer() {
    let server = TestServer::start().await;
    let route = held_route(&server).await;
    let request_id = Uuid::new_v4();
    let key = IdempotencyKey { merchant_id: server.merchant_id, request_id };
    let first = route.first_running(request_id).await;
    let duplicates: Vec<_> = (0..3).map(|_| route.put_in_background(request_id, "{}")).collect();
    until_waiting(&server, key, 3).await;
    route.release.notify_one();

    let first = answer(first.await.unwrap()).await;
    assert_eq!((first.status, first.replayed, first.body.as_slice()), (200, None, &b"done"[..]));
    for duplicate in duplicates {
        let duplicate = answer(duplicate.await.unwrap()).await;
        assert_eq!(duplicate.status, 200);
        assert_eq!((duplicate.replayed.as_deref(), duplicate.body.as_slice()), (Some("true"), &b"done"[..]));
    }
    assert_eq!(route.calls.load(Ordering::SeqCst), 1, "the handler ran once");
    server.stop().await;
}

#[tokio::test]
async fn a_duplicate_held_up_longer_than_the_wait_is_answered_request_in_progress() {
    let server = TestServer::start().await;
    let route = held_route(&server).await;
    let request_id = Uuid::new_v4();
    let first = route.first_running(request_id).await;

    let response = route.caller.put(request_id, "{}").await;
    assert_eq!(response.headers().get("idempotent-replayed"), None);
    let error = assert_error(response, 409, "RequestInProgress").await;
    assert_eq!(error["correlationId"], request_id.to_string());

    // Once the first is over, a retry gets its answer.
    route.release.notify_one();
    assert_eq!(answer(first.await.unwrap()).await.body, b"done");
    let retried = answer(route.caller.put(request_id, "{}").await).await;
    assert_eq!((retried.replayed.as_deref(), retried.body.as_slice()), (Some("true"), &b"done"[..]));
    assert_eq!(route.calls.load(Ordering::SeqCst), 1);
    server.stop().await;
}

#[tokio::test]
async fn a_different_request_under_an_id_still_executing_is_refused_as_reused_once_it_is_done() {
    let server = TestServer::start().await;
    let route = held_route(&server).await;
    let request_id = Uuid::new_v4();
    let key = IdempotencyKey { merchant_id: server.merchant_id, request_id };
    let first = route.first_running(request_id).await;
    let other = route.put_in_background(request_id, "{\"other\":1}");
    until_waiting(&server, key, 1).await;
    route.release.notify_one();

    assert_eq!(first.await.unwrap().status(), 200);
    assert_error(other.await.unwrap(), 422, "RequestIdReused").await;
    assert_eq!(route.calls.load(Ordering::SeqCst), 1);
    server.stop().await;
}

#[tokio::test]
async fn a_change_and_its_kept_answer_are_one_write() {
    // The session and the answer are committed together: after the create, the record is there
    // (a replay needs no second write), and one duplicate sent after it replays.
    let server = TestServer::start().await;
    let (id, request_id, body) = (Uuid::new_v4(), Uuid::new_v4(), bytes_of(&new_transaction_intent()));
    let key = IdempotencyKey { merchant_id: server.merchant_id, request_id };
    let print = fingerprint("PUT", &session_path(id), &body);
    assert_eq!(server.store().idempotency_lookup(key, print).await.unwrap(), None);
    let created = answer(put_with_request_id(&server, id, request_id, &body).await).await;
    assert_eq!(created.status, 201);
    match server.store().idempotency_lookup(key, print).await.unwrap() {
        Some(Found::Replay(kept)) => {
            // A new session's answer is kept as a reference to the session, not as its bytes
            // (a replay rebuilds them: the tests above compare them byte for byte).
            assert_eq!((kept.answer.status, kept.answer.session, kept.answer.body.len()), (201, Some(id), 0));
            assert_eq!(kept.session.map(|session| session.id), Some(id), "read with its session");
        }
        other => panic!("the create kept no answer: {other:?}"),
    }
    let other_print = fingerprint("PUT", &session_path(Uuid::new_v4()), &body);
    assert_eq!(server.store().idempotency_lookup(key, other_print).await.unwrap(), Some(Found::Reused));
    server.stop().await;
}

#[tokio::test]
async fn a_validation_failure_is_not_stored_so_a_corrected_retry_runs() {
    let server = TestServer::start().await;
    let (id, request_id) = (Uuid::new_v4(), Uuid::new_v4());
    let mut invalid = new_transaction_intent();
    invalid["transactionData"]["amount"] = json!(0);
    let invalid = bytes_of(&invalid);

    let response = put_with_request_id(&server, id, request_id, &invalid).await;
    let error = assert_error(response, 400, "Validation").await;
    assert_eq!(error["details"]["validationErrorReasons"][0]["fieldName"], "transactionData.amount");

    // The same invalid request runs again rather than being replayed.
    let response = put_with_request_id(&server, id, request_id, &invalid).await;
    assert_eq!(response.headers().get("idempotent-replayed"), None);
    assert_error(response, 400, "Validation").await;

    let corrected =
        answer(put_with_request_id(&server, id, request_id, &bytes_of(&new_transaction_intent())).await).await;
    assert_eq!(corrected.status, 201, "{}", String::from_utf8_lossy(&corrected.body));
    assert_eq!(corrected.replayed, None);
    assert_eq!(json_of(&corrected.body)["id"], id.to_string());
    server.stop().await;
}

#[tokio::test]
async fn an_unsupported_media_type_is_not_stored_so_a_retry_with_the_right_content_type_runs() {
    let server = TestServer::start().await;
    let (id, request_id, body) = (Uuid::new_v4(), Uuid::new_v4(), bytes_of(&new_transaction_intent()));
    let response = server
        .request(Method::PUT, &session_path(id))
        .header("x-request-id", request_id.to_string())
        .header("content-type", "text/plain")
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_error(response, 415, "UnsupportedMediaType").await;

    // Same method, path and body bytes (the fingerprint does not cover headers).
    let retried = answer(put_with_request_id(&server, id, request_id, &body).await).await;
    assert_eq!(retried.status, 201, "{}", String::from_utf8_lossy(&retried.body));
    assert_eq!(retried.replayed, None);
    server.stop().await;
}

#[tokio::test]
async fn two_merchants_using_the_same_request_id_do_not_interact() {
    let server = TestServer::start().await;
    let (other_key, _) = server.another_merchant().await;
    let request_id = Uuid::new_v4();
    let body = bytes_of(&new_transaction_intent());
    let (mine, theirs) = (Uuid::new_v4(), Uuid::new_v4());

    let first = answer(put_raw(&server, &server.api_key, mine, request_id, &body).await).await;
    assert_eq!((first.status, first.replayed), (201, None));
    let second = answer(put_raw(&server, &other_key, theirs, request_id, &body).await).await;
    assert_eq!(second.status, 201, "{}", String::from_utf8_lossy(&second.body));
    assert_eq!(second.replayed, None);
    assert_eq!(json_of(&second.body)["id"], theirs.to_string());

    // Each merchant's own retry replays its own outcome.
    let mine_again = answer(put_raw(&server, &server.api_key, mine, request_id, &body).await).await;
    assert_eq!((mine_again.replayed.as_deref(), &mine_again.body), (Some("true"), &first.body));
    let theirs_again = answer(put_raw(&server, &other_key, theirs, request_id, &body).await).await;
    assert_eq!((theirs_again.replayed.as_deref(), &theirs_again.body), (Some("true"), &second.body));
    server.stop().await;
}

#[tokio::test]
async fn a_stored_outcome_survives_a_restart() {
    let server = TestServer::start().await;
    let (id, request_id, body) = (Uuid::new_v4(), Uuid::new_v4(), bytes_of(&new_transaction_intent()));
    let first = answer(put_with_request_id(&server, id, request_id, &body).await).await;
    assert_eq!(first.status, 201);
    let api_key = server.api_key.clone();
    let database = server.stop_keeping_database().await;

    let restarted = TestServer::start_on(test_config(&database), database).await;
    let again = answer(put_raw(&restarted, &api_key, id, request_id, &body).await).await;
    assert_eq!((again.status, again.replayed.as_deref()), (201, Some("true")));
    assert_eq!(again.body, first.body, "byte-identical after the restart");
    assert_eq!(again.location, first.location);
    restarted.stop().await;
}

#[tokio::test]
async fn a_malformed_request_id_is_a_validation_error_naming_the_header() {
    let server = TestServer::start().await;
    let id = Uuid::new_v4();
    let response = server
        .request(Method::PUT, &session_path(id))
        .header("x-request-id", "not-a-uuid")
        .json(&new_transaction_intent())
        .send()
        .await
        .unwrap();
    let error = assert_error(response, 400, "Validation").await;
    let reasons = error["details"]["validationErrorReasons"].as_array().unwrap();
    assert_eq!(reasons.len(), 1, "{error}");
    assert_eq!(reasons[0]["fieldName"], "x-request-id");
    assert_ne!(error["correlationId"], "not-a-uuid");
    assert_error(server.get_session(id).await, 404, "RedirectSessionNotFound").await;
    server.stop().await;
}

/// How the stand-in handler fails on its first call.
#[derive(Clone, Copy)]
enum FirstCall {
    Panics,
    AnswersServerError,
}

/// A merchant route wired like the real ones (the gate, then the common layers)
/// whose handler fails on its first call and answers `200 done` afterwards. Answers its URL.
async fn flaky_route(server: &TestServer, first_call: FirstCall) -> String {
    let calls = Arc::new(AtomicUsize::new(0));
    let handler = move || {
        let calls = calls.clone();
        async move {
            if calls.fetch_add(1, Ordering::SeqCst) == 0 {
                match first_call {
                    FirstCall::Panics => panic!("the first attempt fails"),
                    FirstCall::AnswersServerError => return Err(ApiError::internal(&"the first attempt fails")),
                }
            }
            Ok((StatusCode::OK, "done"))
        }
    };
    serve_merchant_route(server, axum::routing::put(handler)).await
}

async fn put_flaky(server: &TestServer, url: &str, request_id: Uuid) -> Response {
    let request = server.client.put(url).header("x-api-key", &server.api_key);
    request.header("x-request-id", request_id.to_string()).send().await.unwrap()
}

#[tokio::test]
async fn a_server_error_is_not_stored_so_a_later_retry_runs() {
    let server = TestServer::start().await;
    let url = flaky_route(&server, FirstCall::AnswersServerError).await;
    let request_id = Uuid::new_v4();
    assert_error(put_flaky(&server, &url, request_id).await, 500, "GeneralErrorOccurred").await;

    let retried = answer(put_flaky(&server, &url, request_id).await).await;
    assert_eq!((retried.status, retried.replayed, retried.body), (200, None, b"done".to_vec()));
    server.stop().await;
}

#[tokio::test]
async fn a_request_whose_handler_panicked_is_not_stored_so_a_retry_runs() {
    let server = TestServer::start().await;
    let url = flaky_route(&server, FirstCall::Panics).await;
    let request_id = Uuid::new_v4();
    assert_error(put_flaky(&server, &url, request_id).await, 500, "GeneralErrorOccurred").await;

    // The first attempt is over (it answered 500), so it is not "still being executed".
    let retried = answer(put_flaky(&server, &url, request_id).await).await;
    assert_eq!(retried.status, 200, "{}", String::from_utf8_lossy(&retried.body));
    assert_eq!((retried.replayed, retried.body), (None, b"done".to_vec()));
    server.stop().await;
}

/// Sends `request` twice with one `x-request-id`: the second answer is the first replayed,
/// byte for byte. Answers the first.
async fn answered_then_replayed(request: impl Fn() -> reqwest::RequestBuilder) -> Answer {
    let request_id = Uuid::new_v4().to_string();
    let first = answer(request().header("x-request-id", &request_id).send().await.unwrap()).await;
    let again = answer(request().header("x-request-id", &request_id).send().await.unwrap()).await;
    assert_eq!(first.replayed, None);
    assert_eq!(again.replayed.as_deref(), Some("true"), "{}", String::from_utf8_lossy(&again.body));
    assert_eq!((again.status, &again.content_type, &again.body), (first.status, &first.content_type, &first.body));
    first
}

fn error_code(answer: &Answer) -> (u16, String) {
    (answer.status, json_of(&answer.body)["code"].as_str().unwrap_or_default().to_owned())
}

#[tokio::test]
async fn every_stored_business_error_is_replayed_byte_for_byte() {
    // Sessions that expire at once: a cancel of one is an invalid transition.
    let server = TestServer::start_with(|config| config.session_ttl = Duration::from_millis(1)).await;
    let expired = server.created_session().await;
    let cancel = |id: Uuid, key: &str, if_match: Option<&str>| {
        let request = server.request_as(Method::POST, &cancel_path(id), key);
        match if_match {
            Some(tag) => request.header("if-match", tag),
            None => request,
        }
    };
    let transition = answered_then_replayed(|| cancel(expired, &server.api_key, None)).await;
    assert_eq!(error_code(&transition), (400, "InvalidRedirectSessionStateTransition".to_owned()));

    let (other_key, _) = server.another_merchant().await;
    let foreign = answered_then_replayed(|| cancel(expired, &other_key, None)).await;
    assert_eq!(error_code(&foreign), (400, "InvalidTriggeredBy".to_owned()));

    let mismatch = answered_then_replayed(|| cancel(expired, &server.api_key, Some("\"99\""))).await;
    assert_eq!(error_code(&mismatch), (409, "EntityVersionMismatch".to_owned()));

    let mut unknown_customer = new_transaction_intent();
    unknown_customer["customerId"] = json!(Uuid::new_v4());
    let id = Uuid::new_v4();
    let body = bytes_of(&unknown_customer);
    let customer = answered_then_replayed(|| {
        let request = server.client.put(format!("{}{}", server.url, session_path(id)));
        request.header("x-api-key", &server.api_key).header("content-type", "application/json").body(body.clone())
    })
    .await;
    assert_eq!(error_code(&customer), (404, "CustomerNotFound".to_owned()));
    assert_error(server.get_session(id).await, 404, "RedirectSessionNotFound").await;
    server.stop().await;
}
