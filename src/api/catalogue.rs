//! The event catalogue: the OpenAPI 3.1 `webhooks` section, one entry per event type with the
//! CloudEvent a receiver gets (its JSON Schema and `data`) and the headers that come with it
//! (docs/WEBHOOKS.md "What a callback looks like").

use serde_json::{json, Map, Value};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::domain::event::{EventKind, EventType};
use crate::domain::record::EventData;
use crate::domain::session::State;
use crate::domain::subscription::ALL_EVENT_TYPES;

/// A session's event as a CloudEvents 1.0 structured event (the body of a callback).
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct SessionEvent {
    /// Always `1.0`.
    #[schema(pattern = r"^1\.0$")]
    specversion: String,
    /// The event id: also `webhook-id` and `x-request-id`, the same on every attempt. Receivers
    /// de-duplicate on it.
    id: Uuid,
    /// Always `/customer-authentication-service`.
    #[schema(pattern = "^/customer-authentication-service$")]
    source: String,
    /// When the change happened.
    #[schema(value_type = String, format = DateTime)]
    time: String,
    /// Always `application/json`.
    #[schema(pattern = "^application/json$")]
    datacontenttype: String,
    #[schema(value_type = EventType)]
    r#type: String,
    data: EventData,
}

/// A test event (`POST …/subscriptions/{id}/test`) as a CloudEvents 1.0 structured event.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct TestEvent {
    #[schema(pattern = r"^1\.0$")]
    specversion: String,
    id: Uuid,
    #[schema(pattern = "^/customer-authentication-service$")]
    source: String,
    #[schema(value_type = String, format = DateTime)]
    time: String,
    #[schema(pattern = "^application/json$")]
    datacontenttype: String,
    /// Always `RedirectSessionTest`.
    #[schema(pattern = "^RedirectSessionTest$")]
    r#type: String,
    data: TestEventData,
}

/// What a test event carries: the subscription it was sent to.
#[derive(ToSchema)]
#[serde(rename_all = "camelCase")]
#[allow(dead_code)]
pub struct TestEventData {
    subscription_id: Uuid,
}

/// The headers of every callback.
fn headers() -> Value {
    let header = |name: &str, description: &str, schema: Value| json!({"name": name, "in": "header", "required": true, "description": description, "schema": schema});
    json!([
        header("x-api-key", "The subscription's `apiKey`: reject requests without it.", json!({"type": "string"})),
        header("x-request-id", "The event id.", json!({"type": "string", "format": "uuid"})),
        header("webhook-id", "The event id (Standard Webhooks).", json!({"type": "string", "format": "uuid"})),
        header(
            "webhook-timestamp",
            "Unix seconds of this attempt (Standard Webhooks); reject ones far from your clock.",
            json!({"type": "string", "pattern": "^[0-9]+$"})
        ),
        header(
            "webhook-signature",
            "`v1,<base64 HMAC-SHA256 of \"<webhook-id>.<webhook-timestamp>.<body>\">` keyed with the signing \
             secret; during a rotation's overlap two such entries, space-separated, the new secret's first.",
            json!({"type": "string", "pattern": "^v1,[A-Za-z0-9+/]+={0,2}( v1,[A-Za-z0-9+/]+={0,2})*$"})
        ),
    ])
}

/// One entry of the catalogue: the `POST` a receiver gets for `kind`.
fn entry(kind: EventKind, summary: &str, body: Value) -> Value {
    json!({"post": {
        "summary": summary,
        "description": "Sent to the subscription's `callbackUrl` (docs/WEBHOOKS.md). Any 2xx within the timeout \
                        is delivered; anything else, a timeout or a redirect is a failed attempt, retried on the \
                        schedule (a test event is never retried).",
        "operationId": kind.as_str(),
        "parameters": headers(),
        "requestBody": {"required": true, "content": {"application/json": {"schema": body}}},
        "responses": {
            "2XX": {"description": "Delivered."},
            "410": {"description": "Gone: the subscription is suspended, its deliveries held until it is resumed."},
            "default": {"description": "A failed attempt: retried (429 and 503 may send Retry-After)."}
        }
    }})
}

/// The `webhooks` section: every event type a subscription can choose, and the test event.
pub fn webhooks() -> Value {
    let mut section = Map::new();
    for event in ALL_EVENT_TYPES {
        let state = match event {
            EventType::RedirectSessionCancelled => State::Cancelled,
            EventType::RedirectSessionExpired => State::Expired,
            EventType::RedirectSessionCompleted => State::Completed,
            EventType::RedirectSessionAborted => State::Aborted,
        };
        let body = json!({"allOf": [
            {"$ref": "#/components/schemas/SessionEvent"},
            {"type": "object", "properties": {
                "type": {"const": event.as_str()},
                "data": {"type": "object", "properties": {"state": {"const": state.as_str()}}}
            }}
        ]});
        let summary = format!("A session became {}", state.as_str());
        section.insert(event.as_str().to_owned(), entry(EventKind::from(event), &summary, body));
    }
    let test = EventKind::RedirectSessionTest;
    let body = json!({"$ref": "#/components/schemas/TestEvent"});
    section.insert(test.as_str().to_owned(), entry(test, "A test event a merchant asked for", body));
    Value::Object(section)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_event_kind_has_an_entry_with_its_body_and_the_signature_headers() {
        let section = webhooks();
        let names: Vec<&str> = section.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(
            names,
            [
                "RedirectSessionCancelled",
                "RedirectSessionExpired",
                "RedirectSessionCompleted",
                "RedirectSessionAborted",
                "RedirectSessionTest"
            ]
        );
        for (name, entry) in section.as_object().unwrap() {
            let headers: Vec<&str> =
                entry["post"]["parameters"].as_array().unwrap().iter().map(|h| h["name"].as_str().unwrap()).collect();
            assert_eq!(headers, ["x-api-key", "x-request-id", "webhook-id", "webhook-timestamp", "webhook-signature"]);
            assert!(entry["post"]["requestBody"]["content"]["application/json"]["schema"].is_object(), "{name}");
        }
        let expired = &section["RedirectSessionExpired"]["post"]["requestBody"]["content"]["application/json"];
        assert_eq!(expired["schema"]["allOf"][1]["properties"]["data"]["properties"]["state"]["const"], "Expired");
    }
}
