//! The line formats of the access log: JSON (one object per line) and text (a
//! combined-log-like head and `key=value` pairs). Formatting writes straight into the
//! thread's buffer: no allocation, escaping checked eight bytes at a time, names from the
//! config rendered once per route ([`Names`]).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// One request, as the access log records it. Every field is borrowed: building an
/// entry costs nothing. Fields the gateway makes itself (ids, the client address, the
/// method, the names from the config) are written as they are; what the client sent
/// (host, path) and backend ids are escaped.
#[derive(Debug, Clone)]
pub struct Entry<'a> {
    /// When the request arrived.
    pub time: SystemTime,
    /// `X-Request-Id` as forwarded: hex digits, written as is.
    pub request_id: &'a [u8],
    /// W3C trace id (32 hex digits), when the request was traced.
    pub trace_id: Option<&'a [u8]>,
    /// The client's IP address as text (written as is).
    pub client: &'a [u8],
    /// Request method (a token: never needs escaping).
    pub method: &'a http::Method,
    /// `Host` (or `:authority`) as received.
    pub host: &'a str,
    /// Path and query as received.
    pub path: &'a str,
    /// Status sent to the client.
    pub status: u16,
    /// Route, upstream and strategy names, rendered once per route.
    pub names: &'a Names,
    /// Backend id of the last attempt, `-` when none.
    pub backend: &'a str,
    /// Attempts made (0 when the gateway answered itself).
    pub attempts: u32,
    /// Whether the fallback round robin chose (the plugin failed).
    pub fallback: bool,
    /// Request body bytes received from the client.
    pub bytes_in: u64,
    /// Response body bytes sent to the client.
    pub bytes_out: u64,
    /// From the request's arrival to the end of the response.
    pub duration: Duration,
    /// Why the gateway answered itself (`no_route`, `no_healthy_backend`, ...).
    pub reason: Option<&'a str>,
    /// The failure behind a gateway-made 502/504 (backend, address, OS error), which the
    /// client's body leaves out. Written only when there is one.
    pub error: Option<&'a str>,
    /// The plugin that decided (of a chain: the step that did), rendered once per step;
    /// none when the native round robin chose or no plugin was asked.
    pub plugin: Option<&'a PluginName>,
    /// Why it decided (`request.set-reason`), or why the round robin did.
    pub decision_reason: Option<&'a str>,
}

/// A route's `route`, `upstream` and `strategy` fields, rendered (and escaped) for both
/// formats when the route is built, so a line copies them instead of escaping three
/// strings per request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    json: Box<[u8]>,
    text: Box<[u8]>,
}

impl Names {
    /// The fields for a route named `route` to `upstream`, decided by `strategy`.
    pub fn new(route: &str, upstream: &str, strategy: &str) -> Names {
        let mut json = Vec::new();
        for (key, value) in [(&b",\"route\":"[..], route), (b",\"upstream\":", upstream), (b",\"strategy\":", strategy)]
        {
            json.extend_from_slice(key);
            json_str(&mut json, value);
        }
        let mut text = Vec::new();
        for (key, value) in [(&b" route="[..], route), (b" upstream=", upstream), (b" strategy=", strategy)] {
            text_field(&mut text, key, value);
        }
        Names { json: json.into(), text: text.into() }
    }

    /// The fields of a request no route matched: all `-`.
    pub fn none() -> &'static Names {
        static NONE: std::sync::OnceLock<Names> = std::sync::OnceLock::new();
        NONE.get_or_init(|| Names::new("-", "-", "-"))
    }
}

/// A plugin's name as the `plugin` field of both formats, rendered (and escaped) once
/// when its upstream is built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginName {
    json: Box<[u8]>,
    text: Box<[u8]>,
}

impl PluginName {
    /// The field for the plugin `name`.
    pub fn new(name: &str) -> PluginName {
        let mut json = b",\"plugin\":".to_vec();
        json_str(&mut json, name);
        let mut text = Vec::new();
        text_field(&mut text, b" plugin=", name);
        PluginName { json: json.into(), text: text.into() }
    }
}

/// The current second's `YYYY-MM-DDTHH:MM:SS`, kept per thread.
pub(super) struct Clock {
    second: u64,
    text: [u8; 19],
}

impl Clock {
    pub(super) const EMPTY: Clock = Clock { second: u64::MAX, text: [0; 19] };

    /// Writes `time` as RFC 3339 UTC with milliseconds: `2025-01-31T12:34:56.789Z`.
    fn write(&mut self, out: &mut Vec<u8>, time: SystemTime) {
        let since = time.duration_since(UNIX_EPOCH).unwrap_or_default();
        let second = since.as_secs();
        if second != self.second {
            self.second = second;
            self.text = civil_time(second);
        }
        out.extend_from_slice(&self.text);
        let ms = since.subsec_millis();
        out.extend_from_slice(&[
            b'.',
            b'0' + (ms / 100) as u8,
            b'0' + (ms / 10 % 10) as u8,
            b'0' + (ms % 10) as u8,
            b'Z',
        ]);
    }
}

/// `YYYY-MM-DDTHH:MM:SS` for seconds since the Unix epoch (UTC), by Howard Hinnant's
/// `civil_from_days`.
fn civil_time(secs: u64) -> [u8; 19] {
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = (yoe + era * 400 + u64::from(month <= 2)).min(9999);
    let (h, m, s) = (rem / 3600, rem / 60 % 60, rem % 60);
    let d = |n: u64| b'0' + (n % 10) as u8;
    [
        d(year / 1000),
        d(year / 100),
        d(year / 10),
        d(year),
        b'-',
        d(month / 10),
        d(month),
        b'-',
        d(day / 10),
        d(day),
        b'T',
        d(h / 10),
        d(h),
        b':',
        d(m / 10),
        d(m),
        b':',
        d(s / 10),
        d(s),
    ]
}

#[inline(always)]
fn write_u64(out: &mut Vec<u8>, mut n: u64) {
    // Attempts, a bodiless request's bytes: one digit, no copy of a variable length.
    if n < 10 {
        out.push(b'0' + n as u8);
        return;
    }
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

/// An HTTP status: three digits (a status outside 100..=999 is written in full).
#[inline(always)]
fn write_status(out: &mut Vec<u8>, status: u16) {
    if (100..1000).contains(&status) {
        out.extend_from_slice(&[
            b'0' + (status / 100) as u8,
            b'0' + (status / 10 % 10) as u8,
            b'0' + (status % 10) as u8,
        ]);
    } else {
        write_u64(out, u64::from(status));
    }
}

/// Milliseconds with three decimals: `12.345`.
fn write_ms(out: &mut Vec<u8>, d: Duration) {
    write_u64(out, d.as_secs().saturating_mul(1000).saturating_add(u64::from(d.subsec_millis())));
    let frac = d.subsec_micros() % 1000;
    out.extend_from_slice(&[b'.', b'0' + (frac / 100) as u8, b'0' + (frac / 10 % 10) as u8, b'0' + (frac % 10) as u8]);
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// `s` as the inside of a JSON string: `"` and `\` escaped, control characters as
/// `\n`, `\t`, ... or `\u00XX`. Almost every string needs nothing: it is checked eight
/// bytes at a time and copied at once.
fn write_json_str(out: &mut Vec<u8>, s: &str) {
    let bytes = s.as_bytes();
    if is_plain::<0x20>(bytes) {
        out.extend_from_slice(bytes);
        return;
    }
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let escape: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0x08 => b"\\b",
            0x0c => b"\\f",
            0..0x20 => &[b'\\', b'u', b'0', b'0', HEX[(b >> 4) as usize], HEX[(b & 0xf) as usize]],
            _ => continue,
        };
        out.extend_from_slice(&bytes[start..i]);
        out.extend_from_slice(escape);
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
}

/// No byte below `LOW` (0x20: control characters; 0x21: and space), `"` or `\` in
/// `bytes`.
#[inline]
fn is_plain<const LOW: u8>(bytes: &[u8]) -> bool {
    if bytes.len() < 8 {
        return bytes.iter().all(|&b| b >= LOW && b != b'"' && b != b'\\');
    }
    let word = |chunk: &[u8]| u64::from_le_bytes(chunk.try_into().expect("8 bytes"));
    let mut chunks = bytes.chunks_exact(8);
    let mut special = chunks.by_ref().fold(0, |acc, c| acc | special_bytes::<LOW>(word(c)));
    // The last (overlapping) eight bytes cover the remainder.
    special |= special_bytes::<LOW>(word(&bytes[bytes.len() - 8..]));
    special == 0
}

/// Non-zero when any of the eight bytes of `x` is below `LOW` (at most 128), `"` or `\`
/// (the "hasless"/"haszero" word tricks: exact for whether any byte is one).
#[inline]
fn special_bytes<const LOW: u8>(x: u64) -> u64 {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let below_space = x.wrapping_sub(ONES * u64::from(LOW)) & !x;
    let q = x ^ (ONES * u64::from(b'"'));
    let bs = x ^ (ONES * u64::from(b'\\'));
    (below_space | (q.wrapping_sub(ONES) & !q) | (bs.wrapping_sub(ONES) & !bs)) & HIGH
}

/// `"` + the escaped string + `"`.
#[inline(always)]
fn json_str(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    write_json_str(out, s);
    out.push(b'"');
}

/// A JSON string, or `null`.
#[inline(always)]
fn json_opt_str(out: &mut Vec<u8>, s: Option<&str>) {
    match s {
        Some(s) => json_str(out, s),
        None => out.extend_from_slice(b"null"),
    }
}

/// One JSON object and a newline. Keys are written as whole literals (one copy each).
pub(super) fn write_json(out: &mut Vec<u8>, clock: &mut Clock, e: &Entry<'_>) {
    // One growth check for the line, whatever the client sent.
    out.reserve(400 + e.host.len() + e.path.len());
    out.extend_from_slice(b"{\"time\":\"");
    clock.write(out, e.time);
    out.extend_from_slice(b"\",\"request_id\":\"");
    out.extend_from_slice(e.request_id);
    match e.trace_id {
        Some(id) => {
            out.extend_from_slice(b"\",\"trace_id\":\"");
            out.extend_from_slice(id);
            out.extend_from_slice(b"\",\"client\":\"");
        }
        None => out.extend_from_slice(b"\",\"trace_id\":null,\"client\":\""),
    }
    out.extend_from_slice(e.client);
    out.extend_from_slice(b"\",\"method\":\"");
    out.extend_from_slice(e.method.as_str().as_bytes());
    out.extend_from_slice(b"\",\"host\":");
    json_str(out, e.host);
    out.extend_from_slice(b",\"path\":");
    json_str(out, e.path);
    out.extend_from_slice(b",\"status\":");
    write_status(out, e.status);
    out.extend_from_slice(&e.names.json);
    out.extend_from_slice(b",\"backend\":");
    json_str(out, e.backend);
    out.extend_from_slice(b",\"attempts\":");
    write_u64(out, u64::from(e.attempts));
    out.extend_from_slice(if e.fallback {
        b",\"fallback\":true,\"bytes_in\":"
    } else {
        b",\"fallback\":false,\"bytes_in\":"
    });
    write_u64(out, e.bytes_in);
    out.extend_from_slice(b",\"bytes_out\":");
    write_u64(out, e.bytes_out);
    out.extend_from_slice(b",\"duration_ms\":");
    write_ms(out, e.duration);
    out.extend_from_slice(b",\"reason\":");
    json_opt_str(out, e.reason);
    out.extend_from_slice(e.plugin.map_or(b",\"plugin\":null", |p| &p.json));
    match e.decision_reason {
        None => out.extend_from_slice(b",\"decision_reason\":null"),
        Some(r) => {
            out.extend_from_slice(b",\"decision_reason\":");
            json_str(out, r);
        }
    }
    if let Some(error) = e.error {
        out.extend_from_slice(b",\"error\":");
        json_str(out, error);
    }
    out.extend_from_slice(b"}\n");
}

/// A value in a text line: as it is when it is a plain word, otherwise in quotes with
/// `"`, `\` and control characters escaped (JSON-style), so a line stays one line and
/// splits on spaces.
fn write_text_value(out: &mut Vec<u8>, s: &str) {
    if !s.is_empty() && is_plain::<0x21>(s.as_bytes()) {
        out.extend_from_slice(s.as_bytes());
    } else {
        out.push(b'"');
        write_json_str(out, s);
        out.push(b'"');
    }
}

/// ` key=` (given whole) and the value.
#[inline(always)]
fn text_field(out: &mut Vec<u8>, key: &[u8], value: &str) {
    out.extend_from_slice(key);
    write_text_value(out, value);
}

/// A combined-log-like line, then `key=value` pairs:
/// `203.0.113.7 [2025-01-31T12:34:56.789Z] "GET /a?b=1" 200 512 host=shop.example ...`
pub(super) fn write_text(out: &mut Vec<u8>, clock: &mut Clock, e: &Entry<'_>) {
    out.reserve(400 + e.host.len() + e.path.len());
    out.extend_from_slice(e.client);
    out.extend_from_slice(b" [");
    clock.write(out, e.time);
    out.extend_from_slice(b"] \"");
    out.extend_from_slice(e.method.as_str().as_bytes());
    out.push(b' ');
    write_json_str(out, e.path);
    out.extend_from_slice(b"\" ");
    write_status(out, e.status);
    out.push(b' ');
    write_u64(out, e.bytes_out);
    text_field(out, b" host=", e.host);
    out.extend_from_slice(&e.names.text);
    text_field(out, b" backend=", e.backend);
    out.extend_from_slice(b" attempts=");
    write_u64(out, u64::from(e.attempts));
    out.extend_from_slice(if e.fallback { b" fallback=true bytes_in=" } else { b" fallback=false bytes_in=" });
    write_u64(out, e.bytes_in);
    out.extend_from_slice(b" duration_ms=");
    write_ms(out, e.duration);
    out.extend_from_slice(b" request_id=");
    out.extend_from_slice(e.request_id);
    out.extend_from_slice(b" trace_id=");
    out.extend_from_slice(e.trace_id.unwrap_or(b"-"));
    text_field(out, b" reason=", e.reason.unwrap_or("-"));
    out.extend_from_slice(e.plugin.map_or(b" plugin=-", |p| &p.text));
    match e.decision_reason {
        None => out.extend_from_slice(b" decision_reason=-"),
        Some(r) => text_field(out, b" decision_reason=", r),
    }
    if let Some(error) = e.error {
        text_field(out, b" error=", error);
    }
    out.push(b'\n');
}

/// A sample entry (tests of the formats and of the writer).
#[cfg(test)]
pub(super) fn sample_entry(method: &http::Method) -> Entry<'_> {
    fn names() -> &'static Names {
        static NAMES: std::sync::OnceLock<Names> = std::sync::OnceLock::new();
        NAMES.get_or_init(|| Names::new("default", "web", "round-robin"))
    }
    Entry {
        time: UNIX_EPOCH + Duration::from_millis(1_738_326_896_789),
        request_id: b"4f1c2a9e0b7d3e61",
        trace_id: Some(b"4bf92f3577b34da6a3ce929d0e0e4736"),
        client: b"203.0.113.7",
        method,
        host: "shop.example",
        path: "/book/dune?user=42",
        status: 200,
        names: names(),
        backend: "b1",
        attempts: 1,
        fallback: false,
        bytes_in: 0,
        bytes_out: 512,
        duration: Duration::from_micros(1_234),
        reason: None,
        error: None,
        plugin: Some(plugin_name()),
        decision_reason: None,
    }
}

#[cfg(test)]
fn plugin_name() -> &'static PluginName {
    static NAME: std::sync::OnceLock<PluginName> = std::sync::OnceLock::new();
    NAME.get_or_init(|| PluginName::new("round-robin"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn entry(method: &http::Method) -> Entry<'_> {
        sample_entry(method)
    }

    fn clock() -> Clock {
        Clock::EMPTY
    }

    fn json_line(e: &Entry<'_>) -> String {
        let mut out = Vec::new();
        write_json(&mut out, &mut clock(), e);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn time_is_rfc3339_utc_with_milliseconds() {
        let mut clock = Clock::EMPTY;
        let mut at = |ms: u64| {
            let mut out = Vec::new();
            clock.write(&mut out, UNIX_EPOCH + Duration::from_millis(ms));
            String::from_utf8(out).unwrap()
        };
        assert_eq!(at(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(at(951_782_400_007), "2000-02-29T00:00:00.007Z");
        assert_eq!(at(1_738_326_896_789), "2025-01-31T12:34:56.789Z");
        assert_eq!(at(1_735_689_599_999), "2024-12-31T23:59:59.999Z");
        assert_eq!(at(4_107_542_400_000), "2100-03-01T00:00:00.000Z");
        // The cached second is replaced, not reused, for another day.
        assert_eq!(at(1_738_326_896_000), "2025-01-31T12:34:56.000Z");
        assert_eq!(at(1_738_413_296_000), "2025-02-01T12:34:56.000Z");
    }

    #[test]
    fn json_line_has_every_field() {
        let get = http::Method::GET;
        let line = json_line(&entry(&get));
        assert!(line.ends_with("}\n") && line.matches('\n').count() == 1, "{line}");
        let v: Value = serde_json::from_str(&line).unwrap();
        let expected = serde_json::json!({
            "time": "2025-01-31T12:34:56.789Z",
            "request_id": "4f1c2a9e0b7d3e61",
            "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736",
            "client": "203.0.113.7",
            "method": "GET",
            "host": "shop.example",
            "path": "/book/dune?user=42",
            "status": 200,
            "route": "default",
            "upstream": "web",
            "backend": "b1",
            "strategy": "round-robin",
            "attempts": 1,
            "fallback": false,
            "bytes_in": 0,
            "bytes_out": 512,
            "duration_ms": 1.234,
            "reason": null,
            "plugin": "round-robin",
            "decision_reason": null,
        });
        assert_eq!(v, expected);
        let reason =
            Entry { client: b"2001:db8::1", trace_id: None, reason: Some("no_route"), fallback: true, ..entry(&get) };
        let v: Value = serde_json::from_str(&json_line(&reason)).unwrap();
        assert_eq!((v["client"].as_str(), v["trace_id"].is_null()), (Some("2001:db8::1"), true));
        assert_eq!((v["reason"].as_str(), v["fallback"].as_bool()), (Some("no_route"), Some(true)));
    }

    #[test]
    fn strings_are_json_escaped() {
        let get = http::Method::GET;
        let nasty = "a\"b\\c\nd\re\tf\u{0}g\u{1f}h\u{8}\u{c}i\u{7f}é€😀\u{2028}";
        let names = Names::new("\\", "web", "round-robin");
        let e = Entry { host: nasty, path: "/\"quoted\"", names: &names, backend: "", ..entry(&get) };
        let line = json_line(&e);
        assert_eq!(line.matches('\n').count(), 1, "{line}");
        assert!(line.contains(r#"a\"b\\c\nd\re\tf\u0000g\u001fh\b\fi"#), "{line}");
        let v: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["host"], nasty);
        assert_eq!(v["path"], "/\"quoted\"");
        assert_eq!(v["route"], "\\");
        assert_eq!(v["backend"], "");
    }

    #[test]
    fn escaping_matches_serde_json_at_every_position() {
        let alphabet = ["a", "\"", "\\", "\n", "\u{1}", "\u{1f}", " ", "é", "😀", "\u{7f}", "~"];
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        for len in 0..40 {
            for _ in 0..50 {
                let s: String = (0..len)
                    .map(|_| {
                        state ^= state << 13;
                        state ^= state >> 7;
                        state ^= state << 17;
                        alphabet[(state % alphabet.len() as u64) as usize]
                    })
                    .collect();
                let mut ours = b"\"".to_vec();
                write_json_str(&mut ours, &s);
                ours.push(b'"');
                assert_eq!(String::from_utf8(ours).unwrap(), serde_json::to_string(&s).unwrap(), "{s:?}");
            }
        }
    }

    #[test]
    fn text_line_is_one_line_with_quoted_odd_values() {
        let get = http::Method::GET;
        let mut out = Vec::new();
        write_text(&mut out, &mut clock(), &entry(&get));
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "203.0.113.7 [2025-01-31T12:34:56.789Z] \"GET /book/dune?user=42\" 200 512 host=shop.example \
             route=default upstream=web strategy=round-robin backend=b1 attempts=1 fallback=false bytes_in=0 \
             duration_ms=1.234 request_id=4f1c2a9e0b7d3e61 trace_id=4bf92f3577b34da6a3ce929d0e0e4736 reason=- plugin=round-robin \
             decision_reason=-\n"
        );
        let mut out = Vec::new();
        let names = Names::new("", "web", "round-robin");
        let e = Entry { host: "a b\n\u{1b}[31m", names: &names, path: "/x\"y", ..entry(&get) };
        write_text(&mut out, &mut clock(), &e);
        let line = String::from_utf8(out).unwrap();
        assert_eq!(line.matches('\n').count(), 1, "{line}");
        assert!(!line.contains('\u{1b}'), "an escape sequence reached the log: {line:?}");
        assert!(line.contains(r#"host="a b\n\u001b[31m" route="""#), "{line}");
        assert!(line.contains(r#""GET /x\"y""#), "{line}");
        let mut out = Vec::new();
        let names = Names::new("a route name with spaces", "web", "round-robin");
        write_text(&mut out, &mut clock(), &Entry { names: &names, ..entry(&get) });
        assert!(String::from_utf8(out).unwrap().contains(r#" route="a route name with spaces" "#));
    }
}
