//! Plugin instances are built off the workers: instantiating, `configure` and
//! `pool-changed` run on one `plugin-setup` thread (each call under the setup deadline),
//! and the finished instance is handed to the worker that asked for it. A plugin that
//! hangs in `pool-changed` therefore stalls no request: the worker keeps serving with the
//! instance's previous pool view, or the fallback, until the new instance arrives.

use std::sync::OnceLock;
use std::sync::mpsc::{self, Sender};

type Job = Box<dyn FnOnce() + Send>;

/// Runs `job` on the setup thread (started on first use), after the jobs before it.
pub(super) fn run(job: impl FnOnce() + Send + 'static) {
    static QUEUE: OnceLock<Sender<Job>> = OnceLock::new();
    let queue = QUEUE.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Job>();
        let spawned = std::thread::Builder::new().name("plugin-setup".into()).spawn(move || {
            for job in rx {
                job();
            }
        });
        if let Err(e) = spawned {
            tracing::error!("cannot start the plugin-setup thread: {e}");
        }
        tx
    });
    if let Err(mpsc::SendError(job)) = queue.send(Box::new(job)) {
        // No setup thread (it could not start): build here rather than never.
        job();
    }
}
