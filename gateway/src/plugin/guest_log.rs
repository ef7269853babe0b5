//! What a plugin writes with `host.log`: a rate limit per upstream's plugin (a plugin
//! that logs on every request must not flood the log), and the guest's own account of a
//! failure (a Python traceback, a Rust panic message, a JavaScript exception), kept so
//! that the trap that follows can carry it to the operator.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Instant;

/// Log lines a plugin may write per second (per upstream, all its instances and worker
/// threads together); the rest are dropped and counted.
pub const LOG_LINES_PER_SECOND: u64 = 10;

/// Bytes of the plugin's last error-level log line that a failed call's message carries;
/// longer text keeps its beginning and its end (where a Python traceback names the
/// exception), with the middle cut out.
pub const MAX_GUEST_ERROR_BYTES: usize = 2 * 1024;

/// The `host.log` level of an error: its text is what a trap in the same call reports.
pub const ERROR_LEVEL: u8 = 4;

/// Whether a log line may be written now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Write it; `dropped` lines were dropped since the last one written.
    Write {
        /// Lines dropped (over the rate) since the last line that was written.
        dropped: u64,
    },
    /// Over the rate: drop it (it is counted).
    Drop,
}

/// At most [`LOG_LINES_PER_SECOND`] log lines a second from one upstream's plugin.
/// Shared by every instance of it (instances are rebuilt after a trap, so a limit per
/// instance would not hold a plugin that logs and traps on every request).
#[derive(Debug)]
pub struct LogLimiter {
    epoch: Instant,
    /// Milliseconds since `epoch` when the current one-second window began.
    window_ms: AtomicU64,
    /// Lines asked for in the current window.
    count: AtomicU64,
    /// Lines dropped and not yet reported.
    dropped: AtomicU64,
}

impl Default for LogLimiter {
    fn default() -> Self {
        LogLimiter {
            epoch: Instant::now(),
            window_ms: AtomicU64::new(0),
            count: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
        }
    }
}

impl LogLimiter {
    /// Whether a line may be written now.
    pub fn admit(&self) -> Admit {
        self.admit_at(self.epoch.elapsed().as_millis() as u64)
    }

    fn admit_at(&self, now_ms: u64) -> Admit {
        let start = self.window_ms.load(Relaxed);
        if now_ms >= start + 1_000 && self.window_ms.compare_exchange(start, now_ms, Relaxed, Relaxed).is_ok() {
            self.count.store(1, Relaxed);
            return Admit::Write { dropped: self.dropped.swap(0, Relaxed) };
        }
        if self.count.fetch_add(1, Relaxed) < LOG_LINES_PER_SECOND {
            return Admit::Write { dropped: 0 };
        }
        self.dropped.fetch_add(1, Relaxed);
        Admit::Drop
    }
}

/// `text` if it is at most `max` bytes; else its beginning and end (cut at character
/// boundaries), about `max` bytes in all, with the middle replaced by a note.
pub fn keep_ends(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut head = max / 2;
    while !text.is_char_boundary(head) {
        head -= 1;
    }
    let mut tail = text.len() - max / 2;
    while !text.is_char_boundary(tail) {
        tail += 1;
    }
    format!("{}\n... (cut {} bytes) ...\n{}", &text[..head], tail - head, &text[tail..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ten_lines_a_second_then_the_dropped_ones_are_counted_on_the_next_line_written() {
        let limiter = LogLimiter::default();
        for _ in 0..LOG_LINES_PER_SECOND {
            assert_eq!(limiter.admit_at(10), Admit::Write { dropped: 0 });
        }
        for _ in 0..5 {
            assert_eq!(limiter.admit_at(500), Admit::Drop);
        }
        assert_eq!(limiter.admit_at(1_100), Admit::Write { dropped: 5 }, "a new second");
        for _ in 1..LOG_LINES_PER_SECOND {
            assert_eq!(limiter.admit_at(1_200), Admit::Write { dropped: 0 });
        }
        assert_eq!(limiter.admit_at(2_000), Admit::Drop, "still the second that began at 1.1 s");
        assert_eq!(limiter.admit_at(2_100), Admit::Write { dropped: 1 });
    }

    #[test]
    fn long_text_keeps_its_beginning_and_its_end() {
        assert_eq!(keep_ends("short", 16), "short");
        let text = format!("Traceback (most recent call last):\n{}AttributeError: boom", "é".repeat(2_000));
        let kept = keep_ends(&text, 256);
        assert!(kept.starts_with("Traceback (most recent call last):"), "{kept}");
        assert!(kept.ends_with("AttributeError: boom"), "{kept}");
        assert!(kept.contains("... (cut "), "{kept}");
        assert!(kept.len() < 300, "{} bytes", kept.len());
    }
}
