//! Continuous traffic through the gateway while a test changes something under it: one
//! keep-alive client sends requests without pause and remembers which backend answered
//! each (or the error), so a test can wait for a change to show and count failures.

use super::{KeepAlive, TempDir, poll_until};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What the client saw: (when, backend name or error).
type Seen = Arc<Mutex<VecDeque<(Instant, Result<String, String>)>>>;

/// Replaces the file the way editors and config tools do: a temporary, then a rename.
pub fn install(dir: &TempDir, name: &str, text: &str) {
    let tmp = dir.path().join(format!(".{name}.tmp"));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, dir.path().join(name)).unwrap();
}

/// One client sending requests without pause (see the module doc); stopped by
/// [`Traffic::finish`], which returns how many it sent and the failures.
pub struct Traffic {
    seen: Seen,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<u64>>,
}

impl Traffic {
    /// Starts the client against `addr` (at most 2 minutes or 1,000,000 requests).
    pub fn start(addr: std::net::SocketAddr) -> Traffic {
        let seen: Seen = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (seen, stop) = (seen.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut conn = KeepAlive::open(addr).expect("connect");
                let deadline = Instant::now() + Duration::from_secs(120);
                let mut sent = 0u64;
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline && sent < 1_000_000 {
                    let result = match conn.get("/") {
                        Ok(r) if r.status == 200 => Ok(r.body.trim().to_owned()),
                        Ok(r) => Err(format!("status {}: {}", r.status, r.body)),
                        Err(e) => {
                            // Reconnect, but count it: a dropped connection is a failure.
                            conn = KeepAlive::open(addr).expect("reconnect");
                            Err(e)
                        }
                    };
                    let mut s = seen.lock().unwrap();
                    s.push_back((Instant::now(), result));
                    if s.len() > 100_000 {
                        s.pop_front();
                    }
                    drop(s);
                    sent += 1;
                    std::thread::sleep(Duration::from_millis(1));
                }
                sent
            })
        };
        Traffic { seen, stop, thread: Some(thread) }
    }

    /// Backends seen in answers after `since`.
    pub fn after(&self, since: Instant) -> Vec<String> {
        self.seen.lock().unwrap().iter().filter(|(t, _)| *t > since).filter_map(|(_, r)| r.clone().ok()).collect()
    }

    /// Waits (≤ `within`) until the last 30 answers after `since` satisfy `ok`; returns
    /// how long that took from `since`.
    pub fn wait(&self, since: Instant, within: Duration, what: &str, ok: impl Fn(&[String]) -> bool) -> Duration {
        let found = poll_until(within, Duration::from_millis(5), || {
            let recent = self.after(since);
            (recent.len() >= 30 && ok(&recent[recent.len() - 30..])).then(Instant::now)
        });
        match found {
            Some(at) => at - since,
            None => {
                let recent = self.after(since);
                panic!(
                    "{what}: not seen within {within:?}; last answers: {:?}",
                    &recent[recent.len().saturating_sub(30)..]
                )
            }
        }
    }

    /// Stops the client; returns (requests sent, failures).
    pub fn finish(mut self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        let sent = self.thread.take().unwrap().join().unwrap();
        let failures = self.seen.lock().unwrap().iter().filter_map(|(_, r)| r.clone().err()).collect();
        (sent, failures)
    }
}
