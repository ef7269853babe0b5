//! The Wasm plugin host: the only module that touches wasmtime types.
//!
//! One [`wasmtime::Engine`] per process. A [`Plugin`] is a compiled component plus its
//! `InstancePre`; a [`Binding`] is a plugin serving one upstream with its params, and
//! keeps one live instance per worker thread (never one per request). Every call runs
//! under an epoch deadline and a memory limit; a trap, timeout or bad answer discards
//! that thread's instance and is reported to the caller, which falls back.

mod bindings;
mod builtin;
mod cache;
mod compile;
mod guest_log;
mod instance;
pub mod lookup;
mod quarantine;
mod reason;
mod setup;
mod shared;
mod warm;
mod watch;

use crate::config;
use bindings::{HostState, SelectorPre};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant, SystemTime};
use wasmtime::Engine;
use wasmtime::component::{Component, Linker, types::ComponentItem};

pub use compile::{
    SUBCOMMAND as COMPILE_SUBCOMMAND, child_main as compile_child_main, compile_in_child, release_memory_with,
};
pub use instance::{Binding, Decision, PickError, PickErrorKind, Target, maintain_instances};
pub use quarantine::Policy as QuarantinePolicy;
pub use reason::{MAX_DECISION_REASON_BYTES, Reason};
pub use shared::{Namespace, StateLimits};
pub use warm::Warmer;
pub use watch::watch;

/// The world a plugin must implement, as printed in errors.
pub const WORLD: &str = "gateway:selector/selector@0.3.0";
const IMPORT: &str = "gateway:selector/host@0.3.0";
const TYPES: &str = "gateway:selector/types@0.3.0";
const EXPORT: &str = "gateway:selector/policy@0.3.0";
/// Longest a swap waits for the workers to warm the new version.
const WARM_TIMEOUT: Duration = Duration::from_secs(10);
/// Epoch tick bounds; deadlines are whole ticks. The tick is a fifth of the `pick`
/// deadline within these bounds: a wake-up of the ticker thread preempts a worker on a
/// busy core, and 1,000 a second cost about 2% of the proxy's throughput (perf, one
/// worker thread) where 250 a second for the default 20 ms deadline do not show; a
/// deadline is still kept within a fifth of itself.
const TICK_MIN: Duration = Duration::from_millis(1);
const TICK_MAX: Duration = Duration::from_millis(10);

/// Why a plugin was refused.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    /// No file and no built-in of that name.
    #[error("no plugin named `{name}`: not a built-in ({builtins}) and no {dir}/{name}.wasm")]
    NotFound {
        /// The name asked for.
        name: String,
        /// Built-in names.
        builtins: String,
        /// The plugins folder.
        dir: String,
    },
    /// The file could not be read.
    #[error("{path}: cannot read: {error}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        error: std::io::Error,
    },
    /// The file is larger than `plugins.file_limit_mib`.
    #[error(
        "{path}: {size_mib:.1} MiB, over the plugin file limit of {limit_mib} MiB (plugins.file_limit_mib; a Python plugin is about 18 MiB): not loaded"
    )]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// Its size.
        size_mib: f64,
        /// The limit.
        limit_mib: u64,
    },
    /// The component imports WASI capabilities (network, files, ...) plugins do not get.
    #[error(
        "{origin}: imports {imports}: plugins get no network, files or other system access in this gateway. Only wasi:cli, wasi:io, wasi:clocks and wasi:random, which toolchains import without calling, are linked (as traps). Build Python plugins with `componentize-py ... --stub-wasi`, JavaScript with `--stub-wasi` or `-d` for each WASI feature, and Rust without std::fs / std::net"
    )]
    Capabilities {
        /// File path or built-in name.
        origin: Origin,
        /// The WASI interfaces it asks for.
        imports: String,
    },
    /// The bytes are not a Wasm component.
    #[error("{origin}: {reason}")]
    NotComponent {
        /// File path or built-in name.
        origin: Origin,
        /// What is wrong.
        reason: String,
    },
    /// A component, but not of our world.
    #[error(
        "{origin}: not a strategy for this gateway: {reason}. Expected world {WORLD} (imports {IMPORT}, exports {EXPORT}); this component {found}"
    )]
    WrongWorld {
        /// File path or built-in name.
        origin: Origin,
        /// wasmtime's account of the mismatch.
        reason: String,
        /// What the component imports and exports.
        found: String,
    },
    /// `configure` returned an error for these params.
    #[error("{origin}: refused its params {params}: {message}")]
    Configure {
        /// File path or built-in name.
        origin: Origin,
        /// The params, as JSON.
        params: String,
        /// The plugin's own message.
        message: String,
    },
    /// Instantiating or calling the plugin failed while setting it up.
    #[error("{origin}: failed during {during}: {reason}")]
    Setup {
        /// File path or built-in name.
        origin: Origin,
        /// Which step.
        during: &'static str,
        /// The trap or error.
        reason: String,
    },
}

/// Where a plugin came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// Compiled into the gateway.
    Builtin(String),
    /// A file in the plugins folder (or given on the command line).
    File(PathBuf),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Builtin(name) => write!(f, "built-in plugin `{name}`"),
            Origin::File(path) => write!(f, "{}", path.display()),
        }
    }
}

/// A compiled, linked plugin, ready to instantiate.
pub struct Plugin {
    /// Name routes refer to it by.
    pub name: String,
    /// Built-in or file.
    pub origin: Origin,
    /// SHA-256 of the component bytes (hex).
    pub hash: String,
    /// Size of the component in bytes.
    pub size: usize,
    /// When it was loaded.
    pub loaded_at: SystemTime,
    /// How long compiling (or loading the cached compilation) and linking took.
    pub compile_time: Duration,
    /// Loaded from the precompiled cache rather than compiled.
    pub from_cache: bool,
    /// Unique per load: instances of an older load are replaced on their next use.
    pub(crate) version: u64,
    pub(crate) pre: SelectorPre<HostState>,
}

impl fmt::Debug for Plugin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Plugin")
            .field("name", &self.name)
            .field("origin", &self.origin)
            .field("hash", &self.hash)
            .finish()
    }
}

/// What the admin API and `gateway plugin list` show of a loaded plugin.
#[derive(Debug, Clone)]
pub struct Summary {
    /// Built-in or file.
    pub origin: Origin,
    /// SHA-256 of the component bytes (hex).
    pub hash: String,
    /// Size of the component in bytes.
    pub size: usize,
    /// When it was loaded.
    pub loaded_at: SystemTime,
    /// How long compiling (or loading the cached compilation) and linking took.
    pub compile_time: Duration,
    /// Loaded from the precompiled cache rather than compiled.
    pub from_cache: bool,
    /// A file in the plugins folder that has the name of a built-in, which it replaces.
    pub overrides_builtin: bool,
}

impl Plugin {
    /// What the admin API shows of it.
    pub fn summary(&self) -> Summary {
        Summary {
            origin: self.origin.clone(),
            hash: self.hash.clone(),
            size: self.size,
            loaded_at: self.loaded_at,
            compile_time: self.compile_time,
            from_cache: self.from_cache,
            overrides_builtin: self.overrides_builtin(),
        }
    }

    /// Whether it is a file that replaces the built-in of the same name.
    pub fn overrides_builtin(&self) -> bool {
        matches!(self.origin, Origin::File(_)) && builtin::get(&self.name).is_some()
    }
}

/// Call budgets for plugin instances.
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    /// How often the epoch advances.
    pub tick: Duration,
    /// Ticks a `pick` may run.
    pub pick_ticks: u64,
    /// Ticks `configure` / `pool-changed` / instantiation may run.
    pub setup_ticks: u64,
    /// Bytes of linear memory per instance.
    pub memory_bytes: usize,
    /// When failing calls put a plugin in quarantine.
    pub quarantine: quarantine::Policy,
    /// The `pick` deadline as a duration.
    pub pick_deadline: Duration,
    /// Byte caps of each upstream's host-held state.
    pub state: StateLimits,
    /// Largest plugin file accepted.
    pub file_bytes: u64,
    /// Size of the compiled-plugin cache.
    pub cache_bytes: u64,
}

impl Budget {
    /// From the config's durations and MiB.
    pub fn from_config(cfg: &config::Plugins) -> Self {
        let tick = (cfg.deadline / 5).clamp(TICK_MIN, TICK_MAX);
        let ticks = |d: Duration| (d.as_micros() / tick.as_micros()).max(1) as u64 + 1;
        Budget {
            tick,
            pick_ticks: ticks(cfg.deadline),
            setup_ticks: ticks(cfg.setup_deadline),
            memory_bytes: cfg.memory_limit_mib as usize * 1024 * 1024,
            pick_deadline: cfg.deadline,
            state: StateLimits {
                kv_bytes: (cfg.kv_limit_mib << 20) as usize,
                counter_bytes: (cfg.counters_limit_kib << 10) as usize,
            },
            file_bytes: cfg.file_limit_mib << 20,
            cache_bytes: cfg.cache_limit_mib << 20,
            quarantine: quarantine::Policy {
                after: cfg.quarantine.after,
                backoff: cfg.quarantine.backoff,
                max_backoff: cfg.quarantine.max_backoff,
            },
        }
    }
}

/// What the gateway knows about one plugin name.
#[derive(Debug, Clone, Default)]
pub struct Registered {
    /// The last good version: the one serving, or (when no upstream uses the name) the
    /// one checked last.
    pub current: Option<Summary>,
    /// Its compiled code, while an upstream holds it: a plugin no upstream uses is
    /// checked and listed, not kept compiled in memory.
    compiled: Weak<Plugin>,
    /// Why the last attempt to load a new version failed, if it did.
    pub last_error: Option<String>,
    /// Its file was deleted; the last good version keeps serving.
    pub file_deleted: bool,
    /// SHA-256 of the last refused file, so the same bad file is reported once.
    refused_hash: Option<String>,
}

impl Registered {
    /// Whether its compiled code is in memory (an upstream uses it).
    pub fn in_memory(&self) -> bool {
        self.compiled.strong_count() > 0
    }
}

/// The process's plugin runtime.
pub struct PluginHost {
    engine: Engine,
    linker: Linker<HostState>,
    budget: Budget,
    dir: PathBuf,
    watch: bool,
    cache: Option<cache::Cache>,
    namespaces: Mutex<HashMap<String, Arc<Namespace>>>,
    registry: Mutex<HashMap<String, Registered>>,
    bindings: Mutex<Vec<Weak<Binding>>>,
    warm: warm::Coordinator,
}

impl fmt::Debug for PluginHost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PluginHost").field("dir", &self.dir).field("budget", &self.budget).finish()
    }
}

fn next_version() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

impl PluginHost {
    /// Creates the engine and starts its epoch ticker thread.
    pub fn new(cfg: &config::Plugins) -> anyhow::Result<Arc<Self>> {
        let engine = Engine::new(&compile::engine_config())?;
        let mut linker = Linker::new(&engine);
        HostState::add_to_linker(&mut linker)?;

        let budget = Budget::from_config(cfg);
        let (weak, tick) = (engine.weak(), budget.tick);
        std::thread::Builder::new().name("wasm-epoch".into()).spawn(move || {
            loop {
                std::thread::sleep(tick);
                match weak.upgrade() {
                    Some(engine) => engine.increment_epoch(),
                    None => break,
                }
            }
        })?;

        let cache = match cfg.cache.then(|| cfg.cache_dir.clone().or_else(cache::Cache::default_dir)).flatten() {
            Some(dir) => match cache::Cache::new(dir.clone(), &engine, budget.cache_bytes) {
                Ok(c) => {
                    c.tidy();
                    Some(c)
                }
                Err(e) => {
                    tracing::warn!(dir = %dir.display(), "plugin cache disabled: cannot use the folder: {e}");
                    None
                }
            },
            None => None,
        };
        Ok(Arc::new(PluginHost {
            engine,
            linker,
            budget,
            dir: cfg.dir.clone(),
            watch: cfg.watch,
            cache,
            namespaces: Mutex::new(HashMap::new()),
            registry: Mutex::new(HashMap::new()),
            bindings: Mutex::new(Vec::new()),
            warm: warm::Coordinator::default(),
        }))
    }

    /// Every plugin name loaded so far, with its state, sorted by name.
    pub fn registered(&self) -> Vec<(String, Registered)> {
        let mut list: Vec<_> = self
            .registry
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        list.sort_by(|a, b| a.0.cmp(&b.0));
        list
    }

    fn record(&self, name: &str, f: impl FnOnce(&mut Registered)) {
        f(self.registry.lock().unwrap_or_else(|e| e.into_inner()).entry(name.to_owned()).or_default());
    }

    /// Live bindings that serve the plugin `name`.
    /// The upstreams whose strategy is the plugin `name` now.
    pub fn users(&self, name: &str) -> Vec<String> {
        let mut users: Vec<String> = self.bindings_of(name).iter().map(|b| b.upstream().to_owned()).collect();
        users.sort();
        users.dedup();
        users
    }

    fn bindings_of(&self, name: &str) -> Vec<Arc<Binding>> {
        let mut all = self.bindings.lock().unwrap_or_else(|e| e.into_inner());
        all.retain(|w| w.strong_count() > 0);
        all.iter().filter_map(Weak::upgrade).filter(|b| b.plugin().name == name).collect()
    }

    /// Loads a new version of `name` from `path` and swaps it into every upstream that
    /// uses it, after checking that it instantiates and accepts each upstream's params.
    /// On any failure nothing changes and the error is recorded and returned. `Ok(None)`:
    /// the file is the version already serving. Blocking.
    pub fn reload(&self, name: &str, path: &Path) -> Result<Option<Arc<Plugin>>, PluginError> {
        let result = self.try_reload(name, path);
        match &result {
            Ok(Some(p)) => self.record(name, |r| {
                r.current = Some(p.summary());
                r.compiled = Arc::downgrade(p);
                r.last_error = None;
                r.file_deleted = false;
            }),
            Ok(None) => self.record(name, |r| r.file_deleted = false),
            Err((e, hash)) => self.record(name, |r| {
                r.last_error = Some(e.to_string());
                r.refused_hash = hash.clone();
            }),
        }
        result.map_err(|(e, _)| e)
    }

    fn try_reload(&self, name: &str, path: &Path) -> Result<Option<Arc<Plugin>>, (PluginError, Option<String>)> {
        let bytes = self.read(path).map_err(|e| (e, None))?;
        let hash = hex(&Sha256::digest(&bytes));
        let bindings = self.bindings_of(name);
        let known = self.registry.lock().unwrap_or_else(|e| e.into_inner()).get(name).cloned().unwrap_or_default();
        if known.current.is_some_and(|c| c.hash == hash) || known.refused_hash.as_ref() == Some(&hash) {
            return Ok(None);
        }
        let refuse = |e| (e, Some(hash.clone()));
        let plugin = self.compile(name, Origin::File(path.into()), &bytes).map_err(refuse)?;
        // All or nothing: every upstream must accept the new version before any swaps.
        for b in &bindings {
            b.check(&plugin).map_err(refuse)?;
        }
        // Warm the new version on every worker before it serves (instantiating a Python
        // or JavaScript plugin takes about a millisecond), then swap.
        for b in &bindings {
            b.stage(plugin.clone());
        }
        if !bindings.is_empty() {
            self.warm.warm_all(WARM_TIMEOUT);
        }
        for b in &bindings {
            b.swap(plugin.clone());
        }
        Ok(Some(plugin))
    }

    /// The file of `name` disappeared: keep serving the last good version.
    pub fn file_deleted(&self, name: &str) {
        self.record(name, |r| r.file_deleted = true);
    }

    /// Registers a worker thread: it must call [`Warmer::changed`] in a loop and warm
    /// its staged instances ([`Binding::warm_staged`]) each time.
    pub fn warmer(&self) -> Warmer {
        self.warm.warmer()
    }

    /// Whether the plugins folder should be watched for changes.
    pub fn watch_enabled(&self) -> bool {
        self.watch
    }

    /// The plugins folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Finds `name`: `DIR/NAME.wasm` if present, else the built-in; compiles it.
    /// Blocking (compilation): call it off the async workers.
    pub fn resolve(&self, name: &str) -> Result<Arc<Plugin>, PluginError> {
        if let Some(p) =
            self.registry.lock().unwrap_or_else(|e| e.into_inner()).get(name).and_then(|r| r.compiled.upgrade())
        {
            return Ok(p);
        }
        let path = self.dir.join(format!("{name}.wasm"));
        let result = if path.is_file() {
            self.load_file(name, &path)
        } else {
            match builtin::get(name) {
                Some(bytes) => self.compile(name, Origin::Builtin(name.to_owned()), bytes),
                None => Err(PluginError::NotFound {
                    name: name.to_owned(),
                    builtins: builtin::names().collect::<Vec<_>>().join(", "),
                    dir: self.dir.display().to_string(),
                }),
            }
        };
        match &result {
            Ok(p) => {
                if p.overrides_builtin() {
                    tracing::info!(plugin = name, origin = %p.origin, "the plugins folder's {name}.wasm overrides the built-in strategy `{name}`");
                }
                self.record(name, |r| {
                    r.current = Some(p.summary());
                    r.compiled = Arc::downgrade(p);
                })
            }
            Err(e) => self.record(name, |r| r.last_error = Some(e.to_string())),
        }
        result
    }

    /// Reads a plugin file, refusing one over the size limit before reading it.
    fn read(&self, path: &Path) -> Result<Vec<u8>, PluginError> {
        let read_error = |error| PluginError::Read { path: path.into(), error };
        let size = std::fs::metadata(path).map_err(read_error)?.len();
        if size > self.budget.file_bytes {
            return Err(PluginError::TooLarge {
                path: path.into(),
                size_mib: size as f64 / (1 << 20) as f64,
                limit_mib: self.budget.file_bytes >> 20,
            });
        }
        std::fs::read(path).map_err(read_error)
    }

    /// Reads and compiles a plugin file.
    pub fn load_file(&self, name: &str, path: &Path) -> Result<Arc<Plugin>, PluginError> {
        let bytes = self.read(path)?;
        self.compile(name, Origin::File(path.into()), &bytes)
    }

    /// Compiles and links `bytes` as the plugin `name`. Blocking.
    pub fn compile(&self, name: &str, origin: Origin, bytes: &[u8]) -> Result<Arc<Plugin>, PluginError> {
        let started = Instant::now();
        check_header(bytes).map_err(|reason| PluginError::NotComponent { origin: origin.clone(), reason })?;
        let hash = hex(&Sha256::digest(bytes));
        let cached = self.cache.as_ref().and_then(|c| c.load(&self.engine, &hash));
        let from_cache = cached.is_some();
        let component = match (cached, compile::compiler()) {
            (Some(c), _) => c,
            // Files (which may be large, or hostile) compile in a child process; the
            // built-ins are small and ours.
            (None, Some(exe)) if matches!(origin, Origin::File(_)) => self
                .compile_in_child(exe, &hash, bytes, &origin)
                .map_err(|reason| PluginError::NotComponent { origin: origin.clone(), reason })?,
            (None, _) => {
                let c = Component::new(&self.engine, bytes).map_err(|e| PluginError::NotComponent {
                    origin: origin.clone(),
                    reason: format!("not a valid component: {e:#}"),
                })?;
                if let Some(cache) = &self.cache {
                    if let Err(e) = cache.store(&hash, &c) {
                        tracing::debug!(dir = %cache.dir().display(), "could not cache the compiled plugin: {e}");
                    }
                    cache.evict();
                }
                c
            }
        };
        let wrong_world = |e: wasmtime::Error| PluginError::WrongWorld {
            origin: origin.clone(),
            reason: format!("{e:#}"),
            found: describe(&self.engine, &component),
        };
        let mut linker = self.linker.clone();
        let ty = component.component_type();
        let names = ty.imports(&self.engine).map(|(n, _)| n).chain(ty.exports(&self.engine).map(|(n, _)| n));
        if let Some(reason) = other_version(names) {
            return Err(wrong_world(wasmtime::Error::msg(reason)));
        }
        let imports: Vec<&str> = ty.imports(&self.engine).map(|(n, _)| n).collect();
        let unknown: Vec<&str> = imports
            .iter()
            .copied()
            .filter(|n| !n.starts_with("wasi:") && !n.starts_with("gateway:selector/"))
            .collect();
        if !unknown.is_empty() {
            return Err(wrong_world(wasmtime::Error::msg(format!(
                "it imports {}, which this gateway does not provide",
                unknown.join(", ")
            ))));
        }
        // A plugin built for wasm32-wasip2 imports WASI interfaces it never calls: those
        // are linked as traps. One that asks for the network or files is refused.
        let capabilities: Vec<&str> = imports
            .iter()
            .copied()
            .filter(|n| n.starts_with("wasi:") && !STUBBED_WASI.iter().any(|p| n.starts_with(p)))
            .collect();
        if !capabilities.is_empty() {
            return Err(PluginError::Capabilities { origin: origin.clone(), imports: capabilities.join(", ") });
        }
        linker.define_unknown_imports_as_traps(&component).map_err(wrong_world)?;
        let pre = linker.instantiate_pre(&component).map_err(wrong_world)?;
        let pre = SelectorPre::new(pre).map_err(wrong_world)?;
        Ok(Arc::new(Plugin {
            name: name.to_owned(),
            origin,
            hash,
            size: bytes.len(),
            loaded_at: SystemTime::now(),
            compile_time: started.elapsed(),
            from_cache,
            version: next_version(),
            pre,
        }))
    }

    /// Binds `plugin` to `upstream` with `params`: instantiates it once on this thread
    /// and runs `configure`, so bad params are refused here, before any traffic.
    pub fn bind(
        self: &Arc<Self>,
        upstream: &str,
        plugin: Arc<Plugin>,
        params: &serde_json::Value,
    ) -> Result<Arc<Binding>, PluginError> {
        self.bind_step(upstream, 0, plugin, params)
    }

    /// [`PluginHost::bind`] for step `step` of the upstream's strategy chain. Each step
    /// has host state (counters, key-value store) of its own, so two steps never share a
    /// round-robin counter; the first step's is the upstream's, kept when a single
    /// strategy becomes the head of a chain.
    pub fn bind_step(
        self: &Arc<Self>,
        upstream: &str,
        step: usize,
        plugin: Arc<Plugin>,
        params: &serde_json::Value,
    ) -> Result<Arc<Binding>, PluginError> {
        let key = if step == 0 { upstream.to_owned() } else { format!("{upstream}#{step}") };
        self.bind_in(upstream, &key, plugin, params)
    }

    /// [`PluginHost::bind`] with the host state (counters, key-value store) kept under
    /// `namespace`: a canary or shadow strategy has state of its own, apart from the
    /// live strategy's.
    pub fn bind_in(
        self: &Arc<Self>,
        upstream: &str,
        namespace: &str,
        plugin: Arc<Plugin>,
        params: &serde_json::Value,
    ) -> Result<Arc<Binding>, PluginError> {
        let namespace = self
            .namespaces
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(namespace.to_owned())
            .or_insert_with(|| Arc::new(Namespace::new(self.budget.state)))
            .clone();
        let binding = Binding::new(self.clone(), upstream, plugin.clone(), params.to_string(), namespace);
        binding.check(&plugin)?;
        let binding = Arc::new(binding);
        self.bindings.lock().unwrap_or_else(|e| e.into_inner()).push(Arc::downgrade(&binding));
        Ok(binding)
    }

    pub(crate) fn engine(&self) -> &Engine {
        &self.engine
    }

    pub(crate) fn budget(&self) -> Budget {
        self.budget
    }
}

/// WASI interfaces a toolchain imports without the plugin calling them (a Rust
/// `wasm32-wasip2` build imports `wasi:cli` and `wasi:io`): linked as traps. Any other
/// WASI import (sockets, filesystem, http, ...) refuses the plugin.
const STUBBED_WASI: [&str; 4] = ["wasi:cli/", "wasi:io/", "wasi:clocks/", "wasi:random/"];

impl PluginHost {
    /// Compiles `bytes` in a child process into the cache folder (or a private one when
    /// the cache is off) and loads the artifact.
    fn compile_in_child(&self, exe: &Path, hash: &str, bytes: &[u8], origin: &Origin) -> Result<Component, String> {
        let private;
        let cache = match &self.cache {
            Some(c) => c,
            None => {
                let dir = std::env::temp_dir().join(format!("gateway-compile-{}", std::process::id()));
                private = cache::Cache::new(dir, &self.engine, u64::MAX)
                    .map_err(|e| format!("no folder to compile into: {e}"))?;
                &private
            }
        };
        compile::in_child(exe, cache.dir(), bytes, &origin.to_string())?;
        let loaded = cache.load(&self.engine, hash);
        if self.cache.is_none() {
            cache.remove(hash);
        } else {
            cache.evict();
        }
        loaded.ok_or_else(|| "the compiler process wrote no usable artifact".to_owned())
    }
}

/// Names of the built-in strategies.
pub fn builtin_names() -> Vec<&'static str> {
    builtin::names().collect()
}

/// The component bytes of a built-in strategy.
pub fn builtin_bytes(name: &str) -> Option<&'static [u8]> {
    builtin::get(name)
}

/// Quick checks with the clearest messages, before handing bytes to wasmtime.
fn check_header(bytes: &[u8]) -> Result<(), String> {
    if bytes.len() < 8 || &bytes[..4] != b"\0asm" {
        return Err("not a WebAssembly file (it does not start with the `\\0asm` magic bytes)".into());
    }
    if bytes[4..8] == [1, 0, 0, 0] {
        return Err(
            "a core WebAssembly module, not a component: build with wit-bindgen and wrap it with `wasm-tools component new`"
                .into(),
        );
    }
    Ok(())
}

/// "imports [..] and exports [..]" of a component, for error messages.
fn describe(engine: &Engine, component: &Component) -> String {
    let ty = component.component_type();
    let list = |items: Vec<String>| {
        if items.is_empty() { "nothing".to_owned() } else { items.join(", ") }
    };
    let imports = list(ty.imports(engine).map(|(n, _)| n.to_owned()).collect());
    let exports = list(
        ty.exports(engine)
            .map(|(n, item)| match item.ty {
                ComponentItem::ComponentInstance(_) => n.to_owned(),
                _ => format!("{n} (not an interface)"),
            })
            .collect(),
    );
    format!("imports {imports} and exports {exports}")
}

/// Says so when a component speaks another version of our WIT package (e.g. built for
/// `gateway:selector@0.1.0`), which would otherwise only show as a missing export.
fn other_version<'a>(names: impl Iterator<Item = &'a str>) -> Option<String> {
    let ours = WORLD.rsplit_once('@').map(|(_, v)| v)?;
    let mut theirs: Vec<&str> = names
        .filter_map(|n| n.strip_prefix("gateway:selector/")?.rsplit_once('@').map(|(_, v)| v))
        .filter(|v| *v != ours)
        .collect();
    theirs.sort_unstable();
    theirs.dedup();
    (!theirs.is_empty()).then(|| {
        format!(
            "it was built for gateway:selector@{}, and this gateway speaks @{ours}; rebuild it against this \
             gateway's wit/ (`gateway plugin new` writes a project with it) or the gateway-sdk of this version",
            theirs.join(" and @")
        )
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_component_of_another_version_of_the_world_is_named_as_such() {
        let old = ["gateway:selector/types@0.1.0", "gateway:selector/host@0.1.0", "gateway:selector/policy@0.1.0"];
        let reason = other_version(old.into_iter()).expect("0.1.0 is not this gateway's version");
        assert!(
            reason.starts_with("it was built for gateway:selector@0.1.0, and this gateway speaks @0.3.0"),
            "{reason}"
        );
        let current = [IMPORT, EXPORT, "gateway:selector/types@0.3.0", "wasi:io/streams@0.2.6"];
        assert_eq!(other_version(current.into_iter()), None);
        assert_eq!(other_version(["other:thing/greeter@1.0.0"].into_iter()), None, "not ours: another message");
    }
}
