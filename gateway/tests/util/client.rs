//! A small HTTP client for the tests (hyper's connection-level API): one request per
//! fresh connection, a keep-alive connection, streamed upload and download, and HTTP/2
//! with prior knowledge (h2c). Every call is bounded by [`TIMEOUT`].

use super::{PatternBody, matches_pattern, rt};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper::{HeaderMap, Request, Response, Version};
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::TcpStream;

/// Longest any one client call may take.
pub const TIMEOUT: Duration = Duration::from_secs(60);

/// A complete response.
#[derive(Debug, Clone)]
pub struct Reply {
    /// Status code.
    pub status: u16,
    /// Response headers.
    pub headers: HeaderMap,
    /// HTTP version of the response.
    pub version: Version,
    /// Body, as (lossy) UTF-8.
    pub body: String,
    /// Body, as received (for binary answers).
    pub raw: Bytes,
}

impl Reply {
    /// A header's value, or `""`.
    pub fn header(&self, name: &str) -> &str {
        self.headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or("")
    }
}

/// What a streamed download received.
#[derive(Debug, Clone)]
pub struct Download {
    /// Status code.
    pub status: u16,
    /// Body bytes received.
    pub bytes: u64,
    /// Every byte matched the pattern (see [`super::PatternBody`]).
    pub pattern_ok: bool,
}

fn block<F: Future>(what: &str, f: F) -> Result<F::Output, String> {
    rt().block_on(async { tokio::time::timeout(TIMEOUT, f).await })
        .map_err(|_| format!("{what}: no answer within {TIMEOUT:?}"))
}

async fn connect(addr: SocketAddr) -> Result<TokioIo<TcpStream>, String> {
    let stream = TcpStream::connect(addr).await.map_err(|e| format!("connect to {addr}: {e}"))?;
    let _ = stream.set_nodelay(true);
    Ok(TokioIo::new(stream))
}

async fn send_h1<B>(addr: SocketAddr, req: Request<B>) -> Result<Response<Incoming>, String>
where
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let (mut sender, conn) = http1::handshake(connect(addr).await?).await.map_err(|e| format!("handshake: {e}"))?;
    tokio::spawn(conn);
    sender.send_request(req).await.map_err(|e| format!("request to {addr}: {e}"))
}

async fn into_reply(resp: Response<Incoming>) -> Result<Reply, String> {
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.map_err(|e| format!("reading the body: {e}"))?.to_bytes();
    Ok(Reply {
        status: parts.status.as_u16(),
        headers: parts.headers,
        version: parts.version,
        body: String::from_utf8_lossy(&body).into_owned(),
        raw: body,
    })
}

fn build(addr: SocketAddr, method: &str, path: &str, body: Option<&str>) -> Request<Full<Bytes>> {
    Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, addr.to_string())
        .body(Full::new(Bytes::from(body.unwrap_or("").to_owned())))
        .expect("a valid request")
}

/// `METHOD path` with an optional body, on a fresh HTTP/1.1 connection.
pub fn request(addr: SocketAddr, method: &str, path: &str, body: Option<&str>) -> Result<Reply, String> {
    let req = build(addr, method, path, body);
    block(&format!("{method} {path}"), async { into_reply(send_h1(addr, req).await?).await })?
}

/// `METHOD path` with extra request headers, on a fresh HTTP/1.1 connection.
pub fn request_with_headers(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<Reply, String> {
    request_full(addr, method, path, headers, None)
}

/// `METHOD path` with extra request headers and an optional body, on a fresh connection.
pub fn request_full(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> Result<Reply, String> {
    let mut req = build(addr, method, path, body);
    for (name, value) in headers {
        let name = hyper::header::HeaderName::from_bytes(name.as_bytes()).expect("a valid header name");
        req.headers_mut().append(name, value.parse().expect("a valid header value"));
    }
    block(&format!("{method} {path}"), async { into_reply(send_h1(addr, req).await?).await })?
}

/// `GET path` on a fresh connection: (status, body), or why it failed.
pub fn try_get(addr: SocketAddr, path: &str) -> Result<(u16, String), String> {
    request(addr, "GET", path, None).map(|r| (r.status, r.body))
}

/// `GET path` on a fresh connection: (status, body). Panics if there is no answer.
pub fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    try_get(addr, path).unwrap_or_else(|e| panic!("GET http://{addr}{path}: {e}"))
}

/// One keep-alive HTTP/1.1 connection, for several requests in a row.
pub struct KeepAlive {
    addr: SocketAddr,
    sender: http1::SendRequest<Full<Bytes>>,
}

impl KeepAlive {
    /// Opens the connection.
    pub fn open(addr: SocketAddr) -> Result<KeepAlive, String> {
        let sender = block("connect", async {
            let (sender, conn) = http1::handshake(connect(addr).await?).await.map_err(|e| format!("handshake: {e}"))?;
            tokio::spawn(conn);
            Ok::<_, String>(sender)
        })??;
        Ok(KeepAlive { addr, sender })
    }

    /// `GET path` on this connection.
    pub fn get(&mut self, path: &str) -> Result<Reply, String> {
        self.send("GET", path, &[], None)
    }

    /// `METHOD path` with extra headers and an optional body, on this connection.
    pub fn send(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&str>,
    ) -> Result<Reply, String> {
        let mut req = build(self.addr, method, path, body);
        for (name, value) in headers {
            let name = hyper::header::HeaderName::from_bytes(name.as_bytes()).expect("a valid header name");
            req.headers_mut().append(name, value.parse().expect("a valid header value"));
        }
        let sender = &mut self.sender;
        block(&format!("{method} {path}"), async {
            sender.ready().await.map_err(|e| format!("connection closed: {e}"))?;
            into_reply(sender.send_request(req).await.map_err(|e| e.to_string())?).await
        })?
    }
}

/// `POST path` with a body of `bytes` pattern bytes, streamed chunked (generated on the
/// fly, never held whole).
pub fn upload(addr: SocketAddr, path: &str, bytes: u64) -> Result<Reply, String> {
    let req = Request::builder()
        .method("POST")
        .uri(path)
        .header(hyper::header::HOST, addr.to_string())
        .body(PatternBody::chunked(bytes))
        .expect("a valid request");
    block(&format!("POST {path}"), async { into_reply(send_h1(addr, req).await?).await })?
}

/// `GET path`, reading the body frame by frame: counts the bytes and checks the pattern.
pub fn download(addr: SocketAddr, path: &str) -> Result<Download, String> {
    let req = build(addr, "GET", path, None);
    block(&format!("GET {path}"), async {
        let resp = send_h1(addr, req).await?;
        let status = resp.status().as_u16();
        let mut body = resp.into_body();
        let (mut bytes, mut pattern_ok) = (0u64, true);
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| format!("body broke off after {bytes} bytes: {e}"))?;
            if let Ok(data) = frame.into_data() {
                pattern_ok &= matches_pattern(bytes, &data);
                bytes += data.len() as u64;
            }
        }
        Ok(Download { status, bytes, pattern_ok })
    })?
}

/// `GET path` over HTTP/2 with prior knowledge (h2c, no upgrade).
pub fn get_h2c(addr: SocketAddr, path: &str) -> Result<Reply, String> {
    block(&format!("h2c GET {path}"), async {
        let (mut sender, conn) = http2::handshake(TokioExecutor::new(), connect(addr).await?)
            .await
            .map_err(|e| format!("h2 handshake: {e}"))?;
        tokio::spawn(conn);
        let req = Request::builder()
            .uri(format!("http://{addr}{path}"))
            .version(Version::HTTP_2)
            .body(Full::new(Bytes::new()))
            .expect("a valid request");
        into_reply(sender.send_request(req).await.map_err(|e| format!("h2 request: {e}"))?).await
    })?
}
