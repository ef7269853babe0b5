//! `p2c-ewma`: Linkerd's balancer. For each request, two distinct healthy backends are
//! drawn at random and the one with the lower cost gets it, where
//!
//! ```text
//! cost = peak-EWMA latency × (in-flight requests + 1)
//! ```
//!
//! The host measures each backend's response latency (`ewma_latency_us`) and in-flight
//! requests (`active_requests`) across all worker threads. On top of the host's average
//! this strategy keeps a *peak* estimate per backend: when the measured latency rises,
//! the estimate jumps to it at once; when it falls, the new value is blended in with
//! weight `1 - e^(-t/decay_ms)`, `t` being the time since the previous measurement
//! (Linkerd's peak-EWMA). A backend that slows down is shunned immediately and trusted
//! again gradually. A backend with no measurement yet
//! counts as `default_latency_ms`. A shunned backend gets no traffic and so no new
//! measurement: while its measurement does not change, its estimate fades towards zero
//! with the same time constant, so it is probed again after a few `decay_ms` (Linkerd
//! decays an unobserved estimate the same way).
//!
//! Comparing two random backends instead of all of them keeps a pick at four host calls
//! (random, the clock, two stats) whatever the pool size, and avoids
//! the herd behaviour of always choosing the global minimum. A retry draws among the
//! backends it has not tried yet.
//!
//! Params:
//! - `decay_ms` (positive integer, default 10000): how fast a latency peak is forgotten.
//! - `default_latency_ms` (positive integer, default 1): latency assumed for a backend
//!   that has not answered yet.
//!
//! ```yaml
//! upstreams:
//!   api:
//!     backends: [{ address: "10.0.0.1:8080" }, { address: "10.0.0.2:8080" }, { address: "10.0.0.3:8080" }]
//!     strategy: { plugin: p2c-ewma, params: { decay_ms: 10000, default_latency_ms: 1 } }
//! ```

use gateway_sdk::hash::fmix64;
use gateway_sdk::params::Params;
use gateway_sdk::weights::below;
use gateway_sdk::{Backend, Decision, Pool, Request, Strategy, host};

/// The strategy: one per plugin instance.
#[derive(Debug)]
pub struct P2cEwma {
    decay_ms: f64,
    default_latency_us: f64,
    pool: Pool,
    /// Peak-EWMA state per backend index.
    peaks: Vec<Peak>,
}

/// One backend's peak-EWMA latency estimate.
#[derive(Debug, Clone, Copy, Default)]
struct Peak {
    latency_us: f64,
    /// The host's measurement last seen, and when it last changed (responses arrived).
    last_measured: u32,
    observed_ms: u64,
    /// A first reading was taken.
    seen: bool,
}

impl Default for P2cEwma {
    fn default() -> Self {
        P2cEwma { decay_ms: 10_000.0, default_latency_us: 1_000.0, pool: Pool::default(), peaks: Vec::new() }
    }
}

impl P2cEwma {
    /// The cost of sending one more request to the backend at `index`. `now_ms` is read
    /// from the host on first need and shared by both candidates.
    fn cost(&mut self, index: u32, now_ms: &mut Option<u64>) -> f64 {
        let stats = host::backend_stats(index);
        let measured = match stats.ewma_latency_us {
            0 => self.default_latency_us,
            us => f64::from(us),
        };
        let now = *now_ms.get_or_insert_with(host::now_ms);
        // When the host took the measurement, not when this instance noticed it: with an
        // instance per worker thread, one may see another's probe of a shunned backend
        // long after it happened, and must not treat that old value as new.
        let measured_at = match stats.measured_at_ms {
            0 => now,
            at => at.min(now),
        };
        let peak = &mut self.peaks[index as usize];
        if !peak.seen {
            *peak = Peak {
                latency_us: measured,
                last_measured: stats.ewma_latency_us,
                observed_ms: measured_at,
                seen: true,
            };
        } else if stats.ewma_latency_us != peak.last_measured {
            // A new measurement (responses arrived). Peak-EWMA: a rise is taken at once;
            // a fall is blended in with the weight the time since the last measurement
            // earned it, so after a quiet spell the new value counts for nearly all.
            if measured >= peak.latency_us {
                peak.latency_us = measured;
            } else {
                let keep = (-(measured_at.saturating_sub(peak.observed_ms) as f64) / self.decay_ms).exp();
                peak.latency_us = peak.latency_us * keep + measured * (1.0 - keep);
            }
            peak.last_measured = stats.ewma_latency_us;
            peak.observed_ms = measured_at;
        }
        // A backend that gets no traffic is never measured again, so a latency spike
        // would shun it for good. As Linkerd does, let an unobserved estimate fade
        // towards zero so that it is probed again after a few `decay_ms`.
        let unobserved = now.saturating_sub(peak.observed_ms) as f64;
        let estimate = peak.latency_us * (-unobserved / self.decay_ms).exp();
        estimate * (f64::from(stats.active_requests) + 1.0)
    }

    /// The healthy backend at position `k` or, if it was already tried (or is `other`),
    /// the next one after it that was not.
    fn untried_from(&self, k: u64, exclude: &[u32], other: Option<u32>) -> Option<u32> {
        let healthy = self.pool.healthy();
        let n = healthy.len();
        (0..n).map(|j| healthy[(k as usize + j) % n]).find(|i| !exclude.contains(i) && Some(*i) != other)
    }
}

impl Strategy for P2cEwma {
    fn configure(&mut self, params: &str) -> Result<(), String> {
        let mut p = Params::parse(params)?;
        let decay_ms = p.positive_u64("decay_ms")?.unwrap_or(10_000);
        let default_latency_ms = p.positive_u64("default_latency_ms")?.unwrap_or(1);
        p.finish()?;
        self.decay_ms = decay_ms as f64;
        self.default_latency_us = default_latency_ms as f64 * 1_000.0;
        Ok(())
    }

    fn pool_changed(&mut self, _generation: u64, backends: Vec<Backend>) {
        // Keep what was learnt about backends that are still at the same index (the
        // usual case: only health changed).
        let old = self.pool.backends();
        let peaks = backends
            .iter()
            .enumerate()
            .map(|(i, b)| match (old.get(i), self.peaks.get(i)) {
                (Some(o), Some(&p)) if o.id == b.id => p,
                _ => Peak::default(),
            })
            .collect();
        self.peaks = peaks;
        self.pool = Pool::new(backends);
    }

    fn pick(&mut self, _req: &dyn Request, exclude: &[u32]) -> Decision {
        let n = self.pool.healthy().len() as u64;
        if n == 0 {
            return Decision::no_backend();
        }
        let r = host::random_u64();
        let ka = below(r, n);
        let Some(a) = self.untried_from(ka, exclude, None) else {
            return Decision::no_backend();
        };
        // A second, independent draw among the other n - 1 positions.
        let kb = match n {
            1 => 0,
            _ => (ka + 1 + below(fmix64(r), n - 1)) % n,
        };
        let Some(b) = self.untried_from(kb, exclude, Some(a)) else {
            return Decision::backend(a);
        };
        let mut now = None;
        let (cost_a, cost_b) = (self.cost(a, &mut now), self.cost(b, &mut now));
        Decision::backend(if cost_b < cost_a { b } else { a })
    }
}

gateway_sdk::export_strategy!(P2cEwma);

#[cfg(test)]
mod tests {
    use super::*;
    use gateway_sdk::{BackendStats, TestRequest};
    use proptest::prelude::{ProptestConfig, prop, prop_assert, proptest};

    fn backend(i: usize, healthy: bool) -> Backend {
        Backend {
            id: format!("b{i}"),
            address: format!("10.0.{}.{}:80", i / 256, i % 256),
            weight: 1,
            zone: String::new(),
            labels: vec![],
            healthy,
        }
    }

    pub(super) fn strategy(n: usize, params: &str) -> P2cEwma {
        let mut s = P2cEwma::default();
        s.configure(params).unwrap();
        s.pool_changed(1, (0..n).map(|i| backend(i, true)).collect());
        s
    }

    fn set(index: u32, active: u32, latency_us: u32) {
        host::set_backend_stats(
            index,
            BackendStats {
                active_requests: active,
                ewma_latency_us: latency_us,
                consecutive_failures: 0,
                measured_at_ms: 0,
            },
        );
    }

    fn pick(s: &mut P2cEwma, exclude: &[u32]) -> Option<u32> {
        s.pick(&TestRequest::new(), exclude).backend_index()
    }

    fn shares(s: &mut P2cEwma, n: usize, picks: usize) -> Vec<usize> {
        let mut c = vec![0; n];
        for _ in 0..picks {
            c[pick(s, &[]).unwrap() as usize] += 1;
        }
        c
    }

    #[test]
    fn equal_backends_share_evenly() {
        host::reset();
        let mut s = strategy(4, "{}");
        for c in shares(&mut s, 4, 40_000) {
            assert!((9_400..=10_600).contains(&c), "{c}");
        }
    }

    #[test]
    fn a_slow_backend_loses_traffic_at_once_and_regains_it_slowly() {
        host::reset();
        host::set_now_ms(1_000_000);
        let mut s = strategy(3, r#"{"decay_ms": 1000}"#);
        for i in 0..3 {
            set(i, 0, 2_000);
        }
        assert!(shares(&mut s, 3, 3_000)[0] > 800);
        // Backend 0 slows down 10×: with two draws out of three it only wins when it is
        // not drawn, i.e. never: p2c always compares it against a faster one.
        set(0, 0, 20_000);
        assert_eq!(shares(&mut s, 3, 3_000)[0], 0);
        // The host's average recovers (even below the others), but the peak is only
        // forgotten over `decay_ms`.
        set(0, 0, 1_500);
        host::set_now_ms(1_000_100);
        assert_eq!(shares(&mut s, 3, 300)[0], 0, "100 ms later it is still penalised");
        host::set_now_ms(1_010_000);
        // The others kept answering meanwhile: their measurements moved a little.
        set(1, 0, 2_001);
        set(2, 0, 2_001);
        assert!(shares(&mut s, 3, 3_000)[0] > 0, "10 decay periods later it is back");
    }

    #[test]
    fn in_flight_requests_count() {
        host::reset();
        let mut s = strategy(2, "{}");
        set(0, 9, 1_000);
        set(1, 0, 5_000);
        // 1 ms × 10 > 5 ms × 1.
        assert_eq!(shares(&mut s, 2, 100), [0, 100]);
    }

    #[test]
    fn unknown_latency_counts_as_the_default() {
        host::reset();
        let mut s = strategy(2, r#"{"default_latency_ms": 50}"#);
        set(0, 0, 0);
        set(1, 0, 10_000);
        assert_eq!(shares(&mut s, 2, 100), [0, 100], "a new backend counts as 50 ms");
        let mut s = strategy(2, "{}");
        assert_eq!(shares(&mut s, 2, 100), [100, 0], "by default as 1 ms");
    }

    #[test]
    fn unhealthy_and_excluded_backends_are_skipped() {
        host::reset();
        let mut s = P2cEwma::default();
        s.pool_changed(1, vec![backend(0, false), backend(1, true), backend(2, true)]);
        set(1, 0, 1);
        set(2, 0, 1_000_000);
        for _ in 0..50 {
            assert_eq!(pick(&mut s, &[]), Some(1));
            assert_eq!(pick(&mut s, &[1]), Some(2), "a retry takes the slow one rather than repeat");
            assert_eq!(pick(&mut s, &[1, 2]), None);
        }
        let mut single = strategy(1, "{}");
        assert_eq!(pick(&mut single, &[]), Some(0));
        assert_eq!(pick(&mut single, &[0]), None);
    }

    #[test]
    fn params_are_checked() {
        let mut s = P2cEwma::default();
        assert!(s.configure(r#"{"decay_ms": 500, "default_latency_ms": 3}"#).is_ok());
        assert_eq!((s.decay_ms, s.default_latency_us), (500.0, 3_000.0));
        assert_eq!(
            s.configure(r#"{"decay_ms": 0}"#).unwrap_err(),
            "param 'decay_ms': expected a positive integer, got 0"
        );
        assert_eq!(
            s.configure(r#"{"decay_ms": "10s"}"#).unwrap_err(),
            "param 'decay_ms': expected a positive integer, got the string \"10s\""
        );
        assert_eq!(
            s.configure(r#"{"decay": 1}"#).unwrap_err(),
            "unknown param 'decay' (accepted: decay_ms, default_latency_ms)"
        );
    }

    #[test]
    fn falls_count_by_the_time_since_the_last_measurement() {
        host::reset();
        // Two backends: with one there is nothing to compare and no cost is computed.
        let mut s = strategy(2, r#"{"decay_ms": 1000}"#);
        host::set_now_ms(10_000);
        set(1, 0, 2_000);
        set(0, 0, 2_000);
        pick(&mut s, &[]);
        set(0, 0, 1_000);
        pick(&mut s, &[]);
        assert_eq!(s.peaks[0].latency_us, 2_000.0, "no time passed: the peak holds");
        host::set_now_ms(20_000);
        set(0, 0, 999);
        pick(&mut s, &[]);
        assert!(s.peaks[0].latency_us < 1_001.0, "10 s later the new value is all that counts");
        set(0, 0, 3_000);
        pick(&mut s, &[]);
        assert_eq!(s.peaks[0].latency_us, 3_000.0, "a rise is taken at once");
    }

    #[test]
    fn peaks_survive_a_health_change() {
        host::reset();
        let mut s = strategy(3, "{}");
        set(0, 0, 50_000);
        set(1, 0, 1_000);
        set(2, 0, 1_000);
        shares(&mut s, 3, 100);
        set(0, 0, 1_000);
        s.pool_changed(2, vec![backend(0, true), backend(1, true), backend(2, false)]);
        assert_eq!(shares(&mut s, 3, 100)[0], 0, "backend 0 is still remembered as slow");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        /// The single most expensive backend never wins (it is always compared with a
        /// cheaper one), and the cheapest gets at least its fair share.
        #[test]
        fn load_shifts_away_from_the_slowest(latencies in prop::collection::vec(1u32..100_000, 2..12)) {
            host::reset();
            let n = latencies.len();
            let mut s = strategy(n, "{}");
            for (i, &l) in latencies.iter().enumerate() {
                set(i as u32, 0, l);
            }
            let max = *latencies.iter().max().unwrap();
            let min = *latencies.iter().min().unwrap();
            let c = shares(&mut s, n, 2_000);
            if latencies.iter().filter(|&&l| l == max).count() == 1 && max > min {
                let worst = latencies.iter().position(|&l| l == max).unwrap();
                prop_assert!(c[worst] == 0, "slowest got {} ({:?})", c[worst], c);
            }
            if latencies.iter().filter(|&&l| l == min).count() == 1 && max > min {
                let best = latencies.iter().position(|&l| l == min).unwrap();
                prop_assert!(c[best] * n >= 2_000, "fastest got {} of 2000 ({:?})", c[best], c);
            }
        }

        /// Never an excluded or unhealthy backend; `None` only when nothing is left.
        #[test]
        fn exclusion_is_respected(
            health in prop::collection::vec(prop::bool::weighted(0.7), 1..10),
            excl in prop::collection::vec(0u32..10, 0..6),
        ) {
            host::reset();
            let mut s = P2cEwma::default();
            s.pool_changed(1, health.iter().enumerate().map(|(i, &h)| backend(i, h)).collect());
            let left = health.iter().enumerate().any(|(i, &h)| h && !excl.contains(&(i as u32)));
            for _ in 0..20 {
                match pick(&mut s, &excl) {
                    Some(i) => prop_assert!(health[i as usize] && !excl.contains(&i)),
                    None => prop_assert!(!left),
                }
            }
        }
    }
}

#[cfg(test)]
mod recovery {
    use super::*;
    use gateway_sdk::{BackendStats, TestRequest};

    /// An idle backend's stats: average latency `lat` µs, measured at `at` ms (0: unknown).
    fn stats(lat: u32, at: u64) -> BackendStats {
        BackendStats { active_requests: 0, ewma_latency_us: lat, consecutive_failures: 0, measured_at_ms: at }
    }

    #[test]
    fn an_unmeasured_slow_backend_is_probed_again() {
        host::reset();
        let mut s = super::tests::strategy(3, r#"{"decay_ms": 200}"#);
        let stats = |lat| stats(lat, 0);
        host::set_now_ms(1_000);
        host::set_backend_stats(0, stats(5_000));
        host::set_backend_stats(1, stats(300));
        host::set_backend_stats(2, stats(310));
        let req = TestRequest::new();
        // The others answer requests all the time, so their measurements keep changing.
        let count = |s: &mut P2cEwma, at: u64| {
            (0..300)
                .filter(|k| {
                    host::set_now_ms(at + k);
                    host::set_backend_stats(1, stats(300 + (*k as u32 % 7)));
                    host::set_backend_stats(2, stats(310 + (*k as u32 % 5)));
                    s.pick(&req, &[]).backend_index() == Some(0)
                })
                .count()
        };
        assert_eq!(count(&mut s, 1_000), 0, "slow: shunned");
        assert!(count(&mut s, 3_000) > 0, "2 s (10 decay periods) unmeasured: probed again");
    }

    #[test]
    fn a_measurement_noticed_late_is_dated_by_when_the_host_took_it() {
        host::reset();
        let mut s = super::tests::strategy(3, r#"{"decay_ms": 200}"#);
        // Backend 0 answered slowly at t = 1 s (another worker's probe); this instance
        // looks at it first at t = 3 s, 10 decay periods later: the old value has faded.
        host::set_now_ms(3_000);
        host::set_backend_stats(0, stats(5_000, 1_000));
        host::set_backend_stats(1, stats(300, 2_999));
        host::set_backend_stats(2, stats(310, 2_999));
        let req = TestRequest::new();
        let to_0 = (0..60).filter(|_| s.pick(&req, &[]).backend_index() == Some(0)).count();
        assert!(to_0 >= 20, "an old slow measurement shunned the backend: {to_0} of 60");
        // The same value measured just now shuns it.
        host::set_backend_stats(0, stats(5_001, 3_000));
        let to_0 = (0..60).filter(|_| s.pick(&req, &[]).backend_index() == Some(0)).count();
        assert_eq!(to_0, 0, "a fresh slow measurement must shun it");
    }
}
