//! The OpenAPI document, the human docs pages, health checks, and the answer to a panic.

use crate::common::*;
use redirect_sessions::error::ErrorCode;
use serde_json::{json, Value};

/// The committed OpenAPI document at the root of the repository.
fn committed_openapi() -> String {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.json");
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("the committed {path} cannot be read: {e}"))
}

async fn get(server: &TestServer, path: &str) -> reqwest::Response {
    server.client.get(format!("{}{path}", server.url)).send().await.unwrap()
}

fn content_type(response: &reqwest::Response) -> String {
    response.headers().get("content-type").map(|v| v.to_str().unwrap().to_owned()).unwrap_or_default()
}

#[tokio::test]
async fn the_served_openapi_document_is_the_committed_one_byte_for_byte() {
    let server = TestServer::start().await;
    let response = get(&server, "/openapi.json").await;
    assert_eq!(response.status(), 200);
    assert!(content_type(&response).starts_with("application/json"), "{}", content_type(&response));
    let served = response.text().await.unwrap();
    let committed = committed_openapi();
    if served != committed {
        let same_json = serde_json::from_str::<Value>(&served).ok() == serde_json::from_str::<Value>(&committed).ok();
        panic!(
            "GET /openapi.json differs from the committed openapi.json ({}); regenerate it with \
             `redirect-sessions openapi > openapi.json`",
            if same_json { "same JSON, different bytes" } else { "different content" }
        );
    }
    server.stop().await;
}

#[tokio::test]
async fn the_docs_page_is_html_mentioning_every_path_of_the_document() {
    let server = TestServer::start().await;
    let response = get(&server, "/docs").await;
    assert_eq!(response.status(), 200);
    assert!(content_type(&response).starts_with("text/html"), "{}", content_type(&response));
    let page = response.text().await.unwrap();
    assert!(page.to_ascii_lowercase().starts_with("<!doctype html>"), "{}", &page[..page.len().min(200)]);

    let (_, document) = status_and_json(get(&server, "/openapi.json").await).await;
    let paths = document["paths"].as_object().expect("the document has paths");
    assert!(!paths.is_empty());
    for path in paths.keys() {
        assert!(page.contains(path.as_str()), "/docs does not mention {path}");
    }
    for required in [
        "/customer-authentication-service/v1/redirect-sessions/{redirectSessionId}",
        "/customer-authentication-service/v1/redirect-sessions/{redirectSessionId}/cancel",
        "/.well-known/jwks.json",
        "/health/ready",
    ] {
        assert!(paths.contains_key(required), "the document lacks {required}");
    }
    server.stop().await;
}

#[tokio::test]
async fn the_errors_page_has_an_anchor_for_every_error_code() {
    let server = TestServer::start().await;
    let response = get(&server, "/docs/errors").await;
    assert_eq!(response.status(), 200);
    assert!(content_type(&response).starts_with("text/html"), "{}", content_type(&response));
    let page = response.text().await.unwrap();
    for code in ErrorCode::ALL {
        assert!(page.contains(&format!("id=\"{}\"", code.as_str())), "/docs/errors has no id=\"{code}\"");
    }
    server.stop().await;
}

#[tokio::test]
async fn an_error_links_to_its_entry_on_the_errors_page() {
    let server = TestServer::start().await;
    let body = assert_error(get(&server, "/no/such/route").await, 404, "NotFound").await;
    let more_info = body["moreInfo"].as_str().unwrap();
    assert_eq!(more_info, format!("{}/docs/errors#NotFound", server.url));
    let (page_url, anchor) = more_info.split_once('#').unwrap();
    let page = server.client.get(page_url).send().await.unwrap();
    assert_eq!(page.status(), 200);
    assert!(page.text().await.unwrap().contains(&format!("id=\"{anchor}\"")));
    server.stop().await;
}

#[tokio::test]
async fn liveness_and_readiness_answer_ok() {
    let server = TestServer::start().await;
    for path in ["/health/live", "/health/ready"] {
        let response = get(&server, path).await;
        assert!(response.headers().contains_key("x-correlation-id"), "{path}");
        let (status, body) = status_and_json(response).await;
        assert_eq!((status, body), (200, json!({"status": "ok"})), "{path}");
    }
    server.stop().await;
}

#[tokio::test]
async fn a_panic_in_a_handler_is_answered_with_the_standard_500_body() {
    let server = TestServer::start().await;
    async fn boom() -> &'static str {
        panic!("boom: secret internal detail")
    }
    let routes = axum::Router::new().route("/boom", axum::routing::get(boom));
    let app = redirect_sessions::api::with_common_layers(routes, server.state.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let task = tokio::spawn(async move { axum::serve(listener, app).await });

    let request_id = uuid::Uuid::new_v4();
    let response = server
        .client
        .get(format!("http://{address}/boom"))
        .header("x-request-id", request_id.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers().get("x-correlation-id").unwrap().to_str().unwrap(), request_id.to_string());
    assert!(content_type(&response).starts_with("application/json"), "{}", content_type(&response));
    let body = assert_error(response, 500, "GeneralErrorOccurred").await;
    let members: Vec<&str> = body.as_object().unwrap().keys().map(String::as_str).collect();
    assert_eq!(members, ["code", "message", "moreInfo", "correlationId", "details"], "{body}");
    assert_eq!(body["details"], json!({}), "nothing applies: {body}");
    assert!(!body.to_string().contains("boom"), "the cause must not be sent: {body}");
    assert!(!body.to_string().contains("secret"), "the cause must not be sent: {body}");

    // The server keeps serving after the panic.
    let again = server.client.get(format!("http://{address}/boom")).send().await.unwrap();
    assert_error(again, 500, "GeneralErrorOccurred").await;
    task.abort();
    server.stop().await;
}

/// `schema` with a `$ref` to a component replaced by that component.
fn resolve<'a>(document: &'a Value, schema: &'a Value) -> &'a Value {
    match schema["$ref"].as_str() {
        Some(reference) => {
            let name = reference.strip_prefix("#/components/schemas/").expect("a reference to a component schema");
            let target = &document["components"]["schemas"][name];
            assert!(target.is_object(), "the document has no schema {name}");
            resolve(document, target)
        }
        None => schema,
    }
}

/// A value for `schema` built from the document alone, as a generated client would send it:
/// the schema's example, else its first enum value, else the first non-null choice, else a
/// value of its type and format; an object gets its required properties only.
fn value_from_schema(document: &Value, schema: &Value) -> Value {
    let schema = resolve(document, schema);
    if let Some(example) = schema.get("example") {
        return example.clone();
    }
    if let Some(values) = schema["enum"].as_array() {
        return values.first().expect("a non-empty enum").clone();
    }
    if let Some(choices) = schema["oneOf"].as_array() {
        let choice = choices.iter().find(|c| c["type"] != "null").expect("a non-null choice");
        return value_from_schema(document, choice);
    }
    let kind = match &schema["type"] {
        Value::Array(kinds) => kinds.iter().find(|k| *k != "null").cloned().unwrap_or(Value::Null),
        kind => kind.clone(),
    };
    match kind.as_str() {
        Some("object") => {
            let mut object = serde_json::Map::new();
            for name in schema["required"].as_array().into_iter().flatten() {
                let name = name.as_str().expect("a property name");
                let property = &schema["properties"][name];
                assert!(property.is_object(), "required {name} is not among the properties: {schema}");
                object.insert(name.to_owned(), value_from_schema(document, property));
            }
            Value::Object(object)
        }
        Some("array") => json!([value_from_schema(document, &schema["items"])]),
        Some("string") => match schema["format"].as_str() {
            Some("uuid") => json!("6f1c1c4e-2d3b-4c6a-9a53-0d9e4b7c2a11"),
            Some("uri") => json!("https://merchant.example/return"),
            Some("date") => json!("1990-01-31"),
            format => panic!("no value for a string of format {format:?}: {schema}"),
        },
        Some("number") => json!(12.5),
        Some("integer") => json!(1),
        Some("boolean") => json!(true),
        _ => panic!("no value for the schema {schema}"),
    }
}

/// The JSON request-body schema of `method path` in the document.
fn request_schema<'a>(document: &'a Value, path: &str, method: &str) -> &'a Value {
    let schema = &document["paths"][path][method]["requestBody"]["content"]["application/json"]["schema"];
    assert!(schema.is_object(), "{} {path} documents no JSON request body", method.to_uppercase());
    resolve(document, schema)
}

#[tokio::test]
async fn bodies_built_from_the_documented_schemas_are_accepted() {
    let server = TestServer::start().await;
    let (_, document) = status_and_json(get(&server, "/openapi.json").await).await;

    // Every shape of the create-session body, chosen by `type`.
    let path = "/customer-authentication-service/v1/redirect-sessions/{redirectSessionId}";
    let shapes = request_schema(&document, path, "put")["oneOf"].as_array().expect("the create body is a oneOf");
    let mut types = Vec::new();
    for (n, shape) in shapes.iter().enumerate() {
        let body = value_from_schema(&document, shape);
        types.push(body["type"].as_str().expect("each shape names its type").to_owned());
        let id = uuid::Uuid::from_u128(0x1000 + n as u128);
        let response = server
            .request(reqwest::Method::PUT, &path.replace("{redirectSessionId}", &id.to_string()))
            .json(&body)
            .send()
            .await
            .unwrap();
        let (status, answer) = status_and_json(response).await;
        assert_eq!(status, 201, "the documented body {body} was answered {answer}");
        assert_eq!(answer["type"], body["type"], "{answer}");
    }
    assert_eq!(types, ["NewTransactionIntent", "ExistingTransactionIntent", "NewCustomer"]);

    // The subscription create.
    let path = "/customer-authentication-service/v1/redirect-session-events/subscriptions/{eventSubscriptionId}";
    let body = value_from_schema(&document, request_schema(&document, path, "put"));
    let id = uuid::Uuid::from_u128(0x2000);
    let response = server
        .request(reqwest::Method::PUT, &path.replace("{eventSubscriptionId}", &id.to_string()))
        .json(&body)
        .send()
        .await
        .unwrap();
    let (status, answer) = status_and_json(response).await;
    assert_eq!(status, 201, "the documented body {body} was answered {answer}");
    server.stop().await;
}

/// Whether `value` conforms to `schema` of the OpenAPI `document`, as far as the event
/// catalogue uses JSON Schema: `$ref`, `allOf`, `required`, `properties` (no member beyond
/// them), `const` and `enum`. Answers what does not conform.
fn nonconformities(document: &Value, schema: &Value, value: &Value, at: &str) -> Vec<String> {
    if let Some(reference) = schema["$ref"].as_str() {
        let name = reference.strip_prefix("#/components/schemas/").expect("a component reference");
        return nonconformities(document, &document["components"]["schemas"][name], value, at);
    }
    let mut problems = Vec::new();
    for part in schema["allOf"].as_array().into_iter().flatten() {
        problems.extend(nonconformities(document, part, value, at));
    }
    if let Some(expected) = schema.get("const") {
        if value != expected {
            problems.push(format!("{at}: {value} is not {expected}"));
        }
    }
    if let Some(allowed) = schema["enum"].as_array() {
        if !allowed.contains(value) {
            problems.push(format!("{at}: {value} is not one of {allowed:?}"));
        }
    }
    for required in schema["required"].as_array().into_iter().flatten() {
        if value.get(required.as_str().unwrap()).is_none() {
            problems.push(format!("{at}: {required} is missing"));
        }
    }
    if let Some(properties) = schema["properties"].as_object() {
        let Some(members) = value.as_object() else {
            return vec![format!("{at}: {value} is not an object")];
        };
        for (name, member) in members {
            match properties.get(name) {
                Some(property) => problems.extend(nonconformities(document, property, member, &format!("{at}.{name}"))),
                // Only a schema that lists every member may say what is extra (not a part of an allOf).
                None if schema.get("type").is_none() || schema["required"].is_array() => {
                    problems.push(format!("{at}: {name} is not in the schema"))
                }
                None => {}
            }
        }
    }
    problems
}

#[tokio::test]
async fn delivered_events_conform_to_the_event_catalogue_of_the_document() {
    use crate::webhook_support::*;
    let server = TestServer::start().await;
    let receiver = Receiver::answering(204).await;
    let (subscription, _) = subscribe(&server, &receiver.url(), &["RedirectSessionCancelled"]).await;
    let session = server.created_session().await;
    assert_eq!(server.cancel_session(session).await.status(), 200);
    receiver.wait_for_requests(1).await;
    let path = format!("{}/test", subscription_path(subscription));
    assert_eq!(server.request(reqwest::Method::POST, &path).send().await.unwrap().status(), 200);

    let document: Value = serde_json::from_str(&committed_openapi()).unwrap();
    for request in receiver.wait_for_requests(2).await {
        let event = request.json();
        let kind = event["type"].as_str().unwrap();
        let entry = &document["webhooks"][kind]["post"];
        let schema = &entry["requestBody"]["content"]["application/json"]["schema"];
        assert!(schema.is_object(), "the catalogue has no entry for {kind}");
        let problems = nonconformities(&document, schema, &event, "body");
        assert!(problems.is_empty(), "{kind}: {problems:?}\n{event}");
        // The check is not vacuous: the event with a member renamed does not conform.
        let mut renamed = event.clone();
        let data = renamed["data"].as_object_mut().unwrap();
        let (name, value) = data.iter().next().map(|(k, v)| (k.clone(), v.clone())).unwrap();
        data.remove(&name);
        data.insert(format!("{name}X"), value);
        assert!(!nonconformities(&document, schema, &renamed, "body").is_empty(), "{renamed}");
        for header in entry["parameters"].as_array().unwrap() {
            let name = header["name"].as_str().unwrap();
            assert!(!request.header(name).is_empty(), "{kind}: the catalogue names {name}, which was not sent");
        }
    }
    server.stop().await;
}

#[tokio::test]
async fn with_a_metrics_listener_the_metrics_are_served_there_alone_and_not_on_the_api_listener() {
    // A free port for the metrics listener (bound and released; nothing else takes it this fast).
    let metrics_address = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let server = TestServer::start_with(|config| config.metrics_listen = Some(metrics_address)).await;
    let metrics_url = format!("http://{metrics_address}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let scrape = loop {
        match server.client.get(format!("{metrics_url}/metrics")).send().await {
            Ok(response) => break response,
            Err(error) => assert!(std::time::Instant::now() < deadline, "the metrics listener: {error}"),
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert_eq!(scrape.status(), 200);
    assert!(scrape.text().await.unwrap().contains("redirect_sessions_created_total "));
    assert_error(get(&server, "/metrics").await, 404, "NotFound").await;
    let other = server.client.get(format!("{metrics_url}/health/live")).send().await.unwrap();
    assert_eq!(other.status(), 404, "the metrics listener serves /metrics alone");
    assert_eq!(get(&server, "/health/live").await.status(), 200);
    server.stop().await;
}
