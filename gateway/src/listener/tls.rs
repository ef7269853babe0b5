//! TLS termination: a listener's certificates, chosen by SNI, reloaded when their files
//! change.
//!
//! A [`CertStore`] holds the parsed certificates behind an `ArcSwap`; the rustls
//! [`ServerConfig`] asks it for a certificate on every handshake (one lock-free load).
//! [`watch`] rebuilds a store off the event loops when a file changes and swaps it in:
//! new handshakes see the new certificate, connections already open keep theirs. A file
//! that does not parse, or a key that does not match its certificate, is refused with
//! one log line and the previous certificate keeps serving.

use crate::config::CertificateFiles;
use arc_swap::ArcSwap;
use notify::{RecursiveMode, Watcher};
use rustls::ServerConfig;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Quiet time after the last write to a certificate or key file before it is read: a
/// renewal tool writes the certificate and the key one after the other.
const DEBOUNCE: Duration = Duration::from_millis(200);

/// The protocols offered by ALPN, preferred first.
const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// The certificates of one listener, swapped whole on reload.
#[derive(Debug)]
pub struct CertStore {
    files: Vec<CertificateFiles>,
    current: ArcSwap<Certs>,
    /// SHA-256 of the files last applied and last refused, so a write that changes
    /// nothing is not reloaded and the same bad file is logged once.
    seen: Mutex<Seen>,
}

/// Hashes of the files as last applied and as last refused.
#[derive(Debug, Default)]
struct Seen {
    applied: Option<[u8; 32]>,
    refused: Option<[u8; 32]>,
}

/// Parsed certificates: by exact name, by wildcard suffix, and the default.
#[derive(Debug)]
struct Certs {
    default: Arc<CertifiedKey>,
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// `*.example.com` is kept under `example.com`.
    wildcard: HashMap<String, Arc<CertifiedKey>>,
    /// Every certificate's names, for the log.
    names: Vec<Vec<String>>,
}

impl Certs {
    fn find(&self, sni: Option<&str>) -> Arc<CertifiedKey> {
        let Some(name) = sni else { return self.default.clone() };
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        if let Some(c) = self.exact.get(&name) {
            return c.clone();
        }
        if let Some((_, parent)) = name.split_once('.')
            && let Some(c) = self.wildcard.get(parent)
        {
            return c.clone();
        }
        self.default.clone()
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads one certificate chain and its key; the error names the file and the reason.
fn load_pair(files: &CertificateFiles, provider: &CryptoProvider) -> Result<(Arc<CertifiedKey>, Vec<String>), String> {
    let (cert_path, key_path) = (files.cert.display(), files.key.display());
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.cert)
        .map_err(|e| format!("{cert_path}: cannot read the certificate: {}", pem_error(e)))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{cert_path}: not a PEM certificate file: {}", pem_error(e)))?;
    let Some(leaf) = chain.first() else {
        return Err(format!("{cert_path}: no certificate in the file (expected a PEM `BEGIN CERTIFICATE` block)"));
    };
    let names: Vec<String> = webpki::EndEntityCert::try_from(leaf)
        .map_err(|e| format!("{cert_path}: the first certificate cannot be parsed: {e}"))?
        .valid_dns_names()
        .map(str::to_ascii_lowercase)
        .collect();
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .map_err(|e| format!("{key_path}: cannot read the private key: {}", pem_error(e)))?;
    let key = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| format!("{key_path}: unsupported private key: {e} (RSA, ECDSA P-256/P-384 and Ed25519 work)"))?;
    let certified = CertifiedKey::new(chain, key);
    match certified.keys_match() {
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
            return Err(format!("{key_path}: this private key does not belong to the certificate in {cert_path}"));
        }
        Err(e) => return Err(format!("{cert_path}: {e}")),
    }
    Ok((Arc::new(certified), names))
}

fn pem_error(e: rustls::pki_types::pem::Error) -> String {
    match e {
        rustls::pki_types::pem::Error::Io(e) => e.to_string(),
        rustls::pki_types::pem::Error::NoItemsFound => "no PEM block of the expected kind in the file".into(),
        other => format!("{other:?}"),
    }
}

fn build(files: &[CertificateFiles], provider: &CryptoProvider) -> Result<Certs, String> {
    let mut exact = HashMap::new();
    let mut wildcard = HashMap::new();
    let mut all_names = Vec::new();
    let mut default = None;
    for f in files {
        let (key, names) = load_pair(f, provider)?;
        // The first certificate that names a host wins it.
        for n in &names {
            match n.strip_prefix("*.") {
                Some(parent) => wildcard.entry(parent.to_owned()).or_insert_with(|| key.clone()),
                None => exact.entry(n.clone()).or_insert_with(|| key.clone()),
            };
        }
        default.get_or_insert_with(|| key.clone());
        all_names.push(names);
    }
    let default = default.ok_or("no certificates configured")?;
    Ok(Certs { default, exact, wildcard, names: all_names })
}

fn files_hash(files: &[CertificateFiles]) -> Option<[u8; 32]> {
    let mut h = Sha256::new();
    for f in files {
        h.update(std::fs::read(&f.cert).ok()?);
        h.update(std::fs::read(&f.key).ok()?);
    }
    Some(h.finalize().into())
}

impl CertStore {
    /// Reads every certificate and key; the error names the file and what is wrong.
    pub fn load(files: &[CertificateFiles]) -> Result<Arc<CertStore>, String> {
        let hash = files_hash(files);
        let certs = build(files, &provider())?;
        for (f, names) in files.iter().zip(&certs.names) {
            if names.is_empty() {
                tracing::warn!(cert = %f.cert.display(), "this certificate carries no DNS names: it is only ever used as the default");
            }
        }
        Ok(Arc::new(CertStore {
            files: files.to_vec(),
            current: ArcSwap::from_pointee(certs),
            seen: Mutex::new(Seen { applied: hash, refused: None }),
        }))
    }

    /// Reads the files again and swaps the new certificates in; on an error the current
    /// ones stay. `Ok(false)`: the files did not change.
    pub fn reload(&self) -> Result<bool, String> {
        let hash = files_hash(&self.files);
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if hash.is_some() && (hash == seen.applied || hash == seen.refused) {
            return Ok(false);
        }
        match build(&self.files, &provider()) {
            Ok(certs) => {
                self.current.store(Arc::new(certs));
                *seen = Seen { applied: hash, refused: None };
                Ok(true)
            }
            Err(e) => {
                seen.refused = hash;
                Err(e)
            }
        }
    }

    /// The DNS names of every certificate, in order.
    pub fn names(&self) -> Vec<Vec<String>> {
        self.current.load().names.clone()
    }

    /// The rustls config of a listener using these certificates: TLS 1.2 and 1.3,
    /// ALPN `h2` and `http/1.1`.
    pub fn server_config(self: &Arc<Self>) -> Result<Arc<ServerConfig>, String> {
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| format!("TLS setup: {e}"))?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(Resolver(self.clone())));
        config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
        Ok(Arc::new(config))
    }
}

/// Picks the certificate for a handshake from the store's current set.
#[derive(Debug)]
struct Resolver(Arc<CertStore>);

impl ResolvesServerCert for Resolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.current.load().find(hello.server_name()))
    }
}

/// Watches the certificate and key files of `stores` until `stop`, reloading a store
/// when one of its files changes (debounced). Watches the folders, so a file replaced
/// by a rename (as certbot and editors do) is followed.
pub fn watch(stores: Vec<Arc<CertStore>>, stop: CancellationToken) {
    if stores.is_empty() {
        return;
    }
    let paths: Vec<PathBuf> = stores
        .iter()
        .flat_map(|s| s.files.iter().flat_map(|f| [&f.cert, &f.key]))
        .map(|p| std::path::absolute(p).unwrap_or_else(|_| p.clone()))
        .collect();
    let mut dirs: Vec<PathBuf> = paths.iter().filter_map(|p| p.parent().map(Path::to_path_buf)).collect();
    dirs.sort();
    dirs.dedup();
    let (tx, mut rx) = mpsc::unbounded_channel::<()>();
    let watched = paths.clone();
    let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        use notify::EventKind::{Access, Create, Modify, Remove};
        use notify::event::{AccessKind, AccessMode};
        let Ok(event) = event else { return };
        let relevant =
            matches!(event.kind, Create(_) | Modify(_) | Remove(_) | Access(AccessKind::Close(AccessMode::Write)));
        if relevant && event.paths.iter().any(|p| watched.contains(p)) {
            let _ = tx.send(());
        }
    });
    let mut watcher = match watcher {
        Ok(w) => w,
        Err(e) => {
            tracing::error!("certificate reload is off: cannot watch the certificate files: {e}");
            return;
        }
    };
    for dir in &dirs {
        if let Err(e) = watcher.watch(dir, RecursiveMode::NonRecursive) {
            tracing::error!(folder = %dir.display(), "certificate reload is off for this folder: cannot watch it: {e}");
        }
    }
    tokio::spawn(async move {
        let _watcher = watcher;
        while crate::debounce::next_quiet(&mut rx, &stop, DEBOUNCE).await {
            for store in &stores {
                let files: Vec<String> = store.files.iter().map(|f| f.cert.display().to_string()).collect();
                match store.reload() {
                    Ok(false) => {}
                    Ok(true) => {
                        crate::metrics::control().cert_reloads_ok.inc();
                        tracing::info!(certificates = ?files, names = ?store.names(), "certificates reloaded: new TLS handshakes use them");
                    }
                    Err(e) => {
                        crate::metrics::control().cert_reloads_refused.inc();
                        tracing::error!(certificates = ?files, "certificate refused, the previous one keeps serving: {e}");
                    }
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_files_are_named() {
        let files = [CertificateFiles { cert: "/nonexistent/a.pem".into(), key: "/nonexistent/a.key".into() }];
        let err = CertStore::load(&files).unwrap_err();
        assert!(err.starts_with("/nonexistent/a.pem: cannot read the certificate"), "{err}");
    }
}
