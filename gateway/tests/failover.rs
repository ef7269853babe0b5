//! Failover (the Ballerina load-balancing scenario): exact round robin over three
//! backends, connect failures retried on another backend, health checks taking a
//! stopped backend out and bringing it back; 5xx retries only for idempotent requests.

mod util;

use std::time::{Duration, Instant};
use util::{Backend, Gateway, TempDir, get, message, poll_until, request};

/// Health checks: TCP connect every 200ms, 2 in a row to flip either way.
const INTERVAL: Duration = Duration::from_millis(200);
const RISE: u32 = 2;

/// The config file: one upstream `web` over `backends` (ids = their names), with fast
/// health checks; `extra` is inserted in the upstream (indented by 4 spaces).
fn config(backends: &[&Backend], extra: &str) -> String {
    let list: String =
        backends.iter().map(|b| format!("      - address: {}\n        id: {}\n", b.addr(), b.name())).collect();
    format!(
        "\
listeners:
  - address: 127.0.0.1:0
threads: 2
upstreams:
  web:
    health_check:
      interval: {interval}ms
      timeout: 500ms
      rise: {RISE}
      fall: 2
{extra}    backends:
{list}",
        interval = INTERVAL.as_millis()
    )
}

fn start(dir: &TempDir, yaml: &str) -> Gateway {
    let file = dir.write("gw.yaml", yaml);
    let plugins = dir.path().join("plugins");
    Gateway::with_config(&file, &plugins)
}

/// `n` sequential GETs on fresh connections; panics on any non-200.
fn names(gw: &Gateway, n: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            let (status, body) = get(gw.addr, "/");
            assert_eq!(status, 200, "request {i} of {n} failed: {body}");
            body
        })
        .collect()
}

fn is_event_for(line: &serde_json::Value, prefix: &str, backend: &Backend) -> bool {
    message(line).starts_with(prefix) && line["address"] == backend.addr().to_string()
}

#[test]
fn round_robin_fails_over_and_recovers() {
    let dir = TempDir::new();
    let backends = [Backend::new("backend-1"), Backend::new("backend-2"), Backend::new("backend-3")];
    let [b1, b2, b3] = &backends;
    let gw = start(&dir, &config(&[b1, b2, b3], ""));

    // Exact round robin from backend 1, across the two worker threads.
    let seen = names(&gw, 9);
    let expected: Vec<&str> = ["backend-1", "backend-2", "backend-3"].repeat(3);
    assert_eq!(seen, expected, "round robin is not exact");

    // Backend 3 crashes: not one request fails (connect failures go to another backend).
    b3.stop();
    let seen = names(&gw, 30);
    assert!(seen.iter().all(|n| n == "backend-1" || n == "backend-2"), "served by a stopped backend: {seen:?}");

    // Once the health checker marked it down, 1 and 2 strictly alternate.
    gw.wait_for_log(Duration::from_secs(5), |l| is_event_for(l, "backend is down", b3));
    let seen = names(&gw, 10);
    assert!(seen.iter().all(|n| n == "backend-1" || n == "backend-2"), "{seen:?}");
    assert!(seen.windows(2).all(|w| w[0] != w[1]), "1 and 2 do not alternate: {seen:?}");
    // The admin API shows it down.
    let (status, body) = get(gw.admin_addr(), "/api/upstreams");
    assert_eq!(status, 200, "{body}");
    let api: serde_json::Value = serde_json::from_str(&body).expect("JSON from the admin API");
    let b3_api = api["upstreams"][0]["backends"].as_array().and_then(|l| l.iter().find(|b| b["id"] == "backend-3"));
    assert_eq!(b3_api.map(|b| (b["up"].clone(), b["healthy"].clone())), Some((false.into(), false.into())), "{body}");

    // Everything down: 503 saying why.
    b1.stop();
    b2.stop();
    for b in [b1, b2] {
        gw.wait_for_log(Duration::from_secs(5), |l| is_event_for(l, "backend is down", b));
    }
    let (status, body) = get(gw.addr, "/");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("no healthy backend"), "{body}");

    // Backend 3 comes back: it serves again within rise × interval (plus slack).
    let mark = gw.log_mark();
    b3.start();
    let restarted = Instant::now();
    let served = poll_until(Duration::from_secs(10), Duration::from_millis(20), || {
        let (status, body) = get(gw.addr, "/");
        (status == 200 && body == "backend-3").then(|| restarted.elapsed())
    });
    let bound = INTERVAL * RISE + Duration::from_millis(1_600);
    let health_log = || {
        let lines = gw.logs_matching(|l| l.get("backend").is_some() && l.get("request_id").is_none());
        lines.iter().map(|l| l.to_string()).collect::<Vec<_>>().join("\n")
    };
    match served {
        Some(after) => {
            assert!(
                after <= bound,
                "backend 3 served again only after {after:?} (bound {bound:?}); health events:\n{}",
                health_log()
            )
        }
        None => panic!("backend 3 did not serve again within 10s; health events:\n{}", health_log()),
    }
    gw.wait_for_log_after(mark, Duration::from_secs(5), |l| is_event_for(l, "backend is up", b3));
}

#[test]
fn get_is_retried_after_a_500_but_post_is_not() {
    let dir = TempDir::new();
    let bad = Backend::failing("backend-bad", 500);
    let good = Backend::new("backend-good");
    // Passive ejection off: this test is about retries only.
    let gw = start(&dir, &config(&[&bad, &good], "    passive:\n      consecutive_failures: 0\n"));

    for i in 0..4 {
        let (status, body) = get(gw.addr, &format!("/get/{i}"));
        assert_eq!((status, body.as_str()), (200, "backend-good"), "GET {i} was not retried on the good backend");
    }
    assert!(bad.hits_with_method("GET") >= 1, "round robin never sent a GET to the failing backend");

    let mut statuses = Vec::new();
    for i in 0..4 {
        let reply = request(gw.addr, "POST", &format!("/post/{i}"), Some("order=42")).unwrap();
        match reply.status {
            500 => assert_eq!(reply.body, "backend-bad failed"),
            200 => assert_eq!(reply.body, "backend-good"),
            other => panic!("POST {i}: unexpected {other}: {}", reply.body),
        }
        statuses.push(reply.status);
    }
    let (to_bad, to_good) = (bad.hits_with_method("POST"), good.hits_with_method("POST"));
    assert!(to_bad >= 1, "round robin never sent a POST to the failing backend");
    // Each POST reached exactly one backend, and every 500 reached the client.
    assert_eq!(
        to_bad + to_good,
        4,
        "a POST was sent twice: {to_bad} to the failing backend, {to_good} to the good one"
    );
    assert_eq!(statuses.iter().filter(|&&s| s == 500).count(), to_bad, "statuses {statuses:?}");
}

#[test]
fn a_backend_that_does_not_answer_in_time_is_retried_for_get_and_alone_gets_504() {
    let dir = TempDir::new();
    // Answers after 3 s; the gateway waits 300 ms for response headers. `/healthz` is fast,
    // so health checks keep it in the pool: only the request timeout is at work.
    let stuck = Backend::slow("backend-stuck", Duration::from_secs(3));
    let good = Backend::new("backend-good");
    let extra = "    passive:\n      consecutive_failures: 0\n    timeouts:\n      response_header: 300ms\n";
    let gw = start(&dir, &config(&[&stuck, &good], extra));

    for i in 0..4 {
        let started = Instant::now();
        let (status, body) = get(gw.addr, &format!("/get/{i}"));
        assert_eq!((status, body.as_str()), (200, "backend-good"), "GET {i} was not retried on the good backend");
        assert!(started.elapsed() < Duration::from_secs(2), "GET {i} waited for the stuck backend");
    }
    assert!(!stuck.hits().is_empty(), "round robin never sent a GET to the stuck backend");

    // With the stuck backend alone, the client gets a 504 that says what kind of failure it
    // was, without the backend's address (the access log has that).
    let alone = TempDir::new();
    let gw = start(&alone, &config(&[&stuck], extra));
    let started = Instant::now();
    let (status, body) = get(gw.addr, "/alone");
    let waited = started.elapsed();
    assert_eq!(status, 504, "{body}");
    assert!(body.starts_with("gateway timeout"), "{body}");
    assert!(!body.contains(&stuck.addr().port().to_string()), "{body}");
    assert!(waited >= Duration::from_millis(300) && waited < Duration::from_secs(2), "answered after {waited:?}");
}
