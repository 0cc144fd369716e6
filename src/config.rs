//! Settings: defaults, then a TOML file, then REDIRECT_SESSIONS_* environment variables, then flags.
//!
//! Every layer only says which raw text (or boolean) it sets; parsing happens once, after layering,
//! so that an error can name the exact setting and the layer that supplied the bad value.

use std::{
    collections::HashMap,
    fmt,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{de, Deserializer};

use crate::secrets::SecretKey;

const ENV_PREFIX: &str = "REDIRECT_SESSIONS_";
const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
const DEFAULT_DATABASE_URL: &str = "sqlite://./data/redirect-sessions.db";
const DEFAULT_SESSION_TTL: &str = "15m";
const DEFAULT_RETRY_SCHEDULE: &str = "5s,5m,30m,2h,5h,10h,10h";
const DEFAULT_WEBHOOK_TIMEOUT: &str = "10s";
const DEFAULT_WEBHOOK_CONCURRENCY: &str = "256";
const DEFAULT_WEBHOOK_CONCURRENCY_PER_SUBSCRIPTION: &str = "16";
const DEFAULT_DELIVERY_RETENTION: &str = "30d";
const DEFAULT_WEBHOOK_SUSPEND_AFTER: &str = "5d";
const DEFAULT_RATE_LIMIT_PER_KEY: &str = "1000";
const DEFAULT_RATE_LIMIT_PER_IP: &str = "0";
const DEFAULT_LOG: &str = "info";
const DEFAULT_OTP_SENDER: &str = "log";
const DEFAULT_HTTP_HEADER_TIMEOUT: &str = "10s";
const DEFAULT_HTTP_BODY_TIMEOUT: &str = "30s";
const DEFAULT_HTTP_MAX_CONNECTIONS: &str = "10000";
const MAX_TOKEN_LEN: usize = 4096;
/// `metrics_listen` needs a spelling for "no separate listener" so a later layer can undo an earlier one.
const METRICS_OFF: &str = "off";
const MAX_RETRIES: usize = 20;
const DURATION_HINT: &str = "expected a duration such as 15m, 2s or 500ms";
const DATABASE_SCHEMES: &str = "expected sqlite://PATH, sqlite:PATH, postgres://... or postgresql://...";

/// Raw, unparsed values of every setting, as one layer gives them. All fields optional.
#[derive(Clone, Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)] // for the TOML file
pub struct RawSettings {
    pub listen: Option<String>,
    pub database_url: Option<String>,
    /// The file may also give a TOML integer.
    #[serde(default, deserialize_with = "text_or_number")]
    pub database_max_connections: Option<String>,
    pub database_acquire_timeout: Option<String>,
    pub database_connect_timeout: Option<String>,
    pub public_url: Option<String>,
    pub session_ttl: Option<String>,
    /// The file may also give a TOML array of durations.
    #[serde(default, deserialize_with = "text_or_list")]
    pub webhook_retry_schedule: Option<String>,
    pub webhook_timeout: Option<String>,
    /// The file may also give a TOML integer.
    #[serde(default, deserialize_with = "text_or_number")]
    pub webhook_concurrency: Option<String>,
    /// The file may also give a TOML integer.
    #[serde(default, deserialize_with = "text_or_number")]
    pub webhook_concurrency_per_subscription: Option<String>,
    pub delivery_retention: Option<String>,
    pub webhook_suspend_after: Option<String>,
    pub allow_private_callbacks: Option<bool>,
    pub allow_http_redirect_urls: Option<bool>,
    /// The file may also give a TOML integer.
    #[serde(default, deserialize_with = "text_or_number")]
    pub rate_limit_per_key: Option<String>,
    /// The file may also give a TOML integer.
    #[serde(default, deserialize_with = "text_or_number")]
    pub rate_limit_per_ip: Option<String>,
    pub metrics_listen: Option<String>,
    pub http_header_timeout: Option<String>,
    pub http_body_timeout: Option<String>,
    /// The file may also give a TOML integer.
    #[serde(default, deserialize_with = "text_or_number")]
    pub http_max_connections: Option<String>,
    pub expiry_sweep: Option<bool>,
    pub webhook_dispatcher: Option<bool>,
    pub log: Option<String>,
    pub otp_sender: Option<String>,
    pub otp_http_url: Option<String>,
    /// A secret: errors about it never echo it, and the file must give it as a string.
    #[serde(default, deserialize_with = "secret_text")]
    pub otp_http_token: Option<String>,
    /// A secret (base64 of 32 bytes); the file must give it as a string.
    #[serde(default, deserialize_with = "secret_text")]
    pub secrets_key: Option<String>,
    /// Secrets, comma separated; the file may also give a TOML array of strings.
    #[serde(default, deserialize_with = "secret_text_or_list")]
    pub secrets_old_keys: Option<String>,
}

/// Where the data lives.
#[derive(Clone, PartialEq, Eq)]
pub enum DatabaseUrl {
    /// A SQLite file, relative to the working directory unless absolute.
    Sqlite { path: PathBuf },
    /// A PostgreSQL connection URL, kept exactly as given.
    Postgres(String),
}

// Hand-written so that logging a `Config` with `{:?}` never prints a database password.
impl fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DatabaseUrl::Sqlite { path } => f.debug_struct("Sqlite").field("path", path).finish(),
            DatabaseUrl::Postgres(url) => f.debug_tuple("Postgres").field(&redact(url)).finish(),
        }
    }
}

/// How one-time codes reach customers (`otp_sender`, docs/OPERATIONS.md).
#[derive(Clone, PartialEq, Eq)]
pub enum OtpSender {
    /// One log line per code, for development.
    Log,
    /// `POST` to `url`, with `Authorization: Bearer <token>` when a token is set.
    Http { url: url::Url, token: Option<String> },
}

// Hand-written so that logging a `Config` with `{:?}` never prints the bearer token.
impl fmt::Debug for OtpSender {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OtpSender::Log => f.write_str("Log"),
            OtpSender::Http { url, token } => f
                .debug_struct("Http")
                .field("url", &url.as_str())
                .field("token", &token.as_ref().map(|_| "<redacted>"))
                .finish(),
        }
    }
}

/// Every setting, parsed.
#[derive(Clone, Debug)]
pub struct Config {
    /// Main HTTP listener; default 127.0.0.1:8080.
    pub listen: SocketAddr,
    /// Default: the SQLite file ./data/redirect-sessions.db.
    pub database_url: DatabaseUrl,
    /// PostgreSQL connections per instance, 1 to 1000; default 16.
    pub database_max_connections: usize,
    /// How long a request waits for a free PostgreSQL connection; default 5s.
    pub database_acquire_timeout: Duration,
    /// How long opening a PostgreSQL connection may take; default 5s.
    pub database_connect_timeout: Duration,
    /// Absolute http(s) URL without query, fragment or user info; default `http://<listen>`.
    pub public_url: url::Url,
    /// Between 1s and 24h; default 15m.
    pub session_ttl: Duration,
    /// 1 to 20 delays, each more than 0 and at most 7 days; default 5s,5m,30m,2h,5h,10h,10h.
    pub webhook_retry_schedule: Vec<Duration>,
    /// More than 0 and at most 5m; default 10s.
    pub webhook_timeout: Duration,
    /// Webhook attempts in flight per instance, 1 to 10000; default 256.
    pub webhook_concurrency: usize,
    /// Webhook attempts in flight per subscription (leases it may hold), 1 to 10000; default 16.
    pub webhook_concurrency_per_subscription: usize,
    /// How long finished deliveries, their attempts and events are kept, 1h to 3650d; default 30d.
    pub delivery_retention: Duration,
    /// How long a receiver may answer nothing but failures before its subscription is
    /// suspended, 1m to 90d; default 5d.
    pub webhook_suspend_after: Duration,
    /// Default false.
    pub allow_private_callbacks: bool,
    /// Default false.
    pub allow_http_redirect_urls: bool,
    /// Requests per second per API key, 0 = off; default 1000.
    pub rate_limit_per_key: u32,
    /// Requests per second per client IP, 0 = off; default 0.
    pub rate_limit_per_ip: u32,
    /// Separate metrics listener; default None (metrics served on the main listener).
    pub metrics_listen: Option<SocketAddr>,
    /// How long a client may take to send a request's headers (also the idle time allowed between
    /// requests on a kept-alive connection), 100ms to 5m; default 10s.
    pub http_header_timeout: Duration,
    /// How long a client may take to send a request's whole body, 100ms to 10m; default 30s.
    pub http_body_timeout: Duration,
    /// Connections open at once per listener, 1 to 1000000; default 10000.
    pub http_max_connections: usize,
    /// Default true.
    pub expiry_sweep: bool,
    /// Default true.
    pub webhook_dispatcher: bool,
    /// Log filter, passed through as-is; default "info".
    pub log: String,
    /// `log` (default) or `http` with its URL and optional bearer token; Debug hides the token.
    pub otp_sender: OtpSender,
    /// The key that encrypts secrets at rest (`crate::secrets`); required with PostgreSQL, on
    /// SQLite a key file beside the database when not set. Debug shows only its id.
    pub secrets_key: Option<SecretKey>,
    /// Earlier keys that still decrypt (for rotation); default none.
    pub secrets_old_keys: Vec<SecretKey>,
}

/// A bad setting; its Display is one line naming the setting and where it came from.
#[derive(Debug)]
pub struct ConfigError(pub String);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

impl Config {
    /// Layers defaults < file < env < flags and parses the result.
    pub fn load(
        file: Option<&Path>,
        env: &HashMap<String, String>,
        flags: &RawSettings,
    ) -> Result<Config, ConfigError> {
        let mut layers = Vec::new();
        if let Some(path) = file {
            layers.push((read_file(path)?, Origin::File(path.to_path_buf())));
        }
        let plain = RawSettings { database_url: env_text(env, "DATABASE_URL"), ..RawSettings::default() };
        layers.push((plain, Origin::PlainEnv));
        layers.push((env_layer(env)?, Origin::Env));
        layers.push((flags.clone(), Origin::Flag));
        Layers(layers).resolve()
    }

    /// Just the defaults (used by tests of other modules).
    pub fn defaults() -> Config {
        Layers(Vec::new()).resolve().expect("built-in defaults are valid")
    }

    /// The public URL without a trailing '/', ready to have paths appended.
    pub fn public_base(&self) -> String {
        self.public_url.as_str().trim_end_matches('/').to_owned()
    }
}

/// The layer a value came from, which decides how an error names the setting.
#[derive(Clone, Debug)]
enum Origin {
    Default,
    File(PathBuf),
    /// `REDIRECT_SESSIONS_<FIELD>`.
    Env,
    /// `<FIELD>` without the prefix; only `DATABASE_URL`, the name other tools already use.
    PlainEnv,
    Flag,
}

impl Origin {
    fn error(&self, field: &str, value: &str, problem: &str) -> ConfigError {
        // Debug quoting escapes newlines, which keeps the message on one line.
        let shown = format!("{:?}", redact(value));
        let upper = field.to_ascii_uppercase();
        ConfigError(match self {
            Origin::Default => format!("invalid built-in default {field} {shown}: {problem}"),
            Origin::File(path) => format!("invalid setting {field} = {shown} in {}: {problem}", path.display()),
            Origin::Env => format!("invalid {ENV_PREFIX}{upper} {shown}: {problem}"),
            Origin::PlainEnv => format!("invalid {upper} {shown}: {problem}"),
            Origin::Flag => format!("invalid --{} {shown}: {problem}", field.replace('_', "-")),
        })
    }

    /// Like `error`, for a secret: names the setting and its layer but never the value.
    fn secret_error(&self, field: &str, problem: &str) -> ConfigError {
        let upper = field.to_ascii_uppercase();
        ConfigError(match self {
            Origin::Default => format!("invalid built-in default {field}: {problem}"),
            Origin::File(path) => format!("invalid setting {field} in {}: {problem}", path.display()),
            Origin::Env => format!("invalid {ENV_PREFIX}{upper}: {problem}"),
            Origin::PlainEnv => format!("invalid {upper}: {problem}"),
            Origin::Flag => format!("invalid --{}: {problem}", field.replace('_', "-")),
        })
    }

    /// Where a value came from, for a message about another setting that depends on it.
    fn source(&self, field: &str) -> String {
        match self {
            Origin::Default => "the default".to_owned(),
            Origin::File(path) => format!("{field} in {}", path.display()),
            Origin::Env => format!("{ENV_PREFIX}{}", field.to_ascii_uppercase()),
            Origin::PlainEnv => field.to_ascii_uppercase(),
            Origin::Flag => format!("--{}", field.replace('_', "-")),
        }
    }
}

/// Layers in increasing priority; defaults are not a layer but the fallback of `parse`.
struct Layers(Vec<(RawSettings, Origin)>);

impl Layers {
    fn winner<T>(&self, get: fn(&RawSettings) -> &Option<T>) -> Option<(&T, &Origin)> {
        self.0.iter().rev().find_map(|(raw, origin)| get(raw).as_ref().map(|value| (value, origin)))
    }

    fn parse<T>(
        &self,
        field: &str,
        get: fn(&RawSettings) -> &Option<String>,
        default: &str,
        parse: impl Fn(&str) -> Result<T, String>,
    ) -> Result<T, ConfigError> {
        let (text, origin) =
            self.winner(get).map_or((default, &Origin::Default), |(text, origin)| (text.as_str(), origin));
        parse(text).map_err(|problem| origin.error(field, text, &problem))
    }

    /// `otp_sender` with `otp_http_url` and `otp_http_token`, which only make sense together:
    /// `http` needs a URL, and a URL or token under `log` is refused rather than ignored.
    fn otp_sender(&self) -> Result<OtpSender, ConfigError> {
        let (kind, kind_origin) = self
            .winner(|r| &r.otp_sender)
            .map_or((DEFAULT_OTP_SENDER, &Origin::Default), |(text, origin)| (text.as_str(), origin));
        let http = match kind {
            "log" => false,
            "http" => true,
            _ => return Err(kind_origin.error("otp_sender", kind, "expected log or http")),
        };
        let url = self
            .winner(|r| &r.otp_http_url)
            .map(|(text, origin)| {
                let url = parse_otp_http_url(text)
                    .map_err(|problem| origin.error("otp_http_url", &mask_user_info(text), &problem))?;
                Ok((url, text, origin))
            })
            .transpose()?;
        let token = self
            .winner(|r| &r.otp_http_token)
            .map(|(text, origin)| {
                check_token(text).map_err(|problem| origin.secret_error("otp_http_token", &problem))?;
                Ok((text.clone(), origin))
            })
            .transpose()?;
        if !http {
            let problem = format!(
                "only used when otp_sender is http, but otp_sender is log ({}); \
                 set otp_sender to http or remove this setting",
                kind_origin.source("otp_sender")
            );
            if let Some((_, text, origin)) = url {
                return Err(origin.error("otp_http_url", &mask_user_info(text), &problem));
            }
            if let Some((_, origin)) = token {
                return Err(origin.secret_error("otp_http_token", &problem));
            }
            return Ok(OtpSender::Log);
        }
        match url {
            Some((url, _, _)) => Ok(OtpSender::Http { url, token: token.map(|(token, _)| token) }),
            None => Err(kind_origin.error("otp_sender", kind, "otp_http_url is required when otp_sender is http")),
        }
    }

    /// A secret setting: an error names the setting and its layer, never the value.
    fn secret<T>(
        &self,
        field: &str,
        get: fn(&RawSettings) -> &Option<String>,
        parse: impl Fn(&str) -> Result<T, String>,
    ) -> Result<Option<T>, ConfigError> {
        self.winner(get)
            .map(|(text, origin)| parse(text).map_err(|problem| origin.secret_error(field, &problem)))
            .transpose()
    }

    fn resolve(&self) -> Result<Config, ConfigError> {
        macro_rules! setting {
            ($field:ident, $default:expr, $parse:expr) => {
                self.parse(stringify!($field), |r| &r.$field, $default, $parse)?
            };
        }
        macro_rules! switch {
            ($field:ident, $default:expr) => {
                self.winner(|r| &r.$field).map_or($default, |(on, _)| *on)
            };
        }
        let listen = setting!(listen, DEFAULT_LISTEN, parse_listen);
        Ok(Config {
            listen,
            database_url: setting!(database_url, DEFAULT_DATABASE_URL, parse_database_url),
            database_max_connections: setting!(database_max_connections, "16", |text| {
                match text.parse::<usize>() {
                    Ok(n) if (1..=1000).contains(&n) => Ok(n),
                    _ => Err("expected a whole number from 1 to 1000".to_owned()),
                }
            }),
            database_acquire_timeout: setting!(database_acquire_timeout, "5s", |text| {
                duration_within(text, Duration::from_millis(1), Duration::from_secs(300), "more than 0 and at most 5m")
            }),
            database_connect_timeout: setting!(database_connect_timeout, "5s", |text| {
                duration_within(text, Duration::from_millis(1), Duration::from_secs(300), "more than 0 and at most 5m")
            }),
            public_url: setting!(public_url, &format!("http://{listen}"), parse_public_url),
            session_ttl: setting!(session_ttl, DEFAULT_SESSION_TTL, |text| {
                duration_within(text, Duration::from_secs(1), hours(24), "from 1s to 24h")
            }),
            webhook_retry_schedule: setting!(webhook_retry_schedule, DEFAULT_RETRY_SCHEDULE, parse_retry_schedule),
            webhook_timeout: setting!(webhook_timeout, DEFAULT_WEBHOOK_TIMEOUT, |text| {
                let range = "more than 0 and at most 5m";
                duration_within(text, Duration::from_millis(1), Duration::from_secs(300), range)
            }),
            webhook_concurrency: setting!(webhook_concurrency, DEFAULT_WEBHOOK_CONCURRENCY, |text| {
                match text.parse::<usize>() {
                    Ok(n) if (1..=10_000).contains(&n) => Ok(n),
                    _ => Err("expected a whole number from 1 to 10000".to_owned()),
                }
            }),
            webhook_concurrency_per_subscription: setting!(
                webhook_concurrency_per_subscription,
                DEFAULT_WEBHOOK_CONCURRENCY_PER_SUBSCRIPTION,
                |text| match text.parse::<usize>() {
                    Ok(n) if (1..=10_000).contains(&n) => Ok(n),
                    _ => Err("expected a whole number from 1 to 10000".to_owned()),
                }
            ),
            delivery_retention: setting!(delivery_retention, DEFAULT_DELIVERY_RETENTION, |text| {
                duration_within(text, hours(1), hours(24 * 3650), "from 1h to 3650d")
            }),
            webhook_suspend_after: setting!(webhook_suspend_after, DEFAULT_WEBHOOK_SUSPEND_AFTER, |text| {
                duration_within(text, Duration::from_secs(60), hours(24 * 90), "from 1m to 90d")
            }),
            allow_private_callbacks: switch!(allow_private_callbacks, false),
            allow_http_redirect_urls: switch!(allow_http_redirect_urls, false),
            rate_limit_per_key: setting!(rate_limit_per_key, DEFAULT_RATE_LIMIT_PER_KEY, parse_rate),
            rate_limit_per_ip: setting!(rate_limit_per_ip, DEFAULT_RATE_LIMIT_PER_IP, parse_rate),
            metrics_listen: setting!(metrics_listen, METRICS_OFF, |text| {
                if text == METRICS_OFF {
                    return Ok(None);
                }
                parse_listen(text).map(Some).map_err(|e| format!("{e}, or {METRICS_OFF}"))
            }),
            http_header_timeout: setting!(http_header_timeout, DEFAULT_HTTP_HEADER_TIMEOUT, |text| {
                duration_within(text, Duration::from_millis(100), Duration::from_secs(300), "from 100ms to 5m")
            }),
            http_body_timeout: setting!(http_body_timeout, DEFAULT_HTTP_BODY_TIMEOUT, |text| {
                duration_within(text, Duration::from_millis(100), Duration::from_secs(600), "from 100ms to 10m")
            }),
            http_max_connections: setting!(http_max_connections, DEFAULT_HTTP_MAX_CONNECTIONS, |text| {
                match text.parse::<usize>() {
                    Ok(n) if (1..=1_000_000).contains(&n) => Ok(n),
                    _ => Err("expected a whole number from 1 to 1000000".to_owned()),
                }
            }),
            expiry_sweep: switch!(expiry_sweep, true),
            webhook_dispatcher: switch!(webhook_dispatcher, true),
            log: setting!(log, DEFAULT_LOG, |text| Ok(text.to_owned())),
            otp_sender: self.otp_sender()?,
            secrets_key: self.secret("secrets_key", |r| &r.secrets_key, SecretKey::parse)?,
            secrets_old_keys: self
                .secret("secrets_old_keys", |r| &r.secrets_old_keys, parse_key_list)?
                .unwrap_or_default(),
        })
    }
}

fn read_file(path: &Path) -> Result<RawSettings, ConfigError> {
    let shown = path.display();
    let text =
        std::fs::read_to_string(path).map_err(|e| ConfigError(format!("cannot read config file {shown}: {e}")))?;
    toml::from_str(&text).map_err(|e| {
        let message = e.message().lines().next().unwrap_or_default().trim();
        // serde's message lists every accepted key, far too long for one line; name just the culprit.
        if let Some(key) = message.strip_prefix("unknown field `").and_then(|rest| rest.split('`').next()) {
            let line = e.span().map(|span| line_of(&text, span.start).0);
            let at = line.map(|n| format!(" (line {n})")).unwrap_or_default();
            return ConfigError(format!("unknown setting {key:?} in {shown}{at}"));
        }
        match e.span().map(|span| line_of(&text, span.start)) {
            Some((n, Some(key))) => ConfigError(format!("invalid setting {key} in {shown} (line {n}): {message}")),
            Some((n, None)) => ConfigError(format!("invalid config file {shown} (line {n}): {message}")),
            None => ConfigError(format!("invalid config file {shown}: {message}")),
        }
    })
}

/// The 1-based line number of a byte offset and, since serde's type errors do not name the key,
/// the key of a `key = value` line.
fn line_of(text: &str, offset: usize) -> (usize, Option<&str>) {
    let before = text.get(..offset).unwrap_or(text);
    let line = text[before.rfind('\n').map_or(0, |i| i + 1)..].lines().next();
    let key = line
        .and_then(|line| line.split_once('='))
        .map(|(key, _)| key.trim())
        .filter(|key| !key.is_empty() && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'));
    (before.matches('\n').count() + 1, key)
}

/// Empty variables count as unset, as with clap's `env`: `VAR=` in an env file means "not set",
/// not an invalid value.
fn env_text(env: &HashMap<String, String>, name: &str) -> Option<String> {
    env.get(name).filter(|value| !value.is_empty()).cloned()
}

fn env_layer(env: &HashMap<String, String>) -> Result<RawSettings, ConfigError> {
    let text = |field: &str| env_text(env, &format!("{ENV_PREFIX}{}", field.to_ascii_uppercase()));
    let switch = |field: &str| {
        text(field).map(|value| parse_bool(&value).map_err(|p| Origin::Env.error(field, &value, &p))).transpose()
    };
    macro_rules! from_env {
        (text: $($t:ident),*; switch: $($s:ident),*) => {
            RawSettings { $($t: text(stringify!($t)),)* $($s: switch(stringify!($s))?,)* }
        };
    }
    Ok(from_env!(
        text: listen, database_url, database_max_connections, database_acquire_timeout, database_connect_timeout,
            public_url, session_ttl, webhook_retry_schedule,
            webhook_timeout, webhook_concurrency, webhook_concurrency_per_subscription, delivery_retention, webhook_suspend_after, rate_limit_per_key, rate_limit_per_ip, metrics_listen, log,
            http_header_timeout, http_body_timeout, http_max_connections,
            otp_sender, otp_http_url, otp_http_token, secrets_key, secrets_old_keys;
        switch: allow_private_callbacks, allow_http_redirect_urls, expiry_sweep, webhook_dispatcher
    ))
}

fn parse_bool(text: &str) -> Result<bool, String> {
    match text.to_ascii_lowercase().as_str() {
        "true" | "1" => Ok(true),
        "false" | "0" => Ok(false),
        _ => Err("expected true, false, 1 or 0".to_owned()),
    }
}

fn parse_listen(text: &str) -> Result<SocketAddr, String> {
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

fn parse_public_url(text: &str) -> Result<url::Url, String> {
    // Links built from it are handed to customers, so anything beyond scheme, host and path is a mistake.
    let url = parse_http_url(text)?;
    if url.query().is_some() || url.fragment().is_some() {
        return Err(format!("{HTTP_URL_HINT} without query or fragment"));
    }
    Ok(url)
}

/// The `http` one-time-code sender's endpoint: a query is allowed, a fragment (never sent) is not,
/// and credentials belong in `otp_http_token`, not in user info.
fn parse_otp_http_url(text: &str) -> Result<url::Url, String> {
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
fn check_token(text: &str) -> Result<(), String> {
    if (1..=MAX_TOKEN_LEN).contains(&text.len()) && text.bytes().all(|b| b.is_ascii_graphic()) {
        return Ok(());
    }
    Err(format!("expected 1 to {MAX_TOKEN_LEN} visible ASCII characters without spaces (value not shown)"))
}

/// Comma separated keys (`secrets_old_keys`); messages say which entry, never its value.
fn parse_key_list(text: &str) -> Result<Vec<SecretKey>, String> {
    text.split(',')
        .enumerate()
        .map(|(index, item)| match item.trim() {
            "" => Err(format!("entry {} is empty; expected comma separated base64 keys", index + 1)),
            item => SecretKey::parse(item).map_err(|problem| format!("entry {}: {problem}", index + 1)),
        })
        .collect()
}

fn parse_rate(text: &str) -> Result<u32, String> {
    text.parse().map_err(|_| "expected a whole number of requests per second (0 turns it off)".to_owned())
}

fn hours(n: u64) -> Duration {
    Duration::from_secs(n * 3600)
}

fn duration_within(text: &str, min: Duration, max: Duration, range: &str) -> Result<Duration, String> {
    let duration = parse_duration(text)?;
    if duration < min || duration > max {
        return Err(format!("expected a duration {range}"));
    }
    Ok(duration)
}

fn parse_retry_schedule(text: &str) -> Result<Vec<Duration>, String> {
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
fn redact(text: &str) -> String {
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
fn mask_user_info(text: &str) -> String {
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

fn text_or_number<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<String>, D::Error> {
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

fn text_or_list<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<String>, D::Error> {
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
fn secret_text<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<String>, D::Error> {
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
fn secret_text_or_list<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<String>, D::Error> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A TOML file under the temp dir, removed when dropped (even if the test fails).
    struct TempToml(PathBuf);

    impl TempToml {
        fn new(contents: &str) -> TempToml {
            static NEXT: AtomicUsize = AtomicUsize::new(0);
            let name = format!("config-check-{}-{}.toml", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
            let path = std::env::temp_dir().join(name);
            std::fs::write(&path, contents).expect("temp dir is writable");
            TempToml(path)
        }
    }

    impl Drop for TempToml {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn no_flags() -> RawSettings {
        RawSettings::default()
    }

    fn load(file: Option<&TempToml>, env: &HashMap<String, String>, flags: &RawSettings) -> Config {
        Config::load(file.map(|f| f.0.as_path()), env, flags).expect("valid settings")
    }

    /// Loads expecting failure and checks the one-line promise on the way.
    fn error(file: Option<&TempToml>, env: &HashMap<String, String>, flags: &RawSettings) -> String {
        let message =
            Config::load(file.map(|f| f.0.as_path()), env, flags).expect_err("settings should be rejected").to_string();
        assert!(!message.contains('\n'), "more than one line: {message}");
        message
    }

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    #[test]
    fn defaults_are_as_documented() {
        let config = Config::defaults();
        assert_eq!(config.listen, "127.0.0.1:8080".parse().unwrap());
        let path = PathBuf::from("./data/redirect-sessions.db");
        assert_eq!(config.database_url, DatabaseUrl::Sqlite { path });
        assert_eq!(config.public_base(), "http://127.0.0.1:8080");
        assert_eq!(config.session_ttl, secs(15 * 60));
        let schedule = [5, 300, 1800, 7200, 18000, 36000, 36000].map(secs);
        assert_eq!(config.webhook_retry_schedule, schedule);
        assert_eq!(config.webhook_timeout, secs(10));
        assert!(!config.allow_private_callbacks && !config.allow_http_redirect_urls);
        assert_eq!((config.rate_limit_per_key, config.rate_limit_per_ip), (1000, 0));
        assert_eq!(config.metrics_listen, None);
        assert!(config.expiry_sweep && config.webhook_dispatcher);
        assert_eq!(config.log, "info");
        assert_eq!(config.otp_sender, OtpSender::Log);
    }

    #[test]
    fn loading_nothing_gives_the_defaults() {
        let config = load(None, &env(&[]), &no_flags());
        assert_eq!(format!("{config:?}"), format!("{:?}", Config::defaults()));
    }

    #[test]
    fn public_url_defaults_to_the_final_listen_address() {
        let flags = RawSettings { listen: Some("[::1]:9000".into()), ..no_flags() };
        assert_eq!(load(None, &env(&[]), &flags).public_base(), "http://[::1]:9000");
    }

    #[test]
    fn public_base_drops_the_trailing_slash_but_keeps_the_path() {
        let flags = RawSettings { public_url: Some("https://pay.example.com/r/".into()), ..no_flags() };
        assert_eq!(load(None, &env(&[]), &flags).public_base(), "https://pay.example.com/r");
    }

    #[test]
    fn the_file_overrides_defaults() {
        let file = TempToml::new(
            "session_ttl = \"1h\"\nexpiry_sweep = false\nrate_limit_per_ip = 5\n\
             webhook_retry_schedule = [\"1s\", \"2m\"]\nmetrics_listen = \"127.0.0.1:9100\"\n",
        );
        let config = load(Some(&file), &env(&[]), &no_flags());
        assert_eq!(config.session_ttl, secs(3600));
        assert!(!config.expiry_sweep);
        assert_eq!(config.rate_limit_per_ip, 5);
        assert_eq!(config.webhook_retry_schedule, [secs(1), secs(120)]);
        assert_eq!(config.metrics_listen, Some("127.0.0.1:9100".parse().unwrap()));
    }

    #[test]
    fn environment_overrides_the_file_field_by_field() {
        let file = TempToml::new("session_ttl = \"1h\"\nlog = \"debug\"\n");
        let vars = env(&[("REDIRECT_SESSIONS_SESSION_TTL", "2h"), ("REDIRECT_SESSIONS_EXPIRY_SWEEP", "0")]);
        let config = load(Some(&file), &vars, &no_flags());
        assert_eq!(config.session_ttl, secs(7200));
        assert!(!config.expiry_sweep);
        assert_eq!(config.log, "debug");
    }

    #[test]
    fn flags_override_environment_and_file() {
        let file = TempToml::new("session_ttl = \"1h\"\nallow_private_callbacks = true\n");
        let vars = env(&[("REDIRECT_SESSIONS_SESSION_TTL", "2h"), ("REDIRECT_SESSIONS_LOG", "warn")]);
        let flags = RawSettings { session_ttl: Some("3h".into()), allow_private_callbacks: Some(false), ..no_flags() };
        let config = load(Some(&file), &vars, &flags);
        assert_eq!(config.session_ttl, secs(3 * 3600));
        assert!(!config.allow_private_callbacks);
        assert_eq!(config.log, "warn");
    }

    #[test]
    fn a_later_layer_can_turn_the_metrics_listener_off() {
        let file = TempToml::new("metrics_listen = \"127.0.0.1:9100\"\n");
        let flags = RawSettings { metrics_listen: Some("off".into()), ..no_flags() };
        assert_eq!(load(Some(&file), &env(&[]), &flags).metrics_listen, None);
    }

    #[test]
    fn plain_database_url_is_used_when_the_prefixed_one_is_absent() {
        let vars = env(&[("DATABASE_URL", "postgres://db/plain")]);
        let config = load(None, &vars, &no_flags());
        assert_eq!(config.database_url, DatabaseUrl::Postgres("postgres://db/plain".into()));
    }

    #[test]
    fn prefixed_database_url_beats_plain_database_url_which_beats_the_file() {
        let file = TempToml::new("database_url = \"sqlite:file.db\"\n");
        let plain = env(&[("DATABASE_URL", "postgres://db/plain")]);
        let config = load(Some(&file), &plain, &no_flags());
        assert_eq!(config.database_url, DatabaseUrl::Postgres("postgres://db/plain".into()));
        let both = env(&[("DATABASE_URL", "postgres://db/plain"), ("REDIRECT_SESSIONS_DATABASE_URL", "sqlite:x.db")]);
        let config = load(Some(&file), &both, &no_flags());
        assert_eq!(config.database_url, DatabaseUrl::Sqlite { path: "x.db".into() });
    }

    #[test]
    fn empty_environment_variables_count_as_unset() {
        let vars = env(&[("REDIRECT_SESSIONS_SESSION_TTL", ""), ("DATABASE_URL", "")]);
        let config = load(None, &vars, &no_flags());
        assert_eq!(config.session_ttl, secs(15 * 60));
        assert_eq!(config.database_url, Config::defaults().database_url);
    }

    #[test]
    fn environment_booleans_accept_true_false_1_and_0() {
        for (text, expected) in [("true", true), ("1", true), ("false", false), ("0", false)] {
            let vars = env(&[("REDIRECT_SESSIONS_ALLOW_HTTP_REDIRECT_URLS", text)]);
            assert_eq!(load(None, &vars, &no_flags()).allow_http_redirect_urls, expected, "{text}");
        }
    }

    #[test]
    fn a_bad_environment_boolean_names_the_variable() {
        let vars = env(&[("REDIRECT_SESSIONS_WEBHOOK_DISPATCHER", "yes")]);
        assert_eq!(
            error(None, &vars, &no_flags()),
            "invalid REDIRECT_SESSIONS_WEBHOOK_DISPATCHER \"yes\": expected true, false, 1 or 0"
        );
    }

    #[test]
    fn a_bad_duration_flag_names_the_flag() {
        let flags = RawSettings { session_ttl: Some("abc".into()), ..no_flags() };
        assert_eq!(
            error(None, &env(&[]), &flags),
            "invalid --session-ttl \"abc\": expected a duration such as 15m, 2s or 500ms"
        );
    }

    #[test]
    fn a_bad_public_url_in_the_environment_names_the_variable() {
        let vars = env(&[("REDIRECT_SESSIONS_PUBLIC_URL", "x")]);
        assert_eq!(
            error(None, &vars, &no_flags()),
            "invalid REDIRECT_SESSIONS_PUBLIC_URL \"x\": expected an absolute http(s) URL"
        );
    }

    #[test]
    fn public_urls_with_other_schemes_queries_fragments_or_user_info_are_rejected() {
        for bad in ["ftp://h/", "https://h/?a=1", "https://h/#top", "https://u:secret@h/"] {
            let flags = RawSettings { public_url: Some(bad.into()), ..no_flags() };
            let message = error(None, &env(&[]), &flags);
            assert!(message.starts_with("invalid --public-url"), "{message}");
            assert!(!message.contains("secret"), "{message}");
        }
    }

    #[test]
    fn a_bad_listen_address_in_the_file_names_the_file_and_the_key() {
        let file = TempToml::new("listen = \"localhost:80\"\n");
        let message = error(Some(&file), &env(&[]), &no_flags());
        let expected = format!(
            "invalid setting listen = \"localhost:80\" in {}: expected an IP address and port such as 127.0.0.1:8080",
            file.0.display()
        );
        assert_eq!(message, expected);
    }

    #[test]
    fn an_unknown_key_in_the_file_is_named() {
        let file = TempToml::new("log = \"info\"\nsesion_ttl = \"1m\"\n");
        let message = error(Some(&file), &env(&[]), &no_flags());
        assert_eq!(message, format!("unknown setting \"sesion_ttl\" in {} (line 2)", file.0.display()));
    }

    #[test]
    fn a_toml_syntax_error_is_one_line_naming_the_file() {
        let file = TempToml::new("this is not toml\n");
        let message = error(Some(&file), &env(&[]), &no_flags());
        assert!(message.starts_with(&format!("invalid config file {} (line 1): ", file.0.display())), "{message}");
    }

    #[test]
    fn a_wrongly_typed_toml_value_names_the_key() {
        let file = TempToml::new("log = \"info\"\nexpiry_sweep = \"yes\"\n");
        let message = error(Some(&file), &env(&[]), &no_flags());
        let start = format!("invalid setting expiry_sweep in {} (line 2): ", file.0.display());
        assert!(message.starts_with(&start), "{message}");
    }

    #[test]
    fn a_missing_config_file_is_an_error() {
        let path = std::env::temp_dir().join(format!("config-check-missing-{}.toml", std::process::id()));
        let message = Config::load(Some(&path), &env(&[]), &no_flags()).expect_err("missing file").to_string();
        assert!(message.starts_with(&format!("cannot read config file {}: ", path.display())), "{message}");
        assert!(!message.contains('\n'));
    }

    #[test]
    fn session_ttl_outside_1s_to_24h_is_rejected() {
        for bad in ["500ms", "25h"] {
            let flags = RawSettings { session_ttl: Some(bad.into()), ..no_flags() };
            let expected = format!("invalid --session-ttl \"{bad}\": expected a duration from 1s to 24h");
            assert_eq!(error(None, &env(&[]), &flags), expected);
        }
    }

    #[test]
    fn webhook_timeout_must_be_more_than_0_and_at_most_5m() {
        for bad in ["0s", "6m"] {
            let vars = env(&[("REDIRECT_SESSIONS_WEBHOOK_TIMEOUT", bad)]);
            assert!(error(None, &vars, &no_flags()).starts_with("invalid REDIRECT_SESSIONS_WEBHOOK_TIMEOUT"));
        }
    }

    #[test]
    fn webhook_suspend_after_defaults_to_5_days_comes_from_every_layer_and_is_bounded() {
        assert_eq!(Config::defaults().webhook_suspend_after, hours(5 * 24));
        let file = TempToml::new("webhook_suspend_after = \"2d\"\n");
        assert_eq!(load(Some(&file), &env(&[]), &no_flags()).webhook_suspend_after, hours(48));
        let vars = env(&[("REDIRECT_SESSIONS_WEBHOOK_SUSPEND_AFTER", "12h")]);
        assert_eq!(load(Some(&file), &vars, &no_flags()).webhook_suspend_after, hours(12));
        let flags = RawSettings { webhook_suspend_after: Some("30m".into()), ..no_flags() };
        assert_eq!(load(Some(&file), &vars, &flags).webhook_suspend_after, Duration::from_secs(1800));
        for bad in ["59s", "91d", "soon"] {
            let vars = env(&[("REDIRECT_SESSIONS_WEBHOOK_SUSPEND_AFTER", bad)]);
            assert!(error(None, &vars, &no_flags()).starts_with("invalid REDIRECT_SESSIONS_WEBHOOK_SUSPEND_AFTER"));
        }
    }

    #[test]
    fn webhook_concurrency_per_subscription_defaults_to_16_and_comes_from_every_layer() {
        assert_eq!(Config::defaults().webhook_concurrency_per_subscription, 16);
        let file = TempToml::new("webhook_concurrency_per_subscription = 4\n");
        assert_eq!(load(Some(&file), &env(&[]), &no_flags()).webhook_concurrency_per_subscription, 4);
        let vars = env(&[("REDIRECT_SESSIONS_WEBHOOK_CONCURRENCY_PER_SUBSCRIPTION", "8")]);
        assert_eq!(load(Some(&file), &vars, &no_flags()).webhook_concurrency_per_subscription, 8);
        let flags = RawSettings { webhook_concurrency_per_subscription: Some("2".into()), ..no_flags() };
        assert_eq!(load(Some(&file), &vars, &flags).webhook_concurrency_per_subscription, 2);
        for bad in ["0", "10001", "x"] {
            let flags = RawSettings { webhook_concurrency_per_subscription: Some(bad.into()), ..no_flags() };
            let expected = format!(
                "invalid --webhook-concurrency-per-subscription \"{bad}\": expected a whole number from 1 to 10000"
            );
            assert_eq!(error(None, &env(&[]), &flags), expected);
        }
    }

    #[test]
    fn http_limits_default_and_come_from_every_layer() {
        let config = Config::defaults();
        assert_eq!((config.http_header_timeout, config.http_body_timeout), (secs(10), secs(30)));
        assert_eq!(config.http_max_connections, 10_000);
        let file = TempToml::new("http_header_timeout = \"5s\"\nhttp_max_connections = 50\n");
        let vars = env(&[("REDIRECT_SESSIONS_HTTP_BODY_TIMEOUT", "2s")]);
        let flags = RawSettings { http_max_connections: Some("7".into()), ..no_flags() };
        let config = load(Some(&file), &vars, &flags);
        assert_eq!((config.http_header_timeout, config.http_body_timeout), (secs(5), secs(2)));
        assert_eq!(config.http_max_connections, 7);
    }

    #[test]
    fn http_limits_outside_their_ranges_are_rejected() {
        for (flags, expected) in [
            (
                RawSettings { http_header_timeout: Some("50ms".into()), ..no_flags() },
                "invalid --http-header-timeout \"50ms\": expected a duration from 100ms to 5m",
            ),
            (
                RawSettings { http_body_timeout: Some("11m".into()), ..no_flags() },
                "invalid --http-body-timeout \"11m\": expected a duration from 100ms to 10m",
            ),
            (
                RawSettings { http_max_connections: Some("0".into()), ..no_flags() },
                "invalid --http-max-connections \"0\": expected a whole number from 1 to 1000000",
            ),
        ] {
            assert_eq!(error(None, &env(&[]), &flags), expected);
        }
    }

    #[test]
    fn an_empty_retry_schedule_is_rejected() {
        let file = TempToml::new("webhook_retry_schedule = \"\"\n");
        let message = error(Some(&file), &env(&[]), &no_flags());
        assert!(message.starts_with("invalid setting webhook_retry_schedule = \"\" in "), "{message}");
        assert!(message.ends_with("expected a comma separated list of durations such as 5s,5m,30m"));
    }

    #[test]
    fn retry_schedules_with_zero_huge_or_too_many_delays_are_rejected() {
        let too_many = vec!["1s"; 21].join(",");
        for (bad, problem) in [
            ("1s,0s", "retry delay 2 must be more than 0 and at most 7d"),
            ("8d", "retry delay 1 must be more than 0 and at most 7d"),
            (too_many.as_str(), "expected at most 20 retry delays, got 21"),
        ] {
            let flags = RawSettings { webhook_retry_schedule: Some(bad.into()), ..no_flags() };
            let expected = format!("invalid --webhook-retry-schedule \"{bad}\": {problem}");
            assert_eq!(error(None, &env(&[]), &flags), expected);
        }
    }

    #[test]
    fn a_rate_limit_that_is_not_a_number_is_rejected() {
        let vars = env(&[("REDIRECT_SESSIONS_RATE_LIMIT_PER_KEY", "lots")]);
        assert_eq!(
            error(None, &vars, &no_flags()),
            "invalid REDIRECT_SESSIONS_RATE_LIMIT_PER_KEY \"lots\": \
             expected a whole number of requests per second (0 turns it off)"
        );
        let file = TempToml::new("rate_limit_per_ip = -3\n");
        assert!(error(Some(&file), &env(&[]), &no_flags()).starts_with("invalid setting rate_limit_per_ip = \"-3\""));
    }

    #[test]
    fn a_bad_plain_database_url_names_database_url_without_leaking_the_password() {
        let vars = env(&[("DATABASE_URL", "mysql://app:hunter2@db/x")]);
        let message = error(None, &vars, &no_flags());
        assert!(message.starts_with("invalid DATABASE_URL \"mysql://app:***@db/x\": unsupported scheme"), "{message}");
        assert!(!message.contains("hunter2"));
    }

    #[test]
    fn passwords_are_masked_in_debug_output_and_echoed_values() {
        let url = DatabaseUrl::Postgres("postgres://app:hunter2@db/x?password=hunter2&sslmode=require".into());
        let shown = format!("{url:?}");
        assert!(!shown.contains("hunter2") && shown.contains("sslmode=require"), "{shown}");
        assert_eq!(redact("host=db password=hunter2 user=app"), "host=db password=*** user=app");
    }

    #[test]
    fn durations_accept_each_unit_and_compound_forms() {
        assert_eq!(parse_duration("15m"), Ok(secs(900)));
        assert_eq!(parse_duration("2s"), Ok(secs(2)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1h30m"), Ok(secs(5400)));
        assert_eq!(parse_duration("10d"), Ok(secs(864_000)));
        assert_eq!(parse_duration(" 1m1s500ms "), Ok(Duration::from_millis(61_500)));
    }

    #[test]
    fn durations_reject_bare_numbers_signs_blanks_and_unknown_units() {
        for bad in ["15", "-1s", "", " ", "1x", "1.5s", "s", "1h 30m", "+1s"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} should be rejected");
        }
        assert!(parse_duration("15").unwrap_err().contains("needs a unit"));
    }

    #[test]
    fn durations_reject_repeated_or_misordered_units_and_overflow() {
        assert!(parse_duration("1m1m").is_err());
        assert!(parse_duration("30m1h").is_err());
        assert_eq!(parse_duration("99999999999999999999s"), Err("duration is too large".into()));
        assert_eq!(parse_duration("18446744073709551615d"), Err("duration is too large".into()));
    }

    #[test]
    fn duration_lists_allow_spaces_around_commas() {
        assert_eq!(parse_duration_list("1s, 2s ,5s"), Ok(vec![secs(1), secs(2), secs(5)]));
        assert!(parse_duration_list("1s,,2s").is_err());
        assert!(parse_duration_list("1s,2x").unwrap_err().contains("\"2x\""));
    }

    #[test]
    fn sqlite_urls_take_relative_or_absolute_paths() {
        let sqlite = |p: &str| Ok(DatabaseUrl::Sqlite { path: PathBuf::from(p) });
        assert_eq!(parse_database_url("sqlite://./data/x.db"), sqlite("./data/x.db"));
        assert_eq!(parse_database_url("sqlite:///var/lib/x.db"), sqlite("/var/lib/x.db"));
        assert_eq!(parse_database_url("sqlite:x.db"), sqlite("x.db"));
        assert_eq!(parse_database_url("sqlite:/abs/x.db"), sqlite("/abs/x.db"));
    }

    #[test]
    fn in_memory_empty_or_optioned_sqlite_urls_are_rejected() {
        assert!(parse_database_url("sqlite::memory:").unwrap_err().contains("in-memory"));
        assert!(parse_database_url("sqlite://:memory:").unwrap_err().contains("in-memory"));
        assert!(parse_database_url("sqlite://").is_err());
        assert!(parse_database_url("sqlite://x.db?mode=rwc").is_err());
    }

    #[test]
    fn postgres_urls_are_kept_as_given() {
        for url in ["postgres://u:p@db:5432/app", "postgresql://db/app?sslmode=require"] {
            assert_eq!(parse_database_url(url), Ok(DatabaseUrl::Postgres(url.into())));
        }
    }

    #[test]
    fn bare_paths_and_other_schemes_are_rejected_naming_the_accepted_schemes() {
        assert!(parse_database_url("./data/x.db").unwrap_err().contains("sqlite://PATH"));
        assert!(parse_database_url("mysql://db/x").unwrap_err().contains("postgres://"));
        assert!(parse_database_url("").is_err());
    }

    const TOKEN: &str = "tok-3f9a_Zq.~+/=";

    fn otp_http(url: &str, token: Option<&str>) -> OtpSender {
        OtpSender::Http { url: url.parse().unwrap(), token: token.map(str::to_owned) }
    }

    fn otp_flags(sender: Option<&str>, url: Option<&str>, token: Option<&str>) -> RawSettings {
        RawSettings {
            otp_sender: sender.map(str::to_owned),
            otp_http_url: url.map(str::to_owned),
            otp_http_token: token.map(str::to_owned),
            ..no_flags()
        }
    }

    #[test]
    fn the_otp_sender_defaults_to_log() {
        assert_eq!(load(None, &env(&[]), &no_flags()).otp_sender, OtpSender::Log);
        let flags = otp_flags(Some("log"), None, None);
        assert_eq!(load(None, &env(&[]), &flags).otp_sender, OtpSender::Log);
    }

    #[test]
    fn the_file_can_choose_the_http_otp_sender() {
        let file = TempToml::new(&format!(
            "otp_sender = \"http\"\notp_http_url = \"https://sms.example.com/v1/otp?tenant=7\"\n\
             otp_http_token = \"{TOKEN}\"\n"
        ));
        let config = load(Some(&file), &env(&[]), &no_flags());
        assert_eq!(config.otp_sender, otp_http("https://sms.example.com/v1/otp?tenant=7", Some(TOKEN)));
    }

    #[test]
    fn the_environment_can_choose_the_http_otp_sender() {
        let vars = env(&[
            ("REDIRECT_SESSIONS_OTP_SENDER", "http"),
            ("REDIRECT_SESSIONS_OTP_HTTP_URL", "http://127.0.0.1:9000/otp"),
            ("REDIRECT_SESSIONS_OTP_HTTP_TOKEN", TOKEN),
        ]);
        let config = load(None, &vars, &no_flags());
        assert_eq!(config.otp_sender, otp_http("http://127.0.0.1:9000/otp", Some(TOKEN)));
    }

    #[test]
    fn flags_can_choose_the_http_otp_sender_over_the_file_and_environment() {
        let file = TempToml::new("otp_sender = \"http\"\notp_http_url = \"https://file.example/otp\"\n");
        let vars = env(&[("REDIRECT_SESSIONS_OTP_HTTP_URL", "https://env.example/otp")]);
        let flags = otp_flags(Some("http"), Some("https://flag.example/otp"), Some(TOKEN));
        let config = load(Some(&file), &vars, &flags);
        assert_eq!(config.otp_sender, otp_http("https://flag.example/otp", Some(TOKEN)));
        // The token is optional.
        let config = load(Some(&file), &vars, &otp_flags(None, None, None));
        assert_eq!(config.otp_sender, otp_http("https://env.example/otp", None));
    }

    #[test]
    fn the_http_otp_sender_without_a_url_is_rejected_naming_the_url_setting() {
        let flags = otp_flags(Some("http"), None, Some(TOKEN));
        let message = error(None, &env(&[]), &flags);
        assert_eq!(message, "invalid --otp-sender \"http\": otp_http_url is required when otp_sender is http");
        let file = TempToml::new("otp_sender = \"http\"\n");
        let message = error(Some(&file), &env(&[]), &no_flags());
        assert!(message.starts_with("invalid setting otp_sender = \"http\" in "), "{message}");
        assert!(message.ends_with(": otp_http_url is required when otp_sender is http"), "{message}");
    }

    #[test]
    fn an_unknown_otp_sender_is_rejected() {
        let vars = env(&[("REDIRECT_SESSIONS_OTP_SENDER", "sms")]);
        assert_eq!(
            error(None, &vars, &no_flags()),
            "invalid REDIRECT_SESSIONS_OTP_SENDER \"sms\": expected log or http"
        );
    }

    #[test]
    fn otp_http_urls_with_other_schemes_relative_or_with_user_info_or_fragment_are_rejected() {
        for (bad, problem) in [
            ("ftp://sms.example/otp", "expected an absolute http(s) URL"),
            ("/otp", "expected an absolute http(s) URL"),
            ("sms.example/otp", "expected an absolute http(s) URL"),
            ("https://sms.example/otp#x", "expected an absolute http(s) URL without fragment"),
        ] {
            let flags = otp_flags(Some("http"), Some(bad), None);
            let expected = format!("invalid --otp-http-url {bad:?}: {problem}");
            assert_eq!(error(None, &env(&[]), &flags), expected);
        }
        for bad in ["https://user:secret@sms.example/otp", "https://secret@sms.example/otp"] {
            let vars = env(&[("REDIRECT_SESSIONS_OTP_SENDER", "http"), ("REDIRECT_SESSIONS_OTP_HTTP_URL", bad)]);
            let message = error(None, &vars, &no_flags());
            assert_eq!(
                message,
                "invalid REDIRECT_SESSIONS_OTP_HTTP_URL \"https://***@sms.example/otp\": \
                 expected an absolute http(s) URL without user info (give the credential as otp_http_token)"
            );
        }
    }

    #[test]
    fn bad_otp_tokens_are_rejected_without_being_shown() {
        let too_long = "x".repeat(4097);
        for bad in ["tok en secret", "", "secret\u{e9}", "secret\t", too_long.as_str()] {
            let flags = otp_flags(Some("http"), Some("https://sms.example/otp"), Some(bad));
            let message = error(None, &env(&[]), &flags);
            assert_eq!(
                message,
                "invalid --otp-http-token: expected 1 to 4096 visible ASCII characters without spaces (value not shown)"
            );
        }
        assert!(check_token(&"x".repeat(4096)).is_ok());
        let vars = env(&[("REDIRECT_SESSIONS_OTP_HTTP_TOKEN", "has a secret space")]);
        let message = error(None, &vars, &otp_flags(Some("http"), Some("https://sms.example/otp"), None));
        assert!(message.starts_with("invalid REDIRECT_SESSIONS_OTP_HTTP_TOKEN: "), "{message}");
        assert!(!message.contains("secret"), "{message}");
    }

    #[test]
    fn a_token_of_the_wrong_toml_type_is_not_shown() {
        let file = TempToml::new("otp_sender = \"http\"\notp_http_token = 982451653\n");
        let message = error(Some(&file), &env(&[]), &no_flags());
        assert!(message.starts_with("invalid setting otp_http_token in "), "{message}");
        assert!(!message.contains("982451653"), "{message}");
    }

    #[test]
    fn an_otp_url_or_token_while_the_sender_is_log_is_rejected() {
        let flags = otp_flags(None, Some("https://sms.example/otp"), None);
        assert_eq!(
            error(None, &env(&[]), &flags),
            "invalid --otp-http-url \"https://sms.example/otp\": only used when otp_sender is http, \
             but otp_sender is log (the default); set otp_sender to http or remove this setting"
        );
        let vars = env(&[("REDIRECT_SESSIONS_OTP_SENDER", "log"), ("REDIRECT_SESSIONS_OTP_HTTP_TOKEN", TOKEN)]);
        let message = error(None, &vars, &no_flags());
        assert_eq!(
            message,
            "invalid REDIRECT_SESSIONS_OTP_HTTP_TOKEN: only used when otp_sender is http, \
             but otp_sender is log (REDIRECT_SESSIONS_OTP_SENDER); set otp_sender to http or remove this setting"
        );
        // A later layer switching back to log does not silently drop an earlier layer's URL.
        let file = TempToml::new("otp_sender = \"http\"\notp_http_url = \"https://sms.example/otp\"\n");
        let message = error(Some(&file), &env(&[]), &otp_flags(Some("log"), None, None));
        assert!(message.starts_with("invalid setting otp_http_url = \"https://sms.example/otp\" in "), "{message}");
        assert!(
            message.ends_with("but otp_sender is log (--otp-sender); set otp_sender to http or remove this setting")
        );
    }

    #[test]
    fn debug_output_of_the_config_never_shows_the_otp_token() {
        let flags = otp_flags(Some("http"), Some("https://sms.example/otp"), Some(TOKEN));
        let shown = format!("{:?}", load(None, &env(&[]), &flags));
        assert!(!shown.contains(TOKEN), "{shown}");
        assert!(
            shown.contains(r#"otp_sender: Http { url: "https://sms.example/otp", token: Some("<redacted>") }"#),
            "{shown}"
        );
        let without = format!("{:?}", otp_http("https://sms.example/otp", None));
        assert_eq!(without, r#"Http { url: "https://sms.example/otp", token: None }"#);
        assert_eq!(format!("{:?}", OtpSender::Log), "Log");
    }

    /// Base64 of 32 bytes, each `byte`.
    fn secrets_key_text(byte: u8) -> String {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode([byte; 32])
    }

    #[test]
    fn the_secrets_keys_come_from_every_layer_and_debug_shows_only_their_ids() {
        assert!(Config::defaults().secrets_key.is_none() && Config::defaults().secrets_old_keys.is_empty());
        let (a, b, c) = (secrets_key_text(1), secrets_key_text(2), secrets_key_text(3));
        let file = TempToml::new(&format!("secrets_key = \"{a}\"\nsecrets_old_keys = [\"{b}\", \"{c}\"]\n"));
        let config = load(Some(&file), &env(&[]), &no_flags());
        let id = |text: &str| SecretKey::parse(text).unwrap().id();
        assert_eq!(config.secrets_key.as_ref().map(SecretKey::id), Some(id(&a)));
        assert_eq!(config.secrets_old_keys.iter().map(SecretKey::id).collect::<Vec<_>>(), [id(&b), id(&c)]);
        let vars = env(&[("REDIRECT_SESSIONS_SECRETS_KEY", &b), ("REDIRECT_SESSIONS_SECRETS_OLD_KEYS", &a)]);
        let flags = RawSettings { secrets_key: Some(c.clone()), ..no_flags() };
        let config = load(Some(&file), &vars, &flags);
        assert_eq!(config.secrets_key.as_ref().map(SecretKey::id), Some(id(&c)));
        assert_eq!(config.secrets_old_keys.iter().map(SecretKey::id).collect::<Vec<_>>(), [id(&a)]);
        let shown = format!("{config:?}");
        for key in [&a, &b, &c] {
            assert!(!shown.contains(key.as_str()), "{shown}");
        }
        assert!(shown.contains(&id(&c)), "{shown}");
    }

    #[test]
    fn malformed_secrets_keys_are_named_but_never_shown() {
        let good = secrets_key_text(7);
        let cases = [
            (
                RawSettings { secrets_key: Some("c2hvcnQ=".into()), ..no_flags() },
                env(&[]),
                "invalid --secrets-key: expected the base64 of 32 bytes, got 5 bytes (value not shown)",
            ),
            (
                no_flags(),
                env(&[("REDIRECT_SESSIONS_SECRETS_KEY", "not base64!")]),
                "invalid REDIRECT_SESSIONS_SECRETS_KEY: expected the base64 of 32 bytes (value not shown)",
            ),
            (
                no_flags(),
                env(&[("REDIRECT_SESSIONS_SECRETS_OLD_KEYS", &format!("{good},,{good}"))]),
                "invalid REDIRECT_SESSIONS_SECRETS_OLD_KEYS: entry 2 is empty; expected comma separated base64 keys",
            ),
            (
                RawSettings { secrets_old_keys: Some(format!("{good},AAAA")), ..no_flags() },
                env(&[]),
                "invalid --secrets-old-keys: entry 2: expected the base64 of 32 bytes, got 3 bytes (value not shown)",
            ),
        ];
        for (flags, vars, expected) in cases {
            let message = error(None, &vars, &flags);
            assert_eq!(message, expected);
            assert!(!message.contains(&good));
        }
        let file = TempToml::new("secrets_key = 12345\n");
        let message = error(Some(&file), &env(&[]), &no_flags());
        assert!(message.contains("secrets_key") && !message.contains("12345"), "{message}");
    }
}
