//! The admin API: read-only JSON views of upstreams and backends, plus drain/undrain.
//! Bound to loopback by default.
//!
//! - `GET /healthz` → `ok`
//! - `GET /api/upstreams` → every upstream, its plugin and its backends with live stats
//! - `GET /api/plugins` → every plugin loaded: origin, hash, load time, last error
//! - `POST /api/upstreams/{upstream}/backends/{id}/drain` (and `/undrain`)
//! - [`pprof::profile`]: `GET /debug/pprof/profile` (CPU profile on demand)

pub mod pprof;

use crate::gateway::Gateway;
use crate::proxy::{ResponseBody, plain};
use http::{Method, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::json;
use std::convert::Infallible;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// Extra admin routes (the demo adds start/stop of its backends).
pub trait Extension: Send + Sync {
    /// Answers `method path`, or `None` if it is not this extension's route.
    fn handle(&self, method: &Method, path: &str) -> Option<Response<ResponseBody>>;
}

/// Serves the admin API until `stop` is cancelled.
pub async fn serve(
    listener: tokio::net::TcpListener,
    gw: Arc<Gateway>,
    extension: Option<Arc<dyn Extension>>,
    stop: CancellationToken,
) {
    loop {
        let (stream, _) = tokio::select! {
            _ = stop.cancelled() => return,
            a = listener.accept() => match a { Ok(a) => a, Err(_) => continue },
        };
        let (gw, ext) = (gw.clone(), extension.clone());
        let service = service_fn(move |req: Request<Incoming>| {
            let (gw, ext) = (gw.clone(), ext.clone());
            async move { Ok::<_, Infallible>(handle(&gw, ext.as_deref(), req.method(), req.uri().path())) }
        });
        tokio::spawn(async move {
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// The admin router, as a function so it can be tested without sockets.
pub fn handle(gw: &Gateway, ext: Option<&dyn Extension>, method: &Method, path: &str) -> Response<ResponseBody> {
    if let Some(resp) = ext.and_then(|e| e.handle(method, path)) {
        return resp;
    }
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (method, segments.as_slice()) {
        (&Method::GET, ["healthz"]) => plain(StatusCode::OK, "ok\n"),
        (&Method::GET, ["api", "upstreams"]) => json_response(StatusCode::OK, upstreams(gw)),
        (&Method::GET, ["api", "plugins"]) => json_response(StatusCode::OK, plugins(gw)),
        (&Method::POST, ["api", "upstreams", up, "backends", id, action @ ("drain" | "undrain")]) => {
            let Some(upstream) = gw.upstream(up) else {
                return json_response(StatusCode::NOT_FOUND, json!({"error": format!("no upstream `{up}`")}));
            };
            let drained = *action == "drain";
            match upstream.pool.update_status(id, |s| s.drained = drained) {
                Some(status) => {
                    tracing::info!(upstream = %up, backend = %id, drained, "backend {action}ed by the admin API");
                    json_response(
                        StatusCode::OK,
                        json!({"upstream": up, "backend": id, "drained": status.drained, "healthy": status.healthy()}),
                    )
                }
                None => json_response(
                    StatusCode::NOT_FOUND,
                    json!({"error": format!("upstream `{up}` has no backend `{id}`")}),
                ),
            }
        }
        _ => json_response(StatusCode::NOT_FOUND, json!({"error": format!("no admin route {method} {path}")})),
    }
}

fn upstreams(gw: &Gateway) -> serde_json::Value {
    let list: Vec<_> = gw
        .upstreams
        .iter()
        .map(|up| {
            let snap = up.pool.snapshot();
            let plugin = up.selector.binding().plugin();
            json!({
                "name": up.name,
                "generation": snap.generation,
                "healthy": snap.healthy_count,
                "plugin": {
                    "name": plugin.name,
                    "origin": plugin.origin.to_string(),
                    "sha256": plugin.hash,
                    "failures": up.selector.binding().failures(),
                    "fallbacks": up.selector.fallbacks(),
                },
                "backends": snap.members.iter().map(|m| json!({
                    "id": m.entry.id,
                    "address": m.entry.addr.to_string(),
                    "weight": m.entry.weight,
                    "zone": m.entry.zone,
                    "healthy": m.status.healthy(),
                    "up": m.status.up,
                    "ejected": m.status.ejected_until.is_some(),
                    "drained": m.status.drained,
                    "active": m.entry.stats.active(),
                    "requests": m.entry.stats.requests(),
                    "failures": m.entry.stats.failures(),
                    "ewma_latency_us": m.entry.stats.ewma_latency_us(),
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    json!({ "upstreams": list })
}

fn plugins(gw: &Gateway) -> serde_json::Value {
    let list: Vec<_> = gw
        .plugins
        .registered()
        .into_iter()
        .map(|(name, r)| {
            let used_by: Vec<_> = gw
                .upstreams
                .iter()
                .filter(|u| u.selector.binding().plugin().name == name)
                .map(|u| u.name.clone())
                .collect();
            let current = r.current.as_ref().map(|p| {
                let loaded = p.loaded_at.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
                json!({
                    "origin": p.origin.to_string(),
                    "sha256": p.hash,
                    "size": p.size,
                    "loaded_at_unix_ms": loaded.as_millis() as u64,
                    "load_ms": p.compile_time.as_secs_f64() * 1e3,
                    "from_cache": p.from_cache,
                })
            });
            json!({
                "name": name,
                "serving": current,
                "used_by": used_by,
                "last_error": r.last_error,
                "file_deleted": r.file_deleted,
            })
        })
        .collect();
    json!({ "plugins": list })
}

/// A JSON response.
pub fn json_response(status: StatusCode, value: serde_json::Value) -> Response<ResponseBody> {
    let mut resp = Response::new(ResponseBody::text(format!("{value:#}\n")));
    *resp.status_mut() = status;
    resp.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("application/json"));
    resp
}
