//! Client limits on a listener, with real sockets: 300 slowloris connections are closed
//! after the header timeout while a normal client keeps getting fast answers; an idle
//! keep-alive connection is closed after the idle timeout (one waiting for a slow
//! backend is not); oversize and too many headers get 431; `max_connections` leaves the
//! next connection waiting until one closes; HTTP/2 advertises the stream limit.

mod util;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use util::{Backend, Gateway, KeepAlive, TempDir, get, report, request_with_headers, rt};

fn start(backend: &Backend, limits: &str) -> (TempDir, Gateway) {
    let dir = TempDir::new();
    let yaml = format!(
        "listeners:\n  - address: 127.0.0.1:0\n    limits: {limits}\nthreads: 2\naccess_log: false\nupstreams:\n  web:\n    health_check: {{ enabled: false }}\n    backends: [ {{ address: {} }} ]\n",
        backend.addr()
    );
    let config = dir.write("gateway.yaml", yaml);
    let gw = Gateway::with_config(&config, &dir.path().join("plugins"));
    (dir, gw)
}

/// A counter from the admin `/metrics` page.
fn metric(gw: &Gateway, line_start: &str) -> f64 {
    let (status, text) = get(gw.admin_addr(), "/metrics");
    assert_eq!(status, 200);
    text.lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no `{line_start}` in /metrics:\n{text}"))
}

/// Reads until the server closes (`Ok(elapsed)`) or `limit` passes (`Err`).
fn wait_closed(s: &mut TcpStream, limit: Duration) -> Result<Duration, String> {
    let start = Instant::now();
    s.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
    let mut buf = [0u8; 4096];
    while start.elapsed() < limit {
        match s.read(&mut buf) {
            Ok(0) => return Ok(start.elapsed()),
            Ok(_) => {}
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(_) => return Ok(start.elapsed()),
        }
    }
    Err(format!("still open after {limit:?}"))
}

#[test]
fn slowloris_connections_are_closed_after_the_header_timeout_while_others_are_served() {
    let backend = Backend::new("web");
    let (_dir, gw) = start(&backend, "{ header_timeout: 2s }");
    let addr = gw.addr;
    // 300 clients each send one byte of a request head per second.
    let attackers: Vec<_> = (0..300)
        .map(|_| {
            rt().spawn(async move {
                let mut s = tokio::net::TcpStream::connect(addr).await.map_err(|e| format!("connect: {e}"))?;
                let start = Instant::now();
                let head = b"GET / HTTP/1.1\r\nHost: slow\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
                let mut buf = [0u8; 64];
                for byte in head.iter().cycle().take(30) {
                    if s.write_all(&[*byte]).await.is_err() {
                        return Ok(start.elapsed());
                    }
                    match tokio::time::timeout(Duration::from_secs(1), s.read(&mut buf)).await {
                        Ok(Ok(0)) | Ok(Err(_)) => return Ok(start.elapsed()),
                        Ok(Ok(_)) => return Err("the gateway answered a head that never ended".to_owned()),
                        Err(_) => {}
                    }
                }
                Err(format!("still open after {:?}", start.elapsed()))
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    // Meanwhile, a normal client (a new connection per request) is served promptly.
    let mut latencies = Vec::new();
    for _ in 0..60 {
        let t = Instant::now();
        let (status, _) = get(addr, "/");
        latencies.push(t.elapsed());
        assert_eq!(status, 200);
        std::thread::sleep(Duration::from_millis(20));
    }
    let closed: Vec<Duration> = attackers
        .into_iter()
        .map(|h| rt().block_on(h).unwrap().unwrap_or_else(|e| panic!("a slowloris connection: {e}")))
        .collect();
    latencies.sort();
    let p95 = latencies[latencies.len() * 95 / 100];
    let max = *latencies.last().unwrap();
    eprintln!("normal client during the attack: p95 {p95:?}, max {max:?}");
    assert!(p95 < Duration::from_millis(50), "p95 {p95:?} (max {max:?}) during the attack");
    let (first, last) = (closed.iter().min().unwrap(), closed.iter().max().unwrap());
    eprintln!("slowloris connections closed between {first:?} and {last:?}");
    report::record(
        "http-abuse",
        serde_json::json!({
            "case": "slowloris: 300 connections sending one head byte a second (header_timeout 2s)",
            "client_got": format!("closed after {:.1}-{:.1} s", first.as_secs_f64(), last.as_secs_f64()),
            "backend_got": "nothing",
            "rss_kib_after": gw.rss_kib(),
            "normal_client_ms": p95.as_secs_f64() * 1e3,
        }),
    );
    assert!(*first >= Duration::from_millis(1900), "closed before the 2s header timeout: {first:?}");
    assert!(*last <= Duration::from_millis(4500), "a slowloris connection lasted {last:?}");
    let counted = metric(&gw, "gateway_connections_closed_total{reason=\"header_timeout\"}");
    assert!(counted >= 300.0, "header timeouts counted: {counted}");
}

#[test]
fn a_connection_that_never_sends_a_request_is_closed_after_the_header_timeout() {
    let backend = Backend::new("web");
    let (_dir, gw) = start(&backend, "{ header_timeout: 1s }");
    let mut s = TcpStream::connect(gw.addr).unwrap();
    let closed = wait_closed(&mut s, Duration::from_secs(5)).unwrap();
    assert!(closed >= Duration::from_millis(950) && closed <= Duration::from_millis(2500), "{closed:?}");
}

#[test]
fn idle_keep_alive_connections_are_closed_but_a_slow_request_is_not() {
    let backend = Backend::new("web");
    let slow = Backend::slow("slow", Duration::from_millis(2500));
    let (_dir, gw) = start(&backend, "{ idle_timeout: 1s, header_timeout: 5s }");
    let mut s = TcpStream::connect(gw.addr).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n").unwrap();
    let mut buf = [0u8; 1024];
    let n = s.read(&mut buf).unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&buf[..n]));
    let closed = wait_closed(&mut s, Duration::from_secs(5)).unwrap();
    eprintln!("idle connection closed after {closed:?}");
    assert!(closed >= Duration::from_millis(950) && closed <= Duration::from_millis(2500), "{closed:?}");

    // A request that waits 2.5 s for its backend is not idle.
    let (_dir2, gw2) = start(&slow, "{ idle_timeout: 1s, header_timeout: 5s }");
    let mut conn = KeepAlive::open(gw2.addr).unwrap();
    let t = Instant::now();
    let reply = conn.get("/").unwrap();
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert!(t.elapsed() >= Duration::from_millis(2400));
    assert_eq!(conn.get("/").unwrap().status, 200, "the same connection serves the next request");
    let counted = metric(&gw, "gateway_connections_closed_total{reason=\"idle_timeout\"}");
    assert!(counted >= 1.0, "idle timeouts counted: {counted}");
}

#[test]
fn oversize_or_too_many_headers_get_431() {
    let backend = Backend::new("web");
    let (_dir, gw) = start(&backend, "{ max_header_bytes: 16384, max_headers: 20 }");
    let big = "x".repeat(20_000);
    let reply = request_with_headers(gw.addr, "GET", "/", &[("x-big", &big)]);
    match reply {
        Ok(r) => assert_eq!(r.status, 431, "{}", r.body),
        Err(e) => panic!("expected a 431 answer, got {e}"),
    }
    let fine = "x".repeat(8_000);
    assert_eq!(request_with_headers(gw.addr, "GET", "/", &[("x-big", &fine)]).unwrap().status, 200);
    let many: Vec<(String, String)> = (0..30).map(|i| (format!("x-h{i}"), "v".to_owned())).collect();
    let many: Vec<(&str, &str)> = many.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
    assert_eq!(request_with_headers(gw.addr, "GET", "/", &many).unwrap().status, 431);
    assert_eq!(request_with_headers(gw.addr, "GET", "/", &many[..10]).unwrap().status, 200);
    assert!(backend.hits().len() == 2, "refused requests never reach the backend");
    let counted = metric(&gw, "gateway_generated_responses_total{reason=\"bad_request\",code=\"4xx\"}");
    assert!(counted >= 2.0, "{counted}");
}

#[test]
fn max_connections_leaves_the_next_connection_waiting_until_one_closes() {
    let backend = Backend::new("web");
    let (_dir, gw) = start(&backend, "{ max_connections: 2 }");
    let mut first = KeepAlive::open(gw.addr).unwrap();
    let mut second = KeepAlive::open(gw.addr).unwrap();
    assert_eq!(first.get("/").unwrap().status, 200);
    assert_eq!(second.get("/").unwrap().status, 200);
    // The third connects (the kernel's backlog) but is not served...
    let mut third = TcpStream::connect(gw.addr).unwrap();
    third.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n").unwrap();
    third.set_read_timeout(Some(Duration::from_millis(800))).unwrap();
    let mut buf = [0u8; 1024];
    assert!(third.read(&mut buf).is_err(), "the third connection must wait while two are open");
    // ...until one of the two closes.
    drop(first);
    third.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let t = Instant::now();
    let n = third.read(&mut buf).expect("served once a slot is free");
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&buf[..n]));
    eprintln!("third connection served {:?} after the first closed", t.elapsed());
    assert_eq!(second.get("/").unwrap().status, 200);
    let counted = metric(&gw, "gateway_connection_limit_reached_total");
    assert!(counted >= 1.0, "{counted}");
}

#[test]
fn http2_advertises_the_stream_limit() {
    if Command::new("nghttp").arg("--version").output().is_err() {
        assert!(std::env::var_os("CI").is_none(), "`nghttp` (apt nghttp2-client) is needed by this test");
        eprintln!("skipped: nghttp is not installed");
        return;
    }
    let backend = Backend::new("web");
    let (_dir, gw) = start(&backend, "{ max_concurrent_streams: 7 }");
    let addr: SocketAddr = gw.addr;
    let out = Command::new("nghttp").args(["-nv", &format!("http://{addr}/")]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("SETTINGS_MAX_CONCURRENT_STREAMS(0x03):7"), "{text}");
    assert!(text.contains(":status: 200"), "{text}");
}

use std::process::Command;
