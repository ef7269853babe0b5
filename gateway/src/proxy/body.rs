//! Body types of the proxy: streamed both ways, never buffered whole.

use super::conns::Pooled;
use crate::pool::ActiveGuard;
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

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
#[derive(Debug, Clone)]
pub struct Replayable {
    slot: Arc<Mutex<Option<Incoming>>>,
}

impl Replayable {
    /// Wraps the client's body.
    pub fn new(body: Incoming) -> Self {
        Replayable { slot: Arc::new(Mutex::new(Some(body))) }
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
    taken: Option<Incoming>,
    /// The backend it goes to, whose `bytes_in` counts it (bodies only).
    to: Option<std::sync::Arc<crate::pool::BackendEntry>>,
}

impl RequestBody {
    /// The body for one attempt, sent to `to`.
    pub fn attempt(&self, to: &std::sync::Arc<crate::pool::BackendEntry>) -> AttemptBody {
        match self {
            RequestBody::Empty => AttemptBody { shared: None, taken: None, to: None },
            RequestBody::Stream(r) => AttemptBody { shared: Some(r.clone()), taken: None, to: Some(to.clone()) },
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
    type Error = hyper::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
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
        if let (Poll::Ready(Some(Ok(frame))), Some(to)) = (&polled, &this.to)
            && let Some(data) = frame.data_ref()
            && crate::metrics::enabled()
        {
            to.metrics.shards.local().bytes_in.add(data.len() as u64);
        }
        polled
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
            ResponseBody::Upstream { body, guard, conn, bytes } => {
                let polled = Pin::new(body).poll_frame(cx);
                match &polled {
                    Poll::Ready(Some(Ok(frame))) => {
                        *bytes += frame.data_ref().map_or(0, |d| d.len() as u64);
                    }
                    Poll::Ready(None) => {
                        settle(guard, bytes);
                        if let Some(c) = conn.take() {
                            c.release();
                        }
                    }
                    Poll::Ready(Some(Err(_))) => {
                        settle(guard, bytes);
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

/// The response is over: count its bytes and end the backend's in-flight request.
fn settle(guard: &mut Option<ActiveGuard>, bytes: &mut u64) {
    if let Some(g) = guard.take()
        && *bytes > 0
        && crate::metrics::enabled()
    {
        g.entry().metrics.shards.local().bytes_out.add(std::mem::take(bytes));
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        if let ResponseBody::Upstream { guard, bytes, .. } = self {
            settle(guard, bytes);
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
