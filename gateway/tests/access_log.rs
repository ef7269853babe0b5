//! The access log as an operator uses it: JSON lines in a file with every field, the
//! request id and W3C trace the backend saw, the gateway's own answers with their
//! reason, logrotate (`mv` + SIGUSR1), and text logs without colour codes off a terminal.

mod util;

use serde_json::Value;
use std::path::Path;
use std::time::Duration;
use util::{Backend, Gateway, TempDir, get, poll_until, request_with_headers};

/// The JSON lines of `file` once it has at least `n` of them (bounded wait).
fn lines(file: &Path, n: usize) -> Vec<Value> {
    poll_until(Duration::from_secs(5), Duration::from_millis(20), || {
        let text = std::fs::read_to_string(file).unwrap_or_default();
        let lines: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}")))
            .collect();
        (lines.len() >= n).then_some(lines)
    })
    .unwrap_or_else(|| {
        panic!("{} has fewer than {n} lines: {:?}", file.display(), std::fs::read_to_string(file).unwrap_or_default())
    })
}

#[test]
fn every_request_is_one_json_line_in_the_file_with_its_trace_and_reopened_after_logrotate() {
    let b = Backend::new("a");
    let dir = TempDir::new();
    let file = dir.path().join("access.log");
    let gw = Gateway::start(&["-p", "0", "-b", &format!("{},id=a", b.addr()), "--access-log", file.to_str().unwrap()]);

    let trace = "0af7651916cd43dd8448eb211c80319c";
    let parent = format!("00-{trace}-b7ad6b7169203331-01");
    let r = request_with_headers(gw.addr, "GET", "/book/dune?x=1", &[("traceparent", &parent)]).unwrap();
    assert_eq!(r.status, 200);
    let line = &lines(&file, 1)[0];
    for field in [
        "time",
        "request_id",
        "trace_id",
        "client",
        "method",
        "host",
        "path",
        "status",
        "route",
        "upstream",
        "backend",
        "strategy",
        "attempts",
        "fallback",
        "bytes_in",
        "bytes_out",
        "duration_ms",
    ] {
        assert!(line.get(field).is_some(), "no `{field}` in {line}");
    }
    assert_eq!(line["path"], "/book/dune?x=1");
    assert_eq!(line["status"], 200);
    assert_eq!(line["backend"], "a");
    assert_eq!(line["strategy"], "round-robin");
    assert_eq!(line["trace_id"], trace, "the client's trace is continued");
    assert_eq!(line["bytes_out"].as_u64(), Some(r.body.len() as u64), "the body's bytes");
    // What the backend saw: the same request id, the same trace with a new span id.
    let hit = b.hits().pop().unwrap();
    let seen = |h: &str| hit.headers.get(h).and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
    assert_eq!(seen("x-request-id"), line["request_id"].as_str().unwrap());
    let sent = seen("traceparent");
    assert!(sent.starts_with(&format!("00-{trace}-")) && sent.ends_with("-01"), "{sent}");
    assert_ne!(sent, parent, "the gateway's hop has its own span id");

    // Without a traceparent a trace starts here.
    get(gw.addr, "/");
    let started = &lines(&file, 2)[1];
    let id = started["trace_id"].as_str().unwrap();
    assert!(id.len() == 32 && id != trace, "{started}");

    // logrotate: move the file away, SIGUSR1, the next lines go to a new file.
    let rotated = dir.path().join("access.log.1");
    std::fs::rename(&file, &rotated).unwrap();
    let status = std::process::Command::new("kill").args(["-USR1", &gw.pid().to_string()]).status().unwrap();
    assert!(status.success());
    poll_until(Duration::from_secs(5), Duration::from_millis(50), || {
        get(gw.addr, "/");
        file.exists().then_some(())
    })
    .expect("a new access.log after SIGUSR1");
    assert_eq!(lines(&rotated, 2).len(), 2, "the rotated file keeps its lines");
    assert!(!lines(&file, 1).is_empty());
}

#[test]
fn the_gateways_own_answers_are_logged_with_their_reason() {
    let b = Backend::new("a");
    let dir = TempDir::new();
    let file = dir.path().join("access.log");
    let config = dir.write(
        "gw.yaml",
        format!(
            "listeners: [{{address: 127.0.0.1:0}}]\naccess_log: {{path: {}}}\nroutes:\n  - {{name: api, path_prefix: /api, upstream: web}}\nupstreams:\n  web:\n    backends: [{{address: {}, id: a}}]\n",
            file.display(),
            b.addr()
        ),
    );
    let gw = Gateway::start(&["--config", config.to_str().unwrap()]);
    assert_eq!(get(gw.addr, "/elsewhere").0, 404);
    b.stop();
    assert_eq!(get(gw.addr, "/api/x").0, 502);
    let lines = lines(&file, 2);
    assert_eq!((lines[0]["status"].as_u64(), lines[0]["reason"].as_str()), (Some(404), Some("no_route")));
    assert_eq!(lines[0]["route"], "-");
    assert_eq!((lines[1]["status"].as_u64(), lines[1]["reason"].as_str()), (Some(502), Some("backend_failed")));
    assert_eq!(lines[1]["route"], "api");
}

#[test]
fn text_logs_have_no_colour_codes_off_a_terminal() {
    let b = Backend::new("a");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_gateway"))
        .args(["--log-format", "text", "-p", "0", "-b", &b.addr().to_string()])
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        use std::io::Read;
        // Up to the `listening` line (other start-up lines may come first), at most 64 KiB.
        let (mut buf, mut text) = ([0u8; 4096], String::new());
        while !text.contains("listening") && text.len() < 64 * 1024 {
            match stderr.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => text.push_str(&String::from_utf8_lossy(&buf[..n])),
            }
        }
        text
    });
    let text = reader.join().unwrap();
    let _ = child.kill();
    let _ = child.wait();
    assert!(text.contains("listening"), "{text}");
    assert!(!text.contains('\u{1b}'), "ANSI escape codes in a non-terminal log: {text:?}");
}
