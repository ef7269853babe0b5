//! Body types of the proxy: streamed both ways, never buffered whole.

use super::conns::Pooled;
use crate::pool::ActiveGuard;
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

/// The body of a request sent to a backend.
#[derive(Debug)]
pub enum RequestBody {
    /// No body (most GETs): any attempt can be retried.
    Empty,
    /// The client's body, streamed.
    Stream(Replayable),
}

/// The client's request body, shared by the attempts of one request. The first attempt
/// that reads it takes it; an attempt that never read it (e.g. connect failed) leaves it
/// for the next one. So a retry is possible exactly when no byte has been sent yet.
///
/// Two pointers: it travels with every attempt's request through the backend
/// connection's channels, so it is kept small.
#[derive(Debug, Clone)]
pub struct Replayable {
    shared: Arc<Shared>,
    /// Body bytes sent to a backend so far (for the access log).
    sent: Arc<std::sync::atomic::AtomicU64>,
}

/// What the attempts of one request share of its body.
#[derive(Debug)]
pub struct Shared {
    slot: Mutex<Option<Incoming>>,
    /// The route's `max_body_bytes`: the stream is cut before a chunk that would pass it.
    limit: Option<u64>,
    /// The body passed `limit` (the client gets 413 if no response has started).
    over: std::sync::atomic::AtomicBool,
    /// The listener's `body_timeout`: the longest wait for the next piece of the body.
    timeout: Duration,
    /// The body stalled for `timeout` and was cut (the client gets 408 if no response
    /// has started).
    stalled: std::sync::atomic::AtomicBool,
}

impl std::ops::Deref for Replayable {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.shared
    }
}

/// The request body passed the route's `max_body_bytes`: the backend sees an aborted body.
#[derive(Debug, thiserror::Error)]
#[error("the request body is larger than max_body_bytes ({limit} bytes)")]
pub struct TooLarge {
    /// The limit that was passed.
    pub limit: u64,
}

/// The client sent no piece of its request body for the listener's `body_timeout`: the
/// backend sees an aborted body.
#[derive(Debug, thiserror::Error)]
#[error("the request body stalled: nothing arrived for {0:?} (limits.body_timeout)")]
pub struct Stalled(pub Duration);

/// Errors of a body sent to a backend: the client's connection broke, or it sent too much.
pub type BodyError = Box<dyn std::error::Error + Send + Sync>;

impl Replayable {
    /// Wraps the client's body; at most `limit` bytes of it are passed on, and it is
    /// cut when no piece of it arrives for `timeout`.
    pub fn new(body: Incoming, limit: Option<u64>, timeout: Duration) -> Self {
        let shared = Shared {
            slot: Mutex::new(Some(body)),
            limit,
            over: Default::default(),
            timeout,
            stalled: Default::default(),
        };
        Replayable { shared: Arc::new(shared), sent: Arc::default() }
    }

    /// Whether no attempt has started reading the body.
    pub fn untouched(&self) -> bool {
        self.slot.lock().unwrap_or_else(|e| e.into_inner()).is_some()
    }
}

/// One attempt's view of a [`Replayable`] body.
#[derive(Debug)]
pub struct AttemptBody {
    shared: Option<Replayable>,
    /// The same, kept after the body was taken (for its limit); none: no body.
    shared_ref: Option<Replayable>,
    taken: Option<Incoming>,
    /// The backend it goes to, whose `bytes_in` counts it (bodies only).
    to: Option<std::sync::Arc<crate::pool::BackendEntry>>,
    /// The request's count of body bytes sent.
    sent: Option<Arc<std::sync::atomic::AtomicU64>>,
    /// Fires when the client has sent nothing for `body_timeout` while the backend
    /// waits for the body; made at the first wait (never for a body that is all there).
    stall: Option<Pin<Box<tokio::time::Sleep>>>,
    /// A piece arrived since `stall` was last set.
    moved: bool,
}

impl AttemptBody {
    /// Called when the client has nothing to read: (re)arms the stall timer, or says the
    /// body stalled when it fired. The timer is set afresh only after a piece arrived,
    /// so it measures the wait since the body last moved. Out of line: most bodies are
    /// all there when read.
    #[inline(never)]
    fn stalled(&mut self, cx: &mut Context<'_>) -> Option<Stalled> {
        let shared = self.shared_ref.as_ref()?;
        let deadline = tokio::time::Instant::now() + shared.timeout;
        let stall = match &mut self.stall {
            Some(s) => {
                if self.moved {
                    s.as_mut().reset(deadline);
                }
                s
            }
            None => self.stall.insert(Box::pin(tokio::time::sleep_until(deadline))),
        };
        self.moved = false;
        if stall.as_mut().poll(cx).is_pending() {
            return None;
        }
        shared.stalled.store(true, std::sync::atomic::Ordering::Relaxed);
        Some(Stalled(shared.timeout))
    }

    /// Counts a chunk against the limit: an error (and the flag set) when it would pass it.
    fn admit(&self, len: u64) -> Result<(), TooLarge> {
        let (Some(shared), Some(sent)) = (&self.shared_ref, &self.sent) else { return Ok(()) };
        let Some(limit) = shared.limit else { return Ok(()) };
        if sent.load(std::sync::atomic::Ordering::Relaxed) + len > limit {
            shared.over.store(true, std::sync::atomic::Ordering::Relaxed);
            return Err(TooLarge { limit });
        }
        Ok(())
    }
}

impl RequestBody {
    /// The body for one attempt, sent to `to`.
    pub fn attempt(&self, to: &std::sync::Arc<crate::pool::BackendEntry>) -> AttemptBody {
        match self {
            RequestBody::Empty => AttemptBody {
                shared: None,
                shared_ref: None,
                taken: None,
                to: None,
                sent: None,
                stall: None,
                moved: false,
            },
            RequestBody::Stream(r) => AttemptBody {
                shared: Some(r.clone()),
                shared_ref: Some(r.clone()),
                taken: None,
                to: Some(to.clone()),
                sent: Some(r.sent.clone()),
                stall: None,
                moved: false,
            },
        }
    }

    /// The count of body bytes sent to backends, for the access log (none: no body).
    pub fn sent(&self) -> Option<Arc<std::sync::atomic::AtomicU64>> {
        match self {
            RequestBody::Empty => None,
            RequestBody::Stream(r) => Some(r.sent.clone()),
        }
    }

    /// Whether the body passed the route's `max_body_bytes` and was cut.
    pub fn too_large(&self) -> bool {
        match self {
            RequestBody::Empty => false,
            RequestBody::Stream(r) => r.over.load(std::sync::atomic::Ordering::Relaxed),
        }
    }

    /// Whether the body stalled for longer than `body_timeout` and was cut.
    pub fn stalled(&self) -> bool {
        match self {
            RequestBody::Empty => false,
            RequestBody::Stream(r) => r.stalled.load(std::sync::atomic::Ordering::Relaxed),
        }
    }

    /// Whether a new attempt would still send the whole body.
    pub fn replayable(&self) -> bool {
        match self {
            RequestBody::Empty => true,
            RequestBody::Stream(r) => r.untouched(),
        }
    }
}

impl Body for AttemptBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = &mut *self;
        if this.taken.is_none() {
            let Some(shared) = this.shared.take() else {
                return Poll::Ready(None);
            };
            match shared.slot.lock().unwrap_or_else(|e| e.into_inner()).take() {
                Some(body) => this.taken = Some(body),
                None => return Poll::Ready(None),
            }
        }
        let polled = Pin::new(this.taken.as_mut().expect("set above")).poll_frame(cx);
        if polled.is_pending() {
            if let Some(e) = this.stalled(cx) {
                // Stop reading the client; the backend sees the body end in an error,
                // which closes its connection.
                this.taken = None;
                return Poll::Ready(Some(Err(e.into())));
            }
        } else {
            this.moved = true;
        }
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
            && let Err(e) = this.admit(data.len() as u64)
        {
            // Stop reading the client: what it still sends is never buffered here.
            this.taken = None;
            return Poll::Ready(Some(Err(e.into())));
        }
        if let (Poll::Ready(Some(Ok(frame))), Some(to)) = (&polled, &this.to)
            && let Some(data) = frame.data_ref()
        {
            if let Some(sent) = &this.sent {
                sent.fetch_add(data.len() as u64, std::sync::atomic::Ordering::Relaxed);
            }
            if crate::metrics::enabled() {
                to.metrics.shards.local().bytes_in.add(data.len() as u64);
            }
        }
        polled.map_err(BodyError::from)
    }

    fn is_end_stream(&self) -> bool {
        match (&self.shared, &self.taken) {
            (None, None) => true,
            (_, Some(b)) => b.is_end_stream(),
            (Some(_), None) => false,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match (&self.shared, &self.taken) {
            (None, None) => SizeHint::with_exact(0),
            (_, Some(b)) => b.size_hint(),
            (Some(s), None) => {
                s.slot.lock().unwrap_or_else(|e| e.into_inner()).as_ref().map(|b| b.size_hint()).unwrap_or_default()
            }
        }
    }
}

/// The body of a response sent to a client.
#[derive(Debug)]
pub enum ResponseBody {
    /// A backend's body, streamed; the guard keeps the backend's in-flight count up
    /// until the body ends, and the connection goes back to the pool then.
    Upstream {
        /// The backend's body.
        body: Incoming,
        /// In-flight count of the backend.
        guard: Option<ActiveGuard>,
        /// The connection it arrives on.
        conn: Option<Pooled>,
        /// Body bytes passed on so far (counted into the backend's metrics at the end).
        bytes: u64,
        /// The access-log line, written when the body ends.
        log: Option<Box<super::log::Pending>>,
    },
    /// A body the gateway wrote itself.
    Full(Option<Bytes>),
}

impl ResponseBody {
    /// A small body from the gateway.
    pub fn text(s: impl Into<Bytes>) -> Self {
        ResponseBody::Full(Some(s.into()))
    }

    /// No body.
    pub fn empty() -> Self {
        ResponseBody::Full(None)
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match &mut *self {
            ResponseBody::Upstream { body, guard, conn, bytes, log } => {
                let polled = Pin::new(body).poll_frame(cx);
                match &polled {
                    Poll::Ready(Some(Ok(frame))) => {
                        *bytes += frame.data_ref().map_or(0, |d| d.len() as u64);
                    }
                    Poll::Ready(None) => {
                        settle(guard, bytes, log);
                        if let Some(c) = conn.take() {
                            c.release();
                        }
                    }
                    Poll::Ready(Some(Err(_))) => {
                        settle(guard, bytes, log);
                        conn.take();
                    }
                    _ => {}
                }
                polled
            }
            ResponseBody::Full(data) => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ResponseBody::Upstream { body, .. } => body.is_end_stream(),
            ResponseBody::Full(data) => data.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ResponseBody::Upstream { body, .. } => body.size_hint(),
            ResponseBody::Full(data) => SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64)),
        }
    }
}

/// The response is over: count its bytes, write its access-log line and end the
/// backend's in-flight request.
fn settle(guard: &mut Option<ActiveGuard>, bytes: &mut u64, log: &mut Option<Box<super::log::Pending>>) {
    let Some(g) = guard.take() else { return };
    if *bytes > 0 && crate::metrics::enabled() {
        g.entry().metrics.shards.local().bytes_out.add(*bytes);
    }
    if let Some(line) = log.take() {
        line.record(Some(&g.entry().id), *bytes);
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        if let ResponseBody::Upstream { guard, bytes, log, .. } = self {
            settle(guard, bytes, log);
        }
        // Bodies the server never polls (HEAD, 204, 304) still free their connection.
        if let ResponseBody::Upstream { body, conn, .. } = self
            && body.is_end_stream()
            && let Some(c) = conn.take()
        {
            c.release();
        }
    }
}
