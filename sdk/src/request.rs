//! The request being routed, as a strategy reads it.

use std::collections::HashMap;

/// Read access to the request being routed. In a plugin each call reads from the
/// gateway on demand, so read only what the strategy needs.
pub trait Request {
    /// `GET`, `POST`, ...
    fn method(&self) -> String;
    /// Path and query.
    fn path(&self) -> String;
    /// The host the client asked for.
    fn authority(&self) -> Option<String>;
    /// First value of the header `name` (case-insensitive).
    fn header(&self, name: &str) -> Option<String>;
    /// Value of the cookie `name`.
    fn cookie(&self, name: &str) -> Option<String>;
    /// Value of the query parameter `name`.
    fn query_param(&self, name: &str) -> Option<String>;
    /// The client's IP address.
    fn client_ip(&self) -> String;
}

impl Request for crate::bindings::gateway::selector::types::Request {
    fn method(&self) -> String {
        Self::method(self)
    }
    fn path(&self) -> String {
        Self::path(self)
    }
    fn authority(&self) -> Option<String> {
        Self::authority(self)
    }
    fn header(&self, name: &str) -> Option<String> {
        Self::header(self, name)
    }
    fn cookie(&self, name: &str) -> Option<String> {
        Self::cookie(self, name)
    }
    fn query_param(&self, name: &str) -> Option<String> {
        Self::query_param(self, name)
    }
    fn client_ip(&self) -> String {
        Self::client_ip(self)
    }
}

/// A request built in memory, for unit tests of strategies.
#[derive(Debug, Clone)]
pub struct TestRequest {
    /// Method, default `GET`.
    pub method: String,
    /// Path and query, default `/`.
    pub path: String,
    /// Host, default none.
    pub authority: Option<String>,
    /// Headers, lower-case names.
    pub headers: HashMap<String, String>,
    /// Client IP, default `127.0.0.1`.
    pub client_ip: String,
}

impl Default for TestRequest {
    fn default() -> Self {
        TestRequest {
            method: "GET".into(),
            path: "/".into(),
            authority: None,
            headers: HashMap::new(),
            client_ip: "127.0.0.1".into(),
        }
    }
}

impl TestRequest {
    /// A `GET /` from 127.0.0.1.
    pub fn new() -> Self {
        Self::default()
    }
    /// Sets the path.
    pub fn path(mut self, path: &str) -> Self {
        self.path = path.into();
        self
    }
    /// Adds a header.
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.insert(name.to_ascii_lowercase(), value.into());
        self
    }
    /// Sets the client IP.
    pub fn client_ip(mut self, ip: &str) -> Self {
        self.client_ip = ip.into();
        self
    }
}

impl Request for TestRequest {
    fn method(&self) -> String {
        self.method.clone()
    }
    fn path(&self) -> String {
        self.path.clone()
    }
    fn authority(&self) -> Option<String> {
        self.authority.clone()
    }
    fn header(&self, name: &str) -> Option<String> {
        self.headers.get(&name.to_ascii_lowercase()).cloned()
    }
    fn cookie(&self, name: &str) -> Option<String> {
        let cookies = self.headers.get("cookie")?;
        cookies.split(';').find_map(|c| {
            let (k, v) = c.trim().split_once('=')?;
            (k == name).then(|| v.to_owned())
        })
    }
    fn query_param(&self, name: &str) -> Option<String> {
        let (_, query) = self.path.split_once('?')?;
        query.split('&').find_map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (k == name).then(|| v.to_owned())
        })
    }
    fn client_ip(&self) -> String {
        self.client_ip.clone()
    }
}
