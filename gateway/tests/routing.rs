//! Routing that cannot be fooled: dot-segments and encoded slashes do not let a request
//! escape its route (dot-segments are removed, encoded slashes refused with 400), and
//! the host a route was chosen by is the host the backend sees (an absolute-form request
//! target wins over `Host`, and replaces it).

mod util;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;
use util::{Backend, Gateway, TempDir, request};

fn start(dir: &TempDir, yaml: &str) -> Gateway {
    let file = dir.write("gw.yaml", yaml);
    Gateway::with_config(&file, &dir.path().join("plugins"))
}

/// Upstreams `name: backend` without health checks (the tests count every hit).
fn upstreams(list: &[(&str, &Backend)]) -> String {
    list.iter()
        .map(|(name, b)| {
            format!(
                "  {name}:\n    health_check: {{ enabled: false }}\n    backends: [ {{ address: {} }} ]\n",
                b.addr()
            )
        })
        .collect()
}

/// Sends `raw` bytes as the whole request and returns everything the gateway answered
/// until it closed the connection (the request says `Connection: close`).
fn raw(addr: SocketAddr, raw: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(raw.as_bytes()).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

fn paths(b: &Backend) -> Vec<String> {
    b.hits().into_iter().map(|h| h.path).collect()
}

#[test]
fn dot_segments_are_removed_before_routing_and_encoded_slashes_are_refused() {
    let (public, private) = (Backend::new("public"), Backend::new("private"));
    let dir = TempDir::new();
    let yaml = format!(
        "listeners: [ {{ address: 127.0.0.1:0 }} ]\nthreads: 1\nroutes:\n  - {{ path_prefix: /private, upstream: private }}\n  - {{ path_prefix: /public, upstream: public }}\nupstreams:\n{}",
        upstreams(&[("public", &public), ("private", &private)])
    );
    let gw = start(&dir, &yaml);

    // `/public/../private` is `/private`: routed there, and forwarded as such, so the
    // public backend never gets a path that its own server would resolve elsewhere.
    for (sent, seen) in [
        ("/public/../private/keys", "/private/keys"),
        ("/public/%2e%2e/private/keys", "/private/keys"),
        ("/public/%2E%2e/./private/keys", "/private/keys"),
        ("/public/a/../b?q=../x", "/public/b?q=../x"),
        ("/public/./c", "/public/c"),
    ] {
        let r = request(gw.addr, "GET", sent, None).unwrap();
        assert_eq!(r.status, 200, "{sent}: {}", r.body);
        let expected = if seen.starts_with("/private") { "private" } else { "public" };
        assert_eq!(r.body, expected, "{sent} went to the wrong backend");
    }
    assert_eq!(paths(&private), ["/private/keys"; 3], "the backend sees the normalised path");
    assert_eq!(paths(&public), ["/public/b?q=../x", "/public/c"], "queries are left alone");

    // Encoded slashes: a backend that decodes them would see other segments than the
    // router did; refused before any backend is asked.
    for sent in ["/public%2F..%2Fprivate/keys", "/public/..%2fprivate", "/public/%5C..%5Cprivate"] {
        let r = request(gw.addr, "GET", sent, None).unwrap();
        assert_eq!(r.status, 400, "{sent}: {}", r.body);
        assert!(r.body.contains("encoded slash"), "{}", r.body);
    }
    assert_eq!((public.hits().len(), private.hits().len()), (2, 3), "no backend saw a refused request");
}

#[test]
fn without_a_route_for_it_a_dot_dot_path_reaches_no_backend() {
    let public = Backend::new("public");
    let dir = TempDir::new();
    let yaml = format!(
        "listeners: [ {{ address: 127.0.0.1:0 }} ]\nthreads: 1\nroutes:\n  - {{ path_prefix: /public, upstream: public }}\nupstreams:\n{}",
        upstreams(&[("public", &public)])
    );
    let gw = start(&dir, &yaml);
    for sent in ["/public/../private", "/public/%2e%2e/private", "/public/../../private"] {
        let r = request(gw.addr, "GET", sent, None).unwrap();
        assert_eq!(r.status, 404, "{sent} must not reach the /public backend: {}", r.body);
    }
    // Sent raw, so no client library can tidy the path first.
    let answer = raw(gw.addr, "GET /public/../private HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n");
    assert!(answer.starts_with("HTTP/1.1 404"), "{answer}");
    assert!(public.hits().is_empty(), "the public backend was reached: {:?}", paths(&public));
    assert_eq!(request(gw.addr, "GET", "/public/x", None).unwrap().status, 200);
}

#[test]
fn an_absolute_form_target_picks_the_route_and_is_the_host_the_backend_sees() {
    let (internal, public) = (Backend::new("internal"), Backend::new("public"));
    let dir = TempDir::new();
    let yaml = format!(
        "listeners: [ {{ address: 127.0.0.1:0 }} ]\nthreads: 1\nroutes:\n  - {{ host: internal.example, upstream: internal }}\n  - {{ host: public.example, upstream: public }}\nupstreams:\n{}",
        upstreams(&[("internal", &internal), ("public", &public)])
    );
    let gw = start(&dir, &yaml);

    // Absolute form: its authority wins over `Host` (RFC 9112 §3.2.2), for the route and
    // for the backend alike.
    let answer =
        raw(gw.addr, "GET http://internal.example/x HTTP/1.1\r\nHost: public.example\r\nConnection: close\r\n\r\n");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.ends_with("internal"), "routed by the absolute-form authority: {answer}");
    assert!(public.hits().is_empty());
    let hit = internal.hits().pop().expect("the internal backend got the request");
    assert_eq!(hit.path, "/x", "the backend gets an origin-form target");
    let hosts: Vec<_> = hit.headers.get_all("host").iter().map(|v| v.to_str().unwrap().to_owned()).collect();
    assert_eq!(hosts, ["internal.example"], "the backend sees the host the route was chosen by");
    assert_eq!(hit.headers["x-forwarded-host"], "internal.example");

    // Origin form: `Host` decides, and is passed on unchanged.
    let answer = raw(gw.addr, "GET /y HTTP/1.1\r\nHost: public.example\r\nConnection: close\r\n\r\n");
    assert!(answer.ends_with("public"), "{answer}");
    assert_eq!(public.hits().pop().unwrap().headers["host"], "public.example");
}
