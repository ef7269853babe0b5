//! The gateway's configuration: plain serde types, defaults and validation.
//!
//! Imports no other gateway module. A file is read with [`load`]; the quick-start
//! flags build the same [`Config`] (see `cli.rs`). Every field is documented with its
//! default in `docs/config.md`.

mod load;

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

pub use load::{
    ConfigError, MAX_CONFIG_BYTES, TTL_RANGE, check_registry_listener, from_yaml, load, locate, parse_resolver,
    peek_log_format, validate,
};

/// The whole configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Addresses the proxy accepts client connections on.
    #[serde(default = "default_listeners")]
    pub listeners: Vec<Listener>,
    /// Request → upstream rules, first match wins. Empty: every request goes to the
    /// only upstream (an error when there are several).
    #[serde(default)]
    pub routes: Vec<Route>,
    /// Named groups of backends.
    pub upstreams: BTreeMap<String, Upstream>,
    /// Where plugin files live and how each call is bounded.
    #[serde(default)]
    pub plugins: Plugins,
    /// Defaults for every upstream's timeouts.
    #[serde(default)]
    pub timeouts: Timeouts,
    /// The admin listener (JSON API, health of the gateway itself).
    #[serde(default)]
    pub admin: Admin,
    /// Worker threads, each with its own event loop and listener socket; 0 = one per core.
    #[serde(default)]
    pub threads: usize,
    /// How long in-flight requests may run on after SIGTERM/SIGINT.
    #[serde(default = "default_grace", with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// One log line per request: `true`/`false`, or a map (see [`AccessLog`]).
    /// Default on, to stderr.
    #[serde(default)]
    pub access_log: AccessLog,
    /// Format of the process's own logs on stderr; none = text on a terminal, JSON
    /// otherwise. `--log-format` wins over it.
    #[serde(default)]
    pub log_format: Option<LogFormat>,
    /// Prometheus metrics.
    #[serde(default)]
    pub metrics: Metrics,
    /// The embedded registry's API (on the admin listener), for upstreams with
    /// `discovery.registry`.
    #[serde(default)]
    pub registry: Registry,
}

/// Settings of the embedded registry API, shared by every upstream that uses it.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Registry {
    /// A file holding the registration token: `Authorization: Bearer TOKEN` with it may
    /// use `/api/registry/*` and nothing else of the admin API (so a backend that may
    /// register cannot drain others). The admin token works there too. Default none:
    /// the registry API takes the admin listener's rules (loopback, or the admin token).
    #[serde(default)]
    pub token_file: Option<PathBuf>,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines (no colours unless stderr is a terminal).
    Text,
    /// One JSON object per line.
    Json,
}

/// The access log: one line per request. In a file, `access_log: true` (stderr, in the
/// process's log format) and `access_log: false` (off) still work; the map form is
/// `{enabled, path, format}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AccessLog {
    /// Log at all. Default true.
    pub enabled: bool,
    /// File to append to (reopened on SIGUSR1, for logrotate); none = stderr. Default none.
    pub path: Option<PathBuf>,
    /// Line format; none = JSON for a file, the process's log format for stderr.
    pub format: Option<LogFormat>,
}

impl Default for AccessLog {
    /// On, to stderr, in the process's log format.
    fn default() -> Self {
        AccessLog { enabled: true, path: None, format: None }
    }
}

/// Metrics recording.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metrics {
    /// Record per-request metrics (`/metrics`, the stats page). Default true; off only
    /// to measure what they cost.
    #[serde(default = "yes")]
    pub enabled: bool,
}

/// One listening address.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Listener {
    /// `ip:port`, e.g. `0.0.0.0:8080`.
    pub address: SocketAddr,
    /// Every connection starts with a PROXY protocol header (v1 text or v2 binary, as an
    /// L4 balancer such as HAProxy or an AWS NLB sends it); the client address it carries
    /// is the one `X-Forwarded-For`, plugins and the access log see. A connection without
    /// a valid header is closed. Default false.
    #[serde(default)]
    pub proxy_protocol: bool,
    /// Terminate TLS on this listener (HTTPS). Default none: plaintext.
    #[serde(default)]
    pub tls: Option<Tls>,
    /// Bounds on what one client may hold or send (see [`Limits`]).
    #[serde(default)]
    pub limits: Limits,
    /// Answer every request with `308` to `https://HOST[:PORT]/path?query` and proxy
    /// nothing: the HTTPS port to send clients to (443 is left out of the URL). Default
    /// none.
    #[serde(default)]
    pub redirect_https: Option<u16>,
}

impl Listener {
    /// A plaintext listener on `address` with the default limits.
    pub fn at(address: SocketAddr) -> Self {
        Listener { address, proxy_protocol: false, tls: None, limits: Limits::default(), redirect_https: None }
    }
}

/// TLS termination on a listener.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tls {
    /// Certificate/key pairs (PEM files, paths relative to the working directory). The
    /// one whose names (subject alternative names) match the client's SNI is used; the
    /// first is the default (no SNI, or a name none of them carries). At least one.
    #[serde(deserialize_with = "load::non_empty")]
    pub certificates: Vec<CertificateFiles>,
}

/// One certificate (chain) and its private key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertificateFiles {
    /// PEM file: the leaf certificate first, then intermediates.
    pub cert: PathBuf,
    /// PEM file: the private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// Bounds on one listener's clients.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Longest a client may take to send a request's headers once it started (and the
    /// TLS handshake); a slower client is disconnected. Default 10s.
    #[serde(default = "default_header_timeout", with = "humantime_serde")]
    pub header_timeout: Duration,
    /// A connection with no request in progress and no bytes moving for this long is
    /// closed. Default 60s.
    #[serde(default = "default_idle_timeout", with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Longest wait for the next piece of a request body once the gateway is ready to
    /// read it (nginx's `client_body_timeout`): a stalled body is cut, the backend
    /// connection closed, and the client gets `408` if no response has started. Not a
    /// bound on the whole upload. Default 30s.
    #[serde(default = "default_body_timeout", with = "humantime_serde")]
    pub body_timeout: Duration,
    /// Connections served at once on this listener (all worker threads together); more
    /// wait in the kernel's accept backlog until one closes. Default 10000.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Largest request head (request line and headers) in bytes; larger gets `431`.
    /// At least 8192. Default 65536.
    #[serde(default = "default_max_header_bytes")]
    pub max_header_bytes: usize,
    /// Most header fields in one request; more gets `431`. Default 100.
    #[serde(default = "default_max_headers")]
    pub max_headers: usize,
    /// HTTP/2: streams (requests) a client may have open at once on one connection.
    /// Default 100.
    #[serde(default = "default_max_concurrent_streams")]
    pub max_concurrent_streams: u32,
}

/// A routing rule: requests whose host and path match go to `upstream`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    /// Name shown in logs; defaults to `route-N`.
    #[serde(default)]
    pub name: Option<String>,
    /// Host to match (without port): exact, or `*.example.com`; none = any host.
    #[serde(default)]
    pub host: Option<String>,
    /// Path prefix to match, default `/`.
    #[serde(default = "default_prefix")]
    pub path_prefix: String,
    /// The upstream that serves matching requests.
    pub upstream: String,
    /// Largest request body, in bytes, counted as it streams: a larger declared
    /// `Content-Length` gets `413` at once; a chunked body is cut when it passes the limit.
    /// Default none (no limit).
    #[serde(default)]
    pub max_body_bytes: Option<u64>,
    /// Total time from the request's arrival to the backend's response headers, all
    /// attempts and retries included (`504` when it fires); wins over the upstream's
    /// `timeouts.request`. Default none.
    #[serde(default, with = "humantime_serde")]
    pub timeout: Option<Duration>,
}

/// A group of backends and how to choose among them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Upstream {
    /// The backends from the config file. At least one, unless `discovery` finds them.
    #[serde(default)]
    pub backends: Vec<Backend>,
    /// Where more backends come from while the gateway runs (one source). Default none.
    #[serde(default)]
    pub discovery: Option<Discovery>,
    /// The selection plugin and its params, or a chain of them tried in order (a
    /// plugin that answers `pass` lets the next one decide).
    #[serde(default)]
    pub strategy: Chain,
    /// A second strategy that decides a share of the requests (one client, one
    /// strategy), to try it on live traffic before it replaces `strategy`. Default none.
    #[serde(default)]
    pub canary: Option<Canary>,
    /// A strategy that also decides a sample of the requests without acting on it: the
    /// gateway records how often it agrees with the live decision and where it would
    /// have sent them. Default none.
    #[serde(default)]
    pub shadow: Option<Shadow>,
    /// Active health checks.
    #[serde(default)]
    pub health_check: HealthCheck,
    /// Passive health: eject a backend after consecutive failed requests.
    #[serde(default)]
    pub passive: Passive,
    /// Retries on another backend.
    #[serde(default)]
    pub retries: Retries,
    /// How many retries may add to the load, on top of the requests themselves.
    #[serde(default)]
    pub retry_budget: RetryBudget,
    /// Overrides of the global `timeouts`.
    #[serde(default)]
    pub timeouts: Option<Timeouts>,
    /// How the gateway speaks to the backends: `http1` (default), `h2c` (HTTP/2 in
    /// cleartext, prior knowledge: gRPC) or `h2` (HTTP/2 over TLS, ALPN `h2`).
    #[serde(default)]
    pub protocol: Protocol,
    /// TLS to the backends (with `http1` or `h2`); none = cleartext (`h2` implies TLS
    /// with the defaults of [`UpstreamTls`]).
    #[serde(default)]
    pub tls: Option<UpstreamTls>,
    /// Keep-alive connections to the backends, per backend and worker thread.
    #[serde(default)]
    pub pool: ConnPool,
}

/// An upstream's discovery source: exactly one of these keys.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Discovery {
    /// Backends register themselves through the registry API (`PUT /api/registry/...`).
    #[serde(default)]
    pub registry: Option<RegistrySource>,
    /// Backends are the answers to a DNS query.
    #[serde(default)]
    pub dns: Option<DnsSource>,
    /// Backends are the keys under a prefix in etcd, shared by a fleet of gateways.
    #[serde(default)]
    pub etcd: Option<EtcdSource>,
}

/// `discovery.etcd`: the backends are the keys `{prefix}{upstream}/{id}` in etcd, whose
/// values are registration JSON (`{"address", "weight", "zone", "labels"}`); the gateway
/// reads them, then watches the prefix. The registry API
/// (`PUT /api/registry/{upstream}/{id}`) writes to etcd for such an upstream, under a
/// lease of the registration's TTL, so every replica sees what any replica accepted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EtcdSource {
    /// etcd client URLs, `http://host:port` (or `host:port`); requests go to any of them.
    pub endpoints: Vec<String>,
    /// Key prefix; an upstream's instances are the keys `{prefix}{upstream}/{id}`.
    /// Default `/gateway/`.
    #[serde(default = "default_etcd_prefix")]
    pub prefix: String,
    /// Bound on connecting and on each etcd request (a read, a write, starting the
    /// watch). Default 2s.
    #[serde(default = "default_etcd_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Lease TTL of a registration through the registry API that names none. Default 10s.
    #[serde(default = "default_registry_ttl", with = "humantime_serde")]
    pub default_ttl: Duration,
    /// Most instances taken from etcd; more keys are ignored (logged) and the registry
    /// API refuses more (`409`). Default 10000.
    #[serde(default = "default_max_instances")]
    pub max_instances: usize,
}

/// `discovery.registry`: instances register, heartbeat and deregister over HTTP.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistrySource {
    /// TTL of a registration that names none: without a heartbeat for this long, the
    /// instance is removed. Default 10s.
    #[serde(default = "default_registry_ttl", with = "humantime_serde")]
    pub default_ttl: Duration,
    /// Most instances registered at once; more are refused (`409`). Default 10000.
    #[serde(default = "default_max_instances")]
    pub max_instances: usize,
}

/// `discovery.dns`: the backends are the addresses a DNS name resolves to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DnsSource {
    /// The name to resolve, e.g. `books.default.svc.cluster.local` or
    /// `_books._tcp.service.test` (SRV).
    pub name: String,
    /// Record type: `a` (IPv4), `aaaa` (IPv6) or `srv` (targets, ports and weights).
    /// Default `a`.
    #[serde(default, rename = "type")]
    pub record_type: DnsRecordType,
    /// The backends' port, for `a` and `aaaa` (SRV records carry their own).
    #[serde(default)]
    pub port: Option<u16>,
    /// DNS server to ask, `IP` or `IP:PORT` (port 53 by default); none = the system's
    /// resolvers (`/etc/resolv.conf`). Default none.
    #[serde(default)]
    pub resolver: Option<String>,
    /// Resolve again this often, and sooner when the answer's TTL runs out (but not more
    /// than once a second). Default 5s.
    #[serde(default = "default_dns_refresh", with = "humantime_serde")]
    pub refresh: Duration,
}

/// A DNS record type the DNS source can follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DnsRecordType {
    /// IPv4 addresses, with the configured port.
    #[default]
    A,
    /// IPv6 addresses, with the configured port.
    Aaaa,
    /// Service records: target, port and weight each (lowest priority only).
    Srv,
}

/// The protocol spoken to an upstream's backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// HTTP/1.1 with keep-alive (TLS when `tls` is set). The default.
    #[default]
    Http1,
    /// HTTP/2 over cleartext TCP with prior knowledge (what gRPC servers speak).
    H2c,
    /// HTTP/2 over TLS, negotiated with ALPN `h2`.
    H2,
}

/// TLS towards an upstream's backends.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamTls {
    /// PEM file of the CA certificates that may sign the backends' certificates; none =
    /// the system bundle (`SSL_CERT_FILE`, else `/etc/ssl/certs/ca-certificates.crt`).
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// The name sent in SNI and checked against the backend's certificate; none = the
    /// backend's IP address.
    #[serde(default)]
    pub server_name: Option<String>,
    /// PEM certificate chain for client authentication (with `key`); none = no client
    /// certificate.
    #[serde(default)]
    pub cert: Option<PathBuf>,
    /// PEM private key of `cert`.
    #[serde(default)]
    pub key: Option<PathBuf>,
}

/// The backend connection pool of an upstream (each worker thread keeps its own).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConnPool {
    /// An unused keep-alive connection is closed after this long. Default 90s.
    #[serde(default = "default_pool_idle", with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Unused HTTP/1.1 connections kept per backend per worker; more are closed.
    /// Default 1024.
    #[serde(default = "default_max_idle")]
    pub max_idle: usize,
    /// HTTP/2 (`h2c`, `h2`): concurrent requests on one connection before another
    /// connection to the same backend is opened. Default 100.
    #[serde(default = "default_max_streams")]
    pub max_streams: usize,
}

impl Default for ConnPool {
    fn default() -> Self {
        ConnPool { idle_timeout: default_pool_idle(), max_idle: default_max_idle(), max_streams: default_max_streams() }
    }
}

/// One backend server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Backend {
    /// `host:port` (an IP address; names are resolved once at start).
    pub address: String,
    /// Stable id used by plugins (e.g. in sticky cookies); defaults to the address.
    #[serde(default)]
    pub id: Option<String>,
    /// Relative weight, default 1.
    #[serde(default = "one")]
    pub weight: u32,
    /// Zone or region, default empty.
    #[serde(default)]
    pub zone: String,
    /// Free-form labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// Which plugin picks the backend.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Strategy {
    /// Plugin name: a built-in, or `NAME.wasm` in the plugins folder (which wins).
    #[serde(default = "default_plugin")]
    pub plugin: String,
    /// Params handed to the plugin's `configure` as JSON.
    #[serde(default = "empty_params")]
    pub params: serde_json::Value,
}

/// `canary`: a strategy that decides [`Canary::share`] of an upstream's requests,
/// chosen by a stable hash of [`Canary::key`], so one client sees one strategy (on every
/// gateway of a fleet, and across restarts). The rest go to `strategy`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Canary {
    /// Plugin name: a built-in, or `NAME.wasm` in the plugins folder.
    pub plugin: String,
    /// Params handed to the plugin's `configure` as JSON. Default `{}`.
    #[serde(default = "empty_params")]
    pub params: serde_json::Value,
    /// The share of requests (by key) the canary decides, above 0 and at most 1.
    pub share: f64,
    /// What identifies a client: `client_ip` (default), `header:NAME`, `cookie:NAME` or
    /// `query:NAME`. A request without the key goes to the live strategy.
    #[serde(default)]
    pub key: ArmKey,
}

/// `shadow`: a strategy asked about [`Shadow::sample`] of an upstream's requests after
/// the live decision, off the request's path; its answer is recorded, never used.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Shadow {
    /// Plugin name: a built-in, or `NAME.wasm` in the plugins folder.
    pub plugin: String,
    /// Params handed to the plugin's `configure` as JSON. Default `{}`.
    #[serde(default = "empty_params")]
    pub params: serde_json::Value,
    /// The share of requests the shadow is asked about, above 0 and at most 1. Default 0.1.
    #[serde(default = "default_sample")]
    pub sample: f64,
}

/// What identifies a client for a canary's split.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum ArmKey {
    /// The client's IP address (after the PROXY protocol, when used).
    #[default]
    ClientIp,
    /// A request header.
    Header(String),
    /// A cookie.
    Cookie(String),
    /// A query parameter.
    Query(String),
}

impl std::fmt::Display for ArmKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ArmKey::ClientIp => f.write_str("client_ip"),
            ArmKey::Header(n) => write!(f, "header:{n}"),
            ArmKey::Cookie(n) => write!(f, "cookie:{n}"),
            ArmKey::Query(n) => write!(f, "query:{n}"),
        }
    }
}

impl std::str::FromStr for ArmKey {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let named = |kind: &str, name: &str, make: fn(String) -> ArmKey| {
            if name.is_empty() {
                Err(format!("`{kind}:` needs a name, e.g. `{kind}:x-user`"))
            } else {
                Ok(make(name.to_owned()))
            }
        };
        match s.split_once(':') {
            None if s == "client_ip" => Ok(ArmKey::ClientIp),
            Some(("header", name)) => {
                named("header", name, ArmKey::Header)?;
                http::HeaderName::from_bytes(name.as_bytes())
                    .map(|h| ArmKey::Header(h.as_str().to_owned()))
                    .map_err(|_| format!("`{name}` is not a valid header name"))
            }
            Some(("cookie", name)) => named("cookie", name, ArmKey::Cookie),
            Some(("query", name)) => named("query", name, ArmKey::Query),
            _ => Err(format!("unknown key `{s}`: expected `client_ip`, `header:NAME`, `cookie:NAME` or `query:NAME`")),
        }
    }
}

impl Serialize for ArmKey {
    fn serialize<S: serde::Serializer>(&self, ser: S) -> Result<S::Ok, S::Error> {
        ser.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ArmKey {
    fn deserialize<D: serde::Deserializer<'de>>(de: D) -> Result<Self, D::Error> {
        let s = String::deserialize(de)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// An upstream's strategy: one plugin (`{plugin, params}` in YAML) or a chain of them
/// (a list of those), asked in order until one decides; when the last one passes, the
/// native round robin chooses. At most [`Chain::MAX_STEPS`] steps.
#[derive(Debug, Clone, PartialEq)]
pub struct Chain {
    steps: Vec<Strategy>,
}

impl Chain {
    /// The longest chain accepted.
    pub const MAX_STEPS: usize = 8;

    /// A chain of one strategy.
    pub fn single(strategy: Strategy) -> Self {
        Chain { steps: vec![strategy] }
    }

    /// A chain of these strategies (at least one: an empty list is the default).
    pub fn of(steps: Vec<Strategy>) -> Self {
        if steps.is_empty() { Chain::default() } else { Chain { steps } }
    }

    /// The steps, in order (at least one).
    pub fn steps(&self) -> &[Strategy] {
        &self.steps
    }

    /// The first (for a single strategy, the only) step.
    pub fn first(&self) -> &Strategy {
        &self.steps[0]
    }

    /// The first step, to change (the quick-start flags set its plugin and params).
    pub fn first_mut(&mut self) -> &mut Strategy {
        &mut self.steps[0]
    }

    /// More than one step.
    pub fn is_chain(&self) -> bool {
        self.steps.len() > 1
    }

    /// The plugin names joined by ` > ` (`sticky-cookie > consistent-hash`): how logs,
    /// metrics and the access log name the strategy.
    pub fn name(&self) -> String {
        self.steps.iter().map(|s| s.plugin.as_str()).collect::<Vec<_>>().join(" > ")
    }
}

impl Default for Chain {
    fn default() -> Self {
        Chain::single(Strategy::default())
    }
}

impl Serialize for Chain {
    fn serialize<S: serde::Serializer>(&self, ser: S) -> Result<S::Ok, S::Error> {
        match self.steps.as_slice() {
            [one] => one.serialize(ser),
            steps => steps.serialize(ser),
        }
    }
}

/// Active health checking of every backend.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheck {
    /// Turn active checks on.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// `GET` this path and expect `expect_status`; none = a TCP connect check.
    #[serde(default)]
    pub path: Option<String>,
    /// Accepted status range for HTTP checks, default 200-399.
    #[serde(default = "default_expect")]
    pub expect_status: (u16, u16),
    /// Time between checks, default 2s.
    #[serde(default = "default_interval", with = "humantime_serde")]
    pub interval: Duration,
    /// Time a check may take, default 1s.
    #[serde(default = "default_check_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Consecutive successes that bring a down backend up, default 2.
    #[serde(default = "default_rise")]
    pub rise: u32,
    /// Consecutive failures that take an up backend down, default 3.
    #[serde(default = "default_fall")]
    pub fall: u32,
}

/// Passive health (Envoy's outlier detection, simplified).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Passive {
    /// Consecutive failed requests (connect errors, 5xx, timeouts) that eject a backend;
    /// 0 turns passive ejection off. Default 5.
    #[serde(default = "default_consecutive")]
    pub consecutive_failures: u32,
    /// First ejection time, multiplied by the number of ejections in a row. Default 5s.
    #[serde(default = "default_ejection", with = "humantime_serde")]
    pub base_ejection: Duration,
    /// Longest ejection. Default 60s.
    #[serde(default = "default_max_ejection", with = "humantime_serde")]
    pub max_ejection: Duration,
    /// Most backends passive health may have ejected at once, as a percentage of the
    /// upstream's backends, the one being ejected included (Envoy's
    /// `max_ejection_percent`): 50 = at most half; 100 = all. Default 50.
    #[serde(default = "default_max_ejected_percent")]
    pub max_ejected_percent: u32,
}

/// The retry budget of an upstream (Linkerd's and Envoy's idea): over the last
/// [`RetryBudget::WINDOW_SECS`] seconds, retries may number at most `ratio` times the
/// requests plus `min_per_second` per second. A retry beyond it is not made (the client
/// gets the failed attempt's answer) and is counted. Retries after a connect failure,
/// and of requests whose backend went down while they waited, do not count: they add no
/// load that the request itself would not have added.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryBudget {
    /// Retries allowed per request, on average. Default 0.2.
    #[serde(default = "default_budget_ratio")]
    pub ratio: f64,
    /// Retries per second always allowed, however few requests there are. Default 10.
    #[serde(default = "default_budget_floor")]
    pub min_per_second: u32,
}

impl RetryBudget {
    /// The sliding window the budget is counted over, in seconds.
    pub const WINDOW_SECS: u64 = 10;
}

/// Retry policy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Retries {
    /// Total attempts per request, first included. Default 3.
    #[serde(default = "default_attempts")]
    pub attempts: u32,
    /// Retry idempotent requests (GET, HEAD, OPTIONS, PUT, DELETE, TRACE) that got a 5xx
    /// or timed out. Connect failures are always retried. Default true.
    #[serde(default = "yes")]
    pub on_5xx: bool,
}

/// Timeouts towards backends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Timeouts {
    /// TCP connect to a backend, default 2s.
    #[serde(default = "default_connect", with = "humantime_serde")]
    pub connect: Duration,
    /// From sending the request to the backend's response headers, default 30s.
    #[serde(default = "default_response_header", with = "humantime_serde")]
    pub response_header: Duration,
    /// Total time from the request's arrival to the response headers, all attempts and
    /// retries included (`504` when it fires); a route's `timeout` wins. Default none.
    #[serde(default, with = "humantime_serde")]
    pub request: Option<Duration>,
}

/// Plugin settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Plugins {
    /// Folder of `NAME.wasm` files; a missing folder is fine. Default `./plugins`.
    #[serde(default = "default_plugin_dir")]
    pub dir: PathBuf,
    /// Longest a `pick` call may run before it is stopped and the fallback answers.
    /// Default 20ms.
    #[serde(default = "default_deadline", with = "humantime_serde")]
    pub deadline: Duration,
    /// Longest `configure` / `pool-changed` may run. Default 2s.
    #[serde(default = "default_setup_deadline", with = "humantime_serde")]
    pub setup_deadline: Duration,
    /// Linear memory one plugin instance may grow to, in MiB. Default 128.
    #[serde(default = "default_memory_mib")]
    pub memory_limit_mib: u32,
    /// Watch `dir` and hot-swap plugins when their files change. Default true.
    #[serde(default = "yes")]
    pub watch: bool,
    /// Keep compiled plugins on disk so restarts and re-swaps skip compilation.
    /// Default true.
    #[serde(default = "yes")]
    pub cache: bool,
    /// Where compiled plugins are kept. Default `$XDG_CACHE_HOME/gateway/plugins`
    /// (or `~/.cache/gateway/plugins`).
    #[serde(default)]
    pub cache_dir: Option<PathBuf>,
    /// Size of the compiled-plugin cache in MiB; past it the least recently used files
    /// are removed. Default 1024.
    #[serde(default = "default_cache_limit_mib")]
    pub cache_limit_mib: u64,
    /// Largest plugin file accepted, in MiB (a Python plugin is about 18). Default 32.
    #[serde(default = "default_file_limit_mib")]
    pub file_limit_mib: u64,
    /// Bytes of keys and values the key-value store of one upstream's plugin may hold,
    /// in MiB. Default 64.
    #[serde(default = "default_kv_limit_mib")]
    pub kv_limit_mib: u64,
    /// Bytes of counter keys one upstream's plugin may hold, in KiB. Default 1024.
    #[serde(default = "default_counters_limit_kib")]
    pub counters_limit_kib: u64,
    /// When a plugin whose calls keep failing is taken out of service.
    #[serde(default)]
    pub quarantine: Quarantine,
}

/// Quarantine of a failing plugin: after `after` failed calls in a row (trap, timeout,
/// bad answer, failed instance setup) the fallback round robin serves the upstream for
/// `backoff`; then the plugin is tried again, and each failed try doubles the backoff up
/// to `max_backoff`. One successful call ends the quarantine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Quarantine {
    /// Failed calls in a row that start a quarantine; 0 = never. Default 5.
    #[serde(default = "default_quarantine_after")]
    pub after: u32,
    /// The first quarantine's length. Default 1s.
    #[serde(default = "default_quarantine_backoff", with = "humantime_serde")]
    pub backoff: Duration,
    /// The longest quarantine. Default 60s.
    #[serde(default = "default_quarantine_max", with = "humantime_serde")]
    pub max_backoff: Duration,
}

impl Default for Quarantine {
    fn default() -> Self {
        Quarantine {
            after: default_quarantine_after(),
            backoff: default_quarantine_backoff(),
            max_backoff: default_quarantine_max(),
        }
    }
}

fn default_quarantine_after() -> u32 {
    5
}
fn default_quarantine_backoff() -> Duration {
    Duration::from_secs(1)
}
fn default_quarantine_max() -> Duration {
    Duration::from_secs(60)
}

/// The admin listener.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Admin {
    /// `ip:port`; none turns the admin listener off. Default none. An address that is
    /// not loopback needs `token_file`.
    #[serde(default)]
    pub address: Option<SocketAddr>,
    /// A file holding the bearer token every admin request must carry (except `GET /`,
    /// `/healthz` and, with `public_metrics`, `/metrics`). Default none.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// Serve `/metrics` without the token (for a Prometheus without credentials).
    /// Default false.
    #[serde(default)]
    pub public_metrics: bool,
}

fn yes() -> bool {
    true
}
fn default_registry_ttl() -> Duration {
    Duration::from_secs(10)
}
fn default_max_instances() -> usize {
    10_000
}
fn default_etcd_prefix() -> String {
    "/gateway/".into()
}
fn default_etcd_timeout() -> Duration {
    Duration::from_secs(2)
}
fn default_dns_refresh() -> Duration {
    Duration::from_secs(5)
}
fn one() -> u32 {
    1
}
fn default_listeners() -> Vec<Listener> {
    vec![Listener::at(SocketAddr::from(([127, 0, 0, 1], 8080)))]
}
fn default_prefix() -> String {
    "/".into()
}
fn default_plugin() -> String {
    "round-robin".into()
}
fn default_sample() -> f64 {
    0.1
}
fn empty_params() -> serde_json::Value {
    serde_json::Value::Object(Default::default())
}
fn default_expect() -> (u16, u16) {
    (200, 399)
}
fn default_interval() -> Duration {
    Duration::from_secs(2)
}
fn default_check_timeout() -> Duration {
    Duration::from_secs(1)
}
fn default_rise() -> u32 {
    2
}
fn default_fall() -> u32 {
    3
}
fn default_consecutive() -> u32 {
    5
}
fn default_ejection() -> Duration {
    Duration::from_secs(5)
}
fn default_max_ejection() -> Duration {
    Duration::from_secs(60)
}
fn default_max_ejected_percent() -> u32 {
    50
}
fn default_budget_ratio() -> f64 {
    0.2
}
fn default_budget_floor() -> u32 {
    10
}
fn default_attempts() -> u32 {
    3
}
fn default_pool_idle() -> Duration {
    Duration::from_secs(90)
}
fn default_max_idle() -> usize {
    1024
}
fn default_max_streams() -> usize {
    100
}
fn default_connect() -> Duration {
    Duration::from_secs(2)
}
fn default_response_header() -> Duration {
    Duration::from_secs(30)
}
fn default_plugin_dir() -> PathBuf {
    PathBuf::from("plugins")
}
fn default_deadline() -> Duration {
    Duration::from_millis(20)
}
fn default_setup_deadline() -> Duration {
    Duration::from_secs(2)
}
fn default_memory_mib() -> u32 {
    128
}
fn default_cache_limit_mib() -> u64 {
    1024
}
fn default_file_limit_mib() -> u64 {
    32
}
fn default_kv_limit_mib() -> u64 {
    64
}
fn default_counters_limit_kib() -> u64 {
    1024
}
fn default_header_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_idle_timeout() -> Duration {
    Duration::from_secs(60)
}
fn default_body_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_max_connections() -> usize {
    10_000
}
fn default_max_header_bytes() -> usize {
    65_536
}
fn default_max_headers() -> usize {
    100
}
fn default_max_concurrent_streams() -> u32 {
    100
}
fn default_grace() -> Duration {
    Duration::from_secs(30)
}

macro_rules! default_from_serde {
    ($($ty:ty),*) => {$(
        impl Default for $ty {
            /// The documented defaults (the same as an empty YAML map).
            fn default() -> Self {
                serde_json::from_value(serde_json::json!({})).expect("all fields have defaults")
            }
        }
    )*};
}
default_from_serde!(
    Strategy,
    HealthCheck,
    Passive,
    Retries,
    RetryBudget,
    Timeouts,
    Plugins,
    Admin,
    Metrics,
    Limits,
    RegistrySource
);

impl Strategy {
    /// `plugin` with no params.
    pub fn named(plugin: impl Into<String>) -> Self {
        Strategy { plugin: plugin.into(), params: empty_params() }
    }
}

impl Backend {
    /// A backend at `address` with weight 1 and no zone or labels.
    pub fn at(address: impl Into<String>) -> Self {
        Backend { address: address.into(), id: None, weight: 1, zone: String::new(), labels: BTreeMap::new() }
    }

    /// The id plugins see: `id`, or the address.
    pub fn id(&self) -> &str {
        self.id.as_deref().unwrap_or(&self.address)
    }
}

impl Config {
    /// A config with one upstream named `default` and one catch-all route to it.
    pub fn single(listen: SocketAddr, upstream: Upstream) -> Self {
        let mut upstreams = BTreeMap::new();
        upstreams.insert("default".to_owned(), upstream);
        Config {
            listeners: vec![Listener::at(listen)],
            routes: Vec::new(),
            upstreams,
            plugins: Plugins::default(),
            timeouts: Timeouts::default(),
            admin: Admin::default(),
            threads: 0,
            shutdown_grace: default_grace(),
            access_log: AccessLog::default(),
            log_format: None,
            metrics: Metrics::default(),
            registry: Registry::default(),
        }
    }

    /// Worker threads to run: `threads`, or one per core when 0.
    pub fn worker_threads(&self) -> usize {
        match self.threads {
            0 => std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            n => n,
        }
    }

    /// The routes to apply: the configured ones, or one catch-all to the only upstream.
    pub fn effective_routes(&self) -> Vec<Route> {
        if !self.routes.is_empty() {
            return self.routes.clone();
        }
        self.upstreams
            .keys()
            .next()
            .map(|name| Route {
                name: Some("default".into()),
                host: None,
                path_prefix: "/".into(),
                upstream: name.clone(),
                max_body_bytes: None,
                timeout: None,
            })
            .into_iter()
            .collect()
    }
}

impl Upstream {
    /// An upstream with these backends and every other setting at its default.
    pub fn with_backends(backends: Vec<Backend>) -> Self {
        Upstream {
            backends,
            discovery: None,
            strategy: Chain::default(),
            canary: None,
            shadow: None,
            health_check: HealthCheck::default(),
            passive: Passive::default(),
            retries: Retries::default(),
            retry_budget: RetryBudget::default(),
            timeouts: None,
            protocol: Protocol::default(),
            tls: None,
            pool: ConnPool::default(),
        }
    }
}
