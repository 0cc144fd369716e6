//! The dispatcher: claims due deliveries with a lease, sends them with bounded concurrency
//! (in all, and per subscription), and records every attempt and what follows from it (see
//! `docs/DESIGN.md`).

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, watch, Notify, OwnedSemaphorePermit, Semaphore};
use uuid::Uuid;

use super::client::{AttemptResult, WebhookClient};
use super::signature;
use crate::domain::time::Timestamp;
use crate::metrics::{AttemptEnd, Metrics};
use crate::store::webhooks::{AttemptOutcome, AttemptRecord, ClaimedDelivery, NextStep, SuspendPolicy};
use crate::store::DynStore;

/// How often the dispatcher looks for due deliveries when nothing woke it.
const POLL_EVERY: Duration = Duration::from_secs(1);
/// The most deliveries claimed in one write.
const CLAIM_BATCH: usize = 512;
/// The most attempt results recorded in one write.
const RECORD_BATCH: usize = 512;
/// The longest a `Retry-After` may push an attempt back.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);
/// The lease outlives the request timeout by this much, so a live dispatcher never loses it.
const LEASE_MARGIN: Duration = Duration::from_secs(30);

/// The CloudEvents `source` of every event.
pub const SOURCE: &str = "/customer-authentication-service";

/// Settings of one dispatcher.
#[derive(Clone, Debug)]
pub struct DispatcherSettings {
    pub retry_schedule: Vec<Duration>,
    pub timeout: Duration,
    /// Attempts in flight at most.
    pub concurrency: usize,
    /// Leases one subscription may hold at most (attempts in flight to one receiver), so that
    /// a receiver that never answers cannot take every slot.
    pub per_subscription: usize,
    /// When a failing receiver's subscription is suspended.
    pub suspend: SuspendPolicy,
}

/// Runs the dispatcher until `stopped` turns true; then waits for attempts in flight.
pub async fn run(
    store: DynStore,
    client: WebhookClient,
    settings: DispatcherSettings,
    metrics: Arc<Metrics>,
    stopped: watch::Receiver<bool>,
) {
    let owner = Uuid::now_v7();
    // Before the first claim: the claims of dispatchers that are gone (on SQLite, of any earlier
    // process) are free at once instead of when their leases run out.
    match store.dispatcher_started(owner).await {
        Ok(0) => {}
        Ok(freed) => tracing::info!(deliveries = freed, "took over deliveries claimed by a dispatcher that is gone"),
        Err(error) => {
            tracing::warn!(%error, "could not free the claims of dispatchers that are gone; their leases run out")
        }
    }
    tracing::info!(
        dispatcher.id = %owner,
        concurrency = settings.concurrency,
        per_subscription = settings.per_subscription,
        "webhook dispatcher started"
    );
    let slots = Arc::new(Semaphore::new(settings.concurrency));
    let (results, queue) = mpsc::unbounded_channel();
    let recorded = Arc::new(Notify::new());
    let recorder =
        tokio::spawn(record_results(store.clone(), queue, recorded.clone(), settings.suspend, metrics.clone()));
    let context = Arc::new(Sender { client, settings, owner, metrics, in_flight: Mutex::new(HashSet::new()) });
    claim_loop(&store, &context, &slots, &results, &recorded, stopped).await;

    // Let attempts in flight finish (each is bounded by the request timeout), then flush.
    let all = u32::try_from(context.settings.concurrency).unwrap_or(u32::MAX);
    let wait = context.settings.timeout + Duration::from_secs(1);
    if tokio::time::timeout(wait, slots.acquire_many(all)).await.is_err() {
        // Give their deliveries back at once rather than when the lease runs out; a result
        // that still arrives is then refused (the lease is gone), and another dispatcher sends
        // them again: at least once.
        let unfinished: Vec<Uuid> =
            context.in_flight.lock().unwrap_or_else(|e| e.into_inner()).iter().copied().collect();
        tracing::warn!(deliveries = unfinished.len(), "webhook attempts still in flight at shutdown; releasing them");
        if let Err(error) = store.release_claims(owner, unfinished).await {
            tracing::warn!(%error, "could not release claimed deliveries; their leases will run out");
        }
    }
    drop(results);
    let _ = recorder.await;
    store.dispatcher_stopped(owner).await;
    tracing::info!(dispatcher.id = %owner, "webhook dispatcher stopped");
}

async fn claim_loop(
    store: &DynStore,
    context: &Arc<Sender>,
    slots: &Arc<Semaphore>,
    results: &mpsc::UnboundedSender<AttemptOutcome>,
    recorded: &Notify,
    mut stopped: watch::Receiver<bool>,
) {
    let wake = store.deliveries_queued();
    loop {
        let first = tokio::select! {
            permit = slots.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
            _ = stopped.wait_for(|s| *s) => return,
        };
        let mut permits = vec![first];
        while permits.len() < CLAIM_BATCH {
            match slots.clone().try_acquire_owned() {
                Ok(permit) => permits.push(permit),
                Err(_) => break,
            }
        }
        let wanted = permits.len();
        let now = Timestamp::now();
        let lease_until = now.plus(context.settings.timeout + LEASE_MARGIN);
        let per_subscription = context.settings.per_subscription;
        let claimed = match store.claim_deliveries(context.owner, now, lease_until, wanted, per_subscription).await {
            Ok(claimed) => claimed,
            Err(error) => {
                tracing::warn!(%error, "could not claim deliveries; trying again shortly");
                Vec::new()
            }
        };
        let got = claimed.len();
        for (delivery, permit) in claimed.into_iter().zip(permits.drain(..got)) {
            tokio::spawn(context.clone().attempt(delivery, permit, results.clone()));
        }
        drop(permits);
        if got == wanted {
            continue;
        }
        // Fewer than wanted: nothing else is due, or the rest belongs to subscriptions at their
        // cap. A recorded attempt makes room under a cap, so recording wakes the loop too (it
        // happens only while attempts are in flight).
        tokio::select! {
            _ = wake.notified() => {}
            _ = recorded.notified() => {}
            _ = tokio::time::sleep(POLL_EVERY) => {}
            _ = stopped.wait_for(|s| *s) => return,
        }
    }
}

/// Records attempt results, many per write; wakes the claim loop (`recorded`) after each write,
/// since the leases it ended make room under the per-subscription cap.
async fn record_results(
    store: DynStore,
    mut queue: mpsc::UnboundedReceiver<AttemptOutcome>,
    recorded: Arc<Notify>,
    policy: SuspendPolicy,
    metrics: Arc<Metrics>,
) {
    let mut batch = Vec::with_capacity(RECORD_BATCH);
    while queue.recv_many(&mut batch, RECORD_BATCH).await > 0 {
        let outcomes = std::mem::take(&mut batch);
        match store.record_attempts(outcomes, Timestamp::now(), policy).await {
            Ok(suspensions) => {
                for suspension in suspensions {
                    tracing::warn!(
                        subscription.id = %suspension.subscription_id,
                        reason = suspension.reason.as_str(),
                        "webhook subscription suspended; its deliveries are held until it is resumed"
                    );
                    metrics.webhook_suspended(suspension.reason);
                }
            }
            // The leases run out and the deliveries are attempted again: at least once.
            Err(error) => tracing::warn!(%error, "could not record webhook attempts; they will be retried"),
        }
        recorded.notify_one();
    }
}

struct Sender {
    client: WebhookClient,
    settings: DispatcherSettings,
    owner: Uuid,
    metrics: Arc<Metrics>,
    /// Deliveries claimed and not yet answered, so that shutdown can release them.
    in_flight: Mutex<HashSet<Uuid>>,
}

impl Sender {
    async fn attempt(
        self: Arc<Self>,
        delivery: ClaimedDelivery,
        _slot: OwnedSemaphorePermit,
        results: mpsc::UnboundedSender<AttemptOutcome>,
    ) {
        self.in_flight.lock().unwrap_or_else(|e| e.into_inner()).insert(delivery.id);
        let (started, result) = send(&self.client, &delivery).await;
        let next = next_step(&result, delivery.retry_index, &self.settings.retry_schedule, Timestamp::now());
        log_attempt(&delivery, &result, next);
        let end = if result.is_success() {
            AttemptEnd::Delivered
        } else if result.status.is_some() {
            AttemptEnd::Rejected
        } else {
            AttemptEnd::Unanswered
        };
        self.metrics.webhook_attempt(end, result.duration, next == NextStep::Failed);
        self.in_flight.lock().unwrap_or_else(|e| e.into_inner()).remove(&delivery.id);
        let _ = results.send(AttemptOutcome {
            delivery_id: delivery.id,
            owner: self.owner,
            attempt: AttemptRecord {
                attempt: delivery.attempts + 1,
                started_on: started,
                duration_ms: result.duration.as_millis() as i64,
                status: result.status,
                error: result.error.clone(),
            },
            next,
        });
    }
}

/// Sends `delivery` once: its CloudEvent, signed with its secret (and with the replaced one
/// during a rotation's overlap). Answers when the attempt started and what it came to.
pub async fn send(client: &WebhookClient, delivery: &ClaimedDelivery) -> (Timestamp, AttemptResult) {
    let started = Timestamp::now();
    let body = cloud_event(delivery);
    let event_id = delivery.event_id.to_string();
    let signature = [Some(delivery.signing_secret.as_str()), delivery.previous_secret.as_deref()]
        .into_iter()
        .flatten()
        .filter_map(signature::secret_key)
        .map(|key| signature::sign(&key, &event_id, started.seconds(), body.as_bytes()))
        .collect::<Vec<_>>()
        .join(" ");
    let headers = [
        ("content-type", "application/json".to_owned()),
        ("x-api-key", delivery.api_key.clone()),
        ("x-request-id", event_id.clone()),
        ("webhook-id", event_id),
        ("webhook-timestamp", started.seconds().to_string()),
        ("webhook-signature", signature),
    ];
    let result = client.post(&delivery.callback_url, &headers, body.into_bytes().into()).await;
    (started, result)
}

fn log_attempt(delivery: &ClaimedDelivery, result: &AttemptResult, next: NextStep) {
    match next {
        NextStep::Delivered => tracing::debug!(delivery.id = %delivery.id, "webhook delivered"),
        NextStep::RetryAt(at) => tracing::info!(
            delivery.id = %delivery.id, status = ?result.status, error = result.error.as_deref().unwrap_or(""),
            next_attempt = %at, "webhook attempt failed; will retry"
        ),
        NextStep::Failed => tracing::warn!(
            delivery.id = %delivery.id, status = ?result.status, error = result.error.as_deref().unwrap_or(""),
            "webhook delivery failed for good"
        ),
    }
}

/// The CloudEvents 1.0 structured body of a delivery.
pub fn cloud_event(delivery: &ClaimedDelivery) -> String {
    format!(
        r#"{{"specversion":"1.0","id":"{}","source":"{SOURCE}","time":"{}","datacontenttype":"application/json","type":"{}","data":{}}}"#,
        delivery.event_id,
        delivery.event_time,
        delivery.event_type.as_str(),
        delivery.data
    )
}

/// What follows an attempt: delivered on any 2xx; else the next delay of the schedule (with
/// ±20 % jitter, never sooner than a capped `Retry-After`), or failed once it is used up.
pub fn next_step(result: &AttemptResult, retry_index: i64, schedule: &[Duration], now: Timestamp) -> NextStep {
    if result.is_success() {
        return NextStep::Delivered;
    }
    let Some(delay) = usize::try_from(retry_index).ok().and_then(|i| schedule.get(i)) else {
        return NextStep::Failed;
    };
    let jittered = delay.mul_f64(0.8 + 0.4 * random_unit());
    let delay = match result.retry_after {
        Some(after) => jittered.max(after.min(MAX_RETRY_AFTER)),
        None => jittered,
    };
    NextStep::RetryAt(now.plus(delay))
}

/// A random number in [0, 1).
fn random_unit() -> f64 {
    let mut bytes = [0u8; 8];
    if getrandom::getrandom(&mut bytes).is_err() {
        return 0.5;
    }
    (u64::from_le_bytes(bytes) >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(status: Option<u16>, retry_after: Option<u64>) -> AttemptResult {
        AttemptResult {
            status,
            error: (!status.is_some_and(|s| (200..300).contains(&s))).then(|| "failed".to_owned()),
            retry_after: retry_after.map(Duration::from_secs),
            duration: Duration::from_millis(3),
        }
    }

    const SCHEDULE: [Duration; 2] = [Duration::from_secs(10), Duration::from_secs(100)];

    #[test]
    fn any_2xx_is_delivered() {
        for status in [200, 201, 204, 299] {
            assert_eq!(
                next_step(&result(Some(status), None), 0, &SCHEDULE, Timestamp::from_millis(0)),
                NextStep::Delivered
            );
        }
    }

    #[test]
    fn a_failure_is_retried_within_twenty_percent_of_the_scheduled_delay_and_the_jitter_varies() {
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..200 {
            let NextStep::RetryAt(at) = next_step(&result(Some(500), None), 1, &SCHEDULE, Timestamp::from_millis(0))
            else {
                panic!("expected a retry");
            };
            assert!((80_000..=120_000).contains(&at.millis()), "{at:?}");
            seen.insert(at.millis());
        }
        // Receivers that failed together must not be retried together: 200 draws over a
        // 40,000 ms window land on many different instants, and on both sides of the delay.
        assert!(seen.len() > 100, "only {} different retry times", seen.len());
        assert!(seen.first().is_some_and(|&first| first < 95_000), "{seen:?}");
        assert!(seen.last().is_some_and(|&last| last > 105_000), "{seen:?}");
    }

    #[test]
    fn retry_after_pushes_the_next_attempt_back_but_only_up_to_an_hour() {
        let now = Timestamp::from_millis(0);
        let NextStep::RetryAt(at) = next_step(&result(Some(503), Some(60)), 0, &SCHEDULE, now) else { panic!() };
        assert_eq!(at.millis(), 60_000);
        let NextStep::RetryAt(at) = next_step(&result(Some(429), Some(86_400)), 0, &SCHEDULE, now) else { panic!() };
        assert_eq!(at.millis(), 3_600_000);
    }

    #[test]
    fn the_attempt_after_the_last_delay_fails_for_good() {
        assert_eq!(next_step(&result(None, None), 2, &SCHEDULE, Timestamp::from_millis(0)), NextStep::Failed);
    }

    #[test]
    fn the_body_is_a_cloudevents_1_0_structured_event() {
        let delivery = ClaimedDelivery {
            id: Uuid::nil(),
            event_id: Uuid::max(),
            event_type: crate::domain::event::EventKind::RedirectSessionCancelled,
            event_time: Timestamp::from_millis(0),
            data: r#"{"id":"x"}"#.to_owned(),
            callback_url: String::new(),
            api_key: String::new(),
            signing_secret: String::new(),
            previous_secret: None,
            attempts: 0,
            retry_index: 0,
        };
        let body: serde_json::Value = serde_json::from_str(&cloud_event(&delivery)).unwrap();
        assert_eq!(
            body,
            serde_json::json!({"specversion": "1.0", "id": Uuid::max(), "source": SOURCE,
                               "time": "1970-01-01T00:00:00.000Z", "datacontenttype": "application/json",
                               "type": "RedirectSessionCancelled", "data": {"id": "x"}})
        );
    }
}
