//! Redirect sessions end to end over HTTP: create, repeat, read, list, cancel, races, expiry
//! and the metrics they leave (docs/API.md). Request validation and the errors of the HTTP edge
//! are in `session_rules.rs`.

use std::collections::BTreeSet;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::common::*;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use redirect_sessions::domain::event::EventType;
use redirect_sessions::domain::time::Timestamp;
use reqwest::{Method, Response};
use serde_json::{json, Value};
use uuid::Uuid;

/// A `NewTransactionIntent` with every optional member, written as raw JSON so the amount's
/// digits are exactly these. The locale is not normalised yet.
const FULL_NEW_TRANSACTION_INTENT: &str = r#"{
    "type": "NewTransactionIntent",
    "customerData": {
        "firstName": "Erika",
        "lastName": "Mustermann",
        "email": "erika@example.com",
        "phoneNumber": "+4915112345678",
        "dateOfBirth": "1990-02-28"
    },
    "transactionData": {
        "type": "PassthroughWithdrawal",
        "amount": 100.5,
        "currency": "EUR",
        "externalReference": "order-42"
    },
    "redirectData": {
        "successUrl": "https://merchant.example/success",
        "failureUrl": "https://merchant.example/failure",
        "abortUrl": "https://merchant.example/abort",
        "qrCodeSuccessUrl": "https://merchant.example/qr"
    },
    "locale": "EN-gb"
}"#;

/// The same request as `FULL_NEW_TRANSACTION_INTENT` after normalisation: other member order,
/// other whitespace, `en-GB` for `EN-gb`, `100.50` for `100.5`.
const FULL_NEW_TRANSACTION_INTENT_EQUIVALENT: &str = r#"{"locale":"en-GB","redirectData":{
    "qrCodeSuccessUrl":"https://merchant.example/qr","abortUrl":"https://merchant.example/abort",
    "failureUrl":"https://merchant.example/failure","successUrl":"https://merchant.example/success"},
    "transactionData":{"externalReference":"order-42","currency":"EUR","amount":100.50,"type":"PassthroughWithdrawal"},
    "customerData":{"dateOfBirth":"1990-02-28","phoneNumber":"+4915112345678","email":"erika@example.com",
    "lastName":"Mustermann","firstName":"Erika"},"type":"NewTransactionIntent"}"#;

const FIFTEEN_MINUTES_MS: i64 = 15 * 60 * 1000;

/// A response read whole: status, headers, exact text and its JSON.
struct Answer {
    status: u16,
    headers: reqwest::header::HeaderMap,
    text: String,
    body: Value,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.to_str().expect("a text header"))
    }
}

async fn answer(response: Response) -> Answer {
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let text = response.text().await.unwrap();
    let body = serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"));
    Answer { status, headers, text, body }
}

/// `PUT` of a raw JSON text, with an `x-request-id` when given.
async fn put_text(server: &TestServer, id: Uuid, body: &str, request_id: Option<Uuid>) -> Response {
    let mut request =
        server.request(Method::PUT, &session_path(id)).header("content-type", "application/json").body(body.to_owned());
    if let Some(request_id) = request_id {
        request = request.header("x-request-id", request_id.to_string());
    }
    request.send().await.unwrap()
}

/// `POST …/cancel` with an `x-request-id` and optionally an `If-Match`.
async fn cancel_with(server: &TestServer, id: Uuid, request_id: Uuid, if_match: Option<&str>) -> Response {
    let mut request = server
        .request(Method::POST, &format!("{}/cancel", session_path(id)))
        .header("x-request-id", request_id.to_string());
    if let Some(tag) = if_match {
        request = request.header("if-match", tag);
    }
    request.send().await.unwrap()
}

/// `GET /redirect-sessions` with `query`.
async fn list(server: &TestServer, query: &[(&str, &str)]) -> Answer {
    let response = server.request(Method::GET, &format!("{BASE}/redirect-sessions")).query(query).send().await.unwrap();
    answer(response).await
}

/// The ids of a page's items, in order.
fn item_ids(page: &Answer) -> Vec<String> {
    assert_eq!(page.status, 200, "{}", page.text);
    page.body["items"].as_array().expect("items").iter().map(|s| s["id"].as_str().unwrap().to_owned()).collect()
}

/// The member names of a JSON object, sorted.
fn keys(value: &Value) -> Vec<&str> {
    let mut keys: Vec<&str> = value.as_object().expect("an object").keys().map(String::as_str).collect();
    keys.sort_unstable();
    keys
}

fn sorted(mut names: Vec<&str>) -> Vec<&str> {
    names.sort_unstable();
    names
}

fn now_millis() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as i64
}

/// Waits (polling the clock) until the current millisecond is later than `millis`.
async fn clock_past(millis: i64) {
    eventually(Duration::from_secs(2), "the clock to move on", move || async move { now_millis() > millis }).await;
}

/// Asserts `YYYY-MM-DDTHH:MM:SS.mmmZ` and answers the instant in Unix milliseconds.
fn millis(value: &Value) -> i64 {
    let text = value.as_str().unwrap_or_else(|| panic!("a timestamp, not {value}"));
    let b = text.as_bytes();
    let digits = |from: usize, to: usize| (from..to).all(|i| b[i].is_ascii_digit());
    let shaped = b.len() == 24
        && digits(0, 4)
        && b[4] == b'-'
        && digits(5, 7)
        && b[7] == b'-'
        && digits(8, 10)
        && b[10] == b'T'
        && digits(11, 13)
        && b[13] == b':'
        && digits(14, 16)
        && b[16] == b':'
        && digits(17, 19)
        && b[19] == b'.'
        && digits(20, 23)
        && b[23] == b'Z';
    assert!(shaped, "{text} is not YYYY-MM-DDTHH:MM:SS.mmmZ");
    let at = time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339).unwrap();
    (at.unix_timestamp_nanos() / 1_000_000) as i64
}

/// The JSON header and claims of a JWT.
fn jwt(token: &Value) -> (Value, Value) {
    let parts: Vec<&str> = token.as_str().expect("a token").split('.').collect();
    assert_eq!(parts.len(), 3, "a JWT has three parts: {token}");
    assert!(parts.iter().all(|p| !p.is_empty()), "{token}");
    let decode = |part: &str| serde_json::from_slice::<Value>(&URL_SAFE_NO_PAD.decode(part).unwrap()).unwrap();
    (decode(parts[0]), decode(parts[1]))
}

/// What every freshly created session shows, whatever its type.
fn assert_fresh_session(server: &TestServer, body: &Value, id: Uuid, kind: &str, request_id: Uuid, window: (i64, i64)) {
    assert_eq!(body["id"], id.to_string());
    assert_eq!(body["type"], kind);
    assert_eq!(body["state"], "Created");
    assert_eq!(body["merchantId"], server.merchant_id.to_string());
    assert_eq!(body["redirectUrl"], format!("{}/pay", server.url));
    assert_eq!(body["lastCorrelationId"], request_id.to_string());
    let created_on = millis(&body["createdOn"]);
    assert!(
        window.0 <= created_on && created_on <= window.1,
        "createdOn {} is not when it was created",
        body["createdOn"]
    );
    assert_eq!(millis(&body["expiresOn"]), created_on + FIFTEEN_MINUTES_MS, "expiresOn is createdOn + 15 minutes");
    assert_eq!(body["lastModifiedOn"], body["createdOn"]);

    let (header, claims) = jwt(&body["token"]);
    assert_eq!(header["alg"], "EdDSA");
    assert!(header["kid"].as_str().is_some_and(|kid| !kid.is_empty()), "{header}");
    assert_eq!(claims["sid"], id.to_string());
    assert_eq!(claims["merchId"], server.merchant_id.to_string());
    assert_eq!(claims["iss"], server.url);
    assert_eq!(claims["aud"], format!("{}/pay", server.url));
    assert_eq!(claims["auth"], "otp");
    let exp = claims["exp"].as_i64().expect("exp") * 1000;
    let expires_on = millis(&body["expiresOn"]);
    assert!(exp >= expires_on && exp < expires_on + 1000, "exp {exp} is expiresOn {expires_on} in seconds");
}

async fn event_types(server: &TestServer, id: Uuid) -> Vec<EventType> {
    server.event_types(id).await
}

async fn metrics(server: &TestServer) -> String {
    let response = server.client.get(format!("{}/metrics", server.url)).send().await.unwrap();
    assert_eq!(response.status(), 200);
    response.text().await.unwrap()
}

fn has_line(text: &str, line: &str) -> bool {
    text.lines().any(|l| l == line)
}

// ---------------------------------------------------------------------------------------------
// Create
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn creating_a_new_transaction_intent_answers_201_with_every_field_of_the_session() {
    let server = TestServer::start().await;
    let (id, request_id) = (Uuid::new_v4(), Uuid::new_v4());
    let before = now_millis();
    let created = answer(put_text(&server, id, FULL_NEW_TRANSACTION_INTENT, Some(request_id)).await).await;
    let after = now_millis();

    assert_eq!(created.status, 201, "{}", created.text);
    let location = created.header("location").expect("a Location header");
    assert!(location.ends_with(&session_path(id)), "Location {location}");
    assert_eq!(created.header("etag"), Some("\"1\""));
    assert_eq!(created.header("x-correlation-id"), Some(request_id.to_string().as_str()));
    let body = &created.body;
    assert_eq!(
        keys(body),
        sorted(vec![
            "id",
            "type",
            "state",
            "merchantId",
            "customerData",
            "transactionData",
            "redirectData",
            "locale",
            "token",
            "redirectUrl",
            "expiresOn",
            "createdOn",
            "lastModifiedOn",
            "lastCorrelationId"
        ])
    );
    assert_fresh_session(&server, body, id, "NewTransactionIntent", request_id, (before, after));
    assert_eq!(
        body["customerData"],
        json!({"firstName": "Erika", "lastName": "Mustermann", "email": "erika@example.com",
               "phoneNumber": "+4915112345678", "dateOfBirth": "1990-02-28"})
    );
    assert_eq!(keys(&body["transactionData"]), sorted(vec!["type", "amount", "currency", "externalReference"]));
    assert_eq!(body["transactionData"]["type"], "PassthroughWithdrawal");
    assert_eq!(body["transactionData"]["currency"], "EUR");
    assert_eq!(body["transactionData"]["externalReference"], "order-42");
    assert!(created.text.contains(r#""amount":100.5,"#), "the amount is the JSON number 100.5: {}", created.text);
    assert_eq!(
        body["redirectData"],
        json!({"successUrl": "https://merchant.example/success", "failureUrl": "https://merchant.example/failure",
               "abortUrl": "https://merchant.example/abort", "qrCodeSuccessUrl": "https://merchant.example/qr"})
    );
    assert_eq!(body["locale"], "en-GB");
    server.stop().await;
}

#[tokio::test]
async fn creating_an_existing_transaction_intent_session_answers_201_with_its_fields() {
    let server = TestServer::start().await;
    let customer = server.customer().await;
    let (id, request_id, intent) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    let request = json!({
        "type": "ExistingTransactionIntent",
        "transactionIntentId": intent,
        "customerId": customer,
        "redirectData": {"successUrl": "https://merchant.example/s", "failureUrl": "https://merchant.example/f",
                         "abortUrl": "https://merchant.example/a", "qrCodeSuccessUrl": "https://merchant.example/q"},
        "locale": "de"
    });
    let before = now_millis();
    let created = answer(put_text(&server, id, &request.to_string(), Some(request_id)).await).await;
    let after = now_millis();

    assert_eq!(created.status, 201, "{}", created.text);
    assert!(created.header("location").is_some_and(|l| l.ends_with(&session_path(id))));
    assert_eq!(created.header("etag"), Some("\"1\""));
    let body = &created.body;
    assert_eq!(
        keys(body),
        sorted(vec![
            "id",
            "type",
            "state",
            "merchantId",
            "customerId",
            "transactionIntentId",
            "redirectData",
            "locale",
            "token",
            "redirectUrl",
            "expiresOn",
            "createdOn",
            "lastModifiedOn",
            "lastCorrelationId"
        ])
    );
    assert_fresh_session(&server, body, id, "ExistingTransactionIntent", request_id, (before, after));
    assert_eq!(body["transactionIntentId"], intent.to_string());
    assert_eq!(body["customerId"], customer.to_string());
    assert_eq!(body["redirectData"], request["redirectData"]);
    assert_eq!(body["locale"], "de");
    assert_eq!(jwt(&body["token"]).1["custId"], customer.to_string());
    server.stop().await;
}

#[tokio::test]
async fn creating_a_new_customer_session_answers_201_with_its_fields() {
    let server = TestServer::start().await;
    let (id, request_id) = (Uuid::new_v4(), Uuid::new_v4());
    let request = json!({
        "type": "NewCustomer",
        "customerData": {"firstName": "Max", "email": "max@example.de"},
        "redirectData": {"successUrl": "https://merchant.example/s", "failureUrl": "https://merchant.example/f",
                         "abortUrl": "https://merchant.example/a", "qrCodeSuccessUrl": "https://merchant.example/q"},
        "locale": "fr"
    });
    let before = now_millis();
    let created = answer(put_text(&server, id, &request.to_string(), Some(request_id)).await).await;
    let after = now_millis();

    assert_eq!(created.status, 201, "{}", created.text);
    assert!(created.header("location").is_some_and(|l| l.ends_with(&session_path(id))));
    assert_eq!(created.header("etag"), Some("\"1\""));
    let body = &created.body;
    assert_eq!(
        keys(body),
        sorted(vec![
            "id",
            "type",
            "state",
            "merchantId",
            "customerData",
            "redirectData",
            "locale",
            "token",
            "redirectUrl",
            "expiresOn",
            "createdOn",
            "lastModifiedOn",
            "lastCorrelationId"
        ])
    );
    assert_fresh_session(&server, body, id, "NewCustomer", request_id, (before, after));
    assert_eq!(body["customerData"], request["customerData"]);
    assert_eq!(body["redirectData"], request["redirectData"]);
    assert_eq!(body["locale"], "de-DE", "a language other than en/de becomes de-DE");
    assert!(jwt(&body["token"]).1.get("custId").is_none(), "no custId without a customer");
    server.stop().await;
}

#[tokio::test]
async fn amounts_are_echoed_as_json_numbers_with_exactly_their_digits() {
    let server = TestServer::start().await;
    for (sent, echoed) in [
        ("19.99", "19.99"),
        ("100.50", "100.5"),
        ("10000", "10000"),
        ("0.01", "0.01"),
        ("7.00", "7"),
        ("1.005e2", "100.5"),
    ] {
        let request = FULL_NEW_TRANSACTION_INTENT.replace("100.5", sent);
        let created = answer(put_text(&server, Uuid::new_v4(), &request, None).await).await;
        assert_eq!(created.status, 201, "{sent}: {}", created.text);
        assert!(
            created.text.contains(&format!(r#""amount":{echoed},"#)),
            "{sent} is echoed as {echoed}: {}",
            created.text
        );
        let read = answer(server.get_session(created.body["id"].as_str().unwrap().parse().unwrap()).await).await;
        assert!(read.text.contains(&format!(r#""amount":{echoed},"#)), "{sent} reads back as {echoed}: {}", read.text);
    }
    server.stop().await;
}

#[tokio::test]
async fn a_created_session_reads_back_exactly_as_created() {
    let server = TestServer::start().await;
    let id = Uuid::new_v4();
    let created = answer(put_text(&server, id, FULL_NEW_TRANSACTION_INTENT, Some(Uuid::new_v4())).await).await;
    assert_eq!(created.status, 201, "{}", created.text);
    let read = answer(server.get_session(id).await).await;
    assert_eq!(read.status, 200, "{}", read.text);
    assert_eq!(read.header("etag"), Some("\"1\""));
    assert_eq!(read.text, created.text, "GET answers the representation PUT answered");
    server.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Repeated PUT
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_repeated_identical_put_answers_200_with_the_same_session_and_changes_nothing() {
    let server = TestServer::start().await;
    let id = Uuid::new_v4();
    let first = answer(put_text(&server, id, FULL_NEW_TRANSACTION_INTENT, Some(Uuid::new_v4())).await).await;
    assert_eq!(first.status, 201, "{}", first.text);

    // A retry with a fresh request id, and one without any.
    for request_id in [Some(Uuid::new_v4()), None] {
        let again = answer(put_text(&server, id, FULL_NEW_TRANSACTION_INTENT, request_id).await).await;
        assert_eq!(again.status, 200, "{}", again.text);
        assert_eq!(again.header("etag"), Some("\"1\""));
        assert!(again.header("idempotent-replayed").is_none(), "this is not an x-request-id replay");
        assert_eq!(again.body, first.body, "same representation: same token, lastCorrelationId and times");
    }
    let read = answer(server.get_session(id).await).await;
    assert_eq!((read.header("etag"), &read.body), (Some("\"1\""), &first.body), "nothing changed");
    assert!(event_types(&server, id).await.is_empty());
    server.stop().await;
}

#[tokio::test]
async fn a_put_equivalent_after_normalisation_answers_200_with_the_same_session() {
    let server = TestServer::start().await;
    let id = Uuid::new_v4();
    let first = answer(put_text(&server, id, FULL_NEW_TRANSACTION_INTENT, None).await).await;
    assert_eq!(first.status, 201, "{}", first.text);
    let again = answer(put_text(&server, id, FULL_NEW_TRANSACTION_INTENT_EQUIVALENT, None).await).await;
    assert_eq!(again.status, 200, "locale EN-gb = en-GB and amount 100.50 = 100.5: {}", again.text);
    assert_eq!(again.body, first.body);
    assert_eq!(again.body["token"], first.body["token"]);
    server.stop().await;
}

#[tokio::test]
async fn a_put_of_an_existing_id_with_a_different_body_is_an_entity_version_mismatch() {
    let server = TestServer::start().await;
    let id = Uuid::new_v4();
    let first = answer(put_text(&server, id, FULL_NEW_TRANSACTION_INTENT, None).await).await;
    assert_eq!(first.status, 201, "{}", first.text);

    let different = [
        FULL_NEW_TRANSACTION_INTENT.replace("100.5", "100.51"),
        FULL_NEW_TRANSACTION_INTENT.replace("EN-gb", "de-DE"),
        FULL_NEW_TRANSACTION_INTENT.replace("order-42", "order-43"),
        FULL_NEW_TRANSACTION_INTENT.replace(
            r#""qrCodeSuccessUrl": "https://merchant.example/qr""#,
            r#""qrCodeSuccessUrl": "https://m.example/q""#,
        ),
        json!({"type": "NewCustomer", "redirectData": first.body["redirectData"]}).to_string(),
    ];
    for body in different {
        let response = put_text(&server, id, &body, Some(Uuid::new_v4())).await;
        assert_error(response, 409, "EntityVersionMismatch").await;
    }
    let read = answer(server.get_session(id).await).await;
    assert_eq!((read.header("etag"), &read.body), (Some("\"1\""), &first.body), "nothing changed");
    server.stop().await;
}

#[tokio::test]
async fn a_put_of_another_merchants_session_id_is_a_version_mismatch_that_reveals_nothing() {
    let server = TestServer::start().await;
    let (other_key, other_id) = server.another_merchant().await;
    let id = Uuid::new_v4();
    let theirs = server
        .request_as(Method::PUT, &session_path(id), &other_key)
        .header("content-type", "application/json")
        .body(FULL_NEW_TRANSACTION_INTENT)
        .send()
        .await
        .unwrap();
    let theirs = answer(theirs).await;
    assert_eq!(theirs.status, 201, "{}", theirs.text);

    for body in [FULL_NEW_TRANSACTION_INTENT.to_owned(), FULL_NEW_TRANSACTION_INTENT.replace("100.5", "1")] {
        let response = put_text(&server, id, &body, Some(Uuid::new_v4())).await;
        let text = response.text().await.unwrap();
        let error: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(error["code"], "EntityVersionMismatch", "{text}");
        assert_eq!(keys(&error), sorted(vec!["code", "message", "moreInfo", "correlationId", "details"]), "{text}");
        assert_eq!(error["details"], json!({}), "{text}");
        for secret in [
            other_id.to_string(),
            theirs.body["token"].as_str().unwrap().to_owned(),
            theirs.body["createdOn"].as_str().unwrap().to_owned(),
            theirs.body["expiresOn"].as_str().unwrap().to_owned(),
        ] {
            assert!(!text.contains(&secret), "the answer reveals {secret}: {text}");
        }
    }
    let read = server.request_as(Method::GET, &session_path(id), &other_key).send().await.unwrap();
    let read = answer(read).await;
    assert_eq!((read.status, &read.body), (200, &theirs.body), "the other merchant's session is unchanged");
    server.stop().await;
}

#[tokio::test]
async fn a_repeated_put_after_a_cancel_answers_200_with_the_cancelled_session() {
    let server = TestServer::start().await;
    let id = Uuid::new_v4();
    assert_eq!(put_text(&server, id, FULL_NEW_TRANSACTION_INTENT, None).await.status(), 201);
    let cancelled = answer(server.cancel_session(id).await).await;
    assert_eq!(cancelled.status, 200, "{}", cancelled.text);
    let again = answer(put_text(&server, id, FULL_NEW_TRANSACTION_INTENT, None).await).await;
    assert_eq!(again.status, 200, "{}", again.text);
    assert_eq!((again.header("etag"), &again.body), (Some("\"2\""), &cancelled.body), "the current representation");
    assert_eq!(event_types(&server, id).await, [EventType::RedirectSessionCancelled]);
    server.stop().await;
}

#[tokio::test]
async fn a_put_with_if_match_must_name_the_current_etag() {
    let server = TestServer::start().await;
    let id = Uuid::new_v4();
    let created = answer(put_text(&server, id, FULL_NEW_TRANSACTION_INTENT, None).await).await;
    assert_eq!(created.status, 201, "{}", created.text);
    let put_if_match = |id: Uuid, tag: &'static str| {
        server
            .request(Method::PUT, &session_path(id))
            .header("content-type", "application/json")
            .header("if-match", tag)
            .body(FULL_NEW_TRANSACTION_INTENT)
            .send()
    };

    let same = answer(put_if_match(id, "\"1\"").await.unwrap()).await;
    assert_eq!((same.status, &same.body), (200, &created.body), "{}", same.text);
    assert_error(put_if_match(id, "\"2\"").await.unwrap(), 409, "EntityVersionMismatch").await;

    // An If-Match on an id that does not exist yet: nothing can match, nothing is created.
    let fresh = Uuid::new_v4();
    assert_error(put_if_match(fresh, "\"1\"").await.unwrap(), 409, "EntityVersionMismatch").await;
    assert_error(server.get_session(fresh).await, 404, "RedirectSessionNotFound").await;
    server.stop().await;
}

// ---------------------------------------------------------------------------------------------
// customerId
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_put_naming_an_unknown_customer_is_customer_not_found_and_creates_nothing() {
    let server = TestServer::start().await;
    let id = Uuid::new_v4();
    let mut request = new_transaction_intent();
    request["customerId"] = json!(Uuid::new_v4());
    assert_error(server.put_session(id, &request).await, 404, "CustomerNotFound").await;
    assert_error(server.get_session(id).await, 404, "RedirectSessionNotFound").await;
    server.stop().await;
}

#[tokio::test]
async fn a_put_naming_a_known_customer_creates_the_session_and_echoes_the_customer() {
    let server = TestServer::start().await;
    let customer = server.customer().await;
    let id = Uuid::new_v4();
    let mut request = new_transaction_intent();
    request["customerId"] = json!(customer);
    let created = answer(server.put_session(id, &request).await).await;
    assert_eq!(created.status, 201, "{}", created.text);
    assert_eq!(created.body["customerId"], customer.to_string());
    assert_eq!(jwt(&created.body["token"]).1["custId"], customer.to_string());
    let again = answer(server.put_session(id, &request).await).await;
    assert_eq!((again.status, &again.body), (200, &created.body));
    server.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Read
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn reading_a_session_answers_200_with_its_etag() {
    let server = TestServer::start().await;
    let id = server.created_session().await;
    let read = answer(server.get_session(id).await).await;
    assert_eq!(read.status, 200, "{}", read.text);
    assert_eq!(read.header("etag"), Some("\"1\""));
    assert_eq!(read.body["id"], id.to_string());
    assert_eq!(read.body["state"], "Created");
    server.stop().await;
}

#[tokio::test]
async fn reading_an_unknown_session_is_redirect_session_not_found() {
    let server = TestServer::start().await;
    assert_error(server.get_session(Uuid::new_v4()).await, 404, "RedirectSessionNotFound").await;
    server.stop().await;
}

#[tokio::test]
async fn reading_another_merchants_session_is_invalid_triggered_by_403() {
    let server = TestServer::start().await;
    let (other_key, _) = server.another_merchant().await;
    let id = server.created_session().await;
    let response = server.request_as(Method::GET, &session_path(id), &other_key).send().await.unwrap();
    let error = assert_error(response, 403, "InvalidTriggeredBy").await;
    assert_eq!(keys(&error), sorted(vec!["code", "message", "moreInfo", "correlationId", "details"]), "{error}");
    assert_eq!(error["details"], json!({}), "{error}");
    assert!(!error.to_string().contains(&server.merchant_id.to_string()), "{error}");
    server.stop().await;
}

// ---------------------------------------------------------------------------------------------
// List
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn listing_answers_the_newest_session_first() {
    let server = TestServer::start().await;
    // Ids that sort the opposite way from creation, so only createdOn can order them right.
    let ids = [Uuid::from_u128(u128::MAX - 1), Uuid::from_u128(u128::MAX - 2), Uuid::from_u128(u128::MAX - 3)];
    for id in ids {
        let created = answer(server.put_session(id, &new_transaction_intent()).await).await;
        assert_eq!(created.status, 201, "{}", created.text);
        clock_past(millis(&created.body["createdOn"])).await;
    }
    let page = list(&server, &[]).await;
    let expected: Vec<String> = ids.iter().rev().map(Uuid::to_string).collect();
    assert_eq!(item_ids(&page), expected);
    assert!(page.body.get("nextCursor").is_none(), "one page only: {}", page.text);
    assert_eq!(page.body["items"][0]["state"], "Created");
    assert!(page.body["items"][0]["token"].is_string(), "items are full session representations");
    server.stop().await;
}

#[tokio::test]
async fn paging_through_seven_sessions_three_at_a_time_gives_three_three_and_one_without_duplicates() {
    let server = TestServer::start().await;
    let mut created = BTreeSet::new();
    for _ in 0..7 {
        created.insert(server.created_session().await.to_string());
    }
    let everything = item_ids(&list(&server, &[("limit", "100")]).await);
    assert_eq!(everything.len(), 7);

    let mut seen = Vec::new();
    let mut sizes = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut query = vec![("limit", "3".to_owned())];
        if let Some(cursor) = &cursor {
            query.push(("cursor", cursor.clone()));
        }
        let query: Vec<(&str, &str)> = query.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let page = list(&server, &query).await;
        let ids = item_ids(&page);
        sizes.push(ids.len());
        seen.extend(ids);
        match page.body.get("nextCursor") {
            Some(next) => cursor = Some(next.as_str().expect("a text cursor").to_owned()),
            None => break,
        }
        assert!(sizes.len() < 5, "paging does not end: {sizes:?}");
    }
    assert_eq!(sizes, [3, 3, 1]);
    assert_eq!(seen, everything, "pages concatenate to the whole list, in order");
    assert_eq!(seen.iter().cloned().collect::<BTreeSet<_>>(), created, "no duplicates, nothing missing");
    server.stop().await;
}

#[tokio::test]
async fn listing_filters_by_state() {
    let server = TestServer::start().await;
    let cancelled = server.created_session().await;
    let live = server.created_session().await;
    assert_eq!(server.cancel_session(cancelled).await.status(), 200);

    assert_eq!(item_ids(&list(&server, &[("state", "Cancelled")]).await), [cancelled.to_string()]);
    assert_eq!(item_ids(&list(&server, &[("state", "Created")]).await), [live.to_string()]);
    assert!(item_ids(&list(&server, &[("state", "Expired")]).await).is_empty());
    assert_eq!(item_ids(&list(&server, &[]).await).len(), 2);
    server.stop().await;
}

#[tokio::test]
async fn listing_filters_by_created_from_inclusive_and_created_to_exclusive() {
    let server = TestServer::start().await;
    let mut sessions = Vec::new();
    for _ in 0..3 {
        let created = answer(server.put_session(Uuid::new_v4(), &new_transaction_intent()).await).await;
        assert_eq!(created.status, 201, "{}", created.text);
        clock_past(millis(&created.body["createdOn"])).await;
        sessions.push((
            created.body["id"].as_str().unwrap().to_owned(),
            created.body["createdOn"].as_str().unwrap().to_owned(),
        ));
    }
    let [(a, _), (b, b_created), (c, c_created)] = &sessions[..] else { unreachable!() };
    let (a, b, c) = (a.as_str(), b.as_str(), c.as_str());

    assert_eq!(item_ids(&list(&server, &[("createdFrom", b_created)]).await), [c, b]);
    assert_eq!(item_ids(&list(&server, &[("createdTo", b_created)]).await), [a]);
    assert_eq!(item_ids(&list(&server, &[("createdFrom", b_created), ("createdTo", c_created)]).await), [b]);
    // Any offset is accepted: the same instant one hour east.
    let b_plus_one = time::OffsetDateTime::parse(b_created, &time::format_description::well_known::Rfc3339)
        .unwrap()
        .to_offset(time::UtcOffset::from_hms(1, 0, 0).unwrap())
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    assert_eq!(item_ids(&list(&server, &[("createdFrom", &b_plus_one)]).await), [c, b]);
    server.stop().await;
}

#[tokio::test]
async fn listing_never_shows_another_merchants_sessions() {
    let server = TestServer::start().await;
    let (other_key, _) = server.another_merchant().await;
    let mine = server.created_session().await;
    let theirs = Uuid::new_v4();
    let response = server
        .request_as(Method::PUT, &session_path(theirs), &other_key)
        .json(&new_transaction_intent())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);

    assert_eq!(item_ids(&list(&server, &[]).await), [mine.to_string()]);
    assert_eq!(item_ids(&list(&server, &[("state", "Created")]).await), [mine.to_string()]);
    let response =
        server.request_as(Method::GET, &format!("{BASE}/redirect-sessions"), &other_key).send().await.unwrap();
    assert_eq!(item_ids(&answer(response).await), [theirs.to_string()]);
    server.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Cancel
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn cancelling_a_created_session_answers_200_cancelled_with_a_new_etag_and_one_event() {
    let server = TestServer::start().await;
    let id = server.created_session().await;
    let created = answer(server.get_session(id).await).await;
    let request_id = Uuid::new_v4();
    let cancelled = answer(cancel_with(&server, id, request_id, None).await).await;

    assert_eq!(cancelled.status, 200, "{}", cancelled.text);
    assert_eq!(cancelled.body["state"], "Cancelled");
    assert_eq!(cancelled.header("etag"), Some("\"2\""));
    assert_ne!(cancelled.header("etag"), created.header("etag"));
    assert_eq!(cancelled.body["lastCorrelationId"], request_id.to_string());
    assert!(millis(&cancelled.body["lastModifiedOn"]) >= millis(&created.body["createdOn"]));
    for unchanged in
        ["id", "type", "merchantId", "transactionData", "redirectData", "locale", "token", "createdOn", "expiresOn"]
    {
        assert_eq!(cancelled.body[unchanged], created.body[unchanged], "{unchanged}");
    }
    assert_eq!(event_types(&server, id).await, [EventType::RedirectSessionCancelled]);

    let read = answer(server.get_session(id).await).await;
    assert_eq!((read.header("etag"), &read.body), (Some("\"2\""), &cancelled.body));
    server.stop().await;
}

#[tokio::test]
async fn cancelling_a_cancelled_session_again_answers_200_without_a_second_event() {
    let server = TestServer::start().await;
    let id = server.created_session().await;
    let first = answer(cancel_with(&server, id, Uuid::new_v4(), None).await).await;
    assert_eq!(first.status, 200, "{}", first.text);

    let again = answer(cancel_with(&server, id, Uuid::new_v4(), None).await).await;
    assert_eq!(again.status, 200, "{}", again.text);
    assert_eq!(again.header("etag"), Some("\"2\""));
    assert_eq!(again.body, first.body, "the current representation, unchanged (lastCorrelationId included)");
    assert_eq!(event_types(&server, id).await, [EventType::RedirectSessionCancelled]);
    server.stop().await;
}

#[tokio::test]
async fn cancelling_an_unknown_session_is_redirect_session_not_found() {
    let server = TestServer::start().await;
    assert_error(server.cancel_session(Uuid::new_v4()).await, 404, "RedirectSessionNotFound").await;
    server.stop().await;
}

#[tokio::test]
async fn cancelling_another_merchants_session_is_invalid_triggered_by_400_and_changes_nothing() {
    let server = TestServer::start().await;
    let (other_key, _) = server.another_merchant().await;
    let id = server.created_session().await;
    let response =
        server.request_as(Method::POST, &format!("{}/cancel", session_path(id)), &other_key).send().await.unwrap();
    let error = assert_error(response, 400, "InvalidTriggeredBy").await;
    assert!(!error.to_string().contains(&server.merchant_id.to_string()), "{error}");
    let read = answer(server.get_session(id).await).await;
    assert_eq!((read.body["state"].as_str(), read.header("etag")), (Some("Created"), Some("\"1\"")));
    assert!(event_types(&server, id).await.is_empty());
    server.stop().await;
}

#[tokio::test]
async fn cancel_with_an_if_match_that_is_not_current_is_a_version_mismatch_and_changes_nothing() {
    let server = TestServer::start().await;
    let id = server.created_session().await;
    for tag in ["\"7\"", "\"1-expired\"", "\"0\""] {
        assert_error(cancel_with(&server, id, Uuid::new_v4(), Some(tag)).await, 409, "EntityVersionMismatch").await;
    }
    let read = answer(server.get_session(id).await).await;
    assert_eq!((read.body["state"].as_str(), read.header("etag")), (Some("Created"), Some("\"1\"")));
    assert!(event_types(&server, id).await.is_empty());

    // A tag that was current once but is stale after the cancel.
    let cancelled = answer(cancel_with(&server, id, Uuid::new_v4(), Some("\"1\"")).await).await;
    assert_eq!(cancelled.status, 200, "{}", cancelled.text);
    assert_error(cancel_with(&server, id, Uuid::new_v4(), Some("\"1\"")).await, 409, "EntityVersionMismatch").await;
    let read = answer(server.get_session(id).await).await;
    assert_eq!((read.header("etag"), &read.body), (Some("\"2\""), &cancelled.body));
    assert_eq!(event_types(&server, id).await, [EventType::RedirectSessionCancelled]);
    server.stop().await;
}

#[tokio::test]
async fn cancel_with_the_current_if_match_succeeds() {
    let server = TestServer::start().await;
    let id = server.created_session().await;
    let etag = answer(server.get_session(id).await).await.header("etag").unwrap().to_owned();
    let cancelled = answer(cancel_with(&server, id, Uuid::new_v4(), Some(&etag)).await).await;
    assert_eq!((cancelled.status, cancelled.body["state"].as_str()), (200, Some("Cancelled")), "{}", cancelled.text);
    assert_eq!(cancelled.header("etag"), Some("\"2\""));

    let other = server.created_session().await;
    let cancelled = answer(cancel_with(&server, other, Uuid::new_v4(), Some("*")).await).await;
    assert_eq!((cancelled.status, cancelled.body["state"].as_str()), (200, Some("Cancelled")), "If-Match: * matches");
    server.stop().await;
}

#[tokio::test]
async fn cancel_with_a_body_other_than_nothing_or_an_empty_object_is_a_validation_error() {
    let server = TestServer::start().await;
    let id = server.created_session().await;
    for body in [r#"{"reason":"changed my mind"}"#, "[]", "null", r#""cancel""#, "{"] {
        let response = server
            .request(Method::POST, &format!("{}/cancel", session_path(id)))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        let error = assert_error(response, 400, "Validation").await;
        assert_eq!(error["details"]["validationErrorReasons"][0]["fieldName"], "body", "{body}: {error}");
    }
    assert!(event_types(&server, id).await.is_empty(), "a rejected cancel changes nothing");

    let response = server
        .request(Method::POST, &format!("{}/cancel", session_path(id)))
        .header("content-type", "application/json")
        .body("{}")
        .send()
        .await
        .unwrap();
    let cancelled = answer(response).await;
    assert_eq!((cancelled.status, cancelled.body["state"].as_str()), (200, Some("Cancelled")), "{}", cancelled.text);
    server.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Races
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_cancels_of_one_session_all_answer_200_and_record_one_event() {
    let server = TestServer::start().await;
    let id = server.created_session().await;
    let answers =
        futures_util::future::join_all((0..50).map(|_| async { answer(server.cancel_session(id).await).await })).await;
    for each in &answers {
        assert_eq!(each.status, 200, "{}", each.text);
        assert_eq!(each.header("etag"), Some("\"2\""), "the version moved once");
        assert_eq!(each.body, answers[0].body, "every caller sees the winner's result");
    }
    assert_eq!(answers[0].body["state"], "Cancelled");
    assert_eq!(event_types(&server, id).await, [EventType::RedirectSessionCancelled]);
    assert_eq!(answer(server.get_session(id).await).await.header("etag"), Some("\"2\""));
    assert!(has_line(&metrics(&server).await, "redirect_sessions_cancelled_total 1"));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_identical_puts_of_a_new_id_create_it_once_and_answer_200_to_the_rest() {
    let server = TestServer::start().await;
    let id = Uuid::new_v4();
    let answers = futures_util::future::join_all(
        (0..50).map(|_| async { answer(put_text(&server, id, FULL_NEW_TRANSACTION_INTENT, None).await).await }),
    )
    .await;
    let created = answers.iter().filter(|a| a.status == 201).count();
    let repeated = answers.iter().filter(|a| a.status == 200).count();
    assert_eq!((created, repeated), (1, 49), "{:?}", answers.iter().map(|a| (a.status, &a.text)).collect::<Vec<_>>());
    for each in &answers {
        assert_eq!(each.body, answers[0].body, "one session, one token");
    }
    assert!(has_line(&metrics(&server).await, "redirect_sessions_created_total 1"));
    assert_eq!(item_ids(&list(&server, &[]).await), [id.to_string()]);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_puts_of_one_id_with_two_bodies_create_one_session_and_conflict_for_the_other_body() {
    let server = TestServer::start().await;
    let id = Uuid::new_v4();
    let other_body = FULL_NEW_TRANSACTION_INTENT.replace("100.5", "42");
    let bodies: Vec<&str> =
        (0..40).map(|i| if i % 2 == 0 { FULL_NEW_TRANSACTION_INTENT } else { other_body.as_str() }).collect();
    let answers = futures_util::future::join_all(
        bodies.iter().map(|body| async { (*body, answer(put_text(&server, id, body, None).await).await) }),
    )
    .await;
    let winner = answers.iter().filter(|(_, a)| a.status == 201).map(|(body, _)| *body).collect::<Vec<_>>();
    assert_eq!(winner.len(), 1, "{:?}", answers.iter().map(|(_, a)| a.status).collect::<Vec<_>>());
    for (body, each) in &answers {
        if *body == winner[0] {
            assert!(each.status == 201 || each.status == 200, "{}", each.text);
        } else {
            assert_eq!(
                (each.status, each.body["code"].as_str()),
                (409, Some("EntityVersionMismatch")),
                "{}",
                each.text
            );
        }
    }
    let read = answer(server.get_session(id).await).await;
    let expected_amount =
        if winner[0] == FULL_NEW_TRANSACTION_INTENT { r#""amount":100.5,"# } else { r#""amount":42,"# };
    assert!(read.text.contains(expected_amount), "the winner's body was stored: {}", read.text);
    server.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Expiry
// ---------------------------------------------------------------------------------------------

/// A server whose sessions live one second and whose sweep is off.
async fn short_lived_without_sweep() -> TestServer {
    TestServer::start_with(|c| {
        c.session_ttl = Duration::from_secs(1);
        c.expiry_sweep = false;
    })
    .await
}

/// Waits until a GET of `id` shows `Expired`.
async fn until_expired(server: &TestServer, id: Uuid) {
    eventually(Duration::from_secs(10), "the session to read as Expired", move || async move {
        let (status, body) = status_and_json(server.get_session(id).await).await;
        assert_eq!(status, 200, "{body}");
        body["state"] == "Expired"
    })
    .await;
}

#[tokio::test]
async fn a_session_past_expires_on_reads_as_expired_with_a_new_etag_before_the_sweep() {
    let server = short_lived_without_sweep().await;
    let id = Uuid::new_v4();
    let created = answer(server.put_session(id, &new_transaction_intent()).await).await;
    assert_eq!(created.status, 201, "{}", created.text);
    assert_eq!(millis(&created.body["expiresOn"]), millis(&created.body["createdOn"]) + 1000, "the operator's ttl");
    assert_eq!(created.body["state"], "Created");

    until_expired(&server, id).await;
    let read = answer(server.get_session(id).await).await;
    assert!(now_millis() >= millis(&read.body["expiresOn"]), "expired only once expiresOn passed");
    assert_ne!(read.header("etag"), created.header("etag"), "the representation changed, so must the ETag");
    for unchanged in ["lastCorrelationId", "token", "expiresOn"] {
        assert_eq!(read.body[unchanged], created.body[unchanged], "{unchanged}");
    }
    assert_eq!(read.body["lastModifiedOn"], read.body["expiresOn"], "it changed when it expired");
    assert!(event_types(&server, id).await.is_empty(), "nothing is written before the sweep");
    server.stop().await;
}

#[tokio::test]
async fn cancel_of_an_expired_session_is_an_invalid_transition() {
    let server = short_lived_without_sweep().await;
    let id = server.created_session().await;
    until_expired(&server, id).await;
    let etag = answer(server.get_session(id).await).await.header("etag").unwrap().to_owned();

    assert_error(server.cancel_session(id).await, 400, "InvalidRedirectSessionStateTransition").await;
    // Also with the current ETag: the tag matches, the state does not allow it.
    assert_error(
        cancel_with(&server, id, Uuid::new_v4(), Some(&etag)).await,
        400,
        "InvalidRedirectSessionStateTransition",
    )
    .await;
    let read = answer(server.get_session(id).await).await;
    assert_eq!((read.body["state"].as_str(), read.header("etag")), (Some("Expired"), Some(etag.as_str())));
    assert!(event_types(&server, id).await.is_empty(), "nothing changed");
    server.stop().await;
}

#[tokio::test]
async fn listing_by_state_counts_a_session_past_expires_on_as_expired() {
    let server = short_lived_without_sweep().await;
    let id = server.created_session().await;
    until_expired(&server, id).await;
    assert_eq!(item_ids(&list(&server, &[("state", "Expired")]).await), [id.to_string()]);
    assert!(item_ids(&list(&server, &[("state", "Created")]).await).is_empty());
    let all = list(&server, &[]).await;
    assert_eq!(all.body["items"][0]["state"], "Expired");
    server.stop().await;
}

#[tokio::test]
async fn the_sweep_records_the_expiry_of_a_session_exactly_once() {
    let server = TestServer::start_with(|c| c.session_ttl = Duration::from_secs(1)).await;
    let id = server.created_session().await;
    let reader = &server;
    eventually(Duration::from_secs(10), "the sweep to record the expiry", move || async move {
        !reader.event_types(id).await.is_empty()
    })
    .await;
    assert_eq!(event_types(&server, id).await, [EventType::RedirectSessionExpired]);

    // Another sweep finds nothing more to do.
    assert_eq!(server.store().expire_due(Timestamp::now(), 500).await.unwrap(), 0);
    assert_eq!(event_types(&server, id).await, [EventType::RedirectSessionExpired]);
    let read = answer(server.get_session(id).await).await;
    assert_eq!((read.body["state"].as_str(), read.header("etag")), (Some("Expired"), Some("\"2\"")));
    assert_error(server.cancel_session(id).await, 400, "InvalidRedirectSessionStateTransition").await;
    assert!(has_line(&metrics(&server).await, "redirect_sessions_expired_total 1"));
    server.stop().await;
}

#[tokio::test]
async fn recording_an_expiry_changes_the_etag_but_not_the_representation() {
    let server = short_lived_without_sweep().await;
    let id = server.created_session().await;
    until_expired(&server, id).await;
    let before = answer(server.get_session(id).await).await;

    // What the sweep does, run once by hand so that the moment is known.
    assert_eq!(server.store().expire_due(Timestamp::now(), 500).await.unwrap(), 1);
    assert_eq!(event_types(&server, id).await, [EventType::RedirectSessionExpired]);
    let after = answer(server.get_session(id).await).await;
    assert_ne!(after.header("etag"), before.header("etag"), "the stored version moved");
    assert_eq!(after.body, before.body, "docs/DESIGN.md: the sweep changes only the ETag of what a merchant sees");
    server.stop().await;
}

#[tokio::test]
async fn a_session_cancelled_before_expiry_is_never_expired() {
    let server = TestServer::start_with(|c| c.session_ttl = Duration::from_secs(2)).await;
    let cancelled = server.created_session().await;
    let answer_to_cancel = answer(server.cancel_session(cancelled).await).await;
    assert_eq!(answer_to_cancel.status, 200, "{}", answer_to_cancel.text);
    // A witness created later, so it expires later: once the sweep recorded it, the sweep has
    // passed the cancelled session's expiry too.
    let witness = server.created_session().await;
    let reader = &server;
    eventually(Duration::from_secs(10), "the sweep to expire the witness", move || async move {
        !reader.event_types(witness).await.is_empty()
    })
    .await;
    assert_eq!(server.store().expire_due(Timestamp::now(), 500).await.unwrap(), 0);

    assert_eq!(event_types(&server, cancelled).await, [EventType::RedirectSessionCancelled]);
    let read = answer(server.get_session(cancelled).await).await;
    assert_eq!((read.header("etag"), &read.body), (Some("\"2\""), &answer_to_cancel.body));
    server.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Metrics
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn metrics_count_created_and_cancelled_sessions_and_requests_by_route_and_status() {
    let server = TestServer::start().await;
    let id = server.created_session().await;
    assert_eq!(server.cancel_session(id).await.status(), 200);
    let text = metrics(&server).await;
    for line in [
        "redirect_sessions_created_total 1",
        "redirect_sessions_cancelled_total 1",
        "redirect_sessions_expired_total 0",
        r#"http_requests_total{method="PUT",route="/customer-authentication-service/v1/redirect-sessions/{redirectSessionId}",status="201"} 1"#,
        r#"http_requests_total{method="POST",route="/customer-authentication-service/v1/redirect-sessions/{redirectSessionId}/cancel",status="200"} 1"#,
    ] {
        assert!(has_line(&text, line), "missing `{line}` in:\n{text}");
    }
    assert!(!text.contains(&id.to_string()), "a session id must never become a label");
    server.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Sessions stored before qrCodeSuccessUrl was required
// ---------------------------------------------------------------------------------------------

/// Runs `sqlite` or `postgres` (the backend's SQL text) on a database no server is using.
async fn behind_the_servers_back(database: &TestDatabase, sqlite: &str, postgres: &str) {
    if database.is_postgres() {
        database.sql().await.batch_execute(postgres).await.unwrap_or_else(|e| panic!("{postgres}: {e}"));
    } else {
        let (path, sqlite) = (database.sqlite_path().unwrap().to_owned(), sqlite.to_owned());
        tokio::task::spawn_blocking(move || {
            let connection = rusqlite::Connection::open(&path).unwrap();
            connection.execute_batch(&sqlite).unwrap_or_else(|e| panic!("{sqlite}: {e}"));
        })
        .await
        .unwrap();
    }
}

/// Stops `server`, rewrites every stored session into the format of before `qrCodeSuccessUrl`
/// was required (the member absent), optionally runs the migration filling it in again,
/// and starts the server again. Answers the restarted server and the first merchant's key.
async fn restart_with_old_format_sessions(server: TestServer, rerun_migration: bool) -> (TestServer, String) {
    let api_key = server.api_key.clone();
    let database = server.stop_keeping_database().await;
    let mut sqlite = "UPDATE sessions SET spec = json_remove(spec, '$.redirectData.qrCodeSuccessUrl');".to_owned();
    let mut postgres = "UPDATE sessions SET spec = spec #- '{redirectData,qrCodeSuccessUrl}';".to_owned();
    if rerun_migration {
        // The migration run again on the old sessions (the runner applies a migration once).
        sqlite.push_str(include_str!("../../migrations/sqlite/0006_qr_code_success_url.sql"));
        postgres.push_str(include_str!("../../migrations/postgres/0004_qr_code_success_url.sql"));
    }
    behind_the_servers_back(&database, &sqlite, &postgres).await;
    (TestServer::start_on(test_config(&database), database).await, api_key)
}

async fn read_as(server: &TestServer, api_key: &str, id: Uuid) -> Answer {
    let url = format!("{}{}", server.url, session_path(id));
    answer(server.client.get(url).header("x-api-key", api_key).send().await.unwrap()).await
}

#[tokio::test]
async fn the_migration_fills_in_a_missing_qr_code_success_url_from_the_success_url_and_moves_the_etag() {
    let server = TestServer::start().await;
    let id = server.created_session().await;
    let created = answer(server.get_session(id).await).await;
    assert_eq!(created.header("etag"), Some("\"1\""));

    let (server, api_key) = restart_with_old_format_sessions(server, true).await;
    let read = read_as(&server, &api_key, id).await;
    assert_eq!(read.status, 200, "{}", read.text);
    let urls = &read.body["redirectData"];
    assert_eq!(urls["qrCodeSuccessUrl"], urls["successUrl"], "{}", read.text);
    assert_eq!(urls["successUrl"], "https://merchant.example/success");
    assert_eq!(read.header("etag"), Some("\"2\""), "the representation changed, so does the ETag");

    // The stored spec itself now has the member: a cancel (a write of the row) keeps it.
    let cancel = server.request_as(Method::POST, &format!("{}/cancel", session_path(id)), &api_key);
    let cancelled = answer(cancel.send().await.unwrap()).await;
    assert_eq!(cancelled.status, 200, "{}", cancelled.text);
    assert_eq!(cancelled.body["redirectData"], read.body["redirectData"]);
    server.stop().await;
}

#[tokio::test]
async fn a_session_stored_without_a_qr_code_success_url_still_reads_with_the_success_url() {
    let server = TestServer::start().await;
    let id = server.created_session().await;
    let (server, api_key) = restart_with_old_format_sessions(server, false).await;

    let read = read_as(&server, &api_key, id).await;
    assert_eq!(read.status, 200, "{}", read.text);
    let urls = &read.body["redirectData"];
    assert_eq!(urls["qrCodeSuccessUrl"], "https://merchant.example/success", "{}", read.text);
    assert_eq!(read.header("etag"), Some("\"1\""));

    // The list reads it too, and a PUT naming successUrl as qrCodeSuccessUrl is the same request.
    let url = format!("{}{BASE}/redirect-sessions", server.url);
    let listed = answer(server.client.get(url).header("x-api-key", &api_key).send().await.unwrap()).await;
    assert_eq!(listed.body["items"][0]["redirectData"], *urls, "{}", listed.text);
    let mut body = new_transaction_intent();
    body["redirectData"]["qrCodeSuccessUrl"] = json!("https://merchant.example/success");
    let url = format!("{}{}", server.url, session_path(id));
    let again = answer(server.client.put(url).header("x-api-key", &api_key).json(&body).send().await.unwrap()).await;
    assert_eq!((again.status, &again.body), (200, &read.body), "{}", again.text);
    server.stop().await;
}

/// Sends `n` reads at once with `key`; answers the statuses and the first `429` answer's
/// `Retry-After` and body.
async fn burst(server: &TestServer, key: &str, n: usize) -> (Vec<u16>, Option<(String, Value)>) {
    let id = Uuid::new_v4();
    let sends = (0..n).map(|_| {
        let request = server.client.get(format!("{}{BASE}/redirect-sessions/{id}", server.url));
        request.header("x-api-key", key).send()
    });
    let mut statuses = Vec::new();
    let mut limited = None;
    for response in futures_util::future::join_all(sends).await {
        let response = response.unwrap();
        statuses.push(response.status().as_u16());
        if response.status() == 429 && limited.is_none() {
            let retry_after = response.headers().get("retry-after").map(|v| v.to_str().unwrap().to_owned());
            limited = Some((retry_after.unwrap_or_default(), response.json::<Value>().await.unwrap()));
        }
    }
    (statuses, limited)
}

#[tokio::test]
async fn a_merchant_over_its_rate_is_answered_429_with_retry_after_and_others_are_not() {
    // One request a second per key, a burst of two: ten at once cannot all pass.
    let server = TestServer::start_with(|config| config.rate_limit_per_key = 1).await;
    let (statuses, limited) = burst(&server, &server.api_key, 10).await;
    assert!(statuses.iter().all(|s| [404, 429].contains(s)), "{statuses:?}");
    let (retry_after, body) = limited.unwrap_or_else(|| panic!("no 429 among {statuses:?}"));
    assert!(retry_after.parse::<u64>().is_ok_and(|s| s >= 1), "Retry-After {retry_after:?}");
    assert_eq!(body["code"], "TooManyRequests");
    assert_eq!(body["details"], json!({}));

    // Another merchant has a bucket of its own.
    let (other_key, _) = server.another_merchant().await;
    let (statuses, _) = burst(&server, &other_key, 1).await;
    assert_eq!(statuses, [404]);
    server.stop().await;
}

#[tokio::test]
async fn an_address_over_its_rate_is_answered_429_with_retry_after_whatever_key_it_sends() {
    let server = TestServer::start_with(|config| config.rate_limit_per_ip = 1).await;
    let (statuses, limited) = burst(&server, "not-a-key", 10).await;
    assert!(statuses.iter().all(|s| [401, 429].contains(s)), "{statuses:?}");
    let (retry_after, body) = limited.unwrap_or_else(|| panic!("no 429 among {statuses:?}"));
    assert!(retry_after.parse::<u64>().is_ok_and(|s| s >= 1), "Retry-After {retry_after:?}");
    assert_eq!(body["code"], "TooManyRequests");
    // The address is limited before the key is looked at: a valid key gets the same answer.
    let (statuses, _) = burst(&server, &server.api_key, 3).await;
    assert!(statuses.contains(&429), "{statuses:?}");
    server.stop().await;
}
