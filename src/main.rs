//! The `redirect-sessions` command line: serve, migrate, merchant, customer, signing-key,
//! secrets, openapi, settings, migrate-data. Bad settings stop it with one line on stderr and
//! exit code 2.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use redirect_sessions::admin::{self, AdminError};
use redirect_sessions::app;
use redirect_sessions::config::{self, Config, GlobalFlags, ServeFlags};
use redirect_sessions::domain::validate::parse_uuid;
use redirect_sessions::state::AppState;

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
    // Every command's settings flags (`Scope::Global` in src/config/settings.rs).
    #[command(flatten)]
    settings: GlobalFlags,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the API, the expiry sweep and the webhook dispatcher.
    Serve(Box<ServeFlags>),
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
    /// Print the table of settings (TOML key, environment variable, flag, default, meaning) as
    /// Markdown: README.md's configuration table is this output.
    Settings,
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
    if let Command::Settings = cli.command {
        print!("{}", config::markdown_table());
        return ExitCode::SUCCESS;
    }
    let mut flags = cli.settings.0.clone();
    if let Command::Serve(serve) = &cli.command {
        flags.overlay(serve.0.clone());
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
        Command::Openapi | Command::Settings => unreachable!("handled before the runtime starts"),
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
