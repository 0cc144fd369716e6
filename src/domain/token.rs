//! Session tokens: EdDSA (Ed25519) JSON Web Tokens and the JSON Web Key Set that verifies them.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
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

/// The claims of a session token (docs/DESIGN.md "Tokens").
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

/// The `iss` of a token this service signed, read without checking the signature: the public
/// URL the service had when it issued the token. `None` when the token is not of that shape.
pub fn issuer_unchecked(token: &str) -> Option<String> {
    #[derive(Deserialize)]
    struct Issuer {
        iss: String,
    }
    let payload = token.split('.').nth(1)?;
    let json = URL_SAFE_NO_PAD.decode(payload).ok()?;
    serde_json::from_slice::<Issuer>(&json).ok().map(|claims| claims.iss)
}

/// The keys in use: one to sign with, and every key whose tokens are still accepted.
#[derive(Clone)]
pub struct Keyring {
    current: (String, SigningKey),
    verifying: Vec<(String, VerifyingKey, DecodingKey)>,
    /// The key one-time codes are hashed with (derived from the current signing key).
    code_key: [u8; 32],
}

/// Why a token was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum TokenError {
    /// Not a token, not EdDSA (`alg: none` included), or claims missing or of the wrong shape.
    Malformed,
    /// Signed with a key that is not in the key set.
    UnknownKey,
    BadSignature,
    /// Issued by another service or for another audience.
    WrongParty,
    /// `exp` has passed; the claims are those of the (otherwise valid) token.
    Expired(Box<Claims>),
}

/// What a token must be to be accepted.
#[derive(Clone, Copy, Debug)]
pub struct Expect<'a> {
    /// `iss`: the public URL.
    pub issuer: &'a str,
    /// `aud`: the hosted page's URL.
    pub audience: &'a str,
}

impl Keyring {
    /// A keyring that signs with `current` and also accepts tokens of `previous`.
    pub fn new(current: &KeyPair, previous: &[(String, [u8; 32])]) -> Self {
        let signing = SigningKey::from_bytes(&current.secret);
        let decoding = |key: &VerifyingKey| DecodingKey::from_ed_der(&key.to_bytes());
        let current_key = signing.verifying_key();
        let mut verifying = vec![(current.kid.clone(), current_key, decoding(&current_key))];
        for (kid, public) in previous {
            if let Ok(key) = VerifyingKey::from_bytes(public) {
                if *kid != current.kid {
                    verifying.push((kid.clone(), key, decoding(&key)));
                }
            }
        }
        let code_key = Sha256::new_with_prefix(b"redirect-sessions one-time codes\0").chain_update(current.secret);
        Keyring { current: (current.kid.clone(), signing), verifying, code_key: code_key.finalize().into() }
    }

    /// A signed compact JWT carrying `claims`. Signed here rather than through the JWT crate:
    /// every create signs one, and this costs one serialisation and one signature.
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

    /// The claims of a token, checked with the `jsonwebtoken` crate: EdDSA only, signed by a key
    /// of the key set (found by `kid`), issued by and for `expect`, and not expired.
    pub fn verify(&self, token: &str, expect: Expect<'_>) -> Result<Claims, TokenError> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| TokenError::Malformed)?;
        if header.alg != Algorithm::EdDSA {
            return Err(TokenError::Malformed);
        }
        let kid = header.kid.ok_or(TokenError::Malformed)?;
        let (_, _, key) = self.verifying.iter().find(|(k, _, _)| *k == kid).ok_or(TokenError::UnknownKey)?;
        let mut validation = Validation::new(Algorithm::EdDSA);
        validation.leeway = 0;
        validation.set_issuer(&[expect.issuer]);
        validation.set_audience(&[expect.audience]);
        validation.set_required_spec_claims(&["exp", "iss", "aud"]);
        match jsonwebtoken::decode::<Claims>(token, key, &validation) {
            Ok(data) => Ok(data.claims),
            Err(error) => match error.kind() {
                ErrorKind::InvalidSignature => Err(TokenError::BadSignature),
                ErrorKind::InvalidIssuer | ErrorKind::InvalidAudience => Err(TokenError::WrongParty),
                ErrorKind::ExpiredSignature => {
                    validation.validate_exp = false;
                    let data =
                        jsonwebtoken::decode::<Claims>(token, key, &validation).map_err(|_| TokenError::Malformed)?;
                    Err(TokenError::Expired(Box::new(data.claims)))
                }
                _ => Err(TokenError::Malformed),
            },
        }
    }

    /// The JSON Web Key Set of every accepted key, current first.
    pub fn jwks(&self) -> Value {
        let keys: Vec<Value> = self
            .verifying
            .iter()
            .map(|(kid, key, _)| {
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

    /// The key one-time codes are hashed with. It lives as long as the current signing key; a
    /// code sent before a rotation is refused after it (the customer asks for a new one).
    pub fn code_key(&self) -> &[u8; 32] {
        &self.code_key
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ISSUER: &str = "https://pay.example";
    const EXPECT: Expect<'static> = Expect { issuer: ISSUER, audience: "https://pay.example/pay" };

    fn claims_expiring(expires: Timestamp) -> Claims {
        Claims::for_session(ISSUER, Uuid::nil(), Uuid::max(), None, Timestamp::from_millis(1_000_000), expires)
    }

    fn claims() -> Claims {
        claims_expiring(Timestamp::now().plus(std::time::Duration::from_secs(900)))
    }

    fn encode(part: &Value) -> String {
        URL_SAFE_NO_PAD.encode(part.to_string())
    }

    #[test]
    fn a_signed_token_verifies_and_carries_its_claims() {
        let keyring = Keyring::new(&KeyPair::generate().unwrap(), &[]);
        let token = keyring.sign(&claims());
        assert_eq!(keyring.verify(&token, EXPECT), Ok(claims()));
        assert_eq!(claims_expiring(Timestamp::from_millis(1_900_001)).exp, 1_901);
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
        assert_eq!(keyring.verify(&forged, EXPECT), Err(TokenError::BadSignature));
        assert_eq!(keyring.verify("a.b", EXPECT), Err(TokenError::Malformed));
    }

    #[test]
    fn an_unsigned_token_is_refused() {
        let keyring = Keyring::new(&KeyPair::generate().unwrap(), &[]);
        let claims = serde_json::to_value(claims()).unwrap();
        for alg in ["none", "None", "HS256"] {
            let header = json!({"alg": alg, "typ": "JWT", "kid": keyring.current_kid()});
            let token = format!("{}.{}.", encode(&header), encode(&claims));
            assert_eq!(keyring.verify(&token, EXPECT), Err(TokenError::Malformed), "{alg}");
        }
    }

    #[test]
    fn a_token_of_another_key_or_audience_or_issuer_is_refused() {
        let keyring = Keyring::new(&KeyPair::generate().unwrap(), &[]);
        let stranger = Keyring::new(&KeyPair::generate().unwrap(), &[]);
        assert_eq!(keyring.verify(&stranger.sign(&claims()), EXPECT), Err(TokenError::UnknownKey));
        let token = keyring.sign(&claims());
        let other_audience = Expect { audience: "https://elsewhere.example/pay", ..EXPECT };
        assert_eq!(keyring.verify(&token, other_audience), Err(TokenError::WrongParty));
        let other_issuer = Expect { issuer: "https://elsewhere.example", ..EXPECT };
        assert_eq!(keyring.verify(&token, other_issuer), Err(TokenError::WrongParty));
    }

    #[test]
    fn an_expired_token_is_refused_with_its_claims() {
        let keyring = Keyring::new(&KeyPair::generate().unwrap(), &[]);
        let expired = claims_expiring(Timestamp::from_millis(1_900_001));
        let token = keyring.sign(&expired);
        assert_eq!(keyring.verify(&token, EXPECT), Err(TokenError::Expired(Box::new(expired))));
    }

    #[test]
    fn tokens_of_a_previous_key_still_verify_after_rotation() {
        let old = KeyPair::generate().unwrap();
        let old_token = Keyring::new(&old, &[]).sign(&claims());
        let rotated = Keyring::new(&KeyPair::generate().unwrap(), &[(old.kid.clone(), old.public())]);
        assert_eq!(rotated.verify(&old_token, EXPECT), Ok(claims()));
        assert_eq!(rotated.jwks()["keys"].as_array().unwrap().len(), 2);
    }

    #[test]
    fn the_code_key_follows_the_current_signing_key() {
        let first = KeyPair::generate().unwrap();
        let again = Keyring::new(&first, &[]);
        assert_eq!(Keyring::new(&first, &[]).code_key(), again.code_key());
        assert_ne!(Keyring::new(&KeyPair::generate().unwrap(), &[]).code_key(), again.code_key());
    }
}
