//! Live per-backend counters: atomics, updated by the proxy, read by plugins and views.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Counters of one backend, shared by all worker threads.
#[derive(Debug, Default)]
pub struct BackendStats {
    active: AtomicU32,
    ewma_latency_us: AtomicU32,
    consecutive_failures: AtomicU32,
    requests: AtomicU64,
    failures: AtomicU64,
}

/// Decrements the backend's in-flight count when dropped (at the end of the response body).
#[derive(Debug)]
pub struct ActiveGuard(std::sync::Arc<super::BackendEntry>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.stats.active.fetch_sub(1, Relaxed);
    }
}

impl BackendStats {
    /// Counts a request starting; the in-flight count drops when the guard does.
    pub fn start(entry: &std::sync::Arc<super::BackendEntry>) -> ActiveGuard {
        entry.stats.active.fetch_add(1, Relaxed);
        entry.stats.requests.fetch_add(1, Relaxed);
        ActiveGuard(entry.clone())
    }

    /// Records a successful response after `latency`; resets the failure streak.
    pub fn success(&self, latency: Duration) {
        let sample = latency.as_micros().min(u32::MAX as u128) as u32;
        // EWMA with alpha = 1/8; a lost update under a race only delays convergence.
        let old = self.ewma_latency_us.load(Relaxed);
        let new = if old == 0 { sample } else { (old as i64 + (sample as i64 - old as i64) / 8) as u32 };
        self.ewma_latency_us.store(new, Relaxed);
        self.consecutive_failures.store(0, Relaxed);
    }

    /// Records a failure; returns the length of the failure streak.
    pub fn failure(&self) -> u32 {
        self.failures.fetch_add(1, Relaxed);
        self.consecutive_failures.fetch_add(1, Relaxed) + 1
    }

    /// Clears the failure streak (after an ejection ends).
    pub fn reset_failures(&self) {
        self.consecutive_failures.store(0, Relaxed);
    }

    /// Requests in flight now.
    pub fn active(&self) -> u32 {
        self.active.load(Relaxed)
    }

    /// EWMA latency to response headers, µs.
    pub fn ewma_latency_us(&self) -> u32 {
        self.ewma_latency_us.load(Relaxed)
    }

    /// Current failure streak.
    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive_failures.load(Relaxed)
    }

    /// Requests sent since start.
    pub fn requests(&self) -> u64 {
        self.requests.load(Relaxed)
    }

    /// Failed requests since start.
    pub fn failures(&self) -> u64 {
        self.failures.load(Relaxed)
    }
}
