//! The Wasm plugin host: the only module that touches wasmtime types.
//!
//! One [`wasmtime::Engine`] per process. A [`Plugin`] is a compiled component plus its
//! `InstancePre`; a [`Binding`] is a plugin serving one upstream with its params, and
//! keeps one live instance per worker thread (never one per request). Every call runs
//! under an epoch deadline and a memory limit; a trap, timeout or bad answer discards
//! that thread's instance and is reported to the caller, which falls back.

mod bindings;
mod builtin;
mod instance;
mod shared;

use crate::config;
use bindings::{HostState, SelectorPre};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use wasmtime::component::{Component, Linker, types::ComponentItem};
use wasmtime::{Engine, OptLevel};

pub use instance::{Binding, Decision, PickError, PickErrorKind, Target};
pub use shared::Namespace;

/// The world a plugin must implement, as printed in errors.
pub const WORLD: &str = "gateway:selector/selector@0.1.0";
const IMPORT: &str = "gateway:selector/host@0.1.0";
const EXPORT: &str = "gateway:selector/policy@0.1.0";
/// Epoch tick; deadlines are whole ticks.
const TICK: Duration = Duration::from_millis(1);

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
    #[error("{path}: cannot read: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
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
    #[error("{origin}: not a strategy for this gateway: {reason}. Expected world {WORLD} (imports {IMPORT}, exports {EXPORT}); this component {found}")]
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
    /// How long compiling and linking took.
    pub compile_time: Duration,
    /// Unique per load: instances of an older load are replaced on their next use.
    pub(crate) version: u64,
    pub(crate) pre: SelectorPre<HostState>,
}

impl fmt::Debug for Plugin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Plugin").field("name", &self.name).field("origin", &self.origin).field("hash", &self.hash).finish()
    }
}

/// Call budgets for plugin instances.
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    /// Ticks a `pick` may run.
    pub pick_ticks: u64,
    /// Ticks `configure` / `pool-changed` / instantiation may run.
    pub setup_ticks: u64,
    /// Bytes of linear memory per instance.
    pub memory_bytes: usize,
}

impl Budget {
    /// From the config's durations and MiB.
    pub fn from_config(cfg: &config::Plugins) -> Self {
        let ticks = |d: Duration| (d.as_micros() / TICK.as_micros()).max(1) as u64 + 1;
        Budget {
            pick_ticks: ticks(cfg.deadline),
            setup_ticks: ticks(cfg.setup_deadline),
            memory_bytes: cfg.memory_limit_mib as usize * 1024 * 1024,
        }
    }
}

/// The process's plugin runtime.
pub struct PluginHost {
    engine: Engine,
    linker: Linker<HostState>,
    budget: Budget,
    dir: PathBuf,
    namespaces: Mutex<HashMap<String, Arc<Namespace>>>,
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
        let mut wasm = wasmtime::Config::new();
        // Deadlines: a ticker thread bumps the epoch every TICK; cheaper than fuel.
        wasm.epoch_interruption(true);
        wasm.cranelift_opt_level(OptLevel::Speed);
        wasm.wasm_component_model(true);
        let engine = Engine::new(&wasm)?;
        let mut linker = Linker::new(&engine);
        HostState::add_to_linker(&mut linker)?;

        let weak = engine.weak();
        std::thread::Builder::new().name("wasm-epoch".into()).spawn(move || {
            loop {
                std::thread::sleep(TICK);
                match weak.upgrade() {
                    Some(engine) => engine.increment_epoch(),
                    None => break,
                }
            }
        })?;

        Ok(Arc::new(PluginHost {
            engine,
            linker,
            budget: Budget::from_config(cfg),
            dir: cfg.dir.clone(),
            namespaces: Mutex::new(HashMap::new()),
        }))
    }

    /// The plugins folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Finds `name`: `DIR/NAME.wasm` if present, else the built-in; compiles it.
    /// Blocking (compilation): call it off the async workers.
    pub fn resolve(&self, name: &str) -> Result<Arc<Plugin>, PluginError> {
        let path = self.dir.join(format!("{name}.wasm"));
        if path.is_file() {
            return self.load_file(name, &path);
        }
        match builtin::get(name) {
            Some(bytes) => self.compile(name, Origin::Builtin(name.to_owned()), bytes),
            None => Err(PluginError::NotFound {
                name: name.to_owned(),
                builtins: builtin::names().collect::<Vec<_>>().join(", "),
                dir: self.dir.display().to_string(),
            }),
        }
    }

    /// Reads and compiles a plugin file.
    pub fn load_file(&self, name: &str, path: &Path) -> Result<Arc<Plugin>, PluginError> {
        let bytes = std::fs::read(path).map_err(|source| PluginError::Read { path: path.into(), source })?;
        self.compile(name, Origin::File(path.into()), &bytes)
    }

    /// Compiles and links `bytes` as the plugin `name`. Blocking.
    pub fn compile(&self, name: &str, origin: Origin, bytes: &[u8]) -> Result<Arc<Plugin>, PluginError> {
        let started = Instant::now();
        check_header(bytes).map_err(|reason| PluginError::NotComponent { origin: origin.clone(), reason })?;
        let component = Component::new(&self.engine, bytes).map_err(|e| PluginError::NotComponent {
            origin: origin.clone(),
            reason: format!("not a valid component: {e:#}"),
        })?;
        let wrong_world = |e: wasmtime::Error| PluginError::WrongWorld {
            origin: origin.clone(),
            reason: format!("{e:#}"),
            found: describe(&self.engine, &component),
        };
        let mut linker = self.linker.clone();
        // A plugin built for wasm32-wasip2 imports WASI interfaces it never calls: link
        // them as traps. Plugins get no WASI capabilities.
        let only_wasi_unknown = component
            .component_type()
            .imports(&self.engine)
            .all(|(name, _)| name.starts_with("wasi:") || name.starts_with("gateway:selector/"));
        if !only_wasi_unknown {
            let unknown: Vec<_> = component
                .component_type()
                .imports(&self.engine)
                .map(|(n, _)| n.to_owned())
                .filter(|n| !n.starts_with("wasi:") && !n.starts_with("gateway:selector/"))
                .collect();
            return Err(wrong_world(wasmtime::Error::msg(format!("it imports {}, which this gateway does not provide", unknown.join(", ")))));
        }
        linker.define_unknown_imports_as_traps(&component).map_err(wrong_world)?;
        let pre = linker.instantiate_pre(&component).map_err(wrong_world)?;
        let pre = SelectorPre::new(pre).map_err(wrong_world)?;
        Ok(Arc::new(Plugin {
            name: name.to_owned(),
            origin,
            hash: hex(&Sha256::digest(bytes)),
            size: bytes.len(),
            loaded_at: SystemTime::now(),
            compile_time: started.elapsed(),
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
        let namespace =
            self.namespaces.lock().unwrap_or_else(|e| e.into_inner()).entry(upstream.to_owned()).or_default().clone();
        let binding = Binding::new(self.clone(), upstream, plugin, params.to_string(), namespace);
        binding.validate()?;
        Ok(Arc::new(binding))
    }

    pub(crate) fn engine(&self) -> &Engine {
        &self.engine
    }

    pub(crate) fn budget(&self) -> Budget {
        self.budget
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
    let list = |items: Vec<String>| if items.is_empty() { "nothing".to_owned() } else { items.join(", ") };
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

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
