//! Functions the gateway provides to every plugin.
//!
//! State kept here is shared by all instances of the plugin on one gateway (one per
//! worker thread) and survives hot swaps, so a round-robin position or a sticky table
//! is not lost when the plugin is upgraded. Keys are private to the upstream the plugin
//! serves. On a native target (unit tests) the same functions run against an
//! in-process store.

pub use crate::BackendStats;

/// Log levels for [`log`].
#[allow(missing_docs)]
pub mod level {
    pub const TRACE: u8 = 0;
    pub const DEBUG: u8 = 1;
    pub const INFO: u8 = 2;
    pub const WARN: u8 = 3;
    pub const ERROR: u8 = 4;
}

#[cfg(target_family = "wasm")]
mod imp {
    pub use crate::bindings::gateway::selector::host::*;
}

#[cfg(not(target_family = "wasm"))]
mod imp {
    //! In-process stand-in for the gateway, for native unit tests of strategies.
    use super::BackendStats;
    use std::cell::RefCell;
    use std::collections::HashMap;

    #[derive(Default)]
    struct Native {
        counters: HashMap<String, i64>,
        kv: HashMap<String, (String, Option<u64>)>,
        stats: HashMap<u32, BackendStats>,
        now_ms: u64,
        rng: u64,
    }

    thread_local! {
        static NATIVE: RefCell<Native> = RefCell::new(Native { rng: 0x9E37_79B9_7F4A_7C15, ..Default::default() });
    }

    pub fn counter_add(key: &str, delta: i64) -> i64 {
        NATIVE.with(|n| {
            let mut n = n.borrow_mut();
            let c = n.counters.entry(key.to_owned()).or_default();
            *c += delta;
            *c
        })
    }

    pub fn kv_get(key: &str) -> Option<String> {
        NATIVE.with(|n| {
            let n = n.borrow();
            let now = n.now_ms;
            n.kv.get(key).filter(|(_, exp)| exp.is_none_or(|e| e > now)).map(|(v, _)| v.clone())
        })
    }

    pub fn kv_set(key: &str, value: &str, ttl_ms: u64) {
        NATIVE.with(|n| {
            let mut n = n.borrow_mut();
            let exp = (ttl_ms > 0).then(|| n.now_ms + ttl_ms);
            n.kv.insert(key.to_owned(), (value.to_owned(), exp));
        })
    }

    pub fn stats(index: u32) -> BackendStats {
        NATIVE.with(|n| {
            n.borrow().stats.get(&index).copied().unwrap_or(BackendStats {
                active_requests: 0,
                ewma_latency_us: 0,
                consecutive_failures: 0,
                measured_at_ms: 0,
            })
        })
    }

    pub fn now_ms() -> u64 {
        NATIVE.with(|n| n.borrow().now_ms)
    }

    pub fn random_u64() -> u64 {
        NATIVE.with(|n| {
            // splitmix64: deterministic, so native tests are repeatable.
            let mut n = n.borrow_mut();
            n.rng = n.rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = n.rng;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        })
    }

    pub fn log(_level: u8, _message: &str) {}

    /// Native tests only: set what [`stats`] returns.
    pub fn set_backend_stats(index: u32, stats: BackendStats) {
        NATIVE.with(|n| n.borrow_mut().stats.insert(index, stats));
    }

    /// Native tests only: move the clock.
    pub fn set_now_ms(now: u64) {
        NATIVE.with(|n| n.borrow_mut().now_ms = now);
    }

    /// Native tests only: forget all counters, keys and stats.
    pub fn reset() {
        NATIVE.with(|n| *n.borrow_mut() = Native { rng: 0x9E37_79B9_7F4A_7C15, ..Default::default() });
    }
}

/// Adds `delta` to the counter `key` and returns the new value, atomically across all
/// of the gateway's worker threads.
pub fn counter_add(key: &str, delta: i64) -> i64 {
    imp::counter_add(key, delta)
}

/// Reads `key` from the shared key-value store (`None` if absent or expired).
pub fn kv_get(key: &str) -> Option<String> {
    imp::kv_get(key)
}

/// Writes `key`; `ttl_ms` = 0 keeps it until overwritten.
pub fn kv_set(key: &str, value: &str, ttl_ms: u64) {
    imp::kv_set(key, value, ttl_ms)
}

/// Live stats of the backend at `index`: in-flight requests, EWMA latency, failures.
pub fn backend_stats(index: u32) -> BackendStats {
    imp::stats(index)
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    imp::now_ms()
}

/// A random number from the host.
pub fn random_u64() -> u64 {
    imp::random_u64()
}

/// Writes `message` to the gateway's log at `level` (see [`level`]).
pub fn log(level: u8, message: &str) {
    imp::log(level, message)
}

#[cfg(not(target_family = "wasm"))]
pub use imp::{reset, set_backend_stats, set_now_ms};
