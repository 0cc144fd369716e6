//! The requests with an `x-request-id` running in this process: a duplicate waits for the first
//! and then replays its answer (docs/DESIGN.md "Idempotency").

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use crate::store::IdempotencyKey;

/// The requests with a key running in this process, each with a channel that closes when it
/// is over.
#[derive(Default)]
pub struct InFlight(Arc<Mutex<HashMap<IdempotencyKey, watch::Sender<()>>>>);

/// A request's hold on its key; dropping it (however the request ends) lets duplicates on.
pub struct Claim {
    table: Arc<Mutex<HashMap<IdempotencyKey, watch::Sender<()>>>>,
    key: IdempotencyKey,
}

impl InFlight {
    /// Holds `key` for this request, or answers a channel that closes when its holder is done.
    pub fn claim(&self, key: IdempotencyKey) -> Result<Claim, watch::Receiver<()>> {
        let mut table = self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(running) = table.get(&key) {
            return Err(running.subscribe());
        }
        table.insert(key, watch::channel(()).0);
        Ok(Claim { table: self.0.clone(), key })
    }

    /// How many duplicates wait for the request that holds `key` (for operators and tests).
    pub fn waiting(&self, key: IdempotencyKey) -> usize {
        let table = self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        table.get(&key).map_or(0, watch::Sender::receiver_count)
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        // Dropping the sender closes every waiter's channel.
        self.table.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).remove(&self.key);
    }
}
