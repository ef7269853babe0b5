//! The metric handles the gateway's parts hold: per backend (in its pool entry), per
//! upstream and per route (kept by name across config reloads), and process-wide.

use super::{Counter, Decision, Histogram, PerWorker};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

/// What one worker counted for one backend.
#[derive(Debug, Default)]
pub struct BackendShard {
    /// Responses by status class (see [`super::class`]).
    pub requests: [Counter; 5],
    /// Request body bytes sent to the backend.
    pub bytes_in: Counter,
    /// Response body bytes sent from the backend to the client.
    pub bytes_out: Counter,
    /// Request sent → response headers.
    pub latency: Histogram,
}

/// Metrics of one backend; lives in its pool entry, so it survives pool changes and
/// config reloads that keep the backend.
#[derive(Debug, Default)]
pub struct BackendMetrics {
    /// Written by the workers.
    pub shards: PerWorker<BackendShard>,
    /// Written by the health checker.
    pub health: HealthMetrics,
    /// When the backend's state (up/down/ejected/drained) last changed, ms since the
    /// Unix epoch (0: never).
    pub state_since_ms: AtomicU64,
    /// The last request that failed on it (connect error, 5xx, timeout): when (ms since
    /// the Unix epoch) and why. Written on failures only; shown by the admin API, since
    /// the client's 502/504 body does not carry it.
    pub last_failure: Mutex<Option<(u64, String)>>,
}

/// Health-check results of one backend (written by the health task only).
#[derive(Debug, Default)]
pub struct HealthMetrics {
    /// Transitions to up.
    pub to_up: Counter,
    /// Transitions to down.
    pub to_down: Counter,
    /// Failed checks.
    pub failures: Counter,
    /// Passive ejections.
    pub ejections: Counter,
    /// Duration of each active check.
    pub duration: Histogram,
    /// The last check.
    pub last: Mutex<Option<LastCheck>>,
}

/// One active check's result.
#[derive(Debug, Clone)]
pub struct LastCheck {
    /// Passed.
    pub ok: bool,
    /// When, ms since the Unix epoch.
    pub at_ms: u64,
    /// How long it took.
    pub duration: Duration,
    /// Why it failed.
    pub error: Option<String>,
}

impl HealthMetrics {
    /// Records a check's result.
    pub fn record(&self, duration: Duration, error: Option<String>) {
        self.duration.observe(duration);
        if error.is_some() {
            self.failures.inc();
        }
        let check = LastCheck { ok: error.is_none(), at_ms: now_ms(), duration, error };
        *self.last.lock().unwrap_or_else(|e| e.into_inner()) = Some(check);
    }

    /// The last check, if any.
    pub fn last(&self) -> Option<LastCheck> {
        self.last.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl BackendMetrics {
    /// Notes a failed request and why.
    pub fn last_failure(&self, reason: &str) {
        *self.last_failure.lock().unwrap_or_else(|e| e.into_inner()) = Some((now_ms(), reason.to_owned()));
    }

    /// Notes that the backend's state changed now.
    pub fn state_changed(&self) {
        self.state_since_ms.store(now_ms(), Relaxed);
    }
}

/// Why a request was retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryReason {
    /// The connection to the backend failed.
    ConnectFailed = 0,
    /// The backend answered 5xx.
    Status5xx = 1,
    /// No response headers in time.
    Timeout = 2,
    /// The connection broke after the request went out.
    Error = 3,
    /// The backend went down (health check or ejection) while the request waited for
    /// its response headers.
    BackendDown = 4,
}

impl RetryReason {
    /// Label values, by discriminant.
    pub const LABELS: [&'static str; 5] = ["connect_failed", "5xx", "timeout", "error", "backend_down"];
}

/// What one worker counted for one upstream.
#[derive(Debug, Default)]
pub struct UpstreamShard {
    /// Decisions asked of the plugin.
    pub decisions: Counter,
    /// Time of a sample of the decisions (1 in [`DECISION_SAMPLE`]).
    pub decision_time: Histogram<Decision>,
    /// Retries by [`RetryReason`].
    pub retries: [Counter; RetryReason::LABELS.len()],
    /// Retries not made because the upstream's retry budget was spent.
    pub retries_skipped: Counter,
}

/// One decision in this many is timed.
pub const DECISION_SAMPLE: u64 = 16;

/// Metrics of one upstream, kept by name across config reloads.
#[derive(Debug, Default)]
pub struct UpstreamMetrics {
    /// Written by the workers.
    pub shards: PerWorker<UpstreamShard>,
    /// Decisions the fallback made because the plugin failed.
    pub fallbacks: Counter,
    /// Plugin failures by [`UpstreamMetrics::FAILURE_KINDS`].
    pub failures: [Counter; 4],
    /// Response headers a plugin set that would change framing (dropped).
    pub dropped_headers: Counter,
}

impl UpstreamMetrics {
    /// Label values of `failures`.
    pub const FAILURE_KINDS: [&'static str; 4] = ["trap", "timeout", "bad_answer", "instantiate"];
}

/// What one worker counted for one route.
#[derive(Debug, Default)]
pub struct RouteShard {
    /// Responses by status class.
    pub requests: [Counter; 5],
    /// Request received → response headers sent.
    pub duration: Histogram,
}

/// Metrics of one route, kept by name across config reloads.
#[derive(Debug, Default)]
pub struct RouteMetrics {
    /// Written by the workers.
    pub shards: PerWorker<RouteShard>,
}

/// Why the gateway answered a request itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Generated {
    /// No route matched (404).
    NoRoute = 0,
    /// No healthy backend was left to try (503).
    NoHealthyBackend = 1,
    /// The backend failed (502).
    BackendFailed = 2,
    /// The backend sent no response headers in time (504).
    BackendTimeout = 3,
    /// The plugin rejected the request with a status of its own.
    PluginReject = 4,
    /// The request was malformed (400, 431: answered by the HTTP library; 400 for a
    /// path with an encoded slash).
    BadRequest = 5,
    /// The request body is larger than the route's `max_body_bytes` (413).
    BodyTooLarge = 6,
    /// The route's total request timeout fired before response headers (504).
    RequestTimeout = 7,
    /// A redirect listener sent the client to HTTPS (308).
    HttpsRedirect = 8,
    /// The gateway could not open a backend connection: it is out of file descriptors
    /// (503). Not counted against the backend.
    OutOfDescriptors = 9,
    /// The request body stalled for longer than the listener's `limits.body_timeout`
    /// before a response started (408).
    BodyTimeout = 10,
}

impl Generated {
    /// Label values, by discriminant.
    pub const LABELS: [&'static str; 11] = [
        "no_route",
        "no_healthy_backend",
        "backend_failed",
        "backend_timeout",
        "plugin_reject",
        "bad_request",
        "body_too_large",
        "request_timeout",
        "https_redirect",
        "out_of_descriptors",
        "body_timeout",
    ];
}

/// Why the gateway closed a client connection itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closed {
    /// The request head (or the TLS handshake) took longer than `header_timeout`.
    HeaderTimeout = 0,
    /// No request and no bytes for `idle_timeout`.
    IdleTimeout = 1,
    /// The TLS handshake failed (no common protocol or cipher, not TLS, ...).
    TlsHandshake = 2,
}

impl Closed {
    /// Label values, by discriminant.
    pub const LABELS: [&'static str; 3] = ["header_timeout", "idle_timeout", "tls_handshake_failed"];
}

/// What one worker counted for the whole gateway.
#[derive(Debug, Default)]
pub struct GlobalShard {
    /// Requests being handled (up and down on the same thread).
    pub in_flight: AtomicU64,
    /// Client connections accepted.
    pub connections: Counter,
    /// Requests received.
    pub requests: Counter,
    /// Responses the gateway made itself, by [`Generated`] reason and status class.
    pub generated: [[Counter; 5]; Generated::LABELS.len()],
    /// Connections closed because a PROXY protocol listener got no valid header.
    pub proxy_protocol_refused: Counter,
    /// Client connections the gateway closed, by [`Closed`] reason.
    pub closed: [Counter; 3],
    /// Times a listener was at `max_connections` (or the cap the open-file limit sets)
    /// and left new connections waiting in the accept backlog.
    pub at_connection_limit: Counter,
    /// `accept` failed because the process (EMFILE) or the system (ENFILE) is out of
    /// file descriptors; the accept loop backed off.
    pub accept_out_of_descriptors: Counter,
}

impl GlobalShard {
    /// Counts a response the gateway made itself.
    #[inline]
    pub fn generated(&self, reason: Generated, status: u16) {
        self.generated[reason as usize][super::class(status)].inc();
    }
}

/// Process-wide metrics written by the workers.
pub fn global() -> &'static PerWorker<GlobalShard> {
    static GLOBAL: OnceLock<PerWorker<GlobalShard>> = OnceLock::new();
    GLOBAL.get_or_init(PerWorker::default)
}

/// Metrics written off the request path (plugin swaps, config reloads): plain maps
/// behind a mutex, touched a few times a minute at most.
#[derive(Debug, Default)]
pub struct Control {
    /// Hot swaps by (plugin, result).
    pub swaps: Mutex<BTreeMap<(String, &'static str), u64>>,
    /// Config reloads that were applied.
    pub reloads_ok: Counter,
    /// Config reloads that were refused.
    pub reloads_refused: Counter,
    /// TLS certificate reloads that were applied.
    pub cert_reloads_ok: Counter,
    /// TLS certificate reloads that were refused (the previous certificate kept serving).
    pub cert_reloads_refused: Counter,
    /// When the last reload was applied (or the config first loaded), ms since the epoch.
    pub last_reload_success_ms: AtomicU64,
    /// Upstream metrics by name, so a reload keeps them.
    upstreams: Mutex<BTreeMap<String, Arc<UpstreamMetrics>>>,
    /// Route metrics by name, so a reload keeps them.
    routes: Mutex<BTreeMap<String, Arc<RouteMetrics>>>,
}

impl Control {
    /// Counts a hot swap of `plugin` (`result`: `ok` or `refused`).
    pub fn swap(&self, plugin: &str, result: &'static str) {
        *self.swaps.lock().unwrap_or_else(|e| e.into_inner()).entry((plugin.to_owned(), result)).or_default() += 1;
    }

    /// The metrics of the upstream `name` (the same ones after a reload).
    pub fn upstream(&self, name: &str) -> Arc<UpstreamMetrics> {
        self.upstreams.lock().unwrap_or_else(|e| e.into_inner()).entry(name.to_owned()).or_default().clone()
    }

    /// The metrics of the route `name` (the same ones after a reload).
    pub fn route(&self, name: &str) -> Arc<RouteMetrics> {
        self.routes.lock().unwrap_or_else(|e| e.into_inner()).entry(name.to_owned()).or_default().clone()
    }

    /// Forgets upstreams and routes a reload removed (their series leave `/metrics`).
    pub fn retain(&self, upstreams: &[&str], routes: &[&str]) {
        self.upstreams.lock().unwrap_or_else(|e| e.into_inner()).retain(|k, _| upstreams.contains(&k.as_str()));
        self.routes.lock().unwrap_or_else(|e| e.into_inner()).retain(|k, _| routes.contains(&k.as_str()));
    }
}

/// Process-wide metrics written off the request path.
pub fn control() -> &'static Control {
    static CONTROL: OnceLock<Control> = OnceLock::new();
    CONTROL.get_or_init(Control::default)
}

/// Now, ms since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_millis() as u64
}
