//! At the edge: PROXY protocol v1/v2 listeners (the client address an L4 balancer
//! passes on reaches `X-Forwarded-For`, the access log and plugins' `client-ip`; a
//! connection without the header is closed), per-route `max_body_bytes` (413 before any backend for a declared length,
//! a chunked body cut as it streams), a total request timeout (504), and 502/504 bodies
//! that tell the client nothing about the backends.

mod util;

use serde_json::Value;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};
use util::{Backend, Gateway, TempDir, TunableBackend, get, poll_until, request, upload};

fn start(dir: &TempDir, yaml: &str) -> Gateway {
    let file = dir.write("gw.yaml", yaml);
    Gateway::with_config(&file, &dir.path().join("plugins"))
}

/// Writes `bytes` on a fresh connection and returns all the gateway sent back until it
/// closed the connection (or 10 s passed), or the error that ended the read.
fn exchange(addr: SocketAddr, bytes: &[u8]) -> Result<String, std::io::Error> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(bytes)?;
    let mut out = Vec::new();
    s.read_to_end(&mut out)?;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// The access log's JSON lines once there are at least `n`.
fn access_lines(file: &Path, n: usize) -> Vec<Value> {
    poll_until(Duration::from_secs(5), Duration::from_millis(20), || {
        let text = std::fs::read_to_string(file).unwrap_or_default();
        let lines: Vec<Value> = text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
        (lines.len() >= n).then_some(lines)
    })
    .unwrap_or_else(|| panic!("fewer than {n} access-log lines: {:?}", std::fs::read_to_string(file)))
}

fn metric(admin: SocketAddr, key: &str) -> f64 {
    let (_, text) = get(admin, "/metrics");
    text.lines()
        .find_map(|l| l.strip_prefix(key).and_then(|v| v.strip_prefix(' ')).and_then(|v| v.parse().ok()))
        .unwrap_or(0.0)
}

/// A version 2 PROXY header, built here byte by byte from the spec (not by the gateway's
/// own code): signature, version 2 + PROXY, family, length, addresses, ports.
fn v2(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.push(0x21);
    match (src, dst) {
        (SocketAddr::V4(s), SocketAddr::V4(d)) => {
            h.extend_from_slice(&[0x11, 0, 12]);
            h.extend_from_slice(&s.ip().octets());
            h.extend_from_slice(&d.ip().octets());
        }
        (SocketAddr::V6(s), SocketAddr::V6(d)) => {
            h.extend_from_slice(&[0x21, 0, 36]);
            h.extend_from_slice(&s.ip().octets());
            h.extend_from_slice(&d.ip().octets());
        }
        _ => unreachable!(),
    }
    h.extend_from_slice(&src.port().to_be_bytes());
    h.extend_from_slice(&dst.port().to_be_bytes());
    h
}

const GET: &[u8] = b"GET /who HTTP/1.1\r\nHost: shop.example\r\nConnection: close\r\n\r\n";

#[test]
fn proxy_protocol_v1_and_v2_give_the_client_address_and_a_connection_without_it_is_closed() {
    let b = Backend::new("a");
    let dir = TempDir::new();
    let log = dir.path().join("access.log");
    let yaml = format!(
        "listeners: [ {{ address: 127.0.0.1:0, proxy_protocol: true }} ]\nthreads: 1\naccess_log: {{ path: {} }}\nupstreams:\n  web:\n    health_check: {{ enabled: false }}\n    backends: [ {{ address: {} }} ]\n",
        log.display(),
        b.addr()
    );
    let gw = start(&dir, &yaml);
    let admin = gw.admin_addr();

    // Version 1, sent in pieces as a slow balancer might.
    let mut s = TcpStream::connect(gw.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    for piece in ["PROXY TCP4 203.0.113.7 ", "10.0.0.1 40000 ", "8080\r\n"] {
        s.write_all(piece.as_bytes()).unwrap();
        std::thread::sleep(Duration::from_millis(30));
    }
    s.write_all(GET).unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");

    // Version 2 over IPv6 addresses, header and request in one write.
    let mut bytes = v2("[2001:db8::9]:5000".parse().unwrap(), "[2001:db8::1]:443".parse().unwrap());
    bytes.extend_from_slice(GET);
    assert!(exchange(gw.addr, &bytes).unwrap().starts_with("HTTP/1.1 200"));

    // Version 2 over IPv4.
    let mut bytes = v2("198.51.100.20:6000".parse().unwrap(), "10.0.0.1:443".parse().unwrap());
    bytes.extend_from_slice(GET);
    assert!(exchange(gw.addr, &bytes).unwrap().starts_with("HTTP/1.1 200"));

    // `PROXY UNKNOWN`: the socket's own peer.
    let mut bytes = b"PROXY UNKNOWN\r\n".to_vec();
    bytes.extend_from_slice(GET);
    assert!(exchange(gw.addr, &bytes).unwrap().starts_with("HTTP/1.1 200"));

    let seen: Vec<String> =
        b.hits().iter().map(|h| h.headers["x-forwarded-for"].to_str().unwrap().to_owned()).collect();
    assert_eq!(seen, ["203.0.113.7", "2001:db8::9", "198.51.100.20", "127.0.0.1"], "X-Forwarded-For");
    let clients: Vec<Value> = access_lines(&log, 4).iter().map(|l| l["client"].clone()).collect();
    assert_eq!(clients, ["203.0.113.7", "2001:db8::9", "198.51.100.20", "127.0.0.1"], "access log");

    // Plain HTTP, or garbage: closed without an answer, and counted.
    for bad in
        [GET, b"PROXY TCP4 999.0.0.1 10.0.0.1 1 2\r\nGET / HTTP/1.1\r\n\r\n", b"\r\n\r\n\0\r\nQUIT\n\x11\x11\0\x0c"]
    {
        match exchange(gw.addr, bad) {
            Ok(answer) => assert_eq!(answer, "", "answered a connection without a valid PROXY header"),
            Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
        }
    }
    assert_eq!(b.hits().len(), 4, "no request without a valid header reached the backend");
    assert!(
        poll_until(Duration::from_secs(5), Duration::from_millis(50), || {
            (metric(admin, "gateway_proxy_protocol_refused_total") >= 3.0).then_some(())
        })
        .is_some(),
        "refused connections are counted"
    );
}

/// Through a PROXY listener, `consistent-hash` on `client-ip` sends each client to the
/// backend that the same hash on a header carrying that address picks (same backends,
/// same ids, so the same ring): the plugin hashed the address from the PROXY header,
/// not the balancer's (which would send every client to one backend).
#[test]
fn the_client_address_from_a_proxy_header_is_the_plugins_client_ip() {
    let backends = [Backend::new("a"), Backend::new("b"), Backend::new("c")];
    let list: String = backends.iter().map(|b| format!("{{ address: {}, id: {} }}, ", b.addr(), b.name())).collect();
    let dir = TempDir::new();
    let yaml = format!(
        "\
listeners: [ {{ address: 127.0.0.1:0, proxy_protocol: true }} ]
threads: 1
access_log: false
routes:
  - {{ path_prefix: /by-ip, upstream: by_ip }}
  - {{ path_prefix: /by-header, upstream: by_header }}
upstreams:
  by_ip:
    strategy: {{ plugin: consistent-hash, params: {{ key: client-ip }} }}
    health_check: {{ enabled: false }}
    backends: [ {list} ]
  by_header:
    strategy: {{ plugin: consistent-hash, params: {{ key: \"header:x-client\" }} }}
    health_check: {{ enabled: false }}
    backends: [ {list} ]
"
    );
    let gw = start(&dir, &yaml);
    // The backend that answered `GET path` sent from `client` through a v1 PROXY header.
    let via = |client: &str, path: &str, header: &str| {
        let request = format!(
            "PROXY TCP4 {client} 10.0.0.1 40000 8080\r\nGET {path} HTTP/1.1\r\nHost: shop.example\r\n{header}Connection: close\r\n\r\n"
        );
        let answer = exchange(gw.addr, request.as_bytes()).unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        answer.rsplit("\r\n\r\n").next().unwrap().trim().to_owned()
    };
    let mut by_ip = Vec::new();
    for i in 1..=24 {
        let client = format!("198.51.100.{i}");
        let hashed = via(&client, "/by-ip", "");
        assert_eq!(hashed, via(&client, "/by-header", &format!("x-client: {client}\r\n")), "client {client}");
        by_ip.push(hashed);
    }
    by_ip.sort();
    by_ip.dedup();
    println!("24 client addresses from PROXY headers went to backends {by_ip:?}");
    assert!(by_ip.len() > 1, "24 client addresses all went to {by_ip:?}: the plugin saw one address");
}

/// A backend that never answers and counts every byte it receives (request line,
/// headers, chunk framing and body alike), to see how much of a body got through.
fn counting_sink() -> (SocketAddr, Arc<AtomicU64>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let count = Arc::new(AtomicU64::new(0));
    let total = count.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let total = total.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 65536];
                let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
                while let Ok(n) = stream.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    total.fetch_add(n as u64, Relaxed);
                }
            });
        }
    });
    (addr, count)
}

const LIMIT: u64 = 1_000_000;

#[test]
fn a_body_over_max_body_bytes_gets_413_declared_at_once_and_chunked_cut_as_it_streams() {
    let web = Backend::new("web");
    let (sink, received) = counting_sink();
    let dir = TempDir::new();
    let yaml = format!(
        "listeners: [ {{ address: 127.0.0.1:0 }} ]\nthreads: 1\nroutes:
  - {{ path_prefix: /sink, upstream: sink, max_body_bytes: {LIMIT} }}
  - {{ path_prefix: /upload, upstream: web, max_body_bytes: {LIMIT} }}
  - {{ path_prefix: /, upstream: web }}
upstreams:
  web:
    health_check: {{ enabled: false }}
    backends: [ {{ address: {} }} ]
  sink:
    health_check: {{ enabled: false }}
    timeouts: {{ response_header: 60s }}
    backends: [ {{ address: {sink} }} ]
",
        web.addr()
    );
    let gw = start(&dir, &yaml);
    let admin = gw.admin_addr();

    // Under the limit: streamed to the backend whole.
    let r = upload(gw.addr, "/upload", LIMIT - 1000).unwrap();
    assert_eq!((r.status, r.body.as_str()), (200, "999000"));

    // A declared length over the limit: 413 at once, no body read, no backend asked.
    let started = Instant::now();
    let answer = exchange(
        gw.addr,
        b"POST /sink HTTP/1.1\r\nHost: a\r\nContent-Length: 1000000000\r\nExpect: 100-continue\r\n\r\n",
    )
    .unwrap();
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(!answer.contains("100 Continue"), "the client was not invited to send the body: {answer}");
    assert!(started.elapsed() < Duration::from_secs(5), "413 took {:?}", started.elapsed());
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(received.load(Relaxed), 0, "the backend was contacted");

    // Chunked, 100 MB: cut after the limit. The backend got at most the limit (plus the
    // request head and chunk framing); the client got 413 or a reset; the gateway's memory
    // did not take in the body.
    let rss_before = gw.rss_kib();
    let started = Instant::now();
    let result = upload(gw.addr, "/sink", 100 * 1024 * 1024);
    match &result {
        Ok(r) => assert_eq!(r.status, 413, "{}", r.body),
        Err(e) => eprintln!("the upload was reset, as allowed: {e}"),
    }
    assert!(started.elapsed() < Duration::from_secs(20), "the cut took {:?}", started.elapsed());
    std::thread::sleep(Duration::from_millis(300));
    let got = received.load(Relaxed);
    let chunk = util::pattern_chunk().len() as u64;
    assert!(got > LIMIT / 2, "the body was streamed up to the limit: {got}");
    assert!(got <= LIMIT + chunk + 4096, "the backend received {got} bytes, limit {LIMIT}");
    let grew = gw.peak_rss_kib().saturating_sub(rss_before);
    eprintln!(
        "100 MB chunked upload, limit {LIMIT}: the backend got {got} bytes, the client {} after {:?}, peak RSS +{grew} KiB",
        result.as_ref().map_or_else(|e| format!("an error ({e})"), |r| format!("status {}", r.status)),
        started.elapsed()
    );
    assert!(grew < 48 * 1024, "the gateway grew by {grew} KiB while refusing a 100 MB body");

    // Both answered by the gateway and counted as body_too_large; the gateway still serves.
    let n = metric(admin, "gateway_generated_responses_total{reason=\"body_too_large\",code=\"4xx\"}");
    assert!(n >= 1.0, "413s counted: {n}");
    assert_eq!(get(gw.addr, "/").0, 200);
}

#[test]
fn a_route_or_upstream_total_timeout_answers_504_and_is_counted() {
    let slow = TunableBackend::new("slow");
    slow.set_delay(Duration::from_secs(5));
    let dir = TempDir::new();
    let yaml = format!(
        "listeners: [ {{ address: 127.0.0.1:0 }} ]\nthreads: 1\nroutes:
  - {{ path_prefix: /route, upstream: slow, timeout: 400ms }}
  - {{ path_prefix: /, upstream: bounded }}
upstreams:
  slow:
    health_check: {{ enabled: false }}
    backends: [ {{ address: {a} }} ]
  bounded:
    health_check: {{ enabled: false }}
    timeouts: {{ request: 700ms }}
    backends: [ {{ address: {a} }} ]
",
        a = slow.addr()
    );
    let gw = start(&dir, &yaml);
    let admin = gw.admin_addr();
    for (path, bound) in [("/route", Duration::from_millis(400)), ("/upstream", Duration::from_millis(700))] {
        let started = Instant::now();
        let r = request(gw.addr, "GET", path, None).unwrap();
        let took = started.elapsed();
        assert_eq!(r.status, 504, "{path}: {}", r.body);
        assert!(took >= bound, "{path}: 504 after {took:?}, before the {bound:?} bound");
        assert!(took < bound + Duration::from_secs(3), "{path}: 504 only after {took:?}");
        assert!(!r.body.contains("127.0.0.1"), "{}", r.body);
    }
    let n = metric(admin, "gateway_generated_responses_total{reason=\"request_timeout\",code=\"5xx\"}");
    assert_eq!(n, 2.0);
    // A fast answer within the bound passes.
    slow.set_delay(Duration::ZERO);
    assert_eq!(get(gw.addr, "/route").0, 200);
}

#[test]
fn bad_gateway_and_gateway_timeout_bodies_name_no_backend_but_the_log_and_api_do() {
    // A port nobody listens on: connect is refused.
    let dead = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let slow = TunableBackend::new("slow");
    slow.set_delay(Duration::from_secs(3));
    let dir = TempDir::new();
    let log = dir.path().join("access.log");
    let yaml = format!(
        "listeners: [ {{ address: 127.0.0.1:0 }} ]\nthreads: 1\naccess_log: {{ path: {log} }}\nroutes:
  - {{ path_prefix: /dead, upstream: dead }}
  - {{ path_prefix: /slow, upstream: slow }}
upstreams:
  dead:
    health_check: {{ enabled: false }}
    retries: {{ attempts: 1 }}
    backends: [ {{ address: {dead}, id: dead-1 }} ]
  slow:
    health_check: {{ enabled: false }}
    retries: {{ attempts: 1 }}
    timeouts: {{ response_header: 300ms }}
    backends: [ {{ address: {slow} }} ]
",
        log = log.display(),
        slow = slow.addr()
    );
    let gw = start(&dir, &yaml);
    let admin = gw.admin_addr();
    let r = request(gw.addr, "GET", "/dead", None).unwrap();
    assert_eq!(r.status, 502);
    let t = request(gw.addr, "GET", "/slow", None).unwrap();
    assert_eq!(t.status, 504);
    for (body, addr) in [(&r.body, dead), (&t.body, slow.addr())] {
        for secret in [addr.ip().to_string(), addr.port().to_string(), "refused".into(), "os error".into()] {
            assert!(!body.contains(&secret), "the client's body reveals `{secret}`: {body}");
        }
    }
    assert!(r.body.starts_with("bad gateway"), "{}", r.body);
    assert!(t.body.starts_with("gateway timeout"), "{}", t.body);

    // The operator still learns what happened: the access log and the admin API.
    let lines = access_lines(&log, 2);
    let error = lines[0]["error"].as_str().unwrap_or_else(|| panic!("no error in {}", lines[0]));
    assert!(error.contains(&dead.to_string()) && error.contains("dead-1"), "{error}");
    assert!(lines[1]["error"].as_str().unwrap().contains("300ms"), "{}", lines[1]);
    let (_, api) = get(admin, "/api/upstreams");
    assert!(api.contains("last_failure") && api.contains(&dead.to_string()), "{api}");
}

#[test]
fn a_backend_the_half_rule_kept_in_is_ejected_once_another_ejection_ends() {
    let (a, b) = (Backend::failing("a", 500), Backend::failing("b", 500));
    let dir = TempDir::new();
    let yaml = format!(
        "listeners: [ {{ address: 127.0.0.1:0 }} ]\nthreads: 1\nupstreams:
  web:
    health_check: {{ enabled: false }}
    retries: {{ attempts: 1 }}
    passive: {{ consecutive_failures: 2, base_ejection: 1s }}
    backends: [ {{ address: {}, id: a }}, {{ address: {}, id: b }} ]
",
        a.addr(),
        b.addr()
    );
    let gw = start(&dir, &yaml);
    fn ejected(id: &'static str) -> impl Fn(&Value) -> bool {
        move |l| util::message(l).starts_with("backend ejected") && l["backend"] == id
    }
    // Round robin: a, b, a (a ejected: one of two is allowed), b (refused: that would
    // leave none).
    for _ in 0..4 {
        assert_eq!(get(gw.addr, "/").0, 500);
    }
    gw.wait_for_log(Duration::from_secs(5), ejected("a"));
    gw.wait_for_log(Duration::from_secs(5), |l| {
        util::message(l).starts_with("not ejecting after repeated failures") && l["backend"] == "b"
    });
    // No more traffic: when a's ejection ends, b (still failing, no success since) is
    // ejected without waiting for its next failures.
    let started = Instant::now();
    gw.wait_for_log(Duration::from_secs(10), ejected("b"));
    assert!(started.elapsed() < Duration::from_secs(5), "b ejected only after {:?}", started.elapsed());
    assert_eq!(b.hits().len(), 2, "b was ejected without more requests");
}
