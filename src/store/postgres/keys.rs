//! Signing keys and the secrets key ring: the `KeyStore` of the PostgreSQL store.

use super::*;

#[async_trait]
impl KeyStore for PostgresStore {
    async fn signing_keys(&self, candidate: KeyPair, now: Timestamp) -> Result<SigningKeys> {
        let sealed = seal_signing_key(&self.secrets, &candidate)?;
        let ring = self.secrets.clone();
        self.run(move |c| Box::pin(schema::signing_keys(c, ring, candidate, sealed, now))).await
    }

    async fn rotate_signing_key(&self, next: KeyPair, now: Timestamp) -> Result<()> {
        let sealed = seal_signing_key(&self.secrets, &next)?;
        self.run(move |c| Box::pin(schema::rotate_signing_key(c, next, sealed, now))).await
    }

    fn secrets(&self) -> Arc<KeyRing> {
        self.secrets.clone()
    }
}
