//! Precompiled plugin artifacts on disk, keyed by the component's SHA-256 and the
//! engine's compatibility hash (wasmtime version + every setting that changes code), so a
//! restart or a re-swap of the same file loads in milliseconds instead of recompiling
//! (seconds for Python or JavaScript plugins).
//!
//! The folder is bounded in bytes: past the limit the least recently used artifacts
//! (by modification time, which a load refreshes) are removed. Temporary files left by
//! an interrupted write are removed when the gateway starts.

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};
use wasmtime::Engine;
use wasmtime::component::Component;

/// A temporary file this old is left over even if its writer's process id is alive again.
const STALE_TMP_AGE: Duration = Duration::from_secs(3600);

/// A folder of `.cwasm` files written by this gateway only.
#[derive(Debug, Clone)]
pub struct Cache {
    dir: PathBuf,
    engine_key: String,
    limit_bytes: u64,
}

impl Cache {
    /// Uses `dir`, creating it (mode 0700) if needed; at most `limit_bytes` of artifacts.
    pub fn new(dir: PathBuf, engine: &Engine, limit_bytes: u64) -> std::io::Result<Self> {
        std::fs::create_dir_all(&dir)?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
        }
        let mut h = std::collections::hash_map::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut h);
        env!("CARGO_PKG_VERSION").hash(&mut h);
        Ok(Cache { dir, engine_key: format!("{:016x}", h.finish()), limit_bytes })
    }

    /// The default folder: `$XDG_CACHE_HOME/gateway/plugins` or `~/.cache/gateway/plugins`.
    pub fn default_dir() -> Option<PathBuf> {
        let base = std::env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache")))?;
        Some(base.join("gateway").join("plugins"))
    }

    /// The folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, sha256: &str) -> PathBuf {
        self.dir.join(format!("{sha256}-{}.cwasm", self.engine_key))
    }

    /// The precompiled component for `sha256`, if this gateway cached it before.
    pub fn load(&self, engine: &Engine, sha256: &str) -> Option<Component> {
        let path = self.path(sha256);
        if !path.is_file() {
            return None;
        }
        // SAFETY: wasmtime requires that deserialized artifacts are trusted. Files in
        // this folder are written only by `store` below (folder mode 0700), named by the
        // source's SHA-256 and this engine's compatibility hash, so a file here is our
        // own compilation of exactly these bytes for exactly this engine.
        #[allow(unsafe_code)]
        let loaded = unsafe { Component::deserialize_file(engine, &path) };
        match loaded {
            Ok(c) => {
                // Recently used: the last to be evicted.
                let _ = std::fs::File::open(&path).and_then(|f| f.set_modified(SystemTime::now()));
                Some(c)
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), "ignoring unreadable precompiled plugin: {e:#}");
                let _ = std::fs::remove_file(&path);
                None
            }
        }
    }

    /// Removes the artifact of `sha256` (a private, one-use folder).
    pub fn remove(&self, sha256: &str) {
        let _ = std::fs::remove_file(self.path(sha256));
    }

    /// Saves `component`'s compiled code for next time: written to a temporary name
    /// first, so a reader never sees half a file.
    pub fn store(&self, sha256: &str, component: &Component) -> std::io::Result<()> {
        let path = self.path(sha256);
        let bytes = component.serialize().map_err(std::io::Error::other)?;
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        std::fs::write(&tmp, bytes)?;
        std::fs::rename(&tmp, &path).inspect_err(|_| {
            let _ = std::fs::remove_file(&tmp);
        })
    }

    /// Removes temporary files of writes that were interrupted (their process is gone,
    /// or they are over an hour old), then evicts down to the size limit.
    pub fn tidy(&self) {
        let mut removed = 0;
        for entry in std::fs::read_dir(&self.dir).into_iter().flatten().flatten() {
            let path = entry.path();
            let Some(pid) = path.extension().and_then(|e| e.to_str()).and_then(|e| e.strip_prefix("tmp")) else {
                continue;
            };
            let alive = pid.parse::<u32>().is_ok_and(|pid| Path::new(&format!("/proc/{pid}")).exists());
            let age = entry.metadata().and_then(|m| m.modified()).ok().and_then(|t| t.elapsed().ok());
            if !alive || age.is_some_and(|a| a > STALE_TMP_AGE) {
                removed += usize::from(std::fs::remove_file(&path).is_ok());
            }
        }
        if removed > 0 {
            tracing::info!(dir = %self.dir.display(), removed, "removed temporary files of interrupted plugin cache writes");
        }
        self.evict();
    }

    /// Removes the least recently used artifacts while the folder holds more than its
    /// limit.
    pub fn evict(&self) {
        let mut files: Vec<(SystemTime, u64, PathBuf)> = std::fs::read_dir(&self.dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == "cwasm"))
            .filter_map(|e| {
                let m = e.metadata().ok()?;
                Some((m.modified().ok()?, m.len(), e.path()))
            })
            .collect();
        let mut total: u64 = files.iter().map(|f| f.1).sum();
        if total <= self.limit_bytes {
            return;
        }
        files.sort();
        let mut evicted = 0;
        // The newest file stays even if it alone is over the limit.
        for (_, size, path) in &files[..files.len() - 1] {
            if total <= self.limit_bytes {
                break;
            }
            if std::fs::remove_file(path).is_ok() {
                total -= size;
                evicted += 1;
            }
        }
        tracing::info!(
            dir = %self.dir.display(),
            evicted,
            kept_mib = total >> 20,
            limit_mib = self.limit_bytes >> 20,
            "plugin cache over its limit (plugins.cache_limit_mib): removed the least recently used compiled plugins"
        );
    }
}
