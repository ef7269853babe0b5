//! Backend selection: the Wasm plugin's decision, with a native round robin as the
//! fallback when the plugin fails (trap, timeout, bad answer).

use crate::metrics::{DECISION_SAMPLE, UpstreamMetrics};
use crate::plugin::{Binding, PickErrorKind, Target};
use crate::pool::PoolSnapshot;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

/// Response headers a plugin may not set: they belong to the HTTP framing of the
/// connection, not to the response. The hop-by-hop ones are those the proxy strips from a
/// backend's response (`proxy/headers.rs`).
const FORBIDDEN: [&str; 11] = [
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "upgrade",
    "host",
    "proxy-authenticate",
    "proxy-authorization",
];

/// `headers` without the [`FORBIDDEN`] ones, and how many were dropped.
fn without_framing(mut headers: Vec<(String, String)>) -> (Vec<(String, String)>, usize) {
    let before = headers.len();
    headers.retain(|(name, _)| !FORBIDDEN.iter().any(|f| name.eq_ignore_ascii_case(f)));
    let dropped = before - headers.len();
    (headers, dropped)
}

/// What to do with a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Choice {
    /// Forward to the member at this index of the snapshot.
    Backend {
        /// Index into the snapshot.
        index: usize,
        /// Headers for the client's response (e.g. a sticky cookie).
        response_headers: Vec<(String, String)>,
        /// The plugin failed and the fallback chose.
        fallback: bool,
    },
    /// The plugin answers the client itself.
    Reject {
        /// HTTP status.
        status: u16,
        /// Body text.
        text: String,
        /// Headers for the client's response.
        response_headers: Vec<(String, String)>,
    },
    /// No healthy backend left to try.
    NoBackend,
}

/// Chooses backends for one upstream.
#[derive(Debug)]
pub struct Selector {
    binding: Arc<Binding>,
    metrics: Arc<UpstreamMetrics>,
    fallback_turn: AtomicU64,
    /// Milliseconds (since `epoch`) of the last logged plugin failure: rate limit.
    last_logged_ms: AtomicU64,
    epoch: Instant,
}

impl Selector {
    /// A selector that asks `binding`.
    pub fn new(binding: Arc<Binding>) -> Self {
        Self::with_metrics(binding, Arc::default())
    }

    /// A selector that asks `binding` and counts into `metrics`.
    pub fn with_metrics(binding: Arc<Binding>, metrics: Arc<UpstreamMetrics>) -> Self {
        Selector {
            binding,
            metrics,
            fallback_turn: AtomicU64::new(0),
            last_logged_ms: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }

    /// The plugin binding.
    pub fn binding(&self) -> &Arc<Binding> {
        &self.binding
    }

    /// Requests the fallback chose because the plugin failed.
    pub fn fallbacks(&self) -> u64 {
        self.metrics.fallbacks.get()
    }

    /// Chooses a backend for the request, never one in `exclude`.
    pub fn choose(
        &self,
        parts: &mut http::request::Parts,
        client_ip: IpAddr,
        pool: &Arc<PoolSnapshot>,
        exclude: &[u32],
    ) -> Choice {
        if pool.healthy_count == 0 {
            return Choice::NoBackend;
        }
        let shard = self.metrics.shards.local();
        shard.decisions.inc();
        // Time one decision in DECISION_SAMPLE: two clock reads per decision would cost
        // more than most decisions.
        let timed = shard.decisions.get().is_multiple_of(DECISION_SAMPLE).then(Instant::now);
        let picked = self.binding.pick(parts, client_ip, pool, exclude);
        if let Some(started) = timed {
            shard.decision_time.observe(started.elapsed());
        }
        match picked {
            Ok(d) => match d.target {
                Target::Backend(i) if !exclude.contains(&i) => Choice::Backend {
                    index: i as usize,
                    response_headers: self.allowed(d.response_headers),
                    fallback: false,
                },
                Target::Backend(i) => {
                    self.failed(
                        PickErrorKind::BadAnswer,
                        &format!("picked backend {i}, which this request already tried"),
                    );
                    self.fallback(pool, exclude)
                }
                Target::Reject(status, text) => {
                    Choice::Reject { status, text, response_headers: self.allowed(d.response_headers) }
                }
            },
            // Quarantined, or this worker's instance is being built: not a new failure.
            Err(e) if !e.kind.is_failure() => {
                self.metrics.fallbacks.inc();
                self.fallback(pool, exclude)
            }
            Err(e) => {
                self.failed(e.kind, &e.message);
                self.fallback(pool, exclude)
            }
        }
    }

    /// A plugin's response headers without those that would change the response's
    /// framing or the connection (`content-length`, `transfer-encoding`, `connection`,
    /// ...): those are dropped and counted.
    fn allowed(&self, headers: Vec<(String, String)>) -> Vec<(String, String)> {
        let (headers, dropped) = without_framing(headers);
        if dropped > 0 {
            self.metrics.dropped_headers.add(dropped as u64);
            tracing::debug!(upstream = %self.binding.upstream(), dropped, "plugin response headers that set framing or hop-by-hop fields were dropped");
        }
        headers
    }

    fn failed(&self, kind: PickErrorKind, message: &str) {
        self.metrics.fallbacks.inc();
        let kind_index = match kind {
            PickErrorKind::Trap => 0,
            PickErrorKind::Timeout => 1,
            PickErrorKind::BadAnswer => 2,
            PickErrorKind::Instantiate | PickErrorKind::Quarantined | PickErrorKind::NotReady => 3,
        };
        self.metrics.failures[kind_index].inc();
        // At most one line a second per upstream: a broken plugin must not flood the log.
        let now = self.epoch.elapsed().as_millis() as u64 + 1_000;
        let last = self.last_logged_ms.load(Relaxed);
        if now.saturating_sub(last) >= Duration::from_secs(1).as_millis() as u64
            && self.last_logged_ms.compare_exchange(last, now, Relaxed, Relaxed).is_ok()
        {
            let plugin = self.binding.plugin();
            tracing::warn!(
                upstream = %self.binding.upstream(),
                plugin = %plugin.name,
                origin = %plugin.origin,
                failure = ?kind,
                fallbacks = self.fallbacks(),
                "plugin call failed: {message}; the instance was discarded and the fallback round robin chose the backend"
            );
        }
    }

    /// Native round robin over healthy members not in `exclude`.
    fn fallback(&self, pool: &PoolSnapshot, exclude: &[u32]) -> Choice {
        let healthy: Vec<usize> = (0..pool.members.len())
            .filter(|&i| pool.members[i].status.healthy() && !exclude.contains(&(i as u32)))
            .collect();
        if healthy.is_empty() {
            return Choice::NoBackend;
        }
        let turn = self.fallback_turn.fetch_add(1, Relaxed) as usize;
        Choice::Backend { index: healthy[turn % healthy.len()], response_headers: Vec::new(), fallback: true }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plugin_cannot_set_framing_or_hop_by_hop_headers() {
        let h = |n: &str| (n.to_owned(), "x".to_owned());
        let (kept, dropped) = without_framing(vec![
            h("set-cookie"),
            h("Content-Length"),
            h("transfer-encoding"),
            h("CONNECTION"),
            h("x-canary"),
            h("upgrade"),
        ]);
        assert_eq!(kept, vec![h("set-cookie"), h("x-canary")]);
        assert_eq!(dropped, 4);
    }
}
