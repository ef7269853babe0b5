//! `GET /metrics`: the shards merged and written as OpenMetrics text by the
//! `prometheus-client` crate. Runs only when scraped; the request path never formats a
//! label.

use super::{CLASSES, Closed, Generated, HistogramSnapshot, RetryReason, UpstreamMetrics};
use crate::gateway::Gateway;
use crate::view::View;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::{Registry, Unit};
use std::fmt::Error;
use std::sync::Arc;

/// `step` label values of a chain's steps (a chain has at most 8).
const STEP_LABELS: [&str; 8] = ["0", "1", "2", "3", "4", "5", "6", "7"];
use std::sync::atomic::Ordering::Relaxed;

/// The whole exposition, `# EOF` included.
pub fn encode(gw: &Gateway) -> String {
    let mut registry = Registry::with_prefix("gateway");
    registry.register_collector(Box::new(Scrape {
        view: gw.view(),
        access_log: gw.proxy.access_log.clone(),
        discovery: gw.discovery.states(),
    }));
    let mut out = String::with_capacity(64 * 1024);
    if prometheus_client::encoding::text::encode(&mut out, &registry).is_err() {
        tracing::error!("encoding /metrics failed");
    }
    out
}

#[derive(Debug)]
struct Scrape {
    view: Arc<View>,
    access_log: Option<Arc<crate::access_log::AccessLog>>,
    discovery: std::collections::HashMap<String, crate::discovery::SourceState>,
}

type Labels<'a> = Vec<(&'static str, &'a str)>;

fn counter(enc: &mut DescriptorEncoder, name: &str, help: &str, series: &[(Labels<'_>, u64)]) -> Result<(), Error> {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, v) in series {
        ConstCounter::new(*v).encode(m.encode_family(labels)?)?;
    }
    Ok(())
}

fn gauge(enc: &mut DescriptorEncoder, name: &str, help: &str, series: &[(Labels<'_>, i64)]) -> Result<(), Error> {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, v) in series {
        ConstGauge::new(*v).encode(m.encode_family(labels)?)?;
    }
    Ok(())
}

fn histogram(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    series: &[(Labels<'_>, HistogramSnapshot)],
) -> Result<(), Error> {
    let mut m = enc.encode_descriptor(name, help, Some(&Unit::Seconds), MetricType::Histogram)?;
    for (labels, h) in series {
        // Per-bucket counts: the encoder accumulates them.
        let buckets: Vec<(f64, u64)> =
            h.bounds_s.iter().copied().chain([f64::INFINITY]).zip(h.counts.iter().copied()).collect();
        m.encode_family(labels)?.encode_histogram::<prometheus_client::encoding::NoLabelSet>(
            h.sum_s(),
            h.count(),
            &buckets,
            None,
        )?;
    }
    Ok(())
}

impl Scrape {
    /// Canaries and shadows: responses per arm, and the shadow's agreement and would-be
    /// distribution.
    fn encode_trials(&self, enc: &mut DescriptorEncoder, view: &View) -> Result<(), Error> {
        use crate::select::Arm;
        let mut responses = Vec::new();
        let mut shadow_decisions = Vec::new();
        let mut shadow_picks = Vec::new();
        let counts: Vec<_> = view.upstreams.iter().map(|u| u.shadow.as_ref().map(|s| s.counts())).collect();
        for (u, shadow_counts) in view.upstreams.iter().zip(&counts) {
            if let Some(c) = &u.canary {
                for (arm, plugin) in [(Arm::Live, u.selector.name()), (Arm::Canary, c.config.plugin.as_str())] {
                    for (class, n) in CLASSES.iter().zip(c.responses(arm)) {
                        let labels = vec![
                            ("upstream", u.name.as_str()),
                            ("arm", Arm::LABELS[arm as usize]),
                            ("plugin", plugin),
                            ("code", *class),
                        ];
                        responses.push((labels, n));
                    }
                }
            }
            if let (Some(sh), Some(c)) = (&u.shadow, shadow_counts) {
                let base = vec![("upstream", u.name.as_str()), ("plugin", sh.config.plugin.as_str())];
                for (result, n) in [
                    ("agreed", c.agreed),
                    ("disagreed", c.disagreed),
                    ("passed", c.passed),
                    ("failed", c.failed),
                    ("skipped", c.skipped),
                ] {
                    let mut l = base.clone();
                    l.push(("result", result));
                    shadow_decisions.push((l, n));
                }
                for (id, [live, shadow]) in &c.picks {
                    for (by, n) in [("live", *live), ("shadow", *shadow)] {
                        let mut l = base.clone();
                        l.push(("backend", id.as_str()));
                        l.push(("decided_by", by));
                        shadow_picks.push((l, n));
                    }
                }
            }
        }
        counter(
            enc,
            "canary_responses",
            "Responses to requests of an upstream with a canary, by the arm that decided (live: the upstream's strategy; canary) and status class.",
            &responses,
        )?;
        counter(
            enc,
            "shadow_decisions",
            "Sampled requests the shadow strategy was asked about, by result: agreed or disagreed with the live decision, passed, failed (trap, timeout, bad answer; the live request was not affected), skipped (instance not ready).",
            &shadow_decisions,
        )?;
        counter(
            enc,
            "shadow_picks",
            "Over the shadow's sample: the backend the live strategy chose (decided_by=live) and the one the shadow would have chosen (decided_by=shadow); backend `-` is a reject.",
            &shadow_picks,
        )
    }
}

fn bool_gauge(b: bool) -> i64 {
    i64::from(b)
}

impl prometheus_client::collector::Collector for Scrape {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), Error> {
        let view = &self.view;
        let global = super::global();

        // The process.
        let version = env!("CARGO_PKG_VERSION");
        {
            let mut m = enc.encode_descriptor(
                "build",
                "Version of the gateway and of its Wasm runtime.",
                None,
                MetricType::Info,
            )?;
            m.encode_info(&vec![("version", version), ("wasmtime", WASMTIME_VERSION)])?;
        }
        let in_flight = global.iter().fold(0u64, |acc, s| acc.wrapping_add(s.in_flight.load(Relaxed))) as i64;
        gauge(&mut enc, "requests_in_flight", "Client requests being handled now.", &[(vec![], in_flight)])?;
        counter(
            &mut enc,
            "connections",
            "Client connections accepted.",
            &[(vec![], global.sum(|s| s.connections.get()))],
        )?;
        counter(
            &mut enc,
            "proxy_protocol_refused",
            "Client connections closed on a `proxy_protocol: true` listener because they sent no valid PROXY protocol header.",
            &[(vec![], global.sum(|s| s.proxy_protocol_refused.get()))],
        )?;
        let mut generated = Vec::new();
        for (i, reason) in Generated::LABELS.iter().enumerate() {
            for (c, class) in CLASSES.iter().enumerate() {
                let n = global.sum(|s| s.generated[i][c].get());
                if n > 0 {
                    generated.push((vec![("reason", *reason), ("code", *class)], n));
                }
            }
        }
        counter(
            &mut enc,
            "generated_responses",
            "Responses the gateway made itself instead of a backend, by reason: no_route (404), no_healthy_backend (503), backend_failed (502), backend_timeout (504), plugin_reject, bad_request (400/431 for malformed requests, 400 for an encoded slash in the path), body_too_large (413, the route's max_body_bytes), request_timeout (504, the route's total timeout), https_redirect (308 from a redirect listener), out_of_descriptors (503: the gateway could not open a backend connection for lack of file descriptors), body_timeout (408: the request body stalled for longer than the listener's body_timeout).",
            &generated,
        )?;

        let closed: Vec<_> = Closed::LABELS
            .iter()
            .enumerate()
            .map(|(i, reason)| (vec![("reason", *reason)], global.sum(|s| s.closed[i].get())))
            .collect();
        counter(
            &mut enc,
            "connections_closed",
            "Client connections the gateway closed itself, by reason: header_timeout (request head or TLS handshake slower than the listener's header_timeout), idle_timeout, tls_handshake_failed.",
            &closed,
        )?;
        counter(
            &mut enc,
            "connection_limit_reached",
            "Times a listener reached its max_connections (or the cap the open-file limit sets) and left new connections waiting in the accept backlog.",
            &[(vec![], global.sum(|s| s.at_connection_limit.get()))],
        )?;
        counter(
            &mut enc,
            "accept_out_of_descriptors",
            "Times accepting a client connection failed because the gateway (EMFILE) or the system (ENFILE) was out of file descriptors; the accept loop backs off.",
            &[(vec![], global.sum(|s| s.accept_out_of_descriptors.get()))],
        )?;

        // Routes.
        let mut route_requests = Vec::new();
        let mut route_duration = Vec::new();
        for r in view.router.routes() {
            for (c, class) in CLASSES.iter().enumerate() {
                let n = r.metrics.shards.sum(|s| s.requests[c].get());
                if n > 0 {
                    route_requests.push((
                        vec![("route", r.name.as_str()), ("upstream", r.upstream.name.as_str()), ("code", *class)],
                        n,
                    ));
                }
            }
            route_duration
                .push((vec![("route", r.name.as_str())], HistogramSnapshot::of(&r.metrics.shards, |s| &s.duration)));
        }
        counter(
            &mut enc,
            "route_requests",
            "Requests each route took, by status class of the answer the client got (the gateway's own answers included).",
            &route_requests,
        )?;
        histogram(
            &mut enc,
            "request_duration",
            "Client view: from the request's arrival to its response headers, per route.",
            &route_duration,
        )?;

        // Backends.
        let snaps: Vec<_> = view.upstreams.iter().map(|u| (u, u.pool.snapshot())).collect();
        let mut requests = Vec::new();
        let (mut latency, mut bytes_in, mut bytes_out, mut active, mut failures) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let (mut up, mut healthy, mut drained, mut ejected) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut pending = Vec::new();
        let (mut ejections, mut transitions, mut check_failures, mut check_duration) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (u, snap) in &snaps {
            for member in &snap.members {
                let e = &member.entry;
                let m = &e.metrics;
                let labels = vec![("upstream", u.name.as_str()), ("backend", e.id.as_str())];
                for (c, class) in CLASSES.iter().enumerate() {
                    let n = m.shards.sum(|s| s.requests[c].get());
                    if n > 0 || c == 1 {
                        let mut l = labels.clone();
                        l.push(("code", *class));
                        requests.push((l, n));
                    }
                }
                latency.push((labels.clone(), HistogramSnapshot::of(&m.shards, |s| &s.latency)));
                bytes_in.push((labels.clone(), m.shards.sum(|s| s.bytes_in.get())));
                bytes_out.push((labels.clone(), m.shards.sum(|s| s.bytes_out.get())));
                active.push((labels.clone(), i64::from(e.stats.active())));
                failures.push((labels.clone(), e.stats.failures()));
                up.push((labels.clone(), bool_gauge(member.status.up)));
                healthy.push((labels.clone(), bool_gauge(member.status.healthy())));
                drained.push((labels.clone(), bool_gauge(member.status.drained)));
                ejected.push((labels.clone(), bool_gauge(member.status.ejected_until.is_some())));
                if e.source != crate::pool::Source::Static {
                    pending.push((labels.clone(), bool_gauge(member.status.pending)));
                }
                ejections.push((labels.clone(), m.health.ejections.get()));
                for (to, n) in [("up", m.health.to_up.get()), ("down", m.health.to_down.get())] {
                    let mut l = labels.clone();
                    l.push(("to", to));
                    transitions.push((l, n));
                }
                if u.health_check.enabled {
                    check_failures.push((labels.clone(), m.health.failures.get()));
                    check_duration.push((labels.clone(), m.health.duration.snapshot()));
                }
            }
        }
        counter(
            &mut enc,
            "requests",
            "Requests answered by a backend, by upstream, backend id and status class.",
            &requests,
        )?;
        histogram(
            &mut enc,
            "upstream_duration",
            "From sending a request to a backend to its response headers.",
            &latency,
        )?;
        counter(&mut enc, "request_bytes", "Request body bytes sent to each backend.", &bytes_in)?;
        counter(&mut enc, "response_bytes", "Response body bytes from each backend passed to clients.", &bytes_out)?;
        gauge(&mut enc, "backend_active_requests", "Requests in flight to each backend.", &active)?;
        counter(
            &mut enc,
            "backend_failures",
            "Failed requests to each backend (connect errors, 5xx, timeouts).",
            &failures,
        )?;
        gauge(&mut enc, "backend_up", "1 if active health checks say the backend is up, else 0.", &up)?;
        gauge(
            &mut enc,
            "backend_healthy",
            "1 if the backend takes new requests (up, not ejected, not drained), else 0.",
            &healthy,
        )?;
        gauge(&mut enc, "backend_drained", "1 if an operator drained the backend.", &drained)?;
        gauge(&mut enc, "backend_ejected", "1 if passive health ejected the backend for now.", &ejected)?;
        gauge(
            &mut enc,
            "backend_pending",
            "1 if a discovered backend waits for its first passing health check (no traffic yet), else 0.",
            &pending,
        )?;
        let mut sources: Vec<(&String, &crate::discovery::SourceState)> = self.discovery.iter().collect();
        sources.sort_by_key(|(name, _)| *name);
        let instances: Vec<_> = sources
            .iter()
            .map(|(name, s)| (vec![("upstream", name.as_str()), ("source", s.source)], s.instances as i64))
            .collect();
        gauge(&mut enc, "discovery_instances", "Instances in the last set a discovery source published.", &instances)?;
        let errors: Vec<_> = sources
            .iter()
            .map(|(name, s)| (vec![("upstream", name.as_str()), ("source", s.source)], s.errors))
            .collect();
        counter(
            &mut enc,
            "discovery_errors",
            "Failed discovery lookups (DNS) or lost etcd connections; the last known backends kept serving.",
            &errors,
        )?;
        let connected: Vec<_> = sources
            .iter()
            .filter_map(|(name, s)| {
                s.connected.map(|c| (vec![("upstream", name.as_str()), ("source", s.source)], i64::from(c)))
            })
            .collect();
        gauge(
            &mut enc,
            "discovery_connected",
            "1 while the discovery source (etcd) is connected and watching, 0 while it keeps the last known backends.",
            &connected,
        )?;
        counter(&mut enc, "backend_ejections", "Passive ejections after consecutive failures.", &ejections)?;
        counter(
            &mut enc,
            "health_check_transitions",
            "Backends going up or down by active health checks.",
            &transitions,
        )?;
        counter(&mut enc, "health_check_failures", "Failed active health checks.", &check_failures)?;
        histogram(&mut enc, "health_check_duration", "Duration of each active health check.", &check_duration)?;

        // Upstreams and their plugins.
        let (mut retries, mut retries_skipped) = (Vec::new(), Vec::new());
        let (mut decisions, mut fallbacks, mut plugin_failures, mut decision_time, mut info) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let (mut dropped_headers, mut quarantined, mut quarantines) = (Vec::new(), Vec::new(), Vec::new());
        let mut passes = Vec::new();
        let plugins: Vec<_> = view.upstreams.iter().map(|u| u.selector.binding().plugin()).collect();
        for (u, plugin) in view.upstreams.iter().zip(&plugins) {
            let m = &u.metrics;
            for (i, reason) in RetryReason::LABELS.iter().enumerate() {
                retries.push((
                    vec![("upstream", u.name.as_str()), ("reason", *reason)],
                    m.shards.sum(|s| s.retries[i].get()),
                ));
            }
            retries_skipped.push((
                vec![("upstream", u.name.as_str()), ("reason", "budget")],
                m.shards.sum(|s| s.retries_skipped.get()),
            ));
            // A chain's series name its strategy `a > b > c`; per-step ones add `step`.
            let strategy = if u.selector.is_chain() { u.selector.name() } else { plugin.name.as_str() };
            let labels = vec![("upstream", u.name.as_str()), ("plugin", strategy)];
            dropped_headers.push((labels.clone(), m.dropped_headers.get()));
            fallbacks.push((labels.clone(), m.fallbacks.get()));
            let setup_failures: u64 = u.selector.bindings().map(|b| b.setup_failures()).sum();
            for (kind, c) in UpstreamMetrics::FAILURE_KINDS.iter().zip(&m.failures) {
                let mut l = labels.clone();
                l.push(("kind", *kind));
                // Instances that failed to build off the request path count as `instantiate`.
                let off_path = if *kind == "instantiate" { setup_failures } else { 0 };
                plugin_failures.push((l, c.get() + off_path));
            }
            for (i, step) in u.selector.steps().enumerate() {
                let mut l = vec![("upstream", u.name.as_str()), ("plugin", step.name)];
                if u.selector.is_chain() {
                    l.push(("step", STEP_LABELS.get(i).copied().unwrap_or("many")));
                }
                decisions.push((l.clone(), step.decisions));
                passes.push((l.clone(), step.passes));
                quarantined.push((l.clone(), i64::from(step.binding.quarantined_for().is_some())));
                quarantines.push((l, step.binding.quarantines()));
            }
            decision_time
                .push((vec![("upstream", u.name.as_str())], HistogramSnapshot::of(&m.shards, |s| &s.decision_time)));
        }
        // One series per plugin in use: every step of a chain.
        let in_use: Vec<_> =
            view.upstreams.iter().flat_map(|u| u.bindings().map(move |b| (u.name.as_str(), b.plugin()))).collect();
        let origins: Vec<String> = in_use.iter().map(|(_, p)| p.origin.to_string()).collect();
        for ((upstream, plugin), origin) in in_use.iter().zip(&origins) {
            info.push(vec![
                ("upstream", *upstream),
                ("plugin", plugin.name.as_str()),
                ("origin", origin.as_str()),
                ("sha256", plugin.hash.as_str()),
            ]);
        }
        counter(
            &mut enc,
            "retries",
            "Requests sent again to another backend, by why the previous attempt failed (backend_down: the backend went down while the request waited for its response headers).",
            &retries,
        )?;
        counter(
            &mut enc,
            "retries_skipped",
            "Retries not made, by reason (budget: the upstream's retry_budget was spent; the client got the failed attempt's answer).",
            &retries_skipped,
        )?;
        counter(
            &mut enc,
            "plugin_decisions",
            "Backend decisions asked of each upstream's plugin (of a chain: of each step, labelled `step`).",
            &decisions,
        )?;
        counter(
            &mut enc,
            "plugin_passes",
            "Requests a plugin passed on (`pass`): to the next step of its chain, or after the last step to the native round robin (counted in plugin_fallbacks too).",
            &passes,
        )?;
        counter(
            &mut enc,
            "plugin_fallbacks",
            "Decisions the native round robin made because the plugin failed, or because every step of the strategy passed.",
            &fallbacks,
        )?;
        counter(
            &mut enc,
            "plugin_failures",
            "Plugin calls that failed, by kind (trap, timeout, bad_answer, instantiate).",
            &plugin_failures,
        )?;
        gauge(
            &mut enc,
            "plugin_quarantined",
            "1 while the upstream's plugin is quarantined (its calls kept failing; the fallback round robin serves).",
            &quarantined,
        )?;
        counter(
            &mut enc,
            "plugin_quarantines",
            "Times the upstream's plugin was put in quarantine (including extensions after a failed try).",
            &quarantines,
        )?;
        counter(
            &mut enc,
            "plugin_dropped_headers",
            "Response headers a plugin set that would change the response's framing or connection (content-length, transfer-encoding, connection, ...): dropped.",
            &dropped_headers,
        )?;
        histogram(
            &mut enc,
            "plugin_decision_duration",
            "Time of one plugin decision (pick), sampled: one decision in 16 is timed. Buckets from 250 ns to 100 ms.",
            &decision_time,
        )?;
        {
            let mut m = enc.encode_descriptor(
                "plugin",
                "The plugin each upstream uses: name, where it came from, SHA-256 of its component.",
                None,
                MetricType::Info,
            )?;
            for labels in &info {
                m.encode_info(labels)?;
            }
        }
        self.encode_trials(&mut enc, view)?;
        let control = super::control();
        let swaps: Vec<((String, &'static str), u64)> =
            control.swaps.lock().unwrap_or_else(|e| e.into_inner()).iter().map(|(k, v)| (k.clone(), *v)).collect();
        let swap_series: Vec<_> = swaps
            .iter()
            .map(|((plugin, result), n)| (vec![("plugin", plugin.as_str()), ("result", *result)], *n))
            .collect();
        counter(
            &mut enc,
            "plugin_swaps",
            "Hot swaps of plugin files: ok (swapped in), refused (the last good version kept serving).",
            &swap_series,
        )?;
        let (lines, dropped) = self.access_log.as_ref().map_or((0, 0), |l| (l.lines(), l.dropped_lines()));
        counter(&mut enc, "access_log_lines", "Access-log lines written.", &[(vec![], lines)])?;
        counter(
            &mut enc,
            "access_log_dropped",
            "Access-log lines dropped because the writer was behind (a slow disk); requests never wait for the log.",
            &[(vec![], dropped)],
        )?;

        // Config.
        counter(
            &mut enc,
            "config_reloads",
            "Config reloads: ok (applied) or refused (the previous config kept serving).",
            &[
                (vec![("result", "ok")], control.reloads_ok.get()),
                (vec![("result", "refused")], control.reloads_refused.get()),
            ],
        )?;
        counter(
            &mut enc,
            "tls_certificate_reloads",
            "TLS certificate reloads: ok (new handshakes use the new certificate) or refused (the previous one kept serving).",
            &[
                (vec![("result", "ok")], control.cert_reloads_ok.get()),
                (vec![("result", "refused")], control.cert_reloads_refused.get()),
            ],
        )?;
        gauge(
            &mut enc,
            "config_last_reload_success_timestamp_seconds",
            "When the serving config was loaded, seconds since the Unix epoch.",
            &[(vec![], (control.last_reload_success_ms.load(Relaxed) / 1000) as i64)],
        )?;
        Ok(())
    }
}

/// The wasmtime version the gateway is built with (pinned in the workspace).
const WASMTIME_VERSION: &str = "48.0.8";
