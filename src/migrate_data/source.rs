//! Reading the source: the SQLite database, read-only, in one read transaction.

use std::path::Path;

use rusqlite::{Connection, OpenFlags};
use tokio::sync::mpsc;

use super::tables::{Convert, Row};
use super::{BATCH, SQLITE_SCHEMA_VERSION};

/// What the reader thread sends: first the row counts, then each table's rows and its end.
pub(super) enum Message {
    Counts(Vec<u64>),
    Rows(Vec<Row>),
    End,
    Failed(String),
}

/// The reader thread: opens the source read-only, checks it, and streams every table from one
/// read transaction (a consistent snapshot) until done or the receiver goes away.
pub(super) fn read_source(
    path: &Path,
    tables: &[(&'static str, &'static str, Convert)],
    sender: &mpsc::Sender<Message>,
) {
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
    let version = crate::store::sqlite::schema_version(&connection)
        .map_err(|e| format!("cannot read the source database {shown}: {e}"))?
        .ok_or_else(|| {
            format!("the source database {shown} is not a migrated redirect-sessions database; {run_migrate}")
        })?;
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
