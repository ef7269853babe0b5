//! The built-in strategies end to end: the real gateway binary, real backends on
//! loopback, and what a user would check for each strategy (shares, smoothness,
//! stickiness, failover, refused params). Assertions count requests rather than time
//! them, with tolerances of several standard deviations where chance is involved.
//!
//! Quick-start flags (`-b ADDR,weight=4 --strategy NAME --param k=v`) where the
//! defaults do; a YAML config where the test needs fast health checks, backend ids or
//! structured params. The 10,000-key part of the consistent-hash test maps keys
//! in-process through the same Wasm plugin (the host API), after checking that this
//! mapping is the one the gateway applies.
//!
//! A test whose doc comment starts with `BUG` checks documented behaviour that the code
//! does not have yet: it fails until the code named there is fixed.

mod util;

use gateway::config;
use gateway::plugin::PluginHost;
use gateway::pool::{BackendEntry, Pool};
use gateway::select::{Choice, Selector};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use util::{Backend, Browser, Gateway, KeepAlive, TempDir, TunableBackend, get, message, set_cookies};

/// A gateway under test. If the test fails, it prints the plugin calls that failed: a
/// pick that misses its deadline (20 ms, e.g. on an overloaded machine) is answered by
/// the fallback round robin, which no strategy assertion expects.
struct Running(Gateway);

impl std::ops::Deref for Running {
    type Target = Gateway;
    fn deref(&self) -> &Gateway {
        &self.0
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let failed = self.0.logs_matching(|l| message(l).starts_with("plugin call failed"));
            if !failed.is_empty() {
                let lines: Vec<String> = failed.iter().map(Value::to_string).collect();
                eprintln!("note: the fallback chose for some requests; plugin failures:\n{}", lines.join("\n"));
            }
        }
    }
}

/// Starts the gateway with quick-start flags on a free port, with an empty plugins
/// folder (only built-ins) and no access log.
fn start_cli(dir: &TempDir, args: &[&str]) -> Running {
    let plugins = dir.path().join("plugins");
    let mut all = vec!["--listen", "127.0.0.1:0", "--plugins", plugins.to_str().unwrap(), "--no-access-log"];
    all.extend_from_slice(args);
    Running(Gateway::start(&all))
}

/// One backend of a YAML config.
struct Spec<'a> {
    addr: SocketAddr,
    id: &'a str,
    zone: &'a str,
}

/// Health checks of the YAML configs: a TCP connect every 100 ms, one result flips.
const HEALTH: &str = "    health_check:\n      interval: 100ms\n      timeout: 500ms\n      rise: 1\n      fall: 1\n";

/// Starts the gateway with a config file: one upstream over `backends` with fast
/// health checks and `strategy: {plugin, params}`.
fn start_yaml(dir: &TempDir, backends: &[Spec<'_>], plugin: &str, params: Value) -> Running {
    let list: String = backends
        .iter()
        .map(|b| format!("      - {{ address: \"{}\", id: \"{}\", zone: \"{}\" }}\n", b.addr, b.id, b.zone))
        .collect();
    // JSON is YAML (flow style).
    let strategy = json!({ "plugin": plugin, "params": params });
    let yaml = format!(
        "listeners:\n  - address: 127.0.0.1:0\nthreads: 2\naccess_log: false\nupstreams:\n  web:\n{HEALTH}    strategy: {strategy}\n    backends:\n{list}"
    );
    let file = dir.write("gateway.yaml", yaml);
    let plugins = dir.path().join("plugins");
    Running(Gateway::start(&["--config", file.to_str().unwrap(), "--plugins", plugins.to_str().unwrap()]))
}

/// Waits for the health checker's `event` ("backend is down" / "backend is up") about
/// `addr`, logged after `mark`.
fn wait_health(gw: &Gateway, mark: usize, addr: SocketAddr, event: &str) {
    let addr = addr.to_string();
    gw.wait_for_log_after(mark, Duration::from_secs(10), |l| message(l).starts_with(event) && l["address"] == addr);
}

/// `n` sequential `GET path` on one keep-alive connection: the backend names, in order.
fn names(gw: &Gateway, path: &str, n: usize) -> Vec<String> {
    let mut conn = KeepAlive::open(gw.addr).expect("connect to the gateway");
    (0..n)
        .map(|i| {
            let r = conn.get(path).unwrap_or_else(|e| panic!("request {i} of {n}: {e}"));
            assert_eq!(r.status, 200, "request {i} of {n}: {}", r.body);
            r.body
        })
        .collect()
}

fn count(seq: &[String], name: &str) -> usize {
    seq.iter().filter(|s| *s == name).count()
}

/// Longest run of `name` in `seq`.
fn longest_run(seq: &[String], name: &str) -> usize {
    seq.split(|s| s != name).map(<[String]>::len).max().unwrap_or(0)
}

/// The value of a sticky cookie naming backend id `id` (percent-encoded like the plugin).
fn cookie_value(id: &str) -> String {
    id.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

#[test]
fn round_robin_takes_exact_turns() {
    let dir = TempDir::new();
    let bs = [Backend::new("rr-1"), Backend::new("rr-2"), Backend::new("rr-3")];
    let flags: Vec<String> = bs.iter().map(|b| b.addr().to_string()).collect();
    let gw = start_cli(&dir, &["--strategy", "round-robin", "-b", &flags[0], "-b", &flags[1], "-b", &flags[2]]);

    let seq = names(&gw, "/", 300);
    for b in &bs {
        assert_eq!(count(&seq, b.name()), 100, "{}: {:?}", b.name(), &seq[..9]);
    }
    assert!(seq.windows(4).all(|w| w[0] == w[3] && w[0] != w[1] && w[1] != w[2]), "not a strict rotation");
}

#[test]
fn weighted_round_robin_gives_4_1_1_smoothly() {
    let dir = TempDir::new();
    let heavy = Backend::new("heavy");
    let light = [Backend::new("light-1"), Backend::new("light-2")];
    let gw = start_cli(
        &dir,
        &[
            "--strategy",
            "weighted-round-robin",
            "-b",
            &format!("{},weight=4", heavy.addr()),
            "-b",
            &light[0].addr().to_string(),
            "-b",
            &format!("{},weight=1,zone=eu,label.canary=true", light[1].addr()),
        ],
    );

    let n = 6_000;
    let seq = names(&gw, "/", n);
    let within = |got: usize, expected: usize| got.abs_diff(expected) * 20 <= expected; // ±5%
    let (h, l1, l2) = (count(&seq, "heavy"), count(&seq, "light-1"), count(&seq, "light-2"));
    assert!(within(h, 4_000) && within(l1, 1_000) && within(l2, 1_000), "4:1:1 expected, got {h}:{l1}:{l2}");
    let run = longest_run(&seq, "heavy");
    let at = seq.windows(3).position(|w| w.iter().all(|s| s == "heavy"));
    assert!(run <= 2, "the heavy backend got {run} picks in a row (first at request {at:?}): not smooth");
}

#[test]
fn least_connections_sends_new_requests_away_from_a_busy_backend() {
    let dir = TempDir::new();
    let [busy, b, c] = [Backend::new("busy"), Backend::new("other-1"), Backend::new("other-2")];
    let specs: Vec<Spec> = [&busy, &b, &c].iter().map(|x| Spec { addr: x.addr(), id: x.name(), zone: "" }).collect();
    let gw = start_yaml(&dir, &specs, "least-connections", json!({}));

    // Idle pool: everyone gets a share (ties go round robin).
    let seq = names(&gw, "/idle", 30);
    for x in [&busy, &b, &c] {
        assert!(count(&seq, x.name()) >= 5, "idle pool not shared: {seq:?}");
    }

    // Only `busy` is up while 4 slow requests start: they all land on it.
    let mark = gw.log_mark();
    b.stop();
    c.stop();
    wait_health(&gw, mark, b.addr(), "backend is down");
    wait_health(&gw, mark, c.addr(), "backend is down");
    let slow_path = "/delay/5000";
    let slow: Vec<_> = (0..4)
        .map(|_| {
            let addr = gw.addr;
            std::thread::spawn(move || get(addr, slow_path))
        })
        .collect();
    let in_flight = util::poll_until(Duration::from_secs(10), Duration::from_millis(10), || {
        (busy.hits().iter().filter(|h| h.path == slow_path).count() == 4).then_some(())
    });
    assert!(in_flight.is_some(), "the 4 slow requests did not all reach the busy backend: {:?}", busy.hits());

    // The others come back: while `busy` holds 4 requests, every new one goes to them.
    let mark = gw.log_mark();
    b.start();
    c.start();
    wait_health(&gw, mark, b.addr(), "backend is up");
    wait_health(&gw, mark, c.addr(), "backend is up");
    let seq = names(&gw, "/fast", 40);
    assert!(
        slow.iter().all(|t| !t.is_finished()),
        "inconclusive: the slow requests finished before the fast ones were sent (machine too slow?)"
    );
    assert_eq!(count(&seq, "busy"), 0, "a backend with 4 requests in flight got new ones: {seq:?}");
    assert!(count(&seq, "other-1") > 0 && count(&seq, "other-2") > 0, "{seq:?}");

    // Once the slow requests are done, it gets its share again.
    for t in slow {
        assert_eq!(t.join().unwrap(), (200, "busy".to_owned()));
    }
    let seq = names(&gw, "/after", 30);
    assert!(count(&seq, "busy") >= 5, "the idle busy backend got {} of 30: {seq:?}", count(&seq, "busy"));
}

/// Three fast p2c-ewma backends behind a gateway with a 200 ms peak memory (`decay_ms`),
/// warmed up.
fn p2c_setup(dir: &TempDir) -> ([TunableBackend; 3], Running) {
    let bs = [TunableBackend::new("p2c-a"), TunableBackend::new("p2c-b"), TunableBackend::new("p2c-c")];
    let flags: Vec<String> = bs.iter().map(|b| b.addr().to_string()).collect();
    let gw = start_cli(
        dir,
        &["--strategy", "p2c-ewma", "--param", "decay_ms=200", "-b", &flags[0], "-b", &flags[1], "-b", &flags[2]],
    );
    names(&gw, "/warm", 150);
    (bs, gw)
}

/// Requests per backend name over `n` requests.
fn shares(gw: &Gateway, path: &str, n: usize) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for name in names(gw, path, n) {
        *counts.entry(name).or_default() += 1;
    }
    counts
}

#[test]
fn p2c_ewma_shuns_a_backend_whose_latency_rises() {
    let dir = TempDir::new();
    let (bs, gw) = p2c_setup(&dir);
    let n = 600;
    let before = shares(&gw, "/before", n);
    // The busiest backend (at least a third of the traffic) becomes slow: 100 ms per
    // request, the others stay fast. (Not a fixed one: see the next test for why a
    // backend can be starved from the start.)
    let (slowed, &had) = before.iter().max_by_key(|(_, c)| **c).unwrap();
    bs.iter().find(|b| b.name() == slowed).unwrap().set_delay(Duration::from_millis(100));
    let after = shares(&gw, "/after", n);
    let got = after.get(slowed).copied().unwrap_or(0);
    eprintln!("p2c-ewma: {slowed} served {had} of {n} while fast, {got} of {n} once slow ({before:?} -> {after:?})");
    assert!(got * 20 <= n && got * 4 <= had, "a slow backend still got {got} of {n} (before: {had} of {n})");
}

/// KNOWN LIMITATION (plugins/p2c-ewma), ignored until fixed: near-equal backends can
/// starve one another. With sequential requests, a backend whose average is a few µs
/// above the others' loses every comparison; its estimate fades while unmeasured, so it
/// is probed again, but its next answer refreshes the estimate and it is shunned again.
/// Within this test's short window that is often 0–2 requests of 600 for one backend.
///
/// Fixed so far: an unmeasured estimate fades towards zero (Linkerd's way), the host
/// weighs the first answer after a quiet spell heavily, and the plugin now dates a
/// measurement by when the host took it (`backend-stats.measured-at-ms`), not by when its
/// own instance noticed it: with one instance per worker thread, an instance that saw
/// another's last probe of the slow backend only after the backend was fast again used to
/// take that old value as new and shun the backend afresh. That made the recovered
/// backend get 0 of 600 in about two runs of three; now in about one run of six.
#[test]
#[ignore = "known limitation, see the doc comment: near-equal backends can starve one another, so a recovered backend sometimes still gets nothing in this window"]
fn p2c_ewma_trusts_a_backend_again_once_it_is_fast() {
    let dir = TempDir::new();
    let (bs, gw) = p2c_setup(&dir);
    // All three at 5 ms: all measured (an unmeasured backend counts as 1 ms and wins).
    bs.iter().for_each(|b| b.set_delay(Duration::from_millis(5)));
    let warm = shares(&gw, "/all-5ms", 60);
    // b and c become fast, a stays at 5 ms: a is shunned.
    bs[1].set_delay(Duration::ZERO);
    bs[2].set_delay(Duration::ZERO);
    let shunned = shares(&gw, "/a-slower", 200);
    assert!(shunned.get("p2c-a").copied().unwrap_or(0) <= 20, "{warm:?} -> {shunned:?}");
    // a is fast again. After 10 × decay_ms it should get a fair part of the traffic.
    bs[0].set_delay(Duration::ZERO);
    std::thread::sleep(Duration::from_millis(2_000));
    let n = 600;
    let after = shares(&gw, "/recovered", n);
    let got = after.get("p2c-a").copied().unwrap_or(0);
    eprintln!("p2c-ewma recovery: {warm:?} -> {shunned:?} -> {after:?}");
    assert!(got * 20 >= n, "a backend fast again for 10 × decay_ms got {got} of {n}: {after:?}");
}

#[test]
fn random_is_uniform_and_weighted_random_follows_weights() {
    let dir = TempDir::new();
    let bs = [Backend::new("rnd-1"), Backend::new("rnd-2"), Backend::new("rnd-3")];
    let flags: Vec<String> = bs.iter().map(|b| b.addr().to_string()).collect();
    let gw = start_cli(&dir, &["--strategy", "random", "-b", &flags[0], "-b", &flags[1], "-b", &flags[2]]);
    // 3,000 draws: each backend 1,000 ± 150 (5.8 standard deviations).
    let seq = names(&gw, "/", 3_000);
    let counts: Vec<usize> = bs.iter().map(|b| count(&seq, b.name())).collect();
    assert!(counts.iter().all(|c| (850..=1_150).contains(c)), "not uniform: {counts:?}");
    // A random sequence, not a rotation: some backend is picked twice in a row.
    assert!(seq.windows(2).any(|w| w[0] == w[1]), "no repeats in 3,000 draws");
    drop(gw);

    // Weights 3:1 over 4,000 draws: 3,000 ± 150 (5.5 standard deviations).
    let gw = start_cli(&dir, &["--strategy", "random", "-b", &format!("{},weight=3", bs[0].addr()), "-b", &flags[1]]);
    let seq = names(&gw, "/", 4_000);
    let heavy = count(&seq, "rnd-1");
    assert!((2_850..=3_150).contains(&heavy), "weight 3 of 4 got {heavy} of 4000");
    assert_eq!(heavy + count(&seq, "rnd-2"), 4_000);
}

#[test]
fn sticky_cookie_keeps_clients_and_moves_only_those_of_a_stopped_backend() {
    let dir = TempDir::new();
    let bs = [Backend::new("cart-1"), Backend::new("cart-2"), Backend::new("cart-3")];
    let flags: Vec<String> = bs.iter().map(|b| b.addr().to_string()).collect();
    let gw = start_cli(
        &dir,
        &[
            "--strategy",
            "sticky-cookie",
            "--param",
            "cookie=shop",
            "--param",
            "ttl_s=60",
            "-b",
            &flags[0],
            "-b",
            &flags[1],
            "-b",
            &flags[2],
        ],
    );
    let id_of: BTreeMap<String, String> = bs.iter().map(|b| (b.name().to_owned(), b.addr().to_string())).collect();
    let served = |browser: &mut Browser, i: usize| {
        let r = browser.get("/cart").unwrap_or_else(|e| panic!("client {i}: {e}"));
        assert_eq!(r.status, 200, "client {i}: {}", r.body);
        r
    };

    // First visit: a cookie naming the backend that served.
    let mut clients: Vec<(Browser, String)> = (0..100)
        .map(|i| {
            let mut browser = Browser::new(gw.addr);
            let r = served(&mut browser, i);
            let cookies = set_cookies(&r);
            assert_eq!(cookies, [("shop".to_owned(), cookie_value(&id_of[&r.body]))], "client {i}");
            let header = r.header("set-cookie");
            assert!(header.contains("Max-Age=60") && header.contains("Path=/"), "{header}");
            (browser, r.body)
        })
        .collect();
    for b in &bs {
        let n = clients.iter().filter(|(_, at)| at == b.name()).count();
        assert!(n >= 25, "new clients are assigned round robin: {} got {n} of 100", b.name());
    }

    // Returning clients: same backend, no new cookie.
    for round in 0..3 {
        for (i, (browser, at)) in clients.iter_mut().enumerate() {
            let r = served(browser, i);
            assert_eq!((&r.body, set_cookies(&r).len()), (&*at, 0), "client {i}, round {round}");
        }
    }

    // cart-2 crashes: its clients move (with a renewed cookie), nobody else does.
    bs[1].stop();
    let mut moved = 0;
    for (i, (browser, at)) in clients.iter_mut().enumerate() {
        let r = served(browser, i);
        if at == "cart-2" {
            assert_ne!(r.body, "cart-2", "client {i} was served by a stopped backend");
            assert_eq!(set_cookies(&r), [("shop".to_owned(), cookie_value(&id_of[&r.body]))], "client {i}");
            *at = r.body;
            moved += 1;
        } else {
            assert_eq!((&r.body, set_cookies(&r).len()), (&*at, 0), "client {i} of {at} moved");
        }
    }
    assert!(moved >= 25, "{moved}");
    // And they all stay where they are now.
    for (i, (browser, at)) in clients.iter_mut().enumerate() {
        let r = served(browser, i);
        assert_eq!((&r.body, set_cookies(&r).len()), (&*at, 0), "client {i} after the move");
    }
}

/// The plugin host of the gateway, in this process: maps keys to backends through the
/// same built-in Wasm plugin without sockets.
struct InProcess {
    host: Arc<PluginHost>,
    _dir: TempDir,
}

impl InProcess {
    fn new() -> InProcess {
        let dir = TempDir::new();
        // A generous pick deadline: this measures the mapping, not the machine's load.
        let cfg = config::Plugins {
            dir: dir.path().join("plugins"),
            deadline: Duration::from_secs(10),
            ..Default::default()
        };
        InProcess { host: PluginHost::new(&cfg).expect("the plugin engine"), _dir: dir }
    }

    /// Maps `keys` keys (`x-user: user-K`) to backend ids through `consistent-hash`
    /// bound with `params` over `backends` (id, address), with the ids in `down` down.
    fn map(&self, params: &Value, backends: &[(String, SocketAddr)], down: &[&str], keys: usize) -> Vec<String> {
        let plugin = self.host.resolve("consistent-hash").expect("the built-in");
        let selector = Selector::new(self.host.bind("in-process", plugin, params).expect("params accepted"));
        let pool = Pool::new(
            backends
                .iter()
                .map(|(id, addr)| {
                    Arc::new(BackendEntry::new(id.clone(), *addr, String::new(), vec![], gateway::pool::Source::Static))
                })
                .collect(),
        );
        for id in down {
            pool.update_status(id, |s| s.up = false).expect("a backend of the pool");
        }
        let snap = pool.snapshot();
        let client = IpAddr::V4(Ipv4Addr::LOCALHOST);
        (0..keys)
            .map(|k| {
                let (mut parts, ()) =
                    http::Request::get("/").header("x-user", format!("user-{k}")).body(()).unwrap().into_parts();
                match selector.choose(&mut parts, client, &snap, &[]) {
                    Choice::Backend { index, fallback: false, .. } => snap.members[index].entry.id.clone(),
                    other => panic!("key user-{k}: {other:?}"),
                }
            })
            .collect()
    }
}

#[test]
fn consistent_hash_keeps_keys_and_moves_few_when_a_backend_goes() {
    let dir = TempDir::new();
    let bs: Vec<Backend> = (0..10).map(|i| Backend::new(&format!("cache-{i}"))).collect();
    let specs: Vec<Spec> = bs.iter().map(|b| Spec { addr: b.addr(), id: b.name(), zone: "" }).collect();
    let params = json!({ "key": "header:x-user" });
    let gw = start_yaml(&dir, &specs, "consistent-hash", params.clone());
    let via_gateway = |k: usize| {
        let r = Browser::new(gw.addr).with_header("x-user", &format!("user-{k}")).get("/").expect("an answer");
        assert_eq!(r.status, 200, "user-{k}: {}", r.body);
        r.body
    };

    // The same key always lands on the same backend.
    let http_keys = 300;
    let before: Vec<String> = (0..http_keys).map(via_gateway).collect();
    for (k, at) in before.iter().enumerate() {
        assert_eq!(&via_gateway(k), at, "user-{k} changed backend with nothing changed");
    }
    let used: std::collections::BTreeSet<&String> = before.iter().collect();
    assert_eq!(used.len(), 10, "300 keys should reach all 10 backends");

    // The in-process mapping (same plugin, ids, params) is the gateway's.
    let inproc = InProcess::new();
    let pool: Vec<(String, SocketAddr)> = bs.iter().map(|b| (b.name().to_owned(), b.addr())).collect();
    let keys = 10_000;
    let full_before = inproc.map(&params, &pool, &[], keys);
    assert_eq!(full_before[..http_keys], before[..], "the in-process mapping differs from the gateway's");

    // cache-3 crashes. Until the health check notices, its keys are retried on their
    // second choice; afterwards they go there directly: the same backend.
    let gone = "cache-3";
    let mark = gw.log_mark();
    bs[3].stop();
    let orphans: Vec<usize> = (0..http_keys).filter(|&k| before[k] == gone).collect();
    let retried: Vec<String> = orphans.iter().map(|&k| via_gateway(k)).collect();
    wait_health(&gw, mark, bs[3].addr(), "backend is down");
    let after: Vec<String> = (0..http_keys).map(via_gateway).collect();
    let mut moved = 0;
    for k in 0..http_keys {
        if before[k] == gone {
            assert_ne!(after[k], gone);
            moved += 1;
        } else {
            assert_eq!(after[k], before[k], "user-{k} moved from {} though only {gone} went", before[k]);
        }
    }
    let second: Vec<String> = orphans.iter().map(|&k| after[k].clone()).collect();
    assert_eq!(retried, second, "a retry's second choice is where the key goes once its backend is down");
    assert!(moved * 100 <= http_keys * 15, "{moved} of {http_keys} keys moved (bound: 1/10 + 5%)");

    // 10,000 keys: at most 1/10 + 5% move, all of them cache-3's.
    let full_after = inproc.map(&params, &pool, &[gone], keys);
    assert_eq!(full_after[..http_keys], after[..], "the in-process mapping differs from the gateway's");
    let moved: Vec<usize> = (0..keys).filter(|&k| full_before[k] != full_after[k]).collect();
    assert!(moved.len() * 100 <= keys * 15, "{} of {keys} keys moved (bound: 1/10 + 5%)", moved.len());
    assert!(moved.iter().all(|&k| full_before[k] == gone), "a key of another backend moved");
    assert_eq!(moved.len(), full_before.iter().filter(|id| *id == gone).count(), "every key of {gone} moved");
    eprintln!("consistent-hash: {} of {keys} keys moved when 1 of 10 backends went", moved.len());
}

#[test]
fn zone_aware_routes_by_zone_and_fails_over_to_another_zone() {
    let dir = TempDir::new();
    let eu = [Backend::new("eu-1"), Backend::new("eu-2")];
    let us = [Backend::new("us-1"), Backend::new("us-2")];
    let specs: Vec<Spec> = eu
        .iter()
        .map(|b| Spec { addr: b.addr(), id: b.name(), zone: "eu" })
        .chain(us.iter().map(|b| Spec { addr: b.addr(), id: b.name(), zone: "us" }))
        .collect();
    let params = json!({
        "header": "x-zone",
        "cidrs": { "127.0.1.0/24": "eu", "127.0.2.0/24": "us" },
    });
    let gw = start_yaml(&dir, &specs, "zone-aware", params);
    let eu_client = Browser::new(gw.addr).with_client_ip(Ipv4Addr::new(127, 0, 1, 10));
    let us_client = Browser::new(gw.addr).with_client_ip(Ipv4Addr::new(127, 0, 2, 10));
    let sample = |browser: &Browser, n: usize| -> Vec<String> {
        (0..n)
            .map(|i| {
                let r = browser.clone().get("/").unwrap_or_else(|e| panic!("{} request {i}: {e}", browser.ip()));
                assert_eq!(r.status, 200, "{} request {i}: {}", browser.ip(), r.body);
                r.body
            })
            .collect()
    };
    let only = |seq: &[String], allowed: &[&str]| seq.iter().all(|s| allowed.contains(&s.as_str()));

    // By client IP (CIDR table): served round robin in the client's zone.
    let seq = sample(&eu_client, 20);
    assert!(only(&seq, &["eu-1", "eu-2"]) && count(&seq, "eu-1") == 10, "eu client: {seq:?}");
    let seq = sample(&us_client, 20);
    assert!(only(&seq, &["us-1", "us-2"]) && count(&seq, "us-1") == 10, "us client: {seq:?}");
    // The header wins over the IP.
    let seq = sample(&eu_client.clone().with_header("x-zone", "us"), 10);
    assert!(only(&seq, &["us-1", "us-2"]), "x-zone: us from an eu address: {seq:?}");
    // No zone (127.0.0.1 is in no prefix, no default): all backends.
    let seq = sample(&Browser::new(gw.addr), 40);
    assert!(["eu-1", "eu-2", "us-1", "us-2"].iter().all(|b| count(&seq, b) == 10), "zoneless client: {seq:?}");

    // The eu zone goes down: eu clients fail over to us; no request fails.
    let mark = gw.log_mark();
    eu.iter().for_each(Backend::stop);
    let seq = sample(&eu_client, 6);
    assert!(only(&seq, &["us-1", "us-2"]), "eu client during the outage: {seq:?}");
    for b in &eu {
        wait_health(&gw, mark, b.addr(), "backend is down");
    }
    let seq = sample(&eu_client, 20);
    assert!(only(&seq, &["us-1", "us-2"]) && count(&seq, "us-1") >= 5 && count(&seq, "us-2") >= 5, "{seq:?}");
    let seq = sample(&us_client, 10);
    assert!(only(&seq, &["us-1", "us-2"]), "us client during the eu outage: {seq:?}");

    // eu-1 comes back: eu clients return to their zone.
    let mark = gw.log_mark();
    eu[0].start();
    wait_health(&gw, mark, eu[0].addr(), "backend is up");
    let seq = sample(&eu_client, 10);
    assert!(only(&seq, &["eu-1"]), "eu client after eu-1 came back: {seq:?}");
}

/// Runs the gateway with `args` and expects it to refuse to start: returns its stderr.
/// Panics as soon as it listens instead (the strategy accepted its params).
fn refused(dir: &TempDir, args: &[&str]) -> String {
    use std::io::BufRead;
    let plugins = dir.path().join("plugins");
    let mut all = vec!["--listen", "127.0.0.1:0", "--plugins", plugins.to_str().unwrap()];
    all.extend_from_slice(args);
    let command = format!("gateway {}", all.join(" "));
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_gateway"))
        .args(["--log-format", "json"])
        .args(&all)
        .env_remove("RUST_LOG")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("start `{command}`: {e}"));
    // Lines as they come; `None` at the end of stderr (the process exited).
    let (tx, rx) = std::sync::mpsc::channel::<Option<String>>();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(Some(line));
        }
        let _ = tx.send(None);
    });
    let mut lines = Vec::new();
    loop {
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(Some(line)) => {
                let started = serde_json::from_str::<Value>(&line).is_ok_and(|l| message(&l) == "listening");
                lines.push(line);
                if started {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("`{command}` started instead of refusing its params:\n{}", lines.join("\n"));
                }
            }
            Ok(None) => break,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("`{command}` neither exited nor listened within 30s:\n{}", lines.join("\n"));
            }
        }
    }
    let status = child.wait().expect("wait for the gateway");
    let stderr = lines.join("\n");
    assert!(!status.success(), "`{command}` should exit non-zero at startup, got {status}; stderr:\n{stderr}");
    stderr
}

#[test]
fn bad_params_stop_the_gateway_at_startup_with_the_plugins_message() {
    let dir = TempDir::new();
    let cases: [(&str, &[&str], &str); 11] = [
        ("round-robin", &["wieght=2"], "unknown param 'wieght': this strategy takes no params"),
        ("weighted-round-robin", &["nonsense=1"], "unknown param 'nonsense': this strategy takes no params"),
        ("least-connections", &["nonsense=1"], "unknown param 'nonsense': this strategy takes no params"),
        ("random", &["seed=42"], "unknown param 'seed': this strategy takes no params"),
        ("p2c-ewma", &["decay_ms=0"], "param 'decay_ms': expected a positive integer, got 0"),
        ("p2c-ewma", &["decay=500"], "unknown param 'decay' (accepted: decay_ms, default_latency_ms)"),
        ("sticky-cookie", &["ttl_s=1h"], "param 'ttl_s': expected a positive integer, got the string \"1h\""),
        (
            "sticky-cookie",
            &["fallback=least-connections"],
            "param 'fallback': expected one of \"round-robin\", \"random\", got \"least-connections\"",
        ),
        ("consistent-hash", &["key=body:user"], "param 'key': expected \"client-ip\", \"path\", \"header:NAME\""),
        ("consistent-hash", &["algorithm=jump"], "param 'algorithm': expected one of \"ring\", \"maglev\""),
        (
            "zone-aware",
            &["cidrs={\"10.1.0.1/16\": \"eu\"}"],
            "param 'cidrs': \"10.1.0.1/16\" has host bits set; did you mean \"10.1.0.0/16\"?",
        ),
    ];
    // In parallel: each run compiles nothing (the plugin cache) but starts a process.
    std::thread::scope(|s| {
        let runs: Vec<_> = cases
            .iter()
            .map(|(plugin, params, expected)| {
                let dir = &dir;
                let (plugin, params, expected) = (*plugin, *params, *expected);
                s.spawn(move || {
                    let mut args = vec!["-b", "127.0.0.1:9", "--strategy", plugin];
                    for &p in params {
                        args.extend(["--param", p]);
                    }
                    let stderr = refused(dir, &args);
                    assert!(stderr.contains(expected), "{plugin} {params:?}: expected `{expected}` in:\n{stderr}");
                    assert!(stderr.contains(plugin), "{plugin}: the message does not name the plugin:\n{stderr}");
                })
            })
            .collect();
        for r in runs {
            r.join().unwrap();
        }
    });

    // The same from a config file.
    let file = dir.write(
        "bad.yaml",
        "listeners: [{address: \"127.0.0.1:0\"}]\nupstreams:\n  shop:\n    backends: [{address: \"127.0.0.1:9\"}]\n    strategy: {plugin: zone-aware, params: {header_zones: {FR: eu}}}\n",
    );
    let stderr = refused(&dir, &["--config", file.to_str().unwrap()]);
    assert!(
        stderr.contains("param 'header_zones' needs param 'header'") && stderr.contains("upstream `shop`"),
        "{stderr}"
    );
}

/// BUG (gateway): a refused param is reported twice on one line:
/// `error: upstream `default`: built-in plugin `p2c-ewma`: refused its params {..}: MSG:
/// built-in plugin `p2c-ewma`: refused its params {..}: MSG`. `BuildError::Plugin`
/// (gateway/src/upstream.rs) prints `{source}` in its message and also has it as its
/// error source, and `main` prints the chain with `{:#}`.
#[test]
fn a_refused_param_is_reported_once() {
    let dir = TempDir::new();
    let stderr = refused(&dir, &["-b", "127.0.0.1:9", "--strategy", "p2c-ewma", "--param", "decay_ms=0"]);
    let msg = "param 'decay_ms': expected a positive integer, got 0";
    assert_eq!(stderr.matches(msg).count(), 1, "the message should appear once:\n{stderr}");
}
