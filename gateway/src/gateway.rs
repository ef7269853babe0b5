//! Assembling a running gateway from a [`Config`] (plugins, upstreams, routes), and
//! replacing its routes and upstreams when the config file changes.

use crate::config::{self, Config};
use crate::discovery;
use crate::health::{self, Receiver, Reporter};
use crate::metrics;
use crate::plugin::PluginHost;
use crate::proxy::Proxy;
use crate::router::Router;
use crate::upstream::Upstream;
use crate::view::View;
use arc_swap::ArcSwap;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

/// Everything the workers and the control plane share.
#[derive(Debug)]
pub struct Gateway {
    /// The request path (holds the current [`View`]).
    pub proxy: Proxy,
    /// The plugin runtime.
    pub plugins: Arc<PluginHost>,
    /// The config the gateway started with: listeners, admin, threads and plugin
    /// settings come from it (a reload that changes them says a restart is needed).
    pub config: Config,
    /// The config file, when there is one (reloads read it again).
    pub config_path: Option<PathBuf>,
    /// When the process started.
    pub started_at: SystemTime,
    /// The file's own settings as last loaded (before command-line overrides), to tell
    /// which startup-only settings a reload changes.
    file_config: Mutex<Option<Config>>,
    state: Mutex<ConfigState>,
    /// The running health checks, and the token they stop with.
    health: Mutex<Option<(tokio_util::sync::CancellationToken, health::Checks)>>,
    /// Discovery: the embedded registry and the sources of the current view.
    pub discovery: discovery::Sources,
    /// The token the discovery sources stop with, once started.
    discovery_stop: Mutex<Option<tokio_util::sync::CancellationToken>>,
}

/// The config's version and the outcome of the last reload, for `/api/config`.
#[derive(Debug, Clone)]
pub struct ConfigState {
    /// The serving config's version: 1 at start, +1 per applied reload.
    pub version: u64,
    /// When the serving config was loaded.
    pub loaded_at: SystemTime,
    /// Why the last reload was refused, if it was (cleared by the next good one).
    pub last_error: Option<String>,
    /// When the last reload was refused.
    pub last_error_at: Option<SystemTime>,
}

/// What a reload changed, for the log and the API.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct Changes {
    /// Upstreams added.
    pub upstreams_added: Vec<String>,
    /// Upstreams removed.
    pub upstreams_removed: Vec<String>,
    /// Upstreams whose settings, backends or strategy changed.
    pub upstreams_changed: Vec<String>,
    /// Backends added, as `upstream/id`.
    pub backends_added: Vec<String>,
    /// Backends removed, as `upstream/id` (their in-flight requests finish).
    pub backends_removed: Vec<String>,
    /// Upstreams whose strategy (plugin or params) changed.
    pub strategies_changed: Vec<String>,
    /// Upstreams whose canary or shadow strategy was added, changed or removed.
    pub trials_changed: Vec<String>,
    /// The routes changed.
    pub routes_changed: bool,
    /// Settings that only take effect after a restart.
    pub needs_restart: Vec<String>,
}

impl Changes {
    /// Nothing changed.
    pub fn is_empty(&self) -> bool {
        self.upstreams_added.is_empty()
            && self.upstreams_removed.is_empty()
            && self.upstreams_changed.is_empty()
            && !self.routes_changed
            && self.needs_restart.is_empty()
    }
}

impl Gateway {
    /// Builds the gateway: compiles plugins, binds them to upstreams (running their
    /// `configure`), resolves backends. Blocking; call before starting the workers.
    pub fn build(config: Config) -> anyhow::Result<(Arc<Gateway>, Receiver)> {
        Self::build_from(config, None)
    }

    /// Like [`Gateway::build`], remembering the file the config came from so that it
    /// can be reloaded.
    pub fn build_from(config: Config, path: Option<PathBuf>) -> anyhow::Result<(Arc<Gateway>, Receiver)> {
        metrics::set_enabled(config.metrics.enabled);
        metrics::set_workers(config.worker_threads());
        let plugins = PluginHost::new(&config.plugins)?;
        let view = build_view(&config, 1, &plugins, None).map_err(|e| match &path {
            Some(p) => anyhow::anyhow!(located(p, &config, e)),
            None => e,
        })?;
        let (reporter, receiver) = Reporter::new();
        let access_log = match config.access_log.enabled {
            true => Some(crate::access_log::AccessLog::new(&config.access_log).map_err(|e| {
                let to = config.access_log.path.as_ref().map_or("stderr".into(), |p| p.display().to_string());
                anyhow::anyhow!("access_log: cannot open {to}: {e}")
            })?),
            false => None,
        };
        // The admin token also lets a client ask how its request was routed
        // (`X-Gateway-Debug: 1`) from a non-loopback address.
        let debug_token = match &config.admin.token_file {
            Some(path) => Some(crate::admin::auth::read_token(path)?.into_boxed_slice()),
            None => None,
        };
        let proxy = Proxy { view: ArcSwap::from_pointee(view), reporter, access_log, debug_token };
        metrics::control().last_reload_success_ms.store(metrics::now_ms(), std::sync::atomic::Ordering::Relaxed);
        let now = SystemTime::now();
        let file_config = path.as_deref().and_then(|p| config::load(p).ok());
        let gw = Gateway {
            proxy,
            plugins,
            config,
            file_config: Mutex::new(file_config),
            config_path: path,
            started_at: now,
            state: Mutex::new(ConfigState { version: 1, loaded_at: now, last_error: None, last_error_at: None }),
            health: Mutex::new(None),
            discovery: discovery::Sources::default(),
            discovery_stop: Mutex::new(None),
        };
        Ok((Arc::new(gw), receiver))
    }

    /// The current routes and upstreams.
    pub fn view(&self) -> Arc<View> {
        self.proxy.view()
    }

    /// The upstream called `name` in the current view.
    pub fn upstream(&self, name: &str) -> Option<Arc<Upstream>> {
        self.view().upstream(name).cloned()
    }

    /// The config's version and the last reload's outcome.
    pub fn config_state(&self) -> ConfigState {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Starts (or, after a reload, restarts) the active health checks of the current
    /// view. Call on the control runtime.
    pub fn start_health_checks(&self, stop: &tokio_util::sync::CancellationToken) {
        let checks = health::Checks::start(&self.view().upstreams, stop);
        if let Some((_, old)) = self.health.lock().unwrap_or_else(|e| e.into_inner()).replace((stop.clone(), checks)) {
            old.stop();
        }
    }

    /// Restarts the health checks for the current view (after a reload). Call on the
    /// control runtime, after [`Gateway::start_health_checks`].
    pub fn restart_health_checks(&self) {
        let stop = self.health.lock().unwrap_or_else(|e| e.into_inner()).as_ref().map(|(s, _)| s.clone());
        if let Some(stop) = stop {
            self.start_health_checks(&stop);
        }
    }

    /// Starts the discovery sources of the current view (and the registry's publisher).
    /// Call on the control runtime.
    pub fn start_discovery(self: &Arc<Self>, stop: &tokio_util::sync::CancellationToken) {
        *self.discovery_stop.lock().unwrap_or_else(|e| e.into_inner()) = Some(stop.clone());
        let gw = Arc::downgrade(self);
        let lookup: discovery::Lookup = Arc::new(move |name| gw.upgrade()?.upstream(name));
        self.discovery.start(&self.view().upstreams, lookup, stop);
    }

    /// Restarts the discovery sources for the current view (after a reload); the
    /// registry publishes its instances into the new upstreams. Call on the control
    /// runtime, after [`Gateway::start_discovery`].
    pub fn restart_discovery(self: &Arc<Self>) {
        let stop = self.discovery_stop.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if let Some(stop) = stop {
            self.start_discovery(&stop);
        }
    }

    /// Reads the config file again and applies it: the new view is built (plugins
    /// resolved and configured, backends resolved) before anything changes, then
    /// swapped in atomically. Requests in flight finish on the old view. A config that
    /// fails to load or build is refused and the old one keeps serving.
    ///
    /// Blocking (file read, DNS, plugin compilation): call from `spawn_blocking`.
    pub fn reload(&self) -> Result<Changes, String> {
        let result = self.try_reload();
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        match &result {
            Ok((changes, version)) => {
                state.version = *version;
                state.loaded_at = SystemTime::now();
                state.last_error = None;
                state.last_error_at = None;
                metrics::control().reloads_ok.inc();
                metrics::control()
                    .last_reload_success_ms
                    .store(metrics::now_ms(), std::sync::atomic::Ordering::Relaxed);
                Ok(changes.clone())
            }
            Err(e) => {
                state.last_error = Some(e.clone());
                state.last_error_at = Some(SystemTime::now());
                metrics::control().reloads_refused.inc();
                Err(e.clone())
            }
        }
    }

    /// Changes the running config of upstream `name` with `edit` (the admin API's
    /// canary promotion and abort), checked and built like a reload, then swapped in.
    /// The config file is not written: a reload from the file brings back what it says.
    /// Returns the new config version. Blocking (plugin binding): call from
    /// `spawn_blocking`.
    pub fn edit_upstream(
        &self,
        name: &str,
        edit: impl FnOnce(&mut config::Upstream) -> Result<(), String>,
    ) -> Result<u64, String> {
        let old = self.view();
        let mut new = (*old.config).clone();
        let up = new.upstreams.get_mut(name).ok_or_else(|| {
            let known: Vec<_> = old.upstreams.iter().map(|u| u.name.as_str()).collect();
            format!("no upstream `{name}` (upstreams: {})", known.join(", "))
        })?;
        edit(up)?;
        config::validate(&new).map_err(|(field, _, message)| format!("{field}: {message}"))?;
        let version = self.config_state().version + 1;
        let view = build_view(&new, version, &self.plugins, Some(&old)).map_err(|e| format!("{e:#}"))?;
        self.proxy.view.store(Arc::new(view));
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.version = version;
        state.loaded_at = SystemTime::now();
        Ok(version)
    }

    fn try_reload(&self) -> Result<(Changes, u64), String> {
        let path = self.config_path.as_ref().ok_or_else(|| {
            "this gateway was started without --config FILE: there is no file to reload (restart it to change flags)"
                .to_owned()
        })?;
        let file = config::load(path).map_err(|e| e.to_string())?;
        let before = self.file_config.lock().unwrap_or_else(|e| e.into_inner()).clone();
        // Startup-only settings keep their running values (command-line overrides
        // included); a file that changes them is told a restart is needed.
        let mut new = file.clone();
        new.listeners.clone_from(&self.config.listeners);
        new.admin = self.config.admin.clone();
        new.threads = self.config.threads;
        new.plugins = self.config.plugins.clone();
        new.shutdown_grace = self.config.shutdown_grace;
        new.access_log = self.config.access_log.clone();
        new.log_format = self.config.log_format;
        new.metrics = self.config.metrics.clone();
        new.registry = self.config.registry.clone();
        let old = self.view();
        let version = self.config_state().version + 1;
        let view = build_view(&new, version, &self.plugins, Some(&old)).map_err(|e| located(path, &new, e))?;
        let changes = diff(&old, &view, before.as_ref().unwrap_or(&self.config), &file);
        *self.file_config.lock().unwrap_or_else(|e| e.into_inner()) = Some(file);
        let upstreams: Vec<&str> = view.upstreams.iter().map(|u| u.name.as_str()).collect();
        let routes: Vec<&str> = view.router.routes().iter().map(|r| r.name.as_str()).collect();
        metrics::control().retain(&upstreams, &routes);
        self.proxy.view.store(Arc::new(view));
        Ok((changes, version))
    }
}

/// A build error with the file, line and field it comes from, where it has one.
fn located(path: &std::path::Path, config: &Config, e: anyhow::Error) -> String {
    use crate::upstream::BuildError;
    let (name, field, needle) = match e.downcast_ref::<BuildError>() {
        Some(BuildError::Plugin { upstream, step, .. }) => {
            let chain = config.upstreams.get(upstream).map(|u| &u.strategy);
            let plugin = chain.and_then(|c| c.steps().get(step.unwrap_or(0))).map(|s| s.plugin.clone());
            let field = match step {
                Some(i) => format!("upstreams.{upstream}.strategy[{i}]"),
                None => format!("upstreams.{upstream}.strategy"),
            };
            (upstream, field, plugin.unwrap_or_default())
        }
        Some(BuildError::Resolve { upstream, address, .. }) => {
            (upstream, format!("upstreams.{upstream}.backends"), address.clone())
        }
        Some(BuildError::DuplicateId { upstream, id }) => {
            (upstream, format!("upstreams.{upstream}.backends"), id.clone())
        }
        Some(BuildError::Transport { upstream, .. }) => (upstream, format!("upstreams.{upstream}"), "tls".to_owned()),
        _ => return format!("{e:#}"),
    };
    config::locate(path, name, &field, &needle, format!("{e:#}")).to_string()
}

/// Builds a view from `config`, reusing from `previous` what a reload left unchanged.
fn build_view(
    config: &Config,
    version: u64,
    plugins: &Arc<PluginHost>,
    previous: Option<&View>,
) -> anyhow::Result<View> {
    let mut by_name = HashMap::new();
    let mut upstreams = Vec::new();
    for (name, cfg) in &config.upstreams {
        let before = previous.and_then(|v| v.upstream(name));
        let up = match before {
            // Unchanged: the same upstream object, so nothing about it moves.
            Some(b) if b.config == *cfg && previous.is_some_and(|p| p.config.timeouts == config.timeouts) => b.clone(),
            _ => Arc::new(Upstream::rebuild(name, cfg, &config.timeouts, plugins, before.map(|b| &**b))?),
        };
        by_name.insert(name.clone(), up.clone());
        upstreams.push(up);
    }
    let router = Router::new(&config.effective_routes(), &by_name);
    Ok(View { version, config: Arc::new(config.clone()), router, upstreams })
}

/// What changed between two views (and which startup-only settings differ).
fn diff(old: &View, new: &View, started: &Config, file: &Config) -> Changes {
    let mut c = Changes::default();
    for up in &new.upstreams {
        match old.upstream(&up.name) {
            None => c.upstreams_added.push(up.name.clone()),
            Some(before) if !Arc::ptr_eq(before, up) => {
                c.upstreams_changed.push(up.name.clone());
                if before.config.strategy != up.config.strategy {
                    c.strategies_changed.push(up.name.clone());
                }
                if before.config.canary != up.config.canary || before.config.shadow != up.config.shadow {
                    c.trials_changed.push(up.name.clone());
                }
                let ids = |u: &Upstream| -> Vec<String> {
                    u.pool.snapshot().members.iter().map(|m| m.entry.id.clone()).collect()
                };
                let (was, is) = (ids(before), ids(up));
                c.backends_added.extend(is.iter().filter(|i| !was.contains(i)).map(|i| format!("{}/{i}", up.name)));
                c.backends_removed.extend(was.iter().filter(|i| !is.contains(i)).map(|i| format!("{}/{i}", up.name)));
            }
            Some(_) => {}
        }
    }
    for up in &old.upstreams {
        if new.upstream(&up.name).is_none() {
            c.upstreams_removed.push(up.name.clone());
        }
    }
    c.routes_changed = old.config.effective_routes() != new.config.effective_routes();
    let restart = |name: &str, changed: bool, c: &mut Changes| {
        if changed {
            c.needs_restart.push(name.to_owned());
        }
    };
    restart("listeners", started.listeners != file.listeners, &mut c);
    restart("threads", started.threads != file.threads, &mut c);
    restart("admin.address", started.admin.address != file.admin.address, &mut c);
    restart("plugins", started.plugins != file.plugins, &mut c);
    restart("shutdown_grace", started.shutdown_grace != file.shutdown_grace, &mut c);
    restart("access_log", started.access_log != file.access_log, &mut c);
    restart("log_format", started.log_format != file.log_format, &mut c);
    restart("metrics", started.metrics != file.metrics, &mut c);
    restart("registry", started.registry != file.registry, &mut c);
    restart(
        "admin",
        started.admin.token_file != file.admin.token_file || started.admin.public_metrics != file.admin.public_metrics,
        &mut c,
    );
    c
}
