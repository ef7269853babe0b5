//! A plugin bound to one upstream, with one live instance per worker thread.

use super::bindings::{CurrentRequest, HostState, RequestRef, SelectorBindings, WitBackend, WitDecision};
use super::{Origin, Plugin, PluginError, PluginHost, shared::Namespace};
use crate::pool::PoolSnapshot;
use arc_swap::{ArcSwap, ArcSwapOption};
use std::cell::RefCell;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use wasmtime::component::Resource;
use wasmtime::{Store, StoreLimitsBuilder, Trap};

/// Where a plugin sent a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// Index into the pool snapshot the decision was made on.
    Backend(u32),
    /// Answer directly with this status and body.
    Reject(u16, String),
}

/// A plugin's validated answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Where the request goes.
    pub target: Target,
    /// Headers to add to the client's response.
    pub response_headers: Vec<(String, String)>,
}

/// What went wrong in a call; the instance involved has been discarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PickErrorKind {
    /// The call ran past its deadline.
    Timeout,
    /// The plugin trapped (panic, out of memory, bad memory access, ...).
    Trap,
    /// The answer named a backend that does not exist, or an invalid status.
    BadAnswer,
    /// A new instance could not be created or configured.
    Instantiate,
}

/// A failed call into a plugin.
#[derive(Debug, thiserror::Error)]
#[error("{kind:?}: {message}")]
pub struct PickError {
    /// The kind of failure.
    pub kind: PickErrorKind,
    /// Details for the log.
    pub message: String,
}

/// This thread's instances, indexed by binding id (ids are small and dense).
#[derive(Default)]
struct Slots(Vec<Option<Slot>>);

impl Slots {
    fn get(&self, id: u64) -> Option<&Slot> {
        self.0.get(id as usize)?.as_ref()
    }
    fn get_mut(&mut self, id: u64) -> Option<&mut Slot> {
        self.0.get_mut(id as usize)?.as_mut()
    }
    fn insert(&mut self, id: u64, slot: Slot) {
        let i = id as usize;
        if self.0.len() <= i {
            self.0.resize_with(i + 1, || None);
        }
        self.0[i] = Some(slot);
    }
    fn remove(&mut self, id: u64) {
        if let Some(s) = self.0.get_mut(id as usize) {
            *s = None;
        }
    }
}

/// One live instance, owned by one worker thread.
struct Slot {
    version: u64,
    generation: u64,
    store: Store<HostState>,
    bindings: SelectorBindings,
}

thread_local! {
    /// This thread's instances, by binding id.
    static SLOTS: RefCell<Slots> = RefCell::new(Slots::default());
    /// Instances of a staged (about to be swapped in) version, built ahead of the swap.
    static STAGED: RefCell<HashMap<u64, Slot>> = RefCell::new(HashMap::new());
}

fn next_binding_id() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Relaxed)
}

/// A plugin serving one upstream with its params.
pub struct Binding {
    id: u64,
    host: Arc<PluginHost>,
    upstream: Arc<str>,
    plugin: ArcSwap<Plugin>,
    /// A version that passed its checks and is being warmed on every worker.
    next: ArcSwapOption<Plugin>,
    params: String,
    namespace: Arc<Namespace>,
    /// Calls that failed (trap, timeout, bad answer) since start.
    failures: AtomicU64,
}

impl std::fmt::Debug for Binding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Binding").field("upstream", &self.upstream).field("plugin", &self.plugin.load().name).finish()
    }
}

impl Binding {
    pub(super) fn new(
        host: Arc<PluginHost>,
        upstream: &str,
        plugin: Arc<Plugin>,
        params: String,
        namespace: Arc<Namespace>,
    ) -> Self {
        Binding {
            id: next_binding_id(),
            host,
            upstream: upstream.into(),
            plugin: ArcSwap::new(plugin),
            next: ArcSwapOption::empty(),
            params,
            namespace,
            failures: AtomicU64::new(0),
        }
    }

    /// The plugin currently serving.
    pub fn plugin(&self) -> Arc<Plugin> {
        self.plugin.load_full()
    }

    /// The params, as JSON.
    pub fn params(&self) -> &str {
        &self.params
    }

    /// Failed calls since start.
    pub fn failures(&self) -> u64 {
        self.failures.load(Relaxed)
    }

    /// The upstream it serves.
    pub fn upstream(&self) -> &str {
        &self.upstream
    }

    /// Host-held state of this upstream's plugin.
    pub fn namespace(&self) -> &Arc<Namespace> {
        &self.namespace
    }

    /// Instantiates `plugin` on a scratch store and runs `configure` with this
    /// binding's params: what must succeed before `plugin` may serve.
    pub(super) fn check(&self, plugin: &Plugin) -> Result<(), PluginError> {
        self.instantiate(plugin).map(drop).map_err(|e| match e {
            SetupError::Configure(message) => {
                PluginError::Configure { origin: plugin.origin.clone(), params: self.params.clone(), message }
            }
            SetupError::Call(during, reason) => PluginError::Setup { origin: plugin.origin.clone(), during, reason },
        })
    }

    /// Makes `plugin` the version that serves. In-flight calls finish on the old one;
    /// each worker's instance is replaced on its next use.
    pub(super) fn swap(&self, plugin: Arc<Plugin>) {
        self.plugin.store(plugin);
        self.next.store(None);
    }

    /// Announces `plugin` as the next version, so workers can warm it before the swap.
    pub(super) fn stage(&self, plugin: Arc<Plugin>) {
        self.next.store(Some(plugin));
    }

    /// Builds this thread's instance of the staged version (instantiate, `configure`,
    /// `pool-changed`), so that the swap costs requests nothing. Call between requests.
    pub fn warm_staged(&self, pool: &Arc<PoolSnapshot>) {
        let Some(next) = self.next.load_full() else { return };
        let Ok(mut slot) = self.instantiate(&next) else { return };
        if self.refresh(&mut slot, pool).is_ok() {
            STAGED.with(|s| s.borrow_mut().insert(self.id, slot));
        }
    }

    /// Creates this thread's instance now (and pushes `pool`), so the first request
    /// does not pay for it.
    pub fn warm(&self, pool: &Arc<PoolSnapshot>) -> Result<(), PickError> {
        self.with_slot(pool, |_| Ok(()))
    }

    /// Asks the plugin where `parts` should go. `pool` is the snapshot the caller uses to
    /// map the answer back to a backend. `parts` is lent to the plugin and restored.
    pub fn pick(
        &self,
        parts: &mut http::request::Parts,
        client_ip: IpAddr,
        pool: &Arc<PoolSnapshot>,
        exclude: &[u32],
    ) -> Result<Decision, PickError> {
        let ticks = self.host.budget().pick_ticks;
        self.with_slot(pool, |slot| {
            slot.store.set_epoch_deadline(ticks);
            let taken = std::mem::replace(parts, blank_parts());
            slot.store.data_mut().request = Some(CurrentRequest::new(taken, client_ip, exclude));
            let result = slot.bindings.gateway_selector_policy().call_pick(
                &mut slot.store,
                Resource::<RequestRef>::new_borrow(0),
                exclude.len() as u32,
            );
            let Some(req) = slot.store.data_mut().request.take() else {
                unreachable!("only `pick` takes the request out of the store");
            };
            *parts = req.parts;
            let target = match result.map_err(call_error)? {
                WitDecision::Backend(i) if (i as usize) < pool.members.len() => Target::Backend(i),
                WitDecision::Backend(i) => {
                    return Err(PickError {
                        kind: PickErrorKind::BadAnswer,
                        message: format!("picked backend {i} but the pool has {}", pool.members.len()),
                    });
                }
                WitDecision::Reject(status) if (100..=599).contains(&status) => {
                    Target::Reject(status, req.reject_body.unwrap_or_default())
                }
                WitDecision::Reject(status) => {
                    return Err(PickError {
                        kind: PickErrorKind::BadAnswer,
                        message: format!("rejected with invalid status {status}"),
                    });
                }
            };
            Ok(Decision { target, response_headers: req.response_headers })
        })
    }

    /// Runs `f` on this thread's instance, creating or refreshing it first; discards the
    /// instance if anything fails.
    fn with_slot<R>(
        &self,
        pool: &Arc<PoolSnapshot>,
        f: impl FnOnce(&mut Slot) -> Result<R, PickError>,
    ) -> Result<R, PickError> {
        SLOTS.with(|slots| {
            let mut slots = slots.borrow_mut();
            let plugin = self.plugin.load();
            if slots.get(self.id).is_none_or(|s| s.version != plugin.version) {
                let staged = STAGED.with(|s| s.borrow_mut().remove(&self.id)).filter(|s| s.version == plugin.version);
                let slot = match staged {
                    Some(slot) => Ok(slot),
                    None => self.instantiate(&plugin),
                }
                .map_err(|e| PickError {
                    kind: PickErrorKind::Instantiate,
                    message: match e {
                        SetupError::Configure(m) => format!("configure refused its params: {m}"),
                        SetupError::Call(during, reason) => format!("{during}: {reason}"),
                    },
                })?;
                slots.insert(self.id, slot);
            }
            let slot = slots.get_mut(self.id).expect("inserted above");
            let result = self.refresh(slot, pool).and_then(|()| f(slot));
            if result.is_err() {
                slots.remove(self.id);
                self.failures.fetch_add(1, Relaxed);
            }
            result
        })
    }

    /// Pushes `pool` to the instance if it has an older view.
    fn refresh(&self, slot: &mut Slot, pool: &Arc<PoolSnapshot>) -> Result<(), PickError> {
        if slot.generation == pool.generation {
            return Ok(());
        }
        let backends: Vec<WitBackend> = pool
            .members
            .iter()
            .map(|m| WitBackend {
                id: m.entry.id.clone(),
                address: m.entry.addr.to_string(),
                weight: m.entry.weight,
                zone: m.entry.zone.clone(),
                labels: m.entry.labels.clone(),
                healthy: m.status.healthy(),
            })
            .collect();
        slot.store.set_epoch_deadline(self.host.budget().setup_ticks);
        slot.bindings
            .gateway_selector_policy()
            .call_pool_changed(&mut slot.store, pool.generation, &backends)
            .map_err(call_error)?;
        slot.store.data_mut().pool = Some(pool.clone());
        slot.generation = pool.generation;
        Ok(())
    }

    fn instantiate(&self, plugin: &Plugin) -> Result<Slot, SetupError> {
        let budget = self.host.budget();
        let limits = StoreLimitsBuilder::new().memory_size(budget.memory_bytes).build();
        let state = HostState::new(limits, self.namespace.clone(), plugin.name.as_str().into(), self.upstream.clone());
        let mut store = Store::new(self.host.engine(), state);
        store.limiter(|s| &mut s.limits);
        store.set_epoch_deadline(budget.setup_ticks);
        let bindings =
            plugin.pre.instantiate(&mut store).map_err(|e| SetupError::Call("instantiate", format!("{e:#}")))?;
        bindings
            .gateway_selector_policy()
            .call_configure(&mut store, &self.params)
            .map_err(|e| SetupError::Call("configure", describe_error(&e)))?
            .map_err(SetupError::Configure)?;
        Ok(Slot { version: plugin.version, generation: 0, store, bindings })
    }

    /// Where the serving plugin came from, for logs.
    pub fn origin(&self) -> Origin {
        self.plugin.load().origin.clone()
    }
}

enum SetupError {
    Configure(String),
    Call(&'static str, String),
}

fn blank_parts() -> http::request::Parts {
    http::Request::new(()).into_parts().0
}

fn call_error(e: wasmtime::Error) -> PickError {
    let kind = match e.downcast_ref::<Trap>() {
        Some(Trap::Interrupt) => PickErrorKind::Timeout,
        _ => PickErrorKind::Trap,
    };
    PickError { kind, message: describe_error(&e) }
}

fn describe_error(e: &wasmtime::Error) -> String {
    let mut text = match e.downcast_ref::<Trap>() {
        Some(Trap::Interrupt) => return "ran past its deadline and was stopped".to_owned(),
        Some(trap) => trap.to_string(),
        None => e.root_cause().to_string(),
    };
    // Name the guest function it happened in, when the plugin kept its symbols.
    if let Some(frame) = e.downcast_ref::<wasmtime::WasmBacktrace>().and_then(|bt| bt.frames().first())
        && let Some(func) = frame.func_name()
    {
        text.push_str(&format!(" (in {func})"));
    }
    text
}
