//! A shadow strategy: asked about a sample of an upstream's requests after the live
//! decision, on a task of its own (so it never delays, changes or fails the live request),
//! its answer recorded and never acted on: how often it agrees with the live decision,
//! and where it would have sent the requests.

use crate::config;
use crate::metrics::{Counter, PerWorker};
use crate::plugin::{Binding, PickErrorKind, Target};
use crate::pool::{BackendEntry, PoolSnapshot};
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// What the live strategy did with a sampled request.
#[derive(Debug, Clone)]
pub enum Live {
    /// Sent it to this backend.
    Backend(Arc<BackendEntry>),
    /// Answered it with this status (a plugin's reject).
    Reject(u16),
}

/// What one worker counted for the shadow.
#[derive(Debug, Default)]
pub struct ShadowShard {
    /// Requests in the sample (asked of the shadow).
    pub sampled: Counter,
    /// The shadow chose what the live strategy chose (the same backend, or a reject).
    pub agreed: Counter,
    /// It chose something else.
    pub disagreed: Counter,
    /// It passed (no opinion).
    pub passed: Counter,
    /// Its call failed (trap, timeout, bad answer): nothing recorded but this.
    pub failed: Counter,
    /// Its instance was not ready (being built, quarantined): not asked.
    pub skipped: Counter,
    /// Per sampled request, the live and the shadow's backend (by id; `-` for a reject):
    /// `[live, shadow]` counts. Each worker locks only its own map.
    pub picks: Mutex<HashMap<String, [u64; 2]>>,
}

/// The shadow's counts, all workers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ShadowCounts {
    /// See [`ShadowShard`].
    pub sampled: u64,
    /// See [`ShadowShard`].
    pub agreed: u64,
    /// See [`ShadowShard`].
    pub disagreed: u64,
    /// See [`ShadowShard`].
    pub passed: u64,
    /// See [`ShadowShard`].
    pub failed: u64,
    /// See [`ShadowShard`].
    pub skipped: u64,
    /// Backend id (`-`: rejected) → `[live, shadow]` decisions over the sample, by id.
    pub picks: Vec<(String, [u64; 2])>,
}

impl ShadowCounts {
    /// Agreed out of the decisions compared (agreed + disagreed); none before any.
    pub fn agreement(&self) -> Option<f64> {
        let compared = self.agreed + self.disagreed;
        (compared > 0).then(|| self.agreed as f64 / compared as f64)
    }
}

/// An upstream's shadow strategy.
#[derive(Debug)]
pub struct Shadow {
    /// The shadow plugin, bound to the upstream (state of its own).
    pub binding: Arc<Binding>,
    /// The configuration it was built from.
    pub config: config::Shadow,
    /// Requests whose Weyl-sequence value falls below this are sampled.
    threshold: u64,
    shards: PerWorker<ShadowShard>,
    /// Per worker: requests seen, for the sampling sequence.
    turns: PerWorker<Counter>,
    /// Milliseconds (since `epoch`) of the last logged failure: at most one a second.
    last_logged_ms: AtomicU64,
    epoch: Instant,
}

impl Shadow {
    /// A shadow asking `binding` about `config.sample` of the requests.
    pub fn new(binding: Arc<Binding>, config: config::Shadow) -> Self {
        let threshold = if config.sample >= 1.0 { u64::MAX } else { (config.sample * 2f64.powi(64)) as u64 };
        Shadow {
            binding,
            config,
            threshold,
            shards: PerWorker::default(),
            turns: PerWorker::default(),
            last_logged_ms: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }

    /// Whether this request is in the sample: one per-worker count and a multiply (the
    /// golden-ratio sequence spreads the sample evenly, so 0.1 is every tenth request
    /// give or take one, with no clock or random number on the request path).
    #[inline]
    pub fn samples(&self) -> bool {
        let turn = self.turns.local();
        turn.inc();
        turn.get().wrapping_mul(0x9e37_79b9_7f4a_7c15) <= self.threshold
    }

    /// Asks the shadow about the request on a task of its own, after the live request
    /// has gone on, and records its answer against `live`. Copies what the plugin reads
    /// of the request (method, URI, headers).
    pub fn observe(
        self: &Arc<Self>,
        parts: &http::request::Parts,
        client_ip: IpAddr,
        pool: Arc<PoolSnapshot>,
        live: Live,
    ) {
        let mut copy = http::Request::new(()).into_parts().0;
        copy.method = parts.method.clone();
        copy.uri = parts.uri.clone();
        copy.version = parts.version;
        copy.headers = parts.headers.clone();
        let shadow = self.clone();
        tokio::spawn(async move {
            // A pool change brings this worker's instance up to date off the request path;
            // waiting here delays no client.
            if let Some(catch_up) = shadow.binding.catch_up(&pool) {
                catch_up.await;
            }
            shadow.decide(&mut copy, client_ip, &pool, &live);
        });
    }

    /// Asks the plugin now and records the answer (what [`Shadow::observe`] runs).
    pub fn decide(&self, parts: &mut http::request::Parts, client_ip: IpAddr, pool: &Arc<PoolSnapshot>, live: &Live) {
        let shard = self.shards.local();
        shard.sampled.inc();
        let decision = match self.binding.pick(parts, client_ip, pool, &[]) {
            Ok(d) => d,
            Err(e) if !e.kind.is_failure() => {
                shard.skipped.inc();
                return;
            }
            Err(e) => {
                shard.failed.inc();
                self.failed(e.kind, &e.message);
                return;
            }
        };
        let shadow_pick = match decision.target {
            Target::Pass => {
                shard.passed.inc();
                return;
            }
            Target::Backend(i) => pool.members.get(i as usize).map(|m| &m.entry),
            Target::Reject(..) => None,
        };
        let agrees = match (live, shadow_pick) {
            (Live::Backend(a), Some(b)) => Arc::ptr_eq(a, b) || a.id == b.id,
            (Live::Reject(_), None) => true,
            _ => false,
        };
        if agrees { &shard.agreed } else { &shard.disagreed }.inc();
        let live_id = match live {
            Live::Backend(e) => e.id.as_str(),
            Live::Reject(_) => "-",
        };
        let shadow_id = shadow_pick.map_or("-", |e| e.id.as_str());
        let mut picks = shard.picks.lock().unwrap_or_else(|e| e.into_inner());
        for (id, column) in [(live_id, 0), (shadow_id, 1)] {
            match picks.get_mut(id) {
                Some(counts) => counts[column] += 1,
                None => {
                    let mut counts = [0; 2];
                    counts[column] = 1;
                    picks.insert(id.to_owned(), counts);
                }
            }
        }
    }

    /// The counts so far, all workers; `picks` sorted by backend id.
    pub fn counts(&self) -> ShadowCounts {
        let mut picks: HashMap<String, [u64; 2]> = HashMap::new();
        for shard in self.shards.iter() {
            for (id, c) in shard.picks.lock().unwrap_or_else(|e| e.into_inner()).iter() {
                let total = picks.entry(id.clone()).or_default();
                total[0] += c[0];
                total[1] += c[1];
            }
        }
        let mut picks: Vec<_> = picks.into_iter().collect();
        picks.sort();
        ShadowCounts {
            sampled: self.shards.sum(|s| s.sampled.get()),
            agreed: self.shards.sum(|s| s.agreed.get()),
            disagreed: self.shards.sum(|s| s.disagreed.get()),
            passed: self.shards.sum(|s| s.passed.get()),
            failed: self.shards.sum(|s| s.failed.get()),
            skipped: self.shards.sum(|s| s.skipped.get()),
            picks,
        }
    }

    fn failed(&self, kind: PickErrorKind, message: &str) {
        let now = self.epoch.elapsed().as_millis() as u64 + 1_000;
        let last = self.last_logged_ms.load(Relaxed);
        if now.saturating_sub(last) >= 1_000
            && self.last_logged_ms.compare_exchange(last, now, Relaxed, Relaxed).is_ok()
        {
            let plugin = self.binding.plugin();
            tracing::warn!(
                upstream = %self.binding.upstream(),
                plugin = %plugin.name,
                origin = %plugin.origin,
                failure = ?kind,
                failed = self.shards.sum(|s| s.failed.get()),
                "shadow plugin call failed: {message}; the live request was not affected"
            );
        }
    }
}
