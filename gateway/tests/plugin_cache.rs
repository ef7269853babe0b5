//! The compiled-plugin cache: bounded in size (least recently used files removed first),
//! temporary files of interrupted writes removed at start; a plugins-folder file that no
//! upstream uses is checked and listed but not kept in memory; a file that overrides a
//! built-in says so in the admin API.

mod util;

use serde_json::Value;
use std::path::Path;
use std::time::{Duration, SystemTime};
use util::{Backend, Gateway, TempDir, get, message, test_plugin};

fn cwasm_files(dir: &Path) -> Vec<(String, u64)> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| (e.file_name().to_string_lossy().into_owned(), e.metadata().unwrap().len()))
        .collect();
    files.sort();
    files
}

fn api(gw: &Gateway, path: &str) -> Value {
    let (status, body) = get(gw.admin_addr(), path);
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).expect("JSON")
}

#[test]
fn the_cache_is_bounded_least_recently_used_first_and_stale_temporary_files_are_removed() {
    let dir = TempDir::new();
    let cache = dir.path().join("cache");
    std::fs::create_dir_all(&cache).unwrap();
    // What an earlier run left: four compiled plugins of 400 KiB, used 4, 3, 2 and 1 hours
    // ago; a write interrupted by a crash (its process is gone); one under way in a
    // process that is alive (this test's).
    let hour = Duration::from_secs(3600);
    for age in 1..=4u32 {
        let path = cache.join(format!("old-{age}h.cwasm"));
        std::fs::write(&path, vec![0u8; 400 << 10]).unwrap();
        let f = std::fs::File::options().write(true).open(&path).unwrap();
        f.set_modified(SystemTime::now() - hour * age).unwrap();
    }
    let crashed = cache.join("abc-def.tmp4194999"); // above any Linux pid_max
    std::fs::write(&crashed, b"half a file").unwrap();
    let writing = cache.join(format!("abc-def.tmp{}", std::process::id()));
    std::fs::write(&writing, b"being written").unwrap();

    dir.copy(&test_plugin("first"), "first.wasm");
    let b1 = Backend::new("backend-1");
    let config = dir.write(
        "gw.yaml",
        format!(
            "listeners:\n  - address: 127.0.0.1:0\naccess_log: false\n\
             plugins:\n  cache_dir: {}\n  cache_limit_mib: 1\n\
             upstreams:\n  web:\n    strategy: {{ plugin: first }}\n    backends:\n      - {{ address: {} }}\n",
            cache.display(),
            b1.addr()
        ),
    );
    let gw = Gateway::with_config(&config, dir.path());
    assert_eq!(get(gw.addr, "/").1, "backend-1");
    let tidied = gw.wait_for_log(Duration::from_secs(5), |l| message(l).starts_with("removed temporary files"));
    assert_eq!(tidied["removed"], 1, "{tidied}");
    assert!(!crashed.exists(), "the interrupted write's file is still there");
    assert!(writing.exists(), "a write under way in a live process was removed");

    let files = cwasm_files(&cache);
    let total: u64 = files.iter().filter(|(n, _)| n.ends_with(".cwasm")).map(|(_, s)| s).sum();
    println!("cache after start with a 1 MiB limit: {files:?} ({total} bytes of artifacts)");
    assert!(total <= 1 << 20, "the cache holds {total} bytes: {files:?}");
    let names: Vec<&str> = files.iter().map(|(n, _)| n.as_str()).collect();
    // The oldest went first; the plugin just compiled and the most recent old file stay.
    assert!(!names.contains(&"old-4h.cwasm") && !names.contains(&"old-3h.cwasm"), "{names:?}");
    assert!(names.contains(&"old-1h.cwasm"), "{names:?}");
    let first = names.iter().find(|n| !n.starts_with("old-") && n.ends_with(".cwasm"));
    assert!(first.is_some(), "the compiled plugin was not cached: {names:?}");
    assert!(!gw.logs_matching(|l| message(l).starts_with("plugin cache over its limit")).is_empty());
    drop(gw);

    // A restart loads it from the cache.
    let gw = Gateway::with_config(&config, dir.path());
    let plugins = api(&gw, "/api/plugins");
    assert_eq!(plugins["plugins"][0]["serving"]["from_cache"], true, "{plugins}");
}

#[test]
fn an_unused_plugin_is_checked_and_listed_but_not_kept_and_an_override_of_a_builtin_is_visible() {
    let dir = TempDir::new();
    let file = dir.copy(&test_plugin("first"), "round-robin.wasm");
    let b1 = Backend::new("backend-1");
    let config = dir.write(
        "gw.yaml",
        format!(
            "listeners:\n  - address: 127.0.0.1:0\naccess_log: false\nplugins:\n  cache: false\n\
             upstreams:\n  web:\n    strategy: {{ plugin: round-robin }}\n    backends:\n      - {{ address: {} }}\n",
            b1.addr()
        ),
    );
    let gw = Gateway::with_config(&config, dir.path());
    let said = gw.wait_for_log(Duration::from_secs(5), |l| message(l).contains("overrides the built-in strategy"));
    assert_eq!(said["plugin"], "round-robin", "{said}");
    let up = api(&gw, "/api/upstreams");
    assert_eq!(up["upstreams"][0]["plugin"]["overrides_builtin"], true, "{up}");
    assert_eq!(up["upstreams"][0]["plugin"]["origin"], file.to_str().unwrap(), "{up}");

    // A file no upstream uses: checked, listed, not kept compiled.
    let mark = gw.log_mark();
    std::fs::copy(test_plugin("trap"), dir.path().join("spare.wasm.tmp")).unwrap();
    std::fs::rename(dir.path().join("spare.wasm.tmp"), dir.path().join("spare.wasm")).unwrap();
    let line = gw.wait_for_log_after(mark, Duration::from_secs(10), |l| message(l).starts_with("plugin checked"));
    assert!(message(&line).contains("no upstream uses it, so it is not kept in memory"), "{line}");
    let plugins = api(&gw, "/api/plugins");
    let list = plugins["plugins"].as_array().unwrap();
    let spare = list.iter().find(|p| p["name"] == "spare").unwrap_or_else(|| panic!("spare is not listed: {plugins}"));
    assert_eq!(spare["in_memory"], false, "{spare}");
    assert_eq!(spare["used_by"], serde_json::json!([]), "{spare}");
    assert_eq!(spare["serving"]["overrides_builtin"], false, "{spare}");
    let rr = list.iter().find(|p| p["name"] == "round-robin").unwrap();
    assert_eq!(
        (rr["in_memory"].as_bool(), rr["serving"]["overrides_builtin"].as_bool()),
        (Some(true), Some(true)),
        "{rr}"
    );
}
