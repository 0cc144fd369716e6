//! Operating a subscription (docs/WEBHOOKS.md "Operating a subscription") against a real
//! receiver: signing-secret rotation with an overlap in which every delivery carries both
//! signatures; test sends, answered at once, recorded and never retried; suspension after
//! `410 Gone` or a run of failures, with deliveries held (never attempted, never dropped) until
//! a resume or a PATCH; recovery of failed deliveries by time window.

use std::time::Duration;

use crate::common::*;
use crate::webhook_support::*;
use redirect_sessions::domain::time::Timestamp;
use reqwest::Method;
use serde_json::{json, Value};
use uuid::Uuid;

const CANCELLED: &str = "RedirectSessionCancelled";

fn operation_path(id: Uuid, operation: &str) -> String {
    format!("{}/{operation}", subscription_path(id))
}

/// `POST …/subscriptions/{id}/<operation>` with `body` (none when `Value::Null`).
async fn operate(server: &TestServer, id: Uuid, operation: &str, body: Value) -> reqwest::Response {
    let request = server.request(Method::POST, &operation_path(id, operation));
    let request = if body.is_null() { request } else { request.json(&body) };
    request.send().await.unwrap()
}

/// Like `operate`; it must answer 200. Answers the body.
async fn operate_ok(server: &TestServer, id: Uuid, operation: &str, body: Value) -> Value {
    let (status, answer) = status_and_json(operate(server, id, operation, body).await).await;
    assert_eq!(status, 200, "{operation}: {answer}");
    answer
}

async fn read_subscription(server: &TestServer, id: Uuid) -> Value {
    let (status, body) =
        status_and_json(server.request(Method::GET, &subscription_path(id)).send().await.unwrap()).await;
    assert_eq!(status, 200, "{body}");
    body
}

/// Cancels a new session; answers its id.
async fn cancelled_session(server: &TestServer) -> Uuid {
    let session = server.created_session().await;
    assert_eq!(server.cancel_session(session).await.status(), 200);
    session
}

/// Waits until the subscription reads `state`; answers it.
async fn wait_for_state(server: &TestServer, id: Uuid, state: &str) -> Value {
    eventually(DELIVERY_DEADLINE, &format!("subscription {id} to be {state}"), || async move {
        read_subscription(server, id).await["state"] == state
    })
    .await;
    read_subscription(server, id).await
}

/// Waits until every delivery of the subscription is in `state`, `count` of them; answers them.
async fn wait_for_deliveries(server: &TestServer, id: Uuid, count: usize, state: &str) -> Vec<Value> {
    let query = format!("subscriptionId={id}");
    eventually(DELIVERY_DEADLINE, &format!("{count} deliveries {state}"), || {
        let (server, query) = (&server, &query);
        async move {
            let items = deliveries(server, query).await;
            items.len() == count && items.iter().all(|d| d["state"] == state)
        }
    })
    .await;
    deliveries(server, &query).await
}

#[tokio::test]
async fn during_a_rotation_every_delivery_is_signed_with_both_secrets_and_after_it_with_the_new_one_alone() {
    let server = TestServer::start().await;
    let receiver = Receiver::answering(204).await;
    let (id, first) = subscribe(&server, &receiver.url(), &[CANCELLED]).await;
    let version = read_subscription(&server, id).await;

    let response = operate(&server, id, "rotate-secret", json!({"gracePeriodSeconds": 3600})).await;
    let etag = response.headers()["etag"].to_str().unwrap().to_owned();
    let (status, rotated) = status_and_json(response).await;
    assert_eq!(status, 200, "{rotated}");
    assert_eq!(members(&rotated), ["signingSecret", "previousSecretExpiresOn"]);
    let second = rotated["signingSecret"].as_str().unwrap().to_owned();
    assert!(second.starts_with("whsec_") && second != first, "{rotated}");
    let expires = Timestamp::parse_rfc3339(rotated["previousSecretExpiresOn"].as_str().unwrap()).unwrap();
    let hour_from_now = Timestamp::now().plus(Duration::from_secs(3600));
    assert!(expires <= hour_from_now && hour_from_now.since(expires) < Duration::from_secs(600), "{rotated}");
    assert_ne!(etag, "\"1\"", "a rotation is a new version");
    let after = read_subscription(&server, id).await;
    assert!(after.get("signingSecret").is_none(), "reads never show a secret: {after}");
    assert_ne!(after["lastModifiedOn"], version["lastModifiedOn"]);

    cancelled_session(&server).await;
    let overlap = receiver.wait_for_requests(1).await.remove(0);
    assert_eq!(overlap.header("webhook-signature").split(' ').count(), 2, "{}", overlap.header("webhook-signature"));
    assert_eq!(verifying_entries(&overlap, &second), [true, false], "the new secret signs first");
    assert_eq!(verifying_entries(&overlap, &first), [false, true], "the old one still signs");

    // Without a grace period the replaced secret stops at once, and so does the one before it.
    let third = operate_ok(&server, id, "rotate-secret", json!({"gracePeriodSeconds": 0})).await;
    let third = third["signingSecret"].as_str().unwrap().to_owned();
    cancelled_session(&server).await;
    let alone = receiver.wait_for_requests(2).await.remove(1);
    assert_eq!(verifying_entries(&alone, &third), [true]);
    assert_eq!(verifying_entries(&alone, &second), [false]);
    assert_eq!(verifying_entries(&alone, &first), [false]);
    server.stop().await;
}

#[tokio::test]
async fn a_rotation_is_idempotent_and_checks_its_body_its_subscription_and_its_merchant() {
    let server = TestServer::start().await;
    let (id, _) = subscribe(&server, "http://127.0.0.1:9/hook", &[CANCELLED]).await;
    let request_id = Uuid::new_v4().to_string();
    let rotate = || {
        let request = server.request(Method::POST, &operation_path(id, "rotate-secret"));
        request.header("x-request-id", &request_id).send()
    };
    let first = rotate().await.unwrap();
    assert_eq!(first.status(), 200);
    let first = first.bytes().await.unwrap();
    let again = rotate().await.unwrap();
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(again.bytes().await.unwrap(), first, "the same secret, replayed byte for byte");
    let default: Value = serde_json::from_slice(&first).unwrap();
    let expires = Timestamp::parse_rfc3339(default["previousSecretExpiresOn"].as_str().unwrap()).unwrap();
    assert!(expires > Timestamp::now().plus(Duration::from_secs(23 * 3600)), "a day by default: {default}");

    for (body, field) in [
        (json!({"gracePeriodSeconds": 604_801}), "gracePeriodSeconds"),
        (json!({"gracePeriodSeconds": -1}), "gracePeriodSeconds"),
        (json!({"gracePeriodSeconds": "3600"}), "gracePeriodSeconds"),
        (json!({"grace": 1}), "grace"),
        (json!([]), "body"),
    ] {
        let error = assert_error(operate(&server, id, "rotate-secret", body.clone()).await, 400, "Validation").await;
        assert_eq!(field_names(&error), [field], "{body}");
    }
    assert_error(operate(&server, Uuid::new_v4(), "rotate-secret", Value::Null).await, 404, "SubscriptionNotFound")
        .await;
    let (other_key, _) = server.another_merchant().await;
    let url = format!("{}{}", server.url, operation_path(id, "rotate-secret"));
    let foreign = server.client.post(url).header("x-api-key", other_key).send().await.unwrap();
    assert_error(foreign, 403, "InvalidTriggeredBy").await;
    let stale = server.request(Method::POST, &operation_path(id, "rotate-secret")).header("if-match", "\"1\"");
    assert_error(stale.send().await.unwrap(), 409, "EntityVersionMismatch").await;
    server.stop().await;
}

#[tokio::test]
async fn a_test_event_is_signed_answered_at_once_recorded_as_a_delivery_and_never_retried() {
    let server = TestServer::start_with(|c| c.webhook_retry_schedule = vec![Duration::from_millis(50); 3]).await;
    let receiver = Receiver::scripted(&[Reply::Status(204), Reply::Status(500)], Reply::Status(204)).await;
    let (id, secret) = subscribe(&server, &receiver.url(), &[CANCELLED]).await;

    let passed = operate_ok(&server, id, "test", Value::Null).await;
    assert_eq!(members(&passed), ["success", "statusCode", "durationMs", "error"]);
    assert_eq!(
        (&passed["success"], &passed["statusCode"], &passed["error"]),
        (&json!(true), &json!(204), &Value::Null)
    );
    let request = receiver.received().remove(0);
    assert_eq!(verifying_entries(&request, &secret), [true]);
    assert_eq!(request.header("x-api-key"), CALLBACK_KEY);
    let event = request.json();
    assert_eq!(event["type"], "RedirectSessionTest");
    assert_eq!(event["data"], json!({"subscriptionId": id}));
    assert_eq!(request.header("webhook-id"), event["id"].as_str().unwrap());

    let failed = operate_ok(&server, id, "test", Value::Null).await;
    assert_eq!((&failed["success"], &failed["statusCode"]), (&json!(false), &json!(500)), "{failed}");
    assert!(failed["error"].is_string(), "{failed}");

    // Both are listed, as deliveries of no session with one attempt each.
    let listed = deliveries(&server, &format!("subscriptionId={id}")).await;
    let states: Vec<&Value> = listed.iter().map(|d| &d["state"]).collect();
    assert_eq!(states, [&json!("Failed"), &json!("Delivered")], "newest first: {listed:?}");
    for delivery in &listed {
        assert_eq!(delivery["eventType"], "RedirectSessionTest");
        assert!(delivery.get("redirectSessionId").is_none(), "{delivery}");
        assert_eq!(attempts(delivery).len(), 1, "{delivery}");
    }
    assert_eq!(attempt_statuses(&listed[0]), [Some(500)]);

    // Never retried: a real event is attempted after it, and the failed test is not.
    cancelled_session(&server).await;
    let real = wait_for_delivery_of_type(&server, id, CANCELLED).await;
    assert_eq!(real["state"], "Delivered");
    assert_eq!(receiver.received().len(), 3, "two tests and one event");
    let listed = deliveries(&server, &format!("subscriptionId={id}")).await;
    assert_eq!(attempts(&listed[1]).len(), 1, "the failed test was not retried: {listed:?}");

    // Nobody listening: no status, an error.
    let (gone, _) = subscribe(&server, "http://127.0.0.1:9/hook", &[CANCELLED]).await;
    let unanswered = operate_ok(&server, gone, "test", Value::Null).await;
    assert_eq!((&unanswered["success"], &unanswered["statusCode"]), (&json!(false), &Value::Null));
    assert!(unanswered["error"].as_str().is_some_and(|e| !e.is_empty()), "{unanswered}");

    assert_error(operate(&server, Uuid::new_v4(), "test", Value::Null).await, 404, "SubscriptionNotFound").await;
    let error = assert_error(operate(&server, id, "test", json!({"x": 1})).await, 400, "Validation").await;
    assert_eq!(field_names(&error), ["body"]);
    server.stop().await;
}

/// Waits until the subscription's delivery of `event_type` is no longer pending; answers it.
async fn wait_for_delivery_of_type(server: &TestServer, id: Uuid, event_type: &str) -> Value {
    let query = format!("subscriptionId={id}");
    let finished =
        |items: &[Value]| items.iter().find(|d| d["eventType"] == event_type && d["state"] != "Pending").cloned();
    eventually(DELIVERY_DEADLINE, &format!("the {event_type} delivery"), || {
        let (server, query) = (&server, &query);
        async move { finished(&deliveries(server, query).await).is_some() }
    })
    .await;
    finished(&deliveries(server, &query).await).unwrap()
}

#[tokio::test]
async fn a_receiver_that_answers_410_gone_suspends_its_subscription_and_holds_its_deliveries_until_a_resume() {
    let server = TestServer::start_with(|c| c.webhook_retry_schedule = vec![Duration::from_millis(50); 5]).await;
    let receiver = Receiver::scripted(&[Reply::Status(410)], Reply::Status(204)).await;
    let (id, _) = subscribe(&server, &receiver.url(), &[CANCELLED]).await;
    cancelled_session(&server).await;

    let suspended = wait_for_state(&server, id, "Suspended").await;
    assert_eq!(suspended["suspendedReason"], "ReceiverGone", "{suspended}");
    assert!(suspended["suspendedOn"].is_string(), "{suspended}");
    let held = wait_for_deliveries(&server, id, 1, "Held").await;
    assert_eq!(attempt_statuses(&held[0]), [Some(410)]);
    assert_eq!(server.metric("redirect_sessions_webhook_suspensions_total{reason=\"ReceiverGone\"}").await, Some(1.0));

    // New events are held too: kept, never attempted.
    cancelled_session(&server).await;
    let held = wait_for_deliveries(&server, id, 2, "Held").await;
    assert!(attempts(&held[0]).is_empty(), "{held:?}");
    assert_eq!(server.metric("redirect_sessions_webhook_deliveries_held").await, Some(2.0));
    assert_eq!(receiver.received().len(), 1, "nothing is sent while suspended");

    let response = operate(&server, id, "resume", Value::Null).await;
    let etag = response.headers()["etag"].to_str().unwrap().to_owned();
    let (status, resumed) = status_and_json(response).await;
    assert_eq!((status, &resumed["state"]), (200, &json!("Active")), "{resumed}");
    assert!(resumed.get("suspendedOn").is_none() && resumed.get("suspendedReason").is_none(), "{resumed}");
    assert_ne!(etag, "\"1\"");
    wait_for_deliveries(&server, id, 2, "Delivered").await;
    assert_eq!(receiver.received().len(), 3);
    // Resuming an active subscription changes nothing.
    let again = operate(&server, id, "resume", Value::Null).await;
    assert_eq!(again.headers()["etag"].to_str().unwrap(), etag);
    server.stop().await;
}

#[tokio::test]
async fn a_receiver_failing_for_longer_than_the_setting_suspends_its_subscription_and_a_patch_resumes_it() {
    let server = TestServer::start_with(|c| {
        c.webhook_retry_schedule = vec![Duration::from_millis(50); 100];
        c.webhook_suspend_after = Duration::from_millis(200);
    })
    .await;
    let receiver = Receiver::answering(500).await;
    let (id, _) = subscribe(&server, &receiver.url(), &[CANCELLED]).await;
    cancelled_session(&server).await;

    let suspended = wait_for_state(&server, id, "Suspended").await;
    assert_eq!(suspended["suspendedReason"], "ReceiverFailing", "{suspended}");
    let held = wait_for_deliveries(&server, id, 1, "Held").await;
    assert!(attempts(&held[0]).len() >= 2, "failed more than once before: {held:?}");
    let attempted = receiver.received().len();

    // The merchant fixes its receiver and says so with a PATCH: the same body resumes it.
    receiver.answer_from_now_on(Reply::Status(204));
    let body = subscription_body(&receiver.url(), CALLBACK_KEY, &[CANCELLED]);
    let response = server.request(Method::PATCH, &subscription_path(id)).json(&body).send().await.unwrap();
    let (status, patched) = status_and_json(response).await;
    assert_eq!((status, &patched["state"]), (200, &json!("Active")), "{patched}");
    wait_for_deliveries(&server, id, 1, "Delivered").await;
    assert_eq!(receiver.received().len(), attempted + 1);
    server.stop().await;
}

#[tokio::test]
async fn recovery_queues_the_failed_deliveries_of_its_window_again_and_only_those() {
    let server = TestServer::start_with(|c| c.webhook_retry_schedule = vec![]).await;
    let receiver = Receiver::answering(500).await;
    let (id, _) = subscribe(&server, &receiver.url(), &[CANCELLED]).await;
    let since = Timestamp::now();
    for _ in 0..3 {
        cancelled_session(&server).await;
    }
    wait_for_deliveries(&server, id, 3, "Failed").await;
    let until = Timestamp::now().plus(Duration::from_millis(1));
    receiver.answer_from_now_on(Reply::Status(204));

    let earlier = json!({"since": since.minus(Duration::from_secs(3600)).to_string(), "until": since.to_string()});
    assert_eq!(operate_ok(&server, id, "recover", earlier).await, json!({"queued": 0, "more": false}));

    let window = json!({"since": since.to_string(), "until": until.to_string()});
    let request_id = Uuid::new_v4().to_string();
    let recover = || {
        let request = server.request(Method::POST, &operation_path(id, "recover"));
        request.header("x-request-id", &request_id).json(&window).send()
    };
    let (status, recovered) = status_and_json(recover().await.unwrap()).await;
    assert_eq!((status, &recovered), (200, &json!({"queued": 3, "more": false})));
    let delivered = wait_for_deliveries(&server, id, 3, "Delivered").await;
    assert!(delivered.iter().all(|d| attempt_statuses(d) == [Some(500), Some(204)]), "{delivered:?}");
    let replayed = recover().await.unwrap();
    assert_eq!(replayed.headers()["idempotent-replayed"], "true");
    assert_eq!(status_and_json(replayed).await.1, recovered, "the retry does not queue them again");
    // Recovering again finds nothing failed.
    assert_eq!(operate_ok(&server, id, "recover", window.clone()).await["queued"], 0);

    for (body, field) in [
        (json!({"until": until.to_string()}), "since"),
        (json!({"since": "yesterday"}), "since"),
        (json!({"since": until.to_string(), "until": since.to_string()}), "until"),
        (json!({"since": since.minus(Duration::from_secs(15 * 86_400)).to_string()}), "until"),
        (json!({"since": since.to_string(), "colour": "red"}), "colour"),
    ] {
        let error = assert_error(operate(&server, id, "recover", body.clone()).await, 400, "Validation").await;
        assert_eq!(field_names(&error), [field], "{body}");
    }
    let (other_key, _) = server.another_merchant().await;
    let url = format!("{}{}", server.url, operation_path(id, "recover"));
    let foreign = server.client.post(url).header("x-api-key", other_key).json(&window).send().await.unwrap();
    assert_error(foreign, 403, "InvalidTriggeredBy").await;
    server.stop().await;
}

#[tokio::test]
async fn deliveries_recovered_or_redelivered_while_suspended_are_held_and_deleting_drops_the_held_ones() {
    let server = TestServer::start_with(|c| c.webhook_retry_schedule = vec![]).await;
    let receiver = Receiver::scripted(&[Reply::Status(500), Reply::Status(410)], Reply::Status(204)).await;
    let (id, _) = subscribe(&server, &receiver.url(), &[CANCELLED]).await;
    let since = Timestamp::now();
    cancelled_session(&server).await;
    let failed = wait_for_deliveries(&server, id, 1, "Failed").await.remove(0);
    cancelled_session(&server).await;
    wait_for_state(&server, id, "Suspended").await;

    let recovered = operate_ok(&server, id, "recover", json!({"since": since.to_string()})).await;
    assert_eq!(recovered["queued"], 2, "{recovered}");
    wait_for_deliveries(&server, id, 2, "Held").await;
    let redelivered = server.request(Method::POST, &redeliver_path(failed["id"].as_str().unwrap())).send().await;
    let (status, redelivered) = status_and_json(redelivered.unwrap()).await;
    assert_eq!((status, &redelivered["state"]), (200, &json!("Held")), "{redelivered}");
    assert_eq!(receiver.received().len(), 2);

    unsubscribe(&server, id).await;
    let cancelled = deliveries(&server, &format!("subscriptionId={id}")).await;
    assert!(cancelled.iter().all(|d| d["state"] == "Cancelled"), "{cancelled:?}");
    server.stop().await;
}
