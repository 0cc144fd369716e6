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

mod source;
mod tables;
#[cfg(test)]
mod tests;
mod values;

use std::fmt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::ToSql;
use tokio_postgres::NoTls;

use self::source::{read_source, Message};
use self::tables::{tables, Table};
use crate::config::{parse_database_url, DatabaseUrl};
use crate::store::postgres::{self, PoolSettings};

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
