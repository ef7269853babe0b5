//! `consistent-hash`: requests with the same key go to the same backend, and when a
//! backend joins or leaves only about `1/N` of the keys move. The key is a header, a
//! cookie, a query parameter, the path or the client's IP address.
//!
//! Two algorithms, both built when the pool changes so that a pick is one lookup:
//! - `ring` (default): a hash ring with 160 points per unit of `weight` for each healthy
//!   backend (at most 2^19 points in all; beyond that, fewer per backend). A key goes to
//!   the first point at or after its hash: a binary search.
//! - `maglev`: Google's Maglev table, a prime number of slots (65,537, or the first prime
//!   above 100 × the healthy backends if that is more) filled from each backend's
//!   permutation in proportion to its weight. A key goes to slot `hash % size`: one
//!   index. Spreads keys more evenly than the ring; a change moves slightly more keys.
//!   Prefer it for pools of thousands of backends, where the ring's point budget leaves
//!   each backend only a few dozen points (and so a less even share).
//!
//! Points and permutations are derived from each backend's `id` with a hash that is the
//! same in every process (the SDK's FNV-1a 64 + fmix64), so every gateway replica
//! sends a key to the same backend whatever the order of its backend list.
//!
//! On a retry the request goes to the next backend along the ring (or table) that it
//! has not tried, so a key's second choice is stable too. A request without the key
//! (no such header, cookie or param) is served round robin, or passed to the next
//! strategy of the upstream's chain with `on_miss: pass`.
//!
//! Params:
//! - `key` (default `"client-ip"`): `"header:NAME"`, `"cookie:NAME"`, `"query:NAME"`,
//!   `"path"` (the path without the query string) or `"client-ip"`.
//! - `algorithm` (default `"ring"`): `"ring"` or `"maglev"`.
//! - `on_miss` (default `"round-robin"`): a request without the key is served
//!   `"round-robin"`, or `"pass"`ed so that the next strategy of the chain decides.
//!
//! ```yaml
//! upstreams:
//!   cache:
//!     backends: [{ address: "10.0.0.1:11211", id: cache-a }, { address: "10.0.0.2:11211", id: cache-b }]
//!     strategy: { plugin: consistent-hash, params: { key: "header:x-user-id", algorithm: maglev } }
//! ```

use gateway_sdk::hash::{StableHasher, hash64, hash64_seeded};
use gateway_sdk::params::Params;
use gateway_sdk::{Backend, Decision, Pool, Request, Strategy, host};
use std::hash::Hasher;

/// Ring points per unit of weight.
pub const POINTS_PER_WEIGHT: u64 = 160;
/// Most ring points in all; larger pools get fewer points per backend.
pub const MAX_POINTS: u64 = 1 << 19;
/// Maglev table size for up to 655 healthy backends (a prime).
pub const MAGLEV_MIN_SIZE: u64 = 65_537;
/// Maglev table slots per healthy backend, at least.
pub const MAGLEV_SLOTS_PER_BACKEND: u64 = 100;
/// The host counter of the round robin for requests without a key.
const COUNTER: &str = "chash";
/// Seeds of Maglev's two hashes of a backend id.
const SEED_OFFSET: u64 = 0x6d61_676c_6576_6f66; // "maglevof"
const SEED_SKIP: u64 = 0x6d61_676c_6576_736b; // "maglevsk"

/// Where the key comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
enum KeySource {
    Header(String),
    Cookie(String),
    Query(String),
    Path,
    ClientIp,
}

impl KeySource {
    fn parse(spec: &str) -> Result<Self, String> {
        let bad = || {
            format!(
                "param 'key': expected \"client-ip\", \"path\", \"header:NAME\", \"cookie:NAME\" or \"query:NAME\", got \"{spec}\""
            )
        };
        let named = |name: &str| -> Result<String, String> {
            let name = name.trim();
            if name.is_empty() || !name.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(bad());
            }
            Ok(name.to_owned())
        };
        match spec.split_once(':') {
            None if spec == "client-ip" => Ok(KeySource::ClientIp),
            None if spec == "path" => Ok(KeySource::Path),
            Some(("header", n)) => Ok(KeySource::Header(named(n)?.to_ascii_lowercase())),
            Some(("cookie", n)) => Ok(KeySource::Cookie(named(n)?)),
            Some(("query", n)) => Ok(KeySource::Query(named(n)?)),
            _ => Err(bad()),
        }
    }

    /// The key's hash, reading only what this source needs; `None` when the request has
    /// no (or an empty) key.
    fn hash(&self, req: &dyn Request) -> Option<u64> {
        let value = match self {
            KeySource::Header(n) => req.header(n)?,
            KeySource::Cookie(n) => req.cookie(n)?,
            KeySource::Query(n) => req.query_param(n)?,
            KeySource::ClientIp => req.client_ip(),
            KeySource::Path => {
                let mut p = req.path();
                if let Some(q) = p.find('?') {
                    p.truncate(q);
                }
                p
            }
        };
        (!value.is_empty()).then(|| hash64(value.as_bytes()))
    }
}

/// How the lookup structure is built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Algorithm {
    Ring,
    Maglev,
}

/// The strategy: one per plugin instance.
#[derive(Debug)]
pub struct ConsistentHash {
    key: KeySource,
    algorithm: Algorithm,
    /// Pass (let the next strategy decide) on a request without the key.
    pass_on_miss: bool,
    pool: Pool,
    /// Ring: point hashes, ascending. Empty for Maglev.
    points: Vec<u64>,
    /// Ring: the backend of each point. Maglev: the backend of each slot.
    owners: Vec<u32>,
}

impl Default for ConsistentHash {
    fn default() -> Self {
        ConsistentHash {
            key: KeySource::ClientIp,
            algorithm: Algorithm::Ring,
            pass_on_miss: false,
            pool: Pool::default(),
            points: Vec::new(),
            owners: Vec::new(),
        }
    }
}

/// The healthy backends' indexes sorted by id, so that building does not depend on the
/// order of the list (replicas may list backends differently).
fn healthy_by_id(pool: &Pool) -> Vec<u32> {
    let mut v = pool.healthy().to_vec();
    v.sort_by(|&a, &b| pool.backends()[a as usize].id.cmp(&pool.backends()[b as usize].id).then(a.cmp(&b)));
    v
}

/// Builds the ring: (point hashes ascending, owner of each point).
pub fn build_ring(pool: &Pool) -> (Vec<u64>, Vec<u32>) {
    let backends = pool.backends();
    let order = healthy_by_id(pool);
    let total_weight: u64 = order.iter().map(|&i| u64::from(backends[i as usize].weight.max(1))).sum();
    let points_for = |w: u32| -> u64 {
        let w = u64::from(w.max(1));
        if total_weight * POINTS_PER_WEIGHT <= MAX_POINTS {
            w * POINTS_PER_WEIGHT
        } else {
            (w * MAX_POINTS / total_weight).max(1)
        }
    };
    let mut ring: Vec<(u64, u32)> = Vec::new();
    for &i in &order {
        let b = &backends[i as usize];
        for v in 0..points_for(b.weight) {
            let mut h = StableHasher::new();
            h.write(b.id.as_bytes());
            h.write_u8(0xff); // never in UTF-8: `id` and the point number cannot run together
            h.write_u32(v as u32);
            ring.push((h.finish(), i));
        }
    }
    // Equal hashes (practically never) keep the id order: stable sort.
    ring.sort_by_key(|&(h, _)| h);
    ring.into_iter().unzip()
}

/// Smallest prime ≥ `n`.
fn next_prime(mut n: u64) -> u64 {
    let is_prime = |n: u64| n >= 2 && (2..).take_while(|d| d * d <= n).all(|d| !n.is_multiple_of(d));
    while !is_prime(n) {
        n += 1;
    }
    n
}

/// Builds a Maglev lookup table (the owner of each slot), as in "Maglev: A Fast and
/// Reliable Software Network Load Balancer" (NSDI 2016), with weights handled as in
/// Envoy: a backend of weight `w` takes a turn in `w / max weight` of the rounds.
pub fn build_maglev(pool: &Pool) -> Vec<u32> {
    let backends = pool.backends();
    let order = healthy_by_id(pool);
    if order.is_empty() {
        return Vec::new();
    }
    let size = next_prime(MAGLEV_MIN_SIZE.max(MAGLEV_SLOTS_PER_BACKEND * order.len() as u64));
    struct Entry {
        index: u32,
        /// Next slot of this backend's permutation.
        next: u64,
        skip: u64,
        weight: u64,
        /// Rounds × max weight already claimed.
        target: u64,
    }
    let mut entries: Vec<Entry> = order
        .iter()
        .map(|&i| {
            let id = backends[i as usize].id.as_bytes();
            Entry {
                index: i,
                next: hash64_seeded(SEED_OFFSET, id) % size,
                skip: hash64_seeded(SEED_SKIP, id) % (size - 1) + 1,
                weight: u64::from(backends[i as usize].weight.max(1)),
                target: 0,
            }
        })
        .collect();
    let max_weight = entries.iter().map(|e| e.weight).max().unwrap_or(1);
    const EMPTY: u32 = u32::MAX;
    let mut table = vec![EMPTY; size as usize];
    let mut filled = 0u64;
    'rounds: for round in 1u64.. {
        for e in &mut entries {
            if round * e.weight < e.target {
                continue;
            }
            e.target += max_weight;
            // `size` is prime, so the permutation reaches every slot: this ends.
            loop {
                let slot = e.next as usize;
                e.next = (e.next + e.skip) % size;
                if table[slot] == EMPTY {
                    table[slot] = e.index;
                    break;
                }
            }
            filled += 1;
            if filled == size {
                break 'rounds;
            }
        }
    }
    table
}

impl ConsistentHash {
    /// Where the key's walk along `owners` starts.
    fn start(&self, hash: u64) -> usize {
        match self.algorithm {
            Algorithm::Ring => {
                let p = self.points.partition_point(|&x| x < hash);
                if p == self.points.len() { 0 } else { p }
            }
            Algorithm::Maglev => (hash % self.owners.len() as u64) as usize,
        }
    }
}

impl Strategy for ConsistentHash {
    fn configure(&mut self, params: &str) -> Result<(), String> {
        let mut p = Params::parse(params)?;
        let key = match p.string("key")? {
            Some(spec) => KeySource::parse(&spec)?,
            None => KeySource::ClientIp,
        };
        let algorithm = match p.one_of("algorithm", &["ring", "maglev"])?.as_deref() {
            Some("maglev") => Algorithm::Maglev,
            _ => Algorithm::Ring,
        };
        let pass_on_miss = p.one_of("on_miss", &["round-robin", "pass"])?.as_deref() == Some("pass");
        p.finish()?;
        *self = ConsistentHash { key, algorithm, pass_on_miss, ..Default::default() };
        Ok(())
    }

    fn pool_changed(&mut self, _generation: u64, backends: Vec<Backend>) {
        let pool = Pool::new(backends);
        (self.points, self.owners) = match self.algorithm {
            Algorithm::Ring => build_ring(&pool),
            Algorithm::Maglev => (Vec::new(), build_maglev(&pool)),
        };
        self.pool = pool;
    }

    fn pick(&mut self, req: &dyn Request, exclude: &[u32]) -> Decision {
        let len = self.owners.len();
        if len == 0 {
            return Decision::no_backend();
        }
        let Some(hash) = self.key.hash(req) else {
            if self.pass_on_miss {
                return Decision::pass();
            }
            let turn = host::counter_add(COUNTER, 1) - 1;
            return self.pool.healthy_nth(turn as u64, exclude).map_or_else(Decision::no_backend, Decision::backend);
        };
        let start = self.start(hash);
        let first = self.owners[start];
        if !exclude.contains(&first) {
            return Decision::backend(first);
        }
        if self.pool.available(exclude) == 0 {
            return Decision::no_backend();
        }
        // Some backend not yet tried owns a point: the walk finds it.
        (1..len)
            .map(|k| self.owners[(start + k) % len])
            .find(|i| !exclude.contains(i))
            .map_or_else(Decision::no_backend, Decision::backend)
    }
}

gateway_sdk::export_strategy!(ConsistentHash);

#[cfg(test)]
mod tests {
    use super::*;
    use gateway_sdk::TestRequest;
    use proptest::prelude::{ProptestConfig, prop, prop_assert, prop_assert_eq, proptest};

    fn backend(id: &str, weight: u32, healthy: bool) -> Backend {
        Backend { id: id.into(), address: format!("{id}:80"), weight, zone: String::new(), labels: vec![], healthy }
    }

    fn named(n: usize) -> Vec<Backend> {
        (0..n).map(|i| backend(&format!("backend-{i}"), 1, true)).collect()
    }

    fn strategy(params: &str, backends: Vec<Backend>) -> ConsistentHash {
        let mut s = ConsistentHash::default();
        s.configure(params).unwrap();
        s.pool_changed(1, backends);
        s
    }

    fn by_ip(ip: &str) -> TestRequest {
        TestRequest::new().client_ip(ip)
    }

    fn key(k: usize) -> TestRequest {
        by_ip(&format!("10.{}.{}.{}", k >> 16, (k >> 8) & 255, k & 255))
    }

    /// The backend id each of `keys` keys goes to.
    fn assignment(s: &mut ConsistentHash, keys: usize) -> Vec<String> {
        (0..keys)
            .map(|k| {
                let i = s.pick(&key(k), &[]).backend_index().unwrap();
                s.pool.backends()[i as usize].id.clone()
            })
            .collect()
    }

    const ALGORITHMS: [&str; 2] = [r#"{"algorithm": "ring"}"#, r#"{"algorithm": "maglev"}"#];

    #[test]
    fn each_key_source_is_sticky() {
        host::reset();
        let cases = [
            (r#"{"key": "header:X-User"}"#, TestRequest::new().header("x-user", "alice")),
            (r#"{"key": "cookie:sid"}"#, TestRequest::new().header("cookie", "a=1; sid=s3cr3t")),
            (r#"{"key": "query:user"}"#, TestRequest::new().path("/cart?user=bob&x=1")),
            (r#"{"key": "path"}"#, TestRequest::new().path("/books/dune")),
            ("{}", by_ip("203.0.113.7")),
        ];
        for (params, req) in cases {
            let mut s = strategy(params, named(10));
            let first = s.pick(&req, &[]).backend_index().unwrap();
            for _ in 0..20 {
                assert_eq!(s.pick(&req, &[]).backend_index(), Some(first), "{params}");
            }
        }
    }

    #[test]
    fn the_path_key_ignores_the_query_string() {
        host::reset();
        let mut s = strategy(r#"{"key": "path"}"#, named(10));
        let a = s.pick(&TestRequest::new().path("/books/dune"), &[]).backend_index();
        for p in ["/books/dune?lang=en", "/books/dune?page=2"] {
            assert_eq!(s.pick(&TestRequest::new().path(p), &[]).backend_index(), a);
        }
    }

    #[test]
    fn requests_without_the_key_go_round_robin() {
        host::reset();
        let mut s = strategy(r#"{"key": "header:x-user"}"#, named(3));
        let seq: Vec<_> = (0..6).map(|_| s.pick(&TestRequest::new(), &[]).backend_index().unwrap()).collect();
        assert_eq!(seq, [0, 1, 2, 0, 1, 2]);
        let empty = TestRequest::new().header("x-user", "");
        assert_eq!(s.pick(&empty, &[]).backend_index(), Some(0), "an empty key counts as none");
        assert_eq!(s.pick(&TestRequest::new(), &[0, 1, 2]).backend_index(), None);
    }

    #[test]
    fn keys_spread_evenly() {
        for params in ALGORITHMS {
            host::reset();
            let mut s = strategy(params, named(10));
            let ids = assignment(&mut s, 10_000);
            for b in 0..10 {
                let n = ids.iter().filter(|id| **id == format!("backend-{b}")).count();
                assert!((700..=1_300).contains(&n), "{params}: backend-{b} has {n} of 10000 keys");
            }
        }
    }

    #[test]
    fn weights_scale_the_share() {
        for params in ALGORITHMS {
            host::reset();
            let mut s = strategy(params, vec![backend("heavy", 3, true), backend("light", 1, true)]);
            let heavy = assignment(&mut s, 10_000).iter().filter(|id| *id == "heavy").count();
            assert!((7_000..=8_000).contains(&heavy), "{params}: heavy has {heavy} of 10000 keys");
        }
    }

    #[test]
    fn replicas_agree_whatever_the_order_of_their_backends() {
        for params in ALGORITHMS {
            host::reset();
            let mut a = strategy(params, named(7));
            let mut reversed = named(7);
            reversed.reverse();
            let mut b = strategy(params, reversed);
            assert_eq!(assignment(&mut a, 2_000), assignment(&mut b, 2_000), "{params}");
        }
    }

    #[test]
    fn the_mapping_is_pinned_across_releases() {
        // Replicas running different releases must agree: this pins the hash, the point
        // derivation and the table fill. If it fails, keys would move on upgrade.
        host::reset();
        let mut ring = strategy("{}", named(5));
        let mut maglev = strategy(r#"{"algorithm": "maglev"}"#, named(5));
        let ring_ids = assignment(&mut ring, 8);
        let maglev_ids = assignment(&mut maglev, 8);
        assert_eq!(ring_ids.join(","), PINNED_RING);
        assert_eq!(maglev_ids.join(","), PINNED_MAGLEV);
    }

    const PINNED_RING: &str = "backend-0,backend-2,backend-2,backend-4,backend-2,backend-4,backend-1,backend-3";
    const PINNED_MAGLEV: &str = "backend-0,backend-3,backend-0,backend-2,backend-4,backend-1,backend-1,backend-2";

    #[test]
    fn a_retry_walks_on_to_the_next_backend() {
        for params in ALGORITHMS {
            host::reset();
            let mut s = strategy(params, named(5));
            for k in 0..200 {
                let req = key(k);
                let first = s.pick(&req, &[]).backend_index().unwrap();
                let second = s.pick(&req, &[first]).backend_index().unwrap();
                assert_ne!(first, second);
                assert_eq!(s.pick(&req, &[first]).backend_index(), Some(second), "stable second choice");
                let third = s.pick(&req, &[first, second]).backend_index().unwrap();
                assert!(third != first && third != second);
            }
            assert_eq!(s.pick(&key(1), &[0, 1, 2, 3, 4]).backend_index(), None);
        }
    }

    #[test]
    fn unhealthy_backends_get_no_keys() {
        for params in ALGORITHMS {
            host::reset();
            let mut backends = named(4);
            backends[2].healthy = false;
            let mut s = strategy(params, backends);
            assert!(!assignment(&mut s, 2_000).contains(&"backend-2".to_owned()));
            let mut none = strategy(params, vec![backend("x", 1, false)]);
            assert_eq!(none.pick(&key(1), &[]).backend_index(), None);
        }
    }

    #[test]
    fn large_pools_stay_bounded() {
        host::reset();
        let big = named(10_000);
        let ring = strategy("{}", big.clone());
        assert!(ring.points.len() as u64 <= MAX_POINTS && ring.points.len() >= 10_000 * 50);
        let maglev = strategy(r#"{"algorithm": "maglev"}"#, big);
        assert_eq!(maglev.owners.len(), 1_000_003, "first prime ≥ 100 × 10,000");
        assert!(maglev.owners.iter().all(|&o| o < 10_000));
    }

    #[test]
    fn next_prime_finds_primes() {
        assert_eq!(next_prime(65_537), 65_537);
        assert_eq!(next_prime(65_538), 65_539);
        assert_eq!(next_prime(1_000_000), 1_000_003);
    }

    #[test]
    fn params_are_checked() {
        let mut s = ConsistentHash::default();
        let expected =
            "param 'key': expected \"client-ip\", \"path\", \"header:NAME\", \"cookie:NAME\" or \"query:NAME\"";
        for bad in ["ip", "header:", "header", "body:x", "cookie: "] {
            let err = s.configure(&format!(r#"{{"key": "{bad}"}}"#)).unwrap_err();
            assert!(err.starts_with(expected), "{bad}: {err}");
        }
        assert_eq!(
            s.configure(r#"{"algorithm": "jump"}"#).unwrap_err(),
            "param 'algorithm': expected one of \"ring\", \"maglev\", got \"jump\""
        );
        assert_eq!(
            s.configure(r#"{"keys": "path"}"#).unwrap_err(),
            "unknown param 'keys' (accepted: key, algorithm, on_miss)"
        );
        s.configure(r#"{"key": "header:X-Tenant", "algorithm": "maglev"}"#).unwrap();
        assert_eq!((s.key.clone(), s.algorithm), (KeySource::Header("x-tenant".into()), Algorithm::Maglev));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]

        /// Taking one of N backends out moves about 1/N of the keys (at most 1/N + 5%),
        /// and with the ring only the keys it held. (N ≥ 8 keeps the 5% margin above 5
        /// standard deviations of a ring backend's share, so this never flakes.)
        #[test]
        fn removing_a_backend_moves_few_keys(n in 8usize..16, gone in 0usize..16, maglev in prop::bool::ANY, salt in 0u32..1000) {
            host::reset();
            let gone = gone % n;
            let params = ALGORITHMS[usize::from(maglev)];
            let pool: Vec<Backend> = (0..n).map(|i| backend(&format!("srv-{salt}-{i}"), 1, true)).collect();
            let before = assignment(&mut strategy(params, pool.clone()), 10_000);
            let mut after_pool = pool.clone();
            after_pool[gone].healthy = false;
            let after = assignment(&mut strategy(params, after_pool), 10_000);
            let moved = before.iter().zip(&after).filter(|(a, b)| a != b).count();
            prop_assert!(moved <= 10_000 / n + 500, "{}: {} of 10000 keys moved with {} backends", params, moved, n);
            if !maglev {
                for (a, b) in before.iter().zip(&after) {
                    prop_assert!(a == b || *a == pool[gone].id, "a key of {} moved to {}", a, b);
                }
            }
        }

        /// Adding one to N backends moves about 1/(N+1) of the keys, all to the new one
        /// (with the ring).
        #[test]
        fn adding_a_backend_moves_few_keys(n in 8usize..16, maglev in prop::bool::ANY, salt in 0u32..1000) {
            host::reset();
            let params = ALGORITHMS[usize::from(maglev)];
            let pool: Vec<Backend> = (0..n).map(|i| backend(&format!("srv-{salt}-{i}"), 1, true)).collect();
            let before = assignment(&mut strategy(params, pool.clone()), 10_000);
            let mut grown = pool;
            grown.push(backend("newcomer", 1, true));
            let after = assignment(&mut strategy(params, grown), 10_000);
            let moved = before.iter().zip(&after).filter(|(a, b)| a != b).count();
            prop_assert!(moved <= 10_000 / (n + 1) + 500, "{}: {} of 10000 keys moved", params, moved);
            if !maglev {
                for (a, b) in before.iter().zip(&after) {
                    prop_assert!(a == b || b == "newcomer", "a key of {} moved to {}", a, b);
                }
            }
        }

        /// Never an excluded or unhealthy backend; `None` only when nothing is left.
        #[test]
        fn exclusion_is_respected(
            health in prop::collection::vec(prop::bool::weighted(0.7), 1..8),
            excl in prop::collection::vec(0u32..8, 0..6),
            maglev in prop::bool::ANY,
            k in 0usize..1000,
        ) {
            host::reset();
            let pool = health.iter().enumerate().map(|(i, &h)| backend(&format!("b{i}"), 1, h)).collect();
            let mut s = strategy(ALGORITHMS[usize::from(maglev)], pool);
            let left = health.iter().enumerate().any(|(i, &h)| h && !excl.contains(&(i as u32)));
            let d = s.pick(&key(k), &excl).backend_index();
            match d {
                Some(i) => prop_assert!(health[i as usize] && !excl.contains(&i)),
                None => prop_assert!(!left),
            }
            prop_assert_eq!(d, s.pick(&key(k), &excl).backend_index(), "deterministic");
        }
    }

    #[test]
    fn on_miss_pass_passes_a_request_without_the_key() {
        let mut s = ConsistentHash::default();
        s.configure(r#"{"key": "header:x-user", "on_miss": "pass"}"#).unwrap();
        s.pool_changed(1, vec![backend("a", 1, true), backend("b", 1, true)]);
        assert!(s.pick(&TestRequest::new(), &[]).is_pass());
        let keyed = TestRequest::new().header("x-user", "42");
        let first = s.pick(&keyed, &[]);
        assert!(first.backend_index().is_some());
        assert_eq!(s.pick(&keyed, &[]), first, "the same key, the same backend");
    }
}
