//! The admin listener's safety: loopback unless a token protects it, bearer tokens,
//! public routes, cross-site and DNS-rebinding requests refused, JSON errors, drain.

mod util;

use std::time::Duration;
use util::{Backend, Gateway, TempDir, get, request, request_with_headers, run_cli};

/// The status line of a request written by hand (to control the Host header).
fn raw_status(addr: std::net::SocketAddr, request: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).lines().next().unwrap_or("").to_owned()
}

const TOKEN: &str = "s3cret-token-for-the-admin-api-0123456789";

#[test]
fn a_public_admin_address_needs_a_token() {
    let b = Backend::new("a");
    let out = run_cli(&["-p", "0", "-b", &b.addr().to_string(), "--admin", "0.0.0.0:0"], Duration::from_secs(30));
    assert_eq!(out.code, Some(1), "must refuse to start: {}", out.stderr);
    assert!(out.stderr.contains("is not a loopback address"), "{}", out.stderr);
    assert!(out.stderr.contains("--admin-token-file"), "says how to fix it: {}", out.stderr);

    let dir = TempDir::new();
    let empty = dir.write("empty", "\n");
    let out = run_cli(
        &[
            "-p",
            "0",
            "-b",
            &b.addr().to_string(),
            "--admin",
            "0.0.0.0:0",
            "--admin-token-file",
            empty.to_str().unwrap(),
        ],
        Duration::from_secs(30),
    );
    assert_eq!(out.code, Some(1));
    assert!(out.stderr.contains("is empty"), "{}", out.stderr);
}

#[test]
fn with_a_token_every_request_but_the_public_ones_needs_it() {
    let b = Backend::new("a");
    let dir = TempDir::new();
    let token = dir.write("token", format!("{TOKEN}\n"));
    let gw = Gateway::start(&[
        "-p",
        "0",
        "-b",
        &format!("{},id=a", b.addr()),
        "--admin",
        "127.0.0.1:0",
        "--admin-token-file",
        token.to_str().unwrap(),
    ]);
    let admin = gw.admin_addr();
    assert_eq!(get(admin, "/healthz"), (200, "ok\n".to_owned()));
    let page = request(admin, "GET", "/", None).unwrap();
    assert_eq!(page.status, 200);
    assert!(page.header("content-type").starts_with("text/html"));

    for path in ["/api/upstreams", "/api/stats", "/metrics", "/api/config"] {
        let r = request(admin, "GET", path, None).unwrap();
        assert_eq!(r.status, 401, "{path} without the token");
        let e: serde_json::Value = serde_json::from_str(&r.body).expect("JSON error");
        assert!(e["error"].as_str().unwrap().contains("Authorization: Bearer"), "{}", r.body);
        let wrong = request_with_headers(admin, "GET", path, &[("authorization", "Bearer wrong")]).unwrap();
        assert_eq!(wrong.status, 401);
        let bearer = format!("Bearer {TOKEN}");
        let ok = request_with_headers(admin, "GET", path, &[("authorization", &bearer)]).unwrap();
        assert_eq!(ok.status, 200, "{path} with the token: {}", ok.body);
    }
    let r = request(admin, "POST", "/api/upstreams/default/backends/a/drain", None).unwrap();
    assert_eq!(r.status, 401, "a mutation without the token");
    let bearer = format!("Bearer {TOKEN}");
    // With the token, even a request that says it is cross-site: the token proves it.
    let r =
        request_with_headers(admin, "POST", "/api/upstreams/default/backends/a/drain", &[("authorization", &bearer)])
            .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(get(gw.addr, "/").0, 503, "the only backend is drained");

    let logs: String = gw.logs().iter().map(|l| l.to_string()).collect();
    assert!(!logs.contains(TOKEN), "the token must never be logged");
}

#[test]
fn public_metrics_is_served_without_the_token() {
    let b = Backend::new("a");
    let dir = TempDir::new();
    let token = dir.write("token", TOKEN);
    let file = dir.write(
        "gw.yaml",
        format!(
            "listeners: [{{address: 127.0.0.1:0}}]\nadmin: {{address: 127.0.0.1:0, token_file: {}, public_metrics: true}}\nupstreams:\n  web:\n    backends: [{{address: {}}}]\n",
            token.display(),
            b.addr()
        ),
    );
    let gw = Gateway::start(&["--config", file.to_str().unwrap()]);
    let admin = gw.admin_addr();
    assert_eq!(get(admin, "/metrics").0, 200);
    assert_eq!(get(admin, "/api/upstreams").0, 401);
}

#[test]
fn without_a_token_cross_site_and_rebinding_requests_are_refused() {
    let (a, b) = (Backend::new("a"), Backend::new("b"));
    let gw = Gateway::start(&[
        "-p",
        "0",
        "-b",
        &format!("{},id=a", a.addr()),
        "-b",
        &format!("{},id=b", b.addr()),
        "--admin",
        "127.0.0.1:0",
    ]);
    let admin = gw.admin_addr();
    let drain = "/api/upstreams/default/backends/a/drain";
    // A form on another site posting to the loopback admin API.
    let r = request_with_headers(admin, "POST", drain, &[("origin", "https://evil.example")]).unwrap();
    assert_eq!(r.status, 403, "{}", r.body);
    let r = request_with_headers(admin, "POST", drain, &[("sec-fetch-site", "cross-site")]).unwrap();
    assert_eq!(r.status, 403, "{}", r.body);
    // DNS rebinding: a page whose own name now points at 127.0.0.1.
    let status =
        raw_status(admin, "GET /api/upstreams HTTP/1.1\r\nHost: evil.example:9901\r\nConnection: close\r\n\r\n");
    assert!(status.starts_with("HTTP/1.1 403"), "{status}");
    assert_eq!(get(gw.addr, "/").1.trim().len(), 1, "nothing was drained");

    // curl on the machine (no Origin) and the stats page (same origin) may.
    let same = format!("http://{admin}");
    let r =
        request_with_headers(admin, "POST", drain, &[("origin", &same), ("sec-fetch-site", "same-origin")]).unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    for _ in 0..6 {
        assert_eq!(get(gw.addr, "/").1.trim(), "b", "a is drained");
    }
    let r = request(admin, "POST", "/api/upstreams/default/backends/a/undrain", None).unwrap();
    assert_eq!(r.status, 200, "{}", r.body);

    let r = request(admin, "POST", "/api/upstreams/default/backends/zz/drain", None).unwrap();
    assert_eq!(r.status, 404);
    assert!(r.body.contains("no backend `zz` (backends: a, b)"), "{}", r.body);
    let r = request(admin, "GET", "/api/nope", None).unwrap();
    assert_eq!(r.status, 404);
    assert!(serde_json::from_str::<serde_json::Value>(&r.body).is_ok(), "errors are JSON: {}", r.body);
    let r = request(admin, "POST", "/api/reload", None).unwrap();
    assert_eq!(r.status, 409, "no config file to reload: {}", r.body);
}
