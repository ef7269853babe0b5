//! Precompiled plugin artifacts on disk, keyed by the component's SHA-256 and the
//! engine's compatibility hash (wasmtime version + every setting that changes code), so a
//! restart or a re-swap of the same file loads in milliseconds instead of recompiling
//! (seconds for Python or JavaScript plugins).

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use wasmtime::Engine;
use wasmtime::component::Component;

/// A folder of `.cwasm` files written by this gateway only.
#[derive(Debug, Clone)]
pub struct Cache {
    dir: PathBuf,
    engine_key: String,
}

impl Cache {
    /// Uses `dir`, creating it (mode 0700) if needed.
    pub fn new(dir: PathBuf, engine: &Engine) -> std::io::Result<Self> {
        std::fs::create_dir_all(&dir)?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
        }
        let mut h = std::collections::hash_map::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut h);
        env!("CARGO_PKG_VERSION").hash(&mut h);
        Ok(Cache { dir, engine_key: format!("{:016x}", h.finish()) })
    }

    /// The default folder: `$XDG_CACHE_HOME/gateway/plugins` or `~/.cache/gateway/plugins`.
    pub fn default_dir() -> Option<PathBuf> {
        let base = std::env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache")))?;
        Some(base.join("gateway").join("plugins"))
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
            Ok(c) => Some(c),
            Err(e) => {
                tracing::warn!(path = %path.display(), "ignoring unreadable precompiled plugin: {e:#}");
                let _ = std::fs::remove_file(&path);
                None
            }
        }
    }

    /// Saves `component`'s compiled code for next time (best effort).
    pub fn store(&self, sha256: &str, component: &Component) {
        let path = self.path(sha256);
        let result = component.serialize().map_err(std::io::Error::other).and_then(|bytes| {
            let tmp = path.with_extension(format!("tmp{}", std::process::id()));
            std::fs::write(&tmp, bytes)?;
            std::fs::rename(&tmp, &path)
        });
        if let Err(e) = result {
            tracing::debug!(path = %path.display(), "could not cache the compiled plugin: {e}");
        }
    }
}
