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

use self::worker::{internal, BatchedReads, Readers, Writer};
use crate::domain::event::EventType;
use crate::domain::session::{State, LIVE_STATES};
use crate::domain::subscription::SubscriptionSpec;
use crate::domain::time::Timestamp;
use crate::domain::token::KeyPair;
use crate::secrets::KeyRing;
use crate::store::prelude::*;
use crate::store::sealing::{open_subscription, seal_signing_key, seal_subscription};
use crate::store::webhooks::{
    AttemptOutcome, AttemptRecord, Backlog, ChangeSubscriptionOutcome, ClaimedDelivery, DeliveryFilter, DeliveryRecord,
    PutSubscriptionOutcome, RecoverOutcome, RecoverWindow, RedeliverOutcome, Retention, SecretRotation,
    SubscriptionChange, SubscriptionRecord, SuspendPolicy, Suspension, TestDelivery,
};
use crate::store::{
    decide_cancel, CancelDecision, CancelOutcome, CancelRequest, CreateOutcome, Guard, Guarded, Merchant,
    SessionFilter, SessionRecord, SigningKeys, Store, StoreError,
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
            let mut writer = connect(&path, true)?;
            if migrate {
                schema::migrate(&mut writer)?;
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

/// A session is live (it can still change state), written exactly as the condition of the
/// `sessions_due` index so that the expiry sweep can use it. Comparisons rather than an `IN`
/// list, which SQLite would build as a temporary table for every row it checks.
const LIVE: &str = "(state = 'Created' OR state = 'Opened' OR state = 'Authenticated')";

const SESSION_COLUMNS: &str = "id, merchant_id, state, spec, token, expires_on, created_on, last_modified_on, \
     last_correlation_id, version, customer_id, transaction_intent_id";

fn session_from_row(row: &Row<'_>) -> rusqlite::Result<SessionRecord> {
    session_at(row, 0)
}

/// The session whose `SESSION_COLUMNS` start at column `at`.
fn session_at(row: &Row<'_>, at: usize) -> rusqlite::Result<SessionRecord> {
    let bad = |i: usize, what: &str| {
        rusqlite::Error::FromSqlConversionFailure(at + i, rusqlite::types::Type::Text, what.to_owned().into())
    };
    let state: String = row.get(at + 2)?;
    let spec: String = row.get(at + 3)?;
    Ok(SessionRecord {
        id: uuid_at(row, at)?,
        merchant_id: uuid_at(row, at + 1)?,
        state: State::parse(&state).ok_or_else(|| bad(2, "unknown state"))?,
        spec: serde_json::from_str(&spec).map_err(|_| bad(3, "unreadable spec"))?,
        token: row.get(at + 4)?,
        expires_on: Timestamp::from_millis(row.get(at + 5)?),
        created_on: Timestamp::from_millis(row.get(at + 6)?),
        last_modified_on: Timestamp::from_millis(row.get(at + 7)?),
        last_correlation_id: uuid_at(row, at + 8)?,
        version: row.get(at + 9)?,
        customer_id: optional_uuid_at(row, at + 10)?,
        transaction_intent_id: optional_uuid_at(row, at + 11)?,
    })
}

fn optional_uuid_at(row: &Row<'_>, index: usize) -> rusqlite::Result<Option<Uuid>> {
    let bytes: Option<[u8; 16]> = row.get(index)?;
    Ok(bytes.map(Uuid::from_bytes))
}

fn uuid_at(row: &Row<'_>, index: usize) -> rusqlite::Result<Uuid> {
    let bytes: [u8; 16] = row.get(index)?;
    Ok(Uuid::from_bytes(bytes))
}

fn merchant_from_row(row: &Row<'_>) -> rusqlite::Result<Merchant> {
    Ok(Merchant {
        id: uuid_at(row, 0)?,
        name: row.get(1)?,
        disabled: row.get(2)?,
        created_on: Timestamp::from_millis(row.get(3)?),
    })
}

fn load_session(connection: &Connection, id: Uuid) -> Result<Option<SessionRecord>, StoreError> {
    static SQL: LazyLock<String> = LazyLock::new(|| format!("SELECT {SESSION_COLUMNS} FROM sessions WHERE id = ?1"));
    let mut statement = connection.prepare_cached(&SQL).map_err(|e| internal(&e))?;
    statement.query_row(params![id.as_bytes()], session_from_row).optional().map_err(|e| internal(&e))
}

/// Moves a live session to `to` with one conditional update (writing its customer and intent
/// as `session` has them), inserts its event and queues its deliveries. `None` when the condition no longer held (another writer won, or the clock
/// expired it); else how many deliveries were queued. An expiry is dated `expiresOn`, the
/// instant it happened, not the instant the sweep wrote it down, so that recording it does not
/// change what readers see.
fn change_state(
    connection: &Connection,
    session: &SessionRecord,
    to: State,
    correlation_id: Uuid,
    now: Timestamp,
) -> Result<Option<usize>, StoreError> {
    // Built once: this runs on the writer, the thread every write waits for.
    static UPDATE: LazyLock<String> = LazyLock::new(|| {
        format!(
            "UPDATE sessions SET state = ?2, version = version + 1, last_modified_on = ?3,
                    last_correlation_id = ?4, customer_id = ?8, transaction_intent_id = ?9
              WHERE id = ?1 AND version = ?5 AND {LIVE} AND (?6 = 0 OR expires_on > ?7)"
        )
    });
    let (changed_on, require_unexpired) = if to == State::Expired { (session.expires_on, false) } else { (now, true) };
    let changed = connection
        .prepare_cached(&UPDATE)
        .and_then(|mut s| {
            s.execute(params![
                session.id.as_bytes(),
                to.as_str(),
                changed_on.millis(),
                correlation_id.as_bytes(),
                session.version,
                require_unexpired,
                now.millis(),
                session.customer_id.map(|id| *id.as_bytes()),
                session.transaction_intent_id.map(|id| *id.as_bytes())
            ])
        })
        .map_err(|e| internal(&e))?;
    if changed == 0 {
        return Ok(None);
    }
    let Some(event) = EventType::for_state(to) else {
        return Ok(Some(0));
    };
    let data = crate::store::event_data(session, to, changed_on);
    let event_id = Uuid::now_v7();
    connection
        .prepare_cached(
            "INSERT INTO events (id, merchant_id, session_id, type, data, created_on)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )
        .and_then(|mut s| {
            s.execute(params![
                event_id.as_bytes(),
                session.merchant_id.as_bytes(),
                session.id.as_bytes(),
                event.as_str(),
                data.to_string(),
                now.millis()
            ])
        })
        .map_err(|e| internal(&e))?;
    webhooks::queue_deliveries(connection, event_id, session.merchant_id, event, now).map(Some)
}

/// The event type named `text`.
/// Inserts `session` (its spec already as JSON) unless its id exists or its customer is unknown.
fn create_in(c: &Connection, session: SessionRecord, spec: String, insert: &str) -> Result<CreateOutcome, StoreError> {
    if let Some(customer) = session.spec.customer_id {
        let known = c
            .prepare_cached("SELECT 1 FROM customers WHERE id = ?1")
            .and_then(|mut s| s.exists(params![customer.as_bytes()]))
            .map_err(|e| internal(&e))?;
        if !known {
            // An existing session is answered as such whatever its body says.
            return Ok(match load_session(c, session.id)? {
                Some(existing) => CreateOutcome::Exists(existing),
                None => CreateOutcome::CustomerNotFound,
            });
        }
    }
    // Insert first and look only when the id was taken: one index search for a
    // new session instead of two.
    let inserted = c
        .prepare_cached(insert)
        .and_then(|mut s| {
            s.execute(params![
                session.id.as_bytes(),
                session.merchant_id.as_bytes(),
                session.state.as_str(),
                spec,
                session.token,
                session.expires_on.millis(),
                session.created_on.millis(),
                session.last_modified_on.millis(),
                session.last_correlation_id.as_bytes(),
                session.version,
                session.customer_id.map(|id| *id.as_bytes()),
                session.transaction_intent_id.map(|id| *id.as_bytes())
            ])
        })
        .map_err(|e| internal(&e))?;
    if inserted == 1 {
        return Ok(CreateOutcome::Created(session));
    }
    let existing = load_session(c, session.id)?
        .ok_or_else(|| StoreError::Internal("a session id conflicted but no session has it".to_owned()))?;
    Ok(CreateOutcome::Exists(existing))
}

/// Cancels the session `request` names, or says why not; answers how many deliveries it queued.
fn cancel_in(c: &Connection, request: CancelRequest) -> Result<(CancelOutcome, usize), StoreError> {
    match decide_cancel(load_session(c, request.session_id)?, &request) {
        CancelDecision::Answer(outcome) => Ok((outcome, 0)),
        CancelDecision::Change(session, to) => {
            let Some(queued) = change_state(c, &session, to, request.correlation_id, request.now)? else {
                // Cannot happen with one writer; kept so both backends share one shape.
                return Ok((CancelOutcome::VersionMismatch, 0));
            };
            Ok((CancelOutcome::Cancelled(session.changed(to, request.now, request.correlation_id)), queued))
        }
    }
}

fn parse_event_type(text: &str) -> Option<EventType> {
    crate::domain::subscription::ALL_EVENT_TYPES.into_iter().find(|t| t.as_str() == text)
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

    fn write_batches(&self) -> Option<(u64, u64)> {
        Some(self.writer.counts())
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

    fn migrated() -> (Connection, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let mut connection = connect(&dir.path().join("d.db"), true).unwrap();
        schema::migrate(&mut connection).unwrap();
        (connection, dir)
    }

    #[test]
    fn the_live_condition_names_exactly_the_live_states() {
        let mut named: Vec<_> = LIVE.split('\'').skip(1).step_by(2).collect();
        let mut live: Vec<_> = LIVE_STATES.iter().map(|s| s.as_str()).collect();
        named.sort_unstable();
        live.sort_unstable();
        assert_eq!(named, live);
    }

    #[test]
    fn writes_of_a_session_build_no_temporary_tables_and_the_sweep_uses_its_index() {
        let (connection, _dir) = migrated();
        let opcodes = |sql: &str| -> Vec<String> {
            let mut statement = connection.prepare(&format!("EXPLAIN {sql}")).unwrap();
            let params = vec![rusqlite::types::Value::Null; statement.parameter_count()];
            let rows = statement.query_map(rusqlite::params_from_iter(params), |r| r.get::<_, String>(1)).unwrap();
            rows.map(Result::unwrap).collect()
        };
        let insert = format!(
            "INSERT INTO sessions ({SESSION_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)"
        );
        let update =
            format!("UPDATE sessions SET state = ?2, version = version + 1 WHERE id = ?1 AND version = ?3 AND {LIVE}");
        for sql in [insert, update] {
            assert!(!opcodes(&sql).iter().any(|op| op == "OpenEphemeral"), "{sql}");
        }
        let plan: String = connection
            .query_row(
                &format!("EXPLAIN QUERY PLAN SELECT id FROM sessions WHERE {LIVE} AND expires_on <= ?1"),
                [0],
                |r| r.get(3),
            )
            .unwrap();
        assert!(plan.contains("sessions_due"), "{plan}");
    }
}
