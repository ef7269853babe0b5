//! A browser-like client for the strategy tests: it connects from a chosen loopback
//! address (the whole of `127.0.0.0/8` is local on Linux, so each test client can have
//! its own client IP), sends fixed extra headers, and keeps the cookies that responses
//! set (a minimal jar: `name=value` only; attributes such as `Max-Age` are ignored).
//!
//! Every request goes on a fresh HTTP/1.1 connection and is bounded by
//! [`super::client::TIMEOUT`].

use super::client::TIMEOUT;
use super::{Reply, rt};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper::{Request, header};
use hyper_util::rt::TokioIo;
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use tokio::net::TcpSocket;

/// One client: a source address, extra headers and a cookie jar.
#[derive(Debug, Clone)]
pub struct Browser {
    gateway: SocketAddr,
    source: IpAddr,
    headers: Vec<(String, String)>,
    jar: BTreeMap<String, String>,
}

impl Browser {
    /// A client of `gateway`, connecting from `127.0.0.1`, with no cookies.
    pub fn new(gateway: SocketAddr) -> Browser {
        Browser { gateway, source: IpAddr::V4(Ipv4Addr::LOCALHOST), headers: Vec::new(), jar: BTreeMap::new() }
    }

    /// Connects from `ip` instead (a loopback address, e.g. `127.0.1.7`), so the gateway
    /// sees that client IP.
    pub fn with_client_ip(mut self, ip: impl Into<IpAddr>) -> Browser {
        let ip = ip.into();
        assert!(ip.is_loopback(), "{ip} is not a loopback address: the tests only use local addresses");
        self.source = ip;
        self
    }

    /// Sends `name: value` with every request.
    pub fn with_header(mut self, name: &str, value: &str) -> Browser {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }

    /// The client IP the gateway sees.
    pub fn ip(&self) -> IpAddr {
        self.source
    }

    /// The value of cookie `name` in the jar.
    pub fn cookie(&self, name: &str) -> Option<&str> {
        self.jar.get(name).map(String::as_str)
    }

    /// `GET path` with the extra headers and the jar's cookies; stores the cookies the
    /// response sets.
    pub fn get(&mut self, path: &str) -> Result<Reply, String> {
        let mut req = Request::get(path)
            .header(header::HOST, self.gateway.to_string())
            .body(Full::new(Bytes::new()))
            .expect("a valid request");
        for (name, value) in &self.headers {
            let name = header::HeaderName::from_bytes(name.as_bytes()).expect("a valid header name");
            req.headers_mut().append(name, value.parse().expect("a valid header value"));
        }
        if !self.jar.is_empty() {
            let line: Vec<String> = self.jar.iter().map(|(k, v)| format!("{k}={v}")).collect();
            req.headers_mut().insert(header::COOKIE, line.join("; ").parse().expect("a valid cookie header"));
        }
        let (source, gateway) = (self.source, self.gateway);
        let reply = rt()
            .block_on(async { tokio::time::timeout(TIMEOUT, send(source, gateway, req)).await })
            .map_err(|_| format!("GET {path} from {source}: no answer within {TIMEOUT:?}"))??;
        for (name, value) in set_cookies(&reply) {
            self.jar.insert(name, value);
        }
        Ok(reply)
    }
}

/// The `(name, value)` of every `Set-Cookie` of `reply`, in order.
pub fn set_cookies(reply: &Reply) -> Vec<(String, String)> {
    reply
        .headers
        .get_all(header::SET_COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .filter_map(|v| {
            let pair = v.split(';').next()?.trim();
            let (name, value) = pair.split_once('=')?;
            Some((name.trim().to_owned(), value.trim().to_owned()))
        })
        .collect()
}

async fn send(source: IpAddr, gateway: SocketAddr, req: Request<Full<Bytes>>) -> Result<Reply, String> {
    let socket = match source {
        IpAddr::V4(_) => TcpSocket::new_v4(),
        IpAddr::V6(_) => TcpSocket::new_v6(),
    }
    .map_err(|e| format!("socket: {e}"))?;
    socket.bind(SocketAddr::new(source, 0)).map_err(|e| format!("bind {source}: {e}"))?;
    let stream = socket.connect(gateway).await.map_err(|e| format!("connect {source} -> {gateway}: {e}"))?;
    let _ = stream.set_nodelay(true);
    let (mut sender, conn) = http1::handshake(TokioIo::new(stream)).await.map_err(|e| format!("handshake: {e}"))?;
    tokio::spawn(conn);
    let resp = sender.send_request(req).await.map_err(|e| format!("request from {source}: {e}"))?;
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
