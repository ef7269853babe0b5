//! Real headless Chromium, driven through the Chrome DevTools Protocol.
//!
//! The protocol goes over a pipe (`--remote-debugging-pipe`: the browser reads commands
//! on fd 3 and writes answers and events on fd 4, one JSON message each, ended by a NUL
//! byte), so no WebSocket client and no port are needed. `sh` wires fd 3 and 4 to the
//! child's stdin and stdout before it `exec`s the browser.
//!
//! [`Chromium::find`] looks for the binary; [`Chromium::launch`] starts it with one
//! page attached. Every call is bounded by [`CALL_TIMEOUT`]. Dropping it closes the
//! browser (`Browser.close`, then a kill of its PID if it does not exit).

use super::TempDir;
use serde_json::{Value, json};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The longest one protocol call may take.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// A headless Chromium with one page; closed when dropped.
pub struct Chromium {
    child: Child,
    commands: ChildStdin,
    messages: Receiver<Value>,
    next_id: u64,
    /// The flattened session of the page.
    session: String,
    /// Errors the page reported: uncaught exceptions, `console.error`, CSP refusals,
    /// failed loads.
    page_errors: Vec<String>,
    /// The browser's own stderr (the last 64 KiB), for failure messages.
    stderr: Arc<Mutex<String>>,
    _profile: TempDir,
}

impl Chromium {
    /// The browser binary: `$CHROMIUM` if set, else the first of `chromium`,
    /// `chromium-browser`, `google-chrome` found on `PATH`.
    pub fn find() -> Option<PathBuf> {
        if let Some(path) = std::env::var_os("CHROMIUM") {
            return Some(PathBuf::from(path));
        }
        let path = std::env::var_os("PATH")?;
        ["chromium", "chromium-browser", "google-chrome"]
            .iter()
            .flat_map(|name| std::env::split_paths(&path).map(move |dir| dir.join(name)))
            .find(|candidate| candidate.is_file())
    }

    /// Starts `bin` headless with a fresh profile and one blank page whose viewport is
    /// `width` × `height` CSS pixels.
    pub fn launch(bin: &Path, width: u32, height: u32) -> Chromium {
        let profile = TempDir::new();
        let mut child = Command::new("sh")
            .arg("-c")
            // fd 3 ← our stdin pipe, fd 4 → our stdout pipe; then 0 and 1 go nowhere.
            .arg(r#"exec "$0" "$@" 3<&0 4>&1 </dev/null >/dev/null"#)
            .arg(bin)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--disable-quic",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-extensions",
                "--disable-background-timer-throttling",
                "--disable-renderer-backgrounding",
                "--disable-backgrounding-occluded-windows",
                "--hide-scrollbars",
                "--mute-audio",
                "--remote-debugging-pipe",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg(format!("--window-size={width},{height}"))
            .arg("about:blank")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", bin.display()));
        let commands = child.stdin.take().expect("piped stdin");
        let mut answers = BufReader::new(child.stdout.take().expect("piped stdout"));
        let (tx, messages) = channel();
        std::thread::Builder::new()
            .name("chromium-cdp".into())
            .spawn(move || {
                let mut buf = Vec::new();
                while matches!(answers.read_until(0, &mut buf), Ok(n) if n > 0) {
                    if buf.last() == Some(&0) {
                        buf.pop();
                    }
                    let message = serde_json::from_slice(&buf).unwrap_or(Value::Null);
                    buf.clear();
                    if tx.send(message).is_err() {
                        break;
                    }
                }
            })
            .expect("spawn the CDP reader");
        let stderr = Arc::new(Mutex::new(String::new()));
        let sink = stderr.clone();
        let mut err = child.stderr.take().expect("piped stderr");
        std::thread::Builder::new()
            .name("chromium-stderr".into())
            .spawn(move || {
                let mut chunk = [0u8; 4096];
                while let Ok(n @ 1..) = err.read(&mut chunk) {
                    let mut s = sink.lock().unwrap();
                    s.push_str(&String::from_utf8_lossy(&chunk[..n]));
                    if s.len() > 64 * 1024 {
                        let cut = s.len() - 48 * 1024;
                        let cut = (cut..s.len()).find(|&i| s.is_char_boundary(i)).unwrap_or(s.len());
                        s.drain(..cut);
                    }
                }
            })
            .expect("spawn the stderr reader");

        let mut browser = Chromium {
            child,
            commands,
            messages,
            next_id: 0,
            session: String::new(),
            page_errors: Vec::new(),
            stderr,
            _profile: profile,
        };
        let target = browser.call(None, "Target.createTarget", json!({"url": "about:blank"}));
        let target = target["targetId"].as_str().expect("a target id").to_owned();
        let attached = browser.call(None, "Target.attachToTarget", json!({"targetId": target, "flatten": true}));
        browser.session = attached["sessionId"].as_str().expect("a session id").to_owned();
        browser.page(
            "Emulation.setDeviceMetricsOverride",
            json!({"width": width, "height": height, "deviceScaleFactor": 1, "mobile": false}),
        );
        browser.page("Page.enable", json!({}));
        browser.page("Runtime.enable", json!({}));
        browser.page("Log.enable", json!({}));
        browser
    }

    /// Sends one command (to the page's session, or to the browser) and returns its result.
    fn call(&mut self, session: Option<&str>, method: &str, params: Value) -> Value {
        self.try_call(session, method, params).unwrap_or_else(|e| panic!("{e}\nbrowser stderr:\n{}", self.stderr()))
    }

    fn try_call(&mut self, session: Option<&str>, method: &str, params: Value) -> Result<Value, String> {
        self.next_id += 1;
        let id = self.next_id;
        let mut message = json!({"id": id, "method": method, "params": params});
        if let Some(session) = session {
            message["sessionId"] = session.into();
        }
        let mut bytes = serde_json::to_vec(&message).unwrap();
        bytes.push(0);
        self.commands.write_all(&bytes).map_err(|e| format!("CDP {method}: the browser is gone ({e})"))?;
        let deadline = Instant::now() + CALL_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let message = match self.messages.recv_timeout(left) {
                Ok(m) => m,
                Err(RecvTimeoutError::Timeout) => return Err(format!("CDP {method}: no answer in {CALL_TIMEOUT:?}")),
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(format!("CDP {method}: the browser closed the pipe"));
                }
            };
            if message["id"] == id {
                if let Some(error) = message.get("error") {
                    return Err(format!("CDP {method} failed: {error}"));
                }
                return Ok(message["result"].clone());
            }
            self.note_event(&message);
        }
    }

    /// Keeps what the page reported as an error.
    fn note_event(&mut self, message: &Value) {
        let p = &message["params"];
        match message["method"].as_str() {
            Some("Runtime.exceptionThrown") => {
                let d = &p["exceptionDetails"];
                let text = d["exception"]["description"].as_str().or(d["text"].as_str()).unwrap_or("?");
                self.page_errors.push(format!("uncaught exception: {text}"));
            }
            Some("Runtime.consoleAPICalled") if p["type"] == "error" => {
                let args: Vec<String> = p["args"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|a| a["value"].as_str().map(str::to_owned).unwrap_or_else(|| a["description"].to_string()))
                    .collect();
                self.page_errors.push(format!("console.error: {}", args.join(" ")));
            }
            Some("Log.entryAdded") if p["entry"]["level"] == "error" => {
                let e = &p["entry"];
                self.page_errors.push(format!("{}: {} {}", e["source"], e["text"], e["url"].as_str().unwrap_or("")));
            }
            _ => {}
        }
    }

    /// A command to the page's session.
    fn page(&mut self, method: &str, params: Value) -> Value {
        let session = self.session.clone();
        self.call(Some(&session), method, params)
    }

    /// Loads `url` in the page (returns once the navigation is committed).
    pub fn navigate(&mut self, url: &str) {
        let result = self.page("Page.navigate", json!({"url": url}));
        if let Some(error) = result.get("errorText") {
            panic!("navigating to {url} failed: {error}");
        }
    }

    /// Evaluates the JavaScript expression `expr` in the page and returns its value
    /// (as JSON), or the exception it threw.
    pub fn eval(&mut self, expr: &str) -> Result<Value, String> {
        let session = self.session.clone();
        let result = self.try_call(
            Some(&session),
            "Runtime.evaluate",
            json!({"expression": expr, "returnByValue": true, "awaitPromise": true}),
        )?;
        if let Some(details) = result.get("exceptionDetails") {
            let text = details["exception"]["description"].as_str().or(details["text"].as_str()).unwrap_or("?");
            return Err(format!("`{expr}` threw: {text}"));
        }
        Ok(result["result"].get("value").cloned().unwrap_or(Value::Null))
    }

    /// Evaluates `expr` every 50 ms until it is truthy (not `false`, `null`, `0`, `""`)
    /// and returns that value, or `None` after `timeout`. An exception counts as falsy
    /// (the page may not have drawn the elements yet).
    pub fn wait_for(&mut self, timeout: Duration, expr: &str) -> Option<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(v) = self.eval(expr) {
                let truthy = match &v {
                    Value::Null | Value::Bool(false) => false,
                    Value::Number(n) => n.as_f64() != Some(0.0),
                    Value::String(s) => !s.is_empty(),
                    _ => true,
                };
                if truthy {
                    return Some(v);
                }
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Saves a PNG of the whole page (not just the viewport) to `path`.
    pub fn screenshot_full_page(&mut self, path: &Path) {
        let metrics = self.page("Page.getLayoutMetrics", json!({}));
        let size = &metrics["cssContentSize"];
        let (w, h) = (size["width"].as_f64().unwrap_or(1600.0), size["height"].as_f64().unwrap_or(1000.0));
        let shot = self.page(
            "Page.captureScreenshot",
            json!({"format": "png", "captureBeyondViewport": true,
                   "clip": {"x": 0, "y": 0, "width": w.ceil(), "height": h.ceil(), "scale": 1}}),
        );
        let png = base64_decode(shot["data"].as_str().expect("screenshot data"));
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        }
        std::fs::write(path, png).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    }

    /// Errors the page reported so far (exceptions, `console.error`, CSP refusals,
    /// failed loads). Events are read while waiting for answers, so call this after
    /// some other call.
    pub fn page_errors(&mut self) -> Vec<String> {
        while let Ok(message) = self.messages.try_recv() {
            self.note_event(&message);
        }
        self.page_errors.clone()
    }

    /// What the browser wrote on stderr (the last 48–64 KiB).
    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }
}

impl Drop for Chromium {
    fn drop(&mut self) {
        // Ask it to close (it then ends its renderer and GPU processes itself), then
        // make sure: kill its PID if it is still there after 5 s.
        self.next_id += 1;
        let mut close =
            serde_json::to_vec(&json!({"id": self.next_id, "method": "Browser.close", "params": {}})).unwrap();
        close.push(0);
        let _ = self.commands.write_all(&close);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Standard base64 (with or without padding), as CDP sends binary data.
fn base64_decode(text: &str) -> Vec<u8> {
    fn value(c: u8) -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    }
    let mut out = Vec::with_capacity(text.len() / 4 * 3);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in text.bytes().filter_map(value) {
        acc = (acc << 6) | c;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    out
}
