//! PostgreSQL migrations (embedded from `migrations/postgres/`), the readiness check, and the
//! signing keys shared by every instance.

use std::sync::Arc;

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

/// Advisory lock keys (arbitrary constants; each names one critical section).
const MIGRATION_LOCK: i64 = 0x7273_6d69_6772_6174; // "rsmigrat"
const SIGNING_KEY_LOCK: i64 = 0x7273_7369_676e_6b79; // "rssignky"

/// Applies every migration not applied yet, each in its own transaction under an advisory
/// lock: instances starting together take turns, and the later ones find the work done.
pub async fn migrate(client: &mut Client) -> Result<()> {
    for (version, name, sql) in MIGRATIONS {
        let tx = client.transaction().await?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK]).await?;
        // Building an index on a large table may take longer than a request may.
        tx.batch_execute(
            "SET LOCAL statement_timeout = 0;
             CREATE TABLE IF NOT EXISTS schema_migrations (
                 version    integer     PRIMARY KEY,
                 name       text        NOT NULL,
                 applied_on timestamptz NOT NULL DEFAULT now())",
        )
        .await?;
        let applied = tx.query_opt("SELECT 1 FROM schema_migrations WHERE version = $1", &[version]).await?.is_some();
        if !applied {
            tx.batch_execute(sql)
                .await
                .map_err(|e| internal(format!("migration {version} ({name}) failed: {}", super::describe(&e))))?;
            tx.execute("INSERT INTO schema_migrations (version, name) VALUES ($1, $2)", &[version, name]).await?;
            tracing::info!(version, name, "applied migration");
        }
        tx.commit().await?;
    }
    Ok(())
}

/// `Ok` when every migration this build knows has been applied.
pub async fn check_current(c: &mut Client) -> Result<()> {
    let latest = MIGRATIONS.last().map_or(0, |m| m.0);
    let applied: Option<i32> = match query_one(&*c, "SELECT max(version) FROM schema_migrations", &[]).await {
        Ok(row) => row.try_get(0)?,
        Err(e) => return Err(StoreError::Unavailable(format!("the database is not migrated: {e}"))),
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
