//! Backend selection: the Wasm plugin's decision (or, for a chain, the first step's that
//! does not pass), with a native round robin as the fallback when a plugin fails (trap,
//! timeout, bad answer) or every step passes. Beside the upstream's strategy, a canary
//! (`canary.rs`) decides a share of the requests, and a shadow (`shadow.rs`) is asked
//! about a sample without acting on it.

mod canary;
mod shadow;

pub use canary::{Arm, ArmShard, Canary, hash as arm_hash};
pub use shadow::{Live, Shadow, ShadowCounts, ShadowShard};

use crate::access_log::PluginName;
use crate::metrics::{Counter, DECISION_SAMPLE, PerWorker, UpstreamMetrics};
use crate::plugin::{Binding, PickErrorKind, Reason, Target};
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

/// Who chose a request's backend (or answered it), and why: for the access log and the
/// `X-Gateway-Decision` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Why {
    /// The plugin of this step of the chain decided (0 for a single strategy), with the
    /// reason it gave, if any.
    Step {
        /// Index into the chain.
        step: u8,
        /// `request.set-reason`, when called.
        reason: Option<Reason>,
    },
    /// Every step passed: the native round robin chose.
    AllPassed,
    /// A plugin failed (trap, timeout, bad answer, quarantined, not ready): the native
    /// round robin chose.
    Failed,
}

impl Why {
    /// The reason as the access log and the debug header write it (none for a plugin
    /// that gave none).
    pub fn reason(&self) -> Option<&str> {
        match self {
            Why::Step { reason, .. } => reason.as_ref().map(Reason::as_str),
            Why::AllPassed => Some("every strategy passed"),
            Why::Failed => Some("the plugin failed"),
        }
    }
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
        /// No plugin decided (one failed, or all passed): the fallback chose.
        fallback: bool,
        /// Who decided, and why.
        why: Why,
    },
    /// The plugin answers the client itself.
    Reject {
        /// HTTP status.
        status: u16,
        /// Body text.
        text: String,
        /// Headers for the client's response.
        response_headers: Vec<(String, String)>,
        /// Which step rejected, and why.
        why: Why,
    },
    /// No healthy backend left to try.
    NoBackend,
}

/// One step of an upstream's strategy chain.
#[derive(Debug)]
struct Step {
    binding: Arc<Binding>,
    /// Plugin name, as the config gives it.
    name: String,
    /// The same, rendered for the access log.
    log_name: PluginName,
    /// Per worker: requests asked of this step (chains only: a single strategy's are
    /// the upstream's decisions) and passes.
    shards: PerWorker<StepShard>,
}

/// What one worker counted for one step of a chain.
#[derive(Debug, Default)]
pub struct StepShard {
    /// Requests this step was asked about.
    pub decisions: Counter,
    /// Requests it passed on.
    pub passes: Counter,
}

/// What the metrics and the admin API show of one step.
#[derive(Debug, Clone, Copy)]
pub struct StepView<'a> {
    /// The binding (plugin, params, failures, quarantine).
    pub binding: &'a Arc<Binding>,
    /// Plugin name as configured.
    pub name: &'a str,
    /// Requests asked of this step.
    pub decisions: u64,
    /// Requests it passed on.
    pub passes: u64,
}

/// Chooses backends for one upstream: asks each step of its chain in turn until one
/// decides (one plugin call per step taken), then the native round robin.
#[derive(Debug)]
pub struct Selector {
    steps: Box<[Step]>,
    /// `a > b > c`: the strategy's name in logs and metrics.
    name: String,
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
        let name = binding.plugin().name.clone();
        Self::chain(vec![(name, binding)], metrics)
    }

    /// A selector that asks each of `steps` (plugin name, binding) in order until one
    /// decides, counting into `metrics`. At least one step.
    pub fn chain(steps: Vec<(String, Arc<Binding>)>, metrics: Arc<UpstreamMetrics>) -> Self {
        assert!(!steps.is_empty() && steps.len() <= usize::from(u8::MAX), "a chain has 1 to 255 steps");
        let name = steps.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>().join(" > ");
        Selector {
            steps: steps
                .into_iter()
                .map(|(name, binding)| Step {
                    binding,
                    log_name: PluginName::new(&name),
                    name,
                    shards: PerWorker::default(),
                })
                .collect(),
            name,
            metrics,
            fallback_turn: AtomicU64::new(0),
            last_logged_ms: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }

    /// The first step's plugin binding (a single strategy's only one).
    pub fn binding(&self) -> &Arc<Binding> {
        &self.steps[0].binding
    }

    /// Every step's binding, in order.
    pub fn bindings(&self) -> impl Iterator<Item = &Arc<Binding>> {
        self.steps.iter().map(|s| &s.binding)
    }

    /// The plugin name of step `step` (as configured).
    pub fn step_name(&self, step: u8) -> &str {
        self.steps.get(usize::from(step)).map_or("-", |s| s.name.as_str())
    }

    /// The plugin name of step `step`, rendered for the access log.
    pub fn step_log_name(&self, step: u8) -> Option<&PluginName> {
        self.steps.get(usize::from(step)).map(|s| &s.log_name)
    }

    /// The steps with their counters.
    pub fn steps(&self) -> impl Iterator<Item = StepView<'_>> {
        let chain = self.is_chain();
        self.steps.iter().map(move |s| StepView {
            binding: &s.binding,
            name: &s.name,
            decisions: if chain { s.shards.sum(|c| c.decisions.get()) } else { self.decisions() },
            passes: s.shards.sum(|c| c.passes.get()),
        })
    }

    /// More than one step.
    pub fn is_chain(&self) -> bool {
        self.steps.len() > 1
    }

    /// `a > b > c` (the plugin's name for a single strategy).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Requests this selector was asked about.
    pub fn decisions(&self) -> u64 {
        self.metrics.shards.sum(|s| s.decisions.get())
    }

    /// Requests the fallback chose because a plugin failed or every step passed.
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
        let choice = self.ask(parts, client_ip, pool, exclude);
        if let Some(started) = timed {
            shard.decision_time.observe(started.elapsed());
        }
        choice
    }

    /// Asks the steps in order until one decides.
    fn ask(
        &self,
        parts: &mut http::request::Parts,
        client_ip: IpAddr,
        pool: &Arc<PoolSnapshot>,
        exclude: &[u32],
    ) -> Choice {
        let chain = self.is_chain();
        // Headers from steps that passed (rare): kept for the one that decides.
        let mut passed_headers: Vec<(String, String)> = Vec::new();
        for (k, step) in self.steps.iter().enumerate() {
            if chain {
                step.shards.local().decisions.inc();
            }
            let d = match step.binding.pick(parts, client_ip, pool, exclude) {
                Ok(d) => d,
                // Quarantined, or this worker's instance is being built: not a new failure.
                Err(e) if !e.kind.is_failure() => {
                    self.metrics.fallbacks.inc();
                    return self.fallback(pool, exclude, Vec::new(), Why::Failed);
                }
                Err(e) => {
                    self.failed(step, e.kind, &e.message);
                    return self.fallback(pool, exclude, Vec::new(), Why::Failed);
                }
            };
            let why = Why::Step { step: k as u8, reason: d.reason };
            let headers = if passed_headers.is_empty() {
                d.response_headers
            } else {
                passed_headers.extend(d.response_headers);
                std::mem::take(&mut passed_headers)
            };
            match d.target {
                Target::Backend(i) if !exclude.contains(&i) => {
                    return Choice::Backend {
                        index: i as usize,
                        response_headers: self.allowed(step, headers),
                        fallback: false,
                        why,
                    };
                }
                Target::Backend(i) => {
                    self.failed(
                        step,
                        PickErrorKind::BadAnswer,
                        &format!("picked backend {i}, which this request already tried"),
                    );
                    return self.fallback(pool, exclude, Vec::new(), Why::Failed);
                }
                Target::Reject(status, text) => {
                    return Choice::Reject { status, text, response_headers: self.allowed(step, headers), why };
                }
                Target::Pass => {
                    step.shards.local().passes.inc();
                    passed_headers = headers;
                }
            }
        }
        // The last step passed too: the native round robin, counted as a fallback.
        self.metrics.fallbacks.inc();
        let headers = match self.steps.last() {
            Some(last) if !passed_headers.is_empty() => self.allowed(last, passed_headers),
            _ => passed_headers,
        };
        self.fallback(pool, exclude, headers, Why::AllPassed)
    }

    /// A plugin's response headers without those that would change the response's
    /// framing or the connection (`content-length`, `transfer-encoding`, `connection`,
    /// ...): those are dropped and counted.
    fn allowed(&self, step: &Step, headers: Vec<(String, String)>) -> Vec<(String, String)> {
        if headers.is_empty() {
            return headers;
        }
        let (headers, dropped) = without_framing(headers);
        if dropped > 0 {
            self.metrics.dropped_headers.add(dropped as u64);
            tracing::debug!(upstream = %step.binding.upstream(), plugin = %step.name, dropped, "plugin response headers that set framing or hop-by-hop fields were dropped");
        }
        headers
    }

    fn failed(&self, step: &Step, kind: PickErrorKind, message: &str) {
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
            let plugin = step.binding.plugin();
            tracing::warn!(
                upstream = %step.binding.upstream(),
                plugin = %plugin.name,
                origin = %plugin.origin,
                failure = ?kind,
                fallbacks = self.fallbacks(),
                "plugin call failed: {message}; the instance was discarded and the fallback round robin chose the backend"
            );
        }
    }

    /// Native round robin over healthy members not in `exclude` (no allocation).
    fn fallback(
        &self,
        pool: &PoolSnapshot,
        exclude: &[u32],
        response_headers: Vec<(String, String)>,
        why: Why,
    ) -> Choice {
        let eligible = |&(i, m): &(usize, &crate::pool::Member)| m.status.healthy() && !exclude.contains(&(i as u32));
        let n = pool.members.iter().enumerate().filter(eligible).count();
        if n == 0 {
            return Choice::NoBackend;
        }
        let turn = self.fallback_turn.fetch_add(1, Relaxed) as usize % n;
        let index = pool.members.iter().enumerate().filter(eligible).nth(turn).map_or(0, |(i, _)| i);
        Choice::Backend { index, response_headers, fallback: true, why }
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
