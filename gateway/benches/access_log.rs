//! The access log's cost on a worker thread: `record` formats one line into the
//! thread's buffer and, every ~32 KiB, hands the buffer to the writer thread (here
//! writing to /dev/null). Target: well under 1 µs per line.
//!
//! `cargo bench -p gateway --bench access_log`
//!
//! Criterion measures wall time, which on a shared machine includes waiting for a core;
//! each case also prints the CPU time its thread spent per line (`/proc/thread-self/schedstat`).

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use gateway::access_log::{AccessLog, Entry, Names, PluginName};
use gateway::config::{self, LogFormat};
use std::time::{Duration, SystemTime};

fn record(c: &mut Criterion) {
    let method = http::Method::GET;
    let names = Names::new("default", "web", "round-robin");
    let plugin = PluginName::new("round-robin");
    let entry = Entry {
        time: SystemTime::now(),
        request_id: b"4f1c2a9e0b7d3e61",
        trace_id: Some(b"4bf92f3577b34da6a3ce929d0e0e4736"),
        client: b"203.0.113.7",
        method: &method,
        host: "shop.example",
        path: "/book/dune?user=42&sort=price",
        status: 200,
        names: &names,
        backend: "10.0.0.12:8080",
        attempts: 1,
        fallback: false,
        bytes_in: 0,
        bytes_out: 5120,
        duration: Duration::from_micros(1_234),
        reason: None,
        error: None,
        plugin: Some(&plugin),
        decision_reason: None,
    };
    let mut group = c.benchmark_group("access_log");
    group.throughput(Throughput::Elements(1));
    for format in [LogFormat::Json, LogFormat::Text] {
        let cfg = config::AccessLog { enabled: true, path: Some("/dev/null".into()), format: Some(format) };
        let log = AccessLog::new(&cfg).expect("open /dev/null");
        let name = match format {
            LogFormat::Json => "record/json",
            LogFormat::Text => "record/text",
        };
        // The clock as a worker reads it per request, and the line.
        group.bench_function(name, |b| b.iter(|| log.record(&Entry { time: SystemTime::now(), ..entry.clone() })));
        if let Some(cpu) = cpu_per_line(&log, &entry) {
            eprintln!("{name}: {cpu:.0?} of CPU per line on this thread");
        }
        log.flush_local();
        log.flush_all();
        // On a busy machine the writer thread may be descheduled long enough to drop.
        eprintln!("{name}: {} lines written, {} dropped", log.lines(), log.dropped_lines());
    }
    group.finish();
}

/// On-CPU time of this thread per `record`, over a million lines (Linux only).
fn cpu_per_line(log: &AccessLog, entry: &Entry<'_>) -> Option<Duration> {
    let on_cpu = || -> Option<u64> {
        std::fs::read_to_string("/proc/thread-self/schedstat").ok()?.split_whitespace().next()?.parse().ok()
    };
    const N: u32 = 1_000_000;
    let before = on_cpu()?;
    for _ in 0..N {
        log.record(&Entry { time: SystemTime::now(), ..entry.clone() });
    }
    Some(Duration::from_nanos(on_cpu()? - before) / N)
}

criterion_group!(benches, record);
criterion_main!(benches);
