//! The backend pool: one immutable [`PoolSnapshot`] per upstream behind an `ArcSwap`.
//!
//! Readers (the proxy, the selector, admin views) take the snapshot once per request and
//! never lock. Writers (health checks, passive ejection, discovery, drain) are few: they
//! build a new snapshot from the current one under a mutex and publish it with a new
//! generation. Live counters are atomics in the [`BackendEntry`], shared by every
//! snapshot, so a request never copies them.

mod stats;

use arc_swap::{ArcSwap, Guard};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

pub use stats::{ActiveGuard, BackendStats};

/// A backend's identity and live counters; the same `Arc` across snapshots.
#[derive(Debug)]
pub struct BackendEntry {
    /// Stable id (default: the configured address).
    pub id: String,
    /// Resolved socket address.
    pub addr: SocketAddr,
    /// `addr` as an URI authority, for building upstream request URIs without formatting.
    pub authority: http::uri::Authority,
    /// Relative weight (≥ 1).
    pub weight: u32,
    /// Zone / region, may be empty.
    pub zone: String,
    /// Labels, sorted by key.
    pub labels: Vec<(String, String)>,
    /// Live counters.
    pub stats: BackendStats,
    /// Requests, bytes, latency and health-check results, for `/metrics` and the stats page.
    pub metrics: crate::metrics::BackendMetrics,
    /// Small unique number: the index of this backend in per-worker tables (idle
    /// connections), so the hot path needs no hashing.
    pub key: usize,
    /// Wakes the requests waiting for this backend's response headers when it goes down.
    pub down: DownSignal,
}

/// Tells requests waiting on a backend that it went down (an active check marked it
/// down, or passive health ejected it), so that those safe to retry go to another
/// backend at once instead of waiting out their timeout on a frozen one.
///
/// One `Notify` per worker thread: a request registers with its own worker's (whose lock
/// no other worker takes); the health task wakes them all. Nothing is allocated per
/// request.
#[derive(Debug, Default)]
pub struct DownSignal {
    notify: crate::metrics::PerWorker<tokio::sync::Notify>,
    /// Down or ejected now (drained backends finish their requests: not down).
    down: AtomicBool,
}

impl DownSignal {
    /// A future that completes when the backend goes down after this call. Create it
    /// before checking [`DownSignal::is_down`], so a change in between is not missed.
    #[inline]
    pub fn notified(&self) -> tokio::sync::futures::Notified<'_> {
        self.notify.local().notified()
    }

    /// Whether the backend is down or ejected now.
    #[inline]
    pub fn is_down(&self) -> bool {
        self.down.load(Ordering::Acquire)
    }

    fn set(&self, status: &Status) {
        let down = !status.up || status.ejected_until.is_some();
        if self.down.swap(down, Ordering::AcqRel) != down && down {
            for n in self.notify.iter() {
                n.notify_waiters();
            }
        }
    }
}

impl BackendEntry {
    /// A new entry with zeroed stats.
    pub fn new(id: String, addr: SocketAddr, weight: u32, zone: String, labels: Vec<(String, String)>) -> Self {
        let authority = addr.to_string().parse().expect("a socket address is a valid authority");
        static NEXT_KEY: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let key = NEXT_KEY.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let metrics = crate::metrics::BackendMetrics::default();
        metrics.state_changed();
        BackendEntry {
            id,
            addr,
            authority,
            weight: weight.max(1),
            zone,
            labels,
            stats: BackendStats::default(),
            metrics,
            key,
            down: DownSignal::default(),
        }
    }
}

/// Why a backend is or is not taking traffic, as of one snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Status {
    /// Active health checks say it is up (backends start up).
    pub up: bool,
    /// Passive health ejected it until this instant.
    pub ejected_until: Option<Instant>,
    /// An operator drained it.
    pub drained: bool,
}

impl Status {
    /// Up, not ejected, not drained.
    pub const UP: Status = Status { up: true, ejected_until: None, drained: false };

    /// Whether new requests may be sent to it.
    pub fn healthy(&self) -> bool {
        self.up && self.ejected_until.is_none() && !self.drained
    }
}

/// One backend as of one snapshot.
#[derive(Debug, Clone)]
pub struct Member {
    /// Identity and live counters.
    pub entry: Arc<BackendEntry>,
    /// Health as of this snapshot.
    pub status: Status,
}

/// The backends of one upstream at one moment. Never mutated once published.
#[derive(Debug)]
pub struct PoolSnapshot {
    /// Grows with every change; plugins use it to know their view is current.
    pub generation: u64,
    /// In a stable order; a plugin's decision is an index into this list.
    pub members: Vec<Member>,
    /// How many members are healthy.
    pub healthy_count: usize,
}

impl PoolSnapshot {
    fn new(generation: u64, members: Vec<Member>) -> Self {
        let healthy_count = members.iter().filter(|m| m.status.healthy()).count();
        PoolSnapshot { generation, members, healthy_count }
    }

    /// The member at `index`, if any.
    pub fn get(&self, index: usize) -> Option<&Member> {
        self.members.get(index)
    }

    /// Index of the member with this id.
    pub fn position(&self, id: &str) -> Option<usize> {
        self.members.iter().position(|m| m.entry.id == id)
    }
}

/// Generations are unique across all pools of the process, so a plugin instance can
/// never mistake one pool (or a rebuilt one) for another.
fn next_generation() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// The current snapshot of one upstream's pool, and the only way to change it.
#[derive(Debug)]
pub struct Pool {
    current: ArcSwap<PoolSnapshot>,
    write: Mutex<()>,
}

impl Pool {
    /// A pool of `entries`, all up.
    pub fn new(entries: Vec<Arc<BackendEntry>>) -> Self {
        Self::with_members(entries.into_iter().map(|entry| Member { entry, status: Status::UP }).collect())
    }

    /// A pool of these members with their statuses (a reload carries statuses over).
    pub fn with_members(members: Vec<Member>) -> Self {
        for m in &members {
            m.entry.down.set(&m.status);
        }
        Pool { current: ArcSwap::from_pointee(PoolSnapshot::new(next_generation(), members)), write: Mutex::new(()) }
    }

    /// The current snapshot (hot path: no lock, no allocation).
    pub fn load(&self) -> Guard<Arc<PoolSnapshot>> {
        self.current.load()
    }

    /// The current snapshot as an owned `Arc`.
    pub fn snapshot(&self) -> Arc<PoolSnapshot> {
        self.current.load_full()
    }

    /// Changes the status of the backend `id` with `f`; publishes a new generation if
    /// that changed anything. Returns the new status, or `None` if no such backend.
    pub fn update_status(&self, id: &str, f: impl FnOnce(&mut Status)) -> Option<Status> {
        let _writer = self.write.lock().unwrap_or_else(|e| e.into_inner());
        let cur = self.current.load_full();
        let index = cur.position(id)?;
        let mut status = cur.members[index].status;
        f(&mut status);
        if status != cur.members[index].status {
            let entry = &cur.members[index].entry;
            entry.metrics.state_changed();
            let mut members = cur.members.clone();
            members[index].status = status;
            self.current.store(Arc::new(PoolSnapshot::new(next_generation(), members)));
            // After the new snapshot is out: a woken request retries on the new pool.
            entry.down.set(&status);
        }
        Some(status)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(n: u16) -> Pool {
        Pool::new(
            (0..n)
                .map(|i| {
                    let addr = SocketAddr::from(([127, 0, 0, 1], 9000 + i));
                    Arc::new(BackendEntry::new(addr.to_string(), addr, 1, String::new(), vec![]))
                })
                .collect(),
        )
    }

    #[test]
    fn status_change_publishes_a_new_generation_only_when_something_changed() {
        let p = pool(3);
        let before = p.snapshot();
        assert_eq!(before.healthy_count, 3);
        p.update_status("127.0.0.1:9001", |s| s.up = true);
        assert_eq!(p.load().generation, before.generation, "no change, no new snapshot");
        p.update_status("127.0.0.1:9001", |s| s.up = false);
        let after = p.snapshot();
        assert!(after.generation > before.generation);
        assert_eq!(after.healthy_count, 2);
        assert!(!after.members[1].status.healthy());
        assert!(Arc::ptr_eq(&before.members[1].entry, &after.members[1].entry), "stats are shared");
        assert!(p.update_status("nope", |s| s.up = false).is_none());
    }

    #[test]
    fn requests_waiting_on_a_backend_are_woken_when_it_goes_down_not_when_drained() {
        use std::future::Future;
        use std::pin::pin;
        use std::task::{Context, Poll, Waker};
        let p = pool(2);
        let entry = p.snapshot().members[0].entry.clone();
        let mut cx = Context::from_waker(Waker::noop());
        let mut waiting = pin!(entry.down.notified());
        assert!(waiting.as_mut().poll(&mut cx).is_pending());
        assert!(!entry.down.is_down());
        p.update_status("127.0.0.1:9000", |s| s.drained = true);
        assert!(waiting.as_mut().poll(&mut cx).is_pending(), "a drained backend finishes its requests");
        // Created, not yet polled: still woken (as the proxy creates it before checking).
        let mut fresh = pin!(entry.down.notified());
        p.update_status("127.0.0.1:9000", |s| s.ejected_until = Some(Instant::now()));
        assert!(entry.down.is_down());
        assert_eq!(waiting.as_mut().poll(&mut cx), Poll::Ready(()));
        assert_eq!(fresh.as_mut().poll(&mut cx), Poll::Ready(()));
        // Down as well as ejected: not a new "went down", no wake-up.
        let mut later = pin!(entry.down.notified());
        p.update_status("127.0.0.1:9000", |s| s.up = false);
        assert!(later.as_mut().poll(&mut cx).is_pending());
        p.update_status("127.0.0.1:9000", |s| {
            s.up = true;
            s.ejected_until = None;
        });
        assert!(!entry.down.is_down());
    }
}
