//! Figures for `docs/reliability.md`: a suite test records one row per scenario; with
//! `GATEWAY_RELIABILITY_REPORT=FILE` set (scripts/reliability.sh sets it) each row is
//! appended to FILE as one JSON line, and it is always printed (`--nocapture` shows it).

use serde_json::Value;
use std::io::Write;

/// Records one row of the suite `suite` (a table in docs/reliability.md).
pub fn record(suite: &str, row: Value) {
    let mut line = serde_json::json!({ "suite": suite });
    if let (Some(obj), Value::Object(fields)) = (line.as_object_mut(), row) {
        obj.extend(fields);
    }
    eprintln!("reliability row: {line}");
    let Some(path) = std::env::var_os("GATEWAY_RELIABILITY_REPORT") else { return };
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .unwrap_or_else(|e| panic!("open {}: {e}", std::path::Path::new(&path).display()));
    writeln!(file, "{line}").expect("write a report row");
}

/// Records a scenario whose figures are one sentence (`text`).
pub fn figures(suite: &str, text: &str) {
    record(suite, serde_json::json!({ "figures": text }));
}

/// A row of table 2 (hostile plugins): the plugin, the requests still answered, the
/// gateway's RSS before and after (KiB), and what the operator sees.
pub fn hostile_plugin(plugin: &str, answered: String, rss: (u64, u64), operator_sees: &str) {
    record(
        "hostile-plugins",
        serde_json::json!({
            "plugin": plugin,
            "requests answered": answered,
            "RSS before, after (KiB)": format!("{}, {}", rss.0, rss.1),
            "what the operator sees": operator_sees,
        }),
    );
}
