//! SQLite migrations (embedded from `migrations/sqlite/`, applied by `refinery`: docs/DESIGN.md
//! "Migrations") and the signing-key query shared by readers and the writer.

use refinery::{Migration, Runner};
use rusqlite::{params, Connection, TransactionBehavior};

use super::worker::internal;
use crate::domain::token::KeyPair;
use crate::secrets::KeyRing;
use crate::store::sealing::open_signing_key;
use crate::store::{SigningKeys, StoreError};

/// Every migration, in order. A migration is never edited once released; add a new one.
const MIGRATIONS: &[(i32, &str, &str)] = &[
    (1, "init", include_str!("../../../migrations/sqlite/0001_init.sql")),
    (2, "webhooks", include_str!("../../../migrations/sqlite/0002_webhooks.sql")),
    (3, "live sessions index", include_str!("../../../migrations/sqlite/0003_live_sessions_index.sql")),
    (4, "no events by session", include_str!("../../../migrations/sqlite/0004_no_events_by_session.sql")),
    (5, "customer flow", include_str!("../../../migrations/sqlite/0005_customer_flow.sql")),
    (6, "qr code success url", include_str!("../../../migrations/sqlite/0006_qr_code_success_url.sql")),
    (7, "delivery claims", include_str!("../../../migrations/sqlite/0007_delivery_claims.sql")),
    (8, "idempotency by insertion", include_str!("../../../migrations/sqlite/0008_idempotency_by_insertion.sql")),
    (9, "idempotency session answers", include_str!("../../../migrations/sqlite/0009_idempotency_session_answers.sql")),
    (10, "subscription operations", include_str!("../../../migrations/sqlite/0010_subscription_operations.sql")),
];

/// Where refinery records the migrations applied (its default table, as it creates it).
const HISTORY: &str = "refinery_schema_history";
const CREATE_HISTORY: &str = "CREATE TABLE IF NOT EXISTS refinery_schema_history(
    version int4 PRIMARY KEY, name VARCHAR(255), applied_on VARCHAR(255), checksum VARCHAR(255))";
/// Where the hand-made runner before refinery recorded them (version, name, applied_on).
const OLD_HISTORY: &str = "schema_migrations";

/// `MIGRATIONS` as refinery runs them, named `V{version}__{name}` (spaces become `_`).
fn migrations() -> Result<Vec<Migration>, StoreError> {
    MIGRATIONS
        .iter()
        .map(|(version, name, sql)| {
            Migration::unapplied(&format!("V{version}__{}", name.replace(' ', "_")), sql)
                .map_err(|e| StoreError::Internal(format!("migration {version} ({name}): {e}")))
        })
        .collect()
}

/// Applies every migration not applied yet.
pub fn migrate(connection: &mut Connection) -> Result<(), StoreError> {
    run(connection, &migrations()?)
}

/// Applies those of `migrations` not applied yet, all in one transaction: refinery's
/// synchronous runner commits a migration apart from its history row unless grouped, and a
/// failure must leave nothing half-applied.
fn run(connection: &mut Connection, migrations: &[Migration]) -> Result<(), StoreError> {
    adopt_old_history(connection, migrations)?;
    let report = Runner::new(migrations)
        .set_grouped(true)
        .run(connection)
        .map_err(|e| StoreError::Internal(format!("the migrations failed, none was applied: {e}")))?;
    for migration in report.applied_migrations() {
        tracing::info!(version = migration.version(), name = migration.name(), "applied migration");
    }
    Ok(())
}

/// A database migrated before refinery (its migrations recorded in `schema_migrations`)
/// gets them recorded in refinery's history too, with the checksums of this build's
/// migrations, so that refinery applies only the rest. Done once: the old table stays as it
/// was, for a build from before refinery.
fn adopt_old_history(connection: &mut Connection, migrations: &[Migration]) -> Result<(), StoreError> {
    let tx = connection.transaction_with_behavior(TransactionBehavior::Immediate).map_err(|e| internal(&e))?;
    if !table_exists(&tx, OLD_HISTORY).map_err(|e| internal(&e))?
        || table_exists(&tx, HISTORY).map_err(|e| internal(&e))?
    {
        return Ok(());
    }
    tx.execute_batch(CREATE_HISTORY).map_err(|e| internal(&e))?;
    {
        // The old runner kept Unix milliseconds; refinery keeps RFC 3339 text.
        let mut insert = tx
            .prepare(
                "INSERT INTO refinery_schema_history (version, name, applied_on, checksum)
                 SELECT version, ?2, strftime('%Y-%m-%dT%H:%M:%fZ', applied_on / 1000.0, 'unixepoch'), ?3
                   FROM schema_migrations WHERE version = ?1",
            )
            .map_err(|e| internal(&e))?;
        for migration in migrations {
            insert
                .execute(params![migration.version(), migration.name(), migration.checksum().to_string()])
                .map_err(|e| internal(&e))?;
        }
    }
    tx.commit().map_err(|e| internal(&e))?;
    tracing::info!("recorded the migrations of schema_migrations in refinery_schema_history");
    Ok(())
}

fn table_exists(connection: &Connection, table: &str) -> rusqlite::Result<bool> {
    connection.query_row("SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = ?1", [table], |r| r.get(0))
}

/// The last migration applied to the database (`None`: not migrated), from refinery's
/// history or, on a database not migrated since refinery took over, from the old runner's.
pub fn applied_version(connection: &Connection) -> rusqlite::Result<Option<i64>> {
    for table in [HISTORY, OLD_HISTORY] {
        if table_exists(connection, table)? {
            return connection.query_row(&format!("SELECT max(version) FROM {table}"), [], |r| r.get(0));
        }
    }
    Ok(None)
}

/// `Ok` when every migration this build knows has been applied.
pub fn check_current(connection: &Connection) -> Result<(), StoreError> {
    let latest = MIGRATIONS.last().map_or(0, |m| i64::from(m.0));
    let applied = applied_version(connection)
        .map_err(|e| StoreError::Unavailable(format!("the database is not migrated: {e}")))?;
    match applied {
        Some(version) if version >= latest => Ok(()),
        _ => Err(StoreError::Unavailable(format!(
            "the database is at migration {}, this build needs {latest}; run `redirect-sessions migrate`",
            applied.unwrap_or(0)
        ))),
    }
}

/// The current key (its private half opened with `ring`) and the public keys of the ten keys
/// retired most recently.
pub fn load_signing_keys(connection: &Connection, ring: &KeyRing) -> Result<SigningKeys, StoreError> {
    let (kid, sealed): (String, Vec<u8>) = connection
        .query_row(
            "SELECT kid, secret FROM signing_keys WHERE retired_on IS NULL ORDER BY created_on DESC LIMIT 1",
            [],
            |row| Ok((row.get(0)?, row.get(1)?)),
        )
        .map_err(|e| internal(&e))?;
    let current = KeyPair { secret: open_signing_key(ring, &kid, &sealed)?, kid };
    let mut statement = connection
        .prepare_cached(
            "SELECT kid, public FROM signing_keys WHERE retired_on IS NOT NULL ORDER BY retired_on DESC LIMIT 10",
        )
        .map_err(|e| internal(&e))?;
    let previous = statement
        .query_map(params![], |row| Ok((row.get(0)?, row.get(1)?)))
        .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
        .map_err(|e| internal(&e))?;
    Ok(SigningKeys { current, previous })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn database() -> (Connection, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let connection = super::super::connect(&dir.path().join("d.db"), true).unwrap();
        (connection, dir)
    }

    fn history(connection: &Connection) -> Vec<(i64, String)> {
        let mut statement = connection.prepare("SELECT version, name FROM refinery_schema_history ORDER BY 1").unwrap();
        let rows = statement.query_map([], |r| Ok((r.get(0)?, r.get(1)?))).unwrap();
        rows.collect::<Result<_, _>>().unwrap()
    }

    /// What the hand-made runner before refinery left: the first `applied` migrations, each
    /// recorded in `schema_migrations`.
    fn migrated_by_the_old_runner(connection: &Connection, applied: usize) {
        connection
            .execute_batch(
                "CREATE TABLE schema_migrations (
                     version    INTEGER PRIMARY KEY,
                     name       TEXT    NOT NULL,
                     applied_on INTEGER NOT NULL)",
            )
            .unwrap();
        for (version, name, sql) in &MIGRATIONS[..applied] {
            connection.execute_batch(sql).unwrap();
            connection
                .execute(
                    "INSERT INTO schema_migrations (version, name, applied_on) VALUES (?1, ?2, 1800000000123)",
                    params![version, name],
                )
                .unwrap();
        }
    }

    #[test]
    fn a_database_of_the_old_runner_keeps_its_migrations_and_gets_the_rest() {
        for applied in [7, MIGRATIONS.len()] {
            let (mut connection, _dir) = database();
            migrated_by_the_old_runner(&connection, applied);
            assert_eq!(check_current(&connection).is_ok(), applied == MIGRATIONS.len(), "{applied}");
            migrate(&mut connection).unwrap_or_else(|e| panic!("{applied}: {e}"));
            let versions: Vec<i64> = history(&connection).into_iter().map(|(v, _)| v).collect();
            assert_eq!(versions, (1..=MIGRATIONS.len() as i64).collect::<Vec<_>>());
            assert_eq!(history(&connection)[2].1, "live_sessions_index");
            let adopted: String = connection
                .query_row("SELECT applied_on FROM refinery_schema_history WHERE version = 1", [], |r| r.get(0))
                .unwrap();
            assert_eq!(adopted, "2027-01-15T08:00:00.123Z");
            check_current(&connection).expect("current");
            // Again: refinery reads the adopted rows back (their times, their checksums).
            migrate(&mut connection).expect("a second run changes nothing");
        }
    }

    #[test]
    fn a_new_database_is_migrated_once_and_is_current() {
        let (mut connection, _dir) = database();
        let behind = check_current(&connection).expect_err("not migrated").to_string();
        assert!(behind.contains("at migration 0, this build needs 10"), "{behind}");
        migrate(&mut connection).unwrap();
        migrate(&mut connection).unwrap();
        assert_eq!(history(&connection).len(), MIGRATIONS.len());
        check_current(&connection).expect("current");
        assert_eq!(applied_version(&connection).unwrap(), Some(MIGRATIONS.len() as i64));
    }

    #[test]
    fn a_failing_migration_leaves_nothing_applied() {
        let (mut connection, _dir) = database();
        let migrations = [
            Migration::unapplied("V1__init", MIGRATIONS[0].2).unwrap(),
            Migration::unapplied("V2__broken", "CREATE TABLE half (a INTEGER); INSERT INTO nowhere VALUES (1);")
                .unwrap(),
        ];
        let error = run(&mut connection, &migrations).expect_err("the second fails").to_string();
        assert!(error.contains("nowhere"), "{error}");
        for table in ["sessions", "half"] {
            assert!(!table_exists(&connection, table).unwrap(), "{table} was created");
        }
        assert_eq!(applied_version(&connection).unwrap(), None);
    }
}
