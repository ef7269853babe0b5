//! gRPC through the gateway with real grpcio servers and clients (Python, from the venv
//! that scripts/test.sh installs in ~/.cache/gateway-test-venv): each call balanced on
//! its own even on one client connection, server-streaming, client-streaming and
//! bidirectional calls streamed, a server's status passed through, a killed server's
//! calls taken by the others, and UNAVAILABLE (not a hang) when no backend answers.
//!
//! The client speaks h2c (prior knowledge) to a plain listener; the gateway speaks h2c
//! (`protocol: h2c`) or TLS + ALPN h2 (`protocol: h2`) to the servers.

mod util;

use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use util::{Ca, Gateway, TempDir};

const SCRIPTS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/grpc");

/// The test venv's Python with grpcio (see [`util::venv_python`]).
fn python() -> Option<PathBuf> {
    util::venv_python("grpc", "grpcio")
}

/// A gRPC server process (tests/grpc/server.py); killed by its PID when dropped.
struct Server {
    child: Child,
    name: String,
    port: u16,
}

impl Server {
    fn start(py: &Path, name: &str, tls: Option<&util::Issued>) -> Server {
        let mut cmd = Command::new(py);
        cmd.arg(Path::new(SCRIPTS).join("server.py")).arg(name);
        if let Some(t) = tls {
            cmd.arg("--tls").arg(&t.cert).arg(&t.key);
        }
        let mut child = cmd
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start server.py");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx.recv_timeout(Duration::from_secs(30)).expect("server.py says `ready PORT` within 30s");
        let port = line.trim().strip_prefix("ready ").and_then(|p| p.parse().ok()).expect("`ready PORT`");
        Server { child, name: name.into(), port }
    }

    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs one client scenario (tests/grpc/client.py) against `target`; its JSON report.
fn client(py: &Path, target: std::net::SocketAddr, args: &[&str]) -> Value {
    let mut child = Command::new(py)
        .arg(Path::new(SCRIPTS).join("client.py"))
        .arg(target.to_string())
        .args(args)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start client.py");
    let deadline = Instant::now() + Duration::from_secs(120);
    while child.try_wait().expect("client.py status").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("client.py {args:?} did not finish within 120s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().expect("client.py output");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "client.py {args:?} failed: {}{stdout}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("client.py printed {stdout:?}: {e}"))
}

/// A gateway with one upstream `grpc` over `servers` (`extra`: more upstream settings).
fn gateway(dir: &TempDir, backends: &[String], extra: &str) -> Gateway {
    let list: String = backends.iter().map(|b| format!("      - address: {b}\n")).collect();
    let yaml = format!(
        "\
listeners:
  - address: 127.0.0.1:0
threads: 2
upstreams:
  grpc:
    protocol: h2c
    health_check:
      interval: 300ms
      timeout: 300ms
      fall: 1
{extra}    backends:
{list}"
    );
    let file = dir.write("gw.yaml", yaml);
    Gateway::with_config(&file, &dir.path().join("plugins"))
}

fn count(report: &Value, name: &str) -> u64 {
    report["served"][name].as_u64().unwrap_or(0)
}

#[test]
fn unary_calls_on_one_channel_are_balanced_per_call_and_survive_a_killed_server() {
    let Some(py) = python() else { return };
    let servers: Vec<Server> = ["s1", "s2", "s3"].iter().map(|n| Server::start(&py, n, None)).collect();
    let dir = TempDir::new();
    let gw = gateway(&dir, &servers.iter().map(Server::addr).collect::<Vec<_>>(), "");

    // One channel (one HTTP/2 connection to the gateway), 300 calls: round robin per call.
    let report = client(&py, gw.addr, &["unary", "300"]);
    assert_eq!(report["errors"], serde_json::json!([]), "{report}");
    for s in &servers {
        let n = count(&report, &s.name);
        assert!((90..=110).contains(&n), "{} served {n} of 300 calls: {report}", s.name);
    }

    // s2 is killed (SIGKILL, by PID) after 30 of 150 calls: the rest succeed on s1 and s3
    // (a call whose connection is refused is retried on another backend: nothing reached
    // the dead one).
    let report = client(&py, gw.addr, &["unary", "150", "30", &servers[1].pid().to_string()]);
    assert_eq!(report["errors"], serde_json::json!([]), "every call succeeds: {report}");
    let (s1, s2, s3) = (count(&report, "s1"), count(&report, "s2"), count(&report, "s3"));
    assert_eq!(s1 + s2 + s3, 150, "{report}");
    assert!(s2 <= 11, "s2 served only before it was killed: {report}");
    assert!(s1 >= 60 && s3 >= 60, "s1 and s3 took over: {report}");
}

#[test]
fn streaming_calls_stream_both_ways() {
    let Some(py) = python() else { return };
    let servers: Vec<Server> = ["s1", "s2"].iter().map(|n| Server::start(&py, n, None)).collect();
    let dir = TempDir::new();
    let gw = gateway(&dir, &servers.iter().map(Server::addr).collect::<Vec<_>>(), "");

    // Server streaming: 5 messages 400 ms apart arrive one by one, not all at the end.
    let report = client(&py, gw.addr, &["stream", "5", "400"]);
    let messages = report["messages"].as_array().expect("messages");
    assert_eq!(messages.len(), 5, "{report}");
    let times: Vec<f64> = report["times"].as_array().unwrap().iter().map(|t| t.as_f64().unwrap()).collect();
    assert!(times[4] - times[0] > 1.2, "the first message came long before the last (sent 1.6 s apart): {report}");

    // Bidirectional ping-pong: each message is sent only after the previous answer came
    // back, so this finishes only if both directions stream through the gateway.
    let report = client(&py, gw.addr, &["bidi", "5"]);
    let messages: Vec<&str> = report["messages"].as_array().unwrap().iter().map(|m| m.as_str().unwrap()).collect();
    assert_eq!(messages.len(), 5, "{report}");
    let server = messages[0].split(':').next().unwrap();
    let expected: Vec<String> = (0..5).map(|i| format!("{server}:m{i}")).collect();
    assert_eq!(messages, expected, "one call, one backend, answers in order");
    let first = report["times"][0].as_f64().unwrap();
    assert!(first < report["last_sent"].as_f64().unwrap(), "the first answer arrived before the last message was sent");

    // Client streaming.
    let report = client(&py, gw.addr, &["collect", "4"]);
    let reply = report["reply"].as_str().unwrap();
    assert!(reply.ends_with(":m0+m1+m2+m3"), "{report}");
}

#[test]
fn a_servers_status_passes_through_and_no_backend_is_unavailable() {
    let Some(py) = python() else { return };
    let server = Server::start(&py, "s1", None);
    let dir = TempDir::new();
    let gw = gateway(&dir, &[server.addr()], "");

    // The server's NOT_FOUND and its message (in trailers) reach the client unchanged.
    let report = client(&py, gw.addr, &["fail"]);
    assert_eq!(report["code"], "NOT_FOUND", "{report}");
    assert_eq!(report["message"], "no such thing: thing-42", "{report}");

    // Every backend down: each attempt's connection is refused, and the client gets
    // UNAVAILABLE from the gateway at once (not a hang until its deadline).
    drop(server);
    let report = client(&py, gw.addr, &["unavailable"]);
    assert_eq!(report["code"], "UNAVAILABLE", "{report}");
    let message = report["message"].as_str().unwrap();
    // The gateway's reason, not grpcio's reading of an HTTP 502 ("Received http2 header with status").
    assert!(message.contains("backend") && !message.contains("http2 header"), "{report}");
    assert!(report["seconds"].as_f64().unwrap() < 3.0, "answered quickly: {report}");

    // Once health checks mark it down: the gateway's 503 becomes UNAVAILABLE too.
    gw.wait_for_log(Duration::from_secs(10), |l| util::message(l).starts_with("backend is down"));
    let report = client(&py, gw.addr, &["unavailable"]);
    assert_eq!(report["code"], "UNAVAILABLE", "{report}");
    assert!(report["message"].as_str().unwrap().contains("no healthy backend"), "{report}");
}

#[test]
fn grpc_over_tls_to_the_backends_with_alpn_h2() {
    let Some(py) = python() else { return };
    let dir = TempDir::new();
    let ca = Ca::new(dir.path(), "backends");
    let issued = ca.issue("grpc-backend", &["grpc.internal"]);
    let servers: Vec<Server> = ["t1", "t2"].iter().map(|n| Server::start(&py, n, Some(&issued))).collect();
    let extra = format!("    tls: {{ ca: {}, server_name: grpc.internal }}\n", ca.cert.display());
    let yaml_backends: Vec<String> = servers.iter().map(Server::addr).collect();
    let gw = {
        let list: String = yaml_backends.iter().map(|b| format!("      - address: {b}\n")).collect();
        let yaml = format!(
            "listeners:\n  - address: 127.0.0.1:0\nupstreams:\n  grpc:\n    protocol: h2\n{extra}    backends:\n{list}"
        );
        Gateway::with_config(&dir.write("gw.yaml", yaml), &dir.path().join("plugins"))
    };
    let report = client(&py, gw.addr, &["unary", "20"]);
    assert_eq!(report["errors"], serde_json::json!([]), "{report}");
    assert_eq!((count(&report, "t1"), count(&report, "t2")), (10, 10), "{report}");
    let report = client(&py, gw.addr, &["fail"]);
    assert_eq!(report["code"], "NOT_FOUND", "{report}");
}

/// Established TCP connections whose local port is `port` (the server side of the
/// gateway's connections to a backend), from /proc/net/tcp and tcp6 (grpcio's sockets
/// are dual-stack: its IPv4 connections are listed there).
fn established_to(port: u16) -> usize {
    let mut table = std::fs::read_to_string("/proc/net/tcp").expect("read /proc/net/tcp");
    table.push_str(&std::fs::read_to_string("/proc/net/tcp6").unwrap_or_default());
    let local = format!(":{port:04X}");
    table
        .lines()
        .skip(1)
        .filter(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            cols.len() > 3 && cols[1].ends_with(&local) && cols[3] == "01"
        })
        .count()
}

#[test]
fn http2_backend_connections_are_shared_up_to_max_streams() {
    let Some(py) = python() else { return };
    let server = Server::start(&py, "s1", None);
    let dir = TempDir::new();
    let yaml = format!(
        "\
listeners:
  - address: 127.0.0.1:0
threads: 1
upstreams:
  grpc:
    protocol: h2c
    health_check: {{ enabled: false }}
    pool: {{ max_streams: 4 }}
    backends: [ {{ address: {} }} ]
",
        server.addr()
    );
    let gw = Gateway::with_config(&dir.write("gw.yaml", yaml), &dir.path().join("plugins"));

    // 10 calls at once, each open for about 2 s: with 4 streams per connection, the
    // gateway holds 3 connections to the backend (not 10, not 1).
    let calls = Command::new(&py)
        .arg(Path::new(SCRIPTS).join("client.py"))
        .arg(gw.addr.to_string())
        .args(["parallel", "10", "3", "1000"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("start client.py");
    let seen = util::poll_until(Duration::from_secs(10), Duration::from_millis(50), || {
        let n = established_to(server.port);
        (n >= 3).then_some(n)
    });
    std::thread::sleep(Duration::from_millis(300));
    let during = established_to(server.port);
    let out = calls.wait_with_output().expect("client.py ends");
    let report: Value = serde_json::from_slice(&out.stdout).expect("client.py report");
    assert_eq!(report["results"], serde_json::json!([3, 3, 3, 3, 3, 3, 3, 3, 3, 3]), "{report}");
    assert_eq!((seen, during), (Some(3), 3), "10 concurrent calls, 4 streams per connection");

    // Sequential calls afterwards reuse those connections: no new ones.
    let report = client(&py, gw.addr, &["unary", "20"]);
    assert_eq!(count(&report, "s1"), 20, "{report}");
    // (A connection the server closed may linger in the kernel for a moment.)
    let settled = util::poll_until(Duration::from_secs(3), Duration::from_millis(50), || {
        (established_to(server.port) <= 3).then_some(())
    });
    assert!(settled.is_some(), "connections not reused: {} open to the backend", established_to(server.port));
}
