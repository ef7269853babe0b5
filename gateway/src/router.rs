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
    /// Largest request body passed on (`413` beyond it); none: no limit.
    pub max_body_bytes: Option<u64>,
    /// Arrival to response headers, all attempts included (`504`): the route's
    /// `timeout`, else the upstream's `timeouts.request`; none: no total bound.
    pub timeout: Option<std::time::Duration>,
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
                log_names: crate::access_log::Names::new(&name, &r.upstream, upstreams[&r.upstream].selector.name()),
                name,
                host: match r.host.as_deref() {
                    None | Some("*") => HostMatch::Any,
                    Some(h) => match h.strip_prefix('*') {
                        Some(suffix) => HostMatch::Suffix(suffix.to_ascii_lowercase()),
                        None => HostMatch::Exact(h.to_ascii_lowercase()),
                    },
                },
                prefix: r.path_prefix.clone(),
                max_body_bytes: r.max_body_bytes,
                timeout: r.timeout.or(upstreams[&r.upstream].timeouts.request),
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

/// Why a request path was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// `%2F` or `%5C` (an encoded `/` or `\`): a backend that decodes it would see other
    /// segments than the router did.
    #[error("the path contains an encoded slash or backslash (%2F, %5C)")]
    EncodedSlash,
    /// Not an origin-form path (does not start with `/`).
    #[error("the path does not start with `/`")]
    NotAbsolute,
}

/// The path a request is routed and forwarded with: `%2e`/`%2E` decoded to `.` (it is an
/// unreserved character, RFC 3986 §6.2.2.2) and dot-segments removed (RFC 3986 §5.2.4,
/// `remove_dot_segments`), so `/public/../private` and `/public/%2e%2e/private` are both
/// `/private`. Encoded slashes and backslashes are refused: a backend that decodes them
/// would split the path differently from the router. Borrowed (no allocation) when the
/// path is already normal, the common case. `*` (for `OPTIONS *`) is kept.
pub fn normalize_path(path: &str) -> Result<std::borrow::Cow<'_, str>, PathError> {
    use std::borrow::Cow;
    let bytes = path.as_bytes();
    if path == "*" {
        return Ok(Cow::Borrowed(path));
    }
    if bytes.first() != Some(&b'/') {
        return Err(PathError::NotAbsolute);
    }
    let mut has_dot_escape = false;
    let mut i = 0;
    while let Some(off) = bytes[i..].iter().position(|&b| b == b'%') {
        let at = i + off;
        if let Some(hex) = bytes.get(at + 1..at + 3) {
            match (hex[0], hex[1].to_ascii_uppercase()) {
                (b'2', b'F') | (b'5', b'C') => return Err(PathError::EncodedSlash),
                (b'2', b'E') => has_dot_escape = true,
                _ => {}
            }
        }
        i = at + 1;
    }
    if !has_dot_escape && !has_dot_segment(path) {
        return Ok(Cow::Borrowed(path));
    }
    let decoded: Cow<'_, str> = if has_dot_escape {
        let mut out = String::with_capacity(path.len());
        let mut rest = path;
        while let Some(at) = rest.find('%') {
            out.push_str(&rest[..at]);
            let escape = rest.get(at..at + 3);
            if escape.is_some_and(|e| e.eq_ignore_ascii_case("%2e")) {
                out.push('.');
                rest = &rest[at + 3..];
            } else {
                out.push('%');
                rest = &rest[at + 1..];
            }
        }
        out.push_str(rest);
        Cow::Owned(out)
    } else {
        Cow::Borrowed(path)
    };
    Ok(Cow::Owned(remove_dot_segments(&decoded)))
}

/// Whether a segment of `path` is `.` or `..`.
fn has_dot_segment(path: &str) -> bool {
    path.split('/').any(|s| s == "." || s == "..")
}

/// RFC 3986 §5.2.4 for an absolute path: `.` segments dropped, `..` removes the segment
/// before it (never above the root); a trailing `.` or `..` leaves a trailing `/`.
fn remove_dot_segments(path: &str) -> String {
    let mut out: Vec<&str> = Vec::new();
    let segments: Vec<&str> = path[1..].split('/').collect();
    let last = segments.len() - 1;
    for (i, seg) in segments.iter().enumerate() {
        match *seg {
            "." | ".." => {
                if *seg == ".." {
                    out.pop();
                }
                if i == last {
                    out.push("");
                }
            }
            s => out.push(s),
        }
    }
    let mut result = String::with_capacity(path.len());
    for seg in &out {
        result.push('/');
        result.push_str(seg);
    }
    if result.is_empty() {
        result.push('/');
    }
    result
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
    fn dot_segments_are_removed_and_encoded_dots_decoded() {
        let n = |p: &str| normalize_path(p).map(|c| c.into_owned());
        assert_eq!(n("/api/v1/x").unwrap(), "/api/v1/x");
        assert!(matches!(normalize_path("/api/v1/x"), Ok(std::borrow::Cow::Borrowed(_))), "no allocation");
        assert_eq!(n("/public/../private").unwrap(), "/private");
        assert_eq!(n("/public/%2e%2e/private").unwrap(), "/private");
        assert_eq!(n("/public/%2E./private").unwrap(), "/private");
        assert_eq!(n("/a/./b/.").unwrap(), "/a/b/");
        assert_eq!(n("/a/b/..").unwrap(), "/a/");
        assert_eq!(n("/../../etc/passwd").unwrap(), "/etc/passwd");
        assert_eq!(n("/..").unwrap(), "/");
        assert_eq!(n("/a/.hidden/..x/b").unwrap(), "/a/.hidden/..x/b");
        assert_eq!(n("/a%2ejson").unwrap(), "/a.json");
        assert_eq!(n("/a%20b/%41").unwrap(), "/a%20b/%41", "other escapes are kept");
        assert_eq!(n("/a//b").unwrap(), "/a//b", "empty segments are kept");
        assert_eq!(n("*").unwrap(), "*");
    }

    #[test]
    fn encoded_slashes_are_refused() {
        assert_eq!(normalize_path("/public%2F..%2Fprivate"), Err(PathError::EncodedSlash));
        assert_eq!(normalize_path("/public/%2f"), Err(PathError::EncodedSlash));
        assert_eq!(normalize_path("/a%5C..%5Cb"), Err(PathError::EncodedSlash));
        assert_eq!(normalize_path("/100%"), Ok("/100%".into()));
    }

    #[test]
    fn host_port_is_ignored_and_wildcards_match_subdomains_only() {
        assert_eq!(strip_port("example.com:8080"), "example.com");
        assert_eq!(strip_port("[::1]:80"), "::1");
        assert_eq!(strip_port("example.com"), "example.com");
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        /// Paths made of the pieces that matter: dots, encoded dots and slashes, slashes.
        fn path() -> impl Strategy<Value = String> {
            prop::collection::vec(
                prop_oneof!["/", "\\.", "\\.\\.", "%2e", "%2E", "%2f", "%5c", "%", "[a-z]{1,3}", "%41"],
                0..12,
            )
            .prop_map(|parts| format!("/{}", parts.concat()))
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(2048))]

            /// A normalized path starts with `/`, has no dot-segment or encoded dot left, and
            /// normalizing it again changes nothing; a refused one had an encoded slash.
            #[test]
            fn normalized_paths_are_normal_and_stable(p in path()) {
                match normalize_path(&p) {
                    Ok(n) => {
                        prop_assert!(n.starts_with('/'), "{p:?} -> {n:?}");
                        prop_assert!(!has_dot_segment(&n), "{p:?} -> {n:?} keeps a dot segment");
                        prop_assert!(!n.to_ascii_lowercase().contains("%2e"), "{p:?} -> {n:?}");
                        prop_assert_eq!(normalize_path(&n).unwrap(), n.clone());
                    }
                    Err(PathError::EncodedSlash) => {
                        let lower = p.to_ascii_lowercase();
                        prop_assert!(lower.contains("%2f") || lower.contains("%5c"), "{p:?}");
                    }
                    Err(e) => prop_assert!(false, "{p:?}: {e}"),
                }
            }

            /// Any bytes at all: no panic, and a refusal only for a real reason.
            #[test]
            fn any_path_is_normalized_or_refused_without_panicking(p in "\\PC{0,40}") {
                if let Ok(n) = normalize_path(&p) {
                    prop_assert!(p == "*" || !p.starts_with('/') || n.starts_with('/'));
                }
            }

            /// A prefix matches whole segments only.
            #[test]
            fn a_prefix_matches_whole_segments(prefix in "/[a-z]{1,4}", rest in "[a-z/?]{0,6}") {
                let path = format!("{prefix}{rest}");
                let expected = rest.is_empty() || rest.starts_with('/') || rest.starts_with('?');
                prop_assert_eq!(prefix_matches(&prefix, &path), expected, "{} under {}", path, prefix);
            }
        }
    }
}
