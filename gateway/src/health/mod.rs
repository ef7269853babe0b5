//! Health: active checks (HTTP or TCP, with rise/fall) and passive ejection after
//! consecutive failed requests. The only writer of backend status besides the admin
//! drain; every change publishes a new pool snapshot.
//!
//! The proxy reports failures through a [`Reporter`] (a channel), so this module never
//! calls into the proxy.

mod check;

use crate::pool::Status;
use crate::upstream::Upstream;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub use check::probe;

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
    /// Starts one check loop per backend of every upstream with checks enabled, on the
    /// current runtime, until `stop` (or [`Checks::stop`]).
    pub fn start(upstreams: &[Arc<Upstream>], stop: &CancellationToken) -> Checks {
        let stop = stop.child_token();
        for up in upstreams {
            if !up.health_check.enabled {
                continue;
            }
            for member in up.pool.snapshot().members.iter() {
                tokio::spawn(check_loop(up.clone(), member.entry.id.clone(), member.entry.addr, stop.clone()));
            }
        }
        Checks { stop }
    }

    /// Stops these checks (the view they watched was replaced).
    pub fn stop(self) {
        self.stop.cancel();
    }
}

/// Finds the serving upstream by name (a reload may have replaced it).
pub type Lookup = Arc<dyn Fn(&str) -> Option<Arc<Upstream>> + Send + Sync>;

/// Runs passive ejection until `stop` is cancelled. Spawns onto the current runtime.
pub fn run_passive(lookup: Lookup, receiver: Receiver, stop: CancellationToken) {
    tokio::spawn(passive(lookup, receiver, stop));
}

async fn check_loop(up: Arc<Upstream>, id: String, addr: std::net::SocketAddr, stop: CancellationToken) {
    let hc = &up.health_check;
    let mut interval = tokio::time::interval(hc.interval);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (mut ok_streak, mut fail_streak) = (0u32, 0u32);
    let Some(entry) = up.pool.load().members.iter().find(|m| m.entry.id == id).map(|m| m.entry.clone()) else {
        return;
    };
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
        entry.metrics.health.record(started.elapsed(), result.as_ref().err().cloned());
        let up_now = up.pool.load().members.iter().find(|m| m.entry.id == id).map(|m| m.status.up);
        let Some(was_up) = up_now else { return };
        match result {
            Ok(()) => {
                ok_streak += 1;
                fail_streak = 0;
                if !was_up && ok_streak >= hc.rise {
                    // Back up: a passive ejection from while it was down ends too (Envoy's
                    // successful_active_health_check_uneject_host).
                    up.pool.update_status(&id, |s| {
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
                if was_up && fail_streak >= hc.fall {
                    up.pool.update_status(&id, |s| s.up = false);
                    entry.metrics.health.to_down.inc();
                    tracing::warn!(upstream = %up.name, backend = %id, address = %addr, checks = fail_streak, "backend is down: {reason} ({fail_streak} checks in a row)");
                } else if was_up {
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

async fn passive(lookup: Lookup, mut receiver: Receiver, stop: CancellationToken) {
    let mut history: HashMap<(String, String), History> = HashMap::new();
    loop {
        let ev = tokio::select! {
            _ = stop.cancelled() => return,
            ev = receiver.rx.recv() => match ev { Some(ev) => ev, None => return },
        };
        let Some(up) = lookup(&ev.upstream) else {
            continue;
        };
        let p = &up.passive;
        let snap = up.pool.snapshot();
        let Some(entry) = snap.members.iter().find(|m| m.entry.id == ev.backend).map(|m| m.entry.clone()) else {
            continue;
        };
        let addr = entry.addr;
        // Never eject so many that less than half of the backends are left: passive
        // signals are noisy; active checks take truly dead backends out.
        let ejected = snap.members.iter().filter(|m| m.status.ejected_until.is_some()).count();
        if (ejected + 1) * 2 > snap.members.len() {
            tracing::warn!(upstream = %up.name, backend = %addr, id = %ev.backend, "not ejecting after repeated failures ({}): that would leave fewer than half of the backends", ev.reason);
            continue;
        }
        let h = history.entry((ev.upstream.clone(), ev.backend.clone())).or_default();
        if h.last_end.is_some_and(|t| t.elapsed() > p.max_ejection) {
            h.count = 0;
        }
        h.count += 1;
        let duration = (p.base_ejection * h.count).min(p.max_ejection);
        h.last_end = Some(Instant::now() + duration);
        let until = Instant::now() + duration;
        if up.pool.update_status(&ev.backend, |s| s.ejected_until = Some(until)).is_none() {
            continue;
        }
        entry.metrics.health.ejections.inc();
        tracing::warn!(
            upstream = %up.name, backend = %addr, id = %ev.backend, ejection = h.count, seconds = duration.as_secs_f64(),
            "backend ejected after {} consecutive failures (last: {})", p.consecutive_failures, ev.reason
        );
        let (up, id, stop) = (up.clone(), ev.backend, stop.clone());
        tokio::spawn(async move {
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = tokio::time::sleep(duration) => {
                    up.pool.update_status(&id, |s: &mut Status| s.ejected_until = None);
                    if let Some(m) = up.pool.load().members.iter().find(|m| m.entry.id == id) {
                        m.entry.stats.reset_failures();
                    }
                    tracing::info!(upstream = %up.name, backend = %addr, id = %id, "ejection over, backend takes traffic again");
                }
            }
        });
    }
}
