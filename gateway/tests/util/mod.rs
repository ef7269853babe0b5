//! Shared helpers of the integration tests: real HTTP/1.1 backends on loopback
//! ([`Backend`]), the real gateway binary ([`Gateway`], [`run_cli`]), a small HTTP
//! client ([`get`], [`KeepAlive`], [`upload`], [`download`], [`get_h2c`]), a browser-like
//! client with its own client IP, headers and cookie jar ([`Browser`]), a backend whose
//! latency can change ([`TunableBackend`]), scratch folders ([`TempDir`]) and real
//! headless Chromium driven over the DevTools protocol ([`Chromium`]) and test
//! certificates made by `openssl` ([`Ca`]).
//!
//! Everything async runs on one background runtime ([`rt`]); the tests themselves are
//! plain synchronous `#[test]` functions. Every wait is bounded by a deadline.

// Each test file uses a different subset of the helpers.
#![allow(dead_code, unused_imports)]

mod backend;
mod browser;
mod certs;
mod chromium;
mod client;
mod gateway;
pub mod report;
mod temp;
mod traffic;
mod tunable;

pub use backend::{BIG_BYTES, Backend, Hit};
pub use browser::{Browser, set_cookies};
pub use certs::{Ca, Issued};
pub use chromium::Chromium;
pub use client::{
    Download, KeepAlive, Reply, download, get, get_h2c, request, request_full, request_with_headers, try_get, upload,
};
pub use gateway::{BIN, CliOutput, Gateway, message, run_cli, run_cli_with_env};
pub use temp::TempDir;
pub use traffic::{Traffic, install};
pub use tunable::TunableBackend;

use bytes::Bytes;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The Python of the test venv (`~/.cache/gateway-test-venv`, made by scripts/test.sh)
/// if it can `import MODULE` (`what` names the package in the message), or `None` with
/// the reason printed; under CI a missing venv fails the test instead.
pub fn venv_python(module: &str, what: &str) -> Option<std::path::PathBuf> {
    let home = std::env::var_os("HOME").map(std::path::PathBuf::from).unwrap_or_default();
    let py = home.join(".cache/gateway-test-venv/bin/python");
    let import = format!("import {module}");
    let ok =
        std::process::Command::new(&py).args(["-c", &import]).output().map(|o| o.status.success()).unwrap_or(false);
    if ok {
        return Some(py);
    }
    let why = format!("{} with {what} is missing: run scripts/test.sh (it installs the test venv)", py.display());
    assert!(std::env::var_os("CI").is_none(), "{why}");
    eprintln!("skipped: {why}");
    None
}

/// The runtime that runs the test backends and the client.
pub fn rt() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("test-io")
            .enable_all()
            .build()
            .expect("start the test runtime")
    })
}

/// A test plugin component built by `build.rs`: `trap`, `spin` or `wrong-world`.
pub fn test_plugin(name: &str) -> std::path::PathBuf {
    let path = std::path::Path::new(env!("GATEWAY_TEST_PLUGINS")).join(format!("{name}.wasm"));
    assert!(path.is_file(), "test plugin {} was not built", path.display());
    path
}

/// Calls `f` every `every` until it returns `Some`, for at most `timeout`.
pub fn poll_until<T>(timeout: Duration, every: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(every);
    }
}

/// Large bodies carry byte `i % PATTERN_PERIOD` at offset `i`, so the receiver can
/// check every byte arrived in order without either side holding the whole body.
pub const PATTERN_PERIOD: u64 = 251;

/// One chunk of the pattern, starting at a pattern offset of 0 (64 256 bytes).
pub fn pattern_chunk() -> Bytes {
    static CHUNK: OnceLock<Bytes> = OnceLock::new();
    CHUNK
        .get_or_init(|| (0..PATTERN_PERIOD * 256).map(|i| (i % PATTERN_PERIOD) as u8).collect::<Vec<u8>>().into())
        .clone()
}

/// Whether `data`, found at `offset` of a pattern body, is what the pattern says.
pub fn matches_pattern(offset: u64, data: &[u8]) -> bool {
    let start = offset % PATTERN_PERIOD;
    data.iter().enumerate().all(|(i, &b)| b as u64 == (start + i as u64) % PATTERN_PERIOD)
}

/// A body of `total` pattern bytes, produced chunk by chunk on demand.
#[derive(Debug)]
pub struct PatternBody {
    sent: u64,
    total: u64,
    /// Announce the length (`Content-Length`) or not (`Transfer-Encoding: chunked`).
    exact: bool,
}

impl PatternBody {
    /// `total` bytes, sent with a `Content-Length`.
    pub fn sized(total: u64) -> Self {
        PatternBody { sent: 0, total, exact: true }
    }

    /// `total` bytes, sent chunked (length not announced).
    pub fn chunked(total: u64) -> Self {
        PatternBody { sent: 0, total, exact: false }
    }
}

impl hyper::body::Body for PatternBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        let left = self.total - self.sent;
        if left == 0 {
            return std::task::Poll::Ready(None);
        }
        // Every chunk is a whole number of periods long, so each starts at offset 0.
        let mut chunk = pattern_chunk();
        chunk.truncate(left.min(chunk.len() as u64) as usize);
        self.sent += chunk.len() as u64;
        std::task::Poll::Ready(Some(Ok(hyper::body::Frame::data(chunk))))
    }

    fn is_end_stream(&self) -> bool {
        self.sent == self.total
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        if self.exact {
            hyper::body::SizeHint::with_exact(self.total - self.sent)
        } else {
            hyper::body::SizeHint::new()
        }
    }
}
