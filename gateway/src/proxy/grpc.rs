//! gRPC clients get gRPC errors: what the gateway answers itself (no backend, a backend
//! that failed, a timeout, a plugin's rejection) becomes a trailers-only response, HTTP
//! 200 with `grpc-status` and `grpc-message`, which a gRPC client reads as the call's
//! status instead of an opaque HTTP error. Responses from backends pass unchanged.

use super::ResponseBody;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Response, StatusCode, Version};

const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
const GRPC_MESSAGE: HeaderName = HeaderName::from_static("grpc-message");

/// Whether a request is a gRPC call: HTTP/2 with `content-type: application/grpc[+...]`.
/// The version is tested first, so HTTP/1.1 requests pay one compare.
pub fn is_call(version: Version, headers: &HeaderMap) -> bool {
    version == Version::HTTP_2
        && headers.get(header::CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// The gRPC status for an HTTP status the gateway answered with: gRPC's own mapping
/// (doc/http-grpc-status-mapping.md), plus 413 → RESOURCE_EXHAUSTED and 408 →
/// DEADLINE_EXCEEDED.
pub fn status_for(http: StatusCode) -> u8 {
    match http.as_u16() {
        400 => 13,                   // INTERNAL
        401 => 16,                   // UNAUTHENTICATED
        403 => 7,                    // PERMISSION_DENIED
        404 => 12,                   // UNIMPLEMENTED
        408 => 4,                    // DEADLINE_EXCEEDED
        413 => 8,                    // RESOURCE_EXHAUSTED
        429 | 502 | 503 | 504 => 14, // UNAVAILABLE
        _ => 2,                      // UNKNOWN
    }
}

/// Turns a response the gateway wrote into a trailers-only gRPC error carrying its
/// text as `grpc-message` (percent-encoded, as the gRPC spec asks).
pub fn error_response(resp: Response<ResponseBody>) -> Response<ResponseBody> {
    let (mut parts, body) = resp.into_parts();
    let text = match &body {
        ResponseBody::Full(Some(data)) => String::from_utf8_lossy(data).trim_end().to_owned(),
        _ => parts.status.canonical_reason().unwrap_or("").to_owned(),
    };
    let code = status_for(parts.status);
    parts.status = StatusCode::OK;
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    parts.headers.insert(GRPC_STATUS, HeaderValue::from(u16::from(code)));
    if let Ok(v) = HeaderValue::from_str(&percent_encode(&text)) {
        parts.headers.insert(GRPC_MESSAGE, v);
    }
    Response::from_parts(parts, ResponseBody::empty())
}

/// gRPC's `grpc-message` encoding: printable ASCII except `%` as is, the rest `%XX`.
fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for &b in text.as_bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gateway_errors_become_unavailable_trailers_only() {
        let resp = super::super::plain(StatusCode::SERVICE_UNAVAILABLE, "no healthy backend\n");
        let resp = error_response(resp);
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.headers()["grpc-status"], "14");
        assert_eq!(resp.headers()["grpc-message"], "no healthy backend");
        assert_eq!(resp.headers()["content-type"], "application/grpc");
        assert!(http_body::Body::is_end_stream(resp.body()));
    }

    #[test]
    fn messages_are_percent_encoded() {
        assert_eq!(percent_encode("a 100% é\n"), "a 100%25 %C3%A9%0A");
    }

    #[test]
    fn only_http2_grpc_content_types_are_calls() {
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/grpc+proto"));
        assert!(is_call(Version::HTTP_2, &h));
        assert!(!is_call(Version::HTTP_11, &h));
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        assert!(!is_call(Version::HTTP_2, &h));
    }
}
