use super::*;

fn key(byte: u8) -> SecretKey {
    SecretKey([byte; KEY_LEN])
}

fn ring(current: u8, old: &[u8]) -> KeyRing {
    KeyRing::new(key(current), old.iter().map(|b| key(*b)).collect())
}

const ROW: &str = "0190a5a4-0000-7000-8000-000000000001";

#[test]
fn a_sealed_value_opens_only_in_its_own_place_and_shows_nothing() {
    let ring = ring(1, &[]);
    let sealed = ring.seal_text(Column::SubscriptionApiKey, ROW, "merchant-callback-key").unwrap();
    assert!(sealed.starts_with(&format!("v1:{}:", key(1).id())), "{sealed}");
    assert!(!sealed.contains("merchant-callback-key"));
    assert_eq!(ring.open_text(Column::SubscriptionApiKey, ROW, &sealed).unwrap(), "merchant-callback-key");
    let other_row = "0190a5a4-0000-7000-8000-000000000002";
    assert!(matches!(
        ring.open(Column::SubscriptionApiKey, other_row, &sealed),
        Err(SecretsError::Undecryptable { .. })
    ));
    assert!(matches!(
        ring.open(Column::SubscriptionSigningSecret, ROW, &sealed),
        Err(SecretsError::Undecryptable { .. })
    ));
    // A fresh nonce every time.
    assert_ne!(sealed, ring.seal_text(Column::SubscriptionApiKey, ROW, "merchant-callback-key").unwrap());
}

#[test]
fn an_altered_value_does_not_open() {
    let ring = ring(1, &[]);
    let sealed = ring.seal(Column::SigningKeySecret, "kid", &[7; 32]).unwrap();
    let (head, body) = sealed.rsplit_once(':').unwrap();
    let mut bytes = STANDARD.decode(body).unwrap();
    bytes[30] ^= 1;
    let altered = format!("{head}:{}", STANDARD.encode(bytes));
    assert!(matches!(ring.open(Column::SigningKeySecret, "kid", &altered), Err(SecretsError::Undecryptable { .. })));
}

#[test]
fn old_keys_open_and_the_current_one_seals() {
    let before = ring(1, &[]);
    let sealed = before.seal_text(Column::SubscriptionApiKey, ROW, "k").unwrap();
    let after = ring(2, &[1]);
    assert_eq!(after.check(Column::SubscriptionApiKey, ROW, &sealed), Ok(Found::Old));
    let resealed = after.reseal(Column::SubscriptionApiKey, ROW, &sealed).unwrap();
    assert_eq!(after.check(Column::SubscriptionApiKey, ROW, &resealed), Ok(Found::Current));
    // The new key alone is enough now; the old key alone no longer is.
    assert_eq!(ring(2, &[]).open_text(Column::SubscriptionApiKey, ROW, &resealed).unwrap(), "k");
    match ring(1, &[]).open(Column::SubscriptionApiKey, ROW, &resealed) {
        Err(error @ SecretsError::UnknownKey { .. }) => {
            let message = error.to_string();
            assert!(message.contains(&key(2).id()) && message.contains(&key(1).id()), "{message}");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn values_in_clear_are_found_as_such() {
    let ring = ring(1, &[]);
    for plain in ["whsec_AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=", "v1:abc", "v1:0011aabb:!!", "key", ""] {
        assert_eq!(ring.check(Column::SubscriptionApiKey, ROW, plain), Ok(Found::Plain), "{plain}");
        assert!(matches!(ring.open(Column::SubscriptionApiKey, ROW, plain), Err(SecretsError::NotSealed { .. })));
    }
    assert!(!is_sealed_bytes(&[1; 32]));
    assert!(is_sealed_bytes(ring.seal(Column::SigningKeySecret, "k", &[1; 32]).unwrap().as_bytes()));
}

#[test]
fn keys_parse_from_base64_of_32_bytes_and_never_show_themselves() {
    let text = STANDARD.encode([9u8; 32]);
    let parsed = SecretKey::parse(&text).unwrap();
    assert_eq!(parsed.to_base64(), text);
    assert_eq!(SecretKey::parse(&URL_SAFE_NO_PAD.encode([9u8; 32])).unwrap().id(), parsed.id());
    assert_eq!(SecretKey::parse(&format!(" {text}\n")).unwrap().id(), parsed.id());
    assert!(!format!("{parsed:?}").contains(&text));
    assert!(!format!("{:?}", ring(9, &[3])).contains(&text));
    for bad in [STANDARD.encode([9u8; 31]), STANDARD.encode([9u8; 33]), "not base64!".to_owned(), String::new()] {
        let message = SecretKey::parse(&bad).unwrap_err();
        assert!(bad.is_empty() || !message.contains(&bad), "{message}");
    }
}

#[test]
fn the_key_file_is_created_once_with_mode_600_and_read_back() {
    let dir = tempfile::tempdir().unwrap();
    let path = key_file_for(&dir.path().join("sub").join("d.db"));
    assert!(path.ends_with("d.db.secrets-key"));
    let created = load_or_create_key_file(&path).unwrap();
    let again = load_or_create_key_file(&path).unwrap();
    assert_eq!(created.id(), again.id());
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    }
    let leftovers: Vec<_> = std::fs::read_dir(path.parent().unwrap()).unwrap().collect();
    assert_eq!(leftovers.len(), 1, "no temporary file left behind");
    std::fs::write(&path, "garbage").unwrap();
    let message = load_or_create_key_file(&path).unwrap_err();
    assert!(message.contains("invalid secrets key file") && !message.contains("garbage"), "{message}");
}
