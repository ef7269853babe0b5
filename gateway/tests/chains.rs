//! Strategy chains and decisions that explain themselves, end to end: the real gateway
//! binary, real backends on loopback. A chain passes from step to step (built-ins with
//! `on_miss: pass`, a Python guest), the last pass falls back to the native round robin;
//! the access log and the `X-Gateway-Decision` debug header say which step decided and
//! why; the debug header is given only to a loopback client or one with the admin token;
//! a chain step is hot-swapped like a single strategy; a bad step is named by
//! file, line and field.

mod util;

use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::Duration;
use util::{Backend, Gateway, TempDir, get, message, poll_until, request_with_headers, run_cli, test_plugin};

/// The admin token of the tests that use one (at least 16 characters).
const TOKEN: &str = "chain-test-token-0123456789";

/// `backends: [...]` for a YAML upstream: ids are the backends' names.
fn backends_yaml(backends: &[&Backend], zones: &[&str]) -> String {
    backends
        .iter()
        .zip(zones)
        .map(|(b, z)| format!("      - {{ address: \"{}\", id: {}, zone: \"{z}\" }}\n", b.addr(), b.name()))
        .collect()
}

/// Reads the JSON access log until it has at least `n` lines.
fn access_lines(file: &Path, n: usize) -> Vec<Value> {
    poll_until(Duration::from_secs(5), Duration::from_millis(20), || {
        let text = std::fs::read_to_string(file).unwrap_or_default();
        let lines: Vec<Value> = text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
        (lines.len() >= n).then_some(lines)
    })
    .unwrap_or_else(|| panic!("{} has fewer than {n} lines", file.display()))
}

/// `GET /` with `headers` plus `X-Gateway-Debug: 1`: (backend, X-Gateway-Decision).
fn debug_get(addr: SocketAddr, headers: &[(&str, &str)]) -> (String, String) {
    let mut all = headers.to_vec();
    all.push(("x-gateway-debug", "1"));
    let r = request_with_headers(addr, "GET", "/", &all).unwrap_or_else(|e| panic!("GET /: {e}"));
    assert_eq!(r.status, 200, "{}", r.body);
    (r.body.clone(), r.header("x-gateway-decision").to_owned())
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

fn sample(m: &HashMap<String, f64>, key: &str) -> f64 {
    *m.get(key).unwrap_or_else(|| {
        let mut near: Vec<_> = m.keys().filter(|k| k.starts_with(key.split('{').next().unwrap())).collect();
        near.sort();
        panic!("no sample {key}; samples of that name: {near:#?}")
    })
}

/// The chain of the issue: sticky cookie (passes without one), consistent hash by the
/// `x-user` header (passes without it), zone by the `x-region` header (passes without
/// a match); whatever gets through all three is served by the native round robin.
#[test]
fn a_chain_passes_from_cookie_to_key_to_zone_and_the_last_pass_falls_back() {
    let (a, b, c) = (Backend::new("a"), Backend::new("b"), Backend::new("c"));
    let dir = TempDir::new();
    let log = dir.path().join("access.log");
    let yaml = format!(
        "listeners: [{{address: 127.0.0.1:0}}]\nthreads: 1\naccess_log: {{path: {}, format: json}}\nupstreams:\n  web:\n    health_check: {{enabled: false}}\n    strategy:\n      - {{plugin: sticky-cookie, params: {{on_miss: pass}}}}\n      - {{plugin: consistent-hash, params: {{key: \"header:x-user\", on_miss: pass}}}}\n      - {{plugin: zone-aware, params: {{header: x-region, on_miss: pass}}}}\n    backends:\n{}",
        log.display(),
        backends_yaml(&[&a, &b, &c], &["eu", "us", "us"])
    );
    let file = dir.write("gw.yaml", yaml);
    let plugins = dir.path().join("plugins");
    let gw = Gateway::with_config(&file, &plugins);

    // Step 0: a cookie naming a backend.
    let (backend, decision) = debug_get(gw.addr, &[("cookie", "lb=b")]);
    assert_eq!(backend, "b");
    assert_eq!(decision, "upstream=web; plugin=sticky-cookie; backend=b");
    // Step 1: no cookie, a key: always the same backend.
    let (keyed, decision) = debug_get(gw.addr, &[("x-user", "u-42")]);
    assert_eq!(decision, format!("upstream=web; plugin=consistent-hash; backend={keyed}"));
    for _ in 0..10 {
        assert_eq!(debug_get(gw.addr, &[("x-user", "u-42")]).0, keyed, "a key moved");
    }
    // Step 2: no cookie, no key, a zone.
    let (zoned, decision) = debug_get(gw.addr, &[("x-region", "eu")]);
    assert_eq!((zoned.as_str(), decision.as_str()), ("a", "upstream=web; plugin=zone-aware; backend=a"));
    // Nothing for anyone: every step passes and the native round robin takes turns.
    let mut seen = BTreeMap::new();
    for _ in 0..12 {
        let (backend, decision) = debug_get(gw.addr, &[]);
        assert_eq!(decision, format!("upstream=web; plugin=-; backend={backend}; reason=every strategy passed"));
        *seen.entry(backend).or_insert(0) += 1;
    }
    assert_eq!(seen.len(), 3, "the fallback round robin uses every backend: {seen:?}");
    assert!(seen.values().all(|&n| n == 4), "exact turns: {seen:?}");
    // The debug header goes back to the client only: never to a backend.
    for backend in [&a, &b, &c] {
        assert!(backend.hits().iter().all(|h| !h.headers.contains_key("x-gateway-debug")), "forwarded");
    }

    // The access log says which step decided; the fallback is marked as one.
    // One worker thread: the lines are in the order of the requests.
    let lines = access_lines(&log, 25);
    assert_eq!(lines[0]["plugin"], "sticky-cookie");
    assert_eq!(lines[0]["strategy"], "sticky-cookie > consistent-hash > zone-aware");
    assert_eq!(lines[1]["plugin"], "consistent-hash");
    assert_eq!((&lines[1]["fallback"], &lines[1]["decision_reason"]), (&Value::Bool(false), &Value::Null));
    assert_eq!(lines[12]["plugin"], "zone-aware");
    let last = &lines[24];
    assert_eq!((&last["plugin"], &last["fallback"]), (&Value::Null, &Value::Bool(true)));
    assert_eq!(last["decision_reason"], "every strategy passed");

    // Metrics: requests asked of each step, and passes.
    let m = metrics(gw.admin_addr());
    let step = |name: &str, plugin: &str, i: u8| {
        sample(&m, &format!("gateway_plugin_{name}_total{{upstream=\"web\",plugin=\"{plugin}\",step=\"{i}\"}}"))
    };
    assert_eq!((step("decisions", "sticky-cookie", 0), step("passes", "sticky-cookie", 0)), (25.0, 24.0));
    assert_eq!((step("decisions", "consistent-hash", 1), step("passes", "consistent-hash", 1)), (24.0, 13.0));
    assert_eq!((step("decisions", "zone-aware", 2), step("passes", "zone-aware", 2)), (13.0, 12.0));
    let fallbacks =
        "gateway_plugin_fallbacks_total{upstream=\"web\",plugin=\"sticky-cookie > consistent-hash > zone-aware\"}";
    assert_eq!(sample(&m, fallbacks), 12.0);

    // The admin API shows the chain.
    let (_, text) = get(gw.admin_addr(), "/api/upstreams");
    let api: Value = serde_json::from_str(&text).unwrap();
    let up = &api["upstreams"][0];
    assert_eq!(up["strategy"], "sticky-cookie > consistent-hash > zone-aware");
    let chain: Vec<(&str, u64, u64)> = up["chain"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["plugin"].as_str().unwrap(), s["decisions"].as_u64().unwrap(), s["passes"].as_u64().unwrap()))
        .collect();
    assert_eq!(chain, [("sticky-cookie", 25, 24), ("consistent-hash", 24, 13), ("zone-aware", 13, 12)]);
    assert_eq!(up["chain"][1]["params"]["key"], "header:x-user");
}

/// Where scripts/build-guest-plugins.sh writes (`GUEST_OUT_DIR`, as in the script).
fn guest_plugin(name: &str) -> PathBuf {
    let dir = std::env::var_os("GUEST_OUT_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/guest-plugins"));
    let file = dir.join(format!("{name}.wasm"));
    assert!(
        file.is_file(),
        "{} is missing: run scripts/build-guest-plugins.sh first (scripts/test.sh does)",
        file.display()
    );
    file
}

/// A Python step decides for requests naming a backend (with its reason) and passes
/// the rest to a built-in.
#[test]
fn a_python_step_passes_to_the_next_and_gives_its_reasons() {
    let (a, b, c) = (Backend::new("a"), Backend::new("b"), Backend::new("c"));
    let dir = TempDir::new();
    let plugins = dir.path().join("plugins");
    std::fs::create_dir_all(&plugins).unwrap();
    std::fs::copy(guest_plugin("python-pass"), plugins.join("python-pass.wasm")).unwrap();
    let log = dir.path().join("access.log");
    let yaml = format!(
        "listeners: [{{address: 127.0.0.1:0}}]\nthreads: 1\naccess_log: {{path: {}, format: text}}\nupstreams:\n  web:\n    health_check: {{enabled: false}}\n    strategy: [{{plugin: python-pass}}, {{plugin: consistent-hash, params: {{key: \"header:x-user\"}}}}]\n    backends:\n{}",
        log.display(),
        backends_yaml(&[&a, &b, &c], &["", "", ""])
    );
    let file = dir.write("gw.yaml", yaml);
    // Loading a Python plugin not yet in the compiled cache compiles it first.
    let cache = dir.path().join("cache");
    let gw = Gateway::start_with(
        &["--config", file.to_str().unwrap(), "--plugins", plugins.to_str().unwrap()],
        &[("XDG_CACHE_HOME", cache.to_str().unwrap())],
        Duration::from_secs(180),
    );
    let decided = poll_until(Duration::from_secs(20), Duration::from_millis(50), || {
        let (backend, decision) = debug_get(gw.addr, &[("x-backend", "2")]);
        decision.contains("plugin=python-pass").then_some((backend, decision))
    })
    .expect("the Python step never decided (its instance is built off the request path)");
    assert_eq!(
        decided,
        ("c".into(), "upstream=web; plugin=python-pass; backend=c; reason=x-backend asked for 2".into())
    );
    let (keyed, decision) = debug_get(gw.addr, &[("x-user", "u-7")]);
    // The deciding step's reason, not the reason the passing step gave.
    assert_eq!(decision, format!("upstream=web; plugin=consistent-hash; backend={keyed}"));
    assert_eq!(debug_get(gw.addr, &[("x-user", "u-7")]).0, keyed);

    // Text access log: ` plugin=... decision_reason=...`, quoted when it has spaces.
    let text = poll_until(Duration::from_secs(5), Duration::from_millis(20), || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        text.contains("plugin=consistent-hash").then_some(text)
    })
    .unwrap_or_else(|| panic!("no consistent-hash line in {}", log.display()));
    assert!(text.contains(" plugin=python-pass decision_reason=\"x-backend asked for 2\""), "{text}");
    assert!(text.contains(" plugin=consistent-hash decision_reason=-"), "{text}");
}

/// Sends a raw HTTP/1.1 request after a PROXY protocol v1 header claiming `client`;
/// returns the response head, lower-cased.
fn via_proxy_protocol(addr: SocketAddr, client: &str, extra: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "PROXY TCP4 {client} 127.0.0.1 40000 80\r\nGET / HTTP/1.1\r\nhost: shop.example\r\nx-gateway-debug: 1\r\n{extra}connection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let head = out.split("\r\n\r\n").next().unwrap_or("").to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 200"), "{out}");
    head
}

/// The debug header tells how routing works: only a loopback client, or one with the
/// admin token, gets it. Behind a load balancer speaking the PROXY protocol, the
/// client's own address counts.
#[test]
fn the_debug_header_is_only_for_loopback_clients_or_the_admin_token() {
    let a = Backend::new("a");
    let dir = TempDir::new();
    let token = dir.write("token", TOKEN);
    let yaml = format!(
        "listeners: [{{address: 127.0.0.1:0, proxy_protocol: true}}]\nadmin: {{address: 127.0.0.1:0, token_file: {}}}\naccess_log: false\nupstreams:\n  web:\n    health_check: {{enabled: false}}\n    backends: [{{address: \"{}\", id: a}}]\n",
        token.display(),
        a.addr()
    );
    let file = dir.write("gw.yaml", yaml);
    let plugins = dir.path().join("plugins");
    let gw = Gateway::start(&["--config", file.to_str().unwrap(), "--plugins", plugins.to_str().unwrap()]);

    let public = via_proxy_protocol(gw.addr, "203.0.113.9", "");
    assert!(!public.contains("x-gateway-decision"), "a public client got the debug header:\n{public}");
    let wrong = via_proxy_protocol(gw.addr, "203.0.113.9", "authorization: Bearer not-the-token-at-all\r\n");
    assert!(!wrong.contains("x-gateway-decision"), "a wrong token got the debug header:\n{wrong}");
    let with_token = via_proxy_protocol(gw.addr, "203.0.113.9", &format!("authorization: Bearer {TOKEN}\r\n"));
    assert!(
        with_token.contains("x-gateway-decision: upstream=web; plugin=round-robin; backend=a"),
        "the admin token did not get the debug header:\n{with_token}"
    );
    let local = via_proxy_protocol(gw.addr, "127.0.0.1", "");
    assert!(local.contains("x-gateway-decision: upstream=web; plugin=round-robin; backend=a"), "{local}");
    assert!(a.hits().iter().all(|h| !h.headers.contains_key("x-gateway-debug")), "the debug header was forwarded");
}

/// A chain step is a plugin binding like any other: replacing its file swaps it in.
#[test]
fn a_chain_step_is_hot_swapped_and_a_bad_step_is_named_by_line_and_field() {
    let (a, b, c) = (Backend::new("a"), Backend::new("b"), Backend::new("c"));
    let dir = TempDir::new();
    let plugins = dir.path().join("plugins");
    std::fs::create_dir_all(&plugins).unwrap();
    // `step` starts as the built-in round robin, exported into the folder.
    let step = plugins.join("step.wasm");
    let out = run_cli(&["plugin", "export", "round-robin", "-o", step.to_str().unwrap()], Duration::from_secs(30));
    assert_eq!(out.code, Some(0), "{out:?}");
    let yaml = format!(
        "listeners: [{{address: 127.0.0.1:0}}]\nthreads: 1\naccess_log: false\nupstreams:\n  web:\n    health_check: {{enabled: false}}\n    strategy:\n      - {{plugin: sticky-cookie, params: {{on_miss: pass}}}}\n      - {{plugin: step}}\n    backends:\n{}",
        backends_yaml(&[&a, &b, &c], &["", "", ""])
    );
    let file = dir.write("gw.yaml", yaml.clone());
    let gw = Gateway::with_config(&file, &plugins);
    let spread = |n: usize| -> BTreeMap<String, usize> {
        let mut seen = BTreeMap::new();
        for _ in 0..n {
            *seen.entry(get(gw.addr, "/").1).or_insert(0) += 1;
        }
        seen
    };
    assert_eq!(spread(6).len(), 3, "round robin in step 1");

    // The test plugin `first` always picks the first healthy backend.
    let mark = gw.log_mark();
    let tmp = plugins.join("step.wasm.tmp");
    std::fs::copy(test_plugin("first"), &tmp).unwrap();
    std::fs::rename(&tmp, &step).unwrap();
    let swapped = gw.wait_for_log_after(mark, Duration::from_secs(20), |l| message(l).starts_with("plugin swapped"));
    assert_eq!(swapped["plugin"], "step", "{swapped}");
    assert_eq!(spread(6), BTreeMap::from([("a".to_owned(), 6)]), "after the swap step 1 is `first`");
    // Step 0 still decides for a client with a cookie.
    let r = request_with_headers(gw.addr, "GET", "/", &[("cookie", "lb=c")]).unwrap();
    assert_eq!(r.body, "c");

    // A step naming no plugin refuses the config, naming the file, line and field.
    let bad = yaml.replace("{plugin: step}", "{plugin: no-such-plugin}");
    let bad_file = dir.write("bad.yaml", bad);
    let out = run_cli(
        &["--config", bad_file.to_str().unwrap(), "--plugins", plugins.to_str().unwrap()],
        Duration::from_secs(30),
    );
    assert_ne!(out.code, Some(0), "{out:?}");
    assert!(out.stderr.contains("bad.yaml:9"), "no file:line: {out:?}");
    assert!(out.stderr.contains("upstreams.web.strategy[1]"), "no field: {out:?}");
    assert!(out.stderr.contains("no plugin named `no-such-plugin`"), "{out:?}");
}
