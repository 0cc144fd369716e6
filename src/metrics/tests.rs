use super::*;
use crate::store::StoreStats;
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
