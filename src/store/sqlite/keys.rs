//! Signing keys and the secrets key ring: the `KeyStore` of the SQLite store.

use super::*;

#[async_trait]
impl KeyStore for SqliteStore {
    async fn signing_keys(&self, candidate: KeyPair, now: Timestamp) -> Result<SigningKeys, StoreError> {
        let sealed = seal_signing_key(&self.secrets, &candidate)?;
        let ring = self.secrets.clone();
        self.writer
            .run(move |c| {
                c.execute(
                    "INSERT INTO signing_keys (kid, secret, public, created_on)
                     SELECT ?1, ?2, ?3, ?4 WHERE NOT EXISTS (SELECT 1 FROM signing_keys WHERE retired_on IS NULL)",
                    params![candidate.kid, sealed, candidate.public(), now.millis()],
                )
                .map_err(|e| internal(&e))?;
                schema::load_signing_keys(c, &ring)
            })
            .await
    }

    async fn rotate_signing_key(&self, next: KeyPair, now: Timestamp) -> Result<(), StoreError> {
        let sealed = seal_signing_key(&self.secrets, &next)?;
        self.writer
            .run(move |c| {
                c.execute("UPDATE signing_keys SET retired_on = ?1 WHERE retired_on IS NULL", params![now.millis()])
                    .and_then(|_| {
                        c.execute(
                            "INSERT INTO signing_keys (kid, secret, public, created_on) VALUES (?1, ?2, ?3, ?4)",
                            params![next.kid, sealed, next.public(), now.millis()],
                        )
                    })
                    .map(drop)
                    .map_err(|e| internal(&e))
            })
            .await
    }

    fn secrets(&self) -> Arc<KeyRing> {
        self.secrets.clone()
    }
}
