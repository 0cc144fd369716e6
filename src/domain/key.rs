//! Merchant API keys: the form they are stored and looked up in. No I/O.

use sha2::{Digest, Sha256};

/// The stored form of an API key. Keys are 32 random bytes, so a plain SHA-256 (rather than
/// a slow password hash) is enough: nobody can guess their way through 2^256 inputs.
pub fn key_hash(api_key: &str) -> [u8; 32] {
    Sha256::digest(api_key.as_bytes()).into()
}
