//! Warming a new plugin version on every worker thread before it serves.
//!
//! The reloading thread bumps a generation; each worker's warm task builds its
//! instances of the staged version between requests and acknowledges; the swap happens
//! when every worker has, or after a timeout (then the late ones instantiate lazily).

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// Shared by the plugin host and the workers' [`Warmer`]s.
#[derive(Debug)]
pub struct Coordinator {
    tx: watch::Sender<u64>,
    state: Arc<(Mutex<State>, Condvar)>,
}

#[derive(Debug, Default)]
struct State {
    generation: u64,
    acks: usize,
    workers: usize,
}

impl Default for Coordinator {
    fn default() -> Self {
        Coordinator { tx: watch::channel(0).0, state: Arc::default() }
    }
}

impl Coordinator {
    /// A handle for one more worker thread.
    pub fn warmer(&self) -> Warmer {
        self.state.0.lock().unwrap_or_else(|e| e.into_inner()).workers += 1;
        Warmer { rx: self.tx.subscribe(), state: self.state.clone() }
    }

    /// Asks every worker to warm the staged versions and waits until all have (or
    /// `timeout`). Blocking.
    pub fn warm_all(&self, timeout: Duration) {
        let (lock, cv) = &*self.state;
        let mut state = lock.lock().unwrap_or_else(|e| e.into_inner());
        if state.workers == 0 {
            return;
        }
        state.generation += 1;
        state.acks = 0;
        let generation = state.generation;
        self.tx.send_replace(generation);
        let deadline = Instant::now() + timeout;
        while state.acks < state.workers {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                tracing::warn!(
                    warmed = state.acks,
                    workers = state.workers,
                    "not every worker warmed the new plugin in time; the rest will instantiate it on first use"
                );
                return;
            }
            state = cv.wait_timeout(state, left).unwrap_or_else(|e| e.into_inner()).0;
        }
    }
}

/// One worker's end: wait for [`Warmer::changed`], warm, then [`Warmer::done`].
#[derive(Debug)]
pub struct Warmer {
    rx: watch::Receiver<u64>,
    state: Arc<(Mutex<State>, Condvar)>,
}

impl Warmer {
    /// Waits for a warm request; returns its generation (`None` when the host is gone).
    pub async fn changed(&mut self) -> Option<u64> {
        self.rx.changed().await.ok()?;
        Some(*self.rx.borrow_and_update())
    }

    /// Reports that this worker warmed `generation`.
    pub fn done(&self, generation: u64) {
        let (lock, cv) = &*self.state;
        let mut state = lock.lock().unwrap_or_else(|e| e.into_inner());
        if state.generation == generation {
            state.acks += 1;
            cv.notify_all();
        }
    }
}

impl Drop for Warmer {
    fn drop(&mut self) {
        let (lock, cv) = &*self.state;
        let mut state = lock.lock().unwrap_or_else(|e| e.into_inner());
        state.workers = state.workers.saturating_sub(1);
        cv.notify_all();
    }
}
