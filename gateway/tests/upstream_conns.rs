//! The backend connection pool: each upstream's own connect timeout, idle keep-alive
//! connections closed after `pool.idle_timeout` (or not kept at all with
//! `pool.max_idle: 0`), and HTTP/2 connections a backend closes with GOAWAY opened
//! again without failing a request.

mod util;

use bytes::Bytes;
use http_body_util::Full;
use hyper::server::conn::http2;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::Value;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use util::{Gateway, TempDir, Traffic, poll_until};

/// A listening socket that never accepts, its backlog filled: a new connection to it
/// waits for its SYN to be answered, like a backend behind a black hole. Loopback only.
fn blackhole() -> (SocketAddr, Vec<TcpStream>, socket2::Socket) {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into()).unwrap();
    socket.listen(0).unwrap();
    let addr = socket.local_addr().unwrap().as_socket().unwrap();
    let mut held = Vec::new();
    for _ in 0..16 {
        match TcpStream::connect_timeout(&addr, Duration::from_millis(300)) {
            Ok(s) => held.push(s),
            Err(_) => return (addr, held, socket),
        }
    }
    panic!("the backlog of {addr} never filled up");
}

fn start(dir: &TempDir, yaml: &str) -> Gateway {
    Gateway::with_config(&dir.write("gw.yaml", yaml), &dir.path().join("plugins"))
}

#[test]
fn each_upstream_waits_its_own_connect_timeout() {
    let (hole, _held, _socket) = blackhole();
    let dir = TempDir::new();
    // Before the fix, every upstream got the shortest connect timeout of them all.
    let gw = start(
        &dir,
        &format!(
            "\
listeners:
  - address: 127.0.0.1:0
routes:
  - {{ path_prefix: /short, upstream: short }}
  - {{ path_prefix: /long, upstream: long }}
upstreams:
  short:
    timeouts: {{ connect: 200ms, response_header: 30s }}
    retries: {{ attempts: 1 }}
    health_check: {{ enabled: false }}
    backends: [ {{ address: {hole} }} ]
  long:
    timeouts: {{ connect: 3s, response_header: 30s }}
    retries: {{ attempts: 1 }}
    health_check: {{ enabled: false }}
    backends: [ {{ address: {hole} }} ]
"
        ),
    );
    let timed = |path: &str| {
        let started = Instant::now();
        let (status, _) = util::get(gw.addr, path);
        (status, started.elapsed())
    };
    let (status, short) = timed("/short");
    assert_eq!(status, 502);
    assert!(short < Duration::from_millis(1500), "200ms connect timeout, answered after {short:?}");
    let (status, long) = timed("/long");
    assert_eq!(status, 502);
    assert!(
        long >= Duration::from_millis(2800) && long < Duration::from_secs(10),
        "3s connect timeout, answered after {long:?}"
    );
}

/// A keep-alive HTTP/1.1 backend for one connection: answers its first request, then
/// reports how long the connection stayed open after that answer.
fn one_connection_backend() -> (SocketAddr, std::sync::mpsc::Receiver<Duration>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                break;
            }
        }
        (&stream).write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").unwrap();
        let answered = Instant::now();
        let mut rest = Vec::new();
        let _ = reader.read_to_end(&mut rest);
        let _ = tx.send(answered.elapsed());
    });
    (addr, rx)
}

fn pool_config(backend: SocketAddr, pool: &str) -> String {
    format!(
        "\
listeners:
  - address: 127.0.0.1:0
upstreams:
  web:
    health_check: {{ enabled: false }}
    pool: {pool}
    backends: [ {{ address: {backend} }} ]
"
    )
}

#[test]
fn idle_backend_connections_are_closed_after_the_idle_timeout() {
    let (backend, closed) = one_connection_backend();
    let dir = TempDir::new();
    let gw = start(&dir, &pool_config(backend, "{ idle_timeout: 1s }"));
    assert_eq!(util::get(gw.addr, "/").0, 200);
    let open = closed.recv_timeout(Duration::from_secs(15)).expect("the gateway closes the idle connection");
    assert!(
        open >= Duration::from_millis(900) && open < Duration::from_secs(5),
        "idle_timeout 1s (checked once a second): closed after {open:?}"
    );
}

#[test]
fn max_idle_zero_keeps_no_connection() {
    let (backend, closed) = one_connection_backend();
    let dir = TempDir::new();
    let gw = start(&dir, &pool_config(backend, "{ max_idle: 0 }"));
    assert_eq!(util::get(gw.addr, "/").0, 200);
    let open = closed.recv_timeout(Duration::from_secs(15)).expect("the gateway closes the connection");
    assert!(open < Duration::from_millis(800), "not kept idle: closed after {open:?}");
}

/// An h2c backend that closes each connection gracefully (GOAWAY, then the streams in
/// flight finish) once it has answered `per_connection` requests on it, as servers with
/// a maximum connection age or request count do. Stopped when dropped.
struct GoawayBackend {
    addr: SocketAddr,
    /// Connections accepted.
    accepted: Arc<AtomicUsize>,
    /// Connections closed with GOAWAY.
    goaways: Arc<AtomicUsize>,
    /// Requests answered, on all connections.
    answered: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl GoawayBackend {
    fn start(per_connection: usize) -> GoawayBackend {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let (accepted, goaways, answered) = (Arc::default(), Arc::default(), Arc::default());
        let task = util::rt().spawn({
            let (accepted, goaways, answered): (Arc<AtomicUsize>, Arc<AtomicUsize>, Arc<AtomicUsize>) =
                (Arc::clone(&accepted), Arc::clone(&goaways), Arc::clone(&answered));
            async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                while let Ok((stream, _)) = listener.accept().await {
                    accepted.fetch_add(1, Ordering::SeqCst);
                    let (goaways, answered) = (goaways.clone(), answered.clone());
                    tokio::spawn(async move {
                        let served = Arc::new(AtomicUsize::new(0));
                        let enough = Arc::new(tokio::sync::Notify::new());
                        let service = service_fn({
                            let (served, enough) = (served.clone(), enough.clone());
                            move |_req| {
                                answered.fetch_add(1, Ordering::SeqCst);
                                if served.fetch_add(1, Ordering::SeqCst) + 1 == per_connection {
                                    enough.notify_one();
                                }
                                async {
                                    Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(Bytes::from(
                                        "h2",
                                    ))))
                                }
                            }
                        });
                        let conn =
                            http2::Builder::new(TokioExecutor::new()).serve_connection(TokioIo::new(stream), service);
                        let mut conn = std::pin::pin!(conn);
                        tokio::select! {
                            _ = conn.as_mut() => return,
                            _ = enough.notified() => {}
                        }
                        conn.as_mut().graceful_shutdown();
                        goaways.fetch_add(1, Ordering::SeqCst);
                        let _ = conn.await;
                    });
                }
            }
        });
        GoawayBackend { addr, accepted, goaways, answered, task }
    }
}

impl Drop for GoawayBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn h2c_upstream(backend: SocketAddr) -> String {
    // One attempt per request: a request lost on a closing connection would reach the
    // client as a 502 instead of being hidden by a retry.
    format!(
        "\
listeners:
  - address: 127.0.0.1:0
threads: 2
access_log: false
upstreams:
  grpc:
    protocol: h2c
    retries: {{ attempts: 1 }}
    health_check: {{ enabled: false }}
    backends: [ {{ address: {backend} }} ]
"
    )
}

/// Stops `clients`; (requests sent, failures) over all of them.
fn finish_all(clients: Vec<Traffic>) -> (u64, Vec<String>) {
    let (mut sent, mut failures) = (0, Vec::new());
    for c in clients {
        let (n, f) = c.finish();
        sent += n;
        failures.extend(f);
    }
    (sent, failures)
}

#[test]
fn http2_connections_closed_with_goaway_are_opened_again_without_failing_a_request() {
    const PER_CONNECTION: usize = 25;
    const CLIENTS: usize = 4;
    let backend = GoawayBackend::start(PER_CONNECTION);
    let dir = TempDir::new();
    let gw = start(&dir, &h2c_upstream(backend.addr));
    let clients: Vec<Traffic> = (0..CLIENTS).map(|_| Traffic::start(gw.addr)).collect();
    let wanted = 40 * PER_CONNECTION;
    poll_until(Duration::from_secs(60), Duration::from_millis(20), || {
        (backend.answered.load(Ordering::SeqCst) >= wanted).then_some(())
    })
    .unwrap_or_else(|| panic!("{wanted} requests answered within 60s"));
    let (sent, failures) = finish_all(clients);
    let accepted = backend.accepted.load(Ordering::SeqCst);
    let goaways = backend.goaways.load(Ordering::SeqCst);
    println!(
        "{sent} requests from {CLIENTS} clients, {} failed; the backend sent {goaways} GOAWAYs and accepted {accepted} connections",
        failures.len()
    );
    assert!(failures.is_empty(), "failed requests: {:?}", &failures[..failures.len().min(10)]);
    // Each connection carried about PER_CONNECTION requests (a few more that were in
    // flight when its GOAWAY went out): the gateway opened a new one after every GOAWAY.
    assert!(goaways >= 30, "{goaways} GOAWAYs sent for {sent} requests");
    assert!(accepted > goaways, "{accepted} connections accepted after {goaways} GOAWAYs");
    assert!(
        accepted * 2 * PER_CONNECTION >= sent as usize,
        "{sent} requests on {accepted} connections that each close after {PER_CONNECTION}"
    );
}

/// Unlike hyper's graceful shutdown (a first GOAWAY, a PING round trip, then the last
/// stream id), nginx and Go send one GOAWAY naming the last stream they processed: a
/// request the gateway sent on a later stream meanwhile is refused unprocessed, and
/// must be sent again on a new connection rather than fail.
#[test]
fn requests_a_single_goaway_left_unprocessed_are_sent_again() {
    let Some(py) = util::venv_python("h2", "the h2 package") else { return };
    const PER_CONNECTION: usize = 25;
    const CLIENTS: usize = 4;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/h2/goaway_server.py");
    let mut server = Command::new(py)
        .arg(script)
        .arg(PER_CONNECTION.to_string())
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start goaway_server.py");
    let mut out = BufReader::new(server.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    let port: u16 = line.trim().strip_prefix("ready ").and_then(|p| p.parse().ok()).expect("`ready PORT`");
    let dir = TempDir::new();
    let gw = start(&dir, &h2c_upstream(SocketAddr::from(([127, 0, 0, 1], port))));
    let clients: Vec<Traffic> = (0..CLIENTS).map(|_| Traffic::start(gw.addr)).collect();
    let since = Instant::now();
    let wanted = 60 * PER_CONNECTION;
    poll_until(Duration::from_secs(60), Duration::from_millis(20), || {
        (clients.iter().map(|c| c.after(since).len()).sum::<usize>() >= wanted).then_some(())
    })
    .unwrap_or_else(|| panic!("{wanted} answers within 60s"));
    let (sent, failures) = finish_all(clients);
    drop(server.stdin.take());
    let mut report = String::new();
    out.read_line(&mut report).unwrap();
    let _ = server.wait();
    let report: Value = serde_json::from_str(&report).expect("a JSON report");
    println!("{sent} requests from {CLIENTS} clients, {} failed; server: {report}", failures.len());
    assert!(failures.is_empty(), "failed requests: {:?}", &failures[..failures.len().min(10)]);
    let (goaways, accepted) = (report["goaways"].as_u64().unwrap(), report["accepted"].as_u64().unwrap());
    assert!(goaways >= 40, "{goaways} GOAWAYs sent for {sent} requests");
    assert!(accepted > goaways, "{accepted} connections accepted after {goaways} GOAWAYs");
}
