//! The embedded SQLite backend: WAL, `synchronous=FULL`, one writer thread with group commit
//! and a few reader threads (see `docs/DESIGN.md`).

mod customer;
mod idempotency;
mod schema;
mod secrets;
mod webhooks;
mod worker;

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
use crate::store::sealing::{open_subscription, seal_signing_key, seal_subscription};
use crate::store::webhooks::{
    AttemptOutcome, AttemptRecord, Backlog, ChangeSubscriptionOutcome, ClaimedDelivery, DeliveryFilter, DeliveryRecord,
    PutSubscriptionOutcome, RecoverOutcome, RecoverWindow, RedeliverOutcome, Retention, SecretRotation,
    SubscriptionChange, SubscriptionRecord, SuspendPolicy, Suspension, TestDelivery,
};
use crate::store::{
    decide_cancel, CancelDecision, CancelOutcome, CancelRequest, CreateOutcome, Found, Guard, Guarded, IdempotencyKey,
    Kept, Merchant, SessionFilter, SessionRecord, SigningKeys, Store, StoreError, StoredResponse,
};

/// How much of the database file is memory-mapped. Mapped pages count towards the process's
/// resident memory, so this bounds what reads can add to it.
const MMAP_BYTES: u64 = 32 * 1024 * 1024;

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
    // so an acknowledged write survives power loss. Reads go through a shared memory map of
    // the file (no read syscall per page, and one copy of each page for all connections), so
    // readers keep only a small private cache; the writer keeps a larger one for index pages.
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

    async fn create_merchant(&self, merchant: Merchant, key_hash: [u8; 32]) -> Result<(), StoreError> {
        self.writer
            .run(move |c| {
                c.execute(
                    "INSERT INTO merchants (id, name, api_key_hash, disabled, created_on) VALUES (?1, ?2, ?3, ?4, ?5)",
                    params![
                        merchant.id.as_bytes(),
                        merchant.name,
                        key_hash,
                        merchant.disabled,
                        merchant.created_on.millis()
                    ],
                )
                .map(drop)
                .map_err(|e| internal(&e))
            })
            .await
    }

    async fn merchant_by_key(&self, key_hash: [u8; 32]) -> Result<Option<Merchant>, StoreError> {
        self.point_reads
            .run(move |c| {
                c.prepare_cached("SELECT id, name, disabled, created_on FROM merchants WHERE api_key_hash = ?1")
                    .and_then(|mut s| s.query_row(params![key_hash], merchant_from_row).optional())
                    .map_err(|e| internal(&e))
            })
            .await
    }

    async fn list_merchants(&self) -> Result<Vec<Merchant>, StoreError> {
        self.readers
            .run(|c| {
                c.prepare_cached("SELECT id, name, disabled, created_on FROM merchants ORDER BY created_on, id")
                    .and_then(|mut s| s.query_map([], merchant_from_row)?.collect())
                    .map_err(|e| internal(&e))
            })
            .await
    }

    async fn rotate_merchant_key(&self, id: Uuid, key_hash: [u8; 32]) -> Result<bool, StoreError> {
        self.writer
            .run(move |c| {
                c.execute("UPDATE merchants SET api_key_hash = ?2 WHERE id = ?1", params![id.as_bytes(), key_hash])
                    .map(|n| n == 1)
                    .map_err(|e| internal(&e))
            })
            .await
    }

    async fn disable_merchant(&self, id: Uuid) -> Result<bool, StoreError> {
        self.writer
            .run(move |c| {
                c.execute("UPDATE merchants SET disabled = 1 WHERE id = ?1", params![id.as_bytes()])
                    .map(|n| n == 1)
                    .map_err(|e| internal(&e))
            })
            .await
    }

    async fn create_customer(&self, id: Uuid, phone: String, now: Timestamp) -> Result<(), StoreError> {
        self.writer
            .run(move |c| {
                c.execute(
                    "INSERT INTO customers (id, phone, created_on) VALUES (?1, ?2, ?3)",
                    params![id.as_bytes(), phone, now.millis()],
                )
                .map(drop)
                .map_err(|e| internal(&e))
            })
            .await
    }

    async fn create_session_guarded(
        &self,
        session: SessionRecord,
        guard: Option<Guard<CreateOutcome>>,
    ) -> Result<Guarded<CreateOutcome>, StoreError> {
        // Everything that does not need the database happens here, off the writer's thread:
        // the writer is the one thread every write waits for.
        let spec = serde_json::to_string(&session.spec).map_err(|e| StoreError::Internal(e.to_string()))?;
        static INSERT: LazyLock<String> = LazyLock::new(|| {
            format!(
                "INSERT INTO sessions ({SESSION_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)
                 ON CONFLICT (id) DO NOTHING"
            )
        });
        let (outcome, _) = self
            .writer
            .run_undoable(move |c| {
                idempotency::guarded(c, guard, |c| create_in(c, session, spec, &INSERT).map(|o| (o, 0)))
            })
            .await?;
        Ok(outcome)
    }

    async fn get_session(&self, id: Uuid) -> Result<Option<SessionRecord>, StoreError> {
        self.point_reads.run(move |c| load_session(c, id)).await
    }

    async fn merchant_and_session(
        &self,
        key_hash: [u8; 32],
        id: Uuid,
    ) -> Result<(Option<Merchant>, Option<SessionRecord>), StoreError> {
        // One statement: one job of a read batch instead of two.
        static SQL: LazyLock<String> = LazyLock::new(|| {
            let columns = SESSION_COLUMNS.split(", ").map(|column| format!("s.{column}")).collect::<Vec<_>>();
            format!(
                "SELECT m.id, m.name, m.disabled, m.created_on, {}
                   FROM merchants m LEFT JOIN sessions s ON s.id = ?2
                  WHERE m.api_key_hash = ?1",
                columns.join(", ")
            )
        });
        self.point_reads
            .run(move |c| {
                let mut statement = c.prepare_cached(&SQL).map_err(|e| internal(&e))?;
                let found = statement
                    .query_row(params![key_hash, id.as_bytes()], |row| {
                        let merchant = merchant_from_row(row)?;
                        let session = match row.get_ref(4)? {
                            rusqlite::types::ValueRef::Null => None,
                            _ => Some(session_at(row, 4)?),
                        };
                        Ok((merchant, session))
                    })
                    .optional()
                    .map_err(|e| internal(&e))?;
                Ok(found.map_or((None, None), |(merchant, session)| (Some(merchant), session)))
            })
            .await
    }

    async fn merchant_and_kept(
        &self,
        key_hash: [u8; 32],
        request_id: Uuid,
    ) -> Result<(Option<Merchant>, Option<Kept>), StoreError> {
        static SQL: LazyLock<String> = LazyLock::new(|| {
            format!(
                "SELECT m.id, m.name, m.disabled, m.created_on, {}
                   FROM merchants m LEFT JOIN idempotency i ON i.merchant_id = m.id AND i.request_id = ?2
                        {}
                  WHERE m.api_key_hash = ?1",
                *idempotency::KEPT_SELECT,
                idempotency::KEPT_JOIN
            )
        });
        self.point_reads
            .run(move |c| {
                let mut statement = c.prepare_cached(&SQL).map_err(|e| internal(&e))?;
                let found = statement
                    .query_row(params![key_hash, request_id.as_bytes()], |row| {
                        let merchant = merchant_from_row(row)?;
                        let kept = match row.get_ref(4)? {
                            rusqlite::types::ValueRef::Null => None,
                            _ => Some(idempotency::kept_at(row, 4)?),
                        };
                        Ok((merchant, kept))
                    })
                    .optional()
                    .map_err(|e| internal(&e))?;
                Ok(found.map_or((None, None), |(merchant, kept)| (Some(merchant), kept)))
            })
            .await
    }

    async fn list_sessions(
        &self,
        merchant_id: Uuid,
        filter: SessionFilter,
        now: Timestamp,
    ) -> Result<Vec<SessionRecord>, StoreError> {
        self.readers
            .run(move |c| {
                let mut sql = format!("SELECT {SESSION_COLUMNS} FROM sessions WHERE merchant_id = ?1");
                match filter.state {
                    None => {}
                    Some(State::Expired) => {
                        sql.push_str(&format!(" AND (state = 'Expired' OR ({LIVE} AND expires_on <= ?2))"))
                    }
                    Some(state) if LIVE_STATES.contains(&state) => {
                        sql.push_str(&format!(" AND state = '{}' AND expires_on > ?2", state.as_str()))
                    }
                    Some(state) => sql.push_str(&format!(" AND state = '{}'", state.as_str())),
                }
                sql.push_str(" AND created_on >= ?3 AND created_on < ?4 AND (created_on, id) < (?5, ?6)");
                sql.push_str(" ORDER BY created_on DESC, id DESC LIMIT ?7");
                let (after_time, after_id) =
                    filter.after.map(|(t, id)| (t.millis(), *id.as_bytes())).unwrap_or((i64::MAX, [0xff; 16]));
                let mut statement = c.prepare_cached(&sql).map_err(|e| internal(&e))?;
                let rows = statement
                    .query_map(
                        params![
                            merchant_id.as_bytes(),
                            now.millis(),
                            filter.created_from.map_or(i64::MIN, Timestamp::millis),
                            filter.created_to.map_or(i64::MAX, Timestamp::millis),
                            after_time,
                            after_id,
                            (filter.limit + 1) as i64
                        ],
                        session_from_row,
                    )
                    .map_err(|e| internal(&e))?;
                rows.collect::<Result<Vec<_>, _>>().map_err(|e| internal(&e))
            })
            .await
    }

    async fn cancel_session_guarded(
        &self,
        request: CancelRequest,
        guard: Option<Guard<CancelOutcome>>,
    ) -> Result<Guarded<CancelOutcome>, StoreError> {
        let (outcome, queued) =
            self.writer.run_undoable(move |c| idempotency::guarded(c, guard, |c| cancel_in(c, request))).await?;
        self.queued_deliveries(queued);
        Ok(outcome)
    }

    async fn expire_due(&self, now: Timestamp, batch: usize) -> Result<usize, StoreError> {
        let (expired, queued) = self
            .writer
            .run(move |c| {
                let sql = format!(
                    "SELECT {SESSION_COLUMNS} FROM sessions
                      WHERE {LIVE} AND expires_on <= ?1
                      ORDER BY expires_on LIMIT ?2"
                );
                let due: Vec<SessionRecord> = c
                    .prepare_cached(&sql)
                    .and_then(|mut s| s.query_map(params![now.millis(), batch as i64], session_from_row)?.collect())
                    .map_err(|e| internal(&e))?;
                let (mut expired, mut queued) = (0, 0);
                for session in &due {
                    if let Some(deliveries) =
                        change_state(c, session, State::Expired, session.last_correlation_id, now)?
                    {
                        expired += 1;
                        queued += deliveries;
                    }
                }
                Ok((expired, queued))
            })
            .await?;
        self.queued_deliveries(queued);
        Ok(expired)
    }

    async fn session_events(&self, session_id: Uuid) -> Result<Vec<(Uuid, EventType)>, StoreError> {
        self.readers
            .run(move |c| {
                let mut statement = c
                    .prepare_cached("SELECT id, type FROM events WHERE session_id = ?1 ORDER BY created_on, id")
                    .map_err(|e| internal(&e))?;
                let rows = statement
                    .query_map(params![session_id.as_bytes()], |row| {
                        let kind: String = row.get(1)?;
                        Ok((uuid_at(row, 0)?, kind))
                    })
                    .map_err(|e| internal(&e))?;
                let mut events = Vec::new();
                for row in rows {
                    let (id, kind) = row.map_err(|e| internal(&e))?;
                    let kind = parse_event_type(&kind)
                        .ok_or_else(|| StoreError::Internal(format!("unknown event type {kind}")))?;
                    events.push((id, kind));
                }
                Ok(events)
            })
            .await
    }

    async fn idempotency_lookup(
        &self,
        key: IdempotencyKey,
        fingerprint: [u8; 32],
    ) -> Result<Option<Found>, StoreError> {
        self.point_reads.run(move |c| idempotency::lookup(c, key, &fingerprint)).await
    }

    async fn idempotency_keep(
        &self,
        key: IdempotencyKey,
        fingerprint: [u8; 32],
        now: Timestamp,
        answer: StoredResponse,
    ) -> Result<Option<Found>, StoreError> {
        self.writer.run(move |c| idempotency::keep(c, key, &fingerprint, now, &answer)).await
    }

    async fn signing_keys(&self, candidate: KeyPair, now: Timestamp) -> Result<SigningKeys, StoreError> {
        let sealed = seal_signing_key(&self.secrets, &candidate)?;
        let ring = self.secrets.clone();
        self.writer
            .run(move |c| {
                c.execute(
                    "INSERT INTO signing_keys (kid, secret, public, created_on)
                     SELECT ?1, ?2, ?3, ?4 WHERE NOT EXISTS (SELECT 1 FROM signing_keys WHERE retired_on IS NULL)",
                    params![candidate.kid, sealed, candidate.public(), now.millis()],
                )
                .map_err(|e| internal(&e))?;
                schema::load_signing_keys(c, &ring)
            })
            .await
    }

    async fn rotate_signing_key(&self, next: KeyPair, now: Timestamp) -> Result<(), StoreError> {
        let sealed = seal_signing_key(&self.secrets, &next)?;
        self.writer
            .run(move |c| {
                c.execute("UPDATE signing_keys SET retired_on = ?1 WHERE retired_on IS NULL", params![now.millis()])
                    .and_then(|_| {
                        c.execute(
                            "INSERT INTO signing_keys (kid, secret, public, created_on) VALUES (?1, ?2, ?3, ?4)",
                            params![next.kid, sealed, next.public(), now.millis()],
                        )
                    })
                    .map(drop)
                    .map_err(|e| internal(&e))
            })
            .await
    }

    async fn put_subscription_guarded(
        &self,
        record: SubscriptionRecord,
        guard: Option<Guard<PutSubscriptionOutcome>>,
    ) -> Result<Guarded<PutSubscriptionOutcome>, StoreError> {
        let sealed = seal_subscription(&self.secrets, record.clone())?;
        let ring = self.secrets.clone();
        let put = move |c: &Connection| {
            let outcome = match webhooks::put_subscription(c, sealed)? {
                PutSubscriptionOutcome::Created(_) => PutSubscriptionOutcome::Created(record),
                PutSubscriptionOutcome::Exists(existing) => {
                    PutSubscriptionOutcome::Exists(open_subscription(&ring, existing)?)
                }
            };
            Ok((outcome, 0))
        };
        Ok(self.writer.run_undoable(move |c| idempotency::guarded(c, guard, put)).await?.0)
    }

    async fn get_subscription(&self, id: Uuid) -> Result<Option<SubscriptionRecord>, StoreError> {
        let stored = self.point_reads.run(move |c| webhooks::get_subscription(c, id)).await?;
        stored.map(|record| open_subscription(&self.secrets, record)).transpose()
    }

    async fn list_subscriptions(
        &self,
        merchant_id: Uuid,
        after: Option<(Timestamp, Uuid)>,
        limit: usize,
    ) -> Result<Vec<SubscriptionRecord>, StoreError> {
        let stored = self.readers.run(move |c| webhooks::list_subscriptions(c, merchant_id, after, limit)).await?;
        stored.into_iter().map(|record| open_subscription(&self.secrets, record)).collect()
    }

    async fn patch_subscription_guarded(
        &self,
        change: SubscriptionChange,
        spec: SubscriptionSpec,
        guard: Option<Guard<ChangeSubscriptionOutcome>>,
    ) -> Result<Guarded<ChangeSubscriptionOutcome>, StoreError> {
        let ring = self.secrets.clone();
        let patch = move |c: &Connection| webhooks::patch_subscription(c, &ring, &change, spec);
        let (outcome, queued) = self.writer.run_undoable(move |c| idempotency::guarded(c, guard, patch)).await?;
        self.queued_deliveries(queued);
        Ok(outcome)
    }

    async fn delete_subscription_guarded(
        &self,
        change: SubscriptionChange,
        guard: Option<Guard<ChangeSubscriptionOutcome>>,
    ) -> Result<Guarded<ChangeSubscriptionOutcome>, StoreError> {
        let ring = self.secrets.clone();
        let delete = move |c: &Connection| Ok((webhooks::delete_subscription(c, &ring, &change)?, 0));
        Ok(self.writer.run_undoable(move |c| idempotency::guarded(c, guard, delete)).await?.0)
    }

    async fn rotate_subscription_secret_guarded(
        &self,
        change: SubscriptionChange,
        rotation: SecretRotation,
        guard: Option<Guard<ChangeSubscriptionOutcome>>,
    ) -> Result<Guarded<ChangeSubscriptionOutcome>, StoreError> {
        let ring = self.secrets.clone();
        let rotate = move |c: &Connection| Ok((webhooks::rotate_secret(c, &ring, &change, &rotation)?, 0));
        Ok(self.writer.run_undoable(move |c| idempotency::guarded(c, guard, rotate)).await?.0)
    }

    async fn resume_subscription_guarded(
        &self,
        change: SubscriptionChange,
        guard: Option<Guard<ChangeSubscriptionOutcome>>,
    ) -> Result<Guarded<ChangeSubscriptionOutcome>, StoreError> {
        let ring = self.secrets.clone();
        let resume = move |c: &Connection| webhooks::resume_subscription(c, &ring, &change);
        let (outcome, queued) = self.writer.run_undoable(move |c| idempotency::guarded(c, guard, resume)).await?;
        self.queued_deliveries(queued);
        Ok(outcome)
    }

    async fn recover_deliveries_guarded(
        &self,
        change: SubscriptionChange,
        window: RecoverWindow,
        guard: Option<Guard<RecoverOutcome>>,
    ) -> Result<Guarded<RecoverOutcome>, StoreError> {
        let recover = move |c: &Connection| webhooks::recover(c, &change, window);
        let (outcome, queued) = self.writer.run_undoable(move |c| idempotency::guarded(c, guard, recover)).await?;
        self.queued_deliveries(queued);
        Ok(outcome)
    }

    async fn record_test_delivery_guarded(
        &self,
        test: TestDelivery,
        guard: Option<Guard<AttemptRecord>>,
    ) -> Result<Guarded<AttemptRecord>, StoreError> {
        let record = move |c: &Connection| {
            webhooks::record_test_delivery(c, &test)?;
            Ok((test.attempt, 0))
        };
        Ok(self.writer.run_undoable(move |c| idempotency::guarded(c, guard, record)).await?.0)
    }

    async fn dispatcher_started(&self, owner: Uuid) -> Result<usize, StoreError> {
        self.writer.run(move |c| webhooks::void_other_leases(c, owner)).await
    }

    async fn dispatcher_stopped(&self, _owner: Uuid) {}

    async fn claim_deliveries(
        &self,
        owner: Uuid,
        now: Timestamp,
        lease_until: Timestamp,
        limit: usize,
        per_subscription: usize,
    ) -> Result<Vec<ClaimedDelivery>, StoreError> {
        let ring = self.secrets.clone();
        self.writer
            .run(move |c| webhooks::claim_deliveries(c, &ring, owner, now, lease_until, limit, per_subscription))
            .await
    }

    async fn record_attempts(
        &self,
        outcomes: Vec<AttemptOutcome>,
        now: Timestamp,
        policy: SuspendPolicy,
    ) -> Result<Vec<Suspension>, StoreError> {
        let retries = outcomes.iter().any(|o| matches!(o.next, crate::store::webhooks::NextStep::RetryAt(_)));
        let suspensions = self.writer.run(move |c| webhooks::record_attempts(c, &outcomes, now, policy)).await?;
        self.queued_deliveries(usize::from(retries));
        Ok(suspensions)
    }

    async fn release_claims(&self, owner: Uuid, ids: Vec<Uuid>) -> Result<(), StoreError> {
        self.writer.run(move |c| webhooks::release_claims(c, owner, &ids)).await
    }

    async fn list_deliveries(
        &self,
        merchant_id: Uuid,
        filter: DeliveryFilter,
    ) -> Result<Vec<DeliveryRecord>, StoreError> {
        self.readers.run(move |c| webhooks::list_deliveries(c, merchant_id, &filter)).await
    }

    async fn redeliver_guarded(
        &self,
        merchant_id: Uuid,
        id: Uuid,
        now: Timestamp,
        guard: Option<Guard<RedeliverOutcome>>,
    ) -> Result<Guarded<RedeliverOutcome>, StoreError> {
        let redeliver = move |c: &Connection| {
            let outcome = webhooks::redeliver(c, merchant_id, id, now)?;
            let queued = usize::from(matches!(outcome, RedeliverOutcome::Queued(_)));
            Ok((outcome, queued))
        };
        let (outcome, queued) = self.writer.run_undoable(move |c| idempotency::guarded(c, guard, redeliver)).await?;
        self.queued_deliveries(queued);
        Ok(outcome)
    }

    async fn delivery_backlog(&self, now: Timestamp) -> Result<Backlog, StoreError> {
        self.readers.run(move |c| webhooks::backlog(c, now)).await
    }

    async fn purge(&self, now: Timestamp, retention: Retention, batch: usize) -> Result<usize, StoreError> {
        self.writer.run(move |c| webhooks::purge(c, now, retention, batch)).await
    }

    fn deliveries_queued(&self) -> Arc<Notify> {
        self.queued.clone()
    }

    fn secrets(&self) -> Arc<KeyRing> {
        self.secrets.clone()
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
        let connection = connect(&dir.path().join("d.db"), true).unwrap();
        schema::migrate(&connection).unwrap();
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
