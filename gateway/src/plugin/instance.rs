//! A plugin bound to one upstream, with one live instance per worker thread.

use super::bindings::{
    AnswerTooLarge, CurrentRequest, HostState, MAX_REASON_BYTES, RequestRef, SelectorBindings, StoreLimits, WitBackend,
    WitDecision, cut,
};
use super::guest_log::LogLimiter;
use super::quarantine::{Quarantine, Transition};
use super::{Origin, Plugin, PluginError, PluginHost, setup, shared::Namespace};
use crate::pool::PoolSnapshot;
use arc_swap::{ArcSwap, ArcSwapOption};
use std::cell::RefCell;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};
use wasmtime::component::Resource;
use wasmtime::{Store, Trap};

/// Where a plugin sent a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// Index into the pool snapshot the decision was made on.
    Backend(u32),
    /// Answer directly with this status and body.
    Reject(u16, String),
    /// No opinion: the next step of the chain decides (the fallback after the last).
    Pass,
}

/// A plugin's validated answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Where the request goes.
    pub target: Target,
    /// Headers to add to the client's response.
    pub response_headers: Vec<(String, String)>,
    /// Why, when the plugin said (`request.set-reason`).
    pub reason: Option<super::Reason>,
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
    /// The plugin is quarantined (its calls kept failing): not called at all.
    Quarantined,
    /// This worker's instance is being built (or brought up to date) off the request
    /// path; not a failure of the plugin.
    NotReady,
}

impl PickErrorKind {
    /// Whether this is a failure of the plugin (counted, and towards quarantine).
    pub fn is_failure(self) -> bool {
        !matches!(self, PickErrorKind::Quarantined | PickErrorKind::NotReady)
    }
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
    /// On a worker serving requests: where instances built off the request path arrive.
    /// None (start-up, tools, benchmarks): instances are built in place.
    static MAINTAINER: RefCell<Option<Maintainer>> = const { RefCell::new(None) };
}

/// A worker's channel for instances built on the setup thread.
struct Maintainer {
    tx: tokio::sync::mpsc::UnboundedSender<Built>,
    /// Bindings with a build under way for this worker, and when it was asked for.
    pending: HashMap<u64, Instant>,
    /// Woken whenever an instance is put in place on this worker.
    installed: Arc<tokio::sync::Notify>,
}

/// An instance built for a worker, or why it could not be.
struct Built {
    binding: Arc<Binding>,
    /// The call that failed and why.
    result: Result<Slot, (&'static str, String)>,
}

/// From now on, this worker thread builds plugin instances off its request path: a
/// missing or outdated instance is asked for from the setup thread, and requests are
/// served meanwhile by the instance's previous pool view or the fallback. Returns the
/// task that puts finished instances in place: spawn it on the worker's event loop.
pub fn maintain_instances() -> impl std::future::Future<Output = ()> {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Built>();
    let installed = Arc::new(tokio::sync::Notify::new());
    MAINTAINER
        .with(|m| *m.borrow_mut() = Some(Maintainer { tx, pending: HashMap::new(), installed: installed.clone() }));
    async move {
        while let Some(built) = rx.recv().await {
            MAINTAINER.with(|m| {
                if let Some(m) = m.borrow_mut().as_mut() {
                    m.pending.remove(&built.binding.id);
                }
            });
            built.binding.install(built.result);
            installed.notify_waiters();
        }
    }
}

fn not_ready(why: &str) -> PickError {
    PickError { kind: PickErrorKind::NotReady, message: why.to_owned() }
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
    /// Instances that could not be built off the request path since start.
    setup_failures: AtomicU64,
    /// Failures in a row put the plugin in quarantine (the fallback serves).
    quarantine: Quarantine,
    /// The last pool view pushed to an instance: what a new version is checked against.
    last_pool: ArcSwapOption<PoolSnapshot>,
    /// The rate limit of the plugin's log lines, shared by all its instances.
    log_limit: Arc<LogLimiter>,
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
            upstream: upstream.into(),
            plugin: ArcSwap::new(plugin),
            next: ArcSwapOption::empty(),
            params,
            namespace,
            failures: AtomicU64::new(0),
            setup_failures: AtomicU64::new(0),
            quarantine: Quarantine::new(host.budget().quarantine),
            last_pool: ArcSwapOption::empty(),
            log_limit: Arc::default(),
            host,
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

    /// Instances that could not be built off the request path (instantiate,
    /// `configure` or `pool-changed` failed) since start.
    pub fn setup_failures(&self) -> u64 {
        self.setup_failures.load(Relaxed)
    }

    /// How much longer the plugin is quarantined (none: it serves).
    pub fn quarantined_for(&self) -> Option<Duration> {
        self.quarantine.remaining()
    }

    /// Quarantines since start.
    pub fn quarantines(&self) -> u64 {
        self.quarantine.count()
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
    /// Instantiates `plugin` on a scratch store, runs `configure` with this binding's
    /// params and `pool-changed` with the upstream's current pool (when it has had one),
    /// each under the setup deadline: what must succeed before `plugin` may serve.
    pub(super) fn check(&self, plugin: &Plugin) -> Result<(), PluginError> {
        let mut slot = self.instantiate(plugin).map_err(|e| match e {
            SetupError::Configure(message) => {
                PluginError::Configure { origin: plugin.origin.clone(), params: self.params.clone(), message }
            }
            SetupError::Call(during, reason) => PluginError::Setup { origin: plugin.origin.clone(), during, reason },
        })?;
        if let Some(pool) = self.last_pool.load_full() {
            self.refresh(&mut slot, &pool).map_err(|e| PluginError::Setup {
                origin: plugin.origin.clone(),
                during: "pool-changed",
                reason: e.message,
            })?;
        }
        Ok(())
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
        let plugin = self.plugin.load_full();
        let mut slot = self.instantiate(&plugin).map_err(instantiate_error)?;
        self.refresh(&mut slot, pool)?;
        SLOTS.with(|s| s.borrow_mut().insert(self.id, slot));
        Ok(())
    }

    /// Asks the plugin where `parts` should go. `pool` is the snapshot the caller uses to
    /// map the answer back to a backend. `parts` is lent to the plugin and restored.
    ///
    /// On a worker, never builds an instance or runs `pool-changed`: a missing instance
    /// is [`PickErrorKind::NotReady`] (built off the request path meanwhile), and one
    /// with an older pool view answers from that view, mapped onto `pool`.
    pub fn pick(
        self: &Arc<Self>,
        parts: &mut http::request::Parts,
        client_ip: IpAddr,
        pool: &Arc<PoolSnapshot>,
        exclude: &[u32],
    ) -> Result<Decision, PickError> {
        if !self.quarantine.admits() {
            return Err(PickError { kind: PickErrorKind::Quarantined, message: "quarantined".into() });
        }
        let ticks = self.host.budget().pick_ticks;
        SLOTS.with(|slots| {
            let mut slots = slots.borrow_mut();
            let mut from_stale_view = false;
            let result = self.ready_slot(&mut slots, pool).and_then(|(slot, stale)| {
                from_stale_view = stale;
                // An instance behind the pool answers from the view it has, mapped back.
                let old_view = match stale {
                    false => None,
                    true if !exclude.is_empty() => return Err(not_ready("a retry while the pool view is updated")),
                    true => slot.store.data().pool.clone(),
                };
                let members = old_view.as_ref().map_or(pool.members.len(), |v| v.members.len());
                slot.store.set_epoch_deadline(ticks);
                let taken = std::mem::replace(parts, blank_parts());
                let state = slot.store.data_mut();
                state.begin_call();
                state.request = Some(CurrentRequest::new(taken, client_ip, exclude));
                let result = slot.bindings.gateway_selector_policy().call_pick(
                    &mut slot.store,
                    Resource::<RequestRef>::new_borrow(0),
                    exclude.len() as u32,
                );
                let Some(req) = slot.store.data_mut().request.take() else {
                    unreachable!("only `pick` takes the request out of the store");
                };
                *parts = req.parts;
                let target = match result.map_err(|e| call_error("pick", e, slot.store.data_mut()))? {
                    WitDecision::Backend(i) if (i as usize) < members => match &old_view {
                        None => Target::Backend(i),
                        Some(old) => {
                            let entry = &old.members[i as usize].entry;
                            match pool.members.iter().position(|m| Arc::ptr_eq(&m.entry, entry) && m.status.healthy()) {
                                Some(j) => Target::Backend(j as u32),
                                None => return Err(not_ready("picked a backend that has left or gone down since")),
                            }
                        }
                    },
                    WitDecision::Backend(i) => {
                        return Err(PickError {
                            kind: PickErrorKind::BadAnswer,
                            message: format!("picked backend {i} but the pool has {members}"),
                        });
                    }
                    // A view with no healthy backend answers "none left" (503) for a
                    // pool that has some now: not the plugin's decision on this pool.
                    WitDecision::Reject(_) if old_view.as_ref().is_some_and(|v| v.healthy_count == 0) => {
                        return Err(not_ready("the instance's pool view had no healthy backend and is being updated"));
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
                    WitDecision::Pass => Target::Pass,
                };
                Ok(Decision { target, response_headers: req.response_headers, reason: req.reason })
            });
            match &result {
                // An answer from an older view says nothing about the plugin's
                // `pool-changed`, which may be what keeps failing.
                Ok(_) if from_stale_view => {}
                Ok(_) => self.note(self.quarantine.succeeded()),
                Err(e) if e.kind.is_failure() => {
                    slots.remove(self.id);
                    self.failures.fetch_add(1, Relaxed);
                    self.note(self.quarantine.failed());
                }
                Err(_) => {}
            }
            result
        })
    }

    /// On a worker whose instance is missing or behind `pool`: asks for a new one (built
    /// off the request path) and returns a wait for it, bounded so that a pool change
    /// delays a worker's requests by at most the `pick` deadline, once. None when the
    /// instance is current (the hot path: one thread-local lookup) or there is nothing
    /// worth waiting for.
    pub fn catch_up(self: &Arc<Self>, pool: &Arc<PoolSnapshot>) -> Option<impl Future<Output = ()> + Send + use<>> {
        let current = SLOTS.with(|s| s.borrow().get(self.id).is_some_and(|s| s.generation == pool.generation));
        if current || !self.quarantine.admits() || !self.request_build(pool) {
            return None;
        }
        let wait = self.host.budget().pick_deadline;
        let (installed, asked) = MAINTAINER.with(|m| {
            let m = m.borrow();
            let m = m.as_ref().expect("request_build found a maintainer");
            (m.installed.clone(), m.pending.get(&self.id).copied())
        });
        let left = wait.checked_sub(asked?.elapsed())?;
        Some(async move {
            let _ = tokio::time::timeout(left, installed.notified()).await;
        })
    }

    /// This thread's instance of the serving version, and whether its pool view is
    /// behind `pool`. On a worker, a missing or outdated instance is asked for from the
    /// setup thread instead of being built here.
    fn ready_slot<'s>(
        self: &Arc<Self>,
        slots: &'s mut Slots,
        pool: &Arc<PoolSnapshot>,
    ) -> Result<(&'s mut Slot, bool), PickError> {
        let plugin = self.plugin.load();
        if slots.get(self.id).is_none_or(|s| s.version != plugin.version) {
            let staged = STAGED.with(|s| s.borrow_mut().remove(&self.id)).filter(|s| s.version == plugin.version);
            let slot = match staged {
                Some(slot) => slot,
                None if self.request_build(pool) => return Err(not_ready("this worker's instance is being built")),
                None => self.instantiate(&plugin).map_err(instantiate_error)?,
            };
            slots.insert(self.id, slot);
        }
        let slot = slots.get_mut(self.id).expect("inserted above");
        if slot.generation == pool.generation {
            return Ok((slot, false));
        }
        if self.request_build(pool) {
            if slot.generation == 0 {
                return Err(not_ready("this worker's instance has no pool view yet"));
            }
            return Ok((slot, true));
        }
        self.refresh(slot, pool)?;
        Ok((slot, false))
    }

    /// On a worker: asks the setup thread for an instance of the serving version with
    /// `pool` pushed (once per binding until it arrives). False when this thread has no
    /// maintainer (start-up, tools): the caller builds in place.
    fn request_build(self: &Arc<Self>, pool: &Arc<PoolSnapshot>) -> bool {
        MAINTAINER.with(|m| {
            let mut m = m.borrow_mut();
            let Some(m) = m.as_mut() else { return false };
            if let std::collections::hash_map::Entry::Vacant(slot) = m.pending.entry(self.id) {
                slot.insert(Instant::now());
                let (tx, binding, pool) = (m.tx.clone(), self.clone(), pool.clone());
                setup::run(move || {
                    let plugin = binding.plugin.load_full();
                    let result = binding
                        .instantiate(&plugin)
                        .map_err(|e| match e {
                            SetupError::Configure(m) => ("configure", format!("refused its params: {m}")),
                            SetupError::Call(during, reason) => (during, reason),
                        })
                        .and_then(|mut slot| {
                            binding.refresh(&mut slot, &pool).map(|()| slot).map_err(|e| ("pool-changed", e.message))
                        });
                    let _ = tx.send(Built { binding, result });
                });
            }
            true
        })
    }

    /// Puts an instance built on the setup thread in place on this worker (unless a
    /// newer version or view got there first), or counts why it could not be built.
    fn install(&self, result: Result<Slot, (&'static str, String)>) {
        match result {
            Ok(slot) if slot.version == self.plugin.load().version => SLOTS.with(|slots| {
                let mut slots = slots.borrow_mut();
                if slots.get(self.id).is_none_or(|s| s.version != slot.version || s.generation < slot.generation) {
                    slots.insert(self.id, slot);
                }
            }),
            Ok(_) => {}
            Err((during, reason)) => {
                self.failures.fetch_add(1, Relaxed);
                self.setup_failures.fetch_add(1, Relaxed);
                let plugin = self.plugin.load();
                tracing::warn!(
                    upstream = %self.upstream,
                    plugin = %plugin.name,
                    origin = %plugin.origin,
                    call = during,
                    "building a plugin instance failed: {reason}; the fallback round robin serves this worker meanwhile"
                );
                self.note(self.quarantine.failed());
            }
        }
    }

    /// Logs a quarantine transition (once: only the call that made it reports it).
    fn note(&self, transition: Option<Transition>) {
        let Some(transition) = transition else { return };
        let plugin = self.plugin.load();
        match transition {
            Transition::Quarantined { failures, length } => tracing::warn!(
                upstream = %self.upstream,
                plugin = %plugin.name,
                origin = %plugin.origin,
                failures,
                backoff = ?length,
                "plugin quarantined: {failures} calls in a row failed; the fallback round robin serves this upstream for {length:?}, then the plugin is tried again"
            ),
            Transition::Extended { length } => tracing::warn!(
                upstream = %self.upstream,
                plugin = %plugin.name,
                origin = %plugin.origin,
                backoff = ?length,
                "plugin still failing after its quarantine: quarantined again for {length:?}"
            ),
            Transition::Recovered => tracing::info!(
                upstream = %self.upstream,
                plugin = %plugin.name,
                origin = %plugin.origin,
                "plugin recovered from quarantine: it serves this upstream again"
            ),
        }
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
                weight: m.weight,
                zone: m.entry.zone.clone(),
                labels: m.entry.labels.clone(),
                healthy: m.status.healthy(),
            })
            .collect();
        slot.store.set_epoch_deadline(self.host.budget().setup_ticks);
        slot.store.data_mut().begin_call();
        slot.bindings
            .gateway_selector_policy()
            .call_pool_changed(&mut slot.store, pool.generation, &backends)
            .map_err(|e| call_error("pool-changed", e, slot.store.data_mut()))?;
        slot.store.data_mut().pool = Some(pool.clone());
        slot.generation = pool.generation;
        if self.last_pool.load().as_ref().is_none_or(|p| p.generation < pool.generation) {
            self.last_pool.store(Some(pool.clone()));
        }
        Ok(())
    }

    fn instantiate(&self, plugin: &Plugin) -> Result<Slot, SetupError> {
        let budget = self.host.budget();
        let limits = StoreLimits { memory_bytes: budget.memory_bytes };
        let state = HostState::new(
            limits,
            self.namespace.clone(),
            plugin.name.as_str().into(),
            self.upstream.clone(),
            self.log_limit.clone(),
        );
        let mut store = Store::new(self.host.engine(), state);
        store.limiter(|s| &mut s.limits);
        store.set_epoch_deadline(budget.setup_ticks);
        let bindings =
            plugin.pre.instantiate(&mut store).map_err(|e| SetupError::Call("instantiate", format!("{e:#}")))?;
        bindings
            .gateway_selector_policy()
            .call_configure(&mut store, &self.params)
            .map_err(|e| {
                SetupError::Call("configure", describe_error(&e, guest_said(&e, store.data_mut()).as_deref()))
            })?
            // The plugin's own text, bounded: it ends up in logs and the admin API.
            .map_err(|m| SetupError::Configure(cut(&m, MAX_REASON_BYTES).into_owned()))?;
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

/// A failed call into the plugin, the message naming the call (`pick`, `pool-changed`)
/// and, for a trap, what the plugin said went wrong (`state`'s last error log).
fn call_error(call: &str, e: wasmtime::Error, state: &mut HostState) -> PickError {
    let said = guest_said(&e, state);
    PickError { kind: error_kind(&e), message: format!("{call}: {}", describe_error(&e, said.as_deref())) }
}

fn error_kind(e: &wasmtime::Error) -> PickErrorKind {
    match e.downcast_ref::<Trap>() {
        Some(Trap::Interrupt) => PickErrorKind::Timeout,
        _ if e.downcast_ref::<AnswerTooLarge>().is_some() => PickErrorKind::BadAnswer,
        _ => PickErrorKind::Trap,
    }
}

/// For a trap: the text of the plugin's last error-level `log` in the call that failed
/// (a Python traceback, a Rust panic message, a JavaScript exception), if it wrote one.
/// None for a timeout (whatever it logged before it was stopped is not why) or a bad
/// answer (the gateway's own check).
fn guest_said(e: &wasmtime::Error, state: &mut HostState) -> Option<String> {
    let said = state.guest_error.take();
    if error_kind(e) == PickErrorKind::Trap { said } else { None }
}

fn instantiate_error(e: SetupError) -> PickError {
    PickError {
        kind: PickErrorKind::Instantiate,
        message: match e {
            SetupError::Configure(m) => format!("configure refused its params: {m}"),
            SetupError::Call(during, reason) => format!("{during}: {reason}"),
        },
    }
}

/// The error as an operator reads it: the trap (or error), the guest function it
/// happened in when the plugin kept its symbols, and what the plugin said (`said`).
fn describe_error(e: &wasmtime::Error, said: Option<&str>) -> String {
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
    if let Some(said) = said {
        text.push_str("; the plugin said: ");
        text.push_str(said);
    }
    text
}
