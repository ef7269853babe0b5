//! Keep-alive connections to backends, one pool per worker thread.
//!
//! Each worker drives `hyper::client::conn::http1` connections itself instead of going
//! through a shared client: the idle connections of a backend are a stack indexed by
//! the backend's key (no hashing), a connection goes back on the stack when its
//! response body ends, and a request that a stale connection could not send comes back
//! unsent and is tried on the next connection — so a retry never needs a copy of it.

use super::body::AttemptBody;
use super::error_chain;
use crate::pool::BackendEntry;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpStream;

/// Idle connections kept per backend per worker.
const MAX_IDLE: usize = 1024;

/// Why a request could not be sent.
#[derive(Debug)]
pub enum SendError {
    /// No connection could be made, or it failed before the request was sent: always
    /// safe to try another backend.
    Connect(String),
    /// The request was (at least partly) sent, and then the exchange failed.
    Other(String),
}

/// One worker's connections to every backend.
#[derive(Debug)]
pub struct Conns {
    idle: Mutex<Vec<Vec<SendRequest<AttemptBody>>>>,
    connect_timeout: Duration,
    builder: http1::Builder,
}

/// A connection in use; back to the idle stack when the response body has ended.
#[derive(Debug)]
pub struct Pooled {
    conns: Arc<Conns>,
    key: usize,
    sender: SendRequest<AttemptBody>,
}

impl Pooled {
    /// The response body ended cleanly: the connection can carry another request.
    pub fn release(self) {
        let mut idle = self.conns.idle.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(stack) = idle.get_mut(self.key)
            && stack.len() < MAX_IDLE
        {
            stack.push(self.sender);
        }
    }
}

impl Conns {
    /// An empty pool; new connections time out after `connect_timeout`.
    pub fn new(connect_timeout: Duration) -> Arc<Self> {
        let mut builder = http1::Builder::new();
        builder.max_buf_size(1 << 20);
        Arc::new(Conns { idle: Mutex::new(Vec::new()), connect_timeout, builder })
    }

    /// Sends `req` to `backend` on an idle connection or a new one, and waits for the
    /// response headers.
    pub async fn send(
        self: &Arc<Self>,
        backend: &BackendEntry,
        mut req: Request<AttemptBody>,
        connect_timeout: Duration,
    ) -> Result<(Response<Incoming>, Pooled), SendError> {
        let key = backend.key;
        loop {
            let (mut sender, fresh) = match self.take(key) {
                Some(s) => (s, false),
                None => (self.connect(backend, connect_timeout.min(self.connect_timeout)).await?, true),
            };
            if let Err(e) = sender.ready().await {
                if fresh {
                    return Err(SendError::Connect(error_chain(&e)));
                }
                continue;
            }
            match sender.try_send_request(req).await {
                Ok(resp) => return Ok((resp, Pooled { conns: self.clone(), key, sender })),
                Err(mut e) => match e.take_message() {
                    // A keep-alive connection the backend had closed: nothing was sent.
                    Some(unsent) if !fresh => req = unsent,
                    Some(_) => return Err(SendError::Connect(error_chain(e.error()))),
                    None => return Err(SendError::Other(error_chain(e.error()))),
                },
            }
        }
    }

    fn take(&self, key: usize) -> Option<SendRequest<AttemptBody>> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() <= key {
            idle.resize_with(key + 1, Vec::new);
        }
        let stack = &mut idle[key];
        while let Some(sender) = stack.pop() {
            if !sender.is_closed() {
                return Some(sender);
            }
        }
        None
    }

    async fn connect(&self, backend: &BackendEntry, timeout: Duration) -> Result<SendRequest<AttemptBody>, SendError> {
        let stream = match tokio::time::timeout(timeout, TcpStream::connect(backend.addr)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(SendError::Connect(e.to_string())),
            Err(_) => return Err(SendError::Connect(format!("no connection within {timeout:?}"))),
        };
        let _ = stream.set_nodelay(true);
        let (sender, conn) =
            self.builder.handshake(TokioIo::new(stream)).await.map_err(|e| SendError::Connect(error_chain(&e)))?;
        let addr = backend.addr;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(backend = %addr, "backend connection ended: {e}");
            }
        });
        Ok(sender)
    }
}
