//! Keep-alive connections to backends, one pool per worker thread.
//!
//! Each worker drives hyper's client connections itself instead of going through a
//! shared client. Per backend (indexed by the backend's key, no hashing):
//! - **HTTP/1.1** (`protocol: http1`, with or without TLS): a stack of idle connections;
//!   a connection goes back on the stack when its response body ends, and a request
//!   that a stale connection could not send comes back unsent and is tried on the next
//!   connection — so a retry never needs a copy of it.
//! - **HTTP/2** (`h2c`, `h2`): a few shared connections, each carrying up to
//!   `pool.max_streams` requests at once (Envoy-style); another is opened when every
//!   one is full, and a closed one (GOAWAY, error) is dropped and replaced. While one
//!   connection is being opened, other requests for that backend wait for it instead of
//!   opening their own. A request that a closing connection did not take comes back
//!   unsent and goes on another; one the backend refused unprocessed (a stream after
//!   the last one its GOAWAY names, or `REFUSED_STREAM`) is [`SendError::Refused`],
//!   for the proxy to send again.
//!
//! A sweeper ticks once a second: idle connections unused for `pool.idle_timeout` are
//! closed. The release path only reads the tick (no clock call per request).

use super::body::AttemptBody;
use super::error_chain;
use crate::config::{self, Protocol};
use crate::pool::BackendEntry;
use http::{Request, Response, Uri, header};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::Notify;

/// How often the sweeper looks for idle connections to close.
const TICK: Duration = Duration::from_secs(1);

/// How an upstream's backends are reached: protocol, TLS and pool limits. Built once
/// per upstream when the view is built (the TLS config included), never per connection.
#[derive(Debug)]
pub struct Transport {
    protocol: Protocol,
    tls: Option<Tls>,
    /// `pool.idle_timeout` in sweeper ticks (rounded up).
    idle_ticks: u32,
    max_idle: usize,
    max_streams: usize,
}

struct Tls {
    connector: tokio_rustls::TlsConnector,
    /// `tls.server_name`; none: the backend's IP address.
    server_name: Option<ServerName<'static>>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls").field("server_name", &self.server_name).finish_non_exhaustive()
    }
}

impl Transport {
    /// The transport an upstream's config asks for: reads the CA bundle and the client
    /// certificate, and builds the rustls client config. Blocking (file reads).
    pub fn new(cfg: &config::Upstream) -> Result<Self, String> {
        let tls = match (&cfg.tls, cfg.protocol) {
            (Some(t), _) => Some(tls_config(t, cfg.protocol)?),
            (None, Protocol::H2) => Some(tls_config(&config::UpstreamTls::default(), cfg.protocol)?),
            (None, _) => None,
        };
        let ticks = cfg.pool.idle_timeout.as_millis().div_ceil(TICK.as_millis()).clamp(1, u32::MAX as u128);
        Ok(Transport {
            protocol: cfg.protocol,
            tls,
            idle_ticks: ticks as u32,
            max_idle: cfg.pool.max_idle,
            max_streams: cfg.pool.max_streams.max(1),
        })
    }

    fn is_h2(&self) -> bool {
        self.protocol != Protocol::Http1
    }
}

fn tls_config(t: &config::UpstreamTls, protocol: Protocol) -> Result<Tls, String> {
    let mut roots = rustls::RootCertStore::empty();
    match &t.ca {
        Some(path) => {
            let certs = read_certs(path)?;
            for cert in certs {
                roots.add(cert).map_err(|e| format!("tls.ca {}: {e}", path.display()))?;
            }
        }
        None => {
            let path = std::env::var_os("SSL_CERT_FILE")
                .map(std::path::PathBuf::from)
                .unwrap_or_else(|| "/etc/ssl/certs/ca-certificates.crt".into());
            let (added, _) = roots.add_parsable_certificates(read_certs(&path)?);
            if added == 0 {
                return Err(format!("no usable CA certificate in the system bundle {}", path.display()));
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots);
    let mut config = match (&t.cert, &t.key) {
        (Some(cert), Some(key)) => {
            let chain = read_certs(cert)?;
            let key = PrivateKeyDer::from_pem_file(key)
                .map_err(|e| format!("tls.key {}: no PEM private key: {e}", key.display()))?;
            builder.with_client_auth_cert(chain, key).map_err(|e| format!("tls.cert/tls.key: {e}"))?
        }
        _ => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![if protocol == Protocol::H2 { b"h2".to_vec() } else { b"http/1.1".to_vec() }];
    let server_name = match &t.server_name {
        Some(name) => Some(
            ServerName::try_from(name.clone())
                .map_err(|e| format!("tls.server_name `{name}` is not a DNS name: {e}"))?,
        ),
        None => None,
    };
    Ok(Tls { connector: tokio_rustls::TlsConnector::from(Arc::new(config)), server_name })
}

fn read_certs(path: &std::path::Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("cannot read PEM certificates from {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no PEM certificate in it", path.display()));
    }
    Ok(certs)
}

/// Why a request could not be sent.
#[derive(Debug)]
pub enum SendError {
    /// No connection could be made, or it failed before the request was sent: always
    /// safe to try another backend.
    Connect(String),
    /// The request was (at least partly) sent, and then the exchange failed.
    Other(String),
    /// The backend refused the request's HTTP/2 stream without processing it: the
    /// stream came after the last one its GOAWAY names, or was reset with
    /// `REFUSED_STREAM` (RFC 9113 §6.8, §8.7). Safe to send again, even a `POST`, and no
    /// fault of the backend's: closing a connection is not failing.
    Refused(String),
    /// The backend went down while the request waited for its response headers (the
    /// proxy's verdict, not the connection's).
    BackendDown,
    /// The gateway is out of file descriptors: nothing was sent, and the backend is not
    /// to blame.
    Local(String),
}

/// One worker's connections to every backend.
#[derive(Debug)]
pub struct Conns {
    slots: Mutex<Vec<Slot>>,
    /// Sweeper ticks so far: when an idle connection was last used.
    tick: AtomicU32,
    h1: http1::Builder,
    h2: http2::Builder<TokioExecutor>,
}

/// One backend's connections on this worker.
#[derive(Debug, Default)]
struct Slot {
    /// The transport the connections were made with; another one (a reload changed the
    /// upstream's protocol or TLS) drops them.
    transport: Option<Arc<Transport>>,
    /// The backend ([`BackendEntry::serial`]) the connections go to: a key is reused
    /// once its backend is gone, and the next one drops them.
    owner: u64,
    /// Bumped when the connections are dropped for another transport: an HTTP/1.1
    /// connection of an older generation does not come back.
    generation: u32,
    /// Idle HTTP/1.1 connections and the tick they were last used at.
    idle: Vec<(http1::SendRequest<AttemptBody>, u32)>,
    /// Shared HTTP/2 connections.
    h2: Vec<H2Conn>,
    /// An HTTP/2 connection is being opened: others wait for it.
    connecting: bool,
    /// Counts HTTP/2 connection attempts; with the failure of the last one, so that
    /// requests that waited for it fail with it instead of trying in turn.
    attempts: u64,
    failed: Option<(u64, String)>,
    opened: Option<Arc<Notify>>,
}

#[derive(Debug)]
struct H2Conn {
    sender: http2::SendRequest<AttemptBody>,
    /// Requests in flight on it.
    streams: Arc<AtomicUsize>,
    last_used: u32,
}

/// A connection in use: an HTTP/1.1 one goes back to the idle stack when the response
/// body has ended; an HTTP/2 one frees its stream.
#[derive(Debug)]
pub struct Pooled(Held);

#[derive(Debug)]
enum Held {
    H1 { conns: Arc<Conns>, key: usize, generation: u32, max_idle: usize, sender: http1::SendRequest<AttemptBody> },
    H2 { _stream: StreamGuard },
}

/// One stream of an HTTP/2 connection, counted while the exchange lasts.
#[derive(Debug)]
struct StreamGuard(Arc<AtomicUsize>);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Pooled {
    /// The response body ended cleanly: the connection can carry another request.
    pub fn release(self) {
        let Held::H1 { conns, key, generation, max_idle, sender } = self.0 else { return };
        let tick = conns.tick.load(Ordering::Relaxed);
        let mut slots = conns.slots.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(slot) = slots.get_mut(key)
            && slot.generation == generation
            && slot.idle.len() < max_idle
        {
            slot.idle.push((sender, tick));
        }
    }
}

impl Conns {
    /// An empty pool. Inside a tokio runtime, also starts its sweeper, which closes
    /// connections idle for longer than their upstream's `pool.idle_timeout`.
    pub fn new() -> Arc<Self> {
        let mut h1 = http1::Builder::new();
        h1.max_buf_size(1 << 20);
        let mut h2 = http2::Builder::new(TokioExecutor::new());
        h2.adaptive_window(true);
        let conns = Arc::new(Conns { slots: Mutex::new(Vec::new()), tick: AtomicU32::new(0), h1, h2 });
        if tokio::runtime::Handle::try_current().is_ok() {
            tokio::spawn(sweep(Arc::downgrade(&conns)));
        }
        conns
    }

    /// Sends `req` to `backend` the way `transport` says, on a pooled connection or a
    /// new one (made within `connect_timeout`, TLS handshake included), and waits for
    /// the response headers.
    pub async fn send(
        self: &Arc<Self>,
        backend: &BackendEntry,
        transport: &Arc<Transport>,
        req: Request<AttemptBody>,
        connect_timeout: Duration,
    ) -> Result<(Response<Incoming>, Pooled), SendError> {
        if transport.is_h2() {
            return self.send_h2(backend, transport, req, connect_timeout).await;
        }
        let key = backend.key;
        let mut req = req;
        loop {
            let (taken, generation) = self.take(backend, transport);
            let (mut sender, fresh) = match taken {
                Some(s) => (s, false),
                None => (self.connect_h1(backend, transport, connect_timeout).await?, true),
            };
            if let Err(e) = sender.ready().await {
                if fresh {
                    return Err(SendError::Connect(error_chain(&e)));
                }
                continue;
            }
            match sender.try_send_request(req).await {
                Ok(resp) => {
                    let held = Held::H1 { conns: self.clone(), key, generation, max_idle: transport.max_idle, sender };
                    return Ok((resp, Pooled(held)));
                }
                Err(mut e) => match e.take_message() {
                    // A keep-alive connection the backend had closed: nothing was sent.
                    Some(unsent) if !fresh => req = unsent,
                    Some(_) => return Err(SendError::Connect(error_chain(e.error()))),
                    None => return Err(SendError::Other(error_chain(e.error()))),
                },
            }
        }
    }

    /// The backend's slot, its connections dropped first if they were made for another
    /// transport or another backend.
    fn slot<'a>(slots: &'a mut Vec<Slot>, backend: &BackendEntry, transport: &Arc<Transport>) -> &'a mut Slot {
        let key = backend.key;
        if slots.len() <= key {
            slots.resize_with(key + 1, Slot::default);
        }
        let slot = &mut slots[key];
        if slot.owner != backend.serial || !slot.transport.as_ref().is_some_and(|t| Arc::ptr_eq(t, transport)) {
            slot.owner = backend.serial;
            slot.transport = Some(transport.clone());
            slot.generation = slot.generation.wrapping_add(1);
            slot.idle.clear();
            slot.h2.clear();
        }
        slot
    }

    fn take(
        &self,
        backend: &BackendEntry,
        transport: &Arc<Transport>,
    ) -> (Option<http1::SendRequest<AttemptBody>>, u32) {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        let slot = Self::slot(&mut slots, backend, transport);
        while let Some((sender, _)) = slot.idle.pop() {
            if !sender.is_closed() {
                return (Some(sender), slot.generation);
            }
        }
        (None, slot.generation)
    }

    async fn send_h2(
        self: &Arc<Self>,
        backend: &BackendEntry,
        transport: &Arc<Transport>,
        req: Request<AttemptBody>,
        connect_timeout: Duration,
    ) -> Result<(Response<Incoming>, Pooled), SendError> {
        let mut req = h2_request(req, transport, backend);
        let key = backend.key;
        loop {
            let (mut sender, streams, fresh) = match self.pick_h2(backend, transport) {
                Pick::Conn(sender, streams) => (sender, streams, false),
                Pick::Wait(opened, attempt) => {
                    // Bounded: the connection being opened gives up within its timeout.
                    let _ = tokio::time::timeout(connect_timeout, opened).await;
                    let slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
                    if let Some(Some((n, e))) = slots.get(key).map(|s| &s.failed)
                        && *n == attempt
                    {
                        return Err(SendError::Connect(e.clone()));
                    }
                    continue;
                }
                Pick::Open(attempt) => {
                    // Ends the attempt even if this request is dropped mid-connect
                    // (client gone, response timeout): waiters must not wait forever.
                    let _opening = Opening { conns: self, key };
                    let opened = self.connect_h2(backend, transport, connect_timeout).await;
                    let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
                    let slot = Self::slot(&mut slots, backend, transport);
                    match opened {
                        Ok(sender) => {
                            let streams = Arc::new(AtomicUsize::new(0));
                            let last_used = self.tick.load(Ordering::Relaxed);
                            slot.h2.push(H2Conn { sender: sender.clone(), streams: streams.clone(), last_used });
                            (sender, streams, true)
                        }
                        Err(e) => {
                            if let SendError::Connect(text) = &e {
                                slot.failed = Some((attempt, text.clone()));
                            }
                            return Err(e);
                        }
                    }
                }
            };
            streams.fetch_add(1, Ordering::Relaxed);
            let guard = StreamGuard(streams);
            match sender.try_send_request(req).await {
                Ok(resp) => return Ok((resp, Pooled(Held::H2 { _stream: guard }))),
                Err(mut e) => match e.take_message() {
                    // The connection was closing (GOAWAY, reset): nothing was sent.
                    Some(unsent) if !fresh => req = unsent,
                    Some(_) => return Err(SendError::Connect(error_chain(e.error()))),
                    None if refused_unprocessed(e.error()) => return Err(SendError::Refused(error_chain(e.error()))),
                    None => return Err(SendError::Other(error_chain(e.error()))),
                },
            }
        }
    }

    /// A shared connection with a free stream, or what to do when there is none.
    fn pick_h2(&self, backend: &BackendEntry, transport: &Arc<Transport>) -> Pick {
        let tick = self.tick.load(Ordering::Relaxed);
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        let slot = Self::slot(&mut slots, backend, transport);
        slot.h2.retain(|c| !c.sender.is_closed());
        if let Some(c) = slot.h2.iter_mut().find(|c| c.streams.load(Ordering::Relaxed) < transport.max_streams) {
            c.last_used = tick;
            return Pick::Conn(c.sender.clone(), c.streams.clone());
        }
        if slot.connecting {
            let notify = slot.opened.get_or_insert_with(|| Arc::new(Notify::new())).clone();
            // Created under the lock: `notify_waiters` reaches it from now on, so a
            // wake-up between here and the `await` is not lost.
            return Pick::Wait(notify.notified_owned(), slot.attempts);
        }
        slot.connecting = true;
        slot.attempts += 1;
        Pick::Open(slot.attempts)
    }

    async fn connect_h1(
        &self,
        backend: &BackendEntry,
        transport: &Transport,
        timeout: Duration,
    ) -> Result<http1::SendRequest<AttemptBody>, SendError> {
        within(timeout, async {
            let addr = backend.addr;
            match dial(backend, transport).await? {
                Stream::Tcp(s) => handshake_h1(&self.h1, s, addr).await,
                Stream::Tls(s) => handshake_h1(&self.h1, s, addr).await,
            }
        })
        .await
    }

    async fn connect_h2(
        &self,
        backend: &BackendEntry,
        transport: &Transport,
        timeout: Duration,
    ) -> Result<http2::SendRequest<AttemptBody>, SendError> {
        within(timeout, async {
            let addr = backend.addr;
            match dial(backend, transport).await? {
                Stream::Tcp(s) => handshake_h2(&self.h2, s, addr).await,
                Stream::Tls(s) => {
                    if s.get_ref().1.alpn_protocol() != Some(b"h2") {
                        tracing::warn!(backend = %addr, "backend did not agree to HTTP/2 in the TLS handshake (ALPN); is it an HTTP/2 server? (`protocol: h2`)");
                        return Err(SendError::Connect("the backend did not agree to HTTP/2 (ALPN h2)".into()));
                    }
                    handshake_h2(&self.h2, s, addr).await
                }
            }
        })
        .await
    }
}

/// Whether the backend said it did not process the stream: a GOAWAY it sent names an
/// earlier last stream (h2 gives the streams after it the GOAWAY as their error, while
/// the ones up to it end normally or with the connection's I/O error), or it reset the
/// stream with `REFUSED_STREAM`.
fn refused_unprocessed(e: &hyper::Error) -> bool {
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(h2) = s.downcast_ref::<h2::Error>() {
            return h2.is_remote() && (h2.is_go_away() || h2.reason() == Some(h2::Reason::REFUSED_STREAM));
        }
        source = s.source();
    }
    false
}

/// `connect` bounded by `timeout`: a connection (TCP, TLS, HTTP handshake) not made in
/// time is a connect failure, safe to retry on another backend.
async fn within<T>(timeout: Duration, connect: impl Future<Output = Result<T, SendError>>) -> Result<T, SendError> {
    match tokio::time::timeout(timeout, connect).await {
        Ok(r) => r,
        Err(_) => Err(SendError::Connect(format!("no connection within {timeout:?}"))),
    }
}

/// An HTTP/2 connection attempt under way; when it ends (or is dropped), requests that
/// waited for it look again.
struct Opening<'a> {
    conns: &'a Conns,
    key: usize,
}

impl Drop for Opening<'_> {
    fn drop(&mut self) {
        let mut slots = self.conns.slots.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(slot) = slots.get_mut(self.key) {
            slot.connecting = false;
            if let Some(n) = slot.opened.take() {
                n.notify_waiters();
            }
        }
    }
}

enum Pick {
    Conn(http2::SendRequest<AttemptBody>, Arc<AtomicUsize>),
    Wait(tokio::sync::futures::OwnedNotified, u64),
    Open(u64),
}

/// HTTP/2 needs `:scheme` and `:authority`: the target becomes absolute, its authority
/// taken from the `Host` header (which HTTP/2 does not carry), and `te: trailers` says
/// the gateway takes trailers (gRPC servers ask for it).
fn h2_request(mut req: Request<AttemptBody>, transport: &Transport, backend: &BackendEntry) -> Request<AttemptBody> {
    let host = req.headers_mut().remove(header::HOST);
    let authority = host
        .and_then(|h| http::uri::Authority::try_from(h.as_bytes()).ok())
        .unwrap_or_else(|| backend.authority.clone());
    let scheme = if transport.tls.is_some() { http::uri::Scheme::HTTPS } else { http::uri::Scheme::HTTP };
    let mut parts = req.uri().clone().into_parts();
    parts.scheme = Some(scheme);
    parts.authority = Some(authority);
    if parts.path_and_query.is_none() {
        parts.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
    }
    if let Ok(uri) = Uri::from_parts(parts) {
        *req.uri_mut() = uri;
    }
    *req.version_mut() = http::Version::HTTP_2;
    req.headers_mut().insert(header::TE, header::HeaderValue::from_static("trailers"));
    req
}

enum Stream {
    Tcp(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

/// TCP connect, then the TLS handshake when the transport has TLS.
async fn dial(backend: &BackendEntry, transport: &Transport) -> Result<Stream, SendError> {
    let stream = TcpStream::connect(backend.addr).await.map_err(|e| {
        if crate::fds::is_exhausted(&e) { SendError::Local(e.to_string()) } else { SendError::Connect(e.to_string()) }
    })?;
    let _ = stream.set_nodelay(true);
    let Some(tls) = &transport.tls else { return Ok(Stream::Tcp(stream)) };
    let name = tls.server_name.clone().unwrap_or_else(|| ServerName::IpAddress(backend.addr.ip().into()));
    match tls.connector.connect(name.clone(), stream).await {
        Ok(s) => Ok(Stream::Tls(Box::new(s))),
        Err(e) => {
            // A certificate or name mismatch is a configuration problem: say so loudly.
            tracing::warn!(backend = %backend.addr, server_name = %name.to_str(), "TLS handshake with the backend failed: {e} (check the upstream's tls.ca and tls.server_name)");
            Err(SendError::Connect(format!("TLS handshake failed: {e}")))
        }
    }
}

async fn handshake_h1<T>(
    builder: &http1::Builder,
    io: T,
    addr: std::net::SocketAddr,
) -> Result<http1::SendRequest<AttemptBody>, SendError>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = builder.handshake(TokioIo::new(io)).await.map_err(|e| SendError::Connect(error_chain(&e)))?;
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(backend = %addr, "backend connection ended: {e}");
        }
    });
    Ok(sender)
}

async fn handshake_h2<T>(
    builder: &http2::Builder<TokioExecutor>,
    io: T,
    addr: std::net::SocketAddr,
) -> Result<http2::SendRequest<AttemptBody>, SendError>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = builder.handshake(TokioIo::new(io)).await.map_err(|e| SendError::Connect(error_chain(&e)))?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(backend = %addr, "backend HTTP/2 connection ended: {e}");
        }
    });
    Ok(sender)
}

/// Once a tick: advance the clock, close connections idle for longer than their
/// upstream's `pool.idle_timeout`, forget closed ones. Ends with the pool.
async fn sweep(conns: std::sync::Weak<Conns>) {
    let mut interval = tokio::time::interval(TICK);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    interval.tick().await;
    loop {
        interval.tick().await;
        let Some(conns) = conns.upgrade() else { return };
        let now = conns.tick.fetch_add(1, Ordering::Relaxed).wrapping_add(1);
        let mut slots = conns.slots.lock().unwrap_or_else(|e| e.into_inner());
        for slot in slots.iter_mut() {
            let Some(t) = &slot.transport else { continue };
            let limit = t.idle_ticks;
            // Dropping a sender closes its idle connection.
            slot.idle.retain(|(s, used)| now.wrapping_sub(*used) <= limit && !s.is_closed());
            slot.h2.retain(|c| {
                !c.sender.is_closed()
                    && (c.streams.load(Ordering::Relaxed) > 0 || now.wrapping_sub(c.last_used) <= limit)
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::Source;

    fn upstream(yaml: &str) -> config::Upstream {
        serde_yaml::from_str(yaml).expect("valid upstream")
    }

    #[test]
    fn idle_timeout_rounds_up_to_whole_ticks() {
        let t = Transport::new(&upstream("backends: [{address: 127.0.0.1:1}]\npool: {idle_timeout: 1500ms}")).unwrap();
        assert_eq!(t.idle_ticks, 2);
        assert!(!t.is_h2());
        assert!(t.tls.is_none());
    }

    #[test]
    fn a_missing_ca_file_is_named() {
        let e = Transport::new(&upstream("backends: [{address: 127.0.0.1:1}]\ntls: {ca: /nonexistent/ca.pem}"))
            .unwrap_err();
        assert!(e.contains("/nonexistent/ca.pem"), "{e}");
    }

    #[test]
    fn h2_requests_are_absolute_with_the_host_as_authority() {
        let t = Transport::new(&upstream("backends: [{address: 127.0.0.1:1}]\nprotocol: h2c")).unwrap();
        let entry =
            BackendEntry::new("b".into(), "127.0.0.1:1".parse().unwrap(), String::new(), Vec::new(), Source::Static);
        let mut req = Request::new(super::super::body::RequestBody::Empty.attempt(&Arc::new(entry)));
        *req.uri_mut() = Uri::from_static("/svc/Method?x=1");
        req.headers_mut().insert(header::HOST, header::HeaderValue::from_static("api.example"));
        let entry =
            BackendEntry::new("b".into(), "127.0.0.1:1".parse().unwrap(), String::new(), Vec::new(), Source::Static);
        let req = h2_request(req, &t, &entry);
        assert_eq!(req.uri(), "http://api.example/svc/Method?x=1");
        assert!(req.headers().get(header::HOST).is_none());
        assert_eq!(req.headers()[header::TE], "trailers");
    }
}
