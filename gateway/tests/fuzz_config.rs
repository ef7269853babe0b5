//! Reliability suite, fuzzing the config loader (docs/reliability.md, table 6): arbitrary
//! text, and every example config with one value replaced by junk, are either accepted or
//! refused with an error that names the file and a field or line; never a panic. Bounded
//! (a few thousand cases, seconds); cases that ever failed are kept in
//! `proptest-regressions/` and run first.

use gateway::config::{ConfigError, from_yaml};
use proptest::prelude::*;
use std::path::{Path, PathBuf};

/// The example configs, read once.
fn examples() -> &'static [(PathBuf, String)] {
    static FILES: std::sync::OnceLock<Vec<(PathBuf, String)>> = std::sync::OnceLock::new();
    FILES.get_or_init(read_examples)
}

fn read_examples() -> Vec<(PathBuf, String)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut files: Vec<(PathBuf, String)> = std::fs::read_dir(&dir)
        .expect("read examples/")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .map(|p| {
            let text = std::fs::read_to_string(&p).unwrap();
            (p, text)
        })
        .collect();
    files.sort();
    assert!(files.len() >= 3, "the example configs are missing from {}", dir.display());
    files
}

/// The error must say where: the file always, and a field or a line.
fn check_error(path: &Path, text: &str, e: &ConfigError) -> Result<(), TestCaseError> {
    let said = e.to_string();
    prop_assert!(said.starts_with(&path.display().to_string()), "the error does not name the file: {said}");
    if let ConfigError::Invalid { line, field, .. } = e {
        prop_assert!(!field.is_empty(), "no field: {said}");
        if let Some(line) = line {
            prop_assert!(*line >= 1 && *line <= text.lines().count() + 1, "line {line} is outside the file: {said}");
        }
    }
    Ok(())
}

/// Values that are wrong in interesting ways: types, ranges, sizes, unicode, YAML syntax.
fn junk() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("-1".to_owned()),
        Just("0".to_owned()),
        Just("99999999999999999999".to_owned()),
        Just("1e309".to_owned()),
        Just("~".to_owned()),
        Just("[]".to_owned()),
        Just("{}".to_owned()),
        Just("[[[[[[[[".to_owned()),
        Just("\"unterminated".to_owned()),
        Just("*anchor".to_owned()),
        Just("&a [*a]".to_owned()),
        Just("0s".to_owned()),
        Just("10000000000000000000h".to_owned()),
        Just("999.999.999.999:99999".to_owned()),
        Just("[::1]:0".to_owned()),
        Just("\u{202e}evil".to_owned()),
        "[ -~]{0,12}",
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1500))]

    /// Arbitrary text: accepted or refused with a located error, never a panic.
    #[test]
    fn arbitrary_text_is_refused_with_a_location(text in "\\PC{0,300}") {
        let path = Path::new("fuzz.yaml");
        if let Err(e) = from_yaml(path, &text) {
            check_error(path, &text, &e)?;
        }
    }

    /// A real config with one value replaced (or one line cut short).
    #[test]
    fn a_real_config_with_one_bad_value_is_refused_with_a_location(file in 0usize..16, line in 0usize..200, value in junk(), cut: bool) {
        let files = examples();
        let (path, text) = &files[file % files.len()];
        let lines: Vec<&str> = text.lines().collect();
        let at = line % lines.len();
        let mut changed: Vec<String> = lines.iter().map(|l| (*l).to_owned()).collect();
        changed[at] = match (lines[at].split_once(": "), cut) {
            (Some((key, _)), false) => format!("{key}: {value}"),
            _ => {
                let mut half = lines[at].len() / 2;
                while !lines[at].is_char_boundary(half) {
                    half -= 1;
                }
                lines[at][..half].to_owned()
            }
        };
        let text = changed.join("\n");
        if let Err(e) = from_yaml(path, &text) {
            check_error(path, &text, &e)?;
        }
    }
}

#[test]
fn every_example_config_is_valid() {
    for (path, text) in examples() {
        if let Err(e) = from_yaml(path, text) {
            panic!("{e}");
        }
    }
}
