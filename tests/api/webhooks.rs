//! Webhook delivery (docs/WEBHOOKS.md) against a real receiver: headers, CloudEvents body and
//! signature; retries (schedule, jitter, Retry-After), timeouts, redirects and redelivery; which
//! events go to which subscription; expiry; the SSRF guard in both modes; leases of a dead
//! dispatcher, taken over at the next start without waiting for them to run out, also after
//! `kill -9` of the real binary in the middle of an attempt; a receiver that never answers holds
//! at most its per-subscription cap and never starves the others; shutdown with an attempt in
//! flight; an event that survives `kill -9` of the real binary; retention.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::common::binary::{command, Served};
use crate::common::*;
use crate::webhook_support::*;
use redirect_sessions::domain::time::Timestamp;
use redirect_sessions::store::webhooks::{AttemptOutcome, AttemptRecord, NextStep, SuspendPolicy};
use redirect_sessions::webhooks::signature;
use reqwest::Method;
use serde_json::{json, Value};
use uuid::Uuid;

const CANCELLED: &str = "RedirectSessionCancelled";
const EXPIRED: &str = "RedirectSessionExpired";
const COMPLETED: &str = "RedirectSessionCompleted";
const ABORTED: &str = "RedirectSessionAborted";

/// Asserts that `request` carries a Standard Webhooks signature over its own id, timestamp and
/// body, made with `secret`; answers the timestamp.
fn assert_signed(request: &Received, secret: &str) -> i64 {
    let key = signature::secret_key(secret).unwrap_or_else(|| panic!("an unusable secret: {secret}"));
    let id = request.header("webhook-id");
    let timestamp: i64 = request.header("webhook-timestamp").parse().expect("webhook-timestamp is unix seconds");
    let header = request.header("webhook-signature");
    assert!(header.starts_with("v1,"), "{header}");
    assert!(signature::verify(&key, id, timestamp, &request.body, header), "the signature does not verify: {header}");
    // The check is not vacuous: the same header over anything else fails.
    assert!(!signature::verify(&key, id, timestamp + 1, &request.body, header));
    assert!(!signature::verify(&key, id, timestamp, b"{}", header));
    timestamp
}

fn unix_now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64
}

async fn redeliver(server: &TestServer, delivery_id: &str) -> reqwest::Response {
    server.request(Method::POST, &redeliver_path(delivery_id)).send().await.unwrap()
}

#[tokio::test]
async fn a_cancel_is_delivered_once_with_the_documented_headers_a_cloudevents_body_and_a_valid_signature() {
    let server = TestServer::start().await;
    let receiver = Receiver::answering(204).await;
    let (subscription, secret) = subscribe(&server, &receiver.url(), &[CANCELLED]).await;
    let session = server.created_session().await;
    assert_eq!(server.cancel_session(session).await.status(), 200);

    let delivery = wait_for_delivery(&server, subscription, "the delivery", in_state("Delivered")).await;
    let received = receiver.received();
    assert_eq!(received.len(), 1, "exactly one request");
    let request = &received[0];
    assert_eq!((&request.method, request.path.as_str()), (&Method::POST, "/hook"));
    assert_eq!(request.header("content-type"), "application/json");
    assert_eq!(request.header("x-api-key"), CALLBACK_KEY);
    let event_id = delivery["eventId"].as_str().unwrap();
    event_id.parse::<Uuid>().expect("the event id is a UUID");
    assert_eq!(request.header("x-request-id"), event_id);
    assert_eq!(request.header("webhook-id"), event_id);
    let timestamp = assert_signed(request, &secret);
    assert!((unix_now() - timestamp).abs() <= 60, "webhook-timestamp {timestamp} is not about now");

    let (_, read) = status_and_json(server.get_session(session).await).await;
    let body = request.json();
    assert_eq!(members(&body), ["specversion", "id", "source", "time", "datacontenttype", "type", "data"]);
    assert_eq!(
        body,
        json!({
            "specversion": "1.0",
            "id": event_id,
            "source": "/customer-authentication-service",
            "time": read["lastModifiedOn"],
            "datacontenttype": "application/json",
            "type": CANCELLED,
            "data": {
                "id": session,
                "state": "Cancelled",
                "type": "NewTransactionIntent",
                "createdOn": read["createdOn"],
                "lastModifiedOn": read["lastModifiedOn"]
            }
        })
    );
    assert!(body["specversion"].is_string(), "specversion is the string \"1.0\"");

    assert_eq!(delivery["eventType"], CANCELLED);
    assert_eq!(delivery["redirectSessionId"], json!(session));
    assert_eq!(attempt_statuses(&delivery), [Some(204)]);
    let attempt = &attempts(&delivery)[0];
    assert_eq!(attempt["attempt"], 1);
    assert_eq!(attempt.get("error"), None, "{attempt}");
    assert!(attempt["durationMs"].as_i64().is_some_and(|ms| ms >= 0), "{attempt}");
    assert!(attempt["startedOn"].is_string(), "{attempt}");
    server.stop().await;
}

#[tokio::test]
async fn a_receiver_that_fails_twice_gets_the_event_on_the_third_attempt() {
    let server = TestServer::start_with(|c| c.webhook_retry_schedule = vec![Duration::from_millis(100); 3]).await;
    let receiver = Receiver::scripted(&[Reply::Status(500), Reply::Status(500)], Reply::Status(204)).await;
    let (subscription, secret) = subscribe(&server, &receiver.url(), &[CANCELLED]).await;
    let session = server.created_session().await;
    assert_eq!(server.cancel_session(session).await.status(), 200);

    let delivery = wait_for_delivery(&server, subscription, "the third attempt", in_state("Delivered")).await;
    assert_eq!(attempt_statuses(&delivery), [Some(500), Some(500), Some(204)]);
    let numbers: Vec<&Value> = attempts(&delivery).iter().map(|a| &a["attempt"]).collect();
    assert_eq!(numbers, [1, 2, 3]);
    let errors: Vec<bool> = attempts(&delivery).iter().map(|a| a.get("error").is_some()).collect();
    assert_eq!(errors, [true, true, false], "failed attempts say why, the delivered one does not: {delivery}");
    assert_eq!(delivery.get("nextAttemptOn"), None, "{delivery}");

    let received = receiver.received();
    assert_eq!(received.len(), 3);
    for request in &received {
        assert_eq!(request.header("webhook-id"), delivery["eventId"].as_str().unwrap());
        assert_eq!(request.body, received[0].body, "every attempt sends the same event");
        assert_signed(request, &secret);
    }
    server.stop().await;
}

#[tokio::test]
async fn a_silent_receiver_times_out_until_the_delivery_fails_and_a_redelivery_then_succeeds() {
    let server = TestServer::start_with(|c| {
        c.webhook_timeout = Duration::from_millis(300);
        c.webhook_retry_schedule = vec![Duration::from_millis(100); 2];
    })
    .await;
    let receiver = Receiver::silent().await;
    let (subscription, _) = subscribe(&server, &receiver.url(), &[CANCELLED]).await;
    let session = server.created_session().await;
    assert_eq!(server.cancel_session(session).await.status(), 200);

    let failed = wait_for_delivery(&server, subscription, "the delivery to fail", in_state("Failed")).await;
    assert_eq!(attempt_statuses(&failed), [None, None, None], "{failed}");
    for attempt in attempts(&failed) {
        let error = attempt["error"].as_str().unwrap_or_else(|| panic!("no error: {attempt}"));
        assert!(error.to_lowercase().contains("timeout"), "{error}");
    }
    assert_eq!(failed.get("nextAttemptOn"), None, "{failed}");
    assert_eq!(receiver.received().len(), 3, "each attempt reached the receiver");

    receiver.answer_from_now_on(Reply::Status(204));
    let id = failed["id"].as_str().unwrap();
    let (status, queued) = status_and_json(redeliver(&server, id).await).await;
    assert_eq!((status, &queued["id"], &queued["state"]), (200, &json!(id), &json!("Pending")), "{queued}");
    assert_eq!(attempts(&queued).len(), 3, "the earlier attempts are kept: {queued}");

    let delivered = wait_for_delivery(&server, subscription, "the redelivery", in_state("Delivered")).await;
    assert_eq!(attempt_statuses(&delivered), [None, None, None, Some(204)]);
    assert_eq!(attempts(&delivered)[3]["attempt"], 4);
    let received = receiver.received();
    assert_eq!(received.len(), 4);
    assert_eq!(received[3].header("webhook-id"), failed["eventId"].as_str().unwrap(), "the same event again");
    server.stop().await;
}

#[tokio::test]
async fn only_subscribed_event_types_are_delivered() {
    let server = TestServer::start().await;
    let expiries = Receiver::answering(204).await;
    let witness = Receiver::answering(204).await;
    let (expiries_only, _) = subscribe(&server, &expiries.url(), &[EXPIRED]).await;
    let (everything_else, _) = subscribe(&server, &witness.url(), &[CANCELLED, COMPLETED, ABORTED]).await;
    let session = server.created_session().await;
    assert_eq!(server.cancel_session(session).await.status(), 200);

    // Deliveries are queued in the cancel's own transaction, so this is already final.
    assert_eq!(deliveries(&server, &format!("subscriptionId={expiries_only}")).await, Vec::<Value>::new());
    // Once the other subscription got the event, the dispatcher is past it.
    let delivered = wait_for_delivery(&server, everything_else, "the witness", in_state("Delivered")).await;
    assert_eq!(witness.received().len(), 1);
    assert_eq!(witness.received()[0].json()["type"], CANCELLED);
    assert_eq!(delivered["eventType"], CANCELLED);
    assert_eq!((expiries.received().len(), expiries.connections()), (0, 0), "nothing reached the expiries receiver");
    server.stop().await;
}

#[tokio::test]
async fn a_deleted_subscription_gets_nothing() {
    let server = TestServer::start().await;
    let gone = Receiver::answering(204).await;
    let witness = Receiver::answering(204).await;
    let (deleted, _) = subscribe(&server, &gone.url(), &[CANCELLED]).await;
    let (kept, _) = subscribe(&server, &witness.url(), &[CANCELLED]).await;
    unsubscribe(&server, deleted).await;
    let session = server.created_session().await;
    assert_eq!(server.cancel_session(session).await.status(), 200);

    assert_eq!(deliveries(&server, &format!("subscriptionId={deleted}")).await, Vec::<Value>::new());
    wait_for_delivery(&server, kept, "the witness", in_state("Delivered")).await;
    assert_eq!(deliveries(&server, "").await.len(), 1, "only the kept subscription's delivery");
    assert_eq!((gone.received().len(), gone.connections()), (0, 0), "nothing reached the deleted subscription");
    server.stop().await;
}

#[tokio::test]
async fn deleting_a_subscription_cancels_its_queued_deliveries_which_cannot_be_redelivered() {
    let server = TestServer::start_with(|c| c.webhook_retry_schedule = vec![Duration::from_secs(3600)]).await;
    let receiver = Receiver::answering(500).await;
    let (subscription, _) = subscribe(&server, &receiver.url(), &[CANCELLED]).await;
    let session = server.created_session().await;
    assert_eq!(server.cancel_session(session).await.status(), 200);
    let pending = wait_for_delivery(&server, subscription, "the first failed attempt", |d| {
        d["state"] == "Pending" && attempts(d).len() == 1
    })
    .await;
    assert!(pending["nextAttemptOn"].is_string(), "a retry is scheduled: {pending}");

    unsubscribe(&server, subscription).await;
    let after = deliveries(&server, &format!("subscriptionId={subscription}")).await;
    assert_eq!(after.len(), 1, "{after:?}");
    let cancelled = &after[0];
    assert_eq!((&cancelled["id"], &cancelled["state"]), (&pending["id"], &json!("Cancelled")), "{cancelled}");
    assert_eq!(cancelled.get("nextAttemptOn"), None, "{cancelled}");
    assert_eq!(attempt_statuses(cancelled), [Some(500)], "the attempt made is still shown");
    assert_eq!(deliveries(&server, "state=Cancelled").await, after);

    let refused = redeliver(&server, cancelled["id"].as_str().unwrap()).await;
    assert_error(refused, 409, "EntityVersionMismatch").await;
    assert_eq!(deliveries(&server, "").await, after, "the refused redeliver changed nothing");
    assert_eq!(receiver.received().len(), 1);
    server.stop().await;
}

#[tokio::test]
async fn an_expired_session_is_delivered_as_redirect_session_expired() {
    let server = TestServer::start_with(|c| c.session_ttl = Duration::from_secs(1)).await;
    let receiver = Receiver::answering(204).await;
    let (subscription, secret) = subscribe(&server, &receiver.url(), &[EXPIRED]).await;
    let session = server.created_session().await;

    let received = receiver.wait_for_requests(1).await;
    assert_eq!(received.len(), 1);
    let body = received[0].json();
    assert_eq!(body["type"], EXPIRED, "{body}");
    assert_eq!(body["data"]["id"], json!(session), "{body}");
    assert_eq!(body["data"]["state"], "Expired", "{body}");
    assert_eq!(body["data"]["type"], "NewTransactionIntent", "{body}");
    assert_eq!(received[0].header("webhook-id"), body["id"].as_str().unwrap());
    assert_signed(&received[0], &secret);

    let (_, read) = status_and_json(server.get_session(session).await).await;
    assert_eq!(read["state"], "Expired", "{read}");
    assert_eq!(body["data"]["createdOn"], read["createdOn"]);
    let delivery = wait_for_delivery(&server, subscription, "the delivery", in_state("Delivered")).await;
    assert_eq!((&delivery["eventType"], &delivery["eventId"]), (&json!(EXPIRED), &body["id"]));
    server.stop().await;
}

#[tokio::test]
async fn without_the_private_allowance_http_and_ip_address_callbacks_are_rejected() {
    let server = TestServer::start_with(|c| c.allow_private_callbacks = false).await;
    let receiver = Receiver::answering(204).await;
    let plain_http = format!("http://127.0.0.1:{}/", receiver.port);
    let error = assert_error(
        put_subscription(&server, Uuid::new_v4(), &subscription_body(&plain_http, CALLBACK_KEY, &[CANCELLED])).await,
        400,
        "Validation",
    )
    .await;
    assert_eq!(field_names(&error), ["callbackUrl"], "{error}");
    let message = error["details"]["validationErrorReasons"][0]["errorMessage"].as_str().unwrap();
    assert!(message.contains("https"), "the answer says https is required: {message}");

    for url in [
        "https://127.0.0.1/x",
        "http://shop.example/hook",
        "https://10.0.0.1/x",
        "https://192.168.1.1/x",
        "https://[::1]/x",
        "https://169.254.169.254/latest/meta-data",
        "https://100.64.0.1/x",
    ] {
        let body = subscription_body(url, CALLBACK_KEY, &[CANCELLED]);
        let error = assert_error(put_subscription(&server, Uuid::new_v4(), &body).await, 400, "Validation").await;
        assert_eq!(field_names(&error), ["callbackUrl"], "{url}: {error}");
    }
    // An https callback names its host (its certificate is for a name): even a public address
    // is refused, and a host name is fine.
    let public = subscription_body("https://93.184.216.34/hook", CALLBACK_KEY, &[CANCELLED]);
    let error = assert_error(put_subscription(&server, Uuid::new_v4(), &public).await, 400, "Validation").await;
    let message = error["details"]["validationErrorReasons"][0]["errorMessage"].as_str().unwrap();
    assert!(message.contains("name its host"), "{message}");
    let named = subscription_body("https://hooks.shop.example/hook", CALLBACK_KEY, &[CANCELLED]);
    assert_eq!(put_subscription(&server, Uuid::new_v4(), &named).await.status(), 201, "a host name is fine");
    assert_eq!(receiver.connections(), 0);
    server.stop().await;
}

#[tokio::test]
async fn without_the_private_allowance_a_host_name_that_resolves_to_loopback_is_refused_at_connect_time() {
    let server = TestServer::start_with(|c| {
        c.allow_private_callbacks = false;
        c.webhook_retry_schedule = vec![Duration::from_millis(100)];
    })
    .await;
    let receiver = Receiver::answering(204).await;
    let url = format!("https://localhost:{}/hook", receiver.port);
    let (subscription, _) = subscribe(&server, &url, &[CANCELLED]).await;
    let session = server.created_session().await;
    assert_eq!(server.cancel_session(session).await.status(), 200);

    let failed = wait_for_delivery(&server, subscription, "the refused delivery", in_state("Failed")).await;
    assert_eq!(attempt_statuses(&failed), [None, None], "{failed}");
    for attempt in attempts(&failed) {
        let error = attempt["error"].as_str().unwrap_or_else(|| panic!("no error: {attempt}"));
        assert!(error.starts_with("refused"), "{error}");
    }
    assert_eq!((receiver.connections(), receiver.received().len()), (0, 0), "the receiver got a connection");
    server.stop().await;
}

#[tokio::test]
async fn with_the_private_allowance_a_loopback_host_name_is_delivered() {
    let server = TestServer::start().await;
    let receiver = Receiver::answering(204).await;
    let url = format!("http://localhost:{}/hook", receiver.port);
    let (subscription, secret) = subscribe(&server, &url, &[CANCELLED]).await;
    let session = server.created_session().await;
    assert_eq!(server.cancel_session(session).await.status(), 200);

    let delivered = wait_for_delivery(&server, subscription, "the delivery", in_state("Delivered")).await;
    assert_eq!(attempt_statuses(&delivered), [Some(204)]);
    let received = receiver.received();
    assert_eq!(received.len(), 1);
    assert_eq!(received[0].json()["data"]["id"], json!(session));
    assert_signed(&received[0], &secret);
    assert_eq!(receiver.connections(), 1);
    server.stop().await;
}

#[tokio::test]
async fn the_janitor_removes_finished_deliveries_and_old_request_ids_and_keeps_pending_and_held_deliveries() {
    let server = TestServer::start_with(|c| c.webhook_retry_schedule = vec![Duration::from_secs(3600)]).await;
    let accepting = Receiver::answering(204).await;
    let failing = Receiver::answering(500).await;
    let gone = Receiver::answering(410).await;
    let (delivered, _) = subscribe(&server, &accepting.url(), &[CANCELLED]).await;
    let (pending, _) = subscribe(&server, &failing.url(), &[CANCELLED]).await;
    let (held, _) = subscribe(&server, &gone.url(), &[CANCELLED]).await;
    let session = server.created_session().await;
    let request_id = Uuid::new_v4().to_string();
    let cancel = || server.request(Method::POST, &cancel_path(session)).header("x-request-id", &request_id).send();
    assert_eq!(cancel().await.unwrap().status(), 200);
    wait_for_delivery(&server, delivered, "the delivery", in_state("Delivered")).await;
    let still_pending =
        wait_for_delivery(&server, pending, "the first failed attempt", |d| attempts(d).len() == 1).await;
    assert_eq!(still_pending["state"], "Pending");
    let still_held = wait_for_delivery(&server, held, "the suspension", in_state("Held")).await;
    assert_eq!(cancel().await.unwrap().headers()["idempotent-replayed"], "true");

    // What the janitor does every minute, as of three moments.
    let (_running, stopped) = tokio::sync::watch::channel(false);
    let janitor = |at: Timestamp| {
        let (state, stopped) = (server.state.clone(), stopped.clone());
        async move { redirect_sessions::app::purge_old_records_at(&state, at, &stopped).await.expect("purges") }
    };
    assert_eq!(janitor(Timestamp::now()).await, 0, "nothing is old enough yet");
    assert_eq!(deliveries(&server, "").await.len(), 3);

    // A day later the request ids are forgotten: the same cancel runs again (and changes nothing).
    assert!(janitor(Timestamp::now().plus(Duration::from_secs(25 * 3600))).await >= 1);
    let again = cancel().await.unwrap();
    assert_eq!((again.status(), again.headers().get("idempotent-replayed")), (reqwest::StatusCode::OK, None));
    assert_eq!(deliveries(&server, "").await.len(), 3, "deliveries are kept for 30 days");

    let removed = janitor(Timestamp::now().plus(Duration::from_secs(31 * 24 * 3600))).await;
    assert!(removed >= 2, "at least the delivery and its attempt: {removed}");
    assert_eq!(deliveries(&server, &format!("subscriptionId={delivered}")).await, Vec::<Value>::new());
    let mut left = deliveries(&server, "").await;
    left.sort_by_key(|d| d["subscriptionId"] != json!(pending));
    assert_eq!(left, [still_pending, still_held], "the pending and the held delivery are kept with their attempts");
    server.stop().await;
}

/// Milliseconds from an attempt's start to the delivery's next attempt.
fn delay_after_attempt(delivery: &Value, attempt: usize) -> i64 {
    let at = |v: &Value| Timestamp::parse_rfc3339(v.as_str().unwrap_or_else(|| panic!("no time: {delivery}"))).unwrap();
    at(&delivery["nextAttemptOn"]).millis() - at(&attempts(delivery)[attempt]["startedOn"]).millis()
}

#[tokio::test]
async fn a_failed_attempt_is_retried_after_the_scheduled_delay_within_twenty_percent() {
    let server = TestServer::start_with(|c| c.webhook_retry_schedule = vec![Duration::from_secs(3600)]).await;
    let receiver = Receiver::answering(500).await;
    let (subscription, _) = subscribe(&server, &receiver.url(), &[CANCELLED]).await;
    let session = server.created_session().await;
    assert_eq!(server.cancel_session(session).await.status(), 200);
    let pending = wait_for_delivery(&server, subscription, "the first attempt", |d| attempts(d).len() == 1).await;
    assert_eq!(pending["state"], "Pending");
    let delay = delay_after_attempt(&pending, 0);
    assert!((2_880_000..=4_320_000 + 60_000).contains(&delay), "one hour ±20 %, got {delay} ms: {pending}");
    server.stop().await;
}

#[tokio::test]
async fn retry_after_on_503_and_429_pushes_the_next_attempt_back_but_by_at_most_an_hour() {
    let server = TestServer::start_with(|c| c.webhook_retry_schedule = vec![Duration::from_millis(100); 2]).await;
    let busy = Receiver::scripted(&[Reply::RetryAfter(503, 600)], Reply::Status(204)).await;
    let throttling = Receiver::scripted(&[Reply::RetryAfter(429, 86_400)], Reply::Status(204)).await;
    let (busy_subscription, _) = subscribe(&server, &busy.url(), &[CANCELLED]).await;
    let (throttling_subscription, _) = subscribe(&server, &throttling.url(), &[CANCELLED]).await;
    let session = server.created_session().await;
    assert_eq!(server.cancel_session(session).await.status(), 200);

    let first = |d: &Value| attempts(d).len() == 1;
    let after_503 = wait_for_delivery(&server, busy_subscription, "the 503", first).await;
    assert_eq!((&after_503["state"], attempt_statuses(&after_503)), (&json!("Pending"), vec![Some(503)]));
    let delay = delay_after_attempt(&after_503, 0);
    assert!((600_000..=600_000 + 60_000).contains(&delay), "Retry-After: 600 honoured, got {delay} ms: {after_503}");

    let after_429 = wait_for_delivery(&server, throttling_subscription, "the 429", first).await;
    assert_eq!((&after_429["state"], attempt_statuses(&after_429)), (&json!("Pending"), vec![Some(429)]));
    let delay = delay_after_attempt(&after_429, 0);
    assert!((3_600_000..=3_600_000 + 60_000).contains(&delay), "capped at an hour, got {delay} ms: {after_429}");
    server.stop().await;
}

#[tokio::test]
async fn a_redirect_is_not_followed_and_counts_as_a_failure() {
    let server = TestServer::start_with(|c| c.webhook_retry_schedule = vec![Duration::from_millis(100)]).await;
    let receiver = Receiver::scripted(&[], Reply::Redirect(307)).await;
    let (subscription, _) = subscribe(&server, &receiver.url(), &[CANCELLED]).await;
    let session = server.created_session().await;
    assert_eq!(server.cancel_session(session).await.status(), 200);

    let failed = wait_for_delivery(&server, subscription, "the delivery to fail", in_state("Failed")).await;
    assert_eq!(attempt_statuses(&failed), [Some(307), Some(307)]);
    for attempt in attempts(&failed) {
        assert!(attempt["error"].as_str().is_some_and(|e| !e.is_empty()), "a failure says why: {attempt}");
    }
    let paths: Vec<String> = receiver.received().into_iter().map(|r| r.path).collect();
    assert_eq!(paths, ["/hook", "/hook"], "the Location was never requested");
    server.stop().await;
}

#[tokio::test]
async fn after_a_patch_events_go_to_the_new_url_with_the_new_api_key_and_the_original_secret() {
    let server = TestServer::start().await;
    let before = Receiver::answering(204).await;
    let after = Receiver::answering(204).await;
    let (subscription, secret) = subscribe(&server, &before.url(), &[EXPIRED]).await;
    let replacement = subscription_body(&after.url(), "patched-key", &[CANCELLED]);
    let response = server.request(Method::PATCH, &subscription_path(subscription)).json(&replacement).send().await;
    assert_eq!(response.unwrap().status(), 200);
    let session = server.created_session().await;
    assert_eq!(server.cancel_session(session).await.status(), 200);

    wait_for_delivery(&server, subscription, "the delivery", in_state("Delivered")).await;
    let received = after.received();
    assert_eq!(received.len(), 1);
    assert_eq!(received[0].header("x-api-key"), "patched-key");
    assert_eq!(received[0].json()["type"], CANCELLED);
    assert_signed(&received[0], &secret);
    assert_eq!(before.connections(), 0, "the old URL got nothing");
    server.stop().await;
}

#[tokio::test]
async fn another_merchants_subscription_never_gets_this_merchants_events() {
    let server = TestServer::start().await;
    let ours = Receiver::answering(204).await;
    let theirs = Receiver::answering(204).await;
    let (other_key, _) = server.another_merchant().await;
    let response = server
        .client
        .put(format!("{}{}", server.url, subscription_path(Uuid::new_v4())))
        .header("x-api-key", &other_key)
        .json(&subscription_body(&theirs.url(), CALLBACK_KEY, &[CANCELLED, EXPIRED, COMPLETED, ABORTED]))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    let (subscription, _) = subscribe(&server, &ours.url(), &[CANCELLED]).await;
    let session = server.created_session().await;
    assert_eq!(server.cancel_session(session).await.status(), 200);

    wait_for_delivery(&server, subscription, "our delivery", in_state("Delivered")).await;
    assert_eq!(deliveries(&server, "").await.len(), 1);
    let listed = server.request_as(Method::GET, &deliveries_path(), &other_key);
    let (status, page) = status_and_json(listed.send().await.unwrap()).await;
    assert_eq!((status, page["items"].clone()), (200, json!([])), "{page}");
    assert_eq!((ours.received().len(), theirs.connections()), (1, 0));
    server.stop().await;
}

#[tokio::test]
async fn every_matching_subscription_gets_its_own_delivery_of_the_event() {
    let server = TestServer::start().await;
    let first = Receiver::answering(200).await;
    let second = Receiver::answering(202).await;
    let (one, one_secret) = subscribe(&server, &first.url(), &[CANCELLED]).await;
    let (two, two_secret) = subscribe(&server, &second.url(), &[EXPIRED, CANCELLED]).await;
    let session = server.created_session().await;
    assert_eq!(server.cancel_session(session).await.status(), 200);

    let a = wait_for_delivery(&server, one, "the first delivery", in_state("Delivered")).await;
    let b = wait_for_delivery(&server, two, "the second delivery", in_state("Delivered")).await;
    assert_ne!(a["id"], b["id"]);
    assert_eq!(a["eventId"], b["eventId"], "one event");
    assert_eq!((attempt_statuses(&a), attempt_statuses(&b)), (vec![Some(200)], vec![Some(202)]), "any 2xx");
    let (x, y) = (&first.received()[0], &second.received()[0]);
    assert_eq!(x.body, y.body, "the same event body");
    assert_signed(x, &one_secret);
    assert_signed(y, &two_secret);
    assert_ne!(one_secret, two_secret, "each subscription has its own secret");
    server.stop().await;
}

#[tokio::test]
async fn a_delivery_claimed_by_a_dispatcher_that_died_is_sent_by_the_next_one_without_waiting_for_its_lease() {
    let receiver = Receiver::answering(204).await;
    let first = TestServer::start_with(|c| c.webhook_dispatcher = false).await;
    let (subscription, secret) = subscribe(&first, &receiver.url(), &[CANCELLED]).await;
    let session = first.created_session().await;
    assert_eq!(first.cancel_session(session).await.status(), 200);
    // A dispatcher starts, claims the delivery for ten minutes, and dies (with its process, and
    // on PostgreSQL its connections) before it records anything.
    let dead = Uuid::now_v7();
    first.store().dispatcher_started(dead).await.expect("the dispatcher starts");
    let claimed_on = Timestamp::now();
    let lease_until = claimed_on.plus(Duration::from_secs(600));
    let claimed = first.store().claim_deliveries(dead, claimed_on, lease_until, 10, 16).await.expect("claim works");
    assert_eq!(claimed.len(), 1);
    let key = first.api_key.clone();
    let database = first.stop_keeping_database().await;

    // The next dispatcher sends it at once: well within DELIVERY_DEADLINE, long before the lease
    // would have run out.
    let second = TestServer::start_on(test_config(&database), database).await;
    let delivered = wait_for_delivery_as(&second, &key, subscription, "the delivery", in_state("Delivered")).await;
    assert_eq!(attempt_statuses(&delivered), [Some(204)]);
    let started = Timestamp::parse_rfc3339(attempts(&delivered)[0]["startedOn"].as_str().unwrap()).unwrap();
    assert!(started.millis() < lease_until.millis(), "sent at {started}, not before the lease ran out");
    assert_eq!(receiver.received().len(), 1);
    assert_signed(&receiver.received()[0], &secret);

    // The dead dispatcher's late result cannot overwrite the new owner's work.
    let late = AttemptOutcome {
        delivery_id: claimed[0].id,
        owner: dead,
        attempt: AttemptRecord {
            attempt: 1,
            started_on: claimed_on,
            duration_ms: 5,
            status: Some(500),
            error: Some("HTTP 500".to_owned()),
        },
        next: NextStep::Failed,
    };
    let policy = SuspendPolicy { failing_for: Duration::from_secs(3600) };
    second.store().record_attempts(vec![late], Timestamp::now(), policy).await.expect("recording works");
    let after = deliveries_as(&second, &key, "").await;
    assert_eq!(after, [delivered], "unchanged");
    second.stop().await;
}

#[tokio::test]
async fn stopping_the_server_waits_for_an_attempt_in_flight_and_records_it() {
    let server = TestServer::start_with(|c| c.webhook_timeout = Duration::from_millis(500)).await;
    let receiver = Receiver::silent().await;
    let (subscription, _) = subscribe(&server, &receiver.url(), &[CANCELLED]).await;
    let session = server.created_session().await;
    assert_eq!(server.cancel_session(session).await.status(), 200);
    receiver.wait_for_requests(1).await;
    let key = server.api_key.clone();
    let database = server.stop_keeping_database().await;

    let mut config = test_config(&database);
    config.webhook_dispatcher = false;
    let reopened = TestServer::start_on(config, database).await;
    let items = deliveries_as(&reopened, &key, &format!("subscriptionId={subscription}")).await;
    assert_eq!(items.len(), 1, "{items:?}");
    assert_eq!(items[0]["state"], "Pending", "retried later: {}", items[0]);
    assert_eq!(attempt_statuses(&items[0]), [None], "the attempt in flight was recorded: {}", items[0]);
    let error = attempts(&items[0])[0]["error"].as_str().unwrap_or_default().to_lowercase();
    assert!(error.contains("timeout"), "{error}");
    reopened.stop().await;
}

// ----- The real binary, killed with SIGKILL between the commit and the delivery -----

/// `serve --listen 127.0.0.1:0 --database-url <url> <args>`; waits for its `listening` line.
async fn serve(database_url: &str, args: &[&str]) -> Served {
    let mut all = vec!["serve", "--listen", "127.0.0.1:0", "--database-url", database_url];
    all.extend(args);
    Served::spawn("serve", command(&all)).listening().await
}

/// A call to a running `serve` and its JSON answer.
async fn call(served: &Served, method: Method, path: &str, key: &str, body: Option<&Value>) -> (u16, Value) {
    let mut request = served.request(method, path, key);
    if let Some(body) = body {
        request = request.json(body);
    }
    status_and_json(request.send().await.unwrap()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_committed_before_a_kill_9_is_delivered_by_the_next_process() {
    let (database_url, _database) = fresh_database_url();
    let created = command(&["merchant", "create", "--name", "Crash Shop", "--database-url", &database_url])
        .output()
        .expect("merchant create runs");
    assert!(created.status.success(), "{created:?}");
    let merchant: Value = serde_json::from_slice(&created.stdout).expect("merchant create prints JSON");
    let key = merchant["apiKey"].as_str().unwrap().to_owned();
    let receiver = Receiver::answering(204).await;

    let open = ["--allow-private-callbacks", "--allow-http-redirect-urls", "--rate-limit-per-key", "0"];
    let mut without_dispatcher = open.to_vec();
    without_dispatcher.push("--no-webhook-dispatcher");
    let mut first = serve(&database_url, &without_dispatcher).await;
    let subscription = Uuid::new_v4();
    let (status, subscribed) = call(
        &first,
        Method::PUT,
        &subscription_path(subscription),
        &key,
        Some(&subscription_body(&receiver.url(), CALLBACK_KEY, &[CANCELLED])),
    )
    .await;
    assert_eq!(status, 201, "{subscribed}");
    let secret = subscribed["signingSecret"].as_str().unwrap().to_owned();
    let session = Uuid::new_v4();
    let session_path = format!("{BASE}/redirect-sessions/{session}");
    let (status, body) = call(&first, Method::PUT, &session_path, &key, Some(&new_transaction_intent())).await;
    assert_eq!(status, 201, "{body}");
    let (status, body) = call(&first, Method::POST, &format!("{session_path}/cancel"), &key, None).await;
    assert_eq!(status, 200, "{body}");
    let (status, page) = call(&first, Method::GET, &deliveries_path(), &key, None).await;
    assert_eq!(status, 200, "{page}");
    let queued = &page["items"][0];
    assert_eq!((&queued["state"], &queued["attempts"]), (&json!("Pending"), &json!([])), "{page}");
    let event_id = queued["eventId"].as_str().unwrap().to_owned();

    first.kill_9();
    assert_eq!(receiver.connections(), 0, "the first process had no dispatcher");

    let second = serve(&database_url, &open).await;
    let received = receiver.wait_for_requests(1).await;
    assert_eq!(received[0].header("webhook-id"), event_id);
    let body = received[0].json();
    assert_eq!(
        (&body["type"], &body["data"]["id"], &body["data"]["state"]),
        (&json!(CANCELLED), &json!(session), &json!("Cancelled"))
    );
    assert_signed(&received[0], &secret);

    let deadline = Instant::now() + DELIVERY_DEADLINE;
    loop {
        let (_, page) = call(&second, Method::GET, &deliveries_path(), &key, None).await;
        if page["items"][0]["state"] == "Delivered" {
            assert_eq!(page["items"].as_array().unwrap().len(), 1, "{page}");
            break;
        }
        assert!(Instant::now() < deadline, "not recorded as delivered: {page}; log: {:?}", second.lines());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(receiver.received().len(), 1, "delivered once");
}

/// How long a wait may take before the test fails as hung: a safety net for an event that
/// never comes, never a bound on how fast it comes.
const HANG_GUARD: Duration = Duration::from_secs(120);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attempt_cut_short_by_a_kill_9_is_made_again_by_the_next_process_without_waiting_for_its_lease() {
    let (database_url, _database) = fresh_database_url();
    let created = command(&["merchant", "create", "--name", "Crash Shop", "--database-url", &database_url])
        .output()
        .expect("merchant create runs");
    assert!(created.status.success(), "{created:?}");
    let merchant: Value = serde_json::from_slice(&created.stdout).expect("merchant create prints JSON");
    let key = merchant["apiKey"].as_str().unwrap().to_owned();
    // The receiver is down while the first process attempts (it accepts and never answers) and
    // answers 200 once the next process runs.
    let receiver = Receiver::scripted(&[Reply::Silence], Reply::Status(200)).await;

    let open = ["--allow-private-callbacks", "--allow-http-redirect-urls", "--rate-limit-per-key", "0"];
    let mut first = serve(&database_url, &open).await;
    let subscription = Uuid::new_v4();
    let body = subscription_body(&receiver.url(), CALLBACK_KEY, &[CANCELLED]);
    let (status, subscribed) = call(&first, Method::PUT, &subscription_path(subscription), &key, Some(&body)).await;
    assert_eq!(status, 201, "{subscribed}");
    let secret = subscribed["signingSecret"].as_str().unwrap().to_owned();
    let session = Uuid::new_v4();
    let session_path = format!("{BASE}/redirect-sessions/{session}");
    let (status, body) = call(&first, Method::PUT, &session_path, &key, Some(&new_transaction_intent())).await;
    assert_eq!(status, 201, "{body}");
    let (status, body) = call(&first, Method::POST, &format!("{session_path}/cancel"), &key, None).await;
    assert_eq!(status, 200, "{body}");

    // The attempt is in flight, unanswered, its delivery leased for the next 40 s.
    let hung = receiver.wait_for_requests(1).await;
    let event_id = hung[0].header("webhook-id").to_owned();
    let (_, page) = call(&first, Method::GET, &deliveries_path(), &key, None).await;
    let leased = &page["items"][0];
    assert_eq!((&leased["state"], &leased["attempts"]), (&json!("Pending"), &json!([])), "{page}");
    first.kill_9();

    let second = serve(&database_url, &open).await;
    // The new process voids the old one's lease as its dispatcher starts (its log says so,
    // checked below) and sends the event again; the deadline only keeps a failure from hanging.
    let deadline = Instant::now() + HANG_GUARD;
    let again = loop {
        let received = receiver.received();
        if received.len() >= 2 {
            break received[1].clone();
        }
        assert!(Instant::now() < deadline, "the event was never sent again; log: {:?}", second.lines());
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(again.header("webhook-id"), event_id, "the same event");
    assert_eq!(again.body, hung[0].body, "the same body");
    assert_signed(&again, &secret);
    let took_over = "took over deliveries claimed by a dispatcher that is gone";
    assert!(second.lines().iter().any(|l| l.contains(took_over) && l.contains("deliveries=1")), "{:?}", second.lines());

    loop {
        let (_, page) = call(&second, Method::GET, &deliveries_path(), &key, None).await;
        let delivery = &page["items"][0];
        if delivery["state"] == "Delivered" {
            assert_eq!(page["items"].as_array().unwrap().len(), 1, "{page}");
            // The attempt cut short was never recorded; the one made again was.
            assert_eq!(attempt_statuses(delivery), [Some(200)], "{delivery}");
            break;
        }
        assert!(Instant::now() < deadline, "not recorded as delivered: {page}; log: {:?}", second.lines());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(receiver.received().len(), 2, "sent once more, not more");
}

// ----- A receiver that never answers, with a long backlog -----

/// Creates a session and cancels it as the merchant with `key`: one event.
async fn cancelled_session_as(server: &TestServer, key: &str) {
    let path = format!("{}{BASE}/redirect-sessions/{}", server.url, Uuid::new_v4());
    let created = server.client.put(&path).header("x-api-key", key).json(&new_transaction_intent()).send().await;
    assert_eq!(created.unwrap().status(), 201);
    let cancelled = server.client.post(format!("{path}/cancel")).header("x-api-key", key).send().await;
    assert_eq!(cancelled.unwrap().status(), 200);
}

/// `count` events of the merchant with `key`, `parallel` at a time.
async fn cancelled_sessions_as(server: &TestServer, key: &str, count: usize, parallel: usize) {
    let mut done = 0;
    while done < count {
        let wave = parallel.min(count - done);
        futures_util::future::join_all((0..wave).map(|_| cancelled_session_as(server, key))).await;
        done += wave;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_receiver_that_never_answers_holds_at_most_its_cap_and_never_starves_another_merchants_receiver() {
    const CONCURRENCY: usize = 32;
    const PER_SUBSCRIPTION: usize = 8;
    const BACKLOG: usize = 2_000;
    const HEALTHY_EVENTS: usize = 15;
    let server = TestServer::start_with(|c| {
        c.webhook_concurrency = CONCURRENCY;
        c.webhook_concurrency_per_subscription = PER_SUBSCRIPTION;
        // Attempts to the silent receiver stay in flight for the whole test.
        c.webhook_timeout = Duration::from_secs(120);
    })
    .await;
    let silent = Receiver::silent().await;
    let healthy = Receiver::answering(204).await;
    subscribe(&server, &silent.url(), &[CANCELLED]).await;
    let (other_key, _) = server.another_merchant().await;
    let (healthy_subscription, _) = subscribe_as(&server, &other_key, &healthy.url(), &[CANCELLED]).await;

    // One merchant's backlog, all due before the other merchant's events.
    cancelled_sessions_as(&server, &server.api_key.clone(), BACKLOG, 50).await;
    silent.wait_for_requests(PER_SUBSCRIPTION).await;
    let pending = deliveries(&server, "state=Pending&limit=100").await;
    assert_eq!(pending.len(), 100, "the backlog is pending");

    cancelled_sessions_as(&server, &other_key, HEALTHY_EVENTS, HEALTHY_EVENTS).await;
    // They arrive while the silent receiver still holds every attempt it was sent: nothing of
    // the silent one had to time out first (its attempts last the whole test). The deadline
    // only keeps a failure from hanging.
    let deadline = Instant::now() + HANG_GUARD;
    while healthy.received().len() < HEALTHY_EVENTS {
        assert!(
            Instant::now() < deadline,
            "the healthy receiver got {} of {HEALTHY_EVENTS} events ({} requests in flight at the silent one)",
            healthy.received().len(),
            silent.in_flight()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(silent.in_flight(), PER_SUBSCRIPTION, "the silent receiver still holds all its attempts");
    let healthy_deliveries =
        deliveries_as(&server, &other_key, &format!("subscriptionId={healthy_subscription}")).await;
    assert_eq!(healthy_deliveries.len(), HEALTHY_EVENTS);
    let mut received: Vec<String> = healthy.received().iter().map(|r| r.header("webhook-id").to_owned()).collect();
    received.sort();
    received.dedup();
    assert_eq!(received.len(), HEALTHY_EVENTS, "each event once");

    // The silent receiver never held more than its cap: the dispatcher's slots, and the memory of
    // its attempts, stay bounded however long the backlog.
    assert_eq!(silent.received().len(), PER_SUBSCRIPTION, "no attempt beyond the cap was even started");
    assert!(silent.max_in_flight() <= PER_SUBSCRIPTION, "{} in flight at once", silent.max_in_flight());
    let still_pending = deliveries(&server, "state=Pending&limit=100").await;
    assert_eq!(still_pending.len(), 100, "the backlog waits its turn");

    // Let the silent receiver answer so that the server can stop without waiting out the timeout.
    silent.release_silenced();
    server.stop().await;
}

#[tokio::test]
async fn metrics_count_attempts_by_outcome_and_deliveries_that_fail_for_good() {
    let server = TestServer::start_with(|c| c.webhook_retry_schedule = vec![Duration::from_millis(100)]).await;
    // One delivery rejected once, then delivered; another never answered (nothing listens on
    // its port), so it fails for good after its one retry.
    let receiver = Receiver::scripted(&[Reply::Status(500)], Reply::Status(204)).await;
    let (delivered, _) = subscribe(&server, &receiver.url(), &[CANCELLED]).await;
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let (failed, _) = subscribe(&server, &format!("http://{closed}/hook"), &[CANCELLED]).await;
    let session = server.created_session().await;
    assert_eq!(server.cancel_session(session).await.status(), 200);
    wait_for_delivery(&server, delivered, "delivered on the second attempt", in_state("Delivered")).await;
    wait_for_delivery(&server, failed, "failed after its retry", in_state("Failed")).await;

    let attempts = "redirect_sessions_webhook_attempts_total";
    assert_eq!(server.metric(&format!("{attempts}{{outcome=\"delivered\"}}")).await, Some(1.0));
    assert_eq!(server.metric(&format!("{attempts}{{outcome=\"rejected\"}}")).await, Some(1.0));
    assert_eq!(server.metric(&format!("{attempts}{{outcome=\"unanswered\"}}")).await, Some(2.0));
    assert_eq!(server.metric("redirect_sessions_webhook_attempt_duration_seconds_count").await, Some(4.0));
    assert_eq!(server.metric("redirect_sessions_webhook_deliveries_failed_total").await, Some(1.0));
    assert_eq!(server.metric("redirect_sessions_webhook_deliveries_pending").await, Some(0.0));
    assert_eq!(server.metric("redirect_sessions_webhook_oldest_due_seconds").await, Some(0.0));
    server.stop().await;
}

#[tokio::test]
async fn metrics_show_deliveries_nobody_sends_as_a_growing_lag() {
    // No dispatcher: the event's delivery is due and stays due, as when every dispatcher is
    // stuck; the lag is what an alert watches (docs/OPERATIONS.md "Metrics").
    let server = TestServer::start_with(|c| c.webhook_dispatcher = false).await;
    let receiver = Receiver::answering(204).await;
    subscribe(&server, &receiver.url(), &[CANCELLED]).await;
    let session = server.created_session().await;
    assert_eq!(server.cancel_session(session).await.status(), 200);
    assert_eq!(server.metric("redirect_sessions_webhook_deliveries_pending").await, Some(1.0));
    let first = server.metric("redirect_sessions_webhook_oldest_due_seconds").await.expect("the lag is shown");
    let mut later = first;
    for _ in 0..200 {
        later = server.metric("redirect_sessions_webhook_oldest_due_seconds").await.expect("the lag is shown");
        if later > first {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(later > first, "the lag of a due delivery nobody sends grows: {first} then {later}");
    assert!(receiver.received().is_empty());
    server.stop().await;
}
