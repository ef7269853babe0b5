//! Debouncing file-change events: an editor or a certificate renewal writes a file in
//! several steps, and the gateway should read it once, after the last one.

use std::time::Duration;
use tokio::sync::mpsc::UnboundedReceiver;
use tokio_util::sync::CancellationToken;

/// Waits for the next event on `rx`, then until no event has come for `quiet`. False
/// when `stop` is cancelled or the sender is gone (the watch is over).
pub async fn next_quiet(rx: &mut UnboundedReceiver<()>, stop: &CancellationToken, quiet: Duration) -> bool {
    tokio::select! {
        _ = stop.cancelled() => return false,
        ev = rx.recv() => if ev.is_none() { return false },
    }
    loop {
        tokio::select! {
            _ = stop.cancelled() => return false,
            _ = tokio::time::sleep(quiet) => return true,
            ev = rx.recv() => if ev.is_none() { return false },
        }
    }
}
