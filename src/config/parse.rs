//! Parsers of single values (durations, URLs, keys) and the TOML forms of raw settings. Their
//! messages never repeat a secret.

use std::{fmt, net::SocketAddr, path::PathBuf, time::Duration};

use serde::{de, Deserializer};

use super::DatabaseUrl;
use crate::secrets::SecretKey;

const MAX_TOKEN_LEN: usize = 4096;
/// `metrics_listen` needs a spelling for "no separate listener" so a later layer can undo an earlier one.
pub(super) const METRICS_OFF: &str = "off";
const MAX_RETRIES: usize = 20;
const DURATION_HINT: &str = "expected a duration such as 15m, 2s or 500ms";
const DATABASE_SCHEMES: &str = "expected sqlite://PATH, sqlite:PATH, postgres://... or postgresql://...";

pub(super) fn parse_bool(text: &str) -> Result<bool, String> {
    match text.to_ascii_lowercase().as_str() {
        "true" | "1" => Ok(true),
        "false" | "0" => Ok(false),
        _ => Err("expected true, false, 1 or 0".to_owned()),
    }
}

pub(super) fn parse_listen(text: &str) -> Result<SocketAddr, String> {
    text.parse().map_err(|_| "expected an IP address and port such as 127.0.0.1:8080".to_owned())
}

const HTTP_URL_HINT: &str = "expected an absolute http(s) URL";

/// An absolute http(s) URL with a host and no user info.
fn parse_http_url(text: &str) -> Result<url::Url, String> {
    let url = url::Url::parse(text).map_err(|_| HTTP_URL_HINT.to_owned())?;
    if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
        return Err(HTTP_URL_HINT.to_owned());
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(format!("{HTTP_URL_HINT} without user info"));
    }
    Ok(url)
}

pub(super) fn parse_public_url(text: &str) -> Result<url::Url, String> {
    // Links built from it are handed to customers, so anything beyond scheme, host and path is a mistake.
    let url = parse_http_url(text)?;
    if url.query().is_some() || url.fragment().is_some() {
        return Err(format!("{HTTP_URL_HINT} without query or fragment"));
    }
    Ok(url)
}

/// The `http` one-time-code sender's endpoint: a query is allowed, a fragment (never sent) is not,
/// and credentials belong in `otp_http_token`, not in user info.
pub(super) fn parse_otp_http_url(text: &str) -> Result<url::Url, String> {
    let url = parse_http_url(text).map_err(|problem| {
        if problem.ends_with("user info") {
            format!("{problem} (give the credential as otp_http_token)")
        } else {
            problem
        }
    })?;
    if url.fragment().is_some() {
        return Err(format!("{HTTP_URL_HINT} without fragment"));
    }
    Ok(url)
}

/// A bearer token: 1 to 4096 visible ASCII characters, no spaces. The message never repeats it.
pub(super) fn check_token(text: &str) -> Result<(), String> {
    if (1..=MAX_TOKEN_LEN).contains(&text.len()) && text.bytes().all(|b| b.is_ascii_graphic()) {
        return Ok(());
    }
    Err(format!("expected 1 to {MAX_TOKEN_LEN} visible ASCII characters without spaces (value not shown)"))
}

/// Comma separated keys (`secrets_old_keys`); messages say which entry, never its value.
pub(super) fn parse_key_list(text: &str) -> Result<Vec<SecretKey>, String> {
    text.split(',')
        .enumerate()
        .map(|(index, item)| match item.trim() {
            "" => Err(format!("entry {} is empty; expected comma separated base64 keys", index + 1)),
            item => SecretKey::parse(item).map_err(|problem| format!("entry {}: {problem}", index + 1)),
        })
        .collect()
}

pub(super) fn parse_rate(text: &str) -> Result<u32, String> {
    text.parse().map_err(|_| "expected a whole number of requests per second (0 turns it off)".to_owned())
}

pub(super) fn hours(n: u64) -> Duration {
    Duration::from_secs(n * 3600)
}

pub(super) fn duration_within(text: &str, min: Duration, max: Duration, range: &str) -> Result<Duration, String> {
    let duration = parse_duration(text)?;
    if duration < min || duration > max {
        return Err(format!("expected a duration {range}"));
    }
    Ok(duration)
}

pub(super) fn parse_retry_schedule(text: &str) -> Result<Vec<Duration>, String> {
    let delays = parse_duration_list(text)?;
    if delays.len() > MAX_RETRIES {
        return Err(format!("expected at most {MAX_RETRIES} retry delays, got {}", delays.len()));
    }
    match delays.iter().position(|d| d.is_zero() || *d > hours(7 * 24)) {
        Some(i) => Err(format!("retry delay {} must be more than 0 and at most 7d", i + 1)),
        None => Ok(delays),
    }
}

/// Parses "15m", "2s", "500ms", "1h", "1h30m", "10d": units ms, s, m, h and d, compound forms
/// largest unit first. Rejects empty text, numbers without a unit such as "15", signs, fractions
/// and overflow.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let mut rest = text.trim();
    if rest.is_empty() {
        return Err(DURATION_HINT.to_owned());
    }
    let mut total = Duration::ZERO;
    let mut previous_rank = usize::MAX;
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len());
        if digits == 0 {
            return Err(DURATION_HINT.to_owned());
        }
        let (number, after) = rest.split_at(digits);
        let unit_len = after.find(|c: char| c.is_ascii_digit()).unwrap_or(after.len());
        let (unit, next) = after.split_at(unit_len);
        let number: u64 = number.parse().map_err(|_| "duration is too large")?;
        let seconds = |per: u64| number.checked_mul(per).map(Duration::from_secs);
        let (rank, part) = match unit {
            "ms" => (0, Some(Duration::from_millis(number))),
            "s" => (1, seconds(1)),
            "m" => (2, seconds(60)),
            "h" => (3, seconds(3600)),
            "d" => (4, seconds(86_400)),
            "" => return Err(format!("{DURATION_HINT} (a number needs a unit: ms, s, m, h or d)")),
            _ => return Err(DURATION_HINT.to_owned()),
        };
        // "1m1m" or "30m1h" is far more likely a typo than an intended sum.
        if rank >= previous_rank {
            return Err(format!("{DURATION_HINT} (give each unit once, largest first)"));
        }
        previous_rank = rank;
        total = part.and_then(|part| total.checked_add(part)).ok_or("duration is too large")?;
        rest = next;
    }
    Ok(total)
}

/// Parses a comma separated list of durations ("1s,2s,5s"; spaces around commas allowed).
pub fn parse_duration_list(text: &str) -> Result<Vec<Duration>, String> {
    if text.trim().is_empty() {
        return Err("expected a comma separated list of durations such as 5s,5m,30m".to_owned());
    }
    text.split(',')
        .map(|item| {
            let item = item.trim();
            if item.is_empty() {
                return Err("empty entry in the comma separated list".to_owned());
            }
            parse_duration(item).map_err(|e| format!("entry {item:?}: {e}"))
        })
        .collect()
}

/// Parses a database URL: "sqlite://PATH" or "sqlite:PATH" (relative or absolute path;
/// "sqlite::memory:" rejected), "postgres://..." or "postgresql://..." (kept as-is).
/// Anything else is an error. Messages never repeat the URL, so they cannot leak a password.
pub fn parse_database_url(text: &str) -> Result<DatabaseUrl, String> {
    // Schemes are case-insensitive; lower-casing ASCII keeps byte offsets valid for `text`.
    let lower = text.to_ascii_lowercase();
    if lower.starts_with("postgres://") || lower.starts_with("postgresql://") {
        return Ok(DatabaseUrl::Postgres(text.to_owned()));
    }
    if lower.starts_with("sqlite:") {
        let rest = &text["sqlite:".len()..];
        let path = rest.strip_prefix("//").unwrap_or(rest);
        if path.starts_with(":memory:") {
            return Err("in-memory SQLite is not supported (all data would vanish on restart); \
                 give a file such as sqlite://./data/redirect-sessions.db"
                .to_owned());
        }
        if path.is_empty() {
            return Err("the sqlite URL has no file path; expected sqlite://PATH or sqlite:PATH".to_owned());
        }
        if path.contains('?') {
            return Err("sqlite URL options after '?' are not supported; give just the file path".to_owned());
        }
        return Ok(DatabaseUrl::Sqlite { path: PathBuf::from(path) });
    }
    match text.split_once("://") {
        Some((scheme, _)) => Err(format!("unsupported scheme {scheme:?}; {DATABASE_SCHEMES}")),
        None => Err(format!("{DATABASE_SCHEMES} (a file path needs the sqlite:// prefix)")),
    }
}

/// Masks `user:password@` and `password=...` so values can be echoed in errors and logs.
pub(super) fn redact(text: &str) -> String {
    let mut out = text.to_owned();
    if let Some(scheme_end) = text.find("://") {
        let start = scheme_end + 3;
        let authority = &text[start..];
        let authority = &authority[..authority.find(['/', '?', '#']).unwrap_or(authority.len())];
        if let Some(at) = authority.rfind('@') {
            if let Some(colon) = authority[..at].find(':') {
                out = format!("{}:***{}", &text[..start + colon], &text[start + at..]);
            }
        }
    }
    let mut from = 0;
    while let Some(found) = out[from..].to_ascii_lowercase().find("password=") {
        let value_start = from + found + "password=".len();
        let value_len =
            out[value_start..].find(|c: char| c == '&' || c.is_whitespace()).unwrap_or(out.len() - value_start);
        out.replace_range(value_start..value_start + value_len, "***");
        from = value_start + 3;
    }
    out
}

/// Masks the whole user info of a URL (`user@` as well as `user:password@`): in an endpoint URL a
/// lone user name is as likely a token as a name.
pub(super) fn mask_user_info(text: &str) -> String {
    if let Some(scheme_end) = text.find("://") {
        let start = scheme_end + 3;
        let authority = &text[start..];
        let authority = &authority[..authority.find(['/', '?', '#']).unwrap_or(authority.len())];
        if let Some(at) = authority.rfind('@') {
            return format!("{}***{}", &text[..start], &text[start + at..]);
        }
    }
    text.to_owned()
}

pub(super) fn text_or_number<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<String>, D::Error> {
    struct Visitor;
    impl de::Visitor<'_> for Visitor {
        type Value = String;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a whole number")
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<String, E> {
            Ok(v.to_owned())
        }
    }
    deserializer.deserialize_any(Visitor).map(Some)
}

pub(super) fn text_or_list<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<String>, D::Error> {
    struct Visitor;
    impl<'de> de::Visitor<'de> for Visitor {
        type Value = String;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a comma separated string or an array of durations")
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<String, E> {
            Ok(v.to_owned())
        }
        fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<String, A::Error> {
            let mut items = Vec::new();
            while let Some(item) = seq.next_element::<String>()? {
                items.push(item);
            }
            Ok(items.join(","))
        }
    }
    deserializer.deserialize_any(Visitor).map(Some)
}

/// A string only; any other TOML value is refused without repeating it (serde's own message would).
pub(super) fn secret_text<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<String>, D::Error> {
    struct Visitor;
    impl de::Visitor<'_> for Visitor {
        type Value = String;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a string")
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<String, E> {
            Ok(v.to_owned())
        }
        fn visit_bool<E: de::Error>(self, _: bool) -> Result<String, E> {
            Err(E::custom("expected a string (value not shown)"))
        }
        fn visit_i64<E: de::Error>(self, _: i64) -> Result<String, E> {
            Err(E::custom("expected a string (value not shown)"))
        }
        fn visit_u64<E: de::Error>(self, _: u64) -> Result<String, E> {
            Err(E::custom("expected a string (value not shown)"))
        }
        fn visit_f64<E: de::Error>(self, _: f64) -> Result<String, E> {
            Err(E::custom("expected a string (value not shown)"))
        }
    }
    deserializer.deserialize_any(Visitor).map(Some)
}

/// A string or an array of strings (joined with commas); other values are refused without
/// repeating them.
pub(super) fn secret_text_or_list<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<String>, D::Error> {
    struct Visitor;
    impl<'de> de::Visitor<'de> for Visitor {
        type Value = String;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a comma separated string or an array of strings")
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<String, E> {
            Ok(v.to_owned())
        }
        fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<String, A::Error> {
            let mut items = Vec::new();
            while let Some(item) = seq.next_element::<SecretString>()? {
                items.push(item.0);
            }
            Ok(items.join(","))
        }
        fn visit_bool<E: de::Error>(self, _: bool) -> Result<String, E> {
            Err(E::custom("expected a string or an array of strings (value not shown)"))
        }
        fn visit_i64<E: de::Error>(self, _: i64) -> Result<String, E> {
            Err(E::custom("expected a string or an array of strings (value not shown)"))
        }
        fn visit_u64<E: de::Error>(self, _: u64) -> Result<String, E> {
            Err(E::custom("expected a string or an array of strings (value not shown)"))
        }
        fn visit_f64<E: de::Error>(self, _: f64) -> Result<String, E> {
            Err(E::custom("expected a string or an array of strings (value not shown)"))
        }
    }
    /// One element of the array: a string, refused without repeating it otherwise.
    struct SecretString(String);
    impl<'de> serde::Deserialize<'de> for SecretString {
        fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
            secret_text(deserializer).map(|text| SecretString(text.unwrap_or_default()))
        }
    }
    deserializer.deserialize_any(Visitor).map(Some)
}
