//! Discovery: where backends come from while the gateway runs. Sources are pool
//! writers, siblings of the health checker: each one publishes the **whole current set**
//! of instances it knows for an upstream, and [`publish`] turns that set into a new pool
//! snapshot:
//!
//! - an instance already in the pool (same id and address) keeps its entry (the same
//!   `Arc`: live counters, in-flight requests, metrics) and its health; a new weight is
//!   taken as it is;
//! - a new instance starts *pending* (no traffic) until its first active health check
//!   passes, or up at once when the upstream's health checks are off;
//! - an instance that left is dropped from the snapshot: it gets no new requests, and
//!   requests in flight finish (they hold the entry).
//!
//! The built-in sources: the embedded [`registry`] (an HTTP API on the admin listener),
//! [`dns`] (A/AAAA/SRV records, re-resolved) and [`etcd`] (a prefix read and watched, shared
//! by a fleet of gateways; the registry API writes there for such an upstream). Nothing
//! here runs on the request path.

pub mod dns;
pub mod etcd;
pub mod registry;
pub mod sidecar;

use crate::config;
use crate::pool::{BackendEntry, Member, Pool, PoolSnapshot, Source, Status};
use crate::upstream::Upstream;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use tokio_util::sync::CancellationToken;

pub use registry::{Refused, Registry};
use serde_json::Value;

/// One discovered backend instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instance {
    /// Stable id, unique in the upstream (plugins, sticky cookies and the admin API use it).
    pub id: String,
    /// Where to send requests.
    pub addr: SocketAddr,
    /// Relative weight (≥ 1).
    pub weight: u32,
    /// Zone or region, may be empty.
    pub zone: String,
    /// Labels, sorted by key.
    pub labels: Vec<(String, String)>,
}

/// What one [`publish`] changed, by id.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Published {
    /// The new snapshot's generation.
    pub generation: u64,
    /// Instances that joined (pending until checked, if health checks are on).
    pub added: Vec<String>,
    /// Instances that left.
    pub removed: Vec<String>,
    /// Instances whose address, weight, zone or labels changed.
    pub updated: Vec<String>,
    /// Instances left out because a static backend has their id.
    pub shadowed: Vec<String>,
}

/// Makes the members of `up` that came from `source` exactly `instances` (static
/// backends and other sources' members are kept as they are), and publishes that as a
/// new generation. `None` when nothing changed (no new generation).
///
/// Members keep a stable order: static backends first, then discovered ones by id, so
/// that every gateway replica fed the same set sees the same pool.
pub fn publish(up: &Upstream, source: Source, instances: &[Instance]) -> Option<Published> {
    publish_to(&up.pool, up.health_check.enabled, source, instances)
}

/// [`publish`] into a bare pool: new instances are pending when `health_checks` are on.
pub fn publish_to(pool: &Pool, health_checks: bool, source: Source, instances: &[Instance]) -> Option<Published> {
    let fresh = if health_checks { Status::PENDING } else { Status::UP };
    let mut out = Published::default();
    let snap = pool.replace(|cur| merge(cur, source, instances, fresh, &mut out))?;
    out.generation = snap.generation;
    Some(out)
}

/// The members `cur` becomes with `instances` as `source`'s set, or `None` if that is
/// what it has.
fn merge(
    cur: &PoolSnapshot,
    source: Source,
    instances: &[Instance],
    fresh: Status,
    out: &mut Published,
) -> Option<Vec<Member>> {
    let mut sorted: Vec<&Instance> = instances.iter().collect();
    sorted.sort_by(|a, b| a.id.cmp(&b.id));
    sorted.dedup_by(|a, b| a.id == b.id);
    let mut mine: HashMap<&str, &Member> =
        cur.members.iter().filter(|m| m.entry.source == source).map(|m| (m.entry.id.as_str(), m)).collect();
    let mut members: Vec<Member> = Vec::with_capacity(cur.members.len() - mine.len() + sorted.len());
    members.extend(cur.members.iter().filter(|m| m.entry.source != source).cloned());
    let others: std::collections::HashSet<&str> =
        cur.members.iter().filter(|m| m.entry.source != source).map(|m| m.entry.id.as_str()).collect();
    let mut shadowed = Vec::new();
    for inst in sorted {
        if others.contains(inst.id.as_str()) {
            shadowed.push(inst.id.clone());
            continue;
        }
        let new_entry =
            || Arc::new(BackendEntry::new(inst.id.clone(), inst.addr, inst.zone.clone(), inst.labels.clone(), source));
        let member = match mine.remove(inst.id.as_str()) {
            Some(m) if m.entry.addr == inst.addr && m.entry.zone == inst.zone && m.entry.labels == inst.labels => {
                if m.weight != inst.weight.max(1) {
                    out.updated.push(inst.id.clone());
                }
                Member::new(m.entry.clone(), m.status, inst.weight)
            }
            // Same server, new zone or labels: a new entry with the health it had.
            Some(m) if m.entry.addr == inst.addr => {
                out.updated.push(inst.id.clone());
                Member::new(new_entry(), m.status, inst.weight)
            }
            // Another address: another server, checked before it takes traffic.
            Some(_) => {
                out.updated.push(inst.id.clone());
                Member::new(new_entry(), fresh, inst.weight)
            }
            None => {
                out.added.push(inst.id.clone());
                Member::new(new_entry(), fresh, inst.weight)
            }
        };
        members.push(member);
    }
    out.removed = mine.into_keys().map(str::to_owned).collect();
    out.removed.sort();
    out.shadowed = shadowed;
    if out.added.is_empty() && out.removed.is_empty() && out.updated.is_empty() {
        return None;
    }
    Some(members)
}

/// Logs what a publish changed: ids when there are few, counts always.
pub(crate) fn log_published(upstream: &str, source: Source, p: &Published) {
    let few = |ids: &[String]| {
        if ids.len() <= 10 { ids.join(", ") } else { format!("{} and {} more", ids[..10].join(", "), ids.len() - 10) }
    };
    tracing::info!(
        upstream = %upstream,
        source = source.as_str(),
        generation = p.generation,
        added = p.added.len(),
        removed = p.removed.len(),
        updated = p.updated.len(),
        "backends changed: added [{}], removed [{}], updated [{}]",
        few(&p.added),
        few(&p.removed),
        few(&p.updated),
    );
    if !p.shadowed.is_empty() {
        tracing::warn!(upstream = %upstream, source = source.as_str(), ids = ?p.shadowed, "discovered instances ignored: a static backend has the same id");
    }
}

/// Finds the serving upstream by name (a reload may have replaced it).
pub type Lookup = Arc<dyn Fn(&str) -> Option<Arc<Upstream>> + Send + Sync>;

/// How a source is doing, for the admin API.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct SourceState {
    /// `registry`, `dns` or `etcd`.
    pub source: &'static str,
    /// When it last published a set (ms since the Unix epoch; 0: never).
    pub last_update_ms: u64,
    /// Instances in its last set.
    pub instances: usize,
    /// Its last error (a failed DNS lookup), cleared by the next success.
    pub last_error: Option<String>,
    /// When that error happened.
    pub last_error_ms: Option<u64>,
    /// Failed lookups (DNS) or lost connections and failed reads (etcd) since start.
    pub errors: u64,
    /// etcd: whether the source is connected (its watch running) now.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connected: Option<bool>,
    /// etcd: the last revision read or watched.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub revision: Option<i64>,
    /// etcd: full reads of the prefix after a compaction cancelled the watch.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub relists: Option<u64>,
}

/// The discovery sources of a running gateway: the registry (which outlives config
/// reloads), the per-view source tasks (DNS, etcd), and their states.
#[derive(Debug, Default)]
pub struct Sources {
    /// The embedded registry.
    pub registry: Arc<Registry>,
    /// The etcd source of each upstream that has one (the registry API writes through it).
    etcd: Mutex<HashMap<String, Arc<etcd::Etcd>>>,
    states: Arc<Mutex<HashMap<String, SourceState>>>,
    running: Mutex<Option<CancellationToken>>,
}

impl Sources {
    /// Starts the registry's publisher (once) and the source tasks of `upstreams`,
    /// replacing those of a previous view. Call on the control runtime, after the view
    /// was swapped in. The registry publishes its sets again, so a reload keeps them.
    pub fn start(&self, upstreams: &[Arc<Upstream>], lookup: Lookup, stop: &CancellationToken) {
        let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        if running.is_none() {
            self.registry.spawn_publisher(lookup.clone(), self.states.clone(), stop.clone());
        }
        if let Some(old) = running.take() {
            old.cancel();
        }
        let tasks = stop.child_token();
        let mut etcds = self.etcd.lock().unwrap_or_else(|e| e.into_inner());
        etcds.clear();
        let mut states = self.states.lock().unwrap_or_else(|e| e.into_inner());
        states.retain(|name, s| {
            upstreams
                .iter()
                .any(|u| &u.name == name && source_of(&u.config).is_some_and(|src| src.as_str() == s.source))
        });
        for up in upstreams {
            let (Some(d), Some(source)) = (&up.config.discovery, source_of(&up.config)) else { continue };
            let state = states.entry(up.name.clone()).or_default();
            state.source = source.as_str();
            if let Some(cfg) = &d.etcd {
                let source = Arc::new(etcd::Etcd::new(up.name.clone(), cfg.clone()));
                etcds.insert(up.name.clone(), source.clone());
                tokio::spawn(etcd::run(source, lookup.clone(), self.states.clone(), tasks.clone()));
            }
            if let Some(dns) = &d.dns {
                tokio::spawn(dns::run(
                    up.name.clone(),
                    dns.clone(),
                    lookup.clone(),
                    self.states.clone(),
                    tasks.clone(),
                ));
            }
        }
        drop(states);
        drop(etcds);
        self.registry.sync(upstreams);
        *running = Some(tasks);
    }

    /// The state of each upstream's source.
    pub fn states(&self) -> HashMap<String, SourceState> {
        self.states.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The etcd source the registry API writes through for `up`, if it has
    /// `discovery.etcd` (`503` while it is not started).
    fn etcd_of(&self, up: Option<&Upstream>) -> Option<Result<Arc<etcd::Etcd>, Refused>> {
        let up = up?;
        up.config.discovery.as_ref()?.etcd.as_ref()?;
        let found = self.etcd.lock().unwrap_or_else(|e| e.into_inner()).get(&up.name).cloned();
        Some(found.ok_or_else(|| {
            Refused::new(
                http::StatusCode::SERVICE_UNAVAILABLE,
                "etcd",
                format!("the etcd source of upstream `{}` is not started yet: try again", up.name),
            )
        }))
    }

    /// `PUT /api/registry/{upstream}/{id}`: into the embedded registry, or into etcd for
    /// an upstream with `discovery.etcd`.
    pub async fn register(&self, up: Option<&Upstream>, name: &str, id: &str, body: &[u8]) -> Result<Value, Refused> {
        match self.etcd_of(up) {
            Some(etcd) => etcd?.register(up, id, body).await,
            None => self.registry.register(up, name, id, body).await,
        }
    }

    /// `PUT /api/registry/{upstream}/{id}/heartbeat`: renews the registration (the etcd
    /// lease for an upstream with `discovery.etcd`).
    pub async fn heartbeat(&self, up: Option<&Upstream>, name: &str, id: &str) -> Result<Value, Refused> {
        match self.etcd_of(up) {
            Some(etcd) => etcd?.heartbeat(id).await,
            None => self.registry.heartbeat(up, name, id),
        }
    }

    /// `DELETE /api/registry/{upstream}/{id}`: deregisters (deletes the etcd key and
    /// revokes its lease for an upstream with `discovery.etcd`).
    pub async fn deregister(&self, up: Option<&Upstream>, name: &str, id: &str) -> Result<Value, Refused> {
        match self.etcd_of(up) {
            Some(etcd) => etcd?.deregister(id).await,
            None => self.registry.deregister(up, name, id),
        }
    }

    /// `GET /api/registry`: the registry's upstreams, then the etcd ones.
    pub fn list(&self, upstreams: &[Arc<Upstream>]) -> Value {
        let mut all = self.registry.list(upstreams);
        let etcds = self.etcd.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(list) = all["upstreams"].as_array_mut() {
            list.extend(upstreams.iter().filter_map(|u| etcds.get(&u.name)).map(|e| e.list()));
        }
        all
    }
}

/// The upstream's discovery source, if its config has one.
pub fn source_of(cfg: &config::Upstream) -> Option<Source> {
    let d = cfg.discovery.as_ref()?;
    match (&d.registry, &d.dns, &d.etcd) {
        (Some(_), _, _) => Some(Source::Registry),
        (_, Some(_), _) => Some(Source::Dns),
        (_, _, Some(_)) => Some(Source::Etcd),
        _ => None,
    }
}

/// Records a source's outcome for the admin API.
pub(crate) fn note(states: &Mutex<HashMap<String, SourceState>>, upstream: &str, result: Result<usize, String>) {
    let mut states = states.lock().unwrap_or_else(|e| e.into_inner());
    let Some(s) = states.get_mut(upstream) else { return };
    match result {
        Ok(n) => {
            s.instances = n;
            s.last_update_ms = crate::metrics::now_ms();
            s.last_error = None;
            s.last_error_ms = None;
        }
        Err(e) => {
            s.last_error = Some(e);
            s.last_error_ms = Some(crate::metrics::now_ms());
            s.errors += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inst(id: &str, port: u16, weight: u32) -> Instance {
        Instance {
            id: id.into(),
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            weight,
            zone: String::new(),
            labels: vec![],
        }
    }

    fn static_pool() -> Pool {
        let addr = SocketAddr::from(([127, 0, 0, 1], 9000));
        Pool::new(vec![Arc::new(BackendEntry::new("s".into(), addr, String::new(), vec![], Source::Static))])
    }

    fn apply(pool: &Pool, set: &[Instance], fresh: Status) -> Option<Published> {
        let mut out = Published::default();
        pool.replace(|cur| merge(cur, Source::Registry, set, fresh, &mut out))?;
        Some(out)
    }

    #[test]
    fn kept_instances_keep_their_entry_new_ones_are_pending_gone_ones_leave() {
        let pool = static_pool();
        let p = apply(&pool, &[inst("b", 9002, 1), inst("a", 9001, 1)], Status::PENDING).unwrap();
        assert_eq!((p.added.as_slice(), p.removed.len()), (&["a".to_owned(), "b".to_owned()][..], 0));
        let one = pool.snapshot();
        let ids: Vec<&str> = one.members.iter().map(|m| m.entry.id.as_str()).collect();
        assert_eq!(ids, ["s", "a", "b"], "static first, then by id");
        assert!(one.members[1].status.pending && !one.members[1].status.healthy());
        assert_eq!(one.healthy_count, 1);
        pool.update_status("a", |s| {
            s.up = true;
            s.pending = false;
        });

        assert!(apply(&pool, &[inst("a", 9001, 1), inst("b", 9002, 1)], Status::PENDING).is_none(), "same set");
        // a: new weight (same entry, still up); b leaves; c joins.
        let p = apply(&pool, &[inst("a", 9001, 3), inst("c", 9003, 1)], Status::PENDING).unwrap();
        assert_eq!((p.added, p.removed, p.updated), (vec!["c".into()], vec!["b".into()], vec!["a".into()]));
        let two = pool.snapshot();
        assert!(Arc::ptr_eq(&one.members[1].entry, &two.members[1].entry));
        assert_eq!((two.members[1].weight, two.members[1].status.healthy()), (3, true));
        assert_eq!(two.members.len(), 3);

        // a moves to another address: a new entry, checked again.
        apply(&pool, &[inst("a", 9009, 3), inst("c", 9003, 1)], Status::PENDING).unwrap();
        let three = pool.snapshot();
        assert!(!Arc::ptr_eq(&two.members[1].entry, &three.members[1].entry));
        assert!(three.members[1].status.pending);
    }

    #[test]
    fn a_static_id_wins_and_an_empty_set_keeps_the_static_backends() {
        let pool = static_pool();
        let p = apply(&pool, &[inst("s", 9005, 1), inst("x", 9006, 1)], Status::UP).unwrap();
        assert_eq!((p.added, p.shadowed), (vec!["x".into()], vec!["s".into()]));
        assert_eq!(pool.snapshot().healthy_count, 2, "health checks off: up at once");
        let p = apply(&pool, &[], Status::UP).unwrap();
        assert_eq!(p.removed, ["x"]);
        assert_eq!(pool.snapshot().members.len(), 1);
    }
}
