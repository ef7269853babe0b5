//! Bad input is refused with a precise message: config files that say what is wrong,
//! where (file:line:column) and in which field; malformed HTTP that gets a 4xx while the
//! gateway keeps serving.

mod util;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;
use util::{Backend, CliOutput, Gateway, TempDir, get, run_cli};

/// Runs `gateway --config FILE` with `yaml`, expects it to fail fast; returns the output
/// and the file's path as printed.
fn refused(yaml: &str) -> (CliOutput, String) {
    let dir = TempDir::new();
    let file = dir.write("gw.yaml", yaml);
    let file = file.to_str().unwrap().to_owned();
    let out = run_cli(&["--config", &file], Duration::from_secs(20));
    assert_ne!(out.code, Some(0), "a bad config was accepted: {out:?}");
    assert!(out.code.is_some(), "killed by a signal: {out:?}");
    assert!(out.elapsed < Duration::from_secs(5), "took {:?} to refuse a bad config", out.elapsed);
    (out, file)
}

#[test]
fn wrong_type_names_file_line_and_field() {
    let yaml = "upstreams:\n  web:\n    backends:\n      - address: 127.0.0.1:9001\n        weight: heavy\n";
    let (out, file) = refused(yaml);
    let err = out.stderr.trim();
    assert!(err.contains(&format!("{file}:5:")), "no {file}:5: in {err}");
    assert!(err.contains("upstreams.web.backends[0].weight: invalid type: string \"heavy\""), "{err}");
    assert!(err.contains("expected u32"), "{err}");
}

#[test]
fn unknown_field_names_file_line_and_field() {
    let yaml =
        "upstreams:\n  web:\n    helth_check:\n      interval: 1s\n    backends:\n      - address: 127.0.0.1:9001\n";
    let (out, file) = refused(yaml);
    let err = out.stderr.trim();
    assert!(err.contains(&format!("{file}:3:")), "no {file}:3: in {err}");
    assert!(err.contains("unknown field `helth_check`"), "{err}");
    assert!(err.contains("`health_check`"), "the known fields are not listed: {err}");
}

#[test]
fn upstream_without_backends_is_named() {
    let yaml = "upstreams:\n  web:\n    strategy:\n      plugin: round-robin\n";
    let (out, file) = refused(yaml);
    let err = out.stderr.trim();
    assert!(err.contains(&format!("{file}:2:")), "no {file}:2: in {err}");
    assert!(err.contains("upstreams.web.backends: no backends"), "{err}");
    assert!(err.contains("`discovery`"), "the other way to get backends is not named: {err}");
}

#[test]
fn route_to_an_unknown_upstream_is_located() {
    let yaml = "routes:\n  - upstream: nope\nupstreams:\n  web:\n    backends:\n      - address: 127.0.0.1:9001\n";
    let (out, file) = refused(yaml);
    let err = out.stderr.trim();
    assert!(err.contains(&format!("{file}:2")), "no {file}:2 in {err}");
    assert!(err.contains("routes[0].upstream: no upstream named `nope` (defined: web)"), "{err}");
}

/// Writes `raw` on a fresh connection and reads until the gateway closes it (or 5s).
fn raw_exchange(addr: std::net::SocketAddr, raw: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    stream.write_all(raw).unwrap();
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    // Bounded: at most 5s per read and 64 KiB in all.
    while answer.len() < 64 * 1024 {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => answer.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&answer).into_owned()
}

#[test]
fn malformed_http_gets_a_4xx_and_the_gateway_keeps_serving() {
    let dir = TempDir::new();
    let backend = Backend::new("backend-1");
    let addr = backend.addr().to_string();
    let plugins = dir.path().join("plugins");
    let mut gw = Gateway::start(&["--listen", "127.0.0.1:0", "-b", &addr, "--plugins", plugins.to_str().unwrap()]);

    for garbage in
        [&b"GARBAGE\r\n\r\n"[..], b"GET / HTTP/1.1\r\nHost: x\r\nbad header line\r\n\r\n", b"\x00\x01\x02\x03\r\n\r\n"]
    {
        let answer = raw_exchange(gw.addr, garbage);
        let status_line = answer.lines().next().unwrap_or("");
        assert!(
            status_line.starts_with("HTTP/1.1 4"),
            "{:?} got {status_line:?} instead of a 4xx",
            String::from_utf8_lossy(garbage)
        );
        assert_eq!(get(gw.addr, "/"), (200, "backend-1".to_owned()), "the gateway stopped serving");
    }
    assert!(gw.is_running());
    assert!(backend.hits().len() == 3, "garbage reached the backend: {:?}", backend.hits());
}
