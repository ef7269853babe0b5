//! Reliability suite, config and reload abuse (docs/reliability.md, table 5): under
//! continuous traffic the config file is replaced by garbage, by a truncated copy, by a
//! 50 MB file and by a config that names a missing plugin. Each is refused with the file
//! (and line and field, where there is one), the old config keeps serving, and not one
//! request fails.

mod util;

use serde_json::json;
use std::time::{Duration, Instant};
use util::{Backend, Gateway, TempDir, Traffic, install, message, report};

fn yaml(a: &Backend, b: &Backend, strategy: &str) -> String {
    format!(
        "listeners:\n  - address: 127.0.0.1:0\nthreads: 2\naccess_log: false\nupstreams:\n  web:\n    strategy: {{plugin: {strategy}}}\n    health_check: {{interval: 200ms, timeout: 500ms}}\n    backends:\n      - {{ address: {}, id: {} }}\n      - {{ address: {}, id: {} }}\n",
        a.addr(),
        a.name(),
        b.addr(),
        b.name()
    )
}

#[test]
fn garbage_truncated_huge_and_dangling_configs_are_refused_while_the_old_one_serves() {
    let (b1, b2) = (Backend::new("b1"), Backend::new("b2"));
    let dir = TempDir::new();
    let plugins = dir.path().join("plugins");
    std::fs::create_dir(&plugins).unwrap();
    let good = yaml(&b1, &b2, "round-robin");
    install(&dir, "gw.yaml", &good);
    let file = dir.path().join("gw.yaml");
    let gw = Gateway::with_config(&file, &plugins);
    gw.wait_for_log(Duration::from_secs(10), |l| message(l).starts_with("watching the config file"));
    let traffic = Traffic::start(gw.addr);
    let both = |r: &[String]| r.iter().any(|b| b == "b1") && r.iter().any(|b| b == "b2");
    traffic.wait(Instant::now() - Duration::from_secs(1), Duration::from_secs(5), "round robin over b1, b2", both);

    // Cut inside the second backend's `{ address: ... }`.
    let truncated = &good[..good.rfind("{ address").unwrap() + 15];
    let mut huge = good.clone();
    huge.push_str("# padding\n");
    while huge.len() < 50 << 20 {
        huge.push_str(&format!("# {}\n", "x".repeat(1000)));
    }
    let cases: [(&str, String, &[&str]); 4] = [
        ("garbage", "\u{1}\u{2} {{{ not: [yaml: at all\n\t: :\n".to_owned(), &["gw.yaml:LINE"]),
        ("truncated in the middle of a backend", truncated.to_owned(), &["gw.yaml:LINE"]),
        ("50 MB file", huge, &["gw.yaml", "at most"]),
        (
            "a strategy plugin that does not exist",
            yaml(&b1, &b2, "no-such-plugin"),
            &["gw.yaml:LINE", "upstreams.web.strategy", "no plugin named `no-such-plugin`"],
        ),
    ];
    for (name, text, must_say) in cases {
        let mark = gw.log_mark();
        let t = Instant::now();
        let rss_before = gw.rss_kib();
        install(&dir, "gw.yaml", &text);
        let refused = gw.wait_for_log_after(mark, Duration::from_secs(5), |l| message(l).starts_with("config refused"));
        let refused_after = t.elapsed();
        let said = message(&refused).to_owned();
        // The old config keeps serving: still round robin over both backends.
        traffic.wait(Instant::now(), Duration::from_secs(2), &format!("{name}: still b1 and b2"), both);
        let rss_after = gw.rss_kib();
        report::record(
            "config-abuse",
            json!({
                "case": name,
                "refused_after_ms": refused_after.as_secs_f64() * 1e3,
                "log": said,
                "old_config_serving": true,
                "rss_kib_before": rss_before,
                "rss_kib_after": rss_after,
            }),
        );
        for needle in must_say {
            let found = match needle.strip_suffix("LINE") {
                // `FILE:N`: a line number follows.
                Some(file) => said
                    .match_indices(file)
                    .any(|(i, _)| said[i + file.len()..].starts_with(|c: char| c.is_ascii_digit())),
                None => said.contains(needle),
            };
            assert!(found, "{name}: the refusal does not say {needle:?}: {said}");
        }
        assert!(rss_after < rss_before + 20 * 1024, "{name}: RSS grew from {rss_before} KiB to {rss_after} KiB");
    }
    // And a good config still applies afterwards.
    let mark = gw.log_mark();
    install(&dir, "gw.yaml", &yaml(&b2, &b1, "round-robin"));
    gw.wait_for_log_after(mark, Duration::from_secs(5), |l| message(l).starts_with("config reloaded"));

    let (sent, failures) = traffic.finish();
    report::record(
        "config-abuse",
        json!({ "case": "all of the above, one client without pause", "requests": sent, "failed": failures.len() }),
    );
    assert!(
        failures.is_empty(),
        "{} of {sent} requests failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
}
