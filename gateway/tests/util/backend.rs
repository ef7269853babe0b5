//! A real HTTP/1.1 backend on `127.0.0.1`, answering with its own name.
//!
//! Routes:
//! - `GET /healthz` → `200 ok`
//! - `GET /big` → [`BIG_BYTES`] pattern bytes, generated chunk by chunk
//! - `POST /upload` → reads the streamed body, answers the byte count (`422` if a byte
//!   is out of pattern)
//! - `GET /delay/MS` → waits MS milliseconds, then answers with the name
//! - anything else → `200`, body = the name
//!
//! Every answer carries `x-backend: NAME`, plus `x-seen-version` and `x-seen-host`
//! (what the backend received). [`Backend::failing`] answers every request but
//! `/healthz` with an error status instead, after reading the request body.
//! [`Backend::slow`] waits a fixed time before answering every request but `/healthz`.

use super::{PatternBody, matches_pattern, rt};
use bytes::Bytes;
use http_body_util::{BodyExt, Either, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;
use tokio::task::{JoinHandle, JoinSet};

/// Size of the `GET /big` response: 100 MiB.
pub const BIG_BYTES: u64 = 100 * 1024 * 1024;

/// One request a backend received (recorded when it arrives, before answering).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hit {
    /// `GET`, `POST`, ...
    pub method: String,
    /// Path and query.
    pub path: String,
    /// The request headers as the backend received them.
    pub headers: hyper::HeaderMap,
}

/// A test backend; stopped when dropped.
pub struct Backend {
    name: String,
    addr: SocketAddr,
    state: Arc<State>,
    running: Mutex<Option<Running>>,
}

struct State {
    name: String,
    fail_status: Option<StatusCode>,
    /// Added before every answer but `/healthz`.
    latency: Duration,
    hits: Mutex<Vec<Hit>>,
}

struct Running {
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

type Body = Either<Full<Bytes>, PatternBody>;

impl Backend {
    /// Starts a backend called `name` on a free loopback port.
    pub fn new(name: &str) -> Backend {
        Self::launch(name, None, Duration::ZERO)
    }

    /// A backend that answers `status` to every request except `GET /healthz`.
    pub fn failing(name: &str, status: u16) -> Backend {
        Self::launch(name, Some(StatusCode::from_u16(status).expect("a valid status")), Duration::ZERO)
    }

    /// A backend that waits `latency` before answering any request but `GET /healthz`
    /// (so the gateway measures that latency for it).
    pub fn slow(name: &str, latency: Duration) -> Backend {
        Self::launch(name, None, latency)
    }

    /// A backend listening on `addr` (e.g. another loopback address with a given port),
    /// or why it cannot.
    pub fn bind(name: &str, addr: SocketAddr) -> std::io::Result<Backend> {
        let listener = std::net::TcpListener::bind(addr)?;
        Ok(Self::with_listener(name, listener, None, Duration::ZERO))
    }

    fn launch(name: &str, fail_status: Option<StatusCode>, latency: Duration) -> Backend {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
        Self::with_listener(name, listener, fail_status, latency)
    }

    fn with_listener(
        name: &str,
        listener: std::net::TcpListener,
        fail_status: Option<StatusCode>,
        latency: Duration,
    ) -> Backend {
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State { name: name.to_owned(), fail_status, latency, hits: Mutex::new(Vec::new()) });
        let backend = Backend { name: name.to_owned(), addr, state, running: Mutex::new(None) };
        backend.serve(listener);
        backend
    }

    /// Its name (and the body of its answers).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The requests it received so far, `/healthz` excluded.
    pub fn hits(&self) -> Vec<Hit> {
        self.state.hits.lock().unwrap().clone()
    }

    /// How many requests with this method it received.
    pub fn hits_with_method(&self, method: &str) -> usize {
        self.hits().iter().filter(|h| h.method == method).count()
    }

    /// Closes the listener and every live connection (like a crash), and returns
    /// once they are closed. A no-op when stopped.
    pub fn stop(&self) {
        let Some(running) = self.running.lock().unwrap().take() else { return };
        let _ = running.stop.send(());
        rt().block_on(async {
            tokio::time::timeout(Duration::from_secs(10), running.task)
                .await
                .expect("the backend stops within 10s")
                .expect("the backend task ends cleanly");
        });
    }

    /// Listens again on the same port after [`Backend::stop`]. A no-op when running.
    pub fn start(&self) {
        if self.running.lock().unwrap().is_some() {
            return;
        }
        // The port can be briefly taken (e.g. as the source port of an outgoing
        // connection): retry for a bounded time.
        let deadline = Instant::now() + Duration::from_secs(5);
        let listener = loop {
            match std::net::TcpListener::bind(self.addr) {
                Ok(l) => break l,
                Err(e) if Instant::now() < deadline => {
                    eprintln!("rebinding {} failed ({e}); retrying", self.addr);
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => panic!("cannot listen on {} again: {e}", self.addr),
            }
        };
        self.serve(listener);
    }

    fn serve(&self, listener: std::net::TcpListener) {
        listener.set_nonblocking(true).unwrap();
        let listener = {
            let _enter = rt().enter();
            tokio::net::TcpListener::from_std(listener).unwrap()
        };
        let (stop, stop_rx) = oneshot::channel();
        let task = rt().spawn(accept_loop(listener, self.state.clone(), stop_rx, handle));
        *self.running.lock().unwrap() = Some(Running { stop, task });
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Serves HTTP/1.1 on `listener` with `handle` until `stop` fires, then closes the
/// listener and every open connection (like a crashed server). Shared by the test backends.
pub(super) async fn accept_loop<S, H, Fut, B>(
    listener: tokio::net::TcpListener,
    state: Arc<S>,
    mut stop: oneshot::Receiver<()>,
    handle: H,
) where
    S: Send + Sync + 'static,
    H: Fn(Arc<S>, Request<Incoming>) -> Fut + Copy + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<Response<B>, Infallible>> + Send + 'static,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            _ = &mut stop => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let _ = stream.set_nodelay(true);
                    let state = state.clone();
                    let service = service_fn(move |req| handle(state.clone(), req));
                    conns.spawn(async move {
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    });
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    drop(listener);
    conns.abort_all();
    while conns.join_next().await.is_some() {}
}

async fn handle(state: Arc<State>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let method = req.method().clone();
    let path = req.uri().path_and_query().map(|p| p.as_str().to_owned()).unwrap_or_default();
    let seen_version = format!("{:?}", req.version());
    let seen_host = req.headers().get(hyper::header::HOST).and_then(|h| h.to_str().ok()).unwrap_or("").to_owned();
    if path != "/healthz" {
        state.hits.lock().unwrap().push(Hit {
            method: method.to_string(),
            path: path.clone(),
            headers: req.headers().clone(),
        });
        if !state.latency.is_zero() {
            tokio::time::sleep(state.latency).await;
        }
    }
    let text = |status: StatusCode, body: String| (status, Either::Left(Full::new(Bytes::from(body))));

    let (status, body) = if path == "/healthz" {
        text(StatusCode::OK, "ok".into())
    } else if let Some(fail) = state.fail_status {
        // Read the whole request first, so the error is about the status only.
        let _ = req.into_body().collect().await;
        text(fail, format!("{} failed", state.name))
    } else if method == hyper::Method::GET && path == "/big" {
        (StatusCode::OK, Either::Right(PatternBody::sized(super::BIG_BYTES)))
    } else if method == hyper::Method::POST && path == "/upload" {
        let mut body = req.into_body();
        let mut count: u64 = 0;
        let mut bad_at: Option<u64> = None;
        while let Some(frame) = body.frame().await {
            let Ok(frame) = frame else {
                return Ok(plain(StatusCode::BAD_REQUEST, format!("body broke off after {count} bytes"), &state.name));
            };
            if let Ok(data) = frame.into_data() {
                if bad_at.is_none() && !matches_pattern(count, &data) {
                    bad_at = Some(count);
                }
                count += data.len() as u64;
            }
        }
        match bad_at {
            None => text(StatusCode::OK, count.to_string()),
            Some(at) => text(StatusCode::UNPROCESSABLE_ENTITY, format!("{count} bytes, out of pattern near byte {at}")),
        }
    } else if let Some(ms) = path.strip_prefix("/delay/").and_then(|ms| ms.parse::<u64>().ok()) {
        tokio::time::sleep(Duration::from_millis(ms)).await;
        text(StatusCode::OK, state.name.clone())
    } else {
        text(StatusCode::OK, state.name.clone())
    };
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    let headers = resp.headers_mut();
    headers.insert("x-backend", state.name.parse().unwrap());
    headers.insert("x-seen-version", seen_version.parse().unwrap());
    if let Ok(host) = seen_host.parse() {
        headers.insert("x-seen-host", host);
    }
    Ok(resp)
}

fn plain(status: StatusCode, body: String, name: &str) -> Response<Body> {
    let mut resp = Response::new(Either::Left(Full::new(Bytes::from(body))));
    *resp.status_mut() = status;
    resp.headers_mut().insert("x-backend", name.parse().unwrap());
    resp
}
