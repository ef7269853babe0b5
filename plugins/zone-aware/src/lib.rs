//! `zone-aware`: geo routing. Each request is placed in a zone, then served round robin by
//! the healthy backends whose `zone` is that zone. When that zone has no healthy backend
//! (or a retry has tried them all) the request goes round robin over all healthy
//! backends, so an outage in one region fails over instead of failing.
//!
//! The client's zone is, in this order:
//! 1. the value of the request header `header` (e.g. `x-region` or `cf-ipcountry`), mapped
//!    through `header_zones` (matched case-insensitively) when given, used as is
//!    otherwise;
//! 2. the zone of the longest `cidrs` prefix containing the client's IP (IPv4 or IPv6;
//!    an IPv4-mapped IPv6 address counts as IPv4);
//! 3. `default_zone`;
//! 4. none: all healthy backends, round robin.
//!
//! With `on_miss: pass`, a request whose zone has no healthy backend left (or that has
//! no zone) is passed to the next strategy of the upstream's chain instead of going
//! round robin over all healthy backends.
//!
//! Prefixes are flattened into disjoint ranges when the params are read, so a lookup is
//! one binary search however many prefixes there are. Backends are grouped by zone when
//! the pool changes. Each zone has its own round-robin counter in the host, shared by
//! all worker threads.
//!
//! Params (without any of `cidrs`, `header`, `default_zone` no client has a zone, so the
//! strategy is a plain round robin; a warning is logged):
//! - `cidrs` (object, CIDR → zone, default none), e.g. `{"10.1.0.0/16": "eu-west"}`; a
//!   plain address counts as a /32 (or /128).
//! - `header` (string, default none): the request header naming the client's zone.
//! - `header_zones` (object, header value → zone, default none; needs `header`).
//! - `default_zone` (string, default none): the zone of clients placed by neither.
//! - `on_miss` (`"round-robin"` or `"pass"`, default `"round-robin"`): what happens to a
//!   request with no zone match.
//!
//! ```yaml
//! upstreams:
//!   web:
//!     backends:
//!       - { address: "10.1.0.5:8080", zone: eu-west }
//!       - { address: "10.2.0.5:8080", zone: us-east }
//!     strategy:
//!       plugin: zone-aware
//!       params:
//!         header: cf-ipcountry
//!         header_zones: { FR: eu-west, DE: eu-west, US: us-east }
//!         cidrs: { "10.1.0.0/16": eu-west, "10.2.0.0/16": us-east, "2001:db8:1::/48": eu-west }
//!         default_zone: us-east
//! ```

use gateway_sdk::hash::StableBuildHasher;
use gateway_sdk::params::Params;
use gateway_sdk::{Backend, Decision, Pool, Request, Strategy, host};
use std::borrow::Cow;
use std::collections::HashMap;
use std::net::IpAddr;

/// The host counter of the round robin over all healthy backends.
const ALL_COUNTER: &str = "zone*";

/// A longest-prefix-match table from IP prefixes to zone numbers.
#[derive(Debug, Default, Clone)]
pub struct CidrTable {
    v4: Vec<Range>,
    v6: Vec<Range>,
}

/// Addresses `start..=end` belong to `zone` (IPv4 addresses as 32-bit numbers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Range {
    start: u128,
    end: u128,
    zone: u32,
}

/// A parsed prefix: IPv6 or not, and its first and last address.
fn parse_cidr(spec: &str) -> Result<(bool, u128, u128), String> {
    let (addr, len) = match spec.split_once('/') {
        Some((a, l)) => (a.trim(), Some(l.trim())),
        None => (spec.trim(), None),
    };
    let ip: IpAddr = addr.parse().map_err(|_| {
        format!("param 'cidrs': \"{spec}\" is not an IP prefix (expected e.g. \"10.1.0.0/16\" or \"2001:db8::/32\")")
    })?;
    let (v6, bits, value) = match ip {
        IpAddr::V4(a) => (false, 32u32, u128::from(u32::from(a))),
        IpAddr::V6(a) => (true, 128u32, u128::from(a)),
    };
    let len =
        match len {
            None => bits,
            Some(l) => l.parse::<u32>().ok().filter(|&l| l <= bits).ok_or_else(|| {
                format!("param 'cidrs': \"{spec}\" has an invalid prefix length (expected 0 to {bits})")
            })?,
        };
    // The low `bits - len` bits (all 128 for ::/0, where a shift by 128 would overflow).
    let host_mask: u128 = if len == bits { 0 } else { u128::MAX >> (128 - (bits - len)) };
    if value & host_mask != 0 {
        let network = match ip {
            IpAddr::V4(_) => IpAddr::from(std::net::Ipv4Addr::from((value & !host_mask) as u32)),
            IpAddr::V6(_) => IpAddr::from(std::net::Ipv6Addr::from(value & !host_mask)),
        };
        return Err(format!("param 'cidrs': \"{spec}\" has host bits set; did you mean \"{network}/{len}\"?"));
    }
    Ok((v6, value, value | host_mask))
}

/// Turns properly nested or disjoint prefixes (as CIDR prefixes always are) into sorted
/// disjoint ranges, each carrying the zone of its innermost (longest) prefix.
fn flatten(mut prefixes: Vec<Range>) -> Vec<Range> {
    // Outer prefixes before the ones they contain.
    prefixes.sort_by(|a, b| a.start.cmp(&b.start).then(b.end.cmp(&a.end)));
    let mut out = Vec::new();
    let mut emit = |start: u128, end: u128, zone: u32| {
        if start <= end {
            out.push(Range { start, end, zone });
        }
    };
    // Open prefixes, innermost last; `cursor` is the first address not yet emitted.
    let mut open: Vec<(u128, u32)> = Vec::new();
    let mut cursor = 0u128;
    for p in prefixes {
        while let Some(&(end, zone)) = open.last() {
            if end >= p.start {
                break;
            }
            emit(cursor, end, zone);
            cursor = end + 1; // end < p.start, so no overflow
            open.pop();
        }
        if let Some(&(_, zone)) = open.last() {
            emit(cursor, p.start - 1, zone); // p.start > an open prefix's start ≥ 0
        }
        cursor = p.start;
        open.push((p.end, p.zone));
    }
    while let Some((end, zone)) = open.pop() {
        emit(cursor, end, zone);
        match end.checked_add(1) {
            Some(next) => cursor = next,
            None => break, // reached the last address: enclosing prefixes end there too
        }
    }
    out
}

impl CidrTable {
    /// Builds the table from `(prefix, zone number)` pairs; refuses bad or duplicate
    /// prefixes, naming them.
    pub fn new<'a>(entries: impl IntoIterator<Item = (&'a str, u32)>) -> Result<Self, String> {
        let (mut v4, mut v6) = (Vec::new(), Vec::new());
        let mut seen: HashMap<(bool, u128, u128), &str, StableBuildHasher> = HashMap::default();
        for (spec, zone) in entries {
            let (is_v6, start, end) = parse_cidr(spec)?;
            if let Some(other) = seen.insert((is_v6, start, end), spec) {
                return Err(format!("param 'cidrs': \"{other}\" and \"{spec}\" are the same prefix; keep one"));
            }
            let r = Range { start, end, zone };
            if is_v6 { v6.push(r) } else { v4.push(r) }
        }
        Ok(CidrTable { v4: flatten(v4), v6: flatten(v6) })
    }

    /// True when the table has no prefix.
    pub fn is_empty(&self) -> bool {
        self.v4.is_empty() && self.v6.is_empty()
    }

    /// The zone number of the longest prefix containing `ip`.
    pub fn lookup(&self, ip: IpAddr) -> Option<u32> {
        let (ranges, value) = match ip {
            IpAddr::V4(a) => (&self.v4, u128::from(u32::from(a))),
            IpAddr::V6(a) => match a.to_ipv4_mapped() {
                Some(v4) => (&self.v4, u128::from(u32::from(v4))),
                None => (&self.v6, u128::from(a)),
            },
        };
        let i = ranges.partition_point(|r| r.start <= value);
        let r = ranges.get(i.checked_sub(1)?)?;
        (value <= r.end).then_some(r.zone)
    }
}

/// The healthy backends of one zone.
#[derive(Debug)]
struct Group {
    members: Vec<u32>,
    /// Its round-robin counter in the host.
    counter: String,
}

/// The strategy: one per plugin instance.
#[derive(Debug, Default)]
pub struct ZoneAware {
    /// Zone names the params mention, numbered.
    zones: Vec<String>,
    cidrs: CidrTable,
    /// Lower-case header name.
    header: Option<String>,
    /// Lower-case header value → zone number.
    header_zones: Option<HashMap<String, u32, StableBuildHasher>>,
    default_zone: Option<u32>,
    /// Pass (let the next strategy decide) when no zone matches.
    pass_on_miss: bool,
    pool: Pool,
    /// Zone name → its healthy backends.
    groups: HashMap<String, Group, StableBuildHasher>,
}

fn is_token(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_graphic() && !b"()<>@,;:\\\"/[]?={}".contains(&b))
}

impl ZoneAware {
    fn zone_number(&mut self, name: &str) -> u32 {
        match self.zones.iter().position(|z| z == name) {
            Some(i) => i as u32,
            None => {
                self.zones.push(name.to_owned());
                self.zones.len() as u32 - 1
            }
        }
    }

    /// The client's zone, reading only what the params need.
    fn client_zone(&self, req: &dyn Request) -> Option<Cow<'_, str>> {
        if let Some(name) = &self.header
            && let Some(value) = req.header(name)
        {
            let value = value.trim();
            if !value.is_empty() {
                match &self.header_zones {
                    None => return Some(Cow::Owned(value.to_owned())),
                    Some(map) => {
                        if let Some(&z) = map.get(value.to_ascii_lowercase().as_str()) {
                            return Some(Cow::Borrowed(&self.zones[z as usize]));
                        }
                    }
                }
            }
        }
        if !self.cidrs.is_empty()
            && let Ok(ip) = req.client_ip().parse::<IpAddr>()
            && let Some(z) = self.cidrs.lookup(ip)
        {
            return Some(Cow::Borrowed(&self.zones[z as usize]));
        }
        self.default_zone.map(|z| Cow::Borrowed(self.zones[z as usize].as_str()))
    }
}

/// The next of `members` in the turn kept by `counter`, skipping `exclude`.
fn round_robin(members: &[u32], counter: &str, exclude: &[u32]) -> Option<u32> {
    let n = members.len();
    if n == 0 {
        return None;
    }
    let turn = (host::counter_add(counter, 1) - 1).rem_euclid(n as i64) as usize;
    (0..n).map(|k| members[(turn + k) % n]).find(|i| !exclude.contains(i))
}

impl Strategy for ZoneAware {
    fn configure(&mut self, params: &str) -> Result<(), String> {
        let mut p = Params::parse(params)?;
        let cidrs = p.string_map("cidrs")?;
        let header = p.non_empty_string("header")?;
        let header_zones = p.string_map("header_zones")?;
        let default_zone = p.non_empty_string("default_zone")?;
        let pass_on_miss = p.one_of("on_miss", &["round-robin", "pass"])?.as_deref() == Some("pass");
        p.finish()?;

        let mut s = ZoneAware { pass_on_miss, ..ZoneAware::default() };
        let mut numbered = Vec::new();
        for (spec, zone) in cidrs.unwrap_or_default() {
            if zone.trim().is_empty() {
                return Err(format!("param 'cidrs': the zone of \"{spec}\" is empty"));
            }
            numbered.push((spec, s.zone_number(zone.trim())));
        }
        s.cidrs = CidrTable::new(numbered.iter().map(|(spec, z)| (spec.as_str(), *z)))?;
        if let Some(h) = &header
            && !is_token(h)
        {
            return Err(format!("param 'header': \"{h}\" is not a valid header name (e.g. \"x-region\")"));
        }
        s.header = header.map(|h| h.to_ascii_lowercase());
        if let Some(table) = header_zones {
            if s.header.is_none() {
                return Err(
                    "param 'header_zones' needs param 'header' (the request header whose values it maps)".into()
                );
            }
            let mut map = HashMap::default();
            for (value, zone) in table {
                if zone.trim().is_empty() {
                    return Err(format!("param 'header_zones': the zone of \"{value}\" is empty"));
                }
                let z = s.zone_number(zone.trim());
                map.insert(value.trim().to_ascii_lowercase(), z);
            }
            s.header_zones = Some(map);
        }
        s.default_zone = default_zone.map(|z| s.zone_number(&z));
        if s.cidrs.is_empty() && s.header.is_none() && s.default_zone.is_none() {
            host::log(
                host::level::WARN,
                "zone-aware: none of the params 'cidrs', 'header' or 'default_zone' is set, so no client has a zone \
                 and every request goes round robin over all healthy backends",
            );
        }
        *self = s;
        Ok(())
    }

    fn pool_changed(&mut self, _generation: u64, backends: Vec<Backend>) {
        let pool = Pool::new(backends);
        let mut groups: HashMap<String, Group, StableBuildHasher> = HashMap::default();
        for &i in pool.healthy() {
            let zone = &pool.backends()[i as usize].zone;
            if zone.is_empty() {
                continue;
            }
            groups
                .entry(zone.clone())
                .or_insert_with(|| Group { members: Vec::new(), counter: format!("zone:{zone}") })
                .members
                .push(i);
        }
        self.groups = groups;
        self.pool = pool;
    }

    fn pick(&mut self, req: &dyn Request, exclude: &[u32]) -> Decision {
        if self.pool.healthy().is_empty() {
            return Decision::no_backend();
        }
        if let Some(zone) = self.client_zone(req)
            && let Some(g) = self.groups.get(zone.as_ref())
            && let Some(i) = round_robin(&g.members, &g.counter, exclude)
        {
            return Decision::backend(i);
        }
        if self.pass_on_miss {
            return Decision::pass();
        }
        round_robin(self.pool.healthy(), ALL_COUNTER, exclude).map_or_else(Decision::no_backend, Decision::backend)
    }
}

gateway_sdk::export_strategy!(ZoneAware);

#[cfg(test)]
mod tests {
    use super::*;
    use gateway_sdk::TestRequest;
    use proptest::prelude::{ProptestConfig, prop, prop_assert, proptest};

    fn backend(i: usize, zone: &str, healthy: bool) -> Backend {
        Backend {
            id: format!("b{i}"),
            address: format!("10.9.0.{i}:80"),
            weight: 1,
            zone: zone.into(),
            labels: vec![],
            healthy,
        }
    }

    /// b0, b1: eu-west; b2, b3: us-east; b4: ap-south.
    fn regions() -> Vec<Backend> {
        vec![
            backend(0, "eu-west", true),
            backend(1, "eu-west", true),
            backend(2, "us-east", true),
            backend(3, "us-east", true),
            backend(4, "ap-south", true),
        ]
    }

    fn strategy(params: &str, backends: Vec<Backend>) -> ZoneAware {
        let mut s = ZoneAware::default();
        s.configure(params).unwrap();
        s.pool_changed(1, backends);
        s
    }

    fn picks(s: &mut ZoneAware, req: &TestRequest, n: usize) -> Vec<u32> {
        (0..n).map(|_| s.pick(req, &[]).backend_index().unwrap()).collect()
    }

    const CIDRS: &str = r#"{"cidrs": {
        "10.0.0.0/8": "us-east",
        "10.1.0.0/16": "eu-west",
        "10.1.7.0/24": "ap-south",
        "2001:db8::/32": "us-east",
        "2001:db8:1::/48": "eu-west"
    }}"#;

    #[test]
    fn clients_are_served_in_their_zone_round_robin() {
        host::reset();
        let mut s = strategy(CIDRS, regions());
        let eu = TestRequest::new().client_ip("10.1.2.3");
        assert_eq!(picks(&mut s, &eu, 4), [0, 1, 0, 1]);
        let us = TestRequest::new().client_ip("10.200.0.1");
        assert_eq!(picks(&mut s, &us, 4), [2, 3, 2, 3]);
    }

    #[test]
    fn the_longest_prefix_wins_for_ipv4_and_ipv6() {
        host::reset();
        let mut s = strategy(CIDRS, regions());
        let zone_of =
            |s: &mut ZoneAware, ip: &str| s.pick(&TestRequest::new().client_ip(ip), &[]).backend_index().unwrap();
        assert_eq!(zone_of(&mut s, "10.1.7.200"), 4, "/24 inside /16 inside /8");
        assert!([0, 1].contains(&zone_of(&mut s, "10.1.8.1")), "back in the /16 after the /24");
        assert!([2, 3].contains(&zone_of(&mut s, "10.2.0.1")));
        assert!([0, 1].contains(&zone_of(&mut s, "2001:db8:1:ffff::1")));
        assert!([2, 3].contains(&zone_of(&mut s, "2001:db8:2::1")));
        assert!([0, 1].contains(&zone_of(&mut s, "::ffff:10.1.0.9")), "IPv4-mapped IPv6");
    }

    #[test]
    fn headers_name_the_zone_directly_or_through_a_table() {
        host::reset();
        let mut s = strategy(r#"{"header": "X-Region"}"#, regions());
        let req = TestRequest::new().header("x-region", "us-east");
        assert_eq!(picks(&mut s, &req, 2), [2, 3]);

        let mut s = strategy(
            r#"{"header": "cf-ipcountry", "header_zones": {"FR": "eu-west", "us": "us-east"}, "cidrs": {"10.0.0.0/8": "ap-south"}}"#,
            regions(),
        );
        let fr = TestRequest::new().header("cf-ipcountry", "fr").client_ip("10.0.0.1");
        assert!(picks(&mut s, &fr, 4).iter().all(|i| [0, 1].contains(i)), "the header beats the CIDR table");
        let xx = TestRequest::new().header("cf-ipcountry", "XX").client_ip("10.0.0.1");
        assert_eq!(picks(&mut s, &xx, 2), [4, 4], "an unmapped value falls through to the CIDR table");
    }

    #[test]
    fn unknown_clients_go_to_the_default_zone_or_everywhere() {
        host::reset();
        let outside = TestRequest::new().client_ip("192.0.2.1");
        let mut s = strategy(r#"{"cidrs": {"10.0.0.0/8": "eu-west"}, "default_zone": "ap-south"}"#, regions());
        assert_eq!(picks(&mut s, &outside, 3), [4, 4, 4]);
        let mut s = strategy(r#"{"cidrs": {"10.0.0.0/8": "eu-west"}}"#, regions());
        assert_eq!(picks(&mut s, &outside, 5), [0, 1, 2, 3, 4]);
        let mut s = strategy(r#"{"header": "x-region"}"#, regions());
        let unknown = TestRequest::new().header("x-region", "mars");
        assert_eq!(picks(&mut s, &unknown, 5), [0, 1, 2, 3, 4], "a zone without backends");
    }

    #[test]
    fn a_zone_without_healthy_backends_fails_over_to_all() {
        host::reset();
        let mut backends = regions();
        backends[0].healthy = false;
        backends[1].healthy = false;
        let mut s = strategy(CIDRS, backends);
        let eu = TestRequest::new().client_ip("10.1.2.3");
        assert_eq!(picks(&mut s, &eu, 3), [2, 3, 4]);
    }

    #[test]
    fn retries_leave_the_zone_once_it_is_exhausted() {
        host::reset();
        let mut s = strategy(CIDRS, regions());
        let eu = TestRequest::new().client_ip("10.1.2.3");
        assert_eq!(s.pick(&eu, &[0]).backend_index(), Some(1));
        assert_eq!(s.pick(&eu, &[0]).backend_index(), Some(1));
        let other = s.pick(&eu, &[0, 1]).backend_index().unwrap();
        assert!([2, 3, 4].contains(&other));
        assert_eq!(s.pick(&eu, &[0, 1, 2, 3, 4]).backend_index(), None);
        let mut none = strategy(CIDRS, vec![backend(0, "eu-west", false)]);
        assert_eq!(none.pick(&eu, &[]).backend_index(), None);
    }

    #[test]
    fn cidr_tables_flatten_nested_prefixes() {
        let t =
            CidrTable::new([("0.0.0.0/0", 0), ("10.0.0.0/8", 1), ("10.0.0.0/16", 2), ("10.255.255.255", 3)]).unwrap();
        let z = |ip: &str| t.lookup(ip.parse().unwrap());
        assert_eq!(z("9.255.255.255"), Some(0));
        assert_eq!(z("10.0.0.0"), Some(2));
        assert_eq!(z("10.0.255.255"), Some(2));
        assert_eq!(z("10.1.0.0"), Some(1));
        assert_eq!(z("10.255.255.254"), Some(1));
        assert_eq!(z("10.255.255.255"), Some(3));
        assert_eq!(z("11.0.0.0"), Some(0));
        assert_eq!(z("255.255.255.255"), Some(0));
        assert_eq!(z("::1"), None);
        let t6 = CidrTable::new([("::/0", 0), ("ffff::/16", 1), ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff/128", 2)])
            .unwrap();
        let z6 = |ip: &str| t6.lookup(ip.parse().unwrap());
        assert_eq!(z6("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"), Some(2));
        assert_eq!(z6("ffff::1"), Some(1));
        assert_eq!(z6("fffe::1"), Some(0));
        assert_eq!(z6("1.2.3.4"), None);
    }

    #[test]
    fn params_are_checked() {
        let mut s = ZoneAware::default();
        let cases = [
            (
                r#"{"cidrs": {"10.0.0.1/8": "a"}}"#,
                "param 'cidrs': \"10.0.0.1/8\" has host bits set; did you mean \"10.0.0.0/8\"?",
            ),
            (
                r#"{"cidrs": {"10.0.0.0/33": "a"}}"#,
                "param 'cidrs': \"10.0.0.0/33\" has an invalid prefix length (expected 0 to 32)",
            ),
            (
                r#"{"cidrs": {"eu": "a"}}"#,
                "param 'cidrs': \"eu\" is not an IP prefix (expected e.g. \"10.1.0.0/16\" or \"2001:db8::/32\")",
            ),
            (
                r#"{"cidrs": {"2001:db8::/32": "a", "2001:0db8::/32": "b"}}"#,
                "param 'cidrs': \"2001:0db8::/32\" and \"2001:db8::/32\" are the same prefix; keep one",
            ),
            (r#"{"cidrs": {"10.0.0.0/8": ""}}"#, "param 'cidrs': the zone of \"10.0.0.0/8\" is empty"),
            (
                r#"{"cidrs": ["10.0.0.0/8"]}"#,
                "param 'cidrs': expected an object of string values, e.g. {\"key\": \"value\"}, got an array",
            ),
            (
                r#"{"header_zones": {"FR": "eu"}}"#,
                "param 'header_zones' needs param 'header' (the request header whose values it maps)",
            ),
            (
                r#"{"header": "x region"}"#,
                "param 'header': \"x region\" is not a valid header name (e.g. \"x-region\")",
            ),
            (r#"{"default_zone": 3}"#, "param 'default_zone': expected a string, got the number 3"),
            (r#"{"zone": "a"}"#, "unknown param 'zone' (accepted: cidrs, header, header_zones, default_zone, on_miss)"),
        ];
        for (params, expected) in cases {
            assert_eq!(s.configure(params).unwrap_err(), expected, "{params}");
        }
        s.configure(r#"{"default_zone": "eu-west"}"#).unwrap();
    }

    #[test]
    fn without_placement_params_it_is_a_round_robin() {
        host::reset();
        let mut s = strategy("{}", regions());
        let req = TestRequest::new().header("x-region", "eu-west").client_ip("10.1.2.3");
        assert_eq!(picks(&mut s, &req, 6), [0, 1, 2, 3, 4, 0]);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// A client whose zone has a healthy backend not yet tried is served there; else
        /// by any healthy backend not yet tried; `None` only when there is none.
        #[test]
        fn zone_preference_and_failover(
            pool in prop::collection::vec((0usize..3, prop::bool::weighted(0.6)), 1..10),
            client in 0usize..4,
            excl in prop::collection::vec(0u32..10, 0..4),
        ) {
            host::reset();
            let names = ["a", "b", "c", "nowhere"];
            let backends = pool.iter().enumerate().map(|(i, &(z, h))| backend(i, names[z], h)).collect();
            let mut s = strategy(r#"{"header": "x-zone"}"#, backends);
            let req = TestRequest::new().header("x-zone", names[client]);
            let ok = |i: usize| pool[i].1 && !excl.contains(&(i as u32));
            let in_zone = (0..pool.len()).any(|i| ok(i) && pool[i].0 == client);
            let anywhere = (0..pool.len()).any(ok);
            for _ in 0..5 {
                match s.pick(&req, &excl).backend_index() {
                    Some(i) => {
                        let i = i as usize;
                        prop_assert!(ok(i));
                        prop_assert!(!in_zone || pool[i].0 == client, "left the zone while it had {:?}", pool);
                    }
                    None => prop_assert!(!anywhere),
                }
            }
        }

        /// Longest-prefix match agrees with a brute-force scan of the prefixes.
        #[test]
        fn cidr_lookup_matches_brute_force(
            prefixes in prop::collection::vec((0u32..=255, 0u32..=255, 0u32..=24), 1..20),
            probes in prop::collection::vec(0u32..=0xFFFF, 1..50),
            catch_all in prop::bool::ANY,
        ) {
            // Prefixes inside 10.0.0.0/8, from "a.b.0.0" masked to its length.
            let mut specs: Vec<(String, u32, u32, u32)> = Vec::new();
            if catch_all {
                specs.push(("0.0.0.0/0".into(), 0, 0, 99));
            }
            for (k, &(a, b, extra)) in prefixes.iter().enumerate() {
                let len = 8 + extra;
                let raw = (10 << 24) | (a << 16) | (b << 8);
                let mask = if len == 32 { u32::MAX } else { !(u32::MAX >> len) };
                let net = raw & mask;
                if specs.iter().any(|s| s.1 == net && s.2 == len) {
                    continue;
                }
                specs.push((format!("{}/{len}", std::net::Ipv4Addr::from(net)), net, len, k as u32));
            }
            let table = CidrTable::new(specs.iter().map(|s| (s.0.as_str(), s.3))).unwrap();
            for p in probes {
                let ip = (10 << 24) | (p << 8) | (p & 0xff);
                let expected = specs
                    .iter()
                    .filter(|s| s.2 == 0 || (ip ^ s.1) >> (32 - s.2) == 0)
                    .max_by_key(|s| s.2)
                    .map(|s| s.3);
                prop_assert!(table.lookup(IpAddr::from(std::net::Ipv4Addr::from(ip))) == expected, "{:?}", specs);
            }
        }
    }

    #[test]
    fn on_miss_pass_passes_when_no_zone_matches() {
        let mut s = strategy(r#"{"header": "x-region", "on_miss": "pass"}"#, regions());
        let eu = TestRequest::new().header("x-region", "eu-west");
        assert!(matches!(s.pick(&eu, &[]).backend_index(), Some(0 | 1)));
        assert!(s.pick(&TestRequest::new(), &[]).is_pass(), "no zone");
        assert!(s.pick(&TestRequest::new().header("x-region", "mars"), &[]).is_pass(), "a zone with no backend");
        assert!(s.pick(&eu, &[0, 1]).is_pass(), "a retry that tried the whole zone");
    }
}
