//! Secrets at rest (docs/DESIGN.md "Secrets at rest"): the subscriptions' `apiKey`s and
//! signing secrets, the private halves of the token signing keys, and the stored idempotent
//! answers that show a signing secret are written sealed with XChaCha20-Poly1305 under the
//! operator's key, never in clear.
//!
//! A sealed value is text, `v1:<key id>:<base64(nonce || ciphertext)>`: a random 24-byte
//! nonce per value, and the value's place (table, column and row id) as associated data, so a
//! ciphertext copied into another row or column does not decrypt. The key id (eight hex
//! digits of a SHA-256 of the key) tells which key of the ring sealed a value: `secrets_key`
//! seals, and it and `secrets_old_keys` open.
//!
//! The key comes from the settings, never from the database. On SQLite without a configured
//! key, one is created once in a `0600` file beside the database (`<db>.secrets-key`).

use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
use base64::Engine as _;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use sha2::{Digest, Sha256};
use zeroize::Zeroize;

use crate::config::{Config, DatabaseUrl};

/// The format tag every sealed value starts with (followed by `:`).
pub const FORMAT: &str = "v1";
const NONCE_LEN: usize = 24;
const TAG_LEN: usize = 16;
const KEY_LEN: usize = 32;
/// Hex digits of a key id.
const KEY_ID_LEN: usize = 8;
/// What the key file beside a SQLite database is called: the database's name plus this.
pub const KEY_FILE_SUFFIX: &str = ".secrets-key";
/// The message when PostgreSQL is used without a key (a setting error: exit code 2).
pub const KEY_REQUIRED: &str = "secrets_key is required with a PostgreSQL database_url (secrets are stored encrypted \
     with it): set REDIRECT_SESSIONS_SECRETS_KEY or --secrets-key to the base64 of 32 random bytes, e.g. the output \
     of `redirect-sessions secrets generate-key`";

/// An operator key: 32 bytes. Its `Debug` shows only its id, and it is wiped when dropped.
#[derive(Clone)]
pub struct SecretKey([u8; KEY_LEN]);

impl Drop for SecretKey {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("SecretKey").field(&self.id()).finish()
    }
}

impl SecretKey {
    /// A new key of 32 random bytes.
    pub fn generate() -> std::io::Result<SecretKey> {
        let mut bytes = [0u8; KEY_LEN];
        getrandom::getrandom(&mut bytes).map_err(|e| std::io::Error::other(format!("no randomness for a key: {e}")))?;
        Ok(SecretKey(bytes))
    }

    /// Base64 (standard or URL-safe, padding optional) of exactly 32 bytes. The message of an
    /// error never repeats the text.
    pub fn parse(text: &str) -> Result<SecretKey, String> {
        let text = text.trim();
        let decoded =
            [STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD].iter().find_map(|engine| engine.decode(text).ok());
        let Some(mut decoded) = decoded else {
            return Err("expected the base64 of 32 bytes (value not shown)".to_owned());
        };
        let key = <[u8; KEY_LEN]>::try_from(decoded.as_slice()).map(SecretKey);
        let length = decoded.len();
        decoded.zeroize();
        key.map_err(|_| format!("expected the base64 of 32 bytes, got {length} bytes (value not shown)"))
    }

    /// Standard base64 with padding, as `parse` reads it and the key file holds it.
    pub fn to_base64(&self) -> String {
        STANDARD.encode(self.0)
    }

    /// The key's id: the first eight hex digits of a SHA-256 of it. Says which key sealed a
    /// value without telling anything about the key.
    pub fn id(&self) -> String {
        let digest = Sha256::new_with_prefix(b"redirect-sessions secrets key id\0").chain_update(self.0).finalize();
        digest[..KEY_ID_LEN / 2].iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// Where a sealed value lives; part of its associated data, and of error messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Column {
    /// `subscriptions.api_key`, by subscription id.
    SubscriptionApiKey,
    /// `subscriptions.signing_secret`, by subscription id.
    SubscriptionSigningSecret,
    /// `signing_keys.secret` (the Ed25519 private key), by kid.
    SigningKeySecret,
    /// `idempotency.body` of an answer that shows a secret, by `<merchant id>/<request id>`.
    IdempotentBody,
}

impl Column {
    pub const fn name(self) -> &'static str {
        match self {
            Column::SubscriptionApiKey => "subscriptions.api_key",
            Column::SubscriptionSigningSecret => "subscriptions.signing_secret",
            Column::SigningKeySecret => "signing_keys.secret",
            Column::IdempotentBody => "idempotency.body",
        }
    }

    fn associated_data(self, row: &str) -> Vec<u8> {
        format!("redirect-sessions\0{FORMAT}\0{}\0{row}", self.name()).into_bytes()
    }
}

/// Why a stored value could not be opened. Messages name the place and the key id, never a
/// key or a secret.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SecretsError {
    /// The value is in clear where a sealed one was expected.
    NotSealed { column: Column, row: String },
    /// Sealed with a key that is neither `secrets_key` nor one of `secrets_old_keys`.
    UnknownKey { column: Column, row: String, key_id: String, ring: String },
    /// The key is known but the value does not open: altered, or moved from another row.
    Undecryptable { column: Column, row: String, key_id: String },
    /// No random nonce could be had.
    NoRandomness(String),
}

impl fmt::Display for SecretsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SecretsError::NotSealed { column, row } => write!(
                f,
                "{} of {row} is stored in clear, not encrypted; start `redirect-sessions serve` or `migrate` once \
                 to encrypt it",
                column.name()
            ),
            SecretsError::UnknownKey { column, row, key_id, ring } => write!(
                f,
                "{} of {row} is encrypted with the secrets key {key_id}, which is not configured ({ring}); set \
                 secrets_key or secrets_old_keys to the key the database was used with",
                column.name()
            ),
            SecretsError::Undecryptable { column, row, key_id } => write!(
                f,
                "{} of {row} does not decrypt with the secrets key {key_id}: it was altered or copied from \
                 another row",
                column.name()
            ),
            SecretsError::NoRandomness(why) => write!(f, "no randomness for a nonce: {why}"),
        }
    }
}

impl std::error::Error for SecretsError {}

/// What a stored value is, for the start-up pass and the rotation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Found {
    /// In clear (from before encryption): to be sealed.
    Plain,
    /// Sealed with `secrets_key` (and it opens).
    Current,
    /// Sealed with one of `secrets_old_keys` (and it opens).
    Old,
}

/// The keys in use: the current one seals, every one opens.
#[derive(Clone)]
pub struct KeyRing {
    current: (String, SecretKey),
    old: Vec<(String, SecretKey)>,
}

impl fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let old: Vec<&str> = self.old.iter().map(|(id, _)| id.as_str()).collect();
        f.debug_struct("KeyRing").field("current", &self.current.0).field("old", &old).finish()
    }
}

impl KeyRing {
    /// A ring sealing with `current` and also opening with `old` (repeats dropped).
    pub fn new(current: SecretKey, old: Vec<SecretKey>) -> KeyRing {
        let current = (current.id(), current);
        let mut ring = KeyRing { current, old: Vec::new() };
        for key in old {
            let id = key.id();
            if id != ring.current.0 && !ring.old.iter().any(|(known, _)| *known == id) {
                ring.old.push((id, key));
            }
        }
        ring
    }

    /// The id of the key that seals.
    pub fn current_id(&self) -> &str {
        &self.current.0
    }

    /// The configured keys by id, for messages: `secrets_key a1b2c3d4, secrets_old_keys …`.
    fn describe(&self) -> String {
        let old: Vec<&str> = self.old.iter().map(|(id, _)| id.as_str()).collect();
        match old.as_slice() {
            [] => format!("secrets_key is {}, no secrets_old_keys", self.current.0),
            _ => format!("secrets_key is {}, secrets_old_keys {}", self.current.0, old.join(", ")),
        }
    }

    /// `plaintext` sealed with the current key for the place `column` of `row`.
    pub fn seal(&self, column: Column, row: &str, plaintext: &[u8]) -> Result<String, SecretsError> {
        let mut nonce = [0u8; NONCE_LEN];
        getrandom::getrandom(&mut nonce).map_err(|e| SecretsError::NoRandomness(e.to_string()))?;
        let cipher = XChaCha20Poly1305::new((&self.current.1 .0).into());
        let aad = column.associated_data(row);
        let sealed = cipher
            .encrypt(XNonce::from_slice(&nonce), Payload { msg: plaintext, aad: &aad })
            .expect("XChaCha20-Poly1305 seals any message of this size");
        let mut bytes = Vec::with_capacity(NONCE_LEN + sealed.len());
        bytes.extend_from_slice(&nonce);
        bytes.extend_from_slice(&sealed);
        Ok(format!("{FORMAT}:{}:{}", self.current.0, STANDARD.encode(bytes)))
    }

    /// `seal` of text.
    pub fn seal_text(&self, column: Column, row: &str, plaintext: &str) -> Result<String, SecretsError> {
        self.seal(column, row, plaintext.as_bytes())
    }

    /// The plaintext of a value sealed for the place `column` of `row`, with whichever key
    /// of the ring sealed it.
    pub fn open(&self, column: Column, row: &str, stored: &str) -> Result<Vec<u8>, SecretsError> {
        let Some((key_id, bytes)) = parse(stored) else {
            return Err(SecretsError::NotSealed { column, row: row.to_owned() });
        };
        let key = std::iter::once(&self.current).chain(&self.old).find(|(id, _)| id == key_id).map(|(_, key)| key);
        let Some(key) = key else {
            return Err(SecretsError::UnknownKey {
                column,
                row: row.to_owned(),
                key_id: key_id.to_owned(),
                ring: self.describe(),
            });
        };
        let (nonce, sealed) = bytes.split_at(NONCE_LEN);
        let aad = column.associated_data(row);
        XChaCha20Poly1305::new((&key.0).into())
            .decrypt(XNonce::from_slice(nonce), Payload { msg: sealed, aad: &aad })
            .map_err(|_| SecretsError::Undecryptable { column, row: row.to_owned(), key_id: key_id.to_owned() })
    }

    /// `open` of text.
    pub fn open_text(&self, column: Column, row: &str, stored: &str) -> Result<String, SecretsError> {
        let bytes = self.open(column, row, stored)?;
        String::from_utf8(bytes).map_err(|_| SecretsError::Undecryptable {
            column,
            row: row.to_owned(),
            key_id: parse(stored).map(|(id, _)| id.to_owned()).unwrap_or_default(),
        })
    }

    /// What `stored` is: in clear (not in the sealed format), or sealed with the current or
    /// an old key — checked by opening it, so that a wrong key is found at start.
    pub fn check(&self, column: Column, row: &str, stored: &str) -> Result<Found, SecretsError> {
        let Some((key_id, _)) = parse(stored) else {
            return Ok(Found::Plain);
        };
        let mut opened = self.open(column, row, stored)?;
        opened.zeroize();
        Ok(if key_id == self.current.0 { Found::Current } else { Found::Old })
    }

    /// `stored` sealed again with the current key (it must open).
    pub fn reseal(&self, column: Column, row: &str, stored: &str) -> Result<String, SecretsError> {
        let mut plaintext = self.open(column, row, stored)?;
        let sealed = self.seal(column, row, &plaintext);
        plaintext.zeroize();
        sealed
    }
}

/// Whether `stored` is in the sealed format (says nothing about whether it opens).
pub fn is_sealed(stored: &str) -> bool {
    parse(stored).is_some()
}

/// Whether the bytes of a binary column hold a sealed value (they start with `v1:`).
pub fn is_sealed_bytes(stored: &[u8]) -> bool {
    stored.starts_with(b"v1:") && std::str::from_utf8(stored).is_ok_and(is_sealed)
}

/// The key id and the nonce-and-ciphertext of a value in the sealed format.
fn parse(stored: &str) -> Option<(&str, Vec<u8>)> {
    let rest = stored.strip_prefix(FORMAT)?.strip_prefix(':')?;
    let (key_id, encoded) = rest.split_once(':')?;
    if key_id.len() != KEY_ID_LEN || !key_id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    let bytes = STANDARD.decode(encoded).ok()?;
    (bytes.len() >= NONCE_LEN + TAG_LEN).then_some((key_id, bytes))
}

/// A row id as the associated data names it: the hyphenated UUID.
pub fn row_of(id: uuid::Uuid) -> String {
    id.hyphenated().to_string()
}

/// The key file beside a SQLite database: its path with `.secrets-key` appended.
pub fn key_file_for(database: &Path) -> PathBuf {
    let mut name = database.as_os_str().to_owned();
    name.push(KEY_FILE_SUFFIX);
    PathBuf::from(name)
}

/// `Err` (a setting error) when the configured database needs a key that is not set.
pub fn check_config(config: &Config) -> Result<(), String> {
    match (&config.database_url, &config.secrets_key) {
        (DatabaseUrl::Postgres(_), None) => Err(KEY_REQUIRED.to_owned()),
        _ => Ok(()),
    }
}

/// The key ring the settings give: `secrets_key` (or, on SQLite without it, the key file
/// beside the database, created on first use) and `secrets_old_keys`.
pub fn key_ring(config: &Config) -> Result<KeyRing, String> {
    let current = match (&config.secrets_key, &config.database_url) {
        (Some(key), _) => key.clone(),
        (None, DatabaseUrl::Postgres(_)) => return Err(KEY_REQUIRED.to_owned()),
        (None, DatabaseUrl::Sqlite { path }) => load_or_create_key_file(&key_file_for(path))?,
    };
    Ok(KeyRing::new(current, config.secrets_old_keys.clone()))
}

/// The key in `path`, creating the file (mode `0600`) with a new key when there is none.
pub fn load_or_create_key_file(path: &Path) -> Result<SecretKey, String> {
    match read_key_file(path)? {
        Some(key) => Ok(key),
        None => create_key_file(path),
    }
}

fn read_key_file(path: &Path) -> Result<Option<SecretKey>, String> {
    let shown = path.display();
    let mut text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(format!("cannot read the secrets key file {shown}: {error}")),
    };
    let key = SecretKey::parse(&text).map_err(|problem| format!("invalid secrets key file {shown}: {problem}"));
    text.zeroize();
    let key = key?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(metadata) = std::fs::metadata(path) {
            if metadata.permissions().mode() & 0o077 != 0 {
                tracing::warn!(path = %shown, "the secrets key file can be read by others; chmod 600 it");
            }
        }
    }
    tracing::info!(path = %shown, key_id = %key.id(), "secrets key read from the key file");
    Ok(Some(key))
}

/// Writes a new key to a temporary file and links it into place, so that a process starting
/// at the same moment reads either no file or a whole one; the first to link wins.
fn create_key_file(path: &Path) -> Result<SecretKey, String> {
    let shown = path.display();
    let cannot = |error: std::io::Error| format!("cannot create the secrets key file {shown}: {error}");
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(cannot)?;
    }
    let key = SecretKey::generate().map_err(cannot)?;
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(format!(".tmp-{}-{}", std::process::id(), uuid::Uuid::new_v4().simple()));
    let temporary = PathBuf::from(temporary);
    write_new_file(&temporary, &key).map_err(cannot)?;
    let linked = std::fs::hard_link(&temporary, path);
    let _ = std::fs::remove_file(&temporary);
    match linked {
        Ok(()) => {}
        Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => {
            // Another process created it first: use its key.
            return read_key_file(path)?.ok_or_else(|| format!("the secrets key file {shown} vanished"));
        }
        // A file system without hard links: create it in place.
        Err(_) => write_new_file(path, &key).map_err(cannot)?,
    }
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        if let Ok(directory) = std::fs::File::open(parent) {
            let _ = directory.sync_all();
        }
    }
    tracing::info!(
        path = %shown,
        key_id = %key.id(),
        "created the secrets key file; back it up with the database, which cannot be read without it"
    );
    Ok(key)
}

fn write_new_file(path: &Path, key: &SecretKey) -> std::io::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path)?;
    let mut text = format!("{}\n", key.to_base64());
    let written = file.write_all(text.as_bytes()).and_then(|()| file.sync_all());
    text.zeroize();
    written
}

/// Rows whose values the start-up pass or a rotation sealed (or sealed again), per table, and
/// the rows left as they were.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Resealed {
    pub subscriptions: u64,
    pub signing_keys: u64,
    pub idempotent_answers: u64,
    /// Rows left as they were (already sealed with the current key; at start, also an old one).
    pub unchanged: u64,
}

impl Resealed {
    pub fn total(&self) -> u64 {
        self.subscriptions + self.signing_keys + self.idempotent_answers
    }

    /// `{"keyId", "subscriptions", "signingKeys", "idempotentAnswers", "unchanged"}`.
    pub fn to_json(&self, key_id: &str) -> serde_json::Value {
        serde_json::json!({
            "keyId": key_id,
            "subscriptions": self.subscriptions,
            "signingKeys": self.signing_keys,
            "idempotentAnswers": self.idempotent_answers,
            "unchanged": self.unchanged,
        })
    }
}

#[cfg(test)]
mod tests;
