//! `gateway replay`: recorded requests through a strategy, offline and in-process, with
//! the same host a live gateway gives plugins (counters, key-value store, backend stats),
//! so a strategy can be judged on production traffic before it ships.
//!
//! Input: JSON lines, one request each: the gateway's own JSON access log as it is
//! (`method`, `host`, `path`, `client`), optionally with `headers` (an object) for what
//! the access log does not record. A `set-cookie` a strategy adds is sent back on the
//! same client's later requests, as a browser would, so sticky strategies replay
//! faithfully.

use crate::config;
use crate::plugin::{Plugin, PluginHost};
use crate::pool::{BackendEntry, BackendStats, Member, Pool, PoolSnapshot, Source, Status};
use crate::select::{Choice, Selector};
use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

mod smoke;
pub use smoke::smoke;

/// What `gateway replay` was asked.
#[derive(Debug, Clone)]
pub struct Options {
    /// Built-in or plugins-folder name, or a `.wasm` file.
    pub strategy: String,
    /// Its `configure` params.
    pub params: serde_json::Value,
    /// The pool file.
    pub pool: PathBuf,
    /// The requests file (JSON lines).
    pub requests: PathBuf,
    /// A second strategy to measure churn against, with its params.
    pub compare: Option<(String, serde_json::Value)>,
    /// Backend ids to take out in a third run.
    pub remove: Vec<String>,
    /// What identifies a client or session for stickiness.
    pub key: Key,
    /// The plugins folder names resolve in.
    pub plugins: PathBuf,
}

/// The request attribute stickiness and key movement are measured by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Key {
    /// The client's IP address.
    Client,
    /// A request header.
    Header(String),
    /// A cookie (as sent, including cookies the strategy set earlier).
    Cookie(String),
    /// A query parameter.
    Query(String),
}

impl std::str::FromStr for Key {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let named = |rest: &str| {
            if rest.is_empty() { Err(format!("`{s}`: name the {}", &s[..s.len() - 1])) } else { Ok(rest.to_owned()) }
        };
        match s.split_once(':') {
            None if s == "client" => Ok(Key::Client),
            Some(("header", name)) => named(name).map(|n| Key::Header(n.to_ascii_lowercase())),
            Some(("cookie", name)) => named(name).map(Key::Cookie),
            Some(("query", name)) => named(name).map(Key::Query),
            _ => Err(format!("`{s}`: use client, header:NAME, cookie:NAME or query:NAME")),
        }
    }
}

impl std::fmt::Display for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Key::Client => f.write_str("client"),
            Key::Header(n) => write!(f, "header:{n}"),
            Key::Cookie(n) => write!(f, "cookie:{n}"),
            Key::Query(n) => write!(f, "query:{n}"),
        }
    }
}

/// One backend of the pool file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct PoolBackend {
    id: Option<String>,
    address: SocketAddr,
    #[serde(default = "one")]
    weight: u32,
    #[serde(default)]
    zone: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default = "yes")]
    healthy: bool,
    /// Requests in flight, as `host.stats` will report them.
    #[serde(default)]
    active_requests: u32,
    /// Latency EWMA in µs, as `host.stats` will report it (0: none measured).
    #[serde(default)]
    ewma_latency_us: u32,
}

impl PoolBackend {
    /// Its id: the configured one, else the address.
    fn id(&self) -> String {
        self.id.clone().unwrap_or_else(|| self.address.to_string())
    }
}

fn one() -> u32 {
    1
}

fn yes() -> bool {
    true
}

/// The pool file as a mapping: `backends:` holding the list.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PoolFile {
    backends: Vec<PoolBackend>,
}

/// One request line. Other fields (an access log has many) are ignored.
#[derive(Debug, Deserialize)]
struct Line {
    #[serde(default)]
    method: Option<String>,
    path: String,
    #[serde(default)]
    host: Option<String>,
    #[serde(default, alias = "client_ip")]
    client: Option<IpAddr>,
    #[serde(default)]
    headers: BTreeMap<String, String>,
}

/// A recorded request, ready to replay.
#[derive(Debug, Clone)]
struct Recorded {
    parts: http::request::Parts,
    client: IpAddr,
}

/// Reads the pool file into entries (with their health and stats applied).
fn read_pool(path: &Path) -> anyhow::Result<Vec<PoolBackend>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read the pool file {}", path.display()))?;
    // Parsed straight into the typed shape (not through an untagged enum), so an error
    // keeps its line, column and field.
    let mapping = matches!(serde_yaml::from_str::<serde_yaml::Value>(&text), Ok(serde_yaml::Value::Mapping(_)));
    let parsed = if mapping {
        serde_yaml::from_str::<PoolFile>(&text).map(|f| f.backends)
    } else {
        serde_yaml::from_str::<Vec<PoolBackend>>(&text)
    };
    let backends = parsed.map_err(|e| {
        let at = e.location().map(|l| format!(":{}:{}", l.line(), l.column())).unwrap_or_default();
        anyhow::anyhow!(
            "{}{at}: {e}\n  expected a list of backends (or `backends:` holding one), each \
             {{address: HOST:PORT, id, weight, zone, labels, healthy, active_requests, ewma_latency_us}}",
            path.display()
        )
    })?;
    if backends.is_empty() {
        bail!("{}: the pool has no backend", path.display());
    }
    let mut seen = std::collections::HashSet::new();
    for b in &backends {
        let id = b.id();
        if !seen.insert(id.clone()) {
            bail!("{}: backend id `{id}` appears twice", path.display());
        }
    }
    Ok(backends)
}

/// Reads the JSON-lines requests file.
fn read_requests(path: &Path) -> anyhow::Result<Vec<Recorded>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read the requests file {}", path.display()))?;
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        if raw.trim().is_empty() {
            continue;
        }
        let at = || format!("{}:{}", path.display(), i + 1);
        let line: Line = serde_json::from_str(raw).map_err(|e| {
            let text = e.to_string();
            let what = text.rsplit_once(" at line ").map_or(text.as_str(), |(w, _)| w);
            anyhow::anyhow!(
                "{}:{}: {what}\n  each line is one JSON object: the gateway's JSON access log, or \
                 {{\"method\": \"GET\", \"path\": \"/x\", \"host\": \"a.example\", \"client\": \"203.0.113.7\", \"headers\": {{}}}}",
                at(),
                e.column()
            )
        })?;
        let mut builder =
            http::Request::builder().method(line.method.as_deref().unwrap_or("GET")).uri(line.path.as_str());
        if let Some(host) = &line.host {
            builder = builder.header(http::header::HOST, host.as_str());
        }
        for (name, value) in &line.headers {
            builder = builder.header(name.as_str(), value.as_str());
        }
        let request = builder.body(()).map_err(|e| anyhow::anyhow!("{}: {e}", at()))?;
        out.push(Recorded {
            parts: request.into_parts().0,
            client: line.client.unwrap_or(IpAddr::from([127, 0, 0, 1])),
        });
    }
    if out.is_empty() {
        bail!("{}: no requests in the file", path.display());
    }
    Ok(out)
}

/// The pool for one run: `backends` minus `removed`. The returned guards hold the
/// recorded in-flight counts until the run ends.
fn build_pool(backends: &[PoolBackend], removed: &[String]) -> (Arc<PoolSnapshot>, Vec<crate::pool::ActiveGuard>) {
    let mut guards = Vec::new();
    let members = backends
        .iter()
        .filter(|b| !removed.contains(&b.id()))
        .map(|b| {
            let id = b.id();
            let labels = b.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
            let entry = Arc::new(BackendEntry::new(id, b.address, b.zone.clone(), labels, Source::Static));
            if b.ewma_latency_us > 0 {
                entry.stats.success(Duration::from_micros(b.ewma_latency_us.into()));
            }
            guards.extend((0..b.active_requests).map(|_| BackendStats::start(&entry)));
            let status = if b.healthy { Status::UP } else { Status { up: false, ..Status::UP } };
            Member::new(entry, status, b.weight)
        })
        .collect();
    (Pool::with_members(members).snapshot(), guards)
}

/// What one strategy did with every request.
#[derive(Debug, Default)]
struct Run {
    /// Per request: the backend id it went to, or why none.
    outcomes: Vec<Outcome>,
    /// Decision time per request.
    times: Vec<Duration>,
    /// Plugin failures the fallback covered.
    fallbacks: u64,
    elapsed: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    Backend(Arc<str>),
    Reject(u16),
    NoBackend,
}

/// The value of `key` in a request, if it has one.
fn key_of(key: &Key, r: &http::request::Parts, client: IpAddr) -> Option<String> {
    match key {
        Key::Client => Some(client.to_string()),
        Key::Header(name) => r.headers.get(name.as_str()).and_then(|v| v.to_str().ok()).map(str::to_owned),
        Key::Cookie(name) => cookies(r).find(|(n, _)| n == name).map(|(_, v)| v.to_owned()),
        Key::Query(name) => r
            .uri
            .query()
            .and_then(|q| q.split('&').filter_map(|p| p.split_once('=')).find(|(n, _)| n == name).map(|(_, v)| v))
            .map(str::to_owned),
    }
}

fn cookies(r: &http::request::Parts) -> impl Iterator<Item = (&str, &str)> {
    r.headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
}

/// Runs every request through `plugin` on `pool`, one after the other, with a cookie jar
/// per client.
fn run(
    host: &Arc<PluginHost>,
    label: &str,
    plugin: Arc<Plugin>,
    params: &serde_json::Value,
    pool: &Arc<PoolSnapshot>,
    requests: &[Recorded],
    progress: &indicatif::ProgressBar,
) -> anyhow::Result<Run> {
    let binding = host.bind(label, plugin, params).map_err(|e| anyhow::anyhow!("{label}: {e}"))?;
    let selector = Selector::new(binding);
    let ids: Vec<Arc<str>> = pool.members.iter().map(|m| Arc::from(m.entry.id.as_str())).collect();
    let mut jars: HashMap<IpAddr, BTreeMap<String, String>> = HashMap::new();
    let mut out = Run {
        outcomes: Vec::with_capacity(requests.len()),
        times: Vec::with_capacity(requests.len()),
        ..Run::default()
    };
    let started = Instant::now();
    for (n, r) in requests.iter().enumerate() {
        let mut parts = r.parts.clone();
        if let Some(jar) = jars.get(&r.client) {
            let mut sent: BTreeMap<String, String> =
                cookies(&parts).map(|(k, v)| (k.to_owned(), v.to_owned())).collect();
            sent.extend(jar.iter().map(|(k, v)| (k.clone(), v.clone())));
            let line = sent.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join("; ");
            parts.headers.remove(http::header::COOKIE);
            if let Ok(v) = http::HeaderValue::from_str(&line) {
                parts.headers.insert(http::header::COOKIE, v);
            }
        }
        let t = Instant::now();
        let choice = selector.choose(&mut parts, r.client, pool, &[]);
        out.times.push(t.elapsed());
        let (outcome, headers) = match choice {
            Choice::Backend { index, response_headers, .. } => (Outcome::Backend(ids[index].clone()), response_headers),
            Choice::Reject { status, response_headers, .. } => (Outcome::Reject(status), response_headers),
            Choice::NoBackend => (Outcome::NoBackend, Vec::new()),
        };
        for (name, value) in headers {
            if name.eq_ignore_ascii_case("set-cookie")
                && let Some((k, v)) = value.split(';').next().and_then(|c| c.trim().split_once('='))
            {
                jars.entry(r.client).or_default().insert(k.to_owned(), v.to_owned());
            }
        }
        out.outcomes.push(outcome);
        if n % 1024 == 0 {
            progress.inc(1024.min((requests.len() - n) as u64));
        }
    }
    out.elapsed = started.elapsed();
    out.fallbacks = selector.fallbacks();
    Ok(out)
}

/// Requests per backend id, in pool order, and the rest.
#[derive(Debug, Serialize)]
pub struct Distribution {
    /// (backend id, requests).
    pub backends: Vec<(String, u64)>,
    /// Requests the strategy answered itself, by status.
    pub rejected: BTreeMap<u16, u64>,
    /// Requests with no healthy backend.
    pub no_backend: u64,
    /// Plugin failures the native fallback covered.
    pub fallbacks: u64,
}

/// Stickiness: how often a key went to the backend its previous request went to.
#[derive(Debug, Serialize)]
pub struct Stickiness {
    /// The key.
    pub key: String,
    /// Distinct key values seen.
    pub keys: u64,
    /// Requests whose key was seen before (both routed to a backend).
    pub repeats: u64,
    /// Of those, the share that went to the same backend as the previous one.
    pub same_backend: f64,
}

/// Decision time percentiles, in microseconds.
#[derive(Debug, Serialize)]
pub struct Timing {
    /// Median.
    pub p50_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// Requests replayed per second (decisions and bookkeeping).
    pub requests_per_second: f64,
}

/// Churn against another strategy.
#[derive(Debug, Serialize)]
pub struct Comparison {
    /// The other strategy.
    pub strategy: String,
    /// Share of requests (routed by both) that it would send to another backend.
    pub churn: f64,
    /// Its distribution.
    pub distribution: Distribution,
    /// Its decision time.
    pub timing: Timing,
}

/// What removing backends does.
#[derive(Debug, Serialize)]
pub struct Removal {
    /// The ids taken out.
    pub removed: Vec<String>,
    /// Keys whose last request went to a removed backend (they have to move).
    pub keys_on_removed: u64,
    /// Keys whose last request went to a backend that stays.
    pub keys_elsewhere: u64,
    /// Of those, the share that moved anyway (0 for a perfect consistent hash).
    pub moved_elsewhere: f64,
    /// The distribution without the removed backends.
    pub distribution: Distribution,
}

/// The whole report (`--json` prints it as is).
#[derive(Debug, Serialize)]
pub struct Report {
    /// The strategy replayed.
    pub strategy: String,
    /// Requests replayed.
    pub requests: u64,
    /// Its distribution.
    pub distribution: Distribution,
    /// Stickiness by the key.
    pub stickiness: Stickiness,
    /// Decision time.
    pub timing: Timing,
    /// `--compare`.
    pub compare: Option<Comparison>,
    /// `--remove`.
    pub remove: Option<Removal>,
}

fn distribution(run: &Run, pool: &PoolSnapshot) -> Distribution {
    let mut counts: HashMap<&str, u64> = HashMap::new();
    let mut d =
        Distribution { backends: Vec::new(), rejected: BTreeMap::new(), no_backend: 0, fallbacks: run.fallbacks };
    for o in &run.outcomes {
        match o {
            Outcome::Backend(id) => *counts.entry(id).or_default() += 1,
            Outcome::Reject(s) => *d.rejected.entry(*s).or_default() += 1,
            Outcome::NoBackend => d.no_backend += 1,
        }
    }
    d.backends = pool
        .members
        .iter()
        .map(|m| (m.entry.id.clone(), counts.get(m.entry.id.as_str()).copied().unwrap_or(0)))
        .collect();
    d
}

fn timing(run: &Run) -> Timing {
    let mut t: Vec<Duration> = run.times.clone();
    t.sort_unstable();
    let at = |q: f64| t[((t.len() - 1) as f64 * q).round() as usize].as_secs_f64() * 1e6;
    Timing {
        p50_us: at(0.5),
        p99_us: at(0.99),
        requests_per_second: run.outcomes.len() as f64 / run.elapsed.as_secs_f64().max(1e-9),
    }
}

/// The last backend each key's requests went to.
fn last_backend_by_key<'a>(run: &'a Run, keys: &'a [Option<String>]) -> HashMap<&'a str, &'a Arc<str>> {
    let mut last = HashMap::new();
    for (o, k) in run.outcomes.iter().zip(keys) {
        if let (Outcome::Backend(id), Some(k)) = (o, k) {
            last.insert(k.as_str(), id);
        }
    }
    last
}

fn stickiness(key: &Key, run: &Run, keys: &[Option<String>]) -> Stickiness {
    let mut previous: HashMap<&str, &Arc<str>> = HashMap::new();
    let (mut repeats, mut same) = (0u64, 0u64);
    for (o, k) in run.outcomes.iter().zip(keys) {
        let (Outcome::Backend(id), Some(k)) = (o, k) else { continue };
        if let Some(before) = previous.insert(k.as_str(), id) {
            repeats += 1;
            same += u64::from(before == id);
        }
    }
    Stickiness { key: key.to_string(), keys: previous.len() as u64, repeats, same_backend: ratio(same, repeats) }
}

fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 { 0.0 } else { a as f64 / b as f64 }
}

fn resolve(host: &Arc<PluginHost>, name: &str) -> anyhow::Result<Arc<Plugin>> {
    let path = Path::new(name);
    if path.extension().is_some_and(|x| x == "wasm") {
        let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("plugin");
        return host.load_file(stem, path).map_err(|e| anyhow::anyhow!("{name}: {e}"));
    }
    host.resolve(name).map_err(|e| anyhow::anyhow!("strategy `{name}`: {e}"))
}

/// Runs the replay and returns the report. Progress goes to stderr when it is a terminal.
pub fn replay(o: &Options) -> anyhow::Result<Report> {
    let backends = read_pool(&o.pool)?;
    let requests = read_requests(&o.requests)?;
    let host = PluginHost::new(&config::Plugins { dir: o.plugins.clone(), ..Default::default() })?;
    let plugin = resolve(&host, &o.strategy)?;
    let compare =
        o.compare.as_ref().map(|(name, params)| resolve(&host, name).map(|p| (name, p, params))).transpose()?;
    let runs = 1 + u64::from(compare.is_some()) + u64::from(!o.remove.is_empty());
    let progress = indicatif::ProgressBar::with_draw_target(
        Some(requests.len() as u64 * runs),
        indicatif::ProgressDrawTarget::stderr_with_hz(4),
    );
    progress.set_style(
        indicatif::ProgressStyle::with_template("replaying {bar:40} {pos}/{len} requests ({per_sec}, {eta} left)")
            .expect("a valid template"),
    );
    let keys: Vec<Option<String>> = requests.iter().map(|r| key_of(&o.key, &r.parts, r.client)).collect();

    let (pool, _held) = build_pool(&backends, &[]);
    let main = run(&host, "replay", plugin, &o.params, &pool, &requests, &progress)?;
    let mut report = Report {
        strategy: o.strategy.clone(),
        requests: requests.len() as u64,
        distribution: distribution(&main, &pool),
        stickiness: stickiness(&o.key, &main, &keys),
        timing: timing(&main),
        compare: None,
        remove: None,
    };
    if let Some((name, other, params)) = compare {
        let (pool, _held) = build_pool(&backends, &[]);
        let theirs = run(&host, "compare", other, params, &pool, &requests, &progress)?;
        let (mut both, mut moved) = (0u64, 0u64);
        for (a, b) in main.outcomes.iter().zip(&theirs.outcomes) {
            if let (Outcome::Backend(a), Outcome::Backend(b)) = (a, b) {
                both += 1;
                moved += u64::from(a != b);
            }
        }
        report.compare = Some(Comparison {
            strategy: name.clone(),
            churn: ratio(moved, both),
            distribution: distribution(&theirs, &pool),
            timing: timing(&theirs),
        });
    }
    if !o.remove.is_empty() {
        let (smaller, _held) = build_pool(&backends, &o.remove);
        if smaller.members.len() == pool.members.len() {
            bail!("--remove {}: no such backend in {}", o.remove.join(", "), o.pool.display());
        }
        let plugin = resolve(&host, &o.strategy)?;
        let after = run(&host, "remove", plugin, &o.params, &smaller, &requests, &progress)?;
        let before = last_backend_by_key(&main, &keys);
        let now = last_backend_by_key(&after, &keys);
        let (mut on_removed, mut elsewhere, mut moved) = (0u64, 0u64, 0u64);
        for (k, id) in &before {
            if o.remove.iter().any(|r| r.as_str() == &***id) {
                on_removed += 1;
            } else {
                elsewhere += 1;
                moved += u64::from(now.get(k).is_some_and(|n| n != id));
            }
        }
        report.remove = Some(Removal {
            removed: o.remove.clone(),
            keys_on_removed: on_removed,
            keys_elsewhere: elsewhere,
            moved_elsewhere: ratio(moved, elsewhere),
            distribution: distribution(&after, &smaller),
        });
    }
    progress.finish_and_clear();
    Ok(report)
}

fn percent(x: f64) -> String {
    format!("{:.1}%", x * 100.0)
}

fn print_distribution(d: &Distribution, total: u64) {
    let width = d.backends.iter().map(|(id, _)| id.len()).max().unwrap_or(7).max(7);
    for (id, n) in &d.backends {
        let bar = "█".repeat(((*n as f64 / total.max(1) as f64) * 40.0).round() as usize);
        println!("  {id:<width$}  {n:>9}  {:>6}  {bar}", percent(ratio(*n, total)));
    }
    for (status, n) in &d.rejected {
        println!("  {:<width$}  {n:>9}  {:>6}", format!("reject {status}"), percent(ratio(*n, total)));
    }
    if d.no_backend > 0 {
        println!("  {:<width$}  {:>9}  {:>6}", "no backend", d.no_backend, percent(ratio(d.no_backend, total)));
    }
    if d.fallbacks > 0 {
        println!("  ({} decisions made by the native fallback because the plugin failed)", d.fallbacks);
    }
}

/// Prints the report for a person.
pub fn print(r: &Report) {
    println!(
        "replayed {} requests through `{}`: decision p50 {:.2} µs, p99 {:.2} µs; {:.0} requests/s",
        r.requests, r.strategy, r.timing.p50_us, r.timing.p99_us, r.timing.requests_per_second
    );
    print_distribution(&r.distribution, r.requests);
    let s = &r.stickiness;
    println!(
        "stickiness by {}: {} of {} repeat requests ({} distinct keys) went to the backend their key's previous request went to",
        s.key,
        percent(s.same_backend),
        s.repeats,
        s.keys
    );
    if let Some(c) = &r.compare {
        println!(
            "against `{}`: {} of requests would go to another backend (p50 {:.2} µs, p99 {:.2} µs); it would send:",
            c.strategy,
            percent(c.churn),
            c.timing.p50_us,
            c.timing.p99_us
        );
        print_distribution(&c.distribution, r.requests);
    }
    if let Some(m) = &r.remove {
        println!(
            "without {}: {} keys were on it and had to move; {} of the other {} keys moved too; the traffic becomes:",
            m.removed.join(", "),
            m.keys_on_removed,
            percent(m.moved_elsewhere),
            m.keys_elsewhere
        );
        print_distribution(&m.distribution, r.requests);
    }
}
