//! `gateway register`: a sidecar that keeps one instance registered with a gateway's
//! embedded registry. It registers, heartbeats every third of the TTL, registers again
//! when a heartbeat gets `404` (the gateway restarted or the registration expired), and
//! deregisters on SIGTERM/SIGINT. A gateway that cannot be reached is tried again; the
//! sidecar only gives up on a registration the gateway refuses as invalid (`400`).

use anyhow::{Context as _, bail};
use bytes::Bytes;
use http::{Method, Request, StatusCode, Uri, header};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use std::collections::BTreeMap;
use std::time::Duration;

/// What to register, and where.
#[derive(Debug, Clone)]
pub struct Options {
    /// The gateway's admin listener, e.g. `http://127.0.0.1:9901`.
    pub registry: Uri,
    /// The upstream to join.
    pub upstream: String,
    /// This instance's id.
    pub id: String,
    /// Where the gateway should send requests, `host:port`.
    pub address: String,
    /// Registration TTL; heartbeats come every third of it.
    pub ttl: Duration,
    /// Relative weight.
    pub weight: u32,
    /// Zone or region.
    pub zone: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Bearer token (the registry token, or the admin token).
    pub token: Option<String>,
}

/// An answer of the registry: status and body.
struct Answer {
    status: StatusCode,
    body: String,
}

impl Options {
    fn url(&self, tail: &str) -> String {
        format!("/api/registry/{}/{}{tail}", self.upstream, self.id)
    }

    fn body(&self) -> String {
        serde_json::json!({
            "address": self.address,
            "weight": self.weight,
            "zone": self.zone,
            "labels": self.labels,
            "ttl": format!("{}ms", self.ttl.as_millis()),
        })
        .to_string()
    }

    async fn call(&self, method: Method, path: &str, body: Option<String>) -> anyhow::Result<Answer> {
        let authority = self.registry.authority().context("the registry URL has no host:port")?.clone();
        let stream = tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(authority.as_str()))
            .await
            .map_err(|_| anyhow::anyhow!("connecting to {authority} timed out"))?
            .with_context(|| format!("cannot connect to {authority}"))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        let conn = tokio::spawn(conn);
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, authority.as_str())
            .header(header::USER_AGENT, "gateway-register");
        if let Some(t) = &self.token {
            req = req.header(header::AUTHORIZATION, format!("Bearer {t}"));
        }
        if body.is_some() {
            req = req.header(header::CONTENT_TYPE, "application/json");
        }
        let req = req.body(Full::new(Bytes::from(body.unwrap_or_default())))?;
        let answer = tokio::time::timeout(Duration::from_secs(10), async {
            let resp = sender.send_request(req).await?;
            let status = resp.status();
            let body = resp.into_body().collect().await?.to_bytes();
            anyhow::Ok(Answer { status, body: String::from_utf8_lossy(&body).trim().to_owned() })
        })
        .await
        .map_err(|_| anyhow::anyhow!("no answer from {authority} within 10s"))?;
        conn.abort();
        answer
    }

    async fn register(&self) -> anyhow::Result<Answer> {
        self.call(Method::PUT, &self.url(""), Some(self.body())).await
    }
}

/// Runs the sidecar until SIGTERM/SIGINT; then deregisters.
pub fn run(opts: Options) -> anyhow::Result<()> {
    if opts.registry.scheme_str() != Some("http") || opts.registry.authority().is_none() {
        bail!("--registry {}: expected the gateway's admin listener as http://HOST:PORT", opts.registry);
    }
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let every = (opts.ttl / 3).max(Duration::from_millis(100));
        let (up, id) = (opts.upstream.as_str(), opts.id.as_str());
        let mut registered = false;
        let mut retry = Duration::from_millis(250);
        loop {
            let wait = if !registered {
                match opts.register().await {
                    Ok(a) if a.status.is_success() => {
                        tracing::info!(upstream = up, backend = id, address = %opts.address, ttl = ?opts.ttl, "registered");
                        registered = true;
                        retry = Duration::from_millis(250);
                        every
                    }
                    Ok(a) if a.status == StatusCode::BAD_REQUEST || a.status == StatusCode::UNAUTHORIZED => {
                        bail!("the registry refused the registration ({}): {}", a.status, a.body)
                    }
                    Ok(a) => {
                        tracing::warn!(upstream = up, backend = id, status = a.status.as_u16(), "registration refused, trying again in {retry:?}: {}", a.body);
                        retry = (retry * 2).min(every);
                        retry
                    }
                    Err(e) => {
                        tracing::warn!(upstream = up, backend = id, "registration failed, trying again in {retry:?}: {e:#}");
                        retry = (retry * 2).min(every);
                        retry
                    }
                }
            } else {
                match opts.call(Method::PUT, &opts.url("/heartbeat"), None).await {
                    Ok(a) if a.status.is_success() => every,
                    Ok(a) if a.status == StatusCode::NOT_FOUND => {
                        tracing::warn!(upstream = up, backend = id, "the registry no longer knows this instance (gateway restarted, or the registration expired): registering again");
                        registered = false;
                        Duration::ZERO
                    }
                    Ok(a) => {
                        tracing::warn!(upstream = up, backend = id, status = a.status.as_u16(), "heartbeat refused: {}", a.body);
                        every
                    }
                    Err(e) => {
                        tracing::warn!(upstream = up, backend = id, "heartbeat failed: {e:#}");
                        every
                    }
                }
            };
            let signal = tokio::select! {
                _ = tokio::time::sleep(wait) => continue,
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
            };
            if registered {
                match opts.call(Method::DELETE, &opts.url(""), None).await {
                    Ok(a) if a.status.is_success() || a.status == StatusCode::NOT_FOUND => {
                        tracing::info!(upstream = up, backend = id, signal, "deregistered")
                    }
                    Ok(a) => tracing::warn!(upstream = up, backend = id, signal, "deregistration refused ({}): {}", a.status, a.body),
                    Err(e) => tracing::warn!(upstream = up, backend = id, signal, "deregistration failed: {e:#}; the registration expires after its TTL"),
                }
            }
            return Ok(());
        }
    })
}
