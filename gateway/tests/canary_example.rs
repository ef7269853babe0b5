//! The worked example of docs/strategies.md, run as a user would: examples/canary.sh
//! takes a strategy from recorded traffic through a replay, a shadow and a canary to a
//! promotion, with the real gateway binary and real backends (python3 http.server) on
//! loopback ports the test picked.

mod util;

use std::net::TcpListener;
use std::process::Command;
use std::time::{Duration, Instant};

/// A free loopback port now, and the two after it (the example's three backends).
fn free_ports(count: u16) -> u16 {
    for _ in 0..200 {
        let base = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        if base > 65000 {
            continue;
        }
        let held: Vec<_> = (0..count).filter_map(|i| TcpListener::bind(("127.0.0.1", base + i)).ok()).collect();
        if held.len() == usize::from(count) {
            return base;
        }
    }
    panic!("no {count} free consecutive loopback ports");
}

#[test]
fn the_canary_example_goes_from_replay_to_shadow_to_canary_to_promotion() {
    let (port, admin, base) = (free_ports(1), free_ports(1), free_ports(3));
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/canary.sh");
    let started = Instant::now();
    let mut child = Command::new("bash")
        .arg(script)
        .env("GATEWAY", util::BIN)
        .env("PORT", port.to_string())
        .env("ADMIN", admin.to_string())
        .env("BASE", base.to_string())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run examples/canary.sh");
    // Bounded: the example takes a few seconds.
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > Duration::from_secs(120) {
            let _ = child.kill();
            panic!("examples/canary.sh ran for over 2 minutes");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "examples/canary.sh failed:\n{stdout}\n{stderr}");
    // What each step shows a reader.
    for expected in [
        "lines in the access log",
        "replayed 600 requests through `consistent-hash`",
        "stickiness by query:user: 100.0%",
        "shadow consistent-hash on 50% of requests: ",
        "canary: ",
        "arm=canary",
        "\"done\": \"promoted\"",
        "strategy now: consistent-hash",
        "config reloaded",
        "Done: books is on consistent-hash, and no request failed on the way (0 5xx",
    ] {
        assert!(stdout.contains(expected), "the example's output lacks `{expected}`:\n{stdout}\n{stderr}");
    }
    // Half of the 600 requests asked of the shadow: each worker samples its own evenly
    // spread half, so the total can be one off 300 (seen: 299).
    let asked = stdout
        .split("shadow consistent-hash on 50% of requests: ")
        .nth(1)
        .and_then(|rest| rest.split(" asked").next())
        .and_then(|n| n.trim().parse::<u32>().ok());
    assert!(
        asked.is_some_and(|n| (290..=310).contains(&n)),
        "the shadow was asked about {asked:?} of 600 requests, not about half:\n{stdout}"
    );
}
