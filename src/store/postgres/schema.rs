//! PostgreSQL migrations (embedded from `migrations/postgres/`, applied by `refinery`:
//! docs/DESIGN.md "Migrations"), the readiness check, and the signing keys shared by every
//! instance.

use std::sync::Arc;

use deadpool_postgres::GenericClient;
use refinery::{Migration, Runner};

use super::{bytes32, execute, internal, query, query_one, query_opt, Client, Result, Ts};
use crate::domain::time::Timestamp;
use crate::domain::token::KeyPair;
use crate::secrets::KeyRing;
use crate::store::sealing::open_signing_key;
use crate::store::{SigningKeys, StoreError};

/// Every migration, in order. A migration is never edited once released; add a new one.
pub(super) const MIGRATIONS: &[(i32, &str, &str)] = &[
    (1, "init", include_str!("../../../migrations/postgres/0001_init.sql")),
    (2, "webhooks", include_str!("../../../migrations/postgres/0002_webhooks.sql")),
    (3, "customer flow", include_str!("../../../migrations/postgres/0003_customer_flow.sql")),
    (4, "qr code success url", include_str!("../../../migrations/postgres/0004_qr_code_success_url.sql")),
    (5, "delivery claims", include_str!("../../../migrations/postgres/0005_delivery_claims.sql")),
    (
        6,
        "idempotency session answers",
        include_str!("../../../migrations/postgres/0006_idempotency_session_answers.sql"),
    ),
    (7, "subscription operations", include_str!("../../../migrations/postgres/0007_subscription_operations.sql")),
    (8, "event data text", include_str!("../../../migrations/postgres/0008_event_data_text.sql")),
];

/// Where refinery records the migrations applied (its default table, as it creates it).
const HISTORY: &str = "refinery_schema_history";
const CREATE_HISTORY: &str = "CREATE TABLE IF NOT EXISTS refinery_schema_history(
    version int4 PRIMARY KEY, name VARCHAR(255), applied_on VARCHAR(255), checksum VARCHAR(255))";
/// Where the hand-made runner before refinery recorded them (version, name, applied_on).
const OLD_HISTORY: &str = "schema_migrations";

/// Advisory lock keys (arbitrary constants; each names one critical section).
const MIGRATION_LOCK: i64 = 0x7273_6d69_6772_6174; // "rsmigrat"
const SIGNING_KEY_LOCK: i64 = 0x7273_7369_676e_6b79; // "rssignky"

/// `MIGRATIONS` as refinery runs them, named `V{version}__{name}` (spaces become `_`).
fn migrations() -> Result<Vec<Migration>> {
    MIGRATIONS
        .iter()
        .map(|(version, name, sql)| {
            Migration::unapplied(&format!("V{version}__{}", name.replace(' ', "_")), sql)
                .map_err(|e| internal(format!("migration {version} ({name}): {e}")))
        })
        .collect()
}

/// Applies every migration not applied yet, each in its own transaction (with its history
/// row), under an advisory lock: instances starting together take turns, and the later ones
/// find the work done.
pub async fn migrate(client: &mut Client) -> Result<()> {
    run(client, &migrations()?).await
}

/// Applies those of `migrations` not applied yet, holding `MIGRATION_LOCK`. The lock is the
/// session's, since refinery runs each migration in a transaction of its own; it is given
/// back whatever happens (and by the server if the connection breaks).
pub(super) async fn run(client: &mut Client, migrations: &[Migration]) -> Result<()> {
    client.execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK]).await?;
    // Building an index on a large table may take longer than a request may.
    let result = match client.batch_execute("SET statement_timeout = 0").await {
        Ok(()) => apply(client, migrations).await,
        Err(e) => Err(e.into()),
    };
    let reset = client.batch_execute("RESET statement_timeout").await;
    let unlocked = client.execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK]).await;
    result?;
    reset?;
    unlocked?;
    Ok(())
}

async fn apply(client: &mut Client, migrations: &[Migration]) -> Result<()> {
    adopt_old_history(client, migrations).await?;
    let connection: &mut tokio_postgres::Client = client;
    let report = Runner::new(migrations).run_async(connection).await.map_err(|e| {
        let cause = std::error::Error::source(&e).and_then(|c| c.downcast_ref::<tokio_postgres::Error>());
        internal(format!(
            "the migrations failed: {e}{}",
            cause.map(|c| format!(" ({})", super::describe(c))).unwrap_or_default()
        ))
    })?;
    for migration in report.applied_migrations() {
        tracing::info!(version = migration.version(), name = migration.name(), "applied migration");
    }
    Ok(())
}

/// A database migrated before refinery (its migrations recorded in `schema_migrations`)
/// gets them recorded in refinery's history too, with the checksums of this build's
/// migrations, so that refinery applies only the rest. Done once: the old table stays as it
/// was, for a build from before refinery.
async fn adopt_old_history(client: &mut Client, migrations: &[Migration]) -> Result<()> {
    let tx = client.transaction().await?;
    let (old, new) = tables(&tx).await?;
    if !old || new {
        return Ok(());
    }
    tx.batch_execute(CREATE_HISTORY).await?;
    // The old runner kept `timestamptz`; refinery keeps RFC 3339 text.
    let insert = tx
        .prepare(
            "INSERT INTO refinery_schema_history (version, name, applied_on, checksum)
             SELECT version, $2, to_char(applied_on AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'), $3
               FROM schema_migrations WHERE version = $1",
        )
        .await?;
    for migration in migrations {
        let checksum = migration.checksum().to_string();
        tx.execute(&insert, &[&migration.version(), &migration.name(), &checksum]).await?;
    }
    tx.commit().await?;
    tracing::info!("recorded the migrations of schema_migrations in refinery_schema_history");
    Ok(())
}

/// Whether the old runner's history table exists, and whether refinery's does.
async fn tables(c: &impl GenericClient) -> Result<(bool, bool)> {
    let sql = "SELECT to_regclass('schema_migrations') IS NOT NULL, to_regclass('refinery_schema_history') IS NOT NULL";
    let row = query_one(c, sql, &[]).await?;
    Ok((row.try_get(0)?, row.try_get(1)?))
}

/// `Ok` when every migration this build knows has been applied (recorded by refinery, or by
/// the old runner on a database not migrated since).
pub async fn check_current(c: &mut Client) -> Result<()> {
    let latest = MIGRATIONS.last().map_or(0, |m| m.0);
    let not_migrated = |e: StoreError| StoreError::Unavailable(format!("the database is not migrated: {e}"));
    let applied: Option<i32> = match tables(&*c).await.map_err(not_migrated)? {
        (_, true) => query_one(&*c, &format!("SELECT max(version) FROM {HISTORY}"), &[])
            .await
            .map_err(not_migrated)?
            .try_get(0)?,
        (true, false) => query_one(&*c, &format!("SELECT max(version) FROM {OLD_HISTORY}"), &[])
            .await
            .map_err(not_migrated)?
            .try_get(0)?,
        (false, false) => None,
    };
    match applied {
        Some(version) if version >= latest => Ok(()),
        _ => Err(StoreError::Unavailable(format!(
            "the database is at migration {}, this build needs {latest}; run `redirect-sessions migrate`",
            applied.unwrap_or(0)
        ))),
    }
}

/// The signing keys, making `candidate` (whose private key sealed is `sealed`) the first one
/// when there is no current key. The partial unique index `signing_keys_one_current` turns
/// concurrent first starts into one insert and several no-ops, so every instance loads the
/// same key.
pub async fn signing_keys(
    c: &mut Client,
    ring: Arc<KeyRing>,
    candidate: KeyPair,
    sealed: Vec<u8>,
    now: Timestamp,
) -> Result<SigningKeys> {
    execute(
        &*c,
        "INSERT INTO signing_keys (kid, secret, public, created_on) VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
        &[&candidate.kid, &sealed, &&candidate.public()[..], &Ts(now)],
    )
    .await?;
    load_signing_keys(c, &ring).await
}

/// Makes `next` (whose private key sealed is `sealed`) the current key; the old one stays
/// accepted.
pub async fn rotate_signing_key(c: &mut Client, next: KeyPair, sealed: Vec<u8>, now: Timestamp) -> Result<()> {
    let tx = c.transaction().await?;
    // Two rotations at once would each retire only the key they saw and then collide on the
    // one-current-key index; taking turns makes the second retire the first's new key.
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&SIGNING_KEY_LOCK]).await?;
    execute(&tx, "UPDATE signing_keys SET retired_on = $1 WHERE retired_on IS NULL", &[&Ts(now)]).await?;
    execute(
        &tx,
        "INSERT INTO signing_keys (kid, secret, public, created_on) VALUES ($1, $2, $3, $4)",
        &[&next.kid, &sealed, &&next.public()[..], &Ts(now)],
    )
    .await?;
    tx.commit().await?;
    Ok(())
}

/// The current key (its private half opened with `ring`) and the public keys of the ten keys
/// retired most recently.
async fn load_signing_keys(c: &Client, ring: &KeyRing) -> Result<SigningKeys> {
    let current = query_opt(
        c,
        "SELECT kid, secret FROM signing_keys WHERE retired_on IS NULL ORDER BY created_on DESC LIMIT 1",
        &[],
    )
    .await?
    .ok_or_else(|| internal("there is no current signing key"))?;
    let kid: String = current.try_get(0)?;
    let current = KeyPair { secret: open_signing_key(ring, &kid, current.try_get(1)?)?, kid };
    let previous = query(
        c,
        "SELECT kid, public FROM signing_keys WHERE retired_on IS NOT NULL ORDER BY retired_on DESC LIMIT 10",
        &[],
    )
    .await?
    .iter()
    .map(|row| Ok((row.try_get(0)?, bytes32(row, 1)?)))
    .collect::<Result<Vec<_>>>()?;
    Ok(SigningKeys { current, previous })
}
