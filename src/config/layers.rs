//! Layering: which layer's raw text wins for each setting, and where it came from, so that an
//! error names the exact setting and the layer that supplied the bad value.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    time::Duration,
};

use super::parse::{
    check_token, duration_within, mask_user_info, parse_bool, parse_database_url, parse_key_list, parse_listen,
    parse_otp_http_url, parse_public_url, parse_rate, parse_retry_schedule, redact, METRICS_OFF,
};
use super::settings::{find, Check, Slot, SETTINGS};
use super::{Config, ConfigError, OtpSender, RawSettings};
use crate::secrets::SecretKey;

/// The layer a value came from, which decides how an error names the setting.
#[derive(Clone, Debug)]
pub(super) enum Origin {
    Default,
    File(PathBuf),
    /// `REDIRECT_SESSIONS_<FIELD>`.
    Env,
    /// The setting's variable without the prefix (`Setting::plain_env`).
    PlainEnv,
    Flag,
}

impl Origin {
    /// How this layer spells the setting: its key, variable or flag.
    fn spelling(&self, field: &str) -> String {
        let setting = find(field);
        match self {
            Origin::Default | Origin::File(_) => field.to_owned(),
            Origin::Env => setting.env_name(),
            Origin::PlainEnv => setting.plain_env.unwrap_or(field).to_owned(),
            Origin::Flag => setting.flag(),
        }
    }

    fn error(&self, field: &str, value: &str, problem: &str) -> ConfigError {
        // Debug quoting escapes newlines, which keeps the message on one line.
        let shown = format!("{:?}", redact(value));
        let name = self.spelling(field);
        ConfigError(match self {
            Origin::Default => format!("invalid built-in default {name} {shown}: {problem}"),
            Origin::File(path) => format!("invalid setting {name} = {shown} in {}: {problem}", path.display()),
            Origin::Env | Origin::PlainEnv | Origin::Flag => format!("invalid {name} {shown}: {problem}"),
        })
    }

    /// Like `error`, for a secret: names the setting and its layer but never the value.
    fn secret_error(&self, field: &str, problem: &str) -> ConfigError {
        let name = self.spelling(field);
        ConfigError(match self {
            Origin::Default => format!("invalid built-in default {name}: {problem}"),
            Origin::File(path) => format!("invalid setting {name} in {}: {problem}", path.display()),
            Origin::Env | Origin::PlainEnv | Origin::Flag => format!("invalid {name}: {problem}"),
        })
    }

    /// Where a value came from, for a message about another setting that depends on it.
    fn source(&self, field: &str) -> String {
        match self {
            Origin::Default => "the default".to_owned(),
            Origin::File(path) => format!("{field} in {}", path.display()),
            Origin::Env | Origin::PlainEnv | Origin::Flag => self.spelling(field),
        }
    }
}

/// Layers in increasing priority; defaults are not a layer but the fallback of `parse`.
pub(super) struct Layers(pub(super) Vec<(RawSettings, Origin)>);

/// The declared default of a setting that has one.
fn default_of(field: &str) -> &'static str {
    find(field).default.unwrap_or_else(|| panic!("setting {field} is declared without a default"))
}

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

    /// A setting declared with `Check::Duration`.
    fn duration(&self, field: &str, get: fn(&RawSettings) -> &Option<String>) -> Result<Duration, ConfigError> {
        let Check::Duration { min, max, range } = find(field).check else {
            panic!("setting {field} is not declared as a duration")
        };
        self.parse(field, get, default_of(field), |text| duration_within(text, min, max, range))
    }

    /// A setting declared with `Check::Count`.
    fn count(&self, field: &str, get: fn(&RawSettings) -> &Option<String>) -> Result<usize, ConfigError> {
        let Check::Count { max } = find(field).check else { panic!("setting {field} is not declared as a count") };
        self.parse(field, get, default_of(field), |text| match text.parse::<usize>() {
            Ok(n) if (1..=max).contains(&n) => Ok(n),
            _ => Err(format!("expected a whole number from 1 to {max}")),
        })
    }

    fn switch(&self, field: &str, get: fn(&RawSettings) -> &Option<bool>) -> bool {
        self.winner(get).map_or_else(|| default_of(field) == "true", |(on, _)| *on)
    }

    /// `otp_sender` with `otp_http_url` and `otp_http_token`, which only make sense together:
    /// `http` needs a URL, and a URL or token under `log` is refused rather than ignored.
    fn otp_sender(&self) -> Result<OtpSender, ConfigError> {
        let (kind, kind_origin) = self
            .winner(|r| &r.otp_sender)
            .map_or((default_of("otp_sender"), &Origin::Default), |(text, origin)| (text.as_str(), origin));
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

    /// Parses every setting into `Config`; names, defaults and ranges come from `SETTINGS`.
    pub(super) fn resolve(&self) -> Result<Config, ConfigError> {
        macro_rules! text {
            ($field:ident, $parse:expr) => {
                self.parse(stringify!($field), |r| &r.$field, default_of(stringify!($field)), $parse)?
            };
        }
        macro_rules! checked {
            ($check:ident, $field:ident) => {
                self.$check(stringify!($field), |r| &r.$field)
            };
        }
        let listen = text!(listen, parse_listen);
        let public_url_default = default_of("public_url").replace("<listen>", &listen.to_string());
        Ok(Config {
            listen,
            database_url: text!(database_url, parse_database_url),
            database_max_connections: checked!(count, database_max_connections)?,
            database_acquire_timeout: checked!(duration, database_acquire_timeout)?,
            database_connect_timeout: checked!(duration, database_connect_timeout)?,
            public_url: self.parse("public_url", |r| &r.public_url, &public_url_default, parse_public_url)?,
            session_ttl: checked!(duration, session_ttl)?,
            webhook_retry_schedule: text!(webhook_retry_schedule, parse_retry_schedule),
            webhook_timeout: checked!(duration, webhook_timeout)?,
            webhook_concurrency: checked!(count, webhook_concurrency)?,
            webhook_concurrency_per_subscription: checked!(count, webhook_concurrency_per_subscription)?,
            delivery_retention: checked!(duration, delivery_retention)?,
            webhook_suspend_after: checked!(duration, webhook_suspend_after)?,
            allow_private_callbacks: checked!(switch, allow_private_callbacks),
            allow_http_redirect_urls: checked!(switch, allow_http_redirect_urls),
            rate_limit_per_key: text!(rate_limit_per_key, parse_rate),
            rate_limit_per_ip: text!(rate_limit_per_ip, parse_rate),
            metrics_listen: text!(metrics_listen, |text| {
                if text == METRICS_OFF {
                    return Ok(None);
                }
                parse_listen(text).map(Some).map_err(|e| format!("{e}, or {METRICS_OFF}"))
            }),
            http_header_timeout: checked!(duration, http_header_timeout)?,
            http_body_timeout: checked!(duration, http_body_timeout)?,
            http_max_connections: checked!(count, http_max_connections)?,
            expiry_sweep: checked!(switch, expiry_sweep),
            webhook_dispatcher: checked!(switch, webhook_dispatcher),
            log: text!(log, |text| Ok(text.to_owned())),
            otp_sender: self.otp_sender()?,
            secrets_key: self.secret("secrets_key", |r| &r.secrets_key, SecretKey::parse)?,
            secrets_old_keys: self
                .secret("secrets_old_keys", |r| &r.secrets_old_keys, parse_key_list)?
                .unwrap_or_default(),
        })
    }
}

pub(super) fn read_file(path: &Path) -> Result<RawSettings, ConfigError> {
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

/// The layer of `REDIRECT_SESSIONS_*` variables, or with `plain` that of the unprefixed ones.
pub(super) fn env_layer(env: &HashMap<String, String>, plain: bool) -> Result<RawSettings, ConfigError> {
    let origin = if plain { Origin::PlainEnv } else { Origin::Env };
    let mut raw = RawSettings::default();
    for setting in SETTINGS {
        let name = if plain { setting.plain_env.map(str::to_owned) } else { Some(setting.env_name()) };
        let Some(value) = name.and_then(|name| env_text(env, &name)) else { continue };
        match (setting.slot)(&mut raw) {
            Slot::Text(slot) => *slot = Some(value),
            Slot::Switch(slot) => {
                *slot = Some(parse_bool(&value).map_err(|problem| origin.error(setting.name, &value, &problem))?)
            }
        }
    }
    Ok(raw)
}
