//! The admin listener: a small router of its own, serving JSON, HTML and metrics.
//! Read-only views of the gateway's state, plus the few mutations an operator needs
//! (drain/undrain, reload). Bound to loopback unless a token protects it ([`auth`]).
//!
//! | route | what | auth |
//! |---|---|---|
//! | `GET /` | the live stats page (self-contained HTML; its data comes from `/api/stats`) | none: it holds no data |
//! | `GET /healthz` | `ok` | none |
//! | `GET /metrics` | Prometheus text exposition | token, unless `admin.public_metrics` |
//! | `GET /api/stats` | everything the stats page shows, as JSON | token |
//! | `GET /api/upstreams` | upstreams, plugins, backends with live stats | token |
//! | `GET /api/plugins` | every plugin loaded: origin, hash, load time, last error | token |
//! | `GET /api/config` | config version, when loaded, last reload error | token |
//! | `POST /api/upstreams/{upstream}/backends/{id}/drain` (and `/undrain`) | stop / resume new requests to a backend | token, or same-site on loopback |
//! | `POST /api/reload` | reload the config file | token, or same-site on loopback |
//! | `GET /debug/pprof/profile?seconds=N` | CPU profile (pprof protobuf, `&format=svg`: flamegraph) | token |
//! | `PUT /api/registry/{upstream}/{id}` (`/heartbeat`), `DELETE ...`, `GET /api/registry` | the embedded registry ([`crate::discovery::registry`]) | registry token or admin token; without tokens, loopback and same-site |

mod api;
pub mod auth;
pub mod page;
pub mod pprof;

use crate::gateway::Gateway;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::json;
use std::convert::Infallible;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

pub use auth::Auth;

/// The body of every admin response: the admin API writes whole bodies.
pub type AdminBody = Full<Bytes>;

/// An admin response.
pub type AdminResponse = Response<AdminBody>;

/// Extra admin routes (the demo adds start/stop of its backends).
pub trait Extension: Send + Sync {
    /// Answers `method path`, or `None` if it is not this extension's route. Only
    /// called for requests that passed the same checks as a mutating admin call.
    fn handle(&self, method: &Method, path: &str) -> Option<AdminResponse>;
}

/// Serves the admin API until `stop` is cancelled.
pub async fn serve(
    listener: tokio::net::TcpListener,
    gw: Arc<Gateway>,
    extension: Option<Arc<dyn Extension>>,
    auth: Arc<Auth>,
    stop: CancellationToken,
) {
    let mut throttle = crate::fds::Throttle::new(std::time::Duration::from_secs(10));
    loop {
        let (stream, _) = tokio::select! {
            _ = stop.cancelled() => return,
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    if let Some(left_out) = throttle.allow() {
                        tracing::warn!(repeated = left_out, "admin accept failed: {e}");
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let (gw, ext, auth) = (gw.clone(), extension.clone(), auth.clone());
        let service = service_fn(move |req: Request<Incoming>| {
            let (gw, ext, auth) = (gw.clone(), ext.clone(), auth.clone());
            async move { Ok::<_, Infallible>(handle(&gw, ext.as_deref(), &auth, req).await) }
        });
        tokio::spawn(async move {
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// The admin router, as a function so it can be tested without sockets.
pub async fn handle<B>(gw: &Arc<Gateway>, ext: Option<&dyn Extension>, auth: &Auth, req: Request<B>) -> AdminResponse
where
    B: hyper::body::Body,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let (parts, body) = req.into_parts();
    let method = &parts.method;
    let path = parts.uri.path();
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();

    // Public routes: nothing secret in them.
    match (method, segments.as_slice()) {
        (&Method::GET | &Method::HEAD, [""] | ["index.html"]) => return page::response(),
        (&Method::GET, ["healthz"]) => return text(StatusCode::OK, "ok\n"),
        (&Method::GET, ["metrics"]) if auth.public_metrics() => return metrics(gw),
        _ => {}
    }
    if let ["api", "registry", rest @ ..] = segments.as_slice() {
        if let Err(refused) = auth.check_registry(&parts) {
            return *refused;
        }
        return registry(gw, method, rest, body).await;
    }
    let access = auth.check(&parts);
    if let Err(refused) = access {
        return *refused;
    }
    let mutating = *method != Method::GET && *method != Method::HEAD;
    if mutating && let Err(refused) = auth.check_mutation(&parts) {
        return *refused;
    }
    if mutating && let Some(resp) = ext.and_then(|e| e.handle(method, path)) {
        return resp;
    }
    match (method, segments.as_slice()) {
        (&Method::GET, ["metrics"]) => metrics(gw),
        (&Method::GET, ["api", "stats"]) => json_response(StatusCode::OK, api::stats(gw, auth, &parts)),
        (&Method::GET, ["api", "upstreams"]) => json_response(StatusCode::OK, api::upstreams(gw)),
        (&Method::GET, ["api", "plugins"]) => json_response(StatusCode::OK, api::plugins(gw)),
        (&Method::GET, ["api", "config"]) => json_response(StatusCode::OK, api::config(gw)),
        (&Method::POST, ["api", "reload"]) => api::reload(gw).await,
        (&Method::POST, ["api", "upstreams", up, "backends", id, action @ ("drain" | "undrain")]) => {
            api::drain(gw, up, id, *action == "drain")
        }
        (&Method::POST, ["api", "upstreams", up, "canary", action @ ("promote" | "abort")]) => {
            api::canary(gw, up, *action == "promote").await
        }
        (&Method::GET, ["debug", "pprof", "profile"]) => pprof::profile(parts.uri.query().unwrap_or("")).await,
        (_, ["api", ..] | ["metrics"] | ["debug", ..]) if !mutating => {
            error(StatusCode::NOT_FOUND, format!("no admin route {method} {path}; see GET / for the stats page"))
        }
        _ => error(
            StatusCode::NOT_FOUND,
            format!("no admin route {method} {path} (mutations are POSTs under /api/; see docs/operations.md)"),
        ),
    }
}

/// The registry API: `rest` is the path after `/api/registry/`.
async fn registry<B>(gw: &Gateway, method: &Method, rest: &[&str], body: B) -> AdminResponse
where
    B: hyper::body::Body,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    use http_body_util::BodyExt as _;
    let reg = &gw.discovery;
    let answer = |r: Result<serde_json::Value, crate::discovery::registry::Refused>| match r {
        Ok(v) => json_response(StatusCode::OK, v),
        Err(e) => {
            let mut body = e.body();
            if e.status == StatusCode::NOT_FOUND && e.field == "id" && method == Method::PUT {
                body["register_again"] = json!(true);
            }
            json_response(e.status, body)
        }
    };
    match (method, rest) {
        (&Method::GET, [] | [""]) => json_response(StatusCode::OK, reg.list(&gw.view().upstreams)),
        (&Method::PUT, [up, id]) => {
            let limited = http_body_util::Limited::new(body, crate::discovery::registry::MAX_BODY);
            let bytes = match limited.collect().await {
                Ok(b) => b.to_bytes(),
                Err(e) => {
                    return json_response(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        json!({ "error": format!("the registration body could not be read (at most {} bytes): {e}", crate::discovery::registry::MAX_BODY), "field": "body" }),
                    );
                }
            };
            answer(reg.register(gw.upstream(up).as_deref(), up, id, &bytes).await)
        }
        (&Method::PUT, [up, id, "heartbeat"]) => answer(reg.heartbeat(gw.upstream(up).as_deref(), up, id).await),
        (&Method::DELETE, [up, id]) => answer(reg.deregister(gw.upstream(up).as_deref(), up, id).await),
        _ => error(
            StatusCode::NOT_FOUND,
            format!(
                "no registry route {method} /api/registry/{}: PUT /api/registry/UPSTREAM/ID, PUT .../ID/heartbeat, DELETE .../ID, GET /api/registry",
                rest.join("/")
            ),
        ),
    }
}

fn metrics(gw: &Gateway) -> AdminResponse {
    let body = crate::metrics::encode(gw);
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
    );
    resp
}

/// A JSON response.
pub fn json_response(status: StatusCode, value: serde_json::Value) -> AdminResponse {
    let mut resp = Response::new(Full::new(Bytes::from(format!("{value:#}\n"))));
    *resp.status_mut() = status;
    resp.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("application/json"));
    resp.headers_mut().insert(header::CACHE_CONTROL, header::HeaderValue::from_static("no-store"));
    resp
}

/// A JSON error a person can act on: `{"error": "..."}`.
pub fn error(status: StatusCode, message: impl Into<String>) -> AdminResponse {
    json_response(status, json!({ "error": message.into() }))
}

/// A plain-text response.
pub fn text(status: StatusCode, body: impl Into<Bytes>) -> AdminResponse {
    let mut resp = Response::new(Full::new(body.into()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("text/plain; charset=utf-8"));
    resp
}
