//! Event subscriptions: the PUT/PATCH body parsed into a normalised `SubscriptionSpec`, with
//! every failing field reported at once (docs/WEBHOOKS.md).

use serde_json::Value;

use super::event::EventType;
use super::request::MAX_URL_LENGTH;
use super::validate::{self, Errors, FieldError, Object};

/// Every event type, in the order they are echoed.
pub const ALL_EVENT_TYPES: [EventType; 4] = [
    EventType::RedirectSessionCancelled,
    EventType::RedirectSessionExpired,
    EventType::RedirectSessionCompleted,
    EventType::RedirectSessionAborted,
];

/// The event types of a subscription as a set.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct EventMask(u8);

impl EventMask {
    /// The bit of one event type.
    pub fn of(event: EventType) -> Self {
        EventMask(1 << ALL_EVENT_TYPES.iter().position(|e| *e == event).expect("every type is listed"))
    }

    /// The stored form.
    pub fn bits(self) -> i64 {
        i64::from(self.0)
    }

    /// From the stored form.
    pub fn from_bits(bits: i64) -> Self {
        EventMask((bits & 0x0f) as u8)
    }

    /// Whether `event` is in the set.
    pub fn contains(self, event: EventType) -> bool {
        self.0 & EventMask::of(event).0 != 0
    }

    /// The types in the set, in `ALL_EVENT_TYPES` order.
    pub fn types(self) -> Vec<EventType> {
        ALL_EVENT_TYPES.into_iter().filter(|e| self.contains(*e)).collect()
    }
}

/// What a merchant chose for a subscription, normalised: two equal specs are the same request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubscriptionSpec {
    pub callback_url: String,
    pub api_key: String,
    pub event_types: EventMask,
}

/// Operator settings that change what a subscription may contain.
#[derive(Clone, Copy, Debug, Default)]
pub struct SubscriptionRules {
    /// `http` callback URLs and private or loopback hosts are allowed (tests, private networks).
    pub allow_private_callbacks: bool,
}

/// The longest callback `apiKey`.
pub const MAX_API_KEY: usize = 128;

/// Parses a subscription body (PUT and PATCH take the same three required fields).
pub fn parse_subscription(body: &Value, rules: SubscriptionRules) -> Result<SubscriptionSpec, Vec<FieldError>> {
    let mut errors = Errors::default();
    let Some(object) = Object::read(body, "", &["callbackUrl", "apiKey", "eventTypes"], &mut errors) else {
        return errors.finish(|| unreachable!());
    };
    let callback_url = object.required_with("callbackUrl", &mut errors, |v| callback_url(validate::string(v)?, rules));
    let api_key = object.required_with("apiKey", &mut errors, |v| api_key(validate::string(v)?));
    let event_types = object.required("eventTypes", &mut errors).and_then(|v| event_types(v, &mut errors));
    errors.finish(|| SubscriptionSpec {
        callback_url: callback_url.expect("valid"),
        api_key: api_key.expect("valid"),
        event_types: event_types.expect("valid"),
    })
}

fn event_types(value: &Value, errors: &mut Errors) -> Option<EventMask> {
    let Value::Array(items) = value else {
        errors.add("eventTypes", "must be an array of event types");
        return None;
    };
    if items.is_empty() {
        errors.add("eventTypes", "must not be empty");
        return None;
    }
    let before = errors.len();
    let mut mask = EventMask(0);
    for (index, item) in items.iter().enumerate() {
        let path = format!("eventTypes[{index}]");
        let Some(event) = item.as_str().and_then(|s| ALL_EVENT_TYPES.into_iter().find(|e| e.as_str() == s)) else {
            let names: Vec<&str> = ALL_EVENT_TYPES.iter().map(|e| e.as_str()).collect();
            errors.add(&path, format!("must be one of {}", names.join(", ")));
            continue;
        };
        if mask.contains(event) {
            errors.add(&path, "is given twice");
        }
        mask.0 |= EventMask::of(event).0;
    }
    (errors.len() == before).then_some(mask)
}

fn api_key(text: &str) -> Result<String, String> {
    let allowed = |c: char| c.is_ascii_alphanumeric() || "=+/-:_".contains(c);
    if text.is_empty() || text.len() > MAX_API_KEY || !text.chars().all(allowed) {
        return Err(format!("must be 1 to {MAX_API_KEY} characters of letters, digits and = + / - : _"));
    }
    Ok(text.to_owned())
}

/// An absolute `https` URL (or `http` when private callbacks are allowed) of at most 2048
/// characters with a host and no user-info. Without the allowance, a literal non-public IP
/// address is refused here already; host names are checked again on every connect.
pub fn callback_url(text: &str, rules: SubscriptionRules) -> Result<String, String> {
    if text.len() > MAX_URL_LENGTH {
        return Err(format!("must be at most {MAX_URL_LENGTH} characters long"));
    }
    let url = url::Url::parse(text).map_err(|_| "must be an absolute URL".to_owned())?;
    match url.scheme() {
        "https" => {}
        "http" if rules.allow_private_callbacks => {}
        _ => return Err("must be an https URL".to_owned()),
    }
    let Some(host) = url.host() else {
        return Err("must have a host".to_owned());
    };
    if !url.username().is_empty() || url.password().is_some() {
        return Err("must not contain user information".to_owned());
    }
    if !rules.allow_private_callbacks {
        let ip = match host {
            url::Host::Ipv4(ip) => Some(std::net::IpAddr::V4(ip)),
            url::Host::Ipv6(ip) => Some(std::net::IpAddr::V6(ip)),
            url::Host::Domain(_) => None,
        };
        if ip.is_some_and(|ip| !super::address::is_public(ip)) {
            return Err("must not point to a private, loopback or otherwise non-public address".to_owned());
        }
        if !super::validate::is_plain_https_url(text) {
            return Err(super::request::PLAIN_URL.to_owned());
        }
    }
    Ok(text.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn names(result: Result<SubscriptionSpec, Vec<FieldError>>) -> Vec<String> {
        result.unwrap_err().into_iter().map(|e| e.field_name).collect()
    }

    #[test]
    fn a_valid_body_becomes_a_spec_with_a_set_of_event_types() {
        let body = json!({"callbackUrl": "https://shop.example/hook", "apiKey": "k=+/-:_9",
                          "eventTypes": ["RedirectSessionExpired", "RedirectSessionCancelled"]});
        let spec = parse_subscription(&body, SubscriptionRules::default()).unwrap();
        assert_eq!(spec.event_types.types(), [EventType::RedirectSessionCancelled, EventType::RedirectSessionExpired]);
        assert_eq!(EventMask::from_bits(spec.event_types.bits()), spec.event_types);
    }

    #[test]
    fn every_failing_field_is_reported() {
        let body = json!({"callbackUrl": "http://shop.example", "apiKey": "no spaces",
                          "eventTypes": ["RedirectSessionCancelled", "Nope", "RedirectSessionCancelled"], "x": 1});
        assert_eq!(
            names(parse_subscription(&body, SubscriptionRules::default())),
            ["x", "callbackUrl", "apiKey", "eventTypes[1]", "eventTypes[2]"]
        );
        assert_eq!(
            names(parse_subscription(&json!({}), SubscriptionRules::default())),
            ["callbackUrl", "apiKey", "eventTypes"]
        );
        let empty = json!({"callbackUrl": "https://a.example", "apiKey": "k", "eventTypes": []});
        assert_eq!(names(parse_subscription(&empty, SubscriptionRules::default())), ["eventTypes"]);
    }

    #[test]
    fn private_targets_need_the_operator_allowance() {
        let strict = SubscriptionRules::default();
        let open = SubscriptionRules { allow_private_callbacks: true };
        for url in ["https://127.0.0.1/x", "https://10.0.0.1/x", "https://[::1]/x", "https://169.254.169.254/x"] {
            assert!(callback_url(url, strict).is_err(), "{url}");
            assert!(callback_url(url, open).is_ok(), "{url}");
        }
        assert!(callback_url("http://shop.example/x", strict).is_err());
        assert!(callback_url("http://shop.example/x", open).is_ok());
        assert!(callback_url("https://user:pw@shop.example/x", open).is_err());
        assert!(callback_url("ftp://shop.example/x", open).is_err());
    }

    #[test]
    fn api_keys_are_limited_to_the_documented_characters_and_length() {
        assert!(api_key(&"a".repeat(128)).is_ok());
        assert!(api_key(&"a".repeat(129)).is_err());
        assert!(api_key("").is_err());
        assert!(api_key("é").is_err());
    }
}
