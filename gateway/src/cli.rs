//! Command-line interface: the quick-start flags, `demo` and `plugin` subcommands.

use crate::config::{self, Backend, Config, Upstream};
use clap::{Args, Parser, Subcommand};
use std::io::IsTerminal as _;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

/// A load balancer whose backend choice is made by WebAssembly plugins.
#[derive(Debug, Parser)]
#[command(name = "gateway", version, args_conflicts_with_subcommands = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub run: RunArgs,
    #[command(flatten)]
    pub log: LogArgs,
}

/// Logging options.
#[derive(Debug, Args, Clone)]
pub struct LogArgs {
    /// Log format [default: the config file's `log_format`, else auto].
    #[arg(long, value_enum, global = true)]
    pub log_format: Option<LogFormat>,
}

/// How logs are written to stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
    /// Text when stderr is a terminal, JSON otherwise.
    Auto,
}

impl LogFormat {
    /// Text or JSON: `Auto` decided by whether stderr is a terminal.
    pub fn resolve(self) -> config::LogFormat {
        match self {
            LogFormat::Text => config::LogFormat::Text,
            LogFormat::Json => config::LogFormat::Json,
            LogFormat::Auto if std::io::stderr().is_terminal() => config::LogFormat::Text,
            LogFormat::Auto => config::LogFormat::Json,
        }
    }
}

impl From<config::LogFormat> for LogFormat {
    fn from(f: config::LogFormat) -> Self {
        match f {
            config::LogFormat::Text => LogFormat::Text,
            config::LogFormat::Json => LogFormat::Json,
        }
    }
}

impl Cli {
    /// The process's log format: `--log-format`, else the config file's `log_format`
    /// (peeked at: the file is loaded, and its errors reported, after logging starts),
    /// else text on a terminal and JSON otherwise.
    pub fn log_format(&self) -> config::LogFormat {
        let from_file = || match (&self.command, &self.run.config) {
            (None, Some(path)) => config::peek_log_format(path).map(LogFormat::from),
            _ => None,
        };
        self.log.log_format.or_else(from_file).unwrap_or(LogFormat::Auto).resolve()
    }
}

/// Options of the default command (run the gateway).
#[derive(Debug, Args, Clone, Default)]
pub struct RunArgs {
    /// Config file (YAML). Cannot be combined with --backend.
    #[arg(short, long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Port to listen on [default: 8080].
    #[arg(short, long)]
    pub port: Option<u16>,
    /// Address to listen on: IP or IP:PORT [default: 127.0.0.1].
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
    /// A backend: HOST:PORT[,weight=N][,zone=Z][,id=ID][,label.KEY=VALUE]. Repeat for more.
    #[arg(short, long = "backend", value_name = "SPEC")]
    pub backends: Vec<String>,
    /// Health-check backends with `GET PATH` instead of a TCP connect.
    #[arg(long, value_name = "PATH")]
    pub health_path: Option<String>,
    /// Strategy plugin [default: round-robin].
    #[arg(long, value_name = "NAME")]
    pub strategy: Option<String>,
    /// A plugin param, KEY=VALUE (VALUE parsed as JSON when it is JSON). Repeatable.
    #[arg(long = "param", value_name = "KEY=VALUE")]
    pub params: Vec<String>,
    /// Plugins folder [default: ./plugins].
    #[arg(long, value_name = "DIR")]
    pub plugins: Option<PathBuf>,
    /// Admin listener (stats page, metrics, API): a port (on 127.0.0.1) or IP:PORT
    /// [default: off]. An address other than loopback needs --admin-token-file.
    #[arg(long, value_name = "ADDR", value_parser = parse_admin)]
    pub admin: Option<SocketAddr>,
    /// A file holding the admin API's bearer token.
    #[arg(long, value_name = "FILE")]
    pub admin_token_file: Option<PathBuf>,
    /// Do not record per-request metrics (to measure what they cost).
    #[arg(long)]
    pub no_metrics: bool,
    /// Worker threads [default: one per core].
    #[arg(long)]
    pub threads: Option<usize>,
    /// Do not log one line per request.
    #[arg(long, conflicts_with = "access_log")]
    pub no_access_log: bool,
    /// Append the access log (one JSON line per request) to FILE instead of stderr;
    /// SIGUSR1 reopens it.
    #[arg(long, value_name = "FILE")]
    pub access_log: Option<PathBuf>,
    /// The process's log format, as `main` resolved it: fills in the config's
    /// `log_format` and the access log's default format.
    #[arg(skip)]
    pub log_format: Option<config::LogFormat>,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Start three built-in book-store backends and the gateway in front of them.
    Demo {
        /// Port for the gateway.
        #[arg(short, long, default_value_t = 8080)]
        port: u16,
        /// Admin listener: stats page, metrics, API (stop/start demo backends here).
        #[arg(long, default_value = "127.0.0.1:9901", value_parser = parse_admin)]
        admin: SocketAddr,
    },
    /// Validate config files.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Check, list and export strategy plugins.
    Plugin {
        #[command(subcommand)]
        command: PluginCommand,
    },
    /// Keep this instance registered with a gateway's registry (a sidecar): register,
    /// heartbeat every third of the TTL, register again after a 404, deregister on
    /// SIGTERM/SIGINT.
    Register(RegisterArgs),
    /// Run recorded requests (JSON lines: the JSON access log, or method/path/host/client/
    /// headers) through a strategy offline and report where they went: requests per
    /// backend, stickiness, churn against another strategy, what removing a backend
    /// moves, and decision time.
    Replay(ReplayArgs),
}

/// `gateway replay ...`
#[derive(Debug, Args)]
pub struct ReplayArgs {
    /// The strategy: a built-in name, a name in the plugins folder, or a .wasm file.
    #[arg(long)]
    pub strategy: String,
    /// Its params (JSON).
    #[arg(long, default_value = "{}")]
    pub params: String,
    /// The backends: a YAML list of {address, id, weight, zone, labels, healthy,
    /// active_requests, ewma_latency_us}.
    #[arg(long, value_name = "POOL.yaml")]
    pub pool: PathBuf,
    /// The requests: JSON lines (the gateway's JSON access log works as it is).
    #[arg(long, value_name = "FILE")]
    pub requests: PathBuf,
    /// Also replay through this strategy and report the churn between the two.
    #[arg(long, value_name = "STRATEGY")]
    pub compare: Option<String>,
    /// Params of the --compare strategy (JSON).
    #[arg(long, default_value = "{}")]
    pub compare_params: String,
    /// Replay again without this backend (by id; repeatable) and report how many keys move.
    #[arg(long = "remove", value_name = "ID")]
    pub remove: Vec<String>,
    /// What stickiness and key movement are measured by: client, header:NAME,
    /// cookie:NAME or query:NAME.
    #[arg(long, default_value = "client")]
    pub key: crate::replay::Key,
    /// Plugins folder for strategy names.
    #[arg(long, default_value = "plugins")]
    pub plugins: PathBuf,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

impl ReplayArgs {
    /// The replay's options, with the params parsed.
    pub fn options(&self) -> anyhow::Result<crate::replay::Options> {
        let json = |flag: &str, text: &str| {
            serde_json::from_str::<serde_json::Value>(text)
                .map_err(|e| anyhow::anyhow!("{flag} `{text}` is not JSON: {e}"))
        };
        Ok(crate::replay::Options {
            strategy: self.strategy.clone(),
            params: json("--params", &self.params)?,
            pool: self.pool.clone(),
            requests: self.requests.clone(),
            compare: match &self.compare {
                Some(name) => Some((name.clone(), json("--compare-params", &self.compare_params)?)),
                None => None,
            },
            remove: self.remove.clone(),
            key: self.key.clone(),
            plugins: self.plugins.clone(),
        })
    }
}

/// `gateway register ...`
#[derive(Debug, Args)]
pub struct RegisterArgs {
    /// The gateway's admin listener, e.g. http://127.0.0.1:9901.
    #[arg(long, value_name = "URL")]
    pub registry: http::Uri,
    /// The upstream to join (it needs `discovery.registry`).
    #[arg(long)]
    pub upstream: String,
    /// This instance's id (unique in the upstream).
    #[arg(long)]
    pub id: String,
    /// Where the gateway should send requests: HOST:PORT.
    #[arg(long, value_name = "HOST:PORT")]
    pub address: String,
    /// Registration TTL; heartbeats come every third of it.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub ttl: std::time::Duration,
    /// Relative weight.
    #[arg(long, default_value_t = 1)]
    pub weight: u32,
    /// Zone or region.
    #[arg(long, default_value = "")]
    pub zone: String,
    /// A label, KEY=VALUE. Repeatable.
    #[arg(long = "label", value_name = "KEY=VALUE")]
    pub labels: Vec<String>,
    /// A file holding the registry token (or the admin token).
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
}

fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    humantime_serde::re::humantime::parse_duration(s).map_err(|e| format!("`{s}`: {e} (e.g. 10s, 500ms)"))
}

impl RegisterArgs {
    /// The sidecar's options (reads the token file).
    pub fn options(&self) -> anyhow::Result<crate::discovery::sidecar::Options> {
        let mut labels = std::collections::BTreeMap::new();
        for l in &self.labels {
            let (k, v) = l.split_once('=').ok_or_else(|| anyhow::anyhow!("--label {l}: expected KEY=VALUE"))?;
            labels.insert(k.to_owned(), v.to_owned());
        }
        let token = match &self.token_file {
            Some(f) => Some(
                std::fs::read_to_string(f)
                    .map_err(|e| anyhow::anyhow!("--token-file {}: {e}", f.display()))?
                    .trim()
                    .to_owned(),
            ),
            None => None,
        };
        Ok(crate::discovery::sidecar::Options {
            registry: self.registry.clone(),
            upstream: self.upstream.clone(),
            id: self.id.clone(),
            address: self.address.clone(),
            ttl: self.ttl,
            weight: self.weight,
            zone: self.zone.clone(),
            labels,
            token,
        })
    }
}

/// `gateway config ...`
#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Check FILE like the gateway would at start or on reload (syntax, fields,
    /// references, and that every plugin it names loads and accepts its params), without
    /// starting anything. Exits non-zero with the message when it is not valid.
    Check {
        /// The config file.
        file: PathBuf,
    },
}

/// `gateway plugin ...`
#[derive(Debug, Subcommand)]
pub enum PluginCommand {
    /// Say whether FILE is a valid strategy for this gateway, and what is wrong if not.
    Check {
        /// The component file.
        file: PathBuf,
        /// Also run its `configure` with these params (JSON).
        #[arg(long, default_value = "{}")]
        params: String,
        /// Also push a pool and ask `pick` for a few sample requests and a retry, as
        /// traffic would: a plugin that fails on real calls (an exception in `pick`)
        /// fails here, with its own message.
        #[arg(long)]
        smoke: bool,
        /// The pool for --smoke (implies it): a YAML list of backends, as for
        /// `gateway replay` [default: four sample backends in two zones, one down].
        #[arg(long, value_name = "POOL.yaml")]
        pool: Option<PathBuf>,
    },
    /// List the built-in strategies and those in the plugins folder.
    List {
        /// Plugins folder.
        #[arg(long, default_value = "plugins")]
        plugins: PathBuf,
    },
    /// Create a ready-to-build plugin project (a commented round robin to edit).
    New {
        /// Plugin name (lowercase letters, digits, `-`).
        name: String,
        /// Language.
        #[arg(long, value_enum, default_value = "rust")]
        lang: crate::scaffold::Lang,
        /// Folder to create [default: ./NAME].
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Internal: compile a component read from stdin into the compiled-plugin cache
    /// folder DIR (the gateway runs itself with this to compile plugins out of process).
    #[command(name = "compile-into-cache", hide = true)]
    CompileIntoCache {
        /// The cache folder.
        dir: PathBuf,
    },
    /// Wrap a core Wasm module (a C plugin's, say) as a component: the module must carry
    /// the world's types, as code built with `wit-bindgen c` does.
    Componentize {
        /// The core module.
        module: PathBuf,
        /// The component file to write.
        #[arg(short, long)]
        output: PathBuf,
    },
    /// Write a built-in strategy out as a component file.
    Export {
        /// Built-in name, e.g. round-robin.
        name: String,
        /// Output file.
        #[arg(short, long)]
        output: PathBuf,
    },
}

impl RunArgs {
    /// Builds the config: from the file, or from the quick-start flags.
    pub fn to_config(&self) -> anyhow::Result<Config> {
        if let Some(path) = &self.config {
            if !self.backends.is_empty()
                || self.strategy.is_some()
                || self.health_path.is_some()
                || !self.params.is_empty()
            {
                anyhow::bail!(
                    "--config cannot be combined with --backend, --strategy, --param or --health-path: put them in the file"
                );
            }
            let mut config = config::load(path)?;
            self.apply_overrides(&mut config)?;
            config::check_registry_listener(&config).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
            return Ok(config);
        }
        if self.backends.is_empty() {
            anyhow::bail!(
                "nothing to balance: give backends with -b HOST:PORT (repeatable), or a config file with --config FILE; try `gateway demo` for a self-contained demo"
            );
        }
        let backends = self.backends.iter().map(|s| parse_backend(s)).collect::<Result<Vec<_>, _>>()?;
        let mut upstream = Upstream::with_backends(backends);
        if let Some(s) = &self.strategy {
            upstream.strategy.first_mut().plugin = s.clone();
        }
        upstream.strategy.first_mut().params = parse_params(&self.params)?;
        upstream.health_check.path = self.health_path.clone();
        let mut config = Config::single(SocketAddr::from(([127, 0, 0, 1], 8080)), upstream);
        self.apply_overrides(&mut config)?;
        config::validate(&config).map_err(|(field, _, message)| anyhow::anyhow!("{field}: {message}"))?;
        Ok(config)
    }

    /// Flags that apply with or without a config file.
    fn apply_overrides(&self, config: &mut Config) -> anyhow::Result<()> {
        if self.listen.is_some() || self.port.is_some() || self.config.is_none() {
            let base = config.listeners.first().map(|l| l.address).unwrap_or(SocketAddr::from(([127, 0, 0, 1], 8080)));
            let mut addr = match &self.listen {
                Some(l) => parse_listen(l, base.port())?,
                None => base,
            };
            if let Some(p) = self.port {
                addr.set_port(p);
            }
            config.listeners = vec![config::Listener::at(addr)];
        }
        if let Some(dir) = &self.plugins {
            config.plugins.dir = dir.clone();
        }
        if let Some(admin) = self.admin {
            config.admin.address = Some(admin);
        }
        if let Some(token) = &self.admin_token_file {
            config.admin.token_file = Some(token.clone());
        }
        if self.no_metrics {
            config.metrics.enabled = false;
        }
        if let Some(t) = self.threads {
            config.threads = t;
        }
        if self.no_access_log {
            config.access_log.enabled = false;
        }
        if let Some(path) = &self.access_log {
            config.access_log.enabled = true;
            config.access_log.path = Some(path.clone());
        }
        if let Some(process) = self.log_format {
            config.log_format = Some(process);
            if config.access_log.format.is_none() {
                config.access_log.format =
                    Some(if config.access_log.path.is_some() { config::LogFormat::Json } else { process });
            }
        }
        Ok(())
    }
}

/// `PORT` (on 127.0.0.1) or `IP:PORT`.
fn parse_admin(s: &str) -> Result<SocketAddr, String> {
    if let Ok(port) = s.parse::<u16>() {
        return Ok(SocketAddr::from(([127, 0, 0, 1], port)));
    }
    s.parse().map_err(|_| format!("`{s}`: expected a port (e.g. 9901, on 127.0.0.1) or IP:PORT (e.g. 127.0.0.1:9901)"))
}

fn parse_listen(s: &str, default_port: u16) -> anyhow::Result<SocketAddr> {
    if let Ok(addr) = s.parse::<SocketAddr>() {
        return Ok(addr);
    }
    let ip: IpAddr = s.trim_matches(|c| c == '[' || c == ']').parse().map_err(|_| {
        anyhow::anyhow!("--listen `{s}`: expected an IP address or IP:PORT, e.g. 0.0.0.0 or 127.0.0.1:8080")
    })?;
    Ok(SocketAddr::new(ip, default_port))
}

/// `HOST:PORT[,weight=N][,zone=Z][,id=ID][,label.KEY=VALUE]`
pub fn parse_backend(spec: &str) -> anyhow::Result<Backend> {
    let mut parts = spec.split(',');
    let address = parts.next().unwrap_or_default().trim();
    let mut b = Backend::at(address);
    for opt in parts {
        let (k, v) =
            opt.split_once('=').ok_or_else(|| anyhow::anyhow!("backend `{spec}`: option `{opt}` is not KEY=VALUE"))?;
        match k {
            "weight" => {
                b.weight = v
                    .parse()
                    .ok()
                    .filter(|w| *w > 0)
                    .ok_or_else(|| anyhow::anyhow!("backend `{spec}`: weight `{v}` is not a whole number ≥ 1"))?
            }
            "zone" => b.zone = v.into(),
            "id" => b.id = Some(v.into()),
            _ => match k.strip_prefix("label.") {
                Some(label) if !label.is_empty() => {
                    b.labels.insert(label.into(), v.into());
                }
                _ => anyhow::bail!("backend `{spec}`: unknown option `{k}` (known: weight, zone, id, label.KEY)"),
            },
        }
    }
    Ok(b)
}

/// `KEY=VALUE` pairs → a JSON object; values that parse as JSON keep their type.
pub fn parse_params(params: &[String]) -> anyhow::Result<serde_json::Value> {
    let mut map = serde_json::Map::new();
    for p in params {
        let (k, v) = p.split_once('=').ok_or_else(|| anyhow::anyhow!("--param `{p}`: expected KEY=VALUE"))?;
        let value = serde_json::from_str(v).unwrap_or_else(|_| serde_json::Value::String(v.into()));
        map.insert(k.into(), value);
    }
    Ok(serde_json::Value::Object(map))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_specs_parse_options_and_refuse_unknown_ones() {
        let b = parse_backend("127.0.0.1:9001,weight=4,zone=eu,label.canary=true").unwrap();
        assert_eq!((b.address.as_str(), b.weight, b.zone.as_str()), ("127.0.0.1:9001", 4, "eu"));
        assert_eq!(b.labels["canary"], "true");
        let e = parse_backend("127.0.0.1:9001,wieght=4").unwrap_err().to_string();
        assert!(e.contains("unknown option `wieght`"), "{e}");
        assert!(parse_backend("127.0.0.1:9001,weight=0").is_err());
    }

    #[test]
    fn quick_start_flags_build_one_upstream() {
        let cli = Cli::parse_from([
            "gateway",
            "-p",
            "9000",
            "-b",
            "127.0.0.1:9001",
            "-b",
            "127.0.0.1:9002",
            "--param",
            "n=3",
        ]);
        let c = cli.run.to_config().unwrap();
        assert_eq!(c.listeners[0].address, "127.0.0.1:9000".parse().unwrap());
        let up = &c.upstreams["default"];
        assert_eq!(up.backends.len(), 2);
        assert_eq!(up.strategy.first().plugin, "round-robin");
        assert_eq!(up.strategy.first().params["n"], 3);
        let c = Cli::parse_from(["gateway", "--listen", "0.0.0.0", "-b", "127.0.0.1:1"]).run.to_config().unwrap();
        assert_eq!(c.listeners[0].address, "0.0.0.0:8080".parse().unwrap());
    }

    #[test]
    fn access_log_flags() {
        let c = Cli::parse_from(["gateway", "-b", "127.0.0.1:1", "--no-access-log"]).run.to_config().unwrap();
        assert!(!c.access_log.enabled);
        let mut cli = Cli::parse_from(["gateway", "-b", "127.0.0.1:1", "--access-log", "/tmp/a.log"]);
        cli.run.log_format = Some(config::LogFormat::Text);
        let c = cli.run.to_config().unwrap();
        assert!(c.access_log.enabled);
        assert_eq!(c.access_log.path.as_deref(), Some(std::path::Path::new("/tmp/a.log")));
        assert_eq!(c.access_log.format, Some(config::LogFormat::Json), "a file defaults to JSON");
        let mut cli = Cli::parse_from(["gateway", "-b", "127.0.0.1:1"]);
        cli.run.log_format = Some(config::LogFormat::Text);
        let c = cli.run.to_config().unwrap();
        assert_eq!((c.log_format, c.access_log.format), (Some(config::LogFormat::Text), Some(config::LogFormat::Text)));
        let e = Cli::try_parse_from(["gateway", "-b", "127.0.0.1:1", "--no-access-log", "--access-log", "a.log"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("cannot be used with"), "{e}");
    }

    #[test]
    fn log_format_flag_wins_over_the_config_file() {
        let file = std::env::temp_dir().join(format!("gateway-cli-log-format-{}.yaml", std::process::id()));
        std::fs::write(&file, "log_format: text\nupstreams: {}\n").unwrap();
        let path = file.to_str().unwrap();
        assert_eq!(Cli::parse_from(["gateway", "-c", path]).log_format(), config::LogFormat::Text);
        let flag = Cli::parse_from(["gateway", "-c", path, "--log-format", "json"]);
        assert_eq!(flag.log_format(), config::LogFormat::Json);
        assert_eq!(Cli::parse_from(["gateway", "--log-format", "text"]).log_format(), config::LogFormat::Text);
        let _ = std::fs::remove_file(&file);
    }
}
