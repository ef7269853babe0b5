//! The properties the plugins' native unit tests check — distribution, minimal
//! disruption, stickiness, exclusion on retry — checked again through the Wasm
//! boundary: each built-in plugin as the gateway embeds it, called through the host
//! API (`PluginHost`, `Selector`, `Pool`) with real `http` request parts, no sockets.
//!
//! Cases come from bounded loops over a seeded generator, so a run is reproducible and
//! a failure names its case. Statistical bounds are 5 standard deviations or more.

use gateway::config;
use gateway::plugin::{self, PluginHost};
use gateway::pool::{BackendEntry, BackendStats, Member, Pool, PoolSnapshot, Source, Status};
use gateway::select::{Choice, Selector, Why};
use serde_json::{Value, json};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// SplitMix64: small, seedable, good enough to generate cases.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..hi`.
    fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + (self.next() % (hi - lo) as u64) as usize
    }

    /// True with probability `p`.
    fn chance(&mut self, p: f64) -> bool {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64 <= p
    }
}

/// One plugin host for the whole file: built-ins are compiled once.
fn host() -> &'static Arc<PluginHost> {
    static HOST: OnceLock<Arc<PluginHost>> = OnceLock::new();
    HOST.get_or_init(|| {
        // A plugins folder that does not exist: only the built-ins resolve.
        let dir = std::env::temp_dir().join(format!("gateway-wasm-properties-{}-none", std::process::id()));
        // Generous deadlines: a pick preempted for 20 ms on a loaded machine would be
        // answered by the fallback; these tests are about the strategies, not the clock.
        let cfg = config::Plugins {
            dir,
            deadline: Duration::from_secs(10),
            setup_deadline: Duration::from_secs(30),
            ..Default::default()
        };
        PluginHost::new(&cfg).expect("the plugin engine")
    })
}

/// `plugin` bound with `params` to a fresh upstream (so host counters start at zero).
/// Use one selector per [`Pool`]: a new pool starts again at generation 1.
fn selector(plugin: &str, params: Value) -> Selector {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let upstream = format!("{plugin}-{}", NEXT.fetch_add(1, Ordering::Relaxed));
    let compiled = host().resolve(plugin).unwrap_or_else(|e| panic!("{plugin}: {e}"));
    Selector::new(host().bind(&upstream, compiled, &params).unwrap_or_else(|e| panic!("{plugin} {params}: {e}")))
}

/// A pool of backends `(id, weight, zone)` at 10.0.x.y:8080, all up.
fn pool(backends: &[(String, u32, &str)]) -> Pool {
    Pool::with_members(
        backends
            .iter()
            .enumerate()
            .map(|(i, (id, weight, zone))| {
                let addr = SocketAddr::from(([10, 0, (i >> 8) as u8, i as u8], 8080));
                let entry = BackendEntry::new(id.clone(), addr, (*zone).to_owned(), vec![], Source::Static);
                Member::new(Arc::new(entry), Status::UP, *weight)
            })
            .collect(),
    )
}

fn ids(n: usize) -> Vec<(String, u32, &'static str)> {
    (0..n).map(|i| (format!("b{i}"), 1, "")).collect()
}

/// A `GET /` with these headers.
fn parts(headers: &[(&str, &str)]) -> http::request::Parts {
    let mut b = http::Request::get("/cart?user=7");
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(()).unwrap().into_parts().0
}

const CLIENT: IpAddr = IpAddr::V4(Ipv4Addr::new(203, 0, 113, 7));

/// A decision: `Some((index, response headers))`, or `None` for "no backend" (the
/// plugin's 503, or no healthy backend at all). Panics on a fallback (the plugin failed
/// or broke the contract) or any other answer.
fn pick(
    sel: &Selector,
    req: &mut http::request::Parts,
    ip: IpAddr,
    snap: &Arc<PoolSnapshot>,
    exclude: &[u32],
    case: &str,
) -> Option<(usize, Vec<(String, String)>)> {
    match sel.choose(req, ip, snap, exclude) {
        Choice::Backend { index, response_headers, fallback: false, .. } => Some((index, response_headers)),
        // The SDK's `Decision::no_backend()`: its text comes back through `set-reject-body`.
        Choice::Reject { status: 503, text, .. } if text == "no healthy backend available" => None,
        Choice::NoBackend => None,
        other => panic!("{case}: {other:?} (plugin failures: {})", sel.binding().failures()),
    }
}

fn index(sel: &Selector, snap: &Arc<PoolSnapshot>, case: &str) -> usize {
    pick(sel, &mut parts(&[]), CLIENT, snap, &[], case).unwrap_or_else(|| panic!("{case}: no backend")).0
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 { a } else { gcd(b, a % b) }
}

#[test]
fn round_robin_is_an_exact_rotation_over_the_healthy_backends() {
    let mut rng = Rng(1);
    for case in 0..40 {
        let n = rng.range(1, 13);
        let p = pool(&ids(n));
        let down: Vec<usize> = (0..n).filter(|_| rng.chance(0.25)).collect();
        for &i in &down {
            p.update_status(&format!("b{i}"), |s| s.up = false);
        }
        let healthy: Vec<usize> = (0..n).filter(|i| !down.contains(i)).collect();
        let sel = selector("round-robin", json!({}));
        let snap = p.snapshot();
        let cycles = rng.range(1, 6);
        let case = format!("case {case}: {n} backends, down {down:?}");
        if healthy.is_empty() {
            assert_eq!(pick(&sel, &mut parts(&[]), CLIENT, &snap, &[], &case), None);
            continue;
        }
        let seq: Vec<usize> = (0..cycles * healthy.len()).map(|_| index(&sel, &snap, &case)).collect();
        assert_eq!(seq[..healthy.len()], healthy[..], "{case}: the first turn");
        assert!(seq.iter().enumerate().all(|(k, &i)| i == healthy[k % healthy.len()]), "{case}: {seq:?}");
    }
}

#[test]
fn weighted_round_robin_is_exact_over_cycles_and_smooth() {
    let mut rng = Rng(2);
    for case in 0..40 {
        let n = rng.range(1, 10);
        let weights: Vec<u32> = (0..n).map(|_| rng.range(1, 20) as u32).collect();
        let backends: Vec<_> = weights.iter().enumerate().map(|(i, &w)| (format!("b{i}"), w, "")).collect();
        let p = pool(&backends);
        let sel = selector("weighted-round-robin", json!({}));
        let snap = p.snapshot();
        let case = format!("case {case}: weights {weights:?}");

        // Exact shares over whole cycles (weights reduced by their gcd).
        let g = weights.iter().copied().reduce(gcd).unwrap();
        let reduced: Vec<usize> = weights.iter().map(|&w| (w / g) as usize).collect();
        let len: usize = reduced.iter().sum();
        let cycles = rng.range(1, 4);
        let seq: Vec<usize> = (0..len * cycles).map(|_| index(&sel, &snap, &case)).collect();
        for (b, &w) in reduced.iter().enumerate() {
            assert_eq!(seq.iter().filter(|&&x| x == b).count(), w * cycles, "{case}: backend {b}");
        }

        // One cycle read as a circle: the single heaviest never gets more than
        // ⌈w / rest⌉ turns in a row, and every backend comes back within 2.5 fair
        // intervals (the bound of the plugin's own property test).
        let cycle = &seq[..len];
        let max = *reduced.iter().max().unwrap();
        let heaviest: Vec<usize> = (0..n).filter(|&b| reduced[b] == max).collect();
        if heaviest.len() == 1 && max < len {
            let h = heaviest[0];
            let bound = max.div_ceil(len - max);
            let start = cycle.iter().position(|&x| x != h).unwrap();
            let (mut run, mut longest) = (0, 0);
            for k in 1..=len {
                run = if cycle[(start + k) % len] == h { run + 1 } else { 0 };
                longest = longest.max(run);
            }
            assert!(longest <= bound, "{case}: {longest} turns in a row for backend {h} (bound {bound}): {cycle:?}");
        }
        for (b, &w) in reduced.iter().enumerate() {
            let at: Vec<usize> = (0..len).filter(|&k| cycle[k] == b).collect();
            let gap = (0..at.len()).map(|j| (at[(j + 1) % at.len()] + len - at[j] - 1) % len + 1).max().unwrap();
            let fair = len.div_ceil(w);
            assert!(2 * gap <= 5 * fair + 2, "{case}: backend {b} waits {gap} > 2.5 × {fair}: {cycle:?}");
        }
    }
}

#[test]
fn random_follows_the_weights() {
    let mut rng = Rng(3);
    for case in 0..10 {
        let n = rng.range(1, 8);
        // Half the cases with equal weights (the uniform path), half weighted.
        let weights: Vec<u32> =
            if case % 2 == 0 { vec![3; n] } else { (0..n).map(|_| rng.range(1, 10) as u32).collect() };
        let backends: Vec<_> = weights.iter().enumerate().map(|(i, &w)| (format!("b{i}"), w, "")).collect();
        let p = pool(&backends);
        let sel = selector("random", json!({}));
        let snap = p.snapshot();
        let case = format!("case {case}: weights {weights:?}");
        let draws = 20_000;
        let mut counts = vec![0usize; n];
        for _ in 0..draws {
            counts[index(&sel, &snap, &case)] += 1;
        }
        let total: u32 = weights.iter().sum();
        for (b, &c) in counts.iter().enumerate() {
            let share = f64::from(weights[b]) / f64::from(total);
            let expected = share * draws as f64;
            let sd = (draws as f64 * share * (1.0 - share)).sqrt();
            assert!(
                (c as f64 - expected).abs() <= 5.0 * sd + 1.0,
                "{case}: backend {b} got {c}, expected {expected:.0}"
            );
        }
    }
}

/// Backend id per key for `keys` client IPs (`10.K.K.K`), through `sel`.
fn assignment(sel: &Selector, snap: &Arc<PoolSnapshot>, keys: usize, case: &str) -> Vec<String> {
    let mut req = parts(&[]);
    (0..keys)
        .map(|k| {
            let ip = IpAddr::V4(Ipv4Addr::new(10, (k >> 16) as u8, (k >> 8) as u8, k as u8));
            let (i, _) = pick(sel, &mut req, ip, snap, &[], case).unwrap_or_else(|| panic!("{case}: no backend"));
            snap.members[i].entry.id.clone()
        })
        .collect()
}

#[test]
fn consistent_hash_moves_few_keys_when_one_backend_leaves_or_joins() {
    let mut rng = Rng(4);
    let keys = 10_000;
    for case in 0..24 {
        let algorithm = ["ring", "maglev"][case % 2];
        let params = json!({ "algorithm": algorithm });
        let n = rng.range(8, 16);
        let salt = rng.next() % 1000;
        let backends: Vec<_> = (0..n).map(|i| (format!("srv-{salt}-{i}"), 1, "")).collect();
        let p = pool(&backends);
        let sel = selector("consistent-hash", params.clone());
        let before = assignment(&sel, &p.snapshot(), keys, "before");

        if case % 4 < 2 {
            // One leaves (marked down: the same pool, a new generation).
            let gone = backends[rng.range(0, n)].0.clone();
            let case = format!("case {case}: {algorithm}, {n} backends, {gone} leaves");
            p.update_status(&gone, |s| s.up = false);
            let after = assignment(&sel, &p.snapshot(), keys, &case);
            let moved = before.iter().zip(&after).filter(|(a, b)| a != b).count();
            assert!(moved <= keys / n + 500, "{case}: {moved} of {keys} keys moved");
            assert!(after.iter().all(|id| *id != gone), "{case}: a key still goes to {gone}");
            if algorithm == "ring" {
                let own = before.iter().filter(|id| **id == gone).count();
                assert_eq!(moved, own, "{case}: with the ring exactly the keys of {gone} move");
            }
        } else {
            // One joins (a new pool, so a new binding).
            let case = format!("case {case}: {algorithm}, {n} backends, one joins");
            let mut grown = backends.clone();
            grown.push(("newcomer".to_owned(), 1, ""));
            let p2 = pool(&grown);
            let after = assignment(&selector("consistent-hash", params), &p2.snapshot(), keys, &case);
            let moved = before.iter().zip(&after).filter(|(a, b)| a != b).count();
            assert!(moved <= keys / (n + 1) + 500, "{case}: {moved} of {keys} keys moved");
            if algorithm == "ring" {
                assert!(
                    before.iter().zip(&after).all(|(a, b)| a == b || b == "newcomer"),
                    "{case}: a key moved elsewhere"
                );
            }
        }
    }
}

#[test]
fn consistent_hash_maps_every_key_source_the_same_way_every_time() {
    let p = pool(&ids(10));
    let snap = p.snapshot();
    let cases: [(Value, Vec<(&str, &str)>); 4] = [
        (json!({"key": "header:X-User"}), vec![("x-user", "alice")]),
        (json!({"key": "cookie:sid"}), vec![("cookie", "a=1; sid=s3cr3t")]),
        (json!({"key": "query:user", "algorithm": "maglev"}), vec![]),
        (json!({"key": "path"}), vec![]),
    ];
    for (params, headers) in cases {
        let sel = selector("consistent-hash", params.clone());
        let case = params.to_string();
        let first = pick(&sel, &mut parts(&headers), CLIENT, &snap, &[], &case).unwrap().0;
        for k in 0..50 {
            // Another client IP each time: only the key counts.
            let ip = IpAddr::V4(Ipv4Addr::new(192, 0, 2, k));
            assert_eq!(pick(&sel, &mut parts(&headers), ip, &snap, &[], &case).unwrap().0, first, "{case}");
        }
    }
}

/// The `name=value` part of the `set-cookie` among `headers`, if any.
fn set_cookie(headers: &[(String, String)]) -> Option<String> {
    let (_, v) = headers.iter().find(|(k, _)| k.eq_ignore_ascii_case("set-cookie"))?;
    Some(v.split(';').next().unwrap().trim().to_owned())
}

#[test]
fn sticky_cookie_keeps_clients_and_moves_only_those_of_a_failed_backend() {
    let mut rng = Rng(5);
    for case in 0..16 {
        let n = rng.range(2, 12);
        let failing = rng.range(0, n);
        let fallback = ["round-robin", "random"][case % 2];
        // Ids as the gateway makes them by default: the address (percent-encoded in cookies).
        let backends: Vec<_> = (0..n).map(|i| (format!("10.0.0.{i}:8080"), 1, "")).collect();
        let p = pool(&backends);
        let sel = selector("sticky-cookie", json!({ "fallback": fallback }));
        let case = format!("case {case}: {n} backends, {fallback}, backend {failing} fails");
        let visit = |cookie: &Option<String>, snap: &Arc<PoolSnapshot>| {
            let line = cookie.as_ref().map(|c| format!("theme=dark; {c}"));
            let headers: Vec<(&str, &str)> = line.iter().map(|l| ("cookie", l.as_str())).collect();
            pick(&sel, &mut parts(&headers), CLIENT, snap, &[], &case).unwrap_or_else(|| panic!("{case}: no backend"))
        };

        // First visits: a backend and a cookie naming it.
        let snap = p.snapshot();
        let mut clients: Vec<(usize, Option<String>)> = (0..100)
            .map(|_| {
                let (i, headers) = visit(&None, &snap);
                let cookie = set_cookie(&headers).unwrap_or_else(|| panic!("{case}: no set-cookie for a new client"));
                assert_eq!(cookie, format!("lb=10.0.0.{i}%3A8080"), "{case}");
                (i, Some(cookie))
            })
            .collect();
        for _ in 0..3 {
            for (at, cookie) in &clients {
                let (i, headers) = visit(cookie, &snap);
                assert_eq!((i, headers.len()), (*at, 0), "{case}: a returning client");
            }
        }

        // One backend goes down: only its clients move, with a new cookie.
        p.update_status(&format!("10.0.0.{failing}:8080"), |s| s.up = false);
        let snap = p.snapshot();
        for (at, cookie) in &mut clients {
            let (i, headers) = visit(cookie, &snap);
            if *at == failing {
                assert_ne!(i, failing, "{case}");
                let renewed =
                    set_cookie(&headers).unwrap_or_else(|| panic!("{case}: a moved client got no new cookie"));
                assert_eq!(renewed, format!("lb=10.0.0.{i}%3A8080"), "{case}");
                (*at, *cookie) = (i, Some(renewed));
            } else {
                assert_eq!((i, headers.len()), (*at, 0), "{case}: a client of a healthy backend moved");
            }
        }
        for (at, cookie) in &clients {
            assert_eq!(visit(cookie, &snap).0, *at, "{case}: after the move");
        }
    }
}

/// Params that make each built-in read the request (zone header, key, cookie).
fn params_for(plugin: &str) -> Value {
    match plugin {
        "zone-aware" => json!({ "header": "x-zone" }),
        "consistent-hash" => json!({ "key": "header:x-user" }),
        _ => json!({}),
    }
}

#[test]
fn no_strategy_returns_a_tried_backend_and_each_says_no_backend_when_all_were_tried() {
    let mut rng = Rng(6);
    let names = plugin::builtin_names();
    let mut picks = 0usize;
    for required in ["round-robin", "weighted-round-robin", "least-connections", "p2c-ewma", "random"] {
        assert!(names.contains(&required), "{required} is not built in: {names:?}");
    }
    for &name in &names {
        for n in 1..=8 {
            // One pool (and binding) per size; health and load change between cases.
            let backends: Vec<_> =
                (0..n).map(|i| (format!("10.0.0.{i}:8080"), rng.range(1, 5) as u32, ["a", "b"][i % 2])).collect();
            let p = pool(&backends);
            let sel = selector(name, params_for(name));
            for case in 0..20 {
                for (id, _, _) in &backends {
                    let up = rng.chance(0.75);
                    p.update_status(id, |s| s.up = up);
                }
                let snap = p.snapshot();
                // Some requests in flight, for the load-aware strategies.
                let _load: Vec<_> = snap
                    .members
                    .iter()
                    .flat_map(|m| {
                        let k = rng.range(0, 3);
                        (0..k).map(|_| BackendStats::start(&m.entry)).collect::<Vec<_>>()
                    })
                    .collect();
                let healthy: Vec<usize> = (0..n).filter(|&i| snap.members[i].status.healthy()).collect();
                let zone = ["a", "b", "c"][rng.range(0, 3)];
                let user = format!("user-{}", rng.next() % 1000);
                let cookie = format!("lb=10.0.0.{}%3A8080", rng.range(0, n));
                let headers = [("x-zone", zone), ("x-user", user.as_str()), ("cookie", cookie.as_str())];
                let case = format!("{name}: {n} backends, healthy {healthy:?}, case {case}");

                // Random retries: never an excluded or unhealthy backend; "no backend" only
                // when every healthy one is excluded.
                for _ in 0..4 {
                    let exclude: Vec<u32> = (0..n as u32).filter(|_| rng.chance(0.4)).collect();
                    let left = healthy.iter().any(|&i| !exclude.contains(&(i as u32)));
                    picks += 1;
                    match pick(&sel, &mut parts(&headers), CLIENT, &snap, &exclude, &case) {
                        Some((i, _)) => assert!(
                            healthy.contains(&i) && !exclude.contains(&(i as u32)),
                            "{case}: picked {i} with exclude {exclude:?}"
                        ),
                        None => assert!(!left, "{case}: no backend with exclude {exclude:?}"),
                    }
                }

                // A request retried until nothing is left visits every healthy backend
                // exactly once, then gets "no backend".
                let mut tried: Vec<u32> = Vec::new();
                while let Some((i, _)) = pick(&sel, &mut parts(&headers), CLIENT, &snap, &tried, &case) {
                    picks += 1;
                    assert!(healthy.contains(&i) && !tried.contains(&(i as u32)), "{case}: {i} after {tried:?}");
                    tried.push(i as u32);
                    assert!(tried.len() <= n, "{case}: {tried:?}");
                }
                tried.sort_unstable();
                let expected: Vec<u32> = healthy.iter().map(|&i| i as u32).collect();
                assert_eq!(tried, expected, "{case}: the retries did not reach every healthy backend");
            }
            assert_eq!(sel.binding().failures(), 0, "{name}: failed calls");
        }
    }
    eprintln!("exclusion: {picks} picks checked over {} built-ins: {names:?}", names.len());
}

/// A chain of built-ins through the Wasm boundary: the first step that does not pass
/// decides, with its response headers; a retry that the decided step cannot serve moves
/// on; when every step passes the round robin chooses, marked as a fallback.
#[test]
fn a_chain_asks_each_step_until_one_decides() {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let upstream = format!("chain-{}", NEXT.fetch_add(1, Ordering::Relaxed));
    let step = |i: usize, plugin: &str, params: Value| {
        let compiled = host().resolve(plugin).unwrap();
        (plugin.to_owned(), host().bind_step(&upstream, i, compiled, &params).unwrap())
    };
    let sel = Selector::chain(
        vec![
            step(0, "sticky-cookie", json!({ "cookie": "lb", "on_miss": "pass" })),
            step(1, "consistent-hash", json!({ "key": "header:x-user", "on_miss": "pass" })),
            step(2, "sticky-cookie", json!({ "cookie": "lb" })),
        ],
        Arc::default(),
    );
    assert_eq!(sel.name(), "sticky-cookie > consistent-hash > sticky-cookie");
    let four = pool(&ids(4));
    let snap = four.snapshot();
    let decided =
        |headers: &[(&str, &str)], exclude: &[u32]| match sel.choose(&mut parts(headers), CLIENT, &snap, exclude) {
            Choice::Backend { index, response_headers, fallback: false, why: Why::Step { step, .. } } => {
                (index, step, response_headers)
            }
            other => panic!("{headers:?}: {other:?}"),
        };
    // A cookie: step 0, no header set.
    assert_eq!(decided(&[("cookie", "lb=b2")], &[]), (2, 0, vec![]));
    // A key: step 1, the same backend every time.
    let (keyed, step, headers) = decided(&[("x-user", "u-1")], &[]);
    assert_eq!((step, headers.len()), (1, 0));
    assert_eq!(decided(&[("x-user", "u-1")], &[]).0, keyed);
    // Neither: step 2 assigns and sets the cookie (its response headers come back).
    let (assigned, step, headers) = decided(&[], &[]);
    assert_eq!(step, 2);
    assert_eq!(headers[0].0, "set-cookie");
    assert!(headers[0].1.starts_with(&format!("lb=b{assigned};")), "{headers:?}");
    // A retry whose cookie backend was tried: step 0 passes, the key decides elsewhere.
    let (retried, step, _) = decided(&[("cookie", "lb=b2"), ("x-user", "u-1")], &[2]);
    assert!(step == 1 && retried != 2, "{retried} by step {step}");
    assert_eq!(sel.steps().map(|s| s.passes).collect::<Vec<_>>(), [4, 1, 0]);

    // Every step passes: the round robin, as a fallback with its own reason.
    let single = selector("consistent-hash", json!({ "key": "header:x-user", "on_miss": "pass" }));
    let three = pool(&ids(3));
    let snap = three.snapshot();
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..6 {
        match single.choose(&mut parts(&[]), CLIENT, &snap, &[]) {
            Choice::Backend { index, fallback: true, why: Why::AllPassed, .. } => seen.insert(index),
            other => panic!("{other:?}"),
        };
    }
    assert_eq!(seen.len(), 3);
    assert_eq!(single.fallbacks(), 6);
    assert_eq!(Why::AllPassed.reason(), Some("every strategy passed"));
}
