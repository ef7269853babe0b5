//! Test plugin: a working round robin built against the previous version of the world
//! (`gateway:selector@0.2.0`, kept in `wit/`), as a plugin built with an older SDK is.
//! `gateway plugin check` must refuse it and say to rebuild it.
#![allow(unsafe_code)]
wit_bindgen::generate!({ path: "wit", world: "selector", generate_all });

use exports::gateway::selector::policy::Guest;
use gateway::selector::types::{Backend, Decision, Request};
use std::cell::Cell;

thread_local! {
    static COUNT: Cell<u32> = const { Cell::new(0) };
}

pub struct Old;

impl Guest for Old {
    fn configure(_params: String) -> Result<(), String> {
        Ok(())
    }

    fn pool_changed(_generation: u64, backends: Vec<Backend>) {
        COUNT.with(|c| c.set(backends.len() as u32));
    }

    fn pick(_req: &Request, _tried: u32) -> Decision {
        let n = COUNT.with(Cell::get).max(1);
        let turn = gateway::selector::host::counter_add("turn", 1) - 1;
        Decision::Backend(turn.rem_euclid(i64::from(n)) as u32)
    }
}

// Export glue only for Wasm: natively the symbol names (with `:`) do not link.
#[cfg(target_family = "wasm")]
export!(Old);
