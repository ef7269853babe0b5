//! The access-log line of one request: what the request path knows when the response
//! headers go out, completed with the body's bytes when the body ends (then the line is
//! handed to the non-blocking [`AccessLog`]).

use crate::access_log::{AccessLog, Entry, Names};
use crate::view::View;
use http::{HeaderValue, Method, Uri};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Instant, SystemTime};

/// A line waiting for its response body to end.
#[derive(Debug)]
pub struct Pending {
    pub(super) log: Arc<AccessLog>,
    pub(super) view: Arc<View>,
    /// Index of the route in `view`, or none (no route matched).
    pub(super) route: Option<usize>,
    pub(super) time: SystemTime,
    pub(super) started: Instant,
    pub(super) method: Method,
    pub(super) uri: Uri,
    pub(super) host: Option<HeaderValue>,
    pub(super) trace: super::trace::Trace,
    /// The client's IP as text (shared with the connection).
    pub(super) client: HeaderValue,
    pub(super) status: u16,
    pub(super) attempts: u32,
    pub(super) fallback: bool,
    /// Request body bytes passed to the backend (shared with the attempts).
    pub(super) bytes_in: Option<Arc<AtomicU64>>,
    pub(super) reason: Option<&'static str>,
    /// The failure behind a gateway-made 502/504 (backend id, address, OS error).
    pub(super) error: Option<String>,
    /// Which step of the strategy decided, and why.
    pub(super) why: Option<crate::select::Why>,
    /// The strategy that decided (the canary's, or the upstream's).
    pub(super) arm: crate::select::Arm,
}

impl Pending {
    /// Writes the line: the response went to the client from `backend` (its id, or
    /// none when the gateway answered itself) with `bytes_out` body bytes.
    pub fn record(&self, backend: Option<&str>, bytes_out: u64) {
        let route = self.route.and_then(|i| self.view.router.routes().get(i));
        let path = self.uri.path_and_query().map_or("/", |pq| pq.as_str());
        let host = self
            .uri
            .authority()
            .map(|a| a.as_str())
            .or_else(|| self.host.as_ref().and_then(|h| std::str::from_utf8(h.as_bytes()).ok()))
            .unwrap_or("-");
        let plugin = match (&self.why, route) {
            (Some(crate::select::Why::Step { step, .. }), Some(r)) => {
                r.upstream.selector_for(self.arm).step_log_name(*step)
            }
            _ => None,
        };
        self.log.record(&Entry {
            time: self.time,
            request_id: self.trace.request_id().as_bytes(),
            trace_id: Some(self.trace.id_hex()),
            client: self.client.as_bytes(),
            method: &self.method,
            host,
            path,
            status: self.status,
            names: route.map_or(Names::none(), |r| &r.log_names),
            backend: backend.unwrap_or("-"),
            attempts: self.attempts,
            fallback: self.fallback,
            bytes_in: self.bytes_in.as_ref().map_or(0, |b| b.load(Relaxed)),
            bytes_out,
            duration: self.started.elapsed(),
            reason: self.reason,
            error: self.error.as_deref(),
            plugin,
            decision_reason: self.why.as_ref().and_then(|w| w.reason()),
        });
    }
}
