//! The token signing keys and the keys that seal the stored secrets.

use std::sync::Arc;

use async_trait::async_trait;

use super::*;
use crate::domain::time::Timestamp;
use crate::domain::token::KeyPair;

#[async_trait]
pub trait KeyStore: Send + Sync + 'static {
    /// The signing keys, creating `candidate` as the first one when there is none.
    async fn signing_keys(&self, candidate: KeyPair, now: Timestamp) -> Result<SigningKeys, StoreError>;

    /// Makes `next` the current key; the old one stays accepted.
    async fn rotate_signing_key(&self, next: KeyPair, now: Timestamp) -> Result<(), StoreError>;

    /// The keys that seal the secrets this store keeps (also for stored idempotent answers
    /// that show one).
    fn secrets(&self) -> Arc<crate::secrets::KeyRing>;
}
