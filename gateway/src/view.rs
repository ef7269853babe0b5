//! What a config builds and a reload replaces as a whole: the routes and the upstreams
//! they lead to, with the config they came from. Requests take the current view once
//! and finish on it, so a reload never changes a request half-way.

use crate::config::Config;
use crate::router::Router;
use crate::upstream::Upstream;
use std::sync::Arc;

/// One immutable version of the routing state.
#[derive(Debug)]
pub struct View {
    /// 1 for the config loaded at start, +1 per applied reload.
    pub version: u64,
    /// The config it was built from.
    pub config: Arc<Config>,
    /// The route table.
    pub router: Router,
    /// All upstreams, in config order.
    pub upstreams: Vec<Arc<Upstream>>,
}

impl View {
    /// The upstream called `name`.
    pub fn upstream(&self, name: &str) -> Option<&Arc<Upstream>> {
        self.upstreams.iter().find(|u| u.name == name)
    }
}
