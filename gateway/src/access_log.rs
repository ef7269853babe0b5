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
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio_util::sync::CancellationToken;

/// A thread's buffer is handed to the writer once it holds this much.
const BATCH: usize = 32 * 1024;
/// Batches that may wait for the writer (at most ~2 MiB, some 100 ms of a busy
/// gateway's lines); more are dropped.
const QUEUE: usize = 64;
/// Empty buffers kept for reuse by the workers.
const SPARE: usize = QUEUE + 8;
/// The writer's nap between polls while lines keep coming, and how long it polls
/// without getting any before it parks.
const POLL: Duration = Duration::from_millis(2);
const POLL_IDLE: Duration = Duration::from_millis(50);
/// How long [`AccessLog::flush_all`] and drop wait for the writer.
const FLUSH_WAIT: Duration = Duration::from_secs(2);

/// One request, as the access log records it. Every field is borrowed: building an
/// entry costs nothing. Fields the gateway makes itself (ids, the client address, the
/// method, the names from the config) are written as they are; what the client sent
/// (host, path) and backend ids are escaped.
#[derive(Debug, Clone)]
pub struct Entry<'a> {
    /// When the request arrived.
    pub time: SystemTime,
    /// `X-Request-Id` as forwarded: hex digits, written as is.
    pub request_id: &'a [u8],
    /// W3C trace id (32 hex digits), when the request was traced.
    pub trace_id: Option<&'a [u8]>,
    /// The client's IP address as text (written as is).
    pub client: &'a [u8],
    /// Request method (a token: never needs escaping).
    pub method: &'a http::Method,
    /// `Host` (or `:authority`) as received.
    pub host: &'a str,
    /// Path and query as received.
    pub path: &'a str,
    /// Status sent to the client.
    pub status: u16,
    /// Route, upstream and strategy names, rendered once per route.
    pub names: &'a Names,
    /// Backend id of the last attempt, `-` when none.
    pub backend: &'a str,
    /// Attempts made (0 when the gateway answered itself).
    pub attempts: u32,
    /// Whether the fallback round robin chose (the plugin failed).
    pub fallback: bool,
    /// Request body bytes received from the client.
    pub bytes_in: u64,
    /// Response body bytes sent to the client.
    pub bytes_out: u64,
    /// From the request's arrival to the end of the response.
    pub duration: Duration,
    /// Why the gateway answered itself (`no_route`, `no_healthy_backend`, ...).
    pub reason: Option<&'a str>,
    /// The failure behind a gateway-made 502/504 (backend, address, OS error), which the
    /// client's body leaves out. Written only when there is one.
    pub error: Option<&'a str>,
}

/// A route's `route`, `upstream` and `strategy` fields, rendered (and escaped) for both
/// formats when the route is built, so a line copies them instead of escaping three
/// strings per request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    json: Box<[u8]>,
    text: Box<[u8]>,
}

impl Names {
    /// The fields for a route named `route` to `upstream`, decided by `strategy`.
    pub fn new(route: &str, upstream: &str, strategy: &str) -> Names {
        let mut json = Vec::new();
        for (key, value) in [(&b",\"route\":"[..], route), (b",\"upstream\":", upstream), (b",\"strategy\":", strategy)]
        {
            json.extend_from_slice(key);
            json_str(&mut json, value);
        }
        let mut text = Vec::new();
        for (key, value) in [(&b" route="[..], route), (b" upstream=", upstream), (b" strategy=", strategy)] {
            text_field(&mut text, key, value);
        }
        Names { json: json.into(), text: text.into() }
    }

    /// The fields of a request no route matched: all `-`.
    pub fn none() -> &'static Names {
        static NONE: std::sync::OnceLock<Names> = std::sync::OnceLock::new();
        NONE.get_or_init(|| Names::new("-", "-", "-"))
    }
}

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
            loop {
                match rx.try_recv() {
                    Ok(msg) => {
                        if !self.handle(msg) {
                            return;
                        }
                        last = Instant::now();
                    }
                    Err(mpsc::TryRecvError::Empty) if last.elapsed() < POLL_IDLE => std::thread::sleep(POLL),
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

/// The current second's `YYYY-MM-DDTHH:MM:SS`, kept per thread.
struct Clock {
    second: u64,
    text: [u8; 19],
}

impl Clock {
    const EMPTY: Clock = Clock { second: u64::MAX, text: [0; 19] };

    /// Writes `time` as RFC 3339 UTC with milliseconds: `2025-01-31T12:34:56.789Z`.
    fn write(&mut self, out: &mut Vec<u8>, time: SystemTime) {
        let since = time.duration_since(UNIX_EPOCH).unwrap_or_default();
        let second = since.as_secs();
        if second != self.second {
            self.second = second;
            self.text = civil_time(second);
        }
        out.extend_from_slice(&self.text);
        let ms = since.subsec_millis();
        out.extend_from_slice(&[
            b'.',
            b'0' + (ms / 100) as u8,
            b'0' + (ms / 10 % 10) as u8,
            b'0' + (ms % 10) as u8,
            b'Z',
        ]);
    }
}

/// `YYYY-MM-DDTHH:MM:SS` for seconds since the Unix epoch (UTC), by Howard Hinnant's
/// `civil_from_days`.
fn civil_time(secs: u64) -> [u8; 19] {
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = (yoe + era * 400 + u64::from(month <= 2)).min(9999);
    let (h, m, s) = (rem / 3600, rem / 60 % 60, rem % 60);
    let d = |n: u64| b'0' + (n % 10) as u8;
    [
        d(year / 1000),
        d(year / 100),
        d(year / 10),
        d(year),
        b'-',
        d(month / 10),
        d(month),
        b'-',
        d(day / 10),
        d(day),
        b'T',
        d(h / 10),
        d(h),
        b':',
        d(m / 10),
        d(m),
        b':',
        d(s / 10),
        d(s),
    ]
}

#[inline(always)]
fn write_u64(out: &mut Vec<u8>, mut n: u64) {
    // Attempts, a bodiless request's bytes: one digit, no copy of a variable length.
    if n < 10 {
        out.push(b'0' + n as u8);
        return;
    }
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

/// An HTTP status: three digits (a status outside 100..=999 is written in full).
#[inline(always)]
fn write_status(out: &mut Vec<u8>, status: u16) {
    if (100..1000).contains(&status) {
        out.extend_from_slice(&[
            b'0' + (status / 100) as u8,
            b'0' + (status / 10 % 10) as u8,
            b'0' + (status % 10) as u8,
        ]);
    } else {
        write_u64(out, u64::from(status));
    }
}

/// Milliseconds with three decimals: `12.345`.
fn write_ms(out: &mut Vec<u8>, d: Duration) {
    write_u64(out, d.as_secs().saturating_mul(1000).saturating_add(u64::from(d.subsec_millis())));
    let frac = d.subsec_micros() % 1000;
    out.extend_from_slice(&[b'.', b'0' + (frac / 100) as u8, b'0' + (frac / 10 % 10) as u8, b'0' + (frac % 10) as u8]);
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// `s` as the inside of a JSON string: `"` and `\` escaped, control characters as
/// `\n`, `\t`, ... or `\u00XX`. Almost every string needs nothing: it is checked eight
/// bytes at a time and copied at once.
fn write_json_str(out: &mut Vec<u8>, s: &str) {
    let bytes = s.as_bytes();
    if is_plain::<0x20>(bytes) {
        out.extend_from_slice(bytes);
        return;
    }
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let escape: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0x08 => b"\\b",
            0x0c => b"\\f",
            0..0x20 => &[b'\\', b'u', b'0', b'0', HEX[(b >> 4) as usize], HEX[(b & 0xf) as usize]],
            _ => continue,
        };
        out.extend_from_slice(&bytes[start..i]);
        out.extend_from_slice(escape);
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
}

/// No byte below `LOW` (0x20: control characters; 0x21: and space), `"` or `\` in
/// `bytes`.
#[inline]
fn is_plain<const LOW: u8>(bytes: &[u8]) -> bool {
    if bytes.len() < 8 {
        return bytes.iter().all(|&b| b >= LOW && b != b'"' && b != b'\\');
    }
    let word = |chunk: &[u8]| u64::from_le_bytes(chunk.try_into().expect("8 bytes"));
    let mut chunks = bytes.chunks_exact(8);
    let mut special = chunks.by_ref().fold(0, |acc, c| acc | special_bytes::<LOW>(word(c)));
    // The last (overlapping) eight bytes cover the remainder.
    special |= special_bytes::<LOW>(word(&bytes[bytes.len() - 8..]));
    special == 0
}

/// Non-zero when any of the eight bytes of `x` is below `LOW` (at most 128), `"` or `\`
/// (the "hasless"/"haszero" word tricks: exact for whether any byte is one).
#[inline]
fn special_bytes<const LOW: u8>(x: u64) -> u64 {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let below_space = x.wrapping_sub(ONES * u64::from(LOW)) & !x;
    let q = x ^ (ONES * u64::from(b'"'));
    let bs = x ^ (ONES * u64::from(b'\\'));
    (below_space | (q.wrapping_sub(ONES) & !q) | (bs.wrapping_sub(ONES) & !bs)) & HIGH
}

/// `"` + the escaped string + `"`.
#[inline(always)]
fn json_str(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    write_json_str(out, s);
    out.push(b'"');
}

/// A JSON string, or `null`.
#[inline(always)]
fn json_opt_str(out: &mut Vec<u8>, s: Option<&str>) {
    match s {
        Some(s) => json_str(out, s),
        None => out.extend_from_slice(b"null"),
    }
}

/// One JSON object and a newline. Keys are written as whole literals (one copy each).
fn write_json(out: &mut Vec<u8>, clock: &mut Clock, e: &Entry<'_>) {
    // One growth check for the line, whatever the client sent.
    out.reserve(400 + e.host.len() + e.path.len());
    out.extend_from_slice(b"{\"time\":\"");
    clock.write(out, e.time);
    out.extend_from_slice(b"\",\"request_id\":\"");
    out.extend_from_slice(e.request_id);
    match e.trace_id {
        Some(id) => {
            out.extend_from_slice(b"\",\"trace_id\":\"");
            out.extend_from_slice(id);
            out.extend_from_slice(b"\",\"client\":\"");
        }
        None => out.extend_from_slice(b"\",\"trace_id\":null,\"client\":\""),
    }
    out.extend_from_slice(e.client);
    out.extend_from_slice(b"\",\"method\":\"");
    out.extend_from_slice(e.method.as_str().as_bytes());
    out.extend_from_slice(b"\",\"host\":");
    json_str(out, e.host);
    out.extend_from_slice(b",\"path\":");
    json_str(out, e.path);
    out.extend_from_slice(b",\"status\":");
    write_status(out, e.status);
    out.extend_from_slice(&e.names.json);
    out.extend_from_slice(b",\"backend\":");
    json_str(out, e.backend);
    out.extend_from_slice(b",\"attempts\":");
    write_u64(out, u64::from(e.attempts));
    out.extend_from_slice(if e.fallback {
        b",\"fallback\":true,\"bytes_in\":"
    } else {
        b",\"fallback\":false,\"bytes_in\":"
    });
    write_u64(out, e.bytes_in);
    out.extend_from_slice(b",\"bytes_out\":");
    write_u64(out, e.bytes_out);
    out.extend_from_slice(b",\"duration_ms\":");
    write_ms(out, e.duration);
    out.extend_from_slice(b",\"reason\":");
    json_opt_str(out, e.reason);
    if let Some(error) = e.error {
        out.extend_from_slice(b",\"error\":");
        json_str(out, error);
    }
    out.extend_from_slice(b"}\n");
}

/// A value in a text line: as it is when it is a plain word, otherwise in quotes with
/// `"`, `\` and control characters escaped (JSON-style), so a line stays one line and
/// splits on spaces.
fn write_text_value(out: &mut Vec<u8>, s: &str) {
    if !s.is_empty() && is_plain::<0x21>(s.as_bytes()) {
        out.extend_from_slice(s.as_bytes());
    } else {
        out.push(b'"');
        write_json_str(out, s);
        out.push(b'"');
    }
}

/// ` key=` (given whole) and the value.
#[inline(always)]
fn text_field(out: &mut Vec<u8>, key: &[u8], value: &str) {
    out.extend_from_slice(key);
    write_text_value(out, value);
}

/// A combined-log-like line, then `key=value` pairs:
/// `203.0.113.7 [2025-01-31T12:34:56.789Z] "GET /a?b=1" 200 512 host=shop.example ...`
fn write_text(out: &mut Vec<u8>, clock: &mut Clock, e: &Entry<'_>) {
    out.reserve(400 + e.host.len() + e.path.len());
    out.extend_from_slice(e.client);
    out.extend_from_slice(b" [");
    clock.write(out, e.time);
    out.extend_from_slice(b"] \"");
    out.extend_from_slice(e.method.as_str().as_bytes());
    out.push(b' ');
    write_json_str(out, e.path);
    out.extend_from_slice(b"\" ");
    write_status(out, e.status);
    out.push(b' ');
    write_u64(out, e.bytes_out);
    text_field(out, b" host=", e.host);
    out.extend_from_slice(&e.names.text);
    text_field(out, b" backend=", e.backend);
    out.extend_from_slice(b" attempts=");
    write_u64(out, u64::from(e.attempts));
    out.extend_from_slice(if e.fallback { b" fallback=true bytes_in=" } else { b" fallback=false bytes_in=" });
    write_u64(out, e.bytes_in);
    out.extend_from_slice(b" duration_ms=");
    write_ms(out, e.duration);
    out.extend_from_slice(b" request_id=");
    out.extend_from_slice(e.request_id);
    out.extend_from_slice(b" trace_id=");
    out.extend_from_slice(e.trace_id.unwrap_or(b"-"));
    text_field(out, b" reason=", e.reason.unwrap_or("-"));
    if let Some(error) = e.error {
        text_field(out, b" error=", error);
    }
    out.push(b'\n');
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;
    use std::sync::Condvar;

    fn entry<'a>(method: &'a http::Method) -> Entry<'a> {
        Entry {
            time: UNIX_EPOCH + Duration::from_millis(1_738_326_896_789),
            request_id: b"4f1c2a9e0b7d3e61",
            trace_id: Some(b"4bf92f3577b34da6a3ce929d0e0e4736"),
            client: b"203.0.113.7",
            method,
            host: "shop.example",
            path: "/book/dune?user=42",
            status: 200,
            names: names(),
            backend: "b1",
            attempts: 1,
            fallback: false,
            bytes_in: 0,
            bytes_out: 512,
            duration: Duration::from_micros(1_234),
            reason: None,
            error: None,
        }
    }

    fn names() -> &'static Names {
        static NAMES: std::sync::OnceLock<Names> = std::sync::OnceLock::new();
        NAMES.get_or_init(|| Names::new("default", "web", "round-robin"))
    }

    fn clock() -> Clock {
        Clock::EMPTY
    }

    fn json_line(e: &Entry<'_>) -> String {
        let mut out = Vec::new();
        write_json(&mut out, &mut clock(), e);
        String::from_utf8(out).unwrap()
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
    fn time_is_rfc3339_utc_with_milliseconds() {
        let mut clock = Clock::EMPTY;
        let mut at = |ms: u64| {
            let mut out = Vec::new();
            clock.write(&mut out, UNIX_EPOCH + Duration::from_millis(ms));
            String::from_utf8(out).unwrap()
        };
        assert_eq!(at(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(at(951_782_400_007), "2000-02-29T00:00:00.007Z");
        assert_eq!(at(1_738_326_896_789), "2025-01-31T12:34:56.789Z");
        assert_eq!(at(1_735_689_599_999), "2024-12-31T23:59:59.999Z");
        assert_eq!(at(4_107_542_400_000), "2100-03-01T00:00:00.000Z");
        // The cached second is replaced, not reused, for another day.
        assert_eq!(at(1_738_326_896_000), "2025-01-31T12:34:56.000Z");
        assert_eq!(at(1_738_413_296_000), "2025-02-01T12:34:56.000Z");
    }

    #[test]
    fn json_line_has_every_field() {
        let get = http::Method::GET;
        let line = json_line(&entry(&get));
        assert!(line.ends_with("}\n") && line.matches('\n').count() == 1, "{line}");
        let v: Value = serde_json::from_str(&line).unwrap();
        let expected = serde_json::json!({
            "time": "2025-01-31T12:34:56.789Z",
            "request_id": "4f1c2a9e0b7d3e61",
            "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736",
            "client": "203.0.113.7",
            "method": "GET",
            "host": "shop.example",
            "path": "/book/dune?user=42",
            "status": 200,
            "route": "default",
            "upstream": "web",
            "backend": "b1",
            "strategy": "round-robin",
            "attempts": 1,
            "fallback": false,
            "bytes_in": 0,
            "bytes_out": 512,
            "duration_ms": 1.234,
            "reason": null,
        });
        assert_eq!(v, expected);
        let reason =
            Entry { client: b"2001:db8::1", trace_id: None, reason: Some("no_route"), fallback: true, ..entry(&get) };
        let v: Value = serde_json::from_str(&json_line(&reason)).unwrap();
        assert_eq!((v["client"].as_str(), v["trace_id"].is_null()), (Some("2001:db8::1"), true));
        assert_eq!((v["reason"].as_str(), v["fallback"].as_bool()), (Some("no_route"), Some(true)));
    }

    #[test]
    fn strings_are_json_escaped() {
        let get = http::Method::GET;
        let nasty = "a\"b\\c\nd\re\tf\u{0}g\u{1f}h\u{8}\u{c}i\u{7f}é€😀\u{2028}";
        let names = Names::new("\\", "web", "round-robin");
        let e = Entry { host: nasty, path: "/\"quoted\"", names: &names, backend: "", ..entry(&get) };
        let line = json_line(&e);
        assert_eq!(line.matches('\n').count(), 1, "{line}");
        assert!(line.contains(r#"a\"b\\c\nd\re\tf\u0000g\u001fh\b\fi"#), "{line}");
        let v: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["host"], nasty);
        assert_eq!(v["path"], "/\"quoted\"");
        assert_eq!(v["route"], "\\");
        assert_eq!(v["backend"], "");
    }

    #[test]
    fn escaping_matches_serde_json_at_every_position() {
        let alphabet = ["a", "\"", "\\", "\n", "\u{1}", "\u{1f}", " ", "é", "😀", "\u{7f}", "~"];
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        for len in 0..40 {
            for _ in 0..50 {
                let s: String = (0..len)
                    .map(|_| {
                        state ^= state << 13;
                        state ^= state >> 7;
                        state ^= state << 17;
                        alphabet[(state % alphabet.len() as u64) as usize]
                    })
                    .collect();
                let mut ours = b"\"".to_vec();
                write_json_str(&mut ours, &s);
                ours.push(b'"');
                assert_eq!(String::from_utf8(ours).unwrap(), serde_json::to_string(&s).unwrap(), "{s:?}");
            }
        }
    }

    #[test]
    fn text_line_is_one_line_with_quoted_odd_values() {
        let get = http::Method::GET;
        let mut out = Vec::new();
        write_text(&mut out, &mut clock(), &entry(&get));
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "203.0.113.7 [2025-01-31T12:34:56.789Z] \"GET /book/dune?user=42\" 200 512 host=shop.example \
             route=default upstream=web strategy=round-robin backend=b1 attempts=1 fallback=false bytes_in=0 \
             duration_ms=1.234 request_id=4f1c2a9e0b7d3e61 trace_id=4bf92f3577b34da6a3ce929d0e0e4736 reason=-\n"
        );
        let mut out = Vec::new();
        let names = Names::new("", "web", "round-robin");
        let e = Entry { host: "a b\n\u{1b}[31m", names: &names, path: "/x\"y", ..entry(&get) };
        write_text(&mut out, &mut clock(), &e);
        let line = String::from_utf8(out).unwrap();
        assert_eq!(line.matches('\n').count(), 1, "{line}");
        assert!(!line.contains('\u{1b}'), "an escape sequence reached the log: {line:?}");
        assert!(line.contains(r#"host="a b\n\u001b[31m" route="""#), "{line}");
        assert!(line.contains(r#""GET /x\"y""#), "{line}");
        let mut out = Vec::new();
        let names = Names::new("a route name with spaces", "web", "round-robin");
        write_text(&mut out, &mut clock(), &Entry { names: &names, ..entry(&get) });
        assert!(String::from_utf8(out).unwrap().contains(r#" route="a route name with spaces" "#));
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
        assert!(lines.iter().all(|l| l.as_object().unwrap().len() == 18), "{}", lines[0]);
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
