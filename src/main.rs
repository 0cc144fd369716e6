//! The `redirect-sessions` command line: serve, migrate, merchant, customer, signing-key,
//! openapi, migrate-data. Bad settings stop it with one line on stderr and exit code 2.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use redirect_sessions::admin::{self, AdminError};
use redirect_sessions::app::{self, AppState};
use redirect_sessions::config::{Config, RawSettings};
use redirect_sessions::domain::validate::parse_uuid;

/// mimalloc rather than the system allocator: every request allocates and frees many small
/// buffers on two or more threads, where glibc's allocator spent about a tenth of the server's
/// time (docs/BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
use redirect_sessions::migrate_data::{self, MigrateDataError};
use redirect_sessions::{api, secrets, store, telemetry};
use uuid::Uuid;

#[derive(Parser)]
#[command(name = "redirect-sessions", version, about = "Redirect sessions for payment merchants.")]
struct Cli {
    /// A TOML file of settings (defaults < file < REDIRECT_SESSIONS_* variables < flags).
    #[arg(long, global = true, value_name = "PATH")]
    config: Option<PathBuf>,
    /// sqlite://PATH (default sqlite://./data/redirect-sessions.db) or postgres://…; also DATABASE_URL.
    #[arg(long, global = true, value_name = "URL")]
    database_url: Option<String>,
    /// PostgreSQL connections per instance (default 16).
    #[arg(long, global = true, value_name = "N")]
    database_max_connections: Option<String>,
    /// How long a request waits for a free PostgreSQL connection (default 5s).
    #[arg(long, global = true, value_name = "DURATION")]
    database_acquire_timeout: Option<String>,
    /// How long opening a PostgreSQL connection may take (default 5s).
    #[arg(long, global = true, value_name = "DURATION")]
    database_connect_timeout: Option<String>,
    /// The key that encrypts secrets at rest: base64 of 32 bytes (required with PostgreSQL; on
    /// SQLite a key file beside the database otherwise). Prefer REDIRECT_SESSIONS_SECRETS_KEY:
    /// flags are visible to other local users.
    #[arg(long, global = true, value_name = "KEY")]
    secrets_key: Option<String>,
    /// Earlier keys that still decrypt, comma separated (for rotation).
    #[arg(long, global = true, value_name = "KEYS")]
    secrets_old_keys: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the API, the expiry sweep and the webhook dispatcher.
    Serve(Box<ServeArgs>),
    /// Apply database migrations and exit.
    Migrate,
    /// Manage merchants.
    #[command(subcommand)]
    Merchant(MerchantCommand),
    /// Manage customers.
    #[command(subcommand)]
    Customer(CustomerCommand),
    /// Manage the keys that sign session tokens.
    #[command(subcommand, name = "signing-key")]
    SigningKey(SigningKeyCommand),
    /// Manage the key that encrypts secrets at rest.
    #[command(subcommand)]
    Secrets(SecretsCommand),
    /// Print the OpenAPI document.
    Openapi,
    /// Copy every row of a SQLite deployment into an empty PostgreSQL database (stop the service
    /// first). Prints the rows copied per table as JSON. The global --database-url is ignored.
    MigrateData {
        /// The SQLite database to copy, opened read-only: sqlite://PATH.
        #[arg(long, value_name = "URL")]
        from: Option<String>,
        /// The PostgreSQL database to fill: postgres://… It is migrated first and must hold no rows.
        #[arg(long, value_name = "URL")]
        to: Option<String>,
    },
}

#[derive(Args)]
struct ServeArgs {
    /// Address to listen on (default 127.0.0.1:8080).
    #[arg(long, value_name = "ADDR")]
    listen: Option<String>,
    /// The public base URL of this service, used in tokens, redirect URLs and error links.
    #[arg(long, value_name = "URL")]
    public_url: Option<String>,
    /// Session time to live, e.g. 15m or 2s (default 15m).
    #[arg(long, value_name = "DURATION")]
    session_ttl: Option<String>,
    /// Webhook retry delays, e.g. 1s,2s,5s (default 5s,5m,30m,2h,5h,10h,10h).
    #[arg(long, value_name = "LIST")]
    webhook_retry_schedule: Option<String>,
    /// Webhook request timeout (default 10s).
    #[arg(long, value_name = "DURATION")]
    webhook_timeout: Option<String>,
    /// Webhook attempts in flight per instance (default 256).
    #[arg(long, value_name = "N")]
    webhook_concurrency: Option<String>,
    /// Webhook attempts in flight per subscription, so one slow receiver cannot take every
    /// slot (default 16).
    #[arg(long, value_name = "N")]
    webhook_concurrency_per_subscription: Option<String>,
    /// How long finished deliveries, their attempts and events are kept (default 30d).
    #[arg(long, value_name = "DURATION")]
    delivery_retention: Option<String>,
    /// How long a receiver may answer nothing but failures before its subscription is
    /// suspended (default 5d).
    #[arg(long, value_name = "DURATION")]
    webhook_suspend_after: Option<String>,
    /// Allow http and loopback/private webhook callback targets (for tests).
    #[arg(long)]
    allow_private_callbacks: bool,
    /// Allow http redirect URLs in sessions (for tests).
    #[arg(long)]
    allow_http_redirect_urls: bool,
    /// Requests per second per API key, burst twice that; 0 turns it off (default 1000).
    #[arg(long, value_name = "RATE")]
    rate_limit_per_key: Option<String>,
    /// Requests per second per client address, burst twice that; 0 turns it off (default 0).
    #[arg(long, value_name = "RATE")]
    rate_limit_per_ip: Option<String>,
    /// Serve /metrics on this separate address instead of the main listener.
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<String>,
    /// How long a client may take to send a request's headers, also the idle time allowed
    /// between requests on a connection (default 10s).
    #[arg(long, value_name = "DURATION")]
    http_header_timeout: Option<String>,
    /// How long a client may take to send a request's whole body; then 408 (default 30s).
    #[arg(long, value_name = "DURATION")]
    http_body_timeout: Option<String>,
    /// Connections open at once per listener; more wait until one closes (default 10000).
    #[arg(long, value_name = "N")]
    http_max_connections: Option<String>,
    /// Do not run the expiry sweep in this instance.
    #[arg(long)]
    no_expiry_sweep: bool,
    /// Do not run the webhook dispatcher in this instance.
    #[arg(long)]
    no_webhook_dispatcher: bool,
    /// Log filter, e.g. info or info,redirect_sessions=debug.
    #[arg(long, value_name = "FILTER")]
    log: Option<String>,
    /// How one-time codes reach customers: log (a log line, development) or http (default log).
    #[arg(long, value_name = "log|http")]
    otp_sender: Option<String>,
    /// Where the http one-time-code sender POSTs codes (required with --otp-sender http).
    #[arg(long, value_name = "URL")]
    otp_http_url: Option<String>,
    /// Bearer token for the http one-time-code sender; flags are visible to other local users,
    /// so prefer REDIRECT_SESSIONS_OTP_HTTP_TOKEN or the config file.
    #[arg(long, value_name = "TOKEN")]
    otp_http_token: Option<String>,
}

#[derive(Subcommand)]
enum MerchantCommand {
    /// Create a merchant; prints {"merchantId", "apiKey"} (the key is shown only once).
    Create {
        #[arg(long)]
        name: String,
    },
    /// List merchants.
    List,
    /// Replace a merchant's API key; prints the new key.
    RotateKey {
        #[arg(long, value_name = "ID")]
        merchant_id: String,
    },
    /// Disable a merchant: its key is refused from now on.
    Disable {
        #[arg(long, value_name = "ID")]
        merchant_id: String,
    },
}

#[derive(Subcommand)]
enum CustomerCommand {
    /// Create a customer; prints {"customerId"}.
    Create {
        /// E.164 phone number, e.g. +4915112345678.
        #[arg(long)]
        phone: String,
    },
}

#[derive(Subcommand)]
enum SecretsCommand {
    /// Encrypt every stored secret again with secrets_key (values of earlier keys are read with
    /// secrets_old_keys); prints the counts as JSON.
    Rotate,
    /// Print a new random key ({"secretsKey"}) for secrets_key.
    GenerateKey,
}

#[derive(Subcommand)]
enum SigningKeyCommand {
    /// Make a new key current; tokens signed with the old key stay valid.
    Rotate,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut flags = RawSettings {
        database_url: cli.database_url.clone(),
        database_max_connections: cli.database_max_connections.clone(),
        database_acquire_timeout: cli.database_acquire_timeout.clone(),
        database_connect_timeout: cli.database_connect_timeout.clone(),
        secrets_key: cli.secrets_key.clone(),
        secrets_old_keys: cli.secrets_old_keys.clone(),
        ..RawSettings::default()
    };
    if let Command::Serve(serve) = &cli.command {
        flags.listen = serve.listen.clone();
        flags.public_url = serve.public_url.clone();
        flags.session_ttl = serve.session_ttl.clone();
        flags.webhook_retry_schedule = serve.webhook_retry_schedule.clone();
        flags.webhook_timeout = serve.webhook_timeout.clone();
        flags.webhook_concurrency = serve.webhook_concurrency.clone();
        flags.webhook_concurrency_per_subscription = serve.webhook_concurrency_per_subscription.clone();
        flags.delivery_retention = serve.delivery_retention.clone();
        flags.webhook_suspend_after = serve.webhook_suspend_after.clone();
        flags.allow_private_callbacks = serve.allow_private_callbacks.then_some(true);
        flags.allow_http_redirect_urls = serve.allow_http_redirect_urls.then_some(true);
        flags.rate_limit_per_key = serve.rate_limit_per_key.clone();
        flags.rate_limit_per_ip = serve.rate_limit_per_ip.clone();
        flags.metrics_listen = serve.metrics_listen.clone();
        flags.http_header_timeout = serve.http_header_timeout.clone();
        flags.http_body_timeout = serve.http_body_timeout.clone();
        flags.http_max_connections = serve.http_max_connections.clone();
        flags.expiry_sweep = serve.no_expiry_sweep.then_some(false);
        flags.webhook_dispatcher = serve.no_webhook_dispatcher.then_some(false);
        flags.log = serve.log.clone();
        flags.otp_sender = serve.otp_sender.clone();
        flags.otp_http_url = serve.otp_http_url.clone();
        flags.otp_http_token = serve.otp_http_token.clone();
    }
    let mut env: HashMap<String, String> = std::env::vars().collect();
    if let Command::MigrateData { .. } = &cli.command {
        // migrate-data names both databases itself; a database URL given for the other commands
        // (flag or environment) is ignored rather than checked.
        flags.database_url = None;
        env.remove("DATABASE_URL");
        env.remove("REDIRECT_SESSIONS_DATABASE_URL");
    }
    let config = match Config::load(cli.config.as_deref(), &env, &flags) {
        Ok(config) => config,
        Err(error) => return usage_error(&error.to_string()),
    };
    if let Err(error) = telemetry::init(&config.log) {
        return usage_error(&error);
    }
    if let Command::Openapi = cli.command {
        print!("{}", api::docs::openapi_json());
        return ExitCode::SUCCESS;
    }
    if let Command::Secrets(SecretsCommand::GenerateKey) = cli.command {
        return match secrets::SecretKey::generate() {
            Ok(key) => {
                println!("{}", serde_json::json!({"secretsKey": key.to_base64(), "keyId": key.id()}));
                ExitCode::SUCCESS
            }
            Err(error) => failure(&error.to_string()),
        };
    }
    // Every other command but migrate-data opens the configured database, whose secrets need
    // the key.
    if !matches!(cli.command, Command::MigrateData { .. }) {
        if let Err(message) = secrets::check_config(&config) {
            return usage_error(&message);
        }
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => return failure(&format!("cannot start the runtime: {error}")),
    };
    runtime.block_on(run(cli.command, config))
}

async fn run(command: Command, config: Config) -> ExitCode {
    match command {
        Command::Serve(_) => serve(config).await,
        Command::Migrate => match store::open(&config, true).await {
            Ok(_) => {
                println!("{}", serde_json::json!({"migrated": true}));
                ExitCode::SUCCESS
            }
            Err(error) => failure(&error.to_string()),
        },
        Command::Openapi => unreachable!("handled before the runtime starts"),
        Command::MigrateData { from, to } => {
            let settings = store::postgres::PoolSettings {
                max_connections: 1,
                acquire_timeout: config.database_acquire_timeout,
                connect_timeout: config.database_connect_timeout,
            };
            match migrate_data::migrate_data(from.as_deref(), to.as_deref(), settings).await {
                Ok(summary) => {
                    println!("{}", summary.to_json());
                    ExitCode::SUCCESS
                }
                Err(MigrateDataError::Usage(message)) => usage_error(&message),
                Err(MigrateDataError::Failed(message)) => failure(&message),
            }
        }
        Command::Merchant(command) => {
            if let MerchantCommand::RotateKey { merchant_id } | MerchantCommand::Disable { merchant_id } = &command {
                if let Err(AdminError::Invalid(message)) = merchant_uuid(merchant_id) {
                    return usage_error(&message);
                }
            }
            if let MerchantCommand::Create { name } = &command {
                if let Err(message) = admin::check_merchant_name(name) {
                    return usage_error(&message);
                }
            }
            admin_command(&config, |store| async move {
                match command {
                    MerchantCommand::Create { name } => admin::create_merchant(&store, &name).await,
                    MerchantCommand::List => admin::list_merchants(&store).await,
                    MerchantCommand::RotateKey { merchant_id } => {
                        admin::rotate_merchant_key(&store, merchant_uuid(&merchant_id)?).await
                    }
                    MerchantCommand::Disable { merchant_id } => {
                        admin::disable_merchant(&store, merchant_uuid(&merchant_id)?).await
                    }
                }
            })
            .await
        }
        Command::Customer(CustomerCommand::Create { phone }) => {
            if let Err(message) = redirect_sessions::domain::request::e164(&phone) {
                return usage_error(&format!("--phone {message}"));
            }
            admin_command(&config, |store| async move { admin::create_customer(&store, &phone).await }).await
        }
        Command::Secrets(SecretsCommand::Rotate) => match store::rotate_secrets(&config).await {
            Ok((key_id, counts)) => {
                println!("{}", counts.to_json(&key_id));
                ExitCode::SUCCESS
            }
            Err(error) => failure(&error.to_string()),
        },
        Command::Secrets(SecretsCommand::GenerateKey) => unreachable!("handled before the runtime starts"),
        Command::SigningKey(SigningKeyCommand::Rotate) => {
            admin_command(&config, |store| async move { admin::rotate_signing_key(&store).await }).await
        }
    }
}

fn merchant_uuid(text: &str) -> Result<Uuid, AdminError> {
    parse_uuid(text).map_err(|m| AdminError::Invalid(format!("--merchant-id {m}")))
}

async fn admin_command<F, Fut>(config: &Config, command: F) -> ExitCode
where
    F: FnOnce(store::DynStore) -> Fut,
    Fut: std::future::Future<Output = Result<serde_json::Value, AdminError>>,
{
    let store = match store::open(config, true).await {
        Ok(store) => store,
        Err(error) => return failure(&error.to_string()),
    };
    match command(store).await {
        Ok(output) => {
            println!("{output}");
            ExitCode::SUCCESS
        }
        Err(AdminError::Invalid(message)) => usage_error(&message),
        Err(AdminError::Failed(message)) => failure(&message),
    }
}

async fn serve(mut config: Config) -> ExitCode {
    let shutdown = app::shutdown_signal();
    let listener = match tokio::net::TcpListener::bind(config.listen).await {
        Ok(listener) => listener,
        Err(error) => return failure(&format!("cannot listen on {}: {error}", config.listen)),
    };
    // With port 0 the OS picks the port; a public URL derived from the listen address must
    // name the port actually bound.
    if config.public_url.port() == Some(0) {
        if let Ok(address) = listener.local_addr() {
            config.public_url = format!("http://{address}").parse().expect("a socket address makes a valid URL");
        }
    }
    let state = match AppState::open(config).await {
        Ok(state) => state,
        Err(error) => return failure(&error.to_string()),
    };
    match app::serve(state, listener, shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => failure(&error.to_string()),
    }
}

/// A bad setting or argument: one line, exit code 2.
fn usage_error(message: &str) -> ExitCode {
    eprintln!("error: {message}");
    ExitCode::from(2)
}

/// The command could not do its work: one line, exit code 1.
fn failure(message: &str) -> ExitCode {
    eprintln!("error: {message}");
    ExitCode::from(1)
}
