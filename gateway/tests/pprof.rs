//! CPU profiling on demand (`GET /debug/pprof/profile` on the admin listener): the real
//! gateway under load from a client thread, a 2 s profile that parses as a pprof protobuf
//! and names the gateway's own functions (the release binary's symbols resolve), an SVG
//! flamegraph, one profile at a time, and a clear 400 for a bad duration.

mod util;

use pprof::protos::Message as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use util::{Backend, Gateway, KeepAlive, TempDir, get, request};

/// Bounds of the background load: it stops at whichever comes first.
const LOAD_MAX_REQUESTS: u64 = 200_000;
const LOAD_MAX_TIME: Duration = Duration::from_secs(60);

/// Keep-alive GETs through the gateway from `connections` threads until stopped (or the
/// bounds above are reached), so the profile has proxy work to sample.
struct Load {
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
    threads: Vec<std::thread::JoinHandle<Result<(), String>>>,
}

impl Load {
    fn start(addr: SocketAddr, connections: usize) -> Load {
        let (stop, done) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)));
        let started = Instant::now();
        let threads = (0..connections)
            .map(|i| {
                let (stop, done) = (stop.clone(), done.clone());
                std::thread::Builder::new()
                    .name(format!("load-{i}"))
                    .spawn(move || {
                        let mut conn = KeepAlive::open(addr)?;
                        while !stop.load(Ordering::Relaxed)
                            && started.elapsed() < LOAD_MAX_TIME
                            && done.fetch_add(1, Ordering::Relaxed) < LOAD_MAX_REQUESTS
                        {
                            let reply = conn.get("/load")?;
                            if reply.status != 200 {
                                return Err(format!("GET /load: {} {}", reply.status, reply.body));
                            }
                        }
                        Ok(())
                    })
                    .expect("spawn a load thread")
            })
            .collect();
        Load { stop, done, threads }
    }

    /// Stops the load; panics if a request failed. Returns how many requests were sent.
    fn finish(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join().expect("load thread").unwrap_or_else(|e| panic!("the load failed: {e}"));
        }
        self.done.load(Ordering::Relaxed)
    }
}

fn start_gateway(dir: &TempDir, backends: &[Backend]) -> Gateway {
    let plugins = dir.path().join("plugins");
    let mut args = vec!["--listen", "127.0.0.1:0", "--threads", "2", "--admin", "127.0.0.1:0"];
    let addrs: Vec<String> = backends.iter().map(|b| b.addr().to_string()).collect();
    for a in &addrs {
        args.extend(["-b", a.as_str()]);
    }
    args.extend(["--plugins", plugins.to_str().unwrap()]);
    Gateway::start(&args)
}

#[test]
fn a_profile_under_load_names_the_gateways_functions() {
    let dir = TempDir::new();
    let backends = [Backend::new("b1"), Backend::new("b2"), Backend::new("b3")];
    let gw = start_gateway(&dir, &backends);
    let admin = gw.admin_addr();
    assert_eq!(get(gw.addr, "/").0, 200, "the gateway proxies before the profile");

    let load = Load::start(gw.addr, 2);
    let reply = request(admin, "GET", "/debug/pprof/profile?seconds=2&frequency=499", None)
        .unwrap_or_else(|e| panic!("GET /debug/pprof/profile: {e}"));
    let sent = load.finish();
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.header("content-type"), "application/octet-stream");
    assert_eq!(reply.header("content-disposition"), "attachment; filename=\"gateway-cpu.pb\"");

    let profile = pprof::protos::Profile::decode(reply.raw.clone())
        .unwrap_or_else(|e| panic!("the answer is not a pprof protobuf ({} bytes): {e}", reply.raw.len()));
    let strings = &profile.string_table;
    let name = |i: i64| strings.get(i as usize).map(String::as_str).unwrap_or("?");
    let kinds: Vec<(&str, &str)> = profile.sample_type.iter().map(|t| (name(t.ty), name(t.unit))).collect();
    assert!(kinds.contains(&("cpu", "nanoseconds")), "sample types: {kinds:?}");
    assert!(!profile.sample.is_empty(), "no samples in a 2 s profile under load ({sent} requests sent)");
    let ours: Vec<&String> = strings.iter().filter(|s| s.contains("gateway::proxy")).collect();
    assert!(
        !ours.is_empty(),
        "no function of gateway::proxy in the profile ({} samples, {sent} requests); some names: {:?}",
        profile.sample.len(),
        strings.iter().take(40).collect::<Vec<_>>()
    );
    eprintln!(
        "profile: {} bytes, {} samples, {} functions, {} from gateway::proxy, {sent} requests",
        reply.raw.len(),
        profile.sample.len(),
        profile.function.len(),
        ours.len()
    );
}

#[test]
fn a_flamegraph_one_profile_at_a_time_and_bad_durations() {
    let dir = TempDir::new();
    let backends = [Backend::new("b1"), Backend::new("b2")];
    let gw = start_gateway(&dir, &backends);
    let admin = gw.admin_addr();

    // A bad duration: 400 with the accepted range, and no profiler started.
    let bad = request(admin, "GET", "/debug/pprof/profile?seconds=0", None).expect("an answer");
    assert_eq!(bad.status, 400, "{}", bad.body);
    assert!(bad.body.contains("from 1 to 300"), "{}", bad.body);
    let bad = request(admin, "GET", "/debug/pprof/profile?seconds=2&frequency=100000", None).expect("an answer");
    assert_eq!(bad.status, 400, "{}", bad.body);

    // A flamegraph under load, and a second profile refused while it runs.
    let load = Load::start(gw.addr, 1);
    let svg = std::thread::spawn(move || request(admin, "GET", "/debug/pprof/profile?seconds=2&format=svg", None));
    gw.wait_for_log(Duration::from_secs(10), |l| util::message(l) == "CPU profile started");
    let second = request(admin, "GET", "/debug/pprof/profile?seconds=1", None).expect("an answer");
    assert_eq!(second.status, 409, "a second profile while one runs: {}", second.body);
    assert!(second.body.contains("already"), "{}", second.body);
    let svg = svg.join().expect("the SVG request").unwrap_or_else(|e| panic!("GET ?format=svg: {e}"));
    load.finish();
    assert_eq!(svg.status, 200, "{}", svg.body);
    assert_eq!(svg.header("content-type"), "image/svg+xml");
    assert!(svg.body.contains("<svg"), "not an SVG: {}", &svg.body[..svg.body.len().min(300)]);
    assert!(svg.body.contains("gateway::"), "the flamegraph names no gateway function");

    // Once it is done, the next profile may start.
    let again = request(admin, "GET", "/debug/pprof/profile?seconds=1", None).expect("an answer");
    assert_eq!(again.status, 200, "{}", again.body);
}
