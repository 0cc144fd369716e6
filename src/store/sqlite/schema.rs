//! SQLite migrations (embedded from `migrations/sqlite/`) and the signing-key query shared by
//! readers and the writer.

use rusqlite::{params, Connection};

use super::worker::internal;
use crate::domain::time::Timestamp;
use crate::domain::token::KeyPair;
use crate::secrets::KeyRing;
use crate::store::sealing::open_signing_key;
use crate::store::{SigningKeys, StoreError};

/// Every migration, in order. A migration is never edited once released; add a new one.
const MIGRATIONS: &[(i64, &str, &str)] = &[
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

/// Applies every migration not applied yet, each in its own transaction.
pub fn migrate(connection: &Connection) -> Result<(), StoreError> {
    connection
        .execute_batch(
            "CREATE TABLE IF NOT EXISTS schema_migrations (
                 version    INTEGER PRIMARY KEY,
                 name       TEXT    NOT NULL,
                 applied_on INTEGER NOT NULL)",
        )
        .map_err(|e| internal(&e))?;
    for (version, name, sql) in MIGRATIONS {
        let applied: bool = connection
            .query_row("SELECT count(*) FROM schema_migrations WHERE version = ?1", [version], |r| r.get(0))
            .map_err(|e| internal(&e))?;
        if applied {
            continue;
        }
        let apply = format!(
            "BEGIN IMMEDIATE; {sql}; INSERT INTO schema_migrations (version, name, applied_on) VALUES ({version}, '{name}', {}); COMMIT;",
            Timestamp::now().millis()
        );
        if let Err(error) = connection.execute_batch(&apply) {
            let _ = connection.execute_batch("ROLLBACK");
            return Err(StoreError::Internal(format!("migration {version} ({name}) failed: {error}")));
        }
        tracing::info!(version, name, "applied migration");
    }
    Ok(())
}

/// The last migration applied to the database, `None` before the first.
pub fn applied_version(connection: &Connection) -> rusqlite::Result<Option<i64>> {
    let recorded: bool = connection.query_row(
        "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'schema_migrations'",
        [],
        |r| r.get(0),
    )?;
    if !recorded {
        return Ok(None);
    }
    connection.query_row("SELECT max(version) FROM schema_migrations", [], |r| r.get(0))
}

/// `Ok` when every migration this build knows has been applied.
pub fn check_current(connection: &Connection) -> Result<(), StoreError> {
    let latest = MIGRATIONS.last().map_or(0, |m| m.0);
    let applied: Option<i64> = connection
        .query_row("SELECT max(version) FROM schema_migrations", [], |r| r.get(0))
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
