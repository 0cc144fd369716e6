//! Delivery wake-ups across instances: transactions that queue deliveries `NOTIFY` this
//! channel on commit, and every instance keeps one dedicated connection that `LISTEN`s to it
//! and wakes its own dispatcher. The dispatcher also polls, so a lost notification costs at
//! most its poll interval; after a reconnect the listener wakes it once anyway, since
//! notifications sent while it was away are gone.

use std::future::poll_fn;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_postgres::{AsyncMessage, Config, NoTls};

use crate::store::StoreError;

/// The notification channel.
pub const CHANNEL: &str = "redirect_sessions_deliveries";

const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// How often the idle connection is checked, so that a half-open one is noticed.
const PING_EVERY: Duration = Duration::from_secs(30);
/// How long `LISTEN` or a ping may take before the connection is given up.
const ANSWER_WITHIN: Duration = Duration::from_secs(10);

/// The listening task; it stops when this is dropped.
pub struct Listener {
    task: JoinHandle<()>,
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Starts listening with its own connection (not a pooled one: it stays open for good).
pub fn spawn(config: Config, wake: Arc<Notify>) -> Listener {
    Listener { task: tokio::spawn(listen_forever(config, wake)) }
}

async fn listen_forever(config: Config, wake: Arc<Notify>) {
    let mut backoff = MIN_BACKOFF;
    loop {
        let error = listen_once(&config, &wake, &mut backoff).await;
        tracing::warn!(%error, retry_in = ?backoff, "the delivery notification connection ended; reconnecting");
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// Connects, listens and forwards notifications until the connection fails; answers why.
async fn listen_once(config: &Config, wake: &Notify, backoff: &mut Duration) -> StoreError {
    // `connect_timeout` in `config` bounds this.
    let (client, mut connection) = match config.connect(NoTls).await {
        Ok(pair) => pair,
        Err(error) => return error.into(),
    };
    // Polling the connection this way both drives it and hands us the notifications.
    let messages = async {
        loop {
            match poll_fn(|cx| connection.poll_message(cx)).await {
                Some(Ok(AsyncMessage::Notification(_))) => wake.notify_one(),
                Some(Ok(_)) => {}
                Some(Err(error)) => return StoreError::from(error),
                None => return StoreError::Unavailable("the server closed the connection".to_owned()),
            }
        }
    };
    let mut messages = std::pin::pin!(messages);
    let listen = format!("LISTEN {CHANNEL}");
    let listened = tokio::select! {
        listened = tokio::time::timeout(ANSWER_WITHIN, client.batch_execute(&listen)) => listened,
        error = &mut messages => return error,
    };
    match listened {
        Ok(Ok(())) => {}
        Ok(Err(error)) => return error.into(),
        Err(_) => return StoreError::Unavailable("LISTEN was not answered in time".to_owned()),
    }
    tracing::debug!(channel = CHANNEL, "listening for queued deliveries");
    *backoff = MIN_BACKOFF;
    wake.notify_one();
    loop {
        tokio::select! {
            error = &mut messages => return error,
            _ = tokio::time::sleep(PING_EVERY) => {
                match tokio::time::timeout(ANSWER_WITHIN, client.batch_execute("")).await {
                    Ok(Ok(())) => {}
                    Ok(Err(error)) => return error.into(),
                    Err(_) => return StoreError::Unavailable("the server stopped answering".to_owned()),
                }
            }
        }
    }
}
