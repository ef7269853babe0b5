//! Assembling a running gateway from a [`Config`]: plugins, upstreams, routes.

use crate::config::Config;
use crate::health::{Receiver, Reporter};
use crate::plugin::PluginHost;
use crate::proxy::Proxy;
use crate::router::Router;
use crate::upstream::Upstream;
use std::collections::HashMap;
use std::sync::Arc;

/// Everything the workers and the control plane share.
#[derive(Debug)]
pub struct Gateway {
    /// The request path.
    pub proxy: Proxy,
    /// All upstreams, in config order.
    pub upstreams: Vec<Arc<Upstream>>,
    /// The plugin runtime.
    pub plugins: Arc<PluginHost>,
    /// The config it was built from.
    pub config: Config,
}

impl Gateway {
    /// Builds the gateway: compiles plugins, binds them to upstreams (running their
    /// `configure`), resolves backends. Blocking; call before starting the workers.
    pub fn build(config: Config) -> anyhow::Result<(Arc<Gateway>, Receiver)> {
        let plugins = PluginHost::new(&config.plugins)?;
        let mut by_name = HashMap::new();
        let mut upstreams = Vec::new();
        for (name, cfg) in &config.upstreams {
            let up = Arc::new(Upstream::build(name, cfg, &config.timeouts, &plugins)?);
            by_name.insert(name.clone(), up.clone());
            upstreams.push(up);
        }
        let router = Router::new(&config.effective_routes(), &by_name);
        let (reporter, receiver) = Reporter::new();
        let proxy = Proxy { router, reporter, access_log: config.access_log.enabled };
        Ok((Arc::new(Gateway { proxy, upstreams, plugins, config }), receiver))
    }

    /// The upstream called `name`.
    pub fn upstream(&self, name: &str) -> Option<&Arc<Upstream>> {
        self.upstreams.iter().find(|u| u.name == name)
    }
}
