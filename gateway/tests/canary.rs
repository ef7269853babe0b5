//! Canary and shadow strategies, end to end: the real gateway binary, real backends on
//! loopback. A canary decides its share of the clients (by key) and each client keeps its
//! arm; responses are counted per arm, so a canary that sends clients to a failing backend
//! shows a higher 5xx ratio than the live strategy; the admin API promotes and aborts it
//! (the running config), and a reload from the file brings back what the file says. A
//! shadow is asked about a sample of the requests, its agreement with the live decision
//! and its would-be distribution are recorded, and a shadow that traps leaves the live
//! requests untouched.

mod util;

use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::time::Duration;
use util::{Backend, Gateway, TempDir, get, message, poll_until, request, request_with_headers, test_plugin};

/// `GET /` as user `user` (header `x-user`, none for `None`), asking how it was decided:
/// (backend, status, X-Gateway-Decision).
fn as_user(addr: SocketAddr, user: Option<&str>) -> (String, u16, String) {
    let mut headers = vec![("x-gateway-debug", "1")];
    if let Some(u) = user {
        headers.push(("x-user", u));
    }
    let r = request_with_headers(addr, "GET", "/", &headers).unwrap_or_else(|e| panic!("GET /: {e}"));
    (r.body.clone(), r.status, r.header("x-gateway-decision").to_owned())
}

/// The gateway's canary hash (FNV-1a 64, then the MurmurHash3 finaliser), written again
/// here: the split is a documented, stable function of the key, so the test knows which
/// users the canary must get.
fn canary_hash(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

fn upstream(admin: SocketAddr) -> Value {
    let (status, text) = get(admin, "/api/upstreams");
    assert_eq!(status, 200, "{text}");
    let api: Value = serde_json::from_str(&text).unwrap();
    api["upstreams"][0].clone()
}

/// `name{labels} value` samples of `/metrics`.
fn metrics(admin: SocketAddr) -> HashMap<String, f64> {
    let (status, text) = get(admin, "/metrics");
    assert_eq!(status, 200, "{text}");
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' ').and_then(|(k, v)| Some((k.to_owned(), v.parse().ok()?))))
        .collect()
}

fn config_version(admin: SocketAddr) -> u64 {
    let (_, text) = get(admin, "/api/config");
    serde_json::from_str::<Value>(&text).unwrap()["version"].as_u64().unwrap()
}

/// Live: `first` (always backend a). Canary: round robin over a, b and c, where c answers
/// 500, for a quarter of the users by the `x-user` header. No retries and no ejection, so
/// each arm's 5xx ratio is what its decisions caused.
#[test]
fn a_canary_decides_for_its_share_of_clients_counts_per_arm_and_is_promoted_or_aborted() {
    let (a, b) = (Backend::new("a"), Backend::new("b"));
    let c = Backend::failing("c", 500);
    let dir = TempDir::new();
    let plugins = dir.path().join("plugins");
    std::fs::create_dir_all(&plugins).unwrap();
    std::fs::copy(test_plugin("first"), plugins.join("first.wasm")).unwrap();
    let yaml = format!(
        "listeners: [{{address: 127.0.0.1:0}}]\nthreads: 2\naccess_log: false\nupstreams:\n  web:\n    health_check: {{enabled: false}}\n    passive: {{consecutive_failures: 0}}\n    retries: {{attempts: 1}}\n    strategy: {{plugin: first}}\n    canary: {{plugin: round-robin, share: 0.25, key: \"header:x-user\"}}\n    backends:\n      - {{address: \"{}\", id: a}}\n      - {{address: \"{}\", id: b}}\n      - {{address: \"{}\", id: c}}\n",
        a.addr(),
        b.addr(),
        c.addr()
    );
    let file = dir.write("gw.yaml", yaml);
    let gw = Gateway::with_config(&file, &plugins);
    let admin = gw.admin_addr();

    // 200 users, twice each: a user's two requests are decided by the same arm, and the
    // users the canary gets are exactly those whose key hashes into its quarter.
    let threshold = (0.25 * 2f64.powi(64)) as u64;
    let mut arms: BTreeMap<String, Vec<bool>> = BTreeMap::new();
    let (mut live_n, mut canary_n, mut canary_5xx) = (0u64, 0u64, 0u64);
    for round in 0..2 {
        for i in 0..200 {
            let user = format!("user-{i}");
            let (backend, status, decision) = as_user(gw.addr, Some(&user));
            let canary = decision.ends_with("; arm=canary");
            if canary {
                assert!(decision.starts_with("upstream=web; plugin=round-robin; backend="), "{decision}");
                canary_n += 1;
                if status == 500 {
                    canary_5xx += 1;
                }
            } else {
                assert_eq!((backend.as_str(), status), ("a", 200), "the live strategy sends everyone to a: {decision}");
                assert_eq!(decision, "upstream=web; plugin=first; backend=a");
                live_n += 1;
            }
            arms.entry(user).or_default().push(canary);
            let _ = round;
        }
    }
    for (user, seen) in &arms {
        assert!(seen.iter().all(|&c| c == seen[0]), "{user} saw both strategies: {seen:?}");
        let expected = canary_hash(user.as_bytes()) <= threshold;
        assert_eq!(seen[0], expected, "{user}: the split is the documented hash of the key");
    }
    let canary_users = arms.values().filter(|s| s[0]).count();
    assert!((30..=70).contains(&canary_users), "the canary got {canary_users} of 200 users for a share of 0.25");
    assert!(canary_5xx > 0, "the canary's round robin reaches the failing backend");
    // No key: the live strategy.
    let (backend, _, decision) = as_user(gw.addr, None);
    assert_eq!((backend.as_str(), decision.as_str()), ("a", "upstream=web; plugin=first; backend=a"));
    live_n += 1;

    // Per arm: responses and 5xx, in the API and in /metrics.
    let up = upstream(admin);
    let cy = &up["canary"];
    assert_eq!(
        (cy["plugin"].as_str(), cy["share"].as_f64(), cy["key"].as_str()),
        (Some("round-robin"), Some(0.25), Some("header:x-user"))
    );
    assert_eq!(cy["live"]["responses"].as_u64(), Some(live_n), "{cy}");
    assert_eq!(cy["live"]["errors"].as_u64(), Some(0), "{cy}");
    assert_eq!(cy["canary"]["responses"].as_u64(), Some(canary_n), "{cy}");
    assert_eq!(cy["canary"]["errors"].as_u64(), Some(canary_5xx), "{cy}");
    let ratio = cy["canary"]["error_ratio"].as_f64().unwrap();
    assert!((ratio - canary_5xx as f64 / canary_n as f64).abs() < 1e-9 && ratio > 0.2, "{cy}");
    let m = metrics(admin);
    let arm = |arm: &str, plugin: &str, code: &str| {
        let key = format!(
            "gateway_canary_responses_total{{upstream=\"web\",arm=\"{arm}\",plugin=\"{plugin}\",code=\"{code}\"}}"
        );
        *m.get(&key).unwrap_or_else(|| panic!("no {key}"))
    };
    assert_eq!(arm("canary", "round-robin", "5xx"), canary_5xx as f64);
    assert_eq!(arm("canary", "round-robin", "2xx"), (canary_n - canary_5xx) as f64);
    assert_eq!(arm("live", "first", "2xx"), live_n as f64);

    // Promote through the admin API: round robin now decides for everyone.
    assert_eq!(config_version(admin), 1);
    let r = request(admin, "POST", "/api/upstreams/web/canary/promote", None).unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    let answer: Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!((answer["done"].as_str(), answer["version"].as_u64()), (Some("promoted"), Some(2)));
    assert!(answer["note"].as_str().unwrap().contains("the config file did not"), "{answer}");
    gw.wait_for_log(Duration::from_secs(5), |l| message(l).starts_with("canary promoted by the admin API"));
    let up = upstream(admin);
    assert_eq!((up["strategy"].as_str(), &up["canary"]), (Some("round-robin"), &Value::Null), "{up}");
    let mut seen = BTreeMap::new();
    for i in 0..30 {
        let (backend, _, decision) = as_user(gw.addr, Some(&format!("user-{i}")));
        assert!(decision.starts_with("upstream=web; plugin=round-robin;") && !decision.contains("arm="), "{decision}");
        *seen.entry(backend).or_insert(0) += 1;
    }
    assert_eq!(seen.len(), 3, "the promoted round robin uses every backend: {seen:?}");
    let r = request(admin, "POST", "/api/upstreams/web/canary/promote", None).unwrap();
    assert_eq!(r.status, 409, "no canary left to promote: {}", r.body);
    assert!(r.body.contains("has no canary"), "{}", r.body);

    // A reload from the file brings back what it says: `first` with its canary. Abort.
    let r = request(admin, "POST", "/api/reload", None).unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(upstream(admin)["canary"]["plugin"], "round-robin");
    let r = request(admin, "POST", "/api/upstreams/web/canary/abort", None).unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    let up = upstream(admin);
    assert_eq!((up["strategy"].as_str(), &up["canary"]), (Some("first"), &Value::Null), "{up}");
    for i in 0..20 {
        let (backend, _, decision) = as_user(gw.addr, Some(&format!("user-{i}")));
        assert_eq!((backend.as_str(), decision.as_str()), ("a", "upstream=web; plugin=first; backend=a"));
    }
    assert_eq!(config_version(admin), 4);
}

/// Waits until the shadow has recorded `n` sampled requests (it answers off the
/// request path), then returns the upstream's `shadow`.
fn shadow_after(admin: SocketAddr, n: u64) -> Value {
    poll_until(Duration::from_secs(5), Duration::from_millis(20), || {
        let sh = upstream(admin)["shadow"].clone();
        (sh["sampled"].as_u64() >= Some(n)).then_some(())
    })
    .unwrap_or_else(|| panic!("the shadow did not record {n} requests: {}", upstream(admin)["shadow"]));
    // None of the requests sent is still being put to the shadow.
    std::thread::sleep(Duration::from_millis(200));
    upstream(admin)["shadow"].clone()
}

fn picks(shadow: &Value) -> BTreeMap<String, (u64, u64)> {
    shadow["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| (b["id"].as_str().unwrap().to_owned(), (b["live"].as_u64().unwrap(), b["shadow"].as_u64().unwrap())))
        .collect()
}

/// Live: consistent hash by user. A shadow that is the same strategy agrees every time; a
/// shadow that always picks the first backend agrees exactly when the live one chose it,
/// and would have sent everything there; a shadow that traps changes nothing a client sees.
#[test]
fn a_shadow_records_agreement_and_where_it_would_have_sent_requests_and_never_touches_them() {
    let (a, b, c) = (Backend::new("a"), Backend::new("b"), Backend::new("c"));
    let dir = TempDir::new();
    let plugins = dir.path().join("plugins");
    std::fs::create_dir_all(&plugins).unwrap();
    for p in ["first", "trap"] {
        std::fs::copy(test_plugin(p), plugins.join(format!("{p}.wasm"))).unwrap();
    }
    let config = |shadow: &str| {
        format!(
            "listeners: [{{address: 127.0.0.1:0}}]\nthreads: 1\naccess_log: false\nupstreams:\n  web:\n    health_check: {{enabled: false}}\n    strategy: {{plugin: consistent-hash, params: {{key: \"header:x-user\"}}}}\n    shadow: {shadow}\n    backends:\n      - {{address: \"{}\", id: a}}\n      - {{address: \"{}\", id: b}}\n      - {{address: \"{}\", id: c}}\n",
            a.addr(),
            b.addr(),
            c.addr()
        )
    };
    let file = dir.write("gw.yaml", config("{plugin: consistent-hash, params: {key: \"header:x-user\"}, sample: 1.0}"));
    let gw = Gateway::with_config(&file, &plugins);
    let admin = gw.admin_addr();
    let send = |n: usize| -> BTreeMap<String, u64> {
        let mut served = BTreeMap::new();
        for i in 0..n {
            let (backend, status, _) = as_user(gw.addr, Some(&format!("user-{i}")));
            assert_eq!(status, 200);
            *served.entry(backend).or_insert(0) += 1;
        }
        served
    };

    // The same strategy as the shadow: it agrees on every request, and its would-be
    // distribution is the live one.
    let served = send(90);
    let sh = shadow_after(admin, 90);
    assert_eq!(
        (sh["agreed"].as_u64(), sh["disagreed"].as_u64(), sh["agreement"].as_f64()),
        (Some(90), Some(0), Some(1.0)),
        "{sh}"
    );
    let p = picks(&sh);
    for (id, n) in &served {
        assert_eq!(p[id], (*n, *n), "backend {id}: {sh}");
    }

    // `first` as the shadow, on half of the requests: it agrees when the live strategy
    // chose a, and would have sent everything to a.
    std::fs::write(&file, config("{plugin: first, sample: 0.5}")).unwrap();
    let r = request(admin, "POST", "/api/reload", None).unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    send(200);
    let sh = shadow_after(admin, 99);
    let sampled = sh["sampled"].as_u64().unwrap();
    assert!((99..=101).contains(&sampled), "a sample of 0.5 of 200 requests: {sh}");
    let p = picks(&sh);
    let live_a = p.get("a").map_or(0, |x| x.0);
    assert_eq!(p["a"].1, sampled, "the shadow would have sent every sampled request to a: {sh}");
    assert!(p.iter().filter(|(id, _)| *id != "a").all(|(_, (_, s))| *s == 0), "{sh}");
    assert_eq!(sh["agreed"].as_u64(), Some(live_a), "it agrees exactly when the live strategy chose a: {sh}");
    assert_eq!(sh["disagreed"].as_u64(), Some(sampled - live_a), "{sh}");
    let m = metrics(admin);
    let key = "gateway_shadow_picks_total{upstream=\"web\",plugin=\"first\",backend=\"a\",decided_by=\"shadow\"}";
    assert_eq!(m.get(key).copied(), Some(sampled as f64), "{key}");
    let key = "gateway_shadow_decisions_total{upstream=\"web\",plugin=\"first\",result=\"agreed\"}";
    assert_eq!(m.get(key).copied(), Some(live_a as f64), "{key}");

    // A shadow that traps on every call: every live request is still answered by the
    // live strategy (no fallback), the failures are the shadow's own, and logged.
    std::fs::write(&file, config("{plugin: trap, sample: 1.0}")).unwrap();
    let r = request(admin, "POST", "/api/reload", None).unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    let before = upstream(admin)["plugin"]["fallbacks"].as_u64().unwrap();
    for i in 0..40 {
        let (_, status, decision) = as_user(gw.addr, Some(&format!("user-{i}")));
        assert_eq!(status, 200);
        assert!(decision.contains("plugin=consistent-hash"), "{decision}");
    }
    let sh = shadow_after(admin, 40);
    assert_eq!(sh["agreed"].as_u64().unwrap() + sh["disagreed"].as_u64().unwrap(), 0, "{sh}");
    assert!(sh["failed"].as_u64().unwrap() >= 5, "the trapping shadow's calls failed: {sh}");
    assert_eq!(upstream(admin)["plugin"]["fallbacks"].as_u64(), Some(before), "the live strategy never fell back");
    let line = gw.wait_for_log(Duration::from_secs(5), |l| message(l).starts_with("shadow plugin call failed"));
    assert!(message(&line).contains("the live request was not affected"), "{line}");
    assert_eq!(line["plugin"], "trap");
}
