//! Config hot reload: the config file is watched (debounced like the plugins folder),
//! and SIGHUP and `POST /api/reload` reload it too. One reload runs at a time, off the
//! event loops; the outcome is logged once and kept for `/api/config`.

use crate::gateway::{Changes, Gateway};
use notify::{RecursiveMode, Watcher};
use sha2::{Digest, Sha256};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Quiet time after the last write to the file before it is read.
const DEBOUNCE: Duration = Duration::from_millis(100);

/// What set off a reload, for the log.
#[derive(Debug, Clone, Copy)]
pub enum Trigger {
    /// The file changed.
    FileChanged,
    /// SIGHUP.
    Signal,
    /// `POST /api/reload`.
    Api,
}

impl std::fmt::Display for Trigger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Trigger::FileChanged => "the config file changed",
            Trigger::Signal => "SIGHUP",
            Trigger::Api => "POST /api/reload",
        })
    }
}

/// The file contents last applied and last refused (SHA-256), one reload at a time.
struct Seen {
    applied: Option<[u8; 32]>,
    refused: Option<[u8; 32]>,
}

static SEEN: tokio::sync::Mutex<Seen> = tokio::sync::Mutex::const_new(Seen { applied: None, refused: None });

fn file_hash(path: &std::path::Path) -> Option<[u8; 32]> {
    let size = std::fs::metadata(path).ok()?.len();
    if size > crate::config::MAX_CONFIG_BYTES {
        // Not read: the size stands in for the content (the loader refuses it by size).
        return Some(Sha256::digest(size.to_le_bytes()).into());
    }
    std::fs::read(path).ok().map(|b| Sha256::digest(&b).into())
}

/// Reloads the config now.
pub async fn reload(gw: &Arc<Gateway>, trigger: Trigger) -> Result<Changes, String> {
    let mut seen = SEEN.lock().await;
    let Some(path) = gw.config_path.clone() else {
        return Err("this gateway was started without --config FILE: there is no file to reload".into());
    };
    // The watcher sees every write: content already applied is skipped, and the same bad
    // content (editors write in several steps) is refused and logged once.
    let hash = file_hash(&path);
    if matches!(trigger, Trigger::FileChanged) && hash.is_some() {
        if hash == seen.applied {
            return Ok(Changes::default());
        }
        if hash == seen.refused {
            return Err(gw.config_state().last_error.unwrap_or_default());
        }
    }
    let worker = gw.clone();
    let result = match tokio::task::spawn_blocking(move || worker.reload()).await {
        Ok(r) => r,
        Err(e) => Err(format!("the reload task failed: {e}")),
    };
    match &result {
        Ok(changes) => {
            seen.refused = None;
            seen.applied = hash;
            gw.restart_health_checks();
            gw.restart_discovery();
            let version = gw.config_state().version;
            if changes.is_empty() {
                tracing::info!(file = %path.display(), version, trigger = %trigger, "config reloaded: nothing changed");
            } else {
                tracing::info!(
                    file = %path.display(),
                    version,
                    trigger = %trigger,
                    upstreams_added = ?changes.upstreams_added,
                    upstreams_removed = ?changes.upstreams_removed,
                    upstreams_changed = ?changes.upstreams_changed,
                    backends_added = ?changes.backends_added,
                    backends_removed = ?changes.backends_removed,
                    strategies_changed = ?changes.strategies_changed,
                    canary_or_shadow_changed = ?changes.trials_changed,
                    routes_changed = changes.routes_changed,
                    "config reloaded: new requests use the new config, requests in flight finish on the old one"
                );
            }
            if !changes.needs_restart.is_empty() {
                tracing::warn!(
                    file = %path.display(),
                    settings = ?changes.needs_restart,
                    "config reloaded, but these settings only take effect after a restart; the running values are kept"
                );
            }
        }
        Err(e) => {
            seen.refused = hash;
            tracing::error!(file = %path.display(), trigger = %trigger, "config refused, the previous config keeps serving: {e}");
        }
    }
    result
}

/// Changes upstream `name`'s running config with `edit` (see [`Gateway::edit_upstream`]),
/// one change at a time with reloads; logs `what` happened. Returns the new version.
pub async fn edit_upstream(
    gw: &Arc<Gateway>,
    name: &str,
    what: &'static str,
    edit: impl FnOnce(&mut crate::config::Upstream) -> Result<(), String> + Send + 'static,
) -> Result<u64, String> {
    let _one_at_a_time = SEEN.lock().await;
    let (worker, upstream) = (gw.clone(), name.to_owned());
    let result = match tokio::task::spawn_blocking(move || worker.edit_upstream(&upstream, edit)).await {
        Ok(r) => r,
        Err(e) => Err(format!("the change failed: {e}")),
    };
    match &result {
        Ok(version) => {
            gw.restart_health_checks();
            gw.restart_discovery();
            let file = gw.config_path.as_ref().map_or("none".into(), |p| p.display().to_string());
            tracing::info!(upstream = %name, version, file = %file, "{what} by the admin API; the config file was not changed: edit it too, or a reload from it undoes this");
        }
        Err(e) => tracing::warn!(upstream = %name, "{what} by the admin API refused: {e}"),
    }
    result
}

/// Watches the config file until `stop`, reloading when its content changes. Watches
/// the folder, so an editor that replaces the file (write to a temporary, rename) is
/// followed.
pub fn watch(gw: Arc<Gateway>, stop: CancellationToken) {
    let Some(path) = gw.config_path.clone() else { return };
    tokio::spawn(async move {
        // What the gateway started with counts as applied.
        SEEN.lock().await.applied = file_hash(&path);
        let path = std::path::absolute(&path).unwrap_or(path);
        let (Some(dir), Some(name)) = (path.parent().map(|d| d.to_path_buf()), path.file_name().map(|n| n.to_owned()))
        else {
            return;
        };
        let (tx, mut rx) = mpsc::unbounded_channel::<()>();
        let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            use notify::EventKind::{Access, Create, Modify, Remove};
            use notify::event::{AccessKind, AccessMode};
            let Ok(event) = event else { return };
            let relevant =
                matches!(event.kind, Create(_) | Modify(_) | Remove(_) | Access(AccessKind::Close(AccessMode::Write)));
            if relevant && event.paths.iter().any(|p| p.file_name() == Some(name.as_os_str())) {
                let _ = tx.send(());
            }
        });
        let mut watcher = match watcher {
            Ok(w) => w,
            Err(e) => {
                tracing::error!(file = %path.display(), "config hot reload is off: cannot watch the file: {e}; SIGHUP and POST /api/reload still work");
                return;
            }
        };
        if let Err(e) = watcher.watch(&dir, RecursiveMode::NonRecursive) {
            tracing::error!(file = %path.display(), "config hot reload is off: cannot watch {}: {e}; SIGHUP and POST /api/reload still work", dir.display());
            return;
        }
        tracing::info!(file = %path.display(), "watching the config file: changes are applied live (SIGHUP or POST /api/reload also reload it)");
        // Each change, once the file has been quiet for a moment.
        while crate::debounce::next_quiet(&mut rx, &stop, DEBOUNCE).await {
            if !path.exists() {
                tracing::warn!(file = %path.display(), "config file removed: the running config keeps serving");
                continue;
            }
            let _ = reload(&gw, Trigger::FileChanged).await;
        }
    });
}
