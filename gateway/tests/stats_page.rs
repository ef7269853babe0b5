//! The live stats page (`GET /` on the admin listener) in real headless Chromium: it
//! draws three live backends from `/api/stats`; when one dies, the same page (no
//! reload) turns its row `down` within one refresh after the health check notices. The
//! upstream's canary and shadow show under its strategy line.
//! Leaves a full-page screenshot in `target/stats-page.png`.
//!
//! Chromium is driven over the DevTools protocol ([`util::Chromium`]). Without a
//! Chromium the test is skipped with a loud message, unless `CI` is set: then it fails
//! (`scripts/test.sh` installs it).

mod util;

use serde_json::Value;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use util::{Backend, Chromium, Gateway, TempDir, message, try_get};

/// How often the page polls `/api/stats`.
const REFRESH: Duration = Duration::from_secs(1);
/// How long after the health checker marks a backend down its row may still say
/// otherwise: one refresh, plus slack for a busy 2-core machine.
const SHOWN_WITHIN: Duration = Duration::from_millis(2_000);
/// The longest wait, from the kill, for the row to say `down`.
const DOWN_BOUND: Duration = Duration::from_secs(5);

/// The page as a test sees it: every backend row's state, and the status element.
const DOM_STATE: &str = r#"({
  rows: Object.fromEntries([...document.querySelectorAll('[data-backend]')].map(e => [e.dataset.backend, e.dataset.state])),
  status: document.getElementById('status') && document.getElementById('status').dataset.state,
  updated_ms: Number(document.getElementById('status') && document.getElementById('status').dataset.updatedMs || 0),
  status_text: document.getElementById('status-text') && document.getElementById('status-text').textContent,
  attention: document.getElementById('attention') && document.getElementById('attention').innerText,
  banner: document.getElementById('banner') && !document.getElementById('banner').hidden && document.getElementById('banner').innerText,
})"#;

/// One upstream `web` over `backends` (ids = their names): TCP checks every 200 ms, one
/// failure takes a backend down; passive ejection off, so a dead backend is `down`
/// (active checks) and not `ejected` (failed requests) whichever comes first.
fn config(backends: &[Backend]) -> String {
    let list: String =
        backends.iter().map(|b| format!("      - address: {}\n        id: {}\n", b.addr(), b.name())).collect();
    format!(
        "\
listeners:
  - address: 127.0.0.1:0
threads: 2
upstreams:
  web:
    health_check:
      interval: 200ms
      timeout: 150ms
      rise: 1
      fall: 1
    passive:
      consecutive_failures: 0
    canary: {{plugin: least-connections, share: 1.0}}
    shadow: {{plugin: random, sample: 0.5}}
    backends:
{list}"
    )
}

/// The Chromium binary, or `None` (after saying so loudly) when there is none and `CI`
/// is unset.
fn chromium_or_skip() -> Option<PathBuf> {
    if let Some(bin) = Chromium::find() {
        return Some(bin);
    }
    if std::env::var_os("CI").is_some() {
        panic!(
            "chromium is not installed and CI is set, so the stats page test cannot be skipped: \
             install it (scripts/test.sh does: apt-get install chromium) or point CHROMIUM at a Chrome/Chromium binary"
        );
    }
    eprintln!(
        "\n\
         ************************************************************************\n\
         *  SKIPPED stats_page: no chromium on PATH (and CHROMIUM is unset).     *\n\
         *  Install it (apt-get install chromium) to test the stats page in a   *\n\
         *  real browser; with CI set, this skip is a failure.                  *\n\
         ************************************************************************\n"
    );
    None
}

/// The cargo target dir: `$CARGO_TARGET_DIR` when absolute, else three levels up from
/// this test binary (`target/<profile>/deps/stats_page-HASH`).
fn target_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).filter(|d| d.is_absolute()) {
        return dir;
    }
    let exe = std::env::current_exe().expect("the test binary's path");
    exe.ancestors().nth(3).expect("the test binary is in target/<profile>/deps").to_path_buf()
}

/// Panics with `why`, the page as the test sees it, what the page reported as errors,
/// the gateway's `/api/stats` and its health log lines.
fn fail(page: &mut Chromium, gw: &Gateway, why: &str) -> ! {
    let dom = page.eval(DOM_STATE).unwrap_or_else(Value::String);
    let errors = page.page_errors();
    let stats = match try_get(gw.admin_addr(), "/api/stats") {
        Ok((status, body)) => format!("{status} {}", body.chars().take(4000).collect::<String>()),
        Err(e) => e,
    };
    let health: Vec<String> = gw
        .logs_matching(|l| l.get("backend").is_some() && message(l) != "request")
        .iter()
        .map(Value::to_string)
        .collect();
    panic!(
        "{why}\n\nthe page (DOM):\n{dom:#}\n\npage errors: {errors:#?}\n\nGET /api/stats: {stats}\n\nhealth log:\n{}",
        health.join("\n")
    );
}

#[test]
fn a_dead_backend_turns_down_on_the_open_page() {
    let Some(bin) = chromium_or_skip() else { return };
    let dir = TempDir::new();
    let backends = [Backend::new("backend-1"), Backend::new("backend-2"), Backend::new("backend-3")];
    let file = dir.write("gw.yaml", config(&backends));
    let plugins = dir.path().join("plugins");
    let gw = Gateway::with_config(&file, &plugins);
    let admin = gw.admin_addr();

    // Steady traffic, so the page has rates, latencies and sparklines to draw.
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = {
        let (stop, addr) = (stop.clone(), gw.addr);
        std::thread::spawn(move || {
            let (mut ok, mut failed) = (0u32, 0u32);
            while !stop.load(Ordering::Relaxed) {
                match try_get(addr, "/") {
                    Ok((200, _)) => ok += 1,
                    _ => failed += 1,
                }
                std::thread::sleep(Duration::from_millis(15));
            }
            (ok, failed)
        })
    };

    let mut page = Chromium::launch(&bin, 1600, 1000);
    page.navigate(&format!("http://{admin}/"));

    // The three backends, up, with rates computed from at least two polls, and (for the
    // screenshot) a few seconds of sparkline.
    let all_up = r#"(() => {
        const rows = [...document.querySelectorAll('[data-backend]')];
        return rows.length === 3 && rows.every(r => r.dataset.state === 'up')
            && rows.every(r => r.querySelector('.c-p50') && r.querySelector('.c-p50').textContent !== '–');
    })()"#;
    if page.wait_for(Duration::from_secs(15), all_up).is_none() {
        fail(&mut page, &gw, "the page never showed the three backends up with traffic within 15 s");
    }
    let samples = "(document.querySelector('#total-spark .line').getAttribute('d') || '').split('L').length >= 6";
    if page.wait_for(REFRESH * 10, samples).is_none() {
        fail(&mut page, &gw, "the requests/s sparkline did not grow to 6 samples in 10 refreshes");
    }
    // The canary and the shadow, under the strategy line: who decides, and the agreement.
    let trial = r#"(() => {
        const t = document.querySelector('[data-upstream="web"] .trial');
        return !!t && !t.hidden && t.innerText.includes('least-connections decides 100.0% of clients')
            && /agrees \d+(\.\d)?% of \d+/.test(t.innerText) && t.querySelectorAll('.bars').length === 3;
    })()"#;
    if page.wait_for(REFRESH * 5, trial).is_none() {
        fail(&mut page, &gw, "the canary and shadow panel is missing or incomplete");
    }
    let dom = page.eval(DOM_STATE).expect("read the page");
    let names: Vec<&String> = dom["rows"].as_object().map(|r| r.keys().collect()).unwrap_or_default();
    assert_eq!(names, ["web/backend-1", "web/backend-2", "web/backend-3"], "{dom:#}");
    assert_eq!(dom["status"], "live", "{dom:#}");
    // A mark in this document: a reload would lose it.
    page.eval("window.__sameDocument = 'yes'").expect("set a mark in the page");
    let updated_before = dom["updated_ms"].as_f64().unwrap_or(0.0);

    // Backend 2 dies; the health checker notices; the open page follows.
    let dead = &backends[1];
    let mark = gw.log_mark();
    dead.stop();
    let killed = Instant::now();
    let address = dead.addr().to_string();
    gw.wait_for_log_after(mark, DOWN_BOUND, |l| {
        message(l).starts_with("backend is down") && (l["backend"] == dead.name() || l["address"] == address.as_str())
    });
    let noticed = Instant::now();
    let is_down = r#"(() => {
        const row = document.querySelector('[data-backend="web/backend-2"]');
        return row !== null && row.dataset.state === 'down';
    })()"#;
    let left = DOWN_BOUND.saturating_sub(killed.elapsed());
    if page.wait_for(left, is_down).is_none() {
        fail(&mut page, &gw, &format!("web/backend-2 is not `down` on the page {DOWN_BOUND:?} after it was killed"));
    }
    let shown = Instant::now();
    let lag = shown - noticed;
    eprintln!(
        "backend killed → health checker marked it down in {:?} → the page showed it in {lag:?} more (refresh {REFRESH:?})",
        noticed - killed
    );
    if lag > SHOWN_WITHIN {
        fail(&mut page, &gw, &format!("the page took {lag:?} to show the down backend (at most {SHOWN_WITHIN:?})"));
    }

    // Same document, still live, the others still up, and the attention strip names it.
    let dom = page.eval(DOM_STATE).expect("read the page");
    assert_eq!(page.eval("window.__sameDocument").ok(), Some("yes".into()), "the page reloaded: {dom:#}");
    assert_eq!(dom["status"], "live", "{dom:#}");
    assert!(
        dom["updated_ms"].as_f64().unwrap_or(0.0) > updated_before,
        "status data-updated-ms did not advance: {dom:#}"
    );
    assert_eq!(dom["rows"]["web/backend-1"], "up", "{dom:#}");
    assert_eq!(dom["rows"]["web/backend-3"], "up", "{dom:#}");
    if page
        .wait_for(REFRESH * 2, "document.getElementById('attention').innerText.includes('web/backend-2 down')")
        .is_none()
    {
        fail(&mut page, &gw, "the attention strip does not name web/backend-2 as down");
    }
    // Its requests/s follows: nothing reaches it since the previous poll.
    let idle = r#"document.querySelector('[data-backend="web/backend-2"] .c-rps').textContent === '0'"#;
    if page.wait_for(REFRESH * 3, idle).is_none() {
        fail(&mut page, &gw, "web/backend-2 still shows requests/s 3 refreshes after it went down");
    }

    // A picture for people (and for the README): the whole page, with its red row.
    let png = target_dir().join("stats-page.png");
    page.screenshot_full_page(&png);
    let bytes = std::fs::read(&png).unwrap_or_else(|e| panic!("read {}: {e}", png.display()));
    assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n") && bytes.len() > 10_000, "{} is not a screenshot", png.display());
    eprintln!("stats page screenshot: {}", png.display());

    // The page ran without an error: no exception, no CSP refusal, no failed load.
    let errors = page.page_errors();
    assert!(errors.is_empty(), "the page reported errors: {errors:#?}");

    stop.store(true, Ordering::Relaxed);
    let (ok, failed) = traffic.join().expect("the traffic thread");
    eprintln!("traffic: {ok} requests answered 200, {failed} not");
    assert!(ok > 50, "only {ok} requests succeeded ({failed} failed)");
}
