//! etcd discovery, a fleet of two: a real etcd (Debian's `etcd-server` 3.4, installed by
//! scripts/test.sh, started here on free loopback ports with its data in a temporary
//! directory) and two real gateway replicas watching the same prefix.
//!
//! - an instance put into etcd, or registered through replica A's registry API, takes
//!   traffic on both replicas within 1 s; deleted, or its lease expired, it leaves both;
//! - a sticky cookie issued by A is honoured by B, and consistent hashing sends a key to
//!   the same backend on both (both see the same ids in the same order);
//! - etcd stopped under traffic: both keep serving without a failed request; started again
//!   (same data), a change reaches both; a replica whose watch missed revisions that were
//!   compacted meanwhile reads the prefix again and converges.
//!
//! Keys and values go to etcd through its JSON gateway (`POST /v3/kv/put`, base64 keys),
//! as an operator's `curl` or `etcdctl` would write them.

mod util;

use serde_json::{Value, json};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use util::{Backend, Gateway, TempDir, Traffic, poll_until, request, request_full, request_with_headers};

/// A real etcd on `127.0.0.1`; stopped (by PID) when dropped.
struct Etcd {
    child: Option<Child>,
    client: SocketAddr,
    peer: SocketAddr,
    data: PathBuf,
    log: PathBuf,
}

fn free_port() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
}

impl Etcd {
    /// Starts etcd on free ports, with its data under `dir`.
    fn start(dir: &TempDir) -> Etcd {
        let mut e = Etcd {
            child: None,
            client: free_port(),
            peer: free_port(),
            data: dir.path().join("etcd-data"),
            log: dir.path().join("etcd.log"),
        };
        for _ in 0..5 {
            if e.try_spawn() {
                return e;
            }
            // A port was taken between our check and etcd's bind: others.
            e.client = free_port();
            e.peer = free_port();
        }
        panic!("etcd did not start on 5 pairs of free ports; see {}", e.log.display());
    }

    /// Starts etcd again on the same ports and data (after [`Etcd::stop`]).
    fn restart(&mut self) {
        for _ in 0..10 {
            if self.try_spawn() {
                return;
            }
            std::thread::sleep(Duration::from_millis(300));
        }
        panic!("etcd did not start again on {}; see {}", self.client, self.log.display());
    }

    fn try_spawn(&mut self) -> bool {
        let bin = if std::path::Path::new("/usr/bin/etcd").exists() { "/usr/bin/etcd" } else { "etcd" };
        let (c, p) = (format!("http://{}", self.client), format!("http://{}", self.peer));
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).unwrap();
        let child = Command::new(bin)
            .args(["--name", "t", "--data-dir"])
            .arg(&self.data)
            .args(["--listen-client-urls", &c, "--advertise-client-urls", &c])
            .args(["--listen-peer-urls", &p, "--initial-advertise-peer-urls", &p])
            .args(["--initial-cluster", &format!("t={p}"), "--log-level", "warn", "--logger", "zap"])
            .env("ETCD_UNSUPPORTED_ARCH", std::env::consts::ARCH)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start etcd (scripts/test.sh installs Debian's etcd-server)");
        self.child = Some(child);
        let up = poll_until(Duration::from_secs(20), Duration::from_millis(50), || {
            if self.child.as_mut().is_some_and(|c| c.try_wait().ok().flatten().is_some()) {
                return Some(false);
            }
            let health = request(self.client, "GET", "/health", None).ok()?;
            health.body.contains("true").then_some(true)
        });
        if up != Some(true) {
            self.stop();
            return false;
        }
        true
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.client)
    }

    /// `POST /v3/...` on etcd's JSON gateway.
    fn call(&self, path: &str, body: Value) -> Value {
        let reply = request(self.client, "POST", path, Some(&body.to_string())).expect("etcd answers");
        assert_eq!(reply.status, 200, "etcd {path}: {}", reply.body);
        serde_json::from_str(&reply.body).unwrap()
    }

    /// Puts `key` = `value`; returns the revision.
    fn put(&self, key: &str, value: &str) -> i64 {
        let v = self.call("/v3/kv/put", json!({"key": b64(key), "value": b64(value)}));
        v["header"]["revision"].as_str().unwrap().parse().unwrap()
    }

    fn delete(&self, key: &str) -> i64 {
        let v = self.call("/v3/kv/deleterange", json!({"key": b64(key)}));
        v["header"]["revision"].as_str().unwrap().parse().unwrap()
    }

    fn compact(&self, revision: i64) {
        self.call("/v3/kv/compaction", json!({"revision": revision.to_string(), "physical": true}));
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.stop();
    }
}

fn b64(s: &str) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in s.as_bytes().chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// A TCP relay to etcd that can be cut (open connections closed, new ones refused) and
/// restored: one replica's link to etcd fails while the other's works.
struct Relay {
    addr: SocketAddr,
    cut: Arc<AtomicBool>,
    open: Arc<Mutex<Vec<TcpStream>>>,
    stop: Arc<AtomicBool>,
}

impl Relay {
    fn start(to: SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let (cut, open, stop) =
            (Arc::new(AtomicBool::new(false)), Arc::new(Mutex::new(Vec::new())), Arc::new(AtomicBool::new(false)));
        let (c, o, s) = (cut.clone(), open.clone(), stop.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if s.load(Ordering::Relaxed) {
                    return;
                }
                let Ok(conn) = conn else { continue };
                if c.load(Ordering::Relaxed) {
                    drop(conn);
                    continue;
                }
                let Ok(up) = TcpStream::connect(to) else { continue };
                o.lock().unwrap().extend([conn.try_clone().unwrap(), up.try_clone().unwrap()]);
                for (mut from, mut into) in [(conn.try_clone().unwrap(), up.try_clone().unwrap()), (up, conn)] {
                    std::thread::spawn(move || {
                        let mut buf = [0u8; 16 * 1024];
                        while let Ok(n) = from.read(&mut buf) {
                            if n == 0 || into.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                        let _ = into.shutdown(std::net::Shutdown::Both);
                        let _ = from.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
        Relay { addr, cut, open, stop }
    }

    fn set_cut(&self, cut: bool) {
        self.cut.store(cut, Ordering::Relaxed);
        if cut {
            for s in self.open.lock().unwrap().drain(..) {
                let _ = s.shutdown(std::net::Shutdown::Both);
            }
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.set_cut(true);
        let _ = TcpStream::connect(self.addr);
    }
}

/// A replica: `/` → `api` (round robin), `/sticky` → sticky-cookie, `/hash` →
/// consistent-hash on `x-user`; every upstream from etcd under `/t/`.
fn replica(dir: &TempDir, name: &str, etcd: &str) -> Gateway {
    let up = |strategy: &str| {
        format!(
            "    strategy: {strategy}\n    health_check: {{path: /healthz, interval: 100ms, timeout: 2s}}\n    discovery:\n      etcd: {{endpoints: [\"{etcd}\"], prefix: /t/, default_ttl: 2s}}\n"
        )
    };
    let config = format!(
        "listeners: [{{address: 127.0.0.1:0}}]\nthreads: 1\naccess_log: false\nadmin: {{address: 127.0.0.1:0}}\nroutes:\n  - {{path_prefix: /sticky, upstream: sticky}}\n  - {{path_prefix: /hash, upstream: hash}}\n  - {{upstream: api}}\nupstreams:\n  api:\n{}  sticky:\n{}  hash:\n{}",
        up("{plugin: round-robin}"),
        up("{plugin: sticky-cookie, params: {cookie: lb}}"),
        up("{plugin: consistent-hash, params: {key: \"header:x-user\"}}"),
    );
    let file = dir.write(&format!("{name}.yaml"), config);
    Gateway::with_config(&file, dir.path())
}

fn registration(b: &Backend) -> String {
    json!({"address": b.addr().to_string()}).to_string()
}

/// `/api/upstreams` → the upstream's JSON.
fn upstream(gw: &Gateway, name: &str) -> Value {
    let reply = request(gw.admin_addr(), "GET", "/api/upstreams", None).expect("the admin API answers");
    let v: Value = serde_json::from_str(&reply.body).unwrap();
    v["upstreams"].as_array().unwrap().iter().find(|u| u["name"] == name).cloned().expect("the upstream")
}

/// The ids of `name`'s healthy backends, in pool order.
fn healthy_ids(gw: &Gateway, name: &str) -> Vec<String> {
    let up = upstream(gw, name);
    up["backends"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| b["state"] == "up")
        .map(|b| b["id"].as_str().unwrap().to_owned())
        .collect()
}

fn wait_healthy(gw: &Gateway, name: &str, ids: &[&str], within: Duration) {
    let ok = poll_until(within, Duration::from_millis(20), || (healthy_ids(gw, name) == ids).then_some(()));
    assert!(ok.is_some(), "{name}: expected healthy {ids:?}, have {:?}", healthy_ids(gw, name));
}

/// Waits until `path` answers 200 ten times in a row. The first requests after an
/// upstream's first backends joined can get `503` while the worker's plugin instance
/// still has its previous view of the pool (none healthy) and its catch-up with the new
/// view takes longer than the pick deadline on a loaded machine (the plugin host answers
/// from the stale view meanwhile): the traffic checks start after that.
fn warm(gw: &Gateway, path: &str) {
    let mut in_a_row = 0;
    let warmed = poll_until(Duration::from_secs(10), Duration::from_millis(5), || {
        let ok = request(gw.addr, "GET", path, None).is_ok_and(|r| r.status == 200);
        in_a_row = if ok { in_a_row + 1 } else { 0 };
        (in_a_row >= 10).then_some(())
    });
    assert!(warmed.is_some(), "{path} on {} never answered 200 ten times in a row", gw.addr);
}

fn api(gw: &Gateway, method: &str, path: &str, body: Option<&str>) -> (u16, Value) {
    let reply = request_full(gw.admin_addr(), method, path, &[], body).expect("the admin API answers");
    (reply.status, serde_json::from_str(&reply.body).unwrap_or(Value::String(reply.body)))
}

/// Stops the traffic; any failed request fails the test, with the replica's warnings.
fn no_failures(traffic: [(Traffic, &Gateway); 2]) {
    for (t, gw) in traffic {
        let (sent, failures) = t.finish();
        if !failures.is_empty() {
            let warnings: Vec<_> = gw.logs_matching(|l| l["level"] != "INFO" && l["level"] != "DEBUG");
            panic!(
                "{} of {sent} requests to {} failed: {:?}\nits warnings: {warnings:#?}",
                failures.len(),
                gw.addr,
                &failures[..failures.len().min(5)]
            );
        }
    }
}

#[test]
fn instances_from_etcd_or_one_replicas_api_join_and_leave_both_replicas() {
    let dir = TempDir::new();
    let etcd = Etcd::start(&dir);
    let (b1, b2, b3) = (Backend::new("b1"), Backend::new("b2"), Backend::new("b3"));
    let a = replica(&dir, "a", &etcd.url());
    let b = replica(&dir, "b", &etcd.url());

    etcd.put("/t/api/b1", &registration(&b1));
    for gw in [&a, &b] {
        wait_healthy(gw, "api", &["b1"], Duration::from_secs(10));
        warm(gw, "/");
    }
    let (ta, tb) = (Traffic::start(a.addr), Traffic::start(b.addr));

    // Put into etcd by hand: on both within 1 s.
    let t0 = Instant::now();
    etcd.put("/t/api/b3", &registration(&b3));
    let first: Vec<Duration> = [&ta, &tb]
        .iter()
        .map(|t| {
            let seen = poll_until(Duration::from_secs(1), Duration::from_millis(1), || {
                t.after(t0).iter().any(|x| x == "b3").then(|| t0.elapsed())
            });
            seen.expect("b3 takes a request within 1 s")
        })
        .collect();
    eprintln!("from the put into etcd to b3's first request: replica A {:?}, B {:?}", first[0], first[1]);
    let joined: Vec<Duration> = [&ta, &tb]
        .iter()
        .map(|t| t.wait(t0, Duration::from_secs(1), "b3 put into etcd", |r| r.iter().any(|x| x == "b3")))
        .collect();

    // Registered through replica A's API (a lease of 2 s): on both within 1 s.
    let t1 = Instant::now();
    let (status, v) = api(
        &a,
        "PUT",
        "/api/registry/api/b2",
        Some(&json!({"address": b2.addr().to_string(), "ttl": "2s"}).to_string()),
    );
    assert_eq!(status, 200, "{v}");
    assert!(v["etcd"]["lease"].as_i64().unwrap() != 0, "{v}");
    let registered: Vec<Duration> = [&ta, &tb]
        .iter()
        .map(|t| t.wait(t1, Duration::from_secs(1), "b2 registered through A", |r| r.iter().any(|x| x == "b2")))
        .collect();
    eprintln!("joined both replicas: put into etcd {joined:?}, registered through A {registered:?}");

    // Both list it in the registry API; heartbeats through B renew the lease A granted.
    let (_, list) = api(&b, "GET", "/api/registry", None);
    let ids: Vec<&str> = list["upstreams"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|u| u["upstream"] == "api")
        .flat_map(|u| u["instances"].as_array().unwrap())
        .filter_map(|i| i["id"].as_str())
        .collect();
    assert_eq!(ids, ["b1", "b2", "b3"], "{list}");
    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(700));
        let (status, v) = api(&b, "PUT", "/api/registry/api/b2/heartbeat", None);
        assert_eq!(status, 200, "{v}");
    }
    // 2.1 s after a registration with a TTL of 2 s: the heartbeats kept it.
    let now = Instant::now();
    std::thread::sleep(Duration::from_millis(200));
    for t in [&ta, &tb] {
        assert!(t.after(now).iter().any(|x| x == "b2"), "heartbeats kept b2 past its TTL");
    }

    // Deleted from etcd: gone from both within 1 s.
    let t2 = Instant::now();
    etcd.delete("/t/api/b3");
    for t in [&ta, &tb] {
        t.wait(t2, Duration::from_secs(1), "b3 deleted from etcd", |r| !r.iter().any(|x| x == "b3"));
    }

    // No more heartbeats: the lease expires, b2 leaves both within 1 s + its TTL, and a
    // heartbeat then is told to register again.
    let t3 = Instant::now();
    for t in [&ta, &tb] {
        t.wait(t3, Duration::from_secs(3), "b2's lease expired", |r| r.iter().all(|x| x == "b1"));
    }
    let (status, v) = api(&a, "PUT", "/api/registry/api/b2/heartbeat", None);
    assert_eq!((status, &v["register_again"]), (404, &json!(true)), "{v}");

    // Registered through B, deregistered through A: gone from both at once.
    let (status, v) = api(&b, "PUT", "/api/registry/api/b3", Some(&registration(&b3)));
    assert_eq!(status, 200, "{v}");
    let t4 = Instant::now();
    for t in [&ta, &tb] {
        t.wait(t4, Duration::from_secs(1), "b3 registered through B", |r| r.iter().any(|x| x == "b3"));
    }
    let t5 = Instant::now();
    let (status, v) = api(&a, "DELETE", "/api/registry/api/b3", None);
    assert_eq!(status, 200, "{v}");
    for t in [&ta, &tb] {
        t.wait(t5, Duration::from_secs(1), "b3 deregistered through A", |r| r.iter().all(|x| x == "b1"));
    }
    let (status, _) = api(&a, "DELETE", "/api/registry/api/b3", None);
    assert_eq!(status, 404);

    // A bad value is skipped (logged with its key); the pool keeps serving.
    let mark = a.log_mark();
    etcd.put("/t/api/bad", r#"{"address": "nowhere"}"#);
    a.wait_for_log_after(mark, Duration::from_secs(5), |l| {
        util::message(l).starts_with("etcd value skipped") && l["key"] == "/t/api/bad"
    });
    etcd.put("/t/api/b1", r#"{"address": "#);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(healthy_ids(&a, "api"), ["b1"], "a bad value keeps the key's last good one");

    no_failures([(ta, &a), (tb, &b)]);
}

#[test]
fn replicas_agree_on_sticky_cookies_and_consistent_hashing() {
    let dir = TempDir::new();
    let etcd = Etcd::start(&dir);
    let backends: Vec<Backend> = (1..=4).map(|i| Backend::new(&format!("s{i}"))).collect();
    let a = replica(&dir, "a", &etcd.url());
    let b = replica(&dir, "b", &etcd.url());
    // Put in an order that is not the ids' order: both replicas sort by id.
    for i in [3, 1, 4, 2] {
        let be = &backends[i - 1];
        etcd.put(&format!("/t/sticky/s{i}"), &registration(be));
        etcd.put(&format!("/t/hash/s{i}"), &registration(be));
    }
    for gw in [&a, &b] {
        for up in ["sticky", "hash"] {
            wait_healthy(gw, up, &["s1", "s2", "s3", "s4"], Duration::from_secs(10));
            warm(gw, &format!("/{up}"));
        }
    }

    for _ in 0..8 {
        let first = request(a.addr, "GET", "/sticky", None).unwrap();
        let cookie = first.header("set-cookie").split(';').next().unwrap().to_owned();
        assert!(cookie.starts_with("lb="), "{cookie}");
        for gw in [&b, &a] {
            let again = request_with_headers(gw.addr, "GET", "/sticky", &[("cookie", &cookie)]).unwrap();
            assert_eq!(again.body, first.body, "{cookie} on {}", gw.addr);
        }
    }

    let mut seen = std::collections::BTreeSet::new();
    for user in 0..40 {
        let user = format!("user-{user}");
        let on_a = request_with_headers(a.addr, "GET", "/hash", &[("x-user", &user)]).unwrap().body;
        let on_b = request_with_headers(b.addr, "GET", "/hash", &[("x-user", &user)]).unwrap().body;
        assert_eq!(on_a, on_b, "{user}");
        seen.insert(on_a);
    }
    assert!(seen.len() >= 3, "40 keys spread over the backends: {seen:?}");
}

#[test]
fn etcd_down_keeps_both_serving_and_a_compacted_watch_reads_the_prefix_again() {
    let dir = TempDir::new();
    let mut etcd = Etcd::start(&dir);
    let relay = Relay::start(etcd.client);
    let (b1, b2, b3, b4) = (Backend::new("b1"), Backend::new("b2"), Backend::new("b3"), Backend::new("b4"));
    let a = replica(&dir, "a", &etcd.url());
    let b = replica(&dir, "b", &format!("http://{}", relay.addr));
    etcd.put("/t/api/b1", &registration(&b1));
    etcd.put("/t/api/b2", &registration(&b2));
    for gw in [&a, &b] {
        wait_healthy(gw, "api", &["b1", "b2"], Duration::from_secs(10));
        warm(gw, "/");
    }
    let (ta, tb) = (Traffic::start(a.addr), Traffic::start(b.addr));

    // etcd stops: both say so, and keep serving both backends.
    etcd.stop();
    for gw in [&a, &b] {
        let down = poll_until(Duration::from_secs(10), Duration::from_millis(50), || {
            let d = upstream(gw, "api")["discovery"].clone();
            (d["connected"] == false).then_some(d)
        });
        let d = down.expect("the admin API shows etcd disconnected");
        assert!(d["last_error"].is_string(), "{d}");
    }
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs(1));
    for t in [&ta, &tb] {
        let seen = t.after(t0);
        assert!(seen.iter().any(|x| x == "b1") && seen.iter().any(|x| x == "b2"), "{seen:?}");
    }

    // Started again on the same data: a change made now reaches both.
    etcd.restart();
    let t1 = Instant::now();
    etcd.put("/t/api/b3", &registration(&b3));
    for t in [&ta, &tb] {
        t.wait(t1, Duration::from_secs(10), "b3 put after etcd restarted", |r| r.iter().any(|x| x == "b3"));
    }
    for gw in [&a, &b] {
        assert_eq!(upstream(gw, "api")["discovery"]["connected"], true);
    }
    eprintln!("after etcd restarted, a change reached both within {:?}", t1.elapsed());

    // B's link to etcd breaks; meanwhile b4 joins, b1 leaves, and etcd compacts those
    // revisions. B's watch cannot resume: it reads the prefix again and converges.
    relay.set_cut(true);
    let down = poll_until(Duration::from_secs(10), Duration::from_millis(50), || {
        (upstream(&b, "api")["discovery"]["connected"] == false).then_some(())
    });
    assert!(down.is_some(), "B notices its link to etcd is cut");
    etcd.put("/t/api/b4", &registration(&b4));
    let rev = etcd.delete("/t/api/b1");
    etcd.compact(rev);
    let mark = b.log_mark();
    relay.set_cut(false);
    let t2 = Instant::now();
    tb.wait(t2, Duration::from_secs(10), "B converged after the relist", |r| {
        r.iter().any(|x| x == "b4") && !r.iter().any(|x| x == "b1")
    });
    b.wait_for_log_after(mark, Duration::from_secs(1), |l| util::message(l).starts_with("etcd compacted"));
    let d = upstream(&b, "api")["discovery"].clone();
    assert_eq!((d["connected"].clone(), d["relists"].clone()), (json!(true), json!(1)), "{d}");
    assert!(d["revision"].as_i64().unwrap() >= rev, "{d}");
    ta.wait(t2, Duration::from_secs(2), "A followed", |r| r.iter().any(|x| x == "b4") && !r.iter().any(|x| x == "b1"));
    assert!(upstream(&a, "api")["discovery"]["relists"].is_null(), "A's watch went on: no relist");

    no_failures([(ta, &a), (tb, &b)]);
}
