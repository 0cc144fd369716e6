//! Standard Webhooks v1 signatures: HMAC-SHA256 over "<id>.<timestamp>.<body>".

use base64::{engine::general_purpose::STANDARD, Engine as _};
use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// The prefix Standard Webhooks gives secrets, so they are recognisable in configs and logs.
const SECRET_PREFIX: &str = "whsec_";

/// A new signing secret: "whsec_" + standard base64 (with padding) of 32 random bytes.
pub fn generate_secret() -> std::io::Result<String> {
    let mut buf = [0u8; 32];
    getrandom::getrandom(&mut buf).map_err(|e| std::io::Error::other(format!("no randomness for a secret: {e}")))?;
    Ok(format!("{SECRET_PREFIX}{}", STANDARD.encode(buf)))
}

/// The key bytes of a secret ("whsec_" prefix optional); None when not base64, or empty
/// (an empty HMAC key would sign with no secret at all).
pub fn secret_key(secret: &str) -> Option<Vec<u8>> {
    let encoded = secret.strip_prefix(SECRET_PREFIX).unwrap_or(secret);
    STANDARD.decode(encoded).ok().filter(|key| !key.is_empty())
}

fn mac(key: &[u8], id: &str, timestamp: i64, body: &[u8]) -> HmacSha256 {
    // HMAC takes keys of any length (long ones are hashed), so this cannot fail.
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC accepts keys of any length");
    mac.update(format!("{id}.{timestamp}.").as_bytes());
    mac.update(body);
    mac
}

/// The `webhook-signature` header value: "v1," + standard base64 of
/// HMAC-SHA256(key, "<id>.<timestamp>." ++ body).
pub fn sign(key: &[u8], id: &str, timestamp: i64, body: &[u8]) -> String {
    format!("v1,{}", STANDARD.encode(mac(key, id, timestamp, body).finalize().into_bytes()))
}

/// Whether any space-separated "v1,<sig>" entry of `header` matches, compared in constant time;
/// for receivers and tests. Entries of other versions or with undecodable signatures are skipped,
/// since senders may list several signatures during a key rotation.
pub fn verify(key: &[u8], id: &str, timestamp: i64, body: &[u8], header: &str) -> bool {
    let expected = mac(key, id, timestamp, body);
    header
        .split(' ')
        .filter_map(|entry| entry.split_once(','))
        .filter(|(version, _)| *version == "v1")
        .filter_map(|(_, sig)| STANDARD.decode(sig).ok())
        .any(|sig| expected.clone().verify_slice(&sig).is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    // The test vector published with the Standard Webhooks reference libraries, recomputed with
    // python3's hmac/hashlib/base64, so this proves interoperability and not only self-consistency.
    const VECTOR_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    const VECTOR_ID: &str = "msg_p5jXN8AQM9LWM0D4loKWxJek";
    const VECTOR_TS: i64 = 1614265330;
    const VECTOR_BODY: &[u8] = br#"{"test": 2432232314}"#;
    const VECTOR_SIG: &str = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";

    fn vector_key() -> Vec<u8> {
        secret_key(VECTOR_SECRET).expect("the vector's secret is base64")
    }

    #[test]
    fn known_answer_of_the_standard_webhooks_test_vector() {
        assert_eq!(sign(&vector_key(), VECTOR_ID, VECTOR_TS, VECTOR_BODY), VECTOR_SIG);
    }

    #[test]
    fn known_answer_computed_with_python() {
        // python3: base64.b64encode(hmac.new(bytes(range(32)),
        //   b'evt_01HZX.1700000000.{"type":"session.completed"}', hashlib.sha256).digest())
        let key: Vec<u8> = (0u8..32).collect();
        assert_eq!(secret_key("whsec_AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="), Some(key.clone()));
        let sig = sign(&key, "evt_01HZX", 1_700_000_000, br#"{"type":"session.completed"}"#);
        assert_eq!(sig, "v1,rSI+UqKEaSFue62UD6YgrLYLwneXH1VZWvZAoUkIIN4=");
    }

    #[test]
    fn verify_accepts_the_right_signature() {
        assert!(verify(&vector_key(), VECTOR_ID, VECTOR_TS, VECTOR_BODY, VECTOR_SIG));
        let key = b"another key";
        let sig = sign(key, "id", -5, b"");
        assert!(verify(key, "id", -5, b"", &sig));
    }

    #[test]
    fn verify_rejects_any_change() {
        let key = vector_key();
        assert!(!verify(&key, VECTOR_ID, VECTOR_TS, br#"{"test": 2432232315}"#, VECTOR_SIG));
        assert!(!verify(&key, "msg_p5jXN8AQM9LWM0D4loKWxJeK", VECTOR_TS, VECTOR_BODY, VECTOR_SIG));
        assert!(!verify(&key, VECTOR_ID, VECTOR_TS + 1, VECTOR_BODY, VECTOR_SIG));
        let mut other_key = key.clone();
        other_key[0] ^= 1;
        assert!(!verify(&other_key, VECTOR_ID, VECTOR_TS, VECTOR_BODY, VECTOR_SIG));
    }

    #[test]
    fn verify_rejects_malformed_headers() {
        let key = vector_key();
        let bare = VECTOR_SIG.trim_start_matches("v1,");
        for header in ["", " ", "v1,", "v1", bare, &format!("v2,{bare}"), "v1,!!!notbase64", "v1,AAAA"] {
            assert!(!verify(&key, VECTOR_ID, VECTOR_TS, VECTOR_BODY, header), "{header:?}");
        }
        // A truncated signature must not match on its prefix.
        assert!(!verify(&key, VECTOR_ID, VECTOR_TS, VECTOR_BODY, &VECTOR_SIG[..VECTOR_SIG.len() - 4]));
    }

    #[test]
    fn verify_accepts_any_of_several_signatures() {
        let key = vector_key();
        let old = sign(b"old key", VECTOR_ID, VECTOR_TS, VECTOR_BODY);
        let header = format!("{old} v1a,foo {VECTOR_SIG}");
        assert!(verify(&key, VECTOR_ID, VECTOR_TS, VECTOR_BODY, &header));
        assert!(verify(b"old key", VECTOR_ID, VECTOR_TS, VECTOR_BODY, &header));
        assert!(verify(&key, VECTOR_ID, VECTOR_TS, VECTOR_BODY, &format!("{VECTOR_SIG} {old}")));
        assert!(!verify(b"third key", VECTOR_ID, VECTOR_TS, VECTOR_BODY, &header));
    }

    #[test]
    fn generated_secrets_have_the_standard_format() {
        let a = generate_secret().expect("randomness");
        let b = generate_secret().expect("randomness");
        assert_ne!(a, b);
        assert!(a.starts_with("whsec_"));
        // 32 bytes -> 44 base64 characters, the last one padding.
        assert_eq!(a.len(), "whsec_".len() + 44);
        assert!(a.ends_with('='));
        assert_eq!(secret_key(&a).map(|k| k.len()), Some(32));
        let key = secret_key(&a).expect("own secret decodes");
        assert!(verify(&key, "id", 1, b"x", &sign(&key, "id", 1, b"x")));
    }

    #[test]
    fn secret_key_prefix_is_optional_and_garbage_is_none() {
        let with = secret_key(VECTOR_SECRET);
        assert!(with.is_some());
        assert_eq!(secret_key(VECTOR_SECRET.trim_start_matches("whsec_")), with);
        assert_eq!(secret_key("whsec_not base64!"), None);
        assert_eq!(secret_key("whsec_"), None);
        assert_eq!(secret_key(""), None);
    }
}
