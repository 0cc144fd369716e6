//! Running the service: the listeners, the background jobs, and a graceful shutdown (the state
//! they share is `crate::state`).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::api;
use crate::domain::time::Timestamp;
use crate::server;
use crate::state::{reload_keys_now, AppState};
use crate::store::webhooks::{Retention, SuspendPolicy};
use crate::store::StoreError;
use crate::webhooks::dispatcher::{self, DispatcherSettings};

/// How many expired sessions one sweep transaction records at most.
const SWEEP_BATCH: usize = 500;
/// How often the sweep looks for expired sessions.
const SWEEP_EVERY: Duration = Duration::from_secs(1);
/// How often old records are purged, and how many of each kind per transaction.
const PURGE_EVERY: Duration = Duration::from_secs(60);
const PURGE_BATCH: usize = 1000;
/// Idempotency records are kept at least this long (docs/DESIGN.md "Idempotency").
const IDEMPOTENCY_RETENTION: Duration = Duration::from_secs(24 * 3600);
/// How often each instance re-reads the signing keys (another instance may have rotated).
const KEYS_EVERY: Duration = Duration::from_secs(30);

/// Serves on `listener` (and on `metrics_listen`, when set) until `shutdown` resolves, then stops
/// accepting, finishes in-flight requests and stops the background jobs. Both listeners apply
/// the `http_*` limits (`server`).
pub async fn serve(
    state: AppState,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let (stop, stopped) = watch::channel(false);
    let mut jobs = Vec::new();
    if state.config.expiry_sweep {
        jobs.push(tokio::spawn(sweep_expired(state.clone(), stopped.clone())));
    }
    jobs.push(tokio::spawn(reload_keys(state.clone(), stopped.clone())));
    jobs.push(tokio::spawn(purge_old_records(state.clone(), stopped.clone())));
    if state.config.webhook_dispatcher {
        let client = state.webhook_client.clone();
        let settings = DispatcherSettings {
            retry_schedule: state.config.webhook_retry_schedule.clone(),
            timeout: state.config.webhook_timeout,
            concurrency: state.config.webhook_concurrency,
            per_subscription: state.config.webhook_concurrency_per_subscription,
            suspend: SuspendPolicy { failing_for: state.config.webhook_suspend_after },
        };
        jobs.push(tokio::spawn(dispatcher::run(
            state.store.clone(),
            client,
            settings,
            state.metrics.clone(),
            stopped.clone(),
        )));
    }

    let limits = server::Limits::of(&state.config);
    let public_url: Arc<str> = state.public_url.as_str().into();
    let metrics_server = match state.config.metrics_listen {
        Some(address) => {
            let metrics_listener = TcpListener::bind(address).await?;
            tracing::info!(address = %metrics_listener.local_addr()?, "metrics listening");
            let app = api::metrics_router(state.clone());
            let mut stopped = stopped.clone();
            Some(tokio::spawn(server::serve(metrics_listener, app, limits, public_url.clone(), async move {
                let _ = stopped.wait_for(|s| *s).await;
            })))
        }
        None => None,
    };

    let address = listener.local_addr()?;
    tracing::info!(%address, public_url = %state.public_url, "listening");
    server::serve(listener, api::router(state.clone()), limits, public_url, async move {
        shutdown.await;
        tracing::info!("shutting down: finishing in-flight requests");
    })
    .await;
    let _ = stop.send(true);
    for job in jobs {
        let _ = job.await;
    }
    if let Some(server) = metrics_server {
        let _ = server.await;
    }
    tracing::info!("stopped");
    Ok(())
}

/// Records `Expired` (and its event) for sessions whose time has passed, in batches.
async fn sweep_expired(state: AppState, mut stopped: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(SWEEP_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stopped.wait_for(|s| *s) => return,
        }
        loop {
            match state.store.expire_due(Timestamp::now(), SWEEP_BATCH).await {
                Ok(0) => break,
                Ok(expired) => {
                    state.metrics.sessions_expired(expired as u64);
                    tracing::debug!(expired, "recorded expired sessions");
                    if expired < SWEEP_BATCH {
                        break;
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, "the expiry sweep failed; it will try again");
                    break;
                }
            }
        }
    }
}

/// Every minute, the retention janitor (`purge_old_records_at`).
async fn purge_old_records(state: AppState, mut stopped: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(PURGE_EVERY) => {}
            _ = stopped.wait_for(|s| *s) => return,
        }
        if let Err(error) = purge_old_records_at(&state, Timestamp::now(), &stopped).await {
            tracing::warn!(%error, "purging old records failed; it will try again");
        }
    }
}

/// Deletes finished deliveries, their attempts and events past the retention as of `now`,
/// and idempotency records older than a day, in small batches so writers barely notice, until
/// none is left or `stopped`; answers how many rows went.
pub async fn purge_old_records_at(
    state: &AppState,
    now: Timestamp,
    stopped: &watch::Receiver<bool>,
) -> Result<usize, StoreError> {
    let retention = Retention { deliveries: state.config.delivery_retention, idempotency: IDEMPOTENCY_RETENTION };
    let mut total = 0;
    while !*stopped.borrow() {
        let removed = state.store.purge(now, retention, PURGE_BATCH).await?;
        if removed == 0 {
            break;
        }
        tracing::debug!(removed, "purged old records");
        total += removed;
    }
    Ok(total)
}

/// Every 30 seconds, picks up signing keys rotated by another instance or by `signing-key
/// rotate` (`reload_keys_now`).
async fn reload_keys(state: AppState, mut stopped: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(KEYS_EVERY) => {}
            _ = stopped.wait_for(|s| *s) => return,
        }
        if let Err(error) = reload_keys_now(&state).await {
            tracing::warn!(%error, "could not reload the signing keys");
        }
    }
}

/// Resolves on SIGTERM or SIGINT. The handlers are installed when this is called (not when
/// the future is first polled), so a signal that arrives while the server starts is not lost.
pub fn shutdown_signal() -> impl Future<Output = ()> + Send + 'static {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let terminate = signal(SignalKind::terminate());
        let interrupt = signal(SignalKind::interrupt());
        async move {
            match (terminate, interrupt) {
                (Ok(mut terminate), Ok(mut interrupt)) => {
                    tokio::select! {
                        _ = terminate.recv() => {}
                        _ = interrupt.recv() => {}
                    }
                }
                _ => {
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
        }
    }
    #[cfg(not(unix))]
    async move {
        let _ = tokio::signal::ctrl_c().await;
    }
}
