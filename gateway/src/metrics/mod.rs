//! Metrics: counters and histograms the request path updates without taking a lock or
//! sharing a cache line between worker threads, merged and encoded only when scraped.
//!
//! Every metric the hot path touches is **sharded per worker thread** ([`PerWorker`]):
//! worker `i` writes only shard `i` (an uncontended relaxed atomic add on a cache line
//! no other thread writes), and a scrape sums the shards. Handles are resolved when a
//! backend, upstream or route is built (per-backend metrics live in the backend's entry,
//! which survives pool changes and config reloads), so a request never looks a label up
//! or formats one. The text exposition is written by the `prometheus-client` crate
//! ([`export`]).

pub mod export;
mod handles;

use std::cell::Cell;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

pub use export::encode;

pub use handles::{
    BackendMetrics, BackendShard, Closed, DECISION_SAMPLE, Generated, GlobalShard, HealthMetrics, LastCheck,
    RetryReason, RouteMetrics, RouteShard, UpstreamMetrics, UpstreamShard, control, global, now_ms,
};

/// Upper bounds of latency histogram buckets, in seconds (+Inf is implicit).
pub const BOUNDS_S: [f64; 14] = Latency::BOUNDS_S;

/// The bucket bounds of a kind of histogram.
pub trait Scale: Default + std::fmt::Debug + Send + Sync + 'static {
    /// Upper bounds, ns (+Inf is implicit).
    const BOUNDS_NS: [u64; 14];
    /// The same, seconds.
    const BOUNDS_S: [f64; 14];
}

/// Requests and health checks: 0.5 ms to 10 s.
#[derive(Debug, Default)]
pub struct Latency;

impl Scale for Latency {
    const BOUNDS_NS: [u64; 14] = [
        500_000,
        1_000_000,
        2_500_000,
        5_000_000,
        10_000_000,
        25_000_000,
        50_000_000,
        100_000_000,
        250_000_000,
        500_000_000,
        1_000_000_000,
        2_500_000_000,
        5_000_000_000,
        10_000_000_000,
    ];
    const BOUNDS_S: [f64; 14] = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];
}

/// Plugin decisions: 250 ns to 20 ms (the default deadline).
#[derive(Debug, Default)]
pub struct Decision;

impl Scale for Decision {
    const BOUNDS_NS: [u64; 14] = [
        250,
        500,
        1_000,
        2_000,
        5_000,
        10_000,
        25_000,
        50_000,
        100_000,
        250_000,
        1_000_000,
        5_000_000,
        20_000_000,
        100_000_000,
    ];
    const BOUNDS_S: [f64; 14] =
        [250e-9, 500e-9, 1e-6, 2e-6, 5e-6, 10e-6, 25e-6, 50e-6, 100e-6, 250e-6, 1e-3, 5e-3, 20e-3, 100e-3];
}

static WORKERS: OnceLock<usize> = OnceLock::new();
static ENABLED: AtomicBool = AtomicBool::new(true);

/// Turns recording on the request path on or off (`metrics.enabled` in the config).
pub fn set_enabled(on: bool) {
    ENABLED.store(on, Relaxed);
}

/// Whether the request path records metrics.
#[inline]
pub fn enabled() -> bool {
    ENABLED.load(Relaxed)
}

thread_local! {
    static SHARD: Cell<usize> = const { Cell::new(usize::MAX) };
}

/// Sets how many worker threads record metrics. Call once, before building the
/// gateway; shards created before (or without) it assume one worker.
pub fn set_workers(n: usize) {
    let _ = WORKERS.set(n.max(1));
}

/// Marks the current thread as worker `i`: its metrics go to shard `i`.
pub fn enter_worker(i: usize) {
    SHARD.with(|s| s.set(i));
}

fn shard_count() -> usize {
    // One shard per worker, and one shared by every other thread (health checks,
    // the admin API, tests).
    *WORKERS.get().unwrap_or(&1) + 1
}

/// The current thread's shard index in a [`PerWorker`] of `len` shards.
#[inline]
fn shard_index(len: usize) -> usize {
    let i = SHARD.with(Cell::get);
    if i < len - 1 { i } else { len - 1 }
}

/// One `T` per worker thread (plus one for other threads), each on its own cache lines.
#[derive(Debug)]
pub struct PerWorker<T> {
    shards: Box<[Padded<T>]>,
}

#[derive(Debug, Default)]
#[repr(align(128))]
struct Padded<T>(T);

impl<T: Default> Default for PerWorker<T> {
    fn default() -> Self {
        PerWorker { shards: (0..shard_count()).map(|_| Padded(T::default())).collect() }
    }
}

impl<T> PerWorker<T> {
    /// The current thread's shard.
    #[inline]
    pub fn local(&self) -> &T {
        &self.shards[shard_index(self.shards.len())].0
    }

    /// Every shard, for merging at scrape time.
    pub fn iter(&self) -> impl Iterator<Item = &T> {
        self.shards.iter().map(|p| &p.0)
    }

    /// The sum of `f` over every shard.
    pub fn sum(&self, f: impl Fn(&T) -> u64) -> u64 {
        self.iter().map(f).sum()
    }
}

/// A monotonic count. Writers are the shard's own thread (or, for the shared shard, a
/// few control threads), so a relaxed add never waits on another core's cache line.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Adds `n`.
    #[inline]
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Relaxed);
    }

    /// Adds one.
    #[inline]
    pub fn inc(&self) {
        self.add(1);
    }

    /// The current value.
    pub fn get(&self) -> u64 {
        self.0.load(Relaxed)
    }
}

/// A histogram with the fixed bounds of its [`Scale`] (non-cumulative counts).
#[derive(Debug, Default)]
pub struct Histogram<S: Scale = Latency> {
    buckets: [AtomicU64; 15],
    sum_ns: AtomicU64,
    scale: std::marker::PhantomData<S>,
}

impl<S: Scale> Histogram<S> {
    /// Records one observation.
    #[inline]
    pub fn observe(&self, d: Duration) {
        let ns = d.as_nanos().min(u64::MAX as u128) as u64;
        let i = S::BOUNDS_NS.iter().position(|&b| ns <= b).unwrap_or(S::BOUNDS_NS.len());
        self.buckets[i].fetch_add(1, Relaxed);
        self.sum_ns.fetch_add(ns, Relaxed);
    }

    /// Adds this histogram's counts into `into`.
    pub fn merge_into(&self, into: &mut HistogramSnapshot) {
        into.bounds_s = &S::BOUNDS_S;
        for (acc, b) in into.counts.iter_mut().zip(&self.buckets) {
            *acc += b.load(Relaxed);
        }
        into.sum_ns += self.sum_ns.load(Relaxed);
    }

    /// This histogram alone, now.
    pub fn snapshot(&self) -> HistogramSnapshot {
        let mut s = HistogramSnapshot::default();
        self.merge_into(&mut s);
        s
    }
}

/// A histogram merged over shards, at one moment.
#[derive(Debug, Clone)]
pub struct HistogramSnapshot {
    /// Upper bounds of the buckets, seconds (+Inf implicit).
    pub bounds_s: &'static [f64; 14],
    /// Non-cumulative count per bucket; the last is +Inf.
    pub counts: [u64; 15],
    /// Sum of all observations, ns.
    pub sum_ns: u64,
}

impl Default for HistogramSnapshot {
    fn default() -> Self {
        HistogramSnapshot { bounds_s: &Latency::BOUNDS_S, counts: [0; 15], sum_ns: 0 }
    }
}

impl HistogramSnapshot {
    /// Merged over every shard of `h`, reading each shard's histogram with `f`.
    pub fn of<T, S: Scale>(h: &PerWorker<T>, f: impl Fn(&T) -> &Histogram<S>) -> Self {
        let mut s = HistogramSnapshot { bounds_s: &S::BOUNDS_S, ..Default::default() };
        for shard in h.iter() {
            f(shard).merge_into(&mut s);
        }
        s
    }

    /// Total observations.
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// Sum of observations, seconds.
    pub fn sum_s(&self) -> f64 {
        self.sum_ns as f64 / 1e9
    }

    /// Cumulative counts: ≤ each bound, then the total.
    pub fn cumulative(&self) -> Vec<u64> {
        self.counts
            .iter()
            .scan(0u64, |acc, c| {
                *acc += c;
                Some(*acc)
            })
            .collect()
    }
}

/// Status class of a response: 0 for 1xx … 4 for 5xx.
#[inline]
pub fn class(status: u16) -> usize {
    ((status / 100).clamp(1, 5) - 1) as usize
}

/// Label values of [`class`].
pub const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_and_cumulative_counts() {
        let h: Histogram = Histogram::default();
        h.observe(Duration::from_micros(300));
        h.observe(Duration::from_micros(500));
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_secs(60));
        let mut s = HistogramSnapshot::default();
        h.merge_into(&mut s);
        assert_eq!(s.counts[0], 2, "≤ 0.5 ms (bounds are inclusive)");
        assert_eq!(s.counts[3], 1, "≤ 5 ms");
        assert_eq!(s.counts[14], 1, "+Inf");
        let cum = s.cumulative();
        assert_eq!(cum.len(), s.bounds_s.len() + 1);
        assert_eq!(*cum.last().unwrap(), 4);
        assert_eq!(s.sum_ns, (300 + 500 + 3_000 + 60_000_000) * 1_000);
        let d: Histogram<Decision> = Histogram::default();
        d.observe(Duration::from_nanos(400));
        d.observe(Duration::from_micros(3));
        let s = d.snapshot();
        assert_eq!((s.counts[1], s.counts[4]), (1, 1), "≤ 500 ns, ≤ 5 µs");
        assert_eq!(s.bounds_s[0], 250e-9);
    }

    #[test]
    fn shards_are_per_thread_and_summed() {
        let p: PerWorker<Counter> = PerWorker::default();
        p.local().inc();
        std::thread::scope(|s| {
            s.spawn(|| {
                enter_worker(0);
                p.local().add(5);
            });
        });
        assert_eq!(p.sum(Counter::get), 6);
        assert_eq!(class(204), 1);
        assert_eq!(class(503), 4);
        assert_eq!(class(99), 0);
    }
}
