//! Sealing the store's secrets (`crate::secrets`), shared by both backends: records are
//! sealed just before they are written and opened just after they are read, so that every
//! other layer sees plaintext and the database sees none.

use uuid::Uuid;

use super::webhooks::{ClaimedDelivery, SubscriptionRecord};
use super::StoreError;
use crate::domain::token::KeyPair;
use crate::secrets::{row_of, Column, KeyRing, SecretsError};

impl From<SecretsError> for StoreError {
    fn from(error: SecretsError) -> Self {
        StoreError::Internal(error.to_string())
    }
}

/// The record with its API key and signing secret sealed, as stored.
pub fn seal_subscription(ring: &KeyRing, mut record: SubscriptionRecord) -> Result<SubscriptionRecord, StoreError> {
    let row = row_of(record.id);
    record.spec.api_key = ring.seal_text(Column::SubscriptionApiKey, &row, &record.spec.api_key)?;
    record.signing_secret = ring.seal_text(Column::SubscriptionSigningSecret, &row, &record.signing_secret)?;
    if let Some(previous) = &mut record.previous_secret {
        previous.secret = ring.seal_text(Column::SubscriptionSigningSecret, &row, &previous.secret)?;
    }
    Ok(record)
}

/// A stored record with its API key and signing secret opened.
pub fn open_subscription(ring: &KeyRing, mut record: SubscriptionRecord) -> Result<SubscriptionRecord, StoreError> {
    let row = row_of(record.id);
    record.spec.api_key = ring.open_text(Column::SubscriptionApiKey, &row, &record.spec.api_key)?;
    record.signing_secret = ring.open_text(Column::SubscriptionSigningSecret, &row, &record.signing_secret)?;
    if let Some(previous) = &mut record.previous_secret {
        previous.secret = ring.open_text(Column::SubscriptionSigningSecret, &row, &previous.secret)?;
    }
    Ok(record)
}

/// A new signing secret of the subscription `id`, sealed. A replaced secret is kept as it
/// was sealed (the same column and row), so a rotation copies it without opening it.
pub fn seal_signing_secret(ring: &KeyRing, id: Uuid, secret: &str) -> Result<String, StoreError> {
    Ok(ring.seal_text(Column::SubscriptionSigningSecret, &row_of(id), secret)?)
}

/// A new API key of the subscription `id`, sealed.
pub fn seal_api_key(ring: &KeyRing, id: Uuid, api_key: &str) -> Result<String, StoreError> {
    Ok(ring.seal_text(Column::SubscriptionApiKey, &row_of(id), api_key)?)
}

/// A claimed delivery (read with the sealed values of its subscription `subscription`) with
/// the API key and signing secret opened.
pub fn open_claimed(
    ring: &KeyRing,
    subscription: Uuid,
    mut delivery: ClaimedDelivery,
) -> Result<ClaimedDelivery, SecretsError> {
    let row = row_of(subscription);
    delivery.api_key = ring.open_text(Column::SubscriptionApiKey, &row, &delivery.api_key)?;
    delivery.signing_secret = ring.open_text(Column::SubscriptionSigningSecret, &row, &delivery.signing_secret)?;
    if let Some(previous) = &mut delivery.previous_secret {
        *previous = ring.open_text(Column::SubscriptionSigningSecret, &row, previous)?;
    }
    Ok(delivery)
}

/// The private key of `pair`, sealed, as the bytes of `signing_keys.secret`.
pub fn seal_signing_key(ring: &KeyRing, pair: &KeyPair) -> Result<Vec<u8>, StoreError> {
    Ok(ring.seal(Column::SigningKeySecret, &pair.kid, &pair.secret)?.into_bytes())
}

/// The private key stored as `stored` for the key `kid`.
pub fn open_signing_key(ring: &KeyRing, kid: &str, stored: &[u8]) -> Result<[u8; 32], StoreError> {
    let not_sealed = || SecretsError::NotSealed { column: Column::SigningKeySecret, row: kid.to_owned() };
    let text = std::str::from_utf8(stored).map_err(|_| not_sealed())?;
    let mut opened = ring.open(Column::SigningKeySecret, kid, text)?;
    let key = <[u8; 32]>::try_from(opened.as_slice())
        .map_err(|_| StoreError::Internal(format!("signing_keys.secret of {kid} does not hold 32 bytes")));
    zeroize::Zeroize::zeroize(&mut opened);
    key
}

/// What the start-up pass does to one stored `signing_keys.secret`: `None` when it stays, else
/// the value to write. 32 bytes are a key from before encryption.
pub fn reseal_signing_key(
    ring: &KeyRing,
    kid: &str,
    stored: &[u8],
    rotate: bool,
) -> Result<Option<Vec<u8>>, StoreError> {
    use crate::secrets::Found;
    if stored.len() == 32 {
        return Ok(Some(ring.seal(Column::SigningKeySecret, kid, stored)?.into_bytes()));
    }
    let text = std::str::from_utf8(stored)
        .map_err(|_| SecretsError::NotSealed { column: Column::SigningKeySecret, row: kid.to_owned() })?;
    match ring.check(Column::SigningKeySecret, kid, text)? {
        Found::Plain => Err(SecretsError::NotSealed { column: Column::SigningKeySecret, row: kid.to_owned() }.into()),
        Found::Old if rotate => Ok(Some(ring.reseal(Column::SigningKeySecret, kid, text)?.into_bytes())),
        Found::Old | Found::Current => Ok(None),
    }
}

/// What the start-up pass does to one stored text secret: `None` when it stays, else the
/// value to write (values in clear are sealed; with `rotate`, values of old keys too).
pub fn reseal_text(
    ring: &KeyRing,
    column: Column,
    row: &str,
    stored: &str,
    rotate: bool,
) -> Result<Option<String>, StoreError> {
    use crate::secrets::Found;
    Ok(match ring.check(column, row, stored)? {
        Found::Plain => Some(ring.seal_text(column, row, stored)?),
        Found::Old if rotate => Some(ring.reseal(column, row, stored)?),
        Found::Old | Found::Current => None,
    })
}

/// What a rotation does to a stored idempotent answer: `None` when it stays (in clear: it
/// shows no secret; or sealed with the current key), else the value to write.
pub fn reseal_body(ring: &KeyRing, row: &str, stored: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
    use crate::secrets::Found;
    let Ok(text) = std::str::from_utf8(stored) else {
        return Ok(None);
    };
    Ok(match ring.check(Column::IdempotentBody, row, text)? {
        Found::Old => Some(ring.reseal(Column::IdempotentBody, row, text)?.into_bytes()),
        Found::Plain | Found::Current => None,
    })
}

/// The row id of a stored idempotent answer.
pub fn idempotency_row(merchant_id: Uuid, request_id: Uuid) -> String {
    format!("{}/{}", row_of(merchant_id), row_of(request_id))
}
