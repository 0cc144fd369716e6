//! What every request and background job shares: the store, the settings, the signing keys,
//! the metrics, and the per-process tables of rate limits and requests in flight. It depends on
//! nothing in `api/` or `app`, so both can use it.

mod in_flight;

use std::sync::{Arc, RwLock};

pub use in_flight::{Claim, InFlight};

use crate::config::Config;
use crate::domain::time::Timestamp;
use crate::domain::token::{KeyPair, Keyring};
use crate::metrics::Metrics;
use crate::store::{self, DynStore, StoreError};
use crate::webhooks::client::WebhookClient;

/// Everything a handler may need. One `Arc`, so cloning it per request and per middleware
/// costs one atomic increment.
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

/// What `AppState` shares.
pub struct Shared {
    pub store: DynStore,
    pub config: Config,
    /// `config.public_url` without a trailing slash.
    pub public_url: String,
    /// The hosted page: `<public_url>/pay`, every session's `redirectUrl` and tokens' audience.
    pub pay_url: String,
    /// Delivers one-time codes to customers.
    pub code_sender: crate::code_sender::CodeSender,
    pub keyring: RwLock<Arc<Keyring>>,
    pub metrics: Arc<Metrics>,
    pub limits: crate::rate_limit::Limits,
    /// The requests with an `x-request-id` running in this process.
    pub in_flight: InFlight,
    /// Sends webhooks: the dispatcher's attempts and merchants' test events.
    pub webhook_client: WebhookClient,
}

impl std::ops::Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

impl AppState {
    /// Opens (and migrates) the store and loads or creates the signing key.
    pub async fn open(config: Config) -> Result<AppState, StoreError> {
        let store = store::open(&config, true).await?;
        let keyring = load_keyring(&store).await?;
        let code_sender = crate::code_sender::CodeSender::new(config.otp_sender.clone())
            .map_err(|e| StoreError::Internal(format!("cannot build the one-time code sender: {e}")))?;
        let public_url = config.public_base();
        let webhook_client =
            WebhookClient::new(config.webhook_timeout, config.allow_private_callbacks, config.webhook_concurrency)
                .map_err(|e| StoreError::Internal(format!("cannot build the webhook client: {e}")))?;
        Ok(AppState(Arc::new(Shared {
            webhook_client,
            pay_url: format!("{public_url}{}", crate::config::PAY_PATH),
            public_url,
            code_sender,
            limits: crate::rate_limit::Limits::new(config.rate_limit_per_key, config.rate_limit_per_ip),
            in_flight: InFlight::default(),
            config,
            store,
            keyring: RwLock::new(Arc::new(keyring)),
            metrics: Arc::new(Metrics::new()),
        })))
    }

    /// The keyring in use now.
    pub fn keyring(&self) -> Arc<Keyring> {
        self.keyring.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

async fn load_keyring(store: &DynStore) -> Result<Keyring, StoreError> {
    let candidate = KeyPair::generate().map_err(|e| StoreError::Internal(e.to_string()))?;
    let keys = store.signing_keys(candidate, Timestamp::now()).await?;
    Ok(Keyring::new(&keys.current, &keys.previous))
}

/// Reads the signing keys and makes them the ones tokens are signed and checked with.
pub async fn reload_keys_now(state: &AppState) -> Result<(), StoreError> {
    let keyring = load_keyring(&state.store).await?;
    *state.keyring.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(keyring);
    Ok(())
}
