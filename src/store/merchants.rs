//! Merchants and their keys, and customers created by operators.

use async_trait::async_trait;
use uuid::Uuid;

use super::*;
use crate::domain::time::Timestamp;

#[async_trait]
pub trait MerchantStore: Send + Sync + 'static {
    async fn create_merchant(&self, merchant: Merchant, key_hash: [u8; 32]) -> Result<(), StoreError>;

    /// The enabled or disabled merchant whose key hashes to `key_hash`.
    async fn merchant_by_key(&self, key_hash: [u8; 32]) -> Result<Option<Merchant>, StoreError>;

    async fn list_merchants(&self) -> Result<Vec<Merchant>, StoreError>;

    /// Replaces the key; `false` when there is no such merchant.
    async fn rotate_merchant_key(&self, id: Uuid, key_hash: [u8; 32]) -> Result<bool, StoreError>;

    /// `false` when there is no such merchant.
    async fn disable_merchant(&self, id: Uuid) -> Result<bool, StoreError>;

    async fn create_customer(&self, id: Uuid, phone: String, now: Timestamp) -> Result<(), StoreError>;
}
