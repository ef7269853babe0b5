//! What the gateway survives on the backend side, under load from a fixed number of
//! concurrent keep-alive clients: a backend answering 500 (retries held to the retry
//! budget), a frozen backend (SIGSTOP: waiting requests move to another backend as soon
//! as it is marked down), a killed one (SIGKILL) and its replacement, one refusing
//! connections and listening again, one turning 2 s slow, passive ejection bounded by
//! `max_ejected_percent`, and the gateway running out of file descriptors (its problem,
//! not the backends').
//!
//! Each test prints its figures (`figures: ...`) for docs/reliability.md; run with
//! `--nocapture` to see them.

mod util;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use util::{Backend, Gateway, KeepAlive, TempDir, get, message, poll_until, report, rt};

/// The tests here run one at a time: each measures latencies and counts under load,
/// which another test's load on the same (small) machine would distort.
fn serial() -> MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// One request of a load run.
#[derive(Debug, Clone)]
struct Sample {
    /// When it was sent, from the start of the run.
    at: Duration,
    latency: Duration,
    /// 0: no answer (the connection broke).
    status: u16,
}

/// `clients` keep-alive connections, each sending `GET path` back to back until stopped.
struct Load {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<Vec<Sample>>>,
    started: Instant,
}

impl Load {
    fn start(addr: SocketAddr, clients: usize, path: &'static str) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let started = Instant::now();
        let tasks = (0..clients).map(|_| rt().spawn(client(addr, path, stop.clone(), started))).collect();
        Load { stop, tasks, started }
    }

    fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Stops the clients (each finishes its request in flight) and returns every sample.
    fn finish(mut self) -> Vec<Sample> {
        self.stop.store(true, Ordering::Relaxed);
        let tasks = std::mem::take(&mut self.tasks);
        rt().block_on(async {
            let mut all = Vec::new();
            for t in tasks {
                let samples = tokio::time::timeout(Duration::from_secs(60), t)
                    .await
                    .expect("a client finishes within 60s")
                    .expect("a client task ends cleanly");
                all.extend(samples);
            }
            all.sort_by_key(|s| s.at);
            all
        })
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        // A test that panicked mid-run: the clients stop with it.
        self.stop.store(true, Ordering::Relaxed);
    }
}

async fn client(addr: SocketAddr, path: &'static str, stop: Arc<AtomicBool>, started: Instant) -> Vec<Sample> {
    let mut samples = Vec::new();
    let mut conn: Option<hyper::client::conn::http1::SendRequest<Empty<Bytes>>> = None;
    while !stop.load(Ordering::Relaxed) {
        let sender = match &mut conn {
            Some(s) if !s.is_closed() => s,
            _ => {
                let sent = Instant::now();
                let opened = async {
                    let stream = tokio::net::TcpStream::connect(addr).await.ok()?;
                    let _ = stream.set_nodelay(true);
                    hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await.ok()
                };
                match tokio::time::timeout(Duration::from_secs(10), opened).await {
                    Ok(Some((sender, c))) => {
                        tokio::spawn(c);
                        conn.insert(sender)
                    }
                    _ => {
                        // Counted as a failed request; the gateway may be gone.
                        samples.push(Sample { at: sent - started, latency: sent.elapsed(), status: 0 });
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                }
            }
        };
        let req = http::Request::get(path).header("host", "reliability.test").body(Empty::new()).unwrap();
        let sent = Instant::now();
        let status = async {
            sender.ready().await.ok()?;
            let resp = sender.send_request(req).await.ok()?;
            let status = resp.status().as_u16();
            resp.into_body().collect().await.ok()?;
            Some(status)
        };
        let status = tokio::time::timeout(Duration::from_secs(45), status).await.ok().flatten();
        if status.is_none() {
            conn = None;
        }
        samples.push(Sample { at: sent - started, latency: sent.elapsed(), status: status.unwrap_or(0) });
    }
    samples
}

/// The `q` quantile of the latencies, ms.
fn quantile_ms(samples: &[&Sample], q: f64) -> f64 {
    let mut l: Vec<Duration> = samples.iter().map(|s| s.latency).collect();
    l.sort();
    l.get(((l.len() as f64 * q).ceil() as usize).saturating_sub(1)).map_or(0.0, |d| d.as_secs_f64() * 1e3)
}

fn start(dir: &TempDir, yaml: &str) -> Gateway {
    let file = dir.write("gw.yaml", yaml);
    Gateway::with_config(&file, &dir.path().join("plugins"))
}

fn backend_list(backends: &[(String, SocketAddr)]) -> String {
    backends.iter().map(|(name, addr)| format!("      - {{address: \"{addr}\", id: {name}}}\n")).collect()
}

/// The samples of `/metrics` as `name{labels} -> value`.
fn scrape(admin: SocketAddr) -> HashMap<String, f64> {
    let (status, text) = get(admin, "/metrics");
    assert_eq!(status, 200, "{text}");
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_owned(), v.parse().ok()?))
        })
        .collect()
}

/// Three backends, `bad` answering 500 to everything but `/healthz` and `good-1`,
/// `good-2`, with their config lines; the backends run while the first value lives.
fn one_answering_500() -> ([Backend; 3], String) {
    let backends = [Backend::failing("bad", 500), Backend::new("good-1"), Backend::new("good-2")];
    let list = backend_list(&[
        ("bad".into(), backends[0].addr()),
        ("good-1".into(), backends[1].addr()),
        ("good-2".into(), backends[2].addr()),
    ]);
    (backends, list)
}

/// Runs the 500 scenario: three backends, one answering 500 to everything but
/// `/healthz`, 16 clients for `seconds`; passive ejection off, so only retries are at
/// work. Returns (client requests, retries the backends saw, 500s clients got, skipped
/// retries in /metrics).
fn five_hundreds(budget: &str, seconds: u64) -> (usize, usize, usize, f64) {
    let (backends, list) = one_answering_500();
    let dir = TempDir::new();
    let gw = start(
        &dir,
        &format!(
            "listeners: [{{address: 127.0.0.1:0}}]\nthreads: 2\naccess_log: false\nupstreams:\n  web:\n    passive: {{consecutive_failures: 0}}\n    retry_budget: {budget}\n    health_check: {{path: /healthz, interval: 500ms}}\n    backends:\n{list}"
        ),
    );
    let admin = gw.admin_addr();
    let load = Load::start(gw.addr, 16, "/item");
    std::thread::sleep(Duration::from_secs(seconds));
    let samples = load.finish();
    let requests = samples.len();
    assert!(samples.iter().all(|s| s.status == 200 || s.status == 500), "only 200s and the backend's 500s");
    let errors = samples.iter().filter(|s| s.status == 500).count();
    let at_backends = backends.iter().map(|b| b.hits().len()).sum::<usize>();
    let retries = at_backends - requests;
    let m = scrape(admin);
    let skipped = m.get("gateway_retries_skipped_total{upstream=\"web\",reason=\"budget\"}").copied().unwrap_or(-1.0);
    let counted = m.get("gateway_retries_total{upstream=\"web\",reason=\"5xx\"}").copied().unwrap_or(-1.0);
    assert_eq!(counted as usize, retries, "gateway_retries_total counts the retries the backends saw");
    (requests, retries, errors, skipped)
}

#[test]
fn a_backend_answering_500_costs_the_others_at_most_the_retry_budget() {
    let _serial = serial();
    let seconds = 4;
    // The floor (1/s over the 10 s window) is small next to 20% of the requests.
    let (requests, retries, errors, skipped) = five_hundreds("{ratio: 0.2, min_per_second: 1}", seconds);
    let budget = 0.2 * requests as f64 + 10.0;
    report::figures(
        "backend-faults",
        &format!(
            "500s from one of three backends, 16 clients, {seconds}s, budget 20% + 1/s: {requests} requests, {retries} retries ({:.1}% of requests; budget {budget:.0}), {skipped} retries skipped, {errors} clients got the 500",
            100.0 * retries as f64 / requests as f64
        ),
    );
    assert!(requests > 200, "the load ran: {requests} requests");
    // Two workers deciding at once may each overshoot by one.
    assert!(retries as f64 <= budget + 2.0, "{retries} retries for {requests} requests: over the budget {budget}");
    assert!(skipped > 0.0, "the retries over the budget are counted in /metrics");
    assert_eq!(skipped as usize, errors, "each skipped retry left the client with the 500");
    // A third of the requests met the bad backend: the budget spent most of its room.
    assert!(retries as f64 >= 0.1 * requests as f64, "only {retries} retries for {requests} requests");

    // For comparison, a budget that never binds: every 500 is retried.
    let (requests, retries, errors, skipped) = five_hundreds("{ratio: 10, min_per_second: 1000}", seconds);
    report::figures(
        "backend-faults",
        &format!(
            "the same without a binding budget: {requests} requests, {retries} retries ({:.1}% of requests), {skipped} skipped, {errors} clients got a 500",
            100.0 * retries as f64 / requests as f64
        ),
    );
    assert_eq!((errors, skipped), (0, 0.0));
    assert!(retries as f64 > 0.25 * requests as f64, "{retries} retries for {requests} requests");
}

#[test]
fn a_backend_answering_500_with_the_defaults_is_ejected_and_no_client_sees_a_500() {
    let _serial = serial();
    // Nothing but the backends and the health-check path configured: passive ejection
    // after 5 failures in a row for 5 s (then 10 s, ...), the retry budget 20% + 10/s,
    // 3 attempts. /healthz passes, so only passive health sees the 500s.
    let (backends, list) = one_answering_500();
    let dir = TempDir::new();
    let gw = start(
        &dir,
        &format!(
            "listeners: [{{address: 127.0.0.1:0}}]\nthreads: 2\naccess_log: false\nupstreams:\n  web:\n    health_check: {{path: /healthz}}\n    backends:\n{list}"
        ),
    );
    let admin = gw.admin_addr();
    // 12 s: past the end of the first ejection (5 s), not of the second (10 s more).
    let seconds = 12;
    let load = Load::start(gw.addr, 16, "/item");
    let counts = Counts::start(admin, "bad", load.started);
    std::thread::sleep(Duration::from_secs(seconds));
    let samples = load.finish();
    let run = samples.last().map_or(Duration::ZERO, |s| s.at);
    let counts = counts.finish();
    let metrics = scrape(admin);
    let (made, skipped) = retries(&metrics);
    let after_500 = metrics.get("gateway_retries_total{upstream=\"web\",reason=\"5xx\"}").copied().unwrap_or(-1.0);

    let requests = samples.len();
    let errors = samples.iter().filter(|s| s.status == 500).count();
    let failed = samples.iter().filter(|s| s.status != 200).count();
    let sent_to_bad = backends[0].hits().iter().filter(|h| h.path != "/healthz").count();
    let ejections = gw.logs_matching(|l| message(l).starts_with("backend ejected") && l["backend"] == "bad");
    let returns = gw.logs_matching(|l| message(l).starts_with("ejection over") && l["backend"] == "bad");
    let stopped = stopped_at(&counts, Duration::ZERO, run);
    let first_ejection = count_at(&counts, stopped.unwrap_or(run));
    // Its return from the first ejection (its first request after it), and how long
    // until the second ejection stopped it again.
    let back = stopped.and_then(|t| counts.iter().find(|(at, n)| *at > t && *n > first_ejection)).map(|(at, _)| *at);
    let again = back.and_then(|t| stopped_at(&counts, t, run).map(|s| (t, s - t)));
    let ms = |d: Duration| format!("{:.0} ms", d.as_secs_f64() * 1e3);
    let budget = 0.2 * requests as f64 + 10.0 * run.as_secs_f64();
    let figures = format!(
        "500s from one of three backends, defaults (passive ejection on), 16 clients, {seconds} s: {requests} requests, {errors} clients got a 500, {failed} failed, p99 {:.1} ms, slowest {:.0} ms; the bad backend stopped getting requests within {} of the start ({first_ejection} sent to it), {}; ejected {} times, back {} times; {sent_to_bad} requests sent to it in all; {made:.0} retries ({:.2}% of requests; {after_500:.0} after a 500, the others of requests waiting on it when it was ejected) of a budget of {budget:.0}, {skipped:.0} skipped",
        quantile_ms(&samples.iter().collect::<Vec<_>>(), 0.99),
        quantile_ms(&samples.iter().collect::<Vec<_>>(), 1.0),
        stopped.map_or("never".to_owned(), |t| ms(t + Duration::from_millis(20))),
        again.map_or("never back, or never out again".to_owned(), |(t, s)| format!(
            "back {:.1} s after the start and out again within {} (counts sampled every 20 ms)",
            t.as_secs_f64(),
            ms(s + Duration::from_millis(20))
        )),
        ejections.len(),
        returns.len(),
        100.0 * made / requests as f64,
    );
    eprintln!("500s with the defaults: {figures}");
    report::figures("backend-faults", &figures);
    assert!(requests > 200, "the load ran: {requests} requests");
    assert_eq!((errors, failed), (0, 0), "every 500 was retried on another backend: {figures}");
    assert_eq!(skipped, 0.0, "the budget refused a retry: {figures}");
    let stopped = stopped.expect("passive ejection took the bad backend out");
    assert!(stopped < Duration::from_secs(1), "it got requests for {stopped:?}: {figures}");
    // Back after base_ejection (5 s), ejected again for 10 s, which outlasts the run.
    assert_eq!((ejections.len(), returns.len()), (2, 1), "{figures}");
    let (_, out_again) = again.expect("back from its first ejection, and out again");
    assert!(out_again < Duration::from_secs(1), "{figures}");
    // Each ejection costs the failures that trigger it plus the requests already on
    // their way to it, at most one per client.
    assert!(sent_to_bad <= ejections.len() * (5 + 16), "{figures}");
}

/// A backend in its own process (tests/fault/backend.py), so it can be frozen with
/// SIGSTOP, killed with SIGKILL, or switched to slow or refusing at run time (SIGUSR1,
/// SIGUSR2). Thawed and killed (by PID) when dropped.
struct Process {
    child: Child,
    addr: SocketAddr,
    /// The lines it prints (the port, then one per switch).
    lines: std::sync::mpsc::Receiver<String>,
}

impl Process {
    fn start(name: &str) -> Process {
        Process::start_on(name, 0)
    }

    /// The same on `port` (0: any free one), e.g. to bring a killed backend back.
    fn start_on(name: &str, port: u16) -> Process {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fault/backend.py");
        let mut child = Command::new("python3")
            .arg(script)
            .arg(name)
            .arg(port.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start python3 tests/fault/backend.py");
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)).map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut process = Process { child, addr: SocketAddr::from(([127, 0, 0, 1], 0)), lines };
        let line = process.next_line();
        let port: u16 = line.trim().parse().unwrap_or_else(|_| panic!("no port from backend.py: {line:?}"));
        process.addr.set_port(port);
        process
    }

    fn next_line(&self) -> String {
        self.lines.recv_timeout(Duration::from_secs(10)).expect("backend.py prints its line within 10 s")
    }

    fn signal(&self, sig: &str) {
        let status = Command::new("kill").arg(sig).arg(self.child.id().to_string()).status().expect("run kill");
        assert!(status.success(), "kill {sig} {} failed", self.child.id());
    }

    /// Sends `sig` and waits for the backend to say the switch took effect (`said`).
    fn switch(&self, sig: &str, said: &str) {
        self.signal(sig);
        let line = self.next_line();
        assert_eq!(line, said, "backend.py after {sig}");
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = Command::new("kill").arg("-CONT").arg(self.child.id().to_string()).status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// 20 clients, three backends, one frozen with SIGSTOP for 4 s and thawed. Returns the
/// figures line; asserts that no request failed and none waited much longer than it
/// takes the health checks to see the freeze.
fn frozen_backend(strategy: &str) -> String {
    let frozen = Process::start("frozen");
    let others = [Backend::new("live-1"), Backend::new("live-2")];
    let list = backend_list(&[
        ("frozen".into(), frozen.addr),
        ("live-1".into(), others[0].addr()),
        ("live-2".into(), others[1].addr()),
    ]);
    let dir = TempDir::new();
    // Detection: two HTTP checks in a row without an answer within 250 ms, every 250 ms.
    let gw = start(
        &dir,
        &format!(
            "listeners: [{{address: 127.0.0.1:0}}]\nthreads: 2\naccess_log: false\nupstreams:\n  web:\n    strategy: {{plugin: {strategy}}}\n    health_check: {{path: /healthz, interval: 250ms, timeout: 250ms, fall: 2, rise: 2}}\n    backends:\n{list}"
        ),
    );
    let admin = gw.admin_addr();
    let load = Load::start(gw.addr, 20, "/page");
    std::thread::sleep(Duration::from_secs(1));
    let mark = gw.log_mark();
    let sent_before = frozen_requests(admin);
    frozen.signal("-STOP");
    let frozen_at = load.elapsed();
    let stopped = Instant::now();
    gw.wait_for_log_after(mark, Duration::from_secs(10), |l| {
        message(l).starts_with("backend is down") && l["backend"] == "frozen"
    });
    let detection = stopped.elapsed();
    // A decision made just before the pool changed may still be counting its request.
    std::thread::sleep(Duration::from_millis(100));
    let sent_then = frozen_requests(admin);
    std::thread::sleep(Duration::from_secs(3));
    let sent_after = frozen_requests(admin);
    frozen.signal("-CONT");
    let thawed_at = load.elapsed();
    let thawed = Instant::now();
    // Back in the pool after `rise` checks.
    gw.wait_for_log_after(mark, Duration::from_secs(10), |l| {
        message(l).starts_with("backend is up") && l["backend"] == "frozen"
    });
    let back = thawed.elapsed();
    std::thread::sleep(Duration::from_secs(1));
    let samples = load.finish();
    let failed: Vec<&Sample> = samples.iter().filter(|s| s.status != 200).collect();
    assert!(
        failed.is_empty(),
        "{} of {} requests failed: {:?}",
        failed.len(),
        samples.len(),
        &failed[..failed.len().min(5)]
    );
    let before: Vec<&Sample> = samples.iter().filter(|s| s.at < frozen_at).collect();
    let during: Vec<&Sample> = samples.iter().filter(|s| s.at >= frozen_at && s.at < thawed_at).collect();
    let worst = samples.iter().map(|s| s.latency).max().unwrap_or_default();
    // Served between the freeze and its detection (sent and answered in that window).
    let undetected = frozen_at + detection;
    let served_meanwhile = samples.iter().filter(|s| s.at >= frozen_at && s.at + s.latency < undetected).count();
    let stuck = sent_then.saturating_sub(sent_before);
    let rate = |s: &[&Sample], d: Duration| s.len() as f64 / d.as_secs_f64();
    // The rate before: its last half second, when the clients' connections and the
    // workers' plugin instances are warm.
    let settled = Duration::from_millis(500);
    let steady: Vec<&Sample> = before.iter().copied().filter(|s| s.at + settled >= frozen_at).collect();
    let (rate_before, rate_during) = (rate(&steady, settled), rate(&during, thawed_at - frozen_at));
    let throughput = rate_during / rate_before;
    let figures = format!(
        "{strategy}: {} requests, 0 failed; detection {:.0} ms; p99 before {:.1} ms, during the freeze {:.0} ms, slowest {:.0} ms; {rate_before:.0} req/s in the half second before, {rate_during:.0} during ({throughput:.2} of before; at least 0.5 asserted: 2/3 for the lost backend's share, less slack for a loaded 2-core machine); requests sent to the frozen backend while frozen: ~{stuck} before it was marked down, {} after; {served_meanwhile} requests served before the freeze was detected; back in the pool {:.0} ms after SIGCONT",
        samples.len(),
        detection.as_secs_f64() * 1e3,
        quantile_ms(&before, 0.99),
        quantile_ms(&during, 0.99),
        worst.as_secs_f64() * 1e3,
        sent_after - sent_then,
        back.as_secs_f64() * 1e3,
    );
    // Shown whatever happens next: a CI log keeps this line when it cuts the panic.
    eprintln!("frozen backend figures: {figures}");
    // No request waits for the 30 s response-header timeout: at most the detection time
    // and one normal backend latency, plus slack for a loaded 2-core machine (one run
    // saw a request take 3.86 s with detection at 0.75 s, unexplained: `worst` spans the
    // whole test, not only the freeze; the bug this guards against is a 30 s wait).
    let bound = detection + Duration::from_secs(6);
    assert!(worst <= bound, "a request waited {worst:?} (detection took {detection:?}): {figures}");
    assert_eq!(sent_after, sent_then, "requests went to the frozen backend after it was marked down: {figures}");
    // Throughput falls by at most the frozen backend's share (a third), less slack: the
    // clients, backends and gateway share 2 cores with whatever else runs.
    assert!(throughput >= 0.5, "throughput during the freeze fell to {throughput:.2} of before: {figures}");
    if strategy != "round-robin" {
        // In-flight counts steer around the frozen backend before the health checks
        // notice: not every client gets stuck on it, and the others keep being served.
        assert!(stuck < 20, "every client got stuck on the frozen backend: {figures}");
        assert!(served_meanwhile >= 20, "the upstream stalled until the freeze was detected: {figures}");
    }
    figures
}

/// Requests sent to the frozen backend so far, answered or not (`requests` in
/// `/api/upstreams`).
fn frozen_requests(admin: SocketAddr) -> u64 {
    backend_requests(admin, "frozen")
}

/// Requests the gateway sent to backend `id` so far, answered or not (`requests` in
/// `/api/upstreams`).
fn backend_requests(admin: SocketAddr, id: &str) -> u64 {
    let (status, body) = get(admin, "/api/upstreams");
    assert_eq!(status, 200, "{body}");
    let api: serde_json::Value = serde_json::from_str(&body).unwrap();
    let backends = api["upstreams"][0]["backends"].as_array().expect("backends");
    let backend = backends.iter().find(|b| b["id"] == id).unwrap_or_else(|| panic!("backend {id} in /api/upstreams"));
    backend["requests"].as_u64().expect("requests")
}

#[test]
fn a_frozen_backend_does_not_freeze_the_upstream() {
    let _serial = serial();
    for strategy in ["round-robin", "least-connections", "p2c-ewma"] {
        let figures = frozen_backend(strategy);
        report::figures("backend-faults", &format!("frozen backend (SIGSTOP 1 of 3, 20 clients), {figures}"));
    }
}

#[test]
fn passive_ejection_is_bounded_by_max_ejected_percent_and_never_announces_a_down_backend_back() {
    let _serial = serial();
    // Two of three backends answer 500; /healthz passes, so only passive health sees it.
    let bad = [Backend::failing("bad-1", 500), Backend::failing("bad-2", 500)];
    let good = Backend::new("good");
    let list =
        backend_list(&[("bad-1".into(), bad[0].addr()), ("bad-2".into(), bad[1].addr()), ("good".into(), good.addr())]);
    let yaml = |percent: u32| {
        format!(
            "listeners: [{{address: 127.0.0.1:0}}]\nthreads: 1\nupstreams:\n  web:\n    passive: {{consecutive_failures: 2, base_ejection: 3s, max_ejected_percent: {percent}}}\n    retries: {{attempts: 1}}\n    health_check: {{path: /healthz, interval: 200ms, timeout: 500ms, fall: 2, rise: 2}}\n    backends:\n{list}"
        )
    };
    let ejected = |gw: &Gateway, id: &str| {
        gw.logs_matching(|l| message(l).starts_with("backend ejected") && l["backend"] == id).len()
    };
    let refused = |gw: &Gateway, id: &str| {
        gw.logs_matching(|l| message(l).starts_with("not ejecting") && l["backend"] == id).len()
    };

    // The default 50: one of three may be out at once; the other is refused, and says why.
    let dir = TempDir::new();
    let gw = start(&dir, &yaml(50));
    for _ in 0..12 {
        get(gw.addr, "/x");
    }
    let first = poll_until(Duration::from_secs(5), Duration::from_millis(20), || {
        let (e1, e2) = (ejected(&gw, "bad-1"), ejected(&gw, "bad-2"));
        (e1 + e2 > 0).then_some(if e1 > 0 { "bad-1" } else { "bad-2" })
    })
    .expect("a failing backend is ejected");
    let other = if first == "bad-1" { "bad-2" } else { "bad-1" };
    assert_eq!(ejected(&gw, other), 0, "two of three ejected with max_ejected_percent 50");
    let line = gw.wait_for_log(Duration::from_secs(5), |l| message(l).starts_with("not ejecting"));
    assert!(message(&line).contains("50% of the backends (passive.max_ejected_percent)"), "{line}");
    assert_eq!(refused(&gw, other), 1, "logged once");

    // 67: both failing backends are ejected; the good one serves everything.
    let dir = TempDir::new();
    let gw = start(&dir, &yaml(67));
    for _ in 0..12 {
        get(gw.addr, "/x");
    }
    poll_until(Duration::from_secs(5), Duration::from_millis(20), || {
        (ejected(&gw, "bad-1") >= 1 && ejected(&gw, "bad-2") >= 1).then_some(())
    })
    .expect("both failing backends are ejected with max_ejected_percent 67");
    for _ in 0..6 {
        assert_eq!(get(gw.addr, "/x"), (200, "good".into()));
    }

    // bad-1 crashes while ejected: active checks take it down, and when its ejection
    // ends the log says it stays out, never that it takes traffic again.
    let mark = gw.log_mark();
    bad[0].stop();
    gw.wait_for_log_after(mark, Duration::from_secs(5), |l| {
        message(l).starts_with("backend is down") && l["backend"] == "bad-1"
    });
    let ended = gw.wait_for_log_after(mark, Duration::from_secs(10), |l| {
        message(l).starts_with("passive ejection ended") && l["backend"] == "bad-1"
    });
    assert!(message(&ended).contains("active health checks have the backend down"), "{ended}");
    // bad-2 (still up, still failing) is announced back when its ejection ends.
    gw.wait_for_log_after(mark, Duration::from_secs(10), |l| {
        message(l).starts_with("ejection over, backend takes traffic again") && l["backend"] == "bad-2"
    });
    let wrong = gw.logs_matching(|l| message(l).starts_with("ejection over") && l["backend"] == "bad-1");
    assert!(wrong.is_empty(), "'ejection over' logged for a backend that is down: {wrong:?}");
}

#[test]
fn running_out_of_file_descriptors_is_the_gateways_problem_not_the_backends() {
    let _serial = serial();
    let backends = [Backend::new("fd-1"), Backend::new("fd-2"), Backend::new("fd-3")];
    let list = backend_list(&backends.iter().map(|b| (b.name().to_owned(), b.addr())).collect::<Vec<_>>());
    let dir = TempDir::new();
    // Idle clients are not disconnected during the test (header and idle timeouts 60 s).
    let file = dir.write(
        "gw.yaml",
        format!(
            "listeners:\n  - address: 127.0.0.1:0\n    limits: {{header_timeout: 60s, idle_timeout: 60s}}\nthreads: 2\naccess_log: false\nupstreams:\n  web:\n    health_check: {{interval: 200ms, timeout: 500ms, fall: 2, rise: 2}}\n    backends:\n{list}"
        ),
    );
    let plugins = dir.path().join("plugins");
    let gw = Gateway::start_under(
        &["prlimit", "--nofile=400:400"],
        &["--config", file.to_str().unwrap(), "--plugins", plugins.to_str().unwrap(), "--admin", "127.0.0.1:0"],
    );
    let admin = gw.admin_addr();
    let limit = gw.wait_for_log(Duration::from_secs(5), |l| message(l).starts_with("open-file limit"));
    assert_eq!(limit["soft"], 400, "{limit}");
    let cap = gw.wait_for_log(Duration::from_secs(5), |l| message(l).contains("caps client connections"));
    let cap = cap["client_connections"].as_u64().expect("the cap is logged");

    // A client connected before the crowd keeps being served.
    let mut early = KeepAlive::open(gw.addr).expect("connect");
    assert_eq!(early.get("/").expect("served").status, 200);

    // 460 idle clients: more than the descriptors the gateway has.
    let idle: Vec<std::net::TcpStream> = (0..460)
        .map(|i| {
            std::net::TcpStream::connect_timeout(&gw.addr, Duration::from_secs(10))
                .unwrap_or_else(|e| panic!("idle client {i}: {e}"))
        })
        .collect();
    std::thread::sleep(Duration::from_secs(3));
    let reply = early.get("/").expect("the early client is still served");
    assert_eq!(reply.status, 200, "{}", reply.body);

    // Health checks ran all along: every backend is still up, and the admin API answers.
    let (status, body) = get(admin, "/api/upstreams");
    assert_eq!(status, 200, "{body}");
    let api: serde_json::Value = serde_json::from_str(&body).unwrap();
    let states: Vec<(String, bool)> = api["upstreams"][0]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| (b["id"].as_str().unwrap().to_owned(), b["healthy"].as_bool().unwrap()))
        .collect();
    assert!(states.iter().all(|(_, up)| *up), "backends marked down: {states:?}");
    let down = gw.logs_matching(|l| message(l).starts_with("backend is down"));
    assert!(down.is_empty(), "a backend was marked down: {down:?}");
    let m = scrape(admin);
    let waited = m.get("gateway_connection_limit_reached_total").copied().unwrap_or(0.0);
    assert!(waited > 0.0, "the cap of {cap} held clients back in the backlog");

    // The idle clients leave: a new client is served soon after.
    drop(idle);
    let left = Instant::now();
    let served = poll_until(Duration::from_secs(10), Duration::from_millis(50), || {
        util::try_get(gw.addr, "/").ok().filter(|(s, _)| *s == 200).map(|_| left.elapsed())
    })
    .expect("a new client is served once the idle ones left");
    let warnings = gw.logs_matching(|l| message(l).starts_with("accept failed")).len();
    report::figures(
        "backend-faults",
        &format!(
            "RLIMIT_NOFILE 400, 460 idle clients: client connections capped at {cap}, backends up, admin API answering, early client served, a new client served {:.0} ms after the idle ones left, {warnings} accept warnings, {waited} times at the cap",
            served.as_secs_f64() * 1e3
        ),
    );
    assert!(warnings <= 3, "{warnings} accept warnings");
}

#[test]
fn a_request_whose_backend_goes_down_with_no_other_to_go_to_keeps_waiting_for_its_answer() {
    let _serial = serial();
    // Health checks that always fail (the backend answers 200, `expect_status` wants 5xx):
    // the only backend is marked down about 2 s after the start, while a 3 s request is
    // in flight on it. There is nowhere to retry it, so it gets the backend's answer.
    let only = Backend::new("only");
    let dir = TempDir::new();
    let gw = start(
        &dir,
        &format!(
            "listeners: [{{address: 127.0.0.1:0}}]\nthreads: 1\nupstreams:\n  web:\n    health_check: {{path: /healthz, expect_status: [500, 599], interval: 1s, fall: 3}}\n    backends:\n{}",
            backend_list(&[("only".into(), only.addr())])
        ),
    );
    let started = Instant::now();
    let (status, body) = get(gw.addr, "/delay/3000");
    let took = started.elapsed();
    assert_eq!((status, body.as_str()), (200, "only"), "the answer after {took:?}");
    let down = gw.wait_for_log(Duration::from_secs(1), |l| message(l).starts_with("backend is down"));
    assert!(took >= Duration::from_secs(3), "answered after {took:?}; {down}");
}

/// Backend `id`'s request count, sampled every 20 ms by a thread of its own while a
/// fault runs: (time since `started`, requests so far).
struct Counts {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<Vec<(Duration, u64)>>>,
}

impl Counts {
    fn start(admin: SocketAddr, id: &'static str, started: Instant) -> Counts {
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut seen = Vec::new();
                // At most 2 minutes, whatever happens to the test.
                while !stop.load(Ordering::Relaxed) && seen.len() < 6_000 {
                    seen.push((started.elapsed(), backend_requests(admin, id)));
                    std::thread::sleep(Duration::from_millis(20));
                }
                seen
            })
        };
        Counts { stop, thread: Some(thread) }
    }

    fn finish(mut self) -> Vec<(Duration, u64)> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().expect("the sampling thread ends cleanly")
    }
}

impl Drop for Counts {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// The count at `t` (the last sample taken at or before it).
fn count_at(counts: &[(Duration, u64)], t: Duration) -> u64 {
    counts.iter().take_while(|(at, _)| *at <= t).last().map_or(0, |(_, n)| *n)
}

/// When, after `from`, the backend stopped getting requests: the start of the first
/// half second without a new one (none before `until`: it never stopped).
fn stopped_at(counts: &[(Duration, u64)], from: Duration, until: Duration) -> Option<Duration> {
    let quiet = Duration::from_millis(500);
    counts
        .iter()
        .filter(|(at, _)| *at >= from && *at + quiet <= until)
        .find(|(at, n)| count_at(counts, *at + quiet) == *n)
        .map(|(at, _)| *at)
}

/// The retries the gateway made for upstream `web` (all reasons) and the ones the
/// budget refused.
fn retries(m: &HashMap<String, f64>) -> (f64, f64) {
    let made = m.iter().filter(|(k, _)| k.starts_with("gateway_retries_total{upstream=\"web\"")).map(|(_, v)| v).sum();
    let skipped =
        m.iter().filter(|(k, _)| k.starts_with("gateway_retries_skipped_total{upstream=\"web\"")).map(|(_, v)| v).sum();
    (made, skipped)
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Fault {
    /// `kill -9`, then a new process on the same port.
    Kill,
    /// Every answer but `/healthz` takes 2 s, then fast again.
    Slow,
    /// The listener and every connection closed, then listening again on the same port.
    Refuse,
}

/// What a fault row measured.
struct FaultRun {
    requests: usize,
    /// p99 and slowest latency of the requests sent during the fault, ms.
    p99_ms: f64,
    slowest_ms: f64,
    /// From the fault until the backend stopped getting requests (none: it never did).
    stopped: Option<Duration>,
    /// Requests it got during the fault: in all, and after it had stopped (probes).
    sent_during: u64,
    sent_after_stop: u64,
    /// From the recovery until it got a request again.
    back: Duration,
    retries: f64,
    skipped: f64,
    /// What the retry budget allowed over the run (20% of the requests + 10/s).
    budget: f64,
}

/// 20 clients, three backends (health checks every 250 ms), one of them in its own
/// process faulted for 4 s with `fault` and recovered. Asserts that no request failed.
fn backend_fault(fault: Fault, strategy: &str, upstream: &str) -> FaultRun {
    let mut faulty = Some(Process::start("faulty"));
    let port = faulty.as_ref().unwrap().addr.port();
    let others = [Backend::new("live-1"), Backend::new("live-2")];
    let list = backend_list(&[
        ("faulty".into(), faulty.as_ref().unwrap().addr),
        ("live-1".into(), others[0].addr()),
        ("live-2".into(), others[1].addr()),
    ]);
    let dir = TempDir::new();
    let gw = start(
        &dir,
        &format!(
            "listeners: [{{address: 127.0.0.1:0}}]\nthreads: 2\naccess_log: false\nupstreams:\n  web:\n    strategy: {strategy}\n    health_check: {{path: /healthz, interval: 250ms, timeout: 250ms, fall: 2, rise: 2}}\n{upstream}    backends:\n{list}"
        ),
    );
    let admin = gw.admin_addr();
    let metrics_before = scrape(admin);
    let load = Load::start(gw.addr, 20, "/page");
    let counts = Counts::start(admin, "faulty", load.started);
    std::thread::sleep(Duration::from_secs(1));
    let fault_at = load.elapsed();
    match fault {
        Fault::Kill => {
            let p = faulty.take().unwrap();
            p.signal("-KILL");
            drop(p);
        }
        Fault::Slow => faulty.as_ref().unwrap().switch("-USR1", "slow on"),
        Fault::Refuse => faulty.as_ref().unwrap().switch("-USR2", "refusing"),
    }
    std::thread::sleep(Duration::from_secs(4));
    match fault {
        Fault::Kill => faulty = Some(Process::start_on("faulty", port)),
        Fault::Slow => faulty.as_ref().unwrap().switch("-USR1", "slow off"),
        Fault::Refuse => faulty.as_ref().unwrap().switch("-USR2", "listening"),
    }
    // Listening again (or fast again) from here.
    let recovered_at = load.elapsed();
    let sent_then = backend_requests(admin, "faulty");
    poll_until(Duration::from_secs(10), Duration::from_millis(20), || {
        (backend_requests(admin, "faulty") > sent_then).then_some(())
    })
    .unwrap_or_else(|| panic!("{fault:?}, {strategy}: the backend got no request within 10 s of its recovery"));
    std::thread::sleep(Duration::from_millis(500));
    let samples = load.finish();
    let counts = counts.finish();
    let metrics_after = scrape(admin);
    drop(faulty);

    let failed: Vec<&Sample> = samples.iter().filter(|s| s.status != 200).collect();
    assert!(
        failed.is_empty(),
        "{fault:?}, {strategy}: {} of {} requests failed: {:?}",
        failed.len(),
        samples.len(),
        &failed[..failed.len().min(5)]
    );
    let during: Vec<&Sample> = samples.iter().filter(|s| s.at >= fault_at && s.at < recovered_at).collect();
    let stopped = stopped_at(&counts, fault_at, recovered_at);
    let at_fault = count_at(&counts, fault_at);
    let at_recovery = count_at(&counts, recovered_at);
    let back = counts
        .iter()
        .find(|(at, n)| *at >= recovered_at && *n > at_recovery)
        .map_or(Duration::MAX, |(at, _)| *at - recovered_at);
    let ((made_before, skipped_before), (made_after, skipped_after)) =
        (retries(&metrics_before), retries(&metrics_after));
    let run = samples.last().map_or(Duration::ZERO, |s| s.at);
    FaultRun {
        requests: samples.len(),
        p99_ms: quantile_ms(&during, 0.99),
        slowest_ms: during.iter().map(|s| s.latency).max().unwrap_or_default().as_secs_f64() * 1e3,
        stopped: stopped.map(|t| t - fault_at),
        sent_during: at_recovery - at_fault,
        sent_after_stop: stopped.map_or(0, |t| at_recovery - count_at(&counts, t)),
        back,
        retries: made_after - made_before,
        skipped: skipped_after - skipped_before,
        budget: 0.2 * samples.len() as f64 + 10.0 * run.as_secs_f64(),
    }
}

/// Records a row of table 1 (docs/reliability.md).
fn record_fault(fault: &str, strategy: &str, run: &FaultRun, expectation: &str) {
    let ms = |d: Duration| format!("{:.0} ms", d.as_secs_f64() * 1e3);
    report::record(
        "backend-faults",
        serde_json::json!({
            "fault": fault,
            "strategy": strategy,
            "clients": 20,
            "requests": run.requests,
            "failed": 0,
            "p99 / slowest during the fault": format!("{:.0} / {:.0} ms", run.p99_ms, run.slowest_ms),
            "until it stops getting requests": match run.stopped {
                Some(t) => format!("{} ({} sent to it during the fault, {} of them later probes)", ms(t), run.sent_during, run.sent_after_stop),
                None => format!("never ({} sent to it during the fault)", run.sent_during),
            },
            "back after recovery": ms(run.back),
            "retries vs budget": format!("{:.0} retries ({:.1}% of requests) of a budget of {:.0}; {:.0} skipped", run.retries, 100.0 * run.retries / run.requests as f64, run.budget, run.skipped),
            "what a user expects": expectation,
        }),
    );
}

#[test]
fn a_killed_backend_costs_no_request_and_its_replacement_gets_traffic() {
    let _serial = serial();
    let run = backend_fault(Fault::Kill, "{plugin: round-robin}", "");
    record_fault(
        "`kill -9` one of three, restarted on the same port 4 s later",
        "round-robin",
        &run,
        "requests in flight on it and connections refused are retried on the others; health checks take it out, and put the new process in",
    );
    let stopped = run.stopped.expect("the killed backend stopped getting requests");
    assert!(stopped < Duration::from_secs(3), "it got requests for {stopped:?} after the kill");
    assert!(run.back < Duration::from_secs(5), "back {:?} after its restart", run.back);
    assert_eq!(run.skipped, 0.0, "no retry was refused by the budget");
}

#[test]
fn a_backend_refusing_connections_costs_no_request_and_gets_traffic_when_it_listens_again() {
    let _serial = serial();
    let run = backend_fault(Fault::Refuse, "{plugin: round-robin}", "");
    record_fault(
        "one of three closes its listener and connections, listens again 4 s later",
        "round-robin",
        &run,
        "as for `kill -9`: refused connects are retried at once (outside the budget), health checks take it out and back",
    );
    let stopped = run.stopped.expect("the refusing backend stopped getting requests");
    assert!(stopped < Duration::from_secs(3), "it got requests for {stopped:?} after it closed");
    assert!(run.back < Duration::from_secs(5), "back {:?} after it listened again", run.back);
    assert_eq!(run.skipped, 0.0, "no retry was refused by the budget");
}

#[test]
fn a_backend_turning_slow_is_avoided_by_p2c_ewma_and_cut_short_by_a_response_timeout() {
    let _serial = serial();
    // Its /healthz stays fast (a cheap health endpoint, a slow database behind the
    // pages): active health checks see nothing, so this is up to the strategy.
    // p2c-ewma shuns it after its first slow answers and probes it again as its
    // latency estimate fades (decay_ms 500 for a short test; the default is 10 s).
    let run = backend_fault(Fault::Slow, "{plugin: p2c-ewma, params: {decay_ms: 500}}", "");
    record_fault(
        "one of three answers in 2 s (its /healthz stays fast) for 4 s",
        "p2c-ewma (decay_ms 500)",
        &run,
        "in-flight counts limit what it gets until its first slow answers (those requests pay 2 s); then it is shunned, and probed again as its latency estimate fades",
    );
    let stopped = run.stopped.expect("p2c-ewma stopped sending to the slow backend");
    assert!(stopped < Duration::from_secs(3), "p2c-ewma kept sending to it for {stopped:?}");
    assert!(run.back < Duration::from_secs(8), "probed again {:?} after it was fast again", run.back);

    // Round robin does not look at latency: every third request would wait 2 s. With a
    // per-attempt response timeout the wait is cut and the request goes to another
    // backend (GETs are idempotent); five timeouts in a row eject the backend.
    let run = backend_fault(
        Fault::Slow,
        "{plugin: round-robin}",
        "    timeouts: {response_header: 500ms}\n    passive: {consecutive_failures: 5, base_ejection: 1s}\n",
    );
    record_fault(
        "the same",
        "round-robin, `timeouts.response_header: 500ms`",
        &run,
        "no latency awareness: the 500 ms timeout cuts the wait and retries elsewhere; 5 timeouts in a row eject it (1 s, doubling), each return costs 5 requests 500 ms",
    );
    assert!(run.slowest_ms < 1_900.0, "a request waited {:.0} ms for the slow backend", run.slowest_ms);
    assert!(run.retries > 0.0, "the timeouts were retried");
    assert!(run.stopped.is_some(), "passive ejection took it out");
    assert!(run.back < Duration::from_secs(8), "back {:?} after it was fast again", run.back);
}
