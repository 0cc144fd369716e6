//! Operator commands behind the CLI: merchants, customers and signing keys. They print JSON
//! on stdout; API keys are shown once and stored only as a hash.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::domain::key::key_hash;
use crate::domain::request::e164;
use crate::domain::time::Timestamp;
use crate::domain::token::KeyPair;
use crate::store::{DynStore, Merchant, StoreError};

/// Why an admin command failed: bad input (exit 2) or a failure doing it (exit 1).
#[derive(Debug)]
pub enum AdminError {
    Invalid(String),
    Failed(String),
}

impl From<StoreError> for AdminError {
    fn from(error: StoreError) -> Self {
        AdminError::Failed(error.to_string())
    }
}

/// A new API key: `rsk_` and 32 random bytes, base64url.
fn new_api_key() -> Result<String, AdminError> {
    let mut bytes = [0u8; 32];
    getrandom::getrandom(&mut bytes).map_err(|e| AdminError::Failed(e.to_string()))?;
    Ok(format!("rsk_{}", URL_SAFE_NO_PAD.encode(bytes)))
}

/// A merchant name: 1 to 100 printable characters (surrounding spaces dropped).
pub fn check_merchant_name(name: &str) -> Result<&str, String> {
    let name = name.trim();
    if name.is_empty() || name.chars().count() > 100 || name.chars().any(char::is_control) {
        return Err("--name must be 1 to 100 printable characters".to_owned());
    }
    Ok(name)
}

/// Creates a merchant; answers `{"merchantId", "apiKey"}`.
pub async fn create_merchant(store: &DynStore, name: &str) -> Result<Value, AdminError> {
    let name = check_merchant_name(name).map_err(AdminError::Invalid)?;
    let api_key = new_api_key()?;
    let merchant =
        Merchant { id: Uuid::now_v7(), name: name.to_owned(), disabled: false, created_on: Timestamp::now() };
    let id = merchant.id;
    store.create_merchant(merchant, key_hash(&api_key)).await?;
    Ok(json!({"merchantId": id, "apiKey": api_key}))
}

/// Every merchant, oldest first.
pub async fn list_merchants(store: &DynStore) -> Result<Value, AdminError> {
    let merchants = store.list_merchants().await?;
    Ok(Value::Array(
        merchants
            .into_iter()
            .map(|m| json!({"merchantId": m.id, "name": m.name, "disabled": m.disabled, "createdOn": m.created_on}))
            .collect(),
    ))
}

/// Replaces a merchant's key; the old key stops working at once.
pub async fn rotate_merchant_key(store: &DynStore, id: Uuid) -> Result<Value, AdminError> {
    let api_key = new_api_key()?;
    if !store.rotate_merchant_key(id, key_hash(&api_key)).await? {
        return Err(AdminError::Failed(format!("no merchant has the id {id}")));
    }
    Ok(json!({"merchantId": id, "apiKey": api_key}))
}

/// Disables a merchant: its key is refused from now on.
pub async fn disable_merchant(store: &DynStore, id: Uuid) -> Result<Value, AdminError> {
    if !store.disable_merchant(id).await? {
        return Err(AdminError::Failed(format!("no merchant has the id {id}")));
    }
    Ok(json!({"merchantId": id, "disabled": true}))
}

/// Creates a customer known by an E.164 phone number.
pub async fn create_customer(store: &DynStore, phone: &str) -> Result<Value, AdminError> {
    let phone = e164(phone).map_err(|m| AdminError::Invalid(format!("--phone {m}")))?;
    let id = Uuid::now_v7();
    store.create_customer(id, phone, Timestamp::now()).await?;
    Ok(json!({"customerId": id}))
}

/// Makes a new signing key current; tokens of the old one stay valid until they expire.
pub async fn rotate_signing_key(store: &DynStore) -> Result<Value, AdminError> {
    let next = KeyPair::generate().map_err(|e| AdminError::Failed(e.to_string()))?;
    let kid = next.kid.clone();
    store.rotate_signing_key(next, Timestamp::now()).await?;
    Ok(json!({"kid": kid}))
}
