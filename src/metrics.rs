//! Prometheus metrics: request counts and latencies by route and status, session counters, and
//! webhook deliveries (attempts by outcome and duration, failures, the backlog and its lag).

use std::collections::HashMap;
use std::fmt::{self, Write as _};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{PoisonError, RwLock};
use std::time::Duration;

use crate::store::webhooks::SuspendReason;
use crate::store::StoreStats;

/// Upper bounds of the latency buckets, as rendered in the `le` label.
const BUCKET_LABELS: [&str; 14] =
    ["0.0005", "0.001", "0.0025", "0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1", "2.5", "5", "10"];

/// The same bounds in microseconds, so the hot path compares integers instead of floats.
const BUCKET_BOUNDS_MICROS: [u64; 14] = [
    500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000, 2_500_000, 5_000_000,
    10_000_000,
];

/// Per-key counters. Buckets are stored non-cumulatively (the last one is +Inf) and the total
/// is derived from them at render time, so a record costs two atomic adds and a scrape can never
/// see `_count` disagree with the `+Inf` bucket or with `http_requests_total`.
#[derive(Default)]
struct Series {
    buckets: [AtomicU64; 15],
    sum_nanos: AtomicU64,
}

impl Series {
    fn observe(&self, nanos: u64) {
        let bucket = BUCKET_BOUNDS_MICROS.partition_point(|&micros| micros * 1_000 < nanos);
        self.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }
}

// Nested by component so an existing key can be found with borrowed `&str`s, without
// allocating a composite owned key on every request.
type ByStatus = HashMap<u16, Series>;
type ByRoute = HashMap<String, ByStatus>;
type ByMethod = HashMap<String, ByRoute>;

/// Process-wide metrics registry; cheap to record into from many threads at once.
#[derive(Default)]
pub struct Metrics {
    series: RwLock<ByMethod>,
    sessions_created: AtomicU64,
    sessions_cancelled: AtomicU64,
    sessions_expired: AtomicU64,
    hosted: [AtomicU64; HOSTED_EVENTS.len()],
    webhook_attempts: [AtomicU64; ATTEMPT_ENDS.len()],
    webhook_attempt_duration: Series,
    webhook_failed: AtomicU64,
    /// Subscriptions suspended, by `SuspendReason::ALL` index.
    webhook_suspensions: [AtomicU64; SuspendReason::ALL.len()],
}

/// How a webhook attempt ended (`redirect_sessions_webhook_attempts_total{outcome}`). Three
/// values and no per-merchant label, so the number of series stays fixed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttemptEnd {
    /// The receiver answered 2xx.
    Delivered,
    /// The receiver answered, but not 2xx (a redirect counts here).
    Rejected,
    /// No answer: refused address, connection failed, timed out, or cut off.
    Unanswered,
}

const ATTEMPT_ENDS: [(AttemptEnd, &str); 3] =
    [(AttemptEnd::Delivered, "delivered"), (AttemptEnd::Rejected, "rejected"), (AttemptEnd::Unanswered, "unanswered")];

/// The webhook backlog as the database has it at a scrape.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeliveryBacklog {
    /// Deliveries waiting to be sent (due or scheduled for a retry).
    pub pending: u64,
    /// How long the oldest due delivery has been due: the outbox's lag (0 when none is due).
    pub oldest_due: Duration,
    /// Deliveries held for suspended subscriptions.
    pub held: u64,
}

/// What happens on the hosted page, counted (`redirect_sessions_hosted_<name>_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hosted {
    /// A browser arrived with a valid token.
    Arrival,
    CodeSent,
    /// The sender could not deliver a code.
    CodeFailed,
    /// A wrong (or expired, or used-up) code was entered.
    CodeWrong,
    Authentication,
    Completion,
    Abort,
}

const HOSTED_EVENTS: [(Hosted, &str, &str); 7] = [
    (Hosted::Arrival, "arrivals", "Browsers that arrived on the hosted page with a valid token."),
    (Hosted::CodeSent, "codes_sent", "One-time codes sent."),
    (Hosted::CodeFailed, "codes_failed", "One-time codes the sender could not deliver."),
    (Hosted::CodeWrong, "codes_wrong", "Codes entered that were wrong, expired or used up."),
    (Hosted::Authentication, "authentications", "Customers authenticated with a one-time code."),
    (Hosted::Completion, "completions", "Sessions the customer completed."),
    (Hosted::Abort, "aborts", "Sessions the customer gave up."),
];

/// One series' values, gathered so series can be sorted for deterministic output. Rendering
/// holds the read lock throughout, which only delays requests that introduce a new key.
struct Snapshot<'a> {
    key: (&'a str, &'a str, u16),
    buckets: [u64; 15],
    sum_nanos: u64,
}

impl Metrics {
    /// Creates an empty registry; session counters start at 0.
    pub fn new() -> Metrics {
        Metrics::default()
    }

    /// One HTTP request finished. `route` is the matched route template (e.g.
    /// "/customer-authentication-service/v1/redirect-sessions/{redirectSessionId}") or
    /// "unmatched"; `method` e.g. "GET"; `status` the HTTP status code.
    pub fn record_request(&self, method: &str, route: &str, status: u16, elapsed: Duration) {
        let nanos = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        {
            // A panic elsewhere cannot leave the map half-updated, so poisoning is ignored
            // rather than letting one bad thread disable metrics for good.
            let map = self.series.read().unwrap_or_else(PoisonError::into_inner);
            let existing =
                map.get(method).and_then(|routes| routes.get(route)).and_then(|statuses| statuses.get(&status));
            if let Some(series) = existing {
                series.observe(nanos);
                return;
            }
        }
        let mut map = self.series.write().unwrap_or_else(PoisonError::into_inner);
        map.entry(method.to_owned())
            .or_default()
            .entry(route.to_owned())
            .or_default()
            .entry(status)
            .or_default()
            .observe(nanos);
    }

    /// One redirect session was created.
    pub fn session_created(&self) {
        self.sessions_created.fetch_add(1, Ordering::Relaxed);
    }

    /// `n` redirect sessions were cancelled.
    pub fn sessions_cancelled(&self, n: u64) {
        self.sessions_cancelled.fetch_add(n, Ordering::Relaxed);
    }

    /// `n` redirect sessions expired.
    pub fn sessions_expired(&self, n: u64) {
        self.sessions_expired.fetch_add(n, Ordering::Relaxed);
    }

    /// Something happened on the hosted page.
    pub fn hosted(&self, what: Hosted) {
        let index = HOSTED_EVENTS.iter().position(|(event, _, _)| *event == what).expect("every event is listed");
        self.hosted[index].fetch_add(1, Ordering::Relaxed);
    }

    /// A webhook attempt ended after `elapsed`; `gave_up`: its delivery is `Failed` for good.
    pub fn webhook_attempt(&self, end: AttemptEnd, elapsed: Duration, gave_up: bool) {
        let index = ATTEMPT_ENDS.iter().position(|(e, _)| *e == end).expect("every end is listed");
        self.webhook_attempts[index].fetch_add(1, Ordering::Relaxed);
        self.webhook_attempt_duration.observe(u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX));
        if gave_up {
            self.webhook_failed.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Renders everything in the Prometheus text exposition format 0.0.4, with the store's
    /// The dispatcher suspended a subscription for `reason`.
    pub fn webhook_suspended(&self, reason: SuspendReason) {
        let index = SuspendReason::ALL.iter().position(|r| *r == reason).expect("every reason is listed");
        self.webhook_suspensions[index].fetch_add(1, Ordering::Relaxed);
    }

    /// group-commit counters when it has them and the delivery backlog when it could be read.
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    const COUNTERS_AT_ZERO: &str = "\
# HELP redirect_sessions_created_total Redirect sessions created.
# TYPE redirect_sessions_created_total counter
redirect_sessions_created_total 0
# HELP redirect_sessions_cancelled_total Redirect sessions cancelled.
# TYPE redirect_sessions_cancelled_total counter
redirect_sessions_cancelled_total 0
# HELP redirect_sessions_expired_total Redirect sessions expired.
# TYPE redirect_sessions_expired_total counter
redirect_sessions_expired_total 0
# HELP redirect_sessions_hosted_arrivals_total Browsers that arrived on the hosted page with a valid token.
# TYPE redirect_sessions_hosted_arrivals_total counter
redirect_sessions_hosted_arrivals_total 0
# HELP redirect_sessions_hosted_codes_sent_total One-time codes sent.
# TYPE redirect_sessions_hosted_codes_sent_total counter
redirect_sessions_hosted_codes_sent_total 0
# HELP redirect_sessions_hosted_codes_failed_total One-time codes the sender could not deliver.
# TYPE redirect_sessions_hosted_codes_failed_total counter
redirect_sessions_hosted_codes_failed_total 0
# HELP redirect_sessions_hosted_codes_wrong_total Codes entered that were wrong, expired or used up.
# TYPE redirect_sessions_hosted_codes_wrong_total counter
redirect_sessions_hosted_codes_wrong_total 0
# HELP redirect_sessions_hosted_authentications_total Customers authenticated with a one-time code.
# TYPE redirect_sessions_hosted_authentications_total counter
redirect_sessions_hosted_authentications_total 0
# HELP redirect_sessions_hosted_completions_total Sessions the customer completed.
# TYPE redirect_sessions_hosted_completions_total counter
redirect_sessions_hosted_completions_total 0
# HELP redirect_sessions_hosted_aborts_total Sessions the customer gave up.
# TYPE redirect_sessions_hosted_aborts_total counter
redirect_sessions_hosted_aborts_total 0
";

    #[test]
    fn two_requests_render_cumulative_buckets_sum_and_count() {
        let metrics = Metrics::new();
        metrics.record_request("GET", "/r", 200, Duration::from_micros(300));
        metrics.record_request("GET", "/r", 200, Duration::from_millis(30));
        let l = "method=\"GET\",route=\"/r\",status=\"200\"";
        let h = "http_request_duration_seconds";
        let mut expected = format!(
            "# HELP http_requests_total Total HTTP requests.\n\
             # TYPE http_requests_total counter\n\
             http_requests_total{{{l}}} 2\n\
             # HELP {h} HTTP request latency in seconds.\n\
             # TYPE {h} histogram\n"
        );
        let counts = [1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 2];
        for (le, n) in BUCKET_LABELS.iter().chain(&["+Inf"]).zip(counts) {
            expected += &format!("{h}_bucket{{{l},le=\"{le}\"}} {n}\n");
        }
        expected += &format!("{h}_sum{{{l}}} 0.0303\n{h}_count{{{l}}} 2\n{COUNTERS_AT_ZERO}");
        // The webhook series follow.
        assert!(metrics.render(None, None).starts_with(&expected));
    }

    #[test]
    fn a_duration_exactly_on_a_bound_falls_in_that_bucket() {
        let metrics = Metrics::new();
        metrics.record_request("GET", "/r", 200, Duration::from_millis(1));
        let out = metrics.render(None, None);
        assert!(out.contains("le=\"0.0005\"} 0\n"));
        assert!(out.contains("le=\"0.001\"} 1\n"));
    }

    #[test]
    fn the_stores_group_commit_counters_follow_when_it_has_them() {
        let out = Metrics::new().render(Some(StoreStats::WriteBatches { batches: 3, jobs: 40 }), None);
        assert!(out.contains("\n# TYPE store_write_batches_total counter\nstore_write_batches_total 3\n"), "{out}");
        assert!(out.contains("\n# TYPE store_write_jobs_total counter\nstore_write_jobs_total 40\n"), "{out}");
        assert!(!Metrics::new().render(None, None).contains("store_write"));
        let pool = StoreStats::Pool { max: 10, open: 4, idle: 3, waiting: 0 };
        let out = Metrics::new().render(Some(pool), None);
        assert!(out.contains("\n# TYPE store_pool_connections gauge\nstore_pool_connections 4\n"), "{out}");
        assert!(out.contains("\nstore_pool_idle_connections 3\n"), "{out}");
    }

    #[test]
    fn hosted_page_counters_count_each_event_apart() {
        let metrics = Metrics::new();
        metrics.hosted(Hosted::CodeSent);
        metrics.hosted(Hosted::CodeSent);
        metrics.hosted(Hosted::Abort);
        let text = metrics.render(None, None);
        assert!(text.contains("redirect_sessions_hosted_codes_sent_total 2\n"), "{text}");
        assert!(text.contains("redirect_sessions_hosted_aborts_total 1\n"), "{text}");
        assert!(text.contains("redirect_sessions_hosted_arrivals_total 0\n"), "{text}");
    }

    #[test]
    fn a_fresh_registry_renders_session_counters_at_zero() {
        assert!(Metrics::new().render(None, None).contains(COUNTERS_AT_ZERO));
    }

    #[test]
    fn webhook_attempts_are_counted_by_outcome_and_timed_and_the_backlog_is_rendered_when_read() {
        let metrics = Metrics::new();
        metrics.webhook_attempt(AttemptEnd::Delivered, Duration::from_millis(30), false);
        metrics.webhook_attempt(AttemptEnd::Delivered, Duration::from_millis(40), false);
        metrics.webhook_attempt(AttemptEnd::Unanswered, Duration::from_secs(10), true);
        metrics.webhook_suspended(SuspendReason::ReceiverGone);
        let backlog = DeliveryBacklog { pending: 7, oldest_due: Duration::from_millis(1500), held: 3 };
        let out = metrics.render(None, Some(backlog));
        for line in [
            "redirect_sessions_webhook_attempts_total{outcome=\"delivered\"} 2\n",
            "redirect_sessions_webhook_attempts_total{outcome=\"rejected\"} 0\n",
            "redirect_sessions_webhook_attempts_total{outcome=\"unanswered\"} 1\n",
            "redirect_sessions_webhook_attempt_duration_seconds_bucket{le=\"0.05\"} 2\n",
            "redirect_sessions_webhook_attempt_duration_seconds_bucket{le=\"10\"} 3\n",
            "redirect_sessions_webhook_attempt_duration_seconds_sum 10.07\n",
            "redirect_sessions_webhook_attempt_duration_seconds_count 3\n",
            "redirect_sessions_webhook_deliveries_failed_total 1\n",
            "redirect_sessions_webhook_suspensions_total{reason=\"ReceiverGone\"} 1\n",
            "redirect_sessions_webhook_suspensions_total{reason=\"ReceiverFailing\"} 0\n",
            "# TYPE redirect_sessions_webhook_deliveries_held gauge\nredirect_sessions_webhook_deliveries_held 3\n",
            "# TYPE redirect_sessions_webhook_deliveries_pending gauge\nredirect_sessions_webhook_deliveries_pending 7\n",
            "# TYPE redirect_sessions_webhook_oldest_due_seconds gauge\nredirect_sessions_webhook_oldest_due_seconds 1.5\n",
        ] {
            assert!(out.contains(line), "{line} is missing from:\n{out}");
        }
        // A backlog that could not be read leaves its gauges out rather than showing zero.
        assert!(!metrics.render(None, None).contains("webhook_deliveries_pending"));
    }

    #[test]
    fn session_counters_accumulate() {
        let metrics = Metrics::default();
        metrics.session_created();
        metrics.session_created();
        metrics.sessions_cancelled(3);
        metrics.sessions_expired(5);
        metrics.sessions_expired(0);
        let out = metrics.render(None, None);
        assert!(out.contains("\nredirect_sessions_created_total 2\n"));
        assert!(out.contains("\nredirect_sessions_cancelled_total 3\n"));
        assert!(out.contains("\nredirect_sessions_expired_total 5\n"));
    }

    #[test]
    fn label_values_escape_backslash_quote_and_newline() {
        let metrics = Metrics::new();
        metrics.record_request("GET", "a\\b\"c\nd", 404, Duration::ZERO);
        let out = metrics.render(None, None);
        let expected = r#"http_requests_total{method="GET",route="a\\b\"c\nd",status="404"} 1"#;
        assert!(out.contains(expected), "{out}");
    }

    #[test]
    fn series_are_sorted_by_method_then_route_then_status() {
        let metrics = Metrics::new();
        for (m, r, s) in [("POST", "/a", 201), ("GET", "/b", 200), ("GET", "/a", 500), ("GET", "/a", 200)] {
            metrics.record_request(m, r, s, Duration::ZERO);
        }
        let out = metrics.render(None, None);
        let totals: Vec<&str> = out.lines().filter(|l| l.starts_with("http_requests_total{")).collect();
        assert_eq!(
            totals,
            [
                r#"http_requests_total{method="GET",route="/a",status="200"} 1"#,
                r#"http_requests_total{method="GET",route="/a",status="500"} 1"#,
                r#"http_requests_total{method="GET",route="/b",status="200"} 1"#,
                r#"http_requests_total{method="POST",route="/a",status="201"} 1"#,
            ]
        );
    }

    #[test]
    fn eight_threads_recording_concurrently_lose_no_counts() {
        let metrics = Arc::new(Metrics::new());
        let handles: Vec<_> = (0..8)
            .map(|t| {
                let metrics = Arc::clone(&metrics);
                std::thread::spawn(move || {
                    for i in 0..10_000u64 {
                        // Two statuses so threads race on creating new keys too.
                        let status = if (i + t) % 2 == 0 { 200 } else { 404 };
                        metrics.record_request("GET", "/r", status, Duration::from_micros(1));
                        metrics.session_created();
                    }
                })
            })
            .collect();
        for handle in handles {
            handle.join().unwrap();
        }
        let out = metrics.render(None, None);
        for status in [200, 404] {
            let l = format!("method=\"GET\",route=\"/r\",status=\"{status}\"");
            assert!(out.contains(&format!("http_requests_total{{{l}}} 40000\n")));
            assert!(out.contains(&format!("_bucket{{{l},le=\"+Inf\"}} 40000\n")));
            assert!(out.contains(&format!("_count{{{l}}} 40000\n")));
            assert!(out.contains(&format!("_sum{{{l}}} 0.04\n")));
        }
        assert!(out.contains("\nredirect_sessions_created_total 80000\n"));
    }

    #[test]
    fn metrics_can_be_shared_across_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Metrics>();
    }
}
