//! A plugin that hands the gateway more than it takes (10,000 response headers, a 100 MB
//! reject body) or fills its host-held state (a key-value or counter bomb) fails that
//! call with a message saying which limit, the request is still answered (by the
//! fallback), and the gateway's memory does not grow with what the plugin tried. A plugin
//! that floods the log gets 10 lines a second written, and the rest counted.
//!
//! Each test prints its figures (requests answered, RSS before/after) for
//! docs/reliability.md.

mod util;

use serde_json::Value;
use std::time::{Duration, Instant};
use util::{Backend, Gateway, TempDir, get, message, report, request, test_plugin};

fn yaml(backends: &[&Backend], params: &str, plugins_extra: &str) -> String {
    let list: String = backends.iter().map(|b| format!("      - {{ address: {} }}\n", b.addr())).collect();
    format!(
        "listeners:\n  - address: 127.0.0.1:0\nthreads: 2\naccess_log: false\n\
         plugins:\n  quarantine: {{ after: 0 }}\n  {plugins_extra}\n\
         upstreams:\n  web:\n    strategy: {{ plugin: hostile, params: {params} }}\n    backends:\n{list}"
    )
}

/// A gateway over two backends whose strategy is the `hostile` test plugin with `params`
/// (quarantine off, so that every request calls the plugin).
fn start(dir: &TempDir, backends: &[&Backend], params: &str, plugins_extra: &str) -> Gateway {
    dir.copy(&test_plugin("hostile"), "hostile.wasm");
    let config = dir.write("gw.yaml", yaml(backends, params, plugins_extra));
    Gateway::with_config(&config, dir.path())
}

/// `n` sequential GETs: how many got a 200 from one of `backends` (each within `limit`).
fn answered(gw: &Gateway, backends: &[&Backend], n: usize, limit: Duration) -> usize {
    (0..n)
        .filter(|i| {
            let started = Instant::now();
            let reply = request(gw.addr, "GET", &format!("/r/{i}"), None).expect("an answer");
            assert!(started.elapsed() < limit, "request {i} took {:?}", started.elapsed());
            assert!(
                reply.headers.keys().all(|k| !k.as_str().starts_with("x-bomb")),
                "a header of the bomb reached the client"
            );
            reply.status == 200 && backends.iter().any(|b| b.name() == reply.body)
        })
        .count()
}

fn failure_line(gw: &Gateway) -> Value {
    gw.wait_for_log(Duration::from_secs(10), |l| message(l).starts_with("plugin call failed"))
}

fn failures(gw: &Gateway, kind: &str) -> u64 {
    let (status, body) = get(gw.admin_addr(), "/api/stats");
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).expect("JSON");
    v["upstreams"][0]["strategy"]["failures"][kind].as_u64().unwrap_or_else(|| panic!("no {kind} count in {v}"))
}

#[test]
fn ten_thousand_response_headers_are_a_bad_answer_and_the_request_is_still_served() {
    let dir = TempDir::new();
    let (b1, b2) = (Backend::new("backend-1"), Backend::new("backend-2"));
    let mut gw = start(&dir, &[&b1, &b2], "{ in: headers }", "");
    let before = gw.rss_kib();
    let n = 40;
    let ok = answered(&gw, &[&b1, &b2], n, Duration::from_secs(2));
    let after = gw.rss_kib();
    println!("10,000 response headers: {ok}/{n} requests answered; RSS {before} -> {after} KiB");
    assert_eq!(ok, n);
    let line = failure_line(&gw);
    report::hostile_plugin("10,000 response headers", format!("{ok} of {n}"), (before, after), message(&line));
    assert_eq!(line["failure"], "BadAnswer", "{line}");
    assert!(message(&line).contains("request.add-response-header: more than 64 response headers"), "{line}");
    assert!(failures(&gw, "bad_answer") >= n as u64 / 2, "not every call counted as a bad answer");
    assert!(gw.is_running());
}

#[test]
fn a_100_mb_reject_body_is_refused_where_it_lies_without_being_copied() {
    let dir = TempDir::new();
    let (b1, b2) = (Backend::new("backend-1"), Backend::new("backend-2"));
    // Building 100 MB takes the guest longer than the default 20 ms `pick` deadline, which
    // would stop it first: give it the time, so the body reaches the gateway's boundary.
    let mut gw = start(&dir, &[&b1, &b2], "{ in: reject-body }", "deadline: 5s");
    let before = gw.rss_kib();
    let n = 10;
    let ok = answered(&gw, &[&b1, &b2], n, Duration::from_secs(10));
    let line = failure_line(&gw);
    assert_eq!(line["failure"], "BadAnswer", "{line}");
    assert!(
        message(&line)
            .contains("request.set-reject-body: a reject body of 104857600 bytes, over the limit of 65536 bytes"),
        "{line}"
    );
    // The guest's own memory held the body (within memory_limit_mib); it is returned when
    // the failed instance is dropped. Nothing of it stays in the gateway.
    std::thread::sleep(Duration::from_millis(500));
    let (after, peak) = (gw.rss_kib(), gw.peak_rss_kib());
    println!("100 MB reject body: {ok}/{n} requests answered; RSS {before} -> {after} KiB (peak {peak} KiB)");
    report::hostile_plugin(
        "100 MB reject body",
        format!("{ok} of {n}"),
        (before, after),
        &format!("{} (peak RSS {peak} KiB: the plugin's own memory, freed with the instance)", message(&line)),
    );
    assert_eq!(ok, n);
    assert!(after < before + 40 * 1024, "RSS grew from {before} to {after} KiB");
    assert!(gw.is_running());
}

#[test]
fn a_key_value_bomb_hits_the_byte_cap_and_the_plugin_is_told() {
    let dir = TempDir::new();
    let (b1, b2) = (Backend::new("backend-1"), Backend::new("backend-2"));
    // 1,000 keys of 1 KiB a request: the 4 MiB cap is full after four requests.
    let gw = start(&dir, &[&b1, &b2], "{ in: kv-bomb }", "kv_limit_mib: 4");
    let before = gw.rss_kib();
    // The plugin tries to store 1 MiB a request: 100 MiB in all.
    let n = 100;
    let ok = answered(&gw, &[&b1, &b2], n, Duration::from_secs(2));
    let after = gw.rss_kib();
    println!("key-value bomb (4 MiB cap, 100 MiB attempted): {ok}/{n} requests answered; RSS {before} -> {after} KiB");
    assert_eq!(ok, n);
    let line = failure_line(&gw);
    report::hostile_plugin(
        "key-value bomb (100 MiB tried, 4 MiB cap)",
        format!("{ok} of {n}"),
        (before, after),
        message(&line),
    );
    assert_eq!(line["failure"], "Trap", "{line}");
    let text = message(&line);
    assert!(text.contains("kv-set: the key-value store is full:"), "{line}");
    assert!(text.contains("of 4194304 bytes (plugins.kv_limit_mib)"), "{line}");
    // The cap, plus what any plugin's instances and the fallback's traffic take (about
    // 10 MiB in the other tests here).
    assert!(after < before + 30 * 1024, "RSS grew from {before} to {after} KiB");
}

#[test]
fn a_counter_bomb_hits_the_byte_cap_and_the_plugin_is_told() {
    let dir = TempDir::new();
    let (b1, b2) = (Backend::new("backend-1"), Backend::new("backend-2"));
    let mut gw = start(&dir, &[&b1, &b2], "{ in: counter-bomb }", "counters_limit_kib: 256");
    let before = gw.rss_kib();
    let n = 20;
    let ok = answered(&gw, &[&b1, &b2], n, Duration::from_secs(2));
    println!("counter bomb (256 KiB cap): {ok}/{n} requests answered");
    assert_eq!(ok, n);
    let line = failure_line(&gw);
    report::hostile_plugin(
        "counter bomb (256 KiB cap)",
        format!("{ok} of {n}"),
        (before, gw.rss_kib()),
        message(&line),
    );
    assert!(message(&line).contains("counter-add: the counters are full:"), "{line}");
    assert!(message(&line).contains("of 262144 bytes (plugins.counters_limit_kib)"), "{line}");
    assert!(gw.is_running());
}

#[test]
fn a_log_flood_is_cut_to_ten_lines_a_second_and_the_dropped_ones_are_counted() {
    let dir = TempDir::new();
    let (b1, b2) = (Backend::new("backend-1"), Backend::new("backend-2"));
    let mut gw = start(&dir, &[&b1, &b2], "{ in: log-flood }", "");
    let before = gw.rss_kib();
    // 1,000 lines a request, on both worker threads.
    let started = Instant::now();
    let n = 20;
    assert_eq!(answered(&gw, &[&b1, &b2], n, Duration::from_secs(2)), n);
    // A second later, the first line written says how many were dropped.
    std::thread::sleep(Duration::from_millis(1_100));
    let mark = gw.log_mark();
    assert_eq!(answered(&gw, &[&b1, &b2], 1, Duration::from_secs(2)), 1);
    let last = gw.wait_for_log_after(mark, Duration::from_secs(5), |l| l.get("dropped").is_some());
    assert!(message(&last).contains("log lines of this plugin were dropped: at most 10 a second"), "{last}");
    assert!(last["level"] == "WARN" && last["plugin"] == "hostile" && last["upstream"] == "web", "{last}");
    let seconds = started.elapsed().as_secs() + 1;
    let written = gw.logs_matching(|l| l["plugin"] == "hostile" && message(l).starts_with("flood ")).len() as u64;
    let dropped: u64 =
        gw.logs_matching(|l| l.get("dropped").is_some()).iter().filter_map(|l| l["dropped"].as_u64()).sum();
    println!(
        "log flood: {} lines asked for in {seconds} s, {written} written, {dropped} dropped and counted",
        (n + 1) * 1_000
    );
    assert!(written <= 10 * seconds, "{written} lines in {seconds} s");
    assert!(dropped + written >= n as u64 * 1_000, "{dropped} counted as dropped, {written} written");
    assert!(gw.logs_matching(|l| message(l).starts_with("plugin call failed")).is_empty(), "logging is not a failure");
    report::hostile_plugin(
        "1,000 log lines in every `pick`",
        format!("{} of {}, by the plugin", n + 1, n + 1),
        (before, gw.rss_kib()),
        &format!("{written} of its lines in {seconds} s, then `{}`", message(&last)),
    );
    assert!(gw.is_running());
}
