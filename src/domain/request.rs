//! The create-session request: its three shapes, parsed from untrusted JSON into a
//! normalised `SessionSpec` with every failing field reported at once (docs/API.md).

use serde::{Deserialize, Serialize};
use serde_json::Value;
use time::macros::format_description;
use time::Date;
use utoipa::ToSchema;
use uuid::Uuid;

use super::locale::Locale;
use super::money::Amount;
use super::time::Timestamp;
use super::validate::{self, Errors, FieldError, Object};

/// Which flow the hosted page runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub enum SessionType {
    NewTransactionIntent,
    ExistingTransactionIntent,
    NewCustomer,
}

impl SessionType {
    const ALL: [SessionType; 3] =
        [SessionType::NewTransactionIntent, SessionType::ExistingTransactionIntent, SessionType::NewCustomer];

    /// The name used in JSON and in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            SessionType::NewTransactionIntent => "NewTransactionIntent",
            SessionType::ExistingTransactionIntent => "ExistingTransactionIntent",
            SessionType::NewCustomer => "NewCustomer",
        }
    }

    /// The type named `text`.
    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.as_str() == text)
    }
}

/// The kind of transaction a `NewTransactionIntent` session creates.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub enum TransactionType {
    PassthroughDeposit,
    PassthroughWithdrawal,
    CustomerToMerchantTransfer,
    CustomerToMerchantPassthrough,
    MerchantToCustomerTransfer,
    MerchantToCustomerPassthrough,
}

const TRANSACTION_TYPES: [(&str, TransactionType); 6] = [
    ("PassthroughDeposit", TransactionType::PassthroughDeposit),
    ("PassthroughWithdrawal", TransactionType::PassthroughWithdrawal),
    ("CustomerToMerchantTransfer", TransactionType::CustomerToMerchantTransfer),
    ("CustomerToMerchantPassthrough", TransactionType::CustomerToMerchantPassthrough),
    ("MerchantToCustomerTransfer", TransactionType::MerchantToCustomerTransfer),
    ("MerchantToCustomerPassthrough", TransactionType::MerchantToCustomerPassthrough),
];

/// The direction money moves, when the merchant leaves the exact type to the customer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub enum Direction {
    CustomerToMerchant,
    MerchantToCustomer,
}

/// The only currency the service handles.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub enum Currency {
    #[serde(rename = "EUR")]
    Eur,
}

impl Currency {
    /// The ISO 4217 code, as JSON and the databases write it.
    pub fn code(self) -> &'static str {
        match self {
            Currency::Eur => "EUR",
        }
    }
}

/// Data the customer agreed to share for a faster registration.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CustomerData {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    /// E.164, e.g. `+4915112345678`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phone_number: Option<String>,
    /// `YYYY-MM-DD`, in the past.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(format = Date)]
    pub date_of_birth: Option<String>,
}

/// What the customer is about to pay or receive.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schema(example = json!({"type": "PassthroughWithdrawal", "amount": 100.5, "currency": "EUR"}))]
pub struct TransactionData {
    /// Exactly one of `type` and `direction`.
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<TransactionType>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub direction: Option<Direction>,
    /// Greater than 0, at most 10000, at most two fraction digits.
    #[schema(value_type = f64, example = 100.5)]
    pub amount: Amount,
    pub currency: Currency,
    /// The merchant's own reference, 1 to 64 printable characters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external_reference: Option<String>,
}

/// Where the hosted page sends the customer's browser at the end. All four are required.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields, from = "StoredRedirectData")]
pub struct RedirectData {
    #[schema(format = "uri", example = "https://merchant.example/success")]
    pub success_url: String,
    #[schema(format = "uri", example = "https://merchant.example/failure")]
    pub failure_url: String,
    #[schema(format = "uri", example = "https://merchant.example/abort")]
    pub abort_url: String,
    /// Where to go after the customer saw a QR (payment) code.
    #[schema(format = "uri", example = "https://merchant.example/qr")]
    pub qr_code_success_url: String,
}

/// `RedirectData` as stored in a session's spec. Specs written before `qrCodeSuccessUrl`
/// became required may lack it; such a session always meant "back to `successUrl`". The
/// migrations (SQLite 6, PostgreSQL 4) fill it in; this covers a row an older instance writes
/// while a rolling upgrade is under way.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct StoredRedirectData {
    success_url: String,
    failure_url: String,
    abort_url: String,
    #[serde(default)]
    qr_code_success_url: Option<String>,
}

impl From<StoredRedirectData> for RedirectData {
    fn from(stored: StoredRedirectData) -> Self {
        RedirectData {
            qr_code_success_url: stored.qr_code_success_url.unwrap_or_else(|| stored.success_url.clone()),
            success_url: stored.success_url,
            failure_url: stored.failure_url,
            abort_url: stored.abort_url,
        }
    }
}

/// Everything the merchant chose for a session, normalised. Two requests with equal specs are
/// the same request (docs/API.md: "same values after normalisation").
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SessionSpec {
    #[serde(rename = "type")]
    pub kind: SessionType,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub customer_id: Option<Uuid>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub customer_data: Option<CustomerData>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transaction_data: Option<TransactionData>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transaction_intent_id: Option<Uuid>,
    pub redirect_data: RedirectData,
    pub locale: String,
}

/// Operator settings that change what a request may contain.
#[derive(Clone, Copy, Debug, Default)]
pub struct RequestRules {
    /// Accept `http` redirect URLs as well as `https`.
    pub allow_http_redirect_urls: bool,
}

/// The most characters a URL may have.
pub const MAX_URL_LENGTH: usize = 2048;

/// Parses a create-session body. `now` decides what "in the past" means for dates of birth.
pub fn parse_create_session(body: &Value, rules: RequestRules, now: Timestamp) -> Result<SessionSpec, Vec<FieldError>> {
    let mut errors = Errors::default();
    let Value::Object(map) = body else {
        return Err(vec![FieldError::new("body", "must be a JSON object")]);
    };
    let kind = match map.get("type").filter(|v| !v.is_null()) {
        None => return Err(vec![FieldError::new("type", "is required")]),
        Some(value) => match value.as_str().and_then(SessionType::parse) {
            Some(kind) => kind,
            None => {
                return Err(vec![FieldError::new(
                    "type",
                    "must be one of NewTransactionIntent, ExistingTransactionIntent, NewCustomer",
                )])
            }
        },
    };
    let allowed: &[&str] = match kind {
        SessionType::NewTransactionIntent => {
            &["type", "customerId", "customerData", "transactionData", "redirectData", "locale"]
        }
        SessionType::ExistingTransactionIntent => {
            &["type", "transactionIntentId", "customerId", "redirectData", "locale"]
        }
        SessionType::NewCustomer => &["type", "customerData", "redirectData", "locale"],
    };
    let Some(object) = Object::read(body, "", allowed, &mut errors) else {
        return errors.finish(|| unreachable!());
    };

    let customer_id = if allowed.contains(&"customerId") {
        object.optional_with("customerId", &mut errors, validate::uuid)
    } else {
        None
    };
    let customer_data = match object.optional("customerData") {
        Some(value) if allowed.contains(&"customerData") => {
            parse_customer_data(value, "customerData", now, &mut errors)
        }
        _ => None,
    };
    if customer_id.is_some() && customer_data.is_some() {
        errors.add("customerData", "must not be given together with customerId");
    }
    let transaction_data = match kind {
        SessionType::NewTransactionIntent => object
            .required("transactionData", &mut errors)
            .and_then(|value| parse_transaction_data(value, "transactionData", &mut errors)),
        _ => None,
    };
    let transaction_intent_id = match kind {
        SessionType::ExistingTransactionIntent => {
            object.required_with("transactionIntentId", &mut errors, validate::uuid)
        }
        _ => None,
    };
    let redirect_data = object
        .required("redirectData", &mut errors)
        .and_then(|value| parse_redirect_data(value, "redirectData", rules, &mut errors));
    let locale = object
        .optional_with("locale", &mut errors, |value| {
            Locale::parse(validate::string(value)?).ok_or_else(|| "must look like `en` or `en-GB`".to_owned())
        })
        .unwrap_or_else(Locale::default_locale);

    errors.finish(|| SessionSpec {
        kind,
        customer_id,
        customer_data,
        transaction_data,
        transaction_intent_id,
        redirect_data: redirect_data.expect("present when no error was recorded"),
        locale: locale.as_str().to_owned(),
    })
}

fn parse_customer_data(value: &Value, path: &str, now: Timestamp, errors: &mut Errors) -> Option<CustomerData> {
    let fields = ["firstName", "lastName", "email", "phoneNumber", "dateOfBirth"];
    let object = Object::read(value, path, &fields, errors)?;
    let name = |v: &Value| validate::printable(v, 1, 100);
    let before = errors.len();
    let data = CustomerData {
        first_name: object.optional_with("firstName", errors, name),
        last_name: object.optional_with("lastName", errors, name),
        email: object.optional_with("email", errors, |v| email(validate::string(v)?)),
        phone_number: object.optional_with("phoneNumber", errors, |v| e164(validate::string(v)?)),
        date_of_birth: object.optional_with("dateOfBirth", errors, |v| date_of_birth(validate::string(v)?, now)),
    };
    (errors.len() == before).then_some(data)
}

fn parse_transaction_data(value: &Value, path: &str, errors: &mut Errors) -> Option<TransactionData> {
    let fields = ["type", "direction", "amount", "currency", "externalReference"];
    let object = Object::read(value, path, &fields, errors)?;
    let kind = object.optional_with("type", errors, |v| {
        let text = validate::string(v)?;
        TRANSACTION_TYPES.iter().find(|(name, _)| *name == text).map(|(_, kind)| *kind).ok_or_else(|| {
            let names: Vec<&str> = TRANSACTION_TYPES.iter().map(|(n, _)| *n).collect();
            format!("must be one of {}", names.join(", "))
        })
    });
    let direction = object.optional_with("direction", errors, |v| match validate::string(v)? {
        "CustomerToMerchant" => Ok(Direction::CustomerToMerchant),
        "MerchantToCustomer" => Ok(Direction::MerchantToCustomer),
        _ => Err("must be one of CustomerToMerchant, MerchantToCustomer".to_owned()),
    });
    match (object.has("type"), object.has("direction")) {
        (true, true) => errors.add(&object.path_of("direction"), "must not be given together with type"),
        (false, false) => errors.add(&object.path_of("type"), "one of type and direction is required"),
        _ => {}
    }
    let amount = object.required_with("amount", errors, |v| match v {
        Value::Number(number) => number.to_string().parse::<Amount>().map_err(|e| e.to_string()),
        _ => Err("must be a number".to_owned()),
    });
    let currency = object.required_with("currency", errors, |v| match validate::string(v)? {
        "EUR" => Ok(Currency::Eur),
        _ => Err("must be EUR".to_owned()),
    });
    let external_reference = object.optional_with("externalReference", errors, |v| validate::printable(v, 1, 64));
    Some(TransactionData { kind, direction, amount: amount?, currency: currency?, external_reference })
}

fn parse_redirect_data(value: &Value, path: &str, rules: RequestRules, errors: &mut Errors) -> Option<RedirectData> {
    let fields = ["successUrl", "failureUrl", "abortUrl", "qrCodeSuccessUrl"];
    let object = Object::read(value, path, &fields, errors)?;
    let url = |v: &Value| redirect_url(validate::string(v)?, rules);
    let success_url = object.required_with("successUrl", errors, url);
    let failure_url = object.required_with("failureUrl", errors, url);
    let abort_url = object.required_with("abortUrl", errors, url);
    let qr_code_success_url = object.required_with("qrCodeSuccessUrl", errors, url);
    Some(RedirectData {
        success_url: success_url?,
        failure_url: failure_url?,
        abort_url: abort_url?,
        qr_code_success_url: qr_code_success_url?,
    })
}

/// An absolute `https` (or, when allowed, `http`) URL of at most 2048 characters with a host
/// and no user-info. Kept exactly as sent.
pub fn redirect_url(text: &str, rules: RequestRules) -> Result<String, String> {
    if text.len() > MAX_URL_LENGTH {
        return Err(format!("must be at most {MAX_URL_LENGTH} characters long"));
    }
    let url = url::Url::parse(text).map_err(|_| "must be an absolute URL".to_owned())?;
    match url.scheme() {
        "https" => {}
        "http" if rules.allow_http_redirect_urls => {}
        _ if rules.allow_http_redirect_urls => return Err("must be an http or https URL".to_owned()),
        _ => return Err("must be an https URL".to_owned()),
    }
    if url.host().is_none() {
        return Err("must have a host".to_owned());
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err("must not contain user information".to_owned());
    }
    if !rules.allow_http_redirect_urls && !super::validate::is_plain_https_url(text) {
        return Err(PLAIN_URL.to_owned());
    }
    Ok(text.to_owned())
}

/// Why an `https` URL that parses is refused all the same (docs/API.md "Conventions").
pub const PLAIN_URL: &str =
    "must name its host (letters, digits, hyphens; not an IP address) and hold only URL characters or %XX escapes";

/// A plausible e-mail address: `local@domain.tld`, no spaces, at most 254 characters.
fn email(text: &str) -> Result<String, String> {
    let invalid = || "must be a valid e-mail address".to_owned();
    if text.len() > 254 || text.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(invalid());
    }
    let (local, domain) = text.rsplit_once('@').ok_or_else(invalid)?;
    // As openapi.json's pattern says: visible ASCII before the `@`, and labels of ASCII letters,
    // digits and inner hyphens after it.
    let labels_ok = domain.split('.').count() >= 2
        && domain.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    let local_ok = local.bytes().all(|b| b.is_ascii_graphic() && b != b'@');
    if local.is_empty() || local.len() > 64 || !local_ok || !labels_ok {
        return Err(invalid());
    }
    Ok(text.to_owned())
}

/// An E.164 phone number: `+`, a non-zero digit, at most 15 digits in all.
pub fn e164(text: &str) -> Result<String, String> {
    let digits = text.strip_prefix('+').unwrap_or("");
    let ok = (2..=15).contains(&digits.len()) && digits.bytes().all(|b| b.is_ascii_digit()) && !digits.starts_with('0');
    if ok {
        Ok(text.to_owned())
    } else {
        Err("must be an E.164 phone number such as +4915112345678".to_owned())
    }
}

fn date_of_birth(text: &str, now: Timestamp) -> Result<String, String> {
    let format = format_description!("[year]-[month]-[day]");
    let date = Date::parse(text, &format).map_err(|_| "must be a date as YYYY-MM-DD".to_owned())?;
    if text.len() != 10 {
        return Err("must be a date as YYYY-MM-DD".to_owned());
    }
    let today = time::OffsetDateTime::from_unix_timestamp(now.seconds()).map(|t| t.date()).unwrap_or(Date::MIN);
    if date >= today {
        return Err("must be in the past".to_owned());
    }
    if date.year() < 1900 {
        return Err("must be after 1900-01-01".to_owned());
    }
    Ok(text.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn names(errors: Vec<FieldError>) -> Vec<String> {
        errors.into_iter().map(|e| e.field_name).collect()
    }

    #[test]
    fn every_redirect_url_is_required_and_each_missing_one_is_named() {
        let body = json!({
            "type": "NewCustomer",
            "redirectData": {"successUrl": "https://m.example/s", "abortUrl": "https://m.example/a"}
        });
        let errors = parse_create_session(&body, RequestRules::default(), Timestamp::now()).unwrap_err();
        assert_eq!(names(errors), ["redirectData.failureUrl", "redirectData.qrCodeSuccessUrl"]);
    }

    #[test]
    fn a_stored_spec_without_a_qr_code_success_url_reads_with_the_success_url() {
        let stored = r#"{"type":"NewCustomer","redirectData":{"successUrl":"https://m.example/s",
            "failureUrl":"https://m.example/f","abortUrl":"https://m.example/a"},"locale":"de-DE"}"#;
        let spec: SessionSpec = serde_json::from_str(stored).unwrap();
        assert_eq!(spec.redirect_data.qr_code_success_url, "https://m.example/s");
        let written = serde_json::to_value(&spec).unwrap();
        assert_eq!(written["redirectData"]["qrCodeSuccessUrl"], "https://m.example/s");

        let with_it = stored.replace(
            r#""abortUrl":"https://m.example/a""#,
            r#""abortUrl":"https://m.example/a","qrCodeSuccessUrl":"https://m.example/q""#,
        );
        let spec: SessionSpec = serde_json::from_str(&with_it).unwrap();
        assert_eq!(spec.redirect_data.qr_code_success_url, "https://m.example/q");

        let unknown = stored.replace(r#""abortUrl""#, r#""homeUrl":"https://m.example/h","abortUrl""#);
        assert!(serde_json::from_str::<SessionSpec>(&unknown).is_err(), "unknown fields stay errors");
    }
}
