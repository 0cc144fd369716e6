//! The instance's one dedicated connection. It `LISTEN`s for delivery wake-ups: transactions
//! that queue deliveries `NOTIFY` this channel on commit, and the listener wakes its own
//! dispatcher. The dispatcher also polls, so a lost notification costs at most its poll
//! interval; after a reconnect the listener wakes it once anyway, since notifications sent while
//! it was away are gone.
//!
//! The same connection holds the liveness lock of each of this instance's dispatchers: a
//! session-level advisory lock keyed by the dispatcher's owner id, taken before the owner is
//! registered in `delivery_dispatchers`. PostgreSQL releases the lock the moment this session
//! ends — the process died, or its connection did — and from then on other instances treat the
//! owner's leases as run out (`webhooks::free_orphaned_leases`). While the lock is not held
//! (reconnecting) the owner claims nothing, since others may be taking its deliveries over.

use std::collections::{HashMap, HashSet};
use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;
use tokio_postgres::{AsyncMessage, Client, Config, NoTls};
use uuid::Uuid;

use crate::domain::time::Timestamp;
use crate::store::StoreError;

/// The notification channel.
pub const CHANNEL: &str = "redirect_sessions_deliveries";

const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// How often the idle connection is checked, so that a half-open one is noticed.
const PING_EVERY: Duration = Duration::from_secs(10);
/// How soon a liveness lock that could not be taken is tried again.
const RETRY_LOCK_EVERY: Duration = Duration::from_millis(100);
/// How long `LISTEN`, a lock or a ping may take before the connection is given up.
const ANSWER_WITHIN: Duration = Duration::from_secs(10);
/// How often one instance looks for the leases of dispatchers that are gone.
const FREE_ORPHANS_EVERY: Duration = Duration::from_secs(1);

/// The advisory lock key (a `bigint`) of a dispatcher's liveness lock, as SQL over the `uuid`
/// expression `owner`. Hashing the whole id keeps the keys of two owners apart and away from
/// the constant keys of `schema.rs`.
pub fn owner_lock_key(owner: &str) -> String {
    format!("hashtextextended('redirect-sessions dispatcher ' || ({owner})::text, 0)")
}

/// This instance's dispatchers, and whether the listening connection holds their liveness
/// locks right now.
pub struct Liveness {
    owners: watch::Sender<HashMap<Uuid, bool>>,
    /// When this instance last looked for the leases of dispatchers that are gone (Unix ms).
    orphans_checked_on: AtomicI64,
}

impl Default for Liveness {
    fn default() -> Self {
        Liveness { owners: watch::Sender::new(HashMap::new()), orphans_checked_on: AtomicI64::new(i64::MIN) }
    }
}

impl Liveness {
    /// Asks for `owner`'s liveness lock (and its registration).
    pub fn register(&self, owner: Uuid) {
        self.owners.send_modify(|owners| {
            owners.entry(owner).or_insert(false);
        });
    }

    /// Gives `owner`'s lock and registration up.
    pub fn unregister(&self, owner: Uuid) {
        self.owners.send_if_modified(|owners| owners.remove(&owner).is_some());
    }

    /// Waits until `owner`'s lock is held; `false` when it is not within `within`.
    pub async fn held_within(&self, owner: Uuid, within: Duration) -> bool {
        let mut owners = self.owners.subscribe();
        let held = async { owners.wait_for(|owners| owners.get(&owner) == Some(&true)).await.is_ok() };
        tokio::time::timeout(within, held).await.unwrap_or(false)
    }

    /// Whether `owner` may claim: a registered owner only while its lock is held; an owner that
    /// never registered (a tool, a test) always, with plain lease semantics.
    pub fn may_claim(&self, owner: Uuid) -> bool {
        self.owners.borrow().get(&owner).copied().unwrap_or(true)
    }

    /// Whether it is time to look for orphaned leases again (at most once per
    /// `FREE_ORPHANS_EVERY` per instance); if so, counts this as the look.
    pub fn orphans_due(&self, now: Timestamp) -> bool {
        let every = FREE_ORPHANS_EVERY.as_millis() as i64;
        let last = self.orphans_checked_on.load(Ordering::Relaxed);
        now.millis().saturating_sub(last) >= every
            && self
                .orphans_checked_on
                .compare_exchange(last, now.millis(), Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }

    /// Records which owners' locks are held.
    fn set_held(&self, locked: &HashSet<Uuid>) {
        self.owners.send_if_modified(|owners| {
            let mut changed = false;
            for (owner, held) in owners.iter_mut() {
                let now_held = locked.contains(owner);
                changed |= *held != now_held;
                *held = now_held;
            }
            changed
        });
    }
}

/// The listening task; it stops when this is dropped (and with its connection go the locks).
pub struct Listener {
    task: JoinHandle<()>,
    liveness: Arc<Liveness>,
}

impl Listener {
    /// The liveness locks this listener holds.
    pub fn liveness(&self) -> &Liveness {
        &self.liveness
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Starts listening with its own connection (not a pooled one: it stays open for good).
pub fn spawn(config: Config, wake: Arc<Notify>) -> Listener {
    let liveness = Arc::new(Liveness::default());
    Listener { task: tokio::spawn(listen_forever(config, wake, liveness.clone())), liveness }
}

async fn listen_forever(config: Config, wake: Arc<Notify>, liveness: Arc<Liveness>) {
    let mut backoff = MIN_BACKOFF;
    loop {
        let error = listen_once(&config, &wake, &liveness, &mut backoff).await;
        // The session is gone, and with it every lock it held.
        liveness.set_held(&HashSet::new());
        tracing::warn!(%error, retry_in = ?backoff, "the delivery notification connection ended; reconnecting");
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// Connects, listens, holds the liveness locks and forwards notifications until the
/// connection fails; answers why.
async fn listen_once(config: &Config, wake: &Notify, liveness: &Liveness, backoff: &mut Duration) -> StoreError {
    // `connect_timeout` in `config` bounds this.
    let (client, mut connection) = match config.connect(NoTls).await {
        Ok(pair) => pair,
        Err(error) => return error.into(),
    };
    // Polling the connection this way both drives it and hands us the notifications; every
    // statement below is awaited together with it, or it would never be sent.
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
    if let Err(error) = answered(&mut messages, "LISTEN", client.batch_execute(&listen)).await {
        return error;
    }
    tracing::debug!(channel = CHANNEL, "listening for queued deliveries");
    *backoff = MIN_BACKOFF;

    let mut owners = liveness.owners.subscribe();
    let mut locked = HashSet::new();
    if let Err(error) = hold_locks(&client, &mut messages, liveness, &mut owners, &mut locked).await {
        return error;
    }
    wake.notify_one();
    loop {
        let missing = owners.borrow().keys().any(|owner| !locked.contains(owner));
        let tick = if missing { RETRY_LOCK_EVERY } else { PING_EVERY };
        let result = tokio::select! {
            error = &mut messages => return error,
            _ = owners.changed() => hold_locks(&client, &mut messages, liveness, &mut owners, &mut locked).await,
            _ = tokio::time::sleep(tick) => {
                if missing {
                    hold_locks(&client, &mut messages, liveness, &mut owners, &mut locked).await
                } else {
                    answered(&mut messages, "a ping", client.batch_execute("")).await
                }
            }
        };
        if let Err(error) = result {
            return error;
        }
    }
}

/// Takes the locks (and registrations) of owners that asked for them and gives up those of
/// owners that left; then publishes which are held. A lock another session holds (another
/// instance looking whether the owner is alive holds it shared for a moment) is tried again.
async fn hold_locks<F: Future<Output = StoreError>>(
    client: &Client,
    messages: &mut Pin<&mut F>,
    liveness: &Liveness,
    owners: &mut watch::Receiver<HashMap<Uuid, bool>>,
    locked: &mut HashSet<Uuid>,
) -> Result<(), StoreError> {
    let wanted: HashSet<Uuid> = owners.borrow_and_update().keys().copied().collect();
    let lock = format!("SELECT pg_try_advisory_lock({})", owner_lock_key("$1::uuid"));
    let unlock = format!("SELECT pg_advisory_unlock({})", owner_lock_key("$1::uuid"));
    for owner in wanted.difference(&locked.clone()) {
        let taken: bool = answered(messages, "a liveness lock", client.query_one(&lock, &[owner])).await?.get(0);
        if !taken {
            continue;
        }
        // Registered only while locked, so another instance never sees a registered owner
        // without its lock (and takes it for gone) unless the owner really lost it.
        let register = "INSERT INTO delivery_dispatchers (owner) VALUES ($1) ON CONFLICT (owner) DO NOTHING";
        answered(messages, "registering a dispatcher", client.execute(register, &[owner])).await?;
        locked.insert(*owner);
    }
    for owner in locked.clone().difference(&wanted) {
        let forget = "DELETE FROM delivery_dispatchers WHERE owner = $1";
        answered(messages, "unregistering a dispatcher", client.execute(forget, &[owner])).await?;
        answered(messages, "a liveness unlock", client.query_one(&unlock, &[owner])).await?;
        locked.remove(owner);
    }
    liveness.set_held(locked);
    Ok(())
}

/// Awaits `operation` while driving the connection (`messages`), within `ANSWER_WITHIN`.
async fn answered<T, F: Future<Output = StoreError>>(
    messages: &mut Pin<&mut F>,
    what: &str,
    operation: impl Future<Output = Result<T, tokio_postgres::Error>>,
) -> Result<T, StoreError> {
    tokio::select! {
        result = tokio::time::timeout(ANSWER_WITHIN, operation) => match result {
            Ok(result) => result.map_err(StoreError::from),
            Err(_) => Err(StoreError::Unavailable(format!("{what} was not answered in time"))),
        },
        error = messages.as_mut() => Err(error),
    }
}
