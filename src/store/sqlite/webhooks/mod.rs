//! The SQLite side of webhooks: subscriptions, queuing deliveries in the event's transaction,
//! claiming with leases, recording attempts, and retention. Each function runs inside a job
//! of the writer or a reader (see `worker.rs`).

mod attempts;
mod claims;
mod deliveries;
mod outbox;
mod subscriptions;

use rusqlite::{params, Connection, OptionalExtension, Row};
use uuid::Uuid;

use crate::domain::event::{EventKind, EventType};
use crate::domain::subscription::{EventMask, SubscriptionSpec};
use crate::domain::time::Timestamp;
use crate::domain::webhooks::recovered_state;
use crate::domain::webhooks::{delivery_moves, Receiver};
use crate::secrets::KeyRing;
use crate::store::rows::{FINISHED_DELIVERY, OPEN_DELIVERY};
use crate::store::sealing::{open_claimed, open_subscription, seal_api_key, seal_signing_secret};
use crate::store::sqlite::uuid_at;
use crate::store::sqlite::worker::internal;
use crate::store::webhooks::{
    decide_redelivery, AttemptOutcome, AttemptRecord, Backlog, ChangeSubscriptionOutcome, ClaimedDelivery,
    DeliveryFilter, DeliveryRecord, DeliveryState, PreviousSecret, PutSubscriptionOutcome, RecoverOutcome,
    RecoverWindow, RedeliverDecision, RedeliverOutcome, Retention, SecretRotation, SubscriptionChange,
    SubscriptionRecord, SubscriptionStatus, SuspendPolicy, SuspendReason, Suspension, TestDelivery, NO_SESSION,
};
use crate::store::StoreError;

type Result<T> = std::result::Result<T, StoreError>;

pub use self::attempts::*;
pub use self::claims::*;
pub use self::deliveries::*;
pub use self::outbox::*;
pub use self::subscriptions::*;
