//! Hot swap under load: a client sends requests without pause while the test replaces
//! the strategy file 100 times between two behaviourally different plugins (round robin
//! and "always the first backend"), then drops a corrupt file and a wrong-world file.
//! Zero requests may fail, each swap must show in the traffic within 1 s, and the
//! gateway's memory after swap 100 stays within 10% of after swap 10 (no leak per swap).
//! The reliability suite's table 3 (docs/reliability.md) records its figures.

mod util;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use util::{Backend, Gateway, KeepAlive, TempDir, message, report, run_cli, test_plugin};

/// What the client saw: (when, backend name or error).
type Seen = Arc<Mutex<VecDeque<(Instant, Result<String, String>)>>>;

/// Writes `src` to `dir/name` the way operators do: a temporary file, then a rename.
fn install(dir: &TempDir, src: &std::path::Path, name: &str) {
    let tmp = dir.path().join(format!(".{name}.part"));
    std::fs::copy(src, &tmp).unwrap();
    std::fs::rename(&tmp, dir.path().join(name)).unwrap();
}

/// Whether the last `n` answers after `since` look like the named behaviour.
fn behaves(seen: &Seen, since: Instant, round_robin: bool) -> bool {
    let seen = seen.lock().unwrap();
    let recent: Vec<&String> = seen.iter().filter(|(t, _)| *t > since).filter_map(|(_, r)| r.as_ref().ok()).collect();
    if recent.len() < 6 {
        return false;
    }
    let last = &recent[recent.len() - 6..];
    if round_robin { last.windows(2).all(|w| w[0] != w[1]) } else { last.iter().all(|b| *b == "backend-1") }
}

#[test]
fn a_hundred_swaps_under_load_drop_no_request_and_leak_nothing() {
    const SWAPS: usize = 100;
    let b1 = Backend::new("backend-1");
    let b2 = Backend::new("backend-2");
    let dir = TempDir::new();
    let rr = dir.path().join("rr.component");
    let out = run_cli(&["plugin", "export", "round-robin", "-o", rr.to_str().unwrap()], Duration::from_secs(30));
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let first = test_plugin("first");
    install(&dir, &rr, "live.wasm");

    let gw = Gateway::start(&[
        "--listen",
        "127.0.0.1:0",
        "--plugins",
        dir.path().to_str().unwrap(),
        "--strategy",
        "live",
        "--no-access-log",
        "-b",
        &b1.addr().to_string(),
        "-b",
        &b2.addr().to_string(),
    ]);

    let seen: Seen = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let client = {
        let (seen, stop, addr) = (seen.clone(), stop.clone(), gw.addr);
        std::thread::spawn(move || {
            let mut conn = KeepAlive::open(addr).expect("connect");
            let deadline = Instant::now() + Duration::from_secs(90);
            let mut sent = 0u64;
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline && sent < 2_000_000 {
                let result = match conn.get("/") {
                    Ok(r) if r.status == 200 => Ok(r.body.trim().to_owned()),
                    Ok(r) => Err(format!("status {}: {}", r.status, r.body)),
                    Err(e) => Err(e),
                };
                let failed = result.is_err();
                let mut s = seen.lock().unwrap();
                s.push_back((Instant::now(), result));
                if s.len() > 200_000 {
                    s.pop_front();
                }
                drop(s);
                sent += 1;
                if failed {
                    // Keep going on a fresh connection; the failure is already recorded.
                    conn = KeepAlive::open(addr).expect("reconnect");
                }
            }
            sent
        })
    };

    // Starts as round robin.
    let t0 = Instant::now();
    assert!(
        util::poll_until(Duration::from_secs(5), Duration::from_millis(10), || behaves(&seen, t0, true).then_some(()))
            .is_some(),
        "round robin never showed"
    );

    let mut latencies = Vec::new();
    let mut rss_after_10 = 0;
    for swap in 0..SWAPS {
        let to_rr = swap % 2 == 1;
        let started = Instant::now();
        install(&dir, if to_rr { &rr } else { &first }, "live.wasm");
        let shown = util::poll_until(Duration::from_secs(1), Duration::from_millis(2), || {
            behaves(&seen, started, to_rr).then_some(started.elapsed())
        });
        let Some(latency) = shown else {
            panic!("swap {swap} to {} did not show within 1 s", if to_rr { "round-robin" } else { "first" });
        };
        latencies.push(latency);
        if swap + 1 == 10 {
            rss_after_10 = gw.rss_kib();
        }
    }
    let rss_after_all = gw.rss_kib();

    // A corrupt file and a file of another world are refused; traffic is unaffected.
    let mark = gw.log_mark();
    std::fs::write(dir.path().join("live.wasm"), b"\0asm\x0d\0\x01\0garbage").unwrap();
    let refused = gw.wait_for_log_after(mark, Duration::from_secs(5), |l| message(l).contains("plugin refused"));
    assert!(message(&refused).contains("live.wasm"), "{refused}");
    let mark = gw.log_mark();
    install(&dir, &test_plugin("wrong-world"), "live.wasm");
    let refused = gw.wait_for_log_after(mark, Duration::from_secs(5), |l| message(l).contains("plugin refused"));
    assert!(message(&refused).contains("gateway:selector/selector@0.3.0"), "{refused}");
    let after = Instant::now();
    std::thread::sleep(Duration::from_millis(300));
    assert!(behaves(&seen, after, true), "the last good version (round robin) keeps serving");

    // A file no upstream uses is checked and reported as unused, not as "swapped".
    let mark = gw.log_mark();
    install(&dir, &first, "spare.wasm");
    let unused = gw.wait_for_log_after(mark, Duration::from_secs(5), |l| l["plugin"] == "spare");
    assert!(message(&unused).contains("no upstream uses it"), "{unused}");
    assert!(message(&unused).contains("strategy: {plugin: spare}"), "says how to use it: {unused}");
    let swapped = gw.logs_matching(|l| message(l).starts_with("plugin swapped"));
    assert!(swapped.iter().all(|l| l["plugin"] == "live" && l["upstreams"] == "[\"default\"]"), "{swapped:?}");

    stop.store(true, Ordering::Relaxed);
    let sent = client.join().unwrap();
    let failures: Vec<_> = seen.lock().unwrap().iter().filter_map(|(_, r)| r.clone().err()).collect();
    assert!(
        failures.is_empty(),
        "{} of {sent} requests failed, e.g. {:?}",
        failures.len(),
        &failures[..failures.len().min(3)]
    );
    latencies.sort();
    let median = latencies[latencies.len() / 2];
    let p99 = latencies[(latencies.len() * 99).div_ceil(100) - 1];
    report::record(
        "hot-swaps",
        serde_json::json!({
            "swaps": SWAPS,
            "requests": sent,
            "failed": failures.len(),
            "swap_to_new_behaviour_p50_ms": median.as_secs_f64() * 1e3,
            "swap_to_new_behaviour_p99_ms": p99.as_secs_f64() * 1e3,
            "rss_kib_after_swap_10": rss_after_10,
            "rss_kib_after_swap_100": rss_after_all,
        }),
    );
    assert!(
        rss_after_all * 10 <= rss_after_10 * 11,
        "RSS grew from {rss_after_10} KiB after swap 10 to {rss_after_all} KiB after swap {SWAPS}: a leak per swap"
    );
}
