//! Logging: human-readable lines on stderr, filtered by the `log` setting
//! (`info`, `debug`, or per-target like `info,redirect_sessions=debug`).

use std::io::IsTerminal;
use std::str::FromStr;

use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Installs the global subscriber, or says why the filter is not valid.
pub fn init(filter: &str) -> Result<(), String> {
    let targets = Targets::from_str(filter).map_err(|e| {
        format!("invalid log filter {filter:?}: {e} (expected e.g. info or info,redirect_sessions=debug)")
    })?;
    let _ = tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::stderr().is_terminal())
                .with_target(false),
        )
        .with(targets)
        .try_init();
    Ok(())
}
