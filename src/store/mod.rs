//! Storage: the `Store` trait with one method per use case and the backends; the records it
//! speaks in and the decisions on them are the domain's (`crate::domain::record`). Every method that changes a session writes its event in the same
//! transaction.

pub mod customer;
pub mod deliveries;
pub mod idempotency;
pub mod keys;
pub mod merchants;
pub mod postgres;
pub(crate) mod rows;
pub mod sealing;
pub mod sessions;
pub mod sqlite;
pub mod subscriptions;

/// The webhook records the store speaks in (`crate::domain::webhooks`).
pub use crate::domain::webhooks;

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use uuid::Uuid;

use crate::domain::session::State;
use crate::domain::time::Timestamp;
use crate::domain::token::KeyPair;

pub use self::idempotency::{Found, Guard, Guarded, IdempotencyKey, Kept, StoredResponse};
pub use crate::domain::record::{
    decide_cancel, etag_matches, event_data, CancelDecision, CancelOutcome, CancelRequest, CreateOutcome, Merchant,
    SessionRecord,
};

/// Which of a merchant's sessions to list, newest first.
#[derive(Clone, Debug, Default)]
pub struct SessionFilter {
    pub state: Option<State>,
    /// Inclusive.
    pub created_from: Option<Timestamp>,
    /// Exclusive.
    pub created_to: Option<Timestamp>,
    /// Only sessions older than this (created, id) position: the cursor.
    pub after: Option<(Timestamp, Uuid)>,
    pub limit: usize,
}

/// The signing keys: the one to sign with and every public key still accepted.
#[derive(Clone, Debug)]
pub struct SigningKeys {
    pub current: KeyPair,
    pub previous: Vec<(String, [u8; 32])>,
}

/// A storage failure. Domain outcomes (not found, conflicts) are not errors.
#[derive(Clone, Debug)]
pub enum StoreError {
    /// The database cannot be reached or is shutting down: `503`.
    Unavailable(String),
    /// Anything else: `500`.
    Internal(String),
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreError::Unavailable(why) => write!(f, "database unavailable: {why}"),
            StoreError::Internal(why) => write!(f, "database error: {why}"),
        }
    }
}

impl std::error::Error for StoreError {}

/// The storage a backend provides: one trait per area, one method per use case, each area
/// implemented in a file of its own per backend (`sqlite/<area>.rs`, `postgres/<area>.rs`).
/// Callers bring the area traits into scope with `use crate::store::prelude::*`.
#[async_trait]
pub trait Store:
    sessions::SessionStore
    + merchants::MerchantStore
    + customer::CustomerStore
    + idempotency::IdempotencyStore
    + keys::KeyStore
    + subscriptions::SubscriptionStore
    + deliveries::DeliveryStore
    + Send
    + Sync
    + 'static
{
    /// `Ok` when the database answers and is migrated.
    async fn ready(&self) -> Result<(), StoreError>;

    /// What the backend reports about itself on `/metrics`.
    fn stats(&self) -> StoreStats;
}

/// What the tests of the store read besides the use cases (a session's events); not part of
/// `Store`, so nothing in the service can call it. The API tests read the events table directly.
#[cfg(test)]
#[async_trait]
pub(crate) trait Inspect: Store {
    /// The events of one session, oldest first.
    async fn session_events(
        &self,
        session_id: Uuid,
    ) -> Result<Vec<(Uuid, crate::domain::event::EventType)>, StoreError>;
}

/// A backend's own figures for `/metrics`: SQLite's group commit, PostgreSQL's connection pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreStats {
    /// The SQLite writer: write transactions committed (each one fsync) and the writes they
    /// carried (their ratio is the mean batch size).
    WriteBatches { batches: u64, jobs: u64 },
    /// The PostgreSQL connection pool: its bound, the connections open, those idle, and the
    /// calls waiting for one.
    Pool { max: usize, open: usize, idle: usize, waiting: usize },
}

impl StoreStats {
    /// The series to expose: (name, help, Prometheus type, value).
    pub fn series(&self) -> Vec<(&'static str, &'static str, &'static str, u64)> {
        match *self {
            StoreStats::WriteBatches { batches, jobs } => vec![
                ("store_write_batches_total", "Write transactions committed (each one fsync).", "counter", batches),
                ("store_write_jobs_total", "Writes committed in those transactions.", "counter", jobs),
            ],
            StoreStats::Pool { max, open, idle, waiting } => vec![
                ("store_pool_max_connections", "Connections the pool may open.", "gauge", max as u64),
                ("store_pool_connections", "Connections open.", "gauge", open as u64),
                ("store_pool_idle_connections", "Open connections not in use.", "gauge", idle as u64),
                ("store_pool_waiting", "Calls waiting for a connection.", "gauge", waiting as u64),
            ],
        }
    }
}

/// The area traits, for calling a `DynStore`.
pub mod prelude {
    pub use super::customer::CustomerStore;
    pub use super::deliveries::DeliveryStore;
    pub use super::idempotency::IdempotencyStore;
    pub use super::keys::KeyStore;
    pub use super::merchants::MerchantStore;
    pub use super::sessions::SessionStore;
    pub use super::subscriptions::SubscriptionStore;
    pub use super::Store;
}

/// The outcome of a write that ran without a guard (it cannot have lost to a kept record).
pub(crate) fn ran<O>(guarded: Guarded<O>) -> Result<O, StoreError> {
    match guarded {
        Guarded::Ran(outcome, _) => Ok(outcome),
        Guarded::Earlier(_) => Err(StoreError::Internal("a write without a key found a kept record".to_owned())),
    }
}

/// A shared handle to the backend in use.
pub type DynStore = Arc<dyn Store>;

/// Opens the backend the configured URL names, migrating it when `migrate` is set (which
/// also seals secrets still in clear and checks that the others open with the configured
/// keys: `crate::secrets::key_ring`).
pub async fn open(config: &crate::config::Config, migrate: bool) -> Result<DynStore, StoreError> {
    let secrets = Arc::new(crate::secrets::key_ring(config).map_err(StoreError::Internal)?);
    match &config.database_url {
        crate::config::DatabaseUrl::Sqlite { path } => {
            let store = sqlite::SqliteStore::open(path, migrate, secrets).await?;
            Ok(Arc::new(store))
        }
        crate::config::DatabaseUrl::Postgres(url) => {
            let store = postgres::PostgresStore::open(url, pool_settings(config), migrate, secrets).await?;
            Ok(Arc::new(store))
        }
    }
}

fn pool_settings(config: &crate::config::Config) -> postgres::PoolSettings {
    postgres::PoolSettings {
        max_connections: config.database_max_connections,
        acquire_timeout: config.database_acquire_timeout,
        connect_timeout: config.database_connect_timeout,
    }
}

/// `secrets rotate`: migrates the configured database, then seals every secret again with
/// `secrets_key` (opening those of earlier keys with `secrets_old_keys`); answers the id of
/// the key now in use and the counts.
pub async fn rotate_secrets(config: &crate::config::Config) -> Result<(String, crate::secrets::Resealed), StoreError> {
    let secrets = Arc::new(crate::secrets::key_ring(config).map_err(StoreError::Internal)?);
    let key_id = secrets.current_id().to_owned();
    let counts = match &config.database_url {
        crate::config::DatabaseUrl::Sqlite { path } => sqlite::rotate_secrets(path, secrets).await?,
        crate::config::DatabaseUrl::Postgres(url) => {
            postgres::PostgresStore::open(url, pool_settings(config), true, secrets).await?.rotate_secrets().await?
        }
    };
    Ok((key_id, counts))
}
