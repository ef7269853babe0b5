//! An upstream: a pool of backends, the selector that chooses among them, and the
//! policies (retries, timeouts, health) that apply to them.

use crate::config;
use crate::metrics::UpstreamMetrics;
use crate::plugin::{PluginError, PluginHost};
use crate::pool::{BackendEntry, Member, Pool, Source, Status};
use crate::proxy::Transport;
use crate::select::{Arm, Canary, Selector, Shadow};
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;

/// One upstream, shared by every worker thread.
#[derive(Debug)]
pub struct Upstream {
    /// Name from the config.
    pub name: String,
    /// The current backends and their health.
    pub pool: Pool,
    /// Chooses a backend per request (shared with the previous version of this
    /// upstream when a reload left its strategy unchanged).
    pub selector: Arc<Selector>,
    /// A second strategy deciding a share of the requests (kept across a reload that
    /// leaves it unchanged, with its counts).
    pub canary: Option<Arc<Canary>>,
    /// A strategy asked about a sample of the requests without acting on it (kept, like
    /// the canary, across a reload that leaves it unchanged).
    pub shadow: Option<Arc<Shadow>>,
    /// Retry policy.
    pub retries: config::Retries,
    /// How many retries may add to the requests (counted per worker, read on a retry).
    pub retry_budget: crate::proxy::RetryBudget,
    /// Timeouts towards the backends.
    pub timeouts: config::Timeouts,
    /// Active health checks.
    pub health_check: config::HealthCheck,
    /// Passive ejection.
    pub passive: config::Passive,
    /// Protocol, TLS and pool settings towards the backends (TLS config built once here).
    pub transport: Arc<Transport>,
    /// Retries, decisions, plugin failures (kept across reloads by name).
    pub metrics: Arc<UpstreamMetrics>,
    /// The config it was built from, to tell what a reload changed.
    pub config: config::Upstream,
}

/// Why an upstream could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// A backend address did not resolve.
    #[error("upstream `{upstream}`: backend `{address}` does not resolve: {reason}")]
    Resolve {
        /// Upstream name.
        upstream: String,
        /// The configured address.
        address: String,
        /// Why.
        reason: String,
    },
    /// Two backends share an id.
    #[error("upstream `{upstream}`: two backends have the id `{id}`; ids must be unique")]
    DuplicateId {
        /// Upstream name.
        upstream: String,
        /// The id.
        id: String,
    },
    /// TLS to the backends could not be set up (CA bundle, client certificate).
    #[error("upstream `{upstream}`: {reason}")]
    Transport {
        /// Upstream name.
        upstream: String,
        /// Why.
        reason: String,
    },
    /// The strategy plugin (of a chain: one step's) was refused.
    #[error("upstream `{upstream}`: {}{error}", step.map(|s| format!("strategy step {s}: ")).unwrap_or_default())]
    Plugin {
        /// Upstream name.
        upstream: String,
        /// Which step of a chain (none: a single strategy).
        step: Option<usize>,
        /// Why.
        error: Box<PluginError>,
    },
    /// The canary's or the shadow's plugin was refused.
    #[error("upstream `{upstream}`: {role}: {error}")]
    Trial {
        /// Upstream name.
        upstream: String,
        /// `canary` or `shadow`.
        role: &'static str,
        /// Why.
        error: Box<PluginError>,
    },
}

impl Upstream {
    /// Builds the upstream `name`: resolves its backends and binds its strategy plugin.
    /// Blocking (DNS, plugin compilation).
    pub fn build(
        name: &str,
        cfg: &config::Upstream,
        defaults: &config::Timeouts,
        host: &Arc<PluginHost>,
    ) -> Result<Self, BuildError> {
        Self::rebuild(name, cfg, defaults, host, None)
    }

    /// Builds the upstream `name` for a config reload, keeping from `previous` what is
    /// unchanged: a backend with the same id, address, zone and labels keeps its entry
    /// (live counters, in-flight requests, metrics) and its health status, and takes its
    /// new weight; backends found by the upstream's discovery source are carried over
    /// while the source is the same kind (it publishes its current set again after the
    /// reload); an unchanged strategy keeps its plugin binding (warm instances; host-held
    /// counters and key-value state are kept by upstream name either way).
    pub fn rebuild(
        name: &str,
        cfg: &config::Upstream,
        defaults: &config::Timeouts,
        host: &Arc<PluginHost>,
        previous: Option<&Upstream>,
    ) -> Result<Self, BuildError> {
        let old = previous.map(|p| p.pool.snapshot());
        let mut members: Vec<Member> = Vec::with_capacity(cfg.backends.len());
        for b in &cfg.backends {
            let addr = resolve(&b.address).map_err(|reason| BuildError::Resolve {
                upstream: name.into(),
                address: b.address.clone(),
                reason,
            })?;
            if members.iter().any(|m| m.entry.id == b.id()) {
                return Err(BuildError::DuplicateId { upstream: name.into(), id: b.id().into() });
            }
            let labels: Vec<(String, String)> = b.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
            let kept = old.as_ref().and_then(|snap| {
                snap.members.iter().find(|m| {
                    let e = &m.entry;
                    e.source == Source::Static
                        && e.id == b.id()
                        && e.addr == addr
                        && e.zone == b.zone
                        && e.labels == labels
                })
            });
            members.push(match kept {
                Some(m) => Member::new(m.entry.clone(), m.status, b.weight),
                None => Member::new(
                    Arc::new(BackendEntry::new(b.id().into(), addr, b.zone.clone(), labels, Source::Static)),
                    Status::UP,
                    b.weight,
                ),
            });
        }
        if let (Some(snap), Some(source)) = (&old, crate::discovery::source_of(cfg)) {
            let carried = snap
                .members
                .iter()
                .filter(|m| m.entry.source == source && !members.iter().any(|s| s.entry.id == m.entry.id))
                .map(|m| {
                    let mut m = m.clone();
                    // No health checks any more: nothing would ever let a pending one in.
                    if m.status.pending && !cfg.health_check.enabled {
                        m.status.pending = false;
                        m.status.up = true;
                    }
                    m
                })
                .collect::<Vec<_>>();
            members.extend(carried);
        }
        let selector = match previous {
            Some(p) if p.config.strategy == cfg.strategy => p.selector.clone(),
            // A promotion (the canary becomes the strategy) keeps the canary's plugin
            // binding: its warm instances, and its state (where it put its clients).
            Some(Upstream { canary: Some(c), .. }) if cfg.strategy == c.strategy() => {
                let steps = c.selector.bindings().map(|b| (c.config.plugin.clone(), b.clone())).collect();
                Arc::new(Selector::chain(steps, crate::metrics::control().upstream(name)))
            }
            _ => {
                let mut steps = Vec::with_capacity(cfg.strategy.steps().len());
                for (step, s) in cfg.strategy.steps().iter().enumerate() {
                    let plugin_err = |error| BuildError::Plugin {
                        upstream: name.into(),
                        step: cfg.strategy.is_chain().then_some(step),
                        error: Box::new(error),
                    };
                    let plugin = host.resolve(&s.plugin).map_err(plugin_err)?;
                    steps.push((s.plugin.clone(), host.bind_step(name, step, plugin, &s.params).map_err(plugin_err)?));
                }
                Arc::new(Selector::chain(steps, crate::metrics::control().upstream(name)))
            }
        };
        let trial_err =
            |role: &'static str| move |error| BuildError::Trial { upstream: name.into(), role, error: Box::new(error) };
        let canary = match (&cfg.canary, previous) {
            (None, _) => None,
            (Some(c), Some(p)) if p.config.canary.as_ref() == Some(c) => p.canary.clone(),
            (Some(c), _) => {
                let plugin = host.resolve(&c.plugin).map_err(trial_err("canary"))?;
                let binding =
                    host.bind_in(name, &format!("{name}#canary"), plugin, &c.params).map_err(trial_err("canary"))?;
                // Its own failures and fallbacks: not the live strategy's.
                let selector = Selector::chain(vec![(c.plugin.clone(), binding)], Arc::default());
                Some(Arc::new(Canary::new(selector, c.clone())))
            }
        };
        let shadow = match (&cfg.shadow, previous) {
            (None, _) => None,
            (Some(sh), Some(p)) if p.config.shadow.as_ref() == Some(sh) => p.shadow.clone(),
            (Some(sh), _) => {
                let plugin = host.resolve(&sh.plugin).map_err(trial_err("shadow"))?;
                let binding =
                    host.bind_in(name, &format!("{name}#shadow"), plugin, &sh.params).map_err(trial_err("shadow"))?;
                Some(Arc::new(Shadow::new(binding, sh.clone())))
            }
        };
        // Unchanged protocol, TLS and pool settings keep the transport, and with it this
        // upstream's open connections.
        let transport = match previous {
            Some(p) if p.config.protocol == cfg.protocol && p.config.tls == cfg.tls && p.config.pool == cfg.pool => {
                p.transport.clone()
            }
            _ => {
                Arc::new(Transport::new(cfg).map_err(|reason| BuildError::Transport { upstream: name.into(), reason })?)
            }
        };
        Ok(Upstream {
            transport,
            name: name.into(),
            pool: Pool::with_members(members),
            selector,
            canary,
            shadow,
            retries: cfg.retries.clone(),
            retry_budget: crate::proxy::RetryBudget::new(&cfg.retry_budget),
            timeouts: cfg.timeouts.clone().unwrap_or_else(|| defaults.clone()),
            health_check: cfg.health_check.clone(),
            passive: cfg.passive.clone(),
            metrics: crate::metrics::control().upstream(name),
            config: cfg.clone(),
        })
    }
}

impl Upstream {
    /// The selector of `arm`: the canary's, or the upstream's strategy.
    pub fn selector_for(&self, arm: Arm) -> &Selector {
        match (arm, &self.canary) {
            (Arm::Canary, Some(c)) => &c.selector,
            _ => &self.selector,
        }
    }

    /// Every plugin binding the upstream uses: the strategy's steps, then the canary's
    /// and the shadow's (to warm on each worker, and to name in `/metrics`).
    pub fn bindings(&self) -> impl Iterator<Item = &Arc<crate::plugin::Binding>> {
        self.selector
            .bindings()
            .chain(self.canary.iter().flat_map(|c| c.selector.bindings()))
            .chain(self.shadow.iter().map(|s| &s.binding))
    }
}

fn resolve(address: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = address.parse() {
        return Ok(addr);
    }
    address.to_socket_addrs().map_err(|e| e.to_string())?.next().ok_or_else(|| "no addresses".into())
}
