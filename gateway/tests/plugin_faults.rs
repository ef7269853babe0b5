//! A plugin that traps or loops forever in `pick` costs nothing but the fallback: every
//! request is still answered, the gateway stays up, and the failure is logged (with the
//! plugin's own account of it: a Rust panic's message).

mod util;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};
use util::{Backend, Gateway, TempDir, get, message, report, test_plugin};

/// Starts a gateway over two backends with the plugins folder `dir`, plus `extra` flags.
fn gateway(dir: &TempDir, backends: &[&Backend], extra: &[&str]) -> Gateway {
    let mut args = vec!["--listen".to_owned(), "127.0.0.1:0".into(), "--threads".into(), "2".into()];
    args.extend(["--plugins".to_owned(), dir.path().to_str().unwrap().to_owned()]);
    for b in backends {
        args.extend(["-b".to_owned(), b.addr().to_string()]);
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    Gateway::start(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

/// The gateway really loaded `file` (and not the built-in) for its upstream.
fn assert_loaded_from(gw: &Gateway, file: &std::path::Path) {
    let ready = gw.wait_for_log(Duration::from_secs(5), |l| message(l) == "upstream ready");
    let origin = ready["origin"].as_str().unwrap_or_default();
    assert!(origin.contains(file.to_str().unwrap()), "the upstream uses {origin}, not {}", file.display());
}

/// `n` sequential GETs: each answered 200 by one of the backends, each within `limit`.
fn serve_all(gw: &Gateway, backends: &[&Backend], n: usize, limit: Duration) -> BTreeSet<String> {
    let names: BTreeSet<_> = backends.iter().map(|b| b.name().to_owned()).collect();
    let mut seen = BTreeSet::new();
    for i in 0..n {
        let started = Instant::now();
        let (status, body) = get(gw.addr, &format!("/item/{i}"));
        let took = started.elapsed();
        assert_eq!(status, 200, "request {i}: {body}");
        assert!(names.contains(&body), "request {i} answered by {body:?}");
        assert!(took < limit, "request {i} took {took:?}");
        seen.insert(body);
    }
    seen
}

/// Checks the failure is logged and in the access log; returns the warning's text.
fn assert_failure_logged(gw: &Gateway, plugin: &str) -> String {
    let warning = gw.wait_for_log(Duration::from_secs(5), |l| message(l).starts_with("plugin call failed"));
    assert_eq!(warning["level"], "WARN", "{warning}");
    assert_eq!(warning["plugin"], plugin, "{warning}");
    // Access-log lines (JSON objects with a request_id) reach stderr within ~200 ms.
    let line = gw.wait_for_log(Duration::from_secs(5), |l| l.get("request_id").is_some() && l["fallback"] == true);
    assert_eq!(line["strategy"], plugin, "the access log names the strategy: {line}");
    message(&warning).to_owned()
}

#[test]
fn trapping_override_of_a_builtin_falls_back_on_every_request() {
    let dir = TempDir::new();
    let file = dir.copy(&test_plugin("trap"), "round-robin.wasm");
    let (b1, b2) = (Backend::new("backend-1"), Backend::new("backend-2"));
    let mut gw = gateway(&dir, &[&b1, &b2], &[]);
    assert_loaded_from(&gw, &file);

    let before = gw.rss_kib();
    let seen = serve_all(&gw, &[&b1, &b2], 20, Duration::from_secs(2));
    assert_eq!(seen.len(), 2, "the fallback round robin used only {seen:?}");
    let warning = assert_failure_logged(&gw, "round-robin");
    report::hostile_plugin("trap in `pick`", "20 of 20 (the fallback)".into(), (before, gw.rss_kib()), &warning);
    assert!(gw.is_running());
}

#[test]
fn spinning_plugin_is_stopped_by_the_deadline() {
    let dir = TempDir::new();
    let file = dir.copy(&test_plugin("spin"), "round-robin.wasm");
    let (b1, b2) = (Backend::new("backend-1"), Backend::new("backend-2"));
    let mut gw = gateway(&dir, &[&b1, &b2], &[]);
    assert_loaded_from(&gw, &file);

    // The default deadline is 20ms: far below the per-request limit, even on a busy machine.
    let before = gw.rss_kib();
    let seen = serve_all(&gw, &[&b1, &b2], 50, Duration::from_secs(1));
    assert_eq!(seen.len(), 2, "the fallback round robin used only {seen:?}");
    let warning = assert_failure_logged(&gw, "round-robin");
    report::hostile_plugin(
        "infinite loop in `pick`",
        "50 of 50 (the fallback)".into(),
        (before, gw.rss_kib()),
        &warning,
    );
    assert!(gw.is_running(), "the gateway died");
}

#[test]
fn folder_plugin_by_its_own_name_falls_back_too_and_the_log_says_where_it_panicked() {
    let dir = TempDir::new();
    let file = dir.copy(&test_plugin("trap"), "trap.wasm");
    let (b1, b2) = (Backend::new("backend-1"), Backend::new("backend-2"));
    let mut gw = gateway(&dir, &[&b1, &b2], &["--strategy", "trap"]);
    assert_loaded_from(&gw, &file);

    let seen = serve_all(&gw, &[&b1, &b2], 20, Duration::from_secs(2));
    assert_eq!(seen.len(), 2, "the fallback round robin used only {seen:?}");
    // The SDK's panic hook logs the panic (`host.log` at error level) before the trap, and
    // the gateway adds it to the failure's line: the operator reads where and why.
    let warning = assert_failure_logged(&gw, "trap");
    assert!(
        warning.contains("pick: wasm trap: ")
            && warning.contains("; the plugin said: panicked at ")
            && warning.contains("src/lib.rs:")
            && warning.contains(": this plugin always traps"),
        "{warning}"
    );
    let said = gw.wait_for_log(Duration::from_secs(5), |l| l["level"] == "ERROR" && l["plugin"] == "trap");
    assert!(
        message(&said).starts_with("panicked at ") && message(&said).ends_with("this plugin always traps"),
        "{said}"
    );
    assert!(gw.is_running());
}

/// GETs in a loop on a thread until stopped: (answered 200 by `expected`, anything else).
struct Load {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<(usize, Vec<String>)>>,
}

impl Load {
    fn start(addr: std::net::SocketAddr, expected: &'static str) -> Load {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let (mut ok, mut bad) = (0, Vec::new());
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                match util::try_get(addr, "/load") {
                    Ok((200, body)) if body == expected => ok += 1,
                    other => bad.push(format!("{other:?}")),
                }
            }
            (ok, bad)
        });
        Load { stop, thread: Some(thread) }
    }

    fn finish(mut self) -> (usize, Vec<String>) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.take().unwrap().join().expect("the load thread")
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// A valid core Wasm module (one exported function), which is not a component.
fn core_module() -> Vec<u8> {
    let mut m = b"\0asm\x01\0\0\0".to_vec();
    m.extend([0x01, 0x04, 0x01, 0x60, 0x00, 0x00]); // type section: () -> ()
    m.extend([0x03, 0x02, 0x01, 0x00]); // function section: one function of type 0
    m.extend([0x07, 0x07, 0x01, 0x03, b'r', b'u', b'n', 0x00, 0x00]); // export "run"
    m.extend([0x0a, 0x04, 0x01, 0x02, 0x00, 0x0b]); // code: an empty body
    m
}

/// `component` with a custom section appended that makes it `total` bytes: still a
/// valid component, just large.
fn padded(component: &[u8], total: usize) -> Vec<u8> {
    let name = b"padding";
    let payload = total - component.len() - 1 - 5 - 1 - name.len();
    let size = (1 + name.len() + payload) as u32;
    let mut out = component.to_vec();
    out.push(0); // custom section
    // The size as a 5-byte LEB128, so that the total is exact.
    for i in 0..5 {
        let byte = ((size >> (7 * i)) & 0x7f) as u8;
        out.push(if i < 4 { byte | 0x80 } else { byte });
    }
    out.push(name.len() as u8);
    out.extend(name);
    out.resize(total, 0);
    out
}

#[test]
fn hostile_files_dropped_in_by_hot_swap_are_refused_and_the_old_plugin_keeps_serving() {
    let dir = TempDir::new();
    let file = dir.copy(&test_plugin("first"), "probe.wasm");
    let (b1, b2) = (Backend::new("backend-1"), Backend::new("backend-2"));
    let mut gw = gateway(&dir, &[&b1, &b2], &["--strategy", "probe"]);
    assert_loaded_from(&gw, &file);
    // `first` sends everything to backend-1: any other answer means something else served.
    assert_eq!(get(gw.addr, "/").1, "backend-1");
    let rss_before = gw.rss_kib();
    let load = Load::start(gw.addr, "backend-1");

    let spin = std::fs::read(test_plugin("spin")).unwrap();
    let mut broken = b"\0asm\x0d\0\x01\0".to_vec();
    broken.extend([0xff; 64]);
    let cases: [(&str, Vec<u8>, &str); 4] = [
        (
            "a component importing WASI sockets and filesystem",
            std::fs::read(test_plugin("wasi-caps")).unwrap(),
            "imports wasi:sockets/tcp@0.2.0, wasi:filesystem/types@0.2.0: plugins get no network, files or other system access",
        ),
        ("a core module", core_module(), "a core WebAssembly module, not a component"),
        (
            "a 50 MB component",
            padded(&spin, 50 << 20),
            "50.0 MiB, over the plugin file limit of 32 MiB (plugins.file_limit_mib",
        ),
        ("a broken component (compiled in the child process)", broken, "not a valid component"),
    ];
    let mut refusals = Vec::new();
    for (what, bytes, expected) in cases {
        let mark = gw.log_mark();
        let started = Instant::now();
        std::fs::write(dir.path().join("probe.wasm.tmp"), &bytes).unwrap();
        std::fs::rename(dir.path().join("probe.wasm.tmp"), &file).unwrap();
        let line = gw.wait_for_log_after(mark, Duration::from_secs(30), |l| {
            message(l).starts_with("plugin refused") || message(l).starts_with("plugin swapped")
        });
        let text = message(&line);
        println!("{what}: refused in {:?}: {text}", started.elapsed());
        refusals.push(format!("{what}: refused in {:.2} s: {text}", started.elapsed().as_secs_f64()));
        assert!(text.starts_with("plugin refused, the previous version keeps serving"), "{what}: {line}");
        assert!(text.contains(expected), "{what}: the refusal does not say `{expected}`: {line}");
        assert_eq!(line["level"], "ERROR", "{line}");
        assert_eq!(get(gw.addr, "/").1, "backend-1", "after {what}, another plugin serves");
    }
    let (ok, bad) = load.finish();
    let rss_after = gw.rss_kib();
    println!(
        "hostile hot swaps: {ok} requests answered by the old plugin, {} not; RSS {rss_before} -> {rss_after} KiB",
        bad.len()
    );
    report::hostile_plugin(
        "a component importing WASI sockets and filesystem, a core module, a 50 MB component, a broken component (each by hot swap)",
        format!("{ok} of {}, all by the old plugin", ok + bad.len()),
        (rss_before, rss_after),
        &refusals.join("; "),
    );
    assert!(bad.is_empty(), "requests that failed or were not served by the old plugin: {bad:?}");
    assert!(ok > 20, "only {ok} requests during the swaps");
    assert!(gw.is_running());
}
