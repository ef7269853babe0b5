//! `gateway plugin check | list | export`: what a plugin author sees.

mod util;

use std::time::Duration;
use util::{CliOutput, TempDir, run_cli, test_plugin};

const WORLD: &str = "gateway:selector/selector@0.3.0";

fn cli(args: &[&str]) -> CliOutput {
    run_cli(args, Duration::from_secs(30))
}

/// `gateway plugin export round-robin` into `dir`; returns the file.
fn export_round_robin(dir: &TempDir, name: &str) -> String {
    let file = dir.path().join(name);
    let file = file.to_str().unwrap().to_owned();
    let out = cli(&["plugin", "export", "round-robin", "-o", &file]);
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(std::fs::metadata(&file).map(|m| m.len() > 8).unwrap_or(false), "nothing written to {file}");
    file
}

#[test]
fn check_accepts_the_exported_builtin() {
    let dir = TempDir::new();
    let file = export_round_robin(&dir, "rr.wasm");
    let out = cli(&["plugin", "check", &file]);
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(out.stdout.starts_with("ok:"), "{out:?}");
    assert!(out.stdout.contains(WORLD), "{out:?}");
}

#[test]
fn check_refuses_a_file_that_is_not_wasm() {
    let dir = TempDir::new();
    let file = dir.write("notes.wasm", "these are not the bytes you are looking for\n");
    let out = cli(&["plugin", "check", file.to_str().unwrap()]);
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(out.stderr.contains("not a WebAssembly file"), "{out:?}");
    assert!(out.stderr.contains(file.to_str().unwrap()), "the message does not name the file: {out:?}");
}

#[test]
fn check_names_the_expected_world_and_what_the_component_exports() {
    let file = test_plugin("wrong-world");
    let out = cli(&["plugin", "check", file.to_str().unwrap()]);
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(out.stderr.contains(WORLD), "expected world not named: {out:?}");
    assert!(out.stderr.contains("other:thing/greeter@1.0.0"), "the component's export not named: {out:?}");
}

/// A plugin built with the SDK of the previous world (0.2.0, before `pass` and
/// `set-reason`) is refused with what to do about it.
#[test]
fn check_tells_to_rebuild_a_plugin_built_for_the_previous_world() {
    let file = test_plugin("old-world");
    let out = cli(&["plugin", "check", file.to_str().unwrap()]);
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(out.stderr.contains("it was built for gateway:selector@0.2.0, and this gateway speaks @0.3.0"), "{out:?}");
    assert!(out.stderr.contains("rebuild it against this gateway's wit/"), "{out:?}");
    assert!(out.stderr.contains("gateway-sdk of this version"), "{out:?}");
}

#[test]
fn list_shows_builtins_and_folder_overrides() {
    let dir = TempDir::new();
    let out = cli(&["plugin", "list", "--plugins", dir.path().to_str().unwrap()]);
    assert_eq!(out.code, Some(0), "{out:?}");
    let row = out.stdout.lines().find(|l| l.starts_with("round-robin ")).unwrap_or_else(|| panic!("{out:?}"));
    assert!(row.contains("built-in"), "{row}");
    assert!(!row.contains("overrides"), "{row}");

    let file = export_round_robin(&dir, "round-robin.wasm");
    let trap = dir.copy(&test_plugin("trap"), "trap.wasm");
    let out = cli(&["plugin", "list", "--plugins", dir.path().to_str().unwrap()]);
    assert_eq!(out.code, Some(0), "{out:?}");
    let row = out.stdout.lines().find(|l| l.starts_with("round-robin ")).unwrap_or_else(|| panic!("{out:?}"));
    assert!(row.contains(&file) && row.contains("(overrides built-in)"), "{row}");
    let row =
        out.stdout.lines().find(|l| l.starts_with("trap ")).unwrap_or_else(|| panic!("trap.wasm not listed: {out:?}"));
    assert!(row.contains(trap.to_str().unwrap()), "{row}");
}

#[test]
fn export_of_an_unknown_name_lists_the_builtins() {
    let dir = TempDir::new();
    let target = dir.path().join("x.wasm");
    let out = cli(&["plugin", "export", "nope", "-o", target.to_str().unwrap()]);
    assert_ne!(out.code, Some(0), "{out:?}");
    assert!(out.stderr.contains("no built-in plugin `nope`"), "{out:?}");
    assert!(out.stderr.contains("round-robin"), "the built-ins are not listed: {out:?}");
    assert!(!target.exists(), "a file was written");
}

#[test]
fn smoke_check_catches_a_plugin_that_only_fails_when_called() {
    let file = test_plugin("trap");
    let file = file.to_str().unwrap();
    // Loading and `configure` succeed: a plain check cannot see the bug.
    let out = cli(&["plugin", "check", file]);
    assert_eq!(out.code, Some(0), "{out:?}");
    let out = cli(&["plugin", "check", file, "--smoke"]);
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(out.stderr.contains("pick #1 (GET / from 203.0.113.7) failed"), "{out:?}");
    assert!(out.stderr.contains("Trap"), "{out:?}");
    // The panic's message, through the SDK's panic hook.
    assert!(out.stderr.contains("the plugin said: panicked at "), "{out:?}");
    assert!(out.stderr.contains("this plugin always traps"), "{out:?}");
}

#[test]
fn smoke_check_shows_what_a_good_plugin_decides_on_the_sample_or_given_pool() {
    let dir = TempDir::new();
    let file = export_round_robin(&dir, "rr.wasm");
    let out = cli(&["plugin", "check", &file, "--smoke"]);
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(out.stdout.contains("pool-changed: accepted 4 backends (3 healthy)"), "{out:?}");
    assert_eq!(out.stdout.matches("pick #").count(), 4, "{out:?}");
    assert!(out.stdout.contains("retry excluding b"), "{out:?}");
    assert!(!out.stdout.contains("b4"), "the down backend was picked: {out:?}");

    let pool = dir.write("pool.yaml", "- { id: only, address: 10.0.0.9:80 }\n- { id: other, address: 10.0.0.8:80 }\n");
    let out = cli(&["plugin", "check", &file, "--pool", pool.to_str().unwrap()]);
    assert_eq!(out.code, Some(0), "--pool implies --smoke: {out:?}");
    assert!(out.stdout.contains("accepted 2 backends (2 healthy)"), "{out:?}");

    let bad = dir.write("bad.yaml", "- { id: x, address: nowhere }\n");
    let out = cli(&["plugin", "check", &file, "--pool", bad.to_str().unwrap()]);
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(out.stderr.contains("bad.yaml:1:"), "{out:?}");
}
