//! The PostgreSQL side of webhooks: the outbox (events and their deliveries, queued in the
//! state change's transaction, with a `NOTIFY`), subscriptions, claiming with leases and
//! `SKIP LOCKED`, recording attempts, and retention.
//!
//! Lock order, so that writers on different instances never wait on each other in a cycle:
//! a subscription row before its deliveries, several subscriptions in id order, and several
//! deliveries in id order.
//!
//! A subscription's `state` is changed only under a `FOR UPDATE` lock on its row (suspending,
//! resuming, deleting), which conflicts with the `FOR KEY SHARE` that queuing an event takes:
//! so a delivery is queued either before the change (and the change holds or queues it with
//! the others) or after it (and sees the new state), never `Pending` for a suspended one nor
//! `Held` for an active one.

mod attempts;
mod claims;
mod deliveries;
mod outbox;
mod subscriptions;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, LazyLock};

use deadpool_postgres::{GenericClient, Transaction};
use tokio_postgres::Row;
use uuid::Uuid;

use crate::domain::event::{EventKind, EventType};
use crate::domain::subscription::{EventMask, SubscriptionSpec};
use crate::domain::time::Timestamp;
use crate::domain::webhooks::recovered_state;
use crate::domain::webhooks::{delivery_moves, Receiver};
use crate::secrets::KeyRing;
use crate::store::postgres::idempotency::finish;
use crate::store::postgres::{
    execute, int8, internal, listen, parse_event_kind, query, query_one, query_opt, ts, ts_opt, Client, Result, Sql, Ts,
};
use crate::store::rows::{FINISHED_DELIVERY, OPEN_DELIVERY};
use crate::store::sealing::{open_claimed, open_subscription, seal_api_key, seal_signing_secret};
use crate::store::webhooks::{
    decide_redelivery, AttemptOutcome, AttemptRecord, Backlog, ChangeSubscriptionOutcome, ClaimPicker, ClaimedDelivery,
    DeliveryFilter, DeliveryRecord, DeliveryState, PreviousSecret, PutSubscriptionOutcome, RecoverOutcome,
    RecoverWindow, RedeliverDecision, RedeliverOutcome, Retention, SecretRotation, SubscriptionChange,
    SubscriptionRecord, SubscriptionStatus, SuspendPolicy, SuspendReason, Suspension, TestDelivery, NO_SESSION,
};
use crate::store::{Guard, Guarded};

pub use self::attempts::*;
pub use self::claims::*;
pub use self::deliveries::*;
pub use self::outbox::*;
pub use self::subscriptions::*;
