//! Builds the Wasm plugins the gateway embeds (`plugins/*`) and the ones its tests use
//! (`gateway/tests/plugins/*`): each crate is compiled for `wasm32-unknown-unknown` (so
//! it imports no WASI at all) by a nested cargo with its own target dir, then wrapped as
//! a component. `src/plugin/builtin.rs` embeds the results.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::{env, fs};

const WASM_TARGET: &str = "wasm32-unknown-unknown";

fn main() {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let root = manifest.parent().unwrap().to_path_buf();
    let out = PathBuf::from(env::var("OUT_DIR").unwrap());
    for dir in ["wit", "sdk", "plugins", "gateway/tests/plugins", "Cargo.toml", "Cargo.lock"] {
        println!("cargo:rerun-if-changed={}", root.join(dir).display());
    }
    println!("cargo:rerun-if-env-changed=CARGO_TARGET_DIR");

    // Only workspace members: a crate being written that is not listed yet is skipped.
    let members = fs::read_to_string(root.join("Cargo.toml")).unwrap();
    let is_member = |dir: &Path| {
        let rel = dir.strip_prefix(&root).unwrap().to_string_lossy().replace('\\', "/");
        let listed = members.contains(&format!("\"{rel}\""));
        if !listed {
            println!("cargo:warning={rel} is not in the workspace members of Cargo.toml: not built");
        }
        listed
    };
    let builtins: Vec<_> = crate_dirs(&root.join("plugins")).into_iter().filter(|(_, d)| is_member(d)).collect();
    let test_plugins: Vec<_> =
        crate_dirs(&manifest.join("tests/plugins")).into_iter().filter(|(_, d)| is_member(d)).collect();
    let all: Vec<_> = builtins.iter().chain(&test_plugins).collect();

    let target_dir = env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map(|d| if d.is_absolute() { d } else { root.join(d) })
        .unwrap_or_else(|| root.join("target"))
        .join("wasm-plugins");

    let mut cargo = Command::new(env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cargo
        .current_dir(&root)
        .args(["build", "--quiet", "--profile", "plugin", "--target", WASM_TARGET, "--target-dir"])
        .arg(&target_dir);
    for (name, _) in &all {
        cargo.args(["-p", name]);
    }
    for var in ["CARGO_ENCODED_RUSTFLAGS", "RUSTFLAGS", "CARGO_TARGET_DIR", "CARGO_BUILD_TARGET", "RUSTC_WRAPPER"] {
        cargo.env_remove(var);
    }
    let status = cargo.status().expect("run cargo to build the Wasm plugins");
    if !status.success() {
        panic!(
            "building the Wasm plugins failed (see above). If the {WASM_TARGET} target is missing, run:\n    rustup target add {WASM_TARGET}"
        );
    }

    let mut embedded =
        String::from("/// Built-in strategies: (name, component bytes).\npub const BUILTINS: &[(&str, &[u8])] = &[\n");
    for (name, dir) in &all {
        let core = target_dir.join(WASM_TARGET).join("plugin").join(format!("{}.wasm", name.replace('-', "_")));
        let module = fs::read(&core).unwrap_or_else(|e| panic!("read {}: {e}", core.display()));
        let component = wit_component::ComponentEncoder::default()
            .module(&module)
            .and_then(|e| e.validate(true).encode())
            .unwrap_or_else(|e| panic!("wrap {} as a component: {e:#}", core.display()));
        let plugin_name = dir.file_name().unwrap().to_str().unwrap();
        let dest = out.join(format!("{plugin_name}.wasm"));
        fs::write(&dest, component).unwrap();
        if dir.starts_with(root.join("plugins")) {
            embedded.push_str(&format!("    ({plugin_name:?}, include_bytes!({:?})),\n", dest.display().to_string()));
        }
    }
    embedded.push_str("];\n");
    fs::write(out.join("builtins.rs"), embedded).unwrap();
    write_scaffold_sources(&root, &out);
    write_c_bindings(&root, &out);
    // Integration tests find the test plugins (trap, spin, wrong-world) here.
    println!("cargo:rustc-env=GATEWAY_TEST_PLUGINS={}", out.display());
}

/// (package name, directory) of every crate directly under `dir`.
fn crate_dirs(dir: &Path) -> Vec<(String, PathBuf)> {
    let mut crates: Vec<_> = fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.join("Cargo.toml").is_file())
        .map(|p| {
            let manifest = fs::read_to_string(p.join("Cargo.toml")).unwrap();
            let name = manifest
                .lines()
                .find_map(|l| l.trim().strip_prefix("name = "))
                .map(|n| n.trim_matches('"').to_owned())
                .unwrap_or_else(|| panic!("{}: no package name", p.display()));
            (name, p)
        })
        .collect();
    crates.sort();
    crates
}

/// Embeds the SDK sources and the WIT world for `gateway plugin new`.
fn write_scaffold_sources(root: &Path, out: &Path) {
    let mut files = Vec::new();
    for (dir, prefix) in [(root.join("sdk/src"), "sdk/src"), (root.join("wit"), "wit")] {
        let mut names: Vec<_> =
            fs::read_dir(&dir).unwrap().flatten().map(|e| e.path()).filter(|p| p.is_file()).collect();
        names.sort();
        for path in names {
            let name = path.file_name().unwrap().to_str().unwrap().to_owned();
            files.push((format!("{prefix}/{name}"), path));
        }
    }
    let mut code = String::from(
        "/// SDK and WIT files for new plugin projects: (relative path, contents).\npub const FILES: &[(&str, &str)] = &[\n",
    );
    for (rel, path) in files {
        code.push_str(&format!("    ({rel:?}, include_str!({:?})),\n", path.display().to_string()));
    }
    let sdk_manifest = out.join("sdk-Cargo.toml");
    fs::write(&sdk_manifest, standalone_sdk_manifest(root)).unwrap();
    code.push_str(&format!("    (\"sdk/Cargo.toml\", include_str!({:?})),\n", sdk_manifest.display().to_string()));
    code.push_str("];\n");
    fs::write(out.join("scaffold_files.rs"), code).unwrap();
}

/// The C bindings of the WIT world, as `wit-bindgen c wit --world selector` writes them
/// (`selector.c`, `selector.h` and `selector_component_type.o`, which carries the world's
/// types into the core module), for `gateway plugin new --lang c` projects' `gen/` folder.
fn write_c_bindings(root: &Path, out: &Path) {
    use wit_bindgen_core::wit_parser::Resolve;
    let mut resolve = Resolve::default();
    let (package, _) = resolve.push_path(root.join("wit")).expect("parse wit/");
    let world = resolve.select_world(&[package], Some("selector")).expect("world `selector` in wit/");
    let mut files = wit_bindgen_core::Files::default();
    wit_bindgen_c::Opts::default().build().generate(&mut resolve, world, &mut files).expect("generate the C bindings");
    let dir = out.join("c-bindings");
    fs::create_dir_all(&dir).unwrap();
    let mut code = String::from(
        "/// C bindings for new C plugin projects: (relative path, contents).\npub const C_FILES: &[(&str, &[u8])] = &[\n",
    );
    for (name, bytes) in files.iter() {
        let dest = dir.join(name);
        fs::write(&dest, bytes).unwrap();
        code.push_str(&format!("    (\"gen/{name}\", include_bytes!({:?})),\n", dest.display().to_string()));
    }
    code.push_str("];\n");
    fs::write(out.join("c_bindings.rs"), code).unwrap();
}

/// sdk/Cargo.toml with the workspace-inherited fields resolved, for a project of its own.
fn standalone_sdk_manifest(root: &Path) -> String {
    let workspace = fs::read_to_string(root.join("Cargo.toml")).unwrap();
    let sdk = fs::read_to_string(root.join("sdk/Cargo.toml")).unwrap();
    let section = |text: &str, name: &str| -> Vec<String> {
        text.split("\n[")
            .find(|s| s.starts_with(&format!("{name}]")))
            .map(|s| s.lines().skip(1).map(str::to_owned).collect())
            .unwrap_or_default()
    };
    let workspace_deps = section(&workspace, "workspace.dependencies");
    let mut out = String::from(
        "[package]\nname = \"gateway-sdk\"\nversion = \"0.1.0\"\nedition = \"2024\"\npublish = false\n\n[dependencies]\n",
    );
    for line in section(&sdk, "dependencies") {
        let Some((dep, _)) = line.split_once(".workspace = true") else { continue };
        let spec = workspace_deps
            .iter()
            .find(|l| l.split_once(" =").is_some_and(|(n, _)| n.trim() == dep))
            .unwrap_or_else(|| panic!("sdk dependency {dep} is not in [workspace.dependencies]"));
        out.push_str(spec);
        out.push('\n');
    }
    out
}
