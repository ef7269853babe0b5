//! Who may use the admin API.
//!
//! - Without a token the admin listener must be on a loopback address (checked at start),
//!   and it only answers requests whose `Host` is a loopback name, so a web page that
//!   re-points its own DNS name at 127.0.0.1 (DNS rebinding) is refused.
//! - With a token (`admin.token_file`, `--admin-token-file`), every request needs
//!   `Authorization: Bearer TOKEN`, compared in constant time; `GET /`, `GET /healthz`
//!   and, with `admin.public_metrics`, `GET /metrics` are public.
//! - Mutations are POSTs. A browser page on another site cannot forge one: with a token it
//!   cannot set the `Authorization` header (no CORS is ever answered), and without one a
//!   request whose `Origin` or `Sec-Fetch-Site` says cross-site is refused.
//!
//! - The registry API (`/api/registry/...`) also takes the registration token
//!   (`registry.token_file`): it grants that API and nothing else, so a backend that may
//!   register itself cannot drain others or reload the config.
//!
//! Tokens are never logged or shown.

use super::{AdminResponse, error};
use http::{StatusCode, header, request::Parts};
use std::net::SocketAddr;
use std::path::Path;
use subtle::ConstantTimeEq;

/// The admin listener's access rules.
pub struct Auth {
    token: Option<Vec<u8>>,
    registry_token: Option<Vec<u8>>,
    public_metrics: bool,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the token itself.
        f.debug_struct("Auth")
            .field("token", &self.token.as_ref().map(|_| "<set>"))
            .field("registry_token", &self.registry_token.as_ref().map(|_| "<set>"))
            .finish()
    }
}

/// Why the admin listener cannot start as configured.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// A non-loopback address without a token.
    #[error(
        "admin.address {0} is not a loopback address, and the admin API can drain backends and reload the config: \
         set admin.token_file (or --admin-token-file FILE) to a file holding a secret token, or bind it to 127.0.0.1"
    )]
    NeedsToken(SocketAddr),
    /// The token file could not be read or is empty.
    #[error("admin token file {path}: {reason}")]
    TokenFile {
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
}

impl Auth {
    /// The rules for an admin listener on `addr` with the token in `token_file`.
    pub fn new(addr: SocketAddr, token_file: Option<&Path>, public_metrics: bool) -> Result<Auth, AuthError> {
        let token = match token_file {
            Some(path) => Some(read_token(path)?),
            None if !addr.ip().is_loopback() => return Err(AuthError::NeedsToken(addr)),
            None => None,
        };
        Ok(Auth { token, registry_token: None, public_metrics })
    }

    /// Also accepts the registration token in `token_file` on the registry API.
    pub fn with_registry_token(mut self, token_file: Option<&Path>) -> Result<Auth, AuthError> {
        self.registry_token = token_file.map(read_token).transpose()?;
        Ok(self)
    }

    /// No token: for tests and the loopback default.
    pub fn open() -> Auth {
        Auth { token: None, registry_token: None, public_metrics: false }
    }

    /// Whether the request may use the registry API: the registration token, or what
    /// the rest of the admin API takes (the admin token; without one, loopback and, for
    /// a change, same-site).
    pub fn check_registry(&self, req: &Parts) -> Result<(), Box<AdminResponse>> {
        if let Some(token) = &self.registry_token {
            match bearer(req) {
                Some(t) if bool::from(t.ct_eq(token)) => return Ok(()),
                Some(t) if self.token.as_ref().is_some_and(|admin| bool::from(t.ct_eq(admin))) => return Ok(()),
                Some(_) => {
                    return Err(Box::new(unauthorized(
                        "the token matches neither the registry token (registry.token_file) nor the admin token",
                    )));
                }
                None if self.token.is_some() => {
                    return Err(Box::new(unauthorized(
                        "the registry API needs `Authorization: Bearer TOKEN` with the registry token (the file registry.token_file names)",
                    )));
                }
                None => {}
            }
        }
        self.check(req)?;
        if req.method != http::Method::GET && req.method != http::Method::HEAD {
            self.check_mutation(req)?;
        }
        Ok(())
    }

    /// A token is required.
    pub fn has_token(&self) -> bool {
        self.token.is_some()
    }

    /// `/metrics` is served without the token.
    pub fn public_metrics(&self) -> bool {
        self.public_metrics || self.token.is_none()
    }

    /// Whether the request may read the admin API.
    pub fn check(&self, req: &Parts) -> Result<(), Box<AdminResponse>> {
        match &self.token {
            Some(token) => {
                let given = bearer(req);
                match given {
                    Some(t) if bool::from(t.ct_eq(token)) => Ok(()),
                    Some(_) => Err(Box::new(unauthorized("the admin token does not match"))),
                    None => Err(Box::new(unauthorized(
                        "this admin API needs `Authorization: Bearer TOKEN` (the token is in the file admin.token_file names)",
                    ))),
                }
            }
            None => {
                if host_is_loopback(req) {
                    Ok(())
                } else {
                    Err(Box::new(error(
                        StatusCode::FORBIDDEN,
                        "the admin API without a token answers only requests to a loopback host name \
                         (127.0.0.1, [::1] or localhost): open it by that address",
                    )))
                }
            }
        }
    }

    /// Whether a mutating request (drain, reload, ...) may go ahead: with a token, the
    /// token already proves it; without one, it must not come from another site.
    pub fn check_mutation(&self, req: &Parts) -> Result<(), Box<AdminResponse>> {
        if self.token.is_some() {
            return Ok(());
        }
        let h = &req.headers;
        let fetch_site = h.get("sec-fetch-site").and_then(|v| v.to_str().ok());
        if matches!(fetch_site, Some(s) if s != "same-origin" && s != "none") {
            return Err(Box::new(cross_site()));
        }
        if let Some(origin) = h.get(header::ORIGIN).and_then(|v| v.to_str().ok()) {
            let origin_host = origin.split_once("://").map_or(origin, |(_, rest)| rest);
            let host = h.get(header::HOST).and_then(|v| v.to_str().ok()).unwrap_or("");
            if origin == "null" || !origin_host.eq_ignore_ascii_case(host) {
                return Err(Box::new(cross_site()));
            }
        }
        Ok(())
    }
}

/// The bearer token of the request, if any.
fn bearer(req: &Parts) -> Option<&[u8]> {
    req.headers.get(header::AUTHORIZATION).and_then(|v| v.as_bytes().strip_prefix(b"Bearer ")).map(|t| t.trim_ascii())
}

/// The token in `path`, trimmed: at least 16 characters.
pub fn read_token(path: &Path) -> Result<Vec<u8>, AuthError> {
    let fail = |reason: String| AuthError::TokenFile { path: path.display().to_string(), reason };
    let text = std::fs::read_to_string(path).map_err(|e| fail(format!("cannot read: {e}")))?;
    let token = text.trim();
    if token.is_empty() {
        return Err(fail("is empty: put a secret token in it (e.g. `openssl rand -hex 32 > FILE`)".into()));
    }
    if token.len() < 16 {
        return Err(fail(format!("the token is {} characters: use at least 16", token.len())));
    }
    Ok(token.as_bytes().to_vec())
}

/// The `Host` header names a loopback address or `localhost` (or is absent: HTTP/1.0
/// clients and tools on the same machine).
fn host_is_loopback(req: &Parts) -> bool {
    let Some(host) = req.headers.get(header::HOST).and_then(|v| v.to_str().ok()).or(req.uri.host()) else {
        return true;
    };
    let name = if let Some(rest) = host.strip_prefix('[') {
        rest.split_once(']').map_or(rest, |(h, _)| h)
    } else {
        host.rsplit_once(':').map_or(host, |(h, _)| h)
    };
    name.eq_ignore_ascii_case("localhost")
        || name.to_ascii_lowercase().ends_with(".localhost")
        || name.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

fn unauthorized(message: &str) -> AdminResponse {
    let mut resp = error(StatusCode::UNAUTHORIZED, message);
    resp.headers_mut().insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
    resp
}

fn cross_site() -> AdminResponse {
    error(
        StatusCode::FORBIDDEN,
        "refused: this admin request comes from another site (Origin / Sec-Fetch-Site). Use curl, the stats page \
         served by this listener, or set an admin token",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(headers: &[(&str, &str)]) -> Parts {
        let mut b = http::Request::builder().method("POST").uri("/api/reload");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap().into_parts().0
    }

    fn with_token() -> Auth {
        Auth { token: Some(b"0123456789abcdef-secret".to_vec()), registry_token: None, public_metrics: false }
    }

    #[test]
    fn the_registry_token_opens_the_registry_api_only() {
        let a = Auth { registry_token: Some(b"registry-token-0123".to_vec()), ..with_token() };
        let reg = parts(&[("authorization", "Bearer registry-token-0123")]);
        assert!(a.check_registry(&reg).is_ok());
        assert_eq!(a.check(&reg).unwrap_err().status(), 401, "not the rest of the admin API");
        let admin = parts(&[("authorization", "Bearer 0123456789abcdef-secret")]);
        assert!(a.check_registry(&admin).is_ok(), "the admin token works there too");
        assert_eq!(a.check_registry(&parts(&[("authorization", "Bearer nope")])).unwrap_err().status(), 401);
        assert_eq!(a.check_registry(&parts(&[])).unwrap_err().status(), 401);
        // Without an admin token: the registry token, or loopback as for the admin API.
        let open = Auth { registry_token: Some(b"registry-token-0123".to_vec()), ..Auth::open() };
        assert!(open.check_registry(&parts(&[("host", "127.0.0.1:9901")])).is_ok());
        assert_eq!(open.check_registry(&parts(&[("host", "evil.example")])).unwrap_err().status(), 403);
        assert!(
            open.check_registry(&parts(&[("host", "evil.example"), ("authorization", "Bearer registry-token-0123")]))
                .is_ok()
        );
    }

    #[test]
    fn a_token_is_required_off_loopback() {
        let e = Auth::new("0.0.0.0:9901".parse().unwrap(), None, false).unwrap_err().to_string();
        assert!(e.contains("admin.token_file"), "{e}");
        assert!(Auth::new("127.0.0.1:9901".parse().unwrap(), None, false).is_ok());
        assert!(Auth::new("[::1]:9901".parse().unwrap(), None, false).is_ok());
    }

    #[test]
    fn bearer_token_is_checked() {
        let a = with_token();
        assert!(a.check(&parts(&[("authorization", "Bearer 0123456789abcdef-secret")])).is_ok());
        assert_eq!(a.check(&parts(&[("authorization", "Bearer nope")])).unwrap_err().status(), 401);
        assert_eq!(a.check(&parts(&[])).unwrap_err().status(), 401);
        assert!(!a.public_metrics());
    }

    #[test]
    fn without_a_token_only_loopback_hosts_and_same_site_mutations_pass() {
        let a = Auth::open();
        assert!(a.check(&parts(&[("host", "127.0.0.1:9901")])).is_ok());
        assert!(a.check(&parts(&[("host", "localhost:9901")])).is_ok());
        assert!(a.check(&parts(&[("host", "[::1]:9901")])).is_ok());
        assert_eq!(a.check(&parts(&[("host", "evil.example:9901")])).unwrap_err().status(), 403);

        assert!(a.check_mutation(&parts(&[("host", "127.0.0.1:9901")])).is_ok(), "curl sends no Origin");
        let same = [("host", "127.0.0.1:9901"), ("origin", "http://127.0.0.1:9901"), ("sec-fetch-site", "same-origin")];
        assert!(a.check_mutation(&parts(&same)).is_ok());
        let cross = [("host", "127.0.0.1:9901"), ("origin", "https://evil.example")];
        assert_eq!(a.check_mutation(&parts(&cross)).unwrap_err().status(), 403);
        let fetch = [("host", "127.0.0.1:9901"), ("sec-fetch-site", "cross-site")];
        assert_eq!(a.check_mutation(&parts(&fetch)).unwrap_err().status(), 403);
    }
}
