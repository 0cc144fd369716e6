//! The embedded SQLite backend: WAL, `synchronous=FULL`, one writer thread with group commit
//! and a few reader threads (see `docs/DESIGN.md`).

mod customer;
mod deliveries;
mod idempotency;
mod keys;
mod merchants;
mod schema;
mod secrets;
mod sessions;
mod subscriptions;
mod webhooks;
mod worker;

pub use self::schema::applied_version as schema_version;
pub use self::secrets::rotate as rotate_secrets;

use std::path::Path;
use std::sync::{Arc, LazyLock};

use async_trait::async_trait;
use rusqlite::{params, Connection, OpenFlags, OptionalExtension, Row};
use tokio::sync::Notify;
use uuid::Uuid;

use self::sessions::{change_state, load_session};
use self::worker::{internal, BatchedReads, Readers, Writer};
use crate::domain::event::EventType;
use crate::domain::session::{State, LIVE_STATES};
use crate::domain::subscription::SubscriptionSpec;
use crate::domain::time::Timestamp;
use crate::domain::token::KeyPair;
use crate::secrets::KeyRing;
use crate::store::prelude::*;
use crate::store::rows::{self, Columns, LIVE, SESSION_COLUMNS};
use crate::store::sealing::{open_subscription, seal_signing_key, seal_subscription};
use crate::store::webhooks::{
    AttemptOutcome, AttemptRecord, Backlog, ChangeSubscriptionOutcome, ClaimedDelivery, DeliveryFilter, DeliveryRecord,
    PutSubscriptionOutcome, RecoverOutcome, RecoverWindow, RedeliverOutcome, Retention, SecretRotation,
    SubscriptionChange, SubscriptionRecord, SuspendPolicy, Suspension, TestDelivery,
};
use crate::store::{
    decide_cancel, CancelDecision, CancelOutcome, CancelRequest, CreateOutcome, Guard, Guarded, Merchant,
    SessionFilter, SessionRecord, SigningKeys, Store, StoreError, StoreStats,
};

/// How much of the database file is memory-mapped: none. Every connection's map counted the
/// pages it touched in the process's resident memory (42 MiB of the 102 MiB peak under the
/// load benchmark) and saved no measurable CPU: reads cost the same through each
/// connection's page cache (docs/BENCHMARKS.md "Memory: no memory map").
const MMAP_BYTES: u64 = 0;

/// WAL frames (pages) after which the committing writer copies the WAL into the database
/// file (SQLite's default is 1000).
const WAL_CHECKPOINT_FRAMES: u32 = 8000;

/// How many reader connections (and threads) serve reads.
const READERS: usize = 4;

/// The SQLite store.
pub struct SqliteStore {
    writer: Writer,
    readers: Readers,
    point_reads: BatchedReads,
    queued: Arc<Notify>,
    /// Seals and opens the secrets the database keeps (`crate::secrets`).
    secrets: Arc<KeyRing>,
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path`; migrates it when `migrate` is set,
    /// and then seals secrets still in clear and checks that the others open with `secrets`.
    pub async fn open(path: &Path, migrate: bool, secrets: Arc<KeyRing>) -> Result<Self, StoreError> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| {
                StoreError::Unavailable(format!("cannot create the directory {}: {e}", parent.display()))
            })?;
        }
        let path = path.to_owned();
        tokio::task::spawn_blocking(move || {
            let writer = connect(&path, true)?;
            if migrate {
                schema::migrate(&writer)?;
                let sealed = self::secrets::reseal(&writer, &secrets, false)?;
                if sealed.total() > 0 {
                    tracing::info!(
                        subscriptions = sealed.subscriptions,
                        signing_keys = sealed.signing_keys,
                        "encrypted secrets stored in clear"
                    );
                }
            }
            let readers = (0..READERS).map(|_| connect(&path, false)).collect::<Result<Vec<_>, _>>()?;
            let (writer, _) = Writer::start(writer, Some(connect(&path, false)?));
            let (readers, _) = Readers::start(readers);
            let (point_reads, _) = BatchedReads::start(connect(&path, false)?);
            Ok(SqliteStore { writer, readers, point_reads, queued: Arc::new(Notify::new()), secrets })
        })
        .await
        .map_err(|e| StoreError::Internal(e.to_string()))?
    }
}

fn connect(path: &Path, write: bool) -> Result<Connection, StoreError> {
    let flags = if write {
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE | OpenFlags::SQLITE_OPEN_NO_MUTEX
    } else {
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX
    };
    let connection = Connection::open_with_flags(path, flags)
        .map_err(|e| StoreError::Unavailable(format!("cannot open the SQLite database {}: {e}", path.display())))?;
    // Savepoints (one per job of a write batch) journal the pages they change in temporary
    // storage: memory, not a temporary file.
    // WAL lets readers run beside the writer; synchronous=FULL fsyncs the WAL on every commit,
    // so an acknowledged write survives power loss. Reads go through each connection's page
    // cache (no memory map, `MMAP_BYTES`): readers keep a small one, the writer a larger one
    // for index pages.
    let cache_kib = if write { 16_000 } else { 2_000 };
    connection
        .execute_batch(&format!(
            "PRAGMA journal_mode = WAL;
             PRAGMA synchronous = FULL;
             PRAGMA foreign_keys = ON;
             PRAGMA busy_timeout = 5000;
             PRAGMA cache_size = -{cache_kib};
             PRAGMA mmap_size = {MMAP_BYTES};
             PRAGMA wal_autocheckpoint = {WAL_CHECKPOINT_FRAMES};
             PRAGMA temp_store = MEMORY;"
        ))
        .map_err(|e| internal(&e))?;
    connection.set_prepared_statement_cache_capacity(64);
    Ok(connection)
}

fn merchant_from_row(row: &Row<'_>) -> rusqlite::Result<Merchant> {
    rows::merchant(row)
}

fn optional_uuid_at(row: &Row<'_>, index: usize) -> rusqlite::Result<Option<Uuid>> {
    let bytes: Option<[u8; 16]> = row.get(index)?;
    Ok(bytes.map(Uuid::from_bytes))
}

fn uuid_at(row: &Row<'_>, index: usize) -> rusqlite::Result<Uuid> {
    let bytes: [u8; 16] = row.get(index)?;
    Ok(Uuid::from_bytes(bytes))
}

/// SQLite's values: ids as 16-byte blobs, times as Unix milliseconds, JSON as text.
impl Columns for Row<'_> {
    type Error = rusqlite::Error;

    fn uuid(&self, index: usize) -> rusqlite::Result<Uuid> {
        uuid_at(self, index)
    }

    fn uuid_opt(&self, index: usize) -> rusqlite::Result<Option<Uuid>> {
        optional_uuid_at(self, index)
    }

    fn text(&self, index: usize) -> rusqlite::Result<String> {
        self.get(index)
    }

    fn int(&self, index: usize) -> rusqlite::Result<i64> {
        self.get(index)
    }

    fn flag(&self, index: usize) -> rusqlite::Result<bool> {
        self.get(index)
    }

    fn time(&self, index: usize) -> rusqlite::Result<Timestamp> {
        Ok(Timestamp::from_millis(self.get(index)?))
    }

    fn bytes(&self, index: usize) -> rusqlite::Result<Vec<u8>> {
        self.get(index)
    }

    fn json<T: serde::de::DeserializeOwned>(&self, index: usize) -> rusqlite::Result<T> {
        let text = self.get_ref(index)?.as_str().map_err(|e| self.invalid(index, e.to_string()))?;
        serde_json::from_str(text).map_err(|e| self.invalid(index, format!("unreadable JSON: {e}")))
    }

    fn is_null(&self, index: usize) -> rusqlite::Result<bool> {
        Ok(matches!(self.get_ref(index)?, rusqlite::types::ValueRef::Null))
    }

    fn invalid(&self, index: usize, what: String) -> rusqlite::Error {
        rusqlite::Error::FromSqlConversionFailure(index, rusqlite::types::Type::Text, what.into())
    }
}

impl SqliteStore {
    /// Wakes the dispatcher when a committed write queued deliveries.
    fn queued_deliveries(&self, queued: usize) {
        if queued > 0 {
            self.queued.notify_one();
        }
    }
}

#[async_trait]
impl Store for SqliteStore {
    async fn ready(&self) -> Result<(), StoreError> {
        self.readers.run(schema::check_current).await
    }

    fn stats(&self) -> StoreStats {
        let (batches, jobs) = self.writer.counts();
        StoreStats::WriteBatches { batches, jobs }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_use_wal_and_fsync_every_commit() {
        let dir = tempfile::tempdir().unwrap();
        let connection = connect(&dir.path().join("d.db"), true).unwrap();
        let journal: String = connection.query_row("PRAGMA journal_mode", [], |r| r.get(0)).unwrap();
        let synchronous: i64 = connection.query_row("PRAGMA synchronous", [], |r| r.get(0)).unwrap();
        assert_eq!((journal.as_str(), synchronous), ("wal", 2), "synchronous=2 is FULL");
    }
}
