//! The subscriptions API (docs/WEBHOOKS.md) and the deliveries API (docs/API.md):
//! create, replace, delete, read, list, validation, ownership; list and redeliver deliveries.

use crate::common::*;
use crate::webhook_support::*;
use base64::{engine::general_purpose::STANDARD, Engine as _};
use reqwest::{Method, Response};
use serde_json::{json, Value};
use uuid::Uuid;

const CANCELLED: &str = "RedirectSessionCancelled";
const EXPIRED: &str = "RedirectSessionExpired";
const COMPLETED: &str = "RedirectSessionCompleted";
const ABORTED: &str = "RedirectSessionAborted";

/// A response's status, headers and body text.
async fn parts(response: Response) -> (u16, reqwest::header::HeaderMap, String) {
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    (status, headers, response.text().await.unwrap())
}

fn header<'a>(headers: &'a reqwest::header::HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).map(|v| v.to_str().unwrap())
}

fn json_of(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// The member names of a JSON object, in order.
fn members(body: &Value) -> Vec<&str> {
    body.as_object().unwrap_or_else(|| panic!("not an object: {body}")).keys().map(String::as_str).collect()
}

async fn patch(server: &TestServer, id: Uuid, body: &Value) -> Response {
    server.request(Method::PATCH, &subscription_path(id)).json(body).send().await.unwrap()
}

async fn get(server: &TestServer, id: Uuid) -> Response {
    server.request(Method::GET, &subscription_path(id)).send().await.unwrap()
}

async fn delete(server: &TestServer, id: Uuid) -> Response {
    server.request(Method::DELETE, &subscription_path(id)).send().await.unwrap()
}

/// The page of `GET …/subscriptions?<query>`; it must answer 200.
async fn subscriptions_page(server: &TestServer, query: &str) -> Value {
    let response = server.request(Method::GET, &format!("{}?{query}", subscriptions_path())).send().await.unwrap();
    let (status, page) = status_and_json(response).await;
    assert_eq!(status, 200, "{page}");
    page
}

/// The ids of a page's items, in order.
fn ids(page: &Value) -> Vec<String> {
    page["items"].as_array().unwrap().iter().map(|item| item["id"].as_str().unwrap().to_owned()).collect()
}

#[tokio::test]
async fn a_new_subscription_answers_201_with_location_etag_and_a_signing_secret_of_32_bytes() {
    let server = TestServer::start().await;
    let id = Uuid::new_v4();
    let body = subscription_body("https://shop.example/hooks", CALLBACK_KEY, &[EXPIRED, CANCELLED]);
    let (status, headers, text) = parts(put_subscription(&server, id, &body).await).await;
    assert_eq!(status, 201, "{text}");
    let created = json_of(&text);
    assert_eq!(
        members(&created),
        ["id", "callbackUrl", "eventTypes", "createdOn", "lastModifiedOn", "state", "signingSecret"]
    );
    assert_eq!(created["id"], json!(id));
    assert_eq!(created["callbackUrl"], "https://shop.example/hooks");
    assert_eq!(created["eventTypes"], json!([CANCELLED, EXPIRED]), "echoed in canonical order");
    assert_eq!(created["createdOn"], created["lastModifiedOn"]);
    assert_eq!(created["state"], "Active");
    let secret = created["signingSecret"].as_str().unwrap();
    let key = STANDARD.decode(secret.strip_prefix("whsec_").expect("the whsec_ prefix")).expect("base64");
    assert_eq!(key.len(), 32, "{secret}");
    assert_eq!(header(&headers, "location"), Some(subscription_path(id).as_str()));
    let etag = header(&headers, "etag").expect("an ETag").to_owned();

    let (status, headers, text) = parts(get(&server, id).await).await;
    assert_eq!(status, 200, "{text}");
    let read = json_of(&text);
    let mut without_secret = created.clone();
    without_secret.as_object_mut().unwrap().remove("signingSecret");
    assert_eq!(read, without_secret, "a read shows the same subscription without the secret");
    assert_eq!(header(&headers, "etag"), Some(etag.as_str()));
    server.stop().await;
}

#[tokio::test]
async fn the_same_put_again_answers_200_without_the_signing_secret() {
    let server = TestServer::start().await;
    let id = Uuid::new_v4();
    let body = subscription_body("https://shop.example/hooks", CALLBACK_KEY, &[CANCELLED]);
    let (_, first_headers, first) = parts(put_subscription(&server, id, &body).await).await;
    let (status, headers, again) = parts(put_subscription(&server, id, &body).await).await;
    assert_eq!(status, 200, "{again}");
    let mut expected = json_of(&first);
    expected.as_object_mut().unwrap().remove("signingSecret");
    assert_eq!(json_of(&again), expected);
    assert_eq!(header(&headers, "etag"), header(&first_headers, "etag"));
    assert_eq!(header(&headers, "location"), None, "Location belongs to the 201 only");
    server.stop().await;
}

#[tokio::test]
async fn a_put_with_a_different_body_on_an_existing_id_is_an_entity_version_mismatch_and_changes_nothing() {
    let server = TestServer::start().await;
    let id = Uuid::new_v4();
    let original = subscription_body("https://shop.example/hooks", CALLBACK_KEY, &[CANCELLED]);
    assert_eq!(put_subscription(&server, id, &original).await.status(), 201);
    for different in [
        subscription_body("https://shop.example/other", CALLBACK_KEY, &[CANCELLED]),
        subscription_body("https://shop.example/hooks", "another-key", &[CANCELLED]),
        subscription_body("https://shop.example/hooks", CALLBACK_KEY, &[CANCELLED, EXPIRED]),
    ] {
        assert_error(put_subscription(&server, id, &different).await, 409, "EntityVersionMismatch").await;
    }
    let (_, read) = status_and_json(get(&server, id).await).await;
    assert_eq!(
        (&read["callbackUrl"], &read["eventTypes"]),
        (&json!("https://shop.example/hooks"), &json!([CANCELLED]))
    );
    server.stop().await;
}

#[tokio::test]
async fn patch_replaces_all_three_fields_and_echoes_event_types_in_canonical_order() {
    let server = TestServer::start().await;
    let id = Uuid::new_v4();
    let (_, created_headers, created) = parts(
        put_subscription(&server, id, &subscription_body("https://shop.example/a", "old-key", &[CANCELLED])).await,
    )
    .await;
    let created = json_of(&created);
    let replacement = subscription_body("https://shop.example/b", "new-key", &[ABORTED, COMPLETED, EXPIRED, CANCELLED]);
    let (status, headers, text) = parts(patch(&server, id, &replacement).await).await;
    assert_eq!(status, 200, "{text}");
    let patched = json_of(&text);
    assert_eq!(
        members(&patched),
        ["id", "callbackUrl", "eventTypes", "createdOn", "lastModifiedOn", "state"],
        "no secret"
    );
    assert_eq!(patched["id"], json!(id));
    assert_eq!(patched["callbackUrl"], "https://shop.example/b");
    assert_eq!(patched["eventTypes"], json!([CANCELLED, EXPIRED, COMPLETED, ABORTED]));
    assert_eq!(patched["createdOn"], created["createdOn"]);
    let etag = header(&headers, "etag").expect("an ETag").to_owned();
    assert_ne!(Some(etag.as_str()), header(&created_headers, "etag"), "a new version has a new ETag");

    let (status, read_headers, read) = parts(get(&server, id).await).await;
    assert_eq!((status, json_of(&read)), (200, patched));
    assert_eq!(header(&read_headers, "etag"), Some(etag.as_str()));
    server.stop().await;
}

#[tokio::test]
async fn patch_with_a_stale_if_match_is_an_entity_version_mismatch() {
    let server = TestServer::start().await;
    let id = Uuid::new_v4();
    let (_, headers, _) =
        parts(put_subscription(&server, id, &subscription_body("https://shop.example/a", "k", &[CANCELLED])).await)
            .await;
    let first_etag = header(&headers, "etag").unwrap().to_owned();
    let second = subscription_body("https://shop.example/b", "k", &[CANCELLED]);
    let response = server
        .request(Method::PATCH, &subscription_path(id))
        .header("if-match", &first_etag)
        .json(&second)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let third = subscription_body("https://shop.example/c", "k", &[CANCELLED]);
    let stale = server
        .request(Method::PATCH, &subscription_path(id))
        .header("if-match", &first_etag)
        .json(&third)
        .send()
        .await
        .unwrap();
    assert_error(stale, 409, "EntityVersionMismatch").await;
    let (_, read) = status_and_json(get(&server, id).await).await;
    assert_eq!(read["callbackUrl"], "https://shop.example/b");
    server.stop().await;
}

#[tokio::test]
async fn patch_without_one_of_the_three_fields_is_a_validation_error_naming_it() {
    let server = TestServer::start().await;
    let id = Uuid::new_v4();
    let original = subscription_body("https://shop.example/a", CALLBACK_KEY, &[CANCELLED]);
    assert_eq!(put_subscription(&server, id, &original).await.status(), 201);
    for missing in ["callbackUrl", "apiKey", "eventTypes"] {
        let mut body = subscription_body("https://shop.example/b", "new-key", &[EXPIRED]);
        body.as_object_mut().unwrap().remove(missing);
        let error = assert_error(patch(&server, id, &body).await, 400, "Validation").await;
        assert_eq!(field_names(&error), [missing], "{error}");
    }
    let (_, read) = status_and_json(get(&server, id).await).await;
    assert_eq!((&read["callbackUrl"], &read["eventTypes"]), (&json!("https://shop.example/a"), &json!([CANCELLED])));
    server.stop().await;
}

#[tokio::test]
async fn delete_answers_200_with_the_removed_subscription_and_then_it_is_not_found() {
    let server = TestServer::start().await;
    let id = Uuid::new_v4();
    let (_, created) = status_and_json(
        put_subscription(&server, id, &subscription_body("https://shop.example/a", CALLBACK_KEY, &[CANCELLED])).await,
    )
    .await;
    let (status, removed) = status_and_json(delete(&server, id).await).await;
    assert_eq!(status, 200, "{removed}");
    let mut expected = created.clone();
    expected.as_object_mut().unwrap().remove("signingSecret");
    assert_eq!(removed, expected);

    assert_error(get(&server, id).await, 404, "SubscriptionNotFound").await;
    assert_error(delete(&server, id).await, 404, "SubscriptionNotFound").await;
    assert_eq!(ids(&subscriptions_page(&server, "").await), Vec::<String>::new());
    server.stop().await;
}

#[tokio::test]
async fn another_merchants_subscription_cannot_be_read_changed_or_deleted() {
    let server = TestServer::start().await;
    let id = Uuid::new_v4();
    let body = subscription_body("https://shop.example/a", CALLBACK_KEY, &[CANCELLED]);
    assert_eq!(put_subscription(&server, id, &body).await.status(), 201);
    let (other_key, _) = server.another_merchant().await;
    let as_other = |method: Method| {
        server
            .client
            .request(method, format!("{}{}", server.url, subscription_path(id)))
            .header("x-api-key", &other_key)
    };
    let replacement = subscription_body("https://evil.example/", "stolen", &[EXPIRED]);
    assert_error(as_other(Method::GET).send().await.unwrap(), 403, "InvalidTriggeredBy").await;
    assert_error(as_other(Method::PATCH).json(&replacement).send().await.unwrap(), 403, "InvalidTriggeredBy").await;
    assert_error(as_other(Method::DELETE).send().await.unwrap(), 403, "InvalidTriggeredBy").await;

    let (status, read) = status_and_json(get(&server, id).await).await;
    assert_eq!((status, &read["callbackUrl"]), (200, &json!("https://shop.example/a")), "unchanged: {read}");
    let others = server.request_as(Method::GET, &subscriptions_path(), &other_key).send().await.unwrap();
    let (status, page) = status_and_json(others).await;
    assert_eq!((status, page["items"].clone()), (200, json!([])), "not listed for the other merchant");
    server.stop().await;
}

#[tokio::test]
async fn an_unknown_subscription_is_not_found_for_get_patch_and_delete() {
    let server = TestServer::start().await;
    let id = Uuid::new_v4();
    let body = subscription_body("https://shop.example/a", CALLBACK_KEY, &[CANCELLED]);
    assert_error(get(&server, id).await, 404, "SubscriptionNotFound").await;
    assert_error(patch(&server, id, &body).await, 404, "SubscriptionNotFound").await;
    assert_error(delete(&server, id).await, 404, "SubscriptionNotFound").await;
    server.stop().await;
}

#[tokio::test]
async fn a_malformed_subscription_id_is_a_validation_error_naming_the_path_parameter() {
    let server = TestServer::start().await;
    let path = format!("{}/not-a-uuid", subscriptions_path());
    let body = subscription_body("https://shop.example/a", CALLBACK_KEY, &[CANCELLED]);
    for request in [
        server.request(Method::GET, &path),
        server.request(Method::DELETE, &path),
        server.request(Method::PUT, &path).json(&body),
        server.request(Method::PATCH, &path).json(&body),
    ] {
        let error = assert_error(request.send().await.unwrap(), 400, "Validation").await;
        assert_eq!(field_names(&error), ["eventSubscriptionId"], "{error}");
    }
    server.stop().await;
}

#[tokio::test]
async fn subscriptions_are_listed_newest_first_in_pages() {
    let server = TestServer::start().await;
    let mut created = Vec::new();
    for n in 0..3 {
        let id = Uuid::new_v4();
        let body = subscription_body(&format!("https://shop.example/{n}"), CALLBACK_KEY, &[CANCELLED]);
        assert_eq!(put_subscription(&server, id, &body).await.status(), 201);
        created.push(id.to_string());
        // Distinct creation times make "newest first" observable; wait for the clock, not a duration.
        let after = redirect_sessions::domain::time::Timestamp::now().millis();
        eventually(std::time::Duration::from_secs(1), "the clock to move on", || async move {
            redirect_sessions::domain::time::Timestamp::now().millis() > after
        })
        .await;
    }
    let newest_first: Vec<String> = created.iter().rev().cloned().collect();

    let whole = subscriptions_page(&server, "").await;
    assert_eq!(ids(&whole), newest_first);
    assert_eq!(whole.get("nextCursor"), None, "{whole}");

    let first = subscriptions_page(&server, "limit=2").await;
    assert_eq!(ids(&first), newest_first[..2]);
    let cursor = first["nextCursor"].as_str().unwrap_or_else(|| panic!("a nextCursor: {first}"));
    let second = subscriptions_page(&server, &format!("limit=2&cursor={cursor}")).await;
    assert_eq!(ids(&second), newest_first[2..]);
    assert_eq!(second.get("nextCursor"), None, "{second}");
    let item = &second["items"][0];
    assert_eq!(members(item), ["id", "callbackUrl", "eventTypes", "createdOn", "lastModifiedOn", "state"]);

    for bad in ["limit=0", "limit=101", "limit=x", "cursor=garbage!"] {
        let response = server.request(Method::GET, &format!("{}?{bad}", subscriptions_path())).send().await.unwrap();
        let error = assert_error(response, 400, "Validation").await;
        assert_eq!(field_names(&error), [bad.split('=').next().unwrap()], "{bad}: {error}");
    }
    server.stop().await;
}

#[tokio::test]
async fn every_failing_field_is_reported_in_one_validation_error() {
    let server = TestServer::start().await;
    let body = json!({
        "callbackUrl": "ftp://shop.example/hooks",
        "apiKey": "has a space",
        "eventTypes": [CANCELLED, CANCELLED, "RedirectSessionOpened"],
        "extra": true
    });
    let error = assert_error(put_subscription(&server, Uuid::new_v4(), &body).await, 400, "Validation").await;
    let mut names = field_names(&error);
    names.sort();
    assert_eq!(names, ["apiKey", "callbackUrl", "eventTypes[1]", "eventTypes[2]", "extra"], "{error}");
    for reason in error["details"]["validationErrorReasons"].as_array().unwrap() {
        assert!(!reason["errorMessage"].as_str().unwrap().is_empty(), "{reason}");
    }

    // A malformed path id is reported together with the body's failures.
    let response = server
        .request(Method::PUT, &format!("{}/nope", subscriptions_path()))
        .json(&subscription_body("https://shop.example/", "", &[CANCELLED]))
        .send()
        .await
        .unwrap();
    let error = assert_error(response, 400, "Validation").await;
    let mut names = field_names(&error);
    names.sort();
    assert_eq!(names, ["apiKey", "eventSubscriptionId"], "{error}");
    assert_eq!(ids(&subscriptions_page(&server, "").await), Vec::<String>::new(), "nothing was created");
    server.stop().await;
}

#[tokio::test]
async fn each_invalid_value_is_rejected_naming_its_field() {
    let server = TestServer::start().await;
    let valid = || subscription_body("https://shop.example/hooks", CALLBACK_KEY, &[CANCELLED]);
    let with = |field: &str, value: Value| {
        let mut body = valid();
        body[field] = value;
        body
    };
    let long_url = format!("https://shop.example/{}", "a".repeat(2049 - "https://shop.example/".len()));
    assert_eq!(long_url.len(), 2049);
    let cases = [
        (with("apiKey", json!("with space")), "apiKey"),
        (with("apiKey", json!("a".repeat(129))), "apiKey"),
        (with("apiKey", json!("")), "apiKey"),
        (with("apiKey", json!("ümlaut")), "apiKey"),
        (with("apiKey", json!(42)), "apiKey"),
        (with("eventTypes", json!([])), "eventTypes"),
        (with("eventTypes", json!(CANCELLED)), "eventTypes"),
        (with("eventTypes", json!([EXPIRED, EXPIRED])), "eventTypes[1]"),
        (with("eventTypes", json!([CANCELLED, "RedirectSessionOpened"])), "eventTypes[1]"),
        (with("eventTypes", json!(["redirectSessionCancelled"])), "eventTypes[0]"),
        (with("callbackUrl", json!("/relative/hook")), "callbackUrl"),
        (with("callbackUrl", json!("ftp://shop.example/hook")), "callbackUrl"),
        (with("callbackUrl", json!("https://user:secret@shop.example/hook")), "callbackUrl"),
        (with("callbackUrl", json!("https://user@shop.example/hook")), "callbackUrl"),
        (with("callbackUrl", json!(long_url)), "callbackUrl"),
        (with("callbackUrl", json!("")), "callbackUrl"),
        (with("unknownField", json!("x")), "unknownField"),
    ];
    for (body, field) in cases {
        let error = assert_error(put_subscription(&server, Uuid::new_v4(), &body).await, 400, "Validation").await;
        assert_eq!(field_names(&error), [field], "{body}: {error}");
        assert!(!error.to_string().contains("secret"), "the user-info is not echoed: {error}");
    }
    // The limits themselves are allowed.
    let longest_url = format!("https://shop.example/{}", "a".repeat(2048 - "https://shop.example/".len()));
    for body in [with("apiKey", json!("a".repeat(128))), with("callbackUrl", json!(longest_url))] {
        let response = put_subscription(&server, Uuid::new_v4(), &body).await;
        assert_eq!(response.status(), 201, "{body}: {}", response.text().await.unwrap());
    }
    server.stop().await;
}

#[tokio::test]
async fn a_subscription_body_that_is_not_json_or_not_sent_as_json_is_refused() {
    let server = TestServer::start().await;
    let path = subscription_path(Uuid::new_v4());
    let not_json = server
        .request(Method::PUT, &path)
        .header("content-type", "application/json")
        .body("{\"callbackUrl\":")
        .send()
        .await
        .unwrap();
    assert_error(not_json, 400, "Validation").await;
    let as_text = server
        .request(Method::PUT, &path)
        .header("content-type", "text/plain")
        .body(subscription_body("https://shop.example/", CALLBACK_KEY, &[CANCELLED]).to_string())
        .send()
        .await
        .unwrap();
    assert_error(as_text, 415, "UnsupportedMediaType").await;
    server.stop().await;
}

#[tokio::test]
async fn the_callback_api_key_never_appears_in_any_answer() {
    let server = TestServer::start().await;
    let id = Uuid::new_v4();
    let key = "Zq7-never:shown_=+/Xy";
    let body = subscription_body("https://shop.example/hooks", key, &[CANCELLED]);
    let patched = subscription_body("https://shop.example/other", key, &[CANCELLED, EXPIRED]);
    let mut answers = Vec::new();
    answers.push(put_subscription(&server, id, &body).await);
    answers.push(put_subscription(&server, id, &body).await);
    answers.push(put_subscription(&server, id, &subscription_body("https://x.example/", key, &[CANCELLED])).await);
    answers.push(get(&server, id).await);
    answers.push(patch(&server, id, &patched).await);
    answers.push(server.request(Method::GET, &subscriptions_path()).send().await.unwrap());
    answers.push(put_subscription(&server, Uuid::new_v4(), &json!({"apiKey": key, "eventTypes": []})).await);
    answers.push(delete(&server, id).await);
    let expected = [201, 200, 409, 200, 200, 200, 400, 200];
    for (answer, status) in answers.into_iter().zip(expected) {
        let (actual, _, text) = parts(answer).await;
        assert_eq!(actual, status, "{text}");
        assert!(!text.contains(key), "the apiKey is in an answer: {text}");
        assert!(!text.contains("apiKey\":"), "an apiKey member is in an answer: {text}");
    }
    server.stop().await;
}

// ----- The deliveries API -----

/// A server with two subscriptions to cancellations — one whose receiver answers 204, one whose
/// receiver answers 500 and whose retry waits an hour — and one cancelled session, so that there
/// is one `Delivered` and one `Pending` delivery.
struct TwoDeliveries {
    server: TestServer,
    delivered: Uuid,
    pending: Uuid,
    session: Uuid,
    _receivers: (Receiver, Receiver),
}

async fn two_deliveries() -> TwoDeliveries {
    let server =
        TestServer::start_with(|c| c.webhook_retry_schedule = vec![std::time::Duration::from_secs(3600)]).await;
    let accepting = Receiver::answering(204).await;
    let failing = Receiver::answering(500).await;
    let (delivered, _) = subscribe(&server, &accepting.url(), &[CANCELLED]).await;
    let (pending, _) = subscribe(&server, &failing.url(), &[CANCELLED]).await;
    let session = server.created_session().await;
    assert_eq!(server.cancel_session(session).await.status(), 200);
    wait_for_delivery(&server, delivered, "the delivery to the accepting receiver", in_state("Delivered")).await;
    wait_for_delivery(&server, pending, "the first failed attempt", |d| attempts(d).len() == 1).await;
    TwoDeliveries { server, delivered, pending, session, _receivers: (accepting, failing) }
}

#[tokio::test]
async fn deliveries_can_be_filtered_by_subscription_and_by_state() {
    let setup = two_deliveries().await;
    let server = &setup.server;
    let subscription_of = |items: &[Value]| -> Vec<String> {
        items.iter().map(|d| d["subscriptionId"].as_str().unwrap().to_owned()).collect()
    };
    let (delivered, pending) = (setup.delivered.to_string(), setup.pending.to_string());

    let all = deliveries(server, "").await;
    assert_eq!(all.len(), 2, "{all:?}");
    assert_eq!(all[0]["eventId"], all[1]["eventId"], "one event, two deliveries");
    for delivery in &all {
        assert_eq!(delivery["eventType"], CANCELLED, "{delivery}");
        assert_eq!(delivery["redirectSessionId"], json!(setup.session), "{delivery}");
    }

    let only = deliveries(server, &format!("subscriptionId={}", setup.delivered)).await;
    assert_eq!(subscription_of(&only), [delivered.as_str()]);
    assert_eq!(only[0]["state"], "Delivered");
    assert_eq!(only[0].get("nextAttemptOn"), None, "only pending deliveries have a next attempt: {}", only[0]);
    assert_eq!(attempt_statuses(&only[0]), [Some(204)]);

    let only = deliveries(server, &format!("subscriptionId={}", setup.pending)).await;
    assert_eq!(subscription_of(&only), [pending.as_str()]);
    assert_eq!(only[0]["state"], "Pending");
    assert!(only[0]["nextAttemptOn"].is_string(), "{}", only[0]);
    assert_eq!(attempt_statuses(&only[0]), [Some(500)]);

    assert_eq!(subscription_of(&deliveries(server, "state=Delivered").await), [delivered.as_str()]);
    assert_eq!(subscription_of(&deliveries(server, "state=Pending").await), [pending.as_str()]);
    assert_eq!(deliveries(server, "state=Failed").await, Vec::<Value>::new());
    assert_eq!(deliveries(server, "state=Cancelled").await, Vec::<Value>::new());
    let both = format!("subscriptionId={}&state=Delivered", setup.pending);
    assert_eq!(deliveries(server, &both).await, Vec::<Value>::new());
    let unknown = format!("subscriptionId={}", Uuid::new_v4());
    assert_eq!(deliveries(server, &unknown).await, Vec::<Value>::new());

    // Paging: one per page, then the rest.
    let first = deliveries_page(server, "limit=1").await;
    let cursor = first["nextCursor"].as_str().unwrap_or_else(|| panic!("a nextCursor: {first}"));
    let second = deliveries_page(server, &format!("limit=1&cursor={cursor}")).await;
    assert_eq!(second.get("nextCursor"), None, "{second}");
    let paged = [first["items"][0]["id"].clone(), second["items"][0]["id"].clone()];
    assert_eq!(paged, [all[0]["id"].clone(), all[1]["id"].clone()]);
    setup.server.stop().await;
}

#[tokio::test]
async fn bad_delivery_filters_are_validation_errors_naming_the_parameter() {
    let server = TestServer::start().await;
    for (query, fields) in [
        ("subscriptionId=nope", vec!["subscriptionId"]),
        ("state=Bogus", vec!["state"]),
        ("state=delivered", vec!["state"]),
        ("limit=0", vec!["limit"]),
        ("limit=101", vec!["limit"]),
        ("cursor=garbage!", vec!["cursor"]),
        ("subscriptionId=nope&state=Bogus", vec!["subscriptionId", "state"]),
    ] {
        let response = server.request(Method::GET, &format!("{}?{query}", deliveries_path())).send().await.unwrap();
        let error = assert_error(response, 400, "Validation").await;
        assert_eq!(field_names(&error), fields, "{query}: {error}");
    }
    server.stop().await;
}

#[tokio::test]
async fn redeliver_of_an_unknown_delivery_is_not_found_and_of_a_malformed_id_a_validation_error() {
    let server = TestServer::start().await;
    let unknown = server.request(Method::POST, &redeliver_path(&Uuid::new_v4().to_string())).send().await.unwrap();
    assert_error(unknown, 404, "DeliveryNotFound").await;
    let malformed = server.request(Method::POST, &redeliver_path("not-a-uuid")).send().await.unwrap();
    let error = assert_error(malformed, 400, "Validation").await;
    assert_eq!(field_names(&error), ["deliveryId"], "{error}");
    server.stop().await;
}

#[tokio::test]
async fn another_merchants_delivery_cannot_be_redelivered_or_listed() {
    let setup = two_deliveries().await;
    let server = &setup.server;
    let delivered = deliveries(server, "state=Delivered").await;
    let id = delivered[0]["id"].as_str().unwrap().to_owned();
    let (other_key, _) = server.another_merchant().await;

    let redeliver = server.request_as(Method::POST, &redeliver_path(&id), &other_key).send().await.unwrap();
    assert_error(redeliver, 403, "InvalidTriggeredBy").await;
    let listed = server.request_as(Method::GET, &deliveries_path(), &other_key).send().await;
    let (status, page) = status_and_json(listed.unwrap()).await;
    assert_eq!((status, page["items"].clone()), (200, json!([])), "{page}");

    let unchanged = deliveries(server, "state=Delivered").await;
    assert_eq!(unchanged, delivered, "the refused redeliver changed nothing");
    setup.server.stop().await;
}

#[tokio::test]
async fn redeliver_of_a_delivered_delivery_queues_it_again_and_it_is_delivered_again() {
    let setup = two_deliveries().await;
    let server = &setup.server;
    let before = deliveries(server, &format!("subscriptionId={}", setup.delivered)).await;
    let id = before[0]["id"].as_str().unwrap().to_owned();
    let (status, queued) =
        status_and_json(server.request(Method::POST, &redeliver_path(&id)).send().await.unwrap()).await;
    assert_eq!((status, &queued["id"], &queued["state"]), (200, &json!(id), &json!("Pending")), "{queued}");
    let again = wait_for_delivery(server, setup.delivered, "the second delivery", |d| {
        d["state"] == "Delivered" && attempts(d).len() == 2
    })
    .await;
    assert_eq!(attempt_statuses(&again), [Some(204), Some(204)]);
    assert_eq!(again["eventId"], before[0]["eventId"], "the same event again");
    setup.server.stop().await;
}

#[tokio::test]
async fn deliveries_and_subscriptions_need_an_api_key() {
    let server = TestServer::start().await;
    for (method, path) in [
        (Method::GET, deliveries_path()),
        (Method::POST, redeliver_path(&Uuid::new_v4().to_string())),
        (Method::GET, subscriptions_path()),
        (Method::GET, subscription_path(Uuid::new_v4())),
        (Method::DELETE, subscription_path(Uuid::new_v4())),
    ] {
        let response = server.client.request(method.clone(), format!("{}{path}", server.url)).send().await.unwrap();
        assert_error(response, 401, "Unauthorized").await;
    }
    server.stop().await;
}
