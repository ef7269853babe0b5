//! Strategies compiled into the binary (built from `plugins/*` by `build.rs`).

include!(concat!(env!("OUT_DIR"), "/builtins.rs"));

/// The component bytes of the built-in strategy `name`.
pub fn get(name: &str) -> Option<&'static [u8]> {
    BUILTINS.iter().find(|(n, _)| *n == name).map(|(_, bytes)| *bytes)
}

/// Names of all built-in strategies.
pub fn names() -> impl Iterator<Item = &'static str> {
    BUILTINS.iter().map(|(n, _)| *n)
}
