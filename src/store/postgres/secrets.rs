//! Secrets at rest on PostgreSQL: the pass at every start that seals values still in clear
//! (rows written before encryption) and checks that every sealed value opens with the
//! configured keys, and the rotation that seals everything again with the current key.
//!
//! One transaction under an advisory lock: instances starting together take turns, and the
//! later ones find the work done. Rows are read without locks (running instances keep
//! queueing deliveries, which share-lock subscriptions) and each update is conditional on the
//! value read, so one that changed meanwhile (a PATCH, sealed already) is left alone. Replaced
//! values stay in dead row versions until VACUUM (docs/OPERATIONS.md "Secrets at rest").

use uuid::Uuid;

use super::{execute, query, Client, Result};
use crate::secrets::{row_of, Column, KeyRing, Resealed};
use crate::store::sealing::{idempotency_row, reseal_body, reseal_signing_key, reseal_text};

/// Advisory lock key (see `schema.rs`): "rsseclck".
const SECRETS_LOCK: i64 = 0x7273_7365_636c_636b;

/// Seals what is in clear and checks the rest (`rotate`: seals values of old keys again too).
pub async fn reseal(client: &mut Client, ring: &KeyRing, rotate: bool) -> Result<Resealed> {
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&SECRETS_LOCK]).await?;
    // A rotation reads every stored idempotent answer, which may take longer than a request may.
    tx.batch_execute("SET LOCAL statement_timeout = 0").await?;
    let mut counts = Resealed::default();

    let subscriptions =
        query(&tx, "SELECT id, api_key, signing_secret, previous_secret FROM subscriptions", &[]).await?;
    for row in &subscriptions {
        let (id, api_key, secret): (Uuid, String, String) = (row.try_get(0)?, row.try_get(1)?, row.try_get(2)?);
        let previous: Option<String> = row.try_get(3)?;
        let at = row_of(id);
        let new_key = reseal_text(ring, Column::SubscriptionApiKey, &at, &api_key, rotate)?;
        let new_secret = reseal_text(ring, Column::SubscriptionSigningSecret, &at, &secret, rotate)?;
        // The secret a rotation replaced is sealed under the same column and row.
        let new_previous = match &previous {
            Some(previous) => reseal_text(ring, Column::SubscriptionSigningSecret, &at, previous, rotate)?,
            None => None,
        };
        if new_key.is_none() && new_secret.is_none() && new_previous.is_none() {
            counts.unchanged += 1;
            continue;
        }
        let changed = execute(
            &tx,
            "UPDATE subscriptions SET api_key = $5, signing_secret = $6, previous_secret = $7
              WHERE id = $1 AND api_key = $2 AND signing_secret = $3 AND previous_secret IS NOT DISTINCT FROM $4",
            &[
                &id,
                &api_key,
                &secret,
                &previous,
                &new_key.unwrap_or_else(|| api_key.clone()),
                &new_secret.unwrap_or_else(|| secret.clone()),
                &new_previous.or_else(|| previous.clone()),
            ],
        )
        .await?;
        counts.subscriptions += changed;
    }

    let keys = query(&tx, "SELECT kid, secret FROM signing_keys", &[]).await?;
    for row in &keys {
        let (kid, secret): (String, Vec<u8>) = (row.try_get(0)?, row.try_get(1)?);
        match reseal_signing_key(ring, &kid, &secret, rotate)? {
            None => counts.unchanged += 1,
            Some(sealed) => {
                let update = "UPDATE signing_keys SET secret = $3 WHERE kid = $1 AND secret = $2";
                counts.signing_keys += execute(&tx, update, &[&kid, &secret, &sealed]).await?;
            }
        }
    }

    if rotate {
        // Only answers that show a secret are sealed, and only those start with `v1:`.
        let answers = query(
            &tx,
            "SELECT merchant_id, request_id, body FROM idempotency
              WHERE substring(body FROM 1 FOR 3) = '\\x76313a'::bytea",
            &[],
        )
        .await?;
        for row in &answers {
            let (merchant, request, body): (Uuid, Uuid, Vec<u8>) = (row.try_get(0)?, row.try_get(1)?, row.try_get(2)?);
            match reseal_body(ring, &idempotency_row(merchant, request), &body)? {
                None => counts.unchanged += 1,
                Some(sealed) => {
                    counts.idempotent_answers += execute(
                        &tx,
                        "UPDATE idempotency SET body = $4 WHERE merchant_id = $1 AND request_id = $2 AND body = $3",
                        &[&merchant, &request, &body, &sealed],
                    )
                    .await?;
                }
            }
        }
    }
    tx.commit().await?;
    Ok(counts)
}
