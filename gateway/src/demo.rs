//! `gateway demo`: three built-in book-store backends (the Ballerina load-balancing
//! guide's scenario) behind the gateway, with the Wasm round robin and health checks.
//! The admin API can stop and start each backend, to watch failover:
//!
//! - `POST /demo/backends/{n}/stop` — closes backend `n`'s listener and connections
//! - `POST /demo/backends/{n}/start` — brings it back on the same port

use crate::admin::{AdminResponse, Extension, json_response};
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::json;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Mutex;
use tokio_util::sync::CancellationToken;

/// A few books, so answers look like a real catalog.
const CATALOG: &[(&str, &str, &str)] = &[
    ("dune", "Dune", "Frank Herbert"),
    ("emma", "Emma", "Jane Austen"),
    ("ulysses", "Ulysses", "James Joyce"),
    ("beloved", "Beloved", "Toni Morrison"),
    ("solaris", "Solaris", "Stanisław Lem"),
];

/// The demo's backends, running on their own event-loop thread.
pub struct DemoBackends {
    runtime: tokio::runtime::Handle,
    backends: Vec<Backend>,
}

struct Backend {
    name: String,
    addr: SocketAddr,
    running: Mutex<Option<CancellationToken>>,
}

impl DemoBackends {
    /// Starts `count` backends on free loopback ports.
    pub fn start(count: usize) -> anyhow::Result<Self> {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let runtime = rt.handle().clone();
        std::thread::Builder::new().name("demo-backends".into()).spawn(move || {
            rt.block_on(std::future::pending::<()>());
        })?;
        let mut backends = Vec::new();
        for i in 1..=count {
            let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
            let addr = listener.local_addr()?;
            let b = Backend { name: format!("backend-{i}"), addr, running: Mutex::new(None) };
            b.serve(&runtime, listener)?;
            backends.push(b);
        }
        Ok(DemoBackends { runtime, backends })
    }

    /// Their addresses, in order.
    pub fn addrs(&self) -> Vec<SocketAddr> {
        self.backends.iter().map(|b| b.addr).collect()
    }

    fn set_running(&self, n: usize, run: bool) -> Result<String, (StatusCode, String)> {
        let b = self
            .backends
            .get(n.wrapping_sub(1))
            .ok_or((StatusCode::NOT_FOUND, format!("no demo backend {n} (there are {})", self.backends.len())))?;
        let mut running = b.running.lock().unwrap_or_else(|e| e.into_inner());
        match (run, running.take()) {
            (false, Some(token)) => {
                token.cancel();
                tracing::info!(backend = %b.name, address = %b.addr, "demo backend stopped");
                Ok("stopped".into())
            }
            (false, None) => Ok("already stopped".into()),
            (true, Some(token)) => {
                *running = Some(token);
                Ok("already running".into())
            }
            (true, None) => {
                drop(running);
                let socket = crate::server::bind(b.addr, 1)
                    .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")))?;
                b.serve(&self.runtime, socket.into_iter().next().expect("one socket"))
                    .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
                tracing::info!(backend = %b.name, address = %b.addr, "demo backend started");
                Ok("started".into())
            }
        }
    }
}

impl Backend {
    fn serve(&self, rt: &tokio::runtime::Handle, listener: std::net::TcpListener) -> std::io::Result<()> {
        listener.set_nonblocking(true)?;
        let token = CancellationToken::new();
        *self.running.lock().unwrap_or_else(|e| e.into_inner()) = Some(token.clone());
        let name = self.name.clone();
        rt.spawn(async move {
            let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
                return;
            };
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let stream = tokio::select! {
                    _ = token.cancelled() => break,
                    a = listener.accept() => match a { Ok((s, _)) => s, Err(_) => continue },
                };
                let name = name.clone();
                let service = service_fn(move |req: Request<Incoming>| {
                    let name = name.clone();
                    async move { Ok::<_, Infallible>(book_store(&name, &req)) }
                });
                conns.spawn(async move {
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
            // Stopping closes live keep-alive connections too, like a crashed server.
            conns.abort_all();
        });
        Ok(())
    }
}

/// `GET /book/{name}` → JSON naming the book and the backend that served it.
fn book_store(backend: &str, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    let (status, body) = if path == "/healthz" {
        (StatusCode::OK, json!({"status": "ok", "served_by": backend}))
    } else if let Some(name) = path.strip_prefix("/book/").filter(|n| !n.is_empty() && !n.contains('/')) {
        match CATALOG.iter().find(|(id, _, _)| id.eq_ignore_ascii_case(name)) {
            Some((id, title, author)) => (
                StatusCode::OK,
                json!({"book": id, "title": title, "author": author, "status": "available", "served_by": backend}),
            ),
            None => (StatusCode::OK, json!({"book": name, "status": "not in catalog", "served_by": backend})),
        }
    } else {
        (StatusCode::NOT_FOUND, json!({"error": "try GET /book/{name}, e.g. /book/dune", "served_by": backend}))
    };
    let mut resp = Response::new(Full::new(Bytes::from(format!("{body}\n"))));
    *resp.status_mut() = status;
    resp.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("application/json"));
    resp
}

impl Extension for DemoBackends {
    fn handle(&self, method: &Method, path: &str) -> Option<AdminResponse> {
        let rest = path.strip_prefix("/demo/backends/")?;
        let (n, action) = rest.split_once('/')?;
        if method != Method::POST || !matches!(action, "stop" | "start") {
            return None;
        }
        let Ok(n) = n.parse::<usize>() else {
            return Some(json_response(
                StatusCode::BAD_REQUEST,
                json!({"error": format!("`{n}` is not a backend number")}),
            ));
        };
        Some(match self.set_running(n, action == "start") {
            Ok(state) => json_response(StatusCode::OK, json!({"backend": n, "state": state})),
            Err((status, error)) => json_response(status, json!({"error": error})),
        })
    }
}
