//! HTTP/2 "rapid reset" (CVE-2023-44487): a client that opens and at once resets stream
//! after stream on one connection must not exhaust the gateway. It is sent away with
//! GOAWAY (hyper's reset limits), and meanwhile other clients keep their normal latency.
//! The flood is a real HTTP/2 client (Python `h2`, from the test venv).

mod util;

use serde_json::Value;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use util::{Backend, Gateway, TempDir, get, report};

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/h2/rapid_reset.py");

#[test]
fn a_rapid_reset_flood_is_sent_away_and_other_clients_keep_their_latency() {
    let Some(py) = util::venv_python("h2", "the h2 package") else { return };
    let backend = Backend::new("backend-1");
    let dir = TempDir::new();
    let config = dir.write(
        "gw.yaml",
        format!(
            "listeners:\n  - address: 127.0.0.1:0\nthreads: 2\naccess_log: false\n\
             upstreams:\n  web:\n    backends: [ {{ address: {} }} ]\n",
            backend.addr()
        ),
    );
    let mut gw = Gateway::with_config(&config, &dir.path().join("plugins"));
    let rss_before = gw.rss_kib();

    // Three flooding clients for 3 s, each reconnecting whenever it is sent away
    // (a connection gives up after 100,000 streams).
    let floods: Vec<_> = (0..3)
        .map(|_| {
            Command::new(&py)
                .arg(SCRIPT)
                .arg(gw.addr.to_string())
                .args(["100000", "3"])
                .stdout(Stdio::piped())
                .spawn()
                .expect("start rapid_reset.py")
        })
        .collect();
    // Meanwhile: a normal client, for as long as the flood lasts.
    let mut slowest = Duration::ZERO;
    for i in 0..100 {
        let t = Instant::now();
        let (status, body) = get(gw.addr, &format!("/normal/{i}"));
        slowest = slowest.max(t.elapsed());
        assert_eq!((status, body.as_str()), (200, "backend-1"), "request {i} during the flood");
        std::thread::sleep(Duration::from_millis(20));
    }
    let reports: Vec<Value> = floods
        .into_iter()
        .map(|f| {
            let out = f.wait_with_output().expect("rapid_reset.py ends");
            serde_json::from_slice(&out.stdout).expect("a JSON report")
        })
        .collect();
    eprintln!("floods: {reports:?}; a normal request's slowest answer: {slowest:?}");
    for r in &reports {
        // Every flooding connection is ended (GOAWAY ENHANCE_YOUR_CALM) long before its
        // 100,000 streams.
        let connections = r["connections"].as_u64().unwrap_or(0);
        assert!(connections >= 1, "{r}");
        assert_eq!(r["not_sent_away"], 0, "a flooding connection was never sent away: {r}");
        // Sent away with GOAWAY ENHANCE_YOUR_CALM; a connection the kernel reset before the
        // client read its GOAWAY (the client was still writing) counts as closed, not as
        // a GOAWAY: most must carry it.
        let calm = r["goaways"]["ENHANCE_YOUR_CALM"].as_u64().unwrap_or(0);
        assert!(calm * 10 >= connections * 9, "{r}");
    }
    let connections: u64 = reports.iter().filter_map(|r| r["connections"].as_u64()).sum();
    report::record(
        "http-abuse",
        serde_json::json!({
            "case": "HTTP/2 rapid reset: 3 clients, HEADERS + RST_STREAM for 3 s",
            "client_got": format!("each of {connections} connections sent away (GOAWAY ENHANCE_YOUR_CALM, or reset)"),
            "backend_got": "nothing",
            "rss_kib_before": rss_before,
            "rss_kib_after": gw.rss_kib(),
            "normal_client_ms": slowest.as_secs_f64() * 1e3,
        }),
    );
    assert!(slowest < Duration::from_millis(500), "a normal request waited {slowest:?} during the flood");
    assert!(gw.is_running(), "the gateway died");
    assert_eq!(get(gw.addr, "/after").0, 200);
    let grown = gw.rss_kib().saturating_sub(rss_before);
    assert!(grown < 64 * 1024, "the gateway grew by {grown} KiB");
}
