//! Tests of settings: layering, the messages of bad values, and the declaration (README.md's
//! table, the flags).

mod declaration;
mod layers;
mod otp_secrets;
mod values;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use super::parse::{check_token, hours, parse_duration_list, redact};
use super::{parse_database_url, parse_duration, Config, DatabaseUrl, OtpSender, RawSettings};
use crate::secrets::SecretKey;

/// A TOML file under the temp dir, removed when dropped (even if the test fails).
struct TempToml(PathBuf);

impl TempToml {
    fn new(contents: &str) -> TempToml {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let name = format!("config-check-{}-{}.toml", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
        let path = std::env::temp_dir().join(name);
        std::fs::write(&path, contents).expect("temp dir is writable");
        TempToml(path)
    }
}

impl Drop for TempToml {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

fn no_flags() -> RawSettings {
    RawSettings::default()
}

fn load(file: Option<&TempToml>, env: &HashMap<String, String>, flags: &RawSettings) -> Config {
    Config::load(file.map(|f| f.0.as_path()), env, flags).expect("valid settings")
}

/// Loads expecting failure and checks the one-line promise on the way.
fn error(file: Option<&TempToml>, env: &HashMap<String, String>, flags: &RawSettings) -> String {
    let message =
        Config::load(file.map(|f| f.0.as_path()), env, flags).expect_err("settings should be rejected").to_string();
    assert!(!message.contains('\n'), "more than one line: {message}");
    message
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}
