//! The rate limits per API key and per client address (`rate_limit_per_key`,
//! `rate_limit_per_ip`; docs/API.md): one keyed GCRA limiter from `governor` each, at the
//! configured rate per second with a burst of twice that. The HTTP side (`429` with
//! `Retry-After`) is `api::ratelimit`. They are per instance: with N instances behind a load
//! balancer a client may get up to N times the rate.

use std::hash::Hash;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use governor::clock::{Clock, DefaultClock};
use governor::state::keyed::DefaultKeyedStateStore;
use governor::{Quota, RateLimiter};
use uuid::Uuid;

/// How often the limiters forget the keys whose allowance is full again, so the memory they
/// hold stays bounded by the keys seen in the last few seconds.
const PRUNE_EVERY: Duration = Duration::from_secs(1);

/// Both limits. A rate of 0 turns a limit off.
pub struct Limits {
    per_key: Option<Keyed<Uuid>>,
    per_address: Option<Keyed<IpAddr>>,
}

impl Limits {
    /// Limits of `per_key` and `per_address` requests per second, each with a burst of twice
    /// that.
    pub fn new(per_key: u32, per_address: u32) -> Self {
        Limits { per_key: Keyed::new(per_key), per_address: Keyed::new(per_address) }
    }

    /// `Err(seconds to wait)` when the merchant is over its limit.
    pub fn check_key(&self, merchant: Uuid) -> Result<(), u64> {
        self.per_key.as_ref().map_or(Ok(()), |limiter| limiter.check(&merchant))
    }

    /// `Err(seconds to wait)` when the address is over its limit.
    pub fn check_address(&self, address: IpAddr) -> Result<(), u64> {
        self.per_address.as_ref().map_or(Ok(()), |limiter| limiter.check(&address))
    }
}

/// One limiter with a state per key, pruned every `PRUNE_EVERY` by whichever check comes first.
struct Keyed<K: Hash + Eq + Clone> {
    limiter: RateLimiter<K, DefaultKeyedStateStore<K>, DefaultClock>,
    started: Instant,
    /// When the next prune is due, in milliseconds since `started`.
    prune_at_millis: AtomicU64,
}

impl<K: Hash + Eq + Clone> Keyed<K> {
    fn new(rate: u32) -> Option<Self> {
        let per_second = NonZeroU32::new(rate)?;
        let burst = NonZeroU32::new(rate.saturating_mul(2)).unwrap_or(per_second);
        Some(Keyed {
            limiter: RateLimiter::keyed(Quota::per_second(per_second).allow_burst(burst)),
            started: Instant::now(),
            prune_at_millis: AtomicU64::new(PRUNE_EVERY.as_millis() as u64),
        })
    }

    fn check(&self, key: &K) -> Result<(), u64> {
        self.prune_when_due();
        self.limiter.check_key(key).map_err(|not_until| {
            let wait = not_until.wait_time_from(self.limiter.clock().now());
            (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1)
        })
    }

    /// Drops the keys whose state is as good as new; one check claims each prune.
    fn prune_when_due(&self) {
        let now = self.started.elapsed().as_millis() as u64;
        let due = self.prune_at_millis.load(Ordering::Relaxed);
        if now >= due {
            let next = now + PRUNE_EVERY.as_millis() as u64;
            if self.prune_at_millis.compare_exchange(due, next, Ordering::Relaxed, Ordering::Relaxed).is_ok() {
                self.limiter.retain_recent();
                self.limiter.shrink_to_fit();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_of_twice_the_rate_passes_and_the_next_request_waits() {
        let limits = Limits::new(5, 0);
        let merchant = Uuid::nil();
        for _ in 0..10 {
            assert_eq!(limits.check_key(merchant), Ok(()));
        }
        assert_eq!(limits.check_key(merchant), Err(1));
        assert_eq!(limits.check_key(Uuid::max()), Ok(()), "other keys have their own bucket");
    }

    #[test]
    fn a_rate_of_zero_turns_the_limit_off() {
        let limits = Limits::new(0, 0);
        for _ in 0..10_000 {
            assert_eq!(limits.check_key(Uuid::nil()), Ok(()));
            assert_eq!(limits.check_address(IpAddr::from([127, 0, 0, 1])), Ok(()));
        }
    }

    #[test]
    fn the_wait_is_in_whole_seconds_and_at_least_one() {
        // One request every 2 s would need a rate below 1; at 1/s with a burst of 2 the third
        // request waits about a second.
        let limits = Limits::new(0, 1);
        let address = IpAddr::from([192, 0, 2, 1]);
        assert_eq!(limits.check_address(address), Ok(()));
        assert_eq!(limits.check_address(address), Ok(()));
        assert_eq!(limits.check_address(address), Err(1));
    }

    #[test]
    fn keys_whose_allowance_is_full_again_are_forgotten() {
        let limiter = Keyed::<u32>::new(1_000).unwrap();
        for key in 0..1_000 {
            assert_eq!(limiter.check(&key), Ok(()));
        }
        assert_eq!(limiter.limiter.len(), 1_000);
        // A burst of 2,000 at 1,000/s is full again 2 ms after the last request.
        let deadline = Instant::now() + Duration::from_secs(30);
        while limiter.limiter.len() > 1 {
            assert!(Instant::now() < deadline, "{} keys are still held", limiter.limiter.len());
            std::thread::sleep(Duration::from_millis(50));
            limiter.prune_at_millis.store(0, Ordering::Relaxed);
            let _ = limiter.check(&u32::MAX);
        }
    }
}
