//! The JSON endpoints: read-only views of the current view, pool and metrics, and the
//! two mutations (drain/undrain, reload).

use super::{AdminResponse, Auth, error, json_response};
use crate::gateway::Gateway;
use crate::metrics::{self, CLASSES, Generated, HistogramSnapshot, UpstreamMetrics};
use crate::pool::Member;
use crate::reload::{self, Trigger};
use crate::select::{Arm, Canary, Shadow};
use crate::upstream::Upstream;
use http::StatusCode;
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::SystemTime;

fn ms(t: SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_millis() as u64
}

/// `GET /api/stats`: everything the stats page shows. Counters are cumulative; the page
/// computes rates and percentiles from the difference between two polls.
pub fn stats(gw: &Gateway, auth: &Auth, req: &http::request::Parts) -> Value {
    let view = gw.view();
    let global = metrics::global();
    let in_flight =
        global.iter().fold(0u64, |acc, s| acc.wrapping_add(s.in_flight.load(std::sync::atomic::Ordering::Relaxed)));
    let generated: serde_json::Map<String, Value> = Generated::LABELS
        .iter()
        .enumerate()
        .map(|(i, label)| {
            let n: u64 = global.sum(|s| s.generated[i].iter().map(metrics::Counter::get).sum());
            (label.to_string(), json!(n))
        })
        .collect();
    let state = gw.config_state();
    let control = metrics::control();
    // Without a token, a loopback viewer may drain; a token holder may too. A request
    // that is not same-site never gets this far for a mutation anyway.
    let can_write = auth.check_mutation(req).is_ok();
    json!({
        "gateway": {
            "version": env!("CARGO_PKG_VERSION"),
            "now_ms": metrics::now_ms(),
            "started_at_ms": ms(gw.started_at),
            "can_write": can_write,
            "token_required": auth.has_token(),
            "in_flight": in_flight as i64,
            "requests": global.sum(|s| s.requests.get()),
            "connections": global.sum(|s| s.connections.get()),
            "generated": generated,
            "config": {
                "path": gw.config_path.as_ref().map(|p| p.display().to_string()),
                "version": state.version,
                "loaded_at_ms": ms(state.loaded_at),
                "last_error": state.last_error,
                "reloads_ok": control.reloads_ok.get(),
                "reloads_failed": control.reloads_refused.get(),
            },
            "access_log": match &gw.proxy.access_log {
                Some(l) => json!({ "enabled": true, "lines": l.lines(), "dropped": l.dropped_lines() }),
                None => json!({ "enabled": false, "lines": 0, "dropped": 0 }),
            },
        },
        "upstreams": view.upstreams.iter().map(|up| upstream_stats(gw, up)).collect::<Vec<_>>(),
    })
}

fn upstream_stats(gw: &Gateway, up: &Upstream) -> Value {
    let snap = up.pool.snapshot();
    let discovery = gw.discovery.states().remove(&up.name);
    let plugin = up.selector.binding().plugin();
    let m = &up.metrics;
    let last_error =
        gw.plugins.registered().into_iter().find(|(n, _)| *n == plugin.name).and_then(|(_, r)| r.last_error);
    let failures: serde_json::Map<String, Value> =
        UpstreamMetrics::FAILURE_KINDS.iter().zip(&m.failures).map(|(k, c)| (k.to_string(), json!(c.get()))).collect();
    json!({
        "name": up.name,
        "generation": snap.generation,
        "healthy": snap.healthy_count,
        "total": snap.members.len(),
        "discovery": discovery,
        "retries": m.shards.sum(|s| s.retries.iter().map(metrics::Counter::get).sum()),
        "retries_skipped": m.shards.sum(|s| s.retries_skipped.get()),
        "strategy": {
            "plugin": plugin.name,
            "origin": plugin.origin.to_string(),
            "sha256": plugin.hash,
            "overrides_builtin": plugin.overrides_builtin(),
            "loaded_at_ms": ms(plugin.loaded_at),
            "from_cache": plugin.from_cache,
            "params": up.selector.binding().params(),
            "decisions": m.shards.sum(|s| s.decisions.get()),
            "fallbacks": m.fallbacks.get(),
            "failures": failures,
            "last_error": last_error,
            "quarantined_for_ms": up.selector.binding().quarantined_for().map(|d| d.as_millis() as u64),
            "quarantines": up.selector.binding().quarantines(),
            "name": up.selector.name(),
            "chain": chain(up),
        },
        "canary": up.canary.as_deref().map(canary_stats),
        "shadow": up.shadow.as_deref().map(shadow_stats),
        "backends": snap.members.iter().map(|member| backend_stats(up, member)).collect::<Vec<_>>(),
    })
}

/// An upstream's canary: its plugin and split, and the responses each arm decided
/// (`errors` are 5xx), to compare before a promotion.
fn canary_stats(c: &Canary) -> Value {
    let binding = c.selector.binding();
    let plugin = binding.plugin();
    let arm = |arm: Arm| {
        let r = c.responses(arm);
        let total: u64 = r.iter().sum();
        json!({
            "responses": total,
            "errors": r[4],
            "error_ratio": (total > 0).then(|| r[4] as f64 / total as f64),
            "by_class": metrics::CLASSES.iter().zip(r).map(|(k, v)| (k.to_string(), json!(v))).collect::<serde_json::Map<_, _>>(),
        })
    };
    json!({
        "plugin": plugin.name,
        "origin": plugin.origin.to_string(),
        "sha256": plugin.hash,
        "params": c.config.params,
        "share": c.config.share,
        "key": c.config.key.to_string(),
        "decisions": c.selector.decisions(),
        "fallbacks": c.selector.fallbacks(),
        "failures": binding.failures(),
        "quarantined_for_ms": binding.quarantined_for().map(|d| d.as_millis() as u64),
        "live": arm(Arm::Live),
        "canary": arm(Arm::Canary),
    })
}

/// An upstream's shadow: its plugin and sample, how often it agreed with the live
/// decision, and where the sampled requests went and would have gone, per backend.
fn shadow_stats(s: &Shadow) -> Value {
    let plugin = s.binding.plugin();
    let counts = s.counts();
    json!({
        "plugin": plugin.name,
        "origin": plugin.origin.to_string(),
        "sha256": plugin.hash,
        "params": s.config.params,
        "sample": s.config.sample,
        "sampled": counts.sampled,
        "agreed": counts.agreed,
        "disagreed": counts.disagreed,
        "passed": counts.passed,
        "failed": counts.failed,
        "skipped": counts.skipped,
        "agreement": counts.agreement(),
        "quarantined_for_ms": s.binding.quarantined_for().map(|d| d.as_millis() as u64),
        "backends": counts.picks.iter().map(|(id, [live, shadow])| json!({"id": id, "live": live, "shadow": shadow})).collect::<Vec<_>>(),
    })
}

/// The steps of an upstream's strategy (one for a single strategy), in order: plugin,
/// params, requests asked and passed on, failures.
fn chain(up: &Upstream) -> Vec<Value> {
    up.selector
        .steps()
        .enumerate()
        .map(|(i, s)| {
            let plugin = s.binding.plugin();
            json!({
                "step": i,
                "plugin": s.name,
                "origin": plugin.origin.to_string(),
                "sha256": plugin.hash,
                "params": serde_json::from_str::<Value>(s.binding.params()).unwrap_or(Value::Null),
                "decisions": s.decisions,
                "passes": s.passes,
                "failures": s.binding.failures(),
                "quarantined_for_ms": s.binding.quarantined_for().map(|d| d.as_millis() as u64),
            })
        })
        .collect()
}

/// The state of a backend as one word.
pub fn state(member: &Member) -> &'static str {
    let s = &member.status;
    if s.drained {
        "drained"
    } else if s.pending {
        "pending"
    } else if !s.up {
        "down"
    } else if s.ejected_until.is_some() {
        "ejected"
    } else {
        "up"
    }
}

/// The backend's last failed request (when, why), which a client's 502/504 body leaves out.
fn last_failure(e: &crate::pool::BackendEntry) -> Value {
    let last = e.metrics.last_failure.lock().unwrap_or_else(|e| e.into_inner());
    last.as_ref().map_or(Value::Null, |(at, error)| json!({ "at_ms": at, "error": error }))
}

fn backend_stats(up: &Upstream, member: &Member) -> Value {
    let e = &member.entry;
    let m = &e.metrics;
    let requests: serde_json::Map<String, Value> = CLASSES
        .iter()
        .enumerate()
        .map(|(i, class)| (class.to_string(), json!(m.shards.sum(|s| s.requests[i].get()))))
        .collect();
    let latency = HistogramSnapshot::of(&m.shards, |s| &s.latency);
    let hc = &up.health_check;
    let last = m.health.last().map(|c| {
        json!({
            "ok": c.ok,
            "at_ms": c.at_ms,
            "duration_ms": c.duration.as_secs_f64() * 1e3,
            "error": c.error,
        })
    });
    json!({
        "id": e.id,
        "address": e.addr.to_string(),
        "weight": member.weight,
        "zone": e.zone,
        "source": e.source.as_str(),
        "state": state(member),
        "since_ms": m.state_since_ms.load(std::sync::atomic::Ordering::Relaxed),
        "in_flight": e.stats.active(),
        "requests": requests,
        "failures": e.stats.failures(),
        "last_failure": last_failure(e),
        "ewma_latency_us": e.stats.ewma_latency_us(),
        "bytes_in": m.shards.sum(|s| s.bytes_in.get()),
        "bytes_out": m.shards.sum(|s| s.bytes_out.get()),
        "latency": {
            "bounds_s": latency.bounds_s,
            "counts": latency.cumulative(),
            "count": latency.count(),
            "sum_s": latency.sum_s(),
        },
        "health": {
            "enabled": hc.enabled,
            "check": hc.path.as_ref().map_or_else(|| "tcp".to_owned(), |p| format!("GET {p}")),
            "last": last,
            "transitions": m.health.to_up.get() + m.health.to_down.get(),
        },
    })
}

/// `GET /api/upstreams`: upstreams, plugins, backends with live stats.
pub fn upstreams(gw: &Gateway) -> Value {
    let view = gw.view();
    let sources = gw.discovery.states();
    let list: Vec<_> = view
        .upstreams
        .iter()
        .map(|up| {
            let snap = up.pool.snapshot();
            let plugin = up.selector.binding().plugin();
            json!({
                "name": up.name,
                "generation": snap.generation,
                "healthy": snap.healthy_count,
                "discovery": sources.get(&up.name),
                "plugin": {
                    "name": plugin.name,
                    "origin": plugin.origin.to_string(),
                    "sha256": plugin.hash,
                    "overrides_builtin": plugin.overrides_builtin(),
                    "failures": up.selector.binding().failures(),
                    "fallbacks": up.selector.fallbacks(),
                    "quarantined_for_ms": up.selector.binding().quarantined_for().map(|d| d.as_millis() as u64),
                },
                "strategy": up.selector.name(),
                "chain": chain(up),
                "canary": up.canary.as_deref().map(canary_stats),
                "shadow": up.shadow.as_deref().map(shadow_stats),
                "backends": snap.members.iter().map(|m| json!({
                    "id": m.entry.id,
                    "address": m.entry.addr.to_string(),
                    "weight": m.weight,
                    "zone": m.entry.zone,
                    "labels": m.entry.labels.iter().cloned().collect::<std::collections::BTreeMap<_, _>>(),
                    "source": m.entry.source.as_str(),
                    "state": state(m),
                    "healthy": m.status.healthy(),
                    "up": m.status.up,
                    "pending": m.status.pending,
                    "ejected": m.status.ejected_until.is_some(),
                    "drained": m.status.drained,
                    "active": m.entry.stats.active(),
                    "requests": m.entry.stats.requests(),
                    "failures": m.entry.stats.failures(),
                    "last_failure": last_failure(&m.entry),
                    "ewma_latency_us": m.entry.stats.ewma_latency_us(),
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    json!({ "upstreams": list })
}

/// `GET /api/plugins`: every plugin loaded, who uses it, and its last error.
pub fn plugins(gw: &Gateway) -> Value {
    let view = gw.view();
    let list: Vec<_> = gw
        .plugins
        .registered()
        .into_iter()
        .map(|(name, r)| {
            let used_by: Vec<_> = view
                .upstreams
                .iter()
                .filter(|u| u.selector.bindings().any(|b| b.plugin().name == name))
                .map(|u| u.name.clone())
                .collect();
            let current = r.current.as_ref().map(|p| {
                json!({
                    "origin": p.origin.to_string(),
                    "sha256": p.hash,
                    "size": p.size,
                    "loaded_at_unix_ms": ms(p.loaded_at),
                    "load_ms": p.compile_time.as_secs_f64() * 1e3,
                    "from_cache": p.from_cache,
                    "overrides_builtin": p.overrides_builtin,
                })
            });
            json!({
                "name": name,
                "serving": current,
                "used_by": used_by,
                "last_error": r.last_error,
                "file_deleted": r.file_deleted,
                "in_memory": r.in_memory(),
            })
        })
        .collect();
    json!({ "plugins": list })
}

/// `GET /api/config`: which config serves, since when, and why the last reload was
/// refused. Never the config's content (it may name secrets' files).
pub fn config(gw: &Gateway) -> Value {
    let state = gw.config_state();
    let view = gw.view();
    json!({
        "path": gw.config_path.as_ref().map(|p| p.display().to_string()),
        "version": state.version,
        "loaded_at_ms": ms(state.loaded_at),
        "last_error": state.last_error,
        "last_error_at_ms": state.last_error_at.map(ms),
        "reloads": { "ok": metrics::control().reloads_ok.get(), "refused": metrics::control().reloads_refused.get() },
        "upstreams": view.upstreams.iter().map(|u| u.name.clone()).collect::<Vec<_>>(),
        "routes": view.router.routes().iter().map(|r| r.name.clone()).collect::<Vec<_>>(),
    })
}

/// `POST /api/reload`.
pub async fn reload(gw: &Arc<Gateway>) -> AdminResponse {
    if gw.config_path.is_none() {
        return error(
            StatusCode::CONFLICT,
            "this gateway was started without --config FILE: there is no config file to reload",
        );
    }
    match reload::reload(gw, Trigger::Api).await {
        Ok(changes) => json_response(
            StatusCode::OK,
            json!({ "reloaded": true, "version": gw.config_state().version, "changes": changes }),
        ),
        Err(e) => json_response(
            StatusCode::UNPROCESSABLE_ENTITY,
            json!({ "reloaded": false, "error": e, "serving_version": gw.config_state().version }),
        ),
    }
}

/// `POST /api/upstreams/{up}/canary/promote|abort`: the canary becomes the upstream's
/// strategy (keeping its warm instances and state), or is removed; the running config
/// changes, the file does not.
pub async fn canary(gw: &Arc<Gateway>, up: &str, promote: bool) -> AdminResponse {
    let Some(upstream) = gw.upstream(up) else {
        let known: Vec<_> = gw.view().upstreams.iter().map(|u| u.name.clone()).collect();
        return error(StatusCode::NOT_FOUND, format!("no upstream `{up}` (upstreams: {})", known.join(", ")));
    };
    let Some(canary) = upstream.canary.clone() else {
        return error(
            StatusCode::CONFLICT,
            format!("upstream `{up}` has no canary (add `canary: {{plugin: NAME, share: 0.05}}` to it in the config)"),
        );
    };
    let what = if promote { "canary promoted" } else { "canary aborted" };
    let result = reload::edit_upstream(gw, up, what, move |cfg| {
        if promote {
            cfg.strategy = canary.strategy();
        }
        cfg.canary = None;
        Ok(())
    })
    .await;
    match result {
        Ok(version) => {
            let now = gw.upstream(up);
            let strategy = now.as_ref().map(|u| serde_json::to_value(&u.config.strategy).unwrap_or(Value::Null));
            json_response(
                StatusCode::OK,
                json!({
                    "upstream": up,
                    "done": if promote { "promoted" } else { "aborted" },
                    "version": version,
                    "strategy": strategy,
                    "config_file": gw.config_path.as_ref().map(|p| p.display().to_string()),
                    "note": "the running config changed, the config file did not: edit it too (set `strategy` and remove `canary`), or the next reload from the file brings the canary back",
                }),
            )
        }
        Err(e) => json_response(StatusCode::UNPROCESSABLE_ENTITY, json!({ "error": e, "upstream": up })),
    }
}

/// `POST /api/upstreams/{up}/backends/{id}/drain|undrain`.
pub fn drain(gw: &Gateway, up: &str, id: &str, drained: bool) -> AdminResponse {
    let Some(upstream) = gw.upstream(up) else {
        let known: Vec<_> = gw.view().upstreams.iter().map(|u| u.name.clone()).collect();
        return error(StatusCode::NOT_FOUND, format!("no upstream `{up}` (upstreams: {})", known.join(", ")));
    };
    let action = if drained { "drained" } else { "undrained" };
    match upstream.pool.update_status(id, |s| s.drained = drained) {
        Some(status) => {
            tracing::info!(upstream = %up, backend = %id, drained, "backend {action} by the admin API");
            json_response(
                StatusCode::OK,
                json!({"upstream": up, "backend": id, "drained": status.drained, "healthy": status.healthy()}),
            )
        }
        None => {
            let ids: Vec<_> = upstream.pool.snapshot().members.iter().map(|m| m.entry.id.clone()).collect();
            error(
                StatusCode::NOT_FOUND,
                format!("upstream `{up}` has no backend `{id}` (backends: {})", ids.join(", ")),
            )
        }
    }
}
