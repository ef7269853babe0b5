//! DNS discovery: the backends of an upstream are the answers to one DNS query, asked
//! again every `refresh` and when the answer's TTL runs out (at most once a second).
//!
//! - `a` / `aaaa`: every address, with the configured port, weight 1;
//! - `srv`: the records of the lowest priority; each target's addresses with the
//!   record's port and weight (a weight of 0 counts as 1).
//!
//! Instance ids are the socket addresses (`10.0.0.7:8080`): the same on every replica.
//! A failed or empty answer (NXDOMAIN, or no records of the type asked) keeps the last
//! known backends and is logged, each kind once until it changes: a DNS hiccup or a
//! record set removed by mistake never empties the pool.

use super::{Instance, Lookup, SourceState};
use crate::config::{DnsRecordType, DnsSource};
use crate::pool::Source;
use hickory_resolver::TokioResolver;
use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig};
use hickory_resolver::lookup::Lookup as Answer;
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::{RData, RecordType};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// Never resolve more often than this, whatever the TTL says (0 is common).
const MIN_INTERVAL: Duration = Duration::from_secs(1);

/// Builds the resolver: the configured server (UDP, then TCP), or the system's.
fn resolver(cfg: &DnsSource) -> Result<TokioResolver, String> {
    let provider = TokioRuntimeProvider::default();
    let mut builder = match cfg.resolver.as_deref().and_then(crate::config::parse_resolver) {
        Some(addr) => {
            let mut udp = ConnectionConfig::udp();
            udp.port = addr.port();
            let mut tcp = ConnectionConfig::tcp();
            tcp.port = addr.port();
            let server = NameServerConfig::new(addr.ip(), true, vec![udp, tcp]);
            TokioResolver::builder_with_config(ResolverConfig::from_name_servers(vec![server]), provider)
        }
        None => TokioResolver::builder(provider).map_err(|e| format!("cannot read the system's DNS settings: {e}"))?,
    };
    let opts = builder.options_mut();
    opts.timeout = Duration::from_secs(2);
    opts.attempts = 2;
    // Every refresh asks the server: the TTL schedules the next question instead.
    opts.cache_size = 0;
    builder.build().map_err(|e| format!("cannot build the DNS resolver: {e}"))
}

/// Why a lookup gave no backends; the text says what was asked and what came back.
#[derive(Debug, PartialEq, Eq)]
enum Miss {
    /// The server answered without usable records: the name is gone (NXDOMAIN) or has
    /// none of the type asked, as when a service is scaled to zero or its records are
    /// removed by mistake.
    Empty(String),
    /// No usable answer: a timeout, a refusal, a server failure.
    Failed(String),
}

impl Miss {
    fn same_kind(&self, other: &Miss) -> bool {
        std::mem::discriminant(self) == std::mem::discriminant(other)
    }
}

/// Asks `what` (`A books.service.test`) about `name`.
async fn ask(r: &TokioResolver, name: &str, rtype: RecordType, what: &str) -> Result<Answer, Miss> {
    r.lookup(name, rtype).await.map_err(|e| {
        if e.is_nx_domain() {
            Miss::Empty(format!("{what}: the name does not exist (NXDOMAIN)"))
        } else if e.is_no_records_found() {
            Miss::Empty(format!("{what}: the name has no {rtype} records"))
        } else {
            Miss::Failed(format!("{what}: {e}"))
        }
    })
}

/// One lookup: the instances and how long the answer may be kept, or why there are none.
async fn resolve(r: &TokioResolver, cfg: &DnsSource) -> Result<(Vec<Instance>, Duration), Miss> {
    let name = cfg.name.as_str();
    let instance = |addr: SocketAddr, weight: u32| Instance {
        id: addr.to_string(),
        addr,
        weight: weight.max(1),
        zone: String::new(),
        labels: Vec::new(),
    };
    let valid = |until: Instant| until.saturating_duration_since(Instant::now());
    match cfg.record_type {
        DnsRecordType::A | DnsRecordType::Aaaa => {
            let (rtype, what) = match cfg.record_type {
                DnsRecordType::A => (RecordType::A, "A"),
                _ => (RecordType::AAAA, "AAAA"),
            };
            let port = cfg.port.unwrap_or(80);
            let lookup = ask(r, name, rtype, &format!("{what} {name}")).await?;
            let ips: Vec<IpAddr> = lookup
                .answers()
                .iter()
                .filter_map(|rec| match &rec.data {
                    RData::A(a) => Some(IpAddr::V4(a.0)),
                    RData::AAAA(a) => Some(IpAddr::V6(a.0)),
                    _ => None,
                })
                .collect();
            if ips.is_empty() {
                return Err(Miss::Empty(format!("{what} {name}: the answer has no {what} records")));
            }
            Ok((
                ips.into_iter().map(|ip| instance(SocketAddr::new(ip, port), 1)).collect(),
                valid(lookup.valid_until()),
            ))
        }
        DnsRecordType::Srv => {
            let lookup = ask(r, name, RecordType::SRV, &format!("SRV {name}")).await?;
            let srvs: Vec<_> = lookup
                .answers()
                .iter()
                .filter_map(|rec| match &rec.data {
                    RData::SRV(s) => Some(s.clone()),
                    _ => None,
                })
                .collect();
            let Some(lowest) = srvs.iter().map(|s| s.priority).min() else {
                return Err(Miss::Empty(format!("SRV {name}: the answer has no SRV records")));
            };
            let mut until = lookup.valid_until();
            let mut out = Vec::new();
            for srv in srvs.iter().filter(|s| s.priority == lowest) {
                let target = srv.target.to_string();
                // A target without an address fails the whole lookup, as any other failure:
                // publishing the rest would drop that target's backends on a hiccup.
                let ips = r
                    .lookup_ip(srv.target.clone())
                    .await
                    .map_err(|e| Miss::Failed(format!("SRV target {target}: {e}")))?;
                until = until.min(ips.valid_until());
                out.extend(ips.iter().map(|ip| instance(SocketAddr::new(ip, srv.port), u32::from(srv.weight))));
            }
            if out.is_empty() {
                return Err(Miss::Empty(format!("SRV {name}: no target has an address")));
            }
            Ok((out, valid(until)))
        }
    }
}

/// Resolves `cfg.name` for the upstream `name` until `stop`, publishing each new answer.
pub(super) async fn run(
    name: String,
    cfg: DnsSource,
    lookup: Lookup,
    states: Arc<Mutex<HashMap<String, SourceState>>>,
    stop: CancellationToken,
) {
    let resolver = match resolver(&cfg) {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(upstream = %name, dns = %cfg.name, "DNS discovery is off for this upstream: {e}");
            super::note(&states, &name, Err(e));
            return;
        }
    };
    let server = cfg.resolver.clone().unwrap_or_else(|| "system".into());
    tracing::info!(upstream = %name, dns = %cfg.name, record = ?cfg.record_type, resolver = %server, refresh = ?cfg.refresh, "DNS discovery started");
    // Why the last lookup gave no backends (`None`: it gave some); logged at warn when
    // it starts or changes kind, at debug while it lasts.
    let mut trouble: Option<Miss> = None;
    loop {
        let wait = match resolve(&resolver, &cfg).await {
            Ok((set, ttl)) => {
                if trouble.take().is_some() {
                    tracing::info!(upstream = %name, dns = %cfg.name, instances = set.len(), "DNS lookup works again");
                }
                if let Some(up) = lookup(&name)
                    && let Some(p) = super::publish(&up, Source::Dns, &set)
                {
                    super::log_published(&name, Source::Dns, &p);
                }
                super::note(&states, &name, Ok(set.len()));
                cfg.refresh.min(ttl.max(MIN_INTERVAL))
            }
            Err(miss) => {
                let again = trouble.as_ref().is_some_and(|t| t.same_kind(&miss));
                let (e, wait, what) = match &miss {
                    Miss::Empty(e) => (e, cfg.refresh, "DNS lookup found no backends; keeping the last known ones"),
                    Miss::Failed(e) => {
                        (e, cfg.refresh.min(MIN_INTERVAL * 2), "DNS lookup failed; keeping the last known backends")
                    }
                };
                if again {
                    tracing::debug!(upstream = %name, dns = %cfg.name, "{what}: {e}");
                } else {
                    tracing::warn!(upstream = %name, dns = %cfg.name, resolver = %server, "{what}: {e}");
                }
                super::note(&states, &name, Err(e.clone()));
                trouble = Some(miss);
                wait
            }
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}
