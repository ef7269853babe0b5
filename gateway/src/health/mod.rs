//! Health: active checks (HTTP or TCP, with rise/fall) and passive ejection after
//! consecutive failed requests. The only writer of backend status besides the admin
//! drain; every change publishes a new pool snapshot.
//!
//! The proxy reports failures through a [`Reporter`] (a channel), so this module never
//! calls into the proxy.

mod check;

use crate::pool::{BackendEntry, Status};
use crate::upstream::Upstream;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub use check::{Failed, probe};

/// Sends passive-health events from the proxy to the health task.
#[derive(Debug, Clone)]
pub struct Reporter {
    tx: mpsc::UnboundedSender<Eject>,
}

#[derive(Debug)]
struct Eject {
    upstream: String,
    backend: String,
    reason: String,
}

impl Reporter {
    /// A reporter and the receiving end for [`run`].
    pub fn new() -> (Reporter, Receiver) {
        let (tx, rx) = mpsc::unbounded_channel();
        (Reporter { tx }, Receiver { rx })
    }

    /// The backend reached its consecutive-failure threshold.
    pub fn eject(&self, upstream: &str, backend: &str, reason: &str) {
        let _ = self.tx.send(Eject { upstream: upstream.into(), backend: backend.into(), reason: reason.into() });
    }
}

/// The receiving end of a [`Reporter`].
#[derive(Debug)]
pub struct Receiver {
    rx: mpsc::UnboundedReceiver<Eject>,
}

/// The active health checks of one view's upstreams; a reload replaces them.
#[derive(Debug)]
pub struct Checks {
    stop: CancellationToken,
}

impl Checks {
    /// Starts the checks of every upstream with checks enabled, on the current runtime,
    /// until `stop` (or [`Checks::stop`]): one loop per backend, started and stopped as
    /// backends join and leave the pool.
    pub fn start(upstreams: &[Arc<Upstream>], stop: &CancellationToken) -> Checks {
        let stop = stop.child_token();
        for up in upstreams {
            if up.health_check.enabled {
                tokio::spawn(supervise(up.clone(), stop.clone()));
            }
        }
        Checks { stop }
    }

    /// Stops these checks (the view they watched was replaced).
    pub fn stop(self) {
        self.stop.cancel();
    }
}

/// Keeps one check loop running per member of `up`'s pool.
async fn supervise(up: Arc<Upstream>, stop: CancellationToken) {
    let mut membership = up.pool.watch_membership();
    // By entry address (the map holds the Arc, so no other entry can get that address).
    let mut running: HashMap<usize, (Arc<BackendEntry>, CancellationToken)> = HashMap::new();
    loop {
        membership.borrow_and_update();
        let snap = up.pool.snapshot();
        let live: std::collections::HashSet<usize> =
            snap.members.iter().map(|m| Arc::as_ptr(&m.entry) as usize).collect();
        running.retain(|entry, (_, token)| {
            let keep = live.contains(entry);
            if !keep {
                token.cancel();
            }
            keep
        });
        for m in snap.members.iter() {
            running.entry(Arc::as_ptr(&m.entry) as usize).or_insert_with(|| {
                let token = stop.child_token();
                tokio::spawn(check_loop(up.clone(), m.entry.clone(), token.clone()));
                (m.entry.clone(), token)
            });
        }
        drop(snap);
        tokio::select! {
            _ = stop.cancelled() => return,
            changed = membership.changed() => if changed.is_err() { return },
        }
    }
}

/// Finds the serving upstream by name (a reload may have replaced it).
pub type Lookup = Arc<dyn Fn(&str) -> Option<Arc<Upstream>> + Send + Sync>;

/// Runs passive ejection until `stop` is cancelled. Spawns onto the current runtime.
pub fn run_passive(lookup: Lookup, receiver: Receiver, stop: CancellationToken) {
    tokio::spawn(passive(lookup, receiver, stop));
}

async fn check_loop(up: Arc<Upstream>, entry: Arc<BackendEntry>, stop: CancellationToken) {
    let hc = &up.health_check;
    let (id, addr) = (entry.id.as_str(), entry.addr);
    let mut interval = tokio::time::interval(hc.interval);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (mut ok_streak, mut fail_streak) = (0u32, 0u32);
    let mut local = crate::fds::Throttle::new(std::time::Duration::from_secs(10));
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = interval.tick() => {}
        }
        let started = Instant::now();
        let result = tokio::select! {
            _ = stop.cancelled() => return,
            r = check::probe(addr, hc) => r,
        };
        let result = match result {
            // The gateway's own shortage says nothing about the backend: its state and
            // streaks stay as they were.
            Err(Failed::Local(reason)) => {
                if let Some(left_out) = local.allow() {
                    tracing::warn!(upstream = %up.name, backend = %id, address = %addr, repeated = left_out, "health check not run: {reason}; the gateway is out of file descriptors, the backend keeps its state");
                }
                continue;
            }
            Err(Failed::Backend(reason)) => Err(reason),
            Ok(()) => Ok(()),
        };
        entry.metrics.health.record(started.elapsed(), result.as_ref().err().cloned());
        let now = up.pool.load().members.iter().find(|m| Arc::ptr_eq(&m.entry, &entry)).map(|m| m.status);
        let Some(status) = now else { return };
        match result {
            Ok(()) => {
                ok_streak += 1;
                fail_streak = 0;
                if status.pending {
                    // A discovered backend takes traffic after its first passing check.
                    up.pool.update_entry_status(&entry, |s| {
                        s.up = true;
                        s.pending = false;
                    });
                    entry.metrics.health.to_up.inc();
                    tracing::info!(upstream = %up.name, backend = %id, address = %addr, source = entry.source.as_str(), "new backend is up: its first health check passed");
                } else if !status.up && ok_streak >= hc.rise {
                    // Back up: a passive ejection from while it was down ends too (Envoy's
                    // successful_active_health_check_uneject_host).
                    up.pool.update_entry_status(&entry, |s| {
                        s.up = true;
                        s.ejected_until = None;
                    });
                    entry.stats.reset_failures();
                    entry.metrics.health.to_up.inc();
                    tracing::info!(upstream = %up.name, backend = %id, address = %addr, checks = ok_streak, "backend is up: health check passed {ok_streak} times in a row");
                }
            }
            Err(reason) => {
                fail_streak += 1;
                ok_streak = 0;
                if status.pending {
                    if fail_streak == 1 {
                        tracing::info!(upstream = %up.name, backend = %id, address = %addr, source = entry.source.as_str(), "new backend is not taking traffic yet: {reason}; it will once a health check passes");
                    }
                } else if status.up && fail_streak >= hc.fall {
                    up.pool.update_entry_status(&entry, |s| s.up = false);
                    entry.metrics.health.to_down.inc();
                    tracing::warn!(upstream = %up.name, backend = %id, address = %addr, checks = fail_streak, "backend is down: {reason} ({fail_streak} checks in a row)");
                } else if status.up {
                    tracing::debug!(upstream = %up.name, backend = %id, address = %addr, "health check failed: {reason}");
                }
            }
        }
    }
}

/// Ejections in a row per backend, to grow the ejection time.
#[derive(Default)]
struct History {
    count: u32,
    last_end: Option<Instant>,
}

/// What passive ejection decided about one report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    /// Ejected for this long (the `n`th ejection in a row).
    Ejected { duration: std::time::Duration, count: u32, until: Instant },
    /// Not ejected: that would eject more than `max_ejected_percent` of the backends.
    /// Remembered, and tried again when another ejection ends (or at the next report).
    Refused {
        /// Refused before already (log it once).
        again: bool,
    },
    /// Already ejected, or no longer in the pool, or its failures were reset meanwhile.
    Nothing,
}

/// The passive-ejection state of every upstream: ejection history (for the growing
/// ejection time) and backends refused by `max_ejected_percent`, waiting for room.
#[derive(Default)]
struct Ejections {
    history: HashMap<(String, String), History>,
    /// (upstream, backend) refused by the `max_ejected_percent` bound.
    refused: std::collections::BTreeSet<(String, String)>,
}

impl Ejections {
    /// Ejects `backend` of `upstream` if `max_ejected_percent` allows it.
    fn consider(
        &mut self,
        upstream: &str,
        pool: &crate::pool::Pool,
        p: &crate::config::Passive,
        backend: &str,
    ) -> Verdict {
        let key = (upstream.to_owned(), backend.to_owned());
        let snap = pool.snapshot();
        let Some(member) = snap.members.iter().find(|m| m.entry.id == backend) else {
            self.refused.remove(&key);
            return Verdict::Nothing;
        };
        if member.status.ejected_until.is_some() {
            self.refused.remove(&key);
            return Verdict::Nothing;
        }
        // Passive signals are noisy, and active checks take truly dead backends out:
        // never eject more than `max_ejected_percent` of the backends, this one counted.
        let ejected = snap.members.iter().filter(|m| m.status.ejected_until.is_some()).count();
        if !ejection_allowed(ejected, snap.members.len(), p.max_ejected_percent) {
            let again = !self.refused.insert(key);
            return Verdict::Refused { again };
        }
        self.refused.remove(&key);
        let h = self.history.entry(key).or_default();
        if h.last_end.is_some_and(|t| t.elapsed() > p.max_ejection) {
            h.count = 0;
        }
        h.count += 1;
        let duration = (p.base_ejection * h.count).min(p.max_ejection);
        let until = Instant::now() + duration;
        h.last_end = Some(until);
        if pool.update_status(backend, |s| s.ejected_until = Some(until)).is_none() {
            return Verdict::Nothing;
        }
        Verdict::Ejected { duration, count: h.count, until }
    }

    /// An ejection in `upstream` ended: the refused backends that are still failing
    /// (their streak not reset by a success) get their turn. Returns the ones to try.
    fn waiting(&mut self, upstream: &str, pool: &crate::pool::Pool, threshold: u32) -> Vec<String> {
        let snap = pool.snapshot();
        let mut out = Vec::new();
        self.refused.retain(|(up, id)| {
            if up != upstream {
                return true;
            }
            let failing = snap
                .members
                .iter()
                .find(|m| &m.entry.id == id)
                .is_some_and(|m| threshold > 0 && m.entry.stats.consecutive_failures() >= threshold);
            if failing {
                out.push(id.clone());
            }
            failing
        });
        out
    }
}

/// Envoy's rule (`max_ejection_percent`, without `always_eject_one_host`): one more
/// ejection is allowed when the ejected backends, that one included, are at most
/// `max_percent` of the `total`. With the default 50, one backend of two or three may be
/// ejected, two of four; the only backend of an upstream never is (below 100).
fn ejection_allowed(ejected: usize, total: usize, max_percent: u32) -> bool {
    (ejected + 1) * 100 <= total * max_percent as usize
}

/// Ends the ejection that ended at `until`, unless something else ended it first (an
/// active check that passed) and the backend was ejected again since: that newer
/// ejection runs its own course. Returns the status after, or `None` when this ejection
/// was no longer in force.
fn end_ejection(pool: &crate::pool::Pool, id: &str, until: Instant) -> Option<Status> {
    let mut ended = false;
    let status = pool.update_status(id, |s: &mut Status| {
        if s.ejected_until == Some(until) {
            s.ejected_until = None;
            ended = true;
        }
    })?;
    ended.then_some(status)
}

async fn passive(lookup: Lookup, mut receiver: Receiver, stop: CancellationToken) {
    let mut state = Ejections::default();
    // Ejections that ended, by upstream: refused backends get another look then.
    let (ended_tx, mut ended_rx) = mpsc::unbounded_channel::<String>();
    loop {
        let events: Vec<Eject> = tokio::select! {
            _ = stop.cancelled() => return,
            ev = receiver.rx.recv() => match ev { Some(ev) => vec![ev], None => return },
            Some(name) = ended_rx.recv() => {
                let Some(up) = lookup(&name) else { continue };
                state
                    .waiting(&name, &up.pool, up.passive.consecutive_failures)
                    .into_iter()
                    .map(|backend| Eject {
                        upstream: name.clone(),
                        backend,
                        reason: "still failing after being refused by max_ejected_percent".into(),
                    })
                    .collect()
            }
        };
        for ev in events {
            let Some(up) = lookup(&ev.upstream) else {
                continue;
            };
            let p = &up.passive;
            let Some(entry) = up.pool.load().members.iter().find(|m| m.entry.id == ev.backend).map(|m| m.entry.clone())
            else {
                continue;
            };
            let addr = entry.addr;
            let (duration, until) = match state.consider(&up.name, &up.pool, p, &ev.backend) {
                Verdict::Nothing => continue,
                Verdict::Refused { again } => {
                    if !again {
                        tracing::warn!(upstream = %up.name, backend = %ev.backend, address = %addr, max_ejected_percent = p.max_ejected_percent, "not ejecting after repeated failures ({}): that would eject more than {}% of the backends (passive.max_ejected_percent); it will be ejected when another ejection ends if it still fails", ev.reason, p.max_ejected_percent);
                    }
                    continue;
                }
                Verdict::Ejected { duration, count, until } => {
                    entry.metrics.health.ejections.inc();
                    tracing::warn!(
                        upstream = %up.name, backend = %ev.backend, address = %addr, ejection = count, seconds = duration.as_secs_f64(),
                        "backend ejected after {} consecutive failures (last: {})", p.consecutive_failures, ev.reason
                    );
                    (duration, until)
                }
            };
            let (name, id, stop, lookup, ended) =
                (up.name.clone(), ev.backend, stop.clone(), lookup.clone(), ended_tx.clone());
            tokio::spawn(async move {
                tokio::select! {
                    _ = stop.cancelled() => {}
                    _ = tokio::time::sleep(duration) => {
                        // The upstream serving now: a config reload may have replaced it
                        // (and carried the ejection over).
                        let Some(up) = lookup(&name) else { return };
                        // Already ended by an active check that passed: nothing to say
                        // (and a newer ejection is not cut short).
                        let Some(status) = end_ejection(&up.pool, &id, until) else { return };
                        if let Some(m) = up.pool.load().members.iter().find(|m| m.entry.id == id) {
                            m.entry.stats.reset_failures();
                        }
                        if status.healthy() {
                            tracing::info!(upstream = %up.name, backend = %id, address = %addr, "ejection over, backend takes traffic again");
                        } else if !status.up {
                            tracing::info!(upstream = %up.name, backend = %id, address = %addr, "passive ejection ended, but active health checks have the backend down: it stays out of rotation until they pass");
                        } else {
                            tracing::info!(upstream = %up.name, backend = %id, address = %addr, "passive ejection ended; the backend stays out of rotation: it is drained");
                        }
                        let _ = ended.send(name);
                    }
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::{Pool, Source};
    use std::net::SocketAddr;
    use std::time::Duration;

    fn pool(n: u16) -> Pool {
        Pool::new(
            (0..n)
                .map(|i| {
                    let addr = SocketAddr::from(([127, 0, 0, 1], 9100 + i));
                    Arc::new(BackendEntry::new(format!("b{i}"), addr, String::new(), vec![], Source::Static))
                })
                .collect(),
        )
    }

    fn fail(pool: &Pool, id: &str, times: u32) {
        let snap = pool.snapshot();
        let m = snap.members.iter().find(|m| m.entry.id == id).unwrap();
        for _ in 0..times {
            m.entry.stats.failure();
        }
    }

    #[test]
    fn a_backend_refused_by_the_half_rule_is_ejected_when_another_ejection_ends() {
        let p = crate::config::Passive { consecutive_failures: 3, ..Default::default() };
        let pool = pool(2);
        let mut e = Ejections::default();
        fail(&pool, "b0", 3);
        fail(&pool, "b1", 3);
        assert!(matches!(e.consider("web", &pool, &p, "b0"), Verdict::Ejected { count: 1, .. }));
        assert_eq!(e.consider("web", &pool, &p, "b1"), Verdict::Refused { again: false });
        assert_eq!(e.consider("web", &pool, &p, "b1"), Verdict::Refused { again: true }, "refused again, logged once");
        assert_eq!(e.consider("web", &pool, &p, "b0"), Verdict::Nothing, "already ejected: not extended");
        // Nothing is waiting in another upstream.
        assert!(e.waiting("api", &pool, 3).is_empty());
        // b0's ejection ends: b1, still failing, gets its turn.
        pool.update_status("b0", |s| s.ejected_until = None);
        assert_eq!(e.waiting("web", &pool, 3), ["b1"]);
        assert!(matches!(e.consider("web", &pool, &p, "b1"), Verdict::Ejected { .. }));
        assert!(e.refused.is_empty());
        assert!(pool.snapshot().members[1].status.ejected_until.is_some());
    }

    #[test]
    fn a_refused_backend_that_recovered_is_forgotten() {
        let p = crate::config::Passive { consecutive_failures: 2, ..Default::default() };
        let pool = pool(2);
        let mut e = Ejections::default();
        fail(&pool, "b0", 2);
        fail(&pool, "b1", 2);
        e.consider("web", &pool, &p, "b0");
        assert_eq!(e.consider("web", &pool, &p, "b1"), Verdict::Refused { again: false });
        // b1 answers well meanwhile: its streak is reset.
        pool.snapshot().members[1].entry.stats.success(Duration::from_millis(1));
        pool.update_status("b0", |s| s.ejected_until = None);
        assert!(e.waiting("web", &pool, 2).is_empty());
        assert!(e.refused.is_empty());
    }

    #[test]
    fn ejection_time_grows_with_ejections_in_a_row() {
        let p = crate::config::Passive {
            consecutive_failures: 1,
            base_ejection: Duration::from_secs(5),
            max_ejection: Duration::from_secs(12),
            ..Default::default()
        };
        let pool = pool(4);
        let mut e = Ejections::default();
        let mut durations = Vec::new();
        for _ in 0..3 {
            match e.consider("web", &pool, &p, "b0") {
                Verdict::Ejected { duration, .. } => durations.push(duration.as_secs()),
                v => panic!("{v:?}"),
            }
            pool.update_status("b0", |s| s.ejected_until = None);
        }
        assert_eq!(durations, [5, 10, 12]);
    }

    #[test]
    fn max_ejected_percent_follows_envoy_counting_the_backend_being_ejected() {
        // The default 50 is the old "never more than half" rule.
        assert!(ejection_allowed(0, 3, 50) && !ejection_allowed(1, 3, 50));
        assert!(ejection_allowed(0, 2, 50) && !ejection_allowed(1, 2, 50));
        assert!(ejection_allowed(1, 4, 50) && !ejection_allowed(2, 4, 50));
        assert!(!ejection_allowed(0, 1, 50), "a lone backend is left to the active checks");
        assert!(ejection_allowed(0, 1, 100) && ejection_allowed(2, 3, 100));
        assert!(!ejection_allowed(0, 3, 0), "0 never ejects");
        assert!(ejection_allowed(1, 3, 67) && !ejection_allowed(2, 3, 67));
        // Through `consider`: with 100, two of three failing backends are both ejected.
        let p = crate::config::Passive { consecutive_failures: 1, max_ejected_percent: 100, ..Default::default() };
        let pool = pool(3);
        let mut e = Ejections::default();
        assert!(matches!(e.consider("web", &pool, &p, "b0"), Verdict::Ejected { .. }));
        assert!(matches!(e.consider("web", &pool, &p, "b1"), Verdict::Ejected { .. }));
        let p = crate::config::Passive { max_ejected_percent: 50, ..p };
        assert_eq!(e.consider("web", &pool, &p, "b2"), Verdict::Refused { again: false });
    }

    #[test]
    fn an_ejection_ended_by_a_health_check_does_not_end_a_newer_one_or_say_so_twice() {
        let p = crate::config::Passive { consecutive_failures: 1, ..Default::default() };
        let pool = pool(3);
        let mut e = Ejections::default();
        let Verdict::Ejected { until: first, .. } = e.consider("web", &pool, &p, "b0") else { panic!() };
        // An active check brought it back (ejection cleared), then it was ejected again.
        pool.update_status("b0", |s| s.ejected_until = None);
        let Verdict::Ejected { until: second, .. } = e.consider("web", &pool, &p, "b0") else { panic!() };
        assert_ne!(first, second);
        // The first ejection's timer fires: nothing ends, nothing to log.
        assert_eq!(end_ejection(&pool, "b0", first), None);
        assert_eq!(pool.snapshot().members[0].status.ejected_until, Some(second));
        // Meanwhile active checks took it down: the second ejection ends, and the status
        // says it is still out (the log says so instead of "takes traffic again").
        pool.update_status("b0", |s| s.up = false);
        let after = end_ejection(&pool, "b0", second).expect("the second ejection ends");
        assert!(!after.up && !after.healthy() && after.ejected_until.is_none());
        assert_eq!(end_ejection(&pool, "b0", second), None, "ended once");
    }
}
