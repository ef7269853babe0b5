//! A canary strategy: a second selector that decides a share of an upstream's requests,
//! chosen by a stable hash of a key (the client IP by default), so one client sees one
//! strategy, on every gateway of a fleet and across restarts. Requests are counted per
//! arm (live, canary) and status class, so the two can be compared before a promotion.

use super::Selector;
use crate::config::{self, ArmKey};
use crate::metrics::{Counter, PerWorker};
use crate::plugin::lookup;
use std::net::IpAddr;

/// Which strategy decided a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arm {
    /// The upstream's `strategy`.
    Live = 0,
    /// Its `canary`.
    Canary = 1,
}

impl Arm {
    /// Label values, by `Arm as usize`.
    pub const LABELS: [&'static str; 2] = ["live", "canary"];
}

/// What one worker counted per arm: responses by status class (`1xx`..`5xx`).
#[derive(Debug, Default)]
pub struct ArmShard {
    /// `[arm][class]`.
    pub responses: [[Counter; 5]; 2],
}

/// An upstream's canary: its selector, the share it takes and the key that splits.
#[derive(Debug)]
pub struct Canary {
    /// The canary's strategy (one plugin), with failures and fallbacks of its own.
    pub selector: Selector,
    /// The configuration it was built from.
    pub config: config::Canary,
    /// Keys hashing below this go to the canary (`share` of the hash space).
    threshold: u64,
    /// Per worker: responses by arm and status class.
    shards: PerWorker<ArmShard>,
}

impl Canary {
    /// A canary deciding `config.share` of the requests with `selector`.
    pub fn new(selector: Selector, config: config::Canary) -> Self {
        let threshold = threshold(config.share);
        Canary { selector, config, threshold, shards: PerWorker::default() }
    }

    /// Whether the canary decides this request: its key hashes into the canary's share.
    /// A request without the key (no such header, cookie or parameter) goes to the
    /// live strategy.
    pub fn takes(&self, parts: &http::request::Parts, client_ip: IpAddr) -> bool {
        let hash = match &self.config.key {
            ArmKey::ClientIp => Some(match client_ip.to_canonical() {
                IpAddr::V4(v4) => hash(&v4.octets()),
                IpAddr::V6(v6) => hash(&v6.octets()),
            }),
            ArmKey::Header(name) => parts.headers.get(name.as_str()).map(|v| hash(v.as_bytes())),
            ArmKey::Cookie(name) => lookup::cookie(&parts.headers, name).map(|v| hash(v.as_bytes())),
            ArmKey::Query(name) => {
                parts.uri.query().and_then(|q| lookup::query_param(q, name)).map(|v| hash(v.as_bytes()))
            }
        };
        hash.is_some_and(|h| h <= self.threshold)
    }

    /// The canary as an upstream strategy: what a promotion makes it.
    pub fn strategy(&self) -> config::Chain {
        config::Chain::single(config::Strategy {
            plugin: self.config.plugin.clone(),
            params: self.config.params.clone(),
        })
    }

    /// Counts a response the client got from `arm`.
    #[inline]
    pub fn count(&self, arm: Arm, status: u16) {
        self.shards.local().responses[arm as usize][crate::metrics::class(status)].inc();
    }

    /// Responses by status class (`1xx`..`5xx`) that `arm` decided, all workers.
    pub fn responses(&self, arm: Arm) -> [u64; 5] {
        std::array::from_fn(|class| self.shards.sum(|s| s.responses[arm as usize][class].get()))
    }
}

/// The largest hash inside `share` of the 64-bit hash space.
fn threshold(share: f64) -> u64 {
    if share >= 1.0 { u64::MAX } else { (share.max(0.0) * 2f64.powi(64)) as u64 }
}

/// A stable 64-bit hash of a key (FNV-1a, then the MurmurHash3 finaliser so that keys
/// differing in a last byte spread over the whole space): the same on every gateway,
/// build and restart, which is what keeps a client on one arm across a fleet.
pub fn hash(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_share_of_keys_is_the_configured_share_and_a_key_keeps_its_arm() {
        for share in [0.05, 0.3, 0.5] {
            let t = threshold(share);
            let n = 20_000;
            let taken = (0..n).filter(|i| hash(format!("user-{i}").as_bytes()) <= t).count();
            let got = taken as f64 / n as f64;
            assert!((got - share).abs() < 0.015, "share {share}: {got}");
        }
        // Stable: the same key has the same hash on every gateway and build (pinned, so
        // a change of hash function, which would move clients between arms, is noticed).
        assert_eq!(hash(b"user-42"), 0xa395_32c7_ab05_1e8d);
        assert_eq!(hash(&[127, 0, 0, 1]), 0xe2b8_dcd1_4d0d_e18a);
        assert_eq!(threshold(1.0), u64::MAX);
    }
}
