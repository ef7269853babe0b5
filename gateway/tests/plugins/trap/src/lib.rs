//! Test plugin: traps on every `pick` (a Rust panic becomes `unreachable` in Wasm).
use gateway_sdk::{Backend, Decision, Request, Strategy};

#[derive(Default)]
pub struct Trap;

impl Strategy for Trap {
    fn pool_changed(&mut self, _generation: u64, _backends: Vec<Backend>) {}
    fn pick(&mut self, _req: &dyn Request, _exclude: &[u32]) -> Decision {
        panic!("this plugin always traps")
    }
}

gateway_sdk::export_strategy!(Trap);
