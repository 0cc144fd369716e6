//! What a redirect-session request may contain (docs/API.md) and the errors of the HTTP edge
//! (docs/API.md, docs/ERRORS.md): every failing field at once, exact status and `code`, and the correlation
//! id on every answer.

use crate::common::*;
use reqwest::{Method, Response};
use serde_json::{json, Value};
use uuid::Uuid;

/// `PUT` of a raw JSON text to a fresh id.
async fn put_text(server: &TestServer, body: &str) -> Response {
    server
        .request(Method::PUT, &session_path(Uuid::new_v4()))
        .header("content-type", "application/json")
        .body(body.to_owned())
        .send()
        .await
        .unwrap()
}

/// The `fieldName`s of a validation error, sorted; each reason must say what is wrong.
fn field_names(error: &Value) -> Vec<String> {
    let reasons = error["details"]["validationErrorReasons"].as_array().unwrap_or_else(|| panic!("reasons: {error}"));
    let mut names = Vec::new();
    for reason in reasons {
        assert!(reason["errorMessage"].as_str().is_some_and(|m| !m.is_empty()), "{reason}");
        names.push(reason["fieldName"].as_str().expect("a fieldName").to_owned());
    }
    names.sort();
    names
}

fn names(expected: &[&str]) -> Vec<String> {
    let mut names: Vec<String> = expected.iter().map(|s| s.to_string()).collect();
    names.sort();
    names
}

/// Asserts that `response` is `400 Validation` naming exactly `expected`.
async fn assert_invalid(response: Response, expected: &[&str]) -> Value {
    let error = assert_error(response, 400, "Validation").await;
    assert_eq!(field_names(&error), names(expected), "{error}");
    error
}

/// Asserts that creating `body` fails naming exactly `expected`.
async fn assert_rejected(server: &TestServer, body: &Value, expected: &[&str]) {
    assert_invalid(server.put_session(Uuid::new_v4(), body).await, expected).await;
}

/// Asserts that creating `body` succeeds and answers the session.
async fn assert_accepted(server: &TestServer, body: &Value) -> Value {
    let (status, session) = status_and_json(server.put_session(Uuid::new_v4(), body).await).await;
    assert_eq!(status, 201, "{body} is valid: {session}");
    session
}

/// `body` with the member at `path` set to `value` (members created as needed).
fn with(mut body: Value, path: &[&str], value: Value) -> Value {
    let (last, parents) = path.split_last().unwrap();
    let mut at = &mut body;
    for key in parents {
        at = at.as_object_mut().unwrap().entry(key.to_string()).or_insert_with(|| json!({}));
    }
    at.as_object_mut().unwrap().insert(last.to_string(), value);
    body
}

/// `body` without the member at `path`.
fn without(mut body: Value, path: &[&str]) -> Value {
    let (last, parents) = path.split_last().unwrap();
    let mut at = &mut body;
    for key in parents {
        at = &mut at[*key];
    }
    at.as_object_mut().unwrap().remove(*last);
    body
}

/// A valid body with this amount text, exactly as written.
fn with_amount(amount: &str) -> String {
    format!(
        r#"{{"type":"NewTransactionIntent","transactionData":{{"type":"PassthroughDeposit","amount":{amount},"currency":"EUR"}},
        "redirectData":{{"successUrl":"https://m.example/s","failureUrl":"https://m.example/f","abortUrl":"https://m.example/a",
        "qrCodeSuccessUrl":"https://m.example/q"}}}}"#
    )
}

fn new_customer() -> Value {
    json!({
        "type": "NewCustomer",
        "redirectData": {"successUrl": "https://m.example/s", "failureUrl": "https://m.example/f", "abortUrl": "https://m.example/a",
                         "qrCodeSuccessUrl": "https://m.example/q"}
    })
}

fn existing_transaction_intent() -> Value {
    json!({
        "type": "ExistingTransactionIntent",
        "transactionIntentId": Uuid::new_v4(),
        "redirectData": {"successUrl": "https://m.example/s", "failureUrl": "https://m.example/f", "abortUrl": "https://m.example/a",
                         "qrCodeSuccessUrl": "https://m.example/q"}
    })
}

// ---------------------------------------------------------------------------------------------
// Every failing field at once
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn one_request_with_many_faults_lists_every_failing_field_by_its_dotted_path() {
    let server = TestServer::start().await;
    let body = json!({
        "type": "NewTransactionIntent",
        "colour": "blue",
        "customerData": {"email": "not-an-email", "phoneNumber": "0151 1234567", "dateOfBirth": "2999-01-01", "nickname": "E"},
        "transactionData": {"type": "PassthroughWithdrawal", "direction": "MerchantToCustomer", "amount": 0,
                            "currency": "USD", "externalReference": "x".repeat(65), "note": "?"},
        "redirectData": {"successUrl": "/success", "failureUrl": "ftp://merchant.example/failure",
                         "abortUrl": "https://user:secret@merchant.example/abort",
                         "qrCodeSuccessUrl": format!("https://merchant.example/{}", "q".repeat(2030))},
        "locale": "e"
    });
    assert_rejected(
        &server,
        &body,
        &[
            "colour",
            "customerData.nickname",
            "customerData.email",
            "customerData.phoneNumber",
            "customerData.dateOfBirth",
            "transactionData.note",
            "transactionData.direction",
            "transactionData.amount",
            "transactionData.currency",
            "transactionData.externalReference",
            "redirectData.successUrl",
            "redirectData.failureUrl",
            "redirectData.abortUrl",
            "redirectData.qrCodeSuccessUrl",
            "locale",
        ],
    )
    .await;
    server.stop().await;
}

#[tokio::test]
async fn a_malformed_path_id_is_listed_together_with_the_body_faults() {
    let server = TestServer::start().await;
    let body = with(new_transaction_intent(), &["transactionData", "amount"], json!(-1));
    let response = server.request(Method::PUT, &session_path("not-a-uuid")).json(&body).send().await.unwrap();
    assert_invalid(response, &["redirectSessionId", "transactionData.amount"]).await;
    server.stop().await;
}

#[tokio::test]
async fn a_malformed_path_id_is_a_validation_error_naming_the_path_parameter() {
    let server = TestServer::start().await;
    for bad in ["not-a-uuid", "12345", "6f1b7f9e6a8e4d6c9a433c1f7d4b2a10", "6f1b7f9e-6a8e-4d6c-9a43-3c1f7d4b2a1z"] {
        let put = server.request(Method::PUT, &session_path(bad)).json(&new_transaction_intent()).send().await.unwrap();
        assert_invalid(put, &["redirectSessionId"]).await;
        let get = server.request(Method::GET, &session_path(bad)).send().await.unwrap();
        assert_invalid(get, &["redirectSessionId"]).await;
        let cancel = server.request(Method::POST, &format!("{}/cancel", session_path(bad))).send().await.unwrap();
        assert_invalid(cancel, &["redirectSessionId"]).await;
    }
    server.stop().await;
}

#[tokio::test]
async fn missing_required_members_are_each_reported() {
    let server = TestServer::start().await;
    assert_rejected(&server, &json!({"type": "NewTransactionIntent"}), &["transactionData", "redirectData"]).await;
    let empty = json!({"type": "NewTransactionIntent", "transactionData": {}, "redirectData": {}});
    assert_rejected(
        &server,
        &empty,
        &[
            "transactionData.type",
            "transactionData.amount",
            "transactionData.currency",
            "redirectData.successUrl",
            "redirectData.failureUrl",
            "redirectData.abortUrl",
            "redirectData.qrCodeSuccessUrl",
        ],
    )
    .await;
    assert_rejected(
        &server,
        &without(existing_transaction_intent(), &["transactionIntentId"]),
        &["transactionIntentId"],
    )
    .await;
    assert_rejected(
        &server,
        &with(existing_transaction_intent(), &["transactionIntentId"], json!("123")),
        &["transactionIntentId"],
    )
    .await;
    assert_rejected(&server, &json!({"type": "NewCustomer"}), &["redirectData"]).await;
    server.stop().await;
}

#[tokio::test]
async fn a_missing_or_unknown_session_type_is_a_validation_error() {
    let server = TestServer::start().await;
    assert_rejected(&server, &without(new_transaction_intent(), &["type"]), &["type"]).await;
    assert_rejected(&server, &with(new_transaction_intent(), &["type"], json!("NewTransaction")), &["type"]).await;
    assert_rejected(&server, &with(new_transaction_intent(), &["type"], json!(1)), &["type"]).await;
    server.stop().await;
}

#[tokio::test]
async fn unknown_fields_are_rejected_at_the_top_level_and_nested() {
    let server = TestServer::start().await;
    assert_rejected(&server, &with(new_transaction_intent(), &["colour"], json!("blue")), &["colour"]).await;
    assert_rejected(
        &server,
        &with(new_transaction_intent(), &["transactionData", "typo"], json!(1)),
        &["transactionData.typo"],
    )
    .await;
    assert_rejected(
        &server,
        &with(new_transaction_intent(), &["redirectData", "homeUrl"], json!("https://m.example")),
        &["redirectData.homeUrl"],
    )
    .await;
    assert_rejected(
        &server,
        &with(new_transaction_intent(), &["customerData", "middleName"], json!("J")),
        &["customerData.middleName"],
    )
    .await;
    server.stop().await;
}

#[tokio::test]
async fn a_member_of_another_session_type_is_an_unknown_field() {
    let server = TestServer::start().await;
    let transaction_data = new_transaction_intent()["transactionData"].clone();
    assert_rejected(
        &server,
        &with(new_customer(), &["transactionData"], transaction_data.clone()),
        &["transactionData"],
    )
    .await;
    assert_rejected(&server, &with(new_customer(), &["customerId"], json!(Uuid::new_v4())), &["customerId"]).await;
    assert_rejected(
        &server,
        &with(existing_transaction_intent(), &["transactionData"], transaction_data),
        &["transactionData"],
    )
    .await;
    assert_rejected(
        &server,
        &with(existing_transaction_intent(), &["customerData"], json!({"firstName": "E"})),
        &["customerData"],
    )
    .await;
    assert_rejected(
        &server,
        &with(new_transaction_intent(), &["transactionIntentId"], json!(Uuid::new_v4())),
        &["transactionIntentId"],
    )
    .await;
    server.stop().await;
}

// ---------------------------------------------------------------------------------------------
// transactionData
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn amounts_that_are_not_positive_too_large_too_precise_or_not_numbers_are_rejected() {
    let server = TestServer::start().await;
    for amount in [
        "0",
        "0.00",
        "-5",
        "-0.01",
        "10000.01",
        "1.005",
        "0.001",
        r#""100""#,
        r#""100.5""#,
        "true",
        "{}",
        "1e400",
        "1e-400",
        "1e99999999999",
    ] {
        let response = put_text(&server, &with_amount(amount)).await;
        let error = assert_error(response, 400, "Validation").await;
        assert_eq!(field_names(&error), ["transactionData.amount"], "amount {amount}: {error}");
    }
    assert_rejected(
        &server,
        &without(new_transaction_intent(), &["transactionData", "amount"]),
        &["transactionData.amount"],
    )
    .await;
    server.stop().await;
}

#[tokio::test]
async fn amounts_at_the_bounds_are_accepted() {
    let server = TestServer::start().await;
    for (amount, echoed) in [("10000", "10000"), ("10000.00", "10000"), ("0.01", "0.01"), ("9999.99", "9999.99")] {
        let response = put_text(&server, &with_amount(amount)).await;
        assert_eq!(response.status(), 201, "amount {amount}");
        let text = response.text().await.unwrap();
        assert!(text.contains(&format!(r#""amount":{echoed},"#)), "amount {amount} echoed as {echoed}: {text}");
    }
    server.stop().await;
}

#[tokio::test]
async fn exactly_one_of_transaction_type_and_direction_is_required() {
    let server = TestServer::start().await;
    let both = with(new_transaction_intent(), &["transactionData", "direction"], json!("CustomerToMerchant"));
    assert_rejected(&server, &both, &["transactionData.direction"]).await;
    let neither = without(new_transaction_intent(), &["transactionData", "type"]);
    assert_rejected(&server, &neither, &["transactionData.type"]).await;
    assert_rejected(
        &server,
        &with(new_transaction_intent(), &["transactionData", "type"], json!("Deposit")),
        &["transactionData.type"],
    )
    .await;
    assert_rejected(
        &server,
        &with(neither.clone(), &["transactionData", "direction"], json!("Sideways")),
        &["transactionData.direction"],
    )
    .await;

    let direction_only = with(neither, &["transactionData", "direction"], json!("MerchantToCustomer"));
    let session = assert_accepted(&server, &direction_only).await;
    assert_eq!(session["transactionData"]["direction"], "MerchantToCustomer");
    assert!(session["transactionData"].get("type").is_none(), "{session}");
    for kind in [
        "PassthroughDeposit",
        "PassthroughWithdrawal",
        "CustomerToMerchantTransfer",
        "CustomerToMerchantPassthrough",
        "MerchantToCustomerTransfer",
        "MerchantToCustomerPassthrough",
    ] {
        let session =
            assert_accepted(&server, &with(new_transaction_intent(), &["transactionData", "type"], json!(kind))).await;
        assert_eq!(session["transactionData"]["type"], kind);
    }
    server.stop().await;
}

#[tokio::test]
async fn a_currency_other_than_eur_is_rejected() {
    let server = TestServer::start().await;
    for currency in [json!("USD"), json!("eur"), json!(""), json!(978)] {
        let body = with(new_transaction_intent(), &["transactionData", "currency"], currency);
        assert_rejected(&server, &body, &["transactionData.currency"]).await;
    }
    assert_rejected(
        &server,
        &without(new_transaction_intent(), &["transactionData", "currency"]),
        &["transactionData.currency"],
    )
    .await;
    server.stop().await;
}

#[tokio::test]
async fn an_external_reference_of_1_to_64_printable_characters_is_accepted_and_others_are_rejected() {
    let server = TestServer::start().await;
    for bad in [json!("x".repeat(65)), json!(""), json!("line\nbreak"), json!(42)] {
        let body = with(new_transaction_intent(), &["transactionData", "externalReference"], bad);
        assert_rejected(&server, &body, &["transactionData.externalReference"]).await;
    }
    for good in ["x".repeat(64), "ü".repeat(64), "R".to_owned()] {
        let body = with(new_transaction_intent(), &["transactionData", "externalReference"], json!(good));
        let session = assert_accepted(&server, &body).await;
        assert_eq!(session["transactionData"]["externalReference"], good);
    }
    server.stop().await;
}

// ---------------------------------------------------------------------------------------------
// customerId and customerData
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn customer_id_together_with_customer_data_is_rejected() {
    let server = TestServer::start().await;
    let customer = server.customer().await;
    let body = with(
        with(new_transaction_intent(), &["customerId"], json!(customer)),
        &["customerData"],
        json!({"firstName": "Erika"}),
    );
    assert_rejected(&server, &body, &["customerData"]).await;
    assert_rejected(&server, &with(new_transaction_intent(), &["customerId"], json!("not-a-uuid")), &["customerId"])
        .await;
    server.stop().await;
}

#[tokio::test]
async fn a_phone_number_not_in_e164_is_rejected() {
    let server = TestServer::start().await;
    for bad in ["015112345678", "+49 151 12345678", "+0151123456", "+1234567890123456", "+", "4915112345678", "+49-151"]
    {
        let body = with(new_transaction_intent(), &["customerData", "phoneNumber"], json!(bad));
        assert_rejected(&server, &body, &["customerData.phoneNumber"]).await;
    }
    let good = with(new_transaction_intent(), &["customerData", "phoneNumber"], json!("+4915112345678"));
    assert_eq!(assert_accepted(&server, &good).await["customerData"]["phoneNumber"], "+4915112345678");
    server.stop().await;
}

#[tokio::test]
async fn a_date_of_birth_in_the_future_or_malformed_is_rejected() {
    let server = TestServer::start().await;
    for bad in [
        "2999-01-01",
        "1990-13-01",
        "1990-02-30",
        "28.02.1990",
        "1990-2-28",
        "1990-02-28T00:00:00Z",
        "yesterday",
        "1899-12-31",
    ] {
        let body = with(new_transaction_intent(), &["customerData", "dateOfBirth"], json!(bad));
        assert_rejected(&server, &body, &["customerData.dateOfBirth"]).await;
    }
    let good = with(new_transaction_intent(), &["customerData", "dateOfBirth"], json!("2000-02-29"));
    assert_eq!(assert_accepted(&server, &good).await["customerData"]["dateOfBirth"], "2000-02-29");
    server.stop().await;
}

#[tokio::test]
async fn a_malformed_email_is_rejected() {
    let server = TestServer::start().await;
    for bad in ["not-an-email", "erika@", "@example.com", "erika@example", "erika mustermann@example.com", "a@b@c.de"] {
        let body = with(new_transaction_intent(), &["customerData", "email"], json!(bad));
        assert_rejected(&server, &body, &["customerData.email"]).await;
    }
    let good = with(new_transaction_intent(), &["customerData", "email"], json!("erika.mustermann+shop@example.co.uk"));
    assert_accepted(&server, &good).await;
    server.stop().await;
}

#[tokio::test]
async fn names_longer_than_100_characters_or_empty_are_rejected() {
    let server = TestServer::start().await;
    let body = with(
        with(new_transaction_intent(), &["customerData", "firstName"], json!("")),
        &["customerData", "lastName"],
        json!("M".repeat(101)),
    );
    assert_rejected(&server, &body, &["customerData.firstName", "customerData.lastName"]).await;
    server.stop().await;
}

// ---------------------------------------------------------------------------------------------
// redirectData
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn redirect_urls_must_be_absolute_without_user_info_and_at_most_2048_characters() {
    let server = TestServer::start().await;
    let too_long = format!("https://merchant.example/{}", "a".repeat(2048 - 25 + 1));
    assert_eq!(too_long.len(), 2049);
    for bad in [
        "/success".to_owned(),
        "merchant.example/success".to_owned(),
        "ftp://merchant.example/success".to_owned(),
        "javascript:alert(1)".to_owned(),
        "https://user:secret@merchant.example/success".to_owned(),
        "https://user@merchant.example/success".to_owned(),
        too_long,
    ] {
        for member in ["successUrl", "failureUrl", "abortUrl", "qrCodeSuccessUrl"] {
            let body = with(new_transaction_intent(), &["redirectData", member], json!(bad));
            assert_rejected(&server, &body, &[&format!("redirectData.{member}")]).await;
        }
    }
    let longest = format!("https://merchant.example/{}", "a".repeat(2048 - 25));
    assert_eq!(longest.len(), 2048);
    let session =
        assert_accepted(&server, &with(new_transaction_intent(), &["redirectData", "successUrl"], json!(longest)))
            .await;
    assert_eq!(session["redirectData"]["successUrl"], longest, "kept exactly as sent");
    server.stop().await;
}

#[tokio::test]
async fn every_redirect_url_is_required_the_qr_code_success_url_too() {
    let server = TestServer::start().await;
    for member in ["successUrl", "failureUrl", "abortUrl", "qrCodeSuccessUrl"] {
        let missing = format!("redirectData.{member}");
        assert_rejected(&server, &without(new_transaction_intent(), &["redirectData", member]), &[&missing]).await;
        let null = with(new_transaction_intent(), &["redirectData", member], Value::Null);
        assert_rejected(&server, &null, &[&missing]).await;
    }
    // Listed together with every other failing field, on each session type.
    let body = without(
        without(new_transaction_intent(), &["redirectData", "qrCodeSuccessUrl"]),
        &["transactionData", "currency"],
    );
    assert_rejected(&server, &body, &["redirectData.qrCodeSuccessUrl", "transactionData.currency"]).await;
    let body = without(without(new_customer(), &["redirectData", "qrCodeSuccessUrl"]), &["redirectData", "abortUrl"]);
    assert_rejected(&server, &body, &["redirectData.qrCodeSuccessUrl", "redirectData.abortUrl"]).await;
    let body = with(
        without(existing_transaction_intent(), &["redirectData", "qrCodeSuccessUrl"]),
        &["transactionIntentId"],
        json!("nope"),
    );
    assert_rejected(&server, &body, &["redirectData.qrCodeSuccessUrl", "transactionIntentId"]).await;

    let session = assert_accepted(&server, &new_customer()).await;
    assert_eq!(session["redirectData"]["qrCodeSuccessUrl"], "https://m.example/q", "echoed as sent");
    server.stop().await;
}

#[tokio::test]
async fn http_redirect_urls_are_refused_unless_the_operator_allows_them() {
    let strict = TestServer::start_with(|c| c.allow_http_redirect_urls = false).await;
    let body = with(new_transaction_intent(), &["redirectData", "abortUrl"], json!("http://merchant.example/abort"));
    assert_rejected(&strict, &body, &["redirectData.abortUrl"]).await;
    strict.stop().await;

    let lenient = TestServer::start().await;
    assert_accepted(&lenient, &body).await;
    lenient.stop().await;
}

// ---------------------------------------------------------------------------------------------
// locale
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn locales_are_normalised_and_other_languages_become_de_de() {
    let server = TestServer::start().await;
    for (sent, kept) in
        [("EN-gb", "en-GB"), ("en", "en"), ("de", "de"), ("De-at", "de-AT"), ("fr", "de-DE"), ("fr-FR", "de-DE")]
    {
        let session = assert_accepted(&server, &with(new_transaction_intent(), &["locale"], json!(sent))).await;
        assert_eq!(session["locale"], kept, "{sent}");
    }
    let session = assert_accepted(&server, &without(new_transaction_intent(), &["locale"])).await;
    assert_eq!(session["locale"], "de-DE", "no locale");
    let session = assert_accepted(&server, &with(new_transaction_intent(), &["locale"], Value::Null)).await;
    assert_eq!(session["locale"], "de-DE", "null is no locale");
    server.stop().await;
}

#[tokio::test]
async fn a_locale_of_another_shape_is_a_validation_error() {
    let server = TestServer::start().await;
    for bad in
        [json!("e"), json!("eng"), json!("en_GB"), json!("en-G"), json!("en-GBR"), json!("1n"), json!(""), json!(7)]
    {
        let body = with(new_transaction_intent(), &["locale"], bad);
        assert_rejected(&server, &body, &["locale"]).await;
    }
    server.stop().await;
}

// ---------------------------------------------------------------------------------------------
// The body itself
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn malformed_json_is_a_validation_error() {
    let server = TestServer::start().await;
    for text in ["{", r#"{"type": "NewTransactionIntent",}"#, "", "{'type': 'NewCustomer'}", "\u{feff}{}"] {
        let error = assert_error(put_text(&server, text).await, 400, "Validation").await;
        assert_eq!(field_names(&error), ["body"], "{text:?}: {error}");
    }
    server.stop().await;
}

#[tokio::test]
async fn a_body_that_is_not_a_json_object_is_a_validation_error() {
    let server = TestServer::start().await;
    for text in ["[]", "[{}]", "null", "42", r#""NewCustomer""#, "true"] {
        let error = assert_error(put_text(&server, text).await, 400, "Validation").await;
        assert_eq!(field_names(&error), ["body"], "{text}: {error}");
    }
    server.stop().await;
}

// ---------------------------------------------------------------------------------------------
// The HTTP edge
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_request_without_an_api_key_is_unauthorized() {
    let server = TestServer::start().await;
    let id = server.created_session().await;
    let url = format!("{}{}", server.url, session_path(id));
    assert_error(server.client.get(&url).send().await.unwrap(), 401, "Unauthorized").await;
    assert_error(server.client.put(&url).json(&new_transaction_intent()).send().await.unwrap(), 401, "Unauthorized")
        .await;
    assert_error(server.client.post(format!("{url}/cancel")).send().await.unwrap(), 401, "Unauthorized").await;
    let list = server.client.get(format!("{}{BASE}/redirect-sessions", server.url)).send().await.unwrap();
    assert_error(list, 401, "Unauthorized").await;
    assert_error(server.client.get(&url).header("x-api-key", "").send().await.unwrap(), 401, "Unauthorized").await;
    server.stop().await;
}

#[tokio::test]
async fn a_request_with_an_unknown_api_key_is_unauthorized_and_changes_nothing() {
    let server = TestServer::start().await;
    let id = server.created_session().await;
    let url = format!("{}{}", server.url, session_path(id));
    for key in ["rsk_unknown", &format!("{}x", server.api_key), &"k".repeat(300)] {
        assert_error(server.client.get(&url).header("x-api-key", key).send().await.unwrap(), 401, "Unauthorized").await;
        let cancel = server.client.post(format!("{url}/cancel")).header("x-api-key", key).send().await.unwrap();
        assert_error(cancel, 401, "Unauthorized").await;
    }
    let (_, body) = status_and_json(server.get_session(id).await).await;
    assert_eq!(body["state"], "Created");
    server.stop().await;
}

#[tokio::test]
async fn a_disabled_merchants_key_is_unauthorized() {
    let server = TestServer::start().await;
    let id = server.created_session().await;
    redirect_sessions::admin::disable_merchant(server.store(), server.merchant_id).await.expect("disabled");
    assert_error(server.get_session(id).await, 401, "Unauthorized").await;
    assert_error(server.cancel_session(id).await, 401, "Unauthorized").await;
    assert_error(server.put_session(Uuid::new_v4(), &new_transaction_intent()).await, 401, "Unauthorized").await;
    server.stop().await;
}

#[tokio::test]
async fn a_body_without_a_json_content_type_is_unsupported_media_type() {
    let server = TestServer::start().await;
    let body = new_transaction_intent().to_string();
    for content_type in [Some("text/plain"), Some("application/xml"), Some("application/x-www-form-urlencoded"), None] {
        let id = Uuid::new_v4();
        let mut request = server.request(Method::PUT, &session_path(id)).body(body.clone());
        if let Some(content_type) = content_type {
            request = request.header("content-type", content_type);
        }
        assert_error(request.send().await.unwrap(), 415, "UnsupportedMediaType").await;
        assert_error(server.get_session(id).await, 404, "RedirectSessionNotFound").await;
    }
    let response = server
        .request(Method::PUT, &session_path(Uuid::new_v4()))
        .header("content-type", "application/json; charset=utf-8")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201, "a charset parameter is fine");
    server.stop().await;
}

#[tokio::test]
async fn a_body_over_64_kib_is_payload_too_large() {
    let server = TestServer::start().await;
    // {"type":"NewTransactionIntent","pad":"…"} padded to an exact size.
    let padded = |size: usize| {
        let head = r#"{"type":"NewTransactionIntent","pad":""#;
        let tail = r#""}"#;
        format!("{head}{}{tail}", "p".repeat(size - head.len() - tail.len()))
    };
    for request_id in [None, Some(Uuid::new_v4())] {
        let mut request = server
            .request(Method::PUT, &session_path(Uuid::new_v4()))
            .header("content-type", "application/json")
            .body(padded(64 * 1024 + 1));
        if let Some(request_id) = request_id {
            request = request.header("x-request-id", request_id.to_string());
        }
        assert_error(request.send().await.unwrap(), 413, "PayloadTooLarge").await;
    }
    // Exactly 64 KiB is read (and then refused for what it says, not for its size).
    let at_limit = put_text(&server, &padded(64 * 1024)).await;
    let error = assert_error(at_limit, 400, "Validation").await;
    assert!(field_names(&error).contains(&"pad".to_owned()), "{error}");
    server.stop().await;
}

#[tokio::test]
async fn a_cancel_body_over_64_kib_is_payload_too_large() {
    let server = TestServer::start().await;
    let id = server.created_session().await;
    let body = format!(r#"{{"pad":"{}"}}"#, "p".repeat(64 * 1024));
    let response = server
        .request(Method::POST, &format!("{}/cancel", session_path(id)))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_error(response, 413, "PayloadTooLarge").await;
    let (_, session) = status_and_json(server.get_session(id).await).await;
    assert_eq!(session["state"], "Created");
    server.stop().await;
}

/// Asserts an error answer with nothing in `details`: it is there, and `{}`.
async fn assert_bare_error(response: Response, status: u16, code: &str) -> Value {
    let error = assert_error(response, status, code).await;
    assert_eq!(error["details"], json!({}), "{error}");
    error
}

#[tokio::test]
async fn every_error_without_failing_fields_has_an_empty_details_object() {
    let server = TestServer::start().await;
    let id = server.created_session().await;
    let url = format!("{}{}", server.url, session_path(id));
    assert_bare_error(server.client.get(&url).send().await.unwrap(), 401, "Unauthorized").await;
    let wrong_key = server.client.get(&url).header("x-api-key", "rsk_unknown").send().await.unwrap();
    assert_bare_error(wrong_key, 401, "Unauthorized").await;
    for path in ["/nope".to_owned(), format!("{BASE}/redirect-sessions/{id}/open")] {
        assert_bare_error(server.request(Method::GET, &path).send().await.unwrap(), 404, "NotFound").await;
    }
    assert_bare_error(server.get_session(Uuid::new_v4()).await, 404, "RedirectSessionNotFound").await;
    assert_bare_error(server.cancel_session(Uuid::new_v4()).await, 404, "RedirectSessionNotFound").await;
    let customer = with(new_transaction_intent(), &["customerId"], json!(Uuid::new_v4()));
    assert_bare_error(server.put_session(Uuid::new_v4(), &customer).await, 404, "CustomerNotFound").await;
    let subscription = format!("{BASE}/redirect-session-events/subscriptions/{}", Uuid::new_v4());
    let response = server.request(Method::GET, &subscription).send().await.unwrap();
    assert_bare_error(response, 404, "SubscriptionNotFound").await;
    let delete = server.request(Method::DELETE, &session_path(id)).send().await.unwrap();
    assert_bare_error(delete, 405, "MethodNotAllowed").await;
    let other_body = with(new_transaction_intent(), &["locale"], json!("de"));
    assert_bare_error(server.put_session(id, &other_body).await, 409, "EntityVersionMismatch").await;
    let stale = server.request(Method::POST, &format!("{}/cancel", session_path(id))).header("if-match", "\"7\"");
    assert_bare_error(stale.send().await.unwrap(), 409, "EntityVersionMismatch").await;
    let too_large = server
        .request(Method::PUT, &session_path(Uuid::new_v4()))
        .header("content-type", "application/json")
        .body(format!(r#"{{"pad":"{}"}}"#, "p".repeat(64 * 1024)))
        .send()
        .await
        .unwrap();
    assert_bare_error(too_large, 413, "PayloadTooLarge").await;
    let not_json = server
        .request(Method::PUT, &session_path(Uuid::new_v4()))
        .header("content-type", "text/plain")
        .body(new_transaction_intent().to_string())
        .send()
        .await
        .unwrap();
    assert_bare_error(not_json, 415, "UnsupportedMediaType").await;
    let request_id = Uuid::new_v4().to_string();
    let first = server.request(Method::PUT, &session_path(Uuid::new_v4())).header("x-request-id", &request_id);
    assert_eq!(first.json(&new_transaction_intent()).send().await.unwrap().status(), 201);
    let reused = server.request(Method::PUT, &session_path(Uuid::new_v4())).header("x-request-id", &request_id);
    assert_bare_error(reused.json(&new_transaction_intent()).send().await.unwrap(), 422, "RequestIdReused").await;
    let (other_key, _) = server.another_merchant().await;
    let theirs = server.client.get(&url).header("x-api-key", &other_key).send().await.unwrap();
    assert_bare_error(theirs, 403, "InvalidTriggeredBy").await;
    let theirs = server.client.post(format!("{url}/cancel")).header("x-api-key", &other_key).send().await.unwrap();
    assert_bare_error(theirs, 400, "InvalidTriggeredBy").await;
    server.stop().await;
}

#[tokio::test]
async fn a_state_transition_error_has_an_empty_details_object_also_when_replayed() {
    let server = TestServer::start_with(|c| {
        c.session_ttl = std::time::Duration::from_secs(1);
        c.expiry_sweep = false;
    })
    .await;
    let id = server.created_session().await;
    let at = &server;
    eventually(std::time::Duration::from_secs(10), "the session to expire", move || async move {
        status_and_json(at.get_session(id).await).await.1["state"] == "Expired"
    })
    .await;
    let request_id = Uuid::new_v4().to_string();
    let cancel =
        || server.request(Method::POST, &format!("{}/cancel", session_path(id))).header("x-request-id", &request_id);
    let first = assert_bare_error(cancel().send().await.unwrap(), 400, "InvalidRedirectSessionStateTransition").await;
    let replayed = cancel().send().await.unwrap();
    assert_eq!(replayed.headers().get("idempotent-replayed").map(|v| v.to_str().unwrap()), Some("true"));
    let again = assert_bare_error(replayed, 400, "InvalidRedirectSessionStateTransition").await;
    assert_eq!(again, first, "the stored outcome, byte for byte");
    server.stop().await;
}

#[tokio::test]
async fn a_path_id_that_is_not_utf_8_is_a_validation_error_naming_the_path_parameter() {
    let server = TestServer::start().await;
    let bad = "%FF%FE";
    let get = server.request(Method::GET, &session_path(bad)).send().await.unwrap();
    assert_invalid(get, &["redirectSessionId"]).await;
    let put = server.request(Method::PUT, &session_path(bad)).json(&new_transaction_intent()).send().await.unwrap();
    assert_invalid(put, &["redirectSessionId"]).await;
    // Listed together with the body's faults, as any malformed id is.
    let body = without(new_transaction_intent(), &["redirectData", "qrCodeSuccessUrl"]);
    let put = server.request(Method::PUT, &session_path(bad)).json(&body).send().await.unwrap();
    assert_invalid(put, &["redirectSessionId", "redirectData.qrCodeSuccessUrl"]).await;
    let cancel = server.request(Method::POST, &format!("{}/cancel", session_path(bad))).send().await.unwrap();
    assert_invalid(cancel, &["redirectSessionId"]).await;
    // Without a key it is still 401 first, as JSON.
    let anonymous = server.client.get(format!("{}{}", server.url, session_path(bad))).send().await.unwrap();
    assert_bare_error(anonymous, 401, "Unauthorized").await;

    let subscription = format!("{BASE}/redirect-session-events/subscriptions/{bad}");
    let body = json!({"callbackUrl": "https://merchant.example/hook", "apiKey": "k", "eventTypes": ["nope"]});
    for method in [Method::GET, Method::DELETE] {
        assert_invalid(server.request(method, &subscription).send().await.unwrap(), &["eventSubscriptionId"]).await;
    }
    for method in [Method::PUT, Method::PATCH] {
        let response = server.request(method, &subscription).json(&body).send().await.unwrap();
        let error = assert_error(response, 400, "Validation").await;
        assert!(field_names(&error).contains(&"eventSubscriptionId".to_owned()), "{error}");
    }
    let redeliver = format!("{BASE}/redirect-session-events/deliveries/{bad}/redeliver");
    assert_invalid(server.request(Method::POST, &redeliver).send().await.unwrap(), &["deliveryId"]).await;
    server.stop().await;
}

#[tokio::test]
async fn an_x_request_id_that_is_not_a_uuid_is_a_validation_error_and_a_server_made_id_correlates() {
    let server = TestServer::start().await;
    let id = Uuid::new_v4();
    for request in [
        server.request(Method::PUT, &session_path(id)).json(&new_transaction_intent()),
        server.request(Method::GET, &session_path(id)),
        server.request(Method::POST, &format!("{}/cancel", session_path(id))),
    ] {
        let response = request.header("x-request-id", "retry-1").send().await.unwrap();
        let made = response.headers().get("x-correlation-id").map(|v| v.to_str().unwrap().to_owned());
        assert!(made.as_deref().is_some_and(|m| m.parse::<Uuid>().is_ok()), "{made:?}");
        assert_invalid(response, &["x-request-id"]).await;
    }
    assert_error(server.get_session(id).await, 404, "RedirectSessionNotFound").await;
    server.stop().await;
}

#[tokio::test]
async fn an_unknown_route_is_not_found() {
    let server = TestServer::start().await;
    for path in [
        format!("{BASE}/nothing-here"),
        "/nope".to_owned(),
        format!("{BASE}/redirect-sessions/{}/open", Uuid::new_v4()),
    ] {
        assert_error(server.request(Method::GET, &path).send().await.unwrap(), 404, "NotFound").await;
        assert_error(server.client.get(format!("{}{path}", server.url)).send().await.unwrap(), 404, "NotFound").await;
    }
    server.stop().await;
}

#[tokio::test]
async fn a_method_the_route_does_not_take_is_method_not_allowed_with_an_allow_header() {
    let server = TestServer::start().await;
    let id = Uuid::new_v4();
    for (method, path, allowed) in [
        (Method::DELETE, session_path(id), ["GET", "PUT"].as_slice()),
        (Method::PATCH, session_path(id), ["GET", "PUT"].as_slice()),
        (Method::GET, format!("{}/cancel", session_path(id)), ["POST"].as_slice()),
        (Method::POST, format!("{BASE}/redirect-sessions"), ["GET"].as_slice()),
    ] {
        let response = server.request(method.clone(), &path).send().await.unwrap();
        let allow = response.headers().get("allow").map(|v| v.to_str().unwrap().to_owned());
        assert_error(response, 405, "MethodNotAllowed").await;
        let allow = allow.unwrap_or_else(|| panic!("{method} {path}: a 405 must say what is allowed (Allow header)"));
        for each in allowed {
            assert!(allow.split(',').any(|m| m.trim() == *each), "{method} {path}: Allow {allow} lacks {each}");
        }
    }
    server.stop().await;
}

#[tokio::test]
async fn every_answer_carries_the_request_id_as_x_correlation_id() {
    let server = TestServer::start().await;
    let id = Uuid::new_v4();
    let mut requests = vec![
        (201, server.request(Method::PUT, &session_path(id)).json(&new_transaction_intent())),
        (200, server.request(Method::GET, &session_path(id))),
        (200, server.request(Method::GET, &format!("{BASE}/redirect-sessions"))),
        (200, server.request(Method::POST, &format!("{}/cancel", session_path(id)))),
        (400, server.request(Method::GET, &format!("{BASE}/redirect-sessions?limit=0"))),
        (400, server.request(Method::GET, &session_path("bad"))),
        (404, server.request(Method::GET, &session_path(Uuid::new_v4()))),
        (404, server.request(Method::GET, "/nope")),
        (405, server.request(Method::DELETE, &session_path(id))),
        (415, server.request(Method::PUT, &session_path(Uuid::new_v4())).body("{}")),
        (401, server.client.get(format!("{}{}", server.url, session_path(id)))),
    ];
    requests.push((200, server.client.get(format!("{}/health/live", server.url))));
    requests.push((200, server.client.get(format!("{}/metrics", server.url))));
    for (status, request) in requests {
        let request_id = Uuid::new_v4();
        let response = request.header("x-request-id", request_id.to_string()).send().await.unwrap();
        let url = response.url().clone();
        assert_eq!(response.status(), status, "{url}");
        let correlation = response.headers().get("x-correlation-id").map(|v| v.to_str().unwrap().to_owned());
        assert_eq!(correlation, Some(request_id.to_string()), "{url} answers {status}");
        if status >= 400 {
            let error: Value = response.json().await.unwrap();
            assert_eq!(error["correlationId"], request_id.to_string(), "{url}: {error}");
        }
    }
    let (_, session) = status_and_json(server.get_session(id).await).await;
    assert!(session["lastCorrelationId"].is_string());
    server.stop().await;
}

#[tokio::test]
async fn an_answer_to_a_request_without_a_request_id_carries_a_server_made_uuid() {
    let server = TestServer::start().await;
    let id = Uuid::new_v4();
    let created = server.put_session(id, &new_transaction_intent()).await;
    let correlation: Uuid = created.headers()["x-correlation-id"].to_str().unwrap().parse().expect("a UUID");
    let (status, session) = status_and_json(created).await;
    assert_eq!(status, 201);
    assert_eq!(session["lastCorrelationId"], correlation.to_string(), "the made id is the session's lastCorrelationId");

    let again = server.put_session(id, &new_transaction_intent()).await;
    let another: Uuid = again.headers()["x-correlation-id"].to_str().unwrap().parse().expect("a UUID");
    assert_ne!(another, correlation, "each request gets its own");

    for response in [
        server.get_session(Uuid::new_v4()).await,
        server.client.get(format!("{}/nope", server.url)).send().await.unwrap(),
        server.client.get(format!("{}{}", server.url, session_path(id))).send().await.unwrap(),
    ] {
        let made: Uuid = response.headers()["x-correlation-id"].to_str().unwrap().parse().expect("a UUID");
        let error: Value = response.json().await.unwrap();
        assert_eq!(error["correlationId"], made.to_string(), "{error}");
    }
    server.stop().await;
}

#[tokio::test]
async fn error_bodies_have_code_message_more_info_and_correlation_id_and_nothing_internal() {
    let server = TestServer::start().await;
    let response = server.get_session(Uuid::new_v4()).await;
    let error = assert_error(response, 404, "RedirectSessionNotFound").await;
    let mut keys: Vec<&str> = error.as_object().unwrap().keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(keys, ["code", "correlationId", "details", "message", "moreInfo"]);
    assert_eq!(error["details"], json!({}), "nothing applies: an empty object");
    assert_eq!(error["moreInfo"], format!("{}/docs/errors#RedirectSessionNotFound", server.url));
    assert!(error["message"].as_str().is_some_and(|m| !m.is_empty()));

    let invalid = assert_error(put_text(&server, "{").await, 400, "Validation").await;
    let text = invalid.to_string();
    for internal in ["serde", "sqlite", "postgres", "SELECT", "panicked", "src/"] {
        assert!(!text.contains(internal), "{text}");
    }
    server.stop().await;
}

// ---------------------------------------------------------------------------------------------
// List query parameters
// ---------------------------------------------------------------------------------------------

async fn list_with(server: &TestServer, query: &str) -> Response {
    server.request(Method::GET, &format!("{BASE}/redirect-sessions?{query}")).send().await.unwrap()
}

#[tokio::test]
async fn bad_list_query_parameters_are_each_named_in_one_validation_error() {
    let server = TestServer::start().await;
    let response =
        list_with(&server, "state=Nope&limit=0&colour=red&cursor=garbage!&createdFrom=yesterday&createdTo=2026").await;
    assert_invalid(response, &["state", "limit", "colour", "cursor", "createdFrom", "createdTo"]).await;
    server.stop().await;
}

#[tokio::test]
async fn each_bad_list_query_parameter_is_a_validation_error() {
    let server = TestServer::start().await;
    for (query, field) in [
        ("state=Nope", "state"),
        ("state=created", "state"),
        ("limit=0", "limit"),
        ("limit=101", "limit"),
        ("limit=-1", "limit"),
        ("limit=ten", "limit"),
        ("colour=red", "colour"),
        ("cursor=garbage!", "cursor"),
        ("cursor=", "cursor"),
        ("cursor=bm90LWEtY3Vyc29y", "cursor"),
        ("createdFrom=2026-01-31", "createdFrom"),
        ("limit=3&limit=4", "limit"),
    ] {
        let error = assert_error(list_with(&server, query).await, 400, "Validation").await;
        assert_eq!(field_names(&error), [field], "{query}: {error}");
    }
    for good in ["limit=1", "limit=100", "state=Created", "createdTo=2026-01-31T11:59:59.123Z", ""] {
        assert_eq!(list_with(&server, good).await.status(), 200, "{good}");
    }
    server.stop().await;
}
