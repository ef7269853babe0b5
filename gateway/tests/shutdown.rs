//! Graceful shutdown: on SIGTERM the gateway stops accepting, lets the request in
//! flight finish, and exits 0 within the grace period.

mod util;

use std::net::TcpStream;
use std::time::{Duration, Instant};
use util::{Backend, Gateway, TempDir, message, poll_until, try_get};

const GRACE: Duration = Duration::from_secs(5);

#[test]
fn sigterm_finishes_in_flight_requests_then_exits_zero() {
    let dir = TempDir::new();
    let backend = Backend::new("backend-1");
    let yaml = format!(
        "listeners:\n  - address: 127.0.0.1:0\nshutdown_grace: {}s\nupstreams:\n  web:\n    backends:\n      - address: {}\n",
        GRACE.as_secs(),
        backend.addr()
    );
    let file = dir.write("gw.yaml", yaml);
    let plugins = dir.path().join("plugins");
    let mut gw = Gateway::start(&["--config", file.to_str().unwrap(), "--plugins", plugins.to_str().unwrap()]);
    let addr = gw.addr;

    // A slow request (the backend answers after 1s), in flight when SIGTERM arrives.
    let slow = std::thread::spawn(move || try_get(addr, "/delay/1000"));
    let reached = poll_until(Duration::from_secs(5), Duration::from_millis(5), || {
        backend.hits().iter().any(|h| h.path == "/delay/1000").then_some(())
    });
    assert!(reached.is_some(), "the slow request never reached the backend");
    assert!(!slow.is_finished(), "the slow request ended before SIGTERM");
    gw.terminate();
    let signalled = Instant::now();
    gw.wait_for_log(Duration::from_secs(5), |l| message(l).starts_with("shutting down"));

    // New connections are refused shortly after (the listeners are closed).
    let refused = poll_until(Duration::from_secs(2), Duration::from_millis(10), || {
        TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err().then_some(())
    });
    assert!(refused.is_some(), "still accepting connections 2s after SIGTERM");

    // The request in flight completes normally.
    let answer = slow.join().expect("the client thread");
    assert_eq!(answer, Ok((200, "backend-1".to_owned())), "the in-flight request was cut off");

    let status = gw.wait_exit(GRACE + Duration::from_secs(2)).expect("the gateway did not exit after SIGTERM");
    let took = signalled.elapsed();
    assert!(status.success(), "exit status {status}");
    assert!(took < GRACE, "exiting took {took:?}, the whole grace period ({GRACE:?})");
    gw.wait_for_log(Duration::from_secs(1), |l| message(l) == "stopped");
}
