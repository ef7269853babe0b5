//! Test plugin: a valid component of a different world (for `gateway plugin check`).
#![allow(unsafe_code)]
wit_bindgen::generate!({ path: "wit", world: "greeting" });

pub struct Greeter;

impl exports::other::thing::greeter::Guest for Greeter {
    fn greet(name: String) -> String {
        format!("hello {name}")
    }
}

// Export glue only for Wasm: natively the symbol names (with `:`) do not link.
#[cfg(target_family = "wasm")]
export!(Greeter);
