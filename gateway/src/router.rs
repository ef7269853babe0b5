//! Routes: which upstream serves a request, by host and path prefix.

use crate::config;
use crate::upstream::Upstream;
use std::collections::HashMap;
use std::sync::Arc;

/// A compiled route.
#[derive(Debug)]
pub struct Route {
    /// Name for logs.
    pub name: String,
    host: HostMatch,
    prefix: String,
    /// Where matching requests go.
    pub upstream: Arc<Upstream>,
    /// Requests and latency as the client sees them (kept across reloads by name).
    pub metrics: Arc<crate::metrics::RouteMetrics>,
    /// The route's names as its access-log lines carry them.
    pub log_names: crate::access_log::Names,
}

#[derive(Debug)]
enum HostMatch {
    Any,
    Exact(String),
    /// `*.example.com` stored as `.example.com`.
    Suffix(String),
}

/// The route table, first match wins.
#[derive(Debug)]
pub struct Router {
    routes: Vec<Route>,
}

impl Router {
    /// Compiles `routes` against the built upstreams (names already validated).
    pub fn new(routes: &[config::Route], upstreams: &HashMap<String, Arc<Upstream>>) -> Self {
        let routes = routes
            .iter()
            .enumerate()
            .map(|(i, r)| (r.name.clone().unwrap_or_else(|| format!("route-{i}")), r))
            .map(|(name, r)| Route {
                metrics: crate::metrics::control().route(&name),
                log_names: crate::access_log::Names::new(
                    &name,
                    &r.upstream,
                    &upstreams[&r.upstream].config.strategy.plugin,
                ),
                name,
                host: match r.host.as_deref() {
                    None | Some("*") => HostMatch::Any,
                    Some(h) => match h.strip_prefix('*') {
                        Some(suffix) => HostMatch::Suffix(suffix.to_ascii_lowercase()),
                        None => HostMatch::Exact(h.to_ascii_lowercase()),
                    },
                },
                prefix: r.path_prefix.clone(),
                upstream: upstreams[&r.upstream].clone(),
            })
            .collect();
        Router { routes }
    }

    /// Every route, in order.
    pub fn routes(&self) -> &[Route] {
        &self.routes
    }

    /// The first route matching `host` (port ignored) and `path`.
    pub fn route(&self, host: Option<&str>, path: &str) -> Option<&Route> {
        self.find(host, path).map(|i| &self.routes[i])
    }

    /// The index of the first route matching `host` (port ignored) and `path`.
    pub fn find(&self, host: Option<&str>, path: &str) -> Option<usize> {
        let host = host.map(strip_port);
        self.routes.iter().position(|r| {
            let host_ok = match (&r.host, host) {
                (HostMatch::Any, _) => true,
                (HostMatch::Exact(h), Some(got)) => got.eq_ignore_ascii_case(h),
                (HostMatch::Suffix(s), Some(got)) => {
                    got.len() > s.len() && got[got.len() - s.len()..].eq_ignore_ascii_case(s)
                }
                (_, None) => false,
            };
            host_ok && prefix_matches(&r.prefix, path)
        })
    }
}

/// Whether `path` is under `prefix` segment by segment: `/api` matches `/api`, `/api/`
/// and `/api/x`, not `/apiary`; a prefix ending in `/` matches everything below it.
fn prefix_matches(prefix: &str, path: &str) -> bool {
    match path.strip_prefix(prefix) {
        Some(rest) => prefix.ends_with('/') || rest.is_empty() || rest.starts_with('/') || rest.starts_with('?'),
        None => false,
    }
}

fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        return host.split_once(']').map_or(host, |(h, _)| &h[1..]);
    }
    host.rsplit_once(':').filter(|(_, p)| p.bytes().all(|b| b.is_ascii_digit())).map_or(host, |(h, _)| h)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_path_prefix_matches_whole_segments_only() {
        assert!(prefix_matches("/api", "/api"));
        assert!(prefix_matches("/api", "/api/"));
        assert!(prefix_matches("/api", "/api/v1/x"));
        assert!(!prefix_matches("/api", "/apiary"));
        assert!(!prefix_matches("/api", "/ap"));
        assert!(prefix_matches("/api/", "/api/x"));
        assert!(!prefix_matches("/api/", "/api"));
        assert!(prefix_matches("/", "/anything"));
    }

    #[test]
    fn host_port_is_ignored_and_wildcards_match_subdomains_only() {
        assert_eq!(strip_port("example.com:8080"), "example.com");
        assert_eq!(strip_port("[::1]:80"), "::1");
        assert_eq!(strip_port("example.com"), "example.com");
    }
}
