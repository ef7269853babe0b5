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

/// Where a backend came from: the config file, or a discovery source (see `discovery/`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Source {
    /// `backends` in the config (or `-b` on the command line).
    Static,
    /// Registered through the embedded registry API.
    Registry,
    /// Resolved from DNS (A/AAAA or SRV records).
    Dns,
    /// Read and watched from etcd.
    Etcd,
}

impl Source {
    /// The name shown in the admin API and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Static => "static",
            Source::Registry => "registry",
            Source::Dns => "dns",
            Source::Etcd => "etcd",
        }
    }
}

/// A backend's identity and live counters; the same `Arc` across snapshots.
#[derive(Debug)]
pub struct BackendEntry {
    /// Stable id (default: the configured address).
    pub id: String,
    /// Resolved socket address.
    pub addr: SocketAddr,
    /// `addr` as an URI authority, for building upstream request URIs without formatting.
    pub authority: http::uri::Authority,
    /// Zone / region, may be empty.
    pub zone: String,
    /// Labels, sorted by key.
    pub labels: Vec<(String, String)>,
    /// Where it came from.
    pub source: Source,
    /// Live counters.
    pub stats: BackendStats,
    /// Requests, bytes, latency and health-check results, for `/metrics` and the stats page.
    pub metrics: crate::metrics::BackendMetrics,
    /// Small unique number among the live entries: the index of this backend in
    /// per-worker tables (idle connections), so the hot path needs no hashing. Reused
    /// once the entry is gone, so tables stay as small as the pools under churn.
    pub key: usize,
    /// Never reused: tells a table slot whose `key` was recycled that it now belongs to
    /// another backend.
    pub serial: u64,
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
    pub fn new(id: String, addr: SocketAddr, zone: String, labels: Vec<(String, String)>, source: Source) -> Self {
        let authority = addr.to_string().parse().expect("a socket address is a valid authority");
        static NEXT_SERIAL: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let serial = NEXT_SERIAL.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let metrics = crate::metrics::BackendMetrics::default();
        metrics.state_changed();
        BackendEntry {
            id,
            addr,
            authority,
            zone,
            labels,
            source,
            stats: BackendStats::default(),
            metrics,
            key: keys::take(),
            serial,
            down: DownSignal::default(),
        }
    }
}

impl Drop for BackendEntry {
    fn drop(&mut self) {
        keys::give_back(self.key);
    }
}

/// The small numbers behind [`BackendEntry::key`]: the lowest free one is handed out.
/// Taken and returned only when a backend joins or its last reference goes, never
/// per request.
mod keys {
    use std::collections::BTreeSet;
    use std::sync::Mutex;

    pub(super) struct Keys {
        next: usize,
        free: BTreeSet<usize>,
    }

    impl Keys {
        pub(super) const fn new() -> Self {
            Keys { next: 0, free: BTreeSet::new() }
        }

        pub(super) fn take(&mut self) -> usize {
            self.free.pop_first().unwrap_or_else(|| {
                self.next += 1;
                self.next - 1
            })
        }

        pub(super) fn give_back(&mut self, key: usize) {
            self.free.insert(key);
        }
    }

    static KEYS: Mutex<Keys> = Mutex::new(Keys::new());

    pub(super) fn take() -> usize {
        KEYS.lock().unwrap_or_else(|e| e.into_inner()).take()
    }

    pub(super) fn give_back(key: usize) {
        KEYS.lock().unwrap_or_else(|e| e.into_inner()).give_back(key);
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
    /// Discovered and waiting for its first passing health check (`up` is false until
    /// then).
    pub pending: bool,
}

impl Status {
    /// Up, not ejected, not drained.
    pub const UP: Status = Status { up: true, ejected_until: None, drained: false, pending: false };

    /// Just discovered, not yet checked: takes no traffic until a health check passes.
    pub const PENDING: Status = Status { up: false, ejected_until: None, drained: false, pending: true };

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
    /// Relative weight (≥ 1) as of this snapshot: a discovery source (an SRV record, a
    /// re-registration) may change it without replacing the entry.
    pub weight: u32,
}

impl Member {
    /// A member with weight `weight` (at least 1).
    pub fn new(entry: Arc<BackendEntry>, status: Status, weight: u32) -> Self {
        Member { entry, status, weight: weight.max(1) }
    }
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
    /// Bumped when backends join or leave (not on status changes), so the health checker
    /// starts and stops its per-backend checks.
    membership: tokio::sync::watch::Sender<u64>,
}

impl Pool {
    /// A pool of `entries`, all up, weight 1.
    pub fn new(entries: Vec<Arc<BackendEntry>>) -> Self {
        Self::with_members(entries.into_iter().map(|entry| Member::new(entry, Status::UP, 1)).collect())
    }

    /// A pool of these members with their statuses (a reload carries statuses over).
    pub fn with_members(members: Vec<Member>) -> Self {
        for m in &members {
            m.entry.down.set(&m.status);
        }
        Pool {
            current: ArcSwap::from_pointee(PoolSnapshot::new(next_generation(), members)),
            write: Mutex::new(()),
            membership: tokio::sync::watch::Sender::new(0),
        }
    }

    /// Wakes when backends join or leave the pool.
    pub fn watch_membership(&self) -> tokio::sync::watch::Receiver<u64> {
        self.membership.subscribe()
    }

    /// Replaces the members with what `f` makes of the current ones (`None`: no change)
    /// and publishes that as a new generation. The writer of discovery sources: `f` runs
    /// under the pool's write lock, so no status change made meanwhile is lost.
    pub fn replace(&self, f: impl FnOnce(&PoolSnapshot) -> Option<Vec<Member>>) -> Option<Arc<PoolSnapshot>> {
        let _writer = self.write.lock().unwrap_or_else(|e| e.into_inner());
        let cur = self.current.load_full();
        let members = f(&cur)?;
        let joined_or_left = members.len() != cur.members.len()
            || members.iter().zip(&cur.members).any(|(a, b)| !Arc::ptr_eq(&a.entry, &b.entry));
        for m in &members {
            m.entry.down.set(&m.status);
        }
        let next = Arc::new(PoolSnapshot::new(next_generation(), members));
        self.current.store(next.clone());
        if joined_or_left {
            self.membership.send_modify(|n| *n += 1);
        }
        Some(next)
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
        self.update_status_where(|e| e.id == id, f)
    }

    /// Like [`Pool::update_status`], for this very entry (not another backend that has
    /// since taken its id).
    pub fn update_entry_status(&self, entry: &Arc<BackendEntry>, f: impl FnOnce(&mut Status)) -> Option<Status> {
        self.update_status_where(|e| std::ptr::eq(e, &**entry), f)
    }

    fn update_status_where(
        &self,
        which: impl Fn(&BackendEntry) -> bool,
        f: impl FnOnce(&mut Status),
    ) -> Option<Status> {
        let _writer = self.write.lock().unwrap_or_else(|e| e.into_inner());
        let cur = self.current.load_full();
        let index = cur.members.iter().position(|m| which(&m.entry))?;
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
                    Arc::new(BackendEntry::new(addr.to_string(), addr, String::new(), vec![], Source::Static))
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

    #[test]
    fn keys_of_gone_entries_are_reused_lowest_first_and_serials_are_not() {
        let mut k = keys::Keys::new();
        let taken: Vec<usize> = (0..4).map(|_| k.take()).collect();
        assert_eq!(taken, [0, 1, 2, 3]);
        k.give_back(2);
        k.give_back(1);
        assert_eq!((k.take(), k.take(), k.take()), (1, 2, 4), "churn never grows the table past the live count");
        let addr = SocketAddr::from(([127, 0, 0, 1], 1));
        let a = BackendEntry::new("a".into(), addr, String::new(), vec![], Source::Registry);
        let b = BackendEntry::new("a".into(), addr, String::new(), vec![], Source::Registry);
        assert!(b.serial > a.serial);
    }

    #[test]
    fn replacing_members_wakes_the_membership_watch_only_when_entries_change() {
        let p = pool(2);
        let mut watch = p.watch_membership();
        let before = *watch.borrow_and_update();
        // Same entries, another weight: a new generation, no membership change.
        let snap = p.replace(|cur| Some(cur.members.iter().map(|m| Member { weight: 5, ..m.clone() }).collect()));
        assert_eq!(snap.unwrap().members[0].weight, 5);
        assert!(!watch.has_changed().unwrap());
        p.replace(|cur| Some(cur.members[..1].to_vec()));
        assert!(watch.has_changed().unwrap());
        assert!(*watch.borrow_and_update() > before);
        assert!(p.replace(|_| None).is_none());
        assert_eq!(p.load().members.len(), 1);
    }
}
