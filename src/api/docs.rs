//! The OpenAPI document (generated from the handlers), the `/docs` page rendered from it, and
//! `/docs/errors`, the page every error body's `moreInfo` points into.

use axum::http::header;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde_json::Value;
use utoipa::openapi::security::{ApiKey, ApiKeyValue, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::{deliveries, health, sessions, subscriptions};
use crate::app::AppState;
use crate::error::ErrorCode;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "redirect-sessions",
        description = "Redirect sessions for payment merchants: the Customer Authentication Service contract and more.",
    ),
    paths(
        sessions::create_redirect_session,
        sessions::get_redirect_session,
        sessions::list_redirect_sessions,
        sessions::cancel_redirect_session,
        subscriptions::create_subscription,
        subscriptions::update_subscription,
        subscriptions::delete_subscription,
        subscriptions::get_subscription,
        subscriptions::list_subscriptions,
        deliveries::list_deliveries,
        deliveries::redeliver,
        health::get_live,
        health::get_ready,
        health::get_jwks,
        health::get_metrics,
    ),
    modifiers(&ApiKeyScheme),
)]
struct ApiDoc;

struct ApiKeyScheme;

impl Modify for ApiKeyScheme {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme("apiKey", SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::new("x-api-key"))));
    }
}

/// The OpenAPI document as pretty JSON with a trailing newline (the committed `openapi.json`).
pub fn openapi_json() -> String {
    let mut document = ApiDoc::openapi();
    document.info.version = env!("CARGO_PKG_VERSION").to_owned();
    let mut text = document.to_pretty_json().expect("the OpenAPI document serialises");
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
