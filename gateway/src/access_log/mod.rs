//! The access log: one line per request, formatted on the worker thread into a
//! per-thread buffer and written by one writer thread, so a request never waits for
//! the disk and never makes a syscall of its own.
//!
//! - [`AccessLog::record`] appends the line to the calling thread's buffer (about
//!   32 KiB); a full buffer goes to the writer thread through a bounded channel. When the
//!   writer is behind (slow disk, blocked pipe) the batch is dropped and counted
//!   ([`AccessLog::dropped_lines`]): a request never waits for the log.
//! - A partly filled buffer reaches the writer when its thread calls
//!   [`AccessLog::flush_local`] (every worker does, from a periodic task, so a quiet
//!   gateway's lines are on disk within ~200 ms), or when the thread exits. The writer
//!   writes each batch as soon as it gets it.
//! - [`AccessLog::reopen`] (SIGUSR1, see [`reopen_on_sigusr1`]) makes the writer reopen
//!   the file by its path, for logrotate's `mv` + signal.
//! - [`AccessLog::flush_all`] at shutdown, after the workers have flushed, waits until
//!   everything handed over is written; dropping the log does the same.

use crate::config::{self, LogFormat};
use std::cell::RefCell;
use std::fs::{File, OpenOptions};
use std::io::{self, IsTerminal as _, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

mod format;

use format::{Clock, write_json, write_text};
pub use format::{Entry, Names, PluginName};

/// A thread's buffer is handed to the writer once it holds this much.
const BATCH: usize = 32 * 1024;
/// Batches that may wait for the writer (at most ~2 MiB, some 100 ms of a busy
/// gateway's lines); more are dropped.
const QUEUE: usize = 64;
/// Empty buffers kept for reuse by the workers.
const SPARE: usize = QUEUE + 8;
/// The writer's nap between polls while lines keep coming, and how long it polls
/// without getting any before it parks. Each nap ends in a wake-up that, on a gateway
/// pinned to few cores, preempts a worker: 10 ms is 100 a second, and at ~12 MB/s of
/// lines (one worker at 28k requests/s) some 4 batches wait per nap, of the 64 the
/// queue holds. A nap that found [`BUSY`] or more batches waiting is followed by the
/// short one, so a gateway writing ten times that still drops nothing.
const POLL: Duration = Duration::from_millis(10);
const POLL_BUSY: Duration = Duration::from_millis(1);
const BUSY: usize = QUEUE / 4;
const POLL_IDLE: Duration = Duration::from_millis(50);
/// How long [`AccessLog::flush_all`] and drop wait for the writer.
const FLUSH_WAIT: Duration = Duration::from_secs(2);

/// The non-blocking access log; one per gateway, shared by all workers.
#[derive(Debug)]
pub struct AccessLog {
    inner: Arc<Inner>,
    /// Closed (disconnected) when the writer thread ends.
    writer_ended: Mutex<Receiver<()>>,
}

/// What the worker threads hold (their thread-local buffer keeps a clone).
#[derive(Debug)]
struct Inner {
    format: LogFormat,
    tx: SyncSender<Msg>,
    shared: Arc<Shared>,
}

/// What the writer thread and the workers share.
#[derive(Debug, Default)]
struct Shared {
    lines: AtomicU64,
    dropped: AtomicU64,
    reopen: AtomicBool,
    spare: Mutex<Vec<Vec<u8>>>,
}

#[derive(Debug)]
enum Msg {
    /// Whole lines, and how many.
    Batch(Vec<u8>, u64),
    /// Reopen the file now (the flag in [`Shared`] says so too, for when the queue is full).
    Reopen,
    /// Answer once everything before this message is written.
    Flush(SyncSender<()>),
    /// Write nothing more; end the thread.
    Stop,
}

impl AccessLog {
    /// Opens the destination (`cfg.path` in append mode, or stderr) and starts the writer
    /// thread. Does not look at `cfg.enabled`: the caller decides whether to log at all.
    ///
    /// The format is `cfg.format`, or when unset JSON for a file and, for stderr, text on
    /// a terminal and JSON otherwise (the config loader normally fills it in with the
    /// process's log format).
    pub fn new(cfg: &config::AccessLog) -> io::Result<Arc<AccessLog>> {
        let destination = match &cfg.path {
            Some(path) => Destination::File { file: open(path)?, path: path.clone() },
            None => Destination::Stderr,
        };
        let format = cfg.format.unwrap_or(match cfg.path {
            Some(_) => LogFormat::Json,
            None if io::stderr().is_terminal() => LogFormat::Text,
            None => LogFormat::Json,
        });
        Self::start(format, destination, QUEUE)
    }

    fn start(format: LogFormat, destination: Destination, queue: usize) -> io::Result<Arc<AccessLog>> {
        let (tx, rx) = mpsc::sync_channel(queue);
        let (ended_tx, ended_rx) = mpsc::channel();
        let shared = Arc::new(Shared::default());
        let writer = Writer { destination, shared: shared.clone(), failing: false };
        std::thread::Builder::new().name("access-log".into()).spawn(move || {
            writer.run(rx);
            drop(ended_tx);
        })?;
        Ok(Arc::new(AccessLog { inner: Arc::new(Inner { format, tx, shared }), writer_ended: Mutex::new(ended_rx) }))
    }

    /// Appends one request's line to this thread's buffer; hands the buffer to the writer
    /// when it is full (and drops it, counted, when the writer is behind). Never blocks,
    /// no syscall.
    pub fn record(&self, e: &Entry<'_>) {
        let done = LOCAL.try_with(|local| {
            let Ok(mut local) = local.try_borrow_mut() else { return false };
            let local = &mut *local;
            if !local.owner.as_ref().is_some_and(|o| Arc::ptr_eq(o, &self.inner)) {
                // First line on this thread, or another log (a config reload): the old
                // log gets what this thread had for it.
                local.hand_off(false);
                local.owner = Some(self.inner.clone());
            }
            if local.buf.capacity() == 0 {
                local.buf = self.inner.shared.spare_buffer();
            }
            match self.inner.format {
                LogFormat::Json => write_json(&mut local.buf, &mut local.clock, e),
                LogFormat::Text => write_text(&mut local.buf, &mut local.clock, e),
            }
            local.lines += 1;
            if local.buf.len() >= BATCH {
                local.hand_off(false);
            }
            true
        });
        if done != Ok(true) {
            // The thread is exiting (its buffer is gone): nowhere to put the line.
            self.inner.shared.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Hands this thread's partly filled buffer to the writer. Each worker calls it from a
    /// periodic task (every ~100 ms), so that on a quiet gateway every line reaches the
    /// destination within ~200 ms. Cheap when there is nothing to hand over.
    pub fn flush_local(&self) {
        let _ = LOCAL.try_with(|local| {
            if let Ok(mut local) = local.try_borrow_mut()
                && local.owner.as_ref().is_some_and(|o| Arc::ptr_eq(o, &self.inner))
            {
                local.hand_off(false);
            }
        });
    }

    /// Hands this thread's buffer over, then waits (up to 2 s) until the writer has
    /// written everything it was given. For shutdown, once the workers have called
    /// [`AccessLog::flush_local`] or exited; buffers of other running threads are not
    /// reached. Returns false when the writer did not finish in time (a blocked
    /// destination).
    pub fn flush_all(&self) -> bool {
        let deadline = Instant::now() + FLUSH_WAIT;
        let _ = LOCAL.try_with(|local| {
            if let Ok(mut local) = local.try_borrow_mut()
                && local.owner.as_ref().is_some_and(|o| Arc::ptr_eq(o, &self.inner))
            {
                local.hand_off(true);
            }
        });
        let (reply_tx, reply_rx) = mpsc::sync_channel(1);
        if !send_until(&self.inner.tx, Msg::Flush(reply_tx), deadline) {
            return false;
        }
        reply_rx.recv_timeout(deadline.saturating_duration_since(Instant::now())).is_ok()
    }

    /// Makes the writer reopen the file by its path before its next write (after
    /// logrotate renamed it). Nothing to do for stderr.
    pub fn reopen(&self) {
        self.inner.shared.reopen.store(true, Ordering::Release);
        // A nudge so the file is reopened even when no request comes; when the queue is
        // full the flag is seen at the next batch.
        let _ = self.inner.tx.try_send(Msg::Reopen);
    }

    /// Lines written to the destination so far.
    pub fn lines(&self) -> u64 {
        self.inner.shared.lines.load(Ordering::Relaxed)
    }

    /// Lines dropped so far: the writer was behind, or the destination failed.
    pub fn dropped_lines(&self) -> u64 {
        self.inner.shared.dropped.load(Ordering::Relaxed)
    }

    /// The line format in use.
    pub fn format(&self) -> LogFormat {
        self.inner.format
    }
}

impl Drop for AccessLog {
    /// Writes what was handed over (waiting up to 2 s), then stops the writer thread.
    fn drop(&mut self) {
        self.flush_all();
        let deadline = Instant::now() + FLUSH_WAIT;
        if send_until(&self.inner.tx, Msg::Stop, deadline)
            && let Ok(ended) = self.writer_ended.lock()
        {
            let _ = ended.recv_timeout(deadline.saturating_duration_since(Instant::now()));
        }
    }
}

/// Reopens the access log on every SIGUSR1 (what logrotate's `postrotate` sends), until
/// `stop`. Call from within a tokio runtime with signals enabled (the control loop):
/// the handler is installed before this returns, so an early SIGUSR1 no longer ends the
/// process.
pub fn reopen_on_sigusr1(log: Arc<AccessLog>, stop: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut usr1 = match signal(SignalKind::user_defined1()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!("cannot listen for SIGUSR1, the access log will not be reopened on it: {e}");
            return;
        }
    };
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                got = usr1.recv() => {
                    if got.is_none() {
                        return;
                    }
                    tracing::info!(signal = "SIGUSR1", "reopening the access log");
                    log.reopen();
                }
            }
        }
    });
}

/// Sends `msg`, retrying while the queue is full, until `deadline`.
fn send_until(tx: &SyncSender<Msg>, mut msg: Msg, deadline: Instant) -> bool {
    loop {
        match tx.try_send(msg) {
            Ok(()) => return true,
            Err(TrySendError::Disconnected(_)) => return false,
            Err(TrySendError::Full(m)) if Instant::now() < deadline => {
                msg = m;
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(TrySendError::Full(_)) => return false,
        }
    }
}

fn open(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .append(true)
        .create(true)
        .open(path)
        .map_err(|e| io::Error::new(e.kind(), format!("access log {}: cannot open for appending: {e}", path.display())))
}

impl Shared {
    /// An empty buffer: a returned one, or a new one.
    fn spare_buffer(&self) -> Vec<u8> {
        self.spare.try_lock().ok().and_then(|mut s| s.pop()).unwrap_or_else(|| Vec::with_capacity(BATCH + BATCH / 8))
    }
}

thread_local! {
    static LOCAL: RefCell<Local> = const { RefCell::new(Local::EMPTY) };
}

/// A thread's lines not yet handed to the writer.
struct Local {
    /// The log the buffered lines belong to.
    owner: Option<Arc<Inner>>,
    buf: Vec<u8>,
    lines: u64,
    clock: Clock,
}

impl Local {
    const EMPTY: Local = Local { owner: None, buf: Vec::new(), lines: 0, clock: Clock::EMPTY };

    /// Sends the buffer to its log's writer. `patient`: wait up to 2 s for room (at
    /// shutdown) instead of dropping the lines at once.
    fn hand_off(&mut self, patient: bool) {
        let Some(owner) = &self.owner else { return };
        if self.lines == 0 {
            return;
        }
        let batch = Msg::Batch(std::mem::take(&mut self.buf), std::mem::take(&mut self.lines));
        let sent = if patient {
            let deadline = Instant::now() + FLUSH_WAIT;
            let mut msg = batch;
            loop {
                match owner.tx.try_send(msg) {
                    Err(TrySendError::Full(m)) if Instant::now() < deadline => {
                        msg = m;
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    other => break other,
                }
            }
        } else {
            owner.tx.try_send(batch)
        };
        match sent {
            // The writer has it; the next line takes a spare buffer.
            Ok(()) => {}
            Err(
                TrySendError::Full(Msg::Batch(mut buf, lines)) | TrySendError::Disconnected(Msg::Batch(mut buf, lines)),
            ) => {
                owner.shared.dropped.fetch_add(lines, Ordering::Relaxed);
                buf.clear();
                self.buf = buf;
            }
            Err(_) => unreachable!("a batch was sent"),
        }
    }
}

impl Drop for Local {
    /// The thread is exiting: its last lines go to the writer.
    fn drop(&mut self) {
        self.hand_off(true);
    }
}

enum Destination {
    Stderr,
    File {
        path: PathBuf,
        file: File,
    },
    /// Any writer (tests: one that blocks).
    #[cfg(test)]
    Other(Box<dyn Write + Send>),
}

struct Writer {
    destination: Destination,
    shared: Arc<Shared>,
    /// The last write failed (its error was logged; the next success is logged too).
    failing: bool,
}

impl Writer {
    /// Writes batches as they come. While lines keep coming it naps between polls
    /// instead of parking on the channel: a worker's send then finds no one to wake, so a
    /// busy gateway pays no wake-up syscall per batch. Idle for 50 ms, it parks.
    fn run(mut self, rx: Receiver<Msg>) {
        while let Ok(msg) = rx.recv() {
            if !self.handle(msg) {
                return;
            }
            let mut last = Instant::now();
            // Messages handled since the last nap.
            let mut got = 0;
            loop {
                match rx.try_recv() {
                    Ok(msg) => {
                        if !self.handle(msg) {
                            return;
                        }
                        last = Instant::now();
                        got += 1;
                    }
                    Err(mpsc::TryRecvError::Empty) if last.elapsed() < POLL_IDLE => {
                        std::thread::sleep(if std::mem::take(&mut got) >= BUSY { POLL_BUSY } else { POLL });
                    }
                    Err(mpsc::TryRecvError::Empty) => break,
                    Err(mpsc::TryRecvError::Disconnected) => return,
                }
            }
        }
    }

    /// Handles one message; false on `Stop`.
    fn handle(&mut self, msg: Msg) -> bool {
        match msg {
            Msg::Batch(mut buf, lines) => {
                self.reopen_if_asked();
                self.write(&buf, lines);
                buf.clear();
                // A contended lock is not worth waiting for: the buffer is only memory.
                if let Ok(mut spare) = self.shared.spare.try_lock()
                    && spare.len() < SPARE
                {
                    spare.push(buf);
                }
            }
            Msg::Reopen => self.reopen_if_asked(),
            Msg::Flush(reply) => {
                let _ = reply.try_send(());
            }
            Msg::Stop => return false,
        }
        true
    }

    fn write(&mut self, buf: &[u8], lines: u64) {
        let result = match &mut self.destination {
            Destination::Stderr => io::stderr().lock().write_all(buf),
            Destination::File { file, .. } => file.write_all(buf),
            #[cfg(test)]
            Destination::Other(w) => w.write_all(buf).and_then(|()| w.flush()),
        };
        match result {
            Ok(()) => {
                self.shared.lines.fetch_add(lines, Ordering::Relaxed);
                if std::mem::take(&mut self.failing) {
                    tracing::info!("access log writes again");
                }
            }
            Err(e) => {
                self.shared.dropped.fetch_add(lines, Ordering::Relaxed);
                if !std::mem::replace(&mut self.failing, true) {
                    tracing::warn!(lines, "access log write failed, dropping lines until it works again: {e}");
                }
            }
        }
    }

    fn reopen_if_asked(&mut self) {
        if !self.shared.reopen.swap(false, Ordering::AcqRel) {
            return;
        }
        if let Destination::File { path, file } = &mut self.destination {
            match open(path) {
                Ok(f) => *file = f,
                Err(e) => tracing::warn!("{e}; still writing to the old file"),
            }
        }
    }
}

// ---- Formatting ----

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;
    use std::sync::Condvar;

    fn entry(method: &http::Method) -> Entry<'_> {
        format::sample_entry(method)
    }

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("gateway-access-log-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn file_log(path: &Path, format: Option<LogFormat>) -> Arc<AccessLog> {
        AccessLog::new(&config::AccessLog { enabled: true, path: Some(path.into()), format }).unwrap()
    }

    fn read_lines(path: &Path) -> Vec<Value> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
            .collect()
    }

    #[test]
    fn a_file_gets_every_line_from_every_thread() {
        let dir = temp_dir("threads");
        let path = dir.join("access.log");
        let log = file_log(&path, None);
        assert_eq!(log.format(), LogFormat::Json, "a file defaults to JSON");
        std::thread::scope(|s| {
            for t in 0..4u32 {
                let log = &log;
                s.spawn(move || {
                    let get = http::Method::GET;
                    for i in 0..500 {
                        log.record(&Entry { attempts: t, status: 200 + (i % 3) as u16, ..entry(&get) });
                    }
                    // A worker's periodic flush; the thread's exit would hand it over too.
                    log.flush_local();
                });
            }
        });
        assert!(log.flush_all());
        let lines = read_lines(&path);
        assert_eq!(lines.len(), 2000);
        assert_eq!((log.lines(), log.dropped_lines()), (2000, 0));
        for t in 0..4 {
            assert_eq!(lines.iter().filter(|l| l["attempts"] == t).count(), 500);
        }
        assert!(lines.iter().all(|l| l.as_object().unwrap().len() == 20), "{}", lines[0]);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_partial_buffer_is_written_soon_after_flush_local_and_at_thread_exit() {
        let dir = temp_dir("flush");
        let path = dir.join("access.log");
        let log = file_log(&path, Some(LogFormat::Text));
        let get = http::Method::GET;
        log.record(&entry(&get));
        log.flush_local();
        // The writer writes what it gets at once: no flush_all here.
        let started = Instant::now();
        while log.lines() < 1 {
            assert!(started.elapsed() < Duration::from_secs(1), "not written within 1s");
            std::thread::sleep(Duration::from_millis(5));
        }
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.starts_with("203.0.113.7 [2025-01-31T12:34:56.789Z] \"GET "), "{text}");
        // A plain join (not a scope, which may end before the thread's TLS destructors
        // ran) waits for the thread's exit, and so for its buffer's hand-over.
        let worker = log.clone();
        std::thread::spawn(move || worker.record(&entry(&http::Method::GET))).join().unwrap();
        assert!(log.flush_all());
        assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), 2);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn reopen_after_logrotate_moved_the_file_writes_a_new_file() {
        let dir = temp_dir("reopen");
        let path = dir.join("access.log");
        let rotated = dir.join("access.log.1");
        let log = file_log(&path, None);
        let get = http::Method::GET;
        log.record(&Entry { request_id: b"before", ..entry(&get) });
        assert!(log.flush_all());
        std::fs::rename(&path, &rotated).unwrap();
        // Written after the `mv` but before the signal: still goes to the moved file.
        log.record(&Entry { request_id: b"moved", ..entry(&get) });
        assert!(log.flush_all());
        log.reopen();
        log.record(&Entry { request_id: b"after", ..entry(&get) });
        assert!(log.flush_all());
        let ids =
            |p: &Path| read_lines(p).iter().map(|l| l["request_id"].as_str().unwrap().to_owned()).collect::<Vec<_>>();
        assert_eq!(ids(&rotated), ["before", "moved"]);
        assert_eq!(ids(&path), ["after"]);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn sigusr1_reopens_the_file() {
        let dir = temp_dir("sigusr1");
        let path = dir.join("access.log");
        let log = file_log(&path, None);
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let stop = CancellationToken::new();
        rt.block_on(async {
            reopen_on_sigusr1(log.clone(), stop.clone());
            std::fs::rename(&path, dir.join("access.log.1")).unwrap();
            let status =
                std::process::Command::new("kill").args(["-USR1", &std::process::id().to_string()]).status().unwrap();
            assert!(status.success());
            let started = Instant::now();
            while !path.exists() {
                assert!(started.elapsed() < Duration::from_secs(5), "SIGUSR1 did not reopen the file");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        });
        stop.cancel();
        let _ = std::fs::remove_dir_all(dir);
    }

    /// A destination that blocks every write until it is opened.
    #[derive(Clone, Default)]
    struct Gate(Arc<(Mutex<bool>, Condvar)>, Arc<Mutex<Vec<u8>>>);

    impl Gate {
        fn open(&self) {
            *self.0.0.lock().unwrap() = true;
            self.0.1.notify_all();
        }
    }

    impl Write for Gate {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let mut open = self.0.0.lock().unwrap();
            while !*open {
                open = self.0.1.wait(open).unwrap();
            }
            self.1.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_writer_that_cannot_keep_up_drops_and_counts_instead_of_blocking() {
        let gate = Gate::default();
        let log = AccessLog::start(LogFormat::Json, Destination::Other(Box::new(gate.clone())), 2).unwrap();
        let get = http::Method::GET;
        let n = 20_000u64; // ~7 MB: far more than the writer's one batch plus two queued
        let started = Instant::now();
        for _ in 0..n {
            log.record(&entry(&get));
        }
        log.flush_local();
        let took = started.elapsed();
        assert!(took < Duration::from_secs(2), "recording took {took:?}: it waited for the writer");
        let dropped = log.dropped_lines();
        assert!(dropped > n / 2, "only {dropped} of {n} lines dropped while the destination was blocked");
        assert_eq!(log.lines(), 0);
        gate.open();
        assert!(log.flush_all());
        assert_eq!(log.lines() + log.dropped_lines(), n);
        let written = gate.1.lock().unwrap();
        assert_eq!(written.iter().filter(|&&b| b == b'\n').count() as u64, log.lines());
        for line in written.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
            serde_json::from_slice::<Value>(line).expect("whole lines only");
        }
    }

    #[test]
    fn a_thread_switching_logs_hands_its_lines_to_the_old_one() {
        let dir = temp_dir("switch");
        let (a, b) = (file_log(&dir.join("a.log"), None), file_log(&dir.join("b.log"), None));
        let get = http::Method::GET;
        a.record(&entry(&get));
        b.record(&entry(&get));
        b.record(&entry(&get));
        assert!(a.flush_all() && b.flush_all());
        assert_eq!((read_lines(&dir.join("a.log")).len(), read_lines(&dir.join("b.log")).len()), (1, 2));
        drop(a);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn an_unwritable_path_is_named() {
        let e = AccessLog::new(&config::AccessLog {
            enabled: true,
            path: Some("/nonexistent-dir/access.log".into()),
            format: None,
        })
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("access log /nonexistent-dir/access.log: cannot open for appending"), "{e}");
    }
}
