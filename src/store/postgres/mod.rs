//! The PostgreSQL backend, for several stateless instances sharing one database. Every race is
//! settled inside PostgreSQL at READ COMMITTED — row locks taken before deciding, conditional
//! writes, `FOR UPDATE SKIP LOCKED` for work queues, `ON CONFLICT` for first-writer-wins — so
//! it holds however many processes write at once (see `docs/DESIGN.md`).
//!
//! Connections are plain TCP (`NoTls`): run PostgreSQL on a private network, over a Unix
//! socket, or behind a TLS-terminating proxy. Keeping TLS out keeps the dependency tree small.

mod customer;
mod deliveries;
mod idempotency;
mod keys;
mod listen;
mod merchants;
mod schema;
mod secrets;
mod sessions;
mod subscriptions;
#[cfg(test)]
mod tests;
mod webhooks;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::{BufMut, BytesMut};
use deadpool_postgres::{
    GenericClient, Manager, ManagerConfig, Object, Pool, PoolError, RecyclingMethod, Runtime, TimeoutType,
};
use tokio::sync::Notify;
use tokio_postgres::types::{FromSql, IsNull, Json, ToSql, Type};
use tokio_postgres::{NoTls, Row};
use uuid::Uuid;

use crate::domain::event::EventKind;
use crate::domain::subscription::SubscriptionSpec;
use crate::domain::time::Timestamp;
use crate::domain::token::KeyPair;
use crate::secrets::{KeyRing, Resealed};
use crate::store::prelude::*;
use crate::store::rows::Columns;
use crate::store::sealing::{open_subscription, seal_signing_key, seal_subscription};
use crate::store::webhooks::{
    AttemptOutcome, AttemptRecord, Backlog, ChangeSubscriptionOutcome, ClaimedDelivery, DeliveryFilter, DeliveryRecord,
    PutSubscriptionOutcome, RecoverOutcome, RecoverWindow, RedeliverOutcome, Retention, SecretRotation,
    SubscriptionChange, SubscriptionRecord, SuspendPolicy, Suspension, TestDelivery,
};
use crate::store::{Guard, Guarded, Merchant, SigningKeys, Store, StoreError, StoreStats};

/// How long one statement may run before the server cancels it (set on every connection).
const STATEMENT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one store call may hold its connection: a short transaction of a few statements.
/// Past it the call answers `Unavailable` and the connection is discarded, so that a hung
/// server or network costs a bounded wait, never a hung request.
const OPERATION_TIMEOUT: Duration = Duration::from_secs(15);
/// A session left idle inside a transaction (a bug, or a process frozen mid-call) gives up its
/// locks after this long.
const IDLE_IN_TRANSACTION_TIMEOUT: Duration = Duration::from_secs(60);

/// How the connection pool behaves.
#[derive(Clone, Copy, Debug)]
pub struct PoolSettings {
    /// Connections this instance may open at most.
    pub max_connections: usize,
    /// How long a call waits for a free connection before answering `Unavailable`.
    pub acquire_timeout: Duration,
    /// How long opening one connection may take.
    pub connect_timeout: Duration,
}

/// The PostgreSQL store.
pub struct PostgresStore {
    pool: Pool,
    queued: Arc<Notify>,
    /// The LISTEN connection, which also holds the dispatchers' liveness locks; it stops when
    /// the store goes away.
    listener: listen::Listener,
    /// Seals and opens the secrets the database keeps (`crate::secrets`).
    secrets: Arc<KeyRing>,
}

type Client = Object;
type Result<T> = std::result::Result<T, StoreError>;
/// A use case's work on one pooled connection.
type Job<'c, T> = Pin<Box<dyn Future<Output = Result<T>> + Send + 'c>>;

impl PostgresStore {
    /// Connects to the database at `url` (`postgres://…`), migrating it when `migrate` is set
    /// (and then sealing secrets still in clear and checking that the others open with
    /// `secrets`), and starts listening for delivery wake-ups. `Unavailable` when the server
    /// cannot be reached.
    pub async fn open(
        url: &str,
        settings: PoolSettings,
        migrate: bool,
        secrets: Arc<KeyRing>,
    ) -> Result<PostgresStore> {
        let config = connection_config(url, settings)?;
        let manager = Manager::from_config(
            config.clone(),
            NoTls,
            // `Fast` checks only that the connection is still open; a connection broken by a
            // server restart is closed by then, so it is dropped rather than handed out.
            ManagerConfig { recycling_method: RecyclingMethod::Fast },
        );
        let pool = Pool::builder(manager)
            .max_size(settings.max_connections.max(1))
            .wait_timeout(Some(settings.acquire_timeout))
            .create_timeout(Some(settings.connect_timeout))
            .recycle_timeout(Some(settings.connect_timeout))
            .runtime(Runtime::Tokio1)
            .build()
            .map_err(|e| StoreError::Internal(format!("cannot build the connection pool: {e}")))?;
        {
            // Connect once now so that a wrong URL or a down server fails `open`, as SQLite does.
            let mut client = pool.get().await.map_err(pool_error)?;
            if migrate {
                schema::migrate(&mut client).await?;
                let sealed = secrets::reseal(&mut client, &secrets, false).await?;
                if sealed.total() > 0 {
                    tracing::info!(
                        subscriptions = sealed.subscriptions,
                        signing_keys = sealed.signing_keys,
                        "encrypted secrets stored in clear"
                    );
                }
            }
        }
        let queued = Arc::new(Notify::new());
        let listener = listen::spawn(config, queued.clone());
        Ok(PostgresStore { pool, queued, listener, secrets })
    }

    /// Seals every secret again with the current key (`secrets rotate`).
    pub async fn rotate_secrets(&self) -> Result<Resealed> {
        let mut client = self.pool.get().await.map_err(pool_error)?;
        secrets::reseal(&mut client, &self.secrets, true).await
    }

    /// Runs `job` on a pooled connection, bounded by `OPERATION_TIMEOUT`.
    async fn run<T: Send>(&self, job: impl for<'c> FnOnce(&'c mut Client) -> Job<'c, T> + Send) -> Result<T> {
        self.run_within(OPERATION_TIMEOUT, job).await
    }

    /// Runs `job` on a pooled connection, giving up after `limit`.
    async fn run_within<T: Send>(
        &self,
        limit: Duration,
        job: impl for<'c> FnOnce(&'c mut Client) -> Job<'c, T> + Send,
    ) -> Result<T> {
        let mut client = self.pool.get().await.map_err(pool_error)?;
        match tokio::time::timeout(limit, job(&mut client)).await {
            Ok(result) => result,
            Err(_) => {
                // A statement may still be in flight and a transaction open on this
                // connection: close it rather than hand it to the next caller. The server does
                // not notice a closed socket while a statement runs, so cancel that statement
                // too, or it would hold its locks until `statement_timeout`.
                let cancel = client.cancel_token();
                drop(Object::take(client));
                tokio::spawn(async move {
                    let _ = tokio::time::timeout(OPERATION_TIMEOUT, cancel.cancel_query(NoTls)).await;
                });
                Err(StoreError::Unavailable("the database did not answer in time".to_owned()))
            }
        }
    }

    /// Wakes the local dispatcher after a commit that queued deliveries (other instances are
    /// woken by the `NOTIFY` that committed with them).
    fn queued_deliveries(&self, queued: usize) {
        if queued > 0 {
            self.queued.notify_one();
        }
    }
}

/// Applies every migration to the database at `url` without starting a store (no pool kept,
/// no `LISTEN` connection), and answers the connection settings a store would use, for a
/// connection of the caller's own (`migrate-data` loads its rows through one).
pub async fn migrate_database(url: &str, settings: PoolSettings) -> Result<tokio_postgres::Config> {
    let config = connection_config(url, settings)?;
    let manager =
        Manager::from_config(config.clone(), NoTls, ManagerConfig { recycling_method: RecyclingMethod::Fast });
    let pool = Pool::builder(manager)
        .max_size(1)
        .wait_timeout(Some(settings.acquire_timeout))
        .create_timeout(Some(settings.connect_timeout))
        .runtime(Runtime::Tokio1)
        .build()
        .map_err(|e| StoreError::Internal(format!("cannot build the connection pool: {e}")))?;
    let mut client = pool.get().await.map_err(pool_error)?;
    schema::migrate(&mut client).await?;
    Ok(config)
}

/// The connection settings: the URL, plus timeouts and keepalives so that every wait is bounded.
fn connection_config(url: &str, settings: PoolSettings) -> Result<tokio_postgres::Config> {
    // The parser's message never repeats the URL, which may hold a password.
    let mut config: tokio_postgres::Config =
        url.parse().map_err(|e| StoreError::Internal(format!("invalid PostgreSQL URL: {e}")))?;
    let ours = format!(
        "-c statement_timeout={} -c idle_in_transaction_session_timeout={}",
        STATEMENT_TIMEOUT.as_millis(),
        IDLE_IN_TRANSACTION_TIMEOUT.as_millis()
    );
    let options = match config.get_options() {
        Some(given) if !given.trim().is_empty() => format!("{given} {ours}"),
        _ => ours,
    };
    config.options(options);
    if config.get_application_name().is_none() {
        config.application_name("redirect-sessions");
    }
    config
        .connect_timeout(settings.connect_timeout)
        // A peer that vanished without a reset (network partition, frozen VM) is noticed in
        // well under a minute instead of the kernel's two hours.
        .keepalives(true)
        .keepalives_idle(Duration::from_secs(30))
        .keepalives_interval(Duration::from_secs(10))
        .keepalives_retries(3)
        .tcp_user_timeout(Duration::from_secs(30));
    Ok(config)
}

fn pool_error(error: PoolError) -> StoreError {
    match error {
        PoolError::Timeout(TimeoutType::Wait) => {
            StoreError::Unavailable("no database connection became free in time".to_owned())
        }
        PoolError::Timeout(TimeoutType::Create) => {
            StoreError::Unavailable("connecting to the database timed out".to_owned())
        }
        PoolError::Timeout(TimeoutType::Recycle) => {
            StoreError::Unavailable("checking a database connection timed out".to_owned())
        }
        PoolError::Backend(error) => error.into(),
        PoolError::Closed => StoreError::Unavailable("the connection pool is closed".to_owned()),
        other => StoreError::Internal(format!("connection pool: {other}")),
    }
}

/// Server unreachable, connection lost, server shutting down, out of connections or a
/// statement timed out: `Unavailable` (503, worth retrying). Anything else is `Internal`.
impl From<tokio_postgres::Error> for StoreError {
    fn from(error: tokio_postgres::Error) -> Self {
        let unavailable = match error.code() {
            Some(code) => {
                let code = code.code();
                // 57014: cancelled by `statement_timeout`, the bound that keeps a request from
                // hanging on a stuck or overloaded server; like our own deadline, it is a 503.
                code.starts_with("08") || matches!(code, "57P01" | "57P02" | "57P03" | "53300" | "57014")
            }
            // No SQLSTATE: the failure is on the way to the server (refused, reset, closed,
            // timed out) unless it is a (de)serialisation error of ours.
            None => {
                error.is_closed()
                    || std::error::Error::source(&error).is_some_and(|s| s.is::<std::io::Error>())
                    || error.to_string().starts_with("timeout")
                    || error.to_string().starts_with("error connecting")
            }
        };
        let message = describe(&error);
        if unavailable {
            StoreError::Unavailable(message)
        } else {
            StoreError::Internal(message)
        }
    }
}

/// The error with its cause: `tokio_postgres::Error` alone prints only "db error".
fn describe(error: &tokio_postgres::Error) -> String {
    match error.as_db_error() {
        Some(db) => format!("{} {}: {}", db.severity(), db.code().code(), db.message()),
        None => match std::error::Error::source(error) {
            Some(cause) => format!("{error}: {cause}"),
            None => error.to_string(),
        },
    }
}

fn internal(message: impl Into<String>) -> StoreError {
    StoreError::Internal(message.into())
}

/// A `Timestamp` as `timestamptz`. PostgreSQL keeps microseconds since 2000-01-01 UTC; we write
/// whole milliseconds, so every stored instant reads back exactly. (`migrate-data` writes its
/// times with it too.)
#[derive(Clone, Copy, Debug)]
pub struct Ts(pub Timestamp);

/// 2000-01-01T00:00:00Z in Unix milliseconds.
const PG_EPOCH_MILLIS: i64 = 946_684_800_000;

impl ToSql for Ts {
    fn to_sql(
        &self,
        _: &Type,
        out: &mut BytesMut,
    ) -> std::result::Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        let micros = self
            .0
            .millis()
            .checked_sub(PG_EPOCH_MILLIS)
            .and_then(|m| m.checked_mul(1000))
            .ok_or("timestamp out of range")?;
        out.put_i64(micros);
        Ok(IsNull::No)
    }

    tokio_postgres::types::accepts!(TIMESTAMPTZ);
    tokio_postgres::types::to_sql_checked!();
}

impl<'a> FromSql<'a> for Ts {
    fn from_sql(_: &Type, raw: &'a [u8]) -> std::result::Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        let micros = i64::from_be_bytes(raw.try_into()?);
        // Rounds towards the past, so a sub-millisecond value written by hand stays ordered.
        Ok(Ts(Timestamp::from_millis(micros.div_euclid(1000) + PG_EPOCH_MILLIS)))
    }

    tokio_postgres::types::accepts!(TIMESTAMPTZ);
}

/// Reads the `timestamptz` at `index`.
fn ts(row: &Row, index: usize) -> Result<Timestamp> {
    Ok(row.try_get::<_, Ts>(index)?.0)
}

/// PostgreSQL's values: `uuid`, `timestamptz` (`Ts`), `jsonb`.
impl Columns for Row {
    type Error = StoreError;

    fn uuid(&self, index: usize) -> Result<Uuid> {
        Ok(self.try_get(index)?)
    }

    fn uuid_opt(&self, index: usize) -> Result<Option<Uuid>> {
        Ok(self.try_get(index)?)
    }

    fn text(&self, index: usize) -> Result<String> {
        Ok(self.try_get(index)?)
    }

    fn int(&self, index: usize) -> Result<i64> {
        match *self.columns()[index].type_() {
            Type::INT4 => Ok(i64::from(self.try_get::<_, i32>(index)?)),
            _ => Ok(self.try_get(index)?),
        }
    }

    fn flag(&self, index: usize) -> Result<bool> {
        Ok(self.try_get(index)?)
    }

    fn time(&self, index: usize) -> Result<Timestamp> {
        ts(self, index)
    }

    fn bytes(&self, index: usize) -> Result<Vec<u8>> {
        Ok(self.try_get(index)?)
    }

    fn json<T: serde::de::DeserializeOwned>(&self, index: usize) -> Result<T> {
        let Json(value) = self.try_get::<_, Json<T>>(index)?;
        Ok(value)
    }

    fn is_null(&self, index: usize) -> Result<bool> {
        Ok(self.try_get::<_, Option<AnyValue>>(index)?.is_none())
    }

    fn invalid(&self, index: usize, what: String) -> StoreError {
        internal(format!("column {index}: {what}"))
    }
}

/// A value of any type, read only to learn whether it is `NULL`.
struct AnyValue;

impl<'a> FromSql<'a> for AnyValue {
    fn from_sql(_: &Type, _: &'a [u8]) -> std::result::Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(AnyValue)
    }

    fn accepts(_: &Type) -> bool {
        true
    }
}

/// Reads the nullable `timestamptz` at `index`.
fn ts_opt(row: &Row, index: usize) -> Result<Option<Timestamp>> {
    Ok(row.try_get::<_, Option<Ts>>(index)?.map(|t| t.0))
}

/// A 32-byte `bytea` (hashes, keys).
fn bytes32(row: &Row, index: usize) -> Result<[u8; 32]> {
    let bytes: &[u8] = row.try_get(index)?;
    bytes.try_into().map_err(|_| internal(format!("column {index} does not hold 32 bytes")))
}

/// A count or limit as a `bigint` parameter.
fn int8(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Runs a statement through the connection's statement cache (one round trip once prepared).
async fn query<C: GenericClient>(c: &C, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Vec<Row>> {
    let statement = c.prepare_cached(sql).await?;
    Ok(c.query(&statement, params).await?)
}

async fn query_opt<C: GenericClient>(c: &C, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Option<Row>> {
    let statement = c.prepare_cached(sql).await?;
    Ok(c.query_opt(&statement, params).await?)
}

async fn query_one<C: GenericClient>(c: &C, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Row> {
    let statement = c.prepare_cached(sql).await?;
    Ok(c.query_one(&statement, params).await?)
}

async fn execute<C: GenericClient>(c: &C, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<u64> {
    let statement = c.prepare_cached(sql).await?;
    Ok(c.execute(&statement, params).await?)
}

/// A statement assembled from optional filters; parameters are numbered as they are bound.
#[derive(Default)]
struct Sql {
    text: String,
    params: Vec<Box<dyn ToSql + Sync + Send>>,
}

impl Sql {
    fn new(text: &str) -> Self {
        Sql { text: text.to_owned(), params: Vec::new() }
    }

    /// Adds `value` as the next parameter and answers its placeholder (`$n`).
    fn bind(&mut self, value: impl ToSql + Sync + Send + 'static) -> String {
        self.params.push(Box::new(value));
        format!("${}", self.params.len())
    }

    fn push(&mut self, text: &str) {
        self.text.push_str(text);
    }

    async fn query<C: GenericClient>(&self, c: &C) -> Result<Vec<Row>> {
        let params: Vec<&(dyn ToSql + Sync)> = self.params.iter().map(|p| p.as_ref() as &(dyn ToSql + Sync)).collect();
        query(c, &self.text, &params).await
    }
}

/// The kind of event a delivery carries, named `text`.
fn parse_event_kind(text: &str) -> Result<EventKind> {
    EventKind::parse(text).ok_or_else(|| internal(format!("unknown event type {text}")))
}

#[async_trait]
impl Store for PostgresStore {
    async fn ready(&self) -> Result<()> {
        self.run(|c| Box::pin(schema::check_current(c))).await
    }

    fn stats(&self) -> StoreStats {
        let status = self.pool.status();
        StoreStats::Pool { max: status.max_size, open: status.size, idle: status.available, waiting: status.waiting }
    }
}
