//! `least-connections`: the healthy backend with the fewest in-flight requests per unit of
//! `weight` (backend A beats B when `active_A × weight_B < active_B × weight_A`), counted
//! by the host across all worker threads. Ties go round robin, through a counter shared
//! by all instances, so an idle pool is served in strict rotation.
//!
//! Reading a backend's live count is a call into the host (about 80 ns through the Wasm
//! boundary, plus a likely cache miss in a large pool), so a pick reads few of them
//! whatever the pool size:
//! - up to 4 healthy backends: all of them, starting at the round-robin position (which
//!   wins ties);
//! - more: the backend at the round-robin position plus 2 others spread pseudo-randomly
//!   over the pool (derived from the same counter, so no extra host call). The
//!   round-robin candidate wins ties, so an idle pool is still served in strict rotation,
//!   and when it is busy the request goes to the less loaded of the others instead of
//!   always to its neighbour. Comparing a few random backends is nearly as good as
//!   scanning them all ("power of d choices": with d = 3, when half the pool is busy a
//!   request lands on a busy backend 1 time in 8) and keeps a pick under a microsecond
//!   with 10,000 backends.
//!
//! A retry never gets a backend it already tried.
//!
//! Params: none.
//!
//! ```yaml
//! upstreams:
//!   search:
//!     backends:
//!       - { address: "10.0.0.1:8080", weight: 2 }
//!       - { address: "10.0.0.2:8080" }
//!     strategy: { plugin: least-connections, params: {} }
//! ```

use gateway_sdk::hash::fmix64;
use gateway_sdk::weights::below;
use gateway_sdk::{Backend, Decision, Pool, Request, Strategy, host, params};

/// The host counter for round-robin positions.
const COUNTER: &str = "lc";
/// Pools up to this many healthy backends are compared in full.
const FULL_SCAN: usize = 4;
/// Larger pools compare this many: the round-robin candidate plus `SAMPLE - 1`
/// pseudo-random others.
const SAMPLE: usize = 3;

/// The strategy: one per plugin instance.
#[derive(Debug, Default)]
pub struct LeastConnections {
    pool: Pool,
    /// Weights of the healthy backends, aligned with `pool.healthy()`.
    weights: Vec<u32>,
}

/// A candidate's load: in-flight requests and weight.
#[derive(Clone, Copy)]
struct Load {
    index: u32,
    active: u32,
    weight: u32,
}

impl Load {
    /// True when `self` has strictly fewer in-flight requests per unit of weight.
    fn lighter_than(&self, other: &Load) -> bool {
        u64::from(self.active) * u64::from(other.weight) < u64::from(other.active) * u64::from(self.weight)
    }
}

impl LeastConnections {
    fn load(&self, k: usize) -> Load {
        let index = self.pool.healthy()[k];
        Load { index, active: host::backend_stats(index).active_requests, weight: self.weights[k] }
    }

    /// Keeps the lighter of `best` and the candidate at healthy position `k`.
    fn consider(&self, best: Option<Load>, k: usize, exclude: &[u32]) -> Option<Load> {
        if exclude.contains(&self.pool.healthy()[k]) {
            return best;
        }
        let c = self.load(k);
        match best {
            Some(b) if !c.lighter_than(&b) => Some(b),
            _ => Some(c),
        }
    }
}

impl Strategy for LeastConnections {
    fn configure(&mut self, params: &str) -> Result<(), String> {
        params::expect_none(params)
    }

    fn pool_changed(&mut self, _generation: u64, backends: Vec<Backend>) {
        let pool = Pool::new(backends);
        self.weights = pool.healthy().iter().map(|&i| pool.backends()[i as usize].weight.max(1)).collect();
        self.pool = pool;
    }

    fn pick(&mut self, _req: &dyn Request, exclude: &[u32]) -> Decision {
        let n = self.pool.healthy().len();
        if n == 0 {
            return Decision::no_backend();
        }
        let count = host::counter_add(COUNTER, 1) - 1;
        let turn = count.rem_euclid(n as i64) as usize;
        let mut best = None;
        if n <= FULL_SCAN {
            for k in 0..n {
                best = self.consider(best, (turn + k) % n, exclude);
            }
        } else {
            best = self.consider(best, turn, exclude);
            // Pseudo-random positions from the (unique) count: a different spread for every
            // request without asking the host for randomness.
            let mut state = count as u64;
            for _ in 1..SAMPLE {
                state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
                best = self.consider(best, below(fmix64(state), n as u64) as usize, exclude);
            }
        }
        match best {
            Some(b) => Decision::backend(b.index),
            // Every candidate was already tried: take the next healthy one that was not.
            None => self.pool.healthy_nth(turn as u64, exclude).map_or_else(Decision::no_backend, Decision::backend),
        }
    }
}

gateway_sdk::export_strategy!(LeastConnections);

#[cfg(test)]
mod tests {
    use super::*;
    use gateway_sdk::{BackendStats, TestRequest};
    use proptest::prelude::{ProptestConfig, prop, prop_assert, prop_assert_eq, proptest};

    fn backend(i: usize, weight: u32, healthy: bool) -> Backend {
        Backend {
            id: format!("b{i}"),
            address: format!("10.0.{}.{}:80", i / 256, i % 256),
            weight,
            zone: String::new(),
            labels: vec![],
            healthy,
        }
    }

    fn strategy(backends: Vec<Backend>) -> LeastConnections {
        let mut s = LeastConnections::default();
        s.configure("").unwrap();
        s.pool_changed(1, backends);
        s
    }

    fn equal(n: usize) -> LeastConnections {
        strategy((0..n).map(|i| backend(i, 1, true)).collect())
    }

    fn set_active(index: u32, active: u32) {
        host::set_backend_stats(
            index,
            BackendStats { active_requests: active, ewma_latency_us: 0, consecutive_failures: 0, measured_at_ms: 0 },
        );
    }

    fn pick(s: &mut LeastConnections, exclude: &[u32]) -> Option<u32> {
        s.pick(&TestRequest::new(), exclude).backend_index()
    }

    #[test]
    fn idle_pools_rotate() {
        for n in [3, 100] {
            host::reset();
            let mut s = equal(n);
            let seq: Vec<u32> = (0..2 * n).map(|_| pick(&mut s, &[]).unwrap()).collect();
            let expected: Vec<u32> = (0..2 * n as u32).map(|k| k % n as u32).collect();
            assert_eq!(seq, expected, "{n} backends");
        }
    }

    #[test]
    fn the_least_busy_backend_wins() {
        host::reset();
        let mut s = equal(3);
        set_active(0, 5);
        set_active(1, 2);
        set_active(2, 7);
        for _ in 0..10 {
            assert_eq!(pick(&mut s, &[]), Some(1));
        }
    }

    #[test]
    fn weights_scale_the_count() {
        host::reset();
        let mut s = strategy(vec![backend(0, 4, true), backend(1, 1, true)]);
        set_active(0, 6);
        set_active(1, 2);
        // 6/4 < 2/1: the heavy backend is relatively less busy.
        assert_eq!(pick(&mut s, &[]), Some(0));
        set_active(0, 8);
        // 8/4 == 2/1: a tie, taken in turn.
        let seq: Vec<_> = (0..4).map(|_| pick(&mut s, &[]).unwrap()).collect();
        assert_eq!(seq.iter().filter(|&&i| i == 0).count(), 2, "{seq:?}");
    }

    #[test]
    fn a_busy_backend_is_avoided_in_large_pools() {
        host::reset();
        let mut s = equal(10_000);
        set_active(42, 100);
        for i in 0..10_000 {
            if i != 42 {
                set_active(i, 1);
            }
        }
        for _ in 0..20_000 {
            assert_ne!(pick(&mut s, &[]), Some(42));
        }
    }

    #[test]
    fn large_pools_prefer_idle_backends() {
        // Half the pool is busy: the sample almost always finds an idle one.
        host::reset();
        let mut s = equal(1_000);
        for i in 0..500 {
            set_active(i, 10);
        }
        let busy = (0..10_000).filter(|_| pick(&mut s, &[]).unwrap() < 500).count();
        // All 3 candidates busy: 1 time in 8, i.e. about 1250.
        assert!(busy < 1_500, "{busy} of 10000 went to a busy backend");
    }

    #[test]
    fn unhealthy_and_excluded_backends_are_skipped() {
        host::reset();
        let mut s = strategy(vec![backend(0, 1, false), backend(1, 1, true), backend(2, 1, true)]);
        set_active(1, 9);
        assert_eq!(pick(&mut s, &[]), Some(2));
        assert_eq!(pick(&mut s, &[2]), Some(1), "a retry takes the busier one rather than repeat");
        assert_eq!(pick(&mut s, &[1, 2]), None);
        assert_eq!(pick(&mut strategy(vec![backend(0, 1, false)]), &[]), None);
    }

    #[test]
    fn excluded_samples_fall_back_to_the_next_untried_backend() {
        host::reset();
        let mut s = equal(20);
        let all_but_7: Vec<u32> = (0..20).filter(|&i| i != 7).collect();
        for _ in 0..40 {
            assert_eq!(pick(&mut s, &all_but_7), Some(7));
        }
    }

    #[test]
    fn params_are_refused() {
        assert!(LeastConnections::default().configure(r#"{"sample": 4}"#).unwrap_err().contains("'sample'"));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        /// In a small pool the pick is always a global minimum of active/weight among
        /// the healthy backends not yet tried.
        #[test]
        fn small_pools_pick_a_minimum(
            pool in prop::collection::vec((0u32..20, 1u32..5, prop::bool::weighted(0.8)), 1..6),
            excl in prop::collection::vec(0u32..16, 0..4),
        ) {
            host::reset();
            let mut s = strategy(pool.iter().enumerate().map(|(i, &(_, w, h))| backend(i, w, h)).collect());
            for (i, &(a, _, _)) in pool.iter().enumerate() {
                set_active(i as u32, a);
            }
            let ok = |i: usize| pool[i].2 && !excl.contains(&(i as u32));
            if pool.iter().filter(|p| p.2).count() > FULL_SCAN {
                return Ok(()); // sampled, not scanned: see `large_pools_never_pick_worse_than_the_turn`
            }
            let d = pick(&mut s, &excl);
            match d {
                None => prop_assert!(!(0..pool.len()).any(ok)),
                Some(p) => {
                    let p = p as usize;
                    prop_assert!(ok(p));
                    for j in (0..pool.len()).filter(|&j| ok(j)) {
                        prop_assert!(u64::from(pool[p].0) * u64::from(pool[j].1) <= u64::from(pool[j].0) * u64::from(pool[p].1));
                    }
                }
            }
        }

        /// In a large pool the pick is never more loaded than the backend whose turn it
        /// was (when that one may be used).
        #[test]
        fn large_pools_never_pick_worse_than_the_turn(
            loads in prop::collection::vec((0u32..20, 1u32..5), 5..60),
            turns in 0i64..100,
        ) {
            host::reset();
            let mut s = strategy(loads.iter().enumerate().map(|(i, &(_, w))| backend(i, w, true)).collect());
            for (i, &(a, _)) in loads.iter().enumerate() {
                set_active(i as u32, a);
            }
            host::counter_add(COUNTER, turns);
            let turn = (turns as usize) % loads.len();
            let p = pick(&mut s, &[]).unwrap() as usize;
            let score = |i: usize, j: usize| u64::from(loads[i].0) * u64::from(loads[j].1);
            prop_assert!(score(p, turn) <= score(turn, p), "picked {} over the turn's {}", p, turn);
        }

        /// Simulated traffic where backend 0 holds requests 20× longer: it ends up with
        /// far fewer requests than the others, and the fast ones share evenly.
        #[test]
        fn slow_backends_get_less_traffic(n in 2usize..40) {
            host::reset();
            let mut s = equal(n);
            let mut active = vec![0u32; n];
            let mut done_at: Vec<(u32, usize)> = Vec::new();
            let mut served = vec![0u32; n];
            for t in 0..4_000usize {
                done_at.retain(|&(i, end)| {
                    if end <= t { active[i as usize] -= 1; false } else { true }
                });
                for (i, &a) in active.iter().enumerate() {
                    set_active(i as u32, a);
                }
                for _ in 0..n / 2 + 1 {
                    let i = pick(&mut s, &[]).unwrap();
                    active[i as usize] += 1;
                    set_active(i, active[i as usize]);
                    served[i as usize] += 1;
                    done_at.push((i, t + if i == 0 { 20 } else { 1 }));
                }
            }
            let fast_avg = served[1..].iter().sum::<u32>() / (n as u32 - 1);
            prop_assert!(served[0] * 3 < fast_avg, "slow {} vs fast average {}", served[0], fast_avg);
            prop_assert_eq!(served.iter().map(|&c| c as usize).sum::<usize>(), 4_000 * (n / 2 + 1));
        }
    }
}
