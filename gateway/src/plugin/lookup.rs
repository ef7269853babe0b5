//! What a plugin reads of the request by name: a cookie, a query parameter. Plain
//! functions over the request's parts, so they are tested (and fuzzed) without Wasm.

use http::HeaderMap;

/// The value of the first cookie called `name` in the request's `Cookie` lines (RFC
/// 6265 §4.2: `name=value` pairs separated by `;`), without the double quotes a value
/// may be wrapped in. A line is read as bytes: one pair with bytes that are not UTF-8
/// (a third party's cookie) does not hide the others on its line; a matching value
/// that is not UTF-8 comes back with U+FFFD in place of its bad bytes.
pub fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers.get_all(http::header::COOKIE).iter().find_map(|line| {
        line.as_bytes().split(|b| *b == b';').find_map(|pair| {
            let pair = pair.trim_ascii();
            let eq = pair.iter().position(|b| *b == b'=')?;
            if &pair[..eq] != name.as_bytes() {
                return None;
            }
            let value = &pair[eq + 1..];
            let value = match value {
                [b'"', inner @ .., b'"'] => inner,
                v => v,
            };
            Some(String::from_utf8_lossy(value).into_owned())
        })
    })
}

/// The value of the first parameter called `name` in `query` (`a=1&b=2`), as it is
/// (no percent-decoding); `""` for a parameter without `=`.
pub fn query_param<'q>(query: &'q str, name: &str) -> Option<&'q str> {
    query.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        (k == name).then_some(v)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn cookies(lines: &[&[u8]]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for l in lines {
            h.append(http::header::COOKIE, HeaderValue::from_bytes(l).unwrap());
        }
        h
    }

    #[test]
    fn a_cookie_is_found_by_exact_name_on_any_line() {
        let h = cookies(&[b"a=1; session=\"s1\"", b"b=2; session=late"]);
        assert_eq!(cookie(&h, "session").as_deref(), Some("s1"));
        assert_eq!(cookie(&h, "b").as_deref(), Some("2"));
        assert_eq!(cookie(&h, "sess"), None);
        assert_eq!(cookie(&h, "A"), None);
    }

    #[test]
    fn a_pair_that_is_not_utf8_does_not_hide_its_neighbours() {
        let h = cookies(&[b"tracker=\xff\xfe; gw-sticky=b2"]);
        assert_eq!(cookie(&h, "gw-sticky").as_deref(), Some("b2"));
    }

    #[test]
    fn a_query_parameter_is_found_raw() {
        assert_eq!(query_param("a=1&b=x%20y&flag&a=2", "a"), Some("1"));
        assert_eq!(query_param("a=1&b=x%20y&flag", "b"), Some("x%20y"));
        assert_eq!(query_param("a=1&flag", "flag"), Some(""));
        assert_eq!(query_param("a=b=c", "a"), Some("b=c"));
        assert_eq!(query_param("a=1", "b"), None);
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        /// A cookie as a browser sends it: a token name, a value of cookie-octets,
        /// sometimes wrapped in double quotes (RFC 6265 §4.1.1).
        fn pair() -> impl Strategy<Value = (String, String, bool)> {
            ("[a-z][a-z0-9_-]{0,5}", "[!#-+--:<-\\[\\]-~]{0,8}", any::<bool>())
        }

        /// Pairs a reader must step over: no `=`, empty, not UTF-8.
        fn junk() -> impl Strategy<Value = Vec<u8>> {
            prop_oneof![
                Just(b"flag".to_vec()),
                Just(Vec::new()),
                prop::collection::vec(0x80u8..=0xff, 1..6).prop_map(|v| [b"zz-junk=".to_vec(), v].concat()),
            ]
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(512))]

            /// Against the reference: the first pair of that name, in order over the
            /// lines, its quotes removed; none when no pair has the name.
            #[test]
            fn cookie_lookup_matches_the_reference(
                pairs in prop::collection::vec(pair(), 0..8),
                junk in prop::collection::vec((junk(), 0usize..8), 0..3),
                lines in 1usize..4,
                asked in "[a-z][a-z0-9_-]{0,5}",
            ) {
                let mut items: Vec<Vec<u8>> = pairs
                    .iter()
                    .map(|(n, v, q)| if *q { format!("{n}=\"{v}\"") } else { format!("{n}={v}") }.into_bytes())
                    .collect();
                for (j, at) in junk {
                    items.insert(at.min(items.len()), j);
                }
                // Split over `lines` header lines, in order.
                let per = items.len().div_ceil(lines).max(1);
                let h = cookies(&items.chunks(per).map(|c| c.join(&b"; "[..])).collect::<Vec<_>>().iter().map(|l| l.as_slice()).collect::<Vec<_>>());
                let want = pairs.iter().find(|(n, _, _)| *n == asked).map(|(_, v, _)| v.clone());
                prop_assert_eq!(cookie(&h, &asked), want);
            }

            /// Any bytes at all: no panic.
            #[test]
            fn cookie_lookup_never_panics(line in prop::collection::vec(prop_oneof![Just(b'\t'), 0x20u8..0x7f, 0x80u8..=0xff], 0..64), asked in "\\PC{0,4}") {
                let h = cookies(&[&line]);
                let _ = cookie(&h, &asked);
            }

            /// Against the reference: the first parameter of that name, raw.
            #[test]
            fn query_lookup_matches_the_reference(
                params in prop::collection::vec(("[a-z%+.~_-]{0,4}", prop::option::of("[a-z0-9%+.~_=-]{0,6}")), 0..8),
                asked in "[a-z%+.~_-]{1,4}",
            ) {
                let query = params
                    .iter()
                    .map(|(k, v)| match v { Some(v) => format!("{k}={v}"), None => k.clone() })
                    .collect::<Vec<_>>()
                    .join("&");
                let want = params.iter().find(|(k, _)| *k == asked).map(|(_, v)| v.as_deref().unwrap_or(""));
                prop_assert_eq!(query_param(&query, &asked), want);
            }

            /// Any query text at all: no panic.
            #[test]
            fn query_lookup_never_panics(query in "\\PC{0,40}", asked in "\\PC{0,4}") {
                let _ = query_param(&query, &asked);
            }
        }
    }
}
