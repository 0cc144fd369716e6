//! Merchants and customers: the `MerchantStore` of the SQLite store.

use super::*;
use crate::store::rows::MERCHANT_COLUMNS;

#[async_trait]
impl MerchantStore for SqliteStore {
    async fn create_merchant(&self, merchant: Merchant, key_hash: [u8; 32]) -> Result<(), StoreError> {
        self.writer
            .run(move |c| {
                c.execute(
                    "INSERT INTO merchants (id, name, api_key_hash, disabled, created_on) VALUES (?1, ?2, ?3, ?4, ?5)",
                    params![
                        merchant.id.as_bytes(),
                        merchant.name,
                        key_hash,
                        merchant.disabled,
                        merchant.created_on.millis()
                    ],
                )
                .map(drop)
                .map_err(|e| internal(&e))
            })
            .await
    }

    async fn merchant_by_key(&self, key_hash: [u8; 32]) -> Result<Option<Merchant>, StoreError> {
        self.point_reads
            .run(move |c| {
                c.prepare_cached(&format!("SELECT {MERCHANT_COLUMNS} FROM merchants WHERE api_key_hash = ?1"))
                    .and_then(|mut s| s.query_row(params![key_hash], merchant_from_row).optional())
                    .map_err(|e| internal(&e))
            })
            .await
    }

    async fn list_merchants(&self) -> Result<Vec<Merchant>, StoreError> {
        self.readers
            .run(|c| {
                c.prepare_cached(&format!("SELECT {MERCHANT_COLUMNS} FROM merchants ORDER BY created_on, id"))
                    .and_then(|mut s| s.query_map([], merchant_from_row)?.collect())
                    .map_err(|e| internal(&e))
            })
            .await
    }

    async fn rotate_merchant_key(&self, id: Uuid, key_hash: [u8; 32]) -> Result<bool, StoreError> {
        self.writer
            .run(move |c| {
                c.execute("UPDATE merchants SET api_key_hash = ?2 WHERE id = ?1", params![id.as_bytes(), key_hash])
                    .map(|n| n == 1)
                    .map_err(|e| internal(&e))
            })
            .await
    }

    async fn disable_merchant(&self, id: Uuid) -> Result<bool, StoreError> {
        self.writer
            .run(move |c| {
                c.execute("UPDATE merchants SET disabled = 1 WHERE id = ?1", params![id.as_bytes()])
                    .map(|n| n == 1)
                    .map_err(|e| internal(&e))
            })
            .await
    }

    async fn create_customer(&self, id: Uuid, phone: String, now: Timestamp) -> Result<(), StoreError> {
        self.writer
            .run(move |c| {
                c.execute(
                    "INSERT INTO customers (id, phone, created_on) VALUES (?1, ?2, ?3)",
                    params![id.as_bytes(), phone, now.millis()],
                )
                .map(drop)
                .map_err(|e| internal(&e))
            })
            .await
    }
}
