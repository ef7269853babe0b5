//! The proxy: route a request, ask the selector for a backend, forward it, retry on
//! another backend when that is safe, and report the outcome to the pool stats.
//!
//! Reads the pool; never writes it (failures go to `health` through a channel).

mod body;
mod budget;
mod conns;
mod grpc;
mod headers;
mod log;
pub mod trace;

pub use body::{RequestBody, ResponseBody};
pub use budget::RetryBudget;
pub use conns::{Conns, Transport};

use crate::health::Reporter;
use crate::metrics::{self, Generated, RetryReason};
use crate::pool::BackendStats;
use crate::select::{Arm, Choice, Live, Why};
use crate::upstream::Upstream;
use crate::view::View;
use arc_swap::ArcSwap;
use body::Replayable;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, Uri, header};
use http_body::Body as _;
use hyper::body::Incoming;
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

/// How many times one request is sent again after a backend refused it unprocessed
/// (HTTP/2 GOAWAY, REFUSED_STREAM): enough for a few connections closing at once, and a
/// bound against a backend that refuses every stream.
const MAX_RESENDS: u32 = 3;

/// The client end of one connection, shared by its requests.
#[derive(Debug)]
pub struct ClientConn {
    /// The client's address.
    pub peer: SocketAddr,
    /// Its IP as a header value, for `X-Forwarded-For`.
    ip: http::HeaderValue,
    /// It came over TLS (`X-Forwarded-Proto: https`).
    pub https: bool,
    /// The listener's `limits.body_timeout`.
    body_timeout: Duration,
}

impl ClientConn {
    /// Describes the (plaintext) connection from `peer`; request bodies that stall for
    /// `body_timeout` are cut.
    pub fn new(peer: SocketAddr, body_timeout: Duration) -> Self {
        ClientConn { peer, ip: headers::ip_value(peer.ip()), https: false, body_timeout }
    }

    /// The same, for a connection that came over TLS.
    pub fn tls(mut self) -> Self {
        self.https = true;
        self
    }
}

/// Everything a request needs, shared by all worker threads.
#[derive(Debug)]
pub struct Proxy {
    /// Routes and upstreams; a config reload swaps in a new view.
    pub view: ArcSwap<View>,
    /// Where passive-health failures are reported.
    pub reporter: Reporter,
    /// One line per request, written off the worker; none: off.
    pub access_log: Option<Arc<crate::access_log::AccessLog>>,
    /// The admin token: a client carrying it as a bearer may ask `X-Gateway-Debug: 1`
    /// from anywhere (without it, only from a loopback address).
    pub debug_token: Option<Box<[u8]>>,
}

/// Per-request context for the access log and metrics.
struct Outcome {
    attempts: u32,
    fallback: bool,
    /// Why the gateway answered itself, if it did.
    generated: Option<Generated>,
    /// The W3C trace (continued or started here) and the request id.
    trace: trace::Trace,
    /// Request body bytes sent, when there is a body.
    bytes_in: Option<Arc<std::sync::atomic::AtomicU64>>,
    /// What went wrong, for the access log only (clients get a generic body).
    error: Option<String>,
    /// Which step of the strategy decided, and why (the last attempt's decision).
    why: Option<Why>,
    /// Which strategy decided: the canary's or the upstream's (counted per arm when the
    /// upstream has a canary).
    arm: Arm,
    /// The client asked `X-Gateway-Debug: 1` and may: the backend that served goes
    /// here (the only allocation the debug header costs, and only then). Noticed while
    /// the headers are copied for the backend (or, for a rejection, looked up then).
    debug: Option<Option<String>>,
}

impl Proxy {
    /// The current view (routes, upstreams).
    pub fn view(&self) -> Arc<View> {
        self.view.load_full()
    }

    /// Handles one client request end to end. Never fails: errors become responses.
    pub async fn handle(
        &self,
        conns: &Arc<Conns>,
        req: Request<Incoming>,
        conn: &ClientConn,
    ) -> Response<ResponseBody> {
        let counting = metrics::enabled();
        let global = metrics::global().local();
        if counting {
            global.requests.inc();
            global.in_flight.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        let started = Instant::now();
        let time = self.access_log.as_ref().map(|_| std::time::SystemTime::now());
        // Kept for the access log (the path as the client sent it); clones share the
        // parsed bytes instead of copying them.
        let (method, uri) = (req.method().clone(), req.uri().clone());
        let host_header = self.access_log.as_ref().and_then(|_| req.headers().get(header::HOST).cloned());
        let grpc = grpc::is_call(req.version(), req.headers());
        let mut outcome = Outcome {
            attempts: 0,
            fallback: false,
            generated: None,
            trace: trace::Trace::from_client(req.headers()),
            bytes_in: None,
            error: None,
            why: None,
            arm: Arm::Live,
            debug: None,
        };
        // Routed and forwarded with dot-segments removed; encoded slashes are refused.
        let normal = crate::router::normalize_path(uri.path()).map(|p| match p {
            std::borrow::Cow::Borrowed(_) => None,
            std::borrow::Cow::Owned(p) => Some(p),
        });
        let mut req = req;
        let bad_request = match normal {
            Ok(None) => None,
            Ok(Some(p)) => {
                set_path(req.uri_mut(), &p);
                None
            }
            Err(e) => Some(BadRequest::Path(e)),
        };
        // RFC 9112 §3.2: several Host lines get 400 (a router and a backend could each
        // read a different one).
        // One lookup serves both this check and routing.
        let mut hosts = req.headers().get_all(header::HOST).iter();
        let first_host = hosts.next();
        let bad_request = match (bad_request, first_host.is_some() && hosts.next().is_some()) {
            (None, true) => Some(BadRequest::SeveralHosts),
            (bad, _) => bad,
        };
        let path = req.uri().path();
        // One host rule for routing and forwarding (RFC 9112 §3.2.2): the absolute-form
        // authority (or HTTP/2 `:authority`) wins over `Host`, and replaces it upstream.
        let host = req.uri().authority().map(|a| a.as_str()).or_else(|| first_host?.to_str().ok());
        // The request finishes on the view it started with, whatever a reload does meanwhile.
        let view = self.view.load_full();
        let found = if bad_request.is_some() { None } else { view.router.find(host, path) };
        let mut resp = match (found, bad_request) {
            (_, Some(e)) => {
                outcome.generated = Some(Generated::BadRequest);
                plain(StatusCode::BAD_REQUEST, format!("bad request: {e}\n"))
            }
            (None, None) => {
                let host = host.unwrap_or("").to_owned();
                outcome.generated = Some(Generated::NoRoute);
                plain(StatusCode::NOT_FOUND, format!("no route for host `{host}` and path `{path}`\n"))
            }
            (Some(index), None) => {
                let route = &view.router.routes()[index];
                let resp = match route.max_body_bytes {
                    // Declared too large: refused before any backend is contacted.
                    Some(limit) if req.body().size_hint().lower() > limit => {
                        outcome.generated = Some(Generated::BodyTooLarge);
                        too_large(limit)
                    }
                    _ => {
                        let forward = self.forward(conns, req, conn, route, &mut outcome, counting);
                        match route.timeout {
                            None => forward.await,
                            Some(total) => match tokio::time::timeout(total, forward).await {
                                Ok(resp) => resp,
                                Err(_) => {
                                    outcome.generated = Some(Generated::RequestTimeout);
                                    outcome.error = Some(format!("no response headers within the route's {total:?}"));
                                    plain(StatusCode::GATEWAY_TIMEOUT, "gateway timeout: the request took too long\n")
                                }
                            },
                        }
                    }
                };
                if counting {
                    let shard = route.metrics.shards.local();
                    shard.requests[metrics::class(resp.status().as_u16())].inc();
                    shard.duration.observe(started.elapsed());
                }
                if let Some(canary) = &route.upstream.canary {
                    canary.count(outcome.arm, resp.status().as_u16());
                }
                let mut resp = resp;
                if let (Some(backend), Some(why)) = (&outcome.debug, &outcome.why) {
                    let value = decision_header(&route.upstream, outcome.arm, why, backend.as_deref());
                    resp.headers_mut().insert(headers::X_GATEWAY_DECISION, value);
                }
                resp
            }
        };
        if counting {
            if let Some(reason) = outcome.generated {
                global.generated(reason, resp.status().as_u16());
            }
            global.in_flight.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        }
        if let (Some(log), Some(time)) = (&self.access_log, time) {
            let line = log::Pending {
                log: log.clone(),
                view,
                route: found,
                time,
                started,
                method,
                uri,
                host: host_header,
                trace: outcome.trace,
                client: conn.ip.clone(),
                status: resp.status().as_u16(),
                attempts: outcome.attempts,
                fallback: outcome.fallback,
                bytes_in: outcome.bytes_in,
                reason: outcome.generated.map(|g| Generated::LABELS[g as usize]),
                error: outcome.error,
                why: outcome.why,
                arm: outcome.arm,
            };
            match resp.body_mut() {
                // A backend's body: the line waits for its end (bytes, full duration).
                ResponseBody::Upstream { log, .. } => *log = Some(Box::new(line)),
                ResponseBody::Full(data) => line.record(None, data.as_ref().map_or(0, |d| d.len() as u64)),
            }
        }
        // Logged and counted as what happened (e.g. 502); a gRPC client is told in gRPC.
        if grpc && matches!(resp.body(), ResponseBody::Full(_)) {
            return grpc::error_response(resp);
        }
        resp
    }

    async fn forward(
        &self,
        conns: &Arc<Conns>,
        req: Request<Incoming>,
        conn: &ClientConn,
        route: &crate::router::Route,
        outcome: &mut Outcome,
        counting: bool,
    ) -> Response<ResponseBody> {
        let (upstream, max_body_bytes): (&Upstream, _) = (&route.upstream, route.max_body_bytes);
        let (mut parts, incoming) = req.into_parts();
        // The host the route was chosen by: the absolute-form authority (without any
        // `user@`) replaces the client's `Host` for the backend.
        let authority = parts.uri.authority().and_then(|a| {
            let host = a.as_str().rsplit_once('@').map_or(a.as_str(), |(_, h)| h);
            header::HeaderValue::from_str(host).ok()
        });
        // WebSocket and other HTTP/1.1 upgrades: keep the upgrade headers for the
        // backend, and take the client side of the connection for the tunnel.
        let upgrade = headers::upgrade_protocol(&parts.headers);
        let client_upgrade = upgrade.as_ref().and_then(|_| parts.extensions.remove::<hyper::upgrade::OnUpgrade>());
        let forwarding = headers::Forwarding {
            client_ip: &conn.ip,
            authority: authority.as_ref(),
            request_id: outcome.trace.request_id(),
            upgrade: upgrade.as_ref(),
            trace: &outcome.trace,
            https: conn.https,
        };
        let peer = conn.peer;
        let body = if incoming.is_end_stream() {
            RequestBody::Empty
        } else {
            RequestBody::Stream(Replayable::new(incoming, max_body_bytes, conn.body_timeout))
        };
        outcome.bytes_in = body.sent();
        let idempotent = is_idempotent(&parts.method);
        // Backends get origin-form targets: `/path?query`.
        let target: Uri = parts.uri.path_and_query().map_or_else(|| Uri::from_static("/"), |pq| Uri::from(pq.clone()));

        // The canary decides its share of the clients (by key), for every attempt.
        if let Some(canary) = &upstream.canary
            && canary.takes(&parts, peer.ip())
        {
            outcome.arm = Arm::Canary;
        }
        let selector = upstream.selector_for(outcome.arm);
        // A sampled request is also put to the shadow, after the first decision.
        let mut shadow = upstream.shadow.as_ref().filter(|s| s.samples());
        let mut tried: Vec<u32> = Vec::new();
        let mut last_error: Option<Response<ResponseBody>> = None;
        // Why the previous attempt failed (what a retry is counted under).
        let mut retrying: Option<RetryReason> = None;
        // Sends the backend refused unprocessed (HTTP/2 GOAWAY, REFUSED_STREAM): sent
        // again without using up an attempt, at most MAX_RESENDS times.
        let mut resent = 0;
        while outcome.attempts < upstream.retries.attempts {
            let pool = upstream.pool.snapshot();
            // After a pool change this worker's plugin instance is brought up to date off
            // the request path: the first request waits for it, briefly.
            for binding in selector.bindings() {
                if let Some(catch_up) = binding.catch_up(&pool) {
                    catch_up.await;
                }
            }
            let choice = selector.choose(&mut parts, peer.ip(), &pool, &tried);
            if let Some(shadow) = shadow.take() {
                let live = match &choice {
                    Choice::Backend { index, .. } => Some(Live::Backend(pool.members[*index].entry.clone())),
                    Choice::Reject { status, .. } => Some(Live::Reject(*status)),
                    Choice::NoBackend => None,
                };
                if let Some(live) = live {
                    shadow.observe(&parts, peer.ip(), pool.clone(), live);
                }
            }
            let (index, extra_headers) = match choice {
                Choice::Backend { index, response_headers, fallback, why } => {
                    outcome.fallback |= fallback;
                    outcome.why = Some(why);
                    (index, response_headers)
                }
                // On a retry a rejection means "nothing left to try" (the SDK's
                // `no_backend()` is a 503): the client is better told what went wrong
                // with the backend that was tried.
                Choice::Reject { .. } if last_error.is_some() => break,
                Choice::Reject { status, text, response_headers, why } => {
                    outcome.why = Some(why);
                    if parts.headers.get(headers::X_GATEWAY_DEBUG).is_some_and(|v| v.as_bytes() == b"1")
                        && self.may_debug(&parts.headers, conn)
                    {
                        outcome.debug = Some(None);
                    }
                    let mut resp = plain(StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE), text);
                    add_headers(resp.headers_mut(), response_headers);
                    outcome.generated = Some(Generated::PluginReject);
                    return resp;
                }
                Choice::NoBackend => break,
            };
            if let Some(reason) = retrying.take()
                && counting
            {
                upstream.metrics.shards.local().retries[reason as usize].inc();
            }
            let member = &pool.members[index];
            let entry = &member.entry;
            outcome.attempts += 1;
            tried.push(index as u32);

            // Built afresh for each attempt from the client's headers, which stay as
            // they came (what a plugin reads, and what a retry starts from).
            let mut attempt = Request::new(body.attempt(entry));
            *attempt.method_mut() = parts.method.clone();
            *attempt.uri_mut() = target.clone();
            let (forwarded, debug) = headers::for_backend_noting_debug(&parts.headers, &forwarding, || {
                header::HeaderValue::from_str(entry.authority.as_str()).expect("valid authority")
            });
            *attempt.headers_mut() = forwarded;
            if debug && self.may_debug(&parts.headers, conn) {
                outcome.debug = Some(Some(entry.id.clone()));
            }

            let guard = BackendStats::start(entry);
            let sent = Instant::now();
            let second = budget::second(sent);
            if outcome.attempts == 1 && resent == 0 {
                upstream.retry_budget.request(second);
            }
            let timeouts = &upstream.timeouts;
            // Pinned where it is built: the exchange future is large, and moving it
            // into another future would copy it on every request.
            let mut exchange = std::pin::pin!(tokio::time::timeout(
                timeouts.response_header,
                conns.send(entry, &upstream.transport, attempt, timeouts.connect),
            ));
            // A request safe to send again also listens for its backend going down
            // (health check, ejection): then it goes to another backend at once instead
            // of waiting out its timeout on a frozen one. With no other backend to go
            // to, it keeps waiting (the backend may still answer).
            let result = if idempotent && body.replayable() && outcome.attempts < upstream.retries.attempts {
                let mut down = std::pin::pin!(entry.down.notified());
                let mut listening = true;
                if entry.down.is_down() && another_backend(upstream, &tried) {
                    Ok(Err(conns::SendError::BackendDown))
                } else {
                    std::future::poll_fn(|cx| {
                        if let Poll::Ready(r) = exchange.as_mut().poll(cx) {
                            return Poll::Ready(r);
                        }
                        if listening && down.as_mut().poll(cx).is_ready() {
                            if another_backend(upstream, &tried) {
                                return Poll::Ready(Ok(Err(conns::SendError::BackendDown)));
                            }
                            listening = false;
                        }
                        Poll::Pending
                    })
                    .await
                }
            } else {
                exchange.await
            };
            if body.stalled() {
                // The client stopped sending its body: its doing, not the backend's
                // (whose connection was closed with the aborted body); no retry.
                return body_timeout(outcome, conn.body_timeout);
            }
            if body.too_large() {
                // The client sent more than the route allows: its doing, not the backend's
                // (which saw the body cut off); no retry, no passive-health failure.
                outcome.generated = Some(Generated::BodyTooLarge);
                return too_large(max_body_bytes.unwrap_or(0));
            }
            if let Ok(Ok((resp, _))) = &result {
                // A backend answered: whatever an earlier attempt failed with, this
                // response is the backend's, not the gateway's.
                outcome.generated = None;
                if counting {
                    let shard = entry.metrics.shards.local();
                    shard.requests[metrics::class(resp.status().as_u16())].inc();
                    shard.latency.observe(sent.elapsed());
                }
            }
            let failure = match result {
                Ok(Ok((resp, conn))) if resp.status().is_server_error() => {
                    let retry = idempotent
                        && upstream.retries.on_5xx
                        && body.replayable()
                        && self.budget_allows(upstream, outcome.attempts, second, counting);
                    self.failed(upstream, entry, &format!("answered {}", resp.status()));
                    if retry {
                        last_error = Some(finish(resp, guard, conn, extra_headers));
                        retrying = Some(RetryReason::Status5xx);
                        continue;
                    }
                    return finish(resp, guard, conn, extra_headers);
                }
                Ok(Ok((mut resp, _conn)))
                    if resp.status() == StatusCode::SWITCHING_PROTOCOLS && client_upgrade.is_some() =>
                {
                    entry.stats.success(sent.elapsed());
                    let backend_upgrade = hyper::upgrade::on(&mut resp);
                    let protocol = headers::upgrade_protocol(resp.headers());
                    tokio::spawn(tunnel(client_upgrade.expect("checked above"), backend_upgrade, guard));
                    let (mut parts, _) = resp.into_parts();
                    headers::remove_hop_by_hop(&mut parts.headers);
                    if let Some(p) = protocol {
                        headers::set_upgrade(&mut parts.headers, p);
                    }
                    return Response::from_parts(parts, ResponseBody::empty());
                }
                Ok(Ok((resp, conn))) => {
                    entry.stats.success(sent.elapsed());
                    return finish(resp, guard, conn, extra_headers);
                }
                Ok(Err(conns::SendError::Connect(e))) => Failure::Connect(e),
                Ok(Err(conns::SendError::Other(e))) => Failure::Other(e),
                Ok(Err(conns::SendError::Refused(e))) => Failure::Refused(e),
                Ok(Err(conns::SendError::BackendDown)) => Failure::BackendDown,
                Ok(Err(conns::SendError::Local(e))) => Failure::Local(e),
                Err(_) => Failure::Timeout(upstream.timeouts.response_header),
            };
            drop(guard);
            let reason = failure.to_string();
            match failure {
                // Health already took it out; the gateway's own shortage (descriptors)
                // says nothing about the backend; a backend closing a connection is not
                // failing.
                Failure::BackendDown | Failure::Local(_) | Failure::Refused(_) => {}
                _ => self.failed(upstream, entry, &reason),
            }
            let retry = match failure {
                // Nothing was sent, or the backend went down: another backend takes the
                // request, outside the budget (no load beyond the request itself).
                Failure::Connect(_) | Failure::BackendDown => body.replayable(),
                Failure::Other(_) | Failure::Timeout(_) => {
                    idempotent && body.replayable() && self.budget_allows(upstream, outcome.attempts, second, counting)
                }
                // Another backend would fail the same way.
                Failure::Local(_) => false,
                // Not processed: sent again (by the strategy's choice, on a new connection
                // if it is the same backend) as if it had never been sent, when the body
                // can still be sent whole.
                Failure::Refused(_) if body.replayable() && resent < MAX_RESENDS => {
                    resent += 1;
                    outcome.attempts -= 1;
                    tried.pop();
                    tracing::debug!(upstream = %upstream.name, backend = %entry.id, "sending again a request the backend refused unprocessed: {reason}");
                    continue;
                }
                Failure::Refused(_) => false,
            };
            let (status, generated, retry_reason) = match failure {
                Failure::Timeout(_) => (StatusCode::GATEWAY_TIMEOUT, Generated::BackendTimeout, RetryReason::Timeout),
                Failure::Connect(_) => (StatusCode::BAD_GATEWAY, Generated::BackendFailed, RetryReason::ConnectFailed),
                Failure::Other(_) | Failure::Refused(_) => {
                    (StatusCode::BAD_GATEWAY, Generated::BackendFailed, RetryReason::Error)
                }
                Failure::BackendDown => (StatusCode::BAD_GATEWAY, Generated::BackendFailed, RetryReason::BackendDown),
                Failure::Local(_) => {
                    (StatusCode::SERVICE_UNAVAILABLE, Generated::OutOfDescriptors, RetryReason::ConnectFailed)
                }
            };
            // The client learns what kind of failure it was, not the backend's address
            // or the OS error: those go to the access log and the admin API.
            let text = match status {
                StatusCode::GATEWAY_TIMEOUT => "gateway timeout: the backend did not answer in time\n",
                StatusCode::SERVICE_UNAVAILABLE => "service unavailable: the gateway is out of resources, try again\n",
                _ => "bad gateway: the backend failed\n",
            };
            last_error = Some(plain(status, text));
            outcome.error = Some(format!("backend {} ({}): {reason}", entry.id, entry.addr));
            outcome.generated = Some(generated);
            retrying = Some(retry_reason);
            if !retry {
                break;
            }
        }
        last_error.unwrap_or_else(|| {
            outcome.generated = Some(Generated::NoHealthyBackend);
            plain(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("no healthy backend available for upstream `{}`\n", upstream.name),
            )
        })
    }

    /// Whether the client may see how its request was routed: it connected from a
    /// loopback address (after any PROXY protocol header), or carries the admin token
    /// as `Authorization: Bearer TOKEN`.
    fn may_debug(&self, client: &http::HeaderMap, conn: &ClientConn) -> bool {
        if conn.peer.ip().to_canonical().is_loopback() {
            return true;
        }
        let Some(token) = &self.debug_token else { return false };
        let given = client.get(header::AUTHORIZATION).and_then(|v| v.as_bytes().strip_prefix(b"Bearer "));
        given.is_some_and(|t| bool::from(subtle::ConstantTimeEq::ct_eq(t.trim_ascii(), &token[..])))
    }

    /// Whether a retry after attempt number `attempts` (made in second `second`) may
    /// be made: there is an attempt left and the upstream's retry budget has room. A
    /// retry the budget refuses is counted.
    fn budget_allows(&self, upstream: &Upstream, attempts: u32, second: u32, counting: bool) -> bool {
        if attempts >= upstream.retries.attempts {
            return false;
        }
        if upstream.retry_budget.try_retry(second) {
            return true;
        }
        if counting {
            upstream.metrics.shards.local().retries_skipped.inc();
        }
        tracing::debug!(upstream = %upstream.name, "retry not made: the upstream's retry budget is spent");
        false
    }

    fn failed(&self, upstream: &Upstream, entry: &Arc<crate::pool::BackendEntry>, reason: &str) {
        let streak = entry.stats.failure();
        entry.metrics.last_failure(reason);
        tracing::debug!(upstream = %upstream.name, backend = %entry.id, address = %entry.addr, streak, "request failed: {reason}");
        let threshold = upstream.passive.consecutive_failures;
        // At the threshold, and again every `threshold` failures after it: a backend the
        // half rule kept in gets another look while it keeps failing.
        if threshold > 0 && streak >= threshold && streak.is_multiple_of(threshold) {
            self.reporter.eject(&upstream.name, &entry.id, reason);
        }
    }
}

/// Whether the upstream has a healthy backend this request has not tried yet (read
/// only when its backend went down).
fn another_backend(upstream: &Upstream, tried: &[u32]) -> bool {
    let pool = upstream.pool.load();
    pool.members.iter().enumerate().any(|(i, m)| m.status.healthy() && !tried.contains(&(i as u32)))
}

/// Copies bytes both ways between an upgraded client connection and the backend's,
/// counting the tunnel as one in-flight request until either side closes.
async fn tunnel(
    client: hyper::upgrade::OnUpgrade,
    backend: hyper::upgrade::OnUpgrade,
    guard: crate::pool::ActiveGuard,
) {
    let (client, backend) = match tokio::try_join!(client, backend) {
        Ok(pair) => pair,
        Err(e) => {
            tracing::debug!("upgrade failed: {e}");
            return;
        }
    };
    let mut client = hyper_util::rt::TokioIo::new(client);
    let mut backend = hyper_util::rt::TokioIo::new(backend);
    if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut backend).await {
        tracing::debug!("upgraded connection ended: {e}");
    }
    drop(guard);
}

enum Failure {
    Connect(String),
    Other(String),
    /// The backend refused the HTTP/2 stream unprocessed ([`conns::SendError::Refused`]).
    Refused(String),
    Timeout(Duration),
    /// The backend went down while the request waited for its response headers.
    BackendDown,
    /// The gateway itself ran short (out of file descriptors): not the backend's fault.
    Local(String),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Connect(e) => write!(f, "connect failed: {e}"),
            Failure::Other(e) => write!(f, "{e}"),
            Failure::Refused(e) => write!(f, "refused unprocessed: {e}"),
            Failure::Timeout(d) => write!(f, "no response headers within {d:?}"),
            Failure::BackendDown => write!(f, "the backend went down while the request waited for its answer"),
            Failure::Local(e) => write!(f, "the gateway could not connect: {e}"),
        }
    }
}

fn finish(
    resp: Response<Incoming>,
    guard: crate::pool::ActiveGuard,
    conn: conns::Pooled,
    extra: Vec<(String, String)>,
) -> Response<ResponseBody> {
    let (mut parts, body) = resp.into_parts();
    headers::remove_hop_by_hop(&mut parts.headers);
    add_headers(&mut parts.headers, extra);
    Response::from_parts(
        parts,
        ResponseBody::Upstream { body, guard: Some(guard), conn: Some(conn), bytes: 0, log: None },
    )
}

/// Adds a plugin's response headers; names or values that are not valid HTTP are skipped.
fn add_headers(headers: &mut http::HeaderMap, extra: Vec<(String, String)>) {
    for (name, value) in extra {
        if let (Ok(n), Ok(v)) = (header::HeaderName::try_from(name), header::HeaderValue::try_from(value)) {
            headers.append(n, v);
        }
    }
}

/// `X-Gateway-Decision: upstream=web; plugin=consistent-hash; backend=b2; reason=...`:
/// the step that decided (`-` when the native round robin did) and its reason.
fn decision_header(upstream: &Upstream, arm: Arm, why: &Why, backend: Option<&str>) -> header::HeaderValue {
    let plugin = match why {
        Why::Step { step, .. } => upstream.selector_for(arm).step_name(*step),
        Why::AllPassed | Why::Failed => "-",
    };
    let mut text = format!("upstream={}; plugin={plugin}; backend={}", upstream.name, backend.unwrap_or("-"));
    if arm == Arm::Canary {
        text.push_str("; arm=canary");
    }
    if let Some(reason) = why.reason() {
        text.push_str("; reason=");
        // A header value holds no control characters.
        text.extend(reason.chars().map(|c| if c.is_control() { ' ' } else { c }));
    }
    header::HeaderValue::from_bytes(text.as_bytes()).unwrap_or(header::HeaderValue::from_static("-"))
}

/// Replaces the path of `uri`, keeping its scheme, authority and query.
fn set_path(uri: &mut Uri, path: &str) {
    let pq = match uri.query() {
        Some(q) => format!("{path}?{q}"),
        None => path.to_owned(),
    };
    let mut parts = std::mem::take(uri).into_parts();
    parts.path_and_query = http::uri::PathAndQuery::try_from(pq).ok();
    // A normalised path is made of the original's characters: always valid.
    *uri = Uri::from_parts(parts).unwrap_or_default();
}

/// `413`: the request body passed the route's `max_body_bytes`. The connection is closed,
/// since the rest of the body was not read.
fn too_large(limit: u64) -> Response<ResponseBody> {
    let mut resp = plain(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!("payload too large: this route accepts request bodies up to {limit} bytes\n"),
    );
    resp.headers_mut().insert(header::CONNECTION, header::HeaderValue::from_static("close"));
    resp
}

/// `408`: the request body stalled for `timeout`. The connection is closed, since the
/// rest of the body was not read. Out of line: `forward` is the hot path.
#[cold]
#[inline(never)]
fn body_timeout(outcome: &mut Outcome, timeout: Duration) -> Response<ResponseBody> {
    outcome.generated = Some(Generated::BodyTimeout);
    outcome.error = Some(format!("the request body stalled for {timeout:?} (limits.body_timeout)"));
    let mut resp = plain(
        StatusCode::REQUEST_TIMEOUT,
        format!("request timeout: no part of the request body arrived for {} s\n", timeout.as_secs_f64()),
    );
    resp.headers_mut().insert(header::CONNECTION, header::HeaderValue::from_static("close"));
    resp
}

/// A plain-text response written by the gateway.
pub fn plain(status: StatusCode, text: impl Into<Bytes>) -> Response<ResponseBody> {
    let mut resp = Response::new(ResponseBody::text(text));
    *resp.status_mut() = status;
    resp.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("text/plain; charset=utf-8"));
    resp
}

fn is_idempotent(m: &Method) -> bool {
    matches!(*m, Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE)
}

fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

/// Why a request was refused with `400` before routing.
#[derive(Debug, thiserror::Error)]
enum BadRequest {
    /// An encoded slash or a path that is not absolute.
    #[error("{0}")]
    Path(crate::router::PathError),
    /// More than one `Host` header line.
    #[error("the request has more than one Host header")]
    SeveralHosts,
}
