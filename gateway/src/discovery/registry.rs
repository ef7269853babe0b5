//! The embedded registry (the laptop default, as Eureka and the Spring registry do it):
//! instances of an upstream with `discovery.registry` register over HTTP on the admin
//! listener, renew their registration with heartbeats, and deregister on shutdown; one
//! whose TTL passes without a heartbeat is removed.
//!
//! | request | what |
//! |---|---|
//! | `PUT /api/registry/{upstream}/{id}` + JSON `{"address", "weight", "zone", "labels", "ttl"}` | register or update (idempotent) |
//! | `PUT /api/registry/{upstream}/{id}/heartbeat` | renew; `404` + `"register_again": true` when unknown |
//! | `DELETE /api/registry/{upstream}/{id}` | deregister at once |
//! | `GET /api/registry` | every instance with its expiry |
//!
//! The API only edits the table; one publisher task turns each upstream's table into a
//! pool snapshot ([`super::publish`]), so a burst of registrations costs one publish, not
//! one per request.

use super::{Instance, Lookup, SourceState};
use crate::config::{self, RegistrySource};
use crate::pool::Source;
use crate::upstream::Upstream;
use http::StatusCode;
use serde::Deserialize;
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// Largest registration body.
pub const MAX_BODY: usize = 64 * 1024;

/// How often expired registrations are looked for.
const EXPIRY_TICK: Duration = Duration::from_millis(250);

/// The registered instances of every registry upstream.
#[derive(Debug, Default)]
pub struct Registry {
    tables: Mutex<HashMap<String, Table>>,
    /// Upstreams whose table changed since they were last published.
    dirty: Mutex<BTreeSet<String>>,
    wake: Notify,
}

#[derive(Debug, Default)]
struct Table {
    instances: BTreeMap<String, Registered>,
}

#[derive(Debug, Clone)]
struct Registered {
    instance: Instance,
    ttl: Duration,
    expires: Instant,
    registered_at_ms: u64,
    renewed_at_ms: u64,
}

/// A refused registry request: status, message, and the field it is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    /// HTTP status (4xx).
    pub status: StatusCode,
    /// What is wrong and what to do.
    pub message: String,
    /// The field (of the body or the path) it is about.
    pub field: &'static str,
}

impl Refused {
    pub(super) fn new(status: StatusCode, field: &'static str, message: impl Into<String>) -> Self {
        Refused { status, message: message.into(), field }
    }

    /// The JSON body: `{"error", "field"}`.
    pub fn body(&self) -> Value {
        json!({ "error": self.message, "field": self.field })
    }
}

/// The JSON body of `PUT /api/registry/{upstream}/{id}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Registration {
    address: String,
    #[serde(default = "one")]
    weight: u32,
    #[serde(default)]
    zone: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default, with = "humantime_serde")]
    ttl: Option<Duration>,
}

fn one() -> u32 {
    1
}

/// The registry settings of `up`, or why it takes no registrations.
fn settings<'a>(up: Option<&'a Upstream>, name: &str) -> Result<&'a RegistrySource, Refused> {
    let Some(up) = up else {
        return Err(Refused::new(
            StatusCode::NOT_FOUND,
            "upstream",
            format!("no upstream `{name}` in the gateway's config"),
        ));
    };
    up.config.discovery.as_ref().and_then(|d| d.registry.as_ref()).ok_or_else(|| {
        Refused::new(
            StatusCode::CONFLICT,
            "upstream",
            format!("upstream `{name}` does not take registrations: its config has no `discovery.registry` (nor `discovery.etcd`)"),
        )
    })
}

/// Refuses an id a static backend of the upstream has.
pub(super) fn static_id(up: Option<&Upstream>, name: &str, id: &str) -> Result<(), Refused> {
    if up.is_some_and(|u| u.config.backends.iter().any(|b| b.id() == id)) {
        return Err(Refused::new(
            StatusCode::CONFLICT,
            "id",
            format!("upstream `{name}` has a static backend with the id `{id}`: register under another id"),
        ));
    }
    Ok(())
}

/// An instance id: 1 to 128 characters of `A-Z a-z 0-9 - . _ : ~ @`.
pub(super) fn check_id(id: &str) -> Result<(), Refused> {
    let ok =
        !id.is_empty() && id.len() <= 128 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._:~@".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(Refused::new(
            StatusCode::BAD_REQUEST,
            "id",
            format!("`{id}` is not a valid instance id: 1 to 128 characters of letters, digits and - . _ : ~ @"),
        ))
    }
}

/// Parses a registration body, naming the field that is wrong.
fn parse(body: &[u8]) -> Result<Registration, Refused> {
    let mut de = serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let message = e.inner().to_string();
        let missing = message.strip_prefix("missing field `").and_then(|m| m.split('`').next()).map(str::to_owned);
        let field: &'static str = match missing.as_deref().unwrap_or(path.split('.').next().unwrap_or("")) {
            "address" => "address",
            "weight" => "weight",
            "zone" => "zone",
            "labels" => "labels",
            "ttl" => "ttl",
            _ => "body",
        };
        let message = match message.find(" at line ") {
            Some(i) => message[..i].to_owned(),
            None => message,
        };
        Refused::new(StatusCode::BAD_REQUEST, field, format!("{field}: {message}"))
    })
}

/// A registration body checked as the API checks it.
pub(super) struct Checked {
    /// The instance it describes.
    pub instance: Instance,
    /// Its TTL (the body's, or the default).
    pub ttl: Duration,
    /// The body in its normal form (what the etcd source stores).
    pub normal: Value,
}

/// Checks a registration of instance `id`: its id, body, address (a host name is looked
/// up now), weight and TTL; errors name the field. The registry API and the etcd source
/// (for its values) both take a registration through here.
pub(super) async fn check(id: &str, body: &[u8], default_ttl: Duration) -> Result<Checked, Refused> {
    check_id(id)?;
    let reg = parse(body)?;
    let addr = resolve(&reg.address).await?;
    if reg.weight == 0 {
        return Err(Refused::new(StatusCode::BAD_REQUEST, "weight", "weight: must be at least 1"));
    }
    let ttl = reg.ttl.unwrap_or(default_ttl);
    let (lo, hi) = config::TTL_RANGE;
    if ttl < lo || ttl > hi {
        return Err(Refused::new(
            StatusCode::BAD_REQUEST,
            "ttl",
            format!("ttl: {ttl:?} is out of range: from {lo:?} to {hi:?} (heartbeats come every third of it)"),
        ));
    }
    let normal = json!({
        "address": reg.address,
        "weight": reg.weight,
        "zone": reg.zone,
        "labels": reg.labels,
        "ttl": humantime_serde::re::humantime::format_duration(ttl).to_string(),
    });
    let instance = Instance {
        id: id.to_owned(),
        addr,
        weight: reg.weight,
        zone: reg.zone,
        labels: reg.labels.into_iter().collect(),
    };
    Ok(Checked { instance, ttl, normal })
}

/// `host:port` to a socket address; a host name is looked up once, now.
async fn resolve(address: &str) -> Result<SocketAddr, Refused> {
    let bad = |why: &str| {
        Refused::new(
            StatusCode::BAD_REQUEST,
            "address",
            format!("address: `{address}` {why} (expected host:port, e.g. 127.0.0.1:9001)"),
        )
    };
    if let Ok(addr) = address.parse::<SocketAddr>() {
        return if addr.port() == 0 { Err(bad("has port 0")) } else { Ok(addr) };
    }
    match address.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0) => {}
        _ => return Err(bad("is not host:port")),
    }
    let found = tokio::time::timeout(Duration::from_secs(2), tokio::net::lookup_host(address)).await;
    match found {
        Ok(Ok(mut addrs)) => addrs.next().ok_or_else(|| bad("resolves to no address")),
        Ok(Err(e)) => Err(bad(&format!("does not resolve: {e}"))),
        Err(_) => Err(bad("did not resolve within 2s")),
    }
}

impl Registry {
    /// `PUT /api/registry/{upstream}/{id}`: registers or updates an instance.
    pub async fn register(&self, up: Option<&Upstream>, name: &str, id: &str, body: &[u8]) -> Result<Value, Refused> {
        let cfg = settings(up, name)?.clone();
        check_id(id)?;
        static_id(up, name, id)?;
        let Checked { instance, ttl, .. } = check(id, body, cfg.default_ttl).await?;
        let addr = instance.addr;
        let now_ms = crate::metrics::now_ms();
        let mut tables = self.tables.lock().unwrap_or_else(|e| e.into_inner());
        let table = tables.entry(name.to_owned()).or_default();
        let known = table.instances.get(id).map(|r| r.registered_at_ms);
        if known.is_none() && table.instances.len() >= cfg.max_instances {
            return Err(Refused::new(
                StatusCode::CONFLICT,
                "upstream",
                format!(
                    "upstream `{name}` already has {} registered instances, its limit (discovery.registry.max_instances): deregister some or raise the limit",
                    table.instances.len()
                ),
            ));
        }
        let changed = table.instances.get(id).is_none_or(|r| r.instance != instance);
        table.instances.insert(
            id.to_owned(),
            Registered {
                instance,
                ttl,
                expires: Instant::now() + ttl,
                registered_at_ms: known.unwrap_or(now_ms),
                renewed_at_ms: now_ms,
            },
        );
        drop(tables);
        if changed {
            if known.is_none() {
                tracing::info!(upstream = %name, backend = %id, address = %addr, ttl = ?ttl, "instance registered");
            } else {
                tracing::info!(upstream = %name, backend = %id, address = %addr, "registration updated");
            }
            self.mark(name);
        }
        Ok(json!({
            "upstream": name,
            "id": id,
            "address": addr.to_string(),
            "registered": known.is_none(),
            "ttl_ms": ttl.as_millis() as u64,
        }))
    }

    /// `PUT /api/registry/{upstream}/{id}/heartbeat`: renews a registration.
    pub fn heartbeat(&self, up: Option<&Upstream>, name: &str, id: &str) -> Result<Value, Refused> {
        settings(up, name)?;
        let mut tables = self.tables.lock().unwrap_or_else(|e| e.into_inner());
        let Some(r) = tables.get_mut(name).and_then(|t| t.instances.get_mut(id)) else {
            return Err(Refused::new(
                StatusCode::NOT_FOUND,
                "id",
                format!(
                    "instance `{id}` is not registered with upstream `{name}` (it expired, was deregistered, or the gateway restarted): register it again with PUT /api/registry/{name}/{id}"
                ),
            ));
        };
        r.expires = Instant::now() + r.ttl;
        r.renewed_at_ms = crate::metrics::now_ms();
        Ok(json!({ "upstream": name, "id": id, "ttl_ms": r.ttl.as_millis() as u64 }))
    }

    /// `DELETE /api/registry/{upstream}/{id}`: deregisters at once.
    pub fn deregister(&self, up: Option<&Upstream>, name: &str, id: &str) -> Result<Value, Refused> {
        settings(up, name)?;
        let removed =
            self.tables.lock().unwrap_or_else(|e| e.into_inner()).get_mut(name).and_then(|t| t.instances.remove(id));
        let Some(r) = removed else {
            return Err(Refused::new(
                StatusCode::NOT_FOUND,
                "id",
                format!("instance `{id}` is not registered with upstream `{name}`"),
            ));
        };
        tracing::info!(upstream = %name, backend = %id, address = %r.instance.addr, "instance deregistered");
        self.mark(name);
        Ok(json!({ "upstream": name, "id": id, "deregistered": true }))
    }

    /// `GET /api/registry`: every registry upstream and its instances with their expiry.
    pub fn list(&self, upstreams: &[Arc<Upstream>]) -> Value {
        let tables = self.tables.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let list: Vec<Value> = upstreams
            .iter()
            .filter_map(|up| {
                let cfg = up.config.discovery.as_ref()?.registry.as_ref()?;
                let instances: Vec<Value> = tables
                    .get(&up.name)
                    .map(|t| {
                        t.instances
                            .values()
                            .map(|r| {
                                json!({
                                    "id": r.instance.id,
                                    "address": r.instance.addr.to_string(),
                                    "weight": r.instance.weight,
                                    "zone": r.instance.zone,
                                    "labels": r.instance.labels.iter().cloned().collect::<BTreeMap<_, _>>(),
                                    "ttl_ms": r.ttl.as_millis() as u64,
                                    "expires_in_ms": r.expires.saturating_duration_since(now).as_millis() as u64,
                                    "registered_at_ms": r.registered_at_ms,
                                    "renewed_at_ms": r.renewed_at_ms,
                                })
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                Some(json!({
                    "upstream": up.name,
                    "default_ttl_ms": cfg.default_ttl.as_millis() as u64,
                    "max_instances": cfg.max_instances,
                    "instances": instances,
                }))
            })
            .collect();
        json!({ "upstreams": list })
    }

    /// After a config reload: publishes every registry upstream of the new view again (a
    /// rebuilt upstream carried its members over; this catches changes made meanwhile),
    /// and forgets the instances of upstreams that no longer take registrations.
    pub fn sync(&self, upstreams: &[Arc<Upstream>]) {
        let takes = |name: &str| {
            upstreams
                .iter()
                .any(|u| u.name == name && u.config.discovery.as_ref().is_some_and(|d| d.registry.is_some()))
        };
        self.tables.lock().unwrap_or_else(|e| e.into_inner()).retain(|name, t| {
            let keep = takes(name);
            if !keep && !t.instances.is_empty() {
                tracing::warn!(upstream = %name, instances = t.instances.len(), "registrations dropped: the upstream no longer has `discovery.registry`");
            }
            keep
        });
        for up in upstreams.iter().filter(|u| takes(&u.name)) {
            self.mark(&up.name);
        }
    }

    fn mark(&self, name: &str) {
        self.dirty.lock().unwrap_or_else(|e| e.into_inner()).insert(name.to_owned());
        self.wake.notify_one();
    }

    /// The instances of `name` now.
    fn set(&self, name: &str) -> Vec<Instance> {
        let tables = self.tables.lock().unwrap_or_else(|e| e.into_inner());
        tables.get(name).map(|t| t.instances.values().map(|r| r.instance.clone()).collect()).unwrap_or_default()
    }

    /// Removes registrations whose TTL passed; returns the upstreams that changed.
    fn expire(&self, now: Instant) -> Vec<String> {
        let mut changed = Vec::new();
        let mut tables = self.tables.lock().unwrap_or_else(|e| e.into_inner());
        for (name, t) in tables.iter_mut() {
            let before = t.instances.len();
            t.instances.retain(|id, r| {
                let alive = r.expires > now;
                if !alive {
                    tracing::warn!(upstream = %name, backend = %id, address = %r.instance.addr, ttl = ?r.ttl, "instance expired: no heartbeat within its TTL; removed");
                }
                alive
            });
            if t.instances.len() != before {
                changed.push(name.clone());
            }
        }
        changed
    }

    /// Starts the task that publishes changed tables and expires registrations, until `stop`.
    pub(super) fn spawn_publisher(
        self: &Arc<Self>,
        lookup: Lookup,
        states: Arc<Mutex<HashMap<String, SourceState>>>,
        stop: CancellationToken,
    ) {
        let registry = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(EXPIRY_TICK);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = registry.wake.notified() => {}
                    _ = tick.tick() => {
                        for name in registry.expire(Instant::now()) {
                            registry.dirty.lock().unwrap_or_else(|e| e.into_inner()).insert(name);
                        }
                    }
                }
                let dirty = std::mem::take(&mut *registry.dirty.lock().unwrap_or_else(|e| e.into_inner()));
                for name in dirty {
                    let Some(up) = lookup(&name) else { continue };
                    let set = registry.set(&name);
                    let count = set.len();
                    if let Some(p) = super::publish(&up, Source::Registry, &set) {
                        super::log_published(&name, Source::Registry, &p);
                    }
                    super::note(&states, &name, Ok(count));
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_bodies_name_their_field() {
        let e = parse(br#"{"weight": 2}"#).unwrap_err();
        assert_eq!((e.field, e.status), ("address", StatusCode::BAD_REQUEST));
        assert!(e.message.contains("missing field `address`"), "{}", e.message);
        let e = parse(br#"{"address": "127.0.0.1:1", "weight": "heavy"}"#).unwrap_err();
        assert_eq!(e.field, "weight");
        let e = parse(br#"{"address": "127.0.0.1:1", "ttl": "soon"}"#).unwrap_err();
        assert_eq!(e.field, "ttl");
        let e = parse(br#"{"address": "127.0.0.1:1", "colour": "red"}"#).unwrap_err();
        assert!(e.message.contains("unknown field `colour`"), "{}", e.message);
        let e = parse(b"not json").unwrap_err();
        assert_eq!(e.field, "body");
        let r = parse(br#"{"address": "127.0.0.1:1", "ttl": "30s", "labels": {"v": "2"}}"#).unwrap();
        assert_eq!((r.ttl, r.weight, r.labels["v"].as_str()), (Some(Duration::from_secs(30)), 1, "2"));
    }

    #[test]
    fn ids_are_checked() {
        assert!(check_id("web-1.eu_2:8080").is_ok());
        assert_eq!(check_id("").unwrap_err().field, "id");
        assert!(check_id("a b").is_err());
        assert!(check_id(&"x".repeat(129)).is_err());
    }

    #[test]
    fn addresses_must_be_host_and_port() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        assert_eq!(rt.block_on(resolve("127.0.0.1:9001")).unwrap(), "127.0.0.1:9001".parse().unwrap());
        assert_eq!(rt.block_on(resolve("localhost:9001")).unwrap().port(), 9001);
        for bad in ["127.0.0.1", "127.0.0.1:0", ":80", "10.0.0.1:http", "host:99999"] {
            let e = rt.block_on(resolve(bad)).unwrap_err();
            assert_eq!(e.field, "address", "{bad}");
        }
    }
}
