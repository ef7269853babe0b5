//! The embedded registry, end to end: the real gateway binary, real backends on
//! loopback, the registry API on the admin listener and the `gateway register` sidecar.
//! A registered instance takes traffic after its first health check; heartbeats keep it,
//! a missed TTL removes it, `DELETE` removes it while its requests in flight finish; bad
//! registrations are refused naming the field; the registration token cannot drain; the
//! per-upstream limit holds; memory stays bounded under 20,000 registrations.

mod util;

use serde_json::{Value, json};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use util::{Backend, Gateway, KeepAlive, Reply, TempDir, poll_until, request_full};

const ADMIN_TOKEN: &str = "admin-token-0123456789abcdef";
const REGISTRY_TOKEN: &str = "registry-token-0123456789";

/// A gateway with a `books` upstream (one static backend + registrations), a `solo`
/// upstream (registrations only, under `/solo`) and `fixed` (static only, under `/fixed`).
fn start(dir: &TempDir, static_backend: &Backend, extra: &str, books_registry: &str) -> Gateway {
    let config = format!(
        "listeners: [{{address: 127.0.0.1:0}}]\nthreads: 2\naccess_log: false\nadmin: {{address: 127.0.0.1:0}}\n{extra}routes:\n  - {{path_prefix: /solo, upstream: solo}}\n  - {{path_prefix: /fixed, upstream: fixed}}\n  - {{path_prefix: /churn, upstream: churn}}\n  - {{upstream: books}}\nupstreams:\n  books:\n    health_check: {{path: /healthz, interval: 200ms, timeout: 500ms}}\n    backends: [{{address: \"{addr}\", id: static-1}}]\n    discovery:\n      registry: {books_registry}\n  solo:\n    health_check: {{path: /healthz, interval: 200ms, timeout: 500ms}}\n    retries: {{attempts: 1}}\n    discovery:\n      registry: {{}}\n  fixed:\n    backends: [{{address: \"{addr}\"}}]\n  churn:\n    health_check: {{interval: 5s, timeout: 500ms}}\n    discovery:\n      registry: {{max_instances: 10000}}\n",
        addr = static_backend.addr(),
    );
    let file = dir.write("gw.yaml", config);
    Gateway::with_config(&file, dir.path())
}

fn call(admin: SocketAddr, method: &str, path: &str, token: Option<&str>, body: Option<Value>) -> (u16, Value) {
    let auth = token.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("authorization", a.as_str())).collect();
    let body = body.map(|b| b.to_string());
    let reply: Reply = request_full(admin, method, path, &headers, body.as_deref()).expect("the admin API answers");
    (reply.status, serde_json::from_str(&reply.body).unwrap_or(Value::String(reply.body)))
}

fn register(admin: SocketAddr, up: &str, id: &str, body: Value) -> (u16, Value) {
    call(admin, "PUT", &format!("/api/registry/{up}/{id}"), None, Some(body))
}

/// The backends of `up` in `/api/upstreams`: id → the backend's JSON.
fn backends(admin: SocketAddr, up: &str, token: Option<&str>) -> Vec<Value> {
    let (status, v) = call(admin, "GET", "/api/upstreams", token, None);
    assert_eq!(status, 200, "{v}");
    v["upstreams"].as_array().unwrap().iter().find(|u| u["name"] == up).expect("the upstream")["backends"]
        .as_array()
        .unwrap()
        .clone()
}

fn backend(admin: SocketAddr, up: &str, id: &str) -> Option<Value> {
    backends(admin, up, None).into_iter().find(|b| b["id"] == id)
}

#[test]
fn a_registered_instance_takes_traffic_after_its_first_health_check_and_heartbeats_keep_it() {
    let dir = TempDir::new();
    let fixed = Backend::new("static-1");
    let gw = start(&dir, &fixed, "", "{default_ttl: 2s}");
    let admin = gw.admin_addr();
    let mut client = KeepAlive::open(gw.addr).unwrap();

    // An instance with nothing listening yet: registered, pending, no traffic.
    let late = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let late_addr = late.local_addr().unwrap();
    drop(late);
    let (status, v) = register(admin, "books", "late-1", json!({"address": late_addr.to_string(), "ttl": "30s"}));
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["registered"], true);
    let pending = poll_until(Duration::from_secs(5), Duration::from_millis(50), || backend(admin, "books", "late-1"))
        .expect("the registered instance shows in /api/upstreams");
    assert_eq!(
        (pending["source"].as_str(), pending["state"].as_str()),
        (Some("registry"), Some("pending")),
        "{pending}"
    );
    assert_eq!(pending["pending"], true);
    for _ in 0..20 {
        let r = client.get("/").unwrap();
        assert_eq!((r.status, r.body.as_str()), (200, "static-1"), "a pending instance takes no traffic");
    }
    assert_eq!(backend(admin, "books", "static-1").unwrap()["source"], "static");

    // A live backend registers: it takes traffic once its health check passed.
    let b1 = Backend::new("b1");
    let registered_at = Instant::now();
    let (status, _) = register(
        admin,
        "books",
        "b1",
        json!({"address": b1.addr().to_string(), "weight": 1, "zone": "eu", "labels": {"version": "2"}}),
    );
    assert_eq!(status, 200);
    let first = poll_until(Duration::from_secs(10), Duration::from_millis(1), || {
        (client.get("/").unwrap().body == "b1").then(Instant::now)
    })
    .expect("the registered backend takes traffic");
    let took = first - registered_at;
    println!("time from registration to first request: {:.1} ms", took.as_secs_f64() * 1e3);
    let up = backend(admin, "books", "b1").unwrap();
    assert_eq!(
        (up["state"].as_str(), up["zone"].as_str(), up["labels"]["version"].as_str()),
        (Some("up"), Some("eu"), Some("2"))
    );
    gw.wait_for_log(Duration::from_secs(1), |l| {
        util::message(l).contains("its first health check passed") && l["backend"] == "b1"
    });

    // Heartbeats keep it past its 2 s TTL.
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        let (status, v) = call(admin, "PUT", "/api/registry/books/b1/heartbeat", None, None);
        assert_eq!(status, 200, "{v}");
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(backend(admin, "books", "b1").is_some(), "heartbeats keep the registration");
    let (_, list) = call(admin, "GET", "/api/registry", None, None);
    let books = list["upstreams"].as_array().unwrap().iter().find(|u| u["upstream"] == "books").unwrap().clone();
    let b1_reg = books["instances"].as_array().unwrap().iter().find(|i| i["id"] == "b1").unwrap().clone();
    assert_eq!(b1_reg["ttl_ms"], 2000);
    assert!(b1_reg["expires_in_ms"].as_u64().unwrap() <= 2000, "{b1_reg}");

    // No more heartbeats: removed after its TTL, and logged.
    let mark = gw.log_mark();
    let stopped = Instant::now();
    poll_until(Duration::from_secs(10), Duration::from_millis(50), || {
        backend(admin, "books", "b1").is_none().then_some(())
    })
    .expect("the instance expires");
    assert!(stopped.elapsed() >= Duration::from_millis(1200), "expired early: {:?}", stopped.elapsed());
    gw.wait_for_log_after(mark, Duration::from_secs(1), |l| {
        util::message(l).starts_with("instance expired") && l["backend"] == "b1"
    });
    for _ in 0..10 {
        assert_eq!(client.get("/").unwrap().body, "static-1");
    }
    // A heartbeat for it now: 404, telling the client to register again.
    let (status, v) = call(admin, "PUT", "/api/registry/books/b1/heartbeat", None, None);
    assert_eq!(status, 404, "{v}");
    assert_eq!(v["register_again"], true);
    assert!(v["error"].as_str().unwrap().contains("register it again"), "{v}");
}

#[test]
fn a_config_reload_keeps_registered_instances_and_their_state() {
    let dir = TempDir::new();
    let fixed = Backend::new("static-1");
    let gw = start(&dir, &fixed, "", "{}");
    let admin = gw.admin_addr();
    let b1 = Backend::new("b1");
    assert_eq!(register(admin, "solo", "b1", json!({"address": b1.addr().to_string()})).0, 200);
    poll_until(Duration::from_secs(10), Duration::from_millis(20), || {
        (util::try_get(gw.addr, "/solo").ok()? == (200, "b1".to_owned())).then_some(())
    })
    .expect("b1 takes traffic");
    let before = backend(admin, "solo", "b1").unwrap();

    // Rebuild `solo` (another retry policy) and add a static backend to it.
    let file = dir.path().join("gw.yaml");
    let text = std::fs::read_to_string(&file).unwrap();
    let text = text.replace(
        "    retries: {attempts: 1}\n",
        &format!("    retries: {{attempts: 2}}\n    backends: [{{address: \"{}\", id: static-solo}}]\n", fixed.addr()),
    );
    std::fs::write(&file, text).unwrap();
    let (status, v) = call(admin, "POST", "/api/reload", None, None);
    assert_eq!(status, 200, "{v}");
    assert!(v["changes"]["upstreams_changed"].as_array().unwrap().iter().any(|u| u == "solo"), "{v}");
    let after = backend(admin, "solo", "b1").expect("the registered instance survives the reload");
    assert_eq!(after["state"], "up", "and stays up: {after}");
    assert!(after["requests"].as_u64() >= before["requests"].as_u64(), "the same entry: {before} / {after}");
    let ids: Vec<Value> = backends(admin, "solo", None).iter().map(|b| b["id"].clone()).collect();
    assert_eq!(ids, [json!("static-solo"), json!("b1")]);
    // Still registered: a heartbeat works and the registry still lists it.
    assert_eq!(call(admin, "PUT", "/api/registry/solo/b1/heartbeat", None, None).0, 200);
    let seen: std::collections::BTreeSet<String> = (0..20).map(|_| util::get(gw.addr, "/solo").1).collect();
    assert!(seen.contains("b1") && seen.contains("static-1"), "{seen:?}");
}

#[test]
fn deregistering_stops_new_requests_while_requests_in_flight_finish() {
    let dir = TempDir::new();
    let fixed = Backend::new("static-1");
    let gw = start(&dir, &fixed, "", "{}");
    let admin = gw.admin_addr();
    let b2 = Backend::new("b2");
    assert_eq!(register(admin, "solo", "b2", json!({"address": b2.addr().to_string()})).0, 200);
    poll_until(Duration::from_secs(10), Duration::from_millis(20), || {
        (util::try_get(gw.addr, "/solo").ok()? == (200, "b2".to_owned())).then_some(())
    })
    .expect("b2 takes traffic");

    let addr = gw.addr;
    let slow = std::thread::spawn(move || util::try_get(addr, "/solo/delay/1500"));
    poll_until(Duration::from_secs(5), Duration::from_millis(5), || {
        b2.hits().iter().any(|h| h.path == "/solo/delay/1500").then_some(())
    })
    .expect("the slow request reached b2");
    let (status, v) = call(admin, "DELETE", "/api/registry/solo/b2", None, None);
    assert_eq!((status, &v["deregistered"]), (200, &json!(true)), "{v}");
    poll_until(Duration::from_secs(5), Duration::from_millis(10), || {
        backend(admin, "solo", "b2").is_none().then_some(())
    })
    .expect("b2 leaves the pool");
    let (status, _) = util::get(gw.addr, "/solo");
    assert_eq!(status, 503, "no backend left for new requests");
    assert_eq!(slow.join().unwrap().unwrap(), (200, "b2".to_owned()), "the request in flight finished");
    assert_eq!(call(admin, "DELETE", "/api/registry/solo/b2", None, None).0, 404);
    gw.wait_for_log(Duration::from_secs(1), |l| util::message(l) == "instance deregistered" && l["backend"] == "b2");
}

#[test]
fn bad_registrations_are_refused_naming_the_field_and_the_limit_holds() {
    let dir = TempDir::new();
    let fixed = Backend::new("static-1");
    let gw = start(&dir, &fixed, "", "{max_instances: 3}");
    let admin = gw.admin_addr();
    let ok = |a: &str| json!({"address": a});
    let cases: Vec<(&str, &str, Value, u16, &str, &str)> = vec![
        ("books", "x", json!({"weight": 2}), 400, "address", "missing field `address`"),
        ("books", "x", ok("not-an-address"), 400, "address", "not host:port"),
        ("books", "x", ok("127.0.0.1:0"), 400, "address", "port 0"),
        ("books", "x", json!({"address": "127.0.0.1:9", "ttl": "0s"}), 400, "ttl", "out of range"),
        ("books", "x", json!({"address": "127.0.0.1:9", "ttl": "48h"}), 400, "ttl", "out of range"),
        ("books", "x", json!({"address": "127.0.0.1:9", "weight": 0}), 400, "weight", "at least 1"),
        ("books", "x", json!({"address": "127.0.0.1:9", "weight": "heavy"}), 400, "weight", "invalid type"),
        ("books", "x", json!({"address": "127.0.0.1:9", "color": "red"}), 400, "body", "unknown field `color`"),
        ("nope", "x", ok("127.0.0.1:9"), 404, "upstream", "no upstream `nope`"),
        ("fixed", "x", ok("127.0.0.1:9"), 409, "upstream", "no `discovery.registry`"),
        ("books", "static-1", ok("127.0.0.1:9"), 409, "id", "static backend"),
        ("books", "a%20b", ok("127.0.0.1:9"), 400, "id", "not a valid instance id"),
    ];
    for (up, id, body, status, field, text) in cases {
        let (got, v) = register(admin, up, id, body.clone());
        assert_eq!(got, status, "{up}/{id} {body}: {v}");
        assert_eq!(v["field"], field, "{up}/{id} {body}: {v}");
        assert!(v["error"].as_str().unwrap().contains(text), "{up}/{id} {body}: {v}");
    }
    let (got, v) = request_full(admin, "PUT", "/api/registry/books/x", &[], Some("{\"address\": "))
        .map(|r| (r.status, r.body))
        .unwrap();
    assert_eq!(got, 400, "{v}");

    // The limit: 3 instances; updating one of them is still fine, a 4th is refused.
    for i in 0..3 {
        assert_eq!(register(admin, "books", &format!("i{i}"), ok(&format!("127.0.0.1:{}", 20000 + i))).0, 200);
    }
    let (status, v) = register(admin, "books", "i3", ok("127.0.0.1:20003"));
    assert_eq!((status, v["field"].as_str()), (409, Some("upstream")), "{v}");
    assert!(v["error"].as_str().unwrap().contains("max_instances"), "{v}");
    let (status, v) = register(admin, "books", "i1", json!({"address": "127.0.0.1:20001", "weight": 5}));
    assert_eq!((status, &v["registered"]), (200, &json!(false)), "{v}");
    assert_eq!(call(admin, "DELETE", "/api/registry/books/i0", None, None).0, 200);
    assert_eq!(register(admin, "books", "i3", ok("127.0.0.1:20003")).0, 200, "room again after a deregistration");
}

#[test]
fn the_registration_token_registers_but_cannot_drain() {
    let dir = TempDir::new();
    dir.write("admin.token", ADMIN_TOKEN);
    dir.write("registry.token", REGISTRY_TOKEN);
    let fixed = Backend::new("static-1");
    let extra = format!("registry: {{token_file: {}}}\n", dir.path().join("registry.token").display());
    let gw = start_with_token(&dir, &fixed, &extra);
    let admin = gw.admin_addr();
    let b1 = Backend::new("b1");
    let body = json!({"address": b1.addr().to_string()});
    let put = |token: Option<&str>| call(admin, "PUT", "/api/registry/books/b1", token, Some(body.clone()));
    assert_eq!(put(None).0, 401, "no token");
    assert_eq!(put(Some("wrong-token-0123456789")).0, 401);
    let (status, v) = put(Some(REGISTRY_TOKEN));
    assert_eq!(status, 200, "{v}");
    assert_eq!(put(Some(ADMIN_TOKEN)).0, 200, "the admin token works too");
    assert_eq!(call(admin, "GET", "/api/registry", Some(REGISTRY_TOKEN), None).0, 200);

    // The registry token is not an admin token: no drain, no reload, no reading.
    let drain = "/api/upstreams/books/backends/static-1/drain";
    let (status, v) = call(admin, "POST", drain, Some(REGISTRY_TOKEN), None);
    assert_eq!(status, 401, "{v}");
    assert_eq!(call(admin, "POST", "/api/reload", Some(REGISTRY_TOKEN), None).0, 401);
    assert_eq!(call(admin, "GET", "/api/upstreams", Some(REGISTRY_TOKEN), None).0, 401);
    assert!(backends(admin, "books", Some(ADMIN_TOKEN)).iter().all(|b| b["drained"] == false));
    assert_eq!(call(admin, "POST", drain, Some(ADMIN_TOKEN), None).0, 200, "the admin token drains");
}

fn start_with_token(dir: &TempDir, static_backend: &Backend, extra: &str) -> Gateway {
    let config = format!(
        "listeners: [{{address: 127.0.0.1:0}}]\nthreads: 1\naccess_log: false\nadmin: {{address: 127.0.0.1:0, token_file: {}}}\n{extra}upstreams:\n  books:\n    backends: [{{address: \"{}\", id: static-1}}]\n    discovery:\n      registry: {{}}\n",
        dir.path().join("admin.token").display(),
        static_backend.addr(),
    );
    let file = dir.write("gw.yaml", config);
    Gateway::with_config(&file, dir.path())
}

/// A `gateway register` process; killed (by PID) when dropped.
struct Sidecar(std::process::Child);

impl Drop for Sidecar {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

#[test]
fn the_register_sidecar_joins_heals_after_a_404_and_leaves_on_sigterm() {
    let dir = TempDir::new();
    let fixed = Backend::new("static-1");
    let gw = start(&dir, &fixed, "", "{}");
    let admin = gw.admin_addr();
    let b1 = Backend::new("b1");
    let child = Command::new(util::BIN)
        .args(["register", "--registry", &format!("http://{admin}"), "--upstream", "solo", "--id", "side-1"])
        .args(["--address", &b1.addr().to_string(), "--ttl", "3s", "--label", "role=sidecar", "--log-format", "json"])
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start gateway register");
    let mut sidecar = Sidecar(child);
    poll_until(Duration::from_secs(10), Duration::from_millis(20), || {
        (util::try_get(gw.addr, "/solo").ok()? == (200, "b1".to_owned())).then_some(())
    })
    .expect("the sidecar's backend takes traffic");
    assert_eq!(backend(admin, "solo", "side-1").unwrap()["source"], "registry");

    // The registration disappears (as after a gateway restart): the next heartbeat gets
    // a 404 and the sidecar registers again.
    assert_eq!(call(admin, "DELETE", "/api/registry/solo/side-1", None, None).0, 200);
    poll_until(Duration::from_secs(5), Duration::from_millis(20), || {
        backend(admin, "solo", "side-1").is_none().then_some(())
    })
    .expect("deregistered");
    poll_until(Duration::from_secs(10), Duration::from_millis(50), || backend(admin, "solo", "side-1"))
        .expect("the sidecar registers again after a 404");

    // SIGTERM: it deregisters at once (long before the 3 s TTL) and exits cleanly.
    let status = Command::new("kill").args(["-TERM", &sidecar.0.id().to_string()]).status().unwrap();
    assert!(status.success());
    let exit = poll_until(Duration::from_secs(10), Duration::from_millis(20), || sidecar.0.try_wait().unwrap())
        .expect("the sidecar exits");
    assert!(exit.success(), "{exit}");
    // Gone within 1 s of the exit: the registration (3 s TTL, renewed every second until
    // then) cannot have expired yet.
    poll_until(Duration::from_secs(1), Duration::from_millis(10), || {
        backend(admin, "solo", "side-1").is_none().then_some(())
    })
    .expect("deregistered before its TTL");
    let mut stderr = String::new();
    std::io::Read::read_to_string(sidecar.0.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    assert!(stderr.contains("registering again"), "{stderr}");
    assert!(stderr.contains("\"deregistered\""), "{stderr}");
}

#[test]
fn churn_of_20000_registrations_keeps_memory_bounded() {
    let dir = TempDir::new();
    let fixed = Backend::new("static-1");
    let gw = start(&dir, &fixed, "", "{}");
    let admin = gw.admin_addr();
    let mut conn = KeepAlive::open(admin).unwrap();
    let mut rss = Vec::new();
    let started = Instant::now();
    const BATCH: usize = 2_000;
    for batch in 0..10 {
        for i in 0..BATCH {
            let n = batch * BATCH + i;
            // Closed loopback ports: the health checks fail fast and they stay pending.
            let body = format!("{{\"address\": \"127.0.0.1:{}\", \"ttl\": \"60s\"}}", 40_000 + (n % 20_000));
            let r = conn.send("PUT", &format!("/api/registry/churn/churn-{n}"), &[], Some(&body)).unwrap();
            assert_eq!(r.status, 200, "{}", r.body);
        }
        poll_until(Duration::from_secs(30), Duration::from_millis(100), || {
            (backends(admin, "churn", None).len() == BATCH).then_some(())
        })
        .expect("the batch is in the pool");
        for i in 0..BATCH {
            let n = batch * BATCH + i;
            let r = conn.send("DELETE", &format!("/api/registry/churn/churn-{n}"), &[], None).unwrap();
            assert_eq!(r.status, 200, "{}", r.body);
        }
        poll_until(Duration::from_secs(30), Duration::from_millis(100), || {
            backends(admin, "churn", None).is_empty().then_some(())
        })
        .expect("the batch left the pool");
        // Let the stopped health checks wind down.
        std::thread::sleep(Duration::from_millis(300));
        rss.push(gw.rss_kib());
    }
    println!("RSS after each batch of {BATCH} registered and removed (KiB): {rss:?}; {:?}", started.elapsed());
    // RSS moves with what the allocator keeps between batches; a leak would make the
    // second 10,000 registrations end higher than the first 10,000 did (16 MiB is
    // ~1.7 KB per registration, less than one backend entry with its metrics).
    let (first, second) = (rss[..5].iter().max().unwrap(), rss[5..].iter().max().unwrap());
    assert!(
        *second < first + 16 * 1024,
        "RSS peaked at {first} KiB over the first 5 batches and {second} KiB over the last 5: {rss:?}"
    );
    let (status, _) = util::get(gw.addr, "/");
    assert_eq!(status, 200, "still serving");
}
