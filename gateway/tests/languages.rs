//! Plugins in every guest language through the real gateway binary:
//!
//! - the examples do the routing their READMEs promise: `python-path-router` (path prefix
//!   → labelled backends), `js-least-latency` (the fast backends, never the slow ones),
//!   `rust-header-canary` (header → canaries, `percent` of the rest);
//! - `gateway plugin new` projects in Rust, Python and JavaScript build with the exact
//!   commands of their README, pass `gateway plugin check` and serve a round robin;
//! - a Python plugin is hot-swapped for a JavaScript one and back, ten times, under
//!   continuous traffic, with zero failed requests;
//! - a plugin whose `pick` raises (Python) or throws (JavaScript) costs only the fallback,
//!   and the operator reads the guest's own error (the traceback, the exception) in the
//!   failure's log line and in `gateway plugin check --smoke`.
//!
//! The components and tools come from `scripts/build-guest-plugins.sh`, which
//! `scripts/test.sh` runs before `cargo test`: these tests only need its output
//! (`target/guest-plugins/*.wasm` and `tools.env`) and fail, naming the script, when it is
//! missing. They never skip. (Building inside the tests would make the first test pay
//! for minutes of tool installs, under the test harness's timeouts and in parallel with
//! the other tests; the script reports install problems far more clearly.)
//!
//! Python and JavaScript components take 5–15 s for wasmtime to compile, so the tests
//! here take a lock and run one at a time (each compile already uses every core), and
//! give the gateway up to [`STARTUP`] to start. Compiled examples are cached in
//! `target/test-plugin-cache` across runs (their bytes only change when their sources
//! do); components built by a test get a fresh cache.

mod util;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use util::{Backend, Gateway, KeepAlive, TempDir, message, poll_until, request_with_headers, run_cli_with_env};

const BUILD_HINT: &str = "run scripts/build-guest-plugins.sh first (scripts/test.sh does): it installs the pinned guest tools and builds the guest-language plugins";

/// How long a gateway may take to start when it compiles a Python/JS plugin first.
const STARTUP: Duration = Duration::from_secs(120);

/// A swap to a version that is already in the compiled cache must show in the traffic
/// within this long. Measured on 2 cores: median ~0.15 s, max ~0.5 s (see docs/plugins.md).
const CACHED_SWAP: Duration = Duration::from_secs(5);

/// A swap to a Python/JS version that must be compiled first (5–15 s measured).
const COLD_SWAP: Duration = Duration::from_secs(120);

// ---------------------------------------------------------------------------------------
// Where things are

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("gateway/ has a parent").to_path_buf()
}

/// Where scripts/build-guest-plugins.sh writes (`GUEST_OUT_DIR`, as in the script).
fn guest_dir() -> PathBuf {
    std::env::var_os("GUEST_OUT_DIR").map(PathBuf::from).unwrap_or_else(|| repo_root().join("target/guest-plugins"))
}

/// A component built by scripts/build-guest-plugins.sh; panics with what to run if absent.
fn guest_plugin(name: &str) -> PathBuf {
    let path = guest_dir().join(format!("{name}.wasm"));
    assert!(path.is_file(), "{} is missing: {BUILD_HINT}", path.display());
    path
}

/// The guest tools scripts/build-guest-plugins.sh installed (from its `tools.env`).
fn guest_tool(key: &str) -> PathBuf {
    let file = guest_dir().join("tools.env");
    let text =
        std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("cannot read {}: {e}; {BUILD_HINT}", file.display()));
    let value = text
        .lines()
        .find_map(|l| l.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
        .unwrap_or_else(|| panic!("{} does not name {key}: {BUILD_HINT}", file.display()));
    let path = PathBuf::from(value);
    assert!(path.exists(), "{key}={} (from {}) does not exist: {BUILD_HINT}", path.display(), file.display());
    path
}

/// `XDG_CACHE_HOME` for gateways that load the examples: kept across runs.
fn example_cache() -> String {
    let dir = repo_root().join("target/test-plugin-cache");
    std::fs::create_dir_all(&dir).unwrap();
    dir.to_str().unwrap().to_owned()
}

/// One test of this file at a time: wasmtime compiles a Python/JS plugin on every core.
fn one_at_a_time() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

// ---------------------------------------------------------------------------------------
// Running a gateway with a plugin

/// Starts the gateway with `plugin` (copied into a fresh plugins folder as `NAME.wasm`)
/// over `backends` (`-b` specs) with `--param`s.
fn start_with_plugin(
    plugin: &Path,
    name: &str,
    backends: &[String],
    params: &[&str],
    cache: &str,
) -> (Gateway, TempDir) {
    let dir = TempDir::new();
    dir.copy(plugin, &format!("{name}.wasm"));
    let mut args = vec![
        "--listen",
        "127.0.0.1:0",
        "--plugins",
        dir.path().to_str().unwrap(),
        "--strategy",
        name,
        "--no-access-log",
    ];
    for b in backends {
        args.extend(["-b", b.as_str()]);
    }
    for p in params {
        args.extend(["--param", p]);
    }
    let started = Instant::now();
    let gw = Gateway::start_with(&args, &[("XDG_CACHE_HOME", cache)], STARTUP);
    eprintln!("{name}: gateway listening after {:.2?}", started.elapsed());
    (gw, dir)
}

/// Sends `n` requests one after the other (each on a new connection) and returns the
/// name of the backend that answered each; any other answer than 200 fails the test.
fn backends_for(gw: &Gateway, path: &str, headers: &[(&str, &str)], n: usize) -> Vec<String> {
    (0..n)
        .map(|_| {
            let r = request_with_headers(gw.addr, "GET", path, headers)
                .unwrap_or_else(|e| panic!("GET {path} {headers:?}: {e}"));
            assert_eq!(r.status, 200, "GET {path} {headers:?}: {} {}", r.status, r.body);
            r.header("x-backend").to_owned()
        })
        .collect()
}

fn count<'a>(names: impl IntoIterator<Item = &'a String>) -> HashMap<&'a str, usize> {
    let mut counts = HashMap::new();
    for n in names {
        *counts.entry(n.as_str()).or_default() += 1;
    }
    counts
}

/// Whether `seq` is `cycle` repeated (starting anywhere in it).
fn is_rotation_of(seq: &[String], cycle: &[&str]) -> bool {
    let Some(start) = cycle.iter().position(|c| Some(*c) == seq.first().map(String::as_str)) else { return false };
    seq.iter().enumerate().all(|(i, s)| s == cycle[(start + i) % cycle.len()])
}

/// No plugin call failed (the fallback answered nothing).
fn assert_no_plugin_failures(gw: &Gateway) {
    let failed = gw.logs_matching(|l| message(l).contains("plugin call failed"));
    assert!(failed.is_empty(), "the plugin failed and the fallback answered: {failed:?}");
}

// ---------------------------------------------------------------------------------------
// (b) The examples route as they promise

#[test]
fn python_path_router_sends_each_prefix_to_its_labelled_backends() {
    let _serial = one_at_a_time();
    let plugin = guest_plugin("python-path-router");
    let api1 = Backend::new("api-1");
    let api2 = Backend::new("api-2");
    let stat = Backend::new("static-3");
    let plain = Backend::new("plain-4");
    let specs = [
        format!("{},label.role=api", api1.addr()),
        format!("{},label.role=api", api2.addr()),
        format!("{},label.role=static", stat.addr()),
        plain.addr().to_string(),
    ];
    let (gw, _dir) = start_with_plugin(
        &plugin,
        "python-path-router",
        &specs,
        &[r#"routes={"/api":"api","/static":"static","/none":"nothing"}"#, "label=role"],
        &example_cache(),
    );

    // A prefix goes, in exact round robin, to the backends whose label matches.
    let api = backends_for(&gw, "/api/books", &[], 6);
    assert!(is_rotation_of(&api, &["api-1", "api-2"]), "/api: {api:?}");
    let statics = backends_for(&gw, "/static/app.css", &[], 3);
    assert!(statics.iter().all(|b| b == "static-3"), "/static: {statics:?}");
    // Longest prefix wins; `/apiary` matches `/api` (plain string prefix, as documented).
    let apiary = backends_for(&gw, "/apiary", &[], 2);
    assert!(apiary.iter().all(|b| b.starts_with("api-")), "/apiary: {apiary:?}");
    // Any other path: round robin over every healthy backend.
    let other = backends_for(&gw, "/books", &[], 8);
    assert!(is_rotation_of(&other, &["api-1", "api-2", "static-3", "plain-4"]), "/books: {other:?}");
    // A prefix whose label value no backend carries: the plugin's own 503.
    let none = request_with_headers(gw.addr, "GET", "/none/x", &[]).unwrap();
    assert_eq!(none.status, 503, "{none:?}");
    assert!(none.body.contains("no healthy backend with role=nothing available"), "{none:?}");
    assert_eq!(plain.hits().len(), 2, "plain-4 gets only the catch-all requests");
    assert_no_plugin_failures(&gw);
}

#[test]
fn js_least_latency_sends_traffic_to_the_fast_backends_only() {
    let _serial = one_at_a_time();
    let plugin = guest_plugin("js-least-latency");
    let fast1 = Backend::new("fast-1");
    let slow2 = Backend::slow("slow-2", Duration::from_millis(150));
    let fast3 = Backend::new("fast-3");
    let slow4 = Backend::slow("slow-4", Duration::from_millis(250));
    let specs: Vec<String> = [&fast1, &slow2, &fast3, &slow4].iter().map(|b| b.addr().to_string()).collect();
    // Loopback answers take well under a millisecond; a 25 ms floor keeps a scheduling
    // hiccup on a loaded CI machine from making a fast backend look slow.
    let (gw, _dir) = start_with_plugin(&plugin, "js-least-latency", &specs, &["floor_us=25000"], &example_cache());

    // No latency known yet: every backend is at the floor, so they take turns until each
    // has a sample (4 requests), then only the fast ones tie at the floor.
    let warmup = backends_for(&gw, "/", &[], 8);
    assert!(!slow2.hits().is_empty() && !slow4.hits().is_empty(), "the slow backends were never tried: {warmup:?}");
    let steady = backends_for(&gw, "/", &[], 20);
    assert!(is_rotation_of(&steady, &["fast-1", "fast-3"]), "after warm-up: {steady:?} (warm-up: {warmup:?})");
    assert_no_plugin_failures(&gw);
}

#[test]
fn rust_header_canary_sends_the_header_and_a_percentage_to_the_canaries() {
    let _serial = one_at_a_time();
    let plugin = guest_plugin("rust-header-canary");
    let stable1 = Backend::new("stable-1");
    let canary2 = Backend::new("canary-2");
    let stable3 = Backend::new("stable-3");
    let canary4 = Backend::new("canary-4");
    let specs = [
        stable1.addr().to_string(),
        format!("{},label.canary=true", canary2.addr()),
        stable3.addr().to_string(),
        format!("{},label.canary=true", canary4.addr()),
    ];
    let (gw, _dir) = start_with_plugin(&plugin, "rust-header-canary", &specs, &["percent=25"], &example_cache());

    // The header always goes to the canaries, in turn.
    let opted_in = backends_for(&gw, "/", &[("x-canary", "1")], 6);
    assert!(is_rotation_of(&opted_in, &["canary-2", "canary-4"]), "x-canary: 1 → {opted_in:?}");
    // 25 % of the other requests: binomial(400, 0.25) is 100 ± 8.7, so 60..140 is > 4.5 sd.
    let mut conn = KeepAlive::open(gw.addr).unwrap();
    let plain: Vec<String> = (0..400)
        .map(|_| {
            let r = conn.get("/").unwrap();
            assert_eq!(r.status, 200, "{r:?}");
            r.header("x-backend").to_owned()
        })
        .collect();
    let counts = count(&plain);
    let canary = counts.get("canary-2").unwrap_or(&0) + counts.get("canary-4").unwrap_or(&0);
    assert!(
        (60..=140).contains(&canary),
        "{canary} of 400 plain requests went to the canaries, expected ~100: {counts:?}"
    );
    // Each group is an exact round robin of its own.
    let (s1, s3) = (counts.get("stable-1").unwrap_or(&0), counts.get("stable-3").unwrap_or(&0));
    assert!(s1.abs_diff(*s3) <= 1, "stable group unbalanced: {counts:?}");
    let (c2, c4) = (canary2.hits().len(), canary4.hits().len());
    assert!(c2.abs_diff(c4) <= 1, "canary group unbalanced: canary-2 {c2}, canary-4 {c4}");
    eprintln!("rust-header-canary: {canary} of 400 plain requests to the canaries; {counts:?}");
    assert_no_plugin_failures(&gw);
}

// ---------------------------------------------------------------------------------------
// (c) `gateway plugin new`: generate, build with the README's commands, check, serve

/// The lines of the first ```sh block of a README: the build commands.
fn readme_commands(readme: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(readme).unwrap();
    let block = text.split("```sh").nth(1).and_then(|b| b.split("```").next()).expect("a ```sh block");
    block.lines().map(str::trim).filter(|l| !l.is_empty()).map(str::to_owned).collect()
}

/// The version pinned for `package` in a requirements.txt (`pkg==1.2.3`) or package.json.
fn pinned(file: &Path, package: &str) -> String {
    let text = std::fs::read_to_string(file).unwrap();
    let found = if file.extension().is_some_and(|e| e == "json") {
        let json: serde_json::Value = serde_json::from_str(&text).unwrap();
        ["dependencies", "devDependencies"].iter().find_map(|k| json[k][package].as_str().map(str::to_owned))
    } else {
        text.lines().find_map(|l| l.trim().strip_prefix(&format!("{package}==")).map(str::to_owned))
    };
    found.unwrap_or_else(|| panic!("{} pins no {package}", file.display()))
}

/// Creates a project with `gateway plugin new`, runs the build commands of its README
/// (with `gateway` meaning the binary under test, and the one-time tool install replaced
/// by the tools scripts/build-guest-plugins.sh installed at the same pinned version),
/// checks that `gateway plugin check` accepted the result, and routes requests with it.
fn new_project_builds_checks_and_serves(lang: &str, wasm_in_project: &str) {
    let _serial = one_at_a_time();
    let root = repo_root();
    let work = TempDir::new();
    let name = format!("my-{lang}-strategy");
    let project = work.path().join(&name);
    let cache = work.path().join("cache");
    let cache = cache.to_str().unwrap();
    let env = [("XDG_CACHE_HOME", cache)];

    let out = run_cli_with_env(
        &["plugin", "new", &name, "--lang", lang, "--dir", project.to_str().unwrap()],
        &env,
        Duration::from_secs(30),
    );
    assert_eq!(out.code, Some(0), "{out:?}");
    let commands = readme_commands(&project.join("README.md"));
    for c in &commands {
        assert!(out.stdout.contains(c.as_str()), "`plugin new` does not print the build step `{c}`: {out:?}");
    }

    // `gateway` in the README's commands is the binary under test.
    let bin = work.path().join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_gateway"), bin.join("gateway")).unwrap();
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default());

    let mut timings = Vec::new();
    for line in &commands {
        let started = Instant::now();
        if line.starts_with("python3 -m venv") {
            // The one-time install: the venv the script made, at the same pinned version
            // (componentize-py for Python, the ziglang wheel for C).
            let (tools, package, venv) = if lang == "c" {
                ("c", "ziglang", guest_tool("ZIG_VENV"))
            } else {
                (
                    "python",
                    "componentize-py",
                    guest_tool("COMPONENTIZE_PY").parent().unwrap().parent().unwrap().to_path_buf(),
                )
            };
            let want = pinned(&root.join(format!("scripts/guest-tools/{tools}/requirements.txt")), package);
            assert_eq!(pinned(&project.join("requirements.txt"), package), want, "template and tools disagree");
            std::os::unix::fs::symlink(venv, project.join(".venv")).unwrap();
            continue;
        }
        if line == "npm install" {
            let pkg = "@bytecodealliance/componentize-js";
            let want = pinned(&root.join("scripts/guest-tools/starlingmonkey/package.json"), pkg);
            assert_eq!(pinned(&project.join("package.json"), pkg), want, "template and tools disagree");
            std::os::unix::fs::symlink(guest_tool("NODE_MODULES"), project.join("node_modules")).unwrap();
            continue;
        }
        if line.starts_with("cargo build") {
            // One target dir for every run (registry crates compile once), under target/.
            let shared = root.join("target/scaffold");
            std::fs::create_dir_all(&shared).unwrap();
            std::os::unix::fs::symlink(&shared, project.join("target")).unwrap();
        }
        let mut cmd = Command::new("sh");
        cmd.arg("-c").arg(line).current_dir(&project).env("PATH", &path).env("XDG_CACHE_HOME", cache);
        if lang == "c" {
            // zig's wasm32-wasi C library, built once by scripts/build-guest-plugins.sh.
            cmd.env("ZIG_GLOBAL_CACHE_DIR", guest_tool("ZIG_GLOBAL_CACHE_DIR"));
        }
        for var in ["RUSTFLAGS", "CARGO_ENCODED_RUSTFLAGS", "CARGO_BUILD_TARGET", "CARGO_TARGET_DIR", "RUST_LOG"] {
            cmd.env_remove(var);
        }
        let output = cmd.output().unwrap_or_else(|e| panic!("run `{line}`: {e}"));
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            output.status.success(),
            "`{line}` in {} failed ({}):\n{stdout}\n{stderr}",
            project.display(),
            output.status
        );
        if line.starts_with("gateway plugin check") {
            assert!(stdout.starts_with("ok:"), "`{line}`: {stdout}{stderr}");
        }
        timings.push(format!("`{line}` {:.1?}", started.elapsed()));
    }
    assert!(
        commands.iter().any(|c| c.starts_with("gateway plugin check")),
        "the README does not check the build: {commands:?}"
    );
    eprintln!("plugin new --lang {lang}: {}", timings.join(", "));

    // The round robin the template promises, through the gateway (compiled code cached
    // by `plugin check` above).
    let wasm = project.join(wasm_in_project.replace("{crate}", &name.replace('-', "_")).replace("{name}", &name));
    let b: Vec<Backend> = (1..=3).map(|i| Backend::new(&format!("backend-{i}"))).collect();
    let specs: Vec<String> = b.iter().map(|b| b.addr().to_string()).collect();
    let (gw, _dir) = start_with_plugin(&wasm, &name, &specs, &[], cache);
    let seq = backends_for(&gw, "/", &[], 9);
    assert!(is_rotation_of(&seq, &["backend-1", "backend-2", "backend-3"]), "{lang} template: {seq:?}");
    assert_no_plugin_failures(&gw);
}

#[test]
fn plugin_new_rust_project_builds_and_passes_check() {
    new_project_builds_checks_and_serves("rust", "target/wasm32-wasip2/release/{crate}.wasm");
}

#[test]
fn plugin_new_python_project_builds_and_passes_check() {
    new_project_builds_checks_and_serves("python", "{name}.wasm");
}

#[test]
fn plugin_new_js_project_builds_and_passes_check() {
    new_project_builds_checks_and_serves("js", "{name}.wasm");
}

#[test]
fn plugin_new_c_project_builds_and_passes_check() {
    new_project_builds_checks_and_serves("c", "{name}.wasm");
}

#[test]
fn c_plugin_routes_in_exact_round_robin_and_marks_its_answers() {
    let _serial = one_at_a_time();
    let plugin = guest_plugin("c-round-robin");
    let b: Vec<Backend> = (1..=3).map(|i| Backend::new(&format!("backend-{i}"))).collect();
    let specs: Vec<String> = b.iter().map(|b| b.addr().to_string()).collect();
    let (gw, _dir) = start_with_plugin(&plugin, "c-round-robin", &specs, &[], &example_cache());
    let mut seq = Vec::new();
    for _ in 0..9 {
        let r = request_with_headers(gw.addr, "GET", "/", &[]).expect("GET /");
        assert_eq!(r.status, 200, "{} {}", r.status, r.body);
        assert_eq!(r.header("x-round-robin"), "c", "answered by the C plugin, not the fallback");
        seq.push(r.header("x-backend").to_owned());
    }
    assert!(is_rotation_of(&seq, &["backend-1", "backend-2", "backend-3"]), "{seq:?}");
    assert_no_plugin_failures(&gw);
}

// ---------------------------------------------------------------------------------------
// (d) Hot swap between languages under load

/// Which plugin answered: the value of `x-round-robin` (none for the built-in).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lang {
    Builtin,
    Python,
    Js,
}

/// One answer the client saw: when, and (backend 0..3, which plugin) or the failure.
type Answer = (Instant, Result<(u8, Lang), String>);

/// Writes `src` to `dir/name` the way operators do: a temporary file, then a rename.
fn install(dir: &TempDir, src: &Path, name: &str) {
    let tmp = dir.path().join(format!(".{name}.part"));
    std::fs::copy(src, &tmp).unwrap();
    std::fs::rename(&tmp, dir.path().join(name)).unwrap();
}

/// Whether the last 6 answers after `since` all came from `lang`.
fn serving(seen: &Mutex<Vec<Answer>>, since: Instant, lang: Lang) -> bool {
    let seen = seen.lock().unwrap();
    let recent: Vec<Lang> = seen
        .iter()
        .rev()
        .take_while(|(t, _)| *t > since)
        .filter_map(|(_, r)| r.as_ref().ok().map(|a| a.1))
        .take(6)
        .collect();
    recent.len() == 6 && recent.iter().all(|l| *l == lang)
}

#[test]
fn python_and_js_plugins_hot_swap_under_load_without_a_failed_request() {
    let _serial = one_at_a_time();
    let python = guest_plugin("python-round-robin");
    let js = guest_plugin("js-round-robin");
    let backends: Vec<Backend> = (1..=3).map(|i| Backend::new(&format!("backend-{i}"))).collect();
    let dir = TempDir::new();
    let cache = TempDir::new(); // cold: the first load of each language compiles
    let rr = dir.path().join("rr.component");
    let out = util::run_cli(&["plugin", "export", "round-robin", "-o", rr.to_str().unwrap()], Duration::from_secs(30));
    assert_eq!(out.code, Some(0), "{out:?}");
    install(&dir, &rr, "live.wasm");

    let mut args = vec!["--listen", "127.0.0.1:0", "--plugins", dir.path().to_str().unwrap(), "--strategy", "live"];
    args.push("--no-access-log");
    let specs: Vec<String> = backends.iter().map(|b| b.addr().to_string()).collect();
    for s in &specs {
        args.extend(["-b", s.as_str()]);
    }
    let gw = Gateway::start_with(&args, &[("XDG_CACHE_HOME", cache.path().to_str().unwrap())], STARTUP);

    let seen: Arc<Mutex<Vec<Answer>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let client = {
        let (seen, stop, addr) = (seen.clone(), stop.clone(), gw.addr);
        std::thread::spawn(move || {
            let mut conn = KeepAlive::open(addr).expect("connect");
            let deadline = Instant::now() + Duration::from_secs(600);
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                let result = match conn.get("/") {
                    Ok(r) if r.status == 200 => {
                        let backend = r.body.trim().strip_prefix("backend-").and_then(|n| n.parse::<u8>().ok());
                        let lang = match r.header("x-round-robin") {
                            "" => Some(Lang::Builtin),
                            "python" => Some(Lang::Python),
                            "js" => Some(Lang::Js),
                            _ => None,
                        };
                        match (backend, lang) {
                            (Some(b), Some(l)) => Ok((b - 1, l)),
                            _ => Err(format!("unexpected answer {r:?}")),
                        }
                    }
                    Ok(r) => Err(format!("status {}: {}", r.status, r.body)),
                    Err(e) => Err(e),
                };
                let failed = result.is_err();
                seen.lock().unwrap().push((Instant::now(), result));
                if failed {
                    conn = KeepAlive::open(addr).expect("reconnect");
                }
            }
        })
    };

    let t0 = Instant::now();
    assert!(
        poll_until(Duration::from_secs(10), Duration::from_millis(10), || serving(&seen, t0, Lang::Builtin)
            .then_some(()))
        .is_some(),
        "the built-in round robin never served"
    );

    // Built-in -> Python -> JS (both compiled cold), then eight swaps between the two,
    // now from the compiled cache.
    let order = [Lang::Python, Lang::Js, Lang::Python, Lang::Js, Lang::Python, Lang::Js, Lang::Python, Lang::Js];
    let order: Vec<Lang> = order.into_iter().chain([Lang::Python, Lang::Js]).collect();
    let mut cold = Vec::new();
    let mut cached = Vec::new();
    for (i, &lang) in order.iter().enumerate() {
        let first_load = i < 2;
        let bound = if first_load { COLD_SWAP } else { CACHED_SWAP };
        let started = Instant::now();
        install(&dir, if lang == Lang::Python { &python } else { &js }, "live.wasm");
        let shown =
            poll_until(bound, Duration::from_millis(2), || serving(&seen, started, lang).then(|| started.elapsed()));
        let Some(latency) = shown else {
            let logs: Vec<String> = gw.logs().iter().map(|l| l.to_string()).collect();
            panic!("swap {i} to {lang:?} did not show within {bound:?}; gateway log:\n{}", logs.join("\n"));
        };
        if first_load { cold.push(latency) } else { cached.push(latency) }
    }
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::Relaxed);
    client.join().unwrap();

    let seen = seen.lock().unwrap();
    let failures: Vec<&String> = seen.iter().filter_map(|(_, r)| r.as_ref().err()).collect();
    assert!(
        failures.is_empty(),
        "{} of {} requests failed, e.g. {:?}",
        failures.len(),
        seen.len(),
        &failures[..failures.len().min(3)]
    );
    let answers: Vec<(u8, Lang)> = seen.iter().filter_map(|(_, r)| r.as_ref().ok().copied()).collect();
    // Once a plugin served, the fallback never answered (its answers carry no header)...
    let first_plugin = answers.iter().position(|a| a.1 != Lang::Builtin).expect("a plugin served");
    let fallbacks = answers[first_plugin..].iter().filter(|a| a.1 == Lang::Builtin).count();
    assert_eq!(
        fallbacks, 0,
        "{fallbacks} answers after the first swap came from the fallback (no x-round-robin header)"
    );
    // ... and the round robin never skipped or repeated a backend across the swaps: every
    // version continues the host counter `turn`.
    let broken = answers.windows(2).filter(|w| w[1].0 != (w[0].0 + 1) % 3).count();
    assert_eq!(broken, 0, "{broken} times the next answer was not the next backend");
    assert_no_plugin_failures(&gw);

    // What the gateway says it did: the first load of each language compiled, every
    // later swap loaded the compiled cache.
    let swaps = gw.logs_matching(|l| message(l).starts_with("plugin swapped"));
    assert_eq!(swaps.len(), order.len(), "one `plugin swapped` line per swap: {swaps:?}");
    let field = |l: &serde_json::Value, k: &str| l.get(k).or_else(|| l.get("fields").and_then(|f| f.get(k))).cloned();
    for (i, line) in swaps.iter().enumerate() {
        let from_cache = field(line, "from_cache").and_then(|v| v.as_bool());
        assert_eq!(from_cache, Some(i >= 2), "swap {i}: {line}");
    }
    let ms = |k: &str| -> Vec<String> {
        swaps.iter().map(|l| field(l, k).and_then(|v| v.as_f64()).map_or("?".into(), |v| format!("{v:.0}"))).collect()
    };
    eprintln!("hot swap: gateway compile/load ms {:?}, swap ms {:?}", ms("compile_ms"), ms("swap_ms"));

    cached.sort();
    eprintln!(
        "hot swap: {} requests, 0 failed; first load (compile) python {:.2?}, js {:.2?}; {} cached swaps: median {:.0?}, max {:.0?}",
        answers.len(),
        cold[0],
        cold[1],
        cached.len(),
        cached[cached.len() / 2],
        cached[cached.len() - 1]
    );
}

// ---------------------------------------------------------------------------------------
// (e) A plugin that loads but fails when called: caught before it ships, explained when
// it runs

#[test]
fn smoke_check_catches_a_python_exception_in_pick_that_a_plain_check_lets_through() {
    let _serial = one_at_a_time();
    let plugin = guest_plugin("python-attribute-error");
    let file = plugin.to_str().unwrap();
    let cache = example_cache();
    let env = [("XDG_CACHE_HOME", cache.as_str())];
    let plain = run_cli_with_env(&["plugin", "check", file], &env, Duration::from_secs(120));
    assert_eq!(plain.code, Some(0), "configure and loading work: {plain:?}");
    let smoke = run_cli_with_env(&["plugin", "check", file, "--smoke"], &env, Duration::from_secs(120));
    assert_eq!(smoke.code, Some(1), "{smoke:?}");
    assert!(smoke.stderr.contains("pick #1") && smoke.stderr.contains("failed"), "{smoke:?}");
    // The traceback the plugin logged (`@report_errors`) comes with the trap: the line
    // that names the exception, and the line of the plugin where it was raised.
    assert!(smoke.stderr.contains("the plugin said: Traceback (most recent call last):"), "{smoke:?}");
    assert!(smoke.stderr.contains("AttributeError: ") && smoke.stderr.contains("'paht'"), "{smoke:?}");
    assert!(smoke.stderr.contains("in pick"), "{smoke:?}");
    eprintln!("plugin check --smoke: {}", smoke.stderr.trim());
}

/// Serves requests through `name`, a plugin whose every `pick` fails: each is answered
/// 200 by the fallback. Returns the failure's log line (its message) and the plugin's own
/// error-level log line.
fn failure_seen_by_the_operator(name: &str) -> (String, String) {
    let plugin = guest_plugin(name);
    let b: Vec<Backend> = (1..=2).map(|i| Backend::new(&format!("backend-{i}"))).collect();
    let specs: Vec<String> = b.iter().map(|b| b.addr().to_string()).collect();
    let (gw, _dir) = start_with_plugin(&plugin, name, &specs, &[], &example_cache());
    let answered = backends_for(&gw, "/", &[], 6);
    assert!(answered.iter().all(|b| b.starts_with("backend-")), "{answered:?}");
    let failed = gw.wait_for_log(Duration::from_secs(10), |l| message(l).starts_with("plugin call failed"));
    assert!(failed["level"] == "WARN" && failed["plugin"] == name, "{failed}");
    let said = gw.wait_for_log(Duration::from_secs(10), |l| l["level"] == "ERROR" && l["plugin"] == name);
    (message(&failed).to_owned(), message(&said).to_owned())
}

#[test]
fn a_python_exception_in_pick_reaches_the_log_with_its_traceback() {
    let _serial = one_at_a_time();
    let (failed, said) = failure_seen_by_the_operator("python-attribute-error");
    assert!(failed.contains("pick: wasm trap: "), "{failed}");
    assert!(failed.contains("; the plugin said: Traceback (most recent call last):"), "{failed}");
    assert!(failed.contains("AttributeError: ") && failed.contains("'paht'"), "{failed}");
    assert!(
        failed.ends_with("; the instance was discarded and the fallback round robin chose the backend"),
        "{failed}"
    );
    assert!(said.starts_with("Traceback (most recent call last):") && said.contains("AttributeError: "), "{said}");
    eprintln!("python-attribute-error: {failed}");
}

#[test]
fn a_javascript_exception_in_pick_reaches_the_log_with_its_message() {
    let _serial = one_at_a_time();
    let (failed, said) = failure_seen_by_the_operator("js-throws");
    assert!(failed.contains("pick: wasm trap: "), "{failed}");
    assert!(failed.contains("; the plugin said: RangeError: js-throws: no route for / (2 backends)"), "{failed}");
    assert!(said.starts_with("RangeError: js-throws: no route for /"), "{said}");
    eprintln!("js-throws: {failed}");
}
