//! Host-held plugin state: counters and a key-value store with TTL, one namespace per
//! upstream, shared by every instance and kept across hot swaps.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

/// The state of one upstream's plugin.
#[derive(Debug, Default)]
pub struct Namespace {
    counters: RwLock<HashMap<String, Arc<AtomicI64>>>,
    kv: RwLock<HashMap<String, Entry>>,
    sweep: Mutex<u64>,
}

#[derive(Debug)]
struct Entry {
    value: String,
    /// Milliseconds since the epoch; 0 = never.
    expires_ms: u64,
}

/// At most this many keys; writes beyond it first drop expired keys, then are refused.
const KV_MAX_KEYS: usize = 1_000_000;

impl Namespace {
    /// The shared counter `key` (created at 0). Callers cache the `Arc`.
    pub fn counter(&self, key: &str) -> Arc<AtomicI64> {
        if let Some(c) = self.counters.read().unwrap_or_else(|e| e.into_inner()).get(key) {
            return c.clone();
        }
        self.counters.write().unwrap_or_else(|e| e.into_inner()).entry(key.to_owned()).or_default().clone()
    }

    /// Adds to a counter without a cache.
    pub fn counter_add(&self, key: &str, delta: i64) -> i64 {
        self.counter(key).fetch_add(delta, Ordering::Relaxed) + delta
    }

    /// Reads a key unless expired.
    pub fn kv_get(&self, key: &str, now_ms: u64) -> Option<String> {
        let kv = self.kv.read().unwrap_or_else(|e| e.into_inner());
        kv.get(key).filter(|e| e.expires_ms == 0 || e.expires_ms > now_ms).map(|e| e.value.clone())
    }

    /// Writes a key; `ttl_ms` = 0 keeps it forever.
    pub fn kv_set(&self, key: &str, value: &str, ttl_ms: u64, now_ms: u64) {
        let expires_ms = if ttl_ms == 0 { 0 } else { now_ms.saturating_add(ttl_ms) };
        let mut kv = self.kv.write().unwrap_or_else(|e| e.into_inner());
        if kv.len() >= KV_MAX_KEYS && !kv.contains_key(key) {
            kv.retain(|_, e| e.expires_ms == 0 || e.expires_ms > now_ms);
            if kv.len() >= KV_MAX_KEYS {
                return;
            }
        }
        kv.insert(key.to_owned(), Entry { value: value.to_owned(), expires_ms });
        drop(kv);
        self.maybe_sweep(now_ms);
    }

    /// Drops expired keys at most once a minute.
    fn maybe_sweep(&self, now_ms: u64) {
        let mut last = self.sweep.lock().unwrap_or_else(|e| e.into_inner());
        if now_ms.saturating_sub(*last) < 60_000 {
            return;
        }
        *last = now_ms;
        drop(last);
        self.kv.write().unwrap_or_else(|e| e.into_inner()).retain(|_, e| e.expires_ms == 0 || e.expires_ms > now_ms);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_shared_and_kv_expires() {
        let ns = Namespace::default();
        let c = ns.counter("rr");
        assert_eq!(ns.counter_add("rr", 1), 1);
        c.fetch_add(1, Ordering::Relaxed);
        assert_eq!(ns.counter_add("rr", 1), 3);
        ns.kv_set("k", "v", 100, 1_000);
        assert_eq!(ns.kv_get("k", 1_050).as_deref(), Some("v"));
        assert_eq!(ns.kv_get("k", 1_100), None);
        ns.kv_set("forever", "x", 0, 1_000);
        assert_eq!(ns.kv_get("forever", u64::MAX - 1).as_deref(), Some("x"));
    }
}
