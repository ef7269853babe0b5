//! A plugin that traps or loops forever in `pick` costs nothing but the fallback: every
//! request is still answered, the gateway stays up, and the failure is logged.

mod util;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};
use util::{Backend, Gateway, TempDir, get, message, test_plugin};

/// Starts a gateway over two backends with the plugins folder `dir`, plus `extra` flags.
fn gateway(dir: &TempDir, backends: &[&Backend], extra: &[&str]) -> Gateway {
    let mut args = vec!["--listen".to_owned(), "127.0.0.1:0".into(), "--threads".into(), "2".into()];
    args.extend(["--plugins".to_owned(), dir.path().to_str().unwrap().to_owned()]);
    for b in backends {
        args.extend(["-b".to_owned(), b.addr().to_string()]);
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    Gateway::start(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

/// The gateway really loaded `file` (and not the built-in) for its upstream.
fn assert_loaded_from(gw: &Gateway, file: &std::path::Path) {
    let ready = gw.wait_for_log(Duration::from_secs(5), |l| message(l) == "upstream ready");
    let origin = ready["origin"].as_str().unwrap_or_default();
    assert!(origin.contains(file.to_str().unwrap()), "the upstream uses {origin}, not {}", file.display());
}

/// `n` sequential GETs: each answered 200 by one of the backends, each within `limit`.
fn serve_all(gw: &Gateway, backends: &[&Backend], n: usize, limit: Duration) -> BTreeSet<String> {
    let names: BTreeSet<_> = backends.iter().map(|b| b.name().to_owned()).collect();
    let mut seen = BTreeSet::new();
    for i in 0..n {
        let started = Instant::now();
        let (status, body) = get(gw.addr, &format!("/item/{i}"));
        let took = started.elapsed();
        assert_eq!(status, 200, "request {i}: {body}");
        assert!(names.contains(&body), "request {i} answered by {body:?}");
        assert!(took < limit, "request {i} took {took:?}");
        seen.insert(body);
    }
    seen
}

fn assert_failure_logged(gw: &Gateway, plugin: &str) {
    let warning = gw.wait_for_log(Duration::from_secs(5), |l| message(l).starts_with("plugin call failed"));
    assert_eq!(warning["level"], "WARN", "{warning}");
    assert_eq!(warning["plugin"], plugin, "{warning}");
    // Access-log lines (JSON objects with a request_id) reach stderr within ~200 ms.
    let line = gw.wait_for_log(Duration::from_secs(5), |l| l.get("request_id").is_some() && l["fallback"] == true);
    assert_eq!(line["strategy"], plugin, "the access log names the strategy: {line}");
}

#[test]
fn trapping_override_of_a_builtin_falls_back_on_every_request() {
    let dir = TempDir::new();
    let file = dir.copy(&test_plugin("trap"), "round-robin.wasm");
    let (b1, b2) = (Backend::new("backend-1"), Backend::new("backend-2"));
    let mut gw = gateway(&dir, &[&b1, &b2], &[]);
    assert_loaded_from(&gw, &file);

    let seen = serve_all(&gw, &[&b1, &b2], 20, Duration::from_secs(2));
    assert_eq!(seen.len(), 2, "the fallback round robin used only {seen:?}");
    assert_failure_logged(&gw, "round-robin");
    assert!(gw.is_running());
}

#[test]
fn spinning_plugin_is_stopped_by_the_deadline() {
    let dir = TempDir::new();
    let file = dir.copy(&test_plugin("spin"), "round-robin.wasm");
    let (b1, b2) = (Backend::new("backend-1"), Backend::new("backend-2"));
    let mut gw = gateway(&dir, &[&b1, &b2], &[]);
    assert_loaded_from(&gw, &file);

    // The default deadline is 20ms: far below the per-request limit, even on a busy machine.
    let seen = serve_all(&gw, &[&b1, &b2], 50, Duration::from_secs(1));
    assert_eq!(seen.len(), 2, "the fallback round robin used only {seen:?}");
    assert_failure_logged(&gw, "round-robin");
    assert!(gw.is_running(), "the gateway died");
}

#[test]
fn folder_plugin_by_its_own_name_falls_back_too() {
    let dir = TempDir::new();
    let file = dir.copy(&test_plugin("trap"), "trap.wasm");
    let (b1, b2) = (Backend::new("backend-1"), Backend::new("backend-2"));
    let mut gw = gateway(&dir, &[&b1, &b2], &["--strategy", "trap"]);
    assert_loaded_from(&gw, &file);

    let seen = serve_all(&gw, &[&b1, &b2], 20, Duration::from_secs(2));
    assert_eq!(seen.len(), 2, "the fallback round robin used only {seen:?}");
    assert_failure_logged(&gw, "trap");
    assert!(gw.is_running());
}
