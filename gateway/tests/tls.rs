//! TLS termination with real clients: `curl` and `openssl s_client` for two SNI names
//! each getting its own certificate (and the default for no or unknown SNI), TLS 1.3 with
//! ALPN h2, TLS 1.1 refused, `h2load` over TLS with no failures, a certificate swap under
//! continuous traffic with zero failed requests, a bad certificate refused while the old
//! one keeps serving, clear start-up errors, and the HTTP→HTTPS redirect listener.
//!
//! Needs `curl`, `openssl` and `h2load` (apt `nghttp2-client`): under CI (env `CI`) a
//! missing tool fails the test, locally it is skipped with a message.

mod util;

use serde_json::Value;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use util::{Backend, Ca, Gateway, Issued, TempDir, message, poll_until, run_cli};

/// Whether `tool` can run; under CI a missing tool is a failure.
fn have(tool: &str) -> bool {
    let ok = Command::new(tool).arg("--version").output().is_ok_and(|o| o.status.success())
        || Command::new(tool).arg("version").output().is_ok_and(|o| o.status.success());
    if !ok {
        assert!(std::env::var_os("CI").is_none(), "`{tool}` is needed by this test (scripts/test.sh installs it)");
        eprintln!("skipped: `{tool}` is not installed (scripts/test.sh installs it)");
    }
    ok
}

fn have_all() -> bool {
    ["curl", "openssl", "h2load"].iter().all(|t| have(t))
}

struct Setup {
    _dir: TempDir,
    ca: Ca,
    a: Issued,
    b: Issued,
    backend: Backend,
    gw: Gateway,
    /// The TLS listener.
    tls: SocketAddr,
    /// The redirect listener.
    redirect: SocketAddr,
}

/// A gateway with a TLS listener (a.test first, then b.test and *.b.test) and a redirect
/// listener to port 8443, in front of one backend.
fn start() -> Setup {
    let tmp = TempDir::new();
    let dir = tmp.path().to_path_buf();
    let ca = Ca::new(&dir, "edge");
    let a = ca.issue("a", &["a.test"]);
    let b = ca.issue("b", &["b.test", "*.b.test"]);
    let backend = Backend::new("web");
    let yaml = format!(
        "listeners:
  - address: 127.0.0.1:0
    tls:
      certificates:
        - {{ cert: {}, key: {} }}
        - {{ cert: {}, key: {} }}
  - address: 127.0.0.1:0
    redirect_https: 8443
threads: 2
access_log: false
upstreams:
  web:
    health_check: {{ enabled: false }}
    backends: [ {{ address: {} }} ]
",
        a.cert.display(),
        a.key.display(),
        b.cert.display(),
        b.key.display(),
        backend.addr()
    );
    let config = tmp.write("gateway.yaml", yaml);
    let gw = Gateway::with_config(&config, &tmp.path().join("plugins"));
    let listening = |l: &Value| message(l) == "listening";
    poll_until(Duration::from_secs(10), Duration::from_millis(20), || {
        (gw.logs().iter().filter(|l| listening(l)).count() >= 2).then_some(())
    })
    .expect("both listeners listening");
    let addrs: Vec<SocketAddr> =
        gw.logs().iter().filter(|l| listening(l)).map(|l| l["address"].as_str().unwrap().parse().unwrap()).collect();
    Setup { _dir: tmp, ca, a, b, backend, gw, tls: addrs[0], redirect: addrs[1] }
}

struct Run {
    ok: bool,
    stdout: String,
    stderr: String,
}

fn run(cmd: &str, args: &[&str]) -> Run {
    let out = Command::new(cmd)
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run {cmd}: {e}"));
    Run {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// `curl https://NAME:PORT/` resolved to the gateway, trusting only the test CA.
/// Prints `STATUS HTTP-VERSION` then the certificates curl saw.
fn curl(s: &Setup, name: &str, extra: &[&str]) -> Run {
    let port = s.tls.port();
    let resolve = format!("{name}:{port}:127.0.0.1");
    let url = format!("https://{name}:{port}/");
    let mut args = vec![
        "-sS",
        "--max-time",
        "10",
        "--resolve",
        &resolve,
        "--cacert",
        s.ca.cert.to_str().unwrap(),
        "-o",
        "/dev/null",
        "-w",
        "%{http_code} %{http_version}\n%{certs}",
    ];
    args.extend_from_slice(extra);
    args.push(&url);
    run("curl", &args)
}

/// The subject line `openssl s_client` printed for the server's certificate.
fn s_client(addr: SocketAddr, extra: &[&str]) -> Run {
    let connect = addr.to_string();
    let mut args = vec!["s_client", "-connect", &connect];
    args.extend_from_slice(extra);
    run("openssl", &args)
}

fn subject(out: &Run) -> String {
    out.stdout
        .lines()
        .find(|l| l.starts_with("subject="))
        .unwrap_or_else(|| panic!("no certificate subject in:\n{}\n{}", out.stdout, out.stderr))
        .replace(' ', "")
}

#[test]
fn each_sni_name_gets_its_own_certificate_over_tls13_with_alpn_h2() {
    if !have_all() {
        return;
    }
    let s = start();
    // curl checks the name against the certificate: a wrong certificate fails it.
    for (name, san) in [("a.test", "DNS:a.test"), ("b.test", "DNS:b.test"), ("www.b.test", "DNS:*.b.test")] {
        let out = curl(&s, name, &[]);
        assert!(out.ok, "curl https://{name}: {}", out.stderr);
        assert!(out.stdout.starts_with("200 2\n"), "{name}: expected 200 over HTTP/2, got {}", out.stdout);
        assert!(out.stdout.contains(san), "{name}: curl saw certificates without {san}:\n{}", out.stdout);
    }
    let out = curl(&s, "a.test", &["--http1.1"]);
    assert!(out.stdout.starts_with("200 1.1\n"), "ALPN http/1.1: {}", out.stdout);
    // The backend learns the client came over TLS.
    let hits = s.backend.hits();
    assert!(!hits.is_empty());
    assert!(hits.iter().all(|h| h.headers["x-forwarded-proto"] == "https"), "{hits:?}");

    // openssl: the certificate by SNI, the default without or with an unknown name.
    for (sni, cn) in
        [("a.test", "CN=a.test"), ("b.test", "CN=b.test"), ("x.b.test", "CN=b.test"), ("c.test", "CN=a.test")]
    {
        let out = s_client(s.tls, &["-servername", sni]);
        assert_eq!(subject(&out), format!("subject={cn}"), "SNI {sni}");
    }
    let out = s_client(s.tls, &["-noservername"]);
    assert_eq!(subject(&out), "subject=CN=a.test", "no SNI: the first certificate is the default");

    let out = s_client(s.tls, &["-servername", "a.test", "-alpn", "h2"]);
    assert!(out.stdout.contains("Protocol  : TLSv1.3") || out.stdout.contains("TLSv1.3"), "{}", out.stdout);
    assert!(out.stdout.contains("ALPN protocol: h2"), "{}", out.stdout);
    let out = s_client(s.tls, &["-servername", "a.test", "-tls1_2"]);
    assert!(out.stdout.contains("Protocol  : TLSv1.2"), "TLS 1.2 is still offered: {}", out.stdout);
    // TLS 1.1 (allowed on the client side with the lowest security level) is refused.
    let out = s_client(s.tls, &["-servername", "a.test", "-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0"]);
    assert!(out.stdout.contains("no peer certificate available"), "TLS 1.1 must fail:\n{}", out.stdout);
    let out = curl(&s, "a.test", &["--tlsv1.1", "--tls-max", "1.1", "--ciphers", "DEFAULT@SECLEVEL=0"]);
    assert!(!out.ok, "curl with TLS 1.1 at most must fail: {}", out.stdout);
}

#[test]
fn h2load_over_tls_has_no_failures() {
    if !have_all() {
        return;
    }
    let s = start();
    let url = format!("https://127.0.0.1:{}/", s.tls.port());
    let out = run("h2load", &["-n", "2000", "-c", "10", "-m", "10", &url]);
    assert!(out.ok, "h2load: {}\n{}", out.stdout, out.stderr);
    assert!(out.stdout.contains("Application protocol: h2"), "{}", out.stdout);
    assert!(
        out.stdout.contains("requests: 2000 total, 2000 started, 2000 done, 2000 succeeded, 0 failed, 0 errored"),
        "{}",
        out.stdout
    );
    assert!(out.stdout.contains("status codes: 2000 2xx"), "{}", out.stdout);
}

/// Replaces a file the way renewal tools do: a temporary, then a rename.
fn install(from: &Path, to: &Path) {
    let tmp = to.with_extension("tmp");
    std::fs::copy(from, &tmp).unwrap();
    std::fs::rename(&tmp, to).unwrap();
}

#[test]
fn certificate_swap_under_traffic_fails_no_request() {
    if !have_all() {
        return;
    }
    let s = start();
    let url = format!("https://127.0.0.1:{}/", s.tls.port());
    // Long-lived HTTP/2 connections across the swap...
    let h2load = {
        let url = url.clone();
        std::thread::spawn(move || run("h2load", &["-D", "4", "-c", "4", "-m", "4", &url]))
    };
    // ...and a new handshake after another, each checking the chain and the name.
    let stop = Arc::new(AtomicBool::new(false));
    let handshakes = {
        let stop = stop.clone();
        let (port, ca) = (s.tls.port(), s.ca.cert.clone());
        std::thread::spawn(move || {
            let mut seen = Vec::new();
            let deadline = Instant::now() + Duration::from_secs(60);
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                let out = run(
                    "curl",
                    &[
                        "-sS",
                        "--max-time",
                        "10",
                        "--resolve",
                        &format!("a.test:{port}:127.0.0.1"),
                        "--cacert",
                        ca.to_str().unwrap(),
                        "-o",
                        "/dev/null",
                        "-w",
                        "%{http_code}\n%{certs}",
                        &format!("https://a.test:{port}/"),
                    ],
                );
                let renewed = out.stdout.contains("DNS:renewed.a.test");
                seen.push((out.ok && out.stdout.starts_with("200\n"), renewed, out.stderr));
            }
            seen
        })
    };
    std::thread::sleep(Duration::from_millis(1200));
    let renewed = s.ca.issue("a-renewed", &["a.test", "renewed.a.test"]);
    let mark = s.gw.log_mark();
    install(&renewed.key, &s.a.key);
    install(&renewed.cert, &s.a.cert);
    let applied = s.gw.wait_for_log_after(mark, Duration::from_secs(10), |l| {
        message(l) == "certificates reloaded: new TLS handshakes use them"
    });
    assert!(applied["names"].as_str().unwrap_or("").contains("renewed.a.test"), "{applied}");
    std::thread::sleep(Duration::from_millis(1500));
    stop.store(true, Ordering::Relaxed);
    let seen = handshakes.join().unwrap();
    let failed: Vec<_> = seen.iter().filter(|(ok, _, _)| !ok).collect();
    assert!(failed.is_empty(), "{} of {} handshakes failed: {failed:?}", failed.len(), seen.len());
    let first_new = seen.iter().position(|(_, renewed, _)| *renewed).expect("new handshakes see the new certificate");
    assert!(first_new > 0, "the old certificate served before the swap");
    assert!(
        seen[first_new..].iter().all(|(_, renewed, _)| *renewed),
        "after the swap every handshake sees the new one"
    );
    let out = h2load.join().unwrap();
    assert!(out.stdout.contains(" 0 failed, 0 errored"), "long-lived connections across the swap: {}", out.stdout);
    assert!(!out.stdout.contains(" 0 succeeded"), "{}", out.stdout);

    // A bad file is refused with one log line naming it; the current certificate serves on.
    let mark = s.gw.log_mark();
    std::fs::write(&s.b.cert, "-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n").unwrap();
    let refused = s.gw.wait_for_log_after(mark, Duration::from_secs(10), |l| {
        message(l).starts_with("certificate refused, the previous one keeps serving")
    });
    assert!(message(&refused).contains(s.b.cert.to_str().unwrap()), "names the file: {refused}");
    let out = curl(&s, "b.test", &[]);
    assert!(out.ok && out.stdout.starts_with("200 "), "b.test after a bad file: {} {}", out.stdout, out.stderr);
    // A key that belongs to another certificate is refused too.
    let mark = s.gw.log_mark();
    std::fs::copy(s.b.cert.with_file_name("a-renewed.pem"), &s.b.cert).unwrap();
    let refused =
        s.gw.wait_for_log_after(mark, Duration::from_secs(10), |l| message(l).starts_with("certificate refused"));
    assert!(message(&refused).contains("does not belong to the certificate"), "{refused}");
    assert!(curl(&s, "b.test", &[]).ok, "b.test still serves its old certificate");
}

#[test]
fn redirect_listener_sends_clients_to_https() {
    if !have("curl") {
        return;
    }
    let s = start();
    let url = format!("http://127.0.0.1:{}/shop/cart?item=7", s.redirect.port());
    let out = run("curl", &["-sS", "-i", "--max-time", "10", "-H", "Host: shop.test:8080", &url]);
    assert!(out.stdout.starts_with("HTTP/1.1 308"), "{}", out.stdout);
    assert!(
        out.stdout.to_ascii_lowercase().contains("location: https://shop.test:8443/shop/cart?item=7\r\n"),
        "{}",
        out.stdout
    );
    let out = run("curl", &["-sS", "-i", "--max-time", "10", "-H", "Host: evil.test/x", &url]);
    assert!(out.stdout.starts_with("HTTP/1.1 400"), "a Host that is not a name is refused: {}", out.stdout);
    assert!(s.backend.hits().is_empty(), "the redirect listener proxies nothing");
}

#[test]
fn missing_or_mismatched_certificate_files_stop_the_start_with_the_file_named() {
    let dir = TempDir::new();
    let ca = Ca::new(dir.path(), "bad");
    let a = ca.issue("a", &["a.test"]);
    let b = ca.issue("b", &["b.test"]);
    let cases = [
        (dir.path().join("missing.pem"), a.key.clone(), "missing.pem: cannot read the certificate"),
        (a.cert.clone(), b.key.clone(), "this private key does not belong to the certificate"),
        (a.cert.clone(), a.cert.clone(), "a.pem: cannot read the private key"),
    ];
    for (cert, key, expected) in cases {
        let config = dir.write(
            "gateway.yaml",
            format!(
                "listeners:\n  - address: 127.0.0.1:0\n    tls:\n      certificates: [ {{ cert: {}, key: {} }} ]\nupstreams:\n  web:\n    backends: [ {{ address: 127.0.0.1:9 }} ]\n",
                cert.display(),
                key.display()
            ),
        );
        let out =
            run_cli(&["--config", config.to_str().unwrap(), "--plugins", "/nonexistent"], Duration::from_secs(30));
        assert_ne!(out.code, Some(0));
        assert!(out.stderr.contains(expected), "expected `{expected}` in:\n{}", out.stderr);
    }
}
