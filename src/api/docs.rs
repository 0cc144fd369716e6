//! The OpenAPI document (generated from the handlers), the `/docs` page rendered from it, and
//! `/docs/errors`, the page every error body's `moreInfo` points into.

use std::collections::BTreeMap;

use axum::http::header;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde_json::{json, Value};
use utoipa::openapi::path::{Operation, ParameterIn};
use utoipa::openapi::schema::{AdditionalProperties, Object, ObjectBuilder, Schema, Type};
use utoipa::openapi::security::{ApiKey, ApiKeyValue, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{ContentBuilder, Ref, RefOr, ResponseBuilder, Responses};
use utoipa::{Modify, Number, OpenApi};

use super::{catalogue, health};
use crate::error::ErrorCode;
use crate::state::AppState;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "redirect-sessions",
        description = "Redirect sessions for payment merchants: the Customer Authentication Service contract and more.",
    ),
    // Every other operation comes from the routers (`api::merchant_api`, `api::public_api`).
    paths(health::get_metrics),
    components(schemas(catalogue::SessionEvent, catalogue::TestEvent)),
)]
struct ApiDoc;

struct ApiKeyScheme;

impl Modify for ApiKeyScheme {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "apiKey",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::with_description(
                "x-api-key",
                "The merchant's API key (`redirect-sessions merchant create`).",
            ))),
        );
    }
}

/// Says in the document what the handlers accept beyond what their types show (docs/API.md):
/// the API key as the `apiKey` security scheme, the `413`/`415` answers of every operation with
/// a body, the cursor's opaque format, and the body rules the server checks by hand (patterns,
/// lengths and ranges, and the fields that must not come together). `scripts/fuzz` checks the
/// server against the result.
struct ExactRules;

/// A name, a reference: 1 to `max` characters, none of them a control character.
const PRINTABLE: &str = r"^[^\u0000-\u001F\u007F-\u009F]*$";
/// `local@domain.tld`: 1 to 64 visible ASCII characters before the `@`, then two or more
/// dot-separated labels of letters, digits and inner hyphens.
const EMAIL: &str = r"^[!-?A-~]{1,64}@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?$";
/// E.164: `+`, a non-zero digit, at most 15 digits in all.
const E164: &str = r"^\+[1-9][0-9]{1,14}$";
/// A real `YYYY-MM-DD` date from 1900 to 2025 (no 29 February, so that every date the pattern
/// takes exists); the server also takes 29 February of leap years and the days after 2025 up
/// to yesterday.
const DATE_OF_BIRTH: &str = concat!(
    r"^(?:19[0-9]{2}|20[01][0-9]|202[0-5])-",
    r"(?:(?:0[13578]|1[02])-(?:0[1-9]|[12][0-9]|3[01])|(?:0[469]|11)-(?:0[1-9]|[12][0-9]|30)|02-(?:0[1-9]|1[0-9]|2[0-8]))$"
);
/// `en`, `en-GB`: a language, and maybe a region (`en` and `de` are spoken; others mean `en`).
const LOCALE: &str = r"^[A-Za-z]{2}(?:-[A-Za-z]{2})?$";
/// An absolute `https` URL with a host name (whose last label starts with a letter), no
/// user-info, and an optional port, path, query and fragment of URL characters: what
/// `domain::validate::is_plain_https_url` accepts.
const HTTPS_URL: &str = concat!(
    r"^https://(?:[A-Za-z0-9]+(?:-+[A-Za-z0-9]+)*\.)*[A-Za-z][A-Za-z0-9]*(?:-+[A-Za-z0-9]+)*",
    r"(?::(?:[0-9]{1,4}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5]))?",
    r"(?:/(?:[A-Za-z0-9._~!$&'()*+,;=:@-]|%[0-9A-Fa-f]{2})*)*",
    r"(?:\?(?:[A-Za-z0-9._~!$&'()*+,;=:@/?-]|%[0-9A-Fa-f]{2})*)?",
    r"(?:#(?:[A-Za-z0-9._~!$&'()*+,;=:@/?-]|%[0-9A-Fa-f]{2})*)?$"
);
/// The most characters of a URL (`domain::request::MAX_URL_LENGTH`).
const MAX_URL: usize = crate::domain::request::MAX_URL_LENGTH;

impl Modify for ExactRules {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        for item in openapi.paths.paths.values_mut() {
            let operations = [&mut item.get, &mut item.put, &mut item.post, &mut item.delete, &mut item.patch];
            for operation in operations.into_iter().flatten() {
                exact_operation(operation);
            }
        }
        let schemas = &mut openapi.components.as_mut().expect("the document has components").schemas;

        // The create-session body: the rules of `domain::request::parse_create_session`.
        let Some(RefOr::T(Schema::OneOf(shapes))) = schemas.get_mut("CreateRedirectSession") else {
            panic!("CreateRedirectSession is a oneOf of inline shapes");
        };
        for shape in &mut shapes.items {
            let RefOr::T(Schema::Object(shape)) = shape else { panic!("each create shape is an inline object") };
            // Each shape takes only its own fields.
            shape.additional_properties = Some(Box::new(AdditionalProperties::FreeForm(false)));
            property(shape, "locale").pattern = Some(LOCALE.to_owned());
            if shape.properties.contains_key("customerId") && shape.properties.contains_key("customerData") {
                // Either customer, never both (a `null` counts as absent).
                shape.extensions.get_or_insert_with(Default::default).insert(
                    "not".to_owned(),
                    json!({
                        "required": ["customerId", "customerData"],
                        "properties": {"customerId": {"type": "string"}, "customerData": {"type": "object"}}
                    }),
                );
            }
        }

        let data = component(schemas, "TransactionData");
        // Exactly one of `type` and `direction` (a `null` counts as absent).
        data.extensions.get_or_insert_with(Default::default).insert(
            "oneOf".to_owned(),
            json!([
                {"required": ["type"], "properties": {"type": {"type": "string"}}},
                {"required": ["direction"], "properties": {"direction": {"type": "string"}}}
            ]),
        );
        let amount = property(data, "amount");
        amount.exclusive_minimum = Some(Number::Int(0));
        amount.maximum = Some(Number::Int(10_000));
        amount.multiple_of = Some(Number::Float(0.01));
        printable(property(data, "externalReference"), 64);

        let customer = component(schemas, "CustomerData");
        printable(property(customer, "firstName"), 100);
        printable(property(customer, "lastName"), 100);
        let email = property(customer, "email");
        email.pattern = Some(EMAIL.to_owned());
        email.max_length = Some(254);
        property(customer, "phoneNumber").pattern = Some(E164.to_owned());
        property(customer, "dateOfBirth").pattern = Some(DATE_OF_BIRTH.to_owned());

        let urls = component(schemas, "RedirectData");
        for name in ["successUrl", "failureUrl", "abortUrl", "qrCodeSuccessUrl"] {
            https_url(property(urls, name));
        }
        https_url(property(component(schemas, "SubscriptionBody"), "callbackUrl"));
    }
}

/// The security requirement instead of an `x-api-key` parameter, the cursor's format, and the
/// answers to a body that is too large or not JSON.
fn exact_operation(operation: &mut Operation) {
    if let Some(parameters) = operation.parameters.as_mut() {
        let before = parameters.len();
        parameters.retain(|p| !(p.parameter_in == ParameterIn::Header && p.name == "x-api-key"));
        if parameters.len() < before {
            operation.security = Some(vec![SecurityRequirement::new("apiKey", Vec::<String>::new())]);
            // The per-key rate limit (`rate_limit_per_key`) applies to every merchant route.
            error_response(&mut operation.responses, "429", ErrorCode::TooManyRequests);
        }
        for parameter in parameters.iter_mut() {
            if parameter.parameter_in == ParameterIn::Query && parameter.name == "cursor" {
                // `extract::encode_cursor`: unpadded base64url of `<created ms>:<id>`, 51 to 76
                // characters. Only cursors the service gave out decode; others are `400`.
                parameter.description = Some(
                    "`nextCursor` of the previous page, unchanged: opaque, unpadded base64url. \
                     A cursor the service did not give out is `400 Validation`."
                        .to_owned(),
                );
                parameter.schema = Some(RefOr::T(Schema::Object(
                    ObjectBuilder::new()
                        .schema_type(Type::String)
                        .pattern(Some("^[A-Za-z0-9_-]+$"))
                        .min_length(Some(51))
                        .max_length(Some(76))
                        .build(),
                )));
            }
        }
    }
    if operation.request_body.is_some() {
        error_response(&mut operation.responses, "413", ErrorCode::PayloadTooLarge);
        error_response(&mut operation.responses, "415", ErrorCode::UnsupportedMediaType);
    }
}

/// The answer `status` with the error body of `code`, unless the operation documents it already.
fn error_response(responses: &mut Responses, status: &str, code: ErrorCode) {
    responses.responses.entry(status.to_owned()).or_insert_with(|| {
        let body = ContentBuilder::new().schema(Some(Ref::from_schema_name("ErrorBody"))).build();
        RefOr::T(ResponseBuilder::new().description(code.as_str()).content("application/json", body).build())
    });
}

/// The component schema `name`, an object. The document is generated (and tested) at build
/// time, so a schema renamed in the handlers stops the tests here instead of losing a rule.
fn component<'a>(schemas: &'a mut BTreeMap<String, RefOr<Schema>>, name: &str) -> &'a mut Object {
    match schemas.get_mut(name) {
        Some(RefOr::T(Schema::Object(object))) => object,
        _ => panic!("the document has no object schema {name}"),
    }
}

/// The inline schema of `object`'s property `name`.
fn property<'a>(object: &'a mut Object, name: &str) -> &'a mut Object {
    match object.properties.get_mut(name) {
        Some(RefOr::T(Schema::Object(property))) => property,
        _ => panic!("the schema has no inline property {name}"),
    }
}

fn printable(text: &mut Object, max: usize) {
    text.pattern = Some(PRINTABLE.to_owned());
    text.min_length = Some(1);
    text.max_length = Some(max);
}

fn https_url(url: &mut Object) {
    url.pattern = Some(HTTPS_URL.to_owned());
    url.max_length = Some(MAX_URL);
}

/// The OpenAPI document as pretty JSON with a trailing newline (the committed `openapi.json`),
/// with the event catalogue as its `webhooks` section (which utoipa does not model).
pub fn openapi_json() -> String {
    let mut document = ApiDoc::openapi();
    for routes in [super::merchant_api(), super::public_api()] {
        document.merge(routes.split_for_parts().1);
    }
    ApiKeyScheme.modify(&mut document);
    ExactRules.modify(&mut document);
    document.info.version = env!("CARGO_PKG_VERSION").to_owned();
    let mut document = serde_json::to_value(document).expect("the OpenAPI document serialises");
    document["webhooks"] = catalogue::webhooks();
    let mut text = serde_json::to_string_pretty(&document).expect("JSON serialises");
    text.push('\n');
    text
}

/// The routes of this module.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/openapi.json", get(get_openapi))
        .route("/docs", get(get_docs))
        .route("/docs/errors", get(get_errors))
}

async fn get_openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], openapi_json()).into_response()
}

async fn get_docs() -> Html<String> {
    let document: Value = serde_json::from_str(&openapi_json()).unwrap_or(Value::Null);
    let mut body = String::from(
        "<h1>redirect-sessions API</h1><p>The machine-readable document is at \
         <a href=\"/openapi.json\">/openapi.json</a>; error codes are explained at \
         <a href=\"/docs/errors\">/docs/errors</a>. Merchant endpoints need the \
         <code>x-api-key</code> header.</p>",
    );
    if let Some(paths) = document["paths"].as_object() {
        for (path, operations) in paths {
            for (method, operation) in operations.as_object().into_iter().flatten() {
                body.push_str(&format!(
                    "<section><h2><code>{} {}</code></h2><p>{}</p>",
                    method.to_uppercase(),
                    escape(path),
                    escape(operation["summary"].as_str().unwrap_or(""))
                ));
                if let Some(parameters) = operation["parameters"].as_array() {
                    body.push_str("<h3>Parameters</h3><ul>");
                    for parameter in parameters {
                        body.push_str(&format!(
                            "<li><code>{}</code> ({}{}) {}</li>",
                            escape(parameter["name"].as_str().unwrap_or("")),
                            escape(parameter["in"].as_str().unwrap_or("")),
                            if parameter["required"] == true { ", required" } else { "" },
                            escape(parameter["description"].as_str().unwrap_or(""))
                        ));
                    }
                    body.push_str("</ul>");
                }
                if let Some(responses) = operation["responses"].as_object() {
                    body.push_str("<h3>Responses</h3><ul>");
                    for (status, response) in responses {
                        body.push_str(&format!(
                            "<li><strong>{}</strong> {}</li>",
                            escape(status),
                            escape(response["description"].as_str().unwrap_or(""))
                        ));
                    }
                    body.push_str("</ul>");
                }
                body.push_str("</section>");
            }
        }
    }
    Html(page("redirect-sessions API", &body))
}

async fn get_errors() -> Html<String> {
    let mut body = String::from(
        "<h1>Error codes</h1><p>Every error answer has the body \
         <code>{\"code\", \"message\", \"moreInfo\", \"correlationId\", \"details\"}</code>. \
         Quote the <code>correlationId</code> when you contact support.</p>",
    );
    for code in ErrorCode::ALL {
        body.push_str(&format!(
            "<section id=\"{code}\"><h2><code>{code}</code> <small>HTTP {}</small></h2><p>{}</p></section>",
            code.status().as_u16(),
            escape(code.explanation())
        ));
    }
    Html(page("Error codes", &body))
}

fn page(title: &str, body: &str) -> String {
    format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{title}</title>\
         <style>body{{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;line-height:1.5}}\
         code{{background:#f3f3f3;padding:0 .2rem}}section{{border-top:1px solid #ddd}}</style></head>\
         <body>{body}</body></html>"
    )
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}
