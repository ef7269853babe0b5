//! The metrics as an operator consumes them: a real Prometheus (`/usr/bin/prometheus`, the
//! Debian package `scripts/test.sh` installs) scrapes the real gateway's admin listener
//! every second while three real backends take traffic. Through Prometheus's HTTP API the
//! test checks that every backend's request rate shows, that a killed backend shows as
//! down, and that every query of `examples/observability/grafana-dashboard.json` is valid
//! PromQL over metrics the gateway exports (the core panels with data).
//!
//! Without Prometheus the test is skipped with a loud message, except under `CI`, where it
//! fails.

mod util;

use serde_json::Value;
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use util::{Backend, Gateway, KeepAlive, TempDir, get, poll_until, request};

/// How often Prometheus scrapes the gateway in this test.
const SCRAPE: Duration = Duration::from_secs(1);
/// The longest wait for any one thing to show in Prometheus.
const WAIT: Duration = Duration::from_secs(30);
/// What `$__rate_interval` becomes (Grafana makes it at least 4 scrape intervals).
const RATE_INTERVAL: &str = "5s";
/// The dashboard panels that must show data while traffic flows.
const CORE_PANELS: &[&str] = &["Requests/s by upstream", "Requests/s by backend", "Backends up"];

const DASHBOARD: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/observability/grafana-dashboard.json");

/// A Prometheus server on a free loopback port, with its data in a scratch folder;
/// killed (by its PID) when dropped.
struct Prometheus {
    child: Child,
    addr: SocketAddr,
    log: PathBuf,
}

impl Prometheus {
    /// Starts `binary` scraping `target`'s `/metrics` every [`SCRAPE`], and waits until it is ready.
    fn start(binary: &Path, dir: &TempDir, target: SocketAddr) -> Prometheus {
        let config = dir.write(
            "prometheus.yml",
            format!(
                "global:\n  scrape_interval: {s}s\n  evaluation_interval: {s}s\n\
                 scrape_configs:\n  - job_name: gateway\n    scrape_interval: {s}s\n    scrape_timeout: {s}s\n\
                 \x20   static_configs:\n      - targets: [\"{target}\"]\n",
                s = SCRAPE.as_secs()
            ),
        );
        // A free port can be taken between probing and binding it: try a few.
        let mut last_log = String::new();
        for attempt in 0..3 {
            let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            let log = dir.path().join(format!("prometheus-{attempt}.log"));
            let out = std::fs::File::create(&log).expect("create the Prometheus log");
            let child = Command::new(binary)
                .arg(format!("--config.file={}", config.display()))
                .arg(format!("--storage.tsdb.path={}", dir.path().join(format!("tsdb-{attempt}")).display()))
                .arg(format!("--web.listen-address={addr}"))
                .stdin(Stdio::null())
                .stdout(out.try_clone().unwrap())
                .stderr(out)
                .spawn()
                .unwrap_or_else(|e| panic!("start {}: {e}", binary.display()));
            let mut prom = Prometheus { child, addr, log };
            let ready = poll_until(WAIT, Duration::from_millis(100), || {
                if prom.child.try_wait().ok().flatten().is_some() {
                    return Some(false);
                }
                matches!(get_ok(addr, "/-/ready"), Ok(r) if r.status == 200).then_some(true)
            });
            match ready {
                Some(true) => return prom,
                Some(false) => last_log = prom.log_text(), // exited: likely the port; try another
                None => panic!("Prometheus was not ready within {WAIT:?}; its log:\n{}", prom.log_text()),
            }
        }
        panic!("Prometheus did not start; its last log:\n{last_log}");
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Runs an instant query: the result vector, or Prometheus's error.
    fn query(&self, promql: &str) -> Result<Vec<Value>, String> {
        let reply = get_ok(self.addr, &format!("/api/v1/query?query={}", encode(promql)))?;
        let body: Value = serde_json::from_str(&reply.body)
            .map_err(|e| format!("not JSON ({e}): {} {}", reply.status, reply.body))?;
        if body["status"] != "success" {
            return Err(format!("{} {}: {}", reply.status, body["errorType"], body["error"]));
        }
        Ok(body["data"]["result"].as_array().cloned().unwrap_or_default())
    }

    /// Polls `promql` until `accept` takes its result, for at most [`WAIT`].
    fn wait_for(&self, what: &str, promql: &str, accept: impl Fn(&[Value]) -> bool) -> Vec<Value> {
        let mut last = Err(String::from("not run"));
        poll_until(WAIT, Duration::from_millis(250), || {
            last = self.query(promql);
            match &last {
                Ok(result) if accept(result) => Some(result.clone()),
                _ => None,
            }
        })
        .unwrap_or_else(|| panic!("{what}: `{promql}` did not show it within {WAIT:?}; last answer: {last:?}"))
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        // Child::kill signals this PID only.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn get_ok(addr: SocketAddr, path: &str) -> Result<util::Reply, String> {
    request(addr, "GET", path, None)
}

/// Percent-encodes everything but RFC 3986's unreserved characters.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The Prometheus binary: `$PATH` or `/usr/bin`. `None` (after saying so) to skip the
/// test; panics under `CI`.
fn prometheus_binary() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let found = std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/bin")])
        .map(|d| d.join("prometheus"))
        .find(|p| p.is_file());
    if found.is_none() {
        let msg = "prometheus is not installed (Debian: `apt-get install prometheus`; scripts/test.sh installs it)";
        if std::env::var_os("CI").is_some_and(|v| !v.is_empty()) {
            panic!("{msg}");
        }
        eprintln!("\n*** SKIPPED observability test: {msg} ***\n");
    }
    found
}

/// Keep-alive GETs through the gateway, about 400 a second, until stopped (at most 90 s
/// or 40 000 requests). Tolerates failures (a backend is killed on purpose): it counts
/// them and reconnects.
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Load {
    fn start(addr: SocketAddr) -> Load {
        let (stop, ok) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)));
        let (stop2, ok2) = (stop.clone(), ok.clone());
        let thread = std::thread::spawn(move || {
            let started = Instant::now();
            let mut conn = None;
            for i in 0..40_000u32 {
                if stop2.load(Ordering::Relaxed) || started.elapsed() > Duration::from_secs(90) {
                    break;
                }
                if conn.is_none() {
                    conn = KeepAlive::open(addr).ok();
                }
                match conn.as_mut().map(|c| c.get(&format!("/load/{i}"))) {
                    Some(Ok(r)) if r.status == 200 => {
                        ok2.fetch_add(1, Ordering::Relaxed);
                    }
                    Some(Ok(_)) => {}
                    _ => conn = None,
                }
                std::thread::sleep(Duration::from_micros(2_500));
            }
        });
        Load { stop, ok, thread: Some(thread) }
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One upstream `web` over `backends` (ids = names) with fast TCP health checks.
fn config(backends: &[&Backend]) -> String {
    let list: String =
        backends.iter().map(|b| format!("      - address: {}\n        id: {}\n", b.addr(), b.name())).collect();
    format!(
        "listeners:\n  - address: 127.0.0.1:0\nthreads: 2\nupstreams:\n  web:\n    health_check:\n      \
         interval: 200ms\n      timeout: 500ms\n      rise: 2\n      fall: 2\n    backends:\n{list}"
    )
}

/// Every query of every panel (rows' nested panels too): (panel title, expression).
fn dashboard_queries(dashboard: &Value) -> Vec<(String, String)> {
    fn walk(panels: &Value, out: &mut Vec<(String, String)>) {
        for panel in panels.as_array().into_iter().flatten() {
            let title = panel["title"].as_str().unwrap_or("(untitled)").to_owned();
            for target in panel["targets"].as_array().into_iter().flatten() {
                if let Some(expr) = target["expr"].as_str() {
                    out.push((title.clone(), expr.to_owned()));
                }
            }
            walk(&panel["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&dashboard["panels"], &mut out);
    out
}

/// The dashboard's template variables replaced as Grafana would.
fn substitute(expr: &str) -> String {
    expr.replace("$__rate_interval", RATE_INTERVAL)
        .replace("${upstream}", ".*")
        .replace("$upstream", ".*")
        .replace("$__interval", RATE_INTERVAL)
}

/// Metric names an expression reads (`gateway_...`).
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = expr;
    while let Some(at) = rest.find("gateway_") {
        let name: String =
            rest[at..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == ':').collect();
        rest = &rest[at + name.len()..];
        names.insert(name);
    }
    names
}

/// Whether a sample name is one the exposition declares: `# TYPE family kind` covers
/// `family`, and `family_total` / `_bucket` / `_count` / `_sum` / `_info` / `_created`.
fn declared(families: &BTreeSet<String>, name: &str) -> bool {
    families.contains(name)
        || ["_total", "_bucket", "_count", "_sum", "_info", "_created"]
            .iter()
            .any(|suffix| name.strip_suffix(suffix).is_some_and(|f| families.contains(f)))
}

#[test]
fn prometheus_scrapes_the_gateway_and_every_dashboard_query_works() {
    let Some(binary) = prometheus_binary() else { return };
    // Dropped last: the Prometheus data and the gateway config live here.
    let dir = TempDir::new();
    let backends = [Backend::new("b1"), Backend::new("b2"), Backend::new("b3")];
    let [b1, b2, b3] = &backends;
    let file = dir.write("gw.yaml", config(&[b1, b2, b3]));
    let plugins = dir.path().join("plugins");
    let gw = Gateway::with_config(&file, &plugins);
    let admin = gw.admin_addr();
    assert_eq!(get(gw.addr, "/").0, 200, "the gateway proxies");

    // The exposition itself: every family the gateway declares.
    let metrics = get_ok(admin, "/metrics").unwrap_or_else(|e| panic!("GET /metrics: {e}"));
    assert_eq!(metrics.status, 200, "GET /metrics: {}", metrics.body);
    let families: BTreeSet<String> = metrics
        .body
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect();
    assert!(families.iter().any(|f| f.starts_with("gateway_")), "no gateway_ family in /metrics:\n{}", metrics.body);

    let prom = Prometheus::start(&binary, &dir, admin);
    let load = Load::start(gw.addr);

    // Prometheus scrapes the admin listener successfully.
    prom.wait_for("the gateway target is up", "up{job=\"gateway\"} == 1", |r| r.len() == 1);

    // Every backend's request rate shows.
    let by_backend = "sum by (backend) (rate(gateway_requests_total{upstream=\"web\"}[5s])) > 0";
    prom.wait_for("a request rate for each of b1, b2, b3", by_backend, |r| {
        let seen: BTreeSet<&str> = r.iter().filter_map(|s| s["metric"]["backend"].as_str()).collect();
        ["b1", "b2", "b3"].iter().all(|b| seen.contains(b))
    });
    // The dashboard's `upstream` variable (`label_values(gateway_requests_total, upstream)`).
    prom.wait_for("the upstream variable's values", "group by (upstream) (gateway_requests_total)", |r| {
        r.iter().any(|s| s["metric"]["upstream"] == "web")
    });

    // Every dashboard query: valid PromQL, over metrics the gateway declares; the core
    // panels with data.
    let dashboard: Value =
        serde_json::from_str(&std::fs::read_to_string(DASHBOARD).expect("read the dashboard")).expect("dashboard JSON");
    let queries = dashboard_queries(&dashboard);
    assert!(queries.len() >= 20, "only {} queries found in {DASHBOARD}", queries.len());
    for core in CORE_PANELS {
        assert!(queries.iter().any(|(t, _)| t == core), "no panel titled {core:?} in the dashboard");
    }
    let mut failures = Vec::new();
    for (title, expr) in &queries {
        let unknown: Vec<String> = metric_names(expr).into_iter().filter(|n| !declared(&families, n)).collect();
        if !unknown.is_empty() {
            failures.push(format!("{title}: `{expr}` reads metrics /metrics does not declare: {unknown:?}"));
        }
        let promql = substitute(expr);
        if CORE_PANELS.contains(&title.as_str()) {
            let mut last = Err(String::new());
            let shown = poll_until(Duration::from_secs(15), Duration::from_millis(250), || {
                last = prom.query(&promql);
                matches!(&last, Ok(r) if !r.is_empty()).then_some(())
            });
            if shown.is_none() {
                failures.push(format!("{title} (core panel): `{promql}` shows no data: {last:?}"));
            }
        } else if let Err(e) = prom.query(&promql) {
            failures.push(format!("{title}: `{promql}` is refused: {e}"));
        }
    }
    assert!(failures.is_empty(), "dashboard queries that fail:\n{}", failures.join("\n"));
    eprintln!("{} dashboard queries checked", queries.len());

    // A backend crashes: the health checker marks it down and Prometheus sees it.
    b3.stop();
    prom.wait_for("b3 down", "gateway_backend_up{upstream=\"web\", backend=\"b3\"} == 0", |r| r.len() == 1);
    let up = prom.query("gateway_backend_up{upstream=\"web\"} == 1").expect("query backends up");
    let up: BTreeSet<&str> = up.iter().filter_map(|s| s["metric"]["backend"].as_str()).collect();
    assert_eq!(up, BTreeSet::from(["b1", "b2"]), "the other backends stay up");

    let ok = load.ok.load(Ordering::Relaxed);
    drop(load);
    assert!(ok > 0, "no request of the load succeeded");
    drop(prom);
}
