//! Generated bindings for `wit/selector.wit` and the host side of its imports.

use super::shared::Namespace;
use crate::pool::PoolSnapshot;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};
use wasmtime::component::Resource;

mod gen_ {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "selector",
        with: { "gateway:selector/types.request": super::RequestRef },
    });
}

pub use gen_::Selector as SelectorBindings;
pub use gen_::SelectorPre;
pub use gen_::gateway::selector::types::{
    Backend as WitBackend, BackendStats as WitBackendStats, Decision as WitDecision,
};

/// The memory bound of one instance. Growing past it traps the call with an error that
/// says so (instead of the guest's own out-of-memory path, which in a WASI build ends in
/// a confusing "unknown import" trap when it tries to print).
#[derive(Debug, Clone, Copy)]
pub struct MemoryLimit {
    /// Bytes of linear memory the instance may grow to.
    pub bytes: usize,
}

/// Tables (function references) an instance may grow to: far above what any plugin uses.
const MAX_TABLE_ELEMENTS: usize = 1 << 20;

impl wasmtime::ResourceLimiter for MemoryLimit {
    fn memory_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        if desired > self.bytes {
            return Err(wasmtime::Error::msg(format!(
                "memory limit of {} MiB reached (it asked for {} MiB)",
                self.bytes >> 20,
                desired.div_ceil(1 << 20)
            )));
        }
        Ok(true)
    }

    fn table_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS)
    }
}

/// Response headers one `pick` may add; more are ignored (a plugin bug must not grow
/// a response without bound).
const MAX_RESPONSE_HEADERS: usize = 64;

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
    /// Set by `request.set-reject-body`.
    pub reject_body: Option<String>,
}

impl CurrentRequest {
    /// The request in `parts` from `client_ip`; `tried` as `request.tried` lists it.
    pub fn new(parts: http::request::Parts, client_ip: IpAddr, tried: &[u32]) -> Self {
        CurrentRequest { parts, client_ip, tried: tried.to_vec(), response_headers: Vec::new(), reject_body: None }
    }
}

/// What each plugin instance's store holds.
pub struct HostState {
    pub limits: MemoryLimit,
    pub namespace: Arc<Namespace>,
    /// Counters this instance used, looked up once (plugins use a handful of keys).
    pub counters: Vec<(String, Arc<AtomicI64>)>,
    pub request: Option<CurrentRequest>,
    /// The pool as last pushed to this instance; `stats(i)` reads it.
    pub pool: Option<Arc<PoolSnapshot>>,
    pub rng: u64,
    pub plugin: Arc<str>,
    pub upstream: Arc<str>,
}

impl HostState {
    pub fn new(limits: MemoryLimit, namespace: Arc<Namespace>, plugin: Arc<str>, upstream: Arc<str>) -> Self {
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
        }
    }

    pub fn add_to_linker(linker: &mut wasmtime::component::Linker<HostState>) -> wasmtime::Result<()> {
        SelectorBindings::add_to_linker::<HostState, wasmtime::component::HasSelf<HostState>>(linker, |s| s)
    }
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as u64
}

impl gen_::gateway::selector::host::Host for HostState {
    fn counter_add(&mut self, key: String, delta: i64) -> i64 {
        if let Some((_, c)) = self.counters.iter().find(|(k, _)| *k == key) {
            return c.fetch_add(delta, Ordering::Relaxed) + delta;
        }
        let c = self.namespace.counter(&key);
        let v = c.fetch_add(delta, Ordering::Relaxed) + delta;
        self.counters.push((key, c));
        v
    }

    fn kv_get(&mut self, key: String) -> Option<String> {
        self.namespace.kv_get(&key, now_ms())
    }

    fn kv_set(&mut self, key: String, value: String, ttl_ms: u64) {
        self.namespace.kv_set(&key, &value, ttl_ms, now_ms())
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
        let (plugin, upstream) = (&*self.plugin, &*self.upstream);
        match level {
            0 => tracing::trace!(plugin, upstream, "{message}"),
            1 => tracing::debug!(plugin, upstream, "{message}"),
            2 => tracing::info!(plugin, upstream, "{message}"),
            3 => tracing::warn!(plugin, upstream, "{message}"),
            _ => tracing::error!(plugin, upstream, "{message}"),
        }
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
        let r = self.req()?;
        r.parts.headers.get_all(http::header::COOKIE).iter().filter_map(|v| v.to_str().ok()).find_map(|line| {
            line.split(';').find_map(|c| {
                let (k, v) = c.trim().split_once('=')?;
                (k == name).then(|| v.trim_matches('"').to_owned())
            })
        })
    }

    fn query_param(&mut self, _: Resource<RequestRef>, name: String) -> Option<String> {
        let query = self.req()?.parts.uri.query()?;
        query.split('&').find_map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (k == name).then(|| v.to_owned())
        })
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
            r.reject_body = Some(text);
        }
    }

    fn drop(&mut self, _: Resource<RequestRef>) -> wasmtime::Result<()> {
        // The gateway only lends the request (`borrow<request>`); nothing to free.
        Ok(())
    }
}
