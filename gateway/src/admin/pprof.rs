//! CPU profiling on demand, like Go's `net/http/pprof`: `GET /debug/pprof/profile?seconds=N`.
//!
//! The profiler samples every thread of the process `frequency` times per second of CPU
//! time (`setitimer(ITIMER_PROF)` + `SIGPROF`) for `seconds`, then symbolizes the stacks
//! and answers either the pprof protobuf (`go tool pprof -http :8081 gateway-cpu.pb`)
//! or, with `format=svg`, a flamegraph.
//!
//! Query parameters:
//! - `seconds`: how long to sample, `1..=300` (default 30).
//! - `frequency`: samples per second of CPU time, `1..=1000` (default 99: off the beat of
//!   anything that runs at round frequencies).
//! - `format`: `svg` for a flamegraph; anything else (or nothing) for the protobuf.
//!
//! Costs nothing while no profile runs: the profiler (signal handler and timer) exists
//! only for the duration of one request and is dropped with it. One profile at a time:
//! a second request while one runs is answered `409 Conflict`.
//!
//! What a profile leaves out: samples whose interrupted instruction is inside libc,
//! libgcc, libpthread or the vDSO are dropped (unwinding from there, inside a signal
//! handler, can deadlock on the unwinder's or the loader's locks), so time in syscall
//! wrappers — the kernel's TCP work — is not in the profile; `perf` shows it.

use super::{AdminResponse, error};
use bytes::Bytes;
use http::{Response, StatusCode, header};
use http_body_util::Full;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Default and bounds of `seconds`.
const DEFAULT_SECONDS: u64 = 30;
const MAX_SECONDS: u64 = 300;
/// Default and bounds of `frequency` (Hz).
const DEFAULT_FREQUENCY: u32 = 99;
const MAX_FREQUENCY: u32 = 1000;

/// Libraries whose code is never unwound from (see the module docs).
const BLOCKLIST: &[&str] = &["libc", "libgcc", "pthread", "vdso"];

/// Set while a profile runs (the profiler is process-wide: one at a time).
static RUNNING: AtomicBool = AtomicBool::new(false);

/// What to send back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    /// The pprof protobuf (`profile.proto`), uncompressed (`go tool pprof` reads it as is).
    Protobuf,
    /// An SVG flamegraph.
    Svg,
}

/// A parsed request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Params {
    seconds: u64,
    frequency: u32,
    format: Format,
}

/// `GET /debug/pprof/profile?QUERY`: samples the CPU for `seconds`, then answers the
/// profile. `query` is the raw query string (without `?`). Call it after the admin
/// token check: a profile shows where the process spends its time.
pub async fn profile(query: &str) -> AdminResponse {
    let params = match parse(query) {
        Ok(p) => p,
        Err(msg) => return error(StatusCode::BAD_REQUEST, msg),
    };
    let Some(busy) = Busy::claim() else {
        return error(
            StatusCode::CONFLICT,
            "a CPU profile is already being taken; wait for it to finish and try again",
        );
    };
    let guard =
        match pprof::ProfilerGuardBuilder::default().frequency(params.frequency as i32).blocklist(BLOCKLIST).build() {
            Ok(g) => g,
            Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, format!("cannot start the CPU profiler: {e}")),
        };
    tracing::info!(seconds = params.seconds, frequency = params.frequency, "CPU profile started");
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(params.seconds)).await;

    // Symbolizing reads the binary's debug info: seconds of CPU, off the async thread.
    // The profiler guard and the busy mark travel with the work, so a client that hangs
    // up early cannot start a second profiler while this one is still being read.
    let built = tokio::task::spawn_blocking(move || {
        let report = guard.report().build();
        drop(guard); // stops sampling (and the timer) before encoding
        let body = report.map_err(|e| format!("building the report: {e}")).and_then(|r| encode(&r, params));
        drop(busy);
        body
    })
    .await;
    match built {
        Ok(Ok(body)) => {
            tracing::info!(
                seconds = params.seconds,
                took_ms = started.elapsed().as_millis() as u64,
                bytes = body.len(),
                "CPU profile done"
            );
            let mut resp = Response::new(Full::new(Bytes::from(body)));
            let headers = resp.headers_mut();
            headers.insert(header::CACHE_CONTROL, header::HeaderValue::from_static("no-store"));
            match params.format {
                Format::Svg => {
                    headers.insert(header::CONTENT_TYPE, header::HeaderValue::from_static("image/svg+xml"));
                }
                Format::Protobuf => {
                    headers.insert(header::CONTENT_TYPE, header::HeaderValue::from_static("application/octet-stream"));
                    headers.insert(
                        header::CONTENT_DISPOSITION,
                        header::HeaderValue::from_static("attachment; filename=\"gateway-cpu.pb\""),
                    );
                }
            }
            resp
        }
        Ok(Err(msg)) => error(StatusCode::INTERNAL_SERVER_ERROR, format!("CPU profile failed: {msg}")),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, format!("CPU profile failed: {e}")),
    }
}

/// The report as the requested format.
fn encode(report: &pprof::Report, params: Params) -> Result<Vec<u8>, String> {
    match params.format {
        Format::Protobuf => {
            use pprof::protos::Message as _;
            let profile = report.pprof().map_err(|e| format!("encoding the profile: {e}"))?;
            Ok(profile.encode_to_vec())
        }
        Format::Svg => {
            let mut options = pprof::flamegraph::Options::default();
            options.title = format!("gateway CPU, {} s at {} Hz", params.seconds, params.frequency);
            options.count_name = "samples".to_owned();
            let mut svg = Vec::new();
            report
                .flamegraph_with_options(&mut svg, &mut options)
                .map_err(|e| format!("drawing the flamegraph: {e}"))?;
            if svg.is_empty() {
                // No sample at all (an idle gateway): still a valid SVG that says so.
                svg = EMPTY_SVG.as_bytes().to_vec();
            }
            Ok(svg)
        }
    }
}

const EMPTY_SVG: &str = r#"<?xml version="1.0" standalone="no"?>
<svg version="1.1" width="600" height="60" xmlns="http://www.w3.org/2000/svg"><text x="10" y="35" font-family="monospace" font-size="14">gateway CPU profile: no samples (the process was idle)</text></svg>
"#;

/// Parses `seconds`, `frequency` and `format`; unknown parameters are ignored (as Go does).
fn parse(query: &str) -> Result<Params, String> {
    let mut params = Params { seconds: DEFAULT_SECONDS, frequency: DEFAULT_FREQUENCY, format: Format::Protobuf };
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        match key {
            "seconds" => {
                params.seconds =
                    value.parse().ok().filter(|s| (1..=MAX_SECONDS).contains(s)).ok_or_else(|| {
                        format!("seconds must be a whole number from 1 to {MAX_SECONDS}, got `{value}`")
                    })?
            }
            "frequency" => {
                params.frequency = value.parse().ok().filter(|f| (1..=MAX_FREQUENCY).contains(f)).ok_or_else(|| {
                    format!("frequency must be a whole number of Hz from 1 to {MAX_FREQUENCY}, got `{value}`")
                })?
            }
            "format" => params.format = if value == "svg" { Format::Svg } else { Format::Protobuf },
            _ => {}
        }
    }
    Ok(params)
}

/// The mark that a profile runs; cleared when dropped.
struct Busy;

impl Busy {
    fn claim() -> Option<Busy> {
        RUNNING.compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire).ok().map(|_| Busy)
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        RUNNING.store(false, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults() {
        let p = parse("").unwrap();
        assert_eq!(p, Params { seconds: 30, frequency: 99, format: Format::Protobuf });
        let p = parse("seconds=5&frequency=250&format=svg&debug=1").unwrap();
        assert_eq!(p, Params { seconds: 5, frequency: 250, format: Format::Svg });
        assert_eq!(parse("format=proto").unwrap().format, Format::Protobuf);
    }

    #[test]
    fn out_of_range_values_are_refused_with_the_range() {
        for q in ["seconds=0", "seconds=301", "seconds=abc", "seconds=", "seconds=-1", "seconds=1.5"] {
            let e = parse(q).unwrap_err();
            assert!(e.contains("from 1 to 300"), "{q}: {e}");
        }
        for q in ["frequency=0", "frequency=1001", "frequency=x"] {
            let e = parse(q).unwrap_err();
            assert!(e.contains("from 1 to 1000"), "{q}: {e}");
        }
    }

    #[tokio::test]
    async fn a_bad_query_is_a_400_with_json() {
        let resp = profile("seconds=999").await;
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
        assert_eq!(resp.headers()[header::CONTENT_TYPE], "application/json");
    }

    #[tokio::test]
    async fn only_one_profile_at_a_time() {
        let first = Busy::claim().expect("no profile runs yet");
        let resp = profile("seconds=1").await;
        assert_eq!(resp.status(), StatusCode::CONFLICT);
        drop(first);
        assert!(Busy::claim().is_some(), "the mark is cleared when dropped");
    }
}
