//! W3C Trace Context (`traceparent`): the gateway continues the client's trace, or starts
//! one, and tells the backend its own span as the parent.
//!
//! `traceparent: 00-<trace-id: 32 hex>-<parent-id: 16 hex>-<flags: 2 hex>`, lowercase
//! only, neither id all zeros, version `ff` invalid. `tracestate` is forwarded unchanged
//! as an ordinary header.

use http::header::{HeaderMap, HeaderName, HeaderValue};
use std::cell::Cell;

/// The `traceparent` header.
pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");

const HEX: &[u8; 16] = b"0123456789abcdef";

/// A request's trace: its id (for the access log), the `traceparent` the backend gets,
/// and the request id (`X-Request-Id`: the hop's span id, so the two agree).
#[derive(Debug, Clone)]
pub struct Trace {
    id: [u8; 32],
    traceparent: HeaderValue,
    request_id: HeaderValue,
    continued: bool,
}

impl Trace {
    /// Continues the client's trace when it sent one valid `traceparent` (same trace id
    /// and flags, a new span id: the gateway's); otherwise starts a trace (random id,
    /// flags `01`, sampled). One allocation, shared by both header values. No syscall.
    pub fn from_client(headers: &HeaderMap) -> Trace {
        let mut values = headers.get_all(TRACEPARENT).iter();
        let parsed = match (values.next(), values.next()) {
            (Some(v), None) => parse(v.as_bytes()),
            // Several `traceparent` headers: invalid (W3C Trace Context §3.2.2.1).
            _ => None,
        };
        let continued = parsed.is_some();
        let (id, flags) = parsed.unwrap_or_else(|| {
            let mut id = [0u8; 32];
            let (hi, lo) = (random(), random());
            hex_into(&mut id[..16], hi);
            hex_into(&mut id[16..], lo);
            (id, *b"01")
        });
        let mut value = [0u8; 55];
        value[..3].copy_from_slice(b"00-");
        value[3..35].copy_from_slice(&id);
        value[35] = b'-';
        hex_into(&mut value[36..52], random());
        value[52] = b'-';
        value[53..].copy_from_slice(&flags);
        let bytes = bytes::Bytes::copy_from_slice(&value);
        let request_id = HeaderValue::from_maybe_shared(bytes.slice(36..52)).expect("hex is a valid header value");
        let traceparent = HeaderValue::from_maybe_shared(bytes).expect("hex and dashes are a valid header value");
        Trace { id, traceparent, request_id, continued }
    }

    /// The request id: the gateway's span id for this hop, 16 lowercase hex digits.
    pub fn request_id(&self) -> &HeaderValue {
        &self.request_id
    }

    /// The trace id, 32 lowercase hex digits.
    pub fn id(&self) -> &str {
        std::str::from_utf8(&self.id).expect("hex is ASCII")
    }

    /// The trace id as its 32 hex digits.
    pub fn id_hex(&self) -> &[u8] {
        &self.id
    }

    /// The `traceparent` value for the backend.
    pub fn traceparent(&self) -> &HeaderValue {
        &self.traceparent
    }

    /// Whether the client's trace was continued (rather than a new one started).
    pub fn continued(&self) -> bool {
        self.continued
    }
}

/// The trace id and flags of a valid `traceparent`. A later version than `00` is read as
/// `00` when it has at least its fields (§4.3); `ff` is invalid.
fn parse(v: &[u8]) -> Option<([u8; 32], [u8; 2])> {
    let version = v.get(..2)?;
    if !is_hex(version) || version == b"ff" {
        return None;
    }
    let fits = if version == b"00" { v.len() == 55 } else { v.len() == 55 || (v.len() > 55 && v[55] == b'-') };
    if !fits || v[2] != b'-' || v[35] != b'-' || v[52] != b'-' {
        return None;
    }
    let (trace, parent, flags) = (&v[3..35], &v[36..52], &v[53..55]);
    if !is_hex(trace) || !is_hex(parent) || !is_hex(flags) || all_zero(trace) || all_zero(parent) {
        return None;
    }
    Some((trace.try_into().ok()?, flags.try_into().ok()?))
}

/// Lowercase hex only: the spec refuses uppercase.
fn is_hex(s: &[u8]) -> bool {
    s.iter().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn all_zero(s: &[u8]) -> bool {
    s.iter().all(|&b| b == b'0')
}

/// Every byte as its two lowercase hex digits.
const PAIRS: [[u8; 2]; 256] = {
    let mut t = [[0u8; 2]; 256];
    let mut i = 0;
    while i < 256 {
        t[i] = [HEX[i >> 4], HEX[i & 0xf]];
        i += 1;
    }
    t
};

/// `n` as 16 lowercase hex digits into `out` (16 bytes); never all zeros.
fn hex_into(out: &mut [u8], n: u64) {
    let n = if n == 0 { 1 } else { n };
    for (pair, byte) in out.chunks_exact_mut(2).zip(n.to_be_bytes()) {
        pair.copy_from_slice(&PAIRS[byte as usize]);
    }
}

/// wyrand, one state per thread, seeded from the standard library's per-thread random
/// keys (no syscall after the first).
fn random() -> u64 {
    thread_local! {
        static STATE: Cell<u64> = Cell::new({
            use std::hash::{BuildHasher, Hasher};
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos());
            h.finish()
        });
    }
    STATE.with(|s| {
        let x = s.get().wrapping_add(0xa076_1d64_78bd_642f);
        s.set(x);
        let t = u128::from(x).wrapping_mul(u128::from(x ^ 0xe703_7ed1_a0b4_28db));
        ((t >> 64) ^ t) as u64
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLIENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    fn with(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(TRACEPARENT, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    /// Splits a traceparent into (version, trace id, parent id, flags), checking its shape.
    fn fields(v: &HeaderValue) -> (String, String, String, String) {
        let s = v.to_str().unwrap();
        assert!(parse(s.as_bytes()).is_some(), "the gateway sent an invalid traceparent: {s}");
        let p: Vec<&str> = s.split('-').collect();
        (p[0].into(), p[1].into(), p[2].into(), p[3].into())
    }

    #[test]
    fn a_valid_traceparent_keeps_trace_id_and_flags_with_a_new_span() {
        for flags in ["01", "00", "03"] {
            let client = CLIENT.replace("-01", &format!("-{flags}"));
            let t = Trace::from_client(&with(&[&client]));
            assert!(t.continued());
            assert_eq!(t.id(), "4bf92f3577b34da6a3ce929d0e0e4736");
            let (version, trace, span, sent_flags) = fields(t.traceparent());
            assert_eq!((version.as_str(), trace.as_str(), sent_flags.as_str()), ("00", t.id(), flags));
            assert_ne!(span, "00f067aa0ba902b7", "the backend's parent is the gateway's span");
            assert_eq!(span.len(), 16);
        }
        // Each request gets its own span.
        let (a, b) = (Trace::from_client(&with(&[CLIENT])), Trace::from_client(&with(&[CLIENT])));
        assert_ne!(a.traceparent(), b.traceparent());
    }

    #[test]
    fn a_later_version_is_read_as_00() {
        let t = Trace::from_client(&with(&["01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra"]));
        assert!(t.continued());
        assert_eq!(fields(t.traceparent()).0, "00");
        assert!(!Trace::from_client(&with(&["01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x"])).continued());
    }

    #[test]
    fn invalid_or_missing_traceparent_starts_a_new_trace() {
        let invalid = [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7", // too short
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-", // too long for 00
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01", // uppercase
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00F067AA0BA902B7-01", // uppercase
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01", // zero trace id
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01", // zero parent id
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", // version ff
            "0g-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", // not hex
            "00_4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7_01", // separators
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01", // not hex
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0z", // bad flags
        ];
        let mut ids = std::collections::HashSet::new();
        for v in invalid {
            let t = Trace::from_client(&with(&[v]));
            assert!(!t.continued(), "accepted {v:?}");
            let (version, trace, _, flags) = fields(t.traceparent());
            assert_eq!((version.as_str(), trace.as_str(), flags.as_str()), ("00", t.id(), "01"));
            assert_ne!(t.id(), "4bf92f3577b34da6a3ce929d0e0e4736");
            assert!(ids.insert(t.id().to_owned()), "trace id repeated");
        }
        assert!(!Trace::from_client(&HeaderMap::new()).continued());
        assert!(!Trace::from_client(&with(&[CLIENT, CLIENT])).continued(), "two traceparent headers are invalid");
    }
}
