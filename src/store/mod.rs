//! Storage: the `Store` trait with one method per use case and the backends; the records it
//! speaks in and the decisions on them are the domain's (`crate::domain::record`). Every method that changes a session writes its event in the same
//! transaction.

pub mod customer;
pub mod idempotency;
pub mod postgres;
pub mod sealing;
pub mod sqlite;

/// The webhook records the store speaks in (`crate::domain::webhooks`).
pub use crate::domain::webhooks;

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use tokio::sync::Notify;
use uuid::Uuid;

use self::webhooks::{
    AttemptOutcome, AttemptRecord, ChangeSubscriptionOutcome, ClaimedDelivery, DeliveryFilter, DeliveryRecord,
    PutSubscriptionOutcome, RecoverOutcome, RecoverWindow, RedeliverOutcome, Retention, SecretRotation,
    SubscriptionChange, SubscriptionRecord, SuspendPolicy, Suspension, TestDelivery,
};
use crate::domain::event::EventType;
use crate::domain::session::State;
use crate::domain::subscription::SubscriptionSpec;
use crate::domain::time::Timestamp;
use crate::domain::token::KeyPair;

pub use self::idempotency::{Found, Guard, Guarded, IdempotencyKey, Kept, StoredResponse};
pub use crate::domain::record::{
    decide_cancel, etag_matches, event_data, CancelDecision, CancelOutcome, CancelRequest, CreateOutcome, Merchant,
    SessionRecord,
};

/// Which of a merchant's sessions to list, newest first.
#[derive(Clone, Debug, Default)]
pub struct SessionFilter {
    pub state: Option<State>,
    /// Inclusive.
    pub created_from: Option<Timestamp>,
    /// Exclusive.
    pub created_to: Option<Timestamp>,
    /// Only sessions older than this (created, id) position: the cursor.
    pub after: Option<(Timestamp, Uuid)>,
    pub limit: usize,
}

/// The signing keys: the one to sign with and every public key still accepted.
#[derive(Clone, Debug)]
pub struct SigningKeys {
    pub current: KeyPair,
    pub previous: Vec<(String, [u8; 32])>,
}

/// A storage failure. Domain outcomes (not found, conflicts) are not errors.
#[derive(Clone, Debug)]
pub enum StoreError {
    /// The database cannot be reached or is shutting down: `503`.
    Unavailable(String),
    /// Anything else: `500`.
    Internal(String),
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreError::Unavailable(why) => write!(f, "database unavailable: {why}"),
            StoreError::Internal(why) => write!(f, "database error: {why}"),
        }
    }
}

impl std::error::Error for StoreError {}

/// The storage a backend provides, one method per use case.
#[async_trait]
pub trait Store: customer::CustomerStore + Send + Sync + 'static {
    /// `Ok` when the database answers and is migrated.
    async fn ready(&self) -> Result<(), StoreError>;

    /// For a backend that commits concurrent writes together: `(batches, jobs)` committed so
    /// far, for `/metrics`.
    fn write_batches(&self) -> Option<(u64, u64)> {
        None
    }

    async fn create_merchant(&self, merchant: Merchant, key_hash: [u8; 32]) -> Result<(), StoreError>;
    /// The enabled or disabled merchant whose key hashes to `key_hash`.
    async fn merchant_by_key(&self, key_hash: [u8; 32]) -> Result<Option<Merchant>, StoreError>;
    async fn list_merchants(&self) -> Result<Vec<Merchant>, StoreError>;
    /// Replaces the key; `false` when there is no such merchant.
    async fn rotate_merchant_key(&self, id: Uuid, key_hash: [u8; 32]) -> Result<bool, StoreError>;
    /// `false` when there is no such merchant.
    async fn disable_merchant(&self, id: Uuid) -> Result<bool, StoreError>;

    async fn create_customer(&self, id: Uuid, phone: String, now: Timestamp) -> Result<(), StoreError>;

    /// Inserts the session unless its id exists (checking the customer first); under a
    /// guard, keeps the answer in the same transaction (`idempotency`).
    async fn create_session_guarded(
        &self,
        session: SessionRecord,
        guard: Option<Guard<CreateOutcome>>,
    ) -> Result<Guarded<CreateOutcome>, StoreError>;
    /// `create_session_guarded` without an idempotency key.
    async fn create_session(&self, session: SessionRecord) -> Result<CreateOutcome, StoreError> {
        ran(self.create_session_guarded(session, None).await?)
    }
    async fn get_session(&self, id: Uuid) -> Result<Option<SessionRecord>, StoreError>;
    /// `merchant_by_key` and `get_session` read together, at one point in time and in one
    /// step (one transaction or round trip): the merchant API's most frequent request.
    async fn merchant_and_session(
        &self,
        key_hash: [u8; 32],
        id: Uuid,
    ) -> Result<(Option<Merchant>, Option<SessionRecord>), StoreError>;
    /// `merchant_by_key` and the idempotency record of `request_id` (of that merchant) read
    /// together, at one point in time and in one step: every write with an `x-request-id`.
    async fn merchant_and_kept(
        &self,
        key_hash: [u8; 32],
        request_id: Uuid,
    ) -> Result<(Option<Merchant>, Option<Kept>), StoreError>;
    /// `limit + 1` at most, so the caller knows whether another page follows.
    async fn list_sessions(
        &self,
        merchant_id: Uuid,
        filter: SessionFilter,
        now: Timestamp,
    ) -> Result<Vec<SessionRecord>, StoreError>;
    /// One conditional write: cancels and records the event, or says why not; under a guard,
    /// keeps the answer in the same transaction (`idempotency`).
    async fn cancel_session_guarded(
        &self,
        request: CancelRequest,
        guard: Option<Guard<CancelOutcome>>,
    ) -> Result<Guarded<CancelOutcome>, StoreError>;
    /// `cancel_session_guarded` without an idempotency key.
    async fn cancel_session(&self, request: CancelRequest) -> Result<CancelOutcome, StoreError> {
        ran(self.cancel_session_guarded(request, None).await?)
    }
    /// Records `Expired` and its event for up to `batch` sessions whose time has passed;
    /// answers how many it expired.
    async fn expire_due(&self, now: Timestamp, batch: usize) -> Result<usize, StoreError>;
    /// The events of one session, oldest first (for operators and tests; SQLite has no index
    /// for it and reads the events table).
    async fn session_events(&self, session_id: Uuid) -> Result<Vec<(Uuid, EventType)>, StoreError>;

    /// The record kept under `key`, as it decides for a request with `fingerprint` (a read).
    async fn idempotency_lookup(&self, key: IdempotencyKey, fingerprint: [u8; 32])
        -> Result<Option<Found>, StoreError>;
    /// Keeps the answer to a request that changed nothing (one write of its own), unless a
    /// record was kept first under `key`: then answers that one.
    async fn idempotency_keep(
        &self,
        key: IdempotencyKey,
        fingerprint: [u8; 32],
        now: Timestamp,
        answer: StoredResponse,
    ) -> Result<Option<Found>, StoreError>;

    /// The signing keys, creating `candidate` as the first one when there is none.
    async fn signing_keys(&self, candidate: KeyPair, now: Timestamp) -> Result<SigningKeys, StoreError>;
    /// Makes `next` the current key; the old one stays accepted.
    async fn rotate_signing_key(&self, next: KeyPair, now: Timestamp) -> Result<(), StoreError>;

    /// Inserts the subscription unless its id exists; under a guard, keeps the answer in the
    /// same transaction (`idempotency`).
    async fn put_subscription_guarded(
        &self,
        record: SubscriptionRecord,
        guard: Option<Guard<PutSubscriptionOutcome>>,
    ) -> Result<Guarded<PutSubscriptionOutcome>, StoreError>;
    /// `put_subscription_guarded` without an idempotency key.
    async fn put_subscription(&self, record: SubscriptionRecord) -> Result<PutSubscriptionOutcome, StoreError> {
        ran(self.put_subscription_guarded(record, None).await?)
    }
    async fn get_subscription(&self, id: Uuid) -> Result<Option<SubscriptionRecord>, StoreError>;
    /// A merchant's subscriptions, newest first, `limit + 1` at most.
    async fn list_subscriptions(
        &self,
        merchant_id: Uuid,
        after: Option<(Timestamp, Uuid)>,
        limit: usize,
    ) -> Result<Vec<SubscriptionRecord>, StoreError>;
    /// Replaces all three fields, and resumes a suspended subscription (as
    /// `resume_subscription_guarded` does); under a guard, keeps the answer in the same
    /// transaction.
    async fn patch_subscription_guarded(
        &self,
        change: SubscriptionChange,
        spec: SubscriptionSpec,
        guard: Option<Guard<ChangeSubscriptionOutcome>>,
    ) -> Result<Guarded<ChangeSubscriptionOutcome>, StoreError>;
    /// `patch_subscription_guarded` without an idempotency key.
    async fn patch_subscription(
        &self,
        merchant_id: Uuid,
        id: Uuid,
        spec: SubscriptionSpec,
        if_match: Option<String>,
        now: Timestamp,
    ) -> Result<ChangeSubscriptionOutcome, StoreError> {
        let change = SubscriptionChange { merchant_id, id, if_match, now };
        ran(self.patch_subscription_guarded(change, spec, None).await?)
    }
    /// Removes it and cancels its queued and held deliveries; under a guard, keeps the answer in the
    /// same transaction.
    async fn delete_subscription_guarded(
        &self,
        change: SubscriptionChange,
        guard: Option<Guard<ChangeSubscriptionOutcome>>,
    ) -> Result<Guarded<ChangeSubscriptionOutcome>, StoreError>;
    /// `delete_subscription_guarded` without an idempotency key.
    async fn delete_subscription(
        &self,
        merchant_id: Uuid,
        id: Uuid,
        if_match: Option<String>,
        now: Timestamp,
    ) -> Result<ChangeSubscriptionOutcome, StoreError> {
        let change = SubscriptionChange { merchant_id, id, if_match, now };
        ran(self.delete_subscription_guarded(change, None).await?)
    }

    /// Makes `rotation.secret` the signing secret; the one it replaces keeps signing for
    /// `rotation.grace` (not at all when zero, and a secret replaced earlier stops at once).
    /// Answers the record opened, with `previous_secret` set while it signs; under a guard,
    /// keeps the answer in the same transaction.
    async fn rotate_subscription_secret_guarded(
        &self,
        change: SubscriptionChange,
        rotation: SecretRotation,
        guard: Option<Guard<ChangeSubscriptionOutcome>>,
    ) -> Result<Guarded<ChangeSubscriptionOutcome>, StoreError>;
    /// Makes a suspended subscription active again and queues its held deliveries (an active
    /// one is answered as it is); under a guard, keeps the answer in the same transaction.
    async fn resume_subscription_guarded(
        &self,
        change: SubscriptionChange,
        guard: Option<Guard<ChangeSubscriptionOutcome>>,
    ) -> Result<Guarded<ChangeSubscriptionOutcome>, StoreError>;
    /// Queues again up to `window.limit` `Failed` deliveries of the subscription whose event
    /// lies in the window (held instead while it is suspended), with a fresh retry schedule;
    /// under a guard, keeps the answer in the same transaction.
    async fn recover_deliveries_guarded(
        &self,
        change: SubscriptionChange,
        window: RecoverWindow,
        guard: Option<Guard<RecoverOutcome>>,
    ) -> Result<Guarded<RecoverOutcome>, StoreError>;
    /// Records a test event, its delivery (`Delivered` or `Failed`, never retried) and its one
    /// attempt; under a guard, keeps the answer in the same transaction.
    async fn record_test_delivery_guarded(
        &self,
        test: TestDelivery,
        guard: Option<Guard<AttemptRecord>>,
    ) -> Result<Guarded<AttemptRecord>, StoreError>;

    /// Announces a dispatcher that is about to claim deliveries as `owner`, and frees the
    /// leases of dispatchers that are gone; answers how many deliveries it freed. SQLite (one
    /// process owns the file): every lease of another owner is void. PostgreSQL: `owner` holds
    /// a liveness lock until `dispatcher_stopped` or its process ends, and the leases of a
    /// dispatcher whose lock is free count as run out.
    async fn dispatcher_started(&self, owner: Uuid) -> Result<usize, StoreError>;
    /// The dispatcher `owner` has stopped claiming and recording.
    async fn dispatcher_stopped(&self, owner: Uuid);
    /// Leases up to `limit` due deliveries to `owner` until `lease_until`, leaving out
    /// subscriptions that would then hold more than `per_subscription` unexpired leases.
    async fn claim_deliveries(
        &self,
        owner: Uuid,
        now: Timestamp,
        lease_until: Timestamp,
        limit: usize,
        per_subscription: usize,
    ) -> Result<Vec<ClaimedDelivery>, StoreError>;
    /// Records attempts (in one transaction) and moves their deliveries on; keeps track of
    /// how long each receiver has failed and suspends subscriptions as `policy` says (their
    /// pending deliveries are then held). Answers the subscriptions it suspended.
    async fn record_attempts(
        &self,
        outcomes: Vec<AttemptOutcome>,
        now: Timestamp,
        policy: SuspendPolicy,
    ) -> Result<Vec<Suspension>, StoreError>;
    /// Gives up leases on deliveries that were claimed but not attempted.
    async fn release_claims(&self, owner: Uuid, ids: Vec<Uuid>) -> Result<(), StoreError>;
    /// A merchant's deliveries with their attempts, newest first, `limit + 1` at most.
    async fn list_deliveries(
        &self,
        merchant_id: Uuid,
        filter: DeliveryFilter,
    ) -> Result<Vec<DeliveryRecord>, StoreError>;
    /// Queues a failed or delivered delivery again; under a guard, keeps the answer in the
    /// same transaction.
    async fn redeliver_guarded(
        &self,
        merchant_id: Uuid,
        id: Uuid,
        now: Timestamp,
        guard: Option<Guard<RedeliverOutcome>>,
    ) -> Result<Guarded<RedeliverOutcome>, StoreError>;
    /// `redeliver_guarded` without an idempotency key.
    async fn redeliver(&self, merchant_id: Uuid, id: Uuid, now: Timestamp) -> Result<RedeliverOutcome, StoreError> {
        ran(self.redeliver_guarded(merchant_id, id, now, None).await?)
    }
    /// The pending deliveries and the oldest due one at `now` (one read over the due index).
    async fn delivery_backlog(&self, now: Timestamp) -> Result<webhooks::Backlog, StoreError>;
    /// Deletes up to `batch` rows of each kind past their retention; answers how many went.
    async fn purge(&self, now: Timestamp, retention: Retention, batch: usize) -> Result<usize, StoreError>;
    /// Notified after a commit that queued deliveries (wakes the dispatcher).
    fn deliveries_queued(&self) -> Arc<Notify>;

    /// The keys that seal the secrets this store keeps (also for stored idempotent answers
    /// that show one).
    fn secrets(&self) -> Arc<crate::secrets::KeyRing>;
}

/// The outcome of a write that ran without a guard (it cannot have lost to a kept record).
fn ran<O>(guarded: Guarded<O>) -> Result<O, StoreError> {
    match guarded {
        Guarded::Ran(outcome, _) => Ok(outcome),
        Guarded::Earlier(_) => Err(StoreError::Internal("a write without a key found a kept record".to_owned())),
    }
}

/// A shared handle to the backend in use.
pub type DynStore = Arc<dyn Store>;

/// Opens the backend the configured URL names, migrating it when `migrate` is set (which
/// also seals secrets still in clear and checks that the others open with the configured
/// keys: `crate::secrets::key_ring`).
pub async fn open(config: &crate::config::Config, migrate: bool) -> Result<DynStore, StoreError> {
    let secrets = Arc::new(crate::secrets::key_ring(config).map_err(StoreError::Internal)?);
    match &config.database_url {
        crate::config::DatabaseUrl::Sqlite { path } => {
            let store = sqlite::SqliteStore::open(path, migrate, secrets).await?;
            Ok(Arc::new(store))
        }
        crate::config::DatabaseUrl::Postgres(url) => {
            let store = postgres::PostgresStore::open(url, pool_settings(config), migrate, secrets).await?;
            Ok(Arc::new(store))
        }
    }
}

fn pool_settings(config: &crate::config::Config) -> postgres::PoolSettings {
    postgres::PoolSettings {
        max_connections: config.database_max_connections,
        acquire_timeout: config.database_acquire_timeout,
        connect_timeout: config.database_connect_timeout,
    }
}

/// `secrets rotate`: migrates the configured database, then seals every secret again with
/// `secrets_key` (opening those of earlier keys with `secrets_old_keys`); answers the id of
/// the key now in use and the counts.
pub async fn rotate_secrets(config: &crate::config::Config) -> Result<(String, crate::secrets::Resealed), StoreError> {
    let secrets = Arc::new(crate::secrets::key_ring(config).map_err(StoreError::Internal)?);
    let key_id = secrets.current_id().to_owned();
    let counts = match &config.database_url {
        crate::config::DatabaseUrl::Sqlite { path } => sqlite::rotate_secrets(path, secrets).await?,
        crate::config::DatabaseUrl::Postgres(url) => {
            postgres::PostgresStore::open(url, pool_settings(config), true, secrets).await?.rotate_secrets().await?
        }
    };
    Ok((key_id, counts))
}
