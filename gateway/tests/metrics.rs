//! `/metrics` on the admin listener, read as Prometheus would: request counters per
//! backend and status class, the gateway's own answers by reason (no route, malformed
//! requests), latency histograms, backend state, plugin decisions, response headers a
//! plugin may not set (dropped and counted); `--no-metrics`.

mod util;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::time::Duration;
use util::{Backend, Gateway, TempDir, get, poll_until, request_with_headers, test_plugin};

/// `name{labels} value` lines of an exposition, keyed by `name{labels}`.
fn samples(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (key, value) = l.rsplit_once(' ')?;
            Some((key.to_owned(), value.parse().ok()?))
        })
        .collect()
}

fn scrape(admin: std::net::SocketAddr) -> HashMap<String, f64> {
    let (status, text) = get(admin, "/metrics");
    assert_eq!(status, 200, "{text}");
    assert!(text.ends_with("# EOF\n"), "OpenMetrics text ends with # EOF");
    samples(&text)
}

fn value(m: &HashMap<String, f64>, key: &str) -> f64 {
    *m.get(key).unwrap_or_else(|| {
        let mut keys: Vec<_> = m.keys().filter(|k| k.starts_with(key.split('{').next().unwrap())).collect();
        keys.sort();
        panic!("no sample {key}; samples of that name: {keys:#?}")
    })
}

fn config(backends: &[&Backend], extra: &str) -> String {
    let list: String =
        backends.iter().map(|b| format!("      - address: {}\n        id: {}\n", b.addr(), b.name())).collect();
    format!(
        "listeners:\n  - address: 127.0.0.1:0\nthreads: 2\n{extra}routes:\n  - {{name: books, path_prefix: /book, upstream: web}}\nupstreams:\n  web:\n    health_check: {{interval: 200ms, timeout: 500ms, rise: 1, fall: 1}}\n    backends:\n{list}"
    )
}

/// Sends raw bytes and returns the status line the gateway answered with.
fn raw(addr: std::net::SocketAddr, bytes: &[u8]) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(bytes).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).lines().next().unwrap_or("").to_owned()
}

#[test]
fn requests_are_counted_per_backend_route_and_reason() {
    let backends = [Backend::new("a"), Backend::new("b"), Backend::new("c")];
    let refs: Vec<&Backend> = backends.iter().collect();
    let dir = TempDir::new();
    let file = dir.write("gw.yaml", config(&refs, ""));
    let gw = Gateway::start(&["--config", file.to_str().unwrap(), "--admin", "127.0.0.1:0"]);
    let admin = gw.admin_addr();

    for i in 0..300 {
        let (status, _) = get(gw.addr, &format!("/book/{i}"));
        assert_eq!(status, 200);
    }
    // No route: the gateway answers 404 itself.
    for _ in 0..4 {
        assert_eq!(get(gw.addr, "/elsewhere").0, 404);
    }
    // Malformed: hyper answers 400 before the proxy sees it; still counted.
    let line = raw(gw.addr, b"GET /book/x HTTP/1.1\r\nHost: a\r\nBad Header\r\n\r\n");
    assert!(line.starts_with("HTTP/1.1 400"), "{line}");

    let m = poll_until(Duration::from_secs(5), Duration::from_millis(50), || {
        let m = scrape(admin);
        (m.get("gateway_generated_responses_total{reason=\"bad_request\",code=\"4xx\"}") == Some(&1.0)).then_some(m)
    })
    .unwrap_or_else(|| panic!("the malformed request was not counted: {:?}", get(admin, "/metrics").1));
    let mut total = 0.0;
    for b in &backends {
        let n = value(&m, &format!("gateway_requests_total{{upstream=\"web\",backend=\"{}\",code=\"2xx\"}}", b.name()));
        assert_eq!(n, 100.0, "round robin: 100 requests each");
        total += n;
        let up = value(&m, &format!("gateway_backend_up{{upstream=\"web\",backend=\"{}\"}}", b.name()));
        assert_eq!(up, 1.0);
        let count =
            value(&m, &format!("gateway_upstream_duration_seconds_count{{upstream=\"web\",backend=\"{}\"}}", b.name()));
        assert_eq!(count, 100.0, "one latency sample per request");
        let bytes = value(&m, &format!("gateway_response_bytes_total{{upstream=\"web\",backend=\"{}\"}}", b.name()));
        assert!(bytes >= 100.0, "response bytes counted: {bytes}");
    }
    assert_eq!(total, 300.0);
    assert_eq!(value(&m, "gateway_route_requests_total{route=\"books\",upstream=\"web\",code=\"2xx\"}"), 300.0);
    assert_eq!(value(&m, "gateway_request_duration_seconds_count{route=\"books\"}"), 300.0);
    assert_eq!(value(&m, "gateway_request_duration_seconds_bucket{le=\"+Inf\",route=\"books\"}"), 300.0);
    assert_eq!(value(&m, "gateway_generated_responses_total{reason=\"no_route\",code=\"4xx\"}"), 4.0);
    assert_eq!(value(&m, "gateway_plugin_decisions_total{upstream=\"web\",plugin=\"round-robin\"}"), 300.0);
    assert_eq!(value(&m, "gateway_requests_in_flight"), 0.0);
    assert!(value(&m, "gateway_connections_total") >= 305.0);
    let (_, text) = get(admin, "/metrics");
    assert!(text.contains("gateway_build_info{version=\""), "{text}");
    assert!(text.contains(
        "gateway_plugin_info{upstream=\"web\",plugin=\"round-robin\",origin=\"built-in plugin `round-robin`\",sha256=\""
    ));

    // A killed backend shows as down.
    backends[2].stop();
    poll_until(Duration::from_secs(5), Duration::from_millis(50), || {
        (scrape(admin).get("gateway_backend_up{upstream=\"web\",backend=\"c\"}") == Some(&0.0)).then_some(())
    })
    .expect("backend c shows up == 0 after it was killed");
    let m = scrape(admin);
    assert_eq!(value(&m, "gateway_health_check_transitions_total{upstream=\"web\",backend=\"c\",to=\"down\"}"), 1.0);
    assert_eq!(value(&m, "gateway_backend_healthy{upstream=\"web\",backend=\"c\"}"), 0.0);
}

#[test]
fn no_metrics_records_nothing_on_the_request_path() {
    let b = Backend::new("a");
    let dir = TempDir::new();
    let file = dir.write("gw.yaml", config(&[&b], ""));
    let gw = Gateway::start(&["--config", file.to_str().unwrap(), "--admin", "127.0.0.1:0", "--no-metrics"]);
    for i in 0..20 {
        assert_eq!(get(gw.addr, &format!("/book/{i}")).0, 200);
    }
    let m = scrape(gw.admin_addr());
    assert_eq!(value(&m, "gateway_requests_total{upstream=\"web\",backend=\"a\",code=\"2xx\"}"), 0.0);
    assert_eq!(value(&m, "gateway_backend_up{upstream=\"web\",backend=\"a\"}"), 1.0, "state is still shown");
}

#[test]
fn a_retried_request_that_succeeds_is_the_backends_answer_and_counts_a_retry() {
    let (a, b) = (Backend::new("a"), Backend::new("b"));
    let dir = TempDir::new();
    // No active checks: the stopped backend stays in rotation, so requests hit it.
    let yaml = config(&[&a, &b], "").replace(
        "health_check: {interval: 200ms, timeout: 500ms, rise: 1, fall: 1}",
        "health_check: {enabled: false}\n    passive: {consecutive_failures: 0}",
    );
    let file = dir.write("gw.yaml", yaml);
    let gw = Gateway::start(&["--config", file.to_str().unwrap(), "--admin", "127.0.0.1:0"]);
    b.stop();
    for i in 0..10 {
        assert_eq!(get(gw.addr, &format!("/book/{i}")).1.trim(), "a", "retried on a");
    }
    let m = scrape(gw.admin_addr());
    assert!(value(&m, "gateway_retries_total{upstream=\"web\",reason=\"connect_failed\"}") >= 4.0);
    assert!(
        !m.keys().any(|k| k.starts_with("gateway_generated_responses_total")),
        "no response was the gateway's own: {:?}",
        m.keys().filter(|k| k.starts_with("gateway_generated")).collect::<Vec<_>>()
    );
    assert_eq!(value(&m, "gateway_route_requests_total{route=\"books\",upstream=\"web\",code=\"2xx\"}"), 10.0);
}

/// The `x-answer` spelling (tests/plugins/hostile, `answer` mode) of "backend 0, with
/// these response headers".
fn backend_0_with(headers: &[(&str, &str)]) -> String {
    let mut b = vec![0u8];
    b.extend(0u32.to_le_bytes());
    b.extend(0u32.to_le_bytes());
    b.extend((headers.len() as u16).to_le_bytes());
    for (n, v) in headers {
        b.extend((n.len() as u16).to_le_bytes());
        b.extend(n.as_bytes());
        b.extend((v.len() as u16).to_le_bytes());
        b.extend(v.as_bytes());
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[test]
fn framing_and_hop_by_hop_headers_a_plugin_sets_are_dropped_and_counted() {
    let a = Backend::new("a");
    let dir = TempDir::new();
    dir.copy(&test_plugin("hostile"), "hostile.wasm");
    let yaml = config(&[&a], "")
        .replace("    health_check:", "    strategy: {plugin: hostile, params: {in: answer}}\n    health_check:");
    let gw = Gateway::with_config(&dir.write("gw.yaml", yaml), dir.path());
    let key = "gateway_plugin_dropped_headers_total{upstream=\"web\",plugin=\"hostile\"}";
    assert_eq!(value(&scrape(gw.admin_addr()), key), 0.0);

    let answer = backend_0_with(&[
        ("content-length", "999"),
        ("transfer-encoding", "gzip"),
        ("connection", "close"),
        ("x-from-plugin", "kept"),
    ]);
    for i in 0..5 {
        let reply =
            request_with_headers(gw.addr, "GET", &format!("/book/{i}"), &[("x-answer", &answer)]).expect("an answer");
        assert_eq!((reply.status, reply.body.as_str()), (200, "a"), "request {i}");
        assert_eq!(reply.header("x-from-plugin"), "kept", "a plain header the plugin set is sent");
        assert_ne!(reply.header("content-length"), "999");
        assert_ne!(reply.header("transfer-encoding"), "gzip");
        assert_ne!(reply.header("connection"), "close");
    }
    // Three dropped per request.
    assert_eq!(value(&scrape(gw.admin_addr()), key), 15.0);
}
