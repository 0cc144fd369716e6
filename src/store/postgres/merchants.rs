//! Merchants and customers: the `MerchantStore` of the PostgreSQL store.

use super::*;
use crate::store::rows::{self, MERCHANT_COLUMNS};

#[async_trait]
impl MerchantStore for PostgresStore {
    async fn create_merchant(&self, merchant: Merchant, key_hash: [u8; 32]) -> Result<()> {
        self.run(move |c| Box::pin(create_merchant(c, merchant, key_hash))).await
    }

    async fn merchant_by_key(&self, key_hash: [u8; 32]) -> Result<Option<Merchant>> {
        self.run(move |c| Box::pin(merchant_by_key(c, key_hash))).await
    }

    async fn list_merchants(&self) -> Result<Vec<Merchant>> {
        self.run(|c| Box::pin(list_merchants(c))).await
    }

    async fn rotate_merchant_key(&self, id: Uuid, key_hash: [u8; 32]) -> Result<bool> {
        self.run(move |c| Box::pin(rotate_merchant_key(c, id, key_hash))).await
    }

    async fn disable_merchant(&self, id: Uuid) -> Result<bool> {
        self.run(move |c| Box::pin(disable_merchant(c, id))).await
    }

    async fn create_customer(&self, id: Uuid, phone: String, now: Timestamp) -> Result<()> {
        self.run(move |c| Box::pin(create_customer(c, id, phone, now))).await
    }
}

async fn create_merchant(c: &mut Client, merchant: Merchant, key_hash: [u8; 32]) -> Result<()> {
    execute(
        &*c,
        "INSERT INTO merchants (id, name, api_key_hash, disabled, created_on) VALUES ($1, $2, $3, $4, $5)",
        &[&merchant.id, &merchant.name, &&key_hash[..], &merchant.disabled, &Ts(merchant.created_on)],
    )
    .await?;
    Ok(())
}

async fn merchant_by_key(c: &mut Client, key_hash: [u8; 32]) -> Result<Option<Merchant>> {
    let row =
        query_opt(&*c, &format!("SELECT {MERCHANT_COLUMNS} FROM merchants WHERE api_key_hash = $1"), &[&&key_hash[..]])
            .await?;
    row.as_ref().map(rows::merchant).transpose()
}

async fn list_merchants(c: &mut Client) -> Result<Vec<Merchant>> {
    let found = query(&*c, &format!("SELECT {MERCHANT_COLUMNS} FROM merchants ORDER BY created_on, id"), &[]).await?;
    found.iter().map(rows::merchant).collect()
}

async fn rotate_merchant_key(c: &mut Client, id: Uuid, key_hash: [u8; 32]) -> Result<bool> {
    let changed = execute(&*c, "UPDATE merchants SET api_key_hash = $2 WHERE id = $1", &[&id, &&key_hash[..]]).await?;
    Ok(changed == 1)
}

async fn disable_merchant(c: &mut Client, id: Uuid) -> Result<bool> {
    let changed = execute(&*c, "UPDATE merchants SET disabled = true WHERE id = $1", &[&id]).await?;
    Ok(changed == 1)
}

async fn create_customer(c: &mut Client, id: Uuid, phone: String, now: Timestamp) -> Result<()> {
    execute(&*c, "INSERT INTO customers (id, phone, created_on) VALUES ($1, $2, $3)", &[&id, &phone, &Ts(now)]).await?;
    Ok(())
}
