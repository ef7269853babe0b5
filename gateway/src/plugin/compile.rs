//! Compiling plugin files in a child process.
//!
//! Cranelift's memory is not given back when a compilation ends: measured, a gateway that
//! compiled a Python plugin itself stayed at ~544 MB of RSS for good, against ~70 MB when
//! the same plugin came from the compiled cache. So the `gateway` binary compiles plugin
//! files by running itself, `gateway plugin compile-into-cache DIR`, with the component
//! on stdin: the child compiles it into the cache folder and exits, taking the
//! compiler's memory with it (and a compiler crash on a hostile file), and the serving
//! process only loads the compiled artifact. A person sees a log line when a long
//! compilation starts, and one every few seconds while it runs.
//!
//! Only the `gateway` binary opts in ([`compile_in_child`]); benchmarks and tests that
//! use the library compile in process.

use super::cache::Cache;
use sha2::{Digest as _, Sha256};
use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};
use wasmtime::component::Component;

/// The hidden subcommand the child runs.
pub const SUBCOMMAND: [&str; 2] = ["plugin", "compile-into-cache"];
/// Longest a compilation may take before the child is killed.
const COMPILE_TIMEOUT: Duration = Duration::from_secs(600);
/// How often a long compilation says it is still running.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);
/// Components larger than this get a "compiling" line before they start.
const ANNOUNCE_BYTES: usize = 1 << 20;

static COMPILER: OnceLock<PathBuf> = OnceLock::new();
static RELEASE_MEMORY: OnceLock<fn()> = OnceLock::new();

/// After a plugin file was loaded (or refused), `release` is called to hand memory the
/// load freed back to the OS: the binary's allocator (mimalloc) does that lazily, when
/// the freeing thread allocates again, which a finished load thread never does (measured:
/// ~35 MB of a Python plugin's file bytes and metadata stayed resident).
pub fn release_memory_with(release: fn()) {
    let _ = RELEASE_MEMORY.set(release);
}

/// Hands freed memory back to the OS, if the binary said how.
pub(super) fn release_memory() {
    if let Some(release) = RELEASE_MEMORY.get() {
        release();
    }
}

/// From now on this process compiles plugin files by running `exe` (the `gateway`
/// binary: `/proc/self/exe` on Linux, which stays valid when the file is replaced by an
/// upgrade) with [`SUBCOMMAND`].
pub fn compile_in_child(exe: PathBuf) {
    let _ = COMPILER.set(exe);
}

/// The binary to compile with, if this process compiles in a child.
pub(super) fn compiler() -> Option<&'static Path> {
    COMPILER.get().map(PathBuf::as_path)
}

/// The engine settings, shared by the serving process and the compiling child (the
/// cached artifacts are valid only for the same settings).
pub(super) fn engine_config() -> wasmtime::Config {
    let mut wasm = wasmtime::Config::new();
    // Deadlines: a ticker thread bumps the epoch every TICK; cheaper than fuel.
    wasm.epoch_interruption(true);
    wasm.cranelift_opt_level(wasmtime::OptLevel::Speed);
    wasm.wasm_component_model(true);
    wasm
}

/// Compiles `bytes` (described as `what` in logs) into `dir` by running `exe` and
/// waiting for it. On failure, the child's own error text (or how it died).
pub(super) fn in_child(exe: &Path, dir: &Path, bytes: &[u8], what: &str) -> Result<(), String> {
    let started = Instant::now();
    let announce = bytes.len() >= ANNOUNCE_BYTES;
    if announce {
        tracing::info!(
            plugin = what,
            mb = format!("{:.1}", bytes.len() as f64 / 1e6),
            "compiling plugin {what} ({:.1} MB) in a separate process: a Python or JavaScript plugin takes 5 to 30 s the first time, then loads from the compiled cache in milliseconds",
            bytes.len() as f64 / 1e6
        );
    }
    let mut child = Command::new(exe)
        .args(SUBCOMMAND)
        .arg(dir)
        .env_remove("RUST_LOG")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start the compiler process {}: {e}", exe.display()))?;
    let mut stdin = child.stdin.take().expect("piped stdin");
    let mut stderr = child.stderr.take().expect("piped stderr");
    let errors = std::thread::spawn(move || {
        // The first 64 KiB are the message; the rest is read and dropped, so that a
        // child that writes more never blocks on a full pipe.
        let mut text = Vec::new();
        let _ = stderr.by_ref().take(64 * 1024).read_to_end(&mut text);
        let _ = std::io::copy(&mut stderr, &mut std::io::sink());
        String::from_utf8_lossy(&text).into_owned()
    });
    // The child reads all of stdin before compiling; a write error means it died early,
    // which its exit status says.
    let _ = stdin.write_all(bytes);
    drop(stdin);
    let mut said = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) => {}
            Err(e) => return Err(format!("cannot wait for the compiler process: {e}")),
        }
        if started.elapsed() > COMPILE_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("compiling took longer than {COMPILE_TIMEOUT:?}: stopped"));
        }
        if said.elapsed() >= PROGRESS_EVERY {
            said = Instant::now();
            tracing::info!(
                plugin = what,
                "still compiling plugin {what}: {:.0} s so far",
                started.elapsed().as_secs_f64()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let text = errors.join().unwrap_or_default();
    if status.success() {
        if announce {
            tracing::info!(plugin = what, "compiled plugin {what} in {:.1} s", started.elapsed().as_secs_f64());
        }
        return Ok(());
    }
    let text = text.trim().strip_prefix("error: ").unwrap_or(text.trim()).to_owned();
    Err(match status.code() {
        Some(_) if !text.is_empty() => text,
        Some(code) => format!("the compiler process failed (exit code {code}) without saying why"),
        None => {
            #[cfg(unix)]
            let signal = std::os::unix::process::ExitStatusExt::signal(&status).unwrap_or(0);
            #[cfg(not(unix))]
            let signal = 0;
            format!("the compiler crashed on this file (signal {signal}); the gateway is unaffected. {text}")
                .trim_end()
                .to_owned()
        }
    })
}

/// The child's side: reads a component from stdin, compiles it and writes the artifact
/// into the cache folder `dir`. Errors go to stderr, for the parent to report.
pub fn child_main(dir: &Path) -> ExitCode {
    let mut bytes = Vec::new();
    if let Err(e) = std::io::stdin().read_to_end(&mut bytes) {
        eprintln!("error: cannot read the component from stdin: {e}");
        return ExitCode::FAILURE;
    }
    let engine = match wasmtime::Engine::new(&engine_config()) {
        Ok(e) => e,
        Err(e) => {
            eprintln!("error: cannot create the Wasm engine: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let component = match Component::new(&engine, &bytes) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: not a valid component: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let hash = super::hex(&Sha256::digest(&bytes));
    let stored = Cache::new(dir.to_path_buf(), &engine, u64::MAX).and_then(|cache| cache.store(&hash, &component));
    match stored {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: cannot write the compiled plugin into {}: {e}", dir.display());
            ExitCode::FAILURE
        }
    }
}
