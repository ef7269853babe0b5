//! An upstream: a pool of backends, the selector that chooses among them, and the
//! policies (retries, timeouts, health) that apply to them.

use crate::config;
use crate::plugin::{PluginError, PluginHost};
use crate::pool::{BackendEntry, Pool};
use crate::select::Selector;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;

/// One upstream, shared by every worker thread.
#[derive(Debug)]
pub struct Upstream {
    /// Name from the config.
    pub name: String,
    /// The current backends and their health.
    pub pool: Pool,
    /// Chooses a backend per request.
    pub selector: Selector,
    /// Retry policy.
    pub retries: config::Retries,
    /// Timeouts towards the backends.
    pub timeouts: config::Timeouts,
    /// Active health checks.
    pub health_check: config::HealthCheck,
    /// Passive ejection.
    pub passive: config::Passive,
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
    /// The strategy plugin was refused.
    #[error("upstream `{upstream}`: {error}")]
    Plugin {
        /// Upstream name.
        upstream: String,
        /// Why.
        error: PluginError,
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
        let mut entries: Vec<Arc<BackendEntry>> = Vec::with_capacity(cfg.backends.len());
        for b in &cfg.backends {
            let addr = resolve(&b.address).map_err(|reason| BuildError::Resolve {
                upstream: name.into(),
                address: b.address.clone(),
                reason,
            })?;
            if entries.iter().any(|e| e.id == b.id()) {
                return Err(BuildError::DuplicateId { upstream: name.into(), id: b.id().into() });
            }
            let labels = b.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
            entries.push(Arc::new(BackendEntry::new(b.id().into(), addr, b.weight, b.zone.clone(), labels)));
        }
        let plugin_err = |error| BuildError::Plugin { upstream: name.into(), error };
        let plugin = host.resolve(&cfg.strategy.plugin).map_err(plugin_err)?;
        let binding = host.bind(name, plugin, &cfg.strategy.params).map_err(plugin_err)?;
        Ok(Upstream {
            name: name.into(),
            pool: Pool::new(entries),
            selector: Selector::new(binding),
            retries: cfg.retries.clone(),
            timeouts: cfg.timeouts.clone().unwrap_or_else(|| defaults.clone()),
            health_check: cfg.health_check.clone(),
            passive: cfg.passive.clone(),
        })
    }
}

fn resolve(address: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = address.parse() {
        return Ok(addr);
    }
    address.to_socket_addrs().map_err(|e| e.to_string())?.next().ok_or_else(|| "no addresses".into())
}
