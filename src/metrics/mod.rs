//! Prometheus metrics: request counts and latencies by route and status, session counters, and
//! webhook deliveries (attempts by outcome and duration, failures, the backlog and its lag).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{PoisonError, RwLock};
use std::time::Duration;

use crate::store::webhooks::SuspendReason;

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

    /// The dispatcher suspended a subscription for `reason`.
    pub fn webhook_suspended(&self, reason: SuspendReason) {
        let index = SuspendReason::ALL.iter().position(|r| *r == reason).expect("every reason is listed");
        self.webhook_suspensions[index].fetch_add(1, Ordering::Relaxed);
    }
}

mod render;
#[cfg(test)]
mod tests;
