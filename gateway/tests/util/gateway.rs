//! The real `gateway` binary as a child process.
//!
//! [`Gateway::start`] runs it with `--log-format json`, reads its stderr on a thread,
//! keeps every log line, and learns the bound ports from the `listening` and
//! `admin API listening` lines. Dropping it kills the process (by its PID) and waits.
//! [`run_cli`] runs a command that is expected to end by itself (`plugin check`, ...).

use serde_json::Value;
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// The path of the binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_gateway");

/// How long a gateway may take to start listening.
const STARTUP: Duration = Duration::from_secs(30);

/// A running gateway; killed when dropped.
pub struct Gateway {
    child: Child,
    /// The proxy's address (first listener).
    pub addr: SocketAddr,
    logs: Arc<Logs>,
}

#[derive(Default)]
struct Logs {
    state: Mutex<LogState>,
    changed: Condvar,
}

#[derive(Default)]
struct LogState {
    /// Every line, parsed as JSON; lines that are not JSON become a JSON string.
    lines: Vec<Value>,
    /// stderr reached its end (the process exited).
    closed: bool,
}

/// The `message` field of a JSON log line, or `""`.
pub fn message(line: &Value) -> &str {
    line.get("message").and_then(Value::as_str).unwrap_or("")
}

impl Gateway {
    /// Starts `gateway --log-format json ARGS...` and waits until it listens.
    pub fn start(args: &[&str]) -> Gateway {
        Self::start_with(args, &[], STARTUP)
    }

    /// `gateway --config FILE --plugins DIR --admin 127.0.0.1:0` (the admin listener on a
    /// free port: [`Gateway::admin_addr`]).
    pub fn with_config(file: &std::path::Path, plugins: &std::path::Path) -> Gateway {
        Self::start(&[
            "--config",
            file.to_str().expect("a UTF-8 path"),
            "--plugins",
            plugins.to_str().expect("a UTF-8 path"),
            "--admin",
            "127.0.0.1:0",
        ])
    }

    /// Like [`Gateway::start`], with extra environment variables (e.g. `XDG_CACHE_HOME`
    /// for the compiled-plugin cache) and a longer or shorter wait for it to listen
    /// (loading a Python or JavaScript plugin that is not in the cache compiles it first).
    pub fn start_with(args: &[&str], env: &[(&str, &str)], startup: Duration) -> Gateway {
        Self::spawn(Command::new(BIN), args, env, startup)
    }

    /// Like [`Gateway::start`], run through `wrapper` (a command that execs the rest of
    /// its arguments in its own process, e.g. `["prlimit", "--nofile=400:400"]`), so the
    /// PID is still the gateway's.
    pub fn start_under(wrapper: &[&str], args: &[&str]) -> Gateway {
        let mut cmd = Command::new(wrapper[0]);
        cmd.args(&wrapper[1..]).arg(BIN);
        Self::spawn(cmd, args, &[], STARTUP)
    }

    fn spawn(mut cmd: Command, args: &[&str], env: &[(&str, &str)], startup: Duration) -> Gateway {
        let mut child = cmd
            .arg("--log-format")
            .arg("json")
            .args(args)
            .env_remove("RUST_LOG")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("start {BIN}: {e}"));
        let logs = Arc::new(Logs::default());
        let stderr = child.stderr.take().expect("piped stderr");
        let sink = logs.clone();
        std::thread::Builder::new()
            .name(format!("gateway-{}-stderr", child.id()))
            .spawn(move || {
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    let value = serde_json::from_str(&line).unwrap_or(Value::String(line));
                    sink.state.lock().unwrap().lines.push(value);
                    sink.changed.notify_all();
                }
                sink.state.lock().unwrap().closed = true;
                sink.changed.notify_all();
            })
            .expect("spawn the stderr reader");

        let mut gw = Gateway { child, addr: SocketAddr::from(([127, 0, 0, 1], 0)), logs };
        let listening = gw.wait_for_log(startup, |l| message(l) == "listening");
        gw.addr = address_of(&listening);
        gw
    }

    /// The admin API's address (from `--admin` or the config's `admin:`), once it listens.
    pub fn admin_addr(&self) -> SocketAddr {
        address_of(&self.wait_for_log(Duration::from_secs(10), |l| message(l) == "admin API listening"))
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Every log line so far.
    pub fn logs(&self) -> Vec<Value> {
        self.logs.state.lock().unwrap().lines.clone()
    }

    /// How many log lines there are so far (a mark for [`Gateway::wait_for_log_after`]).
    pub fn log_mark(&self) -> usize {
        self.logs.state.lock().unwrap().lines.len()
    }

    /// The first log line (from the start) that satisfies `pred`, waiting up to `timeout`.
    /// Panics with the whole log when there is none.
    pub fn wait_for_log(&self, timeout: Duration, pred: impl Fn(&Value) -> bool) -> Value {
        self.wait_for_log_after(0, timeout, pred)
    }

    /// Like [`Gateway::wait_for_log`], but only lines after `mark`.
    pub fn wait_for_log_after(&self, mark: usize, timeout: Duration, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + timeout;
        let mut state = self.logs.state.lock().unwrap();
        loop {
            if let Some(line) = state.lines.iter().skip(mark).find(|l| pred(l)) {
                return line.clone();
            }
            let now = Instant::now();
            if now >= deadline || state.closed {
                let dump: Vec<String> = state.lines.iter().map(Value::to_string).collect();
                let why = if state.closed { "the gateway exited" } else { "timed out" };
                panic!("{why} waiting {timeout:?} for a log line; the log:\n{}", dump.join("\n"));
            }
            state = self.logs.changed.wait_timeout(state, deadline - now).unwrap().0;
        }
    }

    /// Log lines (so far) that satisfy `pred`.
    pub fn logs_matching(&self, pred: impl Fn(&Value) -> bool) -> Vec<Value> {
        self.logs.state.lock().unwrap().lines.iter().filter(|l| pred(l)).cloned().collect()
    }

    /// Current resident set size in KiB (`VmRSS`).
    pub fn rss_kib(&self) -> u64 {
        self.proc_status_kib("VmRSS:")
    }

    /// Peak resident set size in KiB (`VmHWM`).
    pub fn peak_rss_kib(&self) -> u64 {
        self.proc_status_kib("VmHWM:")
    }

    fn proc_status_kib(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).expect("read /proc/PID/status");
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("no {field} in /proc/{}/status", self.pid()))
    }

    /// Sends SIGTERM to the process.
    pub fn terminate(&self) {
        let status = Command::new("kill").arg("-TERM").arg(self.pid().to_string()).status().expect("run kill");
        assert!(status.success(), "kill -TERM {} failed: {status}", self.pid());
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().expect("poll the gateway process").is_none()
    }

    /// Waits up to `timeout` for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("poll the gateway process") {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // Child::kill sends SIGKILL to this child's PID only.
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

fn address_of(line: &Value) -> SocketAddr {
    line.get("address")
        .and_then(Value::as_str)
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no address in log line {line}"))
}

/// What a command that ran to its end printed.
#[derive(Debug)]
pub struct CliOutput {
    /// Exit code (`None` if killed by a signal).
    pub code: Option<i32>,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
    /// How long it ran.
    pub elapsed: Duration,
}

/// Runs `gateway ARGS...` to its end; kills it (and panics) after `timeout`.
pub fn run_cli(args: &[&str], timeout: Duration) -> CliOutput {
    run_cli_with_env(args, &[], timeout)
}

/// Like [`run_cli`], with extra environment variables.
pub fn run_cli_with_env(args: &[&str], env: &[(&str, &str)], timeout: Duration) -> CliOutput {
    let started = Instant::now();
    let mut child = Command::new(BIN)
        .args(args)
        .env_remove("RUST_LOG")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("start {BIN}: {e}"));
    let read = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = r.read_to_string(&mut s);
            s
        })
    };
    let stdout = read(Box::new(child.stdout.take().unwrap()));
    let stderr = read(Box::new(child.stderr.take().unwrap()));
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            panic!("`gateway {}` still running after {timeout:?}", args.join(" "));
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    CliOutput {
        code: status.code(),
        stdout: stdout.join().unwrap(),
        stderr: stderr.join().unwrap(),
        elapsed: started.elapsed(),
    }
}
