//! Merchants and customers: the `MerchantStore` of the PostgreSQL store.

use super::*;

#[async_trait]
impl MerchantStore for PostgresStore {
    async fn create_merchant(&self, merchant: Merchant, key_hash: [u8; 32]) -> Result<()> {
        self.run(move |c| Box::pin(sessions::create_merchant(c, merchant, key_hash))).await
    }

    async fn merchant_by_key(&self, key_hash: [u8; 32]) -> Result<Option<Merchant>> {
        self.run(move |c| Box::pin(sessions::merchant_by_key(c, key_hash))).await
    }

    async fn list_merchants(&self) -> Result<Vec<Merchant>> {
        self.run(|c| Box::pin(sessions::list_merchants(c))).await
    }

    async fn rotate_merchant_key(&self, id: Uuid, key_hash: [u8; 32]) -> Result<bool> {
        self.run(move |c| Box::pin(sessions::rotate_merchant_key(c, id, key_hash))).await
    }

    async fn disable_merchant(&self, id: Uuid) -> Result<bool> {
        self.run(move |c| Box::pin(sessions::disable_merchant(c, id))).await
    }

    async fn create_customer(&self, id: Uuid, phone: String, now: Timestamp) -> Result<()> {
        self.run(move |c| Box::pin(sessions::create_customer(c, id, phone, now))).await
    }
}
