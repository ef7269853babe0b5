//! Generated bindings for `wit/selector.wit` and the host side of its imports.

use super::guest_log::{Admit, ERROR_LEVEL, LOG_LINES_PER_SECOND, LogLimiter, MAX_GUEST_ERROR_BYTES, keep_ends};
use super::reason::Reason;
use super::shared::Namespace;
use crate::pool::PoolSnapshot;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};
use wasmtime::AsContext as _;
use wasmtime::StoreContextMut;
use wasmtime::component::{HasSelf, Linker, Resource, WasmStr};

mod gen_ {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "selector",
        with: { "gateway:selector/types.request": super::RequestRef },
        // A new counter past the counters' byte cap fails the call.
        imports: { "gateway:selector/host.counter-add": trappable },
    });
}

pub use gen_::Selector as SelectorBindings;
pub use gen_::SelectorPre;
pub use gen_::gateway::selector::types::{
    Backend as WitBackend, BackendStats as WitBackendStats, Decision as WitDecision,
};

/// What one instance's store may hold: linear memory, table elements, and how many
/// core instances, tables and memories it may create (a component is several core
/// instances; a hostile one must not make thousands). Reaching a limit traps the call
/// (or fails instantiation) with an error that says which limit, instead of the guest's
/// own out-of-memory path, which in a WASI build ends in a confusing "unknown import"
/// trap when it tries to print.
#[derive(Debug, Clone, Copy)]
pub struct StoreLimits {
    /// Bytes of linear memory one memory may grow to.
    pub memory_bytes: usize,
}

/// Elements one table may grow to. CPython and StarlingMonkey components start with
/// tables of a few thousand to a few tens of thousands of functions.
pub const MAX_TABLE_ELEMENTS: usize = 1 << 18;
/// Core instances per store: the guest-language components have under 20.
pub const MAX_INSTANCES: usize = 64;
/// Tables per store.
pub const MAX_TABLES: usize = 64;
/// Linear memories per store (each bounded by `memory_bytes`).
pub const MAX_MEMORIES: usize = 8;

impl wasmtime::ResourceLimiter for StoreLimits {
    fn memory_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        if desired > self.memory_bytes {
            return Err(wasmtime::Error::msg(format!(
                "memory limit of {} MiB reached (it asked for {} MiB)",
                self.memory_bytes >> 20,
                desired.div_ceil(1 << 20)
            )));
        }
        Ok(true)
    }

    fn table_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        if desired > MAX_TABLE_ELEMENTS {
            return Err(wasmtime::Error::msg(format!(
                "table limit of {MAX_TABLE_ELEMENTS} elements reached (it asked for {desired})"
            )));
        }
        Ok(true)
    }

    fn instances(&self) -> usize {
        MAX_INSTANCES
    }

    fn tables(&self) -> usize {
        MAX_TABLES
    }

    fn memories(&self) -> usize {
        MAX_MEMORIES
    }
}

/// Response headers one `pick` may add.
pub const MAX_RESPONSE_HEADERS: usize = 64;
/// Bytes (names plus values) of the response headers one `pick` may add.
pub const MAX_RESPONSE_HEADER_BYTES: usize = 16 * 1024;
/// Bytes of the body of one reject.
pub const MAX_REJECT_BODY_BYTES: usize = 64 * 1024;
/// Bytes of the reason `configure` gives for refusing its params; longer ones are cut.
pub const MAX_REASON_BYTES: usize = 1024;
/// Bytes of one `log` message; longer ones are cut (and say so).
pub const MAX_LOG_BYTES: usize = 4 * 1024;
/// Bytes of one key-value key, and of one value.
pub const MAX_KV_KEY_BYTES: usize = 1024;
/// Bytes of one key-value value.
pub const MAX_KV_VALUE_BYTES: usize = 64 * 1024;

/// A `pick` handed back more than the gateway takes (too many or too large response
/// headers, a reject body over its limit): the call is stopped there and counts as a bad
/// answer. The guest's string is measured in its own memory and never copied.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct AnswerTooLarge(pub String);

/// The plugin's host-held state (key-value store, counters) reached its byte cap, or a
/// key or value is over its size: the call that asked for more fails.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct StateFull(pub String);

/// The only request a plugin can see: the one being routed by the current `pick`.
pub struct RequestRef;

/// The request being routed, moved into the store for the length of one `pick`.
#[derive(Debug)]
pub struct CurrentRequest {
    pub parts: http::request::Parts,
    pub client_ip: IpAddr,
    /// Backends earlier attempts tried (`request.tried`).
    pub tried: Vec<u32>,
    /// Set by `request.add-response-header`.
    pub response_headers: Vec<(String, String)>,
    /// Bytes of `response_headers` (names and values).
    pub response_header_bytes: usize,
    /// Set by `request.set-reject-body`.
    pub reject_body: Option<String>,
    /// Set by `request.set-reason` (nothing is allocated unless it is).
    pub reason: Option<Reason>,
}

impl CurrentRequest {
    /// The request in `parts` from `client_ip`; `tried` as `request.tried` lists it.
    pub fn new(parts: http::request::Parts, client_ip: IpAddr, tried: &[u32]) -> Self {
        CurrentRequest {
            parts,
            client_ip,
            tried: tried.to_vec(),
            response_headers: Vec::new(),
            response_header_bytes: 0,
            reject_body: None,
            reason: None,
        }
    }
}

/// What each plugin instance's store holds.
pub struct HostState {
    pub limits: StoreLimits,
    pub namespace: Arc<Namespace>,
    /// Counters this instance used, looked up once (plugins use a handful of keys).
    pub counters: Vec<(String, Arc<AtomicI64>)>,
    pub request: Option<CurrentRequest>,
    /// The pool as last pushed to this instance; `stats(i)` reads it.
    pub pool: Option<Arc<PoolSnapshot>>,
    pub rng: u64,
    pub plugin: Arc<str>,
    pub upstream: Arc<str>,
    /// The rate limit of this upstream's plugin's log lines (shared by its instances).
    pub log_limit: Arc<LogLimiter>,
    /// The text of the last error-level `log` of the current call (bounded): what the
    /// plugin said went wrong, for the message of a trap that follows.
    pub guest_error: Option<String>,
}

impl HostState {
    pub fn new(
        limits: StoreLimits,
        namespace: Arc<Namespace>,
        plugin: Arc<str>,
        upstream: Arc<str>,
        log_limit: Arc<LogLimiter>,
    ) -> Self {
        let seed = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_nanos() as u64;
        HostState {
            limits,
            namespace,
            counters: Vec::new(),
            request: None,
            pool: None,
            rng: seed ^ 0x9E37_79B9_7F4A_7C15 ^ (Arc::as_ptr(&plugin) as *const u8 as u64),
            plugin,
            upstream,
            log_limit,
            guest_error: None,
        }
    }

    /// A call into the guest begins: what an earlier call logged says nothing about it.
    #[inline]
    pub fn begin_call(&mut self) {
        if self.guest_error.is_some() {
            self.guest_error = None;
        }
    }

    pub fn add_to_linker(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
        SelectorBindings::add_to_linker::<HostState, HasSelf<HostState>>(linker, |s| s)?;
        // The functions that take a string of the plugin's choosing to keep are defined
        // again over the generated ones: each string is measured where it lies, in the
        // guest's memory, and copied only within its limit. (The generated versions copy
        // first: a plugin could make the gateway copy a 100 MB reject body, only to
        // refuse it.)
        linker.allow_shadowing(true);
        let mut types = linker.instance(super::TYPES)?;
        types.func_wrap(
            "[method]request.add-response-header",
            |mut store: StoreContextMut<'_, HostState>, (_, name, value): (Resource<RequestRef>, WasmStr, WasmStr)| {
                let (count, bytes) = store
                    .data()
                    .request
                    .as_ref()
                    .map_or((0, 0), |r| (r.response_headers.len(), r.response_header_bytes));
                if count >= MAX_RESPONSE_HEADERS {
                    return Err(AnswerTooLarge(format!(
                        "request.add-response-header: more than {MAX_RESPONSE_HEADERS} response headers"
                    ))
                    .into());
                }
                let left = MAX_RESPONSE_HEADER_BYTES - bytes;
                let name = bounded(&store, &name, left, "request.add-response-header", "response headers")?;
                let value =
                    bounded(&store, &value, left - name.len(), "request.add-response-header", "response headers")?;
                if let Some(r) = store.data_mut().request.as_mut() {
                    r.response_header_bytes += name.len() + value.len();
                    r.response_headers.push((name, value));
                }
                Ok(())
            },
        )?;
        types.func_wrap(
            "[method]request.set-reject-body",
            |mut store: StoreContextMut<'_, HostState>, (_, text): (Resource<RequestRef>, WasmStr)| {
                let text = bounded(&store, &text, MAX_REJECT_BODY_BYTES, "request.set-reject-body", "a reject body")?;
                if let Some(r) = store.data_mut().request.as_mut() {
                    r.reject_body = Some(text);
                }
                Ok(())
            },
        )?;
        types.func_wrap(
            "[method]request.set-reason",
            |mut store: StoreContextMut<'_, HostState>, (_, text): (Resource<RequestRef>, WasmStr)| {
                // Read where it lies; only the kept bytes are copied.
                let reason = Reason::new(&text.to_str(store.as_context())?);
                if let Some(r) = store.data_mut().request.as_mut() {
                    r.reason = Some(reason);
                }
                Ok(())
            },
        )?;
        let mut host = linker.instance(super::IMPORT)?;
        host.func_wrap(
            "kv-set",
            |mut store: StoreContextMut<'_, HostState>, (key, value, ttl_ms): (WasmStr, WasmStr, u64)| {
                let too_big = |e: AnswerTooLarge| StateFull(e.0);
                let key = bounded(&store, &key, MAX_KV_KEY_BYTES, "kv-set", "a key").map_err(too_big)?;
                let value = bounded(&store, &value, MAX_KV_VALUE_BYTES, "kv-set", "a value").map_err(too_big)?;
                let state = store.data_mut();
                state
                    .namespace
                    .kv_set(&key, &value, ttl_ms, now_ms())
                    .map_err(|e| StateFull(format!("kv-set: {e}")))?;
                Ok(())
            },
        )?;
        host.func_wrap("log", |mut store: StoreContextMut<'_, HostState>, (level, message): (u8, WasmStr)| {
            let text = message.to_str(store.as_context())?;
            // An error's beginning and end, from the whole text: a traceback names the
            // exception last.
            let error = (level >= ERROR_LEVEL).then(|| keep_ends(text.trim_end(), MAX_GUEST_ERROR_BYTES));
            let message = cut(&text, MAX_LOG_BYTES).into_owned();
            let state = store.data_mut();
            if error.is_some() {
                state.guest_error = error;
            }
            state.write_log(level, message);
            Ok(())
        })?;
        linker.allow_shadowing(false);
        Ok(())
    }

    /// Writes the plugin's log line, unless the plugin is over its rate
    /// ([`LOG_LINES_PER_SECOND`]); then it is counted, and the count is written with the
    /// next line that passes. Lines the log filter leaves out do not count.
    fn write_log(&mut self, level: u8, message: String) {
        let (plugin, upstream) = (&*self.plugin, &*self.upstream);
        let enabled = match level {
            0 => tracing::enabled!(tracing::Level::TRACE),
            1 => tracing::enabled!(tracing::Level::DEBUG),
            2 => tracing::enabled!(tracing::Level::INFO),
            3 => tracing::enabled!(tracing::Level::WARN),
            _ => tracing::enabled!(tracing::Level::ERROR),
        };
        if !enabled {
            return;
        }
        match self.log_limit.admit() {
            Admit::Drop => return,
            Admit::Write { dropped: 0 } => {}
            Admit::Write { dropped } => tracing::warn!(
                plugin,
                upstream,
                dropped,
                "{dropped} log lines of this plugin were dropped: at most {LOG_LINES_PER_SECOND} a second are written"
            ),
        }
        match level {
            0 => tracing::trace!(plugin, upstream, "{message}"),
            1 => tracing::debug!(plugin, upstream, "{message}"),
            2 => tracing::info!(plugin, upstream, "{message}"),
            3 => tracing::warn!(plugin, upstream, "{message}"),
            _ => tracing::error!(plugin, upstream, "{message}"),
        }
    }
}

/// The guest's string `text` copied out if it is at most `max` bytes; else the error
/// that `call` handed over more than the gateway takes for `what`.
fn bounded(
    store: &StoreContextMut<'_, HostState>,
    text: &WasmStr,
    max: usize,
    call: &str,
    what: &str,
) -> Result<String, AnswerTooLarge> {
    // Borrowed from the guest's memory (validated as UTF-8 there), not copied.
    let s = text.to_str(store.as_context()).map_err(|e| AnswerTooLarge(format!("{call}: {e}")))?;
    if s.len() > max {
        return Err(AnswerTooLarge(format!("{call}: {what} of {} bytes, over the limit of {max} bytes", s.len())));
    }
    Ok(s.into_owned())
}

/// `text` cut to at most `max` bytes (at a character boundary), saying so.
pub(super) fn cut(text: &str, max: usize) -> std::borrow::Cow<'_, str> {
    if text.len() <= max {
        return text.into();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}... (cut at {end} of {} bytes)", &text[..end], text.len()).into()
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as u64
}

// The generated host traits. `kv-set`, `log`, `add-response-header`,
// `set-reject-body` and `set-reason` are replaced in `add_to_linker` by versions that bound the guest's
// strings before copying them; the trait versions below are never called.
impl gen_::gateway::selector::host::Host for HostState {
    fn counter_add(&mut self, key: String, delta: i64) -> wasmtime::Result<i64> {
        if let Some((_, c)) = self.counters.iter().find(|(k, _)| *k == key) {
            return Ok(c.fetch_add(delta, Ordering::Relaxed) + delta);
        }
        if key.len() > MAX_KV_KEY_BYTES {
            return Err(StateFull(format!(
                "counter-add: a key of {} bytes, over the limit of {MAX_KV_KEY_BYTES} bytes",
                key.len()
            ))
            .into());
        }
        let c = self.namespace.counter(&key).map_err(|e| StateFull(format!("counter-add: {e}")))?;
        let v = c.fetch_add(delta, Ordering::Relaxed) + delta;
        // Plugins use a handful of keys; a plugin making up new ones is not helped by this
        // cache, so it stays small.
        if self.counters.len() < 16 {
            self.counters.push((key, c));
        }
        Ok(v)
    }

    fn kv_get(&mut self, key: String) -> Option<String> {
        self.namespace.kv_get(&key, now_ms())
    }

    fn kv_set(&mut self, key: String, value: String, ttl_ms: u64) {
        let _ = self.namespace.kv_set(&key, &value, ttl_ms, now_ms());
    }

    fn stats(&mut self, index: u32) -> WitBackendStats {
        let member = self.pool.as_ref().and_then(|p| p.get(index as usize));
        match member {
            Some(m) => WitBackendStats {
                active_requests: m.entry.stats.active(),
                ewma_latency_us: m.entry.stats.ewma_latency_us(),
                consecutive_failures: m.entry.stats.consecutive_failures(),
                measured_at_ms: m.entry.stats.measured_at_ms(),
            },
            None => {
                WitBackendStats { active_requests: 0, ewma_latency_us: 0, consecutive_failures: 0, measured_at_ms: 0 }
            }
        }
    }

    fn now_ms(&mut self) -> u64 {
        now_ms()
    }

    fn random_u64(&mut self) -> u64 {
        // xorshift64*: fast, per instance, good enough for load balancing.
        let mut x = self.rng;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn log(&mut self, level: u8, message: String) {
        if level >= ERROR_LEVEL {
            self.guest_error = Some(keep_ends(message.trim_end(), MAX_GUEST_ERROR_BYTES));
        }
        self.write_log(level, message);
    }
}

impl gen_::gateway::selector::types::Host for HostState {}

impl HostState {
    fn req(&self) -> Option<&CurrentRequest> {
        self.request.as_ref()
    }

    fn header_str(&self, name: &str) -> Option<&str> {
        self.req()?.parts.headers.get(name)?.to_str().ok()
    }
}

impl gen_::gateway::selector::types::HostRequest for HostState {
    fn method(&mut self, _: Resource<RequestRef>) -> String {
        self.req().map(|r| r.parts.method.as_str().to_owned()).unwrap_or_default()
    }

    fn path(&mut self, _: Resource<RequestRef>) -> String {
        self.req()
            .and_then(|r| r.parts.uri.path_and_query())
            .map(|p| p.as_str().to_owned())
            .unwrap_or_else(|| "/".into())
    }

    fn authority(&mut self, _: Resource<RequestRef>) -> Option<String> {
        let r = self.req()?;
        r.parts
            .uri
            .authority()
            .map(|a| a.as_str().to_owned())
            .or_else(|| r.parts.headers.get(http::header::HOST)?.to_str().ok().map(str::to_owned))
    }

    fn header(&mut self, _: Resource<RequestRef>, name: String) -> Option<String> {
        self.header_str(&name).map(str::to_owned)
    }

    fn cookie(&mut self, _: Resource<RequestRef>, name: String) -> Option<String> {
        super::lookup::cookie(&self.req()?.parts.headers, &name)
    }

    fn query_param(&mut self, _: Resource<RequestRef>, name: String) -> Option<String> {
        super::lookup::query_param(self.req()?.parts.uri.query()?, &name).map(str::to_owned)
    }

    fn client_ip(&mut self, _: Resource<RequestRef>) -> String {
        self.req().map(|r| r.client_ip.to_string()).unwrap_or_default()
    }

    fn tried(&mut self, _: Resource<RequestRef>) -> Vec<u32> {
        self.req().map(|r| r.tried.clone()).unwrap_or_default()
    }

    fn add_response_header(&mut self, _: Resource<RequestRef>, name: String, value: String) {
        if let Some(r) = self.request.as_mut()
            && r.response_headers.len() < MAX_RESPONSE_HEADERS
        {
            r.response_headers.push((name, value));
        }
    }

    fn set_reject_body(&mut self, _: Resource<RequestRef>, text: String) {
        if let Some(r) = self.request.as_mut() {
            r.reject_body = Some(cut(&text, MAX_REJECT_BODY_BYTES).into_owned());
        }
    }

    fn set_reason(&mut self, _: Resource<RequestRef>, text: String) {
        if let Some(r) = self.request.as_mut() {
            r.reason = Some(Reason::new(&text));
        }
    }

    fn drop(&mut self, _: Resource<RequestRef>) -> wasmtime::Result<()> {
        // The gateway only lends the request (`borrow<request>`); nothing to free.
        Ok(())
    }
}
