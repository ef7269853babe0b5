//! Bodies stream through the gateway both ways without being buffered, and an HTTP/2
//! (h2c) client reaches an HTTP/1.1 backend.

mod util;

use util::{BIG_BYTES, Backend, Gateway, TempDir, download, get, get_h2c, upload};

/// How much the gateway's peak RSS may grow while 2 × 100 MiB pass through it.
const MAX_GROWTH_KIB: u64 = 40 * 1024;

fn gateway_for(backend: &Backend, dir: &TempDir) -> Gateway {
    let addr = backend.addr().to_string();
    let plugins = dir.path().join("plugins");
    Gateway::start(&["--listen", "127.0.0.1:0", "--threads", "2", "-b", &addr, "--plugins", plugins.to_str().unwrap()])
}

#[test]
fn hundred_mib_bodies_stream_both_ways_in_bounded_memory() {
    let dir = TempDir::new();
    let backend = Backend::new("backend-1");
    let gw = gateway_for(&backend, &dir);
    // Warm up both workers (plugin instances, connection pools) before measuring.
    for _ in 0..8 {
        assert_eq!(get(gw.addr, "/"), (200, "backend-1".to_owned()));
    }
    let before = gw.peak_rss_kib();

    let reply = upload(gw.addr, "/upload", BIG_BYTES).expect("upload");
    assert_eq!(reply.status, 200, "upload: {}", reply.body);
    assert_eq!(reply.body, BIG_BYTES.to_string(), "the backend did not receive the whole body");

    let got = download(gw.addr, "/big").expect("download");
    assert_eq!(got.status, 200);
    assert_eq!(got.bytes, BIG_BYTES, "the client did not receive the whole body");
    assert!(got.pattern_ok, "the response body was corrupted on the way");

    let after = gw.peak_rss_kib();
    let growth = after.saturating_sub(before);
    eprintln!("gateway peak RSS: {before} KiB before, {after} KiB after ({growth} KiB growth)");
    assert!(growth < MAX_GROWTH_KIB, "peak RSS grew by {growth} KiB moving 2 x 100 MiB: bodies are being buffered");
}

#[test]
fn h2c_client_is_proxied_to_an_http1_backend() {
    let dir = TempDir::new();
    let backend = Backend::new("backend-1");
    let gw = gateway_for(&backend, &dir);
    let reply = get_h2c(gw.addr, "/h2").expect("h2c request");
    assert_eq!(reply.version, hyper::Version::HTTP_2, "the client did not speak HTTP/2");
    assert_eq!((reply.status, reply.body.as_str()), (200, "backend-1"));
    assert_eq!(reply.header("x-seen-version"), "HTTP/1.1", "the backend did not get HTTP/1.1");
    assert_eq!(reply.header("x-seen-host"), gw.addr.to_string(), "the :authority did not become the Host header");
}
