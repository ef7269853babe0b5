//! `random`: a random healthy backend for each request, uniformly when all healthy
//! backends have the same `weight`, in proportion to their weights otherwise.
//!
//! Randomness comes from the host (`host::random_u64`), so instances on different worker
//! threads do not repeat each other's sequence. With weights, the cumulative weights of
//! the healthy backends are computed when the pool changes and each pick is one binary
//! search. A retry draws again among the backends it has not tried yet.
//!
//! Params: none.
//!
//! ```yaml
//! upstreams:
//!   books:
//!     backends:
//!       - { address: "10.0.0.1:8080", weight: 3 }
//!       - { address: "10.0.0.2:8080" }
//!     strategy: { plugin: random, params: {} }
//! ```

use gateway_sdk::weights::{Cumulative, below};
use gateway_sdk::{Backend, Decision, Pool, Request, Strategy, host, params};

/// Draws before a retry gives up on luck and takes the next backend not yet tried.
const MAX_DRAWS: usize = 8;

/// The strategy: one per plugin instance.
#[derive(Debug, Default)]
pub struct Random {
    pool: Pool,
    /// Cumulative weights of the healthy backends; `None` when they are all equal.
    weighted: Option<Cumulative>,
}

impl Random {
    /// One random healthy backend (not looking at `exclude`).
    fn draw(&self, r: u64) -> u32 {
        let healthy = self.pool.healthy();
        let k = match &self.weighted {
            None => below(r, healthy.len() as u64) as usize,
            Some(c) => c.pick(r),
        };
        healthy[k]
    }
}

impl Strategy for Random {
    fn configure(&mut self, params: &str) -> Result<(), String> {
        params::expect_none(params)
    }

    fn pool_changed(&mut self, _generation: u64, backends: Vec<Backend>) {
        let pool = Pool::new(backends);
        let weights: Vec<u32> = pool.healthy().iter().map(|&i| pool.backends()[i as usize].weight.max(1)).collect();
        self.weighted = weights.windows(2).any(|w| w[0] != w[1]).then(|| Cumulative::new(weights));
        self.pool = pool;
    }

    fn pick(&mut self, _req: &dyn Request, exclude: &[u32]) -> Decision {
        if self.pool.healthy().is_empty() {
            return Decision::no_backend();
        }
        let first = self.draw(host::random_u64());
        if !exclude.contains(&first) {
            return Decision::backend(first);
        }
        if self.pool.available(exclude) == 0 {
            return Decision::no_backend();
        }
        (1..MAX_DRAWS)
            .map(|_| self.draw(host::random_u64()))
            .find(|i| !exclude.contains(i))
            .or_else(|| self.pool.healthy_nth(host::random_u64(), exclude))
            .map_or_else(Decision::no_backend, Decision::backend)
    }
}

gateway_sdk::export_strategy!(Random);

#[cfg(test)]
mod tests {
    use super::*;
    use gateway_sdk::TestRequest;
    use proptest::prelude::{ProptestConfig, prop, prop_assert, proptest};

    fn backend(i: usize, weight: u32, healthy: bool) -> Backend {
        Backend {
            id: format!("b{i}"),
            address: format!("10.0.0.{i}:80"),
            weight,
            zone: String::new(),
            labels: vec![],
            healthy,
        }
    }

    fn strategy(backends: Vec<Backend>) -> Random {
        let mut s = Random::default();
        s.configure("{}").unwrap();
        s.pool_changed(1, backends);
        s
    }

    fn counts(s: &mut Random, n: usize, len: usize) -> Vec<usize> {
        let req = TestRequest::new();
        let mut c = vec![0; len];
        for _ in 0..n {
            c[s.pick(&req, &[]).backend_index().unwrap() as usize] += 1;
        }
        c
    }

    #[test]
    fn uniform_over_equal_weights() {
        host::reset();
        let mut s = strategy((0..3).map(|i| backend(i, 5, true)).collect());
        assert!(s.weighted.is_none());
        for n in counts(&mut s, 30_000, 3) {
            assert!((9_500..=10_500).contains(&n), "{n} of 30000");
        }
    }

    #[test]
    fn weighted_when_weights_differ() {
        host::reset();
        let mut s = strategy(vec![backend(0, 3, true), backend(1, 1, true)]);
        let c = counts(&mut s, 20_000, 2);
        assert!((14_600..=15_400).contains(&c[0]), "{c:?}");
    }

    #[test]
    fn unhealthy_backends_are_never_chosen() {
        host::reset();
        let mut s = strategy(vec![backend(0, 1, true), backend(1, 9, false), backend(2, 1, true)]);
        assert!(s.weighted.is_none(), "only healthy weights count");
        let c = counts(&mut s, 2_000, 3);
        assert_eq!(c[1], 0);
    }

    #[test]
    fn retries_avoid_tried_backends() {
        host::reset();
        let mut s = strategy(vec![backend(0, 100, true), backend(1, 1, true), backend(2, 1, true)]);
        let req = TestRequest::new();
        for _ in 0..200 {
            assert_ne!(s.pick(&req, &[0]).backend_index(), Some(0));
            assert_eq!(s.pick(&req, &[0, 1]).backend_index(), Some(2));
        }
        assert_eq!(s.pick(&req, &[2, 1, 0]).backend_index(), None);
        let mut none = strategy(vec![backend(0, 1, false)]);
        assert_eq!(none.pick(&req, &[]).backend_index(), None);
    }

    #[test]
    fn params_are_refused() {
        let err = Random::default().configure(r#"{"seed": 1}"#).unwrap_err();
        assert!(err.contains("unknown param 'seed'"), "{err}");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Each backend's share is its weight's share, within 5 standard deviations.
        #[test]
        fn distribution_follows_weights(weights in prop::collection::vec(1u32..10, 1..8), seed in 0u64..1000) {
            host::reset();
            for _ in 0..seed { host::random_u64(); }
            let mut s = strategy(weights.iter().enumerate().map(|(i, &w)| backend(i, w, true)).collect());
            let n = 20_000;
            let total: u32 = weights.iter().sum();
            for (i, c) in counts(&mut s, n, weights.len()).into_iter().enumerate() {
                let p = f64::from(weights[i]) / f64::from(total);
                let expected = p * n as f64;
                let sd = (n as f64 * p * (1.0 - p)).sqrt();
                prop_assert!((c as f64 - expected).abs() <= 5.0 * sd + 1.0, "backend {}: {} vs {:.0}", i, c, expected);
            }
        }

        /// Never an excluded or unhealthy backend; `None` only when nothing is left.
        #[test]
        fn exclusion_and_health_are_respected(
            pool in prop::collection::vec((1u32..5, prop::bool::weighted(0.7)), 1..8),
            excl in prop::collection::vec(0u32..8, 0..6),
        ) {
            host::reset();
            let mut s = strategy(pool.iter().enumerate().map(|(i, &(w, h))| backend(i, w, h)).collect());
            let left = pool.iter().enumerate().any(|(i, &(_, h))| h && !excl.contains(&(i as u32)));
            for _ in 0..20 {
                match s.pick(&TestRequest::new(), &excl).backend_index() {
                    Some(i) => prop_assert!(pool[i as usize].1 && !excl.contains(&i)),
                    None => prop_assert!(!left),
                }
            }
        }
    }
}
