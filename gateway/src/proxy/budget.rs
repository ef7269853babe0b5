//! The retry budget of an upstream: retries may add at most `ratio` times the recent
//! requests, plus `min_per_second` per second, over a sliding window of
//! [`RetryBudget::WINDOW_SECS`] one-second buckets (Linkerd's and Envoy's idea: a
//! failing backend must not turn into a retry storm on the others).
//!
//! The request path only counts: each worker thread writes its own buckets (a relaxed
//! add on a cache line no other worker writes). Only a retry that is about to happen
//! reads every worker's buckets, which is rare next to requests and bounded by the
//! budget itself. Two workers deciding at once may overshoot the budget by one retry
//! each.

use crate::config;
use crate::metrics::PerWorker;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering::Relaxed};
use std::time::Instant;

const WINDOW: usize = config::RetryBudget::WINDOW_SECS as usize;

/// One upstream's retry budget.
#[derive(Debug)]
pub struct RetryBudget {
    ratio: f64,
    /// Retries always allowed per window (`min_per_second` × the window).
    floor: f64,
    shards: PerWorker<Window>,
}

/// One worker's counts over the window.
#[derive(Debug, Default)]
struct Window {
    buckets: [Bucket; WINDOW],
}

/// One second's counts: requests (first attempts) and the retries granted.
#[derive(Debug, Default)]
struct Bucket {
    /// The second it counts ([`second`]); an older one is reset before use.
    second: AtomicU32,
    requests: AtomicU32,
    retries: AtomicU32,
}

/// The whole second `at` falls in, counted from a fixed instant of the process.
#[inline]
pub fn second(at: Instant) -> u32 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    let epoch = *EPOCH.get_or_init(Instant::now);
    // Seconds since the epoch plus one, so that no live bucket is ever second 0 (the
    // value of a bucket never used).
    at.saturating_duration_since(epoch).as_secs() as u32 + 1
}

impl Window {
    /// This second's bucket, reset if it last counted an older second. Only the owning
    /// worker writes it (the shared shard of non-worker threads may race; it is only
    /// approximate there).
    #[inline]
    fn bucket(&self, now: u32) -> &Bucket {
        let b = &self.buckets[now as usize % WINDOW];
        if b.second.load(Relaxed) != now {
            b.requests.store(0, Relaxed);
            b.retries.store(0, Relaxed);
            b.second.store(now, Relaxed);
        }
        b
    }
}

impl RetryBudget {
    /// The budget an upstream's config asks for.
    pub fn new(cfg: &config::RetryBudget) -> Self {
        RetryBudget {
            ratio: cfg.ratio,
            floor: f64::from(cfg.min_per_second) * WINDOW as f64,
            shards: PerWorker::default(),
        }
    }

    /// Counts a request (its first attempt) in second `now` (see [`second`]).
    #[inline]
    pub fn request(&self, now: u32) {
        self.shards.local().bucket(now).requests.fetch_add(1, Relaxed);
    }

    /// Whether one more retry fits the budget in second `now`; if so it is counted.
    pub fn try_retry(&self, now: u32) -> bool {
        let (requests, retries) = self.counts(now);
        if retries as f64 >= self.ratio * requests as f64 + self.floor {
            return false;
        }
        self.shards.local().bucket(now).retries.fetch_add(1, Relaxed);
        true
    }

    /// Requests and retries over the window ending with second `now`, every worker's.
    fn counts(&self, now: u32) -> (u64, u64) {
        let (mut requests, mut retries) = (0u64, 0u64);
        for window in self.shards.iter() {
            for b in &window.buckets {
                let s = b.second.load(Relaxed);
                if s <= now && now - s < WINDOW as u32 {
                    requests += u64::from(b.requests.load(Relaxed));
                    retries += u64::from(b.retries.load(Relaxed));
                }
            }
        }
        (requests, retries)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget(ratio: f64, min_per_second: u32) -> RetryBudget {
        RetryBudget::new(&config::RetryBudget { ratio, min_per_second })
    }

    /// Asks for a retry `n` times in second `now`; how many were granted.
    fn retries(b: &RetryBudget, now: u32, n: u32) -> u32 {
        (0..n).filter(|_| b.try_retry(now)).count() as u32
    }

    #[test]
    fn retries_are_bounded_by_the_ratio_of_requests_plus_the_floor() {
        let b = budget(0.2, 1);
        for _ in 0..1_000 {
            b.request(5);
        }
        // 0.2 × 1000 + 1/s × 10 s.
        assert_eq!(retries(&b, 5, 500), 210);
        // More requests make room again.
        for _ in 0..100 {
            b.request(6);
        }
        assert_eq!(retries(&b, 6, 500), 20);
    }

    #[test]
    fn the_floor_allows_retries_when_there_are_few_requests() {
        let b = budget(0.2, 10);
        assert_eq!(retries(&b, 1, 1_000), 100, "10/s over the 10 s window, without any request");
        let none = budget(0.0, 0);
        none.request(1);
        assert_eq!(retries(&none, 1, 10), 0);
    }

    #[test]
    fn old_seconds_leave_the_window() {
        let b = budget(0.5, 0);
        for _ in 0..100 {
            b.request(3);
        }
        assert_eq!(retries(&b, 3, 100), 50);
        assert_eq!(retries(&b, 12, 10), 0, "second 3 is still in the window at 12");
        // At second 13 the requests and retries of second 3 are forgotten.
        for _ in 0..10 {
            b.request(13);
        }
        assert_eq!(retries(&b, 13, 100), 5);
        // A bucket is reused (same slot, 10 s later): its old counts are gone.
        assert_eq!(b.counts(23), (0, 0));
    }

    #[test]
    fn every_worker_counts_in_its_own_shard_and_the_budget_sees_them_all() {
        let b = budget(1.0, 0);
        std::thread::scope(|s| {
            for i in 0..2 {
                let b = &b;
                s.spawn(move || {
                    crate::metrics::enter_worker(i);
                    for _ in 0..10 {
                        b.request(7);
                    }
                });
            }
        });
        assert_eq!(b.counts(7), (20, 0));
        assert_eq!(retries(&b, 7, 30), 20);
    }
}
