//! Reading untrusted JSON into typed values while collecting **every** failing field, each
//! named by its dotted path (`transactionData.amount`, `eventTypes[0]`).

use serde::Serialize;
use serde_json::{Map, Value};
use utoipa::ToSchema;
use uuid::Uuid;

/// One failing field of a request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct FieldError {
    /// Dotted JSON path of the field, or the name of a path parameter, query parameter or
    /// header.
    pub field_name: String,
    /// What is wrong with it.
    pub error_message: String,
}

impl FieldError {
    /// A failing field.
    pub fn new(field_name: impl Into<String>, error_message: impl Into<String>) -> Self {
        FieldError { field_name: field_name.into(), error_message: error_message.into() }
    }
}

/// The failures collected while reading one request.
#[derive(Debug, Default)]
pub struct Errors(Vec<FieldError>);

impl Errors {
    /// Records that `path` is wrong.
    pub fn add(&mut self, path: &str, message: impl Into<String>) {
        self.0.push(FieldError::new(path, message));
    }

    /// `Ok(value)` when nothing failed, else every failure.
    pub fn finish<T>(self, value: impl FnOnce() -> T) -> Result<T, Vec<FieldError>> {
        if self.0.is_empty() {
            Ok(value())
        } else {
            Err(self.0)
        }
    }

    /// Whether nothing failed so far.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// How many failures were recorded so far.
    pub fn len(&self) -> usize {
        self.0.len()
    }
}

/// `parent.key`, or `key` at the top.
pub fn join(parent: &str, key: &str) -> String {
    if parent.is_empty() {
        key.to_owned()
    } else {
        format!("{parent}.{key}")
    }
}

/// A JSON object being read: remembers its path and reports unknown members.
pub struct Object<'v> {
    map: &'v Map<String, Value>,
    path: String,
}

impl<'v> Object<'v> {
    /// `value` as an object whose members are all in `allowed`; every other member is
    /// reported as unknown. `None` (and an error) when `value` is not an object.
    pub fn read(value: &'v Value, path: &str, allowed: &[&str], errors: &mut Errors) -> Option<Self> {
        let Value::Object(map) = value else {
            errors.add(if path.is_empty() { "body" } else { path }, "must be a JSON object");
            return None;
        };
        for key in map.keys() {
            if !allowed.contains(&key.as_str()) {
                errors.add(&join(path, key), "is not a known field");
            }
        }
        Some(Object { map, path: path.to_owned() })
    }

    /// The dotted path of member `key`.
    pub fn path_of(&self, key: &str) -> String {
        join(&self.path, key)
    }

    /// Member `key`, treating `null` as absent.
    pub fn optional(&self, key: &str) -> Option<&'v Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }

    /// Whether member `key` is present and not `null`.
    pub fn has(&self, key: &str) -> bool {
        self.optional(key).is_some()
    }

    /// Member `key`, or an "is required" error.
    pub fn required(&self, key: &str, errors: &mut Errors) -> Option<&'v Value> {
        let value = self.optional(key);
        if value.is_none() {
            errors.add(&self.path_of(key), "is required");
        }
        value
    }

    /// Optional string member `key` read by `parse`, which gives an error message.
    pub fn optional_with<T>(
        &self,
        key: &str,
        errors: &mut Errors,
        parse: impl FnOnce(&'v Value) -> Result<T, String>,
    ) -> Option<T> {
        let value = self.optional(key)?;
        match parse(value) {
            Ok(parsed) => Some(parsed),
            Err(message) => {
                errors.add(&self.path_of(key), message);
                None
            }
        }
    }

    /// Required member `key` read by `parse`.
    pub fn required_with<T>(
        &self,
        key: &str,
        errors: &mut Errors,
        parse: impl FnOnce(&'v Value) -> Result<T, String>,
    ) -> Option<T> {
        if !self.has(key) {
            errors.add(&self.path_of(key), "is required");
            return None;
        }
        self.optional_with(key, errors, parse)
    }
}

/// `value` as a string.
pub fn string(value: &Value) -> Result<&str, String> {
    value.as_str().ok_or_else(|| "must be a string".to_owned())
}

/// `value` as a UUID in its hyphenated text form.
pub fn uuid(value: &Value) -> Result<Uuid, String> {
    parse_uuid(string(value)?)
}

/// A UUID in its hyphenated 36-character form.
pub fn parse_uuid(text: &str) -> Result<Uuid, String> {
    if text.len() != 36 {
        return Err("must be a UUID".to_owned());
    }
    Uuid::try_parse(text).map_err(|_| "must be a UUID".to_owned())
}

/// A string of `min..=max` characters with no control characters.
pub fn printable(value: &Value, min: usize, max: usize) -> Result<String, String> {
    let text = string(value)?;
    let count = text.chars().count();
    if count < min || count > max {
        return Err(format!("must be {min} to {max} characters long"));
    }
    if text.chars().any(char::is_control) {
        return Err("must contain only printable characters".to_owned());
    }
    Ok(text.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn unknown_and_missing_members_are_all_reported_with_their_paths() {
        let value = json!({"a": 1, "typo": 2, "other": 3});
        let mut errors = Errors::default();
        let object = Object::read(&value, "outer", &["a", "b"], &mut errors).unwrap();
        object.required("b", &mut errors);
        let found = errors.finish(|| ()).unwrap_err();
        let names: Vec<_> = found.iter().map(|e| e.field_name.as_str()).collect();
        assert_eq!(names, ["outer.typo", "outer.other", "outer.b"]);
    }

    #[test]
    fn null_counts_as_absent() {
        let value = json!({"a": null});
        let mut errors = Errors::default();
        let object = Object::read(&value, "", &["a"], &mut errors).unwrap();
        assert!(object.optional("a").is_none());
        object.required("a", &mut errors);
        assert_eq!(errors.finish(|| ()).unwrap_err()[0].field_name, "a");
    }

    #[test]
    fn only_hyphenated_uuids_are_accepted() {
        assert!(parse_uuid("6f1b7f9e-6a8e-4d6c-9a43-3c1f7d4b2a10").is_ok());
        assert!(parse_uuid("6f1b7f9e6a8e4d6c9a433c1f7d4b2a10").is_err());
        assert!(parse_uuid("not-a-uuid").is_err());
    }
}

/// Whether `text` is an absolute `https` URL as the API documents it (openapi.json's URL
/// pattern): a host name of letters, digits and inner hyphens whose last label starts with a
/// letter (no IP literal, no user-info), an optional port up to 65535, and a path, query and
/// fragment of URL characters or `%XX` escapes.
pub fn is_plain_https_url(text: &str) -> bool {
    let Some(rest) = text.strip_prefix("https://") else {
        return false;
    };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, mut rest) = rest.split_at(end);
    let (host, port) = match authority.split_once(':') {
        Some((host, port)) => (host, Some(port)),
        None => (authority, None),
    };
    let label = |label: &str| {
        !label.is_empty()
            && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !label.starts_with('-')
            && !label.ends_with('-')
    };
    let labels: Vec<&str> = host.split('.').collect();
    let last_starts_with_letter = labels.last().is_some_and(|l| l.starts_with(|c: char| c.is_ascii_alphabetic()));
    if !labels.iter().all(|l| label(l)) || !last_starts_with_letter {
        return false;
    }
    if let Some(port) = port {
        let digits = !port.is_empty() && port.len() <= 5 && port.bytes().all(|b| b.is_ascii_digit());
        if !digits || port.parse::<u32>().map_or(true, |n| n > 65_535) {
            return false;
        }
    }
    // Characters of a path segment; a query and a fragment may also hold `/` and `?`.
    const SEGMENT: &[u8] = b"._~!$&'()*+,;=:@-";
    let escaped_or = |part: &str, extra: &[u8]| {
        let bytes = part.as_bytes();
        let mut i = 0;
        while i < bytes.len() {
            match bytes[i] {
                b'%' => {
                    let hex = |at: usize| bytes.get(at).is_some_and(u8::is_ascii_hexdigit);
                    if !(hex(i + 1) && hex(i + 2)) {
                        return false;
                    }
                    i += 3;
                }
                b if b.is_ascii_alphanumeric() || SEGMENT.contains(&b) || extra.contains(&b) => i += 1,
                _ => return false,
            }
        }
        true
    };
    if let Some(fragment_at) = rest.find('#') {
        if !escaped_or(&rest[fragment_at + 1..], b"/?") {
            return false;
        }
        rest = &rest[..fragment_at];
    }
    if let Some(query_at) = rest.find('?') {
        if !escaped_or(&rest[query_at + 1..], b"/?") {
            return false;
        }
        rest = &rest[..query_at];
    }
    // The path: `/segment` repeated (an empty path is allowed).
    escaped_or(rest, b"/")
}

#[cfg(test)]
mod url_tests {
    use super::is_plain_https_url;

    #[test]
    fn plain_https_urls_name_a_host_and_hold_only_url_characters() {
        for good in [
            "https://shop.example",
            "https://shop.example/",
            "https://xn--mnchen-3ya.example/ok?order=12&x=%20#top",
            "https://a-b.c0.shop:65535/p/a:t@h;x=1?q=/a?b#f/g?",
            "https://localhost",
        ] {
            assert!(is_plain_https_url(good), "{good}");
        }
        for bad in [
            "http://shop.example",
            "https://0.0.com*",
            "https://1.2.3.4/",
            "https://[::1]/",
            "https://user@shop.example/",
            "https://shop.example:65536/",
            "https://shop.example:/",
            "https://-shop.example/",
            "https://shop..example/",
            "https://shop.example/a b",
            "https://shop.example/%zz",
            "https://shop.example/%2",
            "https://shop.example/ä",
            "https://shop.example/#a#b",
            "HTTPS://shop.example/",
            "https://",
        ] {
            assert!(!is_plain_https_url(bad), "{bad}");
        }
    }
}
