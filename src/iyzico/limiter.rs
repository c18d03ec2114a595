//! The process-wide request budget (GCRA via `governor`), re-sized when the fleet changes.

use std::num::NonZeroU32;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use governor::{DefaultDirectRateLimiter, Quota};

use crate::shutdown::Liveness;

/// A rate limiter shared by every task, whose share of the fleet budget can change.
pub struct SharedLimiter {
    budget: RwLock<(NonZeroU32, NonZeroU32)>,
    current: RwLock<(u32, Arc<DefaultDirectRateLimiter>)>,
}

impl SharedLimiter {
    /// A limiter allowing `rate` requests per second with bursts of `burst`.
    pub fn new(rate: NonZeroU32, burst: NonZeroU32) -> Self {
        Self {
            budget: RwLock::new((rate, burst)),
            current: RwLock::new((1, Arc::new(Self::build(rate, burst)))),
        }
    }

    fn build(rate: NonZeroU32, burst: NonZeroU32) -> DefaultDirectRateLimiter {
        // Quota::per_second spaces cells 1/rate apart; the burst is the bucket's depth.
        DefaultDirectRateLimiter::direct(Quota::per_second(rate).allow_burst(burst))
    }

    /// Takes `1/replicas` of the fleet budget (at least one request per second and a burst of 1).
    pub fn set_replicas(&self, replicas: u32) {
        let replicas = replicas.max(1);
        if self.current.read().expect("limiter lock").0 == replicas {
            return;
        }
        self.rebuild(replicas);
    }

    /// Changes the fleet's budget (a config reload): this replica's share is rebuilt at once.
    pub fn set_budget(&self, rate: NonZeroU32, burst: NonZeroU32) {
        *self.budget.write().expect("limiter lock") = (rate, burst);
        let replicas = self.replicas();
        self.rebuild(replicas);
    }

    /// A fresh limiter for `replicas`' share, starting empty so that a re-share never lets a
    /// burst through twice; waiters on the old one wait again on it.
    fn rebuild(&self, replicas: u32) {
        let (rate, burst) = *self.budget.read().expect("limiter lock");
        let share = |v: NonZeroU32| NonZeroU32::new((v.get() / replicas).max(1)).expect("max(1)");
        let limiter = Self::build(share(rate), share(burst));
        let _ = limiter.check_n(share(burst));
        *self.current.write().expect("limiter lock") = (replicas, Arc::new(limiter));
    }

    /// How many replicas the budget is shared among now.
    pub fn replicas(&self) -> u32 {
        self.current.read().expect("limiter lock").0
    }

    /// Takes one request's turn if it is free right now, without waiting.
    pub fn try_acquire(&self) -> bool {
        self.current.read().expect("limiter lock").1.check().is_ok()
    }

    /// Waits for one request's turn; returns how long it waited. Cancel-safe: dropping the
    /// future gives nothing back but takes nothing either.
    pub async fn acquire(&self) -> Duration {
        let start = Instant::now();
        loop {
            let limiter = self.current.read().expect("limiter lock").1.clone();
            limiter.until_ready().await;
            // Re-shared while we waited: the old share no longer entitles us to send.
            if Arc::ptr_eq(&limiter, &self.current.read().expect("limiter lock").1) {
                return start.elapsed();
            }
        }
    }
}

/// What this replica knows of its fleet, as the client and the sweep read it: its share of the
/// rate budget (and so how many replicas share it) and whether its heartbeat is fresh. The
/// heartbeat (`fleet`) keeps both up to date. Cheap to clone.
#[derive(Clone)]
pub struct FleetState {
    limiter: Arc<SharedLimiter>,
    liveness: Liveness,
}

impl FleetState {
    /// The state read through `limiter` (the rate share) and `liveness` (self-fencing).
    pub fn new(limiter: Arc<SharedLimiter>, liveness: Liveness) -> Self {
        Self { limiter, liveness }
    }

    /// How many live replicas share the rate budget, as the last heartbeat counted them.
    pub fn replicas(&self) -> u32 {
        self.limiter.replicas()
    }

    /// This replica's share of the rate budget.
    pub fn limiter(&self) -> &Arc<SharedLimiter> {
        &self.limiter
    }

    /// Whether this replica may still call the API.
    pub fn liveness(&self) -> &Liveness {
        &self.liveness
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_burst_passes_at_once_and_then_the_rate_applies() {
        let l = SharedLimiter::new(NonZeroU32::new(1).unwrap(), NonZeroU32::new(5).unwrap());
        for i in 0..5 {
            assert!(l.try_acquire(), "request {i} of the burst");
        }
        assert!(!l.try_acquire(), "the sixth must wait for the rate");
    }

    #[tokio::test]
    async fn a_waiter_never_sends_on_a_share_that_was_taken_away() {
        let start = Instant::now();
        let l = Arc::new(SharedLimiter::new(
            NonZeroU32::new(1).unwrap(),
            NonZeroU32::new(1).unwrap(),
        ));
        assert!(l.try_acquire());
        let waiter = {
            let l = l.clone();
            tokio::spawn(async move { l.acquire().await })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        // Re-shared while the waiter waits on the old limiter (next turn at 1.0 s). The new one
        // starts empty; its first turn comes at 1.1 s and must go to the waiter, so none is left
        // at 1.25 s. Had the waiter sent on the old share, the new turn would still be free.
        l.set_replicas(2);
        waiter.await.unwrap();
        tokio::time::sleep(Duration::from_millis(1250).saturating_sub(start.elapsed())).await;
        assert!(!l.try_acquire(), "the waiter used the old share");
    }

    #[test]
    fn share_shrinks_with_replicas() {
        let l = SharedLimiter::new(NonZeroU32::new(10).unwrap(), NonZeroU32::new(10).unwrap());
        l.set_replicas(4);
        assert_eq!(l.replicas(), 4);
        // A new share starts with an empty bucket: no fresh burst at every fleet change.
        assert!(!l.try_acquire());
        l.set_replicas(0);
        assert_eq!(l.replicas(), 1);
    }
}
