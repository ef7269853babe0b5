//! The live stats page: one self-contained HTML file (no external assets, works
//! offline) that polls `/api/stats` and redraws without reloading.

use super::AdminResponse;
use bytes::Bytes;
use http::{Response, header};
use http_body_util::Full;

const PAGE: &str = include_str!("page.html");

/// `GET /`.
pub fn response() -> AdminResponse {
    let mut resp = Response::new(Full::new(Bytes::from_static(PAGE.as_bytes())));
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, header::HeaderValue::from_static("text/html; charset=utf-8"));
    h.insert(header::CACHE_CONTROL, header::HeaderValue::from_static("no-store"));
    // The page loads nothing from elsewhere, and nothing may frame it.
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        header::HeaderValue::from_static(
            "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src data:; frame-ancestors 'none'",
        ),
    );
    h.insert(header::X_FRAME_OPTIONS, header::HeaderValue::from_static("DENY"));
    resp
}
