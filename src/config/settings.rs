//! The one declaration of every setting: its TOML key (the name), default, help, which command
//! line takes its flag, and the range its value is checked against. The TOML file's keys
//! (`RawSettings`), the `REDIRECT_SESSIONS_*` variables, the flags with their `--help` lines and
//! README.md's configuration table are all generated from `SETTINGS` below (docs/DESIGN.md
//! "Settings: one declaration each"); `Layers::resolve` only adds the parsing into `Config`.

use std::time::Duration;

/// The prefix of every setting's environment variable: `REDIRECT_SESSIONS_<NAME in capitals>`.
const ENV_PREFIX: &str = "REDIRECT_SESSIONS_";

/// How the TOML file may write a setting, which also decides its raw type in `RawSettings`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Form {
    /// A string.
    Text,
    /// A string or a TOML integer.
    Number,
    /// A comma separated string or a TOML array of strings.
    List,
    /// A boolean (`true`, `false`, `1` or `0` in the environment); its flag only flips the
    /// default: `--name` when the default is false, `--no-name` when it is true.
    Switch,
    /// A string that errors name but never show.
    Secret,
    /// Like `List`, and never shown.
    SecretList,
}

/// Which command line takes a setting's flag.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// Every command (a global flag), e.g. the database settings.
    Global,
    /// Only `serve`.
    Serve,
}

/// The values a setting accepts, where a plain range says it: the error message, `--help` and
/// README.md all take the range from here. Other settings are checked by their parser in
/// `layers.rs` and say their rules in their help.
#[derive(Clone, Copy, Debug)]
pub enum Check {
    Parser,
    /// A duration (see `parse_duration`) from `min` to `max`; `range` says so in words.
    Duration {
        min: Duration,
        max: Duration,
        range: &'static str,
    },
    /// A whole number from 1 to `max`.
    Count {
        max: usize,
    },
}

/// One setting. Its environment variable and flag follow from the name (see `env_name`, `flag`).
#[derive(Clone, Copy)]
pub struct Setting {
    /// The TOML key and `Config` field.
    pub name: &'static str,
    pub form: Form,
    /// The text the setting has when no layer gives it, parsed like any other value; `None` when
    /// it is simply unset. `public_url`'s `<listen>` stands for the final listen address.
    pub default: Option<&'static str>,
    pub scope: Scope,
    /// The placeholder for the flag's value in `--help`.
    pub value_name: &'static str,
    /// One sentence without a final period; Markdown backquotes allowed (dropped in `--help`).
    pub help: &'static str,
    pub check: Check,
    /// A second environment variable without the prefix, below the prefixed one in precedence
    /// (`DATABASE_URL`, the name other tools already use).
    pub plain_env: Option<&'static str>,
    /// The setting's field in `RawSettings`.
    pub slot: for<'a> fn(&'a mut RawSettings) -> Slot<'a>,
}

/// A setting's field in `RawSettings`, whichever its raw type.
pub enum Slot<'a> {
    Text(&'a mut Option<String>),
    Switch(&'a mut Option<bool>),
}

impl<'a> From<&'a mut Option<String>> for Slot<'a> {
    fn from(slot: &'a mut Option<String>) -> Slot<'a> {
        Slot::Text(slot)
    }
}

impl<'a> From<&'a mut Option<bool>> for Slot<'a> {
    fn from(slot: &'a mut Option<bool>) -> Slot<'a> {
        Slot::Switch(slot)
    }
}

impl Setting {
    /// What entries of the table leave out.
    const BASE: Setting = Setting {
        name: "",
        form: Form::Text,
        default: None,
        scope: Scope::Serve,
        value_name: "",
        help: "",
        check: Check::Parser,
        plain_env: None,
        slot: |_| unreachable!("every entry of SETTINGS has its own slot"),
    };

    /// `REDIRECT_SESSIONS_<NAME>`.
    pub fn env_name(&self) -> String {
        format!("{ENV_PREFIX}{}", self.name.to_ascii_uppercase())
    }

    /// The flag with its dashes, e.g. `--session-ttl`, or `--no-expiry-sweep` for a switch that
    /// is on by default.
    pub fn flag(&self) -> String {
        let dashed = self.name.replace('_', "-");
        match (self.form, self.default) {
            (Form::Switch, Some("true")) => format!("--no-{dashed}"),
            _ => format!("--{dashed}"),
        }
    }

    /// The help with the range, if the check has one.
    pub fn help_with_range(&self) -> String {
        match self.check {
            Check::Parser => self.help.to_owned(),
            Check::Duration { range, .. } => format!("{}; {range}", self.help),
            Check::Count { max } => format!("{}; 1 to {max}", self.help),
        }
    }
}

/// The declaration of `name`; every name `Layers::resolve` asks for is declared.
pub fn find(name: &str) -> &'static Setting {
    SETTINGS.iter().find(|setting| setting.name == name).unwrap_or_else(|| panic!("setting {name} is not declared"))
}

/// `RawSettings` (one `Option` per setting, typed and deserialized from TOML as its form says),
/// then `SETTINGS` with a slot into it per entry.
macro_rules! settings {
    ($($name:ident: $form:ident { $($field:ident: $value:expr,)* })*) => {
        raw_settings!([] $($name $form)*);

        /// Every setting, in the order of README.md's table.
        pub const SETTINGS: &[Setting] = &[$(Setting {
            name: stringify!($name),
            form: form!($form),
            slot: |raw| Slot::from(&mut raw.$name),
            $($field: $value,)*
            ..Setting::BASE
        }),*];
    };
}

macro_rules! form {
    (text) => {
        Form::Text
    };
    (number) => {
        Form::Number
    };
    (list) => {
        Form::List
    };
    (switch) => {
        Form::Switch
    };
    (secret) => {
        Form::Secret
    };
    (secret_list) => {
        Form::SecretList
    };
}

/// Collects one field per setting, with the serde attribute its form needs, then declares the struct.
macro_rules! raw_settings {
    ([$($done:tt)*] $name:ident text $($rest:tt)*) => {
        raw_settings!([$($done)* pub $name: Option<String>,] $($rest)*);
    };
    ([$($done:tt)*] $name:ident switch $($rest:tt)*) => {
        raw_settings!([$($done)* pub $name: Option<bool>,] $($rest)*);
    };
    ([$($done:tt)*] $name:ident number $($rest:tt)*) => {
        raw_settings!([$($done)*
            #[serde(default, deserialize_with = "crate::config::parse::text_or_number")]
            pub $name: Option<String>,
        ] $($rest)*);
    };
    ([$($done:tt)*] $name:ident list $($rest:tt)*) => {
        raw_settings!([$($done)*
            #[serde(default, deserialize_with = "crate::config::parse::text_or_list")]
            pub $name: Option<String>,
        ] $($rest)*);
    };
    ([$($done:tt)*] $name:ident secret $($rest:tt)*) => {
        raw_settings!([$($done)*
            #[serde(default, deserialize_with = "crate::config::parse::secret_text")]
            pub $name: Option<String>,
        ] $($rest)*);
    };
    ([$($done:tt)*] $name:ident secret_list $($rest:tt)*) => {
        raw_settings!([$($done)*
            #[serde(default, deserialize_with = "crate::config::parse::secret_text_or_list")]
            pub $name: Option<String>,
        ] $($rest)*);
    };
    ([$($done:tt)*]) => {
        /// Raw, unparsed values of every setting, as one layer gives them; all optional. Numbers,
        /// lists and switches as text or booleans; parsing happens once, after layering.
        #[derive(Clone, Debug, Default, serde::Deserialize)]
        #[serde(deny_unknown_fields)] // for the TOML file
        pub struct RawSettings { $($done)* }
    };
}

const fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

const fn mins(n: u64) -> Duration {
    Duration::from_secs(n * 60)
}

const fn hours(n: u64) -> Duration {
    Duration::from_secs(n * 3600)
}

/// "more than 0 and at most 5m", the range of the timeouts towards other services.
const UP_TO_5M: Check = Check::Duration { min: ms(1), max: mins(5), range: "more than 0 and at most 5m" };

settings! {
    listen: text {
        default: Some("127.0.0.1:8080"),
        value_name: "ADDR",
        help: "address of the HTTP listener",
    }
    database_url: text {
        default: Some("sqlite://./data/redirect-sessions.db"),
        scope: Scope::Global,
        value_name: "URL",
        help: "`sqlite://PATH`, or `postgres://USER@HOST:PORT/DB` for several instances",
        plain_env: Some("DATABASE_URL"),
    }
    database_max_connections: number {
        default: Some("16"),
        scope: Scope::Global,
        value_name: "N",
        help: "PostgreSQL connections per instance",
        check: Check::Count { max: 1000 },
    }
    database_acquire_timeout: text {
        default: Some("5s"),
        scope: Scope::Global,
        value_name: "DURATION",
        help: "how long a request waits for a free PostgreSQL connection, then `503`",
        check: UP_TO_5M,
    }
    database_connect_timeout: text {
        default: Some("5s"),
        scope: Scope::Global,
        value_name: "DURATION",
        help: "how long opening a PostgreSQL connection may take",
        check: UP_TO_5M,
    }
    public_url: text {
        default: Some("http://<listen>"),
        value_name: "URL",
        help: "public base URL: token issuer, `redirectUrl`, `moreInfo` links; an absolute `http(s)` URL \
               without query, fragment or user info",
    }
    session_ttl: text {
        default: Some("15m"),
        value_name: "DURATION",
        help: "time to live of a session, e.g. `15m` or `2s`",
        check: Check::Duration { min: ms(1000), max: hours(24), range: "from 1s to 24h" },
    }
    webhook_retry_schedule: list {
        default: Some("5s,5m,30m,2h,5h,10h,10h"),
        value_name: "LIST",
        help: "webhook retry delays, comma separated (in the file also an array); 1 to 20 delays, each more \
               than 0 and at most 7d",
    }
    webhook_timeout: text {
        default: Some("10s"),
        value_name: "DURATION",
        help: "webhook request timeout",
        check: UP_TO_5M,
    }
    webhook_concurrency: number {
        default: Some("256"),
        value_name: "N",
        help: "webhook attempts in flight per instance",
        check: Check::Count { max: 10_000 },
    }
    webhook_concurrency_per_subscription: number {
        default: Some("16"),
        value_name: "N",
        help: "webhook attempts in flight per subscription, so one slow receiver cannot take every slot",
        check: Check::Count { max: 10_000 },
    }
    delivery_retention: text {
        default: Some("30d"),
        value_name: "DURATION",
        help: "how long finished deliveries, their attempts and events are kept",
        check: Check::Duration { min: hours(1), max: hours(24 * 3650), range: "from 1h to 3650d" },
    }
    webhook_suspend_after: text {
        default: Some("5d"),
        value_name: "DURATION",
        help: "how long a receiver may answer nothing but failures before its subscription is suspended",
        check: Check::Duration { min: mins(1), max: hours(24 * 90), range: "from 1m to 90d" },
    }
    allow_private_callbacks: switch {
        default: Some("false"),
        help: "allow `http` and private/loopback webhook targets (tests only)",
    }
    allow_http_redirect_urls: switch {
        default: Some("false"),
        help: "allow `http` redirect URLs in sessions (tests only)",
    }
    rate_limit_per_key: number {
        default: Some("1000"),
        value_name: "RATE",
        help: "requests per second per API key, burst twice that; `0` turns it off",
    }
    rate_limit_per_ip: number {
        default: Some("0"),
        value_name: "RATE",
        help: "requests per second per client address, burst twice that; `0` turns it off",
    }
    metrics_listen: text {
        default: Some("off"),
        value_name: "ADDR",
        help: "serve `/metrics` on this separate address instead of the main listener; `off` serves it on \
               the main listener",
    }
    http_header_timeout: text {
        default: Some("10s"),
        value_name: "DURATION",
        help: "time a client has to send a request's headers, and to start the next request on a kept-alive \
               connection; then the connection is closed",
        check: Check::Duration { min: ms(100), max: mins(5), range: "from 100ms to 5m" },
    }
    http_body_timeout: text {
        default: Some("30s"),
        value_name: "DURATION",
        help: "time a client has to send a request's whole body; then `408` and the connection is closed",
        check: Check::Duration { min: ms(100), max: mins(10), range: "from 100ms to 10m" },
    }
    http_max_connections: number {
        default: Some("10000"),
        value_name: "N",
        help: "connections open at once, per listener; more wait in the listen backlog until one closes",
        check: Check::Count { max: 1_000_000 },
    }
    expiry_sweep: switch {
        default: Some("true"),
        help: "run the expiry sweep in this instance",
    }
    webhook_dispatcher: switch {
        default: Some("true"),
        help: "run the webhook dispatcher in this instance",
    }
    log: text {
        default: Some("info"),
        value_name: "FILTER",
        help: "log filter, e.g. `info` or `info,redirect_sessions=debug`",
    }
    otp_sender: text {
        default: Some("log"),
        value_name: "log|http",
        help: "how one-time codes reach customers: `log` (a log line, development) or `http`",
    }
    otp_http_url: text {
        value_name: "URL",
        help: "where the `http` one-time-code sender POSTs codes, required with it (docs/OPERATIONS.md)",
    }
    otp_http_token: secret {
        value_name: "TOKEN",
        help: "bearer token for the `http` one-time-code sender; prefer the variable or the file, as flags \
               are visible to other local users",
    }
    secrets_key: secret {
        scope: Scope::Global,
        value_name: "KEY",
        help: "base64 of 32 bytes: encrypts subscription API keys and signing secrets and the token signing \
               keys in the database; required with PostgreSQL, on SQLite a key file `<db>.secrets-key` when \
               not set (docs/OPERATIONS.md); prefer the variable, as flags are visible to other local users",
    }
    secrets_old_keys: secret_list {
        scope: Scope::Global,
        value_name: "KEYS",
        help: "earlier keys that still decrypt, comma separated (for rotation)",
    }
}
