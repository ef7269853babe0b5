//! A backend whose response time can be changed while it runs: the way to make one
//! backend slow next to fast ones (a latency-aware strategy sees it per backend, which a
//! request path such as `/delay/MS` cannot do: that slows whichever backend gets it).
//!
//! Every request but `GET /healthz` waits the current delay, then gets `200` with the
//! backend's name as the body and in `x-backend`. Stopped when dropped.

use super::rt;
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::time::Duration;
use tokio::sync::oneshot;

/// A running backend with an adjustable delay.
pub struct TunableBackend {
    name: String,
    addr: SocketAddr,
    state: Arc<State>,
    stop: Option<oneshot::Sender<()>>,
}

struct State {
    name: String,
    delay_ms: AtomicU64,
    hits: AtomicUsize,
}

impl TunableBackend {
    /// Starts `name` on a free loopback port, answering at once.
    pub fn new(name: &str) -> TunableBackend {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State { name: name.to_owned(), delay_ms: AtomicU64::new(0), hits: AtomicUsize::new(0) });
        let listener = {
            let _enter = rt().enter();
            tokio::net::TcpListener::from_std(listener).unwrap()
        };
        let (stop, stop_rx) = oneshot::channel();
        rt().spawn(super::backend::accept_loop(listener, state.clone(), stop_rx, handle));
        TunableBackend { name: name.to_owned(), addr, state, stop: Some(stop) }
    }

    /// Its name (and the body of its answers).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// From now on, every request waits `delay` before its answer.
    pub fn set_delay(&self, delay: Duration) {
        self.state.delay_ms.store(delay.as_millis() as u64, Relaxed);
    }

    /// Requests received so far, `/healthz` excluded.
    pub fn hits(&self) -> usize {
        self.state.hits.load(Relaxed)
    }
}

impl Drop for TunableBackend {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

async fn handle(state: Arc<State>, req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    if req.uri().path() != "/healthz" {
        state.hits.fetch_add(1, Relaxed);
        let delay = state.delay_ms.load(Relaxed);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
    }
    let mut resp = Response::new(Full::new(Bytes::from(state.name.clone())));
    resp.headers_mut().insert("x-backend", state.name.parse().unwrap());
    Ok(resp)
}
