//! Secrets at rest on SQLite: the pass at every start that seals values still in clear (rows
//! written before encryption) and checks that every sealed value opens with the configured
//! keys, and the rotation that seals everything again with the current key.
//!
//! Both run with `secure_delete` on, and end with a checkpoint that truncates the WAL, so the
//! values they replace do not linger in the file's free space or in old WAL frames.

use std::path::Path;
use std::sync::Arc;

use rusqlite::{params, Connection};
use uuid::Uuid;

use super::worker::internal;
use crate::secrets::{row_of, Column, KeyRing, Resealed};
use crate::store::sealing::{idempotency_row, reseal_body, reseal_signing_key, reseal_text};
use crate::store::StoreError;

/// Seals what is in clear and checks the rest (`rotate`: seals values of old keys again too),
/// in one transaction on `c`, which must not be inside one.
pub fn reseal(c: &Connection, ring: &KeyRing, rotate: bool) -> Result<Resealed, StoreError> {
    c.execute_batch("PRAGMA secure_delete = ON; BEGIN IMMEDIATE").map_err(|e| internal(&e))?;
    let result = reseal_rows(c, ring, rotate);
    let finished = match &result {
        Ok(_) => c.execute_batch("COMMIT"),
        Err(_) => c.execute_batch("ROLLBACK"),
    };
    let _ = c.execute_batch("PRAGMA secure_delete = OFF");
    finished.map_err(|e| internal(&e))?;
    let counts = result?;
    if counts.total() > 0 {
        // The replaced values are in WAL frames until a checkpoint copies the new pages over
        // them; TRUNCATE then empties the WAL. Busy (readers of another process) leaves it to
        // the next checkpoint.
        if let Err(error) = c.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(())) {
            tracing::warn!(%error, "could not truncate the WAL after sealing secrets");
        }
    }
    Ok(counts)
}

fn reseal_rows(c: &Connection, ring: &KeyRing, rotate: bool) -> Result<Resealed, StoreError> {
    let mut counts = Resealed::default();

    type SubscriptionSecrets = ([u8; 16], String, String, Option<String>);
    let subscriptions: Vec<SubscriptionSecrets> = c
        .prepare("SELECT id, api_key, signing_secret, previous_secret FROM subscriptions")
        .and_then(|mut s| s.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?.collect())
        .map_err(|e| internal(&e))?;
    for (id, api_key, secret, previous) in subscriptions {
        let row = row_of(Uuid::from_bytes(id));
        let new_key = reseal_text(ring, Column::SubscriptionApiKey, &row, &api_key, rotate)?;
        let new_secret = reseal_text(ring, Column::SubscriptionSigningSecret, &row, &secret, rotate)?;
        // A replaced secret is sealed under the signing secret's column and row.
        let new_previous = match &previous {
            Some(previous) => reseal_text(ring, Column::SubscriptionSigningSecret, &row, previous, rotate)?,
            None => None,
        };
        if new_key.is_none() && new_secret.is_none() && new_previous.is_none() {
            counts.unchanged += 1;
            continue;
        }
        c.execute(
            "UPDATE subscriptions SET api_key = ?2, signing_secret = ?3, previous_secret = ?4 WHERE id = ?1",
            params![id, new_key.unwrap_or(api_key), new_secret.unwrap_or(secret), new_previous.or(previous)],
        )
        .map_err(|e| internal(&e))?;
        counts.subscriptions += 1;
    }

    let keys: Vec<(String, Vec<u8>)> = c
        .prepare("SELECT kid, secret FROM signing_keys")
        .and_then(|mut s| s.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?.collect())
        .map_err(|e| internal(&e))?;
    for (kid, secret) in keys {
        match reseal_signing_key(ring, &kid, &secret, rotate)? {
            None => counts.unchanged += 1,
            Some(sealed) => {
                c.execute("UPDATE signing_keys SET secret = ?2 WHERE kid = ?1", params![kid, sealed])
                    .map_err(|e| internal(&e))?;
                counts.signing_keys += 1;
            }
        }
    }

    if rotate {
        // Only answers that show a secret are sealed, and only those start with `v1:`.
        let answers: Vec<([u8; 16], [u8; 16], Vec<u8>)> = c
            .prepare("SELECT merchant_id, request_id, body FROM idempotency WHERE substr(body, 1, 3) = X'76313A'")
            .and_then(|mut s| s.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?.collect())
            .map_err(|e| internal(&e))?;
        for (merchant, request, body) in answers {
            let row = idempotency_row(Uuid::from_bytes(merchant), Uuid::from_bytes(request));
            match reseal_body(ring, &row, &body)? {
                None => counts.unchanged += 1,
                Some(sealed) => {
                    c.execute(
                        "UPDATE idempotency SET body = ?3 WHERE merchant_id = ?1 AND request_id = ?2",
                        params![merchant, request, sealed],
                    )
                    .map_err(|e| internal(&e))?;
                    counts.idempotent_answers += 1;
                }
            }
        }
    }
    Ok(counts)
}

/// `secrets rotate` on the database at `path`: migrates it, then seals every secret again
/// with the current key, on a connection of its own (a running server keeps serving).
pub async fn rotate(path: &Path, ring: Arc<KeyRing>) -> Result<Resealed, StoreError> {
    let path = path.to_owned();
    tokio::task::spawn_blocking(move || {
        if !path.is_file() {
            return Err(StoreError::Unavailable(format!("there is no SQLite database at {}", path.display())));
        }
        let connection = super::connect(&path, true)?;
        super::schema::migrate(&connection)?;
        reseal(&connection, &ring, true)
    })
    .await
    .map_err(|e| StoreError::Internal(e.to_string()))?
}
