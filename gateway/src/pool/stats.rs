//! Live per-backend counters: atomics, updated by the proxy, read by plugins and views.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Counters of one backend, shared by all worker threads.
#[derive(Debug, Default)]
pub struct BackendStats {
    active: AtomicU32,
    ewma_latency_us: AtomicU32,
    /// When the last latency sample arrived, µs since [`epoch`].
    last_sample_us: AtomicU64,
    consecutive_failures: AtomicU32,
    requests: AtomicU64,
    failures: AtomicU64,
}

/// Decrements the backend's in-flight count when dropped (at the end of the response body).
#[derive(Debug)]
pub struct ActiveGuard(std::sync::Arc<super::BackendEntry>);

impl ActiveGuard {
    /// The backend this request went to.
    pub fn entry(&self) -> &std::sync::Arc<super::BackendEntry> {
        &self.0
    }
}

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
    ///
    /// The latency average gives a new sample a weight of at least 1/8, and more the
    /// longer the backend went unmeasured (`1 - e^(-idle/250ms)`): under load it
    /// smooths over many responses, and the first answers after a quiet spell (say, from
    /// a backend a balancer had been avoiding) count for nearly everything. A lost
    /// update under a race only delays convergence.
    pub fn success(&self, latency: Duration) {
        self.record(latency.as_micros().min(u32::MAX as u128) as f64, epoch().elapsed().as_micros() as u64);
        self.consecutive_failures.store(0, Relaxed);
    }

    fn record(&self, sample_us: f64, now_us: u64) {
        let idle = now_us.saturating_sub(self.last_sample_us.swap(now_us, Relaxed));
        let old = self.ewma_latency_us.load(Relaxed) as f64;
        let weight = (1.0 - (-(idle as f64) / 250_000.0).exp()).max(1.0 / 8.0);
        let new = if old == 0.0 { sample_us } else { old + (sample_us - old) * weight };
        self.ewma_latency_us.store(new.round().min(u32::MAX as f64) as u32, Relaxed);
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

    /// When the latency average last got a sample, in ms since the Unix epoch (0: never).
    /// No clock is read: the sample time is kept relative to a fixed epoch.
    pub fn measured_at_ms(&self) -> u64 {
        match self.last_sample_us.load(Relaxed) {
            0 => 0,
            us => epoch_pair().1 + us / 1_000,
        }
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

/// A fixed instant for the process, so timestamps fit in an atomic.
fn epoch() -> std::time::Instant {
    epoch_pair().0
}

/// The process's stats epoch, and the same moment in ms since the Unix epoch.
fn epoch_pair() -> (std::time::Instant, u64) {
    static EPOCH: std::sync::OnceLock<(std::time::Instant, u64)> = std::sync::OnceLock::new();
    *EPOCH.get_or_init(|| {
        let unix = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        (std::time::Instant::now(), unix.as_millis() as u64)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_average_smooths_under_load_and_refreshes_after_a_quiet_spell() {
        let s = BackendStats::default();
        s.record(5_000.0, 10_000_000);
        assert_eq!(s.ewma_latency_us(), 5_000, "the first sample is taken as it is");
        s.record(1_000.0, 10_000_100);
        assert_eq!(s.ewma_latency_us(), 4_500, "back to back: weight 1/8");
        s.record(1_000.0, 11_000_100);
        let fresh = s.ewma_latency_us();
        assert!(fresh < 1_100, "after 1 s unmeasured the new sample dominates, got {fresh}");
    }
}
