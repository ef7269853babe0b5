//! etcd discovery (fleets): the instances of an upstream are the keys
//! `{prefix}{upstream}/{id}` in etcd, whose values are registration JSON (the body of
//! `PUT /api/registry/...`, checked the same way). Every gateway replica reads the prefix,
//! then watches it from the revision after that read, so all replicas publish the same
//! set (same ids, same order: the same sticky and consistent-hash answers).
//!
//! - A disconnect (etcd restarted, unreachable) keeps the last known pool; the watch
//!   resumes from the last revision seen, so changes made meanwhile arrive as events.
//!   Reconnecting backs off from 200 ms to 2 s; the state change is logged once each way
//!   and shown in the admin API (`/api/upstreams`: `discovery.connected`).
//! - A watch that starts below etcd's compacted revision is cancelled by etcd: the
//!   prefix is read again (a *relist*) and published as a whole.
//! - A value that is not a valid registration is logged with its key and skipped: a key
//!   that had a good value keeps it, a new key is left out. A bad value never empties
//!   the pool.
//!
//! The registry API writes to etcd for such an upstream ([`Etcd::register`]): the key
//! under a lease of the registration's TTL; a heartbeat renews the lease
//! (`LeaseKeepAlive`), a deregistration deletes the key and revokes the lease. Any
//! replica accepts a registration or a heartbeat; every replica sees it through its watch.

use super::registry::{self, Refused};
use super::{Instance, Lookup, SourceState};
use crate::config::EtcdSource;
use crate::pool::Source;
use crate::upstream::Upstream;
use etcd_client::{Client, ConnectOptions, DeleteOptions, EventType, GetOptions, KeyValue, PutOptions, WatchOptions};
use http::StatusCode;
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// First wait before reconnecting; doubled after each failure up to [`BACKOFF_MAX`].
const BACKOFF_MIN: Duration = Duration::from_millis(200);
/// Longest wait between two attempts to reach etcd.
const BACKOFF_MAX: Duration = Duration::from_secs(2);

/// One upstream's etcd source: its settings, the client (shared with the registry API)
/// and the instances it last published.
pub struct Etcd {
    upstream: String,
    cfg: EtcdSource,
    client: OnceLock<Client>,
    set: Mutex<BTreeMap<String, Instance>>,
}

impl std::fmt::Debug for Etcd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Etcd")
            .field("upstream", &self.upstream)
            .field("cfg", &self.cfg)
            .field("started", &self.client.get().is_some())
            .finish_non_exhaustive()
    }
}

/// Why a watch session ended.
enum Ended {
    /// etcd could not be reached or the stream broke: resume from the last revision.
    Unreachable(String),
}

impl Etcd {
    /// The source of `upstream`; [`run`] connects it.
    pub fn new(upstream: String, cfg: EtcdSource) -> Etcd {
        Etcd { upstream, cfg, client: OnceLock::new(), set: Mutex::default() }
    }

    /// `{prefix}{upstream}/`: every key of this upstream starts with it.
    fn dir(&self) -> String {
        format!("{}{}/", self.cfg.prefix, self.upstream)
    }

    /// The key of instance `id`.
    fn key(&self, id: &str) -> String {
        format!("{}{id}", self.dir())
    }

    /// The instance id in `key`, if the key is `{dir}{id}` with no further `/`.
    fn id_of<'k>(&self, key: &'k str) -> Option<&'k str> {
        key.strip_prefix(&self.dir()).filter(|id| !id.is_empty() && !id.contains('/'))
    }

    /// The instances last read, by id.
    pub fn instances(&self) -> Vec<Instance> {
        self.set.lock().unwrap_or_else(|e| e.into_inner()).values().cloned().collect()
    }

    /// Bounds an etcd call by the configured timeout.
    async fn bounded<T>(
        &self,
        what: &str,
        call: impl Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, String> {
        match tokio::time::timeout(self.cfg.timeout, call).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(format!("{what}: {e}")),
            Err(_) => Err(format!("{what}: no answer within {:?}", self.cfg.timeout)),
        }
    }

    /// Reads the value of `kv` as a registration; `None` (logged) when it is not one.
    async fn parse(&self, kv: &KeyValue) -> Option<Instance> {
        let key = String::from_utf8_lossy(kv.key());
        let Some(id) = self.id_of(&key) else {
            tracing::warn!(upstream = %self.upstream, key = %key, "etcd key skipped: expected {}ID (one path segment)", self.dir());
            return None;
        };
        match registry::check(id, kv.value(), self.cfg.default_ttl).await {
            Ok(c) => Some(c.instance),
            Err(e) => {
                tracing::warn!(upstream = %self.upstream, key = %key, backend = %id, field = e.field, "etcd value skipped (not a valid registration): {}", e.message);
                None
            }
        }
    }

    /// A new instance for `id` from `kv`, into `set`: a bad value keeps the instance's
    /// last good one, and a new id past `max_instances` is left out. Whether it changed.
    async fn put(&self, set: &mut BTreeMap<String, Instance>, id: &str, kv: &KeyValue) -> bool {
        let Some(inst) = self.parse(kv).await else { return false };
        if !set.contains_key(id) && set.len() >= self.cfg.max_instances {
            tracing::warn!(upstream = %self.upstream, backend = %id, max_instances = self.cfg.max_instances, "etcd instance ignored: the upstream has discovery.etcd.max_instances already");
            return false;
        }
        set.insert(id.to_owned(), inst.clone()) != Some(inst)
    }

    /// Reads every key of the upstream; returns the revision of that read.
    async fn read_prefix(&self, client: &mut Client) -> Result<i64, String> {
        let dir = self.dir();
        let resp =
            self.bounded("reading the prefix", client.get(dir.as_str(), Some(GetOptions::new().with_prefix()))).await?;
        let revision = resp.header().map_or(0, |h| h.revision());
        let old = self.set.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let mut set = BTreeMap::new();
        for kv in resp.kvs() {
            let key = String::from_utf8_lossy(kv.key()).into_owned();
            let Some(id) = self.id_of(&key) else {
                tracing::warn!(upstream = %self.upstream, key = %key, "etcd key skipped: expected {dir}ID (one path segment)");
                continue;
            };
            if !self.put(&mut set, id, kv).await
                && !set.contains_key(id)
                && let Some(last_good) = old.get(id)
            {
                set.insert(id.to_owned(), last_good.clone());
            }
        }
        *self.set.lock().unwrap_or_else(|e| e.into_inner()) = set;
        Ok(revision)
    }

    /// Publishes the current set into the serving upstream.
    fn publish(&self, lookup: &Lookup, states: &Mutex<HashMap<String, SourceState>>, revision: i64) {
        let set = self.instances();
        if let Some(up) = lookup(&self.upstream)
            && let Some(p) = super::publish(&up, Source::Etcd, &set)
        {
            super::log_published(&self.upstream, Source::Etcd, &p);
        }
        super::note(states, &self.upstream, Ok(set.len()));
        with_state(states, &self.upstream, |s| s.revision = Some(revision));
    }

    /// Lists (when `revision` is none) and watches until the connection breaks.
    /// `connected` is called once etcd answered.
    async fn session(
        &self,
        client: &mut Client,
        revision: &mut Option<i64>,
        lookup: &Lookup,
        states: &Mutex<HashMap<String, SourceState>>,
        connected: &mut (dyn FnMut() + Send),
    ) -> Ended {
        loop {
            let rev = match *revision {
                Some(r) => r,
                None => match self.read_prefix(client).await {
                    Ok(r) => {
                        connected();
                        *revision = Some(r);
                        self.publish(lookup, states, r);
                        r
                    }
                    Err(e) => return Ended::Unreachable(e),
                },
            };
            let opts = WatchOptions::new().with_prefix().with_start_revision(rev + 1);
            let mut stream = match self.bounded("starting the watch", client.watch(self.dir(), Some(opts))).await {
                Ok(s) => s,
                Err(e) => return Ended::Unreachable(e),
            };
            loop {
                let resp = match stream.message().await {
                    Ok(Some(r)) => r,
                    Ok(None) => return Ended::Unreachable("the watch stream ended".into()),
                    Err(e) => return Ended::Unreachable(format!("watching: {e}")),
                };
                if resp.canceled() {
                    if resp.compact_revision() > 0 {
                        tracing::info!(upstream = %self.upstream, revision = rev, compacted = resp.compact_revision(), "etcd compacted the revisions the watch needed; reading the prefix again");
                        with_state(states, &self.upstream, |s| s.relists = Some(s.relists.unwrap_or(0) + 1));
                        *revision = None;
                        break;
                    }
                    return Ended::Unreachable(format!("etcd cancelled the watch: {}", resp.cancel_reason()));
                }
                if resp.created() {
                    connected();
                    continue;
                }
                let mut changed = false;
                let mut set = self.set.lock().unwrap_or_else(|e| e.into_inner()).clone();
                for ev in resp.events() {
                    let Some(kv) = ev.kv() else { continue };
                    *revision = Some(revision.unwrap_or(0).max(kv.mod_revision()));
                    let key = String::from_utf8_lossy(kv.key()).into_owned();
                    let Some(id) = self.id_of(&key) else {
                        tracing::warn!(upstream = %self.upstream, key = %key, "etcd key skipped: expected {}ID (one path segment)", self.dir());
                        continue;
                    };
                    changed |= match ev.event_type() {
                        EventType::Put => self.put(&mut set, id, kv).await,
                        EventType::Delete => set.remove(id).is_some(),
                    };
                }
                if changed {
                    *self.set.lock().unwrap_or_else(|e| e.into_inner()) = set;
                    self.publish(lookup, states, revision.unwrap_or(rev));
                } else if let Some(r) = *revision {
                    with_state(states, &self.upstream, |s| s.revision = Some(r));
                }
            }
        }
    }

    /// The client, or `503` before [`run`] made it.
    fn client(&self) -> Result<Client, Refused> {
        self.client.get().cloned().ok_or_else(|| {
            Refused::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "etcd",
                format!("the etcd source of upstream `{}` is not running (see the gateway's log)", self.upstream),
            )
        })
    }

    /// An etcd failure as the registry API's answer.
    fn unavailable(&self, e: String) -> Refused {
        Refused::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "etcd",
            format!("etcd ({}) did not take the request: {e}; try again", self.cfg.endpoints.join(", ")),
        )
    }

    /// `PUT /api/registry/{upstream}/{id}`: writes the registration to etcd under a new
    /// lease of its TTL (an older lease of the key is revoked after).
    pub async fn register(&self, up: Option<&Upstream>, id: &str, body: &[u8]) -> Result<Value, Refused> {
        let name = self.upstream.as_str();
        registry::check_id(id)?;
        registry::static_id(up, name, id)?;
        let checked = registry::check(id, body, self.cfg.default_ttl).await?;
        let mut client = self.client()?;
        let key = self.key(id);
        let known = self.set.lock().unwrap_or_else(|e| e.into_inner()).len();
        let prev =
            self.bounded("reading the key", client.get(key.as_str(), None)).await.map_err(|e| self.unavailable(e))?;
        let prev_lease = prev.kvs().first().map(KeyValue::lease);
        if prev_lease.is_none() && known >= self.cfg.max_instances {
            return Err(Refused::new(
                StatusCode::CONFLICT,
                "upstream",
                format!(
                    "upstream `{name}` already has {known} instances in etcd, its limit (discovery.etcd.max_instances): deregister some or raise the limit"
                ),
            ));
        }
        let ttl_s = checked.ttl.as_secs_f64().ceil() as i64;
        let lease = self
            .bounded("granting a lease", client.lease_grant(ttl_s, None))
            .await
            .map_err(|e| self.unavailable(e))?
            .id();
        let put = client.put(key.as_str(), checked.normal.to_string(), Some(PutOptions::new().with_lease(lease)));
        if let Err(e) = self.bounded("writing the key", put).await {
            let _ = self.bounded("revoking the unused lease", client.lease_revoke(lease)).await;
            return Err(self.unavailable(e));
        }
        if let Some(old) = prev_lease.filter(|l| *l != 0 && *l != lease) {
            // The key is on the new lease now: revoking the old one removes nothing else.
            let _ = self.bounded("revoking the old lease", client.lease_revoke(old)).await;
        }
        let addr = checked.instance.addr;
        tracing::info!(upstream = %name, backend = %id, address = %addr, key = %key, lease, ttl = ?checked.ttl, "instance registered in etcd");
        Ok(json!({
            "upstream": name,
            "id": id,
            "address": addr.to_string(),
            "registered": prev_lease.is_none(),
            "ttl_ms": checked.ttl.as_millis() as u64,
            "etcd": { "key": key, "lease": lease },
        }))
    }

    /// `PUT /api/registry/{upstream}/{id}/heartbeat`: renews the key's lease; `404`
    /// (register again) when the key or its lease is gone.
    pub async fn heartbeat(&self, id: &str) -> Result<Value, Refused> {
        let name = self.upstream.as_str();
        let mut client = self.client()?;
        let key = self.key(id);
        let gone = || {
            Refused::new(
                StatusCode::NOT_FOUND,
                "id",
                format!(
                    "instance `{id}` is not registered with upstream `{name}` (its etcd lease expired, or it was deregistered): register it again with PUT /api/registry/{name}/{id}"
                ),
            )
        };
        let resp =
            self.bounded("reading the key", client.get(key.as_str(), None)).await.map_err(|e| self.unavailable(e))?;
        let Some(lease) = resp.kvs().first().map(KeyValue::lease) else { return Err(gone()) };
        if lease == 0 {
            // Put by hand without a lease: it stays until deleted; nothing to renew.
            return Ok(json!({ "upstream": name, "id": id, "ttl_ms": null, "etcd": { "key": key, "lease": 0 } }));
        }
        let renewed = async {
            let (mut keeper, mut stream) = client.lease_keep_alive(lease).await?;
            keeper.keep_alive().await?;
            stream.message().await
        };
        let answer = self.bounded("renewing the lease", renewed).await.map_err(|e| self.unavailable(e))?;
        match answer {
            Some(a) if a.ttl() > 0 => Ok(json!({
                "upstream": name,
                "id": id,
                "ttl_ms": a.ttl() * 1000,
                "etcd": { "key": key, "lease": lease },
            })),
            _ => Err(gone()),
        }
    }

    /// `DELETE /api/registry/{upstream}/{id}`: deletes the key and revokes its lease.
    pub async fn deregister(&self, id: &str) -> Result<Value, Refused> {
        let name = self.upstream.as_str();
        let mut client = self.client()?;
        let key = self.key(id);
        let resp = self
            .bounded("deleting the key", client.delete(key.as_str(), Some(DeleteOptions::new().with_prev_key())))
            .await
            .map_err(|e| self.unavailable(e))?;
        let Some(prev) = resp.prev_kvs().first() else {
            return Err(Refused::new(
                StatusCode::NOT_FOUND,
                "id",
                format!("instance `{id}` is not registered with upstream `{name}` (no key {key} in etcd)"),
            ));
        };
        if prev.lease() != 0 {
            let _ = self.bounded("revoking the lease", client.lease_revoke(prev.lease())).await;
        }
        tracing::info!(upstream = %name, backend = %id, key = %key, "instance deregistered from etcd");
        Ok(json!({ "upstream": name, "id": id, "deregistered": true }))
    }

    /// `GET /api/registry`: this upstream's instances as last read from etcd.
    pub fn list(&self) -> Value {
        let instances: Vec<Value> = self
            .instances()
            .iter()
            .map(|i| {
                json!({
                    "id": i.id,
                    "address": i.addr.to_string(),
                    "weight": i.weight,
                    "zone": i.zone,
                    "labels": i.labels.iter().cloned().collect::<BTreeMap<_, _>>(),
                    "key": self.key(&i.id),
                })
            })
            .collect();
        json!({
            "upstream": self.upstream,
            "source": "etcd",
            "prefix": self.dir(),
            "default_ttl_ms": self.cfg.default_ttl.as_millis() as u64,
            "max_instances": self.cfg.max_instances,
            "instances": instances,
        })
    }
}

fn with_state(states: &Mutex<HashMap<String, SourceState>>, upstream: &str, f: impl FnOnce(&mut SourceState)) {
    if let Some(s) = states.lock().unwrap_or_else(|e| e.into_inner()).get_mut(upstream) {
        f(s);
    }
}

/// Connects, reads and watches `etcd`'s prefix for its upstream until `stop`,
/// publishing every change; reconnects (with backoff) after a failure, keeping the pool.
pub(super) async fn run(
    etcd: Arc<Etcd>,
    lookup: Lookup,
    states: Arc<Mutex<HashMap<String, SourceState>>>,
    stop: CancellationToken,
) {
    let name = etcd.upstream.clone();
    let endpoints = etcd.cfg.endpoints.join(", ");
    let opts = ConnectOptions::new()
        .with_connect_timeout(etcd.cfg.timeout)
        .with_keep_alive(Duration::from_secs(5), etcd.cfg.timeout)
        .with_keep_alive_while_idle(true);
    // The client connects lazily: this only checks the endpoints' form.
    let mut client = match Client::connect(&etcd.cfg.endpoints, Some(opts)).await {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(upstream = %name, endpoints = %endpoints, "etcd discovery is off for this upstream: {e}");
            super::note(&states, &name, Err(format!("etcd client: {e}")));
            return;
        }
    };
    let _ = etcd.client.set(client.clone());
    with_state(&states, &name, |s| s.connected = Some(false));
    tracing::info!(upstream = %name, endpoints = %endpoints, prefix = %etcd.dir(), "etcd discovery started");
    let mut revision: Option<i64> = None;
    let mut backoff = BACKOFF_MIN;
    // Since when etcd has been unreachable (`None`: connected, or never tried).
    let mut down_since: Option<Instant> = None;
    let mut first = true;
    loop {
        let mut connected = || {
            if let Some(since) = down_since.take() {
                tracing::info!(upstream = %name, endpoints = %endpoints, after = ?since.elapsed(), "etcd reachable again; the watch resumes");
            }
            first = false;
            backoff = BACKOFF_MIN;
            with_state(&states, &name, |s| {
                s.connected = Some(true);
                s.last_error = None;
                s.last_error_ms = None;
            });
        };
        let ended = tokio::select! {
            _ = stop.cancelled() => return,
            e = etcd.session(&mut client, &mut revision, &lookup, &states, &mut connected) => e,
        };
        let Ended::Unreachable(why) = ended;
        if down_since.is_none() {
            down_since = Some(Instant::now());
            if first {
                tracing::warn!(upstream = %name, endpoints = %endpoints, "etcd unreachable; no backends from it until it answers (retrying): {why}");
            } else {
                tracing::warn!(upstream = %name, endpoints = %endpoints, revision = revision.unwrap_or(0), "etcd unreachable; keeping the last known backends and retrying: {why}");
            }
        } else {
            tracing::debug!(upstream = %name, "etcd still unreachable: {why}");
        }
        super::note(&states, &name, Err(why));
        with_state(&states, &name, |s| s.connected = Some(false));
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source() -> Etcd {
        let cfg = EtcdSource {
            endpoints: vec!["http://127.0.0.1:2379".into()],
            prefix: "/gateway/".into(),
            timeout: Duration::from_secs(2),
            default_ttl: Duration::from_secs(10),
            max_instances: 10,
        };
        Etcd::new("books".into(), cfg)
    }

    #[test]
    fn keys_are_prefix_upstream_and_one_id_segment() {
        let e = source();
        assert_eq!(e.key("web-1"), "/gateway/books/web-1");
        assert_eq!(e.id_of("/gateway/books/web-1"), Some("web-1"));
        assert_eq!(e.id_of("/gateway/books/"), None);
        assert_eq!(e.id_of("/gateway/books/a/b"), None);
        assert_eq!(e.id_of("/gateway/booksx/a"), None);
    }
}
