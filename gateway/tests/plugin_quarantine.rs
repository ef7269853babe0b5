//! A plugin that keeps failing is quarantined (the fallback serves, the plugin is not
//! called) and tried again after a backoff; a plugin that hangs in `pool-changed` or
//! `configure` is refused by a hot swap (and stops a start, saying why), and after a pool
//! change it stalls no request: instances are built off the request path.

mod util;

use serde_json::Value;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use util::{Backend, Gateway, TempDir, Traffic, get, message, report, run_cli, test_plugin};

fn yaml(backends: &[&Backend], strategy: &str, params: &str, plugins_extra: &str) -> String {
    let list: String = backends.iter().map(|b| format!("      - {{ address: {} }}\n", b.addr())).collect();
    format!(
        "listeners:\n  - address: 127.0.0.1:0\nthreads: 2\naccess_log: false\n\
         plugins:\n  {plugins_extra}\n\
         upstreams:\n  web:\n    strategy: {{ plugin: {strategy}, params: {params} }}\n    \
         health_check: {{ interval: 100ms, timeout: 500ms, rise: 1, fall: 1 }}\n    backends:\n{list}"
    )
}

fn upstream(gw: &Gateway) -> Value {
    let (status, body) = get(gw.admin_addr(), "/api/upstreams");
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).expect("JSON");
    v["upstreams"][0].clone()
}

fn failures(gw: &Gateway) -> u64 {
    upstream(gw)["plugin"]["failures"].as_u64().expect("failures")
}

/// `n` sequential GETs, each answered 200 by one of `backends` within `limit`.
fn serve(gw: &Gateway, backends: &[&Backend], n: usize, limit: Duration) -> Vec<String> {
    (0..n)
        .map(|i| {
            let started = Instant::now();
            let (status, body) = get(gw.addr, &format!("/q/{i}"));
            let took = started.elapsed();
            assert_eq!(status, 200, "request {i}: {body}");
            assert!(backends.iter().any(|b| b.name() == body), "request {i} answered by {body:?}");
            assert!(took < limit, "request {i} took {took:?}");
            body
        })
        .collect()
}

fn wait_health(gw: &Gateway, mark: usize, addr: SocketAddr, event: &str) {
    let addr = addr.to_string();
    gw.wait_for_log_after(mark, Duration::from_secs(10), |l| message(l).starts_with(event) && l["address"] == addr);
}

#[test]
fn a_plugin_that_keeps_trapping_is_quarantined_and_tried_again_after_a_doubling_backoff() {
    let dir = TempDir::new();
    dir.copy(&test_plugin("trap"), "trap.wasm");
    let (b1, b2) = (Backend::new("backend-1"), Backend::new("backend-2"));
    let config = dir.write(
        "gw.yaml",
        yaml(&[&b1, &b2], "trap", "{}", "quarantine: { after: 5, backoff: 1500ms, max_backoff: 10s }"),
    );
    let gw = Gateway::with_config(&config, dir.path());
    let rss_before = gw.rss_kib();

    // Five traps in a row: quarantined. The next requests are all answered by the
    // fallback without calling the plugin at all.
    let seen = serve(&gw, &[&b1, &b2], 40, Duration::from_secs(2));
    assert!(seen.contains(&"backend-1".into()) && seen.contains(&"backend-2".into()), "{seen:?}");
    let line = gw.wait_for_log(Duration::from_secs(5), |l| message(l).starts_with("plugin quarantined"));
    assert_eq!((line["level"].as_str(), line["upstream"].as_str()), (Some("WARN"), Some("web")), "{line}");
    assert_eq!(failures(&gw), 5, "the plugin was called after its quarantine began");
    let up = upstream(&gw);
    let left = up["plugin"]["quarantined_for_ms"].as_u64().expect("quarantined: a time left");
    assert!(left > 0 && left <= 1500, "{up}");
    assert_eq!(gw.logs_matching(|l| message(l).starts_with("plugin quarantined")).len(), 1, "logged once");
    let (_, metrics) = get(gw.admin_addr(), "/metrics");
    assert!(metrics.contains("gateway_plugin_quarantined{upstream=\"web\",plugin=\"trap\"} 1"), "{metrics}");

    // After the backoff one request tries the plugin again: it traps, and the
    // quarantine is extended to twice the backoff.
    std::thread::sleep(Duration::from_millis(1700));
    serve(&gw, &[&b1, &b2], 10, Duration::from_secs(2));
    let line = gw.wait_for_log(Duration::from_secs(5), |l| message(l).starts_with("plugin still failing"));
    assert_eq!(line["backoff"].as_str(), Some("3s"), "{line}");
    let after_try = failures(&gw);
    assert!((6..=7).contains(&after_try), "one try per worker at most: {after_try} failures");
    serve(&gw, &[&b1, &b2], 20, Duration::from_secs(2));
    assert_eq!(failures(&gw), after_try, "called again during the extended quarantine");
    report::hostile_plugin(
        "trap in `pick`, over and over (quarantine after 5, backoff 1.5 s)",
        "70 of 70".into(),
        (rss_before, gw.rss_kib()),
        &format!(
            "`plugin quarantined` once; `/api/upstreams` plugin.quarantined_for_ms; `gateway_plugin_quarantined` 1; after the backoff one try, then `plugin still failing` (backoff {}); {after_try} calls in all",
            line["backoff"].as_str().unwrap_or("?")
        ),
    );
}

#[test]
fn a_hot_swap_to_a_plugin_that_hangs_in_pool_changed_is_refused_naming_the_call() {
    let dir = TempDir::new();
    dir.copy(&test_plugin("first"), "probe.wasm");
    let (b1, b2) = (Backend::new("backend-1"), Backend::new("backend-2"));
    let config = dir.write("gw.yaml", yaml(&[&b1, &b2], "probe", "{ in: pool-changed }", "setup_deadline: 300ms"));
    let gw = Gateway::with_config(&config, dir.path());
    assert_eq!(serve(&gw, &[&b1], 5, Duration::from_secs(1)), vec!["backend-1"; 5]);

    // The new file's `configure` accepts the params; its `pool-changed` never returns.
    let mark = gw.log_mark();
    let spin = std::fs::read(test_plugin("spin")).unwrap();
    std::fs::write(dir.path().join("probe.wasm.tmp"), &spin).unwrap();
    std::fs::rename(dir.path().join("probe.wasm.tmp"), dir.path().join("probe.wasm")).unwrap();
    let rss_before = gw.rss_kib();
    let refused = gw.wait_for_log_after(mark, Duration::from_secs(10), |l| {
        message(l).contains("refused") || message(l).contains("swapped") || message(l).contains("hot-swapped")
    });
    let text = refused.to_string();
    assert!(text.contains("pool-changed"), "the refusal does not name the call: {text}");
    // The last good version keeps serving, every request on time.
    assert_eq!(serve(&gw, &[&b1], 20, Duration::from_millis(500)), vec!["backend-1"; 20]);
    report::hostile_plugin(
        "infinite loop in `pool-changed`, by hot swap",
        "25 of 25, by the old plugin".into(),
        (rss_before, gw.rss_kib()),
        message(&refused),
    );
}

#[test]
fn a_hot_swap_to_a_plugin_that_hangs_in_configure_is_refused_naming_the_call() {
    let dir = TempDir::new();
    dir.copy(&test_plugin("first"), "probe.wasm");
    let (b1, b2) = (Backend::new("backend-1"), Backend::new("backend-2"));
    let config = dir.write("gw.yaml", yaml(&[&b1, &b2], "probe", "{ in: configure }", "setup_deadline: 300ms"));
    let gw = Gateway::with_config(&config, dir.path());
    assert_eq!(serve(&gw, &[&b1], 5, Duration::from_secs(1)), vec!["backend-1"; 5]);
    let rss_before = gw.rss_kib();
    let traffic = Traffic::start(gw.addr);

    // The new file's `configure` never returns: no instance of it can ever be built.
    let mark = gw.log_mark();
    let swapped_at = Instant::now();
    let spin = std::fs::read(test_plugin("spin")).unwrap();
    std::fs::write(dir.path().join("probe.wasm.tmp"), &spin).unwrap();
    std::fs::rename(dir.path().join("probe.wasm.tmp"), dir.path().join("probe.wasm")).unwrap();
    let refused = gw.wait_for_log_after(mark, Duration::from_secs(10), |l| {
        message(l).starts_with("plugin refused") || message(l).starts_with("plugin swapped")
    });
    let took = swapped_at.elapsed();
    // The last good version keeps serving, every request on time, none failed.
    assert_eq!(serve(&gw, &[&b1], 20, Duration::from_millis(500)), vec!["backend-1"; 20]);
    let others: Vec<String> = traffic.after(swapped_at).into_iter().filter(|b| b != "backend-1").collect();
    let (sent, failures) = traffic.finish();
    let text = message(&refused);
    let answered = sent as usize - failures.len() - others.len();
    eprintln!(
        "configure hang by hot swap: refused in {:.2} s; {answered} of {sent} requests meanwhile answered by the old plugin; RSS {rss_before} -> {} KiB: {text}",
        took.as_secs_f64(),
        gw.rss_kib()
    );
    report::hostile_plugin(
        "infinite loop in `configure`, by hot swap",
        format!("{answered} of {sent}, by the old plugin"),
        (rss_before, gw.rss_kib()),
        text,
    );
    assert!(text.starts_with("plugin refused, the previous version keeps serving"), "{refused}");
    assert!(text.contains("failed during configure"), "the refusal does not name the call: {refused}");
    assert!(text.contains("ran past its deadline"), "the refusal does not say it ran over: {refused}");
    assert!(failures.is_empty(), "requests failed during the swap: {failures:?}");
    assert!(others.is_empty(), "requests served by another plugin than the old one: {others:?}");
    assert!(sent > 20, "only {sent} requests during the swap");
}

#[test]
fn a_start_with_a_plugin_that_hangs_in_configure_stops_naming_the_plugin_the_call_and_the_deadline() {
    let dir = TempDir::new();
    dir.copy(&test_plugin("spin"), "spin.wasm");
    let b1 = Backend::new("backend-1");
    let config = dir.write("gw.yaml", yaml(&[&b1], "spin", "{ in: configure }", "setup_deadline: 300ms"));
    let out = run_cli(
        &["--config", config.to_str().unwrap(), "--plugins", dir.path().to_str().unwrap()],
        Duration::from_secs(30),
    );
    let err = out.stderr.trim();
    eprintln!(
        "start with a plugin that hangs in configure: exit {:?} after {:.2} s: {err}",
        out.code,
        out.elapsed.as_secs_f64()
    );
    assert!(out.code.is_some_and(|c| c != 0), "the gateway started with a plugin that hangs: {out:?}");
    assert!(err.contains("spin.wasm"), "the plugin is not named: {err}");
    assert!(err.contains("configure") && err.contains("ran past its deadline"), "{err}");
    assert!(out.elapsed < Duration::from_secs(10), "took {:?} to give up", out.elapsed);
}

#[test]
fn a_plugin_that_hangs_in_pool_changed_after_a_pool_change_stalls_no_request() {
    let dir = TempDir::new();
    dir.copy(&test_plugin("spin"), "spin.wasm");
    let (b1, b2, b3) = (Backend::new("backend-1"), Backend::new("backend-2"), Backend::new("backend-3"));
    let config = dir.write(
        "gw.yaml",
        yaml(
            &[&b1, &b2, &b3],
            "spin",
            "{ in: pool-changed-when-degraded }",
            "setup_deadline: 300ms\n  quarantine: { after: 3, backoff: 1s, max_backoff: 1s }",
        ),
    );
    let gw = Gateway::with_config(&config, dir.path());
    let rss_before = gw.rss_kib();
    // Each worker's instance picks in turn: 12 requests over two workers reach all three.
    let seen = serve(&gw, &[&b1, &b2, &b3], 12, Duration::from_secs(1));
    assert!([&b1, &b2, &b3].iter().all(|b| seen.iter().any(|s| s == b.name())), "{seen:?}");

    // backend-3 goes down: from now on every `pool-changed` hangs until its deadline.
    let mark = gw.log_mark();
    b3.stop();
    wait_health(&gw, mark, b3.addr(), "backend is down");
    let started = Instant::now();
    let mut slowest = Duration::ZERO;
    let mut n = 0;
    while started.elapsed() < Duration::from_secs(2) {
        let t = Instant::now();
        let (status, body) = get(gw.addr, "/during");
        slowest = slowest.max(t.elapsed());
        assert_eq!(status, 200, "{body}");
        assert_ne!(body, "backend-3", "a request went to the backend that is down");
        n += 1;
    }
    report::hostile_plugin(
        "infinite loop in `pool-changed` once the pool changes",
        format!("{n} of {n} in 2 s, slowest {:.0} ms", slowest.as_secs_f64() * 1e3),
        (rss_before, gw.rss_kib()),
        "`building a plugin instance failed` (call `pool-changed`), then `plugin quarantined`; requests keep the previous pool view or the fallback",
    );
    // Before: each request waited for the 300 ms setup deadline (2 s by default).
    assert!(slowest < Duration::from_millis(250), "a request waited {slowest:?} ({n} requests)");
    assert!(n > 40, "only {n} requests in 2 s");
    let failed = gw.wait_for_log_after(mark, Duration::from_secs(5), |l| {
        message(l).starts_with("building a plugin instance failed")
    });
    assert_eq!(failed["call"].as_str(), Some("pool-changed"), "{failed}");
    gw.wait_for_log_after(mark, Duration::from_secs(10), |l| message(l).starts_with("plugin quarantined"));

    // backend-3 comes back: `pool-changed` returns again, the quarantine ends at the
    // next try and the plugin serves all three.
    let mark = gw.log_mark();
    b3.start();
    wait_health(&gw, mark, b3.addr(), "backend is up");
    let deadline = Instant::now() + Duration::from_secs(10);
    while gw.logs_matching(|l| message(l).starts_with("plugin recovered")).is_empty() {
        assert!(Instant::now() < deadline, "the plugin did not recover after the pool healed");
        serve(&gw, &[&b1, &b2, &b3], 5, Duration::from_secs(1));
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(upstream(&gw)["plugin"]["quarantined_for_ms"].is_null());
}

#[test]
fn a_plugin_that_eats_memory_is_stopped_at_its_limit_and_the_log_says_so() {
    let dir = TempDir::new();
    dir.copy(&test_plugin("spin"), "hog.wasm");
    let (b1, b2) = (Backend::new("backend-1"), Backend::new("backend-2"));
    let config = dir.write("gw.yaml", yaml(&[&b1, &b2], "hog", "{ in: pick-memory }", "memory_limit_mib: 16"));
    let mut gw = Gateway::with_config(&config, dir.path());
    let rss_before = gw.rss_kib();
    // Every request is still answered, by the fallback.
    serve(&gw, &[&b1, &b2], 10, Duration::from_secs(2));
    let line = gw.wait_for_log(Duration::from_secs(5), |l| message(l).starts_with("plugin call failed"));
    let text = message(&line);
    report::hostile_plugin(
        "memory bomb in `pick` (memory_limit_mib 16)",
        "10 of 10".into(),
        (rss_before, gw.rss_kib()),
        text,
    );
    assert!(text.contains("pick: memory limit of 16 MiB reached"), "{line}");
    assert!(gw.is_running());
}
