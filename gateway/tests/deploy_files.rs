//! The deployment files under `deploy/` (no container engine runs here): every YAML file
//! parses (Kubernetes files as several documents), every gateway config they contain (the
//! ConfigMap's `gateway.yaml`, the config files compose mounts) passes
//! `gateway config check` as a user would run it, the files compose and kustomize refer
//! to exist, and every path the Dockerfile copies exists.

mod util;

use serde::Deserialize;
use serde_yaml::Value;
use std::path::{Path, PathBuf};
use std::time::Duration;
use util::{TempDir, run_cli};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn deploy() -> PathBuf {
    root().join("deploy")
}

/// Every document of a YAML file, with merge keys (`<<: *anchor`) applied.
fn documents(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap();
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| {
            let mut v = Value::deserialize(d).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            v.apply_merge().unwrap_or_else(|e| panic!("{}: merge keys: {e}", path.display()));
            v
        })
        .filter(|v| !v.is_null())
        .collect()
}

fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            yaml_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "yaml" || x == "yml") {
            out.push(p);
        }
    }
}

/// Runs `gateway config check` on `text` (written into `dir` as `name`). Token files are
/// secrets the platform mounts (a Kubernetes Secret, the compose `tokens` volume): they
/// point at a token made here.
fn config_check(dir: &TempDir, name: &str, text: &str) {
    let mut config: Value = serde_yaml::from_str(text).unwrap_or_else(|e| panic!("{name}: {e}"));
    let token = dir.write(&format!("{name}.token"), "token-for-the-config-check-0123456789");
    for section in ["admin", "registry"] {
        if let Some(file) = config.get_mut(section).and_then(|s| s.get_mut("token_file")) {
            *file = Value::String(token.to_str().unwrap().to_owned());
        }
    }
    let file = dir.write(name, serde_yaml::to_string(&config).unwrap());
    let out = run_cli(&["config", "check", file.to_str().unwrap()], Duration::from_secs(60));
    assert_eq!(out.code, Some(0), "{name} fails `gateway config check`:\n{}{}\n{text}", out.stdout, out.stderr);
    assert!(out.stdout.starts_with("ok: "), "{}", out.stdout);
}

#[test]
fn every_yaml_file_parses_and_every_gateway_config_passes_config_check() {
    let mut files = Vec::new();
    yaml_files(&deploy(), &mut files);
    files.sort();
    assert!(files.len() >= 8, "{files:?}");
    let dir = TempDir::new();
    let mut configs = 0;
    let mut kinds = Vec::new();
    for f in &files {
        let docs = documents(f);
        assert!(!docs.is_empty(), "{}: empty", f.display());
        if !f.starts_with(deploy().join("kubernetes")) {
            continue;
        }
        for doc in docs {
            let kind = doc["kind"].as_str().unwrap_or_else(|| panic!("{}: a document without `kind`", f.display()));
            assert!(doc["apiVersion"].is_string(), "{}: {kind} without apiVersion", f.display());
            if kind == "Kustomization" {
                for r in doc["resources"].as_sequence().unwrap() {
                    let path = f.parent().unwrap().join(r.as_str().unwrap());
                    assert!(path.exists(), "{}: resource {} does not exist", f.display(), path.display());
                }
                continue;
            }
            let name =
                doc["metadata"]["name"].as_str().unwrap_or_else(|| panic!("{}: {kind} without a name", f.display()));
            kinds.push((kind.to_owned(), name.to_owned(), doc["spec"]["clusterIP"].as_str() == Some("None")));
            if kind == "ConfigMap" {
                for (key, value) in doc["data"].as_mapping().unwrap() {
                    let key = key.as_str().unwrap();
                    if key.ends_with(".yaml") && value.as_str().is_some_and(|v| v.contains("upstreams:")) {
                        config_check(&dir, &format!("k8s-{name}-{key}"), value.as_str().unwrap());
                        configs += 1;
                    }
                }
            }
        }
    }
    for kind in ["Deployment", "Service", "ConfigMap"] {
        assert!(kinds.iter().any(|(k, _, _)| k == kind), "no {kind} in deploy/kubernetes: {kinds:?}");
    }
    assert!(kinds.iter().any(|(k, _, headless)| k == "Service" && *headless), "no headless Service: {kinds:?}");

    // compose: what it mounts exists; the gateway configs it mounts pass the check.
    let compose_file = deploy().join("compose.yaml");
    let compose = &documents(&compose_file)[0];
    let services = compose["services"].as_mapping().unwrap();
    let mut gateway_config = None;
    for (name, svc) in services {
        for v in svc["volumes"].as_sequence().into_iter().flatten() {
            let Some((source, target)) = v.as_str().and_then(|v| v.split_once(':')) else { continue };
            if !source.starts_with('.') {
                continue; // a named volume
            }
            let path = deploy().join(source);
            assert!(path.exists(), "compose service {name:?} mounts {source}, which does not exist");
            if target.starts_with("/etc/gateway/") {
                let text = std::fs::read_to_string(&path).unwrap();
                config_check(&dir, &format!("compose-{}", path.file_name().unwrap().to_str().unwrap()), &text);
                gateway_config = Some(serde_yaml::from_str::<Value>(&text).unwrap());
                configs += 1;
            }
        }
    }
    assert!(configs >= 2, "a ConfigMap and a compose config: {configs}");
    let gateway_config = gateway_config.expect("compose mounts a gateway config");
    // The sidecars join an upstream that takes registrations, through a replica compose runs.
    let mut sidecars = 0;
    for (name, svc) in services {
        let Some(cmd) = svc["command"].as_sequence() else { continue };
        let args: Vec<&str> = cmd.iter().filter_map(Value::as_str).collect();
        if args.first() != Some(&"register") {
            continue;
        }
        sidecars += 1;
        let arg = |flag: &str| args.iter().position(|a| *a == flag).map(|i| args[i + 1]).unwrap();
        let upstream = &gateway_config["upstreams"][arg("--upstream")];
        assert!(upstream["discovery"]["etcd"].is_mapping(), "sidecar {name:?}: upstream without discovery.etcd");
        let host = arg("--registry").trim_start_matches("http://").split(':').next().unwrap();
        assert!(services.contains_key(host), "sidecar {name:?} registers with {host}, not a compose service");
    }
    assert_eq!(sidecars, 3, "three demo backends register themselves");
    // Prometheus scrapes services compose runs.
    let prometheus = &documents(&deploy().join("compose/prometheus.yml"))[0];
    for t in prometheus["scrape_configs"][0]["static_configs"][0]["targets"].as_sequence().unwrap() {
        let host = t.as_str().unwrap().split(':').next().unwrap();
        assert!(services.contains_key(host), "Prometheus scrapes {host}, not a compose service");
    }
}

#[test]
fn every_path_the_dockerfile_copies_exists() {
    let file = deploy().join("Dockerfile");
    let text = std::fs::read_to_string(&file).unwrap();
    let mut copied = 0;
    for line in text.lines().map(str::trim) {
        let Some(rest) = line.strip_prefix("COPY ") else { continue };
        let words: Vec<&str> = rest.split_whitespace().filter(|w| !w.starts_with("--")).collect();
        if rest.contains("--from=") {
            continue; // from an earlier stage
        }
        for src in &words[..words.len() - 1] {
            assert!(root().join(src).exists(), "deploy/Dockerfile copies {src}, which does not exist");
            copied += 1;
        }
    }
    assert!(copied >= 5, "{copied}");
    // What the build stage needs (README: protoc for the etcd client, wasm32 for the
    // built-in plugins), and a non-root runtime user.
    for needed in ["protobuf-compiler", "wasm32-unknown-unknown", "USER 10001"] {
        assert!(text.contains(needed), "deploy/Dockerfile lacks {needed}");
    }
    // Every workspace member is in what the build copies.
    let manifest = std::fs::read_to_string(root().join("Cargo.toml")).unwrap();
    let manifest: toml_like::Members = toml_like::members(&manifest);
    for m in manifest {
        let top = m.split('/').next().unwrap();
        assert!(text.contains(&format!("COPY {top} {top}")), "workspace member {m} is not copied by deploy/Dockerfile");
    }
}

/// The `members = [...]` list of the workspace manifest (no TOML parser in the tree).
mod toml_like {
    pub type Members = Vec<String>;

    pub fn members(manifest: &str) -> Members {
        let start = manifest.find("members = [").expect("a members list") + "members = [".len();
        let end = start + manifest[start..].find(']').unwrap();
        manifest[start..end]
            .split(',')
            .map(|s| s.trim().trim_matches('"').to_owned())
            .filter(|s| !s.is_empty())
            .collect()
    }
}
