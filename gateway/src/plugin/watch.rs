//! Hot swap: watch the plugins folder and load new versions of `NAME.wasm` live.
//!
//! Events are debounced (a file being written produces many), then each changed file is
//! compiled and checked off the async workers; only a version that compiles, links
//! against our world and accepts every upstream's params is swapped in. Anything else is
//! refused with one log line and the last good version keeps serving.

use super::PluginHost;
use notify::{RecursiveMode, Watcher};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Quiet time after the last event on a file before it is loaded.
const DEBOUNCE: Duration = Duration::from_millis(100);

/// Watches the host's plugins folder until `stop` is cancelled (spawns onto the current
/// runtime). A folder that does not exist yet is picked up when it appears.
pub fn watch(host: Arc<PluginHost>, stop: CancellationToken) {
    tokio::spawn(async move {
        if let Err(e) = run(host, stop).await {
            tracing::error!("plugin hot swap is off: cannot watch the plugins folder: {e}");
        }
    });
}

async fn run(host: Arc<PluginHost>, stop: CancellationToken) -> notify::Result<()> {
    let dir = host.dir().to_path_buf();
    let mut announced = false;
    while !dir.is_dir() {
        if !announced {
            tracing::info!(dir = %dir.display(), "plugins folder does not exist; built-in plugins serve (create it to add plugins)");
            announced = true;
        }
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
    let (tx, mut rx) = mpsc::unbounded_channel::<PathBuf>();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        use notify::EventKind::{Access, Create, Modify, Remove};
        use notify::event::{AccessKind, AccessMode};
        let Ok(event) = event else { return };
        // Content changes only: our own reads of a file must not trigger a reload.
        let relevant =
            matches!(event.kind, Create(_) | Modify(_) | Remove(_) | Access(AccessKind::Close(AccessMode::Write)));
        if relevant {
            for path in event.paths {
                let _ = tx.send(path);
            }
        }
    })?;
    watcher.watch(&dir, RecursiveMode::NonRecursive)?;
    tracing::info!(dir = %dir.display(), "watching the plugins folder: drop NAME.wasm in to swap the strategy NAME live");

    let mut changed = BTreeSet::new();
    loop {
        let first = tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            p = rx.recv() => match p { Some(p) => p, None => return Ok(()) },
        };
        changed.insert(first);
        loop {
            match tokio::time::timeout(DEBOUNCE, rx.recv()).await {
                Ok(Some(p)) => {
                    changed.insert(p);
                }
                Ok(None) => return Ok(()),
                Err(_) => break,
            }
        }
        for path in std::mem::take(&mut changed) {
            if let Some(name) = plugin_name(&path) {
                apply(&host, name.to_owned(), path.clone()).await;
            }
        }
    }
}

/// `NAME` for `DIR/NAME.wasm`; other files (temporary names, `.part`) are ignored.
fn plugin_name(path: &Path) -> Option<&str> {
    if path.extension()? != "wasm" {
        return None;
    }
    path.file_stem()?.to_str().filter(|n| !n.starts_with('.'))
}

async fn apply(host: &Arc<PluginHost>, name: String, path: PathBuf) {
    if !path.is_file() {
        let known = host.registered().iter().any(|(n, r)| *n == name && r.current.is_some());
        if known {
            host.file_deleted(&name);
            tracing::warn!(file = %path.display(), plugin = %name, "plugin file deleted: the last good version keeps serving until the config stops using it");
        }
        return;
    }
    let started = Instant::now();
    // On a thread of its own that ends with the load: the allocator gives the file's
    // bytes and the linker's scratch memory back when the thread ends (a pooled blocking
    // thread kept ~16 MB of a Python plugin's bytes for its 10 s keep-alive, and freeing a
    // version on another thread left more).
    let (tx, rx) = tokio::sync::oneshot::channel();
    let spawned = {
        let (host, name, path) = (host.clone(), name.clone(), path.clone());
        std::thread::Builder::new().name("plugin-load".into()).spawn(move || {
            // Only the summary leaves the thread: a version no upstream took is freed here,
            // by the thread that allocated it.
            let result = host.reload(&name, &path).map(|p| p.map(|p| p.summary()));
            super::compile::release_memory();
            let _ = tx.send(result);
        })
    };
    if let Err(e) = spawned {
        tracing::error!(file = %path.display(), "cannot start a thread to load the plugin: {e}");
        return;
    }
    match rx.await {
        Ok(Ok(Some(plugin))) => {
            let users = host.users(&name);
            if users.is_empty() {
                tracing::info!(
                    file = %path.display(),
                    plugin = %name,
                    sha256 = &plugin.hash[..12],
                    compile_ms = plugin.compile_time.as_secs_f64() * 1e3,
                    "plugin checked (it compiles and links against this gateway's world), but no upstream uses it, so it is not kept in memory: reference it as `strategy: {{plugin: {name}}}` in the config (a config reload applies it)"
                );
            } else {
                crate::metrics::control().swap(&name, "ok");
                tracing::info!(
                    file = %path.display(),
                    plugin = %name,
                    upstreams = ?users,
                    sha256 = &plugin.hash[..12],
                    from_cache = plugin.from_cache,
                    compile_ms = plugin.compile_time.as_secs_f64() * 1e3,
                    swap_ms = started.elapsed().as_secs_f64() * 1e3,
                    "plugin swapped: new requests use the new version"
                );
            }
        }
        Ok(Ok(None)) => tracing::debug!(file = %path.display(), "plugin file unchanged"),
        Ok(Err(e)) => {
            crate::metrics::control().swap(&name, "refused");
            tracing::error!(file = %path.display(), plugin = %name, upstreams = ?host.users(&name), "plugin refused, the previous version keeps serving: {e}")
        }
        Err(e) => {
            tracing::error!(file = %path.display(), "the plugin load thread ended without an answer (a panic, logged above): {e}")
        }
    }
    super::compile::release_memory();
}
