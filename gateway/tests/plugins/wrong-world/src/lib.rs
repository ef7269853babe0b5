//! Test plugin: a valid component of a different world (for `gateway plugin check`).
#![allow(unsafe_code)]
wit_bindgen::generate!({ path: "wit", world: "greeting" });

pub struct Greeter;

impl exports::other::thing::greeter::Guest for Greeter {
    fn greet(name: String) -> String {
        format!("hello {name}")
    }
}

export!(Greeter);
