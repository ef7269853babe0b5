//! `rust-header-canary`: send canary traffic to the backends labelled as canaries.
//!
//! A request goes to the canary group when it carries the canary header (default
//! `x-canary: 1`), or otherwise with probability `percent` / 100 (drawn from the
//! host's random numbers); every other request goes to the stable group (the healthy
//! backends without the canary label). Within a group backends take turns (exact round
//! robin through a host counter, one per group). When the chosen group has no healthy
//! backend that this request has not already tried, any healthy backend is used; 503
//! when there is none.
//!
//! Params (JSON, all optional):
//!
//! ```json
//! {"header": "x-canary", "header_value": "1", "percent": 5, "label": "canary", "label_value": "true"}
//! ```

use gateway_sdk::{Backend, Decision, Pool, Request, Strategy, host};
use serde::Deserialize;

/// The route's params.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Params {
    /// Request header that opts a request into the canary (case-insensitive name).
    pub header: String,
    /// Value of `header` that opts in (compared exactly).
    pub header_value: String,
    /// Percentage (0–100, fractions allowed) of the other requests sent to the canary.
    pub percent: f64,
    /// Label key that marks a canary backend.
    pub label: String,
    /// Value of `label` that marks a canary backend.
    pub label_value: String,
}

impl Default for Params {
    fn default() -> Self {
        Params {
            header: "x-canary".into(),
            header_value: "1".into(),
            percent: 0.0,
            label: "canary".into(),
            label_value: "true".into(),
        }
    }
}

impl Params {
    /// Parses and checks the JSON params; the error says what to fix.
    pub fn parse(json: &str) -> Result<Self, String> {
        const EXAMPLE: &str =
            r#"{"header": "x-canary", "header_value": "1", "percent": 5, "label": "canary", "label_value": "true"}"#;
        let bad = |e: String| format!("rust-header-canary: bad params ({e}); expected e.g. {EXAMPLE}");
        let value: serde_json::Value = serde_json::from_str(json).map_err(|e| bad(e.to_string()))?;
        if !value.is_object() {
            return Err(bad("not a JSON object".into()));
        }
        let p: Params = serde_json::from_value(value).map_err(|e| bad(e.to_string()))?;
        if !(0.0..=100.0).contains(&p.percent) {
            return Err(format!("rust-header-canary: \"percent\" must be between 0 and 100, got {}", p.percent));
        }
        if p.header.is_empty() {
            return Err("rust-header-canary: \"header\" must not be empty".into());
        }
        if p.label.is_empty() {
            return Err("rust-header-canary: \"label\" must not be empty".into());
        }
        Ok(p)
    }
}

#[derive(Default)]
pub struct HeaderCanary {
    params: Params,
    pool: Pool,
    /// Healthy backends carrying `label=label_value`, ascending.
    canary: Vec<u32>,
    /// The other healthy backends, ascending.
    stable: Vec<u32>,
}

/// The `turn`-th member of `group` (wrapping), skipping `exclude`.
fn nth(group: &[u32], turn: i64, exclude: &[u32]) -> Option<u32> {
    let len = group.len();
    if len == 0 {
        return None;
    }
    let start = turn.rem_euclid(len as i64) as usize;
    (0..len).map(|k| group[(start + k) % len]).find(|i| !exclude.contains(i))
}

impl HeaderCanary {
    fn wants_canary(&self, req: &dyn Request) -> bool {
        if req.header(&self.params.header).is_some_and(|v| v == self.params.header_value) {
            return true;
        }
        match self.params.percent {
            p if p <= 0.0 => false,
            p if p >= 100.0 => true,
            p => {
                // 53 random bits -> [0, 100).
                let x = (host::random_u64() >> 11) as f64 / (1u64 << 53) as f64 * 100.0;
                x < p
            }
        }
    }
}

impl Strategy for HeaderCanary {
    fn configure(&mut self, params: &str) -> Result<(), String> {
        self.params = Params::parse(params)?;
        Ok(())
    }

    fn pool_changed(&mut self, _generation: u64, backends: Vec<Backend>) {
        self.pool = Pool::new(backends);
        let (label, value) = (&self.params.label, &self.params.label_value);
        let (canary, stable): (Vec<u32>, Vec<u32>) = self
            .pool
            .healthy()
            .iter()
            .partition(|&&i| self.pool.backends()[i as usize].labels.iter().any(|(k, v)| k == label && v == value));
        self.canary = canary;
        self.stable = stable;
    }

    fn pick(&mut self, req: &dyn Request, exclude: &[u32]) -> Decision {
        let (group, key) =
            if self.wants_canary(req) { (&self.canary, "turn:canary") } else { (&self.stable, "turn:stable") };
        let available = group.iter().any(|i| !exclude.contains(i));
        let chosen = if available {
            nth(group, host::counter_add(key, 1) - 1, exclude)
        } else {
            // The chosen group is empty (or all tried): any healthy backend.
            nth(self.pool.healthy(), host::counter_add("turn", 1) - 1, exclude)
        };
        chosen.map_or_else(Decision::no_backend, Decision::backend)
    }
}

gateway_sdk::export_strategy!(HeaderCanary);

#[cfg(test)]
mod tests {
    use super::*;
    use gateway_sdk::TestRequest;

    /// `(healthy, canary)` per backend.
    fn backends(spec: &[(bool, bool)]) -> Vec<Backend> {
        spec.iter()
            .enumerate()
            .map(|(i, &(healthy, canary))| Backend {
                id: format!("b{i}"),
                address: format!("127.0.0.1:{}", 9000 + i),
                weight: 1,
                zone: String::new(),
                labels: if canary { vec![("canary".into(), "true".into())] } else { vec![] },
                healthy,
            })
            .collect()
    }

    fn strategy(params: &str, spec: &[(bool, bool)]) -> HeaderCanary {
        host::reset();
        let mut s = HeaderCanary::default();
        s.configure(params).unwrap();
        s.pool_changed(1, backends(spec));
        s
    }

    fn picks(s: &mut HeaderCanary, req: &TestRequest, n: usize) -> Vec<u32> {
        (0..n).map(|_| s.pick(req, &[]).backend_index().unwrap()).collect()
    }

    #[test]
    fn header_goes_to_canaries_and_the_rest_to_stable() {
        // 0 stable, 1 canary, 2 stable, 3 canary, 4 canary but unhealthy.
        let mut s = strategy("{}", &[(true, false), (true, true), (true, false), (true, true), (false, true)]);
        let canary = TestRequest::new().header("X-Canary", "1");
        assert_eq!(picks(&mut s, &canary, 4), [1, 3, 1, 3]);
        assert_eq!(picks(&mut s, &TestRequest::new(), 4), [0, 2, 0, 2]);
        // Another value of the header does not opt in.
        assert_eq!(picks(&mut s, &TestRequest::new().header("x-canary", "0"), 2), [0, 2]);
    }

    #[test]
    fn header_and_label_are_configurable() {
        host::reset();
        let mut s = HeaderCanary::default();
        s.configure(r#"{"header": "x-beta", "header_value": "yes", "label": "track", "label_value": "beta"}"#).unwrap();
        let mut bs = backends(&[(true, false), (true, false)]);
        bs[1].labels = vec![("track".into(), "beta".into())];
        s.pool_changed(1, bs);
        assert_eq!(picks(&mut s, &TestRequest::new().header("x-beta", "yes"), 2), [1, 1]);
        assert_eq!(picks(&mut s, &TestRequest::new().header("x-canary", "1"), 2), [0, 0]);
    }

    #[test]
    fn percent_sends_about_that_share_to_canaries() {
        let mut s = strategy(r#"{"percent": 20}"#, &[(true, false), (true, true)]);
        let n = 10_000;
        let to_canary = picks(&mut s, &TestRequest::new(), n).iter().filter(|&&i| i == 1).count();
        assert!((1_700..2_300).contains(&to_canary), "{to_canary} of {n}");
        let mut all = strategy(r#"{"percent": 100}"#, &[(true, false), (true, true)]);
        assert_eq!(picks(&mut all, &TestRequest::new(), 5), [1; 5]);
        let mut none = strategy(r#"{"percent": 0}"#, &[(true, false), (true, true)]);
        assert_eq!(picks(&mut none, &TestRequest::new(), 5), [0; 5]);
    }

    #[test]
    fn empty_group_falls_back_to_any_healthy() {
        // No canary: canary requests go to any healthy backend.
        let mut s = strategy("{}", &[(true, false), (true, false)]);
        assert_eq!(picks(&mut s, &TestRequest::new().header("x-canary", "1"), 3), [0, 1, 0]);
        // Only canaries: stable requests go to them.
        let mut s = strategy("{}", &[(true, true), (false, false)]);
        assert_eq!(picks(&mut s, &TestRequest::new(), 2), [0, 0]);
    }

    #[test]
    fn exclude_is_respected_and_503_when_nothing_is_left() {
        let mut s = strategy("{}", &[(true, false), (true, true), (true, false)]);
        let canary = TestRequest::new().header("x-canary", "1");
        // The only canary was tried: fall back to the others.
        let retry = s.pick(&canary, &[1]).backend_index().unwrap();
        assert!(retry == 0 || retry == 2);
        assert_eq!(s.pick(&TestRequest::new(), &[0]).backend_index(), Some(2));
        let d = s.pick(&canary, &[0, 1, 2]);
        assert_eq!(d.backend_index(), None);
        assert!(matches!(d.target, gateway_sdk::Target::Reject(503, _)));
        let mut empty = strategy("{}", &[(false, false), (false, true)]);
        assert_eq!(empty.pick(&canary, &[]).backend_index(), None);
    }

    #[test]
    fn bad_params_are_refused_with_a_message() {
        for (params, needle) in [
            (r#"{"percent": 101}"#, "between 0 and 100"),
            (r#"{"percent": -1}"#, "between 0 and 100"),
            (r#"{"percent": "5"}"#, "bad params"),
            (r#"{"procent": 5}"#, "unknown field"),
            (r#"{"header": ""}"#, "\"header\" must not be empty"),
            ("[]", "bad params"),
            ("not json", "bad params"),
        ] {
            let err = Params::parse(params).unwrap_err();
            assert!(err.contains(needle), "{params}: {err}");
        }
        assert_eq!(Params::parse("{}").unwrap(), Params::default());
    }
}
