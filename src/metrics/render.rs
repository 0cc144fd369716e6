//! The Prometheus text exposition format 0.0.4 of `Metrics`, series sorted so scrapes are
//! deterministic.

use std::fmt::{self, Write as _};
use std::sync::atomic::Ordering;
use std::sync::PoisonError;

use super::{DeliveryBacklog, Metrics, ATTEMPT_ENDS, BUCKET_LABELS, HOSTED_EVENTS};
use crate::store::webhooks::SuspendReason;
use crate::store::StoreStats;

/// One series' values, gathered so series can be sorted for deterministic output. Rendering
/// holds the read lock throughout, which only delays requests that introduce a new key.
struct Snapshot<'a> {
    key: (&'a str, &'a str, u16),
    buckets: [u64; 15],
    sum_nanos: u64,
}

impl Metrics {
    /// Renders everything in the Prometheus text exposition format 0.0.4, with the store's own
    /// figures (SQLite's group-commit counters, PostgreSQL's pool) and the delivery backlog when
    /// they could be read.
    pub fn render(&self, store: Option<StoreStats>, backlog: Option<DeliveryBacklog>) -> String {
        let mut out = String::with_capacity(4096);
        self.render_into(&mut out).expect("formatting into a String cannot fail");
        self.render_webhooks(&mut out, backlog).expect("formatting into a String cannot fail");
        for (name, help, kind, value) in store.iter().flat_map(StoreStats::series) {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}");
        }
        out
    }

    fn render_into(&self, out: &mut String) -> fmt::Result {
        let map = self.series.read().unwrap_or_else(PoisonError::into_inner);
        let mut snapshots = Vec::new();
        for (method, routes) in map.iter() {
            for (route, statuses) in routes {
                for (&status, series) in statuses {
                    let buckets = std::array::from_fn(|i| series.buckets[i].load(Ordering::Relaxed));
                    let sum_nanos = series.sum_nanos.load(Ordering::Relaxed);
                    let key = (method.as_str(), route.as_str(), status);
                    snapshots.push(Snapshot { key, buckets, sum_nanos });
                }
            }
        }
        snapshots.sort_unstable_by_key(|s| s.key);
        let labels: Vec<String> = snapshots
            .iter()
            .map(|s| {
                let (method, route, status) = s.key;
                let (method, route) = (escape_label(method), escape_label(route));
                format!("method=\"{method}\",route=\"{route}\",status=\"{status}\"")
            })
            .collect();

        let name = "http_requests_total";
        writeln!(out, "# HELP {name} Total HTTP requests.")?;
        writeln!(out, "# TYPE {name} counter")?;
        for (s, labels) in snapshots.iter().zip(&labels) {
            writeln!(out, "{name}{{{labels}}} {}", s.buckets.iter().sum::<u64>())?;
        }

        let name = "http_request_duration_seconds";
        writeln!(out, "# HELP {name} HTTP request latency in seconds.")?;
        writeln!(out, "# TYPE {name} histogram")?;
        for (s, labels) in snapshots.iter().zip(&labels) {
            write_histogram(out, name, labels, s.buckets, s.sum_nanos)?;
        }

        let sessions = [
            ("created", &self.sessions_created),
            ("cancelled", &self.sessions_cancelled),
            ("expired", &self.sessions_expired),
        ];
        for (what, counter) in sessions {
            let name = format!("redirect_sessions_{what}_total");
            writeln!(out, "# HELP {name} Redirect sessions {what}.")?;
            writeln!(out, "# TYPE {name} counter")?;
            writeln!(out, "{name} {}", counter.load(Ordering::Relaxed))?;
        }
        for ((_, what, help), counter) in HOSTED_EVENTS.iter().zip(&self.hosted) {
            let name = format!("redirect_sessions_hosted_{what}_total");
            writeln!(out, "# HELP {name} {help}")?;
            writeln!(out, "# TYPE {name} counter")?;
            writeln!(out, "{name} {}", counter.load(Ordering::Relaxed))?;
        }
        Ok(())
    }
}

impl Metrics {
    fn render_webhooks(&self, out: &mut String, backlog: Option<DeliveryBacklog>) -> fmt::Result {
        let name = "redirect_sessions_webhook_attempts_total";
        writeln!(out, "# HELP {name} Webhook attempts by how they ended.")?;
        writeln!(out, "# TYPE {name} counter")?;
        for ((_, outcome), counter) in ATTEMPT_ENDS.iter().zip(&self.webhook_attempts) {
            writeln!(out, "{name}{{outcome=\"{outcome}\"}} {}", counter.load(Ordering::Relaxed))?;
        }
        let name = "redirect_sessions_webhook_attempt_duration_seconds";
        writeln!(out, "# HELP {name} How long webhook attempts took, answered or not.")?;
        writeln!(out, "# TYPE {name} histogram")?;
        let series = &self.webhook_attempt_duration;
        let buckets = std::array::from_fn(|i| series.buckets[i].load(Ordering::Relaxed));
        write_histogram(out, name, "", buckets, series.sum_nanos.load(Ordering::Relaxed))?;
        let name = "redirect_sessions_webhook_deliveries_failed_total";
        writeln!(out, "# HELP {name} Deliveries that used up their retries and are Failed.")?;
        writeln!(out, "# TYPE {name} counter")?;
        writeln!(out, "{name} {}", self.webhook_failed.load(Ordering::Relaxed))?;
        let name = "redirect_sessions_webhook_suspensions_total";
        writeln!(out, "# HELP {name} Subscriptions suspended by this instance, by reason.")?;
        writeln!(out, "# TYPE {name} counter")?;
        for (reason, counter) in SuspendReason::ALL.iter().zip(&self.webhook_suspensions) {
            writeln!(out, "{name}{{reason=\"{}\"}} {}", reason.as_str(), counter.load(Ordering::Relaxed))?;
        }
        if let Some(backlog) = backlog {
            let gauges = [
                (
                    "redirect_sessions_webhook_deliveries_pending",
                    "Deliveries waiting to be sent (due now or scheduled for a retry), in all instances.",
                    backlog.pending as f64,
                ),
                (
                    "redirect_sessions_webhook_oldest_due_seconds",
                    "How long the oldest due delivery has waited: the outbox lag (0 when none is due).",
                    backlog.oldest_due.as_secs_f64(),
                ),
                (
                    "redirect_sessions_webhook_deliveries_held",
                    "Deliveries held for suspended subscriptions (sent when they are resumed), in all instances.",
                    backlog.held as f64,
                ),
            ];
            for (name, help, value) in gauges {
                writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}")?;
            }
        }
        Ok(())
    }
}

/// The sample lines of one histogram series: its cumulative buckets, sum and count. `labels`
/// are the series' own (`a="1",b="2"`), or empty.
fn write_histogram(out: &mut String, name: &str, labels: &str, buckets: [u64; 15], sum_nanos: u64) -> fmt::Result {
    let (with_le, own) = if labels.is_empty() {
        (String::new(), String::new())
    } else {
        (format!("{labels},"), format!("{{{labels}}}"))
    };
    let mut cumulative = 0;
    let les = BUCKET_LABELS.iter().chain(std::iter::once(&"+Inf"));
    for (le, count) in les.zip(buckets) {
        cumulative += count;
        writeln!(out, "{name}_bucket{{{with_le}le=\"{le}\"}} {cumulative}")?;
    }
    // Integer nanoseconds divided by 1e9 rounds to the nearest f64 of the exact decimal, so `{}`
    // prints e.g. 0.0303 rather than 0.030299999999999997.
    let sum_seconds = sum_nanos as f64 / 1e9;
    writeln!(out, "{name}_sum{own} {sum_seconds}")?;
    writeln!(out, "{name}_count{own} {cumulative}")
}

/// Escapes a label value as the exposition format requires: backslash, double quote, newline.
fn escape_label(value: &str) -> String {
    let mut escaped = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => escaped.push_str("\\\\"),
            '"' => escaped.push_str("\\\""),
            '\n' => escaped.push_str("\\n"),
            other => escaped.push(other),
        }
    }
    escaped
}
