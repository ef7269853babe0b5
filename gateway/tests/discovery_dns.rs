//! DNS discovery against a real DNS server: Debian's `dnsmasq` on a high loopback port
//! (installed by scripts/test.sh), serving A records from a hosts file (re-read on
//! SIGHUP) and SRV records from its command line (restarted to change them). Under
//! continuous traffic the gateway follows an added record, a removed one and a changed
//! SRV weight within one refresh, with zero failed requests; a name whose records are
//! all removed, and a DNS server that stops answering, leave the last known backends
//! serving.

mod util;

use serde_json::Value;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use util::{Backend, Gateway, TempDir, Traffic, poll_until};

/// The gateway's `refresh` in these tests.
const REFRESH: Duration = Duration::from_secs(1);

/// A change in DNS shows in the answers within one refresh, plus the first health check
/// of a new backend (every 200 ms) and slack for a loaded machine.
const FOLLOW_WITHIN: Duration = Duration::from_secs(2);

/// The TTL dnsmasq gives its records: far longer than a test runs, so a resolver that
/// kept answers for their TTL would never see a change and the tests would fail.
const RECORD_TTL: &str = "--local-ttl=3600";

/// A dnsmasq process on `127.0.0.1:port`; stopped (by PID) when dropped.
struct Dnsmasq {
    child: Option<Child>,
    port: u16,
    hosts: PathBuf,
    srv: Vec<String>,
}

impl Dnsmasq {
    /// Starts dnsmasq with A records from `hosts` (a hosts file) and `srv` records
    /// (`--srv-host` values), on a free port.
    fn start(hosts: PathBuf, srv: Vec<String>) -> Dnsmasq {
        let mut d = Dnsmasq { child: None, port: 0, hosts, srv };
        // Another process may take the port between our check and dnsmasq's bind: then
        // dnsmasq exits, and another port is tried.
        for _ in 0..5 {
            d.port = free_tcp_and_udp_port();
            if d.try_spawn() {
                return d;
            }
        }
        panic!("dnsmasq did not start on any of 5 free ports");
    }

    fn spawn(&mut self) {
        for _ in 0..5 {
            if self.try_spawn() {
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!("dnsmasq did not start again on port {}", self.port);
    }

    /// Starts dnsmasq on `self.port`; whether it is listening (else it is stopped).
    fn try_spawn(&mut self) -> bool {
        let bin = if std::path::Path::new("/usr/sbin/dnsmasq").exists() { "/usr/sbin/dnsmasq" } else { "dnsmasq" };
        let mut cmd = Command::new(bin);
        cmd.args([
            &format!("--port={}", self.port),
            "--listen-address=127.0.0.1",
            "--bind-interfaces",
            "--no-resolv",
            "--no-hosts",
            "--keep-in-foreground",
            "--conf-file=/dev/null",
            "--pid-file=",
            RECORD_TTL,
            // Authoritative for the test zone: a name without records is NXDOMAIN, as
            // from a real zone, rather than REFUSED for want of an upstream server.
            "--local=/service.test/",
            "--log-facility=-",
            &format!("--addn-hosts={}", self.hosts.display()),
        ]);
        if nix_is_root() {
            cmd.arg("--user=root");
        }
        for s in &self.srv {
            cmd.arg(format!("--srv-host={s}"));
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start dnsmasq (scripts/test.sh installs Debian's dnsmasq-base)");
        self.child = Some(child);
        // Ready once it answers on TCP; gone if it could not bind.
        let listening = poll_until(Duration::from_secs(10), Duration::from_millis(20), || {
            if self.child.as_mut().is_some_and(|c| c.try_wait().ok().flatten().is_some()) {
                return Some(false);
            }
            std::net::TcpStream::connect(("127.0.0.1", self.port)).ok().map(|_| true)
        });
        if listening != Some(true) {
            self.stop();
            return false;
        }
        true
    }

    /// Re-reads the hosts file (SIGHUP).
    fn reload(&self) {
        let pid = self.child.as_ref().unwrap().id().to_string();
        assert!(Command::new("kill").args(["-HUP", &pid]).status().unwrap().success());
    }

    /// Restarts it with other SRV records.
    fn restart_with(&mut self, srv: Vec<String>) {
        self.stop();
        self.srv = srv;
        self.spawn();
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A port free on 127.0.0.1 for both TCP and UDP right now.
fn free_tcp_and_udp_port() -> u16 {
    loop {
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = tcp.local_addr().unwrap().port();
        if std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

fn nix_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("Uid:").map(|v| v.split_whitespace().next() == Some("0"))))
        .unwrap_or(false)
}

/// Two backends on one port at two loopback addresses (A records carry no port).
fn same_port_backends(names: &[&str]) -> (u16, Vec<Backend>) {
    for _ in 0..50 {
        let port = std::net::TcpListener::bind("127.0.0.2:0").unwrap().local_addr().unwrap().port();
        let bound: Result<Vec<Backend>, _> = names
            .iter()
            .enumerate()
            .map(|(i, n)| Backend::bind(n, SocketAddr::new(IpAddr::from([127, 0, 0, 2 + i as u8]), port)))
            .collect();
        if let Ok(b) = bound {
            return (port, b);
        }
    }
    panic!("no port free on 127.0.0.2-4");
}

fn gateway(dir: &TempDir, discovery: &str, strategy: &str) -> Gateway {
    let config = format!(
        "listeners: [{{address: 127.0.0.1:0}}]\nthreads: 2\naccess_log: false\nupstreams:\n  books:\n    strategy: {{plugin: {strategy}}}\n    health_check: {{path: /healthz, interval: 200ms, timeout: 500ms}}\n    discovery:\n      dns: {discovery}\n"
    );
    Gateway::with_config(&dir.write("gw.yaml", config), dir.path())
}

fn backends(admin: SocketAddr) -> Vec<Value> {
    let (status, body) = util::get(admin, "/api/upstreams");
    assert_eq!(status, 200);
    let v: Value = serde_json::from_str(&body).unwrap();
    v["upstreams"][0]["backends"].as_array().unwrap().clone()
}

/// A gateway whose round-robin upstream follows the A records of `books.service.test`
/// (two of them, on `port`) at `dns`, once both are backends that are up.
fn following_two_a_records(dir: &TempDir, port: u16, dns: &Dnsmasq) -> Gateway {
    let gw = gateway(
        dir,
        &format!(
            "{{name: books.service.test, port: {port}, resolver: \"127.0.0.1:{}\", refresh: {}ms}}",
            dns.port,
            REFRESH.as_millis()
        ),
        "round-robin",
    );
    let admin = gw.admin_addr();
    poll_until(Duration::from_secs(15), Duration::from_millis(50), || {
        let bs = backends(admin);
        (bs.len() == 2 && bs.iter().all(|b| b["state"] == "up")).then_some(())
    })
    .expect("both A records become backends");
    gw
}

#[test]
fn a_records_are_followed_under_traffic_and_a_dns_outage_keeps_the_pool() {
    let dir = TempDir::new();
    let (port, b) = same_port_backends(&["a1", "a2", "a3"]);
    let hosts = dir.write("hosts", "127.0.0.2 books.service.test\n127.0.0.3 books.service.test\n");
    let mut dns = Dnsmasq::start(hosts.clone(), vec![]);
    let gw = following_two_a_records(&dir, port, &dns);
    let admin = gw.admin_addr();
    let ids: Vec<String> = backends(admin).iter().map(|b| b["id"].as_str().unwrap().to_owned()).collect();
    assert_eq!(ids, [b[0].addr().to_string(), b[1].addr().to_string()]);
    assert!(backends(admin).iter().all(|b| b["source"] == "dns"));
    let traffic = Traffic::start(gw.addr);
    traffic.wait(Instant::now(), Duration::from_secs(10), "a1 and a2 serve", |a| {
        a.iter().any(|n| n == "a1") && a.iter().any(|n| n == "a2")
    });

    // Add a record.
    std::fs::write(
        &hosts,
        "127.0.0.2 books.service.test\n127.0.0.3 books.service.test\n127.0.0.4 books.service.test\n",
    )
    .unwrap();
    dns.reload();
    let since = Instant::now();
    let took = traffic.wait(since, Duration::from_secs(10), "a3 takes traffic", |a| a.iter().any(|n| n == "a3"));
    println!("added A record serving after {took:?} (refresh {REFRESH:?})");
    assert!(took <= FOLLOW_WITHIN, "added A record served after {took:?}, not within {FOLLOW_WITHIN:?}");

    // Remove one.
    std::fs::write(&hosts, "127.0.0.3 books.service.test\n127.0.0.4 books.service.test\n").unwrap();
    dns.reload();
    let since = Instant::now();
    let took = traffic.wait(since, Duration::from_secs(10), "a1 gets no more traffic", |a| a.iter().all(|n| n != "a1"));
    println!("removed A record out of rotation after {took:?} (refresh {REFRESH:?})");
    assert!(took <= FOLLOW_WITHIN, "removed A record still served after {took:?}, not within {FOLLOW_WITHIN:?}");

    // The DNS server goes away: lookups fail, the last known backends keep serving.
    let mark = gw.log_mark();
    dns.stop();
    gw.wait_for_log_after(mark, Duration::from_secs(15), |l| {
        util::message(l).starts_with("DNS lookup failed; keeping the last known backends")
    });
    let since = Instant::now();
    std::thread::sleep(Duration::from_secs(2));
    traffic.wait(since, Duration::from_secs(5), "a2 and a3 still serve", |a| {
        a.iter().any(|n| n == "a2") && a.iter().any(|n| n == "a3")
    });
    let (status, body) = util::get(admin, "/api/upstreams");
    assert_eq!(status, 200);
    let v: Value = serde_json::from_str(&body).unwrap();
    assert!(v["upstreams"][0]["discovery"]["last_error"].is_string(), "{}", v["upstreams"][0]["discovery"]);

    let (sent, failures) = traffic.finish();
    println!("{sent} requests, {} failed", failures.len());
    assert!(failures.is_empty(), "failed requests: {:?}", &failures[..failures.len().min(10)]);
    drop(b);
}

#[test]
fn a_name_whose_records_are_all_removed_keeps_the_last_known_backends() {
    let dir = TempDir::new();
    let (port, b) = same_port_backends(&["e1", "e2"]);
    let hosts = dir.write("hosts", "127.0.0.2 books.service.test\n127.0.0.3 books.service.test\n");
    let dns = Dnsmasq::start(hosts.clone(), vec![]);
    let gw = following_two_a_records(&dir, port, &dns);
    let admin = gw.admin_addr();
    let traffic = Traffic::start(gw.addr);
    traffic.wait(Instant::now(), Duration::from_secs(10), "e1 and e2 serve", |a| {
        a.iter().any(|n| n == "e1") && a.iter().any(|n| n == "e2")
    });
    let last_error = || {
        let (status, body) = util::get(admin, "/api/upstreams");
        assert_eq!(status, 200);
        let v: Value = serde_json::from_str(&body).unwrap();
        v["upstreams"][0]["discovery"]["last_error"].as_str().map(str::to_owned)
    };
    let both_still_serve = |what: &str| {
        let since = Instant::now();
        std::thread::sleep(REFRESH * 2);
        traffic
            .wait(since, Duration::from_secs(5), what, |a| a.iter().any(|n| n == "e1") && a.iter().any(|n| n == "e2"));
        let bs = backends(admin);
        assert!(bs.len() == 2 && bs.iter().all(|b| b["state"] == "up"), "{what}: {bs:?}");
    };

    // The name keeps only an IPv6 address: the A question gets an empty answer.
    let mark = gw.log_mark();
    std::fs::write(&hosts, "::1 books.service.test\n").unwrap();
    dns.reload();
    let line = gw.wait_for_log_after(mark, FOLLOW_WITHIN * 2, |l| {
        util::message(l).starts_with("DNS lookup found no backends; keeping the last known ones")
    });
    println!("empty answer logged: {}", util::message(&line));
    assert!(util::message(&line).ends_with("A books.service.test: the name has no A records"), "{line}");
    both_still_serve("after an empty answer, e1 and e2 still serve");

    // No record left at all: NXDOMAIN, the same kind of trouble (the warning is not
    // repeated), shown in the admin API.
    std::fs::write(&hosts, "").unwrap();
    dns.reload();
    let shown =
        poll_until(FOLLOW_WITHIN * 2, Duration::from_millis(50), || last_error().filter(|e| e.contains("NXDOMAIN")))
            .expect("the admin API shows the NXDOMAIN");
    println!("admin API last_error: {shown}");
    both_still_serve("after NXDOMAIN, e1 and e2 still serve");
    let warnings = gw.logs_matching(|l| util::message(l).starts_with("DNS lookup found no backends"));
    assert_eq!(warnings.len(), 1, "one warning while the name stays empty: {warnings:?}");

    // A record comes back: the source follows it again.
    let mark = gw.log_mark();
    std::fs::write(&hosts, "127.0.0.3 books.service.test\n").unwrap();
    dns.reload();
    let since = Instant::now();
    let took = traffic.wait(since, Duration::from_secs(10), "only e2 serves", |a| a.iter().all(|n| n == "e2"));
    println!("records back, followed after {took:?} (refresh {REFRESH:?})");
    assert!(took <= FOLLOW_WITHIN, "records back, followed after {took:?}, not within {FOLLOW_WITHIN:?}");
    gw.wait_for_log_after(mark, Duration::from_secs(5), |l| util::message(l) == "DNS lookup works again");
    assert_eq!(last_error(), None);

    let (sent, failures) = traffic.finish();
    println!("{sent} requests, {} failed", failures.len());
    assert!(failures.is_empty(), "failed requests: {:?}", &failures[..failures.len().min(10)]);
    drop(b);
}

#[test]
fn srv_records_give_ports_and_weights_and_are_followed_under_traffic() {
    let dir = TempDir::new();
    let s: Vec<Backend> = ["s1", "s2", "s3"].iter().map(|n| Backend::new(n)).collect();
    let hosts = dir.write("hosts", "127.0.0.1 s1.service.test\n127.0.0.1 s2.service.test\n127.0.0.1 s3.service.test\n");
    let srv = |which: &[(usize, u16)]| -> Vec<String> {
        which
            .iter()
            .map(|(i, w)| format!("_books._tcp.service.test,s{}.service.test,{},0,{w}", i + 1, s[*i].addr().port()))
            .collect()
    };
    let mut dns = Dnsmasq::start(hosts, srv(&[(0, 10), (1, 10)]));
    let gw = gateway(
        &dir,
        &format!(
            "{{name: _books._tcp.service.test, type: srv, resolver: \"127.0.0.1:{}\", refresh: {}ms}}",
            dns.port,
            REFRESH.as_millis()
        ),
        "weighted-round-robin",
    );
    let admin = gw.admin_addr();
    poll_until(Duration::from_secs(15), Duration::from_millis(50), || {
        let bs = backends(admin);
        (bs.len() == 2 && bs.iter().all(|b| b["state"] == "up" && b["weight"] == 10)).then_some(())
    })
    .expect("both SRV records become backends, with their ports and weights");
    let traffic = Traffic::start(gw.addr);
    traffic.wait(Instant::now(), Duration::from_secs(10), "s1 and s2 serve", |a| {
        a.iter().any(|n| n == "s1") && a.iter().any(|n| n == "s2")
    });

    // Change a weight: s2 gets three times s1's share.
    dns.restart_with(srv(&[(0, 10), (1, 30)]));
    let since = Instant::now();
    let took = poll_until(Duration::from_secs(10), Duration::from_millis(20), || {
        backends(admin).iter().any(|b| b["id"] == s[1].addr().to_string() && b["weight"] == 30).then(|| since.elapsed())
    })
    .expect("the new SRV weight is applied");
    println!("SRV weight change applied after {took:?} (refresh {REFRESH:?})");
    assert!(took <= FOLLOW_WITHIN, "SRV weight applied after {took:?}, not within {FOLLOW_WITHIN:?}");
    assert!(backends(admin).iter().all(|b| b["state"] == "up"), "a weight change keeps the backend up");
    let since = Instant::now();
    std::thread::sleep(Duration::from_secs(2));
    let answers: Vec<String> = traffic.after(since);
    let (n1, n2) = (answers.iter().filter(|n| *n == "s1").count(), answers.iter().filter(|n| *n == "s2").count());
    assert!(n1 > 20 && n2 > 2 * n1 && n2 < 4 * n1, "s1 {n1}, s2 {n2}: expected about 1:3");

    // Add one, remove one.
    dns.restart_with(srv(&[(1, 30), (2, 10)]));
    let since = Instant::now();
    let took = traffic.wait(since, Duration::from_secs(10), "s3 serves, s1 no more", |a| {
        a.iter().any(|n| n == "s3") && a.iter().all(|n| n != "s1")
    });
    println!("SRV records added and removed, followed after {took:?} (refresh {REFRESH:?})");
    assert!(took <= FOLLOW_WITHIN, "SRV change followed after {took:?}, not within {FOLLOW_WITHIN:?}");

    let (sent, failures) = traffic.finish();
    println!("{sent} requests, {} failed", failures.len());
    assert!(failures.is_empty(), "failed requests: {:?}", &failures[..failures.len().min(10)]);
}
