//! Host-held plugin state: counters and a key-value store with TTL, one namespace per
//! upstream, shared by every instance and kept across hot swaps.
//!
//! Both are bounded in bytes (keys, values and a fixed overhead per entry), not only in
//! keys: a write past the cap is refused with a message the plugin's call fails with.
//! Expired keys are dropped a few at a time by the writes themselves (a cursor walks the
//! store, 8 entries per write, as Redis's active expiry does), so no write ever sweeps
//! the whole store under its lock.

use indexmap::IndexMap;
use std::collections::HashMap;
use std::sync::atomic::AtomicI64;
use std::sync::{Arc, RwLock};

/// Byte caps of one namespace.
#[derive(Debug, Clone, Copy)]
pub struct StateLimits {
    /// Keys, values and per-entry overhead of the key-value store.
    pub kv_bytes: usize,
    /// Keys and per-counter overhead of the counters.
    pub counter_bytes: usize,
}

impl Default for StateLimits {
    fn default() -> Self {
        StateLimits { kv_bytes: 64 << 20, counter_bytes: 1 << 20 }
    }
}

/// What an entry costs beyond its key and value: the map slot, two string headers, the
/// expiry (an estimate; it keeps a store of empty keys from being free).
const KV_ENTRY_OVERHEAD: usize = 64;
/// What a counter costs beyond its key: the map slot, the string header, the `Arc`.
const COUNTER_OVERHEAD: usize = 64;
/// Entries a write looks at for expiry.
const EXPIRE_STEP: usize = 8;
/// Entries a write that would overflow looks at for expiry before it is refused.
const EXPIRE_STEP_WHEN_FULL: usize = 64;

/// The state of one upstream's plugin.
#[derive(Debug, Default)]
pub struct Namespace {
    limits: StateLimits,
    counters: RwLock<Counters>,
    kv: RwLock<Kv>,
}

#[derive(Debug, Default)]
struct Counters {
    map: HashMap<String, Arc<AtomicI64>>,
    bytes: usize,
}

#[derive(Debug, Default)]
struct Kv {
    map: IndexMap<String, Entry>,
    bytes: usize,
    /// Where the incremental expiry continues.
    cursor: usize,
}

#[derive(Debug)]
struct Entry {
    value: String,
    /// Milliseconds since the epoch; 0 = never.
    expires_ms: u64,
}

impl Entry {
    fn live(&self, now_ms: u64) -> bool {
        self.expires_ms == 0 || self.expires_ms > now_ms
    }
}

fn kv_cost(key: &str, value: &str) -> usize {
    key.len() + value.len() + KV_ENTRY_OVERHEAD
}

impl Kv {
    /// Looks at up to `n` entries from the cursor and drops the expired ones.
    fn expire_some(&mut self, now_ms: u64, n: usize) {
        for _ in 0..n {
            if self.map.is_empty() {
                return;
            }
            if self.cursor >= self.map.len() {
                self.cursor = 0;
            }
            let (key, entry) = self.map.get_index(self.cursor).expect("cursor is in range");
            if entry.live(now_ms) {
                self.cursor += 1;
            } else {
                self.bytes -= kv_cost(key, &entry.value);
                // The last entry moves into the cursor's place: look at it next.
                self.map.swap_remove_index(self.cursor);
            }
        }
    }
}

impl Namespace {
    /// An empty namespace bounded by `limits`.
    pub fn new(limits: StateLimits) -> Self {
        Namespace { limits, ..Default::default() }
    }

    /// The shared counter `key` (created at 0). Callers cache the `Arc`. Fails when a new
    /// counter would take the counters past their byte cap.
    pub fn counter(&self, key: &str) -> Result<Arc<AtomicI64>, String> {
        if let Some(c) = self.counters.read().unwrap_or_else(|e| e.into_inner()).map.get(key) {
            return Ok(c.clone());
        }
        let mut counters = self.counters.write().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = counters.map.get(key) {
            return Ok(c.clone());
        }
        let cost = key.len() + COUNTER_OVERHEAD;
        if counters.bytes + cost > self.limits.counter_bytes {
            return Err(format!(
                "the counters are full: {} counters take {} of {} bytes (plugins.counters_limit_kib); a new counter with a {}-byte key was refused",
                counters.map.len(),
                counters.bytes,
                self.limits.counter_bytes,
                key.len()
            ));
        }
        counters.bytes += cost;
        let c = Arc::new(AtomicI64::new(0));
        counters.map.insert(key.to_owned(), c.clone());
        Ok(c)
    }

    /// Reads a key unless expired.
    pub fn kv_get(&self, key: &str, now_ms: u64) -> Option<String> {
        let kv = self.kv.read().unwrap_or_else(|e| e.into_inner());
        kv.map.get(key).filter(|e| e.live(now_ms)).map(|e| e.value.clone())
    }

    /// Writes a key; `ttl_ms` = 0 keeps it forever. Fails when the store would grow past
    /// its byte cap (after dropping what expired).
    pub fn kv_set(&self, key: &str, value: &str, ttl_ms: u64, now_ms: u64) -> Result<(), String> {
        let expires_ms = if ttl_ms == 0 { 0 } else { now_ms.saturating_add(ttl_ms) };
        let mut kv = self.kv.write().unwrap_or_else(|e| e.into_inner());
        kv.expire_some(now_ms, EXPIRE_STEP);
        let cost = kv_cost(key, value);
        let fits = |kv: &Kv| {
            let old = kv.map.get(key).map_or(0, |e| kv_cost(key, &e.value));
            kv.bytes - old + cost <= self.limits.kv_bytes
        };
        if !fits(&kv) {
            kv.expire_some(now_ms, EXPIRE_STEP_WHEN_FULL);
            if !fits(&kv) {
                return Err(format!(
                    "the key-value store is full: {} keys take {} of {} bytes (plugins.kv_limit_mib); kv-set of a {}-byte key and a {}-byte value was refused",
                    kv.map.len(),
                    kv.bytes,
                    self.limits.kv_bytes,
                    key.len(),
                    value.len()
                ));
            }
        }
        let entry = Entry { value: value.to_owned(), expires_ms };
        match kv.map.get_mut(key) {
            Some(old) => {
                let old_value = std::mem::replace(old, entry).value;
                kv.bytes = kv.bytes - kv_cost(key, &old_value) + cost;
            }
            None => {
                kv.map.insert(key.to_owned(), entry);
                kv.bytes += cost;
            }
        }
        Ok(())
    }

    /// Bytes the key-value store and the counters hold (for the admin API).
    pub fn bytes(&self) -> (usize, usize) {
        let kv = self.kv.read().unwrap_or_else(|e| e.into_inner()).bytes;
        let counters = self.counters.read().unwrap_or_else(|e| e.into_inner()).bytes;
        (kv, counters)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;

    #[test]
    fn counters_are_shared_and_kv_expires() {
        let ns = Namespace::default();
        let c = ns.counter("rr").unwrap();
        let add = |k| ns.counter(k).unwrap().fetch_add(1, Ordering::Relaxed) + 1;
        assert_eq!(add("rr"), 1);
        c.fetch_add(1, Ordering::Relaxed);
        assert_eq!(add("rr"), 3);
        ns.kv_set("k", "v", 100, 1_000).unwrap();
        assert_eq!(ns.kv_get("k", 1_050).as_deref(), Some("v"));
        assert_eq!(ns.kv_get("k", 1_100), None);
        ns.kv_set("forever", "x", 0, 1_000).unwrap();
        assert_eq!(ns.kv_get("forever", u64::MAX - 1).as_deref(), Some("x"));
    }

    #[test]
    fn the_store_is_bounded_in_bytes_and_expired_keys_make_room_a_few_at_a_time() {
        let ns = Namespace::new(StateLimits { kv_bytes: 100 * (10 + 100 + KV_ENTRY_OVERHEAD), counter_bytes: 150 });
        let value = "v".repeat(100);
        for i in 0..100 {
            ns.kv_set(&format!("key-{i:06}"), &value, 1_000, 0).unwrap();
        }
        let err = ns.kv_set("key-000100", &value, 1_000, 0).unwrap_err();
        assert!(err.starts_with("the key-value store is full: 100 keys take 17400 of 17400 bytes"), "{err}");
        // Overwriting a key with a value of the same size still fits.
        ns.kv_set("key-000007", &value, 1_000, 0).unwrap();
        // Once they expire, writes reclaim them (each looks at 8, or 72 when full).
        for i in 100..200 {
            ns.kv_set(&format!("key-{i:06}"), &value, 1_000, 5_000).unwrap();
        }
        assert_eq!(ns.bytes().0, 100 * (10 + 100 + KV_ENTRY_OVERHEAD));
        assert!(ns.kv_get("key-000000", 5_000).is_none());
        assert!(ns.kv_get("key-000199", 5_000).is_some());

        assert!(ns.counter("a").is_ok() && ns.counter("b").is_ok() && ns.counter("a").is_ok());
        let err = ns.counter("c").unwrap_err();
        assert!(err.starts_with("the counters are full: 2 counters take 130 of 150 bytes"), "{err}");
    }
}
