//! `redirect-sessions migrate-data --from sqlite://PATH --to postgres://URL`: moves a SQLite
//! deployment to PostgreSQL.
//!
//! The source is opened read-only and read inside one SQLite read transaction (a consistent
//! snapshot); it must be at the schema this build knows. The target is migrated first and must
//! hold no rows at all: its tables are locked against writers and checked inside the one
//! PostgreSQL transaction that then receives every row through binary `COPY`, so the move is
//! all or nothing and never merges into a live database. Rows keep their ids, times (whole
//! milliseconds), versions and states, so the API answers exactly as before (ETags, tokens,
//! replayed idempotent bodies, JWKS); delivery leases are cleared, since they belonged to the
//! old process. The numeric `amount` and `currency` columns PostgreSQL keeps are derived from
//! each session's transaction data, as the PostgreSQL store does when it creates a session; a
//! transaction intent's `amount_cents` becomes the same exact `numeric` amount.
//!
//! Encrypted secrets (`crate::secrets`: subscription API keys and signing secrets, the signing
//! keys' private halves, idempotent answers showing a secret) are copied as they are, never
//! decrypted here: their associated data names table, column and row id, which stay the same,
//! so the PostgreSQL deployment opens them with the same keys (`secrets_key`, or the SQLite key
//! file's key, plus `secrets_old_keys`). Values still in clear (a database last served by an
//! older build) are copied in clear and sealed at the first start on PostgreSQL.
//!
//! A reader thread streams batches of rows from SQLite while the async side writes them, so
//! memory stays flat whatever the size of the database.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::{BufMut, BytesMut};
use rusqlite::{Connection, OpenFlags};
use tokio::sync::mpsc;
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::{IsNull, ToSql, Type};
use tokio_postgres::NoTls;
use uuid::Uuid;

use crate::config::{parse_database_url, DatabaseUrl};
use crate::domain::request::SessionSpec;
use crate::domain::time::Timestamp;
use crate::store::postgres::{self, PoolSettings, Ts};

/// The SQLite schema this build copies from: the last migration in `migrations/sqlite/`. A new
/// SQLite migration must teach this module its columns before this number moves. (3 and 4
/// only changed indexes; 5 added the customer flow; 6 only filled in `qrCodeSuccessUrl` in
/// the specs, which are copied as they are; 7 only added indexes; 10 added the subscriptions'
/// previous secret, state and run of failures, and the `Held` deliveries.)
pub const SQLITE_SCHEMA_VERSION: i64 = 10;

/// Rows per batch handed from the reader thread to the writer.
const BATCH: usize = 4096;
/// A progress line every this many rows of one table.
const PROGRESS_EVERY: u64 = 100_000;
/// How long locking the target's tables may wait for other users of the database.
const LOCK_TIMEOUT: &str = "10s";

/// Why the move did not happen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MigrateDataError {
    /// A missing or malformed argument (exit code 2).
    Usage(String),
    /// The move could not be done; nothing was written to the target (exit code 1).
    Failed(String),
}

impl fmt::Display for MigrateDataError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MigrateDataError::Usage(message) | MigrateDataError::Failed(message) => f.write_str(message),
        }
    }
}

impl std::error::Error for MigrateDataError {}

fn failed(message: impl Into<String>) -> MigrateDataError {
    MigrateDataError::Failed(message.into())
}

/// What was moved: rows per table, in the order they were copied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    pub tables: Vec<(&'static str, u64)>,
}

impl Summary {
    /// `{"merchants": 2, "customers": 0, "sessions": 12345, …}`.
    pub fn to_json(&self) -> serde_json::Value {
        let members = self.tables.iter().map(|(name, rows)| ((*name).to_owned(), serde_json::Value::from(*rows)));
        serde_json::Value::Object(members.collect())
    }
}

/// Checks the arguments: `--from` a `sqlite://` file, `--to` a `postgres://` database, not
/// the same. Answers the source path and the target URL.
pub fn parse_args(from: Option<&str>, to: Option<&str>) -> Result<(PathBuf, String), MigrateDataError> {
    let usage = |message: &str| MigrateDataError::Usage(message.to_owned());
    let from = from.map(str::trim).filter(|s| !s.is_empty()).ok_or_else(|| {
        usage("migrate-data needs --from sqlite://PATH (the SQLite database to copy) and --to postgres://URL")
    })?;
    let to = to.map(str::trim).filter(|s| !s.is_empty()).ok_or_else(|| {
        usage("migrate-data needs --to postgres://URL (the empty PostgreSQL database to fill) and --from sqlite://PATH")
    })?;
    if from == to {
        return Err(usage("--from and --to name the same database; give a sqlite:// source and a postgres:// target"));
    }
    let source = match parse_database_url(from) {
        Ok(DatabaseUrl::Sqlite { path }) => path,
        Ok(DatabaseUrl::Postgres(_)) => {
            return Err(usage("--from must be a sqlite:// URL (migrate-data copies from SQLite to PostgreSQL)"))
        }
        Err(message) => return Err(usage(&format!("--from must be sqlite://PATH: {message}"))),
    };
    let target = match parse_database_url(to) {
        Ok(DatabaseUrl::Postgres(url)) => url,
        Ok(DatabaseUrl::Sqlite { .. }) => {
            return Err(usage("--to must be a postgres:// URL (migrate-data copies from SQLite to PostgreSQL)"))
        }
        // The parser's message does not repeat the URL, which may hold a password.
        Err(message) => return Err(usage(&format!("--to must be postgres://URL: {message}"))),
    };
    Ok((source, target))
}

/// Moves every row of the SQLite database named by `from` into the empty PostgreSQL database
/// named by `to` (migrating it first), printing progress lines on stderr. `settings` bound
/// connecting to the target.
pub async fn migrate_data(
    from: Option<&str>,
    to: Option<&str>,
    settings: PoolSettings,
) -> Result<Summary, MigrateDataError> {
    let (source, target) = parse_args(from, to)?;
    let started = Instant::now();
    let tables = tables();

    // The source first: a wrong file must not touch the target.
    let (sender, mut receiver) = mpsc::channel::<Message>(4);
    let reader = {
        let source = source.clone();
        let tables = tables.iter().map(|t| (t.name, t.select, t.convert)).collect::<Vec<_>>();
        std::thread::Builder::new()
            .name("migrate-data-reader".to_owned())
            .spawn(move || read_source(&source, &tables, &sender))
            .map_err(|e| failed(format!("cannot start the reader thread: {e}")))?
    };
    let counts = match receiver.recv().await {
        Some(Message::Counts(counts)) => counts,
        Some(Message::Failed(message)) => return Err(failed(message)),
        _ => return Err(failed("the SQLite reader stopped unexpectedly")),
    };
    let total: u64 = counts.iter().sum();
    progress(&format!("source {} holds {total} rows", source.display()));

    let config = postgres::migrate_database(&target, settings)
        .await
        .map_err(|e| failed(format!("cannot migrate the target: {e}")))?;
    progress("target migrated");
    let (mut client, connection) = config.connect(NoTls).await.map_err(|e| pg("cannot connect to the target", &e))?;
    let connection = tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::debug!(%error, "the migrate-data connection ended");
        }
    });
    let result = copy_all(&mut client, &tables, &counts, &mut receiver).await;
    drop(receiver);
    let _ = reader.join();
    drop(client);
    let _ = tokio::time::timeout(Duration::from_secs(5), connection).await;
    let summary = result?;
    progress(&format!("committed {total} rows in {:.1}s", started.elapsed().as_secs_f64()));
    Ok(summary)
}

/// The one PostgreSQL transaction: lock, check empty, copy every table, compare counts, commit.
async fn copy_all(
    client: &mut tokio_postgres::Client,
    tables: &[Table],
    counts: &[u64],
    receiver: &mut mpsc::Receiver<Message>,
) -> Result<Summary, MigrateDataError> {
    // Bulk loading may take longer than a request's statement may; the store's limits are off.
    client
        .batch_execute(&format!(
            "SET statement_timeout = 0; SET idle_in_transaction_session_timeout = 0; SET lock_timeout = '{LOCK_TIMEOUT}'"
        ))
        .await
        .map_err(|e| pg("cannot configure the target connection", &e))?;
    let tx = client.transaction().await.map_err(|e| pg("cannot begin the target transaction", &e))?;
    let names: Vec<&str> = tables.iter().map(|t| t.name).collect();
    // Others may read while we work, nobody may write: the emptiness checked here holds until
    // the commit.
    tx.batch_execute(&format!("LOCK TABLE {} IN EXCLUSIVE MODE", names.join(", ")))
        .await
        .map_err(|e| pg("cannot lock the target's tables (is a service using it?)", &e))?;
    let occupied = names
        .iter()
        .map(|name| format!("SELECT '{name}' WHERE EXISTS (SELECT 1 FROM {name})"))
        .collect::<Vec<_>>()
        .join(" UNION ALL ");
    let occupied: Vec<String> = tx
        .query(&occupied, &[])
        .await
        .map_err(|e| pg("cannot inspect the target", &e))?
        .iter()
        .map(|row| row.get(0))
        .collect();
    if !occupied.is_empty() {
        return Err(failed(format!(
            "the target database is not empty (rows in {}); migrate-data only fills an empty database, \
             it never merges into one",
            occupied.join(", ")
        )));
    }

    let mut summary = Summary { tables: Vec::new() };
    for (table, &expected) in tables.iter().zip(counts) {
        let sink = tx
            .copy_in(&format!("COPY {} ({}) FROM STDIN (FORMAT binary)", table.name, table.columns))
            .await
            .map_err(|e| pg(&format!("cannot copy into {}", table.name), &e))?;
        let writer = BinaryCopyInWriter::new(sink, &table.types);
        let mut writer = std::pin::pin!(writer);
        let mut sent = 0u64;
        loop {
            match receiver.recv().await {
                Some(Message::Rows(rows)) => {
                    for row in &rows {
                        writer
                            .as_mut()
                            .write_raw(row.iter().map(|v| v.as_ref() as &(dyn ToSql + Sync)))
                            .await
                            .map_err(|e| pg(&format!("copying {}", table.name), &e))?;
                    }
                    let before = sent / PROGRESS_EVERY;
                    sent += rows.len() as u64;
                    if sent / PROGRESS_EVERY > before && sent < expected {
                        progress(&format!("{}: {sent} of {expected} rows", table.name));
                    }
                }
                Some(Message::End) => break,
                Some(Message::Failed(message)) => return Err(failed(message)),
                Some(Message::Counts(_)) | None => return Err(failed("the SQLite reader stopped unexpectedly")),
            }
        }
        let written = writer.as_mut().finish().await.map_err(|e| pg(&format!("copying {}", table.name), &e))?;
        if written != expected || sent != expected {
            return Err(failed(format!("{}: read {sent} rows of {expected}, wrote {written}", table.name)));
        }
        progress(&format!("{}: {written} rows copied", table.name));
        summary.tables.push((table.name, written));
    }
    tx.commit().await.map_err(|e| pg("the target transaction did not commit", &e))?;
    Ok(summary)
}

fn progress(line: &str) {
    eprintln!("migrate-data: {line}");
}

/// A PostgreSQL error with its cause (`tokio_postgres::Error` alone prints only "db error").
fn pg(what: &str, error: &tokio_postgres::Error) -> MigrateDataError {
    let why = match error.as_db_error() {
        Some(db) => match db.detail() {
            Some(detail) => format!("{} {}: {} ({detail})", db.severity(), db.code().code(), db.message()),
            None => format!("{} {}: {}", db.severity(), db.code().code(), db.message()),
        },
        None => match std::error::Error::source(error) {
            Some(cause) => format!("{error}: {cause}"),
            None => error.to_string(),
        },
    };
    failed(format!("{what}: {why}"))
}

// ---------------------------------------------------------------------------------------------
// Reading the source

/// One value of a row on its way to `COPY`.
type Value = Box<dyn ToSql + Send + Sync>;
type Row = Vec<Value>;
/// Turns a SQLite row into the target's columns.
type Convert = fn(&rusqlite::Row<'_>) -> Result<Row, String>;

/// What the reader thread sends: first the row counts, then each table's rows and its end.
enum Message {
    Counts(Vec<u64>),
    Rows(Vec<Row>),
    End,
    Failed(String),
}

/// One table: how to read it from SQLite and how to copy it into PostgreSQL.
struct Table {
    name: &'static str,
    /// The SQLite query; its columns feed `convert`.
    select: &'static str,
    /// The PostgreSQL columns `convert` fills, in order, with their `types`.
    columns: &'static str,
    types: Vec<Type>,
    convert: Convert,
}

/// Every table, parents before children (foreign keys hold at every step).
fn tables() -> Vec<Table> {
    vec![
        Table {
            name: "merchants",
            select: "SELECT id, name, api_key_hash, disabled, created_on FROM merchants",
            columns: "id, name, api_key_hash, disabled, created_on",
            types: vec![Type::UUID, Type::TEXT, Type::BYTEA, Type::BOOL, Type::TIMESTAMPTZ],
            convert: |r| {
                Ok(vec![uuid(r, 0)?, get::<String>(r, 1)?, get::<Vec<u8>>(r, 2)?, get::<bool>(r, 3)?, ts(r, 4)?])
            },
        },
        Table {
            name: "customers",
            select: "SELECT id, phone, created_on, first_name, last_name FROM customers",
            columns: "id, phone, created_on, first_name, last_name",
            types: vec![Type::UUID, Type::TEXT, Type::TIMESTAMPTZ, Type::TEXT, Type::TEXT],
            convert: |r| {
                Ok(vec![
                    uuid(r, 0)?,
                    get::<String>(r, 1)?,
                    ts(r, 2)?,
                    get::<Option<String>>(r, 3)?,
                    get::<Option<String>>(r, 4)?,
                ])
            },
        },
        Table {
            name: "sessions",
            select: "SELECT id, merchant_id, state, spec, token, expires_on, created_on, last_modified_on,
                            last_correlation_id, version, customer_id, transaction_intent_id
                       FROM sessions",
            columns: "id, merchant_id, state, spec, amount, currency, token, expires_on, created_on, last_modified_on,
                      last_correlation_id, version, customer_id, transaction_intent_id",
            types: vec![
                Type::UUID,
                Type::UUID,
                Type::TEXT,
                Type::JSONB,
                Type::NUMERIC,
                Type::TEXT,
                Type::TEXT,
                Type::TIMESTAMPTZ,
                Type::TIMESTAMPTZ,
                Type::TIMESTAMPTZ,
                Type::UUID,
                Type::INT8,
                Type::UUID,
                Type::UUID,
            ],
            convert: session_row,
        },
        Table {
            name: "one_time_codes",
            select: "SELECT session_id, phone, code_hash, code_expires_on, wrong_attempts, codes_sent, last_sent_on
                       FROM one_time_codes",
            columns: "session_id, phone, code_hash, code_expires_on, wrong_attempts, codes_sent, last_sent_on",
            types: vec![
                Type::UUID,
                Type::TEXT,
                Type::BYTEA,
                Type::TIMESTAMPTZ,
                Type::INT4,
                Type::INT4,
                Type::TIMESTAMPTZ,
            ],
            convert: |r| {
                Ok(vec![
                    uuid(r, 0)?,
                    get::<String>(r, 1)?,
                    get::<Option<Vec<u8>>>(r, 2)?,
                    ts(r, 3)?,
                    get::<i32>(r, 4)?,
                    get::<i32>(r, 5)?,
                    ts(r, 6)?,
                ])
            },
        },
        Table {
            name: "transaction_intents",
            select: "SELECT id, merchant_id, session_id, customer_id, flow, amount_cents, currency, created_on
                       FROM transaction_intents",
            columns: "id, merchant_id, session_id, customer_id, flow, amount, currency, created_on",
            types: vec![
                Type::UUID,
                Type::UUID,
                Type::UUID,
                Type::UUID,
                Type::TEXT,
                Type::NUMERIC,
                Type::TEXT,
                Type::TIMESTAMPTZ,
            ],
            convert: |r| {
                let cents: i64 = r.get(5).map_err(|e| e.to_string())?;
                let cents = u64::try_from(cents).map_err(|_| {
                    let id = r.get::<_, [u8; 16]>(0).map(Uuid::from_bytes).map(|u| u.to_string()).unwrap_or_default();
                    format!("transaction intent {id} has a negative amount ({cents} cents)")
                })?;
                Ok(vec![
                    uuid(r, 0)?,
                    uuid(r, 1)?,
                    uuid(r, 2)?,
                    uuid(r, 3)?,
                    get::<String>(r, 4)?,
                    Box::new(Numeric(cents)),
                    get::<String>(r, 6)?,
                    ts(r, 7)?,
                ])
            },
        },
        Table {
            name: "events",
            select: "SELECT id, merchant_id, session_id, type, data, created_on FROM events",
            columns: "id, merchant_id, session_id, type, data, created_on",
            types: vec![Type::UUID, Type::UUID, Type::UUID, Type::TEXT, Type::TEXT, Type::TIMESTAMPTZ],
            convert: |r| {
                Ok(vec![uuid(r, 0)?, uuid(r, 1)?, uuid(r, 2)?, get::<String>(r, 3)?, get::<String>(r, 4)?, ts(r, 5)?])
            },
        },
        Table {
            name: "idempotency",
            select: "SELECT merchant_id, request_id, fingerprint, started_on, status, headers, body, completed_on,
                            session_id
                       FROM idempotency",
            columns:
                "merchant_id, request_id, fingerprint, started_on, status, headers, body, completed_on, session_id",
            types: vec![
                Type::UUID,
                Type::UUID,
                Type::BYTEA,
                Type::TIMESTAMPTZ,
                Type::INT4,
                Type::JSONB,
                Type::BYTEA,
                Type::TIMESTAMPTZ,
                Type::UUID,
            ],
            convert: |r| {
                Ok(vec![
                    uuid(r, 0)?,
                    uuid(r, 1)?,
                    get::<Vec<u8>>(r, 2)?,
                    ts(r, 3)?,
                    get::<Option<i32>>(r, 4)?,
                    jsonb_opt(r, 5)?,
                    get::<Option<Vec<u8>>>(r, 6)?,
                    ts_opt(r, 7)?,
                    uuid_opt(r, 8)?,
                ])
            },
        },
        Table {
            name: "signing_keys",
            select: "SELECT kid, secret, public, created_on, retired_on FROM signing_keys",
            columns: "kid, secret, public, created_on, retired_on",
            types: vec![Type::TEXT, Type::BYTEA, Type::BYTEA, Type::TIMESTAMPTZ, Type::TIMESTAMPTZ],
            convert: |r| {
                Ok(vec![get::<String>(r, 0)?, get::<Vec<u8>>(r, 1)?, get::<Vec<u8>>(r, 2)?, ts(r, 3)?, ts_opt(r, 4)?])
            },
        },
        Table {
            name: "subscriptions",
            // The replaced signing secret is sealed like the current one: copied as it is.
            select: "SELECT id, merchant_id, callback_url, api_key, event_mask, signing_secret, created_on,
                            last_modified_on, version, previous_secret, previous_secret_expires_on, state,
                            suspended_on, suspended_reason, failing_since
                       FROM subscriptions",
            columns: "id, merchant_id, callback_url, api_key, event_mask, signing_secret, created_on, last_modified_on,
                      version, previous_secret, previous_secret_expires_on, state, suspended_on, suspended_reason,
                      failing_since",
            types: vec![
                Type::UUID,
                Type::UUID,
                Type::TEXT,
                Type::TEXT,
                Type::INT4,
                Type::TEXT,
                Type::TIMESTAMPTZ,
                Type::TIMESTAMPTZ,
                Type::INT8,
                Type::TEXT,
                Type::TIMESTAMPTZ,
                Type::TEXT,
                Type::TIMESTAMPTZ,
                Type::TEXT,
                Type::TIMESTAMPTZ,
            ],
            convert: |r| {
                Ok(vec![
                    uuid(r, 0)?,
                    uuid(r, 1)?,
                    get::<String>(r, 2)?,
                    get::<String>(r, 3)?,
                    get::<i32>(r, 4)?,
                    get::<String>(r, 5)?,
                    ts(r, 6)?,
                    ts(r, 7)?,
                    get::<i64>(r, 8)?,
                    get::<Option<String>>(r, 9)?,
                    ts_opt(r, 10)?,
                    get::<String>(r, 11)?,
                    ts_opt(r, 12)?,
                    get::<Option<String>>(r, 13)?,
                    ts_opt(r, 14)?,
                ])
            },
        },
        Table {
            name: "deliveries",
            // The lease (lease_owner, lease_until) belonged to the old process: left NULL.
            select: "SELECT id, event_id, subscription_id, merchant_id, state, attempts, retry_index, next_attempt_on,
                            created_on, last_modified_on
                       FROM deliveries",
            columns: "id, event_id, subscription_id, merchant_id, state, attempts, retry_index, next_attempt_on,
                      created_on, last_modified_on",
            types: vec![
                Type::UUID,
                Type::UUID,
                Type::UUID,
                Type::UUID,
                Type::TEXT,
                Type::INT4,
                Type::INT4,
                Type::TIMESTAMPTZ,
                Type::TIMESTAMPTZ,
                Type::TIMESTAMPTZ,
            ],
            convert: |r| {
                Ok(vec![
                    uuid(r, 0)?,
                    uuid(r, 1)?,
                    uuid(r, 2)?,
                    uuid(r, 3)?,
                    get::<String>(r, 4)?,
                    get::<i32>(r, 5)?,
                    get::<i32>(r, 6)?,
                    ts(r, 7)?,
                    ts(r, 8)?,
                    ts(r, 9)?,
                ])
            },
        },
        Table {
            name: "delivery_attempts",
            select: "SELECT delivery_id, attempt, started_on, duration_ms, status, error FROM delivery_attempts",
            columns: "delivery_id, attempt, started_on, duration_ms, status, error",
            types: vec![Type::UUID, Type::INT4, Type::TIMESTAMPTZ, Type::INT8, Type::INT4, Type::TEXT],
            convert: |r| {
                Ok(vec![
                    uuid(r, 0)?,
                    get::<i32>(r, 1)?,
                    ts(r, 2)?,
                    get::<i64>(r, 3)?,
                    get::<Option<i32>>(r, 4)?,
                    get::<Option<String>>(r, 5)?,
                ])
            },
        },
    ]
}

/// A session, with `amount` and `currency` taken from its transaction data exactly as the
/// PostgreSQL store fills them when it creates a session.
fn session_row(r: &rusqlite::Row<'_>) -> Result<Row, String> {
    let spec_text: String = r.get(3).map_err(|e| e.to_string())?;
    let spec: SessionSpec = serde_json::from_str(&spec_text).map_err(|e| {
        let id = r.get::<_, [u8; 16]>(0).map(Uuid::from_bytes).map(|u| u.to_string()).unwrap_or_default();
        format!("session {id} has an unreadable spec: {e}")
    })?;
    let transaction = spec.transaction_data.as_ref();
    let amount: Option<Numeric> = transaction.map(|t| Numeric(t.amount.cents()));
    let currency: Option<&'static str> = transaction.map(|t| t.currency.code());
    Ok(vec![
        uuid(r, 0)?,
        uuid(r, 1)?,
        get::<String>(r, 2)?,
        Box::new(Jsonb(spec_text)),
        Box::new(amount),
        Box::new(currency),
        get::<String>(r, 4)?,
        ts(r, 5)?,
        ts(r, 6)?,
        ts(r, 7)?,
        uuid(r, 8)?,
        get::<i64>(r, 9)?,
        uuid_opt(r, 10)?,
        uuid_opt(r, 11)?,
    ])
}

fn get<T: rusqlite::types::FromSql + ToSql + Send + Sync + 'static>(
    r: &rusqlite::Row<'_>,
    index: usize,
) -> Result<Value, String> {
    Ok(Box::new(r.get::<_, T>(index).map_err(|e| e.to_string())?))
}

fn uuid(r: &rusqlite::Row<'_>, index: usize) -> Result<Value, String> {
    let bytes: [u8; 16] = r.get(index).map_err(|e| e.to_string())?;
    Ok(Box::new(Uuid::from_bytes(bytes)))
}

fn uuid_opt(r: &rusqlite::Row<'_>, index: usize) -> Result<Value, String> {
    let bytes: Option<[u8; 16]> = r.get(index).map_err(|e| e.to_string())?;
    Ok(Box::new(bytes.map(Uuid::from_bytes)))
}

fn ts(r: &rusqlite::Row<'_>, index: usize) -> Result<Value, String> {
    Ok(Box::new(Ts(Timestamp::from_millis(r.get(index).map_err(|e| e.to_string())?))))
}

fn ts_opt(r: &rusqlite::Row<'_>, index: usize) -> Result<Value, String> {
    Ok(Box::new(r.get::<_, Option<i64>>(index).map_err(|e| e.to_string())?.map(|ms| Ts(Timestamp::from_millis(ms)))))
}

fn jsonb_opt(r: &rusqlite::Row<'_>, index: usize) -> Result<Value, String> {
    Ok(Box::new(r.get::<_, Option<String>>(index).map_err(|e| e.to_string())?.map(Jsonb)))
}

/// The reader thread: opens the source read-only, checks it, and streams every table from one
/// read transaction (a consistent snapshot) until done or the receiver goes away.
fn read_source(path: &Path, tables: &[(&'static str, &'static str, Convert)], sender: &mpsc::Sender<Message>) {
    let send = |message| sender.blocking_send(message).is_ok();
    let connection = match open_source(path) {
        Ok(connection) => connection,
        Err(message) => {
            send(Message::Failed(message));
            return;
        }
    };
    let counts = tables
        .iter()
        .map(|(name, ..)| {
            connection
                .query_row(&format!("SELECT count(*) FROM {name}"), [], |r| r.get::<_, i64>(0))
                .map(|n| u64::try_from(n).unwrap_or(0))
                .map_err(|e| format!("cannot count the rows of {name} in the source: {e}"))
        })
        .collect::<Result<Vec<_>, _>>();
    match counts {
        Ok(counts) => {
            if !send(Message::Counts(counts)) {
                return;
            }
        }
        Err(message) => {
            send(Message::Failed(message));
            return;
        }
    }
    for (name, select, convert) in tables {
        if let Err(message) = read_table(&connection, select, *convert, &send) {
            send(Message::Failed(format!("reading {name} from the source: {message}")));
            return;
        }
        if !send(Message::End) {
            return;
        }
    }
    let _ = connection.execute_batch("COMMIT");
}

/// Streams one table in batches; stops early (without error) when the receiver is gone.
fn read_table(
    connection: &Connection,
    select: &str,
    convert: Convert,
    send: &impl Fn(Message) -> bool,
) -> Result<(), String> {
    let mut statement = connection.prepare(select).map_err(|e| e.to_string())?;
    let mut rows = statement.query([]).map_err(|e| e.to_string())?;
    let mut batch = Vec::with_capacity(BATCH);
    while let Some(row) = rows.next().map_err(|e| e.to_string())? {
        batch.push(convert(row)?);
        if batch.len() == BATCH && !send(Message::Rows(std::mem::replace(&mut batch, Vec::with_capacity(BATCH)))) {
            return Ok(());
        }
    }
    if !batch.is_empty() {
        send(Message::Rows(batch));
    }
    Ok(())
}

/// Opens the source read-only, checks its schema and begins the read transaction.
fn open_source(path: &Path) -> Result<Connection, String> {
    let shown = path.display();
    if !path.is_file() {
        return Err(format!("the source database {shown} does not exist (or is not a file)"));
    }
    let connection =
        Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)
            .map_err(|e| format!("cannot open the source database {shown} read-only: {e}"))?;
    connection
        .execute_batch("PRAGMA query_only = 1; PRAGMA busy_timeout = 5000;")
        .map_err(|e| format!("cannot open the source database {shown}: {e}"))?;
    let run_migrate = format!("run `redirect-sessions migrate --database-url sqlite://{shown}` first");
    let has_migrations: bool = connection
        .query_row("SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'schema_migrations'", [], |r| {
            r.get(0)
        })
        .map_err(|e| format!("cannot read the source database {shown}: {e}"))?;
    if !has_migrations {
        return Err(format!("the source database {shown} is not a migrated redirect-sessions database; {run_migrate}"));
    }
    let version: Option<i64> = connection
        .query_row("SELECT max(version) FROM schema_migrations", [], |r| r.get(0))
        .map_err(|e| format!("cannot read the source database {shown}: {e}"))?;
    let version = version.unwrap_or(0);
    if version < SQLITE_SCHEMA_VERSION {
        return Err(format!(
            "the source database {shown} is at migration {version}, migrate-data needs {SQLITE_SCHEMA_VERSION}; \
             {run_migrate}"
        ));
    }
    if version > SQLITE_SCHEMA_VERSION {
        return Err(format!(
            "the source database {shown} is at migration {version}, newer than this build knows \
             ({SQLITE_SCHEMA_VERSION}); use the redirect-sessions build that wrote it"
        ));
    }
    connection.execute_batch("BEGIN").map_err(|e| format!("cannot begin reading {shown}: {e}"))?;
    Ok(connection)
}

// ---------------------------------------------------------------------------------------------
// Values in PostgreSQL's binary format

/// JSON text as `jsonb` (the server parses it; a malformed document fails the copy).
#[derive(Debug)]
struct Jsonb(String);

impl ToSql for Jsonb {
    fn to_sql(&self, _: &Type, out: &mut BytesMut) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        out.put_u8(1); // jsonb binary format version
        out.put_slice(self.0.as_bytes());
        Ok(IsNull::No)
    }

    tokio_postgres::types::accepts!(JSONB);
    tokio_postgres::types::to_sql_checked!();
}

/// An amount in cents as `numeric` with two fraction digits.
#[derive(Debug, Clone, Copy)]
struct Numeric(u64);

impl Numeric {
    /// The binary `numeric`: digit count, weight, sign, display scale, then base-10000 digits.
    fn encode(self, out: &mut BytesMut) -> Result<(), Box<dyn std::error::Error + Sync + Send>> {
        let (mut whole, fraction) = (self.0 / 100, self.0 % 100);
        let mut digits = Vec::new();
        while whole > 0 {
            digits.push(i16::try_from(whole % 10_000)?);
            whole /= 10_000;
        }
        digits.reverse();
        // The weight is the power of 10000 of the first digit: -1 when there is no whole part.
        let weight = i16::try_from(digits.len())? - 1;
        digits.push(i16::try_from(fraction * 100)?);
        out.put_i16(i16::try_from(digits.len())?);
        out.put_i16(weight);
        out.put_u16(0x0000); // positive
        out.put_u16(2); // display scale: two fraction digits
        for digit in digits {
            out.put_i16(digit);
        }
        Ok(())
    }
}

impl ToSql for Numeric {
    fn to_sql(&self, _: &Type, out: &mut BytesMut) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        self.encode(out)?;
        Ok(IsNull::No)
    }

    tokio_postgres::types::accepts!(NUMERIC);
    tokio_postgres::types::to_sql_checked!();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn numeric(cents: u64) -> Vec<i16> {
        let mut out = BytesMut::new();
        Numeric(cents).encode(&mut out).unwrap();
        out.chunks(2).map(|c| i16::from_be_bytes([c[0], c[1]])).collect()
    }

    #[test]
    fn amounts_encode_as_binary_numeric_with_two_fraction_digits() {
        // [ndigits, weight, sign, dscale, digits…]
        assert_eq!(numeric(10_050), [2, 0, 0, 2, 100, 5000], "100.50");
        assert_eq!(numeric(1), [1, -1, 0, 2, 100], "0.01");
        assert_eq!(numeric(1_000_000), [3, 1, 0, 2, 1, 0, 0], "10000.00");
        assert_eq!(numeric(123_456_789), [3, 1, 0, 2, 123, 4567, 8900], "1234567.89");
    }

    #[test]
    fn the_copied_schema_is_the_last_sqlite_migration() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/migrations/sqlite");
        let last = std::fs::read_dir(dir)
            .unwrap()
            .filter_map(|e| e.unwrap().file_name().to_str()?.split('_').next()?.parse::<i64>().ok())
            .max();
        assert_eq!(last, Some(SQLITE_SCHEMA_VERSION), "a new SQLite migration: teach migrate-data its columns");
    }

    #[test]
    fn arguments_must_name_a_sqlite_source_and_a_different_postgres_target() {
        let usage = |from: Option<&str>, to: Option<&str>| match parse_args(from, to) {
            Err(MigrateDataError::Usage(message)) => message,
            other => panic!("{from:?} {to:?}: {other:?}"),
        };
        assert!(usage(None, Some("postgres://db/x")).contains("--from"));
        assert!(usage(Some("sqlite://a.db"), None).contains("--to"));
        assert!(usage(Some("sqlite://a.db"), Some("sqlite://a.db")).contains("same"));
        assert!(usage(Some("postgres://db/x"), Some("postgres://db/y")).contains("--from"));
        assert!(usage(Some("sqlite://a.db"), Some("sqlite://b.db")).contains("--to"));
        assert!(usage(Some("mysql://x"), Some("postgres://db/y")).contains("--from"));
        let secret = usage(Some("sqlite://a.db"), Some("mysql://u:hunter2@db/x"));
        assert!(!secret.contains("hunter2"), "{secret}");
        assert_eq!(
            parse_args(Some("sqlite:///var/x.db"), Some("postgres://db/x")),
            Ok((PathBuf::from("/var/x.db"), "postgres://db/x".to_owned()))
        );
    }

    #[test]
    fn every_table_of_both_schemas_is_copied() {
        // PostgreSQL tables of running processes, never copied: the webhook dispatchers
        // registered, like the delivery leases they hold.
        const NOT_COPIED: &[&str] = &["delivery_dispatchers"];
        let names: Vec<&str> = tables().iter().map(|t| t.name).collect();
        for migrations in ["sqlite", "postgres"] {
            let dir = format!("{}/migrations/{migrations}", env!("CARGO_MANIFEST_DIR"));
            for entry in std::fs::read_dir(dir).unwrap() {
                let sql = std::fs::read_to_string(entry.unwrap().path()).unwrap();
                for line in sql.lines().filter(|l| l.starts_with("CREATE TABLE ")) {
                    let table = line["CREATE TABLE ".len()..].split_whitespace().next().unwrap();
                    let copied = names.contains(&table) || NOT_COPIED.contains(&table);
                    assert!(copied, "{migrations}: table {table} is not copied");
                }
            }
        }
    }
}
