//! Header rewriting: hop-by-hop removal and `X-Forwarded-*`.

use http::header::{self, Entry, HeaderMap, HeaderName, HeaderValue};
use std::net::IpAddr;

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
/// Request id, generated when the client sent none.
pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
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

/// Removes the extra names a `Connection` header lists (rare: it usually says only
/// `keep-alive`, `close` or `upgrade`, which are not header names to remove).
fn remove_connection_listed(headers: &mut HeaderMap) {
    fn extra(token: &str) -> bool {
        let t = token.trim();
        !t.is_empty() && !["keep-alive", "close", "upgrade"].iter().any(|k| t.eq_ignore_ascii_case(k))
    }
    let tokens = |headers: &HeaderMap| -> Vec<HeaderName> {
        headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter(|t| extra(t))
            .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
            .collect()
    };
    let any_extra =
        headers.get_all(header::CONNECTION).iter().filter_map(|v| v.to_str().ok()).any(|v| v.split(',').any(extra));
    if any_extra {
        for name in tokens(headers) {
            headers.remove(name);
        }
    }
}

/// Adds `X-Forwarded-For` (appending the client), `-Proto` and `-Host`; keeps the
/// client's `Host` (and sets it from the `:authority` of an HTTP/2 request).
pub fn add_forwarded(headers: &mut HeaderMap, client: &HeaderValue, authority: Option<&str>) {
    // Room for these three and `X-Request-Id` up front: one growth of the map, not several.
    headers.reserve(4);
    match headers.entry(X_FORWARDED_FOR) {
        Entry::Vacant(e) => {
            e.insert(client.clone());
        }
        Entry::Occupied(mut e) => {
            // Earlier proxies may have sent several lines: keep them all, in order.
            let mut joined = Vec::new();
            for v in e.iter().chain(std::iter::once(client)) {
                if !joined.is_empty() {
                    joined.extend_from_slice(b", ");
                }
                joined.extend_from_slice(v.as_bytes());
            }
            if let Ok(v) = HeaderValue::from_bytes(&joined) {
                e.insert(v);
            }
        }
    }
    headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static("http"));
    let host = match headers.get(header::HOST) {
        Some(h) => Some(h.clone()),
        None => match authority.and_then(|a| HeaderValue::from_str(a).ok()) {
            Some(h) => {
                headers.insert(header::HOST, h.clone());
                Some(h)
            }
            None => None,
        },
    };
    if let Some(host) = host {
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
        h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive, X-Secret"));
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

    #[test]
    fn hop_by_hop_index_matches_the_table() {
        for (i, name) in HOP_BY_HOP.iter().enumerate() {
            assert_eq!(hop_by_hop_index(name), Some(i), "{name}");
        }
        assert_eq!(hop_by_hop_index(&header::CONTENT_LENGTH), None);
    }

    #[test]
    fn forwarded_for_keeps_every_earlier_line() {
        let mut h = HeaderMap::new();
        h.append(X_FORWARDED_FOR, HeaderValue::from_static("198.51.100.1"));
        h.append(X_FORWARDED_FOR, HeaderValue::from_static("203.0.113.7"));
        h.insert(header::HOST, HeaderValue::from_static("shop.example"));
        add_forwarded(&mut h, &ip_value("127.0.0.1".parse().unwrap()), None);
        assert_eq!(h.get_all(&X_FORWARDED_FOR).iter().count(), 1);
        assert_eq!(h[&X_FORWARDED_FOR], "198.51.100.1, 203.0.113.7, 127.0.0.1");
        assert_eq!(h[&X_FORWARDED_HOST], "shop.example");
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
}
