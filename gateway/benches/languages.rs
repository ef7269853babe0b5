//! What a plugin costs in each guest language: Rust (the built-in round robin and the
//! `rust-header-canary` example), Python (`python-round-robin`, `python-path-router`)
//! JavaScript/StarlingMonkey (`js-round-robin`, `js-least-latency`) and C
//! (`c-round-robin`, zig cc). The
//! `*-round-robin` plugins are one algorithm in four languages (exact round robin over a
//! host counter), so they compare the languages; the examples show real strategies.
//!
//! For each plugin, through the gateway's own `PluginHost` / `Binding` / `Selector` (as
//! `decision.rs` does):
//!
//! - **size** of the component;
//! - **cold compile**: wasmtime compiles it, compiled cache off (`plugins.cache = false`);
//! - **cached load**: loading the compilation the gateway cached on disk;
//! - **bind**: instantiate on a scratch store and run `configure` (what `bind` and a hot
//!   swap do to check a version before it serves);
//! - **first call**: the first `pick` on a worker thread: a fresh instance, `configure`,
//!   `pool-changed` with 10 backends, then `pick` (what warming a worker costs);
//! - **steady pick** at 10 and 1,000 backends (criterion): one decision with the instance
//!   reused and the pool already pushed, request lent through the resource. The deadline
//!   is raised to 1 s here, so that a garbage-collection pause is counted in the mean
//!   instead of ending the instance;
//! - **pauses**: 100,000 picks (10 backends) one by one under the default 20 ms deadline:
//!   the longest, and how many ran past the deadline (the gateway then discards the
//!   instance and its fallback round robin answers).
//!
//! ```sh
//! scripts/build-guest-plugins.sh                       # the Python/JS/Rust components
//! cargo bench -p gateway --bench languages             # everything (~3 min on 2 cores)
//! cargo bench -p gateway --bench languages -- python   # names containing "python"
//! ```
//!
//! A plugin whose component is not built is skipped with a message. Results: a table on
//! stdout at the end, and docs/plugins.md (the measured table, with the machine).

use criterion::{BenchmarkId, Criterion, Throughput};
use gateway::config;
use gateway::plugin::{self, Origin, PluginHost};
use gateway::pool::{BackendEntry, Pool, PoolSnapshot};
use gateway::select::{Choice, Selector};
use std::collections::BTreeMap;
use std::hint::black_box;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Pool sizes for the steady-state decision.
const SIZES: [usize; 2] = [10, 1_000];

/// A plugin to measure.
struct Subject {
    /// Name in the tables.
    name: &'static str,
    /// Rust, Python, JS or C.
    lang: &'static str,
    /// The component file, or `None` for the built-in round robin.
    file: Option<&'static str>,
    /// `configure` params.
    params: &'static str,
}

const SUBJECTS: &[Subject] = &[
    Subject { name: "round-robin (built-in)", lang: "Rust", file: None, params: "{}" },
    Subject { name: "rust-header-canary", lang: "Rust", file: Some("rust-header-canary"), params: r#"{"percent": 0}"# },
    Subject { name: "python-round-robin", lang: "Python", file: Some("python-round-robin"), params: "{}" },
    Subject {
        name: "python-path-router",
        lang: "Python",
        file: Some("python-path-router"),
        params: r#"{"routes": {"/api": "api", "/static": "static"}}"#,
    },
    Subject { name: "js-round-robin", lang: "JS", file: Some("js-round-robin"), params: "{}" },
    Subject { name: "js-least-latency", lang: "JS", file: Some("js-least-latency"), params: "{}" },
    Subject { name: "c-round-robin", lang: "C", file: Some("c-round-robin"), params: "{}" },
];

fn guest_dir() -> PathBuf {
    std::env::var_os("GUEST_OUT_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/guest-plugins"))
}

/// Backends `b0..`, every fifth labelled `canary=true` / `role=api`.
fn pool(n: usize) -> Pool {
    Pool::new(
        (0..n)
            .map(|i| {
                let addr = SocketAddr::from(([10, (i >> 16) as u8, (i >> 8) as u8, i as u8], 8000));
                let labels = if i % 5 == 0 {
                    vec![("canary".to_owned(), "true".to_owned()), ("role".to_owned(), "api".to_owned())]
                } else {
                    vec![]
                };
                Arc::new(BackendEntry::new(format!("b{i}"), addr, String::new(), labels, gateway::pool::Source::Static))
            })
            .collect(),
    )
}

fn request() -> http::request::Parts {
    http::Request::get("/book/dune?user=42")
        .header("host", "shop.example")
        .header("user-agent", "bench")
        .header("cookie", "lb=b1")
        .body(())
        .unwrap()
        .into_parts()
        .0
}

fn client() -> IpAddr {
    "203.0.113.7".parse().unwrap()
}

fn choose_ok(selector: &Selector, parts: &mut http::request::Parts, snap: &Arc<PoolSnapshot>, name: &str) {
    let choice = selector.choose(parts, client(), snap, &[]);
    assert!(matches!(choice, Choice::Backend { fallback: false, .. }), "{name}: {choice:?}");
    black_box(choice);
}

/// The bench's own compiled-plugin cache (filled by the first compile of each plugin).
fn cache_dir() -> PathBuf {
    std::env::temp_dir().join(format!("gateway-bench-cache-{}", std::process::id()))
}

fn with_cache(cfg: config::Plugins) -> config::Plugins {
    config::Plugins { cache: true, cache_dir: Some(cache_dir()), ..cfg }
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn fmt(d: Duration) -> String {
    let us = d.as_secs_f64() * 1e6;
    if us < 1_000.0 {
        format!("{us:.1} µs")
    } else if us < 1_000_000.0 {
        format!("{:.1} ms", us / 1e3)
    } else {
        format!("{:.1} s", us / 1e6)
    }
}

/// One-shot costs of one plugin (everything but the steady pick).
#[derive(Default)]
struct OneShot {
    size: usize,
    cold: Duration,
    cached: Duration,
    bind: Duration,
    first_call: Duration,
    /// Picks timed one by one, the longest, and how many the fallback answered.
    calls: usize,
    longest: Duration,
    fallbacks: usize,
}

fn one_shot(s: &Subject, bytes: &[u8], origin: &Origin, runs: usize) -> OneShot {
    let params: serde_json::Value = serde_json::from_str(s.params).unwrap();
    // Cold: no cache. Python/JS take seconds, so fewer runs.
    let no_cache = PluginHost::new(&config::Plugins { cache: false, ..Default::default() }).expect("engine");
    let cold_runs = if s.lang == "Rust" { runs.max(3) } else { 1 };
    let cold = median(
        (0..cold_runs)
            .map(|_| no_cache.compile(s.name, origin.clone(), bytes).expect("compiles").compile_time)
            .collect(),
    );
    drop(no_cache);

    // Cached: the bench's cache folder; the first compile writes it, the next ones load it.
    let host = PluginHost::new(&with_cache(config::Plugins::default())).expect("engine");
    host.compile(s.name, origin.clone(), bytes).expect("compiles");
    let cached = median(
        (0..runs.max(3))
            .map(|_| {
                let p = host.compile(s.name, origin.clone(), bytes).expect("loads");
                assert!(p.from_cache, "{}: not loaded from the cache", s.name);
                p.compile_time
            })
            .collect(),
    );

    // bind = instantiate + configure (scratch store); first call = what a worker pays for
    // its first request: instantiate + configure + pool-changed(10) + pick. A fresh
    // thread has no instance yet, so each sample runs on its own thread.
    let plugin = host.compile(s.name, origin.clone(), bytes).expect("loads");
    let pool = pool(10);
    let snap = pool.snapshot();
    let mut binds = Vec::new();
    let mut firsts = Vec::new();
    for _ in 0..runs.max(3) {
        let started = Instant::now();
        let binding = host.bind("bench", plugin.clone(), &params).expect("configure accepts the params");
        binds.push(started.elapsed());
        let selector = Selector::new(binding);
        firsts.push(std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    let mut parts = request();
                    let started = Instant::now();
                    choose_ok(&selector, &mut parts, &snap, s.name);
                    started.elapsed()
                })
                .join()
                .unwrap()
        }));
    }
    drop(host);

    // Pauses: the default budget (20 ms per pick), every call timed.
    let host = PluginHost::new(&with_cache(config::Plugins::default())).expect("engine");
    let plugin = host.compile(s.name, origin.clone(), bytes).expect("compiles");
    let selector = Selector::new(host.bind("bench", plugin, &params).expect("configure"));
    selector.binding().warm(&snap).expect("warm");
    let mut parts = request();
    let calls = if runs > 1 { 100_000 } else { 1_000 };
    let mut longest = Duration::ZERO;
    for _ in 0..calls {
        let started = Instant::now();
        black_box(selector.choose(&mut parts, client(), &snap, &[]));
        longest = longest.max(started.elapsed());
    }
    let fallbacks = selector.fallbacks() as usize;
    OneShot {
        size: bytes.len(),
        cold,
        cached,
        bind: median(binds),
        first_call: median(firsts),
        calls,
        longest,
        fallbacks,
    }
}

/// Per-call means of the samples criterion took, per (plugin, pool size).
type Steady = Arc<Mutex<BTreeMap<(String, usize), Vec<Duration>>>>;

fn steady(c: &mut Criterion, s: &Subject, bytes: &[u8], origin: &Origin, results: &Steady) {
    // A garbage-collection pause of StarlingMonkey (~27 ms every ~80,000 calls) would end
    // the instance under the default 20 ms deadline: give it room, count it in the mean.
    let cfg = config::Plugins { deadline: Duration::from_secs(1), ..Default::default() };
    let host = PluginHost::new(&with_cache(cfg)).expect("engine");
    let plugin = host.compile(s.name, origin.clone(), bytes).expect("compiles");
    let params: serde_json::Value = serde_json::from_str(s.params).unwrap();
    let mut group = c.benchmark_group("language-pick");
    group.throughput(Throughput::Elements(1));
    for n in SIZES {
        let pool = pool(n);
        let snap = pool.snapshot();
        let mut parts = request();
        // A binding (and so an instance) per pool: every `Pool::new` starts at generation
        // 1, and an instance that has seen generation 1 would not be sent another pool.
        let selector = Selector::new(host.bind("bench", plugin.clone(), &params).expect("configure"));
        // As a worker does before traffic: instantiate and push the pool once.
        selector.binding().warm(&snap).expect("warm");
        let results = results.clone();
        group.bench_with_input(BenchmarkId::new(s.name, n), &n, |b, _| {
            b.iter_custom(|iters| {
                let started = Instant::now();
                for _ in 0..iters {
                    choose_ok(&selector, &mut parts, &snap, s.name);
                }
                let elapsed = started.elapsed();
                results.lock().unwrap().entry((s.name.to_owned(), n)).or_default().push(elapsed / iters.max(1) as u32);
                elapsed
            })
        });
    }
    group.finish();
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // `cargo bench` passes --bench; without it (cargo test --benches) every step runs once.
    let bench_mode = args.iter().any(|a| a == "--bench");
    let filters: Vec<&String> = args.iter().filter(|a| !a.starts_with('-')).collect();
    let mut c = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(30)
        .configure_from_args();

    let mut rows = Vec::new();
    let results: Steady = Arc::default();
    for s in SUBJECTS {
        if !filters.is_empty() && !filters.iter().any(|f| s.name.contains(f.as_str())) {
            continue;
        }
        let (bytes, origin): (Vec<u8>, Origin) = match s.file {
            None => (
                plugin::builtin_bytes("round-robin").expect("built-in").to_vec(),
                Origin::Builtin("round-robin".into()),
            ),
            Some(file) => {
                let path = guest_dir().join(format!("{file}.wasm"));
                match std::fs::read(&path) {
                    Ok(b) => (b, Origin::File(path)),
                    Err(e) => {
                        eprintln!(
                            "skipping {} ({}): cannot read {} ({e}); run scripts/build-guest-plugins.sh",
                            s.name,
                            s.lang,
                            path.display()
                        );
                        continue;
                    }
                }
            }
        };
        eprintln!("{}: one-shot costs ...", s.name);
        let shot = one_shot(s, &bytes, &origin, if bench_mode { 5 } else { 1 });
        steady(&mut c, s, &bytes, &origin, &results);
        rows.push((s, shot));
    }
    c.final_summary();
    let _ = std::fs::remove_dir_all(cache_dir());

    let results = results.lock().unwrap();
    let steady_of = |name: &str, n: usize| {
        results.get(&(name.to_owned(), n)).map(|v| fmt(median(v.clone()))).unwrap_or_else(|| "-".into())
    };
    if !bench_mode {
        println!("\n(test mode, not `cargo bench`: every figure below is a single run)");
    }
    println!(
        "\n| plugin | language | size | cold compile | cached load | bind (instantiate + configure) | first call (fresh instance, 10 backends) | pick, 10 backends | pick, 1,000 backends | longest of N picks (20 ms deadline) |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for (s, shot) in &rows {
        let size = if shot.size >= 1 << 20 {
            format!("{:.1} MB", shot.size as f64 / (1 << 20) as f64)
        } else {
            format!("{} KB", shot.size.div_ceil(1024))
        };
        let past = if shot.fallbacks > 0 { format!(", {} past the deadline", shot.fallbacks) } else { String::new() };
        println!(
            "| {} | {} | {size} | {} | {} | {} | {} | {} | {} | {} (N = {}{past}) |",
            s.name,
            s.lang,
            fmt(shot.cold),
            fmt(shot.cached),
            fmt(shot.bind),
            fmt(shot.first_call),
            steady_of(s.name, SIZES[0]),
            steady_of(s.name, SIZES[1]),
            fmt(shot.longest),
            shot.calls,
        );
    }
}
