//! Settings: defaults, then a TOML file, then REDIRECT_SESSIONS_* environment variables, then flags.
//!
//! Each setting is declared once, in `settings.rs` (name, default, help, flag, range); the TOML
//! keys, environment variables, flags and README.md's table come from there. Every layer only says
//! which raw text (or boolean) it sets; parsing happens once, after layering (`layers.rs`), so that
//! an error can name the exact setting and the layer that supplied the bad value.

mod flags;
mod layers;
mod parse;
mod settings;
#[cfg(test)]
mod tests;

use std::{collections::HashMap, fmt, net::SocketAddr, path::Path, path::PathBuf, time::Duration};

use crate::secrets::SecretKey;
use layers::{env_layer, read_file, Layers, Origin};
use parse::redact;

pub use flags::{markdown_table, GlobalFlags, ServeFlags};
pub use parse::{parse_database_url, parse_duration, parse_duration_list};
pub use settings::{Check, Form, RawSettings, Scope, Setting, SETTINGS};

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

/// The hosted page's address below `public_url`: every session's `redirectUrl` and its tokens'
/// audience.
pub const PAY_PATH: &str = "/pay";

/// Every setting, parsed. Each field is the setting of the same name in `settings::SETTINGS`,
/// which holds its default, range and meaning (and README.md's table, generated from it).
#[derive(Clone, Debug)]
pub struct Config {
    pub listen: SocketAddr,
    pub database_url: DatabaseUrl,
    pub database_max_connections: usize,
    pub database_acquire_timeout: Duration,
    pub database_connect_timeout: Duration,
    /// Without query, fragment or user info.
    pub public_url: url::Url,
    pub session_ttl: Duration,
    pub webhook_retry_schedule: Vec<Duration>,
    pub webhook_timeout: Duration,
    pub webhook_concurrency: usize,
    /// The leases one subscription may hold.
    pub webhook_concurrency_per_subscription: usize,
    pub delivery_retention: Duration,
    pub webhook_suspend_after: Duration,
    pub allow_private_callbacks: bool,
    pub allow_http_redirect_urls: bool,
    /// 0 = off.
    pub rate_limit_per_key: u32,
    /// 0 = off.
    pub rate_limit_per_ip: u32,
    /// None: metrics are served on the main listener.
    pub metrics_listen: Option<SocketAddr>,
    pub http_header_timeout: Duration,
    pub http_body_timeout: Duration,
    pub http_max_connections: usize,
    pub expiry_sweep: bool,
    pub webhook_dispatcher: bool,
    /// Passed through as-is.
    pub log: String,
    /// `otp_sender` with `otp_http_url` and `otp_http_token`; Debug hides the token.
    pub otp_sender: OtpSender,
    /// The key that encrypts secrets at rest (`crate::secrets`). Debug shows only its id.
    pub secrets_key: Option<SecretKey>,
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
        layers.push((env_layer(env, true)?, Origin::PlainEnv));
        layers.push((env_layer(env, false)?, Origin::Env));
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
