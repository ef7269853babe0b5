//! `gateway replay` as an operator uses it before shipping a strategy: the real binary,
//! the gateway's own JSON access log as input, and the figures that decide the question
//! (requests per backend, stickiness, churn against the strategy in use, keys moved when
//! a backend goes), plus the errors a bad file gets.

mod util;

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::Duration;
use util::{Backend, Gateway, TempDir, get, poll_until, run_cli};

const POOL: &str = "\
- { id: b1, address: 10.0.0.1:80 }
- { id: b2, address: 10.0.0.2:80 }
- { id: b3, address: 10.0.0.3:80 }
- { id: b4, address: 10.0.0.4:80 }
";

/// `n` requests from 50 clients for 200 users, as JSON lines in the replay format.
fn requests(dir: &Path, n: usize) -> PathBuf {
    let path = dir.join("requests.jsonl");
    let lines: Vec<String> = (0..n)
        .map(|i| {
            serde_json::json!({
                "client": format!("203.0.113.{}", i * 7 % 50 + 1),
                "method": "GET",
                "host": "shop.example",
                "path": format!("/cart?user={}", i * 13 % 200),
                "headers": {"x-tenant": format!("t{}", i % 5)},
            })
            .to_string()
        })
        .collect();
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    path
}

fn replay(args: &[&str]) -> Value {
    let out = run_cli(&[&["replay", "--json"], args].concat(), Duration::from_secs(60));
    assert_eq!(out.code, Some(0), "{out:?}");
    serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("--json printed no JSON ({e}): {}", out.stdout))
}

fn counts(distribution: &Value) -> Vec<u64> {
    distribution["backends"].as_array().unwrap().iter().map(|b| b[1].as_u64().unwrap()).collect()
}

#[test]
fn consistent_hash_against_round_robin_and_without_a_backend() {
    let dir = TempDir::new();
    let pool = dir.path().join("pool.yaml");
    std::fs::write(&pool, POOL).unwrap();
    let reqs = requests(dir.path(), 4_000);
    let r = replay(&[
        "--strategy",
        "consistent-hash",
        "--params",
        r#"{"key": "query:user"}"#,
        "--pool",
        pool.to_str().unwrap(),
        "--requests",
        reqs.to_str().unwrap(),
        "--key",
        "query:user",
        "--compare",
        "round-robin",
        "--remove",
        "b2",
    ]);
    assert_eq!(r["requests"], 4_000);
    let c = counts(&r["distribution"]);
    assert_eq!(c.iter().sum::<u64>(), 4_000, "{r}");
    assert!(c.iter().all(|&n| n > 400), "every backend gets a share of 200 users: {c:?}");
    // The same user always lands on the same backend.
    assert_eq!(r["stickiness"]["keys"], 200);
    assert_eq!(r["stickiness"]["same_backend"].as_f64(), Some(1.0), "{}", r["stickiness"]);
    // Round robin spreads requests evenly and ignores the user: most would move.
    let compare = &r["compare"];
    assert_eq!(counts(&compare["distribution"]), vec![1_000; 4], "{compare}");
    assert!(compare["churn"].as_f64().unwrap() > 0.5, "{compare}");
    // Removing b2 moves b2's users only: consistent hashing's promise.
    let remove = &r["remove"];
    assert!(remove["keys_on_removed"].as_u64().unwrap() > 20, "{remove}");
    assert_eq!(remove["keys_on_removed"].as_u64().unwrap() + remove["keys_elsewhere"].as_u64().unwrap(), 200);
    assert_eq!(remove["moved_elsewhere"].as_f64(), Some(0.0), "{remove}");
    assert_eq!(counts(&remove["distribution"]).len(), 3);
    assert!(r["timing"]["p99_us"].as_f64().unwrap() > 0.0);
    eprintln!(
        "replay: {:.0} requests/s, decision p50 {:.2} µs p99 {:.2} µs",
        r["timing"]["requests_per_second"], r["timing"]["p50_us"], r["timing"]["p99_us"]
    );
}

#[test]
fn sticky_cookie_keeps_each_client_where_its_cookie_says_round_robin_does_not() {
    let dir = TempDir::new();
    let pool = dir.path().join("pool.yaml");
    std::fs::write(&pool, POOL).unwrap();
    let reqs = requests(dir.path(), 1_000);
    let args = |strategy: &'static str| {
        vec!["--strategy", strategy, "--pool", pool.to_str().unwrap(), "--requests", reqs.to_str().unwrap()]
    };
    // The cookie the strategy sets goes back on the client's later requests.
    let sticky = replay(&args("sticky-cookie"));
    assert_eq!(sticky["stickiness"]["key"], "client");
    assert_eq!(sticky["stickiness"]["keys"], 50);
    assert_eq!(sticky["stickiness"]["same_backend"].as_f64(), Some(1.0), "{}", sticky["stickiness"]);
    let rr = replay(&args("round-robin"));
    assert!(rr["stickiness"]["same_backend"].as_f64().unwrap() < 0.5, "{}", rr["stickiness"]);
    // By a header: 5 tenants.
    let by_tenant = replay(
        &[args("consistent-hash"), vec!["--params", r#"{"key": "header:x-tenant"}"#, "--key", "header:x-tenant"]]
            .concat(),
    );
    assert_eq!(by_tenant["stickiness"]["keys"], 5);
    assert_eq!(by_tenant["stickiness"]["same_backend"].as_f64(), Some(1.0));
}

#[test]
fn the_gateways_own_access_log_replays_as_it_is() {
    let dir = TempDir::new();
    let log = dir.path().join("access.log");
    let b = Backend::new("a");
    let gw = Gateway::start(&["-p", "0", "-b", &format!("{},id=a", b.addr()), "--access-log", log.to_str().unwrap()]);
    for i in 0..30 {
        assert_eq!(get(gw.addr, &format!("/book/{i}?user={}", i % 3)).0, 200);
    }
    poll_until(Duration::from_secs(5), Duration::from_millis(20), || {
        (std::fs::read_to_string(&log).unwrap_or_default().lines().count() >= 30).then_some(())
    })
    .expect("30 access-log lines");
    drop(gw);
    let pool = dir.path().join("pool.yaml");
    std::fs::write(&pool, POOL).unwrap();
    let r = replay(&[
        "--strategy",
        "consistent-hash",
        "--params",
        r#"{"key": "query:user"}"#,
        "--pool",
        pool.to_str().unwrap(),
        "--requests",
        log.to_str().unwrap(),
        "--key",
        "query:user",
    ]);
    assert_eq!(r["requests"], 30);
    assert_eq!(r["stickiness"]["keys"], 3);
    assert_eq!(r["stickiness"]["same_backend"].as_f64(), Some(1.0));
    assert_eq!(counts(&r["distribution"]).iter().sum::<u64>(), 30);
}

#[test]
fn bad_files_get_the_file_line_and_what_was_expected() {
    let dir = TempDir::new();
    let pool = dir.path().join("pool.yaml");
    std::fs::write(&pool, "- { id: b1, address: 10.0.0.1:80 }\n- { id: b2, adress: 10.0.0.2:80 }\n").unwrap();
    let reqs = requests(dir.path(), 10);
    let run = |pool: &Path, reqs: &Path, strategy: &str| {
        run_cli(
            &["replay", "--strategy", strategy, "--pool", pool.to_str().unwrap(), "--requests", reqs.to_str().unwrap()],
            Duration::from_secs(30),
        )
    };
    let out = run(&pool, &reqs, "round-robin");
    assert_eq!(out.code, Some(1));
    assert!(out.stderr.contains("pool.yaml:2:") && out.stderr.contains("adress"), "{}", out.stderr);

    std::fs::write(&pool, POOL).unwrap();
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"path\": \"/a\"}\n{\"path\": \"/b\"\n").unwrap();
    let out = run(&pool, &bad, "round-robin");
    assert_eq!(out.code, Some(1));
    assert!(out.stderr.contains("bad.jsonl:2:"), "{}", out.stderr);
    assert!(out.stderr.contains("each line is one JSON object"), "{}", out.stderr);

    let out = run(&pool, &reqs, "no-such-strategy");
    assert_eq!(out.code, Some(1));
    assert!(out.stderr.contains("no-such-strategy") && out.stderr.contains("round-robin"), "{}", out.stderr);
}
