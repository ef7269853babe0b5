//! One health probe: a TCP connect, or an HTTP `GET` expecting a status range.

use crate::config::HealthCheck;
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;
use tokio::net::TcpStream;

/// Why a probe did not pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failed {
    /// The backend failed it: why.
    Backend(String),
    /// The gateway could not run it (out of file descriptors): says nothing about the
    /// backend.
    Local(String),
}

impl From<String> for Failed {
    fn from(s: String) -> Self {
        Failed::Backend(s)
    }
}

/// Probes `addr` once; `Err` says why it failed, and whose failure it was.
pub async fn probe(addr: SocketAddr, hc: &HealthCheck) -> Result<(), Failed> {
    match tokio::time::timeout(hc.timeout, probe_inner(addr, hc)).await {
        Ok(r) => r,
        Err(_) => Err(Failed::Backend(format!("no answer within {:?}", hc.timeout))),
    }
}

async fn probe_inner(addr: SocketAddr, hc: &HealthCheck) -> Result<(), Failed> {
    let stream = TcpStream::connect(addr).await.map_err(|e| {
        if crate::fds::is_exhausted(&e) {
            Failed::Local(format!("connect failed: {e}"))
        } else {
            Failed::Backend(format!("connect failed: {e}"))
        }
    })?;
    let Some(path) = &hc.path else { return Ok(()) };
    stream.set_nodelay(true).ok();
    let (mut sender, conn) = hyper::client::conn::http1::handshake::<_, Empty<bytes::Bytes>>(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    let conn = tokio::spawn(conn);
    let req = http::Request::get(path.as_str())
        .header(http::header::HOST, addr.to_string())
        .header(http::header::USER_AGENT, "gateway-health-check")
        .header(http::header::CONNECTION, "close")
        .body(Empty::new())
        .map_err(|e| e.to_string())?;
    let resp = sender.send_request(req).await.map_err(|e| format!("GET {path} failed: {e}"));
    conn.abort();
    let status = resp?.status().as_u16();
    let (lo, hi) = hc.expect_status;
    if (lo..=hi).contains(&status) {
        Ok(())
    } else {
        Err(Failed::Backend(format!("GET {path} answered {status}, expected {lo}-{hi}")))
    }
}
