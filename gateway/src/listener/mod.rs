//! Listeners: what a client connection goes through before the proxy sees a request.
//!
//! A [`Listener`] is built once at start from its config and shared by the workers:
//! its TLS acceptor ([`tls`]), its limits and the slot count that caps its connections.
//! [`Listener::serve`] runs one connection on the worker that accepted it: the TLS
//! handshake (bounded by `header_timeout`), then hyper (HTTP/1.1 or HTTP/2, by ALPN or
//! by sniffing the preface), with a watchdog that closes the connection when a request
//! head takes too long or when it sits idle.
//!
//! The watchdog costs one timer per connection, not per request: it wakes every
//! quarter of the shorter timeout and compares counters that the connection bumps as
//! it works (bytes read or written, requests started, requests in progress). A timeout
//! therefore fires between its value and 1.5 times its value. hyper's own
//! `header_read_timeout` is not used: it also runs while a keep-alive connection waits
//! for its next request (capping the idle time at the header timeout) and re-arms a
//! timer for every request.

pub mod tls;

use crate::config;
use crate::gateway::Gateway;
use crate::metrics::{self, Closed, Generated};
use crate::proxy::{self, ClientConn, ResponseBody};
use bytes::Bytes;
use http::{Request, Response, StatusCode, Version, header};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::Watcher;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering::Relaxed};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

/// What a worker needs to hand a request to the proxy.
pub type Worker = Arc<(Arc<Gateway>, Arc<proxy::Conns>)>;

/// HTTP/2 streams a client may reset before the gateway accepted them, before the
/// connection is closed with `ENHANCE_YOUR_CALM` (the "rapid reset" flood, CVE-2023-44487).
const MAX_PENDING_ACCEPT_RESET_STREAMS: usize = 20;
/// HTTP/2 streams the gateway may reset because of a client's protocol errors before
/// it closes the connection (the "MadeYouReset" flood).
const MAX_LOCAL_ERROR_RESET_STREAMS: usize = 256;

/// hyper's HTTP/1 header count limit when none is set.
const HYPER_MAX_HEADERS: usize = 100;

/// One listener's settings, shared by every worker.
pub struct Listener {
    /// The configured address.
    pub address: SocketAddr,
    /// Bounds on its clients.
    pub limits: config::Limits,
    /// TLS termination; none: plaintext.
    pub tls: Option<TlsAcceptor>,
    /// Redirect every request to HTTPS on this port instead of proxying it.
    pub redirect_https: Option<u16>,
    /// Connections start with a PROXY protocol header carrying the client's address.
    pub proxy_protocol: bool,
    /// One permit per connection being served (`max_connections`).
    slots: Arc<Semaphore>,
}

impl Listener {
    /// Builds a listener from its config: reads its certificates (the error names the
    /// file and what is wrong). Also returns the certificate store, for reloads.
    pub fn build(config: &config::Listener) -> Result<(Arc<Listener>, Option<Arc<tls::CertStore>>), String> {
        let (tls, store) = match &config.tls {
            Some(t) => {
                let store = tls::CertStore::load(&t.certificates)?;
                (Some(TlsAcceptor::from(store.server_config()?)), Some(store))
            }
            None => (None, None),
        };
        let listener = Listener {
            address: config.address,
            limits: config.limits.clone(),
            tls,
            redirect_https: config.redirect_https,
            proxy_protocol: config.proxy_protocol,
            slots: Arc::new(Semaphore::new(config.limits.max_connections.min(Semaphore::MAX_PERMITS))),
        };
        Ok((Arc::new(listener), store))
    }

    /// The HTTP server settings of this listener (one per worker).
    pub fn http(&self) -> auto::Builder<TokioExecutor> {
        let lim = &self.limits;
        let mut builder = auto::Builder::new(TokioExecutor::new());
        // One buffer, one `write`: a small response's head and body go out together
        // instead of as a two-part `writev`.
        builder.http1().writev(false).max_buf_size(lim.max_header_bytes);
        // hyper's own limit is 100 (also a 431); setting it, even to 100, makes every
        // request head fill a 100-slot array first (~700 instructions a request under
        // callgrind), so only a different value is set.
        if lim.max_headers != HYPER_MAX_HEADERS {
            builder.http1().max_headers(lim.max_headers);
        }
        builder
            .http2()
            .max_concurrent_streams(lim.max_concurrent_streams)
            .max_header_list_size(u32::try_from(lim.max_header_bytes).unwrap_or(u32::MAX))
            .max_pending_accept_reset_streams(MAX_PENDING_ACCEPT_RESET_STREAMS)
            .max_local_error_reset_streams(MAX_LOCAL_ERROR_RESET_STREAMS);
        builder
    }

    /// Waits for a free connection slot for a connection just accepted: one of this
    /// listener's (`max_connections`) and one of the process's (the cap the open-file
    /// limit sets, [`crate::fds`]). Meanwhile its worker accepts no more on this
    /// listener: new connections wait in the kernel's backlog.
    pub async fn slot(&self, stop: &CancellationToken) -> Option<Slot> {
        let own = self.acquire(&self.slots, stop).await?;
        let process = self.acquire(crate::fds::client_slots(), stop).await?;
        Some(Slot { _own: own, _process: process })
    }

    async fn acquire(&self, slots: &Arc<Semaphore>, stop: &CancellationToken) -> Option<OwnedSemaphorePermit> {
        if let Ok(p) = slots.clone().try_acquire_owned() {
            return Some(p);
        }
        metrics::global().local().at_connection_limit.inc();
        tracing::debug!(address = %self.address, max_connections = self.limits.max_connections, "connection limit reached: new connections wait in the backlog");
        tokio::select! {
            _ = stop.cancelled() => None,
            p = slots.clone().acquire_owned() => p.ok(),
        }
    }

    /// Serves one accepted connection until it ends, times out or the gateway stops.
    /// `slot` is released when it ends.
    pub async fn serve(
        self: Arc<Self>,
        stream: TcpStream,
        peer: SocketAddr,
        slot: Slot,
        http: auto::Builder<TokioExecutor>,
        watcher: Watcher,
        worker: Worker,
    ) {
        let _slot = slot;
        let Some(acceptor) = &self.tls else {
            let conn = Arc::new(Conn::new(ClientConn::new(peer, self.limits.body_timeout), self.clone()));
            return self.run(stream, conn, http, watcher, worker).await;
        };
        let stream = match tokio::time::timeout(self.limits.header_timeout, acceptor.accept(stream)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                metrics::global().local().closed[Closed::TlsHandshake as usize].inc();
                tracing::debug!(client = %peer, "TLS handshake failed: {e}");
                return;
            }
            Err(_) => {
                metrics::global().local().closed[Closed::HeaderTimeout as usize].inc();
                tracing::debug!(client = %peer, timeout = ?self.limits.header_timeout, "TLS handshake timed out");
                return;
            }
        };
        let conn = Arc::new(Conn::new(ClientConn::new(peer, self.limits.body_timeout).tls(), self.clone()));
        if stream.get_ref().1.alpn_protocol() == Some(b"h2") {
            conn.activity.h2.store(true, Relaxed);
        }
        self.run(stream, conn, http, watcher, worker).await
    }

    async fn run<I>(&self, io: I, conn: Arc<Conn>, http: auto::Builder<TokioExecutor>, watcher: Watcher, worker: Worker)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let peer = conn.client.peer;
        let io = Counted { io, conn: conn.clone() };
        let service_conn = conn.clone();
        let service = service_fn(move |req: Request<Incoming>| {
            let (worker, conn) = (worker.clone(), service_conn.clone());
            async move {
                let active = Active::start(conn, req.version());
                let resp = match active.0.listener.redirect_https {
                    None => worker.0.proxy.handle(&worker.1, req, &active.0.client).await,
                    Some(port) => redirect(&req, port),
                };
                Ok::<_, Infallible>(resp.map(|body| Tracked { body, _active: active }))
            }
        });
        let served = watcher.watch(http.serve_connection_with_upgrades(TokioIo::new(io), service).into_owned());
        let closed = tokio::select! {
            // No random branch order: the connection first, the watchdog's timer after.
            biased;
            r = served => {
                if let Err(e) = r {
                    // hyper answers malformed requests itself (400, 431) and ends the
                    // connection: they never reach the proxy, so count them here.
                    if let Some(status) = refused_status(&*e) {
                        metrics::global().local().generated(Generated::BadRequest, status);
                        tracing::debug!(client = %peer, status, "malformed request refused: {e}");
                    } else {
                        tracing::debug!(client = %peer, "connection ended with an error: {e}");
                    }
                }
                return;
            }
            closed = watchdog(&conn.activity, &self.limits) => closed,
        };
        metrics::global().local().closed[closed as usize].inc();
        tracing::debug!(client = %peer, reason = Closed::LABELS[closed as usize], "connection closed by the gateway");
    }
}

/// A connection's places among its listener's `max_connections` and the process's
/// client connections; both are freed when it ends.
#[derive(Debug)]
pub struct Slot {
    _own: OwnedSemaphorePermit,
    _process: OwnedSemaphorePermit,
}

/// One client connection: what the proxy needs to know of it and what the watchdog
/// watches.
pub struct Conn {
    /// The client end, as the proxy sees it.
    pub client: ClientConn,
    listener: Arc<Listener>,
    activity: Activity,
}

impl Conn {
    fn new(client: ClientConn, listener: Arc<Listener>) -> Self {
        Conn { client, listener, activity: Activity::default() }
    }
}

/// Counters a connection bumps as it works. Each has one writer at a time (the
/// connection's task, or a request on the same worker thread), so they are plain
/// loads and stores, not locked read-modify-writes.
#[derive(Debug, Default)]
struct Activity {
    /// Reads that returned data.
    reads: AtomicU32,
    /// Writes that sent data.
    writes: AtomicU32,
    /// Requests whose head was complete.
    started: AtomicU32,
    /// Requests in progress: from a complete head until the response body ended.
    active: AtomicU32,
    /// HTTP/2: bytes arriving without a request (pings, window updates) are activity,
    /// not a slow request head.
    h2: AtomicBool,
}

fn bump(c: &AtomicU32) {
    c.store(c.load(Relaxed).wrapping_add(1), Relaxed);
}

/// A request in progress; ends when the response body ends (or is dropped).
struct Active(Arc<Conn>);

impl Active {
    fn start(conn: Arc<Conn>, version: Version) -> Self {
        let a = &conn.activity;
        bump(&a.started);
        // HTTP/2 streams run as their own tasks on the same thread: one thread, but
        // several writers interleaving at await points, so this one is a real add.
        a.active.fetch_add(1, Relaxed);
        if version == Version::HTTP_2 && !a.h2.load(Relaxed) {
            a.h2.store(true, Relaxed);
        }
        Active(conn)
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        self.0.activity.active.fetch_sub(1, Relaxed);
    }
}

/// Waits until the connection breaks a limit, and says which. Wakes every quarter of
/// the shorter timeout.
async fn watchdog(a: &Activity, limits: &config::Limits) -> Closed {
    let tick = (limits.header_timeout.min(limits.idle_timeout) / 4).max(Duration::from_millis(10));
    let start = tokio::time::Instant::now();
    // A new connection owes its first request head within the header timeout.
    let mut head_since = Some(start);
    let mut quiet_since = start;
    let (mut reads, mut writes, mut started) = (0u32, 0u32, 0u32);
    let sleep = tokio::time::sleep(tick);
    tokio::pin!(sleep);
    loop {
        sleep.as_mut().await;
        let now = tokio::time::Instant::now();
        sleep.as_mut().reset(now + tick);
        let (r, w, s) = (a.reads.load(Relaxed), a.writes.load(Relaxed), a.started.load(Relaxed));
        let h2 = a.h2.load(Relaxed);
        if a.active.load(Relaxed) > 0 || s != started || w != writes || (h2 && r != reads) {
            // A request is in progress or just ended (or, on HTTP/2, frames are
            // arriving): neither idle nor waiting for a head.
            (reads, writes, started) = (r, w, s);
            quiet_since = now;
            head_since = None;
            continue;
        }
        if r != reads && head_since.is_none() {
            // Bytes arrived but no request started: a head is on its way.
            head_since = Some(now);
        }
        match head_since {
            Some(t) if now - t >= limits.header_timeout => return Closed::HeaderTimeout,
            Some(_) => {}
            None if now - quiet_since >= limits.idle_timeout => return Closed::IdleTimeout,
            None => {}
        }
    }
}

/// A connection's IO, counting the reads and writes that moved data.
struct Counted<I> {
    io: I,
    conn: Arc<Conn>,
}

impl<I: AsyncRead + Unpin> AsyncRead for Counted<I> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            bump(&self.conn.activity.reads);
        }
        polled
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Counted<I> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write(cx, data);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            bump(&self.conn.activity.writes);
        }
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            bump(&self.conn.activity.writes);
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// A response body that keeps its request counted as in progress until it ends.
pub struct Tracked {
    body: ResponseBody,
    _active: Active,
}

impl Body for Tracked {
    type Data = Bytes;
    type Error = hyper::Error;

    #[inline]
    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    #[inline]
    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    #[inline]
    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// `308 Permanent Redirect` to the same host and path over HTTPS on `port`.
fn redirect(req: &Request<Incoming>, port: u16) -> Response<ResponseBody> {
    let host = req.uri().host().or_else(|| req.headers().get(header::HOST)?.to_str().ok()).map(strip_port);
    let Some(host) = host.filter(|h| valid_host(h)) else {
        let mut resp =
            Response::new(ResponseBody::text("this address only redirects to HTTPS, and needs a valid Host header\n"));
        *resp.status_mut() = StatusCode::BAD_REQUEST;
        resp.headers_mut().insert(header::CONTENT_TYPE, http::HeaderValue::from_static("text/plain"));
        return resp;
    };
    metrics::global().local().generated(Generated::HttpsRedirect, 308);
    let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let location = if port == 443 { format!("https://{host}{path}") } else { format!("https://{host}:{port}{path}") };
    let mut resp = Response::new(ResponseBody::empty());
    *resp.status_mut() = StatusCode::PERMANENT_REDIRECT;
    // Made only of checked host characters and an already parsed path: always valid.
    if let Ok(v) = http::HeaderValue::try_from(location) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    resp
}

/// `host` without its `:port` (an IPv6 literal keeps its brackets).
fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        return host.find(']').map_or(host, |i| &host[..=i]);
    }
    host.rsplit_once(':').map_or(host, |(h, _)| h)
}

/// A DNS name, an IPv4 address or a bracketed IPv6 address: nothing that could turn the
/// `Location` into another URL.
fn valid_host(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 255
        && (h.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
            || (h.starts_with('[') && h.ends_with(']') && h[1..h.len() - 1].parse::<std::net::Ipv6Addr>().is_ok()))
}

/// The status hyper answered a malformed request with, if that is how the connection
/// ended: 431 for a head over the size limit, 400 for a parse error.
fn refused_status(e: &(dyn std::error::Error + 'static)) -> Option<u16> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(h) = err.downcast_ref::<hyper::Error>() {
            if h.is_parse_too_large() {
                return Some(431);
            }
            if h.is_parse() {
                return Some(400);
            }
            return None;
        }
        cur = err.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redirect_host_keeps_names_and_refuses_tricks() {
        assert_eq!(strip_port("a.test:8080"), "a.test");
        assert_eq!(strip_port("[::1]:80"), "[::1]");
        assert_eq!(strip_port("a.test"), "a.test");
        assert!(valid_host("a.test") && valid_host("127.0.0.1") && valid_host("[::1]"));
        assert!(!valid_host("evil.test/x") && !valid_host("a@b") && !valid_host("") && !valid_host("[zz]"));
    }
}
