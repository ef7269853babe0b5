//! Reading a config file, with errors that name the file, line and field.

use super::{AccessLog, Backend, Chain, Config, LogFormat, Strategy};
use serde::{Deserialize, Deserializer};
use std::path::{Path, PathBuf};

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: cannot read: {error}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        error: std::io::Error,
    },
    /// The file is larger than any real config ([`MAX_CONFIG_BYTES`]); not parsed.
    #[error("{path}: the file is {size} bytes; a config may be at most {max} bytes (is it the right file?)", max = MAX_CONFIG_BYTES)]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// Its size.
        size: u64,
    },
    /// The YAML is malformed, a field has the wrong type, is unknown, or is missing.
    #[error("{}: {field}: {message}", at(path, *line, *column))]
    Invalid {
        /// The file (or `<flags>` for the command line).
        path: PathBuf,
        /// 1-based line, when known.
        line: Option<usize>,
        /// 1-based column, when known.
        column: Option<usize>,
        /// Dotted path of the field, e.g. `upstreams.web.backends[0].weight`.
        field: String,
        /// What is wrong and what was expected.
        message: String,
    },
}

fn at(path: &Path, line: Option<usize>, column: Option<usize>) -> String {
    match (line, column) {
        (Some(l), Some(c)) => format!("{}:{l}:{c}", path.display()),
        (Some(l), None) => format!("{}:{l}", path.display()),
        _ => path.display().to_string(),
    }
}

/// The `log_format` of the config file at `path`, read before logging starts (the whole
/// file is loaded, and its errors reported, later). `None` when it is unset or the file
/// cannot be read or parsed.
pub fn peek_log_format(path: &Path) -> Option<LogFormat> {
    #[derive(Deserialize)]
    struct Peek {
        #[serde(default)]
        log_format: Option<LogFormat>,
    }
    if std::fs::metadata(path).ok()?.len() > MAX_CONFIG_BYTES {
        return None;
    }
    let text = std::fs::read_to_string(path).ok()?;
    serde_yaml::from_str::<Peek>(&text).ok()?.log_format
}

/// The largest config file read: a real one is a few KiB (10,000 backends written out are
/// about 1 MiB). A larger file is refused before it is read, so replacing the config by
/// something huge costs neither the memory nor the parse.
pub const MAX_CONFIG_BYTES: u64 = 4 << 20;

/// Reads and validates the config file at `path`.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let read_err = |error| ConfigError::Read { path: path.into(), error };
    let size = std::fs::metadata(path).map_err(read_err)?.len();
    if size > MAX_CONFIG_BYTES {
        return Err(ConfigError::TooLarge { path: path.into(), size });
    }
    let text = std::fs::read_to_string(path).map_err(read_err)?;
    from_yaml(path, &text)
}

/// Parses and validates `text`, reporting errors against `path`.
pub fn from_yaml(path: &Path, text: &str) -> Result<Config, ConfigError> {
    let de = serde_yaml::Deserializer::from_str(text);
    let config: Config = serde_path_to_error::deserialize(de).map_err(|e| {
        let field = e.path().to_string();
        let inner = e.into_inner();
        let (line, column) = inner.location().map(|l| (Some(l.line()), Some(l.column()))).unwrap_or_default();
        // serde_yaml appends " at line X column Y"; we print the position up front instead.
        let mut message = inner.to_string();
        if let Some(i) = message.find(" at line ") {
            message.truncate(i);
        }
        let field = if field == "." || field.is_empty() { "(top level)".to_owned() } else { field };
        // YAML's `? ` (an explicit key with nothing after it) or `: value` makes an empty key,
        // which serde reports as "unknown field ``": say what it is.
        if message.starts_with("unknown field ``") {
            message = format!(
                "an empty key (a line starting with `?` or `:`); {}",
                &message["unknown field ``, ".len().min(message.len())..]
            );
        }
        ConfigError::Invalid { path: path.into(), line, column, field, message }
    })?;
    validate(&config).map_err(|(field, needle, message)| ConfigError::Invalid {
        path: path.into(),
        line: needle.and_then(|n| line_of(text, &n)),
        column: None,
        field,
        message,
    })?;
    Ok(config)
}

/// A semantic problem: (field, text to locate the line by, message).
type Problem = (String, Option<String>, String);

/// Checks what serde cannot: references between sections and value ranges.
pub fn validate(config: &Config) -> Result<(), Problem> {
    if config.listeners.is_empty() {
        return Err(("listeners".into(), Some("listeners".into()), "at least one listener is required".into()));
    }
    for (i, l) in config.listeners.iter().enumerate() {
        check_listener(l, i)?;
    }
    if config.upstreams.is_empty() {
        return Err(("upstreams".into(), Some("upstreams".into()), "at least one upstream is required".into()));
    }
    if config.routes.is_empty() && config.upstreams.len() > 1 {
        return Err((
            "routes".into(),
            Some("upstreams".into()),
            format!(
                "{} upstreams but no routes: add `routes:` saying which requests go to which upstream",
                config.upstreams.len()
            ),
        ));
    }
    for (i, route) in config.routes.iter().enumerate() {
        if !config.upstreams.contains_key(&route.upstream) {
            let known: Vec<_> = config.upstreams.keys().map(String::as_str).collect();
            return Err((
                format!("routes[{i}].upstream"),
                Some(format!("upstream: {}", route.upstream)),
                format!("no upstream named `{}` (defined: {})", route.upstream, known.join(", ")),
            ));
        }
        if !route.path_prefix.starts_with('/') {
            return Err((
                format!("routes[{i}].path_prefix"),
                Some(route.path_prefix.clone()),
                format!("`{}` must start with `/`", route.path_prefix),
            ));
        }
        if route.timeout.is_some_and(|t| t.is_zero()) {
            return Err((
                format!("routes[{i}].timeout"),
                Some("timeout".into()),
                "must be longer than 0s (e.g. 60s), or left out for none".into(),
            ));
        }
    }
    zero_timeouts(&config.timeouts, "timeouts")?;
    let p = &config.plugins;
    for (f, d) in [("deadline", p.deadline), ("setup_deadline", p.setup_deadline)] {
        if d.is_zero() {
            return Err((format!("plugins.{f}"), Some(format!("{f}:")), "must be longer than 0s (e.g. 20ms)".into()));
        }
    }
    if p.memory_limit_mib == 0 {
        return Err((
            "plugins.memory_limit_mib".into(),
            Some("memory_limit_mib".into()),
            "must be at least 1 (MiB)".into(),
        ));
    }
    for (f, v, unit) in [
        ("cache_limit_mib", p.cache_limit_mib, "MiB"),
        ("file_limit_mib", p.file_limit_mib, "MiB"),
        ("kv_limit_mib", p.kv_limit_mib, "MiB"),
        ("counters_limit_kib", p.counters_limit_kib, "KiB"),
    ] {
        if v == 0 {
            return Err((format!("plugins.{f}"), Some(f.into()), format!("must be at least 1 ({unit})")));
        }
    }
    if config.shutdown_grace.is_zero() {
        return Err((
            "shutdown_grace".into(),
            Some("shutdown_grace".into()),
            "must be longer than 0s (in-flight requests need time to finish)".into(),
        ));
    }
    if config.access_log.path.as_ref().is_some_and(|p| p.as_os_str().is_empty()) {
        return Err((
            "access_log.path".into(),
            Some("access_log".into()),
            "is empty: give a file, or leave `path` out to log to stderr".into(),
        ));
    }
    for (name, up) in &config.upstreams {
        check_discovery(name, up)?;
        for (i, b) in up.backends.iter().enumerate() {
            check_address(b)
                .map_err(|m| (format!("upstreams.{name}.backends[{i}].address"), Some(b.address.clone()), m))?;
            if b.weight == 0 {
                return Err((
                    format!("upstreams.{name}.backends[{i}].weight"),
                    Some(b.address.clone()),
                    "must be at least 1 (remove the backend or drain it instead)".into(),
                ));
            }
        }
        let field = |f: &str| format!("upstreams.{name}.{f}");
        let hc = &up.health_check;
        let durations = [
            ("health_check.interval", "interval", hc.interval),
            ("health_check.timeout", "timeout", hc.timeout),
            ("passive.base_ejection", "base_ejection", up.passive.base_ejection),
            ("passive.max_ejection", "max_ejection", up.passive.max_ejection),
        ];
        for (f, key, d) in durations {
            if d.is_zero() {
                return Err((field(f), Some(key.into()), "must be longer than 0s (e.g. 2s)".into()));
            }
        }
        if let Some(t) = &up.timeouts {
            zero_timeouts(t, &format!("upstreams.{name}.timeouts"))?;
        }
        if hc.rise == 0 || hc.fall == 0 {
            return Err((field("health_check"), Some("rise".into()), "rise and fall must be at least 1".into()));
        }
        if hc.expect_status.0 > hc.expect_status.1 {
            return Err((
                field("health_check.expect_status"),
                Some("expect_status".into()),
                "expected [lowest, highest], e.g. [200, 399]".into(),
            ));
        }
        if up.retries.attempts == 0 {
            return Err((
                field("retries.attempts"),
                Some("attempts".into()),
                "must be at least 1 (1 = no retries)".into(),
            ));
        }
        if up.passive.max_ejected_percent > 100 {
            return Err((
                field("passive.max_ejected_percent"),
                Some("max_ejected_percent".into()),
                format!(
                    "{} is not a percentage: give 0 to 100 (50 = at most half of the backends)",
                    up.passive.max_ejected_percent
                ),
            ));
        }
        let rb = &up.retry_budget;
        if !(rb.ratio.is_finite() && rb.ratio >= 0.0) {
            return Err((
                field("retry_budget.ratio"),
                Some("ratio".into()),
                format!("{} is not a ratio: give 0 or more (0.2 = retries may add 20% to the requests)", rb.ratio),
            ));
        }
        if let Some(c) = &up.canary
            && !(c.share > 0.0 && c.share <= 1.0)
        {
            return Err((
                field("canary.share"),
                Some("share".into()),
                format!("{} is not a share: give more than 0 and at most 1 (0.05 = 5% of clients)", c.share),
            ));
        }
        if let Some(sh) = &up.shadow
            && !(sh.sample > 0.0 && sh.sample <= 1.0)
        {
            return Err((
                field("shadow.sample"),
                Some("sample".into()),
                format!("{} is not a share: give more than 0 and at most 1 (0.1 = every tenth request)", sh.sample),
            ));
        }
        if let Some(path) = &hc.path
            && !path.starts_with('/')
        {
            return Err((field("health_check.path"), Some(path.clone()), format!("`{path}` must start with `/`")));
        }
        if up.pool.idle_timeout.is_zero() {
            return Err((
                field("pool.idle_timeout"),
                Some("idle_timeout".into()),
                "must be longer than 0s (e.g. 90s)".into(),
            ));
        }
        if up.pool.max_streams == 0 {
            return Err((field("pool.max_streams"), Some("max_streams".into()), "must be at least 1".into()));
        }
        if let Some(tls) = &up.tls {
            if tls.cert.is_some() != tls.key.is_some() {
                return Err((
                    field("tls"),
                    Some("tls".into()),
                    "`cert` and `key` go together: set both or neither".into(),
                ));
            }
            if up.protocol == super::Protocol::H2c {
                return Err((
                    field("protocol"),
                    Some("protocol".into()),
                    "`h2c` is cleartext HTTP/2 and cannot have `tls`: use `protocol: h2` for HTTP/2 over TLS".into(),
                ));
            }
        }
        if hc.path.is_some() && (up.protocol != super::Protocol::Http1 || up.tls.is_some()) {
            return Err((
                field("health_check.path"),
                Some("path".into()),
                "HTTP health checks speak cleartext HTTP/1.1, which this upstream's backends (TLS or HTTP/2) do not; leave `path` unset for a TCP check".into(),
            ));
        }
    }
    Ok(())
}

/// The shortest and longest TTL a registration may have.
pub const TTL_RANGE: (std::time::Duration, std::time::Duration) =
    (std::time::Duration::from_secs(1), std::time::Duration::from_secs(3600));

/// With the command-line overrides applied: an upstream with `discovery.registry` needs
/// the admin listener, which serves the registry API.
pub fn check_registry_listener(config: &Config) -> Result<(), String> {
    let registry = config.upstreams.iter().find(|(_, u)| u.discovery.as_ref().is_some_and(|d| d.registry.is_some()));
    match (registry, config.admin.address) {
        (Some((name, _)), None) => Err(format!(
            "upstreams.{name}.discovery.registry: the registry API is served on the admin listener: set `admin.address` (or --admin)"
        )),
        _ => Ok(()),
    }
}

fn check_discovery(name: &str, up: &super::Upstream) -> Result<(), Problem> {
    let field = |f: &str| format!("upstreams.{name}.{f}");
    let Some(d) = &up.discovery else {
        if up.backends.is_empty() {
            return Err((
                field("backends"),
                Some(format!("{name}:")),
                "no backends: list at least one, or let `discovery` (registry, dns or etcd) find them".into(),
            ));
        }
        return Ok(());
    };
    let sources = [d.registry.is_some(), d.dns.is_some(), d.etcd.is_some()];
    if sources.iter().filter(|s| **s).count() != 1 {
        return Err((
            field("discovery"),
            Some("discovery".into()),
            "set exactly one source: `registry`, `dns` or `etcd`".into(),
        ));
    }
    if let Some(r) = &d.registry {
        let (lo, hi) = TTL_RANGE;
        if r.default_ttl < lo || r.default_ttl > hi {
            return Err((
                field("discovery.registry.default_ttl"),
                Some("default_ttl".into()),
                format!("{:?} is out of range: from {lo:?} to {hi:?}", r.default_ttl),
            ));
        }
        if r.max_instances == 0 {
            return Err((
                field("discovery.registry.max_instances"),
                Some("max_instances".into()),
                "must be at least 1".into(),
            ));
        }
    }
    if let Some(etcd) = &d.etcd {
        check_etcd(name, etcd)?;
    }
    if let Some(dns) = &d.dns {
        if dns.name.trim().is_empty() {
            return Err((field("discovery.dns.name"), Some("name".into()), "is empty: the DNS name to resolve".into()));
        }
        match (dns.record_type, dns.port) {
            (super::DnsRecordType::Srv, Some(_)) => {
                return Err((
                    field("discovery.dns.port"),
                    Some("port".into()),
                    "SRV records carry their own ports: leave `port` out".into(),
                ));
            }
            (super::DnsRecordType::A | super::DnsRecordType::Aaaa, None | Some(0)) => {
                return Err((
                    field("discovery.dns.port"),
                    Some("dns".into()),
                    "A and AAAA records carry no port: set the backends' `port` (e.g. 8080)".into(),
                ));
            }
            _ => {}
        }
        if let Some(r) = &dns.resolver
            && parse_resolver(r).is_none()
        {
            return Err((
                field("discovery.dns.resolver"),
                Some("resolver".into()),
                format!("`{r}` is not IP or IP:PORT (e.g. 127.0.0.1:5353), or leave it out for the system's"),
            ));
        }
        if dns.refresh.is_zero() {
            return Err((
                field("discovery.dns.refresh"),
                Some("refresh".into()),
                "must be longer than 0s (e.g. 5s)".into(),
            ));
        }
    }
    Ok(())
}

fn check_etcd(name: &str, etcd: &super::EtcdSource) -> Result<(), Problem> {
    let field = |f: &str| format!("upstreams.{name}.discovery.etcd.{f}");
    if etcd.endpoints.is_empty() {
        return Err((
            field("endpoints"),
            Some("endpoints".into()),
            "is empty: list the etcd client URLs, e.g. [http://127.0.0.1:2379]".into(),
        ));
    }
    for e in &etcd.endpoints {
        if let Err(why) = check_etcd_endpoint(e) {
            return Err((field("endpoints"), Some(e.clone()), format!("`{e}` {why}")));
        }
    }
    if etcd.prefix.is_empty() || !etcd.prefix.starts_with('/') {
        return Err((
            field("prefix"),
            Some("prefix".into()),
            format!("`{}` must start with `/` (e.g. /gateway/): keys are {{prefix}}{{upstream}}/{{id}}", etcd.prefix),
        ));
    }
    if etcd.timeout.is_zero() {
        return Err((field("timeout"), Some("timeout".into()), "must be longer than 0s (e.g. 2s)".into()));
    }
    let (lo, hi) = TTL_RANGE;
    if etcd.default_ttl < lo || etcd.default_ttl > hi {
        return Err((
            field("default_ttl"),
            Some("default_ttl".into()),
            format!("{:?} is out of range: from {lo:?} to {hi:?}", etcd.default_ttl),
        ));
    }
    if etcd.max_instances == 0 {
        return Err((field("max_instances"), Some("max_instances".into()), "must be at least 1".into()));
    }
    Ok(())
}

/// An etcd client URL the gateway can use: `http://host:port` or `host:port`.
fn check_etcd_endpoint(e: &str) -> Result<(), String> {
    if e.starts_with("https://") {
        return Err("uses TLS, which the gateway's etcd client is built without: use http:// (or a local TLS-terminating proxy)".into());
    }
    let rest = e.strip_prefix("http://").unwrap_or(e).trim_end_matches('/');
    match rest.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && !rest.contains('/') && port.parse::<u16>().is_ok_and(|p| p > 0) => {
            Ok(())
        }
        _ => Err("is not an etcd client URL: expected http://host:port (e.g. http://127.0.0.1:2379)".into()),
    }
}

/// A DNS server address: `IP:PORT`, `[IPv6]:PORT`, or an IP (port 53).
pub fn parse_resolver(text: &str) -> Option<std::net::SocketAddr> {
    text.parse().ok().or_else(|| text.parse::<std::net::IpAddr>().ok().map(|ip| std::net::SocketAddr::new(ip, 53)))
}

fn zero_timeouts(t: &super::Timeouts, at: &str) -> Result<(), Problem> {
    for (f, d) in [("connect", t.connect), ("response_header", t.response_header)] {
        if d.is_zero() {
            return Err((format!("{at}.{f}"), Some(format!("{f}:")), "must be longer than 0s (e.g. 2s)".into()));
        }
    }
    if t.request.is_some_and(|d| d.is_zero()) {
        return Err((
            format!("{at}.request"),
            Some("request:".into()),
            "must be longer than 0s, or left out for none".into(),
        ));
    }
    Ok(())
}

fn check_listener(l: &super::Listener, i: usize) -> Result<(), Problem> {
    let at = |f: &str| format!("listeners[{i}].{f}");
    let lim = &l.limits;
    for (f, d) in
        [("header_timeout", lim.header_timeout), ("idle_timeout", lim.idle_timeout), ("body_timeout", lim.body_timeout)]
    {
        if d.is_zero() {
            return Err((
                at(&format!("limits.{f}")),
                Some(format!("{f}:")),
                "must be longer than 0s (e.g. 10s)".into(),
            ));
        }
    }
    // hyper's HTTP/1 read buffer cannot be smaller than 8 KiB.
    if lim.max_header_bytes < 8192 {
        return Err((
            at("limits.max_header_bytes"),
            Some("max_header_bytes".into()),
            format!("{} is too small: at least 8192 (bytes)", lim.max_header_bytes),
        ));
    }
    for (f, n) in [
        ("max_connections", lim.max_connections),
        ("max_headers", lim.max_headers),
        ("max_concurrent_streams", lim.max_concurrent_streams as usize),
    ] {
        if n == 0 {
            return Err((at(&format!("limits.{f}")), Some(format!("{f}:")), "must be at least 1".into()));
        }
    }
    if l.redirect_https.is_some() && l.tls.is_some() {
        return Err((
            at("redirect_https"),
            Some("redirect_https".into()),
            "a listener that redirects to HTTPS cannot also terminate TLS: give the redirect its own plaintext listener".into(),
        ));
    }
    if l.redirect_https == Some(0) {
        return Err((at("redirect_https"), Some("redirect_https".into()), "0 is not a port (e.g. 443)".into()));
    }
    Ok(())
}

fn check_address(b: &Backend) -> Result<(), String> {
    match b.address.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => Ok(()),
        _ => Err(format!("`{}` is not host:port (e.g. 127.0.0.1:9001)", b.address)),
    }
}

/// 1-based number of the first line containing `needle`.
/// An error found after the file was read (a plugin that does not load, an address that
/// does not resolve), located like the loader's own: the line of `field`'s section that
/// holds `needle` (searched from the line that names `section`, e.g. the upstream).
pub fn locate(path: &Path, section: &str, field: &str, needle: &str, message: String) -> ConfigError {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let start = line_of(&text, &format!("{section}:")).unwrap_or(1);
    let line = text.lines().skip(start - 1).position(|l| l.contains(needle)).map(|i| i + start);
    ConfigError::Invalid { path: path.into(), line, column: None, field: field.into(), message }
}

fn line_of(text: &str, needle: &str) -> Option<usize> {
    text.lines().position(|l| l.contains(needle)).map(|i| i + 1)
}

/// Deserializes a list that must not be empty.
pub(super) fn non_empty<'de, D, T>(de: D) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    let v = Vec::<T>::deserialize(de)?;
    if v.is_empty() {
        return Err(serde::de::Error::custom("the list is empty: at least one entry is required"));
    }
    Ok(v)
}

impl<'de> Deserialize<'de> for AccessLog {
    /// `true`, `false`, or `{enabled, path, format}`; unknown keys in the map are refused
    /// by name.
    fn deserialize<D: Deserializer<'de>>(de: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Map {
            #[serde(default = "super::yes")]
            enabled: bool,
            #[serde(default)]
            path: Option<PathBuf>,
            #[serde(default)]
            format: Option<LogFormat>,
        }
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = AccessLog;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("true, false, or a map with `enabled`, `path`, `format`")
            }
            fn visit_bool<E: serde::de::Error>(self, enabled: bool) -> Result<AccessLog, E> {
                Ok(AccessLog { enabled, ..AccessLog::default() })
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<AccessLog, A::Error> {
                let m = Map::deserialize(serde::de::value::MapAccessDeserializer::new(map))?;
                Ok(AccessLog { enabled: m.enabled, path: m.path, format: m.format })
            }
        }
        de.deserialize_any(Visitor)
    }
}

impl<'de> Deserialize<'de> for Chain {
    /// `{plugin, params}`, or a list of those (a chain); errors inside a step name it by
    /// its index (`upstreams.web.strategy[1].plugin`).
    fn deserialize<D: Deserializer<'de>>(de: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = Chain;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a map with `plugin` and `params`, or a list of those (a chain)")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<Chain, A::Error> {
                Ok(Chain::single(Strategy::deserialize(serde::de::value::MapAccessDeserializer::new(map))?))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, seq: A) -> Result<Chain, A::Error> {
                let steps = Vec::<Strategy>::deserialize(serde::de::value::SeqAccessDeserializer::new(seq))?;
                match steps.len() {
                    0 => Err(serde::de::Error::custom(
                        "the chain is empty: list at least one `{plugin: NAME}`, or leave `strategy` out for round-robin",
                    )),
                    n if n > Chain::MAX_STEPS => Err(serde::de::Error::custom(format!(
                        "a chain of {n} steps; at most {} are allowed",
                        Chain::MAX_STEPS
                    ))),
                    _ => Ok(Chain::of(steps)),
                }
            }
        }
        de.deserialize_any(Visitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        from_yaml(Path::new("gw.yaml"), text).unwrap_err().to_string()
    }

    #[test]
    fn canary_and_shadow_are_checked() {
        let yaml = |extra: &str| format!("upstreams:\n  web:\n    backends:\n      - address: 127.0.0.1:9001\n{extra}");
        let c = from_yaml(
            Path::new("gw.yaml"),
            &yaml("    canary: {plugin: random, share: 0.05, key: \"header:X-User\"}\n    shadow: {plugin: least-connections}\n"),
        )
        .unwrap();
        let up = &c.upstreams["web"];
        let canary = up.canary.as_ref().unwrap();
        assert_eq!(canary.key, crate::config::ArmKey::Header("x-user".into()));
        assert_eq!(up.shadow.as_ref().unwrap().sample, 0.1);
        let e = err(&yaml("    canary: {plugin: random, share: 5}\n"));
        assert!(
            e.starts_with("gw.yaml:5:") && e.contains("upstreams.web.canary.share") && e.contains("5 is not a share"),
            "{e}"
        );
        let e = err(&yaml("    canary: {plugin: random}\n"));
        assert!(e.contains("upstreams.web.canary") && e.contains("missing field `share`"), "{e}");
        let e = err(&yaml("    canary: {plugin: random, share: 0.1, key: ip}\n"));
        assert!(e.contains("upstreams.web.canary.key") && e.contains("unknown key `ip`"), "{e}");
        let e = err(&yaml("    canary: {plugin: random, share: 0.1, key: \"header:\"}\n"));
        assert!(e.contains("needs a name"), "{e}");
        let e = err(&yaml("    shadow: {plugin: random, sample: 0}\n"));
        assert!(e.contains("upstreams.web.shadow.sample") && e.contains("0 is not a share"), "{e}");
    }

    #[test]
    fn an_empty_key_is_named_as_such() {
        // Found by tests/fuzz_config.rs: `?` alone is an explicit empty YAML key.
        let e = err("?");
        assert!(e.contains("(top level)") && e.contains("an empty key"), "{e}");
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let c = from_yaml(Path::new("gw.yaml"), "upstreams:\n  web:\n    backends:\n      - address: 127.0.0.1:9001\n")
            .unwrap();
        let up = &c.upstreams["web"];
        assert_eq!(up.strategy.first().plugin, "round-robin");
        assert_eq!(up.health_check.rise, 2);
        assert_eq!(c.effective_routes()[0].upstream, "web");
    }

    #[test]
    fn a_strategy_is_one_plugin_or_a_chain() {
        let yaml = |strategy: &str| {
            format!("upstreams:\n  web:\n    backends:\n      - address: 127.0.0.1:9001\n    strategy: {strategy}\n")
        };
        let c = from_yaml(Path::new("gw.yaml"), &yaml("{plugin: random}")).unwrap();
        assert!(!c.upstreams["web"].strategy.is_chain());
        assert_eq!(c.upstreams["web"].strategy.name(), "random");
        let text = yaml("[{plugin: sticky-cookie}, {plugin: consistent-hash, params: {key: path}}, {plugin: random}]");
        let c = from_yaml(Path::new("gw.yaml"), &text).unwrap();
        let chain = &c.upstreams["web"].strategy;
        assert_eq!(chain.name(), "sticky-cookie > consistent-hash > random");
        assert_eq!(chain.steps()[1].params["key"], "path");
        // Written back as it was read: a map for one, a list for a chain.
        let again: Config = serde_yaml::from_str(&serde_yaml::to_string(&c).unwrap()).unwrap();
        assert_eq!(again.upstreams["web"].strategy, *chain);

        let e = err(&yaml("[{plugin: sticky-cookie}, {plugn: random}]"));
        assert!(e.starts_with("gw.yaml:5:"), "{e}");
        assert!(e.contains("upstreams.web.strategy[1]") && e.contains("unknown field `plugn`"), "{e}");
        let e = err(&yaml("[]"));
        assert!(e.contains("upstreams.web.strategy") && e.contains("the chain is empty"), "{e}");
        let e = err(&yaml(
            "[{plugin: random}, {plugin: random}, {plugin: random}, {plugin: random}, {plugin: random}, {plugin: random}, {plugin: random}, {plugin: random}, {plugin: random}]",
        ));
        assert!(e.contains("a chain of 9 steps; at most 8"), "{e}");
        let e = err(&yaml("random"));
        assert!(e.contains("expected a map with `plugin` and `params`, or a list of those"), "{e}");
    }

    #[test]
    fn wrong_type_names_line_and_field() {
        let e = err("upstreams:\n  web:\n    backends:\n      - address: 127.0.0.1:9001\n        weight: heavy\n");
        assert!(e.starts_with("gw.yaml:5:"), "{e}");
        assert!(e.contains("upstreams.web.backends[0].weight"), "{e}");
        assert!(e.contains("invalid type: string \"heavy\", expected u32"), "{e}");
    }

    #[test]
    fn unknown_field_lists_the_expected_ones() {
        let e = err("upstreams:\n  web:\n    helth_check: {}\n    backends:\n      - address: 127.0.0.1:9001\n");
        assert!(e.starts_with("gw.yaml:3:"), "{e}");
        assert!(e.contains("unknown field `helth_check`, expected one of"), "{e}");
        assert!(e.contains("`health_check`"), "{e}");
    }

    #[test]
    fn ejection_percent_and_retry_budget_are_checked_with_their_line() {
        let e = err(
            "upstreams:\n  web:\n    passive:\n      max_ejected_percent: 150\n    backends:\n      - address: 127.0.0.1:9001\n",
        );
        assert!(e.starts_with("gw.yaml:4:"), "{e}");
        assert!(e.contains("upstreams.web.passive.max_ejected_percent: 150 is not a percentage"), "{e}");
        let e =
            err("upstreams:\n  web:\n    retry_budget: {ratio: -1}\n    backends:\n      - address: 127.0.0.1:9001\n");
        assert!(e.contains("upstreams.web.retry_budget.ratio: -1 is not a ratio"), "{e}");
        let c = from_yaml(Path::new("gw.yaml"), "upstreams:\n  web:\n    backends:\n      - address: 127.0.0.1:9001\n")
            .unwrap();
        let up = &c.upstreams["web"];
        assert_eq!(
            (up.passive.max_ejected_percent, up.retry_budget.ratio, up.retry_budget.min_per_second),
            (50, 0.2, 10)
        );
    }

    #[test]
    fn missing_backends_is_named() {
        let e = err("upstreams:\n  web:\n    strategy: {plugin: round-robin}\n");
        assert_eq!(
            e,
            "gw.yaml:2: upstreams.web.backends: no backends: list at least one, or let `discovery` (registry, dns or etcd) find them"
        );
        let e = err("upstreams:\n  web:\n    backends: []\n");
        assert!(e.contains("upstreams.web.backends"), "{e}");
        assert!(e.contains("no backends"), "{e}");
    }

    #[test]
    fn discovery_sources_parse_with_their_defaults() {
        let c = from_yaml(
            Path::new("gw.yaml"),
            "admin: {address: 127.0.0.1:9901}\nroutes: [{path_prefix: /b, upstream: books}, {upstream: search}]\nupstreams:\n  books:\n    discovery:\n      registry: {}\n  search:\n    backends: [{address: 127.0.0.1:9001}]\n    discovery:\n      dns: {name: _search._tcp.service.test, type: srv, resolver: 127.0.0.1:5353}\n",
        )
        .unwrap();
        let r = c.upstreams["books"].discovery.as_ref().unwrap().registry.as_ref().unwrap();
        assert_eq!((r.default_ttl, r.max_instances), (std::time::Duration::from_secs(10), 10_000));
        let d = c.upstreams["search"].discovery.as_ref().unwrap().dns.as_ref().unwrap();
        assert_eq!(d.record_type, super::super::DnsRecordType::Srv);
        assert_eq!(d.refresh, std::time::Duration::from_secs(5));
        assert_eq!(parse_resolver("127.0.0.1"), Some("127.0.0.1:53".parse().unwrap()));
        assert_eq!(parse_resolver("[::1]:5353"), Some("[::1]:5353".parse().unwrap()));
    }

    #[test]
    fn etcd_discovery_parses_with_its_defaults_and_its_mistakes_are_named() {
        let c = from_yaml(
            Path::new("gw.yaml"),
            "upstreams:\n  api:\n    discovery:\n      etcd: {endpoints: [http://127.0.0.1:2379, 10.0.0.2:2379]}\n",
        )
        .unwrap();
        let e = c.upstreams["api"].discovery.as_ref().unwrap().etcd.as_ref().unwrap();
        assert_eq!(
            (e.prefix.as_str(), e.timeout, e.default_ttl, e.max_instances),
            ("/gateway/", std::time::Duration::from_secs(2), std::time::Duration::from_secs(10), 10_000)
        );
        assert!(check_registry_listener(&c).is_ok(), "etcd needs no admin listener");
        let up = |d: &str| err(&format!("upstreams:\n  api:\n    discovery:\n{d}"));
        let e = up("      etcd: {endpoints: []}\n");
        assert!(e.contains("upstreams.api.discovery.etcd.endpoints: is empty"), "{e}");
        let e = up(
            "      etcd:\n        endpoints:\n          - http://127.0.0.1:2379\n          - https://etcd.example:2379\n",
        );
        assert!(
            e.starts_with("gw.yaml:7: upstreams.api.discovery.etcd.endpoints: `https://etcd.example:2379` uses TLS"),
            "{e}"
        );
        let e = up("      etcd: {endpoints: [\"127.0.0.1\"]}\n");
        assert!(e.contains("is not an etcd client URL"), "{e}");
        let e = up("      etcd: {endpoints: [\"127.0.0.1:2379\"], prefix: gateway}\n");
        assert!(e.contains("upstreams.api.discovery.etcd.prefix: `gateway` must start with `/`"), "{e}");
        let e = up("      etcd: {endpoints: [\"127.0.0.1:2379\"], default_ttl: 2h}\n");
        assert!(e.contains("discovery.etcd.default_ttl") && e.contains("out of range"), "{e}");
        let e = up("      etcd: {endpoints: [\"127.0.0.1:2379\"]}\n      dns: {name: x, port: 80}\n");
        assert!(e.contains("set exactly one source: `registry`, `dns` or `etcd`"), "{e}");
    }

    #[test]
    fn discovery_mistakes_are_named() {
        let up = |d: &str| err(&format!("admin: {{address: 127.0.0.1:0}}\nupstreams:\n  web:\n    discovery:\n{d}"));
        let e = up("      registry: {}\n      dns: {name: x, port: 80}\n");
        assert!(e.contains("upstreams.web.discovery: set exactly one source"), "{e}");
        let e = up("      etcdd: {}\n");
        assert!(e.contains("unknown field `etcdd`, expected one of `registry`, `dns`, `etcd`"), "{e}");
        let e = up("      dns: {name: books.test}\n");
        assert!(e.contains("upstreams.web.discovery.dns.port") && e.contains("port"), "{e}");
        let e = up("      dns: {name: _b._tcp.test, type: srv, port: 80}\n");
        assert!(e.contains("upstreams.web.discovery.dns.port: SRV records carry their own ports"), "{e}");
        let e = up("      dns: {name: b.test, port: 80, resolver: dns.example}\n");
        assert!(e.contains("upstreams.web.discovery.dns.resolver"), "{e}");
        let e = up("      dns: {name: b.test, port: 80, type: mx}\n");
        assert!(e.contains("unknown variant `mx`"), "{e}");
        let e = up("      registry: {default_ttl: 0s}\n");
        assert!(e.contains("upstreams.web.discovery.registry.default_ttl") && e.contains("out of range"), "{e}");
        let c = from_yaml(Path::new("gw.yaml"), "upstreams:\n  web:\n    discovery:\n      registry: {}\n").unwrap();
        let e = check_registry_listener(&c).unwrap_err();
        assert!(
            e.contains("upstreams.web.discovery.registry: the registry API is served on the admin listener"),
            "{e}"
        );
    }

    #[test]
    fn edge_limits_parse_with_their_defaults_and_zero_timeouts_are_refused() {
        let c = from_yaml(
            Path::new("gw.yaml"),
            "listeners: [ { address: 127.0.0.1:0, proxy_protocol: true } ]\nroutes:\n  - { path_prefix: /upload, upstream: web, max_body_bytes: 10485760, timeout: 60s }\ntimeouts: { request: 90s }\nupstreams:\n  web:\n    backends:\n      - address: 127.0.0.1:9001\n",
        )
        .unwrap();
        assert!(c.listeners[0].proxy_protocol);
        assert_eq!(c.routes[0].max_body_bytes, Some(10_485_760));
        assert_eq!(c.routes[0].timeout, Some(std::time::Duration::from_secs(60)));
        assert_eq!(c.timeouts.request, Some(std::time::Duration::from_secs(90)));
        let d = from_yaml(Path::new("gw.yaml"), WEB).unwrap();
        assert!(!d.listeners[0].proxy_protocol);
        assert_eq!((d.effective_routes()[0].max_body_bytes, d.effective_routes()[0].timeout), (None, None));
        assert_eq!(d.timeouts.request, None);
        let e = err(&format!("routes:\n  - {{ upstream: web, timeout: 0s }}\n{WEB}"));
        assert!(e.contains("routes[0].timeout"), "{e}");
        let e = err(&format!("timeouts: {{ request: 0s }}\n{WEB}"));
        assert!(e.contains("timeouts.request"), "{e}");
    }

    #[test]
    fn the_shipped_example_is_valid() {
        let text = include_str!("../../../examples/gateway.yaml");
        let c = from_yaml(Path::new("examples/gateway.yaml"), text).unwrap();
        assert_eq!(c.upstreams.len(), 2);
        assert_eq!(c.routes[0].host.as_deref(), Some("api.example.com"));
        assert_eq!(c.upstreams["api"].backends[1].id(), "api-canary");
    }

    #[test]
    fn the_grpc_example_is_valid() {
        let text = include_str!("../../../examples/grpc.yaml");
        let c = from_yaml(Path::new("examples/grpc.yaml"), text).unwrap();
        assert_eq!(c.upstreams["greeter"].protocol, super::super::Protocol::H2c);
        assert_eq!(c.upstreams["billing"].protocol, super::super::Protocol::H2);
        assert_eq!(c.upstreams["billing"].tls.as_ref().unwrap().server_name.as_deref(), Some("billing.internal"));
    }

    #[test]
    fn upstream_tls_and_protocol_mistakes_are_named() {
        let up = |extra: &str| err(&format!("upstreams:\n  g:\n{extra}    backends: [{{address: 127.0.0.1:9001}}]\n"));
        let e = up("    protocol: h2c\n    tls: {ca: ca.pem}\n");
        assert!(e.contains("upstreams.g.protocol") && e.contains("protocol: h2"), "{e}");
        let e = up("    tls: {cert: c.pem}\n");
        assert!(e.contains("upstreams.g.tls") && e.contains("`cert` and `key`"), "{e}");
        let e = up("    protocol: h2c\n    health_check: {path: /healthz}\n");
        assert!(e.contains("upstreams.g.health_check.path"), "{e}");
        let e = up("    protocol: http3\n");
        assert!(e.contains("http1") && e.contains("h2c"), "{e}");
        let e = up("    pool: {max_streams: 0}\n");
        assert!(e.contains("upstreams.g.pool.max_streams"), "{e}");
    }

    const WEB: &str = "upstreams:\n  web:\n    backends:\n      - address: 127.0.0.1:9001\n";

    fn access_log(yaml: &str) -> Result<AccessLog, String> {
        from_yaml(Path::new("gw.yaml"), &format!("{yaml}\n{WEB}")).map(|c| c.access_log).map_err(|e| e.to_string())
    }

    #[test]
    fn access_log_is_a_bool_or_a_map() {
        assert_eq!(access_log("").unwrap(), AccessLog::default());
        assert_eq!(access_log("access_log: false").unwrap(), AccessLog { enabled: false, ..AccessLog::default() });
        assert_eq!(access_log("access_log: true").unwrap(), AccessLog::default());
        assert_eq!(
            access_log("access_log:\n  path: /var/log/gateway/access.log").unwrap(),
            AccessLog { enabled: true, path: Some("/var/log/gateway/access.log".into()), format: None }
        );
        assert_eq!(
            access_log("access_log: {enabled: false, format: text}").unwrap(),
            AccessLog { enabled: false, path: None, format: Some(LogFormat::Text) }
        );
    }

    #[test]
    fn access_log_errors_name_the_field() {
        let e = access_log("access_log:\n  pth: /tmp/a.log").unwrap_err();
        assert!(e.starts_with("gw.yaml:2:"), "{e}");
        assert!(e.contains("access_log"), "{e}");
        assert!(e.contains("unknown field `pth`, expected one of `enabled`, `path`, `format`"), "{e}");
        let e = access_log("access_log:\n  format: xml").unwrap_err();
        assert!(e.contains("access_log.format"), "{e}");
        assert!(e.contains("unknown variant `xml`, expected `text` or `json`"), "{e}");
        let e = access_log("access_log: sometimes").unwrap_err();
        assert!(e.contains("expected true, false, or a map with `enabled`, `path`, `format`"), "{e}");
        let e = access_log("access_log: {path: ''}").unwrap_err();
        assert!(e.contains("access_log.path: is empty"), "{e}");
    }

    #[test]
    fn log_format_is_text_or_json_and_can_be_peeked() {
        let c = from_yaml(Path::new("gw.yaml"), &format!("log_format: json\n{WEB}")).unwrap();
        assert_eq!(c.log_format, Some(LogFormat::Json));
        let e = err(&format!("log_format: pretty\n{WEB}"));
        assert!(e.contains("log_format: unknown variant `pretty`, expected `text` or `json`"), "{e}");
        let file = std::env::temp_dir().join(format!("gateway-peek-{}.yaml", std::process::id()));
        std::fs::write(&file, format!("log_format: text\nthreads: many\n{WEB}")).unwrap();
        assert_eq!(peek_log_format(&file), Some(LogFormat::Text), "other errors are for the real load");
        std::fs::write(&file, WEB).unwrap();
        assert_eq!(peek_log_format(&file), None);
        let _ = std::fs::remove_file(&file);
        assert_eq!(peek_log_format(Path::new("/nonexistent.yaml")), None);
    }

    #[test]
    fn zero_durations_that_cannot_work_are_refused_with_line_and_field() {
        let e = err(
            "upstreams:\n  web:\n    health_check:\n      interval: 0s\n    backends:\n      - address: 127.0.0.1:9001\n",
        );
        assert_eq!(e, "gw.yaml:4: upstreams.web.health_check.interval: must be longer than 0s (e.g. 2s)");
        let e = err("plugins:\n  deadline: 0ms\nupstreams:\n  web:\n    backends:\n      - address: 127.0.0.1:9001\n");
        assert!(e.starts_with("gw.yaml:2: plugins.deadline:"), "{e}");
    }

    #[test]
    fn route_to_unknown_upstream_is_located() {
        let e =
            err("routes:\n  - upstream: nope\nupstreams:\n  web:\n    backends:\n      - address: 127.0.0.1:9001\n");
        assert_eq!(e, "gw.yaml:2: routes[0].upstream: no upstream named `nope` (defined: web)");
    }
}
