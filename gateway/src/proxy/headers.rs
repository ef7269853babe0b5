//! Header rewriting: hop-by-hop removal, `X-Forwarded-*` and `traceparent`.

use super::trace::{TRACEPARENT, Trace};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use std::net::IpAddr;

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
/// Request id, generated when the client sent none.
pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// A client asking how its request was routed (`1`); never forwarded.
pub const X_GATEWAY_DEBUG: HeaderName = HeaderName::from_static("x-gateway-debug");
/// The answer to [`X_GATEWAY_DEBUG`]: `upstream=...; plugin=...; backend=...; reason=...`.
pub const X_GATEWAY_DECISION: HeaderName = HeaderName::from_static("x-gateway-decision");
const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Hop-by-hop headers (RFC 9110 §7.6.1), besides those named in `Connection`.
/// `Connection` comes first: its bit is tested below. A `static`, not a `const`: a const
/// array would be built and dropped at every use.
static HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    header::TRANSFER_ENCODING,
    header::TE,
    header::TRAILER,
    header::UPGRADE,
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    KEEP_ALIVE,
    PROXY_CONNECTION,
];

/// The client's IP address as a header value, computed once per connection.
pub fn ip_value(ip: IpAddr) -> HeaderValue {
    HeaderValue::from_str(&ip.to_string()).expect("an IP address is a valid header value")
}

/// Removes hop-by-hop headers, including those named in `Connection`.
pub fn remove_hop_by_hop(headers: &mut HeaderMap) {
    // One pass over the names finds which are present; most messages carry none, or
    // only `Connection: keep-alive`.
    let mut present = 0u16;
    for name in headers.keys() {
        if let Some(i) = hop_by_hop_index(name) {
            present |= 1 << i;
        }
    }
    if present == 0 {
        return;
    }
    if present & 1 != 0 {
        remove_connection_listed(headers);
    }
    for (i, name) in HOP_BY_HOP.iter().enumerate() {
        if present & (1 << i) != 0 {
            headers.remove(name);
        }
    }
}

/// The position of `name` in [`HOP_BY_HOP`]. Matching the lowercase text is a length
/// switch and one compare, far cheaper than nine `HeaderName` comparisons.
fn hop_by_hop_index(name: &HeaderName) -> Option<usize> {
    Some(match name.as_str() {
        "connection" => 0,
        "transfer-encoding" => 1,
        "te" => 2,
        "trailer" => 3,
        "upgrade" => 4,
        "proxy-authenticate" => 5,
        "proxy-authorization" => 6,
        "keep-alive" => 7,
        "proxy-connection" => 8,
        _ => return None,
    })
}

/// Removes the extra names a `Connection` header lists.
fn remove_connection_listed(headers: &mut HeaderMap) {
    for name in connection_listed(headers) {
        headers.remove(name);
    }
}

/// What the gateway adds to a request it forwards.
#[derive(Debug)]
pub struct Forwarding<'a> {
    /// The client's IP, appended to `X-Forwarded-For`.
    pub client_ip: &'a HeaderValue,
    /// The request target's authority (HTTP/1.1 absolute-form, HTTP/2 `:authority`): the
    /// host the route was chosen by, so it replaces any `Host` the client sent.
    pub authority: Option<&'a HeaderValue>,
    /// `X-Request-Id` when the client sent none.
    pub request_id: &'a HeaderValue,
    /// The protocol of an HTTP/1.1 upgrade (WebSocket): keeps `Connection: upgrade`.
    pub upgrade: Option<&'a HeaderValue>,
    /// The request's trace: its `traceparent` replaces the client's.
    pub trace: &'a Trace,
    /// The client connected over TLS: `X-Forwarded-Proto: https`.
    pub https: bool,
}

/// The headers a backend gets (tests: [`for_backend_noting_debug`] without the flag).
#[cfg(test)]
pub fn for_backend(client: &HeaderMap, fwd: &Forwarding<'_>, fallback_host: impl FnOnce() -> HeaderValue) -> HeaderMap {
    for_backend_noting_debug(client, fwd, fallback_host).0
}

/// The headers a backend gets, built in one pass over the client's: hop-by-hop headers
/// (and those `Connection` names) left out, `X-Forwarded-For` extended, `-Proto`,
/// `-Host` and `X-Request-Id` added, `traceparent` set to the gateway's span (`tracestate`
/// passes unchanged), `Host` set to the target's authority when there is one, else kept
/// (last resort: `fallback_host`, the backend's own address, for an HTTP/1.0 client that
/// sent none). The client's map is left as it came,
/// so a retry builds its own copy.
///
/// Also says whether the client sent `X-Gateway-Debug: 1` (which is never forwarded):
/// noticed while the headers are copied, so asking costs no lookup of its own.
pub fn for_backend_noting_debug(
    client: &HeaderMap,
    fwd: &Forwarding<'_>,
    fallback_host: impl FnOnce() -> HeaderValue,
) -> (HeaderMap, bool) {
    let mut debug = false;
    let mut out = HeaderMap::with_capacity(client.keys_len() + 6);
    let listed = if client.contains_key(header::CONNECTION) { connection_listed(client) } else { Vec::new() };
    let mut earlier_xff: Option<Vec<u8>> = None;
    let mut has_request_id = false;
    for (name, value) in client {
        if hop_by_hop_index(name).is_some() || listed.contains(name) {
            continue;
        }
        if name == X_FORWARDED_FOR {
            // Earlier proxies may have sent several lines: keep them all, in order.
            let joined = earlier_xff.get_or_insert_with(Vec::new);
            if !joined.is_empty() {
                joined.extend_from_slice(b", ");
            }
            joined.extend_from_slice(value.as_bytes());
            continue;
        }
        if name == TRACEPARENT {
            continue;
        }
        if name == X_GATEWAY_DEBUG {
            debug |= value.as_bytes() == b"1";
            continue;
        }
        if name == header::HOST && out.contains_key(header::HOST) {
            // One Host, the one the request was routed by (the first); the proxy refuses
            // HTTP/1.1 requests with several, this keeps any other path safe too.
            continue;
        }
        if name == X_REQUEST_ID {
            // One id per request: the client's first non-empty one, else the gateway's.
            if has_request_id || value.is_empty() {
                continue;
            }
            has_request_id = true;
        }
        out.append(name.clone(), value.clone());
    }
    let xff = match earlier_xff {
        None => fwd.client_ip.clone(),
        Some(mut joined) => {
            joined.extend_from_slice(b", ");
            joined.extend_from_slice(fwd.client_ip.as_bytes());
            HeaderValue::from_bytes(&joined).unwrap_or_else(|_| fwd.client_ip.clone())
        }
    };
    out.insert(X_FORWARDED_FOR, xff);
    out.insert(X_FORWARDED_PROTO, HeaderValue::from_static(if fwd.https { "https" } else { "http" }));
    // The host the request was routed by: the request target's authority (absolute-form,
    // or HTTP/2 `:authority`) wins over `Host` (RFC 9112 §3.2.2, RFC 9113 §8.3.1).
    let host = match (fwd.authority, out.get(header::HOST)) {
        (Some(a), _) => {
            out.insert(header::HOST, a.clone());
            a.clone()
        }
        (None, Some(h)) => h.clone(),
        (None, None) => {
            let h = fallback_host();
            out.insert(header::HOST, h.clone());
            h
        }
    };
    out.insert(X_FORWARDED_HOST, host);
    if !has_request_id {
        out.insert(X_REQUEST_ID, fwd.request_id.clone());
    }
    out.insert(TRACEPARENT, fwd.trace.traceparent().clone());
    if let Some(protocol) = fwd.upgrade {
        set_upgrade(&mut out, protocol.clone());
    }
    (out, debug)
}

/// The extra header names a `Connection` header lists (usually none: it says only
/// `keep-alive`, `close` or `upgrade`, which are not header names to remove).
fn connection_listed(headers: &HeaderMap) -> Vec<HeaderName> {
    fn extra(token: &str) -> bool {
        let t = token.trim();
        !t.is_empty() && !["keep-alive", "close", "upgrade"].iter().any(|k| t.eq_ignore_ascii_case(k))
    }
    let values = || headers.get_all(header::CONNECTION).into_iter().filter_map(|v| v.to_str().ok());
    if !values().any(|v| v.split(',').any(extra)) {
        return Vec::new();
    }
    values()
        .flat_map(|v| v.split(','))
        .filter(|t| extra(t))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect()
}

/// The protocol a client asks to upgrade to (`Connection: upgrade` + `Upgrade: X`).
pub fn upgrade_protocol(headers: &HeaderMap) -> Option<HeaderValue> {
    let connection = headers.get(header::CONNECTION)?.to_str().ok()?;
    if !connection.split(',').any(|t| t.trim().eq_ignore_ascii_case("upgrade")) {
        return None;
    }
    headers.get(header::UPGRADE).cloned()
}

/// Sets `Connection: upgrade` and `Upgrade: protocol` (after hop-by-hop removal).
pub fn set_upgrade(headers: &mut HeaderMap, protocol: HeaderValue) {
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, protocol);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_and_connection_listed_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive, X-Secret"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert(KEEP_ALIVE, HeaderValue::from_static("timeout=5"));
        h.insert(header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        h.insert("x-keep", HeaderValue::from_static("1"));
        remove_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-keep"));
    }

    fn forwarding<'a>(ip: &'a HeaderValue, id: &'a HeaderValue) -> Forwarding<'a> {
        static TRACE: std::sync::LazyLock<Trace> = std::sync::LazyLock::new(|| Trace::from_client(&HeaderMap::new()));
        Forwarding { client_ip: ip, authority: None, request_id: id, upgrade: None, trace: &TRACE, https: false }
    }

    #[test]
    fn backend_headers_drop_hop_by_hop_and_add_forwarding() {
        let mut client = HeaderMap::new();
        client.insert(header::HOST, HeaderValue::from_static("shop.example"));
        client.insert(header::CONNECTION, HeaderValue::from_static("keep-alive, X-Secret"));
        client.insert("x-secret", HeaderValue::from_static("1"));
        client.insert(header::TE, HeaderValue::from_static("trailers"));
        client.append("x-keep", HeaderValue::from_static("a"));
        client.append("x-keep", HeaderValue::from_static("b"));
        let (ip, id) = (ip_value("127.0.0.1".parse().unwrap()), HeaderValue::from_static("0123"));
        let out = for_backend(&client, &forwarding(&ip, &id), || unreachable!("the client sent a Host"));
        assert_eq!(out[header::HOST], "shop.example");
        assert_eq!(out[&X_FORWARDED_HOST], "shop.example");
        assert_eq!(out[&X_FORWARDED_FOR], "127.0.0.1");
        assert_eq!(out[&X_FORWARDED_PROTO], "http");
        assert_eq!(out[&X_REQUEST_ID], "0123");
        assert_eq!(out.get_all("x-keep").iter().collect::<Vec<_>>(), ["a", "b"]);
        for gone in [header::CONNECTION, header::TE, HeaderName::from_static("x-secret")] {
            assert!(!out.contains_key(&gone), "{gone} forwarded");
        }
        assert_eq!(client.len(), 6, "the client's headers are left as they came");
    }

    #[test]
    fn forwarded_for_keeps_every_earlier_line_and_the_clients_request_id() {
        let mut client = HeaderMap::new();
        client.append(X_FORWARDED_FOR, HeaderValue::from_static("198.51.100.1"));
        client.append(X_FORWARDED_FOR, HeaderValue::from_static("203.0.113.7"));
        client.insert(X_REQUEST_ID, HeaderValue::from_static("from-client"));
        let (ip, id) = (ip_value("127.0.0.1".parse().unwrap()), HeaderValue::from_static("ours"));
        let authority = HeaderValue::from_static("shop.example:8080");
        let fwd = Forwarding { authority: Some(&authority), ..forwarding(&ip, &id) };
        let out = for_backend(&client, &fwd, || unreachable!("HTTP/2 authority comes first"));
        assert_eq!(out.get_all(&X_FORWARDED_FOR).iter().count(), 1);
        assert_eq!(out[&X_FORWARDED_FOR], "198.51.100.1, 203.0.113.7, 127.0.0.1");
        assert_eq!(out[&X_REQUEST_ID], "from-client");
        assert_eq!(out[header::HOST], "shop.example:8080");
        assert_eq!(out[&X_FORWARDED_HOST], "shop.example:8080");
    }

    #[test]
    fn the_absolute_form_authority_replaces_the_clients_host() {
        let mut client = HeaderMap::new();
        client.insert(header::HOST, HeaderValue::from_static("public.example"));
        let (ip, id) = (ip_value("127.0.0.1".parse().unwrap()), HeaderValue::from_static("1"));
        let authority = HeaderValue::from_static("internal.example");
        let fwd = Forwarding { authority: Some(&authority), ..forwarding(&ip, &id) };
        let out = for_backend(&client, &fwd, || unreachable!());
        assert_eq!(out.get_all(header::HOST).iter().collect::<Vec<_>>(), ["internal.example"]);
        assert_eq!(out[&X_FORWARDED_HOST], "internal.example");
    }

    #[test]
    fn an_http_1_0_request_without_host_gets_the_backends_and_upgrades_keep_their_headers() {
        let mut client = HeaderMap::new();
        client.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        client.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        let (ip, id) = (ip_value("::1".parse().unwrap()), HeaderValue::from_static("1"));
        let ws = HeaderValue::from_static("websocket");
        let fwd = Forwarding { upgrade: Some(&ws), ..forwarding(&ip, &id) };
        let out = for_backend(&client, &fwd, || HeaderValue::from_static("127.0.0.1:9001"));
        assert_eq!(out[header::HOST], "127.0.0.1:9001");
        assert_eq!(out[&X_FORWARDED_FOR], "::1");
        assert_eq!(out[header::CONNECTION], "upgrade");
        assert_eq!(out[header::UPGRADE], "websocket");
    }

    #[test]
    fn the_backend_gets_the_gateways_traceparent_and_the_clients_tracestate() {
        let mut client = HeaderMap::new();
        client.insert(header::HOST, HeaderValue::from_static("shop.example"));
        client.insert(TRACEPARENT, HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"));
        client.append("tracestate", HeaderValue::from_static("congo=t61rcWkgMzE"));
        client.append("tracestate", HeaderValue::from_static("rojo=00f067aa0ba902b7"));
        let trace = Trace::from_client(&client);
        let (ip, id) = (ip_value("127.0.0.1".parse().unwrap()), HeaderValue::from_static("1"));
        let fwd = Forwarding { trace: &trace, ..forwarding(&ip, &id) };
        let out = for_backend(&client, &fwd, || unreachable!());
        assert_eq!(out.get_all(TRACEPARENT).iter().collect::<Vec<_>>(), [trace.traceparent()]);
        let sent = out[TRACEPARENT].to_str().unwrap();
        assert!(sent.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-") && sent.ends_with("-01"), "{sent}");
        assert_ne!(sent, client[TRACEPARENT]);
        assert_eq!(
            out.get_all("tracestate").iter().collect::<Vec<_>>(),
            ["congo=t61rcWkgMzE", "rojo=00f067aa0ba902b7"]
        );
        // Without one from the client, the backend still gets one: a new trace.
        let out = for_backend(&HeaderMap::new(), &forwarding(&ip, &id), || HeaderValue::from_static("b:1"));
        assert_eq!(out.get_all(TRACEPARENT).iter().count(), 1);
    }

    #[test]
    fn hop_by_hop_index_matches_the_table() {
        for (i, name) in HOP_BY_HOP.iter().enumerate() {
            assert_eq!(hop_by_hop_index(name), Some(i), "{name}");
        }
        assert_eq!(hop_by_hop_index(&header::CONTENT_LENGTH), None);
    }

    #[test]
    fn plain_keep_alive_removes_only_connection() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("Keep-Alive"));
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("3"));
        h.insert("x-keep", HeaderValue::from_static("1"));
        remove_hop_by_hop(&mut h);
        assert_eq!(h.len(), 2);
        assert!(!h.contains_key(header::CONNECTION));
        let mut untouched = HeaderMap::new();
        untouched.insert("x-keep", HeaderValue::from_static("1"));
        remove_hop_by_hop(&mut untouched);
        assert_eq!(untouched.len(), 1);
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        /// Header names a client might send: hop-by-hop ones, forwarding ones, and others.
        fn name() -> impl Strategy<Value = HeaderName> {
            prop_oneof![
                prop::sample::select(HOP_BY_HOP.to_vec()),
                Just(header::HOST),
                Just(X_FORWARDED_FOR),
                Just(X_REQUEST_ID),
                Just(TRACEPARENT),
                "x-[a-z]{1,3}".prop_map(|n| HeaderName::from_bytes(n.as_bytes()).unwrap()),
            ]
        }

        /// Values, including `Connection` token lists that name other headers.
        fn value() -> impl Strategy<Value = HeaderValue> {
            prop_oneof![
                "[ -~]{0,20}".prop_map(|v| HeaderValue::from_str(&v).unwrap()),
                prop::collection::vec("(keep-alive|close|upgrade|x-[a-z]{1,3}|te)", 1..4)
                    .prop_map(|t| HeaderValue::from_str(&t.join(", ")).unwrap()),
            ]
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(512))]

            /// Whatever the client sends, the backend gets no hop-by-hop header and none that
            /// `Connection` names, exactly one `Host`, `X-Forwarded-For` (ending with the
            /// client), `traceparent` and `X-Request-Id`, and every other header unchanged.
            #[test]
            fn backend_headers_hold_their_invariants(sent in prop::collection::vec((name(), value()), 0..24), with_authority: bool) {
                let mut client = HeaderMap::new();
                for (n, v) in &sent {
                    client.append(n.clone(), v.clone());
                }
                let (ip, id) = (ip_value("192.0.2.9".parse().unwrap()), HeaderValue::from_static("ours"));
                let authority = HeaderValue::from_static("target.example");
                let fwd = Forwarding { authority: with_authority.then_some(&authority), ..forwarding(&ip, &id) };
                let out = for_backend(&client, &fwd, || HeaderValue::from_static("backend:1"));
                let listed = connection_listed(&client);
                for (n, _) in &out {
                    prop_assert!(hop_by_hop_index(n).is_none(), "{n} forwarded");
                    prop_assert!(!listed.contains(n), "{n} is listed in Connection but forwarded");
                }
                for one in [header::HOST, X_FORWARDED_FOR, TRACEPARENT, X_REQUEST_ID, X_FORWARDED_HOST] {
                    prop_assert_eq!(out.get_all(&one).iter().count(), 1, "{}", one);
                }
                prop_assert!(out[&X_FORWARDED_FOR].as_bytes().ends_with(b"192.0.2.9"));
                if with_authority {
                    prop_assert_eq!(&out[header::HOST], "target.example");
                }
                let first_id = client.get_all(&X_REQUEST_ID).iter().find(|v| !v.is_empty());
                prop_assert_eq!(&out[&X_REQUEST_ID], first_id.unwrap_or(&id));
                for (n, v) in &client {
                    let kept = hop_by_hop_index(n).is_none() && !listed.contains(n)
                        && ![header::HOST, X_FORWARDED_FOR, TRACEPARENT, X_REQUEST_ID].contains(n);
                    if kept {
                        prop_assert!(out.get_all(n).iter().any(|o| o == v), "{n}: {v:?} lost");
                    }
                }
            }
        }
    }
}
