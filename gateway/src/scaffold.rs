//! `gateway plugin new`: a ready-to-build plugin project whose strategy is a commented
//! round robin, with the WIT world (and, for Rust, the SDK; for C, the generated bindings)
//! included.

use std::path::{Path, PathBuf};

mod embedded {
    include!(concat!(env!("OUT_DIR"), "/scaffold_files.rs"));
    include!(concat!(env!("OUT_DIR"), "/c_bindings.rs"));
}

/// Languages a project can be created in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Lang {
    /// Rust with the gateway SDK, built for `wasm32-wasip2`.
    Rust,
    /// Python, built with componentize-py.
    Python,
    /// JavaScript, built with componentize-js.
    Js,
    /// C, compiled with `zig cc` (or clang) against bindings from `wit-bindgen c`.
    C,
}

/// Why a project could not be created.
#[derive(Debug, thiserror::Error)]
pub enum ScaffoldError {
    /// The name is not usable as a plugin (and crate/module) name.
    #[error("`{0}` is not a valid plugin name: use lowercase letters, digits and `-`, starting with a letter")]
    BadName(String),
    /// The destination exists.
    #[error("{0} already exists: choose another name or folder")]
    Exists(PathBuf),
    /// Writing failed.
    #[error("cannot write {path}: {error}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The OS error.
        error: std::io::Error,
    },
}

/// Template files per language: (path in the project, contents with `{{name}}`/`{{crate}}`).
fn templates(lang: Lang) -> Vec<(&'static str, &'static str)> {
    match lang {
        Lang::Rust => vec![
            ("Cargo.toml", include_str!("../templates/rust/Cargo.toml.tmpl")),
            ("src/lib.rs", include_str!("../templates/rust/src/lib.rs.tmpl")),
            ("README.md", include_str!("../templates/rust/README.md.tmpl")),
        ],
        Lang::Python => vec![
            ("app.py", include_str!("../templates/python/app.py.tmpl")),
            ("requirements.txt", include_str!("../templates/python/requirements.txt.tmpl")),
            ("README.md", include_str!("../templates/python/README.md.tmpl")),
        ],
        Lang::Js => vec![
            ("plugin.js", include_str!("../templates/js/plugin.js.tmpl")),
            ("package.json", include_str!("../templates/js/package.json.tmpl")),
            ("README.md", include_str!("../templates/js/README.md.tmpl")),
        ],
        Lang::C => vec![
            ("plugin.c", include_str!("../templates/c/plugin.c.tmpl")),
            ("build.sh", include_str!("../templates/c/build.sh.tmpl")),
            ("requirements.txt", include_str!("../templates/c/requirements.txt.tmpl")),
            ("README.md", include_str!("../templates/c/README.md.tmpl")),
        ],
    }
}

/// Writes the project for plugin `name` into `dest` (which must not exist). Returns the
/// files written.
pub fn create(name: &str, lang: Lang, dest: &Path) -> Result<Vec<PathBuf>, ScaffoldError> {
    let valid = name.chars().next().is_some_and(|c| c.is_ascii_lowercase())
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !name.ends_with('-');
    if !valid {
        return Err(ScaffoldError::BadName(name.into()));
    }
    if dest.exists() {
        return Err(ScaffoldError::Exists(dest.into()));
    }
    let crate_name = name.replace('-', "_");
    let mut files: Vec<(String, Vec<u8>)> = templates(lang)
        .into_iter()
        .map(|(path, text)| (path.to_owned(), text.replace("{{name}}", name).replace("{{crate}}", &crate_name).into()))
        .collect();
    for (path, text) in embedded::FILES {
        let wanted = path.starts_with("wit/") || (lang == Lang::Rust && path.starts_with("sdk/"));
        if wanted {
            files.push(((*path).to_owned(), text.as_bytes().to_vec()));
        }
    }
    if lang == Lang::C {
        files.extend(embedded::C_FILES.iter().map(|(path, bytes)| ((*path).to_owned(), bytes.to_vec())));
    }
    let mut written = Vec::new();
    for (rel, text) in files {
        let path = dest.join(&rel);
        let write = || -> std::io::Result<()> {
            std::fs::create_dir_all(path.parent().expect("joined path has a parent"))?;
            std::fs::write(&path, text)?;
            if rel.ends_with(".sh") {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
            }
            Ok(())
        };
        write().map_err(|error| ScaffoldError::Write { path: path.clone(), error })?;
        written.push(path);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked_and_projects_carry_the_wit_world() {
        let dir = std::env::temp_dir().join(format!("gateway-scaffold-{}", std::process::id()));
        assert!(matches!(create("Bad_Name", Lang::Rust, &dir), Err(ScaffoldError::BadName(_))));
        let files = create("my-strategy", Lang::Rust, &dir).unwrap();
        let has = |p: &str| files.iter().any(|f| f.ends_with(p));
        assert!(has("wit/selector.wit") && has("sdk/src/lib.rs") && has("src/lib.rs"));
        let cargo = std::fs::read_to_string(dir.join("Cargo.toml")).unwrap();
        assert!(cargo.contains("name = \"my-strategy\""));
        assert!(matches!(create("my-strategy", Lang::Rust, &dir), Err(ScaffoldError::Exists(_))));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn python_and_js_projects_have_their_build_files_and_no_sdk() {
        for (lang, source, build_file) in [
            (Lang::Python, "app.py", "requirements.txt"),
            (Lang::Js, "plugin.js", "package.json"),
            (Lang::C, "plugin.c", "build.sh"),
        ] {
            let dir = std::env::temp_dir().join(format!("gateway-scaffold-{lang:?}-{}", std::process::id()));
            let files = create("my-strategy", lang, &dir).unwrap();
            let has = |p: &str| files.iter().any(|f| f.ends_with(p));
            assert!(has("wit/selector.wit") && has(source) && has(build_file) && has("README.md"), "{files:?}");
            assert!(!files.iter().any(|f| f.starts_with(dir.join("sdk"))), "{lang:?} needs no SDK: {files:?}");
            for file in files.iter().filter(|f| f.extension().is_none_or(|x| x != "o")) {
                let text = std::fs::read_to_string(file).unwrap();
                assert!(!text.contains("{{"), "{} keeps a placeholder", file.display());
            }
            let readme = std::fs::read_to_string(dir.join("README.md")).unwrap();
            assert!(readme.contains("my-strategy.wasm"), "{readme}");
            std::fs::remove_dir_all(&dir).unwrap();
        }
    }
}
