//! `sticky-cookie`: session affinity. A client's first request goes to a backend chosen by
//! a fallback strategy (round robin by default), and the response sets a cookie naming
//! that backend:
//!
//! ```text
//! set-cookie: lb=10.0.0.2%3A8080; Path=/; Max-Age=3600; HttpOnly
//! ```
//!
//! Later requests carrying the cookie go to the same backend while it is healthy (and,
//! on a retry, not already tried). When it is not (or the cookie names a backend this
//! upstream does not have) the request is reassigned and the cookie renewed.
//!
//! The cookie holds the backend's `id` (percent-encoded outside `A-Z a-z 0-9 - . _ ~`;
//! the plain id is accepted too), not an index or a server-side session, so every
//! gateway replica with the same backends honours it and nothing is stored per client.
//!
//! Params:
//! - `cookie` (string, default `"lb"`): the cookie's name.
//! - `ttl_s` (positive integer, default 3600): the cookie's `Max-Age`, in seconds.
//! - `fallback` (`"round-robin"` or `"random"`, default `"round-robin"`): how new clients
//!   are assigned.
//! - `on_miss` (`"assign"` or `"pass"`, default `"assign"`): what to do with a request
//!   without a cookie naming a healthy backend: assign one by `fallback` and set the
//!   cookie, or pass, so that the next strategy of the upstream's chain decides (e.g.
//!   `strategy: [{plugin: sticky-cookie, params: {on_miss: pass}}, {plugin: consistent-hash}]`).
//!
//! ```yaml
//! upstreams:
//!   shop:
//!     backends: [{ address: "10.0.0.1:8080", id: cart-1 }, { address: "10.0.0.2:8080", id: cart-2 }]
//!     strategy: { plugin: sticky-cookie, params: { cookie: shop_lb, ttl_s: 86400, fallback: round-robin } }
//! ```

use gateway_sdk::hash::StableBuildHasher;
use gateway_sdk::params::Params;
use gateway_sdk::weights::below;
use gateway_sdk::{Backend, Decision, Pool, Request, Strategy, host};
use std::collections::HashMap;

/// The host counter of the round-robin fallback.
const COUNTER: &str = "sticky";
/// Cookie values longer than this cannot name a backend and are not looked up.
const MAX_COOKIE_LEN: usize = 1024;

/// How clients without a (usable) cookie are assigned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fallback {
    RoundRobin,
    Random,
}

/// The strategy: one per plugin instance.
#[derive(Debug)]
pub struct StickyCookie {
    cookie: String,
    ttl_s: u64,
    fallback: Fallback,
    /// Pass (let the next strategy decide) when the cookie names no usable backend.
    pass_on_miss: bool,
    pool: Pool,
    /// Encoded backend id (the cookie value) → index.
    by_id: HashMap<String, u32, StableBuildHasher>,
    /// The `set-cookie` value for each backend index, built when the pool changes.
    set_cookie: Vec<String>,
}

impl Default for StickyCookie {
    fn default() -> Self {
        StickyCookie {
            cookie: "lb".into(),
            ttl_s: 3600,
            fallback: Fallback::RoundRobin,
            pass_on_miss: false,
            pool: Pool::default(),
            by_id: HashMap::default(),
            set_cookie: Vec::new(),
        }
    }
}

impl StickyCookie {
    /// The backend the request's cookie names, if it may serve this attempt.
    fn sticky(&self, req: &dyn Request, exclude: &[u32]) -> Option<u32> {
        let value = req.cookie(&self.cookie)?;
        if value.len() > MAX_COOKIE_LEN {
            return None;
        }
        let index = match self.by_id.get(value.as_str()) {
            Some(&i) => i,
            // Also accept the id as is (a cookie written by hand or by another tool).
            None => *self.by_id.get(encode_id(&value).as_str())?,
        };
        (self.pool.is_healthy(index) && !exclude.contains(&index)).then_some(index)
    }

    /// A backend for a client without a usable cookie.
    fn assign(&self, exclude: &[u32]) -> Option<u32> {
        let n = self.pool.healthy().len() as u64;
        if n == 0 {
            return None;
        }
        let start = match self.fallback {
            Fallback::RoundRobin => (host::counter_add(COUNTER, 1) - 1).rem_euclid(n as i64) as u64,
            Fallback::Random => below(host::random_u64(), n),
        };
        self.pool.healthy_nth(start, exclude)
    }
}

/// True for a valid cookie name (an RFC 6265 token).
fn is_cookie_name(name: &str) -> bool {
    !name.is_empty() && name.bytes().all(|b| b.is_ascii_graphic() && !b"()<>@,;:\\\"/[]?={}".contains(&b))
}

/// The cookie value naming backend `id`: percent-encoded outside `A-Z a-z 0-9 - . _ ~`.
pub fn encode_id(id: &str) -> String {
    let mut out = String::with_capacity(id.len());
    for b in id.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl Strategy for StickyCookie {
    fn configure(&mut self, params: &str) -> Result<(), String> {
        let mut p = Params::parse(params)?;
        let cookie = p.string("cookie")?.unwrap_or_else(|| "lb".into());
        if !is_cookie_name(&cookie) {
            return Err(format!(
                "param 'cookie': \"{cookie}\" is not a valid cookie name (use letters, digits and !#$%&'*+-.^_`|~, e.g. \"lb\")"
            ));
        }
        let ttl_s = p.positive_u64("ttl_s")?.unwrap_or(3600);
        let fallback = match p.one_of("fallback", &["round-robin", "random"])?.as_deref() {
            Some("random") => Fallback::Random,
            _ => Fallback::RoundRobin,
        };
        let pass_on_miss = p.one_of("on_miss", &["assign", "pass"])?.as_deref() == Some("pass");
        p.finish()?;
        *self = StickyCookie { cookie, ttl_s, fallback, pass_on_miss, ..Default::default() };
        Ok(())
    }

    fn pool_changed(&mut self, _generation: u64, backends: Vec<Backend>) {
        let mut by_id = HashMap::with_capacity_and_hasher(backends.len(), StableBuildHasher::default());
        let mut set_cookie = Vec::with_capacity(backends.len());
        for (i, b) in backends.iter().enumerate() {
            let value = encode_id(&b.id);
            set_cookie.push(format!("{}={value}; Path=/; Max-Age={}; HttpOnly", self.cookie, self.ttl_s));
            // With duplicate ids (a configuration mistake) the first backend keeps them.
            by_id.entry(value).or_insert(i as u32);
        }
        self.by_id = by_id;
        self.set_cookie = set_cookie;
        self.pool = Pool::new(backends);
    }

    fn pick(&mut self, req: &dyn Request, exclude: &[u32]) -> Decision {
        if let Some(index) = self.sticky(req, exclude) {
            return Decision::backend(index);
        }
        if self.pass_on_miss {
            return Decision::pass();
        }
        match self.assign(exclude) {
            Some(index) => Decision::backend(index).with_header("set-cookie", self.set_cookie[index as usize].clone()),
            None => Decision::no_backend(),
        }
    }
}

gateway_sdk::export_strategy!(StickyCookie);

#[cfg(test)]
mod tests {
    use super::*;
    use gateway_sdk::TestRequest;
    use proptest::prelude::{ProptestConfig, prop, prop_assert, prop_assert_eq, prop_assert_ne, proptest};

    fn backend(i: usize, healthy: bool) -> Backend {
        Backend {
            id: format!("10.0.0.{i}:8080"),
            address: format!("10.0.0.{i}:8080"),
            weight: 1,
            zone: String::new(),
            labels: vec![],
            healthy,
        }
    }

    fn strategy(params: &str, health: &[bool]) -> StickyCookie {
        let mut s = StickyCookie::default();
        s.configure(params).unwrap();
        s.pool_changed(1, health.iter().enumerate().map(|(i, &h)| backend(i, h)).collect());
        s
    }

    /// The request a browser sends after receiving `set_cookie` (if any).
    fn with_cookie(set_cookie: Option<&str>) -> TestRequest {
        match set_cookie {
            Some(sc) => TestRequest::new().header("cookie", &format!("theme=dark; {}", sc.split(';').next().unwrap())),
            None => TestRequest::new(),
        }
    }

    fn set_cookie(d: &Decision) -> Option<&str> {
        d.response_headers.iter().find(|(k, _)| k == "set-cookie").map(|(_, v)| v.as_str())
    }

    #[test]
    fn a_new_client_gets_a_cookie_naming_the_backend() {
        host::reset();
        let mut s = strategy("{}", &[true, true, true]);
        let d = s.pick(&TestRequest::new(), &[]);
        assert_eq!(d.backend_index(), Some(0));
        assert_eq!(set_cookie(&d), Some("lb=10.0.0.0%3A8080; Path=/; Max-Age=3600; HttpOnly"));
        // The next new client goes round robin.
        assert_eq!(s.pick(&TestRequest::new(), &[]).backend_index(), Some(1));
    }

    #[test]
    fn a_returning_client_stays_without_a_new_cookie() {
        host::reset();
        let mut s = strategy(r#"{"cookie": "shop", "ttl_s": 60}"#, &[true, true, true]);
        s.pick(&TestRequest::new(), &[]);
        let first = s.pick(&TestRequest::new(), &[]);
        assert_eq!(set_cookie(&first), Some("shop=10.0.0.1%3A8080; Path=/; Max-Age=60; HttpOnly"));
        let req = with_cookie(set_cookie(&first));
        for _ in 0..10 {
            let d = s.pick(&req, &[]);
            assert_eq!(d.backend_index(), Some(1));
            assert!(d.response_headers.is_empty());
        }
    }

    #[test]
    fn an_unhealthy_or_unknown_backend_means_a_new_one_and_a_new_cookie() {
        host::reset();
        let mut s = strategy("{}", &[true, true]);
        let req = TestRequest::new().header("cookie", "lb=10.0.0.1%3A8080");
        assert_eq!(s.pick(&req, &[]).backend_index(), Some(1));
        let raw = TestRequest::new().header("cookie", "lb=10.0.0.1:8080");
        assert_eq!(s.pick(&raw, &[]).backend_index(), Some(1), "an unencoded id is understood too");
        s.pool_changed(2, vec![backend(0, true), backend(1, false)]);
        let d = s.pick(&req, &[]);
        assert_eq!(d.backend_index(), Some(0));
        assert_eq!(set_cookie(&d), Some("lb=10.0.0.0%3A8080; Path=/; Max-Age=3600; HttpOnly"));
        for stale in ["lb=10.0.0.9%3A8080", "lb=", "lb=10.0.0.1:8080"] {
            let d = s.pick(&TestRequest::new().header("cookie", stale), &[]);
            assert_eq!(d.backend_index(), Some(0), "{stale}");
            assert!(set_cookie(&d).is_some(), "{stale}");
        }
    }

    #[test]
    fn a_retry_moves_the_client_and_renews_the_cookie() {
        host::reset();
        let mut s = strategy("{}", &[true, true, true]);
        let req = TestRequest::new().header("cookie", "lb=10.0.0.2%3A8080");
        let d = s.pick(&req, &[2]);
        assert_ne!(d.backend_index(), Some(2));
        let new = d.backend_index().unwrap() as usize;
        assert_eq!(set_cookie(&d).unwrap(), s.set_cookie[new]);
        assert_eq!(s.pick(&req, &[0, 1, 2]).backend_index(), None);
        assert_eq!(strategy("{}", &[false]).pick(&req, &[]).backend_index(), None);
    }

    #[test]
    fn random_fallback_assigns_randomly() {
        host::reset();
        let mut s = strategy(r#"{"fallback": "random"}"#, &[true, true, true, true]);
        let mut counts = [0; 4];
        for _ in 0..4_000 {
            counts[s.pick(&TestRequest::new(), &[]).backend_index().unwrap() as usize] += 1;
        }
        assert!(counts.iter().all(|&c| (850..=1150).contains(&c)), "{counts:?}");
    }

    #[test]
    fn ids_are_encoded_for_cookies() {
        assert_eq!(encode_id("cart-1"), "cart-1");
        assert_eq!(encode_id("[2001:db8::1]:80"), "%5B2001%3Adb8%3A%3A1%5D%3A80");
        assert_eq!(encode_id("a b;c=d,é"), "a%20b%3Bc%3Dd%2C%C3%A9");
    }

    #[test]
    fn params_are_checked() {
        let mut s = StickyCookie::default();
        assert_eq!(
            s.configure(r#"{"cookie": "my cookie"}"#).unwrap_err(),
            "param 'cookie': \"my cookie\" is not a valid cookie name (use letters, digits and !#$%&'*+-.^_`|~, e.g. \"lb\")"
        );
        assert_eq!(s.configure(r#"{"ttl_s": 0}"#).unwrap_err(), "param 'ttl_s': expected a positive integer, got 0");
        assert_eq!(
            s.configure(r#"{"fallback": "least-connections"}"#).unwrap_err(),
            "param 'fallback': expected one of \"round-robin\", \"random\", got \"least-connections\""
        );
        assert_eq!(
            s.configure(r#"{"name": "x"}"#).unwrap_err(),
            "unknown param 'name' (accepted: cookie, ttl_s, fallback, on_miss)"
        );
        assert!(s.configure(r#"{"cookie": "SESSION_LB", "ttl_s": 10, "fallback": "random"}"#).is_ok());
        assert_eq!((s.cookie.as_str(), s.ttl_s, s.fallback), ("SESSION_LB", 10, Fallback::Random));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// 100 clients keep their backend over many requests; when one backend goes
        /// unhealthy only its clients move (and get a new cookie), the others stay put.
        #[test]
        fn clients_stay_put_and_only_the_failed_backends_clients_move(
            n in 2usize..12,
            failing in 0usize..12,
            random in prop::bool::ANY,
        ) {
            host::reset();
            let failing = failing % n;
            let params = if random { r#"{"fallback": "random"}"# } else { "{}" };
            let mut s = strategy(params, &vec![true; n]);
            // First visits.
            let mut clients: Vec<(u32, TestRequest)> = (0..100)
                .map(|_| {
                    let d = s.pick(&TestRequest::new(), &[]);
                    (d.backend_index().unwrap(), with_cookie(set_cookie(&d)))
                })
                .collect();
            for _ in 0..3 {
                for (b, req) in &clients {
                    let d = s.pick(req, &[]);
                    prop_assert_eq!(d.backend_index(), Some(*b));
                    prop_assert!(d.response_headers.is_empty());
                }
            }
            let mut health = vec![true; n];
            health[failing] = false;
            s.pool_changed(2, health.iter().enumerate().map(|(i, &h)| backend(i, h)).collect());
            for (b, req) in &mut clients {
                let d = s.pick(req, &[]);
                if *b as usize == failing {
                    prop_assert_ne!(d.backend_index(), Some(*b));
                    prop_assert!(set_cookie(&d).is_some());
                    *b = d.backend_index().unwrap();
                    *req = with_cookie(set_cookie(&d));
                } else {
                    prop_assert_eq!(d.backend_index(), Some(*b));
                }
            }
            // And the moved clients stick to their new backend.
            for (b, req) in &clients {
                prop_assert_eq!(s.pick(req, &[]).backend_index(), Some(*b));
            }
        }

        /// Never an excluded or unhealthy backend; `None` only when nothing is left.
        #[test]
        fn exclusion_is_respected(
            health in prop::collection::vec(prop::bool::weighted(0.7), 1..8),
            cookie_for in 0usize..8,
            excl in prop::collection::vec(0u32..8, 0..6),
        ) {
            host::reset();
            let mut s = strategy("{}", &health);
            let req = TestRequest::new().header("cookie", &format!("lb={}", encode_id(&format!("10.0.0.{cookie_for}:8080"))));
            let left = health.iter().enumerate().any(|(i, &h)| h && !excl.contains(&(i as u32)));
            match s.pick(&req, &excl).backend_index() {
                Some(i) => prop_assert!(health[i as usize] && !excl.contains(&i)),
                None => prop_assert!(!left),
            }
        }
    }

    #[test]
    fn on_miss_pass_passes_without_a_usable_cookie_and_keeps_sticky_clients() {
        let mut s = strategy(r#"{"on_miss": "pass"}"#, &[true, true, false]);
        assert!(s.pick(&TestRequest::new(), &[]).is_pass(), "no cookie: no opinion");
        let req = |id: &str| TestRequest::new().header("cookie", &format!("lb={}", encode_id(id)));
        assert_eq!(s.pick(&req("10.0.0.1:8080"), &[]), Decision::backend(1));
        assert!(s.pick(&req("10.0.0.2:8080"), &[]).is_pass(), "the cookie names a backend that is down");
        assert!(s.pick(&req("10.0.0.1:8080"), &[1]).is_pass(), "a retry: its backend was tried");
        let mut bad = StickyCookie::default();
        assert!(bad.configure(r#"{"on_miss": "skip"}"#).unwrap_err().contains("on_miss"));
    }
}
