//! The one error type of the HTTP API: an explicit status and `code` per case, rendered as the
//! error body of docs/ERRORS.md. Internal causes are logged once and never sent.

use std::fmt;

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::domain::validate::FieldError;

/// Every error code the API answers with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, ToSchema)]
pub enum ErrorCode {
    Validation,
    InvalidRedirectSessionStateTransition,
    InvalidTriggeredBy,
    Unauthorized,
    RedirectSessionNotFound,
    CustomerNotFound,
    SubscriptionNotFound,
    DeliveryNotFound,
    NotFound,
    MethodNotAllowed,
    RequestTimeout,
    EntityVersionMismatch,
    RequestInProgress,
    PayloadTooLarge,
    UnsupportedMediaType,
    RequestIdReused,
    TooManyRequests,
    GeneralErrorOccurred,
    ServiceUnavailable,
}

impl ErrorCode {
    /// All codes, in the order of the table in `docs/ERRORS.md`.
    pub const ALL: [ErrorCode; 19] = [
        ErrorCode::Validation,
        ErrorCode::InvalidRedirectSessionStateTransition,
        ErrorCode::InvalidTriggeredBy,
        ErrorCode::Unauthorized,
        ErrorCode::RedirectSessionNotFound,
        ErrorCode::CustomerNotFound,
        ErrorCode::SubscriptionNotFound,
        ErrorCode::DeliveryNotFound,
        ErrorCode::NotFound,
        ErrorCode::MethodNotAllowed,
        ErrorCode::RequestTimeout,
        ErrorCode::EntityVersionMismatch,
        ErrorCode::RequestInProgress,
        ErrorCode::PayloadTooLarge,
        ErrorCode::UnsupportedMediaType,
        ErrorCode::RequestIdReused,
        ErrorCode::TooManyRequests,
        ErrorCode::GeneralErrorOccurred,
        ErrorCode::ServiceUnavailable,
    ];

    /// The code's name as it appears in error bodies.
    pub fn as_str(self) -> &'static str {
        self.doc().0
    }

    /// The usual status (InvalidTriggeredBy is 400 on cancel and 403 on reads).
    pub fn status(self) -> StatusCode {
        self.doc().1
    }

    /// What the code means and what the caller should do, for `/docs/errors`.
    pub fn explanation(self) -> &'static str {
        self.doc().2
    }

    fn doc(self) -> (&'static str, StatusCode, &'static str) {
        use ErrorCode::*;
        match self {
            Validation => ("Validation", StatusCode::BAD_REQUEST,
                "The request is malformed: invalid JSON, a wrong type, an unknown field, a missing or invalid value, or a malformed id in the path, query or headers. `details.validationErrorReasons` lists every failing field with its dotted path. Fix the request; retrying it unchanged fails again."),
            InvalidRedirectSessionStateTransition => ("InvalidRedirectSessionStateTransition", StatusCode::BAD_REQUEST,
                "The session's state does not allow this change, e.g. cancelling a session that is already Completed, Aborted or Expired. Nothing changed. Read the session to see its state."),
            InvalidTriggeredBy => ("InvalidTriggeredBy", StatusCode::FORBIDDEN,
                "The resource belongs to another merchant. Cancelling another merchant's session answers 400; reading another merchant's session or subscription answers 403. Nothing about the resource is revealed."),
            Unauthorized => ("Unauthorized", StatusCode::UNAUTHORIZED,
                "The `x-api-key` header is missing, unknown or belongs to a disabled merchant."),
            RedirectSessionNotFound => ("RedirectSessionNotFound", StatusCode::NOT_FOUND,
                "No redirect session has this id."),
            CustomerNotFound => ("CustomerNotFound", StatusCode::NOT_FOUND,
                "The `customerId` in the request is not a customer known to the service."),
            SubscriptionNotFound => ("SubscriptionNotFound", StatusCode::NOT_FOUND,
                "No event subscription has this id."),
            DeliveryNotFound => ("DeliveryNotFound", StatusCode::NOT_FOUND,
                "No webhook delivery has this id."),
            NotFound => ("NotFound", StatusCode::NOT_FOUND,
                "No such route. Check the path against the API reference at `/docs`."),
            MethodNotAllowed => ("MethodNotAllowed", StatusCode::METHOD_NOT_ALLOWED,
                "The route exists but does not take this HTTP method; the `allow` header lists the ones it takes."),
            RequestTimeout => ("RequestTimeout", StatusCode::REQUEST_TIMEOUT,
                "The request's body did not arrive completely within the server's body timeout (`http_body_timeout`, 30 s by default). Nothing was executed and the connection is closed. Retry with the same `x-request-id`."),
            EntityVersionMismatch => ("EntityVersionMismatch", StatusCode::CONFLICT,
                "The entity is not in the version the request expects: a PUT of an existing id with a different body (or an id another merchant uses), an `If-Match` that does not match the current `ETag`, or a race lost against another change of the same entity. Nothing changed. Read the entity again and decide."),
            RequestInProgress => ("RequestInProgress", StatusCode::CONFLICT,
                "A request with the same `x-request-id` is still being executed, and did not finish within the 2 s a duplicate waits for it (a duplicate that arrives while the first runs waits and gets the first's answer). Retry later with the same `x-request-id`; it is safe: the retry replays the first's answer."),
            PayloadTooLarge => ("PayloadTooLarge", StatusCode::PAYLOAD_TOO_LARGE,
                "The request body is larger than 64 KiB."),
            UnsupportedMediaType => ("UnsupportedMediaType", StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "A request with a body must send `Content-Type: application/json`."),
            RequestIdReused => ("RequestIdReused", StatusCode::UNPROCESSABLE_ENTITY,
                "The `x-request-id` was already used by this merchant for a different request (another method, path or body). Use a fresh UUID for every new request and reuse it only to retry the same request."),
            TooManyRequests => ("TooManyRequests", StatusCode::TOO_MANY_REQUESTS,
                "The rate limit for this API key or address was exceeded. Wait the seconds in `Retry-After`, then retry."),
            GeneralErrorOccurred => ("GeneralErrorOccurred", StatusCode::INTERNAL_SERVER_ERROR,
                "Something unexpected failed inside the service. It was logged with the `correlationId`; quote it when you contact support. Retrying with the same `x-request-id` is safe."),
            ServiceUnavailable => ("ServiceUnavailable", StatusCode::SERVICE_UNAVAILABLE,
                "The service cannot answer right now: its database is unreachable or not migrated. Retry after the seconds in `Retry-After` with the same `x-request-id`."),
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An error answer: status, code, message and the details that apply.
#[derive(Clone, Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: ErrorCode,
    pub message: String,
    pub validation: Vec<FieldError>,
    pub retry_after: Option<u64>,
}

impl ApiError {
    /// An error with the code's usual status.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ApiError { status: code.status(), code, message: message.into(), validation: Vec::new(), retry_after: None }
    }

    /// `400 Validation` listing every failing field.
    pub fn validation(fields: Vec<FieldError>) -> Self {
        let mut error = Self::new(ErrorCode::Validation, "The request is not valid; see validationErrorReasons.");
        error.validation = fields;
        error
    }

    /// `400 Validation` for one field.
    pub fn invalid_field(field: &str, message: &str) -> Self {
        Self::validation(vec![FieldError::new(field, message)])
    }

    /// The same error with another status (InvalidTriggeredBy on cancel is 400).
    pub fn with_status(mut self, status: StatusCode) -> Self {
        self.status = status;
        self
    }

    /// The same error telling the client when to retry.
    pub fn with_retry_after(mut self, seconds: u64) -> Self {
        self.retry_after = Some(seconds);
        self
    }

    /// `500 GeneralErrorOccurred`; the cause is logged here, once, and not sent.
    pub fn internal(cause: &dyn fmt::Display) -> Self {
        tracing::error!(error = %cause, "request failed unexpectedly");
        Self::new(ErrorCode::GeneralErrorOccurred, "An unexpected error occurred.")
    }

    /// `503 ServiceUnavailable` with `Retry-After: 1`.
    pub fn unavailable(message: &str) -> Self {
        Self::new(ErrorCode::ServiceUnavailable, message).with_retry_after(1)
    }

    /// The error body of docs/ERRORS.md as bytes.
    pub fn body(&self, correlation_id: Uuid, public_url: &str) -> Vec<u8> {
        #[derive(Serialize)]
        #[serde(rename_all = "camelCase")]
        struct Body<'a> {
            code: ErrorCode,
            message: &'a str,
            more_info: String,
            correlation_id: Uuid,
            details: Details<'a>,
        }
        // Always present; `{}` when no member applies.
        #[derive(Serialize)]
        #[serde(rename_all = "camelCase")]
        struct Details<'a> {
            #[serde(skip_serializing_if = "<[FieldError]>::is_empty")]
            validation_error_reasons: &'a [FieldError],
        }
        let body = Body {
            code: self.code,
            message: &self.message,
            more_info: format!("{public_url}/docs/errors#{}", self.code),
            correlation_id,
            details: Details { validation_error_reasons: &self.validation },
        };
        serde_json::to_vec(&body).expect("error bodies serialise")
    }

    /// The complete response.
    pub fn render(&self, correlation_id: Uuid, public_url: &str) -> Response {
        let mut response = (self.status, self.body(correlation_id, public_url)).into_response();
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if let Some(seconds) = self.retry_after {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}: {}", self.status.as_u16(), self.code, self.message)
    }
}

/// An `ApiError` waiting in a response's extensions for the correlation middleware, which
/// knows the correlation id and the public URL, to render it.
#[derive(Clone, Debug)]
pub struct PendingError(pub ApiError);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = self.status.into_response();
        response.extensions_mut().insert(PendingError(self));
        response
    }
}

/// The error body, for the OpenAPI document.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ErrorBody {
    pub code: ErrorCode,
    pub message: String,
    /// `<public-url>/docs/errors#<code>`.
    pub more_info: String,
    pub correlation_id: Uuid,
    /// Always present: `{}` when nothing applies, else only the members that apply.
    pub details: ErrorDetails,
}

/// The details that apply to an error; each member only when it applies.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ErrorDetails {
    /// `Validation` only: every failing field.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub validation_error_reasons: Vec<FieldError>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_is_explained_in_docs_errors_md() {
        let page = include_str!("../docs/ERRORS.md");
        for code in ErrorCode::ALL {
            assert!(page.contains(&format!("## {code}\n")), "{code} is missing from docs/ERRORS.md");
            assert!(page.contains(code.explanation()), "the explanation of {code} differs from docs/ERRORS.md");
        }
    }

    #[test]
    fn an_error_body_names_its_code_link_and_correlation_id() {
        let error = ApiError::invalid_field("locale", "must look like `en` or `en-GB`");
        let body: serde_json::Value = serde_json::from_slice(&error.body(Uuid::nil(), "https://pay.example")).unwrap();
        assert_eq!(
            body,
            serde_json::json!({
                "code": "Validation",
                "message": "The request is not valid; see validationErrorReasons.",
                "moreInfo": "https://pay.example/docs/errors#Validation",
                "correlationId": Uuid::nil(),
                "details": {"validationErrorReasons": [
                    {"fieldName": "locale", "errorMessage": "must look like `en` or `en-GB`"}
                ]}
            })
        );
    }

    #[test]
    fn an_error_without_details_has_an_empty_details_object() {
        for error in [
            ApiError::new(ErrorCode::NotFound, "No such route."),
            ApiError::new(ErrorCode::Unauthorized, "A valid x-api-key header is required."),
            ApiError::unavailable("later"),
            ApiError::internal(&"boom"),
        ] {
            let body: serde_json::Value =
                serde_json::from_slice(&error.body(Uuid::nil(), "https://pay.example")).unwrap();
            assert_eq!(body["details"], serde_json::json!({}), "{body}");
            let mut keys: Vec<&str> = body.as_object().unwrap().keys().map(String::as_str).collect();
            keys.sort_unstable();
            assert_eq!(keys, ["code", "correlationId", "details", "message", "moreInfo"]);
        }
    }
}
