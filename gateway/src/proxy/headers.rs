//! Header rewriting: hop-by-hop removal and `X-Forwarded-*`.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
/// The client's IP address as a header value, computed once per connection.
pub fn ip_value(ip: IpAddr) -> HeaderValue {
    HeaderValue::from_str(&ip.to_string()).expect("an IP address is a valid header value")
}

use std::net::IpAddr;

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
/// Request id, generated when the client sent none.
pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Removes hop-by-hop headers (RFC 9110 §7.6.1), including those named in `Connection`.
pub fn remove_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none: one pass over the names instead of nine lookups.
    if !headers.keys().any(is_hop_by_hop) {
        return;
    }
    // Extra names listed in `Connection` (rare; `keep-alive`, `close` and `upgrade` are
    // covered by the fixed list below).
    let listed: Vec<String> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .filter(|t| !t.is_empty() && !matches!(t.as_str(), "keep-alive" | "close" | "upgrade"))
        .collect();
    for name in listed {
        headers.remove(name);
    }
    // Remove only the hop-by-hop names present (usually just `connection`).
    let mut present: [Option<HeaderName>; 9] = Default::default();
    for (slot, name) in present.iter_mut().zip(headers.keys().filter(|k| is_hop_by_hop(k))) {
        *slot = Some(name.clone());
    }
    for name in present.into_iter().flatten() {
        headers.remove(name);
    }
}

fn is_hop_by_hop(name: &HeaderName) -> bool {
    name == header::CONNECTION
        || name == header::TRANSFER_ENCODING
        || name == header::TE
        || name == header::TRAILER
        || name == header::UPGRADE
        || name == header::PROXY_AUTHENTICATE
        || name == header::PROXY_AUTHORIZATION
        || name == KEEP_ALIVE
        || name == PROXY_CONNECTION
}

/// Adds `X-Forwarded-For` (appending the client), `-Proto` and `-Host`; keeps the
/// client's `Host` (and sets it from the `:authority` of an HTTP/2 request).
pub fn add_forwarded(headers: &mut HeaderMap, client: &HeaderValue, authority: Option<&str>) {
    let xff = match headers.get(&X_FORWARDED_FOR).map(|v| v.as_bytes()) {
        Some(prev) => HeaderValue::from_bytes(&[prev, b", ", client.as_bytes()].concat()).ok(),
        None => Some(client.clone()),
    };
    if let Some(v) = xff {
        headers.insert(X_FORWARDED_FOR, v);
    }
    headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static("http"));
    let host = headers.get(header::HOST).cloned().or_else(|| authority.and_then(|a| HeaderValue::from_str(a).ok()));
    if let Some(host) = host {
        if !headers.contains_key(header::HOST) {
            headers.insert(header::HOST, host.clone());
        }
        headers.insert(X_FORWARDED_HOST, host);
    }
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
        h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive, x-secret"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert(KEEP_ALIVE, HeaderValue::from_static("timeout=5"));
        h.insert(header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        h.insert("x-keep", HeaderValue::from_static("1"));
        remove_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-keep"));
    }

    #[test]
    fn forwarded_for_appends_and_host_comes_from_authority() {
        let mut h = HeaderMap::new();
        h.insert(X_FORWARDED_FOR, HeaderValue::from_static("198.51.100.1"));
        add_forwarded(&mut h, &ip_value("127.0.0.1".parse().unwrap()), Some("shop.example:8080"));
        assert_eq!(h[&X_FORWARDED_FOR], "198.51.100.1, 127.0.0.1");
        assert_eq!(h[&X_FORWARDED_PROTO], "http");
        assert_eq!(h[header::HOST], "shop.example:8080");
        assert_eq!(h[&X_FORWARDED_HOST], "shop.example:8080");
    }
}
