//! Session tokens: EdDSA (Ed25519) JSON Web Tokens and the JSON Web Key Set that verifies them.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use uuid::Uuid;

use super::time::Timestamp;

/// One signing key: its id and its Ed25519 secret. Created once, kept in the database.
#[derive(Clone)]
pub struct KeyPair {
    pub kid: String,
    pub secret: [u8; 32],
}

impl std::fmt::Debug for KeyPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyPair").field("kid", &self.kid).finish_non_exhaustive()
    }
}

impl KeyPair {
    /// A new key from 32 random bytes.
    pub fn generate() -> std::io::Result<Self> {
        let mut secret = [0u8; 32];
        getrandom::getrandom(&mut secret).map_err(|e| std::io::Error::other(e.to_string()))?;
        Ok(KeyPair { kid: Uuid::now_v7().to_string(), secret })
    }

    /// The public half, as stored and published.
    pub fn public(&self) -> [u8; 32] {
        SigningKey::from_bytes(&self.secret).verifying_key().to_bytes()
    }
}

/// The claims of a session token (SPEC §3.2).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Claims {
    pub iss: String,
    pub aud: String,
    pub sid: Uuid,
    pub merch_id: Uuid,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cust_id: Option<Uuid>,
    pub auth: String,
    pub iat: i64,
    pub exp: i64,
}

impl Claims {
    /// The claims for a session.
    pub fn for_session(
        public_url: &str,
        session: Uuid,
        merchant: Uuid,
        customer: Option<Uuid>,
        issued: Timestamp,
        expires: Timestamp,
    ) -> Self {
        Claims {
            iss: public_url.to_owned(),
            aud: format!("{public_url}/pay"),
            sid: session,
            merch_id: merchant,
            cust_id: customer,
            auth: "otp".to_owned(),
            iat: issued.seconds(),
            // `exp` is whole seconds; round up so the token never dies before the session.
            exp: (expires.millis() + 999).div_euclid(1000),
        }
    }
}

/// The keys in use: one to sign with, and every key whose tokens are still accepted.
#[derive(Clone)]
pub struct Keyring {
    current: (String, SigningKey),
    verifying: Vec<(String, VerifyingKey)>,
}

/// Why a token was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum TokenError {
    Malformed,
    UnknownKey,
    BadSignature,
}

impl Keyring {
    /// A keyring that signs with `current` and also accepts tokens of `previous`.
    pub fn new(current: &KeyPair, previous: &[(String, [u8; 32])]) -> Self {
        let signing = SigningKey::from_bytes(&current.secret);
        let mut verifying = vec![(current.kid.clone(), signing.verifying_key())];
        for (kid, public) in previous {
            if let Ok(key) = VerifyingKey::from_bytes(public) {
                if *kid != current.kid {
                    verifying.push((kid.clone(), key));
                }
            }
        }
        Keyring { current: (current.kid.clone(), signing), verifying }
    }

    /// A signed compact JWT carrying `claims`.
    pub fn sign(&self, claims: &Claims) -> String {
        let header = json!({"alg": "EdDSA", "typ": "JWT", "kid": self.current.0});
        let mut token = String::with_capacity(320);
        URL_SAFE_NO_PAD.encode_string(header.to_string(), &mut token);
        token.push('.');
        URL_SAFE_NO_PAD.encode_string(serde_json::to_vec(claims).expect("claims serialise"), &mut token);
        let signature = self.current.1.sign(token.as_bytes());
        token.push('.');
        URL_SAFE_NO_PAD.encode_string(signature.to_bytes(), &mut token);
        token
    }

    /// The claims of a token signed by one of this keyring's keys. Expiry is the caller's
    /// business (a session's state decides it).
    pub fn verify(&self, token: &str) -> Result<Claims, TokenError> {
        let mut parts = token.split('.');
        let (Some(header), Some(payload), Some(signature), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(TokenError::Malformed);
        };
        let header: Value = decode_json(header)?;
        if header["alg"] != "EdDSA" {
            return Err(TokenError::Malformed);
        }
        let kid = header["kid"].as_str().ok_or(TokenError::Malformed)?;
        let (_, key) = self.verifying.iter().find(|(k, _)| k == kid).ok_or(TokenError::UnknownKey)?;
        let signature = URL_SAFE_NO_PAD.decode(signature).map_err(|_| TokenError::Malformed)?;
        let signature = Signature::from_slice(&signature).map_err(|_| TokenError::Malformed)?;
        let signed = &token[..header_len(token)];
        key.verify(signed.as_bytes(), &signature).map_err(|_| TokenError::BadSignature)?;
        decode_json(payload)
    }

    /// The JSON Web Key Set of every accepted key, current first.
    pub fn jwks(&self) -> Value {
        let keys: Vec<Value> = self
            .verifying
            .iter()
            .map(|(kid, key)| {
                json!({"kty": "OKP", "crv": "Ed25519", "alg": "EdDSA", "use": "sig",
                       "kid": kid, "x": URL_SAFE_NO_PAD.encode(key.to_bytes())})
            })
            .collect();
        json!({ "keys": keys })
    }

    /// The id of the key new tokens are signed with.
    pub fn current_kid(&self) -> &str {
        &self.current.0
    }
}

fn header_len(token: &str) -> usize {
    token.rfind('.').unwrap_or(token.len())
}

fn decode_json<T: for<'de> Deserialize<'de>>(part: &str) -> Result<T, TokenError> {
    let bytes = URL_SAFE_NO_PAD.decode(part).map_err(|_| TokenError::Malformed)?;
    serde_json::from_slice(&bytes).map_err(|_| TokenError::Malformed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims() -> Claims {
        Claims::for_session(
            "https://pay.example",
            Uuid::nil(),
            Uuid::max(),
            None,
            Timestamp::from_millis(1_000_000),
            Timestamp::from_millis(1_900_001),
        )
    }

    #[test]
    fn a_signed_token_verifies_and_carries_its_claims() {
        let keyring = Keyring::new(&KeyPair::generate().unwrap(), &[]);
        let token = keyring.sign(&claims());
        assert_eq!(keyring.verify(&token), Ok(claims()));
        assert_eq!(claims().exp, 1_901);
        assert_eq!(claims().aud, "https://pay.example/pay");
    }

    #[test]
    fn a_tampered_token_is_refused() {
        let keyring = Keyring::new(&KeyPair::generate().unwrap(), &[]);
        let token = keyring.sign(&claims());
        let mut other = claims();
        other.sid = Uuid::max();
        let forged_payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&other).unwrap());
        let parts: Vec<&str> = token.split('.').collect();
        let forged = format!("{}.{}.{}", parts[0], forged_payload, parts[2]);
        assert_eq!(keyring.verify(&forged), Err(TokenError::BadSignature));
        assert_eq!(keyring.verify("a.b"), Err(TokenError::Malformed));
    }

    #[test]
    fn tokens_of_a_previous_key_still_verify_after_rotation() {
        let old = KeyPair::generate().unwrap();
        let old_token = Keyring::new(&old, &[]).sign(&claims());
        let rotated = Keyring::new(&KeyPair::generate().unwrap(), &[(old.kid.clone(), old.public())]);
        assert_eq!(rotated.verify(&old_token), Ok(claims()));
        assert_eq!(rotated.jwks()["keys"].as_array().unwrap().len(), 2);
    }
}
